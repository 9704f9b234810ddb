"""NRRD and MetaImage scans and masks (SimpleITK, an optional extra).

3D Slicer saves scans and segmentations as NRRD (``.nrrd``, ``.seg.nrrd``, or a ``.nhdr``
header beside its data); ITK-based tools and many public challenge datasets use MetaImage
(``.mha``, or a ``.mhd`` header beside its data). SimpleITK is both formats' reference reader
and writer, so their geometry fields are read as those tools wrote them.

ITK holds geometry in LPS (x towards the patient's left, y towards the back); this package and
NIfTI in RAS, so x and y change sign between the two. Arrays are indexed (x, y, z) as stored,
as NIfTI arrays are, so both kinds of file flow through the same code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import write_atomically
from .errors import DenseMPError

if TYPE_CHECKING:
    from .io import Scan

SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
# Written as one file only, so a write is one atomic rename (.nhdr and .mhd keep the voxels in a
# second file beside the header).
WRITABLE_SUFFIXES = (".nrrd", ".mha")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
FORMAT_NAMES = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}


def is_itk_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def single_file_suffix(path: str | os.PathLike) -> str:
    """The suffix a result for this NRRD or MetaImage file is written with: its own, or for a
    header beside its data (.nhdr, .mhd) the single-file form of its format."""
    return ".nrrd" if _format(path) == "NRRD" else ".mha"


def _format(path: str | os.PathLike) -> str:
    return FORMAT_NAMES[next(s for s in SUFFIXES if str(path).lower().endswith(s))]


def _simpleitk(path: str | os.PathLike, doing: str):
    try:
        import SimpleITK
    except ImportError:
        raise DenseMPError(f"{doing} {_format(path)} files ({Path(path).name}) needs SimpleITK: "
                           f"pip install \"napari-densemp[formats]\" (or save the file as NIfTI).") from None
    return SimpleITK


def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """The RAS voxel-to-world affine of an ITK image's LPS origin, spacing and direction (row-major)."""
    n = len(spacing)
    k = min(n, 3)
    linear = np.eye(3)
    linear[:k, :k] = np.asarray(direction, dtype=float).reshape(n, n)[:k, :k] * np.asarray(spacing[:k], float)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ linear
    affine[:k, 3] = (LPS_TO_RAS @ np.pad(np.asarray(origin[:k], float), (0, 3 - k)))[:k]
    return affine


def read_itk_file(path: str | os.PathLike) -> Scan:
    """A NRRD or MetaImage file as a :class:`~napari_densemp.io.Scan` (array as stored, RAS affine)."""
    from .io import Scan

    path = Path(path)
    if not path.is_file():
        raise DenseMPError(f"File not found: {path}")
    sitk = _simpleitk(path, "Reading")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "rror" in line), str(exc).strip())
        raise DenseMPError(f"Cannot read {path} as {_format(path)}: {detail[:300]}") from None
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        raise DenseMPError(f"{path} holds {components} values per voxel (a colour image, a vector field, or a "
                           f"segmentation with overlapping layers); one value per voxel is needed: export one "
                           f"channel, or the segmentation as a labelmap.")
    data = sitk.GetArrayViewFromImage(image).transpose()  # ITK arrays come (z, y, x)
    affine = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Scan(data=np.array(data), affine=affine, header=None, path=path)


def write_itk_file(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3D array with exactly ``affine`` as NRRD or MetaImage (by suffix), compressed, atomically."""
    path = Path(path)
    suffix = next((s for s in WRITABLE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise DenseMPError(f"{path}: NRRD and MetaImage are written as single .nrrd or .mha files.")
    sitk = _simpleitk(path, "Writing")
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    linear = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose()))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS_TO_RAS @ linear / spacing).ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ np.asarray(affine, dtype=float)[:3, 3]).tolist())
    return write_atomically(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True), suffix=suffix)
