"""Paint once, segment many: one support (a scan and its mask) applied to a folder of scans.

Used by ``densemp-segment --scans`` and by the widget. Each scan is handled on its own: a bad
scan is reported in the summary and the batch goes on; each output is written atomically, and
outputs that exist are kept (a re-run resumes) unless ``overwrite``.
"""

from __future__ import annotations

import csv
import io as _io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from .atomic import write_atomically
from .engine import (
    Cancelled,
    FeatureCache,
    Model,
    PropagationOptions,
    PropagationResult,
    painted_labels,
    segment_like,
    segment_like_labels,
    walked_axes,
)
from .errors import DenseMPError
from .io import Scan, as_3d, image_stem, is_image_file, read_painting, read_scan, write_image
from .itk_formats import is_itk_file, single_file_suffix
from .preprocessing import Modality

SUMMARY_FIELDS = ["scan", "structure", "status", "seconds", "first_slice", "last_slice", "slices", "mean_confidence",
                  "volume_ml", "read_as", "output", "message"]


@dataclass
class Support:
    """The painted (or fully segmented) structures of one scan, ready to be reused: ``label``
    picks one; None takes every label value of ``mask``."""

    scan: Scan
    mask: np.ndarray
    label: int | None = None

    def __post_init__(self) -> None:
        values = painted_labels(self.mask)  # names a support mask with nothing painted
        if self.label is not None and self.label not in values:
            raise DenseMPError(f"Label {self.label} is not in the support mask; its values: "
                               f"{', '.join(map(str, values[:8]))}.")

    def outlines(self, axis: int) -> dict[int, list[tuple[int, int]]]:
        """Per structure, the (axis, slice) of its painting that are closed outlines: the engine
        fills them (``fill_outlines``); a folder run says so once, before its first scan."""
        from .painting import filled_outlines, integer_painting, painting_axis

        mask = integer_painting(self.mask)
        found = {}
        for value in [self.label] if self.label is not None else painted_labels(mask):
            structure = mask == value
            found[value] = filled_outlines(structure, painting_axis(structure, default=axis))[1]
        return {value: slices for value, slices in found.items() if slices}

    @classmethod
    def from_files(cls, image: str | Path, mask: str | Path, label: int | None = None) -> Support:
        scan = read_scan(image)
        volume = as_3d(scan.data, image, "support image")
        binary = read_painting(mask, scan, "support mask", "support image")
        return cls(Scan(volume, scan.affine, scan.header, scan.path), binary, label)


@dataclass
class BatchRow:
    """One scan's outcome; with several structures, one row per structure of a scan done."""

    scan: str
    status: str  # "done", "skipped (exists)", "failed"
    structure: int | None = None  # the label value (a done scan's row)
    seconds: float = 0.0
    first_slice: int | None = None
    last_slice: int | None = None
    slices: int = 0
    mean_confidence: float = 0.0
    volume_ml: float = 0.0
    read_as: str = ""  # how the scan's intensities were read: "CT", "CT stored as HU + 1024", "MRI"
    output: str = ""
    message: str = ""


def list_scans(folder: str | Path, pattern: str = "*") -> list[Path]:
    """Scan files (NIfTI, NRRD, MetaImage) and DICOM series folders in ``folder`` matching
    ``pattern``, sorted."""
    from .dicom import looks_like_dicom_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise DenseMPError(f"Not a folder: {folder}")
    return sorted(p for p in folder.glob(pattern)
                  if (p.is_file() and is_image_file(p)) or (p.is_dir() and looks_like_dicom_folder(p)))


def output_path(scan_path: Path, out_dir: Path, as_nifti: bool = False) -> Path:
    """The scan's result in ``out_dir``, named like it and in its format, so it opens beside it in
    the same tool: one file (.nrrd for NRRD, .mha for MetaImage, .nii.gz for NIfTI), a DICOM SEG
    (.dcm) for a DICOM series; .nii.gz for all when ``as_nifti``."""
    if as_nifti:
        suffix = ".nii.gz"
    elif scan_path.is_dir():
        suffix = ".dcm"
    else:
        suffix = single_file_suffix(scan_path) if is_itk_file(scan_path) else ".nii.gz"
    return out_dir / f"{image_stem(scan_path)}{suffix}"


def shard(items: list, spec: str | None) -> list:
    """``K/N``: the items whose index modulo N is K (K from 0), for array jobs and several GPUs."""
    if not spec:
        return items
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise DenseMPError(f"--shard must look like K/N (e.g. 0/4); got {spec!r}.") from None
    if n < 1 or not 0 <= k < n:
        raise DenseMPError(f"--shard K/N needs 0 <= K < N; got {spec!r}.")
    return items[k::n]


def _to_orientation(data: np.ndarray, affine: np.ndarray, target: np.ndarray):
    """``data`` reoriented to the axis directions of ``target`` (an affine), and the way back."""
    start, goal = nib.orientations.io_orientation(affine), nib.orientations.io_orientation(target)
    forward = nib.orientations.ornt_transform(start, goal)
    moved = nib.orientations.apply_orientation(data, forward)
    moved_affine = affine @ nib.orientations.inv_ornt_aff(forward, data.shape)
    back = nib.orientations.ornt_transform(goal, start)
    return moved, moved_affine, lambda mask: nib.orientations.apply_orientation(mask, back)


def segment_scan(support: Support, query: Scan, model: Model, axis: int = 2,
                 options: PropagationOptions | None = None, cache: FeatureCache | None = None,
                 cancel: Callable[[], bool] | None = None,
                 modality: Modality | Literal["auto"] = "auto") -> tuple[np.ndarray, dict[int, PropagationResult]]:
    """The support's structures found and segmented in a query scan, on the query's own grid.

    The query is brought into the support's orientation first (its position priors and the
    support's slices then agree on which way is which); the engine shows both to the model in
    its training orientation. ``modality`` is both scans' ("auto": each detected). Returns the
    mask (0/1 for one structure, the support's label values for several) and each structure's
    result.
    """
    volume, affine, back = _to_orientation(query.data, query.affine, support.scan.affine)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    labels = [support.label] if support.label is not None else painted_labels(support.mask)
    if len(labels) == 1:
        result = segment_like(support.scan.data, support.mask, volume, model, support.scan.spacing, spacing,
                              axis=axis, label=labels[0], options=options, modality=modality, cache=cache,
                              cancel=cancel, support_affine=support.scan.affine, query_affine=affine)
        values, results = result.mask.astype(np.uint8), {labels[0]: result}
    else:
        values, results = segment_like_labels(support.scan.data, support.mask, volume, model, support.scan.spacing,
                                              spacing, axis=axis, options=options, modality=modality, cache=cache,
                                              cancel=cancel, support_affine=support.scan.affine, query_affine=affine)
    for result in results.values():
        result.mask = back(result.mask)
    return back(values), results


def _done_rows(scan: Scan, name: str, seconds: float, values: np.ndarray, results: dict[int, PropagationResult],
               out: Path) -> list[BatchRow]:
    """A segmented scan's rows: one per structure, the voxels it holds in the written mask."""
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    rows = []
    for label, result in results.items():
        kept = result.confidence[result.confidence > 0]
        rng = result.slice_range
        voxels = int((values == (label if len(results) > 1 else 1)).sum())
        rows.append(BatchRow(name, "done", label, seconds, rng[0] if rng else None, rng[1] if rng else None,
                             int(kept.size), float(kept.mean()) if kept.size else 0.0, voxels * voxel_ml,
                             result.read_as, str(out), "" if rng else "structure not found"))
    return rows


def segment_folder(support: Support, scans: list[Path], out_dir: str | Path, model: Model, axis: int = 2,
                   options: PropagationOptions | None = None, overwrite: bool = False,
                   on_scan: Callable[[list[BatchRow]], None] | None = None,
                   cancel: Callable[[], bool] | None = None,
                   modality: Modality | Literal["auto"] = "auto", as_nifti: bool = False,
                   rtstruct: bool = False, names: dict[int, str] | None = None) -> list[BatchRow]:
    """Segment the support's structures in every scan: one row per scan (per structure of a scan
    done), failures included; ``on_scan`` gets each scan's rows as it finishes. Results are in
    each scan's format (:func:`output_path`; a DICOM series' as an RT Structure Set when ``rtstruct``,
    its structures named by ``names``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {Path(p).resolve() for p in (support.scan.path,) if p is not None}
    # The support's features (of each plane it was painted on) stay while queries pass through.
    cache = FeatureCache(max_volumes=2 * len(walked_axes(support.mask, axis)))
    rows = []
    for path in scans:
        if cancel is not None and cancel():
            break
        out = output_path(path, out_dir, as_nifti)
        start = time.perf_counter()
        if out.resolve() in sources or out.resolve() == Path(path).resolve():
            scan_rows = [BatchRow(path.name, "failed", message="the output would replace an input")]
        elif out.exists() and not overwrite:
            scan_rows = [BatchRow(path.name, "skipped (exists)", output=str(out))]
        else:
            try:
                scan = read_scan(path)
                scan = Scan(as_3d(scan.data, path, "scan"), scan.affine, scan.header, scan.path)
                values, results = segment_scan(support, scan, model, axis, options, cache, cancel, modality)
                write_image(out, values, scan.affine, reference=scan.header, overwrite=overwrite, mask=True,
                            dicom_source=path if path.is_dir() else None, rtstruct=rtstruct, names=names)
                scan_rows = _done_rows(scan, path.name, time.perf_counter() - start, values, results, out)
            except Cancelled:
                break
            except DenseMPError as exc:
                scan_rows = [BatchRow(path.name, "failed", seconds=time.perf_counter() - start, message=str(exc))]
            except Exception as exc:  # a scan that breaks anything else is still only that scan
                scan_rows = [BatchRow(path.name, "failed", seconds=time.perf_counter() - start,
                                      message=f"{type(exc).__name__}: {exc}")]
        rows.extend(scan_rows)
        if on_scan is not None:
            on_scan(scan_rows)
    return rows


def scan_counts(rows: list[BatchRow]) -> dict[str, float]:
    """How many scans (not structures) were done, skipped and failed, and their seconds in all."""
    first = {}
    for row in rows:
        first.setdefault(row.scan, row)
    counts = {status: sum(r.status == status for r in first.values()) for status in ("done", "skipped (exists)",
                                                                                     "failed")}
    return {**counts, "seconds": sum(r.seconds for r in first.values())}


def write_summary(rows: list[BatchRow], path: str | Path) -> Path:
    """The batch's table as CSV, written atomically."""
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        values["seconds"] = f"{row.seconds:.2f}"
        values["mean_confidence"] = f"{row.mean_confidence:.3f}"
        values["volume_ml"] = f"{row.volume_ml:.1f}"
        writer.writerow(values)
    return write_atomically(Path(path), lambda tmp: Path(tmp).write_text(buffer.getvalue()), suffix=".csv")
