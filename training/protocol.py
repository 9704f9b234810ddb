"""The paper's evaluation protocol for one (support, query) pair, with the engine's parts.

Supports: the support scan's organ slices at 1/6, 1/2 and 5/6 of their sorted list. Each query
slice inside the query's ground-truth organ extent (the oracle) is assigned to one of 3 equal
chunks of that extent and segmented with that chunk's support; slices outside it are not
predicted. Kept beside the oracle-free :func:`napari_densemp.engine.segment_like` so the cost
of not knowing the extent is always visible.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_densemp.engine import (
    FeatureCache,
    InPlaneView,
    Model,
    SliceScorer,
    chunk_centres,
    slice_prototypes,
    volume_features,
)
from napari_densemp.preprocessing import resize_slices


def paper_protocol_mask(model: Model, support_volume: np.ndarray, support_label: np.ndarray,
                        query_volume: np.ndarray, query_label: np.ndarray,
                        support_spacing: tuple[float, float, float], query_spacing: tuple[float, float, float],
                        chunks: int = 3, axis: int = 2, cache: FeatureCache | None = None,
                        support_affine: np.ndarray | None = None,
                        query_affine: np.ndarray | None = None) -> np.ndarray:
    """The query's predicted mask under the paper's protocol (zero outside the true extent).

    ``support_label`` and ``query_label`` are binary masks of the organ; the affines, when given,
    show both scans to the model as the engine does (:class:`InPlaneView`).
    """
    s_view = InPlaneView.for_scan(model, support_volume, support_affine, axis, "auto")
    q_view = InPlaneView.for_scan(model, query_volume, query_affine, axis, "auto")
    support = s_view.show(np.moveaxis(np.asarray(support_label, dtype=bool), axis, 0))
    truth = q_view.show(np.moveaxis(np.asarray(query_label, dtype=bool), axis, 0))
    s_hw = s_view.spacing(tuple(float(s) for i, s in enumerate(support_spacing) if i != axis))
    q_hw = q_view.spacing(tuple(float(s) for i, s in enumerate(query_spacing) if i != axis))
    # Embedded as scored: the support's 3 slices and the query's true extent only.
    s_feats, _ = volume_features(model, s_view.show(np.moveaxis(support_volume, axis, 0)), s_hw, "auto", cache)
    q_feats, _ = volume_features(model, q_view.show(np.moveaxis(query_volume, axis, 0)), q_hw, "auto", cache)

    organ_slices = [int(z) for z in np.flatnonzero(support.reshape(len(support), -1).any(axis=1))]
    extent = np.flatnonzero(truth.reshape(len(truth), -1).any(axis=1))
    out = np.zeros(truth.shape, dtype=bool)
    if not organ_slices or extent.size == 0:
        return np.moveaxis(q_view.back(out), 0, axis)
    centres = chunk_centres(organ_slices, chunks)
    grid = resize_slices(torch.from_numpy(support[centres].astype(np.float32)), s_feats.grid_size)
    prototypes = slice_prototypes(model, s_feats, dict(zip(centres, grid)))
    first, last = int(extent[0]), int(extent[-1])
    length = last - first + 1
    for z in range(first, last + 1):
        chunk = min(int((z - first) * len(centres) / length), len(centres) - 1)
        scorer = SliceScorer(model, q_feats, {z: prototypes[centres[chunk]]})
        prob = scorer(z)
        native = resize_slices(torch.from_numpy(prob)[None], q_feats.native_size)[0]
        out[z] = (native > 0.5).numpy()
    return np.moveaxis(q_view.back(out), 0, axis)
