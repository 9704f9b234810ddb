"""The phantom cohort, superpixels and the data-folder conventions."""

from __future__ import annotations

import numpy as np

from napari_densemp.io import write_nifti
from napari_densemp.preprocessing import PreprocessingProfile
from src_data.datasets import find_scans, load_scan, prepare_scan
from src_data.phantoms import LEFT_KIDNEY, LIVER, RIGHT_KIDNEY, SPLEEN, make_phantom
from src_data.splits import split_scans
from src_data.superpixels import body_mask, superpixels


def test_phantoms_are_deterministic_and_differ_between_patients():
    a, b = make_phantom(3, "ct"), make_phantom(3, "ct")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    others = [make_phantom(s, "ct") for s in (4, 5)]
    shapes = {p.image.shape for p in (a, *others)}
    assert len(shapes) == 3  # size and slice count differ
    liver_z = [np.flatnonzero((p.label == LIVER).any(axis=(0, 1)))[[0, -1]] * p.spacing[2] for p in (a, *others)]
    assert len({tuple(np.round(z)) for z in liver_z}) == 3  # organs lie at different heights


def test_phantom_labels_and_intensities_are_plausible():
    ct, mri = make_phantom(1, "ct"), make_phantom(1, "mri")
    for phantom in (ct, mri):
        assert set(np.unique(phantom.label)) == {0, SPLEEN, RIGHT_KIDNEY, LEFT_KIDNEY, LIVER}
        assert phantom.label.dtype == np.uint8 and phantom.image.dtype == np.float32
    assert ct.image.min() < -900 and 30 < np.median(ct.image[ct.label == LIVER]) < 110  # HU
    assert mri.image.min() >= 0
    # liver sits on the patient's right (negative x in this RAS frame), spleen on the left
    x = np.arange(ct.image.shape[0])
    assert x[(ct.label == LIVER).any(axis=(1, 2))].mean() < x[(ct.label == SPLEEN).any(axis=(1, 2))].mean()


def test_body_mask_and_superpixels(ct_phantom):
    slices = np.moveaxis(ct_phantom.image, 2, 0)[::10]
    body = body_mask(slices, "ct")
    assert body.mean() > 0.3 and not body[:, 0, 0].any()
    windowed = np.clip((slices + 125) / 400, 0, 1).astype(np.float32)
    segments = superpixels(windowed, body, min_size=400)
    assert segments.dtype == np.int32 and (segments[~body] == 0).all() and (segments[body] > 0).all()
    for s in segments:
        ids = np.unique(s[s > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # relabelled 1..K
        sizes = np.bincount(s.ravel())[1:]
        assert np.median(sizes) >= 400  # min size holds except where the body border cuts a segment
    fine = superpixels(windowed, body, min_size=100)
    assert fine.max() > segments.max()


def test_ct_superpixels_within_the_body_box_equal_the_whole_slice_ones(ct_phantom):
    """A CT's window clips the air to one value, so segmenting only the body's box (what makes
    a head-and-neck CT's superpixels several times faster) changes no segment in the body."""
    slices = np.pad(np.moveaxis(ct_phantom.image, 2, 0)[::6], ((0, 0), (60, 60), (60, 60)), constant_values=-1000)
    body = body_mask(slices, "ct")
    windowed = np.clip((slices + 125) / 400, 0, 1).astype(np.float32)
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    assert rows[0] > 40 and rows[-1] < slices.shape[1] - 40  # the box with a 32-pixel margin cuts air off
    whole = superpixels(windowed, body)
    boxed = superpixels(windowed, body, crop_margin=32)
    assert whole.max() > 5
    np.testing.assert_array_equal(boxed, whole)


def test_find_scans_knows_the_layouts_and_split(tmp_path):
    affine = np.eye(4)
    volume = np.zeros((8, 8, 4), dtype=np.float32)
    for name in ["image_2", "label_2", "image_10", "label_10", "image_31", "label_31", "scan_mask", "scan"]:
        write_nifti(tmp_path / f"{name}.nii.gz", volume, affine)
    names = [(r.name, r.label.name if r.label else None) for r in find_scans(tmp_path)]
    assert names == [("image_2", "label_2.nii.gz"), ("image_10", "label_10.nii.gz"),
                     ("image_31", "label_31.nii.gz"), ("scan", "scan_mask.nii.gz")]
    _seen, held = split_scans(tmp_path)
    assert [r.name for r in held] == ["image_31"]


def test_openkbp_offset_is_removed(tmp_path):
    stored = np.full((8, 8, 4), 1024.0 + 40.0, dtype=np.float32)  # HU 40 stored as HU + 1024
    stored[..., 0] = 24.0  # and air, HU -1000
    write_nifti(tmp_path / "pt_7_ct.nii.gz", stored, np.eye(4))
    (record,) = find_scans(tmp_path)
    assert record.hu_offset == 1024.0
    np.testing.assert_array_equal(load_scan(record).volume, stored - 1024.0)


def test_prepare_scan_caches(tmp_path, mri_phantom):
    write_nifti(tmp_path / "data" / "p.nii.gz", mri_phantom.image[:, :, :6], mri_phantom.affine)
    write_nifti(tmp_path / "data" / "p_label.nii.gz", mri_phantom.label[:, :, :6], mri_phantom.affine)
    (record,) = find_scans(tmp_path / "data")
    first = prepare_scan(record, PreprocessingProfile(), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = prepare_scan(record, PreprocessingProfile(), tmp_path / "cache")
    np.testing.assert_array_equal(first.superpixels, again.superpixels)
    assert first.image.shape == first.superpixels.shape == first.label.shape
    assert first.modality == "mri"
    # a copy elsewhere (new path, new modification time) is the same scan: the cache holds
    copy = tmp_path / "copy" / "p.nii.gz"
    copy.parent.mkdir()
    copy.write_bytes(record.image.read_bytes())
    (copied,) = [r for r in find_scans(copy.parent) if r.name == "p"]
    prepare_scan(copied, PreprocessingProfile(), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # an edited scan is not: it gets its own entry
    write_nifti(record.image, mri_phantom.image[:, :, :6] + 1, mri_phantom.affine, overwrite=True)
    prepare_scan(record, PreprocessingProfile(), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_gzipped_nifti_bytes_depend_only_on_the_volume(tmp_path, ct_phantom):
    """No file name or time stamp in the gzip header: rewriting a volume gives the same file."""
    for name in ("a.nii.gz", "b.nii.gz"):
        write_nifti(tmp_path / name, ct_phantom.label, ct_phantom.affine)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert load_scan(find_scans(tmp_path)[0]).volume.shape == ct_phantom.label.shape
