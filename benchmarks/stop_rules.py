"""Which rule decides best where a structure ends? Each rule set below is scored by in-volume
one-slice propagation (paint the slice of largest area, whole volume scored), with the
backbone run once per scan. By default on patients the benchmarks do NOT score (the model's
seen split), so choosing a rule here never looks at the held-out patients.

    python benchmarks/stop_rules.py --data ../shared/data/chaos_t2 --organs 1 2 3 4
    python benchmarks/stop_rules.py --phantoms 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from accuracy import dice, paint_largest_slice, select_scans

from napari_densemp.engine import FeatureCache, PropagationOptions, load_model, propagate
from src_data.datasets import load_scan

INF = float("inf")
RULES = {
    "no stop (threshold only)": PropagationOptions(neighbour_margin_mm=INF, clip_to_neighbour=False,
                                                   max_growth=INF, min_area_mm2=0.0, min_confidence=0.0),
    "connected to neighbour": PropagationOptions(clip_to_neighbour=False, max_growth=INF, min_confidence=0.0),
    "connected + growth 1.5x": PropagationOptions(clip_to_neighbour=False, max_growth=1.5, min_confidence=0.0),
    "connected + growth 1.5x + confidence 0.8": PropagationOptions(clip_to_neighbour=False, max_growth=1.5),
    "clip 10mm + growth 1.5x": PropagationOptions(max_growth=1.5, min_confidence=0.0),
    "clip 10mm + growth 1.2x": PropagationOptions(min_confidence=0.0),
    "clip 5mm + growth 1.5x + confidence 0.8": PropagationOptions(neighbour_margin_mm=5.0, max_growth=1.5),
    "clip 20mm + growth 1.5x + confidence 0.8": PropagationOptions(neighbour_margin_mm=20.0, max_growth=1.5),
    **{f"clip 10mm + growth 1.5x + confidence {c}": PropagationOptions(max_growth=1.5, min_confidence=c)
       for c in (0.7, 0.75, 0.8, 0.85)},
    # the confidence floor depends on how sure a model is: sweep it per model (export --rule)
    **{f"clip 10mm + growth 1.2x + confidence {c}": PropagationOptions(min_confidence=c)
       for c in (0.6, 0.65, 0.7, 0.75)},
    "clip 10mm + growth 1.2x + confidence 0.8 (engine default)": PropagationOptions(),
    "clip 10mm + growth 1.2x + confidence 0.85": PropagationOptions(min_confidence=0.85),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--phantoms", type=int, default=0)
    parser.add_argument("--organs", type=int, nargs="*")
    parser.add_argument("--split", default="seen", choices=["seen", "held-out", "all"])
    parser.add_argument("--limit", type=int)
    parser.add_argument("--scans", nargs="*", help="only these scans of the split (e.g. a validation set)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--rules", nargs="*", help="score only the rules whose names contain one of these")
    args = parser.parse_args()
    rules = {name: o for name, o in RULES.items() if not args.rules or any(r in name for r in args.rules)}
    model = load_model(args.model, "auto")
    records = select_scans(args.data, args.phantoms, args.split, args.limit, first_seed=300, names=args.scans)
    scores: dict[str, list[tuple[int, float, int, int]]] = {name: [] for name in rules}
    for record in records:
        scan = load_scan(record)
        cache = FeatureCache()
        organs = args.organs or [int(v) for v in np.unique(scan.label) if v]
        for organ in organs:
            truth = scan.label == organ
            if not truth.any():
                continue
            painted, _ = paint_largest_slice(truth)
            true_z = np.flatnonzero(truth.any(axis=(0, 1)))
            for name, options in rules.items():
                result = propagate(scan.volume, painted, model, spacing=scan.spacing, options=options, cache=cache,
                                   affine=scan.affine)
                low, high = result.slice_range
                over = max(true_z[0] - low, 0) + max(high - true_z[-1], 0)
                under = max(low - true_z[0], 0) + max(true_z[-1] - high, 0)
                scores[name].append((organ, dice(result.mask, truth), over, under))
        print(f"{record.name} done", file=sys.stderr, flush=True)
    organs = sorted({s[0] for s in next(iter(scores.values()))})
    header = "".join(f"{o:>7}" for o in organs)
    print(f"model {model.name} ({model.provenance.get('iterations', '?')} it), {len(records)} scans")
    print(f"{'rule':<58}{header}{'mean':>7}{'over':>6}{'under':>6}   (Dice %, slices past/short of the organ)")
    for name, rows in scores.items():
        table = np.array(rows, dtype=float)
        per_organ = [100 * table[table[:, 0] == o, 1].mean() for o in organs]
        cells = "".join(f"{v:>7.1f}" for v in per_organ)
        print(f"{name:<58}{cells}{np.mean(per_organ):>7.1f}{table[:, 2].mean():>6.1f}{table[:, 3].mean():>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
