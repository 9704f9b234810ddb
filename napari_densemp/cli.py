"""``densemp-segment``: propagate a structure painted on one slice through a scan, or find and
segment it in every scan of a folder.

    densemp-segment scan.nii.gz painted.nii.gz -o structure.nii.gz
    densemp-segment --support-image A.nii.gz --support-mask A_painted.nii.gz --scans DIR --out OUTDIR
    densemp-segment --demo            # a phantom CT, its liver painted on one slice

Scans are NIfTI, NRRD or MetaImage files (the last two with the [formats] extra) or DICOM
series folders; paintings and outputs are NIfTI, NRRD or MetaImage files, or for a DICOM series
a DICOM SEG or an RT Structure Set (.dcm).

Outputs have exactly their scan's shape, affine and orientation and are written atomically;
nothing that exists is replaced without --overwrite (a folder run skips finished scans, so a
re-run resumes). Errors are one line on stderr and exit code 2; in a folder run a bad scan is
reported in OUTDIR/summary.csv and the others go on (exit code 3 if any failed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import DenseMPError
from .io import (
    as_3d,
    check_writable,
    is_dicom_name,
    read_nifti,
    read_painting,
    read_scan,
    structure_names,
    write_image,
    write_nifti,
)
from .painting import integer_painting, larger_slice_tip, tiny_painting_tip

log = logging.getLogger("densemp-segment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densemp-segment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", type=Path,
                        help="the scan (NIfTI, NRRD or MetaImage file, or DICOM series folder)")
    parser.add_argument("painted", nargs="?", type=Path,
                        help="mask with the structure painted on 1+ slices (a file; for a DICOM series also a "
                             "DICOM SEG or RT Structure Set)")
    parser.add_argument("-o", "--out", type=Path,
                        help="output mask (.nii.gz, .nii, .nrrd or .mha; for a DICOM series scan also .dcm, a "
                             "DICOM SEG or with --rtstruct an RT Structure Set); with --demo, a folder")
    parser.add_argument("--model", default="default",
                        help="'default' (the bundled v3), 'v0' or 'v2' (bundled) or a checkpoint file")
    parser.add_argument("--label", type=int, help="propagate only this painted value (default: every structure "
                        "painted, or every label of --support-mask; with several, outputs keep their values)")
    parser.add_argument("--axis", default="auto", choices=["auto", "0", "1", "2"],
                        help="slicing axis of the stored array; auto: the axis across which the painting lies "
                             "in one slice or a few, else (a 3D mask) the scan's axial axis")
    parser.add_argument("--modality", default="auto", choices=["auto", "ct", "mri"],
                        help="auto: CT when the scan holds air or fat in Hounsfield units (1%% of voxels below "
                             "-50), else MRI. Say ct for a CT stored as HU + 1024 (unsigned, as OpenKBP): auto "
                             "reads it as MRI, ct reads it right")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "int8", "fp32"],
                        help="auto: bf16 where the CPU or GPU runs it natively, else fp32. int8 (CPU): the "
                             "backbone 1.8x faster than fp32, Dice within 0.7 of it on validation patients")
    parser.add_argument("--between-painted", action="store_true",
                        help="segment only between the first and last painted slice")
    parser.add_argument("--mirror-average", action=argparse.BooleanOptionalAction,
                        help="also segment the scan mirrored left-right and average, so the result does not "
                             "depend on how the scanner stored left and right (twice the backbone time); "
                             "default: the model's own setting (off for the bundled models)")
    parser.add_argument("--intensity-band", action=argparse.BooleanOptionalAction,
                        help="keep to the painted voxels' intensity band (widened by a quarter): on MRI drawn "
                             "voxels outside it are cut back, so a spill into a neighbour of another brightness "
                             "goes; on CT the structure ends at the first slice with under 30%% of its voxels in "
                             "it. --no-intensity-band for an MRI with strong intensity inhomogeneity; "
                             "default: on (the model's own setting)")
    parser.add_argument("--keep-outlines", action="store_true",
                        help="a painted slice that is a closed outline (its unpainted inside at least as large "
                             "as what is painted) is filled, its inside taken as the structure, unless this is "
                             "given: for a ring-shaped structure with a wide hole")
    parser.add_argument("--rtstruct", action="store_true",
                        help="a DICOM series' result (.dcm) as an RT Structure Set, the contours treatment planning "
                             "systems import, instead of a DICOM SEG")
    parser.add_argument("--name", action="append", metavar="VALUE=NAME", default=[], dest="names",
                        help="a structure's name in a DICOM SEG or RT Structure Set result, by label value (e.g. "
                             "1=Parotid_L; repeat for each): planning systems match ROIs by name; default: a SEG or "
                             "RT Structure Set painting's own names, else 'label N'")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--demo", action="store_true", help="run on a bundled phantom CT and report Dice")
    folder = parser.add_argument_group("paint once, segment many (another patient's scans)")
    folder.add_argument("--support-image", type=Path, help="the scan that was painted (a file or DICOM folder)")
    folder.add_argument("--support-mask", type=Path, help="its mask: one painted slice or a whole 3D mask")
    folder.add_argument("--scans", type=Path,
                        help="folder of scans to segment (NIfTI, NRRD, MetaImage files, DICOM folders); each "
                             "result is written in its scan's format (a DICOM SEG for a DICOM series)")
    folder.add_argument("--as-nifti", action="store_true", help="write every result as NIfTI (.nii.gz)")
    folder.add_argument("--pattern", default="*", help="which entries of --scans (glob, e.g. 'image_*.nii.gz')")
    folder.add_argument("--shard", help="K/N: only scans whose index modulo N is K (K from 0), for array jobs")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _progress_bar():
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(done: int, total: int, stage: str) -> None:
        total = total or None  # 0: the walk, whose end is not known beforehand (a count, no bar)
        bar = bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:  # a new stage, or the same stage on another volume
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=" slices", leave=False)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def segment_file(image_path: Path, painted_path: Path, out_path: Path, model_source: str = "default",
                 label: int | None = None, axis: int | None = None, modality: str = "auto", device: str = "auto",
                 between_painted: bool = False, overwrite: bool = False,
                 mirror_average: bool | None = None, intensity_band: bool | None = None,
                 keep_outlines: bool = False, precision: str = "auto", rtstruct: bool = False,
                 names: dict[int, str] | None = None) -> dict:
    """The whole job on files: read, check, propagate, write atomically. Returns a summary.

    ``axis=None`` slices across the plane the mask was painted on (:func:`painting_axis`), each
    structure's own when several are painted. With several label values painted and no
    ``label``, every structure is propagated and the output holds the painted values; with one,
    the output is 0/1. ``mirror_average`` and ``intensity_band`` None keep the model's own settings.
    """
    from .engine import load_model, painted_labels, painting_axis, propagate, propagate_labels

    out_path = Path(out_path)
    for given in (image_path, painted_path):
        if out_path.resolve() == Path(given).resolve():
            raise DenseMPError(f"The output {out_path} is one of the inputs; choose another output path.")
    check_writable(out_path, image_path)
    if rtstruct and not is_dicom_name(out_path):
        raise DenseMPError(f"--rtstruct writes a .dcm output; {out_path} is not one.")
    if out_path.exists() and not overwrite:
        raise DenseMPError(f"{out_path} exists; choose another output or pass --overwrite.")
    scan = read_scan(image_path)  # a file or a DICOM series folder
    volume = as_3d(scan.data, image_path, "image")
    # label values as integers once: a mask saved as floats (0.9999) is compared by value below
    painted = integer_painting(read_painting(painted_path, scan))
    labels = painted_labels(painted)
    several = label is None and len(labels) > 1
    if axis is None and not several:
        axis = painting_axis(painted if label is None else painted == label, affine=scan.affine)
    model = load_model(model_source, device, precision)
    options = model.default_options(between_painted_only=between_painted, **_mirror(mirror_average),
                                    **_intensity_band(intensity_band), **_outlines(keep_outlines))
    update, close = _progress_bar()
    try:
        if several:
            out, results = propagate_labels(volume, painted, model, scan.spacing, "auto" if axis is None else axis,
                                            options, modality, progress=update, affine=scan.affine)
        else:
            result = propagate(volume, painted, model, spacing=scan.spacing, axis=axis, label=label,
                               modality=modality, options=options, progress=update, affine=scan.affine)
            out, results = result.mask.astype(np.uint8), {labels[0] if label is None else label: result}
    finally:
        close()
    write_image(out_path, out, scan.affine, reference=scan.header, overwrite=overwrite, mask=True,
                dicom_source=image_path, rtstruct=rtstruct,
                names=structure_names(painted_path, names, None if several else next(iter(results))))
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    voxels = {value: int((out == (value if several else 1)).sum()) for value in results}
    structures = {value: {"slice_range": r.slice_range, "axis": r.axis, "painted": _painted_report(r),
                          "voxels": voxels[value], "volume_ml": voxels[value] * voxel_ml, "confidence": r.confidence,
                          "read_as": r.read_as, "tip": larger_slice_tip(r.mask, painted == value, r.axis),
                          "outlines": r.filled_outlines, "tiny_paintings": r.tiny_paintings}
                  for value, r in sorted(results.items())}
    return {"out": out_path, "structures": structures,
            "seconds": sum(r.seconds_features + r.seconds_head for r in results.values())}


def _painted_report(result) -> str:
    """The painted slices walked, e.g. "[31]" or, painted on two planes, "[31]; axis 1: [140]"."""
    others = "".join(f"; axis {a}: {zs}" for a, zs in list(result.planes.items())[1:])
    return f"{result.painted_slices}{others}"


def _mirror(choice: bool | None) -> dict:
    """``--mirror-average`` / ``--no-mirror-average`` as an options override; none: the model's."""
    return {} if choice is None else {"mirror_average": choice}


def _intensity_band(choice: bool | None) -> dict:
    """``--no-intensity-band`` turns both intensity-band rules off; none or on: the model's setting."""
    from .engine import INTENSITY_BAND_OFF

    return dict(INTENSITY_BAND_OFF) if choice is False else {}


def _outlines(keep: bool) -> dict:
    """``--keep-outlines`` as an options override; without it, the model's setting (filled)."""
    return {"fill_outlines": False} if keep else {}


def parse_names(items: list[str]) -> dict[int, str]:
    """``--name 1=Parotid_L --name 2=Parotid_R`` as {1: "Parotid_L", 2: "Parotid_R"}."""
    names = {}
    for item in items:
        value, _, name = item.partition("=")
        if not value.strip().isdigit() or not name.strip():
            raise DenseMPError(f"--name {item!r}: expected VALUE=NAME, e.g. 1=Liver.")
        names[int(value)] = name.strip()
    return names


def _axis(choice: str, painted: np.ndarray | None = None, affine: np.ndarray | None = None) -> int | None:
    """``--axis``: a number as given; ``auto`` from the painting (None: segment_file infers it)."""
    if choice != "auto":
        return int(choice)
    if painted is None:
        return None
    from .engine import painting_axis

    return painting_axis(painted, affine=affine)


def run_folder(args: argparse.Namespace) -> int:
    """``--scans``: the support's structure in every scan of a folder, with a summary table."""
    from tqdm import tqdm

    from .batch import Support, list_scans, scan_counts, segment_folder, shard, write_summary
    from .engine import load_model, painted_labels

    if args.out is None:
        raise DenseMPError("give --out OUTDIR for the results of a folder run.")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DenseMPError(f"--out {out_dir} is a file; a folder run writes into a folder.")
    if args.scans.resolve() == out_dir.resolve():
        raise DenseMPError("--out must differ from --scans: results are named like their scans.")
    support = Support.from_files(args.support_image, args.support_mask, args.label)
    scans = shard(list_scans(args.scans, args.pattern), args.shard)
    if not scans:
        raise DenseMPError(f"No scan (NIfTI, NRRD or MetaImage file, DICOM folder) matching {args.pattern!r} in "
                           f"{args.scans}.")
    model = load_model(args.model, args.device, args.precision)
    axis = _axis(args.axis, support.mask, support.scan.affine)
    values = [support.label] if support.label is not None else painted_labels(support.mask)
    single = values[0] if len(values) == 1 else None  # its results hold it as 1
    if not args.keep_outlines:
        for value, outlines in support.outlines(axis).items():
            for across, z in outlines:
                print(f"the support's painting{f' of label {value}' if support.label is None else ''} on slice {z} "
                      f"of axis {across} is a closed outline: its inside is taken as the structure "
                      f"(--keep-outlines keeps it a ring)")
    bar = tqdm(total=len(scans), unit=" scans", desc="segmenting")

    def done(rows) -> None:
        row = rows[0]
        bar.set_postfix_str(f"{row.scan}: {row.status}", refresh=False)
        bar.update()
        if row.status == "failed":
            tqdm.write(f"{row.scan}: failed: {row.message}", file=sys.stderr)

    try:
        rows = segment_folder(support, scans, out_dir, model, axis,
                              model.default_options(**_mirror(args.mirror_average), **_outlines(args.keep_outlines)),
                              overwrite=args.overwrite, on_scan=done, modality=args.modality, as_nifti=args.as_nifti,
                              rtstruct=args.rtstruct, names=structure_names(args.support_mask, args.names, single))
    finally:
        bar.close()
    name = f"summary_{args.shard.replace('/', 'of')}.csv" if args.shard else "summary.csv"
    summary = write_summary(rows, out_dir / name)
    counts = scan_counts(rows)
    structures = sorted({r.structure for r in rows if r.structure is not None})
    which = f" ({len(structures)} structures: {', '.join(map(str, structures))})" if len(structures) > 1 else ""
    print(f"{counts['done']} segmented{which}, {counts['skipped (exists)']} already done, {counts['failed']} failed "
          f"in {counts['seconds']:.1f} s; table: {summary}")
    return 3 if counts["failed"] else 0


def run_demo(out_dir: Path, args: argparse.Namespace) -> int:
    """A phantom CT whose liver is painted on its largest slice: propagate and score it."""
    from src_data.phantoms import LIVER, make_phantom

    phantom = make_phantom(seed=7, modality="ct")
    truth = phantom.label == LIVER
    z = int(truth.sum(axis=(0, 1)).argmax())
    painted = np.zeros(truth.shape, dtype=np.uint8)
    painted[..., z] = truth[..., z]
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path, painted_path = out_dir / "demo_ct.nii.gz", out_dir / "demo_liver_painted.nii.gz"
    write_nifti(image_path, phantom.image, phantom.affine, overwrite=True)
    write_nifti(painted_path, painted, phantom.affine, overwrite=True, mask=True)
    write_nifti(out_dir / "demo_liver_truth.nii.gz", truth.astype(np.uint8), phantom.affine, overwrite=True, mask=True)
    out_path = out_dir / "demo_liver_propagated.nii.gz"
    summary = segment_file(image_path, painted_path, out_path, args.model, axis=2, device=args.device,
                           overwrite=True)
    mask = read_nifti(out_path).data.astype(bool)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    true_z = np.flatnonzero(truth.any(axis=(0, 1)))
    print(f"demo: phantom CT {phantom.image.shape}, liver painted on slice {z}")
    [structure] = summary["structures"].values()
    print(f"  propagated to slices {structure['slice_range']} (truth {true_z[0]}..{true_z[-1]}) "
          f"in {summary['seconds']:.2f} s; 3D Dice {100 * dice:.1f}")
    print(f"  files in {out_dir}/ (open demo_ct.nii.gz with the masks in napari or any viewer)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # restored below: main also runs in-process (tests, notebooks)
    previous, warnings.formatwarning = warnings.formatwarning, _plain_warning
    try:
        args.names = parse_names(args.names)  # checked before any work
        if args.demo:
            return run_demo(args.out or Path("densemp-demo"), args)
        if args.scans or args.support_image or args.support_mask:
            if not (args.scans and args.support_image and args.support_mask):
                parser.error("a folder run needs --support-image, --support-mask and --scans")
            return run_folder(args)
        if args.image is None or args.painted is None or args.out is None:
            parser.error("give IMAGE PAINTED -o OUT (or --demo)")
        start = time.perf_counter()
        summary = segment_file(args.image, args.painted, args.out, args.model, args.label, _axis(args.axis),
                               args.modality, args.device, args.between_painted, args.overwrite,
                               args.mirror_average, args.intensity_band, args.keep_outlines, args.precision,
                               args.rtstruct, args.names)
        structures = summary["structures"]
        for value, structure in structures.items():
            rng = structure["slice_range"]
            name = f" label {value}:" if len(structures) > 1 else ""
            print(f"{summary['out']}:{name} {structure['voxels']} voxels ({structure['volume_ml']:.1f} ml) on slices "
                  f"{rng[0]}..{rng[1]} along axis {structure['axis']} (painted {structure['painted']}), read as "
                  f"{structure['read_as']}", end="")
            print(f", {time.perf_counter() - start:.1f} s" if len(structures) == 1 else "")
            for axis, z in structure["outlines"]:
                print(f"  the painting on slice {z} of axis {axis} is a closed outline: its inside was taken as the "
                      f"structure (--keep-outlines keeps it a ring)")
            for axis, voxel in structure["tiny_paintings"]:
                print(f"  tip: {tiny_painting_tip(axis, voxel)}")
            if structure["tip"]:
                print(f"  tip: {structure['tip']}")
        if len(structures) > 1:
            print(f"{len(structures)} structures in {time.perf_counter() - start:.1f} s")
    except DenseMPError as exc:
        print(f"densemp-segment: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("densemp-segment: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous
    return 0


def _plain_warning(message, *_, **__) -> str:
    """A warning (a scan read with a guess) as one line for the user, without source lines."""
    return f"densemp-segment: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
