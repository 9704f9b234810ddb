"""Backbone features of a scan's slices, computed when first asked for and cached.

The engine's walk visits only the slices near the structure, so a kidney in a 300-slice CT pays
the backbone for a few dozen slices; a :class:`FeatureCache` keeps volumes between runs, so a
re-run after a correction costs only the head. No Qt; progress and cancel are plain callables.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from .preprocessing import Modality, prepare_volume, reading, stored_hu_offset

if TYPE_CHECKING:
    from .engine import Model

# progress(done, total, stage); total 0: how far the stage goes is not known (the walk ends where the structure does)
ProgressCallback = Callable[[int, int, str], None]


class Cancelled(Exception):
    """Raised inside the engine when the caller's cancel flag is set."""


class VolumeFeatures:
    """Backbone features of a volume's slices on the model's in-plane grid, each slice computed
    the first time it is asked for and then kept.

    The walk visits only the slices near the structure, so a kidney in a 300-slice CT pays the
    backbone for a few dozen slices, not 300; a re-run after a correction reuses what the first
    run computed. Slices are embedded a batch at a time, in the model's precision.
    """

    def __init__(self, prepared: torch.Tensor | None, grid_size: tuple[int, int], native_size: tuple[int, int],
                 modality: Modality, model: Model | None = None, features: torch.Tensor | None = None) -> None:
        self.grid_size = grid_size
        self.native_size = native_size
        self.modality = modality
        self.read_as = "CT" if modality == "ct" else "MRI"  # how the intensities were read (preprocessing.reading)
        self.seconds = 0.0  # spent preparing and embedding so far
        self.mirrored: VolumeFeatures | None = None  # the slices mirrored along their first in-plane axis
        self.count = len(features) if features is not None else len(prepared)
        self._prepared = prepared  # the z-scored slices on the model grid, until every slice is embedded
        self._model = model
        self._features = features  # (S, C, h, w) on the CPU, allocated at the first batch
        self._done = np.full(self.count, features is not None)
        self._lock = threading.RLock()

    @classmethod
    def of(cls, model: Model, slices: np.ndarray, spacing_hw: tuple[float, float],
           modality: Modality | Literal["auto"] = "auto") -> VolumeFeatures:
        """(S, H, W) slices prepared for ``model``; nothing embedded yet."""
        start = time.perf_counter()
        offset = stored_hu_offset(slices)  # once: it windows a CT and words the reading
        prepared, modality = prepare_volume(slices, spacing_hw, model.profile, modality, offset)
        feats = cls(prepared, tuple(prepared.shape[1:]), tuple(slices.shape[1:]), modality, model)
        feats.read_as = reading(modality, offset)
        feats.seconds = time.perf_counter() - start
        return feats

    @classmethod
    def precomputed(cls, features: torch.Tensor, grid_size: tuple[int, int], native_size: tuple[int, int],
                    modality: Modality) -> VolumeFeatures:
        return cls(None, grid_size, native_size, modality, features=features)

    @property
    def computed(self) -> int:
        """How many slices have been embedded."""
        return int(self._done.sum())

    def slices(self, index: int | list[int], progress: ProgressCallback | None = None,
               cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Features of slice ``index`` (C, h, w), or of a list of slices (N, C, h, w)."""
        wanted = [index] if isinstance(index, int) else list(index)
        self._embed([z for z in wanted if not self._done[z]], progress, cancel)
        return self._features[index]

    def all(self, progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Features of every slice (S, C, h, w)."""
        self._embed([int(z) for z in np.flatnonzero(~self._done)], progress, cancel)
        return self._features

    def _embed(self, missing: list[int], progress: ProgressCallback | None, cancel: Callable[[], bool] | None,
               batch_size: int = 8) -> None:
        if not missing:
            return
        model = self._model
        with self._lock, torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16,
                                                                  enabled=model.uses_bf16):
            missing = [z for z in missing if not self._done[z]]  # another thread may have done some
            for first in range(0, len(missing), batch_size):  # progress: of the slices asked for now
                check_cancel(cancel)
                start = time.perf_counter()
                chosen = missing[first:first + batch_size]
                embedded = model.embed(self._prepared[chosen, None].to(model.device))
                if self._features is None:  # pages are touched only as slices are written
                    dtype = torch.bfloat16 if model.uses_bf16 else torch.float32
                    self._features = torch.empty((self.count, *embedded.shape[1:]), dtype=dtype)
                self._features[chosen] = embedded.to("cpu", self._features.dtype)
                self._done[chosen] = True
                self.seconds += time.perf_counter() - start
                if progress is not None:
                    progress(min(first + batch_size, len(missing)), len(missing), "computing features")
            if self._done.all():
                self._prepared = None


class FeatureCache:
    """Most-recently-used volumes' features, so a re-run after a correction skips the backbone."""

    def __init__(self, max_volumes: int = 1) -> None:
        self.max_volumes = max_volumes
        self._entries: OrderedDict[tuple, VolumeFeatures] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(model: Model, slices: np.ndarray, spacing_hw: tuple[float, float], modality: str) -> tuple:
        sample = np.ascontiguousarray(slices[:, ::3, ::3])
        digest = hashlib.blake2b(sample.tobytes(), digest_size=16).hexdigest()
        return (id(model.network), slices.shape, str(slices.dtype), digest,
                tuple(round(s, 6) for s in spacing_hw), modality)

    def get(self, key: tuple) -> VolumeFeatures | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple, value: VolumeFeatures) -> None:
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.max_volumes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def check_cancel(cancel: Callable[[], bool] | None) -> None:
    """Polled between batches: long work stops within one batch of the user's Cancel."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def compute_features(model: Model, slices: np.ndarray, spacing_hw: tuple[float, float],
                     modality: Modality | Literal["auto"] = "auto", progress: ProgressCallback | None = None,
                     cancel: Callable[[], bool] | None = None) -> VolumeFeatures:
    """Every slice of (S, H, W) slices embedded now (the engine embeds only the slices it visits)."""
    feats = VolumeFeatures.of(model, slices, spacing_hw, modality)
    feats.all(progress, cancel)
    return feats


def volume_features(model: Model, slices: np.ndarray, spacing_hw: tuple[float, float], modality: str,
                     cache: FeatureCache | None, mirrored: bool = False) -> tuple[VolumeFeatures, float]:
    """The features of (S, H, W) slices (and of the mirrored slices when ``mirrored``), from the
    cache when it has them; slices are embedded only when first asked for. Returns them and the
    seconds already spent on them (0 when new), so that a run can tell what it spent itself."""
    key = FeatureCache.key(model, slices, spacing_hw, modality) if cache is not None else None
    feats = cache.get(key) if cache is not None else None
    spent = embedding_seconds(feats) if feats is not None else 0.0
    if feats is None:
        feats = VolumeFeatures.of(model, slices, spacing_hw, modality)
        if cache is not None:
            cache.put(key, feats)
    if mirrored and feats.mirrored is None:
        # The same modality as the plain slices: the mirror must not change how they are normalised.
        feats.mirrored = VolumeFeatures.of(model, np.ascontiguousarray(slices[:, ::-1]), spacing_hw, feats.modality)
    return feats, spent


def embedding_seconds(feats: VolumeFeatures) -> float:
    """Backbone seconds spent on a volume so far, its mirrored slices included."""
    return feats.seconds + (feats.mirrored.seconds if feats.mirrored is not None else 0.0)
