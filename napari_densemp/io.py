"""NIfTI in and out, keeping geometry exact and never leaving half-written files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import write_atomically
from .errors import DenseMPError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Scan:
    data: np.ndarray  # as stored, (x, y, z) for 3D
    affine: np.ndarray  # 4x4 voxel -> world (mm)
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the stored array axes, read from the affine's columns."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike) -> Scan:
    """Read a NIfTI file with scaling applied; a clear DenseMPError when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DenseMPError(f"File not found: {path}")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise DenseMPError(f"Cannot read {path} as NIfTI: {exc}") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DenseMPError(f"{path} is not a NIfTI image ({type(image).__name__}).")
    return Scan(data=np.asarray(data), affine=image.affine.copy(), header=image.header.copy(), path=path)


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
                reference: nib.Nifti1Header | None = None, overwrite: bool = False) -> Path:
    """Write ``data`` with exactly ``affine`` (and the reference header's codes) atomically.

    Refuses to replace an existing file unless ``overwrite``: nothing a user saved is lost.
    """
    path = Path(path)
    if not is_nifti(path):
        raise DenseMPError(f"Output must end in .nii or .nii.gz: {path}")
    if path.exists() and not overwrite:
        raise DenseMPError(f"{path} exists; choose another output or pass --overwrite.")
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    header = reference.copy() if reference is not None else None
    image = nib.Nifti1Image(data, affine, header=header)
    image.set_data_dtype(data.dtype)
    if reference is not None:
        image.set_qform(affine, code=int(reference["qform_code"]) or 1)
        image.set_sform(affine, code=int(reference["sform_code"]) or 1)
    image.header.set_slope_inter(1.0, 0.0)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    return write_atomically(path, lambda tmp: nib.save(image, tmp), suffix=suffix)
