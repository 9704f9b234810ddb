"""The one checkpoint format: weights, architecture, preprocessing, provenance, version.

Files are written with ``torch.save`` and read with ``torch.load(weights_only=True)``, whose
unpickler accepts tensors and plain containers only: a file that smuggles code is refused.
Training checkpoints are the same format with an extra ``training`` entry (optimiser,
schedule, RNG, iteration) so that one loader serves the product and resume alike. Exported
models may carry ``int8``: the activation scales of int8 inference (:mod:`napari_densemp.int8`).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import write_atomically
from .errors import DenseMPError
from .network import FewShotSegmenter, NetworkConfig
from .preprocessing import PreprocessingProfile

FORMAT_NAME = "napari-densemp-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    network: NetworkConfig
    preprocessing: PreprocessingProfile
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    int8: dict[str, Any] | None = None  # {"activation_qparams": {observer: [scale, zero point]}, "calibration": str}

    def build_model(self) -> FewShotSegmenter:
        model = FewShotSegmenter(self.network)
        try:
            missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise DenseMPError(f"Checkpoint weights do not fit its own architecture: {exc}") from None
        if missing or unexpected:
            raise DenseMPError(f"Checkpoint weights do not fit its own architecture {self.network}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}.")
        return model.eval()


def save_checkpoint(path: str | os.PathLike, model: FewShotSegmenter, profile: PreprocessingProfile,
                    provenance: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
                    half: bool = False, int8: dict[str, Any] | None = None) -> Path:
    """Write atomically (temporary file + rename), so a kill never leaves half a checkpoint.

    ``half`` stores floating weights as float16 to keep shipped models small.
    """
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "network": model.config.to_dict(),
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in profile.to_dict().items()},
        "provenance": provenance or {},
        "state_dict": state,
        "training": training,
        "int8": int8,
    }
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint without executing any pickled code; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise DenseMPError(f"Checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DenseMPError(f"Refused to load {path}: it holds pickled objects other than tensors and "
                           f"plain data (possibly code), which a napari-densemp checkpoint never does. "
                           f"({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        raise DenseMPError(f"Cannot read {path} as a checkpoint: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise DenseMPError(f"{path} is not a napari-densemp checkpoint (a plain state_dict or another "
                           f"tool's file?). Train one with `densemp-train` or use the bundled default.")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DenseMPError(f"{path} has checkpoint format version {version}; this napari-densemp reads "
                           f"up to {FORMAT_VERSION}. Upgrade napari-densemp.")
    try:
        network = NetworkConfig(**payload["network"])
    except (TypeError, ValueError) as exc:
        raise DenseMPError(f"{path} describes an architecture this version cannot build: {exc}") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    return Checkpoint(network=network, preprocessing=PreprocessingProfile.from_dict(payload["preprocessing"]),
                      state_dict=state, provenance=dict(payload.get("provenance") or {}),
                      training=payload.get("training"), int8=payload.get("int8"))
