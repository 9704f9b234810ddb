"""Fine-tuning (DenseMP's addition): the stage-2 model, lr 1e-4, a mix of labelled episodes
(p 0.25) and superpixel episodes (p 0.75).

A labelled episode: the query is an augmented slice of a training scan holding the current
training class, binarised to it; the support is the un-augmented slice of one fixed training
scan picked by the 3-chunk rule (the query slice's chunk of its organ picks the matching
chunk centre of the support's organ). Setting 2 drops every slice holding a test class from
both kinds.

``in_volume`` (ours, not the paper's; 0 reproduces it) makes that share of the labelled
episodes the product's own job: support and query from the same scan, the support a slice of
large organ area, the query any organ slice or one of the ``margin`` slices past either end
(where the organ is absent and the right answer is "nothing"), so the network learns to follow
a structure through a volume and to be unsure where it has ended.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_densemp.checkpoint import load_checkpoint
from napari_densemp.engine import chunk_centres
from src_data.datasets import PreparedScan

from .augment import AugmentConfig, augment, mirror_episode
from .episodes import SuperpixelEpisodes, crop_or_pad
from .loop import Distributed, OptimConfig, RunInfo, data_loader, resume_step, train
from .stage2 import Stage2Config, collect_scans, episode_inputs, prepare_all

log = logging.getLogger(__name__)


class FinetuneEpisodes(torch.utils.data.Dataset):
    """Labelled (p ``labelled``) or superpixel episodes, addressed by index like stage 2's."""

    def __init__(self, scans: Sequence[PreparedScan], crop: int = 256, seed: int = 0,
                 excluded_classes: Sequence[int] = (), labelled: float = 0.25, chunks: int = 3,
                 augment_config: AugmentConfig | None = None, groups: Sequence[str] | None = None,
                 hidden_classes: Sequence[int] = (), in_volume: float = 0.0, margin: int = 3,
                 mirror: bool = False) -> None:
        """``groups``: the data set of each scan; label values name a class only within a group
        (CHAOS' 1 is the liver, OpenKBP's the brainstem). ``hidden_classes`` (the test classes)
        are never labelled episodes; their slices stay unless ``excluded_classes`` drops them."""
        self.superpixel = SuperpixelEpisodes(scans, crop, seed, excluded_classes, augment_config, mirror)
        self.mirror = mirror
        self.scans, self.crop, self.seed, self.labelled, self.chunks = list(scans), crop, seed, labelled, chunks
        self.in_volume = in_volume
        self.augment_config = augment_config or AugmentConfig()
        excluded = list(excluded_classes)
        groups = list(groups) if groups is not None else [""] * len(self.scans)
        self._organ: dict[tuple, list[int]] = {}  # (class, query scan) -> its organ slices
        self.queries: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self.supports: dict[tuple[str, int], tuple[int, list[int]]] = {}  # class -> (fixed scan, organ slices)
        self.volumes: dict[tuple[str, int], list[tuple[int, list[int], list[int]]]] = {}  # in-volume episodes:
        # class -> [(scan, its large-area organ slices (supports), organ slices + margin (queries))]
        for s, scan in enumerate(self.scans):
            if scan.label is None:
                continue
            flat = scan.label.reshape(len(scan.label), -1)
            allowed = ~np.isin(flat, excluded).any(axis=1) if excluded else np.ones(len(flat), bool)
            for value in np.unique(flat):
                if int(value) == 0 or int(value) in excluded or int(value) in hidden_classes:
                    continue
                c = (groups[s], int(value))
                organ = [int(z) for z in np.flatnonzero((flat == c[1]).any(axis=1) & allowed)]
                if not organ:
                    continue
                area = (flat[organ] == c[1]).sum(axis=1)
                large = [z for z, a in zip(organ, area) if a >= 0.5 * area.max()]
                reach = range(max(organ[0] - margin, 0), min(organ[-1] + margin + 1, len(flat)))
                self.volumes.setdefault(c, []).append((s, large, [z for z in reach if allowed[z]]))
                if c not in self.supports:
                    self.supports[c] = (s, organ)  # the first scan holding the class is its fixed support
                else:
                    self.queries.setdefault(c, []).extend((s, z) for z in organ)
                    self._organ[(c, s)] = organ
        self.classes = sorted(c for c in self.queries if c in self.supports)
        if labelled > 0 and not self.classes:
            raise ValueError("fine-tuning needs at least two labelled training scans sharing a class")

    def __len__(self) -> int:
        return len(self.superpixel.slices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.episode(int(index))

    def episode(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index, 7])
        if rng.random() >= self.labelled:
            return {**self.superpixel.episode(index), "labelled": torch.tensor(False)}
        c = self.classes[rng.integers(len(self.classes))]
        if self.in_volume > 0 and rng.random() < self.in_volume:
            return self._in_volume_episode(c, rng, index)
        value = c[1]
        scan_i, z = self.queries[c][rng.integers(len(self.queries[c]))]
        query_scan = self.scans[scan_i]
        organ = self._organ[(c, scan_i)]
        chunk = min(int(self.chunks * organ.index(z) / len(organ)), self.chunks - 1)
        support_i, support_organ = self.supports[c]
        centres = chunk_centres(support_organ, self.chunks)
        support_z = centres[min(chunk, len(centres) - 1)]
        support_scan = self.scans[support_i]
        s_mask = (support_scan.label[support_z] == value).astype(np.uint8)
        q_mask = (query_scan.label[z] == value).astype(np.uint8)
        s_image, s_mask = crop_or_pad(support_scan.image[support_z].astype(np.float32), s_mask,
                                      _centre(s_mask), self.crop, rng)
        q_image, q_mask = crop_or_pad(query_scan.image[z].astype(np.float32), q_mask, _centre(q_mask), self.crop, rng)
        return self._labelled(s_image, s_mask, q_image, q_mask, rng, index)

    def _in_volume_episode(self, c: tuple[str, int], rng: np.random.Generator, index: int) -> dict[str, torch.Tensor]:
        """Support and query from one scan, cut from the same window (their positions agree)."""
        scan_i, supports, queries = self.volumes[c][rng.integers(len(self.volumes[c]))]
        scan = self.scans[scan_i]
        support_z = supports[rng.integers(len(supports))]
        z = queries[rng.integers(len(queries))]
        s_mask = (scan.label[support_z] == c[1]).astype(np.uint8)
        q_mask = (scan.label[z] == c[1]).astype(np.uint8)
        centre, window_seed = _centre(s_mask), int(rng.integers(2**62))
        s_image, s_mask = crop_or_pad(scan.image[support_z].astype(np.float32), s_mask, centre, self.crop,
                                      np.random.default_rng(window_seed))
        q_image, q_mask = crop_or_pad(scan.image[z].astype(np.float32), q_mask, centre, self.crop,
                                      np.random.default_rng(window_seed))
        return self._labelled(s_image, s_mask, q_image, q_mask, rng, index)

    def _labelled(self, s_image: np.ndarray, s_mask: np.ndarray, q_image: np.ndarray, q_mask: np.ndarray,
                  rng: np.random.Generator, index: int) -> dict[str, torch.Tensor]:
        """The episode's tensors; the query augmented as in the reference."""
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        q_images, q_masks = augment(torch.from_numpy(q_image)[None, None], torch.from_numpy(q_mask)[None],
                                    self.augment_config, generator)
        episode = {"support_image": torch.from_numpy(s_image)[None], "support_mask": torch.from_numpy(s_mask).long(),
                   "query_image": q_images[0], "query_label": q_masks[0].long(), "index": torch.tensor(index),
                   "labelled": torch.tensor(True)}
        return mirror_episode(episode, rng) if self.mirror else episode


def _centre(mask: np.ndarray) -> tuple[float, float]:
    return tuple(float(v.mean()) for v in np.nonzero(mask))


@dataclass
class FinetuneConfig:
    stage2: Path = Path("runs/stage2/last.pt")  # the checkpoint fine-tuning starts from
    data: Stage2Config = field(default_factory=Stage2Config)  # scans (with labels), split, crop, workers
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(iterations=5100, lr=1e-4))
    labelled: float = 0.25
    in_volume: float = 0.0  # share of labelled episodes that pair two slices of one scan (0: the paper)


def run_finetune(config: FinetuneConfig, resume: bool = True) -> Path:
    dist = Distributed.setup(config.data.device)
    start_from = load_checkpoint(config.stage2)
    model = start_from.build_model()
    prepared = prepare_all(collect_scans(config.data), start_from.preprocessing, config.data.prepared_dir,
                           config.data.workers, dist)
    dataset = FinetuneEpisodes(prepared.scans, config.data.crop, config.data.seed, config.data.excluded_classes,
                               config.labelled, groups=[str(r.image.parent) for r in prepared.records],
                               hidden_classes=config.data.hidden_classes, in_volume=config.in_volume,
                               mirror=config.data.mirror)
    start = resume_step(config.data.run_dir) if resume else 0
    loader = data_loader(dataset, start, config.data.batch, config.optim, dist, config.data.workers)
    info = RunInfo(stage="finetune", data=[r.name for r in prepared.records], seed=config.data.seed,
                   extra={"skipped_scans": prepared.skipped, "from": str(config.stage2),
                          "from_provenance": start_from.provenance,
                          "classes": [f"{Path(g).name}:{v}" for g, v in dataset.classes],
                          "labelled_p": config.labelled, "in_volume_p": config.in_volume,
                          "mirror": config.data.mirror,
                          "excluded_classes": config.data.excluded_classes,
                          "support_scans": {f"{Path(g).name}:{v}": dataset.scans[s].name
                                            for (g, v), (s, _) in dataset.supports.items()}})
    log.info("fine-tuning on %d scans, classes %s", len(prepared.scans), dataset.classes)
    return train(model, loader, episode_inputs, lambda m: m, prepared.profile, config.optim,
                 config.data.run_dir, info, dist, resume=resume)
