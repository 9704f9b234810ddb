"""Augmentations, episodes and the stage-2 loop (a few iterations on tiny phantoms)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_densemp.checkpoint import load_checkpoint
from napari_densemp.engine import PropagationOptions, load_model
from napari_densemp.network import NetworkConfig
from src_data.datasets import PreparedScan
from training.augment import AugmentConfig, augment, random_grid
from training.cli import main as train_main
from training.episodes import SuperpixelEpisodes, usable_slices
from training.loop import OptimConfig
from training.stage2 import Stage2Config, prepare_all, run_stage2

IDENTITY = AugmentConfig(rotation_deg=0, translation_px=0, shear_deg=0, scale=(1, 1), elastic_alpha=0,
                         gamma=(1, 1))


def test_identity_augmentation_changes_nothing():
    images = torch.randn(2, 1, 20, 30)
    masks = (torch.rand(2, 20, 30) > 0.5).long()
    out_images, out_masks = augment(images, masks, IDENTITY, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out_images, images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_masks, masks)


def test_translation_moves_content_by_pixels():
    cfg = AugmentConfig(rotation_deg=0, translation_px=5, shear_deg=0, scale=(1, 1), elastic_alpha=0, gamma=(1, 1))
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 16, 16] = 1.0
    generator = torch.Generator().manual_seed(3)
    out, _ = augment(image, torch.zeros(1, 32, 32), cfg, generator)
    y, x = np.unravel_index(int(out[0, 0].argmax()), (32, 32))
    assert abs(int(y) - 16) + abs(int(x) - 16) >= 1 and abs(int(y) - 16) <= 5 and abs(int(x) - 16) <= 5


def test_reference_augmentation_keeps_masks_binary_and_range():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 1, 64, 64)
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    masks[:, 20:40, 20:40] = 1
    out, out_masks = augment(images, masks, AugmentConfig(), generator)
    assert set(out_masks.unique().tolist()) <= {0, 1}
    assert 250 < out_masks[0].sum() < 700  # a 400-pixel square, scaled 0.9-1.2
    assert out.min() >= images.min() - 1e-4 and out.max() <= images.max() + 1e-4
    grid = random_grid(4, 64, 64, AugmentConfig(), torch.Generator().manual_seed(2))
    assert grid.shape == (4, 64, 64, 2) and grid.abs().max() < 1.5


def _toy_scans() -> list[PreparedScan]:
    rng = np.random.default_rng(0)
    scans = []
    for i in range(2):
        image = rng.standard_normal((4, 48, 48)).astype(np.float16)
        segments = np.zeros((4, 48, 48), dtype=np.int32)
        segments[:, :24] = 1
        segments[:, 24:] = 2
        segments[0] = 0  # no superpixel: never used
        label = np.zeros((4, 48, 48), dtype=np.int16)
        label[2, 5:10, 5:10] = 3  # slice 2 holds class 3
        scans.append(PreparedScan(f"toy{i}", image, segments, label, "mri"))
    return scans


def test_usable_slices_and_setting2_exclusion():
    scans = _toy_scans()
    assert len(usable_slices(scans)) == 6
    excluded = usable_slices(scans, excluded_classes=[3])
    assert len(excluded) == 4 and 2 not in excluded[:, 1]


def test_episodes_are_a_pure_function_of_seed_and_index():
    dataset = SuperpixelEpisodes(_toy_scans(), crop=32, seed=5)
    a, b = dataset.episode(17), dataset.episode(17)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    c = dataset.episode(18)
    assert not torch.equal(a["query_image"], c["query_image"])
    assert a["support_image"].shape == (1, 32, 32) and a["support_mask"].shape == (32, 32)
    assert a["support_mask"].sum() > 0 and a["query_label"].sum() > 0
    assert not torch.equal(a["support_image"], a["query_image"])  # two independent augmentations
    torch.testing.assert_close(dataset[17]["query_image"], a["query_image"])


@pytest.mark.parametrize("kind", ["superpixel", "labelled"])
def test_mirrored_episodes_are_the_plain_ones_flipped_alike(kind):
    """--mirror: each episode is the same episode with support and query flipped along the same
    in-plane axes; all four flip combinations occur, about equally."""
    from training.finetune import FinetuneEpisodes

    def dataset(mirror: bool):
        if kind == "superpixel":
            return SuperpixelEpisodes(_toy_scans(), crop=32, seed=5, mirror=mirror)
        return FinetuneEpisodes(_toy_scans(), crop=32, seed=5, labelled=1.0, mirror=mirror)

    plain, mirrored = dataset(False), dataset(True)
    seen = {}
    for index in range(80):
        a, b = plain.episode(index), mirrored.episode(index)
        matches = [dims for dims in ((), (-1,), (-2,), (-2, -1))
                   if all(torch.equal(torch.flip(a[k], dims) if dims else a[k], b[k])
                          for k in ("support_image", "support_mask", "query_image", "query_label"))]
        assert len(matches) >= 1, index
        assert torch.equal(a["index"], b["index"])
        seen[matches[0]] = seen.get(matches[0], 0) + 1
    assert set(seen) == {(), (-1,), (-2,), (-2, -1)} and min(seen.values()) >= 10, seen


def _config(run_dir, iterations: int, phantoms_dir=None) -> Stage2Config:
    return Stage2Config(run_dir=run_dir, phantoms=1, crop=64, seed=3,
                        network=NetworkConfig(depth=18, last_layer=3, feature_dim=32),
                        optim=OptimConfig(iterations=iterations, checkpoint_every=2, log_every=1, amp="off"),
                        device="cpu")


@pytest.mark.slow
def test_stage2_resume_matches_uninterrupted_run(tmp_path):
    straight = run_stage2(_config(tmp_path / "straight", 4))
    run_stage2(_config(tmp_path / "resumed", 2))
    with open(tmp_path / "resumed" / "log.csv", "a") as log:  # logged, then killed before a checkpoint
        log.write("3,9.9,9.9,0.0,0.001,1.0,1.0\n")
    resumed = run_stage2(_config(tmp_path / "resumed", 4))  # picks up last.pt at iteration 2
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a.training["iteration"] == b.training["iteration"] == 4
    for key, value in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[key], value, msg=key)
    with open(tmp_path / "resumed" / "log.csv") as log:
        rows = list(csv.DictReader(log))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]  # the replayed row 3 once, not twice
    assert float(rows[2]["loss"]) != 9.9
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert a.provenance["stage"] == "stage2" and a.provenance["iterations"] == 4
    assert any(name.startswith("phantom_ct") for name in a.provenance["data"])
    assert a.preprocessing.orientations == {"ct": "LPS", "mri": "LPS"}  # how the phantoms are stored


def test_scans_prepared_by_parallel_processes_equal_the_serial_ones(tmp_path):
    from napari_densemp.preprocessing import PreprocessingProfile
    from src_data.datasets import find_scans
    from src_data.phantoms import write_cohort

    write_cohort(tmp_path / "scans", 1, "ct", first_seed=5)
    write_cohort(tmp_path / "scans", 1, "mri", first_seed=6)
    records = find_scans(tmp_path / "scans")
    serial = prepare_all(records, PreprocessingProfile(), tmp_path / "serial").scans
    parallel = prepare_all(records, PreprocessingProfile(), tmp_path / "parallel", workers=2).scans
    assert len(serial) == len(parallel) == 2 and len(list((tmp_path / "parallel").glob("*.npz"))) == 2
    for a, b in zip(serial, parallel):
        assert a.name == b.name and a.modality == b.modality
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.superpixels, b.superpixels)
        assert a.superpixels.max() > 10  # real superpixels, not an empty placeholder


def test_an_interrupted_run_checkpoints_its_last_finished_step(tmp_path, monkeypatch):
    """Ctrl-C between checkpoints (every 2 steps here) loses no step: last.pt holds step 3."""
    import training.loop as loop

    class InterruptAfter3Steps:
        def __init__(self, wrapped):
            self.wrapped, self.served = wrapped, 0

        def __iter__(self):
            for batch in self.wrapped:
                if self.served == 3:
                    raise KeyboardInterrupt
                self.served += 1
                yield batch

    real = loop.train
    monkeypatch.setattr("training.stage2.train", lambda model, batches, *a, **k: real(
        model, InterruptAfter3Steps(batches), *a, **k))
    with pytest.raises(KeyboardInterrupt):
        run_stage2(_config(tmp_path, 10))
    state = load_checkpoint(tmp_path / "last.pt")
    assert state.training["iteration"] == state.provenance["iterations"] == 3


@pytest.mark.slow
def test_sigterm_stops_the_cli_with_a_checkpoint_at_the_last_finished_step(tmp_path):
    """What a scheduler's time limit sends: exit code 130 and no finished step lost."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "stage2", "--phantoms", "1", "--out", str(run), "--iterations",
         "100000", "--checkpoint-every", "100000", "--log-every", "1", "--depth", "18", "--last-layer", "3",
         "--feature-dim", "16", "--crop", "64", "--amp", "off", "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if (run / "log.csv").is_file() and len((run / "log.csv").read_text().splitlines()) > 3:
                break
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err
    logged = [int(line.split(",")[0]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    iteration = load_checkpoint(run / "last.pt").training["iteration"]
    assert iteration >= 3 and iteration >= max(logged)


@pytest.mark.slow
def test_train_cli_runs_and_exports(tmp_path, capsys):
    run = tmp_path / "run"
    code = train_main(["stage2", "--phantoms", "1", "--out", str(run), "--iterations", "3", "--depth", "18",
                       "--last-layer", "3", "--feature-dim", "16", "--crop", "64", "--amp", "off",
                       "--device", "cpu"])
    assert code == 0
    assert train_main(["export", str(run / "last.pt"), str(tmp_path / "model.pt")]) == 0
    exported = load_checkpoint(tmp_path / "model.pt")
    assert exported.training is None and exported.network.feature_dim == 16
    # int8 scales measured on the weights as shipped, so int8 runs from the first load
    assert exported.int8["calibration"].startswith("histograms of every 6th slice of phantoms")
    assert load_model(tmp_path / "model.pt", "cpu", precision="int8").precision == "int8"
    assert train_main(["export", str(run / "last.pt"), str(tmp_path / "model.pt")]) == 2
    assert "exists" in capsys.readouterr().err
    # rules tuned for this model ride in the checkpoint and become the engine's defaults for it
    assert train_main(["export", str(run / "last.pt"), str(tmp_path / "tuned.pt"),
                       "--rule", "min_confidence=0.65", "seed_candidates=3", "calibrate_threshold=false"]) == 0
    model = load_model(tmp_path / "tuned.pt", "cpu")
    options = model.default_options(between_painted_only=True)
    assert (options.min_confidence, options.seed_candidates, options.calibrate_threshold) == (0.65, 3, False)
    assert options.between_painted_only and options.max_growth == PropagationOptions().max_growth
    assert model.default_options(min_confidence=0.9).min_confidence == 0.9  # the caller's choice wins
    assert load_model(tmp_path / "model.pt", "cpu").default_options() == PropagationOptions()
    assert train_main(["export", str(run / "last.pt"), str(tmp_path / "bad.pt"), "--rule", "confidence=1"]) == 2
    assert "min_confidence" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()
    # the orientation a model's training scans had: recorded by stage 2, overridable at export
    assert exported.preprocessing.orientations == {"ct": "LPS", "mri": "LPS"}
    assert train_main(["export", str(run / "last.pt"), str(tmp_path / "oriented.pt"), "--orientation", "ct=ras"]) == 0
    assert load_checkpoint(tmp_path / "oriented.pt").preprocessing.orientations == {"ct": "RAS", "mri": "LPS"}
    assert train_main(["export", str(run / "last.pt"), str(tmp_path / "bad.pt"), "--orientation", "ct=RAA"]) == 2
    assert "ct='RAA'" in capsys.readouterr().err and not (tmp_path / "bad.pt").exists()
    # the paper's vanilla PA-Net baseline is a configuration of the same network
    assert train_main(["stage2", "--phantoms", "1", "--out", str(tmp_path / "vanilla"), "--iterations", "1",
                       "--depth", "18", "--last-layer", "3", "--feature-dim", "16", "--crop", "64", "--amp", "off",
                       "--device", "cpu", "--global-prototypes-only"]) == 0
    assert load_checkpoint(tmp_path / "vanilla" / "last.pt").network.local_prototypes is False


def test_training_shows_every_scan_in_one_orientation(tmp_path):
    """A phantom CT stored as written (LPS, twice) and the same CT stored RAS (data flipped, the
    affine moved with it): prepared for training, all come out turned to the profile's
    orientation, labels identical; a profile without one takes the storage most scans have."""
    import nibabel as nib

    from napari_densemp.io import write_nifti
    from napari_densemp.preprocessing import PreprocessingProfile
    from src_data.datasets import ScanRecord, prepare_scan
    from src_data.phantoms import make_phantom
    from training.stage2 import prepare_all

    phantom = make_phantom(seed=5, modality="ct")
    to_ras = np.array([[0, -1], [1, -1], [2, 1]], dtype=float)
    ras = phantom.affine @ nib.orientations.inv_ornt_aff(to_ras, phantom.image.shape)
    records = []
    for name, turn, affine in (("lps", lambda a: a, phantom.affine), ("lps_copy", lambda a: a, phantom.affine),
                               ("ras", lambda a: nib.orientations.apply_orientation(a, to_ras), ras)):
        for suffix, data in (("", phantom.image), ("_label", phantom.label)):
            write_nifti(tmp_path / f"{name}{suffix}.nii.gz", np.ascontiguousarray(turn(data)), affine)
        records.append(ScanRecord(name, tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_label.nii.gz"))
    assert [nib.aff2axcodes(nib.load(str(r.image)).affine) for r in records][1:] == [tuple("LPS"), tuple("RAS")]

    prepared = prepare_all(records, PreprocessingProfile(orientations={"ct": "RAS"}), None)
    scans, profile = prepared.scans, prepared.profile
    assert profile.orientations == {"ct": "RAS"}
    stored = prepare_scan(records[0], PreprocessingProfile()).label  # on its stored (LPS) grid
    np.testing.assert_array_equal(scans[0].label, stored[:, ::-1, ::-1])
    # the RAS file was resampled on its own grid: nearest-neighbour ties at the centre column differ
    assert (scans[2].label == stored[:, ::-1, ::-1]).mean() > 0.999
    np.testing.assert_allclose(scans[0].image.astype(np.float32), scans[2].image.astype(np.float32), atol=2e-2)
    majority = prepare_all(records, PreprocessingProfile(), None)
    assert majority.profile.orientations == {"ct": "LPS"}
    np.testing.assert_array_equal(majority.scans[0].label, stored)
    assert (majority.scans[2].label == stored).mean() > 0.999


def test_training_leaves_out_a_bad_scan_and_names_it(tmp_path, capsys, caplog):
    """A truncated download, a scan with NaN and a label of another shape beside a good phantom:
    stage 2 trains on the phantom alone, warns about each and lists them in the checkpoint's
    provenance; a folder of bad scans only stops with every one named. Run in worker processes
    too, where a fault must not end the pool."""
    from napari_densemp.io import write_nifti
    from src_data.phantoms import make_phantom, write_cohort

    data = tmp_path / "scans"
    write_cohort(data, 1, "mri", first_seed=6)
    good = next(data.glob("phantom_mri_*_label.nii.gz")).name.replace("_label", "")
    phantom = make_phantom(seed=7, modality="mri")
    whole = write_nifti(tmp_path / "whole.nii.gz", phantom.image, phantom.affine).read_bytes()
    (data / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    nan = phantom.image.astype(np.float32)
    nan[3, 4, 5] = np.nan
    write_nifti(data / "with_nan.nii.gz", nan, phantom.affine)
    write_nifti(data / "reshaped.nii.gz", phantom.image, phantom.affine)
    write_nifti(data / "reshaped_label.nii.gz", phantom.label[:, :, :-1], phantom.affine)
    bad = {"truncated.nii.gz": "Cannot read", "with_nan.nii.gz": "NaN", "reshaped.nii.gz": "shape"}

    args = ["stage2", "--data", str(data), "--out", str(tmp_path / "run"), "--iterations", "1", "--depth", "18",
            "--last-layer", "3", "--feature-dim", "16", "--crop", "64", "--amp", "off", "--device", "cpu",
            "--workers", "2"]
    assert train_main(args) == 0
    provenance = load_checkpoint(tmp_path / "run" / "last.pt").provenance
    assert provenance["data"] == [good.removesuffix(".nii.gz")]
    skipped = {Path(name).name: why for name, why in provenance["skipped_scans"].items()}
    assert set(skipped) == set(bad)
    for name, why in bad.items():
        assert why in skipped[name] and f"left out of training: {data / name}" in caplog.text, (name, skipped[name])

    (data / good).unlink()
    args[args.index("--out") + 1] = str(tmp_path / "none")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "none of the 3 training scans can be used" in err and all(name in err for name in bad)
    assert not (tmp_path / "none" / "last.pt").exists()


def test_average_interpolates_weights_and_refuses_foreign_models(tmp_path, tiny_network, capsys):
    """WiSE-FT: the mean of two related models' weights, recorded in the provenance."""
    from napari_densemp.checkpoint import save_checkpoint
    from napari_densemp.network import FewShotSegmenter
    from napari_densemp.preprocessing import PreprocessingProfile

    profile = PreprocessingProfile()
    a = save_checkpoint(tmp_path / "a.pt", tiny_network, profile, provenance={"data": ["x"]})
    torch.manual_seed(1)
    other = FewShotSegmenter(tiny_network.config)
    b = save_checkpoint(tmp_path / "b.pt", other, profile, provenance={"data": ["y"]})
    out = tmp_path / "avg.pt"
    assert train_main(["average", str(a), str(b), "--weights", "1", "3", "--out", str(out),
                       "--full-precision"]) == 0
    averaged = load_checkpoint(out)
    for key, value in tiny_network.state_dict().items():
        if value.is_floating_point():
            expected = 0.25 * value + 0.75 * other.state_dict()[key]
            assert torch.allclose(averaged.state_dict[key], expected, atol=1e-6), key
    assert averaged.provenance["stage"] == "average" and averaged.provenance["data"] == ["x", "y"]
    assert [s["weight"] for s in averaged.provenance["sources"]] == [0.25, 0.75]
    assert "0.25 a.pt, 0.75 b.pt" in capsys.readouterr().out
    # the output is never overwritten silently; models of another architecture or profile are refused
    assert train_main(["average", str(a), str(b), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    narrow = FewShotSegmenter(NetworkConfig(depth=18, last_layer=3, feature_dim=16))
    wide = save_checkpoint(tmp_path / "wide.pt", narrow, profile)
    assert train_main(["average", str(a), str(wide), "--out", str(tmp_path / "x.pt")]) == 2
    assert "another architecture" in capsys.readouterr().err
    shifted = save_checkpoint(tmp_path / "ct.pt", other, PreprocessingProfile(ct_window=(-200.0, 300.0)))
    assert train_main(["average", str(a), str(shifted), "--out", str(tmp_path / "x.pt")]) == 2
    assert "preprocesses scans differently" in capsys.readouterr().err
    assert train_main(["average", str(a), str(b), "--weights", "1", "--out", str(tmp_path / "x.pt")]) == 2
    assert "2 checkpoints but 1 weights" in capsys.readouterr().err
