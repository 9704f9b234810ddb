"""A DICOM series folder as one volume with its world geometry (pydicom, an optional extra).

Slices are sorted by their position along the slice normal, not by file name or instance
number (both are unreliable across vendors); the affine is built from the headers in the
NIfTI convention (RAS mm), so DICOM and NIfTI scans flow through the same code.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import DenseMPError
from .io import Scan

try:
    import pydicom
except ImportError:  # optional: pip install "napari-densemp[dicom]"
    pydicom = None

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def looks_like_dicom_folder(path: str | os.PathLike) -> bool:
    """A folder holding at least one file with the DICOM preamble ('DICM' at byte 128)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any(child.is_file() and _has_preamble(child) for child in sorted(path.iterdir())[:64])


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def sorted_series_files(folder: str | os.PathLike) -> list[Path]:
    """The files of the largest series in ``folder``, in spatial order (the volume's slices)."""
    return [path for path, _ in _sorted_series(Path(folder))[0]]


def read_dicom_series(folder: str | os.PathLike) -> Scan:
    """The largest image series in ``folder`` as a (columns, rows, slices) volume with its affine.

    Pixel values are rescaled (CT: Hounsfield units).
    """
    files, positions, first, along_row, along_column = _sorted_series(Path(folder))
    slices = []
    for path, _ in files:
        ds = pydicom.dcmread(path)
        if tuple(ds.ImageOrientationPatient) != tuple(first.ImageOrientationPatient):
            raise DenseMPError(f"{path.name} is oriented differently from the rest of its series.")
        pixels = ds.pixel_array.astype(np.float32)
        if pixels.shape != (int(first.Rows), int(first.Columns)):
            raise DenseMPError(f"{path.name} has a different image size from the rest of its series.")
        slope, intercept = float(getattr(ds, "RescaleSlope", 1.0)), float(getattr(ds, "RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)

    row_mm, column_mm = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    step = (positions[-1] - positions[0]) / (len(files) - 1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = along_row * column_mm  # column index moves along a row
    affine_lps[:3, 1] = along_column * row_mm
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return Scan(data=volume, affine=LPS_TO_RAS @ affine_lps, header=None, path=Path(folder))


def _sorted_series(folder: Path):
    """(files with headers, positions, first header, row and column directions) of the largest
    series, sorted along the slice normal; errors name what is wrong with the series."""
    if pydicom is None:
        raise DenseMPError('Reading DICOM needs pydicom: pip install "napari-densemp[dicom]".')
    if not folder.is_dir():
        raise DenseMPError(f"Not a folder: {folder}")
    series: dict[str, list] = defaultdict(list)
    multi_frame = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM (a DICOMDIR index, a text file): skipped
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            series[str(getattr(ds, "SeriesInstanceUID", ""))].append((path, ds))
        elif int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            multi_frame.append(path)
    if not series and multi_frame:
        raise DenseMPError(f"{multi_frame[0].name} in {folder} is a multi-frame (enhanced) DICOM image, which is "
                           f"not read: convert it to NIfTI first (for example with dcm2niix).")
    if not series:
        raise DenseMPError(f"No DICOM images with position and orientation in {folder}.")
    files = max(series.values(), key=len)
    if len(files) < 2:
        raise DenseMPError(f"The DICOM series in {folder} has a single slice; a 3D volume needs several.")

    first = files[0][1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    along_row, along_column = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_column)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in files])
    order = np.argsort(positions @ normal)
    files = [files[i] for i in order]
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if np.any(gaps <= 1e-4):
        raise DenseMPError(f"The DICOM series in {folder} has several slices at the same position "
                           f"(several series or echoes mixed?).")
    if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        raise DenseMPError(f"The DICOM series in {folder} has uneven slice gaps "
                           f"({gaps.min():.2f}-{gaps.max():.2f} mm): missing slices?")

    return files, positions, first, along_row, along_column
