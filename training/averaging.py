"""Weight averaging of checkpoints that share a starting point (WiSE-FT, a "model soup").

Fine-tuning moves a model towards its labelled organs and away from what the pre-trained
weights did well elsewhere; interpolating the two sets of weights often keeps most of both,
at no training cost (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022).
It only makes sense for models fine-tuned from one another, so architectures and
preprocessing must match exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from napari_densemp.checkpoint import Checkpoint, load_checkpoint
from napari_densemp.errors import DenseMPError


def average_checkpoints(paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None
                        ) -> Checkpoint:
    """Weighted mean of every floating tensor (BatchNorm statistics included).

    Integer tensors (BatchNorm's batch counters) are taken from the first checkpoint. The
    provenance names each source with its weight and keeps the sources' own provenance.
    """
    if len(paths) < 2:
        raise DenseMPError("averaging needs at least two checkpoints")
    weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise DenseMPError(f"{len(paths)} checkpoints but {len(weights)} weights")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise DenseMPError(f"weights must be non-negative and not all zero, got {weights}")
    weights = [w / sum(weights) for w in weights]
    sources = [load_checkpoint(p) for p in paths]
    first = sources[0]
    for path, other in zip(paths[1:], sources[1:], strict=True):
        if other.network != first.network:
            raise DenseMPError(f"{path} has another architecture ({other.network}) than {paths[0]} "
                               f"({first.network}); only models fine-tuned from one another can be averaged")
        if other.preprocessing != first.preprocessing:
            raise DenseMPError(f"{path} preprocesses scans differently from {paths[0]}: "
                               f"{other.preprocessing} against {first.preprocessing}")
        if other.state_dict.keys() != first.state_dict.keys() or any(
                other.state_dict[k].shape != v.shape for k, v in first.state_dict.items()):
            raise DenseMPError(f"{path} and {paths[0]} hold different tensors")
    state = {}
    for key, tensor in first.state_dict.items():
        if tensor.is_floating_point():
            state[key] = sum(w * s.state_dict[key].double() for w, s in zip(weights, sources, strict=True)
                             ).to(tensor.dtype)
        else:
            state[key] = tensor.clone()
    provenance = {
        "stage": "average",
        "data": sorted({name for s in sources for name in s.provenance.get("data", [])}),
        "sources": [{"path": str(p), "weight": w, "provenance": s.provenance}
                    for p, w, s in zip(paths, weights, sources, strict=True)],
    }
    rules = [s.provenance.get("propagation") for s in sources]
    if rules[0] is not None and all(r == rules[0] for r in rules):
        provenance["propagation"] = rules[0]
    return Checkpoint(first.network, first.preprocessing, state, provenance)
