"""Stage 1, fine-tuning, and the loop's scale features (DDP, accumulation, resume) on CPU."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from napari_densemp.checkpoint import load_checkpoint
from napari_densemp.network import FewShotSegmenter, NetworkConfig
from napari_densemp.preprocessing import PreprocessingProfile
from src_data.datasets import PreparedScan
from training.episodes import SuperpixelEpisodes
from training.finetune import FinetuneEpisodes
from training.loop import Distributed, OptimConfig, RunInfo, data_loader, train
from training.stage1 import ContrastiveViews, DenseCLConfig, Stage1Config, info_nce, match_locations, run_stage1
from training.stage2 import episode_inputs, load_backbone

from .test_training import _toy_scans

TINY = NetworkConfig(depth=18, last_layer=3, feature_dim=16)


def test_dense_positives_are_matched_on_backbone_features():
    torch.manual_seed(0)
    query = torch.randn(2, 32, 49)
    permutation = torch.stack([torch.randperm(49), torch.randperm(49)])
    key = torch.stack([query[b][:, permutation[b]] for b in range(2)]) + 0.05 * torch.randn(2, 32, 49)
    matched = match_locations(query, key)
    assert torch.equal(matched, torch.argsort(permutation, dim=1))  # key m holds query permutation[m]
    # and InfoNCE is low for the matched pair, high when a negative is the one that agrees
    positive, negatives = torch.tensor([0.9]), torch.tensor([[0.1, -0.2, 0.0]])
    assert info_nce(positive, negatives, 0.2) < 0.1 < info_nce(torch.tensor([0.0]), torch.tensor([[0.9, 0.1]]), 0.2)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A few 2D 'radiographs' (PNG) and one NIfTI scan: both kinds of stage-1 source."""
    from skimage import io

    root = tmp_path_factory.mktemp("stage1")
    rng = np.random.default_rng(0)
    (root / "roco" / "class_a").mkdir(parents=True)
    for i in range(3):
        image = (rng.random((80, 96)) * 255).astype(np.uint8)
        image[20:50, 30:60] = 255
        io.imsave(root / "roco" / "class_a" / f"img{i}.png", image, check_contrast=False)
    volume = rng.normal(0, 300, (48, 48, 6)).astype(np.float32)
    volume[:4] = -1000  # some air: a CT
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "scan.nii.gz")
    return root


def _stage1(run_dir, sources, iterations, stop_at=None):
    return Stage1Config(sources=sources, run_dir=run_dir, size=64, batch=4, seed=1, device="cpu",
                        model=DenseCLConfig(depth=18, last_layer=3, queue=32, dim=16),
                        optim=OptimConfig(iterations=iterations, lr=0.01, schedule="cosine", weight_decay=1e-4,
                                          checkpoint_every=3, log_every=1, amp="off", stop_at=stop_at))


def test_contrastive_views_are_two_different_augmentations(image_folder):
    views = ContrastiveViews([image_folder / "roco", image_folder / "scan.nii.gz"], size=64, seed=3,
                             cache_dir=image_folder / "cache")
    assert sum(k < 0 for _, k in views.items) == 3 and sum(k >= 0 for _, k in views.items) == 6
    a, b = views[5], views[5]
    torch.testing.assert_close(a["view1"], b["view1"])  # a pure function of (seed, index)
    assert a["view1"].shape == (1, 64, 64) and not torch.equal(a["view1"], a["view2"])
    assert abs(float(a["view1"].mean())) < 1e-4 and abs(float(a["view1"].std()) - 1) < 1e-3


def test_stage1_reads_scan_folders_like_stage2(tmp_path):
    """Benchmark patients held out, OpenKBP's stored HU + 1024 windowed as CT, bad scans skipped."""
    rng = np.random.default_rng(1)
    ct = rng.normal(40, 30, (32, 32, 4)).astype(np.float32)
    ct[:6] = -1000  # air around the body
    chaos, openkbp = tmp_path / "chaos", tmp_path / "openkbp"
    chaos.mkdir(), openkbp.mkdir()
    for folder, name, volume in [(chaos, "image_1", ct), (chaos, "image_31", ct)] + [
            (openkbp, f"pt_{k}_ct", ct + 1024) for k in range(1, 12)]:
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), chaos / "image_2.nii.gz")  # 2D
    views = ContrastiveViews([chaos, openkbp], size=32, cache_dir=tmp_path / "cache")
    assert sorted({p.name for p, _ in views.items}) == ["image_1.npy", "pt_1_ct.npy"]  # pt_2..11: the last 10
    why = "The image_2 must be a 3D volume; got 2D with shape (8, 8)."
    assert views.skipped == {str(chaos / "image_2.nii.gz"): why}  # recorded in the checkpoint's provenance
    windowed = [np.load(tmp_path / "cache" / f"{n}.npy").astype(np.float32) for n in ("image_1", "pt_1_ct")]
    np.testing.assert_allclose(windowed[0], windowed[1], atol=1e-3)  # the offset removed before the CT window
    assert float(windowed[0][:, 6:].mean()) == pytest.approx((40 + 125) / 400, abs=0.02)
    everything = ContrastiveViews([chaos], size=32, cache_dir=tmp_path / "cache", hold_out=False)
    assert "image_31.npy" in {p.name for p, _ in everything.items}
    beside = ContrastiveViews([chaos], size=32)  # no cache folder given: inside the scan folder
    assert {p.parent for p, _ in beside.items} == {chaos / ".densemp-stage1"}


@pytest.mark.slow
def test_stage1_resumes_exactly_and_its_backbone_loads_into_stage2(image_folder, tmp_path):
    sources = [image_folder / "roco", image_folder / "scan.nii.gz"]
    straight = load_checkpoint(run_stage1(_stage1(tmp_path / "straight", sources, 4)))
    run_stage1(_stage1(tmp_path / "resumed", sources, 4, stop_at=2))  # a job that ran out of time
    resumed = load_checkpoint(run_stage1(_stage1(tmp_path / "resumed", sources, 4)))
    for key, value in straight.training["module"].items():  # encoders, heads and both queues
        torch.testing.assert_close(resumed.training["module"][key], value, msg=key)
    assert int(straight.training["module"]["queue_position"]) == (4 * 4) % 32
    assert straight.provenance["stage"] == "stage1" and straight.provenance["global_batch"] == 4
    assert straight.provenance["data"] == [str(image_folder / "roco" / "class_a"), "scan"]  # scans by name

    model = FewShotSegmenter(NetworkConfig(depth=18, last_layer=3, feature_dim=16))
    load_backbone(model, tmp_path / "straight" / "last.pt")  # raises on any missing or unexpected key
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, straight.training["module"][f"backbone.{key}"], msg=key)


def _toy_train(run_dir, dist: Distributed, batch: int, accumulate: int, iterations: int = 3) -> Path:
    torch.manual_seed(0)
    model = FewShotSegmenter(TINY)
    dataset = SuperpixelEpisodes(_toy_scans(), crop=32, seed=4)
    optim = OptimConfig(iterations=iterations, accumulate=accumulate, checkpoint_every=iterations, log_every=1,
                        amp="off")
    loader = data_loader(dataset, 0, batch, optim, dist)
    return train(model, loader, episode_inputs, lambda m: m, PreprocessingProfile(), optim, run_dir,
                 RunInfo(stage="test"), dist, resume=False)


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        _toy_train(run_dir, Distributed(rank, world, torch.device("cpu")), batch=1, accumulate=1)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same summation order
    try:
        single = _toy_train(tmp_path / "single", Distributed(), batch=1, accumulate=2)
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint(tmp_path / "ddp" / "last.pt"), load_checkpoint(single)
    assert a.provenance["world_size"] == 2 and b.provenance["world_size"] == 1
    parameters = {name for name, _ in FewShotSegmenter(TINY).named_parameters()}
    for key in parameters:  # BN running statistics are rank-local by design (rank 0's are saved)
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], atol=1e-6, rtol=1e-5, msg=key)
    # and the run is not trivially unchanged from its initial weights
    torch.manual_seed(0)
    initial = FewShotSegmenter(TINY).state_dict()
    assert not torch.allclose(initial["reduction.weight"], b.state_dict["reduction.weight"])


def test_finetune_episodes_mix_labelled_and_superpixel_and_respect_setting_2():
    scans = _toy_scans()
    for scan in scans:  # two labelled classes on every scan: 1 on slices 1-3, 3 on slice 2 only
        scan.label[1:4, 30:40, 30:40] = 1
    dataset = FinetuneEpisodes(scans, crop=32, seed=2, labelled=0.5)
    assert dataset.classes == [("", 1), ("", 3)] and dataset.supports[("", 1)] == (0, [1, 2, 3])
    episodes = [dataset.episode(i) for i in range(40)]
    labelled = [e for e in episodes if e["labelled"]]
    assert 10 <= len(labelled) <= 30  # about half of them
    for e in labelled:  # a class region (100 px for class 1, 25 for class 3), binarised
        assert set(torch.unique(e["query_label"]).tolist()) == {0, 1}
        assert int(e["support_mask"].sum()) in (25, 100)
        assert 15 <= int(e["query_label"].sum()) <= 170  # augmented: scale 0.9-1.2 (area x1.44), elastic
    excluded = FinetuneEpisodes(scans, crop=32, seed=2, excluded_classes=[3], labelled=0.5)
    assert excluded.classes == [("", 1)]
    assert all(z != 2 for c in excluded.queries for _, z in excluded.queries[c])  # slice 2 holds class 3
    assert 2 not in excluded.supports[("", 1)][1]
    # label values name classes within a data set only: two sets' 1s are two classes
    split = FinetuneEpisodes(scans + scans, crop=32, seed=2, groups=["a", "a", "b", "b"])
    assert split.classes == [("a", 1), ("a", 3), ("b", 1), ("b", 3)] and split.supports[("b", 1)][0] == 2


def test_in_volume_episodes_pair_two_slices_of_one_scan_in_one_window():
    """The product's own episode: support (a large-area organ slice) and query (an organ slice
    or one of the 3 past either end, labelled empty) from one scan, cut from the same window."""
    from training.augment import AugmentConfig

    identity = AugmentConfig(rotation_deg=0, translation_px=0, shear_deg=0, scale=(1, 1), elastic_alpha=0,
                             gamma=(1, 1))
    scans = []
    for s in range(2):  # every pixel holds its position code, + 0.5 on the second scan
        code = (np.arange(32)[:, None] * 32 + np.arange(32)[None]).astype(np.float16) + 0.5 * s
        label = np.zeros((12, 32, 32), np.int16)
        label[4, 10:14, 10:14] = label[7, 10:14, 10:14] = 1  # organ on slices 4-7, large on 5-6
        label[5:7, 8:16, 8:16] = 1
        scans.append(PreparedScan(f"s{s}", np.repeat(code[None], 12, 0), np.ones((12, 32, 32), np.int32),
                                  label, "mri"))
    dataset = FinetuneEpisodes(scans, crop=24, seed=1, labelled=1.0, in_volume=1.0, augment_config=identity)
    assert dataset.volumes[("", 1)] == [(s, [5, 6], list(range(1, 11))) for s in (0, 1)]
    episodes = [dataset.episode(i) for i in range(60)]
    for e in episodes:
        assert int(e["support_mask"].sum()) == 64  # always a large-area slice
        assert int(e["query_label"].sum()) in (0, 16, 64)
        assert torch.allclose(e["query_image"], e["support_image"], atol=0.01)  # same scan, same window
    empty = sum(int(e["query_label"].sum()) == 0 for e in episodes)
    assert 20 <= empty <= 50  # slices 1-3 and 8-10: 6 of the 10 query slices hold no organ
    # the paper's episodes (in_volume 0): support always the class's fixed scan (scan 0), query scan 1
    paper = FinetuneEpisodes(scans, crop=24, seed=1, labelled=1.0, augment_config=identity)
    for e in (paper.episode(i) for i in range(20)):
        assert float(e["support_image"][0, 0, 0]) % 1 == 0 and abs(float(e["query_image"][0, 0, 0]) % 1 - 0.5) < 0.01


@pytest.mark.slow
def test_cli_chains_stage1_stage2_and_finetune(image_folder, tmp_path):
    from training.cli import main as train_main

    tiny = ["--depth", "18", "--last-layer", "3", "--amp", "off", "--device", "cpu", "--log-every", "1"]
    assert train_main(["stage1", "--images", str(image_folder / "roco"), "--out", str(tmp_path / "s1"),
                       "--iterations", "2", "--size", "64", "--batch", "2", "--queue", "16", *tiny]) == 0
    assert train_main(["stage2", "--phantoms", "1", "--out", str(tmp_path / "s2"), "--iterations", "2",
                       "--crop", "64", "--feature-dim", "16", "--init-backbone", str(tmp_path / "s1" / "last.pt"),
                       *tiny]) == 0
    assert train_main(["finetune", str(tmp_path / "s2" / "last.pt"), "--phantoms", "1", "--out",
                       str(tmp_path / "ft"), "--iterations", "2", "--crop", "64", "--labelled", "0.5",
                       "--in-volume", "0.5", *tiny[4:]]) == 0
    tuned = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert tuned.provenance["stage"] == "finetune"
    assert [c.split(":")[1] for c in tuned.provenance["classes"]] == ["1", "2", "3", "6"]
    assert tuned.provenance["from_provenance"]["init_backbone"].endswith("s1/last.pt")
    assert tuned.network.feature_dim == 16
    assert tuned.provenance["optim"]["lr"] == 1e-4
    assert tuned.provenance["labelled_p"] == 0.5 and tuned.provenance["in_volume_p"] == 0.5


@pytest.mark.parametrize("gpus, ranks_here, device, backend", [
    (2, 2, "cuda:1", "nccl"),  # one GPU per rank
    (1, 2, "cuda:0", "gloo"),  # two ranks share the one GPU: NCCL would refuse
])
def test_ranks_take_their_gpu_and_share_one_over_gloo(monkeypatch, gpus, ranks_here, device, backend):
    """Which GPU and which backend a rank of ``torchrun`` picks (the GPU itself is faked)."""
    from training.loop import torch_dist

    chosen = {}
    monkeypatch.setenv("WORLD_SIZE", str(ranks_here))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks_here))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: chosen.setdefault("device", str(dev)))
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda name: chosen.setdefault("backend", name))
    monkeypatch.setattr(torch_dist, "get_rank", lambda: 1)
    monkeypatch.setattr(torch_dist, "get_world_size", lambda: ranks_here)
    dist = Distributed.setup("cuda")
    assert (str(dist.device), chosen["device"], chosen["backend"]) == (device, device, backend)
    assert (dist.rank, dist.world, dist.is_main) == (1, ranks_here, False)
