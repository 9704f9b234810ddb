"""The one augmentation module: the reference's episode augmentations, in torch.

Geometry (rotation, translation, shear, scale, elastic) is one sampling grid applied to the
image and its mask together; gamma touches the image only. No flips, no noise: that is the
reference. Ours, off by default: :func:`mirror_episode` flips a whole episode, for a model that
does not care which way a hospital stores left-right and front-back. Written in torch so the
same code runs in CPU data workers and, batched, on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 5.0
    translation_px: float = 5.0
    shear_deg: float = 5.0
    scale: tuple[float, float] = (0.9, 1.2)
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0
    gamma: tuple[float, float] = (0.5, 1.5)


def _uniform(generator: torch.Generator, low: float, high: float, n: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _gaussian_blur(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with zero padding (as the reference's cval=0)."""
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    k_h = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    k_w = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    field = F.conv2d(field, k_h, padding=(radius, 0), groups=channels)
    return F.conv2d(field, k_w, padding=(0, radius), groups=channels)


def random_grid(batch: int, height: int, width: int, config: AugmentConfig,
                generator: torch.Generator) -> torch.Tensor:
    """A sampling grid (B, H, W, 2) for ``grid_sample`` (align_corners=False)."""
    angle = torch.deg2rad(_uniform(generator, -config.rotation_deg, config.rotation_deg, batch))
    shear = torch.deg2rad(_uniform(generator, -config.shear_deg, config.shear_deg, batch))
    scale = _uniform(generator, *config.scale, batch)
    shift = _uniform(generator, -config.translation_px, config.translation_px, 2 * batch).view(batch, 2)
    # Output pixel -> input pixel: the inverse of scale, shear and rotate about the centre.
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.zeros(batch, 2, 2)
    shearing[:, 0, 0] = 1.0
    shearing[:, 0, 1] = torch.tan(shear)
    shearing[:, 1, 1] = 1.0
    forward = rotation @ shearing * scale.view(batch, 1, 1)
    inverse = torch.linalg.inv(forward)
    ys = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([xx, yy], -1).view(1, -1, 2) - shift.view(batch, 1, 2)
    source = (points @ inverse.transpose(1, 2)).view(batch, height, width, 2)
    if config.elastic_alpha > 0:
        noise = torch.rand(batch, 2, height, width, generator=generator) * 2 - 1
        displacement = _gaussian_blur(noise, config.elastic_sigma) * config.elastic_alpha
        source = source + displacement.permute(0, 2, 3, 1)
    # Pixel offsets from the centre -> normalised coordinates.
    source[..., 0] = (source[..., 0] + (width - 1) / 2 + 0.5) * 2 / width - 1
    source[..., 1] = (source[..., 1] + (height - 1) / 2 + 0.5) * 2 / height - 1
    return source


def random_gamma(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Gamma on each image rescaled to [0, 1], then back to its own range."""
    batch = images.shape[0]
    gamma = _uniform(generator, *config.gamma, batch).view(batch, 1, 1, 1).to(images.device)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    span = (images.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
    return ((images - low) / span).clamp(0, 1).pow(gamma) * span + low


def augment(images: torch.Tensor, masks: torch.Tensor, config: AugmentConfig,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random augmentation per item of images (B, 1, H, W) and masks (B, H, W)."""
    batch, _, height, width = images.shape
    grid = random_grid(batch, height, width, config, generator).to(images.device)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped_masks = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                 align_corners=False)[:, 0]
    return random_gamma(warped, config, generator), warped_masks.to(masks.dtype)


EPISODE_KEYS = ("support_image", "support_mask", "query_image", "query_label")


def mirror_episode(episode: dict[str, torch.Tensor], rng) -> dict[str, torch.Tensor]:
    """Support and query flipped alike along each in-plane axis, each with probability 1/2.

    Scans come stored left-right and front-back either way (CHAOS as LAS, OpenKBP as RAS); a
    model trained on one storage loses 3-7 Dice points on the mirrored one. Flipping the whole
    episode teaches features that do not depend on it, while support and query stay in the same
    frame, as they are in use. ``rng``: the episode's numpy Generator (drawn after all else).
    """
    dims = [dim for dim in (-2, -1) if rng.random() < 0.5]
    if not dims:
        return episode
    return {key: torch.flip(value, dims) if key in EPISODE_KEYS else value for key, value in episode.items()}
