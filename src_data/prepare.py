"""Data preparation from what a registered user downloads (REFERENCE.md), as code.

- Synapse Abd-CT (``img/imgNNNN.nii.gz``, ``label/labelNNNN.nii.gz``): 32 px cropped from
  each in-plane border, resampled in-plane to 256 x 256, z unchanged. Intensities stay in HU:
  the model's preprocessing profile applies the [-125, 275] window and the rescale (the same
  numbers after its z-score), so CT is windowed in one place only.
- CHAOS T2-SPIR (``<id>/T2SPIR/DICOM_anon/*.dcm`` and ``<id>/T2SPIR/Ground/*.png``): DICOM
  series and ground-truth PNGs (63 liver, 126 right kidney, 189 left kidney, 252 spleen ->
  1-4) to NIfTI, clipped above the 99.5th percentile, resampled to 1.25 x 1.25 x 7.7 mm,
  cropped or padded to 256 x 256.
- ROCO: an index (``index.csv``) of the readable images of a folder, for stage 1.

Each case becomes ``image_N.nii.gz`` and ``label_N.nii.gz`` (what :func:`find_scans` reads),
its superpixels are computed beside it (``superpixels/``), and ``classes.json`` lists which
slices hold each class. Re-running skips finished cases; a malformed case is reported by name.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import multiprocessing
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from napari_densemp.atomic import write_atomically
from napari_densemp.errors import DenseMPError
from napari_densemp.io import read_nifti, write_nifti
from napari_densemp.preprocessing import PreprocessingProfile

from .datasets import ScanRecord, prepare_scan

log = logging.getLogger(__name__)
CHAOS_PNG_VALUES = {63: 1, 126: 2, 189: 3, 252: 4}
SUPERPIXEL_DIR = "superpixels"


@dataclass
class Case:
    """One raw case to prepare: its number and input files."""

    number: int
    image: Path
    label: Path | None


# --------------------------------------------------------------------------- geometry
def _resample(volume: np.ndarray, factors: tuple[float, float, float], shape: tuple[int, int, int],
              labels: bool) -> np.ndarray:
    """Resample an (x, y, z) volume to ``shape`` voxels of ``factors`` x the old size each:
    new voxel i's centre sits at old coordinate (i + 0.5) * factor - 0.5 (grids share their
    first corner). Linear for images, nearest for labels."""
    from scipy import ndimage

    axes = [(np.arange(n) + 0.5) * f - 0.5 for n, f in zip(shape, factors)]
    coords = np.meshgrid(*axes, indexing="ij", sparse=False)
    return ndimage.map_coordinates(np.asarray(volume, dtype=np.float32), coords, order=0 if labels else 1,
                                   mode="nearest")


def _resampled_affine(affine: np.ndarray, factors: tuple[float, float, float],
                      offset: tuple[float, float, float] = (0, 0, 0)) -> np.ndarray:
    """The affine of :func:`_resample`'s grid (starting at old voxel ``offset``)."""
    factors = np.asarray(factors, dtype=float)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] @ np.diag(factors)
    out[:3, 3] = affine[:3, :3] @ (np.asarray(offset, dtype=float) + (factors - 1) / 2) + affine[:3, 3]
    return out


def _crop_or_pad(volume: np.ndarray, size: int, fill: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre crop/pad of the in-plane axes to size x size; returns the voxel offset used."""
    out = np.full((size, size, volume.shape[2]), fill, dtype=volume.dtype)
    offsets = []
    src, dst = [], []
    for n in volume.shape[:2]:
        start = (n - size) // 2
        offsets.append(start)
        if start >= 0:
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            src.append(slice(0, n))
            dst.append(slice(-start, -start + n))
    out[dst[0], dst[1]] = volume[src[0], src[1]]
    return out, (offsets[0], offsets[1])


def class_slices(label: np.ndarray) -> dict[str, list[int]]:
    """Which slices (axis 2) hold each class."""
    return {str(int(c)): [int(z) for z in np.flatnonzero((label == c).any(axis=(0, 1)))]
            for c in np.unique(label) if c}


# --------------------------------------------------------------------------- Synapse Abd-CT
def synapse_cases(raw: Path) -> list[Case]:
    images = sorted((raw / "img").glob("img*.nii*"))
    if not images:
        raise DenseMPError(f"No img/imgNNNN.nii.gz under {raw}: is this the Synapse Abd-CT download?")
    cases = []
    for image in images:
        number = int(re.findall(r"\d+", image.name)[0])
        label = next(iter(sorted((raw / "label").glob(f"label{number:04d}.nii*"))), None)
        cases.append(Case(number, image, label))
    return cases


def prepare_synapse_case(case: Case, out_dir: Path, border: int = 32, size: int = 256) -> dict:
    scan = read_nifti(case.image)
    volume = np.asarray(scan.data, dtype=np.float32)
    if volume.ndim != 3 or min(volume.shape[:2]) <= 2 * border:
        raise DenseMPError(f"{case.image.name}: a 3D CT larger than {2 * border} px in-plane is needed; "
                           f"got shape {volume.shape}.")
    label = None
    if case.label is not None:
        label = np.rint(np.asarray(read_nifti(case.label).data)).astype(np.int16)
        if label.shape != volume.shape:
            raise DenseMPError(f"{case.label.name}: shape {label.shape} differs from its image's {volume.shape}.")
    cropped = volume[border:-border, border:-border]
    new = (size, size, volume.shape[2])
    factors = tuple(o / n for o, n in zip(cropped.shape, new))
    affine = _resampled_affine(scan.affine, factors, offset=(border, border, 0))
    out = {"image": _resample(cropped, factors, new, labels=False), "affine": affine}
    if label is not None:
        out["label"] = _resample(label[border:-border, border:-border], factors, new, labels=True).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- CHAOS T2-SPIR
def chaos_cases(raw: Path) -> list[Case]:
    folders = sorted(p for p in raw.rglob("T2SPIR") if p.is_dir())
    if not folders:
        raise DenseMPError(f"No <id>/T2SPIR folders under {raw}: is this the CHAOS MR download?")
    cases = []
    for folder in folders:
        number = int(re.findall(r"\d+", folder.parent.name)[-1])
        ground = folder / "Ground"
        cases.append(Case(number, folder / "DICOM_anon", ground if ground.is_dir() else None))
    return cases


def prepare_chaos_case(case: Case, out_dir: Path, spacing: tuple[float, float, float] = (1.25, 1.25, 7.7),
                       size: int = 256, upper_percentile: float = 99.5) -> dict:
    from napari_densemp.dicom import read_dicom_series, sorted_series_files

    scan = read_dicom_series(case.image)
    volume = scan.data
    label = None
    if case.label is not None:
        from skimage import io

        files = sorted_series_files(case.image)
        masks = {p.stem: p for p in case.label.glob("*.png")}
        missing = [f.name for f in files if f.stem not in masks]
        if missing:
            raise DenseMPError(f"CHAOS case {case.number}: no ground-truth PNG for {missing[:3]} in {case.label}.")
        stack = np.stack([io.imread(masks[f.stem]) for f in files], axis=-1)
        if stack.ndim != 3 or stack.shape[:2] != volume.shape[1::-1]:
            raise DenseMPError(f"CHAOS case {case.number}: ground-truth PNGs of shape {stack.shape[:2]} do not "
                               f"match the DICOM images {volume.shape[1::-1]}.")
        unknown = set(np.unique(stack)) - {0, *CHAOS_PNG_VALUES}
        if unknown:
            raise DenseMPError(f"CHAOS case {case.number}: unexpected mask values {sorted(unknown)}.")
        label = np.zeros(stack.shape, dtype=np.uint8)
        for value, organ in CHAOS_PNG_VALUES.items():
            label[stack == value] = organ
        label = label.transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k), as the image
    high = float(np.percentile(volume, upper_percentile))
    volume = np.minimum(volume, high)
    old_spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
    factors = tuple(t / s for s, t in zip(old_spacing, spacing))  # exactly the target spacing
    new = tuple(max(1, round(n / f)) for n, f in zip(volume.shape, factors))
    affine = _resampled_affine(scan.affine, factors)
    image, offset = _crop_or_pad(_resample(volume, factors, new, labels=False), size, fill=float(volume.min()))
    affine[:3, 3] = affine[:3, :3] @ np.array([offset[0], offset[1], 0.0]) + affine[:3, 3]
    out = {"image": image, "affine": affine}
    if label is not None:
        out["label"] = _crop_or_pad(_resample(label, factors, new, labels=True), size, fill=0)[0].astype(np.uint8)
    return out


# --------------------------------------------------------------------------- driver
PREPARERS = {"synapse": (synapse_cases, prepare_synapse_case), "chaos": (chaos_cases, prepare_chaos_case)}


def _prepare_one(kind: str, case: Case, out_dir: Path, profile: PreprocessingProfile) -> dict:
    """Prepare, write and superpixel one case; returns its class index (or raises)."""
    image_path, label_path = out_dir / f"image_{case.number}.nii.gz", out_dir / f"label_{case.number}.nii.gz"
    if not (image_path.is_file() and (case.label is None or label_path.is_file())):
        prepared = PREPARERS[kind][1](case, out_dir)
        if "label" in prepared:
            write_nifti(label_path, prepared["label"], prepared["affine"], overwrite=True)
        write_nifti(image_path, prepared["image"].astype(np.float32), prepared["affine"], overwrite=True)
    record = ScanRecord(f"image_{case.number}", image_path, label_path if label_path.is_file() else None)
    prepare_scan(record, profile, out_dir / SUPERPIXEL_DIR)
    label = np.asarray(nib.load(str(label_path)).dataobj) if label_path.is_file() else None
    return class_slices(np.rint(label).astype(np.int16)) if label is not None else {}


def prepare_dataset(kind: str, raw: str | Path, out_dir: str | Path, workers: int = 0,
                    profile: PreprocessingProfile | None = None) -> dict[str, dict]:
    """Prepare every case of a raw download; returns {case: classes or {"error": message}}."""
    raw, out_dir = Path(raw), Path(out_dir)
    if kind == "roco":
        return {"index": {"path": str(index_images(raw, out_dir))}}
    if kind not in PREPARERS:
        raise DenseMPError(f"Unknown data set {kind!r}; choose synapse, chaos or roco.")
    cases = PREPARERS[kind][0](raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = profile or PreprocessingProfile()
    results: dict[str, dict] = {}
    # spawned, not forked: a fork of a process whose torch/OpenMP threads are running can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        futures = {case.number: (pool.submit(_prepare_one, kind, case, out_dir, profile) if pool else None)
                   for case in cases}
        for case in tqdm(cases, desc=f"preparing {kind}", unit="case"):
            try:
                future = futures[case.number]
                results[f"image_{case.number}"] = (future.result() if future is not None
                                                   else _prepare_one(kind, case, out_dir, profile))
            except (DenseMPError, ValueError, OSError) as exc:
                results[f"image_{case.number}"] = {"error": str(exc)}
                tqdm.write(f"case {case.number}: {exc}")
    finally:
        if pool is not None:
            pool.shutdown()
    index = {name: classes for name, classes in results.items() if "error" not in classes}
    write_atomically(out_dir / "classes.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)),
                     suffix=".json")
    return results


def index_images(folder: Path, out_dir: Path) -> Path:
    """ROCO (or any image folder): index.csv of readable images with their size; unreadable
    files are listed with their error, not silently dropped."""
    from skimage import io

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"))
    if not files:
        raise DenseMPError(f"No jpg/png images under {folder}: is this the ROCO download?")
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "height", "width", "error"])
    for path in tqdm(files, desc="indexing images", unit="image"):
        try:
            with warnings.catch_warnings():  # imageio's deprecation notices while it probes a bad file
                warnings.simplefilter("ignore", DeprecationWarning)
                shape = io.imread(path).shape
            writer.writerow([path.relative_to(folder), shape[0], shape[1], ""])
        except Exception as exc:  # an unreadable image is recorded, not fatal
            writer.writerow([path.relative_to(folder), "", "", f"{type(exc).__name__}: {exc}"])
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_atomically(out_dir / "index.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()),
                            suffix=".csv")
