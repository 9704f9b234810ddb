"""The propagation engine: numpy in, numpy out, no Qt.

``propagate`` turns one or a few painted slices into a 3D mask. A walk outward from each
painted slice keeps what is connected to the previous slice's mask and stops where the
structure ends (see :class:`PropagationOptions` for the rules and why); the backbone embeds a
slice when the walk first reaches it, at most once per volume (features are cached, so a
correction re-runs only the light head), and the ALP head scores it against the nearest
painted slice(s). ``segment_like`` finds and segments the structure in another patient's scan.

Built on :mod:`.features` (embedding and caching slices) and :mod:`.painting` (what a
painting says); their public names are re-exported here, the API callers use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .checkpoint import load_checkpoint
from .devices import pick_device, use_bf16
from .errors import DenseMPError
from .features import (
    Cancelled,
    FeatureCache,
    ProgressCallback,
    VolumeFeatures,
    check_cancel,
    compute_features,
    embedding_seconds,
    volume_features,
)
from .network import FewShotSegmenter, head_logits, resize_mask, support_prototypes, unit_length
from .painting import (
    check_painting_axis,
    filled,
    filled_outlines,
    has_holes,
    in_slices,
    integer_painting,
    on_slices,
    painted_binary,
    painted_labels,
    painted_planes,
    painted_voxel,
    painting_axis,
    plane_axis,
    slices_holding,
    tiny_paintings,
    walked_axes,
)
from .preprocessing import Modality, PreprocessingProfile, check_volume, detect_modality, resize_slices

# The engine's API: its own functions and what it re-exports from the modules it is built on.
__all__ = [
    "DEFAULT_MODEL", "Cancelled", "FeatureCache", "InPlaneView", "Model", "ProgressCallback", "PropagationOptions",
    "PropagationResult", "SliceScorer", "VolumeFeatures", "bundled_models", "chunk_centres", "compute_features",
    "confidence_along", "default_model_path", "load_model", "make_scorer", "merge_structures", "painted_labels",
    "painted_planes", "painting_axis", "parse_rules", "plane_axis", "propagate", "propagate_labels",
    "search_slices", "segment_like", "segment_like_labels", "slice_prototypes", "volume_features", "walked_axes",
]

log = logging.getLogger(__name__)
DEFAULT_MODEL = "default_v3.pt"


# --------------------------------------------------------------------------- models
@dataclass
class Model:
    """A network ready for inference, with the preprocessing it was trained with."""

    network: FewShotSegmenter
    profile: PreprocessingProfile
    device: torch.device
    name: str
    provenance: dict = field(default_factory=dict)
    uses_bf16: bool = False  # bf16 autocast for the backbone: 3.8x faster on the AMX CPU measured
    int8_embed: torch.nn.Module | None = None  # the backbone in int8, if asked: 1.8x faster than fp32

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.uses_bf16 else "int8" if self.int8_embed is not None else "fp32"

    def embed(self, slices: torch.Tensor) -> torch.Tensor:
        """Features of prepared one-channel slices (B, 1, H, W), in the model's precision."""
        if self.int8_embed is not None:
            return self.int8_embed(slices.contiguous())
        return self.network.embed(slices.contiguous(memory_format=torch.channels_last))

    def default_options(self, **overrides) -> PropagationOptions:
        """The engine's rules with this model's own tuning applied, then ``overrides``.

        A checkpoint may carry, in ``provenance["propagation"]``, rule values chosen on its
        training patients (the confidence floors depend on how sure a model is); unknown names
        are ignored so old checkpoints and new engines keep working together.
        """
        known = {f.name for f in fields(PropagationOptions)}
        tuned = {k: v for k, v in dict(self.provenance.get("propagation") or {}).items() if k in known}
        return PropagationOptions(**{**tuned, **overrides})


def default_model_path() -> Path:
    return Path(str(resources.files("napari_densemp") / "models" / DEFAULT_MODEL))


def bundled_models() -> dict[str, Path]:
    """The checkpoints shipped inside the package, by short name (``default``, ``v0``, ``v2``)."""
    folder = default_model_path().parent
    models = {p.stem.removeprefix("default_"): p for p in sorted(folder.glob("default_*.pt"))}
    return {"default": default_model_path(), **models}


def load_model(source: str | Path = "default", device: str = "auto",
               precision: Literal["auto", "bf16", "int8", "fp32"] = "auto") -> Model:
    """Load a bundled model by name (``"default"``, ``"v2"``, see :func:`bundled_models`) or a
    checkpoint file.

    ``precision="auto"`` uses bf16 autocast where the hardware runs it natively, else fp32.
    ``"int8"`` runs the backbone in int8 on a CPU, from the scales an exported checkpoint
    carries: 1.8x faster than fp32 where bf16 is not native, at a Dice within 0.7 of it on the
    validation patients (not the default: see :mod:`napari_densemp.int8`).
    """
    if precision not in ("auto", "bf16", "int8", "fp32"):
        raise DenseMPError(f"Unknown precision {precision!r}: use auto, bf16, int8 or fp32.")
    bundled = bundled_models()
    path = bundled.get(str(source), Path(source))
    if str(source) == "default" and not path.is_file():
        raise DenseMPError(f"The bundled default model is missing from the installation ({path}).")
    if not path.is_file() and not path.suffix and str(source) not in bundled:
        raise DenseMPError(f"Unknown model {str(source)!r}: give a checkpoint file or one of the bundled "
                           f"models {sorted(bundled)}.")
    checkpoint = load_checkpoint(path)
    dev = pick_device(device)
    network = checkpoint.build_model().to(dev).to(memory_format=torch.channels_last)
    bf16 = precision == "bf16" or (precision == "auto" and use_bf16(dev))
    int8 = None
    if precision == "int8":
        if dev.type != "cpu":
            raise DenseMPError(f"int8 inference runs on the CPU only, not on {dev.type}.")
        if not checkpoint.int8:
            raise DenseMPError(f"{path.name} carries no int8 scales; `densemp-train export` adds them.")
        from .int8 import int8_embedder

        int8 = int8_embedder(network, checkpoint.int8["activation_qparams"])
        if int8 is None:
            raise DenseMPError("int8 inference is unavailable in this PyTorch (see the log); use fp32.")
    return Model(network, checkpoint.preprocessing, dev, path.name, checkpoint.provenance, bf16, int8)


# --------------------------------------------------------------------------- propagation
@dataclass(frozen=True)
class PropagationOptions:
    """The rules that decide where the structure is and where it ends.

    Defaults were chosen by measurement on phantoms and on training patients only
    (benchmarks/accuracy.py); see README for the figures.
    """

    threshold: float = 0.5  # foreground probability
    neighbour_margin_mm: float = 10.0  # kept components must touch the previous mask grown by this
    clip_to_neighbour: bool = True  # and are cut to it: adjacent organs cannot leak in
    max_growth: float = 1.2  # a region larger than this x the previous slice's ends the structure
    # ... unless, while the structure has only widened since the painted slice, it is no larger
    # than the previous region grown by this: painted near its end, an organ widens fast and its
    # own growth must not stop the walk (once it narrows, the ratio alone); 0: the ratio alone
    growth_margin_mm: float = 5.0
    min_area_mm2: float = 10.0  # a smaller region ends the structure
    min_confidence: float = 0.8  # a region whose mean foreground probability is lower ends it
    between_painted_only: bool = False  # segment only between the first and last painted slice
    # segment_like (another patient): where the structure is looked for, and how a 3D support is used
    position_prior: float = 0.2  # sd of a Gaussian prior on the support's relative position; 0: off
    inplane_prior: float = 0.15  # the same in-plane, relative to the body's box; 0: off
    cross_min_confidence: float = 0.75  # min_confidence for another patient (its matches are less sure)
    seed_candidates: int = 5  # query slices tried as seeds; the walk with most confident mass wins
    # Query slices scored to find the structure are at most this far apart (every slice of a scan
    # thicker than this); the walks then embed the slices they reach. 0: every slice.
    search_step_mm: float = 5.0
    support_chunks: int = 3  # supports taken from a 3D support mask (the paper uses 3)
    # Each walk in another patient goes at most this x the support structure's own extent (mm) from
    # its matched slice to that end, per direction: the same organ has a similar length, and a walk
    # that runs on into a neighbour is cut there. 0: no limit.
    extent_limit: float = 1.5
    calibrate_threshold: bool = True  # output threshold: the one that best redraws the painting on its slice
    # Holes inside a drawn slice are filled, unless the painting has holes of its own (more than
    # 1% of its area: a ring-shaped structure, or vessels the user left out) that must be kept.
    fill_holes: bool = True
    # MRI: drawn voxels are kept only within the painted voxels' intensity band (5th-95th
    # percentile) widened by this share of it on each side; 0: off. Not on CT (see _intensity_gated).
    intensity_gate: float = 0.25
    # CT: going out from the painted slices, the first drawn slice with less than this share of its
    # voxels in the painted intensity band (the MRI band, widened by 0.25) ends the structure; 0: off.
    # CT numbers are calibrated, so a region with almost none in the organ's HU range is not it.
    ct_band_stop: float = 0.3
    # Also score the slices mirrored along their first in-plane axis (left-right on axial and coronal
    # slices) and average: the result no longer depends on how a scanner stored left and right, for
    # twice the backbone's time.
    mirror_average: bool = False
    # A painted slice that is a closed outline (it encloses unpainted holes at least as large as
    # itself) is filled: its inside is taken as the structure (:func:`filled_outlines`).
    fill_outlines: bool = True


# Both intensity-band rules off: the CLI's --no-intensity-band, the widget's unticked box.
INTENSITY_BAND_OFF = {"intensity_gate": 0.0, "ct_band_stop": 0.0}


def parse_rules(items: list[str]) -> dict:
    """``NAME=VALUE`` strings naming fields of :class:`PropagationOptions`, as typed overrides.

    The one parser of rule values: ``densemp-train export --rule`` and the benchmarks' ``--rule``.
    """
    types = {f.name: f.type for f in fields(PropagationOptions)}
    rules = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types or not value:
            raise DenseMPError(f"rule {item!r}: expected NAME=VALUE with NAME one of {sorted(types)}")
        kind = types[name]
        try:
            if kind == "bool":
                rules[name] = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[
                    value.lower()]
            else:
                rules[name] = int(value) if kind == "int" else float(value)
        except (KeyError, ValueError):
            expected = {"bool": "true or false", "int": "a whole number"}.get(kind, "a number")
            raise DenseMPError(f"rule {item!r}: {value!r} is not {expected}") from None
    return rules


@dataclass
class PropagationResult:
    mask: np.ndarray  # bool, exactly the input's shape
    confidence: np.ndarray  # (n_slices,) mean foreground probability of the kept region, 0 if empty
    slice_range: tuple[int, int] | None  # first and last segmented slice along the slicing axis
    painted_slices: list[int]
    seconds_features: float
    seconds_head: float
    reused_features: bool
    found_at: list[int] = field(default_factory=list)  # segment_like: query slices the supports were matched to
    axis: int = 2  # the slicing axis walked (of the input array)
    planes: dict[int, list[int]] = field(default_factory=dict)  # painted in several planes: axis -> slices walked
    read_as: str = ""  # how the scan's intensities were read: "CT", "CT stored as HU + 1024", "MRI"
    filled_outlines: list[tuple[int, int]] = field(default_factory=list)  # (axis, slice) of paintings filled
    # (axis, a voxel) of each slice painted on its own with a tiny painting: a stray click?
    tiny_paintings: list[tuple[int, tuple[int, int, int]]] = field(default_factory=list)


def _agreeing(results: list[PropagationResult], painted: np.ndarray) -> np.ndarray:
    """One mask from walks across different planes: where several walks reached (their slice
    ranges), a voxel is kept only if all of them kept it; where one reached, it decides; the
    painting is kept. Each walk then trims the others' leaks and carries on where they stopped
    early (validation patients: benchmarks/RESULTS.md)."""
    kept = np.ones(painted.shape, bool)
    reached = np.zeros(painted.shape, bool)
    for result in results:
        if result.slice_range is None:
            continue
        lo, hi = result.slice_range
        span = np.zeros(painted.shape[result.axis], bool)
        span[lo:hi + 1] = True
        shape = [1, 1, 1]
        shape[result.axis] = -1
        inside = np.broadcast_to(span.reshape(shape), painted.shape)
        kept &= result.mask | ~inside
        reached |= inside
    return (kept & reached) | painted


def _combined(results: list[PropagationResult], painted: np.ndarray, axis: int, planes: dict[int, list[int]],
              within: tuple[int, int] | None = None) -> PropagationResult:
    """The walks across each painted plane as one result, reported along ``axis`` (and kept to
    its slices ``within``, plus the painting, when given)."""
    mask = _agreeing(results, painted)
    if within is not None:
        between = np.zeros(mask.shape[axis], bool)
        between[within[0]:within[1] + 1] = True
        mask = in_slices(mask, axis, between) | painted
    on_slices = slices_holding(mask, axis)
    return replace(results[0], mask=mask, confidence=confidence_along(results, mask, axis),
                   slice_range=(on_slices[0], on_slices[-1]) if on_slices else None, planes=planes,
                   seconds_features=sum(r.seconds_features for r in results),
                   seconds_head=sum(r.seconds_head for r in results),
                   reused_features=all(r.reused_features for r in results),
                   tiny_paintings=[s for r in results for s in r.tiny_paintings])


def confidence_along(results: list[PropagationResult], mask: np.ndarray, axis: int) -> np.ndarray:
    """Per slice across ``axis``: the mean over ``mask``'s voxels there of the lowest confidence
    any of the walks (of one structure) that reached a voxel gave its slice (0 where the mask is
    empty): a structure walked across other planes, reported along ``axis``."""
    where = np.nonzero(mask)
    voxel = np.full(where[0].size, np.inf, dtype=np.float32)
    for result in results:
        if result.slice_range is not None:
            index = where[result.axis]
            inside = (index >= result.slice_range[0]) & (index <= result.slice_range[1])
            voxel[inside] = np.minimum(voxel[inside], result.confidence[index[inside]])
    voxel[~np.isfinite(voxel)] = 0.0
    counts = np.bincount(where[axis], minlength=mask.shape[axis])
    sums = np.bincount(where[axis], weights=voxel, minlength=mask.shape[axis])
    return (sums / np.maximum(counts, 1)).astype(np.float32)


Prototypes = tuple[torch.Tensor, torch.Tensor]  # unit-length (fg (Nf, C), bg (Nb, C))


def slice_prototypes(model: Model, feats: VolumeFeatures, masks: dict[int, torch.Tensor]) -> dict[int, Prototypes]:
    """Prototypes of the given slices of a volume from their masks on the model grid."""
    config = model.network.config
    out = {}
    for z, mask in masks.items():
        features = feats.slices(z).float()
        fg, bg = support_prototypes(features, resize_mask(mask, features.shape[-2:]),
                                    config.inference_window, config)
        out[z] = (unit_length(fg, 1), unit_length(bg, 1))
    return out


Scorer = Callable[..., np.ndarray]  # (z, step=1, until=None) -> slice z's foreground probability on the model grid


class SliceScorer:
    """Foreground probability of a slice on the model grid, computed on first request.

    The walk visits only the slices near the structure, so most of a volume never pays
    for the head; slices are scored a few at a time ahead of the walk. ``prototypes`` are
    anchored at slices of this volume (the painted slices, or where a support was matched);
    each slice is scored against the nearest anchor on each side (both when it lies between
    two).
    """

    ahead = 8

    def __init__(self, model: Model, feats: VolumeFeatures, prototypes: dict[int, Prototypes],
                 cancel: Callable[[], bool] | None = None, progress: ProgressCallback | None = None) -> None:
        self.config = model.network.config
        self.feats = feats
        self.cancel = cancel
        self.progress = progress  # reports the slices scored so far, of a total not known
        self.painted = sorted(prototypes)
        self.prototypes = prototypes
        self._cache: dict[int, np.ndarray] = {}

    def supports(self, z: int) -> tuple[int, ...]:
        below = [p for p in self.painted if p <= z]
        above = [p for p in self.painted if p >= z]
        return tuple(sorted({*below[-1:], *above[:1]}))

    def __call__(self, z: int, step: int = 1, until: int | None = None) -> np.ndarray:
        """Slice z's probability; slices z + step, z + 2 step, ... (short of ``until``) are scored
        with it, since the walk will ask for them next."""
        if z not in self._cache:
            check_cancel(self.cancel)
            chosen = self.supports(z)
            reach = z + step * self.ahead
            stop = reach if until is None else (max if step < 0 else min)(until, reach)
            batch = [z] + [s for s in range(z + step, stop, step)
                           if 0 <= s < self.feats.count and s not in self._cache and self.supports(s) == chosen]
            fg = torch.cat([self.prototypes[p][0] for p in chosen])
            bg = torch.cat([self.prototypes[p][1] for p in chosen])
            with torch.inference_mode():
                query = unit_length(self.feats.slices(batch, cancel=self.cancel), 1)
                logits = head_logits(query, fg, bg, self.config.scale, normalized=True)
                # softmax over [bg, fg] is a sigmoid of the difference, which bilinear
                # upsampling commutes with: upsample one channel instead of two.
                margin = logits[:, 1:] - logits[:, :1]
                margin = F.interpolate(margin, size=self.feats.grid_size, mode="bilinear", align_corners=False)
                prob = torch.sigmoid(margin)[:, 0].numpy()
            self._cache.update(zip(batch, prob))
            if self.progress is not None:
                self.progress(len(self._cache), 0, "following the structure")
        return self._cache[z]


class MirrorAveragedScorer:
    """The mean of a volume's scorer and its mirrored volume's scorer (mirrored back): a prediction
    that mirrors exactly with the scan."""

    def __init__(self, plain: SliceScorer, mirrored: SliceScorer) -> None:
        self.plain, self.mirrored = plain, mirrored
        self._cache: dict[int, np.ndarray] = {}

    @property
    def progress(self) -> ProgressCallback | None:
        """Reported by the plain scorer (the mirrored one scores the same slices)."""
        return self.plain.progress

    @progress.setter
    def progress(self, progress: ProgressCallback | None) -> None:
        self.plain.progress = progress

    def __call__(self, z: int, step: int = 1, until: int | None = None) -> np.ndarray:
        if z not in self._cache:
            self._cache[z] = 0.5 * (self.plain(z, step, until) + self.mirrored(z, step, until)[::-1])
        return self._cache[z]


def make_scorer(model: Model, feats: VolumeFeatures, support: VolumeFeatures, masks: dict[int, torch.Tensor],
                anchors: dict[int, int] | None = None, cancel: Callable[[], bool] | None = None,
                progress: ProgressCallback | None = None) -> Scorer:
    """Score ``feats``' slices against the prototypes of ``support``'s slices under ``masks`` (grid
    masks by support slice), anchored at the slices ``anchors`` maps to them (default: the same
    slices). Averaged with the mirrored slices when both volumes carry them."""
    anchors = anchors if anchors is not None else {z: z for z in masks}

    def scorer(query: VolumeFeatures, source: VolumeFeatures, grid: dict[int, torch.Tensor],
               reports: ProgressCallback | None = None) -> SliceScorer:
        prototypes = slice_prototypes(model, source, grid)
        return SliceScorer(model, query, {z: prototypes[s] for z, s in anchors.items()}, cancel, reports)

    plain = scorer(feats, support, masks, progress)
    if feats.mirrored is None or support.mirrored is None:
        return plain
    mirrored_masks = {z: torch.flip(m, dims=(0,)) for z, m in masks.items()}
    return MirrorAveragedScorer(plain, scorer(feats.mirrored, support.mirrored, mirrored_masks))


def _near(previous: np.ndarray, margin_mm: float, pixel_mm: tuple[float, float]) -> np.ndarray:
    """Pixels within ``margin_mm`` of ``previous``: a Euclidean dilation computed in its
    bounding box only, which keeps the walk cheap on large slices."""
    if not np.isfinite(margin_mm):
        return np.ones_like(previous)
    near = np.zeros_like(previous)
    ys, xs = np.nonzero(previous)
    if ys.size == 0:
        return near
    pad_y, pad_x = (int(np.ceil(margin_mm / p)) + 1 for p in pixel_mm)
    y0, y1 = max(ys.min() - pad_y, 0), min(ys.max() + pad_y + 1, previous.shape[0])
    x0, x1 = max(xs.min() - pad_x, 0), min(xs.max() + pad_x + 1, previous.shape[1])
    distance = ndimage.distance_transform_edt(~previous[y0:y1, x0:x1], sampling=pixel_mm)
    near[y0:y1, x0:x1] = distance <= margin_mm
    return near


def _kept(prob: np.ndarray, previous: np.ndarray, options: PropagationOptions,
          pixel_mm: tuple[float, float]) -> np.ndarray:
    """The predicted components that touch ``previous`` grown by the margin (cut to it)."""
    candidate = prob > options.threshold
    if not candidate.any():
        return candidate
    near = _near(previous, options.neighbour_margin_mm, pixel_mm)
    components, _ = ndimage.label(candidate)
    touching = np.unique(components[near & candidate])
    kept = np.isin(components, touching[touching != 0])
    if options.clip_to_neighbour:
        kept &= near
    return kept


def _ring_area(previous: np.ndarray, options: PropagationOptions, pixel_mm: tuple[float, float]) -> float:
    """Area (mm²) of ``previous`` grown by ``options.growth_margin_mm``; 0 when that is 0."""
    if options.growth_margin_mm <= 0:
        return 0.0
    return float(_near(previous, options.growth_margin_mm, pixel_mm).sum()) * pixel_mm[0] * pixel_mm[1]


def _walk(prob: Scorer, n: int, painted: dict[int, np.ndarray],
          limits: tuple[int, int], options: PropagationOptions,
          pixel_mm: tuple[float, float]) -> dict[int, np.ndarray]:
    """Grow the structure slice by slice away from each painted slice until it ends.

    ``prob(z, step, until)`` gives slice z's foreground probability (``step``: the walk's
    direction, ``until``: where it ends at the latest, so scoring can run ahead but no further);
    returns the kept region per slice.
    """
    region: dict[int, np.ndarray] = {}
    pixel_area = pixel_mm[0] * pixel_mm[1]
    order = sorted(painted)
    for p in order:
        region[p] = painted[p].copy()
    for i, p in enumerate(order):
        for step in (-1, 1):
            # Walk until the next painted slice in this direction (it has its own walk).
            neighbour = order[i + step] if 0 <= i + step < len(order) else None
            end = (limits[0] - 1 if step < 0 else limits[1] + 1) if neighbour is None else neighbour
            previous = painted[p]
            # Growth compares like with like: the network's prediction on the previous
            # slice (on the painted slice, its prediction there, not the painting), since
            # small or thin structures come out wider than painted at stride 8.
            previous_area = _kept(prob(p, step, end), previous, options, pixel_mm).sum() * pixel_area
            previous_area = previous_area or previous.sum() * pixel_area
            widening = True  # no slice of this walk has been smaller than the one before it
            z = p + step
            while z != end and 0 <= z < n:
                kept = _kept(prob(z, step, end), previous, options, pixel_mm)
                area = kept.sum() * pixel_area
                if area == 0 or area < options.min_area_mm2:
                    break
                if area > options.max_growth * previous_area and not (
                        widening and area <= _ring_area(previous, options, pixel_mm)):  # the ring only when needed
                    break
                if prob(z, step, end)[kept].mean() < options.min_confidence:
                    break
                region[z] = region[z] | kept if z in region else kept
                widening = widening and area >= previous_area
                previous, previous_area = kept, area
                z += step
    return region


def _calibrated_threshold(prob: Scorer, painted: dict[int, np.ndarray],
                          options: PropagationOptions, pixel_mm: tuple[float, float]) -> float:
    """The output threshold that best redraws the painting from the network's prediction on
    the painted slice(s): the walk finds where the structure is with ``options.threshold``;
    this sets how wide it is drawn (small structures come out wide at stride 8)."""
    candidates = np.round(np.arange(0.3, 0.99, 0.02), 2)
    scores = np.zeros(len(candidates))
    for p, truth in painted.items():
        kept_prob = prob(p) * _kept(prob(p), truth, options, pixel_mm)
        for i, t in enumerate(candidates):
            guess = kept_prob > t
            scores[i] += 2 * (guess & truth).sum() / max(guess.sum() + truth.sum(), 1)
    return float(candidates[int(np.argmax(scores))])


@dataclass(frozen=True)
class InPlaneView:
    """How a scan's slices are shown to the model: in-plane axes swapped and/or flipped so that
    they run in the order and direction of its training scans (``profile.orientations``). The
    slicing axis is never touched, so slice numbers and the walk are the stored ones."""

    swap: bool = False
    flips: tuple[bool, bool] = (False, False)

    @classmethod
    def for_scan(cls, model: Model, volume: np.ndarray, affine: np.ndarray | None, axis: int,
                 modality: Modality | Literal["auto"]) -> InPlaneView:
        """The view for a scan stored as ``affine`` says (None: unknown, slices as stored)."""
        orientations = model.profile.orientations
        if affine is None or not orientations:
            return cls()
        return cls.between(affine, axis, orientations.get(detect_modality(volume) if modality == "auto" else modality))

    @classmethod
    def between(cls, affine: np.ndarray, axis: int, codes: str | None) -> InPlaneView:
        """The view that shows slices across ``axis`` of a scan stored as ``affine`` says in the
        order and direction of axis codes such as "RAS" (None: slices as stored)."""
        stored = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
        if not codes or not np.isfinite(stored).all():
            return cls()
        target = nib.orientations.axcodes2ornt(tuple(codes))
        position = {int(world): i for i, (world, _) in enumerate(target)}  # world axis -> target array axis
        in_plane = [a for a in range(3) if a != axis]
        order = sorted(in_plane, key=lambda a: position[int(stored[a, 0])])
        flips = tuple(bool(stored[a, 1] != target[position[int(stored[a, 0])], 1]) for a in order)
        return cls(order != in_plane, flips)

    def show(self, slices: np.ndarray) -> np.ndarray:
        """(S, H, W) stored slices as the model is shown them (a view: no copy of the scan)."""
        if self.swap:
            slices = slices.transpose(0, 2, 1)
        for dim, flip in zip((1, 2), self.flips):
            slices = np.flip(slices, dim) if flip else slices
        return slices

    def back(self, slices: np.ndarray) -> np.ndarray:
        """Exactly undoes :meth:`show`."""
        for dim, flip in zip((1, 2), self.flips):
            slices = np.flip(slices, dim) if flip else slices
        return np.ascontiguousarray(slices.transpose(0, 2, 1) if self.swap else slices)

    def spacing(self, spacing_hw: tuple[float, float]) -> tuple[float, float]:
        return (spacing_hw[1], spacing_hw[0]) if self.swap else spacing_hw


def _check_inputs(volume: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], axis: int,
                  volume_name: str = "image", mask_name: str = "painted mask") -> tuple[np.ndarray, np.ndarray, int]:
    volume = check_volume(volume, volume_name)
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
        raise DenseMPError(f"The {mask_name}'s shape {mask.shape} differs from the {volume_name}'s {volume.shape}.")
    return volume, mask, _check_axis_spacing(axis, spacing)


def _check_axis_spacing(axis: int, spacing: tuple[float, float, float]) -> int:
    if axis not in (0, 1, 2, -1, -2, -3):
        raise DenseMPError(f"axis must be 0, 1 or 2; got {axis}.")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DenseMPError(f"spacing must be three positive numbers (mm); got {spacing}.")
    return axis % 3


def _grid_masks(mask: np.ndarray, slices: list[int], feats: VolumeFeatures) -> dict[int, torch.Tensor]:
    """Soft masks of the given slices on the model grid."""
    grid = resize_slices(torch.from_numpy(mask[slices].astype(np.float32)), feats.grid_size)
    return dict(zip(slices, grid))


def _seed(soft: torch.Tensor) -> np.ndarray:
    """A binary seed on the model grid; a stroke thinner than a grid pixel still seeds the walk."""
    soft = soft.numpy()
    return soft > 0.5 if (soft > 0.5).any() else soft >= soft.max()


def _pixel_mm(spacing_hw: tuple[float, float], feats: VolumeFeatures) -> tuple[float, float]:
    return tuple(s * n / g for s, n, g in zip(spacing_hw, feats.native_size, feats.grid_size))


def _render(scorer: Scorer, region: dict[int, np.ndarray], feats: VolumeFeatures, threshold: float,
            n_slices: int, fill_holes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The kept regions drawn on the native grid (holes filled when asked), and the per-slice
    confidence."""
    confidence = np.zeros(n_slices, dtype=np.float32)
    out = np.zeros((n_slices, *feats.native_size), dtype=bool)
    for z, kept in region.items():
        if not kept.any():
            continue
        prob = scorer(z)
        confidence[z] = float(prob[kept].mean())
        native = resize_slices(torch.from_numpy(prob * kept)[None], feats.native_size)[0]
        out[z] = (native > threshold).numpy()
        if fill_holes:
            out[z] = filled(out[z])
    return out, confidence


def _painted_band(slices: np.ndarray, paint: np.ndarray, painted_slices: list[int],
                  widen: float) -> tuple[float, float]:
    """The painted voxels' intensity band: their 5th-95th percentile widened by ``widen`` of it on
    each side, and by at least 2% of the scan's range, so that a painting of one flat value (a few
    voxels, a quantised scan) still gets a band."""
    values = slices[painted_slices][paint[painted_slices] > 0]
    low, high = np.percentile(values, [5, 95])
    sample = slices[:: max(1, len(slices) // 16)]
    margin = max(widen * (high - low), 0.02 * float(np.ptp(np.percentile(sample, [0.5, 99.5]))))
    return float(low - margin), float(high + margin)


def _band_stopped(out: np.ndarray, confidence: np.ndarray, slices: np.ndarray, paint: np.ndarray,
                  painted_slices: list[int], min_share: float) -> np.ndarray:
    """``out`` ended, on each side of the painted slices, at the first drawn slice with less than
    ``min_share`` of its voxels in the painted intensity band; that slice and those beyond are
    emptied (confidence 0).

    The CT counterpart of :func:`_intensity_gated`, which cuts voxels and cost a mandible (bone
    and marrow) its marrow: this rule only ends a walk that has left the organ's HU range
    altogether, as one that runs on into fat or bowel with the organ's shape. At 0.3, held out
    (v0): OpenKBP 46.3 -> 47.0, the phantom CTs 69.8 -> 76.9.
    """
    low, high = _painted_band(slices, paint, painted_slices, 0.25)
    for side in (range(painted_slices[-1] + 1, len(out)), range(painted_slices[0] - 1, -1, -1)):
        for z in side:
            drawn = slices[z][out[z]]
            if drawn.size and ((drawn >= low) & (drawn <= high)).sum() < min_share * drawn.size:
                beyond = slice(z, None) if side.step > 0 else slice(0, z + 1)
                out[beyond] = False
                confidence[beyond] = 0.0
                break
    return out


def _intensity_gated(out: np.ndarray, confidence: np.ndarray, slices: np.ndarray, paint: np.ndarray,
                     painted_slices: list[int], widen: float, fill_holes: bool) -> np.ndarray:
    """``out`` with only the voxels in the painted voxels' intensity band (5th-95th percentile,
    widened by ``widen`` of it on each side), each slice then opened (3 x 3) and, when asked, its
    holes filled; slices left empty get confidence 0.

    On MRI an organ is one intensity band within a scan, and where the walk's region spills into
    a neighbour of another band (the liver into a kidney, brighter on T2) those voxels fall
    outside it: held out, CHAOS 72.9 -> 76.5, MNI152 white matter 59.3 -> 87.7. Not on CT: a
    mandible is bone and marrow, and on OpenKBP's validation patients the gate cut it 60.7 ->
    45.9 (all four structures 51.4 -> 46.6).
    """
    low, high = _painted_band(slices, paint, painted_slices, widen)
    opening = np.ones((3, 3), dtype=bool)
    for z in np.flatnonzero(out.reshape(len(out), -1).any(axis=1)):
        inside = out[z] & (slices[z] >= low) & (slices[z] <= high)
        out[z] = ndimage.binary_opening(inside, opening)
        if fill_holes:
            out[z] = filled(out[z])
        if not out[z].any():
            confidence[z] = 0.0
    return out


def _slice_range(out: np.ndarray) -> tuple[int, int] | None:
    nonempty = np.flatnonzero(out.reshape(len(out), -1).any(axis=1))
    return (int(nonempty[0]), int(nonempty[-1])) if nonempty.size else None


def propagate(volume: np.ndarray, painted: np.ndarray, model: Model,
              spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), axis: int = 2,
              label: int | None = None, options: PropagationOptions | None = None,
              modality: Modality | Literal["auto"] = "auto", cache: FeatureCache | None = None,
              progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None,
              affine: np.ndarray | None = None) -> PropagationResult:
    """Propagate the painted slice(s) of ``volume`` through it.

    Args:
        volume: 3D scan (CT in HU or MRI in scanner units).
        painted: same shape; the structure painted on one or more slices along ``axis``. A
            correction painted on slices of another plane (a coronal view) is walked across
            that plane too, and the walks combined (:func:`painted_planes`, ``result.planes``).
        model: from :func:`load_model`.
        spacing: voxel size in mm along the array axes.
        axis: the slicing axis (the one the user paints across; 2 for axial NIfTI).
        label: which painted value to propagate; required when several are painted.
        cache: reuse backbone features across calls (the widget keeps one).
        progress: called as ``progress(done, total, stage)``; ``total`` 0 while walking (where
            the structure ends is not known beforehand).
        cancel: polled between batches; when it returns True, :class:`Cancelled` is raised.
        affine: the scan's voxel-to-world matrix, when known: its slices are then shown to the
            model in the orientation of the model's training scans (:class:`InPlaneView`).
    Returns:
        A :class:`PropagationResult` whose mask has exactly ``volume``'s shape.
    """
    options = options or model.default_options()
    volume, painted, axis = _check_inputs(volume, painted, spacing, axis)
    binary, label = painted_binary(painted, label)
    check_painting_axis(binary, axis)
    outlines: list[tuple[int, int]] = []
    if options.fill_outlines:
        binary, outlines = filled_outlines(binary, axis)
    planes = painted_planes(binary, axis)
    if len(planes) == 1:
        result = _propagate_across(volume, binary, model, spacing, axis, options, modality, cache, progress, cancel,
                                   affine)
    else:
        # Painted on several planes: each plane's painting walked across its own axis, then combined.
        # "Only between the painted slices" bounds the slicing axis; the other planes walk freely.
        free = replace(options, between_painted_only=False)
        results = [_propagate_across(volume, on_slices(binary, a, zs), model, spacing, a,
                                     options if a == axis else free, modality, cache, progress, cancel, affine)
                   for a, zs in planes.items()]
        within = (planes[axis][0], planes[axis][-1]) if options.between_painted_only else None
        result = _combined(results, binary, axis, planes, within)
    result.filled_outlines = outlines
    return result


def _propagate_across(volume: np.ndarray, binary: np.ndarray, model: Model, spacing: tuple[float, float, float],
                      axis: int, options: PropagationOptions, modality: Modality | Literal["auto"],
                      cache: FeatureCache | None, progress: ProgressCallback | None,
                      cancel: Callable[[], bool] | None, affine: np.ndarray | None) -> PropagationResult:
    """:func:`propagate` for a painting made on slices across one axis."""
    view = InPlaneView.for_scan(model, volume, affine, axis, modality)
    slices = view.show(np.moveaxis(volume, axis, 0))
    paint = view.show(np.moveaxis(binary, axis, 0))
    spacing_hw = view.spacing(tuple(float(s) for i, s in enumerate(spacing) if i != axis))
    painted_slices = [int(z) for z in np.flatnonzero(paint.reshape(len(paint), -1).any(axis=1))]

    start = time.perf_counter()
    feats, spent = volume_features(model, slices, spacing_hw, modality, cache, options.mirror_average)
    painted_by_slice = _grid_masks(paint, painted_slices, feats)
    # The backbone runs as the walk reaches slices: progress counts the slices scored.
    scorer = make_scorer(model, feats, feats, painted_by_slice, cancel=cancel, progress=progress)
    n_slices = paint.shape[0]
    pixel_mm = _pixel_mm(spacing_hw, feats)
    limits = (painted_slices[0], painted_slices[-1]) if options.between_painted_only else (0, n_slices - 1)
    seeds = {p: _seed(soft) for p, soft in painted_by_slice.items()}
    region = _walk(scorer, n_slices, seeds, limits, options, pixel_mm)
    threshold = _calibrated_threshold(scorer, seeds, options, pixel_mm) if options.calibrate_threshold \
        else options.threshold
    fill = options.fill_holes and not has_holes(paint[painted_slices])
    out, confidence = _render(scorer, region, feats, threshold, n_slices, fill)
    if options.intensity_gate > 0 and feats.modality == "mri":
        out = _intensity_gated(out, confidence, slices, paint, painted_slices, options.intensity_gate, fill)
    if options.ct_band_stop > 0 and feats.modality == "ct":
        out = _band_stopped(out, confidence, slices, paint, painted_slices, options.ct_band_stop)
    out[painted_slices] = paint[painted_slices]  # what the user painted is kept exactly
    seconds = embedding_seconds(feats) - spent
    return PropagationResult(mask=np.moveaxis(view.back(out), 0, axis), confidence=confidence,
                             slice_range=_slice_range(out), painted_slices=painted_slices,
                             seconds_features=seconds, seconds_head=time.perf_counter() - start - seconds,
                             reused_features=seconds == 0, axis=axis, read_as=feats.read_as,
                             tiny_paintings=[(axis, painted_voxel(binary, axis, z)) for z in tiny_paintings(paint)])


def propagate_labels(volume: np.ndarray, painted: np.ndarray, model: Model,
                     spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                     axis: int | Literal["auto"] | dict[int, int] = 2,
                     options: PropagationOptions | None = None, modality: Modality | Literal["auto"] = "auto",
                     cache: FeatureCache | None = None, progress: ProgressCallback | None = None,
                     cancel: Callable[[], bool] | None = None,
                     affine: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, PropagationResult]]:
    """Every structure painted (one label value each) propagated through ``volume``.

    The backbone runs once per slicing axis; each label is walked as :func:`propagate` walks
    one, across ``axis``, or each across its own (``{label: axis}``), or with ``"auto"`` across
    the plane it was painted on (:func:`painting_axis`; each result's ``axis`` says which).
    Where two structures claim a voxel, the one more confident on its slice keeps it; painted
    voxels keep their painted label. Returns the label volume (``painted``'s values,
    ``volume``'s shape) and each label's result.
    """
    painted = integer_painting(painted)
    cache = cache if cache is not None else FeatureCache(max_volumes=3)  # one per slicing axis walked
    labels = painted_labels(painted)
    if isinstance(axis, dict):
        axes = {label: axis[label] for label in labels}
    else:
        axes = {label: painting_axis(painted == label, affine=affine) if axis == "auto" else axis
                for label in labels}
    results = {}
    for label in sorted(labels, key=lambda value: axes[value] % 3):  # one axis' features at a time
        results[label] = propagate(volume, painted, model, spacing, axes[label], label, options, modality, cache,
                                   progress, cancel, affine)
    out = merge_structures(results)
    out[painted != 0] = painted[painted != 0]  # what the user painted is kept exactly
    return out, results


def merge_structures(results: dict[int, PropagationResult]) -> np.ndarray:
    """One label volume from several structures' masks (same shape): a voxel two claim goes to
    the one whose region is more confident on its slice (along each result's own axis)."""
    labels = sorted(results)
    owner = np.zeros(results[labels[0]].mask.shape, dtype=np.uint16)  # index into labels, 1-based
    for k, label in enumerate(labels, start=1):
        result = results[label]
        claimed = result.mask.astype(bool)
        taken = claimed & (owner > 0)
        if taken.any():
            where = np.nonzero(taken)
            mine = result.confidence[where[result.axis]]
            theirs = np.empty_like(mine)
            holders = owner[where]
            for j in np.unique(holders):
                other = results[labels[j - 1]]
                held = holders == j
                theirs[held] = other.confidence[where[other.axis][held]]
            lost = np.zeros_like(claimed)
            lost[tuple(w[mine <= theirs] for w in where)] = True
            claimed &= ~lost
        owner[claimed] = k
    values = np.array([0, *labels], dtype=np.result_type(*map(np.min_scalar_type, (0, *labels))))
    return values[owner]


# --------------------------------------------------------------------------- another scan
def _best_component(prob: np.ndarray, threshold: float, target_mm2: float, pixel_area: float,
                    target_centre: np.ndarray | None = None, frame: tuple[np.ndarray, np.ndarray] | None = None,
                    spread: float = 0.0) -> tuple[float, np.ndarray | None]:
    """The predicted component most like the support: mean probability x area agreement
    (x closeness to the support's position within the body's box, when ``spread`` > 0)."""
    components, count = ndimage.label(prob > threshold)
    if count == 0:
        return 0.0, None
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(prob), components, index) * pixel_area
    means = ndimage.mean(prob, components, index)
    scores = means * np.minimum(areas, target_mm2) / np.maximum(areas, target_mm2)
    if spread > 0 and target_centre is not None and frame is not None:
        centres = np.array(ndimage.center_of_mass(np.ones_like(prob), components, index)).reshape(-1, 2)
        relative = (centres - frame[0]) / frame[1]
        scores = scores * np.exp(-0.5 * (np.linalg.norm(relative - target_centre, axis=1) / spread) ** 2)
    best = int(np.argmax(scores))
    return float(scores[best]), components == best + 1


def _body_frame(feats: VolumeFeatures, slices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(origin, size) of the box around the body on the model grid, over the given slices (spread
    through the volume).

    Positions relative to it compare patients of different size and field of view; the body is
    what stands out from the darkest background in the network's own input features' norm.
    """
    energy = feats.slices(slices).float().norm(dim=1).mean(dim=0).numpy()  # (h, w)
    low, high = np.percentile(energy, [5, 95])
    inside = energy > low + 0.25 * (high - low)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        rows, cols = np.arange(energy.shape[0]), np.arange(energy.shape[1])
    scale = np.array(feats.grid_size) / np.array(energy.shape)
    origin = np.array([rows[0], cols[0]]) * scale
    size = np.array([rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1]) * scale
    return origin, size


def search_slices(count: int, thickness_mm: float, step_mm: float) -> list[int]:
    """Slices at most ``step_mm`` apart through a volume of ``count`` slices, ``thickness_mm``
    apart (every slice when ``step_mm`` is 0 or no more than the thickness), the last included."""
    step = max(1, int(step_mm // thickness_mm)) if step_mm > 0 and thickness_mm > 0 else 1
    chosen = list(range(0, count, step))
    return chosen if chosen[-1] == count - 1 else [*chosen, count - 1]


def chunk_centres(slices: list[int], chunks: int) -> list[int]:
    """The slices at 1/6, 1/2 and 5/6 of a sorted list (for 3 chunks): the paper's supports,
    the centres of equal parts of the structure."""
    return sorted({slices[int(len(slices) * (2 * c + 1) / (2 * chunks))] for c in range(chunks)})


def _check_same_kind(support_volume: np.ndarray, query_volume: np.ndarray) -> None:
    """A CT support finds nothing like its structure in an MRI, nor the other way round (phantom
    liver, spleen and kidney: 0-31 Dice, at the confidence of a true find), so such a query is
    refused, not segmented; a modality given for both reads them as one."""
    names = {"ct": "CT", "mri": "MRI"}
    support, query = detect_modality(support_volume), detect_modality(query_volume)
    if support != query:
        raise DenseMPError(f"The support was read as {names[support]} and this scan as {names[query]}: a structure "
                           f"is found only in scans of the support's kind. If both are {names[support]} (or both "
                           f"{names[query]}), say so with the modality (--modality, or the widget's scan type).")


def _support_reach(own: Scorer, count: int, painted: list[int], reference: int, masks: dict[int, torch.Tensor],
                   support_mm: float, query_mm: float, options: PropagationOptions,
                   pixel_mm: tuple[float, float]) -> tuple[int, int]:
    """How many query slices a walk may go down and up from the slice matched to the support's
    ``reference``: ``options.extent_limit`` x the support structure's extent (mm) on each side of
    it. A 3D support's extent is its mask's; a structure painted on fewer slices than the
    support's chunks is first walked through its own ``count`` slices. Unlimited when
    ``extent_limit`` is 0, and on a side where the structure was not found beyond ``reference``."""
    unlimited = 10**9
    if options.extent_limit <= 0:
        return unlimited, unlimited
    if len(painted) >= options.support_chunks:
        low, high = painted[0], painted[-1]
    else:
        walked = _walk(own, count, {z: _seed(masks[z]) for z in painted}, (0, count - 1), options, pixel_mm)
        extent = [z for z, kept in walked.items() if kept.any()] + painted
        low, high = min(extent), max(extent)
    # A side with nothing beyond the reference (the support's own walk stopped there) says nothing.
    down, up = (int(np.ceil(options.extent_limit * slices * support_mm / query_mm)) if slices > 0 else unlimited
                for slices in (reference - low, high - reference))
    return down, up


def segment_like(support_volume: np.ndarray, support_mask: np.ndarray, query_volume: np.ndarray, model: Model,
                 support_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 query_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), axis: int = 2,
                 label: int | None = None, options: PropagationOptions | None = None,
                 modality: Modality | Literal["auto"] = "auto", cache: FeatureCache | None = None,
                 progress: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None,
                 support_affine: np.ndarray | None = None,
                 query_affine: np.ndarray | None = None) -> PropagationResult:
    """Segment in ``query_volume`` the structure masked in ``support_volume`` (another patient).

    Nothing tells where the structure lies in the query: query slices at most
    ``options.search_step_mm`` apart (every slice of a thicker scan) are scored against the
    support's prototypes, the slice whose best region is most confident and most like the
    support in area (weighted by a prior on the support's relative position along the
    axis, ``options.position_prior``) seeds the same walk as :func:`propagate`, which goes no
    further each way than ``options.extent_limit`` x the support structure's extent on that side
    of its largest slice (the support painted on one slice is walked through its own scan for
    that). Both scans must run the same way along the axis (:func:`~napari_densemp.batch.segment_scan`
    turns a query into the support's orientation first). A support mask
    on several slices (a finished 3D mask) then supplies ``options.support_chunks`` supports,
    the centres of equal parts of the structure, each anchored at the matching part of the
    query's found extent (the paper's pairing). A support painted on slices of two planes (an
    axial and a coronal slice) is found and walked across each, combined as :func:`propagate`
    combines them.

    The affines, when given, show both scans to the model in its training orientation, as
    :func:`propagate` does. Returns a :class:`PropagationResult` on the query's grid; ``found_at``
    holds the query slices where supports were anchored (empty when the structure was not found).
    """
    options = options or model.default_options()
    walk_options = replace(options, min_confidence=options.cross_min_confidence)
    support_volume, support_mask, axis = _check_inputs(support_volume, support_mask, support_spacing, axis,
                                                       "support image", "support mask")
    query_volume = check_volume(query_volume, "query image")
    _check_axis_spacing(axis, query_spacing)
    if modality == "auto":
        _check_same_kind(support_volume, query_volume)
    binary, label = painted_binary(support_mask, label)
    outlines: list[tuple[int, int]] = []
    if options.fill_outlines:
        binary, outlines = filled_outlines(binary, axis)
    planes = painted_planes(binary, axis)
    if len(planes) > 1:  # painted on several planes: found and walked across each, combined as propagate does
        results = [segment_like(support_volume, on_slices(binary, a, zs), query_volume, model, support_spacing,
                                query_spacing, a, None, options, modality, cache, progress, cancel, support_affine,
                                query_affine) for a, zs in planes.items()]
        return replace(_combined(results, np.zeros(query_volume.shape, bool), axis, planes), filled_outlines=outlines)
    support_view = InPlaneView.for_scan(model, support_volume, support_affine, axis, modality)
    query_view = InPlaneView.for_scan(model, query_volume, query_affine, axis, modality)
    support = support_view.show(np.moveaxis(binary, axis, 0))
    support_slices = support_view.show(np.moveaxis(support_volume, axis, 0))
    query = query_view.show(np.moveaxis(query_volume, axis, 0))
    support_hw = support_view.spacing(tuple(float(s) for i, s in enumerate(support_spacing) if i != axis))
    query_hw = query_view.spacing(tuple(float(s) for i, s in enumerate(query_spacing) if i != axis))
    painted = [int(z) for z in np.flatnonzero(support.reshape(len(support), -1).any(axis=1))]
    areas = support.reshape(len(support), -1).sum(axis=1)
    reference = int(np.argmax(areas))

    start = time.perf_counter()
    s_feats, s_spent = volume_features(model, support_slices, support_hw, modality, cache, options.mirror_average)
    q_feats, q_spent = volume_features(model, query, query_hw, modality, cache, options.mirror_average)
    # Searched: slices a few mm apart through the query (the body's box and the scores), and through
    # the support (its body's box); the walks embed the slices they reach as they reach them.
    n = query.shape[0]
    q_searched = search_slices(n, float(query_spacing[axis]), options.search_step_mm)
    s_searched = search_slices(len(support), float(support_spacing[axis]), options.search_step_mm)
    for feats, searched in ((s_feats, s_searched), (q_feats, q_searched)):
        for volume_feats in (feats, feats.mirrored):
            if volume_feats is not None:
                volume_feats.slices(searched, progress, cancel)
    s_masks = _grid_masks(support, painted, s_feats)
    s_pixel, q_pixel = _pixel_mm(support_hw, s_feats), _pixel_mm(query_hw, q_feats)
    reference_mask = {reference: s_masks[reference]}

    # Width: the threshold that best redraws the support from its own prototypes.
    own = make_scorer(model, s_feats, s_feats, reference_mask, cancel=cancel)
    threshold = _calibrated_threshold(own, {reference: _seed(s_masks[reference])}, options, s_pixel) \
        if options.calibrate_threshold else options.threshold
    # Pass 1: where is it? Score the searched query slices against the reference support slice.
    scorer = make_scorer(model, q_feats, s_feats, reference_mask, {0: reference}, cancel)
    target_mm2 = float(areas[reference]) * support_hw[0] * support_hw[1]
    q_area = q_pixel[0] * q_pixel[1]
    scores, regions = np.zeros(n), {}
    s_frame, q_frame = _body_frame(s_feats, s_searched), _body_frame(q_feats, q_searched)
    s_centre = (np.array(ndimage.center_of_mass(_seed(s_masks[reference]))) - s_frame[0]) / s_frame[1]
    stride = q_searched[1] - q_searched[0] if len(q_searched) > 1 else 1
    for i, z in enumerate(q_searched):  # scored ahead along the searched slices only
        scores[z], regions[z] = _best_component(scorer(z, stride, n), options.threshold, target_mm2, q_area,
                                                s_centre, q_frame, options.inplane_prior)
        if progress is not None:
            progress(i + 1, len(q_searched), "finding the structure")
    scorer.progress = progress  # the walks: slices scored, as propagate reports them
    if options.position_prior > 0:
        relative = (reference + 0.5) / len(support)
        positions = (np.arange(n) + 0.5) / n
        scores = scores * np.exp(-0.5 * ((positions - relative) / options.position_prior) ** 2)
    out = np.zeros((n, *q_feats.native_size), dtype=bool)
    confidence = np.zeros(n, dtype=np.float32)
    found_at: list[int] = []
    if scores.max() > 0:
        # The most consistent slab: walk from the best few candidate slices and keep the walk
        # with the most confident mass (a spurious look-alike ends within a slice or two).
        reach = _support_reach(own, len(support), painted, reference, s_masks, float(support_spacing[axis]),
                               float(query_spacing[axis]), options, s_pixel)
        best_mass, region, limits = -1.0, {}, (0, n - 1)
        for candidate in np.argsort(scores)[::-1][:options.seed_candidates]:
            if scores[candidate] <= 0:
                break
            bounds = (max(int(candidate) - reach[0], 0), min(int(candidate) + reach[1], n - 1))
            walked = _walk(scorer, n, {int(candidate): regions[candidate]}, bounds, walk_options, q_pixel)
            mass = sum(float(scorer(z)[kept].mean()) for z, kept in walked.items() if kept.any())
            if mass > best_mass:
                best_mass, region, found_at, limits = mass, walked, [int(candidate)], bounds
        # Pass 2 (a 3D support): the paper's pairing of support chunks with query chunks.
        extent = sorted(z for z, kept in region.items() if kept.any())
        chunks = min(options.support_chunks, len(painted))
        if chunks > 1 and len(extent) >= chunks:
            support_centres = chunk_centres(painted, chunks)
            query_centres = chunk_centres(list(range(extent[0], extent[-1] + 1)), chunks)
            if len(support_centres) == len(query_centres):
                scorer = make_scorer(model, q_feats, s_feats, {s: s_masks[s] for s in support_centres},
                                     dict(zip(query_centres, support_centres)), cancel, progress)
                seeds = {q: region[q] for q in query_centres}
                region = _walk(scorer, n, seeds, limits, walk_options, q_pixel)
                found_at = query_centres
        fill = options.fill_holes and not has_holes(support[painted])
        out, confidence = _render(scorer, region, q_feats, threshold, n, fill)
    seconds = embedding_seconds(q_feats) - q_spent  # both scans' backbone time in this call
    if s_feats is not q_feats:
        seconds += embedding_seconds(s_feats) - s_spent
    return PropagationResult(mask=np.moveaxis(query_view.back(out), 0, axis), confidence=confidence,
                             slice_range=_slice_range(out), painted_slices=[], seconds_features=seconds,
                             seconds_head=time.perf_counter() - start - seconds, reused_features=seconds == 0,
                             found_at=found_at, axis=axis, read_as=q_feats.read_as, filled_outlines=outlines)


def segment_like_labels(support_volume: np.ndarray, support_mask: np.ndarray, query_volume: np.ndarray,
                        model: Model, support_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                        query_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), axis: int = 2,
                        options: PropagationOptions | None = None, modality: Modality | Literal["auto"] = "auto",
                        cache: FeatureCache | None = None, progress: ProgressCallback | None = None,
                        cancel: Callable[[], bool] | None = None, support_affine: np.ndarray | None = None,
                        query_affine: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, PropagationResult]]:
    """Every structure of ``support_mask`` (one label value each) found and segmented in
    ``query_volume``, as :func:`segment_like` does one; both volumes' features are computed once.

    Returns the query's label volume (the support's values; a voxel two structures claim goes to
    the one more confident on that slice) and each label's result.
    """
    support_mask = integer_painting(support_mask)
    needed = 2 * len(walked_axes(support_mask, axis % 3))  # support and query, per plane walked
    if cache is None or cache.max_volumes < needed:  # ... must all stay for every label
        cache = FeatureCache(max_volumes=needed)
    results = {label: segment_like(support_volume, support_mask, query_volume, model, support_spacing, query_spacing,
                                   axis, label, options, modality, cache, progress, cancel, support_affine,
                                   query_affine)
               for label in painted_labels(support_mask)}
    return merge_structures(results), results
