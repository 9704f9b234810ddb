"""``densemp-train export``: a training checkpoint made into a product model.

The training state is dropped, weights are stored as float16 (unless asked not to), tuned
propagation rules and training orientations may be recorded, and the int8 activation scales
are measured on exactly the weights shipped, on phantoms of both modalities, so that CPUs
without native bf16 run the model in int8 from the first load (:mod:`napari_densemp.int8`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from napari_densemp.checkpoint import load_checkpoint, save_checkpoint
from napari_densemp.errors import DenseMPError
from napari_densemp.int8 import activation_qparams
from napari_densemp.network import FewShotSegmenter
from napari_densemp.preprocessing import PreprocessingProfile, prepare_volume, stored_hu_offset
from src_data.phantoms import make_phantom

# Phantoms of both modalities (seeds no benchmark scores), every 6th slice: 36 slices
CALIBRATION_PHANTOMS = ((101, "ct"), (102, "mri"), (103, "ct"), (104, "mri"))
CALIBRATION_STEP = 6


def calibration_batches(profile: PreprocessingProfile, batch_size: int = 8) -> list[torch.Tensor]:
    """Prepared one-channel slices (B, 1, H, W) of the calibration phantoms."""
    batches = []
    for seed, modality in CALIBRATION_PHANTOMS:
        phantom = make_phantom(seed=seed, modality=modality)
        slices = np.moveaxis(phantom.image, 2, 0)
        prepared, _ = prepare_volume(slices, phantom.spacing[:2], profile, modality, stored_hu_offset(slices))
        chosen = prepared[::CALIBRATION_STEP, None]
        batches += [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    return batches


def int8_scales(network: FewShotSegmenter, profile: PreprocessingProfile) -> dict:
    """The checkpoint's ``int8`` entry for ``network``."""
    seeds = ", ".join(f"{modality} {seed}" for seed, modality in CALIBRATION_PHANTOMS)
    return {"activation_qparams": activation_qparams(network, calibration_batches(profile)),
            "calibration": f"histograms of every {CALIBRATION_STEP}th slice of phantoms {seeds}"}


def export_checkpoint(checkpoint: Path, out: Path, rules: dict | None = None,
                      orientations: dict[str, str] | None = None, half: bool = True,
                      overwrite: bool = False) -> Path:
    """Write ``checkpoint`` as a product model at ``out`` (never over an existing file unless
    ``overwrite``); ``rules`` and ``orientations`` are recorded as given, after validation."""
    if out.exists() and not overwrite:
        raise DenseMPError(f"{out} exists; pass --overwrite to replace it.")
    state = load_checkpoint(checkpoint)
    provenance = dict(state.provenance)
    if rules:
        provenance["propagation"] = {**provenance.get("propagation", {}), **rules}
    profile = state.preprocessing
    if orientations:
        profile = PreprocessingProfile.from_dict({**profile.to_dict(), "orientations": {
            **profile.orientations, **{k.lower(): v.upper() for k, v in orientations.items()}}})
    network = state.build_model()
    if half:  # the scales are measured on the weights as shipped
        network.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                                 for k, v in network.state_dict().items()})
    return save_checkpoint(out, network, profile, provenance=provenance, half=half,
                           int8=int8_scales(network, profile))
