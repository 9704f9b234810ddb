"""A DICOM series folder as one volume with its world geometry (pydicom, an optional extra).

Slices are sorted by their position along the slice normal, not by file name or instance
number (both are unreliable across vendors); the affine is built from the headers in the
NIfTI convention (RAS mm), so DICOM and NIfTI scans flow through the same code. A result goes
back as a DICOM SEG that refers to the series' images (:func:`write_dicom_seg`, highdicom).
"""

from __future__ import annotations

import os
import warnings
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
    """The largest image series in ``folder`` as a (columns, rows, slices) volume with its affine;
    or, where the folder holds no single-frame images, its first multi-frame (enhanced) image.

    Pixel values are rescaled (CT: Hounsfield units).
    """
    folder = Path(folder)
    series, multi_frame = _collect(folder)
    if not series and multi_frame:
        return _read_multi_frame(multi_frame[0], folder)
    files, positions, first, along_row, along_column = _sorted_series(folder, series)
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
    return _scan(slices, first.PixelSpacing, positions, along_row, along_column, folder)


def _scan(slices: list[np.ndarray], pixel_spacing, positions: np.ndarray, along_row: np.ndarray,
          along_column: np.ndarray, path: Path) -> Scan:
    """(rows, columns) slices in spatial order as a (columns, rows, slices) Scan with its RAS affine."""
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)
    row_mm, column_mm = (float(v) for v in pixel_spacing)  # between rows, between columns
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = along_row * column_mm  # column index moves along a row
    affine_lps[:3, 1] = along_column * row_mm
    affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    affine_lps[:3, 3] = positions[0]
    return Scan(data=volume, affine=LPS_TO_RAS @ affine_lps, header=None, path=path)


def _collect(folder: Path) -> tuple[dict[str, list], list[Path]]:
    """Single-frame images with position and orientation by series, and multi-frame image files."""
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
        elif int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds:
            multi_frame.append(path)
    return series, multi_frame


def _sorted_series(folder: Path, series: dict[str, list] | None = None):
    """(files with headers, positions, first header, row and column directions) of the largest
    series, sorted along the slice normal; errors name what is wrong with the series."""
    if series is None:
        series, _ = _collect(folder)
    if not series:
        raise DenseMPError(f"No DICOM images with position and orientation in {folder}.")
    files = _largest_series(folder, series)
    if len(files) < 2:
        raise DenseMPError(f"The DICOM series in {folder} has a single slice; a 3D volume needs several.")
    first = files[0][1]
    along_row, along_column = _directions(first.ImageOrientationPatient)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in files])
    order = _spatial_order(positions, along_row, along_column, f"The DICOM series in {folder}")
    return [files[i] for i in order], positions[order], first, along_row, along_column


def _largest_series(folder: Path, series: dict[str, list]) -> list:
    """The series with most slices: a study folder also holds localizers and other sequences,
    and the one read is named in a warning. Two of the same size (contrast phases, two echoes)
    cannot be told apart, and either might not be the scan that was painted: an error."""
    ranked = sorted(series.values(), key=len, reverse=True)
    if len(ranked) > 1:
        tied = [files for files in ranked if len(files) == len(ranked[0])]
        if len(tied) > 1:
            raise DenseMPError(f"{folder} holds {len(tied)} image series of {len(ranked[0])} slices: "
                               f"{', '.join(_series_name(files) for files in tied)}. Give the folder of the one "
                               f"to read.")
        others = ", ".join(f"{_series_name(files)} ({len(files)})" for files in ranked[1:])
        # a warning, not a log line: napari shows it to whoever opened the folder
        warnings.warn(f"{folder} holds {len(ranked)} image series; read {_series_name(ranked[0])} "
                      f"({len(ranked[0])} slices). The others: {others}. To read another, give its folder.",
                      stacklevel=3)
    return ranked[0]


def _series_name(files: list) -> str:
    ds = files[0][1]
    number, description = getattr(ds, "SeriesNumber", None), str(getattr(ds, "SeriesDescription", "") or "")
    name = f"series {number}" if number not in (None, "") else "a series"
    return f'{name} "{description}"' if description else name


def _directions(orientation) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(orientation, dtype=np.float64)
    return values[:3], values[3:]


def _spatial_order(positions: np.ndarray, along_row: np.ndarray, along_column: np.ndarray, what: str) -> np.ndarray:
    """The slices' order along the slice normal; an error when two share a position (several
    series or echoes mixed) or the gaps are uneven (missing slices)."""
    normal = np.cross(along_row, along_column)
    order = np.argsort(positions @ normal)
    gaps = np.diff(positions[order] @ normal)
    if np.any(gaps <= 1e-4):
        raise DenseMPError(f"{what} has several slices at the same position (several series or echoes mixed?).")
    if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        raise DenseMPError(f"{what} has uneven slice gaps ({gaps.min():.2f}-{gaps.max():.2f} mm): missing slices?")
    return order


def _read_multi_frame(path: Path, folder: Path) -> Scan:
    """A multi-frame (enhanced) image: each frame's position, orientation, spacing and rescaling
    from its own functional groups, else the shared ones; one stack of parallel frames only."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    frames = ds.PerFrameFunctionalGroupsSequence
    what = f"The multi-frame DICOM image {path.name} in {folder}"

    def value(frame, sequence: str, attribute: str, default=None):
        for group in (frame, shared):
            if group is not None and sequence in group and attribute in group[sequence][0]:
                return group[sequence][0][attribute].value
        if default is None:
            raise DenseMPError(f"{what} gives no {attribute}.")
        return default

    if len(frames) < 2:
        raise DenseMPError(f"{what} has a single frame; a 3D volume needs several.")
    orientations = {tuple(float(v) for v in value(f, "PlaneOrientationSequence", "ImageOrientationPatient"))
                    for f in frames}
    if len(orientations) != 1:
        raise DenseMPError(f"{what} holds frames of {len(orientations)} orientations (a localizer?); convert it "
                           f"to NIfTI first (for example with dcm2niix).")
    along_row, along_column = _directions(next(iter(orientations)))
    positions = np.array([[float(v) for v in value(f, "PlanePositionSequence", "ImagePositionPatient")]
                          for f in frames])
    order = _spatial_order(positions, along_row, along_column, what)
    pixels = ds.pixel_array.astype(np.float32).reshape(len(frames), int(ds.Rows), int(ds.Columns))
    slices = []
    for i in order:
        slope = float(value(frames[i], "PixelValueTransformationSequence", "RescaleSlope", 1.0))
        intercept = float(value(frames[i], "PixelValueTransformationSequence", "RescaleIntercept", 0.0))
        slices.append(pixels[i] * slope + intercept)
    spacing = value(frames[0], "PixelMeasuresSequence", "PixelSpacing")
    return _scan(slices, spacing, positions[order], along_row, along_column, folder)


# Type 2 attributes that a DICOM SEG copies from its source images; de-identified series often
# drop them, and they may be written empty.
_COPIED_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
                  "AccessionNumber", "ReferringPhysicianName")


def _series_of_result(path: Path, mask: np.ndarray, source: str | os.PathLike, overwrite: bool, what: str):
    """The sorted series a result for ``source`` refers to (as :func:`_sorted_series`), once the
    output may be written and the mask lies on the series' grid."""
    folder = Path(source)
    if path.exists() and not overwrite:
        raise DenseMPError(f"{path} exists; choose another output or pass --overwrite.")
    series, multi_frame = _collect(folder)
    if not series and multi_frame:
        raise DenseMPError(f"{folder} holds a multi-frame (enhanced) image; {what} is written for series of "
                           f"single-frame images only: write its result as NIfTI (.nii.gz; in a folder run, "
                           f"--as-nifti).")
    found = _sorted_series(folder, series)
    files, first = found[0], found[2]
    expected = (int(first.Columns), int(first.Rows), len(files))
    if mask.shape != expected:
        raise DenseMPError(f"The mask's shape {mask.shape} is not that of the DICOM series in {folder} {expected}.")
    return found


def _structure_name(value: int, names: dict[int, str] | None) -> str:
    """A structure's name in a DICOM result: the user's (a planning system matches ROIs by name,
    e.g. "Parotid_L"), else "label N"."""
    return (names or {}).get(value) or f"label {value}"


def _result_series_number(first) -> int:
    """The source series' number + 1000: listed beside it, and told apart from it, in a viewer."""
    return int(getattr(first, "SeriesNumber", 0) or 0) + 1000


def write_dicom_seg(path: str | os.PathLike, mask: np.ndarray, source: str | os.PathLike,
                    overwrite: bool = False, names: dict[int, str] | None = None) -> Path:
    """``mask`` (on the grid :func:`read_dicom_series` reads ``source`` to) as a DICOM Segmentation
    (highdicom, with the [dicom] extra) that refers to each source image it covers, so that a PACS
    viewer shows it on the series it was made from. Each label value
    becomes a segment, labelled by ``names`` (else "label N"; an empty mask, one empty segment);
    written atomically, never over an existing file unless ``overwrite``.
    """
    from . import __version__
    from .atomic import write_atomically

    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise DenseMPError('Writing a DICOM SEG needs highdicom: pip install "napari-densemp[dicom]".') from None
    path = Path(path)
    files, positions, first, _, _ = _series_of_result(path, mask, source, overwrite, "a DICOM SEG")
    values = [int(v) for v in np.unique(mask) if v] or [1]  # a structure not found: one empty segment
    numbers = np.zeros(max(values) + 1, dtype=np.uint16)
    numbers[values] = np.arange(1, len(values) + 1)  # label values -> segment numbers 1..N
    sources = [ds for _, ds in files]
    for ds in sources:
        for keyword in _COPIED_TYPE_2:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "SliceThickness" not in ds:  # the SEG's frames are as thick as the series' slice gap
            ds.SliceThickness = float(np.linalg.norm(positions[1] - positions[0]))
    algorithm = hd.AlgorithmIdentificationSequence(name="napari-densemp", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(segment_number=i + 1, segment_label=_structure_name(value, names),
                                          segmented_property_category=codes.SCT.AnatomicalStructure,
                                          segmented_property_type=codes.SCT.AnatomicalStructure,
                                          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
                                          algorithm_identification=algorithm)
                for i, value in enumerate(values)]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=numbers[np.asarray(mask, dtype=np.int64)].transpose(2, 1, 0),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=_result_series_number(first),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="napari-densemp",
            manufacturer_model_name="napari-densemp DenseMP", software_versions=algorithm[0].AlgorithmVersion,
            device_serial_number="none", series_description="DenseMP one-shot segmentation")
    except (AttributeError, ValueError, TypeError) as exc:  # a source header lacking what a SEG must refer to
        raise DenseMPError(f"Cannot write a DICOM SEG for the series in {source}: {exc}") from None
    return write_atomically(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True), suffix=".dcm")


def read_dicom_seg(path: str | os.PathLike, source: str | os.PathLike) -> np.ndarray:
    """A DICOM SEG made on the series in folder ``source`` (a painting saved from a PACS viewer or
    from Slicer) on the grid :func:`read_dicom_series` reads it to, each segment as its segment
    number. Its frames are placed by the source images they refer to, so nothing is resampled."""
    try:
        import highdicom as hd
    except ImportError:
        raise DenseMPError('Reading a DICOM SEG needs highdicom: pip install "napari-densemp[dicom]".') from None
    path, folder = Path(path), Path(source)
    if not folder.is_dir():
        raise DenseMPError(f"The DICOM SEG {path.name} can be read only with the DICOM series folder it was made "
                           f"on as the scan.")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # not a file, not DICOM, or not a Segmentation
        raise DenseMPError(f"Cannot read {path} as a DICOM SEG: {exc}") from None
    files, *_ = _sorted_series(folder)
    uids = [str(ds.SOPInstanceUID) for _, ds in files]
    try:
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise DenseMPError(f"The DICOM SEG {path.name} does not lie on the images of the series in {folder}: "
                           f"{exc}") from None
    return np.ascontiguousarray(np.asarray(frames).transpose(2, 1, 0))  # (slices, rows, columns) -> stored grid


def _copied_study(first, into) -> None:
    """The patient and study a result derived from a series belongs to (type 2 fields empty when
    the series lacks them, as de-identified series often do)."""
    for keyword in (*_COPIED_TYPE_2, "StudyInstanceUID"):
        setattr(into, keyword, getattr(first, keyword, ""))


def _planar_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a binary (columns, rows) slice as (N, 2) column and row indices, traced
    half-way between pixel centres, so that the pixels whose centres lie inside an odd number of
    them (the even-odd rule radiotherapy systems read holes by) are exactly the painted ones."""
    from skimage import measure

    outlines = measure.find_contours(np.pad(plane, 1).astype(np.float32), 0.5)
    return [outline[:-1] - 1 for outline in outlines if len(outline) > 3]  # the repeated closing point dropped


def write_rtstruct(path: str | os.PathLike, mask: np.ndarray, source: str | os.PathLike,
                   overwrite: bool = False, names: dict[int, str] | None = None) -> Path:
    """``mask`` (on the grid :func:`read_dicom_series` reads ``source`` to) as a DICOM RT Structure
    Set, the form treatment planning systems import contours in: each label value an ROI of closed
    planar contours in patient coordinates, each contour referring to the image it lies on, named
    by ``names`` (else "label N"). Written atomically, never over an existing file unless ``overwrite``."""
    import datetime

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

    from . import __version__
    from .atomic import write_atomically

    path, folder = Path(path), Path(source)
    files, positions, first, along_row, along_column = _series_of_result(path, mask, folder, overwrite,
                                                                         "an RT Structure Set")
    missing = [k for k in ("FrameOfReferenceUID", "StudyInstanceUID") if not getattr(first, k, "")]
    if missing:
        raise DenseMPError(f"Cannot write an RT Structure Set for the series in {folder}: its images give no "
                           f"{' or '.join(missing)}, which contours must refer to.")
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    now = datetime.datetime.now()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTStructureSetStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID
    _copied_study(first, ds)
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), _result_series_number(first)
    ds.SeriesDescription = "DenseMP one-shot segmentation"
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "napari-densemp", "napari-densemp", __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "DenseMP"
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    def image_reference(image) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
        return item

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = first.SeriesInstanceUID
    referenced_series.ContourImageSequence = [image_reference(image) for _, image in files]
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Study Component Management, by convention
    referenced_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    referenced_study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [referenced_study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    colours = [(255, 80, 80), (80, 200, 80), (80, 120, 255), (240, 200, 40), (200, 80, 220), (60, 200, 220)]
    for number, value in enumerate((int(v) for v in np.unique(mask) if v), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, first.FrameOfReferenceUID
        roi.ROIName, roi.ROIGenerationAlgorithm = _structure_name(value, names), "SEMIAUTOMATIC"
        ds.StructureSetROISequence.append(roi)
        contours = []
        for k in np.flatnonzero((mask == value).any(axis=(0, 1))):
            for outline in _planar_contours(mask[:, :, k] == value):
                points = (positions[k] + np.outer(outline[:, 0] * column_mm, along_row)
                          + np.outer(outline[:, 1] * row_mm, along_column))
                contour = Dataset()
                contour.ContourImageSequence = [image_reference(files[k][1])]
                contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
                contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
                contours.append(contour)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, list(colours[(number - 1) % len(colours)])
        item.ContourSequence = contours
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        ds.RTROIObservationsSequence.append(observation)
    return write_atomically(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True), suffix=".dcm")


def read_rtstruct(path: str | os.PathLike, source: str | os.PathLike) -> np.ndarray:
    """An RT Structure Set's ROIs on the grid :func:`read_dicom_series` reads the series in
    ``source`` to, each ROI as its number: its closed planar contours filled on the slices they lie
    on, holes by the even-odd rule (a pixel is inside when its centre is inside an odd number of
    the slice's contours)."""
    from skimage.draw import polygon

    path, folder = Path(path), Path(source)
    files, positions, first, along_row, along_column = _sorted_series(folder)
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)
    normal = np.cross(along_row, along_column)
    heights = positions @ normal
    try:
        ds = pydicom.dcmread(path)
        rois = [(int(item.ReferencedROINumber), list(getattr(item, "ContourSequence", [])))
                for item in ds.ROIContourSequence]
    except Exception as exc:
        raise DenseMPError(f"Cannot read {path} as an RT Structure Set: {exc}") from None
    mask = np.zeros((int(first.Columns), int(first.Rows), len(files)), dtype=np.int32)
    for number, contours in rois:
        inside = np.zeros(mask.shape, dtype=bool)
        for contour in contours:
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            height = float((points @ normal).mean())
            k = int(np.argmin(np.abs(heights - height)))
            if abs(heights[k] - height) > 0.25 * float(np.diff(heights).min()):
                raise DenseMPError(f"A contour of ROI {number} in {path.name} lies off the slices of the series in "
                                   f"{folder} ({height:.2f} mm along the slice normal): was it drawn on this series?")
            offsets = points - positions[k]
            columns, rows = offsets @ along_row / column_mm, offsets @ along_column / row_mm
            filled = np.zeros(mask.shape[:2], dtype=bool)
            filled[polygon(columns, rows, shape=mask.shape[:2])] = True
            inside[:, :, k] ^= filled
        mask[inside] = number
    return mask


def read_dicom_painting(path: str | os.PathLike, source: str | os.PathLike) -> np.ndarray:
    """A painting saved as a DICOM SEG or an RT Structure Set on the series in ``source``, on its grid."""
    if pydicom is None:
        raise DenseMPError('Reading DICOM needs pydicom: pip install "napari-densemp[dicom]".')
    try:
        modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
    except Exception as exc:
        raise DenseMPError(f"Cannot read {path} as DICOM: {exc}") from None
    if modality == "SEG":
        return read_dicom_seg(path, source)
    if modality == "RTSTRUCT":
        return read_rtstruct(path, source)
    raise DenseMPError(f"{path} is a DICOM {modality or 'file'}, neither a SEG nor an RT Structure Set: "
                       f"not a painting.")


def painting_names(path: str | os.PathLike) -> dict[int, str]:
    """The names a DICOM SEG or RT Structure Set painting gives its structures, by the number each
    is read as (segment or ROI number): a result made from it keeps them."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if ds.get("Modality") == "SEG":
        return {int(item.SegmentNumber): str(item.SegmentLabel) for item in ds.get("SegmentSequence", [])}
    return {int(item.ROINumber): str(item.ROIName) for item in ds.get("StructureSetROISequence", [])}
