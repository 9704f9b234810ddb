"""``densemp-train``: headless training of DenseMP models.

Sub-commands: ``prepare`` (raw downloads to training data), ``stage1`` (dense contrastive
pre-training of the backbone), ``evaluate`` and ``reproduce`` (the paper's protocols), ``stage2``
(superpixel self-supervision), ``finetune`` (labelled + superpixel episodes) and ``export``
(a lean, shippable checkpoint from a training run). Every stage runs on CPU or CUDA, resumes
from its run folder, and scales over GPUs and nodes with ``torchrun``:

    torchrun --nproc-per-node 4 -m training.cli stage2 --data DIR --out runs/s2 --batch 2
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from napari_densemp.errors import DenseMPError


def _network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=101, choices=[18, 34, 50, 101], help="ResNet depth")
    parser.add_argument("--last-layer", type=int, default=4, choices=[3, 4],
                        help="cut the ResNet after this layer (3: light and fast)")
    parser.add_argument("--feature-dim", type=int, default=256)
    parser.add_argument("--global-prototypes-only", action="store_true",
                        help="vanilla PA-Net: one global prototype per class, no local prototypes")


def _run_args(parser: argparse.ArgumentParser, iterations: int, lr: float | None, checkpoint_every: int) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, caches)")
    parser.add_argument("--iterations", type=int, default=iterations, help="optimiser steps")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch", type=int, default=1, help="items per rank and micro-step")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-steps per optimiser step")
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="background data workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing last.pt instead of resuming")
    parser.add_argument("--stop-at", type=int, help="checkpoint and stop at this step (rerun to continue)")


def _episode_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, nargs="*", default=[], help="folders of NIfTI scans")
    parser.add_argument("--phantoms", type=int, default=0, help="add N CT and N MRI phantoms")
    parser.add_argument("--exclude", nargs="*", default=[], help="scan-name globs never trained on")
    parser.add_argument("--no-hold-out", action="store_true",
                        help="also train on the benchmark patients (CHAOS 31-39, last 10 OpenKBP)")
    parser.add_argument("--exclude-classes", type=int, nargs="*", default=[],
                        help="setting 2: drop every slice holding any of these label values")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--prepared", type=Path,
                        help="folder of prepared scans (superpixels) to share between runs (default: OUT/prepared)")
    parser.add_argument("--mirror", action="store_true",
                        help="flip each episode in-plane at random (ours, not the reference's): a model that "
                             "does not depend on which way scans are stored left-right and front-back")


def _optim(args: argparse.Namespace, **overrides):
    from .loop import OptimConfig

    values = {"iterations": args.iterations, "checkpoint_every": args.checkpoint_every,
              "log_every": args.log_every, "amp": args.amp, "accumulate": args.accumulate,
              "stop_at": args.stop_at, **overrides}
    if args.lr is not None:
        values["lr"] = args.lr
    return OptimConfig(**values)


def _stage2_config(args: argparse.Namespace, network=None):
    from .stage2 import Stage2Config

    config = Stage2Config(
        data_dirs=args.data, run_dir=args.out, phantoms=args.phantoms, exclude=args.exclude,
        hold_out=not args.no_hold_out, excluded_classes=args.exclude_classes, crop=args.crop, seed=args.seed,
        batch=args.batch, workers=args.workers, device=args.device, optim=_optim(args), mirror=args.mirror,
        cache_dir=args.prepared)
    if network is not None:
        config.network = network
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densemp-train", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    s1 = sub.add_parser("stage1", help="dense contrastive pre-training of the backbone (DenseCL)")
    s1.add_argument("--images", type=Path, nargs="+", required=True,
                    help="folders of 2D images (jpg/png, class folders allowed) and/or NIfTI scans")
    s1.add_argument("--size", type=int, default=224)
    s1.add_argument("--init", type=Path, help="torchvision-format ResNet weights (e.g. ImageNet) to start from")
    s1.add_argument("--queue", type=int, default=65536)
    s1.add_argument("--dense-weight", type=float, default=0.5, help="lambda; 0: global loss only")
    s1.add_argument("--no-hold-out", action="store_true",
                    help="also train on the benchmark patients (CHAOS 31-39, last 10 OpenKBP)")
    _run_args(s1, iterations=10_000, lr=None, checkpoint_every=500)
    s1.add_argument("--depth", type=int, default=101, choices=[18, 34, 50, 101])
    s1.add_argument("--last-layer", type=int, default=4, choices=[3, 4])

    s2 = sub.add_parser("stage2", help="superpixel-guided self-supervised episodes (no labels)")
    _episode_data_args(s2)
    s2.add_argument("--init-backbone", type=Path,
                    help="backbone weights by name: a stage-1 checkpoint or torchvision ResNet weights")
    _run_args(s2, iterations=100_000, lr=1e-3, checkpoint_every=500)
    _network_args(s2)

    ft = sub.add_parser("finetune", help="labelled (p 0.25) and superpixel episodes from a stage-2 model")
    ft.add_argument("checkpoint", type=Path, help="the stage-2 checkpoint to start from")
    _episode_data_args(ft)
    ft.add_argument("--labelled", type=float, default=0.25, help="share of labelled episodes")
    ft.add_argument("--in-volume", type=float, default=0.0,
                    help="share of the labelled episodes whose support and query are two slices of one scan "
                         "(the product's propagation; 0 = the paper's cross-patient episodes only)")
    _run_args(ft, iterations=5100, lr=1e-4, checkpoint_every=500)

    pr = sub.add_parser("prepare", help="prepare a raw download (Synapse Abd-CT, CHAOS MR, ROCO)")
    pr.add_argument("kind", choices=["synapse", "chaos", "roco"])
    pr.add_argument("raw", type=Path, help="the folder the download was unpacked to")
    pr.add_argument("out", type=Path, help="where image_N/label_N.nii.gz, superpixels and classes.json go")
    pr.add_argument("--workers", type=int, default=0, help="parallel processes")

    ev = sub.add_parser("evaluate", help="the paper's protocol and the oracle-free one, as tables")
    ev.add_argument("--data", type=Path, required=True, help="prepared scans with labels")
    ev.add_argument("--checkpoint", required=True,
                    help="a checkpoint, 'default', or a pattern with {fold} for one model per fold")
    ev.add_argument("--modality", choices=["ct", "mri"], required=True, help="fold boundaries and organ names")
    ev.add_argument("--organs", type=int, nargs="+", help="label values (default: all four)")
    ev.add_argument("--folds", type=int, default=5)
    ev.add_argument("--out", type=Path, required=True, help="table.md, table.csv, scans.csv")
    ev.add_argument("--device", default="auto")

    rp = sub.add_parser("reproduce", help="train every fold of a preset and write the paper's tables")
    rp.add_argument("preset", choices=["paper-ct", "paper-mri", "cpu-chaos", "cpu-phantoms"])
    rp.add_argument("--data", type=Path, help="prepared scans with labels (not for cpu-phantoms)")
    rp.add_argument("--out", type=Path, required=True)
    rp.add_argument("--device", default="auto")
    rp.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    rp.add_argument("--workers", type=int, default=0)

    ex = sub.add_parser("export", help="strip the training state from a checkpoint (float16 weights, int8 "
                                            "scales measured on phantoms)")
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("out", type=Path)
    ex.add_argument("--full-precision", action="store_true")
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--rule", nargs="*", default=[], metavar="NAME=VALUE",
                    help="propagation rules tuned for this model on its training patients, stored in the "
                         "checkpoint (e.g. min_confidence=0.7); the engine's own defaults otherwise")
    ex.add_argument("--orientation", nargs="*", default=[], metavar="MODALITY=CODES",
                    help="how the training scans of each modality were stored, as axis codes (e.g. ct=RAS "
                         "mri=LAS): the engine then shows scans with a known affine to the model that way")
    av = sub.add_parser("average", help="average the weights of models fine-tuned from one another "
                                         "(WiSE-FT: e.g. a stage-2 model and its fine-tuned descendant)")
    av.add_argument("checkpoints", type=Path, nargs="+")
    av.add_argument("--weights", type=float, nargs="+", help="one per checkpoint (normalised); equal otherwise")
    av.add_argument("--out", type=Path, required=True)
    av.add_argument("--full-precision", action="store_true")
    av.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # a scheduler's time limit (SIGTERM, as SLURM sends before killing) stops training as Ctrl-C
    # does: the finished steps are checkpointed
    previous = (signal.signal(signal.SIGTERM, _interrupt)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        if args.command == "stage1":
            from .stage1 import DenseCLConfig, Stage1Config, default_lr, run_stage1

            world = int(os.environ.get("WORLD_SIZE", "1"))
            lr = args.lr if args.lr is not None else default_lr(args.batch * args.accumulate * world)
            config = Stage1Config(
                sources=args.images, run_dir=args.out, size=args.size, batch=args.batch, init=args.init,
                seed=args.seed, workers=args.workers, device=args.device, hold_out=not args.no_hold_out,
                model=DenseCLConfig(depth=args.depth, last_layer=args.last_layer, queue=args.queue,
                                    dense_weight=args.dense_weight),
                optim=_optim(args, lr=lr, schedule="cosine", weight_decay=1e-4))
            print(f"stage 1 checkpoint: {run_stage1(config, resume=not args.fresh)}")
        elif args.command == "stage2":
            from napari_densemp.network import NetworkConfig

            from .stage2 import run_stage2

            config = _stage2_config(args, NetworkConfig(depth=args.depth, last_layer=args.last_layer,
                                                        feature_dim=args.feature_dim,
                                                        local_prototypes=not args.global_prototypes_only))
            config.init_backbone = args.init_backbone
            print(f"stage 2 checkpoint: {run_stage2(config, resume=not args.fresh)}")
        elif args.command == "finetune":
            from .finetune import FinetuneConfig, run_finetune

            config = FinetuneConfig(stage2=args.checkpoint, data=_stage2_config(args), optim=_optim(args),
                                    labelled=args.labelled, in_volume=args.in_volume)
            print(f"fine-tuned checkpoint: {run_finetune(config, resume=not args.fresh)}")
        elif args.command == "prepare":
            from src_data.prepare import prepare_dataset

            results = prepare_dataset(args.kind, args.raw, args.out, workers=args.workers)
            failed = {name: r["error"] for name, r in results.items() if "error" in r}
            print(f"prepared {len(results) - len(failed)} of {len(results)} into {args.out}"
                  + "".join(f"\n  {name}: {error}" for name, error in failed.items()))
            return 3 if failed else 0
        elif args.command == "evaluate":
            from napari_densemp.engine import load_model

            from .evaluate import ORGAN_NAMES, evaluate, markdown_table, write_reports

            names = ORGAN_NAMES[args.modality]
            models = {}

            def model_for(fold: int):
                path = args.checkpoint.replace("{fold}", str(fold))
                if path not in models:
                    models.clear()
                    models[path] = load_model(path, args.device)
                return models[path]

            rows = evaluate(args.data, model_for, args.organs or sorted(names), folds=args.folds)
            if not rows:
                raise DenseMPError(f"nothing to score in {args.data}: no labelled scans with those organs")
            title = f"{args.data.name}, {args.folds} folds, checkpoint {args.checkpoint}"
            write_reports(rows, args.out, names, title)
            print(markdown_table(rows, names, title))
        elif args.command == "reproduce":
            from .reproduce import PRESETS, reproduce

            reproduce(PRESETS[args.preset], args.out, args.data, args.device, args.amp, args.workers)
        elif args.command == "export":
            from napari_densemp.engine import parse_rules

            from .export import export_checkpoint

            given = dict(item.partition("=")[::2] for item in args.orientation)
            export_checkpoint(args.checkpoint, args.out, parse_rules(args.rule) if args.rule else None, given,
                              half=not args.full_precision, overwrite=args.overwrite)
            print(f"exported {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
        elif args.command == "average":
            from napari_densemp.checkpoint import save_checkpoint

            from .averaging import average_checkpoints

            if args.out.exists() and not args.overwrite:
                raise DenseMPError(f"{args.out} exists; pass --overwrite to replace it.")
            averaged = average_checkpoints(args.checkpoints, args.weights)
            save_checkpoint(args.out, averaged.build_model(), averaged.preprocessing,
                            provenance=averaged.provenance, half=not args.full_precision)
            shares = ", ".join(f"{s['weight']:.2f} {Path(s['path']).name}" for s in averaged.provenance["sources"])
            print(f"averaged {shares} into {args.out}")
    except (DenseMPError, ValueError) as exc:
        print(f"densemp-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("densemp-train: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
