"""The DenseMP few-shot network: a dilated ResNet encoder and the ALP (adaptive local
prototype) head of SSL-ALPNet, written from ../shared/REFERENCE.md.

One definition serves inference, training and benchmarks. Parameter names of the backbone
follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` .. ``layer4``) so ImageNet or
stage-1 weights load by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255
BLOCKS_PER_DEPTH = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class NetworkConfig:
    """Every architectural and head hyper-parameter; recorded in each checkpoint."""

    depth: int = 101
    last_layer: int = 4  # 3 cuts the ResNet after layer3 (light, fast models)
    feature_dim: int = 256  # channels after the 1x1 reduction
    train_window: int = 4  # local-prototype pooling window during training
    inference_window: int = 2  # ... and at inference
    small_structure_window: int = 4  # the reference decides "too small for locals" with 4x4
    coverage: float = 0.95  # pooled-mask value a cell needs to become a local prototype
    scale: float = 20.0  # cosine similarity multiplier
    local_prototypes: bool = True  # False gives vanilla PA-Net (one global prototype/class)
    fg_weight: float = 1.0
    bg_weight: float = 0.05
    align_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.depth not in BLOCKS_PER_DEPTH:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS_PER_DEPTH)}, got {self.depth}")
        if self.last_layer not in (3, 4):
            raise ValueError(f"last_layer must be 3 or 4, got {self.last_layer}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- backbone
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 first_dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=first_dilation,
                               dilation=first_dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 first_dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=first_dilation,
                               dilation=first_dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """ResNet whose layer3 and layer4 trade their stride for dilation (output stride 8)."""

    def __init__(self, depth: int = 101, last_layer: int = 4) -> None:
        super().__init__()
        block = BasicBlock if depth in (18, 34) else Bottleneck
        counts = BLOCKS_PER_DEPTH[depth]
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, counts[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(block, 128, counts[1], stride=2, dilate=False)
        self.layer3 = self._make_layer(block, 256, counts[2], stride=2, dilate=True)
        self.layer4 = (self._make_layer(block, 512, counts[3], stride=2, dilate=True)
                       if last_layer == 4 else None)
        self.out_channels = self.inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int,
                    dilate: bool) -> nn.Sequential:
        first_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, self.dilation, first_dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, self.dilation, self.dilation, None)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x if self.layer4 is None else self.layer4(x)


# --------------------------------------------------------------------------- ALP head
def _safe_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-8)


def masked_average(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global prototype: sum(f * m) / (sum(m) + 1e-5) for features (C,h,w) and mask (h,w)."""
    return (features * mask).sum(dim=(1, 2)) / (mask.sum() + 1e-5)


def _local_prototypes(features: torch.Tensor, mask: torch.Tensor, window: int,
                      coverage: float) -> torch.Tensor:
    """Window-pooled features of the cells whose pooled mask exceeds ``coverage``: (N, C)."""
    pooled_mask = F.avg_pool2d(mask[None, None], window, window)[0, 0]
    keep = pooled_mask > coverage
    if not bool(keep.any()):
        return features.new_zeros((0, features.shape[0]))
    pooled = F.avg_pool2d(features[None], window, window)[0]
    return pooled[:, keep].t()


def _has_local_cell(mask: torch.Tensor, window: int, coverage: float) -> bool:
    if min(mask.shape) < window:
        return False
    return bool((F.avg_pool2d(mask[None, None], window, window) > coverage).any())


def support_prototypes(features: torch.Tensor, mask: torch.Tensor, window: int,
                       config: NetworkConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background prototypes of one support slice.

    Args:
        features: support features (C, h, w).
        mask: soft foreground mask on the feature grid (h, w), values in [0, 1].
        window: pooling window for local prototypes (4 in training, 2 at inference).
    Returns:
        (fg (Nf, C), bg (Nb, C)). fg = local fg cells + the global fg prototype, or the
        global one alone when no ``small_structure_window`` cell is covered (small
        structures). bg = local bg cells, or the global bg prototype when there are none
        (the reference crashes there).
    """
    features = features.float()
    mask = mask.float()
    fg_global = masked_average(features, mask)[None]
    if config.local_prototypes and _has_local_cell(mask, config.small_structure_window, config.coverage):
        fg = torch.cat([_local_prototypes(features, mask, window, config.coverage), fg_global])
    else:
        fg = fg_global
    bg = (_local_prototypes(features, 1.0 - mask, window, config.coverage)
          if config.local_prototypes else features.new_zeros((0, features.shape[0])))
    if bg.shape[0] == 0:
        bg = masked_average(features, 1.0 - mask)[None]
    return fg, bg


def class_score(query: torch.Tensor, prototypes: torch.Tensor, scale: float,
                normalized: bool = False) -> torch.Tensor:
    """Softmax-weighted similarity of every query location to a class's prototypes.

    query (B, C, h, w), prototypes (N, C) -> (B, h, w): sum_k softmax_k(s) * s_k with
    s_k = scale * cos(query, prototype_k). ``normalized``: both already have unit length
    (the engine normalises once per volume, not once per slice).
    """
    q = query.float() if normalized else _safe_normalize(query.float(), dim=1)
    p = prototypes.float() if normalized else _safe_normalize(prototypes.float(), dim=1)
    sims = scale * torch.einsum("bchw,nc->bnhw", q, p)
    return (torch.softmax(sims, dim=1) * sims).sum(dim=1)


def head_logits(query: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, scale: float,
                normalized: bool = False) -> torch.Tensor:
    """[bg, fg] logits (B, 2, h, w) on the feature grid."""
    return torch.stack([class_score(query, bg, scale, normalized), class_score(query, fg, scale, normalized)], dim=1)


def unit_length(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Vectors scaled to unit length along ``dim`` (zero vectors stay zero)."""
    return _safe_normalize(x.float(), dim)


# --------------------------------------------------------------------------- the model
class FewShotSegmenter(nn.Module):
    """Encoder + 1x1 reduction + ALP head: 1-way few-shot segmentation of 2D slices."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetworkConfig()
        self.backbone = DilatedResNet(self.config.depth, self.config.last_layer)
        self.reduction = nn.Conv2d(self.backbone.out_channels, self.config.feature_dim, 1, bias=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, C, H/8, W/8) of z-scored slices (B, 1 or 3, H, W)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.reduction(self.backbone(images))

    def predict_logits(self, query_features: torch.Tensor, support_features: torch.Tensor,
                       support_mask: torch.Tensor, window: int) -> torch.Tensor:
        """Logits (B, 2, h, w) of query features given one support (C, h', w') and its
        image-resolution mask (H', W')."""
        soft = resize_mask(support_mask, support_features.shape[-2:])
        fg, bg = support_prototypes(support_features, soft, window, self.config)
        return head_logits(query_features, fg, bg, self.config.scale)

    def forward(self, support_image: torch.Tensor, support_mask: torch.Tensor, query_image: torch.Tensor,
                query_label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training forward (what DistributedDataParallel wraps): :meth:`episode_loss`."""
        return self.episode_loss(support_image, support_mask, query_image, query_label)

    def episode_loss(self, support_image: torch.Tensor, support_mask: torch.Tensor,
                     query_image: torch.Tensor, query_label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of a batch of independent 1-way 1-shot 1-query episodes.

        Args:
            support_image, query_image: (B, 1, H, W) z-scored slices.
            support_mask: (B, H, W) binary foreground (255 = ignore).
            query_label: (B, H, W) binary labels (255 = ignore).
        Returns:
            total loss, and {"query": ..., "align": ...} as floats for logging.
        """
        cfg = self.config
        features = self.embed(torch.cat([support_image, query_image]))
        batch = support_image.shape[0]
        support_features, query_features = features[:batch], features[batch:]
        size = query_image.shape[-2:]
        weights = torch.tensor([cfg.bg_weight, cfg.fg_weight], device=features.device)
        query_loss = features.new_zeros((), dtype=torch.float32)
        align_loss = features.new_zeros((), dtype=torch.float32)
        for i in range(batch):
            s_mask = (support_mask[i] == 1).float()
            logits = self.predict_logits(query_features[i:i + 1], support_features[i], s_mask,
                                         cfg.train_window)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            query_loss = query_loss + F.cross_entropy(logits, query_label[i:i + 1].long(), weight=weights,
                                                      ignore_index=IGNORE_INDEX)
            if cfg.align_weight > 0:
                # Prototype alignment: the query's own prediction becomes a support that
                # must segment the original support slice.
                predicted = logits.argmax(dim=1)[0].float().detach()
                back = self.predict_logits(support_features[i:i + 1], query_features[i], predicted,
                                           cfg.train_window)
                back = F.interpolate(back, size=size, mode="bilinear", align_corners=False)
                align_loss = align_loss + F.cross_entropy(back, support_mask[i:i + 1].long(),
                                                          ignore_index=IGNORE_INDEX)
        query_loss = query_loss / batch
        align_loss = align_loss / batch
        total = query_loss + cfg.align_weight * align_loss
        return total, {"query": float(query_loss.detach()), "align": float(align_loss.detach())}


def resize_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of an (H, W) mask to the feature grid: soft masks in [0, 1]."""
    mask = mask.float()
    if tuple(mask.shape) == tuple(size):
        return mask
    return F.interpolate(mask[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
