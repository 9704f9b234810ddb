"""Stage 2: superpixel-guided self-supervised episodes (no labels used)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from napari_densemp.devices import pick_device
from napari_densemp.network import FewShotSegmenter, NetworkConfig
from napari_densemp.preprocessing import PreprocessingProfile
from src_data.datasets import PreparedScan, ScanRecord, find_scans, prepare_scan
from src_data.phantoms import write_cohort
from src_data.splits import split_scans

from .episodes import SuperpixelEpisodes
from .loop import LAST, OptimConfig, RunInfo, train_episodes

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


def prepare_all(records: Sequence[ScanRecord], profile: PreprocessingProfile, cache_dir: Path) -> list[PreparedScan]:
    return [prepare_scan(r, profile, cache_dir) for r in tqdm(records, desc="superpixels", unit="scan")]


def run_stage2(config: Stage2Config, resume: bool = True) -> Path:
    records = collect_scans(config)
    scans = prepare_all(records, config.profile, config.run_dir / "prepared")
    torch.manual_seed(config.seed)  # before building: the initial weights are part of the run
    model = FewShotSegmenter(config.network)
    last = config.run_dir / LAST
    start = 0
    if resume and last.is_file():
        from napari_densemp.checkpoint import load_checkpoint

        start = int(load_checkpoint(last).training["iteration"])
    dataset = SuperpixelEpisodes(scans, crop=config.crop, seed=config.seed, start=start * config.batch,
                                 excluded_classes=config.excluded_classes)
    pin = pick_device(config.device).type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch, num_workers=config.workers,
                                         pin_memory=pin, persistent_workers=config.workers > 0)
    info = RunInfo(stage="stage2", data=[r.name for r in records], seed=config.seed,
                   extra={"excluded_classes": config.excluded_classes, "episode_slices": len(dataset.slices),
                          "batch": config.batch})
    log.info("stage 2 on %d scans, %d usable slices", len(scans), len(dataset.slices))
    return train_episodes(model, loader, config.profile, config.optim, config.run_dir, info,
                          device=config.device, resume=resume)
