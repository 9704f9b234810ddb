"""Finding scans in a data folder and preparing them for training, cached on disk.

Known layouts: CHAOS (``image_N`` / ``label_N``), OpenKBP (``pt_N_ct`` / ``pt_N_oars``, stored
as HU + 1024), the phantom cohort (``phantom_<modality>_<seed>`` / ``_label``), and any other
NIfTI scan (``*_label`` / ``*_mask`` / ``*_seg`` files beside it are taken as its labels).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from napari_densemp.atomic import write_atomically
from napari_densemp.engine import InPlaneView
from napari_densemp.errors import DenseMPError
from napari_densemp.io import is_nifti, read_nifti
from napari_densemp.preprocessing import (
    Modality,
    PreprocessingProfile,
    check_volume,
    detect_modality,
    prepare_volume,
    resize_slices,
    stored_hu_offset,
    window_intensities,
)

from .superpixels import MIN_SIZE, body_mask, superpixels

log = logging.getLogger(__name__)
LABEL_SUFFIXES = ("_label", "_mask", "_seg", "_oars")
PREPARED_VERSION = 2  # 2: CT superpixels segmented within the body's box (src_data.superpixels)
CT_CROP_MARGIN = 32  # pixels of air kept around the body's box when segmenting a CT slice
# what a scan that cannot be used raises: unreadable, NaN, not 3D, a label of another shape, gone
SCAN_FAULTS = (DenseMPError, OSError, ValueError)


@dataclass(frozen=True)
class ScanRecord:
    name: str
    image: Path
    label: Path | None
    hu_offset: float = 0.0  # subtracted on load: OpenKBP stores HU + 1024

    @property
    def patient_number(self) -> int | None:
        digits = re.findall(r"\d+", self.name)
        return int(digits[-1]) if digits else None


def _stem(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)


def find_scans(data_dir: str | Path) -> list[ScanRecord]:
    """Scans of a folder in natural (numeric) order, with their label files where present."""
    data_dir = Path(data_dir)
    files = sorted(p for p in data_dir.iterdir() if p.is_file() and is_nifti(p))
    stems = {_stem(p): p for p in files}
    records = []
    for stem, path in stems.items():
        if stem.startswith("label_") or stem.endswith(LABEL_SUFFIXES):
            continue
        if match := re.fullmatch(r"image_(\d+)", stem):
            label = stems.get(f"label_{match.group(1)}")
            records.append(ScanRecord(stem, path, label))
        elif match := re.fullmatch(r"(pt_\d+)_ct", stem):
            records.append(ScanRecord(stem, path, stems.get(f"{match.group(1)}_oars"), hu_offset=1024.0))
        else:
            label = next((stems[stem + s] for s in LABEL_SUFFIXES if stem + s in stems), None)
            records.append(ScanRecord(stem, path, label))

    def natural(record: ScanRecord) -> tuple:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", record.name))

    return sorted(records, key=natural)


@dataclass
class LoadedScan:
    volume: np.ndarray  # (x, y, z) float32, HU for CT
    label: np.ndarray | None  # (x, y, z) integers
    affine: np.ndarray
    spacing: tuple[float, float, float]


def load_scan(record: ScanRecord) -> LoadedScan:
    scan = read_nifti(record.image)
    volume = check_volume(scan.data.astype(np.float32) - np.float32(record.hu_offset), record.name)
    label = None
    if record.label is not None:
        label = np.rint(read_nifti(record.label).data).astype(np.int16)
        if label.shape != volume.shape:
            raise ValueError(f"{record.label} has shape {label.shape}, its scan {volume.shape}")
    return LoadedScan(volume, label, scan.affine, scan.spacing)


@dataclass
class PreparedScan:
    """A scan as training sees it: slices first, on the model's in-plane grid."""

    name: str
    image: np.ndarray  # (S, H, W) float16, z-scored
    superpixels: np.ndarray  # (S, H, W) int32, 0 outside the body
    label: np.ndarray | None  # (S, H, W) int16
    modality: Modality


def _file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """Size and the hash of the first and last MiB: a copied or re-mounted scan keeps its cache
    (modification times do not survive copies), an edited one gets a new entry."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            digest.update(f.read(chunk))
    return digest.hexdigest()


def _cache_key(record: ScanRecord, profile: PreprocessingProfile, min_size: int) -> str:
    settings = {k: v for k, v in profile.to_dict().items() if k != "orientations"}  # recorded, not applied
    blob = json.dumps([PREPARED_VERSION, _file_fingerprint(record.image), record.hu_offset, settings,
                       min_size], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def show_in_orientation(records: list[ScanRecord], scans: list[PreparedScan],
                        profile: PreprocessingProfile) -> tuple[list[PreparedScan], PreprocessingProfile]:
    """The prepared scans with their slices turned to one orientation per modality, as the
    engine turns scans at inference: the profile's, or (for a modality it has none for) the one
    most of the scans were stored in, which the returned profile records."""
    affines = [nib.load(str(record.image)).affine for record in records]
    seen: dict[str, Counter] = {}
    for affine, scan in zip(affines, scans):
        seen.setdefault(scan.modality, Counter())["".join(nib.aff2axcodes(affine))] += 1
    orientations = {**{m: counts.most_common(1)[0][0] for m, counts in sorted(seen.items())}, **profile.orientations}
    shown = []
    for affine, scan in zip(affines, scans):
        view = InPlaneView.between(affine, 2, orientations.get(scan.modality))
        if view != InPlaneView():
            image, superpixels, label = (None if a is None else np.ascontiguousarray(view.show(a))
                                         for a in (scan.image, scan.superpixels, scan.label))
            scan = PreparedScan(scan.name, image, superpixels, label, scan.modality)
        shown.append(scan)
    return shown, replace(profile, orientations=orientations)


def prepare_scan(record: ScanRecord, profile: PreprocessingProfile, cache_dir: str | Path | None = None,
                 min_size: int = MIN_SIZE) -> PreparedScan:
    """Preprocess a scan with the model's profile and compute its superpixels (cached).

    Superpixels are computed on the model's in-plane grid, so ``min_size`` pixels cover the
    same area in every scan, as they did on the paper's 256 x 256 slices.
    """
    cache = None
    if cache_dir is not None:
        name = f"{record.name}-{_cache_key(record, profile, min_size)}.npz"
        beside = record.image.parent / "superpixels" / name  # written by densemp-train prepare
        cache = beside if beside.is_file() else Path(cache_dir) / name
        if cache.is_file():
            with np.load(cache) as data:
                return PreparedScan(record.name, data["image"], data["superpixels"],
                                    data.get("label", None), str(data["modality"]))
    loaded = load_scan(record)
    slices = np.moveaxis(loaded.volume, 2, 0)
    modality, offset = detect_modality(slices), stored_hu_offset(slices)
    image = prepare_volume(slices, loaded.spacing[:2], profile, modality, offset)[0].numpy()
    size = image.shape[1:]
    windowed = window_intensities(slices, modality, profile, offset)
    windowed_grid = resize_slices(torch.from_numpy(windowed), size).numpy()
    body = resize_slices(torch.from_numpy(body_mask(slices, modality)).float(), size).numpy() > 0.5
    segments = superpixels(windowed_grid, body, min_size=min_size,
                           crop_margin=CT_CROP_MARGIN if modality == "ct" else None)
    label = None
    if loaded.label is not None:
        label = resize_slices(torch.from_numpy(np.moveaxis(loaded.label, 2, 0).astype(np.float32)), size,
                              mode="nearest").numpy().astype(np.int16)
    prepared = PreparedScan(record.name, image.astype(np.float16), segments, label, modality)
    if cache is not None:
        arrays = {"image": prepared.image, "superpixels": segments, "modality": np.array(modality)}
        if label is not None:
            arrays["label"] = label
        write_atomically(cache, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
    log.info("prepared %s: %s slices of %s, %s", record.name, image.shape[0], image.shape[1:], modality)
    return prepared
