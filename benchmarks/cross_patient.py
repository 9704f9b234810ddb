"""Cross-patient ("paint once, segment many") accuracy: the support is the next patient in id
order, the query is scored on its whole volume (no oracle), beside the paper's protocol for the
same model (3 supports, query scored on its true z-range only).

    python benchmarks/cross_patient.py --data ../shared/data/chaos_t2 --organs 1 2 3 4 --split held-out
    python benchmarks/cross_patient.py --phantoms 4
    python benchmarks/cross_patient.py --data ../shared/data/openkbp_hn_ct --organs 1 3 4 7 --slice-mm 1.25

Columns: "1 slice" = support painted on its slice of largest organ area (what a user paints;
``--plane axial+coronal``: on its largest slice of each plane); "3D" = the support's whole label
(segment_like pairs its 3 chunks); "paper" = the protocol. ``--slice-mm`` re-slices support and
query along their axial axis first (see accuracy.py); "s" = seconds of the 1-slice search.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from accuracy import dice, paint_largest_slice, resliced, select_scans

from napari_densemp.engine import (
    FeatureCache,
    PropagationOptions,
    load_model,
    parse_rules,
    plane_axis,
    segment_like,
)
from src_data.datasets import LoadedScan, ScanRecord, find_scans, load_scan
from src_data.phantoms import ORGAN_NAMES
from training.protocol import paper_protocol_mask


def load_resliced(record: ScanRecord, slice_mm: float | None) -> LoadedScan:
    """The scan and its label, re-sliced to ``slice_mm`` thick axial slices when given."""
    scan = load_scan(record)
    if not slice_mm:
        return scan
    volume, label, affine = resliced(scan.volume, scan.label, scan.affine, slice_mm)
    return LoadedScan(volume, label, affine, tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)))


def _cohort(record: ScanRecord) -> str:
    """The name with its numbers blanked: phantom_ct_300 and phantom_ct_301 are one cohort."""
    return re.sub(r"\d+", "#", record.name)


def cross_patient_scores(queries: list[ScanRecord], model, options: PropagationOptions,
                         organs: list[int] | None = None, three_d: bool = True, planes: str = "axial",
                         slice_mm: float | None = None):
    """Per query and organ: (query, support, organ, Dice with one painted slice, Dice with the 3D
    support (NaN when skipped), paper-protocol Dice, range found, true range, seconds). The
    support is the next scan in id order among the scans of the query's folder and cohort (names
    alike but for their numbers: a phantom CT's support is a phantom CT), circular; it is painted
    on its largest slice of each of ``planes`` ("axial" or e.g. "axial+coronal")."""
    everyone = find_scans(queries[0].image.parent) if queries else []
    cache = FeatureCache(max_volumes=4)  # support and query, across two planes
    for record in queries:
        cohort = [r for r in everyone if _cohort(r) == _cohort(record)]
        support_record = cohort[(cohort.index(record) + 1) % len(cohort)]
        query, support = load_resliced(record, slice_mm), load_resliced(support_record, slice_mm)
        for organ in organs or [int(v) for v in np.unique(query.label) if v]:
            truth, support_truth = query.label == organ, support.label == organ
            if not truth.any() or not support_truth.any():
                continue
            painted = np.zeros_like(support_truth)
            for plane in planes.split("+"):
                painted |= paint_largest_slice(support_truth, plane_axis(support.affine, plane))[0]
            start = time.perf_counter()
            affines = dict(support_affine=support.affine, query_affine=query.affine)
            one = segment_like(support.volume, painted, query.volume, model, support.spacing, query.spacing,
                               options=options, cache=cache, **affines)
            seconds = time.perf_counter() - start
            full = segment_like(support.volume, support_truth.astype(np.uint8), query.volume, model,
                                support.spacing, query.spacing, options=options, cache=cache,
                                **affines) if three_d else None
            paper = paper_protocol_mask(model, support.volume, support_truth, query.volume, truth,
                                        support.spacing, query.spacing, cache=cache, **affines)
            zs = np.flatnonzero(truth.any(axis=(0, 1)))
            found = f"{one.slice_range[0]}-{one.slice_range[1]}" if one.slice_range else "-"
            yield (record.name, support_record.name, organ, dice(one.mask, truth),
                   dice(full.mask, truth) if full else np.nan, dice(paper, truth), found, f"{zs[0]}-{zs[-1]}",
                   seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--phantoms", type=int, default=0)
    parser.add_argument("--first-seed", type=int, default=100,
                        help="phantom seeds from this (CT) and this + 100 (MRI); 300: the validation phantoms")
    parser.add_argument("--organs", type=int, nargs="*")
    parser.add_argument("--split", default="held-out", choices=["held-out", "seen", "all"])
    parser.add_argument("--model", default="default")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "int8", "fp32"])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--scans", nargs="*", help="only these queries of the split (e.g. a validation set)")
    parser.add_argument("--plane", default="axial", choices=["axial", "axial+coronal"],
                        help="paint the support's largest slice of each plane (the 1-slice column)")
    parser.add_argument("--skip-3d", action="store_true", help="only the 1-slice support and the paper protocol")
    parser.add_argument("--slice-mm", type=float,
                        help="re-slice every scan along its axial axis to this thickness (mm) first")
    parser.add_argument("--rule", nargs="*", default=[], metavar="NAME=VALUE",
                        help="override propagation rules (PropagationOptions fields), e.g. min_confidence=0.7")
    args = parser.parse_args(argv)
    model = load_model(args.model, precision=args.precision)
    options = model.default_options(**parse_rules(args.rule))
    queries = select_scans(args.data, args.phantoms, args.split, args.limit, args.first_seed, names=args.scans)
    names = ORGAN_NAMES if args.phantoms else {}
    print(f"model {model.name} ({model.precision}); slices {args.slice_mm or 'stored'} mm; options {options}")
    print(f"{'query':<16}{'support':<16}{'organ':>6}{'1 slice':>9}{'3D':>7}{'paper':>7}{'found':>10}"
          f"{'truth':>10}{'s':>6}")
    rows = []
    for row in cross_patient_scores(queries, model, options, args.organs, three_d=not args.skip_3d,
                                   planes=args.plane, slice_mm=args.slice_mm):
        query_name, support_name, organ, one, full, paper, found, true_range, seconds = row
        rows.append((organ, one, full, paper))
        print(f"{query_name:<16}{support_name:<16}{organ:>6}{100 * one:>9.1f}{100 * full:>7.1f}"
              f"{100 * paper:>7.1f}{found:>10}{true_range:>10}{seconds:>6.2f}", flush=True)
    if not rows:
        print("nothing scored")
        return 1
    print("\norgan          1 slice      3D   paper   (mean 3D Dice; paper = 3 supports, true z-range only)")
    table = np.array([r[1:] for r in rows])
    organs = sorted({r[0] for r in rows})
    per_organ = []
    for organ in organs:
        mean = table[[r[0] == organ for r in rows]].mean(axis=0)
        per_organ.append(mean)
        print(f"{names.get(organ, str(organ)):<14}{100 * mean[0]:>8.1f}{100 * mean[1]:>8.1f}{100 * mean[2]:>8.1f}")
    mean = np.mean(per_organ, axis=0)
    print(f"{'mean':<14}{100 * mean[0]:>8.1f}{100 * mean[1]:>8.1f}{100 * mean[2]:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
