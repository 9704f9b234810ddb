"""One checkpoint format: round trip, and refusal of anything that is not one."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch

from napari_densemp.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from napari_densemp.errors import DenseMPError
from napari_densemp.network import NetworkConfig
from napari_densemp.preprocessing import PreprocessingProfile


def test_round_trip_keeps_weights_architecture_profile_provenance(tmp_path, tiny_network):
    profile = PreprocessingProfile(in_plane_spacing_mm=1.5)
    path = save_checkpoint(tmp_path / "m.pt", tiny_network, profile, provenance={"iterations": 7, "data": ["a"]})
    ckpt = load_checkpoint(path)
    assert ckpt.network == tiny_network.config
    assert ckpt.preprocessing == profile
    assert ckpt.provenance == {"iterations": 7, "data": ["a"]}
    rebuilt = ckpt.build_model()
    for key, value in tiny_network.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_half_precision_export_is_smaller_and_close(tmp_path, tiny_network):
    full = save_checkpoint(tmp_path / "full.pt", tiny_network, PreprocessingProfile())
    half = save_checkpoint(tmp_path / "half.pt", tiny_network, PreprocessingProfile(), half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    weights = load_checkpoint(half).state_dict["reduction.weight"]
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, tiny_network.reduction.weight.detach(), rtol=1e-3, atol=1e-4)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-densemp-checkpoint", "payload": _Exploit()}, path)
    with pytest.raises(DenseMPError, match="Refused to load"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_foreign_and_broken_files_get_clear_messages(tmp_path, tiny_network):
    plain = tmp_path / "state_dict.pt"
    torch.save(tiny_network.state_dict(), plain)
    with pytest.raises(DenseMPError, match="not a napari-densemp checkpoint"):
        load_checkpoint(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DenseMPError, match="Cannot read"):
        load_checkpoint(garbage)
    with pytest.raises(DenseMPError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_newer_format_version_is_refused(tmp_path, tiny_network):
    path = save_checkpoint(tmp_path / "m.pt", tiny_network, PreprocessingProfile())
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(DenseMPError, match="format version"):
        load_checkpoint(path)


def test_checkpoint_file_is_a_plain_torch_zip(tmp_path, tiny_network):
    path = save_checkpoint(tmp_path / "m.pt", tiny_network, PreprocessingProfile())
    assert zipfile.is_zipfile(path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    # only torch's own rebuild functions and plain containers are referenced
    for opcode_arg in (b"os\nsystem", b"builtins\neval", b"posix"):
        assert opcode_arg not in data


def test_mismatched_weights_are_reported(tmp_path, tiny_network):
    path = save_checkpoint(tmp_path / "m.pt", tiny_network, PreprocessingProfile())
    payload = torch.load(path, weights_only=True)
    payload["network"] = NetworkConfig(depth=18, last_layer=4, feature_dim=32).to_dict()
    torch.save(payload, path)
    with pytest.raises(DenseMPError, match="do not fit"):
        load_checkpoint(path).build_model()


def test_bundled_models_load_by_name():
    """v3 (v0 fine-tuned) is the default; v0 (stage 2, no labels) and v2 (the whole pipeline)
    ship beside it; an unknown name is named."""
    from napari_densemp.engine import bundled_models, load_model

    assert {"default", "v0", "v2", "v3"} <= set(bundled_models())
    default = load_model("default", "cpu")
    assert default.name == "default_v3.pt" and default.provenance["stage"] == "finetune"
    assert default.provenance["from"].endswith("default_v0.pt") and default.provenance["in_volume_p"] == 0.5
    v0 = load_model("v0", "cpu")
    assert v0.provenance["stage"] == "stage2" and v0.provenance["iterations"] == 27000
    v2 = load_model("v2", "cpu")
    assert v2.provenance["stage"] == "finetune" and v2.provenance["in_volume_p"] == 0.5
    assert v2.provenance["from_provenance"]["iterations"] == 40000
    with pytest.raises(DenseMPError, match=r"Unknown model 'v7'.*'v2'"):
        load_model("v7", "cpu")
