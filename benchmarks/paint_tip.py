"""How often the "paint this slice too" tip (``larger_slice``) is given, and what following
it buys: each structure is painted on its largest slice or that far through its extent,
propagated; where a tip names a slice, the truth is painted there too (what a user following
the tip would paint) and the run repeated.

    python benchmarks/paint_tip.py --data ../shared/data/chaos_t2 --organs 1 2 3 4 --split seen \
        --scans image_19 image_20 image_21 image_22 --at largest 0.1 0.9
    python benchmarks/paint_tip.py --phantoms 6 --at largest 0.1 0.25 0.75 0.9   # seeds 300-305, 400-405
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from accuracy import dice, paint_largest_slice, select_scans

from napari_densemp.engine import load_model, propagate
from napari_densemp.painting import larger_slice
from src_data.datasets import load_scan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--phantoms", type=int, default=0, help="N CT and N MRI phantoms")
    parser.add_argument("--first-seed", type=int, default=300, help="phantom seeds from this (CT) and this + 100 (MRI)")
    parser.add_argument("--organs", type=int, nargs="*")
    parser.add_argument("--split", default="held-out", choices=["held-out", "seen", "all"])
    parser.add_argument("--scans", nargs="*")
    parser.add_argument("--model", default="default")
    parser.add_argument("--at", nargs="+", default=["largest", "0.1", "0.9"],
                        help="where to paint: largest, or a fraction of the organ's extent")
    args = parser.parse_args(argv)
    if not (args.data or args.phantoms):
        parser.error("give --data or --phantoms")
    model = load_model(args.model)
    records = select_scans(args.data, args.phantoms, args.split, None, args.first_seed, args.scans)
    print(f"model {model.name}; {len(records)} scans")
    print(f"{'painted at':<12}{'tips':>10}   Dice of those before -> after painting the named slice too")
    scans = [load_scan(r) for r in records]
    for at in args.at:
        fraction = None if at == "largest" else float(at)
        given, total, before, after = 0, 0, [], []
        for scan in scans:
            for organ in args.organs or [int(v) for v in np.unique(scan.label) if v]:
                truth = scan.label == organ
                if not truth.any():
                    continue
                total += 1
                painted, _ = paint_largest_slice(truth, 2, fraction)
                result = propagate(scan.volume, painted, model, scan.spacing, axis=2, affine=scan.affine)
                found = larger_slice(result.mask, painted, 2)
                if found is None:
                    continue
                given += 1
                named = found[1]
                painted[..., named] = truth[..., named]
                again = propagate(scan.volume, painted, model, scan.spacing, axis=2, affine=scan.affine)
                before.append(100 * dice(result.mask, truth))
                after.append(100 * dice(again.mask, truth))
        change = f"{np.mean(before):.1f} -> {np.mean(after):.1f} (lower: {sum(b > a for b, a in zip(before, after))})" \
            if before else "-"
        print(f"{at:<12}{f'{given} / {total}':>10}   {change}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
