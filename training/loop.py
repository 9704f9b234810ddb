"""The episodic training loop: SGD schedule, AMP, periodic atomic checkpoints, exact resume,
a progress bar and a CSV log. Stage 2 uses it now; fine-tuning reuses it."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from napari_densemp import __version__
from napari_densemp.checkpoint import load_checkpoint, save_checkpoint
from napari_densemp.devices import cpu_has_fast_bf16, pick_device
from napari_densemp.network import FewShotSegmenter
from napari_densemp.preprocessing import PreprocessingProfile

log = logging.getLogger(__name__)
LAST = "last.pt"


@dataclass
class OptimConfig:
    """The reference's schedule: SGD, lr x0.95 every 1000 iterations, one episode a step."""

    iterations: int = 100_000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 1000
    lr_gamma: float = 0.95
    checkpoint_every: int = 500
    log_every: int = 25
    amp: str = "auto"  # auto | bf16 | fp16 | off


@dataclass
class RunInfo:
    stage: str
    data: list[str] = field(default_factory=list)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast where the hardware has it (CPU AVX512-BF16/AMX, Ampere+ GPUs)."""
    if amp == "off":
        return nullcontext(), None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    if amp == "bf16" or (amp == "auto" and cpu_has_fast_bf16()):
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return nullcontext(), None


def train_episodes(model: FewShotSegmenter, episodes: Iterable[dict[str, torch.Tensor]],
                   profile: PreprocessingProfile, optim: OptimConfig, run_dir: str | Path,
                   info: RunInfo, device: str = "auto", resume: bool = True) -> Path:
    """Train ``model`` on an endless stream of episode batches; returns the last checkpoint.

    ``episodes`` must be built to start at the iteration returned by :func:`resume_point`
    so that a resumed run sees the same episodes as an uninterrupted one.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    model.to(dev).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, optim.lr_step, optim.lr_gamma)
    start, elapsed_before = 0, 0.0
    last = run_dir / LAST
    if resume and last.is_file():
        state = load_checkpoint(last)
        model.load_state_dict(state.state_dict)
        optimizer.load_state_dict(state.training["optimizer"])
        schedule.load_state_dict(state.training["schedule"])
        torch.set_rng_state(state.training["torch_rng"])
        start = int(state.training["iteration"])
        elapsed_before = float(state.training.get("elapsed_s", 0.0))
        log.info("resumed %s at iteration %d", last, start)
    autocast, scaler = autocast_for(dev, optim.amp)
    log_path = run_dir / "log.csv"
    kept_rows = []
    if start > 0 and log_path.exists():  # rows logged after the checkpoint are replayed: drop them
        with open(log_path, newline="") as old:
            kept_rows = [row for row in csv.reader(old)][1:]
        kept_rows = [row for row in kept_rows if row and int(row[0]) <= start]
    log_file = open(log_path, "w", newline="")  # noqa: SIM115 - closed below
    writer = csv.writer(log_file)
    writer.writerow(["iteration", "loss", "query_loss", "align_loss", "lr", "episodes_per_s", "elapsed_s"])
    writer.writerows(kept_rows)

    def checkpoint(iteration: int, elapsed: float) -> None:
        provenance = {"stage": info.stage, "data": info.data, "iterations": iteration, "seed": info.seed,
                      "code_version": __version__, "device": str(dev), "amp": optim.amp,
                      "wall_time_s": round(elapsed, 1), "optim": asdict(optim), **info.extra}
        training = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "torch_rng": torch.get_rng_state(), "iteration": iteration, "elapsed_s": elapsed}
        save_checkpoint(last, model, profile, provenance=provenance, training=training)

    iteration = start
    t0 = time.perf_counter()
    window_t, window_n = t0, 0
    sums = torch.zeros(3)
    bar = tqdm(total=optim.iterations, initial=start, desc=f"{info.stage}", unit="ep", dynamic_ncols=True)
    try:
        stream = iter(episodes)
        while iteration < optim.iterations:
            batch = next(stream)
            support = batch["support_image"].to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            query = batch["query_image"].to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast:
                loss, parts = model.episode_loss(support, batch["support_mask"].to(dev), query,
                                                 batch["query_label"].to(dev))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            schedule.step()
            iteration += 1
            window_n += support.shape[0]
            sums += torch.tensor([float(loss.detach()), parts["query"], parts["align"]])
            bar.update(1)
            if iteration % optim.log_every == 0 or iteration == optim.iterations:
                now = time.perf_counter()
                rate = window_n / max(now - window_t, 1e-9)
                steps = optim.log_every if iteration % optim.log_every == 0 else max(1, iteration % optim.log_every)
                mean = (sums / steps).tolist()
                writer.writerow([iteration, *(round(v, 5) for v in mean), f"{schedule.get_last_lr()[0]:.3g}",
                                 round(rate, 2), round(elapsed_before + now - t0, 1)])
                log_file.flush()
                bar.set_postfix(loss=f"{mean[0]:.3f}", eps=f"{rate:.1f}/s")
                sums.zero_()
                window_t, window_n = now, 0
            if iteration % optim.checkpoint_every == 0 or iteration == optim.iterations:
                checkpoint(iteration, elapsed_before + time.perf_counter() - t0)
    finally:
        bar.close()
        log_file.close()
    return last
