"""The one training loop of every stage: SGD with a step or cosine schedule, AMP, gradient
accumulation, DistributedDataParallel under ``torchrun``, rank-0 logging and atomic
checkpoints, and exact resume.

Data are addressed by a global item index (an episode or a view pair is a pure function of
the run's seed and its index), so any rank or worker can build any item, and a resumed or
re-sharded run sees exactly the items an uninterrupted one would: step ``t``, micro-step
``a``, rank ``r`` and position ``j`` read item ``((t * A + a) * W + r) * B + j``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
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
    """SGD and its schedule. Stage 2 and fine-tuning: lr x0.95 every 1000 steps (the
    reference); stage 1: cosine to 0. One step = ``accumulate`` micro-batches on every rank."""

    iterations: int = 100_000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step | cosine
    lr_step: int = 1000
    lr_gamma: float = 0.95
    accumulate: int = 1
    checkpoint_every: int = 500
    log_every: int = 25
    amp: str = "auto"  # auto | bf16 | fp16 | off
    stop_at: int | None = None  # checkpoint and stop at this step (a time-boxed job); rerun to go on


@dataclass
class RunInfo:
    stage: str
    data: list[str] = field(default_factory=list)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (a single process otherwise)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto") -> Distributed:
        """Join the process group that ``torchrun`` describes in the environment (NCCL on
        GPUs, gloo on CPUs); each rank takes the GPU of its local rank.

        More ranks than GPUs share them over gloo (NCCL takes one GPU per rank): one episode
        of a light network leaves a large GPU idle between kernel launches, so several ranks
        on one GPU train several times faster than one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=pick_device(device))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = pick_device(device)
        backend = "gloo"
        if dev.type == "cuda":
            gpus = torch.cuda.device_count()
            dev = torch.device("cuda", local % gpus)
            torch.cuda.set_device(dev)
            if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= gpus:
                backend = "nccl"
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend)
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), dev)


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast where the hardware has it (CPU AVX512-BF16/AMX, Ampere+ GPUs); fp16 with a
    gradient scaler on older GPUs."""
    if amp == "off":
        return nullcontext(), None
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    if amp == "bf16" or (amp == "auto" and cpu_has_fast_bf16()):
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return nullcontext(), None


class GlobalIndexSampler(torch.utils.data.Sampler):
    """Endless item indices of one rank from ``start_step`` on (see the module docstring)."""

    def __init__(self, start_step: int, batch: int, accumulate: int, rank: int = 0, world: int = 1) -> None:
        self.start_step, self.batch, self.accumulate = start_step, batch, accumulate
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[int]:
        micro = self.start_step * self.accumulate
        while True:
            first = (micro * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)
            micro += 1


def data_loader(dataset: torch.utils.data.Dataset, start_step: int, batch: int, optim: OptimConfig,
                dist: Distributed, workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches in global-index order for this rank, built by background workers, pinned for
    the GPU."""
    sampler = GlobalIndexSampler(start_step, batch, optim.accumulate, dist.rank, dist.world)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                       pin_memory=dist.device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None)


def resume_step(run_dir: str | Path) -> int:
    """The step a run restarts from (0 without a checkpoint)."""
    last = Path(run_dir) / LAST
    return int(load_checkpoint(last).training["iteration"]) if last.is_file() else 0


def _schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig):
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, optim.iterations) / optim.iterations)))
    return torch.optim.lr_scheduler.StepLR(optimizer, optim.lr_step, optim.lr_gamma)


def train(module: nn.Module, batches: Any, inputs: Callable[[dict, torch.device], tuple],
          export: Callable[[nn.Module], FewShotSegmenter], profile: PreprocessingProfile, optim: OptimConfig,
          run_dir: str | Path, info: RunInfo, dist: Distributed | None = None, resume: bool = True,
          part_names: tuple[str, ...] = ("query", "align")) -> Path:
    """Train ``module`` (its forward returns ``(loss, {part: float})``) and return the last checkpoint.

    Args:
        batches: an iterable of batches built for this rank from :func:`resume_step` on
            (:func:`data_loader`).
        inputs: turns a batch into ``module``'s forward arguments on the device.
        export: the segmenter the checkpoint carries (the module itself, or for stage 1 a
            segmenter around its backbone); the full module state (heads, key encoder,
            queues) is kept in the checkpoint's training state for resume.
    """
    dist = dist or Distributed(device=torch.device("cpu"))
    run_dir = Path(run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dev = dist.device
    module.to(dev).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=optim.lr,
                                momentum=optim.momentum, weight_decay=optim.weight_decay)
    schedule = _schedule(optimizer, optim)
    start, elapsed_before = 0, 0.0
    last = run_dir / LAST
    if resume and last.is_file():
        state = load_checkpoint(last)
        module.load_state_dict(state.training.get("module") or state.state_dict)
        optimizer.load_state_dict(state.training["optimizer"])
        schedule.load_state_dict(state.training["schedule"])
        torch.set_rng_state(state.training["torch_rng"])
        start = int(state.training["iteration"])
        elapsed_before = float(state.training.get("elapsed_s", 0.0))
        log.info("resumed %s at step %d", last, start)
    model = module
    if dist.world > 1:
        # batch-norm statistics stay rank-local (rank 0's are saved), as with one GPU per episode
        model = nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast, scaler = autocast_for(dev, optim.amp)
    writer, log_file = _open_log(run_dir / "log.csv", start, part_names) if dist.is_main else (None, None)

    def checkpoint(iteration: int, elapsed: float) -> None:
        provenance = {"stage": info.stage, "data": info.data, "iterations": iteration, "seed": info.seed,
                      "code_version": __version__, "device": str(dev), "world_size": dist.world,
                      "amp": optim.amp, "wall_time_s": round(elapsed, 1), "optim": asdict(optim), **info.extra}
        training = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "torch_rng": torch.get_rng_state(), "iteration": iteration, "elapsed_s": elapsed}
        segmenter = export(module)
        if segmenter is not module:
            training["module"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        save_checkpoint(last, segmenter, profile, provenance=provenance, training=training)

    iteration = start
    t0 = window_t = time.perf_counter()
    window_items = 0
    sums = torch.zeros(1 + len(part_names))
    bar = tqdm(total=optim.iterations, initial=start, desc=info.stage, unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    stream = iter(batches)
    try:
        end = min(optim.iterations, optim.stop_at or optim.iterations)
        while iteration < end:
            optimizer.zero_grad(set_to_none=True)
            for micro in range(optim.accumulate):
                batch = next(stream)
                args = inputs(batch, dev)
                sync = nullcontext() if (dist.world == 1 or micro == optim.accumulate - 1) else model.no_sync()
                with sync:
                    with autocast:
                        loss, parts = model(*args)
                    scaled = loss / optim.accumulate
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                window_items += args[0].shape[0] * dist.world
                sums += torch.tensor([float(loss.detach()), *(parts[n] for n in part_names)]) / optim.accumulate
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            schedule.step()
            iteration += 1
            bar.update(1)
            if writer is not None and (iteration % optim.log_every == 0 or iteration == end):
                now = time.perf_counter()
                rate = window_items / max(now - window_t, 1e-9)
                steps = optim.log_every if iteration % optim.log_every == 0 else max(1, iteration % optim.log_every)
                mean = (sums / steps).tolist()
                writer.writerow([iteration, *(round(v, 5) for v in mean), f"{schedule.get_last_lr()[0]:.3g}",
                                 round(rate, 2), round(elapsed_before + now - t0, 1)])
                log_file.flush()
                bar.set_postfix(loss=f"{mean[0]:.3f}", items=f"{rate:.1f}/s")
                sums.zero_()
                window_t, window_items = now, 0
            if dist.is_main and (iteration % optim.checkpoint_every == 0 or iteration == end):
                checkpoint(iteration, elapsed_before + time.perf_counter() - t0)
    except KeyboardInterrupt:
        # Ctrl-C, or a scheduler's SIGTERM (the CLI turns it into this), keeps every finished step
        if dist.is_main and iteration > start:
            checkpoint(iteration, elapsed_before + time.perf_counter() - t0)
            log.warning("interrupted: checkpoint written at step %d", iteration)
        raise
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if dist.world > 1:
        torch_dist.barrier()
    return last


def _open_log(path: Path, start: int, part_names: tuple[str, ...]):
    """The CSV log, without the rows logged after the checkpoint a resumed run starts from."""
    kept_rows = []
    if start > 0 and path.exists():
        with open(path, newline="") as old:
            kept_rows = [row for row in list(csv.reader(old))[1:] if row and int(row[0]) <= start]
    log_file = open(path, "w", newline="")  # noqa: SIM115 - the loop closes it
    writer = csv.writer(log_file)
    writer.writerow(["iteration", "loss", *(f"{n}_loss" for n in part_names), "lr", "items_per_s", "elapsed_s"])
    writer.writerows(kept_rows)
    return writer, log_file
