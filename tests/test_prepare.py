"""densemp-train prepare on small fake raw downloads: geometry, labels, idempotence, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_densemp.errors import DenseMPError
from napari_densemp.io import read_nifti, write_nifti
from src_data.datasets import find_scans
from src_data.prepare import prepare_dataset

from .test_napari_io import _write_dicom_series


def _synapse(root, n=2):
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    rng = np.random.default_rng(0)
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])
    affine[:3, 3] = [200.0, 150.0, -40.0]
    for i in range(1, n + 1):
        image = rng.normal(40, 30, (128, 128, 6)).astype(np.float32)
        image[:40] = -1000  # air, partly inside the 32 px border that is cropped
        label = np.zeros(image.shape, np.uint8)
        label[50:80, 40:70, 1:4] = 6  # liver on slices 1-3
        label[90:100, 90:100, 4] = 1  # spleen on slice 4
        write_nifti(root / "img" / f"img{i:04d}.nii.gz", image, affine)
        write_nifti(root / "label" / f"label{i:04d}.nii.gz", label, affine)
    return affine


def test_synapse_cases_are_cropped_resampled_and_indexed(tmp_path):
    affine = _synapse(tmp_path / "raw")
    results = prepare_dataset("synapse", tmp_path / "raw", tmp_path / "out")
    assert set(results) == {"image_1", "image_2"}
    image, label = read_nifti(tmp_path / "out" / "image_1.nii.gz"), read_nifti(tmp_path / "out" / "label_1.nii.gz")
    assert image.data.shape == label.data.shape == (256, 256, 6)  # 128 - 2 x 32 = 64 px -> 256, z unchanged
    assert np.allclose(image.spacing, (0.2, 0.2, 3.0), atol=1e-6)  # 64 x 0.8 mm over 256 px
    # the first output voxel's centre lies inside the first kept input voxel (32, 32)
    corner = affine @ np.array([32 - 0.5 + 0.125, 32 - 0.5 + 0.125, 0, 1])
    assert np.allclose(image.affine @ np.array([0, 0, 0, 1]), corner, atol=1e-4)
    assert set(np.unique(label.data)) == {0, 1, 6}
    liver_voxels = (label.data == 6).sum()
    assert abs(liver_voxels - 30 * 30 * 3 * 16) < 0.05 * 30 * 30 * 3 * 16  # 4x in-plane: 16x the voxels
    assert float(image.data.min()) == pytest.approx(-1000, abs=1)  # HU kept: the profile windows them
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["image_1"] == {"1": [4], "6": [1, 2, 3]}
    assert len(list((tmp_path / "out" / "superpixels").glob("image_1-*.npz"))) == 1
    assert [r.name for r in find_scans(tmp_path / "out")] == ["image_1", "image_2"]
    before = (tmp_path / "out" / "image_1.nii.gz").stat().st_mtime_ns
    prepare_dataset("synapse", tmp_path / "raw", tmp_path / "out")  # idempotent: nothing redone
    assert (tmp_path / "out" / "image_1.nii.gz").stat().st_mtime_ns == before


def test_a_malformed_synapse_case_is_named_and_the_others_prepared(tmp_path):
    _synapse(tmp_path / "raw")
    write_nifti(tmp_path / "raw" / "label" / "label0002.nii.gz", np.zeros((5, 5, 5), np.uint8), np.eye(4),
                overwrite=True)
    results = prepare_dataset("synapse", tmp_path / "raw", tmp_path / "out", workers=2)  # in parallel
    assert "error" not in results["image_1"]
    assert "shape (5, 5, 5) differs" in results["image_2"]["error"]
    with pytest.raises(DenseMPError, match="Synapse"):
        prepare_dataset("synapse", tmp_path / "empty", tmp_path / "out2")


def _chaos(root, case=3, slices=5, thickness=5.0):
    pytest.importorskip("pydicom")
    from skimage import io

    folder = root / "MR" / str(case) / "T2SPIR"
    volume = np.full((96, 80, slices), 100.0, np.float32)  # (cols, rows, k)
    volume[30:60, 20:50] = 600.0
    _write_dicom_series(folder / "DICOM_anon", volume, spacing=(1.5, 1.5), gap=thickness, shuffle=True)
    # CHAOS names each PNG like its DICOM file; values 63/126/189/252
    import pydicom

    (folder / "Ground").mkdir()
    for path in (folder / "DICOM_anon").iterdir():
        ds = pydicom.dcmread(path)
        k = round((float(ds.ImagePositionPatient[2]) - 30.0) / thickness)
        mask = np.zeros((80, 96), np.uint8)  # rows x cols, like the pixel array
        if 1 <= k <= 3:
            mask[20:50, 30:60] = 63  # liver
        mask[5:10, 5:10] = 252  # spleen on every slice
        io.imsave(folder / "Ground" / f"{path.stem}.png", mask, check_contrast=False)
    return volume


def test_chaos_dicom_and_pngs_become_labelled_nifti_at_the_papers_spacing(tmp_path):
    _chaos(tmp_path / "raw")
    results = prepare_dataset("chaos", tmp_path / "raw", tmp_path / "out")
    assert "error" not in results["image_3"], results
    image, label = read_nifti(tmp_path / "out" / "image_3.nii.gz"), read_nifti(tmp_path / "out" / "label_3.nii.gz")
    assert image.data.shape == label.data.shape == (256, 256, 3)  # 5 slices x 5 mm: 25 mm / 7.7 -> 3
    assert np.allclose(image.spacing, (1.25, 1.25, 7.7), atol=1e-4)  # exactly the paper's spacing
    assert set(np.unique(label.data)) == {0, 1, 4}
    # the liver and the bright block coincide: the PNGs are aligned with the DICOM pixels
    liver = label.data == 1
    assert image.data[liver].mean() > 2 * image.data[~liver & (label.data == 0)].mean()
    # 30 x 30 columns/rows at 1.5 mm -> 36 px at 1.25 mm
    assert abs(int(liver[..., 1].sum()) - 36 * 36) < 0.1 * 36 * 36


def test_chaos_case_with_missing_ground_truth_is_named(tmp_path):
    _chaos(tmp_path / "raw")
    next((tmp_path / "raw" / "MR" / "3" / "T2SPIR" / "Ground").glob("*.png")).unlink()
    results = prepare_dataset("chaos", tmp_path / "raw", tmp_path / "out")
    assert "no ground-truth PNG" in results["image_3"]["error"]


def test_roco_index_lists_readable_images_and_errors(tmp_path):
    from skimage import io

    (tmp_path / "roco" / "a").mkdir(parents=True)
    io.imsave(tmp_path / "roco" / "a" / "x.png", np.zeros((20, 30), np.uint8), check_contrast=False)
    (tmp_path / "roco" / "a" / "broken.jpg").write_bytes(b"not an image")
    results = prepare_dataset("roco", tmp_path / "roco", tmp_path / "out")
    rows = (tmp_path / "out" / "index.csv").read_text().splitlines()
    assert rows[0] == "path,height,width,error" and results["index"]["path"].endswith("index.csv")
    assert "a/x.png,20,30," in rows
    assert any(row.startswith("a/broken.jpg,,,") and len(row) > 15 for row in rows)


@pytest.mark.slow
def test_cpu_preset_runs_every_fold_and_writes_the_papers_tables(tmp_path):
    """prepare (phantoms + superpixels) -> stage 2 -> fine-tuning -> both protocols, per fold."""
    import csv
    from dataclasses import replace

    from training.reproduce import PRESETS, reproduce

    preset = replace(PRESETS["cpu-phantoms"], settings=(2,))
    results = reproduce(preset, tmp_path, device="cpu", amp="off")
    rows = results[2]
    assert {r.fold for r in rows} == {0, 1} and {r.organ for r in rows} == {1, 2, 3, 6}
    assert all(0.0 <= r.paper <= 1.0 and 0.0 <= r.oracle_free <= 1.0 for r in rows)
    # each fold's test scans are never trained on, and setting 2 dropped the test classes' slices
    for group, classes in (("upper", [1, 6]), ("lower", [2, 3])):
        tuned = read_provenance(tmp_path / "setting2" / f"test-{group}" / "fold0" / "finetune" / "last.pt")
        assert tuned["excluded_classes"] == classes
        assert not set(tuned["data"]) & {"phantom_ct_500", "phantom_ct_501", "phantom_ct_502", "phantom_ct_503"}
        assert {c.split(":")[1] for c in tuned["classes"]}.isdisjoint({str(c) for c in classes})
    table = (tmp_path / "setting2" / "table.md").read_text()
    assert "| paper (true z-range, oracle) |" in table and "| oracle-free (whole volume) |" in table
    with open(tmp_path / "setting2" / "scans.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def read_provenance(path):
    from napari_densemp.checkpoint import load_checkpoint

    return load_checkpoint(path).provenance
