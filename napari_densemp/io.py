"""Scans and masks in and out (NIfTI; NRRD and MetaImage through :mod:`.itk_formats`; DICOM
series through :mod:`.dicom`), keeping geometry exact and never leaving half-written files."""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import write_atomically
from .errors import DenseMPError
from .itk_formats import SUFFIXES as ITK_SUFFIXES
from .itk_formats import WRITABLE_SUFFIXES as ITK_WRITABLE_SUFFIXES
from .itk_formats import is_itk_file, read_itk_file, write_itk_file

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES  # files read as a scan or a mask
WRITABLE_SUFFIXES = NIFTI_SUFFIXES + ITK_WRITABLE_SUFFIXES


@dataclass
class Scan:
    data: np.ndarray  # as stored, (x, y, z) for 3D
    affine: np.ndarray  # 4x4 voxel -> world (mm)
    header: nib.Nifti1Header | None  # None for scans read from DICOM
    path: Path | None = None

    @property
    def forms(self) -> dict | None:
        """The NIfTI qform and sform with their codes, as plain lists (None for DICOM): masks
        written for the scan keep them, so every viewer places a mask where it places the scan."""
        if self.header is None:
            return None
        return {"qform_code": int(self.header["qform_code"]), "sform_code": int(self.header["sform_code"]),
                "qform": self.header.get_qform().tolist(), "sform": self.header.get_sform().tolist()}

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the stored array axes, read from the affine's columns."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_image_file(path: str | os.PathLike) -> bool:
    """A file this package reads as a scan or a mask: NIfTI, NRRD or MetaImage."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def image_stem(path: str | os.PathLike) -> str:
    """The file's name without its image suffix (``.nii.gz`` and the like): a scan's name."""
    name = Path(path).name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def read_image_file(path: str | os.PathLike) -> Scan:
    """A NIfTI, NRRD or MetaImage file (any other name is tried as NIfTI)."""
    return read_itk_file(path) if is_itk_file(path) else read_nifti(path)


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


def as_3d(data: np.ndarray, path: str | os.PathLike, what: str) -> np.ndarray:
    """A 3D array (trailing singleton axes dropped) or an error naming the file."""
    squeezed = data.reshape(data.shape[:3]) if data.ndim > 3 and all(n == 1 for n in data.shape[3:]) else data
    if squeezed.ndim != 3:
        raise DenseMPError(f"The {what} {path} is {data.ndim}D with shape {data.shape}; a 3D volume is needed.")
    return squeezed


def mask_on_scan_grid(mask: Scan, scan: Scan, mask_name: str = "painted mask",
                      scan_name: str = "image") -> np.ndarray:
    """The mask's 3D array on the scan's voxel grid, or an error naming how they differ.

    A mask saved by a tool that reorders or flips the axes (to RAS, say) covers the same
    voxels in another order: it is turned back, losslessly. A mask saved on a part of the
    scan's grid (a crop of it, as Slicer and ITK-SNAP save a region of interest) or on a larger
    copy of it (a padded one) is placed where its voxels lie. A scan whose sform and qform
    place its voxels differently (a registered scan keeps the scanner's placement in its
    qform) is matched by either, since tools differ in which they read. Any other grid is
    refused, never resampled, so no painted voxel moves."""
    data = as_3d(mask.data, mask.path, mask_name)
    shape = np.shape(scan.data)[:3]
    pairs = [(a, b) for a in _placements(mask) for b in _placements(scan)]
    if data.shape == shape and any(_same_affine(a, b) for a, b in pairs):
        return data
    beyond = None  # a placement leaving painted voxels outside the scan, named if no other fits
    for mask_affine, scan_affine in pairs:
        turn = nib.orientations.ornt_transform(nib.orientations.io_orientation(mask_affine),
                                               nib.orientations.io_orientation(scan_affine))
        turned_affine = mask_affine @ nib.orientations.inv_ornt_aff(turn, data.shape)
        turned = nib.orientations.apply_orientation(data, turn)
        if turned.shape == shape and _same_affine(turned_affine, scan_affine):
            return np.ascontiguousarray(turned)
        try:
            placed = _placed_on_grid(turned, turned_affine, shape, scan_affine, mask_name, scan_name)
        except DenseMPError as error:
            beyond = beyond or error
            continue
        if placed is not None:
            return placed
    if beyond is not None:
        raise beyond
    raise DenseMPError(f"The {mask_name} (shape {data.shape}, voxels {_voxel_mm(mask.affine)} mm) does not lie on "
                       f"the {scan_name}'s voxel grid (shape {shape}, voxels {_voxel_mm(scan.affine)} mm), nor on "
                       f"a part of it: its affine differs. Resample the mask onto the {scan_name} first.")


def read_painting(path: str | os.PathLike, scan: Scan, mask_name: str = "painted mask",
                  scan_name: str = "image") -> np.ndarray:
    """A painting file on the scan's voxel grid: a NIfTI, NRRD or MetaImage mask placed by
    :func:`mask_on_scan_grid`, or a DICOM SEG or RT Structure Set (``.dcm``) on the scan's DICOM
    series (each segment or ROI as its number)."""
    if is_dicom_name(path):
        from .dicom import read_dicom_painting

        return read_dicom_painting(path, scan.path if scan.path is not None else "")
    return mask_on_scan_grid(read_image_file(path), scan, mask_name, scan_name)


def structure_names(painting: str | os.PathLike, given: dict[int, str] | None = None,
                    single: int | None = None) -> dict[int, str]:
    """Names for a result's structures by label value: those a DICOM SEG or RT Structure Set
    painting gives them, overridden by ``given`` (the user's). ``single``: the painted value of the
    one structure a 0/1 result holds as 1."""
    found = {}
    if is_dicom_name(painting):
        from .dicom import painting_names

        found = painting_names(painting)
    names = {**found, **(given or {})}
    if single is not None:
        return {1: names[single]} if single in names else {}
    return names


def _placed_on_grid(data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], scan_affine: np.ndarray,
                    mask_name: str, scan_name: str) -> np.ndarray | None:
    """``data`` put on the scan's grid when its voxels are some of the scan's (same voxel axes,
    an offset of whole voxels); None when they are not. Painted voxels beyond the scan are an
    error, never dropped silently."""
    if not _same_affine(affine[:3, :3], scan_affine[:3, :3]):
        return None
    offset = np.linalg.solve(scan_affine[:3, :3], affine[:3, 3] - scan_affine[:3, 3])
    start = np.rint(offset)
    if np.abs(offset - start).max() > 0.01:
        return None
    start = start.astype(int)
    source = tuple(slice(min(n, max(0, -s)), max(0, min(n, m - s))) for s, n, m in zip(start, data.shape, shape))
    target = tuple(slice(min(m, max(0, s)), max(0, min(m, s + n))) for s, n, m in zip(start, data.shape, shape))
    placed = np.zeros(shape, dtype=data.dtype)
    inside = data[source]
    if inside.size:
        placed[target] = inside
    outside = int(np.count_nonzero(data)) - int(np.count_nonzero(inside))
    if outside:
        raise DenseMPError(f"{outside} painted voxels of the {mask_name} lie outside the {scan_name} (the mask's "
                           f"grid starts at voxel {tuple(int(v) for v in start)} of the {scan_name}'s {shape}): "
                           f"is it the {scan_name}'s painting?")
    return placed


def _voxel_mm(affine: np.ndarray) -> str:
    return " x ".join(f"{v:.3g}" for v in np.linalg.norm(affine[:3, :3], axis=0))


def _placements(scan: Scan) -> list[np.ndarray]:
    """The affines a file records for its voxels: the one read, then its qform and sform when set."""
    found = [scan.affine]
    if scan.header is not None:
        for code, form in (("qform_code", scan.header.get_qform), ("sform_code", scan.header.get_sform)):
            placed = form() if int(scan.header[code]) > 0 else None
            if placed is not None and not any(_same_affine(placed, f) for f in found):
                found.append(placed)
    return found


def _same_affine(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=1e-3, rtol=1e-4))


def read_scan(path: str | os.PathLike) -> Scan:
    """A NIfTI, NRRD or MetaImage file, or a DICOM series folder."""
    path = Path(path)
    if path.is_dir():
        from .dicom import read_dicom_series

        return read_dicom_series(path)
    scan = read_image_file(path)
    volume = scan.data.ndim >= 3 and all(n == 1 for n in scan.data.shape[3:])  # else refused as not 3D
    gap = geometry_gap(scan) if volume else None
    if gap is not None:
        warnings.warn(gap, stacklevel=2)
    return scan


def geometry_gap(scan: Scan) -> str | None:
    """What a NIfTI scan's header leaves out of its geometry, so that its affine is a guess, and
    what that costs; None when the header records it.

    The engine cannot refuse such a scan (a true 1 mm grid at the origin looks the same), but a
    guessed voxel size or orientation costs accuracy, so the user is told which and how to fix it.
    """
    # what numpy-made files carry; ITK's default geometry (1 mm, no direction) reads as LPS
    if np.allclose(scan.affine, np.eye(4)) or (is_itk_file(scan.path or "")
                                               and np.allclose(scan.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))):
        return (f"{scan.path} records no voxel size or orientation (its affine is the identity): its voxels are "
                f"taken as 1 mm cubes in the stored orientation. If they are not, set them in its header (a "
                f"CHAOS MRI of 1.25 x 1.25 x 7.7 mm voxels read so lost 5.6 Dice).")
    header = scan.header
    if header is None or int(header["sform_code"]) > 0:
        return None
    zero = _zero_voxel_axes(scan.path, header)
    size = (f"records a voxel size of 0 along {'axes' if len(zero) > 1 else 'axis'} "
            f"{' and '.join(map(str, zero))}: taken as 1 mm; if it is not, set it in the header (pixdim).")
    if int(header["qform_code"]) > 0:
        return f"{scan.path} {size}" if zero else None
    sizes = " x ".join(f"{v:.3g}" for v in scan.spacing)
    return (f"{scan.path} records no orientation (its qform and sform codes are 0, as ANALYZE-era and some "
            f"MATLAB tools write): it is read with {sizes} mm voxels and its first axis taken to run from the "
            f"patient's right to left. If it is stored another way the model sees it mirrored or turned: set "
            f"the orientation in its header (head-and-neck CTs stored left to right read so lost 3.1 Dice)."
            + (f" It also {size}" if zero else ""))


def _zero_voxel_axes(path: Path | None, header: nib.Nifti1Header) -> list[int]:
    """Axes whose voxel size the file records as 0 (nibabel reads them as 1 and only logs it)."""
    if path is None:
        return []
    with nib.openers.ImageOpener(str(path)) as stored:
        raw = type(header).from_fileobj(stored, check=False)
    return [axis for axis in range(3) if float(raw["pixdim"][axis + 1]) == 0]


def is_dicom_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".dcm")


def check_writable(path: str | os.PathLike, dicom_source: str | os.PathLike | None = None) -> None:
    """An output name of a format this package writes, or an error saying which it writes. A DICOM
    SEG or RT Structure Set (.dcm) refers to the images it segments, so it is written only for a
    DICOM series scan."""
    if is_dicom_name(path):
        if dicom_source is None or not Path(dicom_source).is_dir():
            raise DenseMPError(f"{path}: a DICOM SEG or RT Structure Set (.dcm) is written only for a scan given "
                               f"as a DICOM series folder, whose images it refers to; choose .nii.gz, .nii, .nrrd "
                               f"or .mha.")
        return
    if not str(path).lower().endswith(WRITABLE_SUFFIXES):
        raise DenseMPError(f"Output must end in .nii.gz, .nii, .nrrd or .mha (or .dcm for a DICOM series): {path}")


def write_image(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
                reference: nib.Nifti1Header | None = None, overwrite: bool = False, mask: bool = False,
                dicom_source: str | os.PathLike | None = None, rtstruct: bool = False,
                names: dict[int, str] | None = None) -> Path:
    """:func:`write_nifti`; NRRD / MetaImage for a ``.nrrd`` / ``.mha`` name (``affine`` alone
    places the voxels there; ``reference`` and ``mask`` are NIfTI header fields); for a ``.dcm``
    name a DICOM SEG (an RT Structure Set when ``rtstruct``) referring to the images of
    ``dicom_source``, the DICOM folder ``data`` was read from, its structures named by ``names``
    (label value -> name)."""
    check_writable(path, dicom_source)
    if is_dicom_name(path):
        from .dicom import write_dicom_seg, write_rtstruct

        return (write_rtstruct if rtstruct else write_dicom_seg)(path, data, dicom_source, overwrite, names)
    if not is_itk_file(path):
        return write_nifti(path, data, affine, reference, overwrite, mask)
    if Path(path).exists() and not overwrite:
        raise DenseMPError(f"{path} exists; choose another output or pass --overwrite.")
    return write_itk_file(path, data, affine)


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
                reference: nib.Nifti1Header | None = None, overwrite: bool = False, mask: bool = False) -> Path:
    """Write ``data`` with exactly ``affine`` (and the reference header's qform and sform) atomically.

    Refuses to replace an existing file unless ``overwrite``: nothing a user saved is lost. A
    ``mask`` is marked as label values and drops the scan's display window (``cal_min`` /
    ``cal_max``, e.g. -1000 to 3000 HU), in which viewers that honour it would show it black.
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
        # On the reference's grid, its own qform and sform with their codes: readers differ in
        # which they follow (ITK-based ones may take the qform; on a header without codes nibabel
        # centres the grid and the NIfTI standard does not), and each must place the mask where
        # it places the scan. On another grid, ``affine`` in both.
        qform_code, sform_code = int(reference["qform_code"]), int(reference["sform_code"])
        on_grid = _same_affine(reference.get_best_affine(), affine)
        qform = reference.get_qform() if qform_code and on_grid else affine
        sform = reference.get_sform() if sform_code and on_grid else affine
        if not on_grid and qform_code == sform_code == 0:
            sform_code = 1  # only codes record another grid
        image.set_qform(qform, code=qform_code)
        image.set_sform(sform, code=sform_code)
    image.header.set_slope_inter(1.0, 0.0)
    if mask:
        image.header["cal_min"] = image.header["cal_max"] = 0
        image.header.set_intent("label")
        image.header["descrip"] = b"napari-densemp mask"
    if str(path).lower().endswith(".gz"):
        # gzip without a file name or time stamp: the same volume gives the same bytes
        payload = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
        return write_atomically(path, lambda tmp: Path(tmp).write_bytes(payload), suffix=".nii.gz")
    return write_atomically(path, lambda tmp: nib.save(image, tmp), suffix=".nii")


# --------------------------------------------------------------------------- display geometry
# napari shows the last two array axes and slides along the first. Scans are reoriented for
# display so that the slider walks axial slices from feet to head, anterior is at the top and
# the patient's right on the screen's left (the radiological convention); the exact
# permutation and flips are kept, so a mask drawn on the display array goes back to the
# stored grid bit for bit and is saved with the scan's own affine.
DISPLAY_AXCODES = ("S", "P", "L")


@dataclass(frozen=True)
class Geometry:
    """Where a display array came from: the stored grid's affine and the reorientation."""

    affine: np.ndarray  # stored voxel -> world (RAS mm)
    stored_shape: tuple[int, int, int]
    to_display: np.ndarray  # nibabel orientation transform, stored -> display axes
    forms: dict | None = None  # the NIfTI scan's qform and sform with their codes (Scan.forms)

    @classmethod
    def for_scan(cls, affine: np.ndarray, shape: tuple[int, ...], forms: dict | None = None) -> Geometry:
        start = nib.orientations.io_orientation(affine)
        target = nib.orientations.axcodes2ornt(DISPLAY_AXCODES)
        return cls(np.asarray(affine, dtype=np.float64), tuple(int(n) for n in shape[:3]),
                   nib.orientations.ornt_transform(start, target), forms)

    @property
    def stored_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def display_spacing(self) -> tuple[float, float, float]:
        return self._display_order(self.stored_spacing)

    def _display_order(self, values: tuple) -> tuple:
        """Per-axis values of the stored grid, in display axis order."""
        out = [values[0]] * 3
        for stored_axis, (display_axis, _) in enumerate(self.to_display):
            out[int(display_axis)] = values[stored_axis]
        return tuple(out)

    def display(self, data: np.ndarray) -> np.ndarray:
        """Stored array -> display array (a view: no copy)."""
        self._check(data, self.stored_shape)
        return nib.orientations.apply_orientation(data, self.to_display)

    def display_index(self, voxel: tuple[int, int, int]) -> tuple[int, int, int]:
        """A voxel index of the stored grid as it lies in the display array."""
        shown = [0, 0, 0]
        for stored_axis, (display_axis, flip) in enumerate(self.to_display):
            index = int(voxel[stored_axis])
            shown[int(display_axis)] = index if flip > 0 else self.stored_shape[stored_axis] - 1 - index
        return tuple(shown)

    def stored(self, data: np.ndarray) -> np.ndarray:
        """Display array -> stored array, exactly undoing :meth:`display`."""
        self._check(data, self.display_shape)
        return nib.orientations.apply_orientation(data, self._to_stored())

    @property
    def display_shape(self) -> tuple[int, int, int]:
        return self._display_order(self.stored_shape)

    def _to_stored(self) -> np.ndarray:
        inverse = np.zeros_like(self.to_display)
        for stored_axis, (display_axis, flip) in enumerate(self.to_display):
            inverse[int(display_axis)] = (stored_axis, flip)
        return inverse

    @staticmethod
    def _check(data: np.ndarray, expected: tuple[int, ...]) -> None:
        if tuple(np.shape(data)) != tuple(expected):
            raise DenseMPError(f"Array of shape {tuple(np.shape(data))} does not match the scan's "
                               f"{tuple(expected)}.")

    def to_metadata(self) -> dict:
        """Plain lists, so the layer's metadata survives napari's copying and saving."""
        return {"affine": self.affine.tolist(), "stored_shape": list(self.stored_shape),
                "to_display": self.to_display.tolist(), "forms": self.forms}

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> Geometry | None:
        entry = (metadata or {}).get(METADATA_KEY)
        if not entry:
            return None
        return cls(np.asarray(entry["affine"], dtype=np.float64), tuple(entry["stored_shape"]),
                   np.asarray(entry["to_display"], dtype=np.float64), entry.get("forms"))

    def reference_header(self) -> nib.Nifti1Header | None:
        """A header placing the scan's grid as its file did, for :func:`write_nifti` (None: the
        scan was no NIfTI)."""
        if self.forms is None:
            return None
        header = nib.Nifti1Header()
        header.set_data_shape(self.stored_shape)
        header.set_zooms(self.stored_spacing)  # what places the grid of a header without codes
        for name, setter in (("qform", header.set_qform), ("sform", header.set_sform)):
            if self.forms[f"{name}_code"]:
                setter(np.asarray(self.forms[name]), code=self.forms[f"{name}_code"])
        return header


def painting_on_image(painted: np.ndarray, painted_geometry: Geometry, image_geometry: Geometry,
                      painted_name: str, image_name: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A labels layer read from a file on a part (or a reordering) of the image's grid, put on the
    image's display grid as :func:`mask_on_scan_grid` puts it, and the display index in the image
    of the layer's voxel 0, so the layer can be shown where it lies."""
    mask = Scan(painted_geometry.stored(painted), painted_geometry.affine, painted_geometry.reference_header())
    scan = Scan(np.broadcast_to(np.uint8(0), image_geometry.stored_shape), image_geometry.affine,
                image_geometry.reference_header())
    placed = mask_on_scan_grid(mask, scan, f"layer '{painted_name}'", f"image '{image_name}'")
    corner = [0 if flip > 0 else n - 1 for (_, flip), n in zip(painted_geometry.to_display,
                                                                painted_geometry.stored_shape)]
    world = painted_geometry.affine @ [*corner, 1]
    in_image = np.rint(np.linalg.solve(image_geometry.affine, world)[:3]).astype(int)
    return np.ascontiguousarray(image_geometry.display(placed)), image_geometry.display_index(tuple(in_image))


METADATA_KEY = "densemp_geometry"
