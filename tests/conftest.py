"""Shared fixtures: everything is generated (phantoms) or made by hand; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_densemp.network import FewShotSegmenter, NetworkConfig
from src_data.phantoms import Phantom, make_phantom

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ct_phantom() -> Phantom:
    return make_phantom(seed=11, modality="ct")


@pytest.fixture(scope="session")
def mri_phantom() -> Phantom:
    return make_phantom(seed=12, modality="mri")


@pytest.fixture(scope="session")
def other_ct() -> Phantom:
    """Another patient for ct_phantom's support: paint once, segment many."""
    return make_phantom(seed=21, modality="ct")


@pytest.fixture(scope="session")
def default_model():
    from napari_densemp.engine import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def v0_model():
    """The label-free v0, for engine checks whose figures were measured with it."""
    from napari_densemp.engine import load_model

    return load_model("v0", device="cpu")


@pytest.fixture
def tiny_network() -> FewShotSegmenter:
    torch.manual_seed(0)
    return FewShotSegmenter(NetworkConfig(depth=18, last_layer=3, feature_dim=32))


def paint_largest(label: np.ndarray, organ: int) -> tuple[np.ndarray, int]:
    """Paint ``organ`` on its slice of largest area (axis 2), as a user would."""
    truth = label == organ
    z = int(truth.sum(axis=(0, 1)).argmax())
    painted = np.zeros(label.shape, dtype=np.uint8)
    painted[..., z] = truth[..., z]
    return painted, z


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))
