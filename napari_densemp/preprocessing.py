"""The one preprocessing of the project: intensities and in-plane grid, as the model saw them.

A checkpoint carries a :class:`PreprocessingProfile`; the engine, the trainer and the
benchmarks all go through :func:`prepare_volume`, so a model never sees a scan prepared
differently from its training data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DenseMPError

Modality = Literal["ct", "mri"]
AIR_HU = -500.0  # anything below is air: tells the body from its surroundings on CT
# Air (-1000) and fat (-100) lie below this in Hounsfield units; an MRI's intensities do not (raw
# magnitudes are not negative, z-scored ones stay within a few units of 0).
CT_BELOW_HU = -50.0
HU_STORAGE_OFFSET = 1024.0  # CTs stored unsigned hold HU + 1024
BELOW_ANY_AIR = -1100.0  # in HU or HU + 1024 only a scanner's padding lies lower


@dataclass(frozen=True)
class PreprocessingProfile:
    """How scans are turned into network input; recorded in every checkpoint."""

    ct_window: tuple[float, float] = (-125.0, 275.0)  # HU, the paper's abdominal window
    mri_upper_percentile: float = 99.5  # clip MRI's bright end
    in_plane_spacing_mm: float = 1.25  # the model's training grid (CHAOS' spacing)
    max_in_plane_size: int = 512  # coarser than the training grid rather than larger than this
    min_in_plane_size: int = 64  # finer than it rather than too small for the stride-8 features
    # Per modality, the axis codes (nibabel's, e.g. "RAS") of the scans the model was trained on:
    # slices of a scan whose affine is known are shown to it with their in-plane axes in that
    # order and direction (networks are not flip-invariant). Empty: slices as stored.
    orientations: dict[str, str] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessingProfile:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DenseMPError(f"Unknown preprocessing settings in checkpoint: {sorted(unknown)}")
        values = dict(data)
        if "ct_window" in values:
            values["ct_window"] = tuple(float(v) for v in values["ct_window"])
        orientations = dict(values.get("orientations") or {})
        for modality, codes in orientations.items():
            if modality not in ("ct", "mri") or not _valid_axis_codes(codes):
                raise DenseMPError(f"Checkpoint orientation {modality}={codes!r}: expected ct or mri and three "
                                   f"axis codes such as RAS or LPS.")
        values["orientations"] = orientations
        return cls(**values)


def _valid_axis_codes(codes: object) -> bool:
    """Three letters naming each world axis once, e.g. RAS, LPS, PIR."""
    pairs = ("LR", "PA", "IS")
    return (isinstance(codes, str) and len(codes) == 3
            and sorted(next((i for i, p in enumerate(pairs) if c in p), -1) for c in codes) == [0, 1, 2])


def check_volume(volume: np.ndarray, name: str = "image") -> np.ndarray:
    """A finite 3D array, or a DenseMPError that says what is wrong with it."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DenseMPError(f"The {name} must be a 3D volume; got {volume.ndim}D with shape {volume.shape}.")
    if min(volume.shape) < 1:
        raise DenseMPError(f"The {name} is empty (shape {volume.shape}).")
    if not np.issubdtype(volume.dtype, np.number) or np.iscomplexobj(volume):
        raise DenseMPError(f"The {name} must hold real numbers; got dtype {volume.dtype}.")
    if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
        bad = int(np.size(volume) - np.isfinite(volume).sum())
        raise DenseMPError(f"The {name} holds {bad} NaN or infinite voxels; fix or mask them first.")
    low, high = volume.min(), volume.max()
    if low == high:
        raise DenseMPError(f"The {name} holds the same value ({low}) in every voxel: there is nothing to segment.")
    return volume


def detect_modality(volume: np.ndarray) -> Modality:
    """CT when at least 1% of the voxels lie below -50, as air and fat do in Hounsfield units, MRI
    otherwise.

    Not air alone: a CT clipped to a window (as some datasets ship them, air at -125) or cropped
    inside the body has none, and read as MRI its mandible lost its marrow to the MRI band (OpenKBP
    pt_13 clipped to [-200, 300]: 66.3 -> 32.0 Dice).
    """
    sample = np.asarray(volume[:: max(1, volume.shape[0] // 16)], dtype=np.float32)
    return "ct" if float(np.percentile(sample, 1.0)) < CT_BELOW_HU else "mri"


def stored_hu_offset(volume: np.ndarray) -> float:
    """1024 when a CT holds Hounsfield units + 1024 (stored unsigned without its rescale
    intercept, as OpenKBP and some converters do), else 0.

    A CT in HU has air below -500. Such a scan has none there, but its air at about 0 (-1024 HU
    shifted) and its fat and soft tissue at 824-1224 (-200 to 200 HU shifted): at least 2% of
    the voxels, and 3 times as many as at 300-800, where little lies (lung). A scan in HU cropped
    inside the body has soft tissue at about 0 too, but what it has at 824-1224 is cortical bone,
    with more trabecular bone below it. Only asked of scans known to be CT: a 12-bit MRI can
    look the same. Values below any air, which scanners store outside their circular field of
    view (GE: -2000 as stored; -3024 HU), are left out: they are no air, and a fifth of a slice.
    """
    sample = np.asarray(volume[:: max(1, volume.shape[0] // 16)], dtype=np.float32)
    sample = sample[sample >= BELOW_ANY_AIR]
    if sample.size == 0:
        return 0.0
    air = float(np.percentile(sample, 1.0))
    tissue = float(((sample >= HU_STORAGE_OFFSET - 200.0) & (sample <= HU_STORAGE_OFFSET + 200.0)).mean())
    between = float(((sample >= 300.0) & (sample < HU_STORAGE_OFFSET - 224.0)).mean())
    shifted = abs(air) <= 200.0 and tissue >= 0.02 and tissue >= 3.0 * between
    return HU_STORAGE_OFFSET if shifted else 0.0


MRI_OR_SHIFTED_CT = "MRI (if it is a CT stored as HU + 1024, choose CT)"


def reading(modality: Modality, hu_offset: float) -> str:
    """How a scan's intensities are read, in words for the user: "CT", "CT stored as HU + 1024",
    "MRI", or, for an MRI whose values would also fit a CT stored as HU + 1024 (``hu_offset``
    of :func:`stored_hu_offset` non-zero: auto-detection cannot tell them apart), "MRI" with a
    hint to choose CT if it is one."""
    if modality == "mri":
        return MRI_OR_SHIFTED_CT if hu_offset else "MRI"
    return "CT stored as HU + 1024" if hu_offset else "CT"


def window_intensities(volume: np.ndarray, modality: Modality, profile: PreprocessingProfile,
                       hu_offset: float | None = None) -> np.ndarray:
    """CT: HU window (on HU + 1024 where the scan is stored so; ``hu_offset`` None: detected);
    MRI: clip above the profile's percentile. Returns float32 in [0, 1]."""
    source = np.asarray(volume)
    if modality == "ct":
        offset = stored_hu_offset(source) if hu_offset is None else hu_offset
        low, high = (bound + offset for bound in profile.ct_window)
    else:
        sample = source[:: max(1, source.shape[0] // 64)]  # percentiles of a large volume, cheaply
        low = float(source.min())
        high = float(np.percentile(sample, profile.mri_upper_percentile))
    scaled = np.array(source, dtype=np.float32)  # one float32 copy, then in place
    np.clip(scaled, low, high, out=scaled)
    scaled -= low
    scaled /= max(high - low, 1e-6)
    return scaled


def _mean_std(volume: np.ndarray, chunk: int = 1 << 20) -> tuple[float, float]:
    """Mean and standard deviation in float64, a million voxels at a time in memory order: no
    float64 copy of a whole scan (630 MB for 512 x 512 x 300), numpy's two-pass figures."""
    flat = np.ravel(volume, order="K")  # a view, whatever the axis order
    n = flat.size
    mean = sum(float(flat[i:i + chunk].sum(dtype=np.float64)) for i in range(0, n, chunk)) / n
    squares = 0.0
    for i in range(0, n, chunk):
        deviation = flat[i:i + chunk].astype(np.float64)
        deviation -= mean
        squares += float(np.dot(deviation, deviation))
    return mean, (squares / n) ** 0.5


def zscore(volume: np.ndarray) -> np.ndarray:
    """Per-volume z-score, in place: robust to scanners' arbitrary MRI units and to CT windows."""
    mean, std = _mean_std(volume)
    volume -= mean
    volume /= max(std, 1e-6)
    return volume


def model_grid_size(shape_hw: tuple[int, int], spacing_hw: tuple[float, float],
                    profile: PreprocessingProfile) -> tuple[int, int]:
    """In-plane size on the model's grid: the training spacing, within the size bounds."""
    size = [max(1, round(n * s / profile.in_plane_spacing_mm)) for n, s in zip(shape_hw, spacing_hw)]
    longest = max(size)
    if longest > profile.max_in_plane_size:
        size = [max(1, round(n * profile.max_in_plane_size / longest)) for n in size]
    shortest = min(size)
    if shortest < profile.min_in_plane_size:
        size = [round(n * profile.min_in_plane_size / shortest) for n in size]
    return int(size[0]), int(size[1])


def resize_slices(slices: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (S, H, W) or (S, C, H, W) slices in-plane; antialiased when shrinking."""
    squeeze = slices.ndim == 3
    x = slices[:, None] if squeeze else slices
    if tuple(x.shape[-2:]) != tuple(size):
        if mode == "nearest":
            x = F.interpolate(x, size=size, mode="nearest-exact")
        else:
            shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x[:, 0] if squeeze else x


def prepare_volume(volume: np.ndarray, spacing_hw: tuple[float, float], profile: PreprocessingProfile,
                   modality: Modality | Literal["auto"] = "auto",
                   hu_offset: float | None = None) -> tuple[torch.Tensor, Modality]:
    """Slices (S, H, W) of a scan -> z-scored float32 slices on the model's in-plane grid.

    Axis 0 is the slicing axis; ``spacing_hw`` the in-plane voxel size in mm; ``hu_offset``
    as :func:`window_intensities` (a caller that already knows it saves a pass over the scan).
    """
    volume = check_volume(volume)
    if modality == "auto":
        modality = detect_modality(volume)
    normalized = zscore(window_intensities(volume, modality, profile, hu_offset))
    size = model_grid_size(volume.shape[1:], spacing_hw, profile)
    return resize_slices(torch.from_numpy(normalized), size), modality
