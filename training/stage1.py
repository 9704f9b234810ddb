"""Stage 1: dense contrastive pre-training of the backbone (DenseCL, as REFERENCE.md describes).

A query encoder and a momentum key encoder see two augmented views of an image; a global
head and a dense head project their features; positives for the dense loss are matched on
the backbone's features, the loss is taken on the projections; two queues of past keys are
the negatives. The checkpoint is an ordinary napari-densemp checkpoint whose backbone is the
query encoder's (stage 2 loads it by name with ``--init-backbone``); heads, key encoder and
queues ride in its training state for exact resume.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from napari_densemp.atomic import write_atomically
from napari_densemp.io import is_nifti
from napari_densemp.network import DilatedResNet, FewShotSegmenter, NetworkConfig
from napari_densemp.preprocessing import PreprocessingProfile, detect_modality, window_intensities
from src_data.datasets import SCAN_FAULTS, ScanRecord, find_scans, load_scan
from src_data.splits import split_scans

from .loop import Distributed, OptimConfig, RunInfo, data_loader, resume_step, train

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --------------------------------------------------------------------------- images
class ContrastiveViews(torch.utils.data.Dataset):
    """Two augmented views of one image per index (a pure function of seed and index).

    Sources: 2D images (ROCO's radiology jpg/png, ImageNet-style class folders) and the
    slices of NIfTI scans, windowed as the model will see them and cached as float16.
    """

    def __init__(self, sources: list[Path], size: int = 224, seed: int = 0,
                 profile: PreprocessingProfile | None = None, cache_dir: Path | None = None,
                 hold_out: bool = True) -> None:
        self.size, self.seed = size, seed
        self.profile = profile or PreprocessingProfile()
        self.items: list[tuple[Path, int]] = []  # (file, slice or -1 for a 2D image)
        self.skipped: dict[str, str] = {}  # scan file -> why it was left out
        for source in sources:
            source = Path(source)
            if is_nifti(source):
                records = [ScanRecord(source.name.split(".")[0], source, None)]
            elif source.is_dir():
                # scan folders through the dataset records: HU offsets applied, labels skipped and
                # the project's benchmark patients held out, exactly as stage 2 reads them
                records = (split_scans(source)[0] if hold_out else find_scans(source))
                self.items += [(p, -1) for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
            else:
                records = []
                if source.suffix.lower() in IMAGE_SUFFIXES:
                    self.items.append((source, -1))
            for record in records:
                self.items += self._volume_slices(
                    record, cache_dir or (source if source.is_dir() else source.parent) / ".densemp-stage1")
        if not self.items:
            raise ValueError(f"no images or NIfTI scans found in {[str(s) for s in sources]}")

    def _volume_slices(self, record: ScanRecord, cache_dir: Path) -> list[tuple[Path, int]]:
        """Windowed slices (axis 2) of a scan, cached; near-empty slices (air) are skipped."""
        cached = cache_dir / (record.name + ".npy")
        if not cached.is_file():
            try:
                volume = load_scan(record).volume
            except SCAN_FAULTS as exc:
                log.warning("left out of stage 1: %s: %s", record.image, exc)
                self.skipped[str(record.image)] = str(exc)
                return []
            windowed = window_intensities(volume, detect_modality(volume), self.profile)
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cached, lambda tmp: np.save(tmp, np.moveaxis(windowed, 2, 0).astype(np.float16)),
                             suffix=".npy")
        slices = np.load(cached, mmap_mode="r")
        keep = [k for k in range(len(slices)) if float(np.mean(slices[k] > 0.05)) > 0.05]
        return [(cached, k) for k in keep]

    def __len__(self) -> int:
        return len(self.items)

    def image(self, item: int) -> torch.Tensor:
        path, k = self.items[item]
        if k >= 0:
            return torch.from_numpy(np.asarray(np.load(path, mmap_mode="r")[k], dtype=np.float32))
        from skimage import io

        image = io.imread(path, as_gray=True).astype(np.float32)
        return torch.from_numpy(image / max(float(image.max()), 1e-6) if image.max() > 1 else image)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        image = self.image(int(rng.integers(len(self.items))))
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return {"view1": contrastive_view(image, self.size, generator),
                "view2": contrastive_view(image, self.size, generator)}


def contrastive_view(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One view of an (H, W) image in [0, 1]: random resized crop (scale 0.2-1, ratio 3/4-4/3),
    horizontal flip, brightness/contrast jitter 0.4 at p 0.8, Gaussian blur sigma 0.1-2 at
    p 0.5; then z-scored like every slice the segmenter sees. Saturation, hue and grayscale
    conversion of the reference are no-ops on grayscale scans. Returns (1, size, size)."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    h, w = image.shape
    for _ in range(10):  # torchvision's rejection sampling of the crop box
        area = uniform(0.2, 1.0) * h * w
        ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = math.sqrt(area / ratio), math.sqrt(area * ratio)
        if ch <= h and cw <= w:
            break
    else:
        ch, cw = min(h, w), min(h, w)
    cy, cx = uniform(ch / 2, h - ch / 2), uniform(cw / 2, w - cw / 2)
    flip = -1.0 if uniform(0, 1) < 0.5 else 1.0
    theta = torch.tensor([[flip * cw / w, 0.0, 2 * cx / w - 1], [0.0, ch / h, 2 * cy / h - 1]])
    grid = F.affine_grid(theta[None], [1, 1, size, size], align_corners=False)
    view = F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    if uniform(0, 1) < 0.8:
        view = view * uniform(0.6, 1.4)
        mean = view.mean()
        view = (view - mean) * uniform(0.6, 1.4) + mean
    if uniform(0, 1) < 0.5:
        sigma = uniform(0.1, 2.0)
        radius = max(1, int(3 * sigma))
        kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        kernel = kernel / kernel.sum()
        view = F.conv2d(F.pad(view[None], (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        view = F.conv2d(F.pad(view, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))[0]
    return (view - view.mean()) / view.std().clamp_min(1e-6)


# --------------------------------------------------------------------------- the model
def match_locations(query_backbone: torch.Tensor, key_backbone: torch.Tensor) -> torch.Tensor:
    """For every query location, the key location whose backbone feature is most similar
    (cosine): (B, C, N) x (B, C, M) -> (B, N) indices."""
    q = F.normalize(query_backbone.float(), dim=1)
    k = F.normalize(key_backbone.float(), dim=1)
    return torch.einsum("bcn,bcm->bnm", q, k).argmax(dim=2)


def info_nce(positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) positive and (N, K) negative similarities -> mean InfoNCE loss."""
    logits = torch.cat([positive[:, None], negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


@dataclass
class DenseCLConfig:
    depth: int = 101
    last_layer: int = 4
    dim: int = 128
    queue: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    dense_weight: float = 0.5  # lambda; 0 gives the global-only (SimCLR/MoCo-style) baseline
    grid: int = 7  # the dense maps are pooled to the reference's 7 x 7 (its stride-32 map at 224)


class DenseCL(nn.Module):
    """Query/key encoders with global and dense heads; ``forward(view1, view2)`` is the loss."""

    def __init__(self, config: DenseCLConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or DenseCLConfig()
        self.backbone = DilatedResNet(cfg.depth, cfg.last_layer)
        channels = self.backbone.out_channels
        self.global_head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                         nn.Linear(channels, cfg.dim))
        self.dense_head = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(channels, cfg.dim, 1))
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_global_head = copy.deepcopy(self.global_head)
        self.key_dense_head = copy.deepcopy(self.dense_head)
        for p in self._key_parameters():
            p.requires_grad_(False)
        self.register_buffer("global_queue", F.normalize(torch.randn(cfg.queue, cfg.dim), dim=1))
        self.register_buffer("dense_queue", F.normalize(torch.randn(cfg.queue, cfg.dim), dim=1))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))

    def _key_parameters(self):
        for module in (self.key_backbone, self.key_global_head, self.key_dense_head):
            yield from module.parameters()

    def _query_parameters(self):
        for module in (self.backbone, self.global_head, self.dense_head):
            yield from module.parameters()

    def load_torchvision(self, weights: dict[str, torch.Tensor]) -> None:
        """ImageNet (or any torchvision-format) ResNet weights into both encoders, by name."""
        weights = {k.removeprefix("module."): v for k, v in weights.items() if not k.startswith("fc.")}
        missing, unexpected = self.backbone.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"--init weights do not fit ResNet-{self.config.depth}: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        self.key_backbone.load_state_dict(self.backbone.state_dict())

    def _encode(self, images: torch.Tensor, backbone: nn.Module, global_head: nn.Module, dense_head: nn.Module):
        features = backbone(images.expand(-1, 3, -1, -1))
        features = F.adaptive_avg_pool2d(features, self.config.grid)
        global_vector = F.normalize(global_head(features.mean(dim=(2, 3))).float(), dim=1)
        dense = F.normalize(dense_head(features).float().flatten(2), dim=1)  # (B, D, N)
        return features.flatten(2), global_vector, dense

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for q, k in zip(self._query_parameters(), self._key_parameters()):
            k.mul_(m).add_(q.detach(), alpha=1 - m)

    @torch.no_grad()
    def _keys(self, view: torch.Tensor):
        """Key features; under DDP the batch is shuffled across ranks so that batch-norm
        statistics cannot leak which key belongs to which query (MoCo's shuffled BN)."""
        if not (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            return self._encode(view, self.key_backbone, self.key_global_head, self.key_dense_head)
        world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
        everything = _gather(view)
        order = torch.randperm(len(everything), device=view.device)
        torch_dist.broadcast(order, 0)
        mine = order.view(world, -1)[rank]
        outputs = self._encode(everything[mine], self.key_backbone, self.key_global_head, self.key_dense_head)
        restore = torch.argsort(order).view(world, -1)[rank]
        return tuple(_gather(out)[restore] for out in outputs)

    @torch.no_grad()
    def _enqueue(self, global_keys: torch.Tensor, dense_keys: torch.Tensor) -> None:
        global_keys, dense_keys = _gather(global_keys), _gather(dense_keys)
        n = len(global_keys)
        at = int(self.queue_position)
        index = (torch.arange(n, device=global_keys.device) + at) % self.config.queue
        self.global_queue[index] = global_keys.to(self.global_queue.dtype)
        self.dense_queue[index] = dense_keys.to(self.dense_queue.dtype)
        self.queue_position.fill_((at + n) % self.config.queue)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        q_backbone, q_global, q_dense = self._encode(view1, self.backbone, self.global_head, self.dense_head)
        self._momentum_update()
        k_backbone, k_global, k_dense = self._keys(view2)
        positives = match_locations(q_backbone.detach(), k_backbone)  # (B, N)
        k_matched = torch.gather(k_dense, 2, positives[:, None].expand(-1, k_dense.shape[1], -1))
        # copies: the queues are updated in place below, before the backward pass needs them
        global_queue, dense_queue = self.global_queue.clone(), self.dense_queue.clone()
        global_loss = info_nce((q_global * k_global).sum(1), q_global @ global_queue.t(), cfg.temperature)
        dense_positive = (q_dense * k_matched).sum(1).flatten()  # (B * N,)
        dense_negative = torch.einsum("bdn,kd->bnk", q_dense, dense_queue).flatten(0, 1)
        dense_loss = info_nce(dense_positive, dense_negative, cfg.temperature)
        self._enqueue(k_global, F.normalize(k_dense.mean(dim=2), dim=1))
        loss = (1 - cfg.dense_weight) * global_loss + cfg.dense_weight * dense_loss
        return loss, {"global": float(global_loss.detach()), "dense": float(dense_loss.detach())}

    def segmenter(self, feature_dim: int = 256) -> FewShotSegmenter:
        """A segmenter whose backbone is this query encoder (what stage 2 starts from)."""
        model = FewShotSegmenter(NetworkConfig(depth=self.config.depth, last_layer=self.config.last_layer,
                                               feature_dim=feature_dim))
        model.backbone.load_state_dict(self.backbone.state_dict())
        return model


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    if not (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# --------------------------------------------------------------------------- the run
@dataclass
class Stage1Config:
    sources: list[Path] = field(default_factory=list)
    run_dir: Path = Path("runs/stage1")
    model: DenseCLConfig = field(default_factory=DenseCLConfig)
    profile: PreprocessingProfile = field(default_factory=PreprocessingProfile)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(schedule="cosine", weight_decay=1e-4))
    size: int = 224
    batch: int = 32  # per rank and micro-step
    init: Path | None = None  # torchvision-format ResNet weights (e.g. ImageNet)
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    hold_out: bool = True  # skip the project's benchmark patients in scan folders (src_data.splits)


def view_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last
    return (batch["view1"].to(device, non_blocking=True).contiguous(memory_format=fmt),
            batch["view2"].to(device, non_blocking=True).contiguous(memory_format=fmt))


def default_lr(global_batch: int) -> float:
    """The reference's 0.03 per 256 images."""
    return 0.03 * global_batch / 256


def run_stage1(config: Stage1Config, resume: bool = True) -> Path:
    dist = Distributed.setup(config.device)
    dataset = ContrastiveViews(config.sources, config.size, config.seed, config.profile,
                               cache_dir=config.run_dir / "slices", hold_out=config.hold_out)
    torch.manual_seed(config.seed)
    model = DenseCL(config.model)
    if config.init is not None:
        raw = torch.load(config.init, map_location="cpu", weights_only=True)
        model.load_torchvision(raw.get("state_dict", raw))
    start = resume_step(config.run_dir) if resume else 0
    loader = data_loader(dataset, start, config.batch, config.optim, dist, config.workers)
    global_batch = config.batch * config.optim.accumulate * dist.world
    info = RunInfo(stage="stage1", data=sorted({p.stem if k >= 0 else str(p.parent) for p, k in dataset.items}),
                   seed=config.seed, extra={"images": len(dataset), "skipped_scans": dataset.skipped,
                                            "global_batch": global_batch,
                                            "size": config.size, "init": str(config.init or ""),
                                            "dense_weight": config.model.dense_weight})
    log.info("stage 1 on %d images/slices, global batch %d", len(dataset), global_batch)
    return train(model, loader, view_inputs, lambda m: m.segmenter(), config.profile, config.optim,
                 config.run_dir, info, dist, resume=resume, part_names=("global", "dense"))
