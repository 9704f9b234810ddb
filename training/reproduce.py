"""``densemp-train reproduce``: train what each fold needs and write the paper's tables.

For each setting, fold and (label group of test classes): stage 2 on the training scans (the
fold's test scans and its support scan never seen; setting 2 also drops every slice holding a
test class), fine-tuning with the other group's labels, then both protocols on the fold.
Checkpoints are chosen without looking at test scans: the last one of a fixed schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from napari_densemp.engine import load_model
from napari_densemp.network import NetworkConfig
from src_data.datasets import find_scans
from src_data.phantoms import write_cohort

from .evaluate import LABEL_GROUPS, ORGAN_NAMES, Row, evaluate, make_folds, markdown_table, write_reports
from .finetune import FinetuneConfig, run_finetune
from .loop import OptimConfig
from .stage2 import Stage2Config, run_stage2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    modality: str  # ct | mri: fold boundaries, label groups, organ names
    network: NetworkConfig
    stage2_iterations: int
    finetune_iterations: int
    crop: int = 256
    folds: int = 5
    settings: tuple[int, ...] = (1, 2)
    phantoms: int = 0  # CT phantoms as the data (the CI-sized run)
    batch: int = 1


PRESETS = {
    "paper-ct": Preset("ct", NetworkConfig(depth=101, last_layer=4), 100_000, 5100),
    "paper-mri": Preset("mri", NetworkConfig(depth=101, last_layer=4), 100_000, 5100),
    # 20 trainings (2 settings x 2 label groups x 5 folds) sized for about an hour on 2 CPU cores
    "cpu-chaos": Preset("mri", NetworkConfig(depth=18, last_layer=3), 600, 150),
    "cpu-phantoms": Preset("ct", NetworkConfig(depth=18, last_layer=3, feature_dim=32), 6, 4, crop=64, folds=2,
                           phantoms=6),
}


def reproduce(preset: Preset, out_dir: str | Path, data_dir: str | Path | None = None, device: str = "auto",
              amp: str = "auto", workers: int = 0) -> dict[int, list[Row]]:
    """Every fold of every setting; returns the rows and writes ``setting{S}/table.md`` etc."""
    out_dir = Path(out_dir)
    if preset.phantoms:
        data_dir = out_dir / "phantoms"
        write_cohort(data_dir, preset.phantoms, "ct", first_seed=500)
    if data_dir is None:
        raise ValueError("this preset needs --data: a folder of prepared scans with labels")
    records = [r for r in find_scans(data_dir) if r.label is not None]
    folds = make_folds(records, preset.folds)
    groups = LABEL_GROUPS[preset.modality]
    names = ORGAN_NAMES[preset.modality]
    results = {}
    for setting in preset.settings:
        rows: list[Row] = []
        for test_group, test_classes in groups.items():
            trained = {}
            for k, (test, support) in enumerate(folds):
                run = out_dir / f"setting{setting}" / f"test-{test_group}" / f"fold{k}"
                base = Stage2Config(
                    data_dirs=[Path(data_dir)], run_dir=run / "stage2", network=preset.network, hold_out=False,
                    exclude=[r.name for r in [*test, support]], crop=preset.crop, batch=preset.batch,
                    excluded_classes=list(test_classes) if setting == 2 else [], hidden_classes=list(test_classes),
                    device=device, workers=workers, cache_dir=out_dir / "prepared",
                    optim=OptimConfig(iterations=preset.stage2_iterations, amp=amp,
                                      checkpoint_every=max(1, min(500, preset.stage2_iterations)),
                                      log_every=max(1, min(25, preset.stage2_iterations))))
                stage2 = run_stage2(base)
                tuned = run_finetune(FinetuneConfig(
                    stage2=stage2, data=replace(base, run_dir=run / "finetune"),
                    optim=OptimConfig(iterations=preset.finetune_iterations, lr=1e-4, amp=amp,
                                      checkpoint_every=max(1, min(500, preset.finetune_iterations)),
                                      log_every=max(1, min(25, preset.finetune_iterations)))))
                trained[k] = tuned
            rows += evaluate(data_dir, lambda k, t=trained: load_model(t[k], device), list(test_classes),
                             folds=preset.folds)
        title = (f"Setting {setting}, {preset.modality.upper()}, {len(folds)} folds, checkpoints: the last of a fixed "
                 f"schedule ({preset.stage2_iterations} stage-2 + {preset.finetune_iterations} fine-tuning steps)")
        write_reports(rows, out_dir / f"setting{setting}", names, title)
        print(markdown_table(rows, names, title))
        results[setting] = rows
    return results
