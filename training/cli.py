"""``densemp-train``: headless training of DenseMP models.

Sub-commands: ``stage2`` (superpixel self-supervision) and ``export`` (a lean, shippable
checkpoint from a training run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from napari_densemp.errors import DenseMPError


def _network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=101, choices=[18, 34, 50, 101], help="ResNet depth")
    parser.add_argument("--last-layer", type=int, default=4, choices=[3, 4],
                        help="cut the ResNet after this layer (3: light and fast)")
    parser.add_argument("--feature-dim", type=int, default=256)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densemp-train", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    s2 = sub.add_parser("stage2", help="superpixel-guided self-supervised episodes (no labels)")
    s2.add_argument("--data", type=Path, nargs="*", default=[], help="folders of NIfTI scans")
    s2.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, caches)")
    s2.add_argument("--phantoms", type=int, default=0, help="add N CT and N MRI phantoms")
    s2.add_argument("--exclude", nargs="*", default=[], help="scan-name globs never trained on")
    s2.add_argument("--no-hold-out", action="store_true",
                    help="also train on the benchmark patients (CHAOS 31-39, last 10 OpenKBP)")
    s2.add_argument("--exclude-classes", type=int, nargs="*", default=[],
                    help="setting 2: drop every slice holding any of these label values")
    s2.add_argument("--iterations", type=int, default=100_000)
    s2.add_argument("--lr", type=float, default=1e-3)
    s2.add_argument("--batch", type=int, default=1, help="episodes per step")
    s2.add_argument("--crop", type=int, default=256)
    s2.add_argument("--checkpoint-every", type=int, default=500)
    s2.add_argument("--log-every", type=int, default=25)
    s2.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    s2.add_argument("--device", default="auto")
    s2.add_argument("--workers", type=int, default=0, help="background episode workers")
    s2.add_argument("--seed", type=int, default=0)
    s2.add_argument("--fresh", action="store_true", help="ignore an existing last.pt instead of resuming")
    _network_args(s2)

    ex = sub.add_parser("export", help="strip the training state from a checkpoint (float16 weights)")
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--full-precision", action="store_true")
    ex.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "stage2":
            from napari_densemp.network import NetworkConfig

            from .loop import OptimConfig
            from .stage2 import Stage2Config, run_stage2

            config = Stage2Config(
                data_dirs=args.data, run_dir=args.out, phantoms=args.phantoms, exclude=args.exclude,
                hold_out=not args.no_hold_out, excluded_classes=args.exclude_classes, crop=args.crop,
                seed=args.seed, batch=args.batch, workers=args.workers, device=args.device,
                network=NetworkConfig(depth=args.depth, last_layer=args.last_layer, feature_dim=args.feature_dim),
                optim=OptimConfig(iterations=args.iterations, lr=args.lr, checkpoint_every=args.checkpoint_every,
                                  log_every=args.log_every, amp=args.amp))
            last = run_stage2(config, resume=not args.fresh)
            print(f"stage 2 checkpoint: {last}")
        elif args.command == "export":
            from napari_densemp.checkpoint import load_checkpoint, save_checkpoint

            if args.out.exists() and not args.overwrite:
                raise DenseMPError(f"{args.out} exists; pass --overwrite to replace it.")
            state = load_checkpoint(args.checkpoint)
            save_checkpoint(args.out, state.build_model(), state.preprocessing, provenance=state.provenance,
                            half=not args.full_precision)
            print(f"exported {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    except (DenseMPError, ValueError) as exc:
        print(f"densemp-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("densemp-train: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
