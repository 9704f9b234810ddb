"""The network and every ALP rule, pinned on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_densemp.network import (
    DilatedResNet,
    FewShotSegmenter,
    NetworkConfig,
    class_score,
    masked_average,
    support_prototypes,
)

# A few of torchvision's resnet18 / resnet50 state_dict keys: weights from it load by name.
TORCHVISION_R18_KEYS = {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
                        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
                        "layer3.1.conv2.weight", "layer4.1.bn2.num_batches_tracked"}
TORCHVISION_R50_KEYS = {"layer1.0.conv3.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.weight",
                        "layer3.5.conv2.weight"}


@pytest.mark.parametrize("depth,last_layer,channels", [(18, 3, 256), (18, 4, 512), (50, 3, 1024), (50, 4, 2048)])
def test_backbone_output_stride_8(depth, last_layer, channels):
    net = DilatedResNet(depth, last_layer).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 96))
    assert out.shape == (1, channels, 8, 12)
    assert net.out_channels == channels


def test_torchvision_parameter_names():
    assert set(DilatedResNet(18, 4).state_dict()) >= TORCHVISION_R18_KEYS
    assert set(DilatedResNet(50, 4).state_dict()) >= TORCHVISION_R50_KEYS
    assert not any(k.startswith("layer4") for k in DilatedResNet(18, 3).state_dict())
    assert len(DilatedResNet(101, 4).layer3) == 23


def test_dilation_replaces_stride_in_layer3_and_4():
    net = DilatedResNet(50, 4)
    assert net.layer3[0].conv2.stride == (1, 1) and net.layer3[0].conv2.dilation == (1, 1)
    assert net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv2.dilation == (2, 2) and net.layer4[1].conv2.dilation == (4, 4)


def test_model_embed_repeats_one_channel_and_reduces():
    model = FewShotSegmenter(NetworkConfig(depth=18, last_layer=3, feature_dim=16)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        a = model.embed(x)
        b = model.embed(x.repeat(1, 3, 1, 1))
    assert a.shape == (2, 16, 4, 4)
    torch.testing.assert_close(a, b)
    assert model.reduction.bias is None and model.reduction.kernel_size == (1, 1)


def test_masked_average_formula():
    features = torch.arange(8.0).view(2, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    expected = (features * mask).sum(dim=(1, 2)) / (1.5 + 1e-5)
    torch.testing.assert_close(masked_average(features, mask), expected)


def _features(h: int, w: int, channels: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(channels, h, w)


def test_local_prototypes_need_095_coverage():
    cfg = NetworkConfig()
    features = _features(8, 8)
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1.0  # one full 4x4 cell: passes the small-structure check
    mask[4:6, 4:6] = 0.9  # a 2x2 cell at 0.9 coverage: not a local prototype
    fg, bg = support_prototypes(features, mask, window=2, config=cfg)
    # 4 full 2x2 cells + the global prototype
    assert fg.shape == (5, 3)
    expected_cell = features[:, :2, :2].mean(dim=(1, 2))
    assert any(torch.allclose(p, expected_cell) for p in fg)
    torch.testing.assert_close(fg[-1], masked_average(features, mask))
    # background cells: all 2x2 cells with (1 - mask) > 0.95: 16 - 4 (fg) - 1 (0.9 cell, bg 0.1) = 11
    assert bg.shape == (11, 3)


def test_small_structure_gets_only_the_global_prototype():
    cfg = NetworkConfig()
    features = _features(8, 8)
    mask = torch.zeros(8, 8)
    mask[1:4, 1:4] = 1.0  # 3x3: covers full 2x2 cells but no 4x4 cell
    fg, _ = support_prototypes(features, mask, window=2, config=cfg)
    assert fg.shape == (1, 3)
    torch.testing.assert_close(fg[0], masked_average(features, mask))


def test_background_falls_back_to_global_instead_of_crashing():
    cfg = NetworkConfig()
    features = _features(8, 8)
    mask = torch.ones(8, 8)
    mask[0, 0] = 0.0  # no background cell reaches 0.95
    fg, bg = support_prototypes(features, mask, window=2, config=cfg)
    assert bg.shape == (1, 3)
    torch.testing.assert_close(bg[0], masked_average(features, 1.0 - mask))
    assert fg.shape[0] == 15 + 1  # every 2x2 cell but the one holding the hole, + global


def test_vanilla_panet_uses_one_prototype_per_class():
    cfg = NetworkConfig(local_prototypes=False)
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1.0
    fg, bg = support_prototypes(_features(8, 8), mask, window=2, config=cfg)
    assert fg.shape == (1, 3) and bg.shape == (1, 3)


def test_class_score_is_softmax_weighted_scaled_cosine():
    query = torch.tensor([[[[1.0]], [[0.0]]]])  # (1, 2, 1, 1): the unit vector e1
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    cos = torch.tensor([1.0, 0.0, 1 / math.sqrt(2)])
    s = 20 * cos
    expected = (torch.softmax(s, 0) * s).sum()
    torch.testing.assert_close(class_score(query, prototypes, 20.0)[0, 0, 0], expected)


def test_episode_loss_weights_and_alignment():
    torch.manual_seed(0)
    cfg = NetworkConfig(depth=18, last_layer=3, feature_dim=8)
    model = FewShotSegmenter(cfg)
    image = torch.randn(1, 1, 32, 32)
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[:, 8:24, 8:24] = 1
    total, parts = model.episode_loss(image, mask, image, mask)
    assert math.isclose(float(total.detach()), parts["query"] + parts["align"], rel_tol=1e-5)
    total.backward()
    assert model.reduction.weight.grad is not None and model.reduction.weight.grad.abs().sum() > 0

    # The query loss is cross-entropy with weights [0.05, 1] and ignore 255.
    no_align = FewShotSegmenter(NetworkConfig(depth=18, last_layer=3, feature_dim=8, align_weight=0.0))
    no_align.load_state_dict(model.state_dict())
    label = mask.clone()
    label[:, :4] = 255
    with torch.no_grad():
        total, parts = no_align.episode_loss(image, mask, image, label)
        feats = no_align.embed(torch.cat([image, image]))
        logits = no_align.predict_logits(feats[1:], feats[0], mask[0].float(), cfg.train_window)
        logits = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
        expected = F.cross_entropy(logits, label, weight=torch.tensor([0.05, 1.0]), ignore_index=255)
    assert parts["align"] == 0.0
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-5)


def test_config_rejects_unknown_architectures():
    with pytest.raises(ValueError, match="depth"):
        NetworkConfig(depth=42)
    with pytest.raises(ValueError, match="last_layer"):
        NetworkConfig(last_layer=2)
