"""In-volume one-slice propagation accuracy: paint the slice of largest organ area, propagate,
3D Dice against the full label (whole volume scored: no oracle), per organ and mean, beside
two baselines: the painted mask copied to every slice, and copied onto the true z-range only.

    python benchmarks/accuracy.py --phantoms 6
    python benchmarks/accuracy.py --data ../shared/data/chaos_t2 --organs 1 2 3 4 --split held-out
    python benchmarks/accuracy.py --data ../shared/data/openkbp_hn_ct --organs 1 3 4 7 --split held-out
    python benchmarks/accuracy.py --mni152
    python benchmarks/accuracy.py --data ../shared/data/chaos_t2 --split held-out --view transpose
    python benchmarks/accuracy.py --data ../shared/data/openkbp_hn_ct --split held-out --plane coronal
    python benchmarks/accuracy.py --data ../shared/data/openkbp_hn_ct --split held-out --slice-mm 1.25
    python benchmarks/accuracy.py --data ../shared/data/openkbp_hn_ct --split held-out --as-stored --modality ct
    python benchmarks/accuracy.py --data ../shared/data/chaos_t2 --split held-out --paint-at 0.25
    python benchmarks/accuracy.py --data ../shared/data/chaos_t2 --split held-out --bias-field 0.3
    python benchmarks/accuracy.py --data ../shared/data/chaos_t2 --split seen --stray-click 1
    python benchmarks/accuracy.py --data ../shared/data/openkbp_hn_ct --split seen --header no-orientation
    python benchmarks/accuracy.py --data ../shared/data/openkbp_hn_ct --split seen --as-stored --fov-padding -2000
    python benchmarks/accuracy.py --data ../shared/data/openkbp_hn_ct --split seen --pixel-mm 1.3 --paint-margin 2

``--plane coronal`` (or sagittal) paints and walks that plane's slices instead of the axial ones,
as a user painting on a coronal view does; ``--plane axial+coronal`` paints the largest slice of
each (the engine walks each plane and combines them). ``--mni152`` scores brain structures on the MNI152 T1
template that nilearn ships: real MRI of an anatomy and a contrast no model here trained on (an
average of 152 brains, so smoother than one scan), against its own tissue maps.

``--slice-mm`` re-slices every scan along its axial axis, as another scanner's reconstruction
would (thinner: linear interpolation; thicker: each slice the mean of the slab it covers), so
the rules can be checked on slice thicknesses the data lacks.

``--bias-field S`` multiplies every MRI by a smooth random field exp(S * p(x, y, z)), p a cubic
polynomial scaled to span [-1, 1] over the volume, as a receive coil's uneven sensitivity does
on a scanner without (or with a weak) intensity correction: S = 0.3 leaves a voxel anywhere
between 0.74x and 1.35x its value. The field is drawn per scan from its name, so runs repeat. CTs
are left as they are.

``--stray-click R`` adds to each painting a disc of radius R pixels (R = 1: 5 pixels) at a random
pixel of the body outside the organ, on a random slice of the organ 3 to 6 slices from the
painted one: a click left behind on another slice. Drawn per scan and organ from their names.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from napari_densemp.engine import FeatureCache, PropagationOptions, load_model, parse_rules, plane_axis, propagate
from napari_densemp.preprocessing import detect_modality
from src_data.datasets import ScanRecord, find_scans, load_scan
from src_data.phantoms import ORGAN_NAMES, write_cohort
from src_data.splits import split_scans
from src_data.superpixels import body_mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def paint_largest_slice(truth: np.ndarray, axis: int = 2, at: float | None = None) -> tuple[np.ndarray, int]:
    """The organ on its slice of largest area across ``axis``, or, with ``at``, on the slice that
    lies that far through its extent (0: its first slice, 1: its last), as a user who paints
    near an end would."""
    areas = truth.sum(axis=tuple(i for i in range(3) if i != axis))
    if at is None:
        z = int(areas.argmax())
    else:
        holding = np.flatnonzero(areas)
        z = int(holding[round(at * (len(holding) - 1))])
    painted = np.zeros_like(truth)
    index = [slice(None)] * 3
    index[axis] = z
    painted[tuple(index)] = truth[tuple(index)]
    return painted, z


def select_scans(data: Path | None, phantoms: int, split: str, limit: int | None,
                 first_seed: int = 100, names: list[str] | None = None) -> list[ScanRecord]:
    """The scans a benchmark scores: N CT and N MRI phantoms (seeds from ``first_seed``
    and ``first_seed + 100``), or one split of a data folder (only ``names`` if given)."""
    if phantoms:
        tmp = Path(tempfile.mkdtemp(prefix="densemp-bench-"))
        write_cohort(tmp, phantoms, "ct", first_seed=first_seed)
        write_cohort(tmp, phantoms, "mri", first_seed=first_seed + 100)
        records = find_scans(tmp)
    else:
        seen, held = split_scans(data)
        records = {"held-out": held, "seen": seen, "all": seen + held}[split]
        if names:
            records = [r for r in records if r.name in names]
    return records[:limit] if limit else records


def copy_baselines(truth: np.ndarray, z: int, axis: int = 2) -> tuple[float, float]:
    """Dice of the painted slice (``z`` along ``axis``) copied to every slice, and onto the true
    range of slices only."""
    truth = np.moveaxis(truth, axis, 2)
    layer = truth[..., z]
    everywhere = np.broadcast_to(layer[..., None], truth.shape)
    zs = truth.any(axis=(0, 1))
    return dice(everywhere, truth), dice(everywhere & zs[None, None, :], truth)


def score_structure(volume: np.ndarray, affine: np.ndarray, truth: np.ndarray, model, options: PropagationOptions,
                    cache: FeatureCache, plane: str = "axial", modality: str = "auto",
                    at: float | None = None, stray: tuple[int, int] | None = None, margin_mm: float = 0.0,
                    ) -> tuple[float, float, float, str, str, float]:
    """Paint ``truth``'s ``plane`` slice of largest area, propagate across that plane, and score
    the whole volume: (Dice, copy-all Dice, copy-z Dice, range found, true range, seconds).
    Planes joined by "+" (axial+coronal) paint the largest slice of each, as one painting;
    ``stray`` (radius, seed) adds a click left on another slice (see ``stray_click``);
    ``margin_mm`` paints past (> 0) or short of (< 0) the edge (see ``rough_painting``)."""
    first, *more = plane.split("+")
    axis = plane_axis(affine, first)
    painted, z = paint_largest_slice(truth, axis, at)
    for other in more:
        painted |= paint_largest_slice(truth, plane_axis(affine, other), at)[0]
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    if margin_mm:
        painted = rough_painting(painted, axis, spacing, margin_mm)
    if stray is not None:
        painted |= stray_click(volume, truth, axis, z, *stray)
    start = time.perf_counter()
    result = propagate(volume, painted.astype(np.uint8), model, spacing=spacing, axis=axis, options=options,
                       cache=cache, affine=affine, modality=modality)
    seconds = time.perf_counter() - start
    zs = np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != axis)))
    all_copy, z_copy = copy_baselines(truth, z, axis)
    found = f"{result.slice_range[0]}-{result.slice_range[1]}" if result.slice_range else "-"
    return dice(result.mask, truth), all_copy, z_copy, found, f"{zs[0]}-{zs[-1]}", seconds


def rough_painting(painted: np.ndarray, axis: int, spacing: tuple[float, float, float],
                   margin_mm: float) -> np.ndarray:
    """Each painted slice grown (``margin_mm`` > 0) or shrunk (< 0) by that distance in its plane,
    as a quick brush paints past or short of the edge. Shrinking keeps at least the slice's
    innermost pixels, so a small structure stays painted."""
    out = np.zeros_like(painted)
    pixel_mm = [s for a, s in enumerate(spacing) if a != axis]
    for k in np.flatnonzero(painted.any(axis=tuple(a for a in range(3) if a != axis))):
        layer = np.take(painted, k, axis=axis).astype(bool)
        if margin_mm > 0:
            grown = ndimage.distance_transform_edt(~layer, sampling=pixel_mm) <= margin_mm
        else:
            depth = ndimage.distance_transform_edt(layer, sampling=pixel_mm)
            grown = depth > min(-margin_mm, depth.max() - 1e-6)
        index = [slice(None)] * 3
        index[axis] = k
        out[tuple(index)] = grown
    return out


def stray_click(volume: np.ndarray, truth: np.ndarray, axis: int, z: int, radius: int, seed: int) -> np.ndarray:
    """A disc of ``radius`` pixels at a random body pixel outside the organ, on a random slice of
    the organ 3 to 6 slices from ``z`` across ``axis`` (none where the organ has no such slice)."""
    rng = np.random.default_rng(seed)
    click = np.zeros(truth.shape, bool)
    organ = np.moveaxis(truth, axis, 0)
    choices = [k for k in np.flatnonzero(organ.any(axis=(1, 2))) if 3 <= abs(k - z) <= 6]
    if not choices:
        return click
    k = int(rng.choice(choices))
    slices = np.moveaxis(volume, axis, 0)
    body = body_mask(slices[k:k + 1], detect_modality(slices))[0] & ~organ[k]
    pixels = np.argwhere(body)
    if not len(pixels):
        return click
    y, x = pixels[rng.integers(len(pixels))]
    rows, cols = np.ogrid[:body.shape[0], :body.shape[1]]
    np.moveaxis(click, axis, 0)[k] = (rows - y) ** 2 + (cols - x) ** 2 <= radius ** 2
    return click


# Another hospital may store the same anatomy flipped or with the in-plane axes swapped: each
# view reorders scan and label alike and moves the affine with them (nibabel orientation
# transforms: per stored axis, its new axis and direction). flip-xy turns OpenKBP's RAS into the
# LPS order of a DICOM series as napari_densemp.dicom reads it (CHAOS' LAS needs flip-y for that).
VIEWS = {"stored": [[0, 1], [1, 1], [2, 1]], "flip-x": [[0, -1], [1, 1], [2, 1]], "flip-y": [[0, 1], [1, -1], [2, 1]],
         "flip-xy": [[0, -1], [1, -1], [2, 1]], "transpose": [[1, 1], [0, 1], [2, 1]],
         "rot90": [[1, 1], [0, -1], [2, 1]]}  # rot90 = np.rot90(a, 1, (0, 1))


def stored_as(view: str, volume: np.ndarray, label: np.ndarray, affine: np.ndarray):
    """Scan, label and affine as another storage would hold them (see VIEWS)."""
    ornt = np.array(VIEWS[view], dtype=float)
    moved = [np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt)) for a in (volume, label)]
    return *moved, affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)


# A header that lost part of the geometry: "identity" is what numpy-made NIfTI files carry (1 mm
# cubes in the stored order); "no-orientation" is a header with qform and sform codes 0, as
# ANALYZE-era and some MATLAB tools write it: nibabel keeps the voxel sizes and assumes the first
# axis runs from the patient's right to left (LAS order), whatever the scan's true orientation.
HEADERS = ("kept", "identity", "no-orientation")


def header_as(header: str, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine a reader finds when the scan's header is ``header`` (see HEADERS)."""
    if header == "identity":
        return np.eye(4)
    if header == "no-orientation":
        analyze = nib.Nifti1Header()
        analyze.set_data_shape(shape)
        analyze.set_zooms(tuple(float(z) for z in nib.affines.voxel_sizes(affine)))
        return analyze.get_base_affine()
    return affine


def outside_field_of_view(shape: tuple[int, int, int], axial: int) -> np.ndarray:
    """Voxels outside the circle inscribed in each axial slice: what a CT scanner did not
    reconstruct, and stores as a padding value (GE: -2000 as stored; Siemens: -3024 HU)."""
    rows, cols = (n for a, n in enumerate(shape) if a != axial)
    r, c = np.ogrid[:rows, :cols]
    outside = (r - (rows - 1) / 2) ** 2 / (rows / 2) ** 2 + (c - (cols - 1) / 2) ** 2 / (cols / 2) ** 2 > 1
    return np.expand_dims(outside, axial)


def resliced(volume: np.ndarray, label: np.ndarray, affine: np.ndarray, slice_mm: float):
    """Scan, label and affine re-sliced along the axial axis to ``slice_mm`` thick slices.

    New slice k lies at old index k * f (f = new / old thickness; the first slice stays where
    it was). Thinner: the scan interpolated linearly, the label taken from the nearest old slice.
    Thicker: the scan averaged over the slab each new slice covers (a thick reconstruction is
    a mean, not a sample), the label from the nearest old slice.
    """
    axis = plane_axis(affine, "axial")
    old = float(np.linalg.norm(affine[:3, axis]))
    f = slice_mm / old
    n = int(np.floor((volume.shape[axis] - 1) / f)) + 1
    centres = np.arange(n) * f
    scan = np.moveaxis(volume.astype(np.float32), axis, 0)
    if f > 1:
        half = f / 2
        new = [scan[max(int(np.ceil(c - half)), 0):int(np.floor(c + half)) + 1].mean(axis=0) for c in centres]
    else:
        below = np.floor(centres).astype(int)
        above = np.minimum(below + 1, scan.shape[0] - 1)
        w = (centres - below)[:, None, None]
        new = (1 - w) * scan[below] + w * scan[above]
    nearest = np.minimum(np.floor(centres + 0.5).astype(int), label.shape[axis] - 1)  # halfway: the next
    moved = np.moveaxis(np.stack(new), 0, axis), np.take(label, nearest, axis=axis)
    scale = np.eye(4)
    scale[axis, axis] = f
    return *(np.ascontiguousarray(a) for a in moved), affine @ scale


def resampled_in_plane(volume: np.ndarray, label: np.ndarray, affine: np.ndarray, pixel_mm: float):
    """Scan, label and affine re-sampled in the axial plane to ``pixel_mm`` pixels (the scan
    linearly, the label from the nearest pixel), as a scanner reconstructing on a finer or coarser
    matrix would; the first and last pixels keep their world positions."""
    axial = plane_axis(affine, "axial")
    factors = [1.0 if a == axial else float(np.linalg.norm(affine[:3, a])) / pixel_mm for a in range(3)]
    scan = ndimage.zoom(volume.astype(np.float32), factors, order=1)
    labels = ndimage.zoom(label, factors, order=0)
    scale = np.eye(4)
    for a in range(3):
        if a != axial:
            scale[a, a] = (volume.shape[a] - 1) / (scan.shape[a] - 1)
    return scan, labels, affine @ scale


def bias_field(shape: tuple[int, int, int], strength: float, seed: int) -> np.ndarray:
    """A smooth multiplicative field exp(strength * p), p a random cubic polynomial in the voxel
    coordinates (each scaled to [-1, 1]) normalised to span [-1, 1] over the volume."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    log_field = np.zeros(shape, np.float32)
    for i, j, k in itertools.product(range(4), repeat=3):
        if 0 < i + j + k <= 3:
            log_field += np.float32(rng.uniform(-1, 1)) * x**i * y**j * z**k
    log_field -= (log_field.max() + log_field.min()) / 2
    return np.exp(strength * log_field / np.abs(log_field).max())


def in_volume_scores(records: list[ScanRecord], model, options: PropagationOptions,
                     organs: list[int] | None = None, view: str = "stored", plane: str = "axial",
                     slice_mm: float | None = None, as_stored: bool = False, modality: str = "auto",
                     at: float | None = None, bias: float = 0.0, stray_radius: int | None = None,
                     header: str = "kept", fov_padding: float | None = None, margin_mm: float = 0.0,
                     pixel_mm: float | None = None):
    """Per scan and organ: (scan, organ, Dice, copy-all Dice, copy-z Dice, range found, true
    range, seconds), painting the organ's ``plane`` slice of largest area and scoring the whole
    volume, with the scans stored as ``view`` says (see VIEWS). ``as_stored`` gives the engine
    the intensities as the files hold them (OpenKBP: HU + 1024), as ``densemp-segment`` reads them;
    ``bias`` multiplies MRIs by a smooth field of that strength (see ``bias_field``);
    ``stray_radius`` leaves a click of that radius on another slice (see ``stray_click``);
    ``header`` gives the engine the affine of a header that lost part of the geometry (see
    ``header_as``); ``fov_padding`` fills a CT's voxels outside the scanner's field of view with
    that value (see ``outside_field_of_view``), in the intensities the engine is given;
    ``margin_mm`` paints past or short of the organ's edge (see ``rough_painting``); ``pixel_mm``
    re-samples each scan in its axial plane first (see ``resampled_in_plane``)."""
    for record in records:
        scan = load_scan(record)
        if scan.label is None:
            print(f"{record.name}: no label file, skipped", file=sys.stderr)
            continue
        volume = scan.volume + np.float32(record.hu_offset) if as_stored else scan.volume
        if fov_padding is not None and detect_modality(scan.volume) == "ct":
            outside = outside_field_of_view(volume.shape, plane_axis(scan.affine, "axial"))
            volume = np.where(outside, np.float32(fov_padding), volume)
        if bias and detect_modality(scan.volume) == "mri":  # in HU: a CT stays a CT with --as-stored
            volume = volume * bias_field(volume.shape, bias, zlib.crc32(record.name.encode()))
        volume, label, affine = stored_as(view, volume, scan.label, scan.affine)
        if slice_mm:
            volume, label, affine = resliced(volume, label, affine, slice_mm)
        if pixel_mm:
            volume, label, affine = resampled_in_plane(volume, label, affine, pixel_mm)
        affine = header_as(header, affine, volume.shape)
        cache = FeatureCache(max_volumes=2)  # two planes painted: each axis once
        for organ in organs or [int(v) for v in np.unique(label) if v]:
            truth = label == organ
            if truth.any():
                stray = None if stray_radius is None else (stray_radius, zlib.crc32(f"{record.name}-{organ}".encode()))
                yield (record.name, organ, *score_structure(volume, affine, truth, model, options, cache, plane,
                                                            modality, at, stray, margin_mm))


def mni152_scores(model, options: PropagationOptions, plane: str = "axial"):
    """The rows of ``in_volume_scores`` for white matter, grey matter and the whole brain of the
    MNI152 T1 template (tissue probability > 0.5), ``plane`` slices painted and walked."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    volume = np.asarray(template.get_fdata(), dtype=np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata()) > 0.5
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata()) > 0.5
    cache = FeatureCache(max_volumes=2)
    for name, truth in [("white", white), ("grey", grey), ("brain", white | grey)]:
        yield ("mni152", name, *score_structure(volume, template.affine, truth, model, options, cache, plane))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder of scans with labels")
    parser.add_argument("--phantoms", type=int, default=0, help="score N CT and N MRI phantoms instead")
    parser.add_argument("--first-seed", type=int, default=100,
                        help="phantom seeds from this (CT) and this + 100 (MRI); 100: the benchmark's")
    parser.add_argument("--mni152", action="store_true", help="score brain structures of nilearn's MNI152 T1 instead")
    parser.add_argument("--organs", type=int, nargs="*", help="label values (default: all present)")
    parser.add_argument("--split", default="held-out", choices=["held-out", "seen", "all"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "int8", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, help="score only the first N scans")
    parser.add_argument("--scans", nargs="*", help="score only these scans (names as in the split)")
    parser.add_argument("--view", default="stored", choices=list(VIEWS),
                        help="store every scan flipped or with its in-plane axes swapped, as another hospital might")
    parser.add_argument("--plane", default="axial",
                        choices=["axial", "coronal", "sagittal", "axial+coronal", "axial+sagittal"],
                        help="paint and walk this plane's slices (a user painting on a coronal view), or "
                             "the largest slice of each of two planes")
    parser.add_argument("--slice-mm", type=float,
                        help="re-slice every scan along its axial axis to this thickness (mm) first")
    parser.add_argument("--as-stored", action="store_true",
                        help="intensities as the files store them (OpenKBP: HU + 1024), not converted to HU")
    parser.add_argument("--modality", default="auto", choices=["auto", "ct", "mri"],
                        help="as densemp-segment --modality")
    parser.add_argument("--paint-at", type=float, metavar="FRACTION",
                        help="paint the slice this far through the organ's extent (0: first, 1: last) instead "
                             "of its largest")
    parser.add_argument("--bias-field", type=float, default=0.0, metavar="STRENGTH",
                        help="multiply every MRI by a smooth random field exp(STRENGTH * p), p in [-1, 1] "
                             "(0.3: 0.74x to 1.35x), as an uncorrected coil's shading")
    parser.add_argument("--stray-click", type=int, metavar="RADIUS",
                        help="also leave a click of this radius (pixels) in the body 3-6 slices from the painting")
    parser.add_argument("--header", default="kept", choices=HEADERS,
                        help="read every scan as a header that lost its geometry would give it: identity "
                             "(numpy-made: 1 mm cubes), no-orientation (qform and sform codes 0)")
    parser.add_argument("--fov-padding", type=float, metavar="VALUE",
                        help="fill each CT's voxels outside the scanner's circular field of view with VALUE "
                             "(-2000 as GE stores it, -3024 HU as Siemens)")
    parser.add_argument("--pixel-mm", type=float,
                        help="re-sample every scan in its axial plane to this pixel size (mm) first")
    parser.add_argument("--paint-margin", type=float, default=0.0, metavar="MM",
                        help="paint past (MM > 0) or short of (MM < 0) the organ's edge by MM, as a quick brush")
    parser.add_argument("--rule", nargs="*", default=[], metavar="NAME=VALUE",
                        help="override propagation rules (PropagationOptions fields), e.g. min_confidence=0.7")
    args = parser.parse_args(argv)
    model = load_model(args.model, args.device, args.precision)
    options = model.default_options(**parse_rules(args.rule))

    if not (args.data or args.phantoms or args.mni152):
        parser.error("give --data, --phantoms or --mni152")
    if args.mni152:
        scores = mni152_scores(model, options, args.plane)
    else:
        scores = in_volume_scores(select_scans(args.data, args.phantoms, args.split, args.limit, args.first_seed,
                                               args.scans),
                                  model, options, args.organs, args.view, args.plane, args.slice_mm, args.as_stored,
                                  args.modality, args.paint_at, args.bias_field, args.stray_click, args.header,
                                  args.fov_padding, args.paint_margin, args.pixel_mm)
    names = ORGAN_NAMES if args.phantoms else {}
    print(f"model {model.name} ({model.precision}, {model.provenance.get('iterations', '?')} iterations); "
          f"view {args.view}; "
          f"plane {args.plane}; slices {args.slice_mm or 'stored'} mm; "
          f"intensities {'as stored' if args.as_stored else 'in HU'}, modality {args.modality}; "
          f"painted {'largest slice' if args.paint_at is None else f'at {args.paint_at} of the extent'}; "
          f"MRI bias field {args.bias_field or 'none'}; stray click {args.stray_click or 'none'}; "
          f"header {args.header}; field-of-view padding {args.fov_padding or 'none'}; "
          f"painting margin {args.paint_margin:g} mm; pixels {args.pixel_mm or 'stored'} mm; "
          f"options {options}")
    print(f"{'scan':<22}{'organ':>6}{'dice':>8}{'copy-all':>10}{'copy-z':>8}{'range':>12}{'truth':>12}{'s':>7}")
    rows = []
    for row in scores:
        name, organ, d, all_copy, z_copy, found, true_range, seconds = row
        rows.append((organ, d, all_copy, z_copy))
        print(f"{name:<22}{organ:>6}{100 * d:>8.1f}{100 * all_copy:>10.1f}{100 * z_copy:>8.1f}"
              f"{found:>12}{true_range:>12}{seconds:>7.2f}", flush=True)
    if not rows:
        print("no labelled organ scored")
        return 1
    table = np.array([r[1:] for r in rows])
    organs = sorted({r[0] for r in rows})
    print("\norgan            propagated  copy-all  copy-z   (mean 3D Dice over scans)")
    for organ in organs:
        sel = table[[r[0] == organ for r in rows]]
        name = names.get(organ, str(organ))
        print(f"{name:<16}{100 * sel[:, 0].mean():>11.1f}{100 * sel[:, 1].mean():>10.1f}{100 * sel[:, 2].mean():>8.1f}")
    per_organ = np.array([table[[r[0] == o for r in rows]].mean(axis=0) for o in organs])
    mean = per_organ.mean(axis=0)
    print(f"{'mean':<16}{100 * mean[0]:>11.1f}{100 * mean[1]:>10.1f}{100 * mean[2]:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
