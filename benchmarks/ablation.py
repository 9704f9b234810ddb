"""Ablation in the manner of the paper's Tables 5 and 6: several checkpoints, one evaluation.

Every model is scored on the patients no model here trained on (CHAOS 31-39, OpenKBP's last
10), with the same engine rules (the engine's defaults, not each model's tuned ones, unless
``--tuned``): in-volume one-slice propagation on CHAOS and OpenKBP, and cross-patient on
CHAOS with one painted slice (oracle-free) and by the paper's protocol (true z-range).

    python benchmarks/ablation.py --chaos ../shared/data/chaos_t2 --openkbp ../shared/data/openkbp_hn_ct \\
        --model "stage 2 only=runs/v0/last.pt" "stage 1 + stage 2=runs/v1/stage2/last.pt" \\
        "vanilla PA-Net (at inference)=runs/v1/stage2/last.pt:global"

``NAME=PATH:global`` scores a checkpoint with its local prototypes switched off at inference
(one global prototype per class); a PA-Net trained that way is ``densemp-train stage2
--global-prototypes-only``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from accuracy import in_volume_scores, select_scans
from cross_patient import cross_patient_scores

from napari_densemp.engine import PropagationOptions, load_model

COLUMNS = ["CHAOS in-volume", "OpenKBP in-volume", "CHAOS cross-patient", "CHAOS paper protocol"]


def organ_mean(rows: list[tuple[int, float]]) -> float:
    """Mean over organs of the per-organ mean Dice, in %."""
    organs = sorted({organ for organ, _ in rows})
    return 100 * float(np.mean([np.mean([d for o, d in rows if o == organ]) for organ in organs]))


def score(model, options: PropagationOptions, chaos: Path | None, openkbp: Path | None) -> dict[str, float]:
    scores = {}
    if chaos:
        held = select_scans(chaos, 0, "held-out", None)
        scores[COLUMNS[0]] = organ_mean([(r[1], r[2]) for r in in_volume_scores(held, model, options, [1, 2, 3, 4])])
        cross = list(cross_patient_scores(held, model, options, [1, 2, 3, 4], three_d=False))
        scores[COLUMNS[2]] = organ_mean([(r[2], r[3]) for r in cross])
        scores[COLUMNS[3]] = organ_mean([(r[2], r[5]) for r in cross])
    if openkbp:
        held = select_scans(openkbp, 0, "held-out", None)
        scores[COLUMNS[1]] = organ_mean([(r[1], r[2]) for r in in_volume_scores(held, model, options, [1, 3, 4, 7])])
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, metavar="NAME=PATH[:global]")
    parser.add_argument("--chaos", type=Path, help="the CHAOS T2-SPIR folder")
    parser.add_argument("--openkbp", type=Path, help="the OpenKBP CT folder")
    parser.add_argument("--tuned", action="store_true", help="each model with its own tuned rules")
    args = parser.parse_args(argv)
    if not (args.chaos or args.openkbp):
        parser.error("give --chaos and/or --openkbp")
    table = []
    for item in args.model:
        name, _, source = item.partition("=")
        path, _, variant = source.partition(":")
        model = load_model(path or name)
        if variant == "global":
            model.network.config = replace(model.network.config, local_prototypes=False)
        options = model.default_options() if args.tuned else PropagationOptions()
        start = time.perf_counter()
        scores = score(model, options, args.chaos, args.openkbp)
        table.append((name, scores))
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
              + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    columns = [c for c in COLUMNS if c in table[0][1]]
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, scores in table:
        print(f"| {name} | " + " | ".join(f"{scores[c]:.1f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
