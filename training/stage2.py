"""Stage 2: superpixel-guided self-supervised episodes (no labels used)."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from napari_densemp.network import FewShotSegmenter, NetworkConfig
from napari_densemp.preprocessing import PreprocessingProfile
from src_data.datasets import (
    SCAN_FAULTS,
    PreparedScan,
    ScanRecord,
    find_scans,
    prepare_scan,
    show_in_orientation,
)
from src_data.phantoms import write_cohort
from src_data.splits import split_scans

from .episodes import SuperpixelEpisodes
from .loop import Distributed, OptimConfig, RunInfo, data_loader, resume_step, train

log = logging.getLogger(__name__)


@dataclass
class Stage2Config:
    data_dirs: list[Path] = field(default_factory=list)
    run_dir: Path = Path("runs/stage2")
    network: NetworkConfig = field(default_factory=NetworkConfig)
    profile: PreprocessingProfile = field(default_factory=PreprocessingProfile)
    optim: OptimConfig = field(default_factory=OptimConfig)
    phantoms: int = 0  # CT and MRI phantoms each, added to the data
    exclude: list[str] = field(default_factory=list)  # scan-name globs never trained on
    hold_out: bool = True  # drop the project's benchmark patients (src_data.splits)
    excluded_classes: list[int] = field(default_factory=list)  # setting 2
    crop: int = 256
    seed: int = 0
    batch: int = 1
    workers: int = 0
    device: str = "auto"
    init_backbone: Path | None = None  # stage-1 export or torchvision ResNet weights
    cache_dir: Path | None = None  # prepared scans (superpixels); default: the run folder's
    hidden_classes: list[int] = field(default_factory=list)  # fine-tuning: never a labelled class (test classes)
    mirror: bool = False  # episodes flipped in-plane at random (ours; the reference has no flips)

    @property
    def prepared_dir(self) -> Path:
        return self.cache_dir or self.run_dir / "prepared"


def collect_scans(config: Stage2Config) -> list[ScanRecord]:
    records: list[ScanRecord] = []
    for data_dir in config.data_dirs:
        seen, held = split_scans(data_dir) if config.hold_out else (find_scans(data_dir), [])
        if held:
            log.info("%s: holding out %s", data_dir, ", ".join(r.name for r in held))
        records += seen
    if config.phantoms:
        cohort = config.run_dir / "phantoms"
        for modality, first in (("ct", 1000), ("mri", 2000)):
            write_cohort(cohort, config.phantoms, modality, first_seed=first)
        records += find_scans(cohort)
    records = [r for r in records if not any(fnmatch.fnmatch(r.name, p) for p in config.exclude)]
    if not records:
        raise ValueError("no training scans: give --data folders or --phantoms")
    return records


@dataclass
class TrainingScans:
    """The scans a run trains on, prepared, and the ones it had to leave out."""

    records: list[ScanRecord]  # those that could be used, in the order given
    scans: list[PreparedScan]  # one per record, shown in the profile's orientations
    profile: PreprocessingProfile
    skipped: dict[str, str] = field(default_factory=dict)  # scan file -> why it was left out


def _prepare_into_cache(record: ScanRecord, profile: PreprocessingProfile, cache_dir: Path) -> None:
    torch.set_num_threads(1)  # one process per core
    with contextlib.suppress(SCAN_FAULTS):  # named by the pass over all scans, which meets it again
        prepare_scan(record, profile, cache_dir)


def prepare_all(records: Sequence[ScanRecord], profile: PreprocessingProfile, cache_dir: Path,
                workers: int = 0, dist: Distributed | None = None) -> TrainingScans:
    """Every scan preprocessed (cached) and shown in one orientation per modality; the profile
    returned records it (see :func:`src_data.datasets.show_in_orientation`).

    A scan that cannot be read or fails its checks (NaN, not 3D, a label of another shape) is
    left out with a warning naming it and why, so one bad file in hundreds does not stop a
    run; the run's provenance lists it. Only a run left with no scan stops.

    Superpixels are single-threaded (about 16 s for a head-and-neck CT on the 1.25 mm grid on
    one core, 4 s for a CHAOS MRI), so the cache is filled in parallel: under ``torchrun`` each rank prepares its
    share of the scans, each with ``workers`` processes, and every rank then reads them all
    from the cache."""
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    mine = list(records)[rank::world]
    if world > 1 or (workers > 1 and len(mine) > 1):
        if workers > 1 and len(mine) > 1:
            # spawned, not forked: a fork of a process whose torch/OpenMP threads run can deadlock
            with ProcessPoolExecutor(min(workers, len(mine)), mp_context=multiprocessing.get_context("spawn")) as pool:
                jobs = pool.map(_prepare_into_cache, mine, repeat(profile), repeat(cache_dir))
                for _ in tqdm(jobs, total=len(mine), desc="superpixels", unit="scan", disable=rank > 0):
                    pass
        else:
            for record in tqdm(mine, desc="superpixels", unit="scan", disable=rank > 0):
                _prepare_into_cache(record, profile, cache_dir)
        if world > 1:
            torch_dist.barrier()
    kept, scans, skipped = [], [], {}
    for record in tqdm(records, desc="superpixels", unit="scan", disable=rank > 0):
        try:
            scans.append(prepare_scan(record, profile, cache_dir))
            kept.append(record)
        except SCAN_FAULTS as exc:
            skipped[str(record.image)] = str(exc)
            if rank == 0:
                log.warning("left out of training: %s: %s", record.image, exc)
    if not scans:
        raise ValueError(f"none of the {len(records)} training scans can be used: "
                         + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    shown, profile = show_in_orientation(kept, scans, profile)
    return TrainingScans(kept, shown, profile, skipped)


def episode_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    """An episode batch as FewShotSegmenter's forward arguments on ``device``."""
    fmt = torch.channels_last
    return (batch["support_image"].to(device, non_blocking=True).contiguous(memory_format=fmt),
            batch["support_mask"].to(device, non_blocking=True),
            batch["query_image"].to(device, non_blocking=True).contiguous(memory_format=fmt),
            batch["query_label"].to(device, non_blocking=True))


def load_backbone(model: FewShotSegmenter, path: str | Path) -> None:
    """Backbone weights by torchvision name from a stage-1 export, a napari-densemp checkpoint
    or a torchvision ResNet file; heads (``fc``) are ignored, any other mismatch is an error."""
    from napari_densemp.checkpoint import load_checkpoint
    from napari_densemp.errors import DenseMPError

    path = Path(path)
    try:
        weights = {k.removeprefix("backbone."): v for k, v in load_checkpoint(path).state_dict.items()
                   if k.startswith("backbone.")}
    except DenseMPError:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        weights = {k.removeprefix("module."): v for k, v in raw.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise DenseMPError(f"{path} does not fit the backbone ({model.config.depth}, last layer "
                           f"{model.config.last_layer}): missing {missing[:4]}, unexpected {unexpected[:4]}")


def run_stage2(config: Stage2Config, resume: bool = True) -> Path:
    dist = Distributed.setup(config.device)
    prepared = prepare_all(collect_scans(config), config.profile, config.prepared_dir, config.workers, dist)
    torch.manual_seed(config.seed)  # before building: the initial weights are part of the run
    model = FewShotSegmenter(config.network)
    if config.init_backbone is not None:
        load_backbone(model, config.init_backbone)
    start = resume_step(config.run_dir) if resume else 0
    dataset = SuperpixelEpisodes(prepared.scans, crop=config.crop, seed=config.seed,
                                 excluded_classes=config.excluded_classes, mirror=config.mirror)
    loader = data_loader(dataset, start, config.batch, config.optim, dist, config.workers)
    info = RunInfo(stage="stage2", data=[r.name for r in prepared.records], seed=config.seed,
                   extra={"skipped_scans": prepared.skipped, "excluded_classes": config.excluded_classes,
                          "episode_slices": len(dataset.slices),
                          "batch": config.batch, "init_backbone": str(config.init_backbone or ""),
                          "mirror": config.mirror})
    log.info("stage 2 on %d scans, %d usable slices", len(prepared.scans), len(dataset.slices))
    return train(model, loader, episode_inputs, lambda m: m, prepared.profile, config.optim, config.run_dir, info,
                 dist, resume=resume)
