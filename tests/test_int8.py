"""int8 inference, an option for CPUs without native bf16: close to fp32, only when asked."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from napari_densemp.checkpoint import load_checkpoint, save_checkpoint
from napari_densemp.engine import load_model, propagate
from napari_densemp.errors import DenseMPError
from napari_densemp.int8 import activation_qparams, int8_embedder
from napari_densemp.network import FewShotSegmenter, NetworkConfig
from napari_densemp.preprocessing import prepare_volume
from src_data.phantoms import LIVER, SPLEEN

from .conftest import dice, paint_largest


def _slices(phantom, model) -> torch.Tensor:
    slices = np.moveaxis(phantom.image, 2, 0)[::4]
    return prepare_volume(slices, phantom.spacing[:2], model.profile, phantom.modality)[0][:, None]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


@pytest.mark.parametrize("organ", [LIVER, SPLEEN])
def test_the_bundled_model_in_int8_segments_as_in_fp32(ct_phantom, mri_phantom, organ):
    """The bundled default carries int8 scales measured on other phantoms: features agree
    with fp32 (cosine 0.998 measured) and so do the propagated masks."""
    fp32, int8 = load_model("default", "cpu", precision="fp32"), load_model("default", "cpu", precision="int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    with torch.inference_mode():
        for phantom in (ct_phantom, mri_phantom):
            slices = _slices(phantom, fp32)
            assert _cosine(int8.embed(slices), fp32.embed(slices)) > 0.99
    painted, _ = paint_largest(ct_phantom.label, organ)
    truth = ct_phantom.label == organ
    masks = [propagate(ct_phantom.image, painted, model, spacing=ct_phantom.spacing, axis=2).mask
             for model in (fp32, int8)]
    assert dice(masks[1], masks[0]) > 0.95
    assert dice(masks[1], truth) > dice(masks[0], truth) - 0.02


def test_slices_are_quantized_over_their_own_range():
    """z-scores from -6 to 12, far beyond any calibration phantom's (-0.8 to 4.1): nothing is
    clipped, every value lands within half a step (a fixed, calibrated range would clip them)."""
    from napari_densemp.int8 import ACTIVATION_MAX, _SliceQuant

    quant = _SliceQuant()
    slices = torch.linspace(-6, 12, 1000).reshape(1, 1, 10, 100)
    assert quant(slices) is slices  # a pass-through while calibrating
    quant.quantizes = True
    quantized = quant(slices)
    assert quantized.q_scale() == pytest.approx(18 / ACTIVATION_MAX, rel=1e-5)
    assert float((quantized.dequantize() - slices).abs().max()) <= quantized.q_scale() / 2 + 1e-5


def test_int8_is_asked_for_never_chosen_and_needs_the_checkpoints_scales(tmp_path, monkeypatch, tiny_network):
    """int8 moved validation Dice by -0.7 on CHAOS, so "auto" never picks it: bf16 where it is
    native, else fp32. Asked for, it needs int8 scales (exported checkpoints carry them)."""
    import napari_densemp.engine as engine

    monkeypatch.setattr(engine, "use_bf16", lambda device: False)
    assert load_model("default", "cpu").precision == "fp32"
    monkeypatch.setattr(engine, "use_bf16", lambda device: True)
    assert load_model("default", "cpu").precision == "bf16 autocast"
    assert load_model("default", "cpu", precision="int8").precision == "int8"
    plain = save_checkpoint(tmp_path / "plain.pt", tiny_network, load_model("default", "cpu").profile)
    assert load_checkpoint(plain).int8 is None
    with pytest.raises(DenseMPError, match="carries no int8 scales; `densemp-train export` adds them"):
        load_model(plain, "cpu", precision="int8")
    with pytest.raises(DenseMPError, match="Unknown precision 'int4'"):
        load_model("default", "cpu", precision="int4")


def test_scales_of_another_architecture_are_refused_by_name(tmp_path, tiny_network, caplog):
    profile = load_model("default", "cpu").profile
    foreign = save_checkpoint(tmp_path / "foreign.pt", tiny_network, profile,
                              int8={"activation_qparams": {"stem.0.activation_post_process": [0.1, 0.0]}})
    with caplog.at_level(logging.WARNING, logger="napari_densemp.int8"), \
            pytest.raises(DenseMPError, match="int8 inference is unavailable"):
        load_model(foreign, "cpu", precision="int8")
    assert "scales belong to another architecture" in caplog.text
    assert load_model(foreign, "cpu").precision in ("fp32", "bf16 autocast")


def test_bottleneck_backbones_quantize_too():
    """ResNet-50 (bottleneck blocks, a downsampling skip in each layer), random weights:
    calibrated on some batches, int8 features agree with fp32 on others."""
    torch.manual_seed(0)
    network = FewShotSegmenter(NetworkConfig(depth=50, last_layer=3, feature_dim=32)).eval()
    with torch.no_grad():  # trained-like batch norms: activations neither vanish nor explode
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.2, 0.5)
    batches = [torch.randn(2, 1, 64, 64) for _ in range(4)]
    quantized = int8_embedder(network, activation_qparams(network, batches))
    assert quantized is not None
    test = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        assert _cosine(quantized(test), network.embed(test)) > 0.98
