"""Stage-2 superpixel episodes: one superpixel of a slice is the "organ" to segment.

Episode ``i`` is a pure function of ``(seed, i)``: any worker can build any episode, and a
resumed run continues with exactly the episodes an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from src_data.datasets import PreparedScan

from .augment import AugmentConfig, augment, mirror_episode


def usable_slices(scans: Sequence[PreparedScan], excluded_classes: Sequence[int] = ()) -> np.ndarray:
    """(scan, slice) pairs with at least one superpixel and, for setting 2, no pixel of an
    excluded class (such scans need labels)."""
    pairs = []
    for s, scan in enumerate(scans):
        has_segment = scan.superpixels.reshape(len(scan.superpixels), -1).max(axis=1) > 0
        keep = has_segment
        if excluded_classes:
            if scan.label is None:
                raise ValueError(f"setting-2 exclusion needs labels, and {scan.name} has none")
            flat = scan.label.reshape(len(scan.label), -1)
            keep = keep & ~np.isin(flat, list(excluded_classes)).any(axis=1)
        pairs += [(s, int(i)) for i in np.flatnonzero(keep)]
    if not pairs:
        raise ValueError("no slice is usable for episodes (no superpixels, or all excluded)")
    return np.asarray(pairs, dtype=np.int64)


def crop_or_pad(image: np.ndarray, mask: np.ndarray, centre: tuple[float, float], size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A size x size window around ``centre`` (jittered), padded with the image minimum."""
    out_image = np.full((size, size), image.min(), dtype=np.float32)
    out_mask = np.zeros((size, size), dtype=mask.dtype)
    starts = []
    for length, c in zip(image.shape, centre):
        if length <= size:
            starts.append(0)
        else:
            jitter = rng.uniform(-size / 4, size / 4)
            starts.append(int(np.clip(round(c - size / 2 + jitter), 0, length - size)))
    h = min(size, image.shape[0])
    w = min(size, image.shape[1])
    oy, ox = (size - h) // 2, (size - w) // 2
    sy, sx = starts
    out_image[oy:oy + h, ox:ox + w] = image[sy:sy + h, sx:sx + w]
    out_mask[oy:oy + h, ox:ox + w] = mask[sy:sy + h, sx:sx + w]
    return out_image, out_mask


class SuperpixelEpisodes(torch.utils.data.Dataset):
    """1-way 1-shot episodes addressed by index (endless: any index is an episode): support
    and query are two independent augmentations of the same slice and superpixel mask."""

    def __init__(self, scans: Sequence[PreparedScan], crop: int = 256, seed: int = 0,
                 excluded_classes: Sequence[int] = (), augment_config: AugmentConfig | None = None,
                 mirror: bool = False) -> None:
        self.scans = list(scans)
        self.mirror = mirror
        self.crop = crop
        self.seed = seed
        self.augment_config = augment_config or AugmentConfig()
        self.slices = usable_slices(self.scans, excluded_classes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.episode(int(index))

    def episode(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        scan_i, slice_i = self.slices[rng.integers(len(self.slices))]
        scan = self.scans[scan_i]
        segments = scan.superpixels[slice_i]
        chosen = rng.integers(1, int(segments.max()) + 1)
        mask = segments == chosen
        if not mask.any():  # ids are 1..K, so only a relabelling bug gets here
            raise RuntimeError(f"superpixel {chosen} missing in {scan.name} slice {slice_i}")
        centre = tuple(float(v.mean()) for v in np.nonzero(mask))
        image, mask = crop_or_pad(scan.image[slice_i].astype(np.float32), mask.astype(np.uint8),
                                  centre, self.crop, rng)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        images = torch.from_numpy(image)[None, None].expand(2, 1, -1, -1).contiguous()
        masks = torch.from_numpy(mask)[None].expand(2, -1, -1).contiguous()
        images, masks = augment(images, masks, self.augment_config, generator)
        episode = {"support_image": images[0], "support_mask": masks[0].long(),
                   "query_image": images[1], "query_label": masks[1].long(), "index": torch.tensor(index)}
        return mirror_episode(episode, rng) if self.mirror else episode
