"""Intensity profiles, the in-plane grid, and NIfTI geometry kept exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_densemp.errors import DenseMPError
from napari_densemp.io import read_nifti, write_nifti
from napari_densemp.preprocessing import (
    PreprocessingProfile,
    check_volume,
    detect_modality,
    model_grid_size,
    prepare_volume,
    reading,
    resize_slices,
    stored_hu_offset,
    window_intensities,
    zscore,
)


def test_ct_window_maps_the_abdominal_window_to_unit_range():
    hu = np.array([[[-1000.0, -125.0, 75.0, 275.0, 1000.0]]])
    out = window_intensities(hu, "ct", PreprocessingProfile())
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])


def test_mri_clips_the_bright_end_at_the_percentile():
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 100, size=(4, 50, 50)).astype(np.float32)
    volume[0, 0, :5] = 1e6  # a few hot voxels must not squash the rest
    out = window_intensities(volume, "mri", PreprocessingProfile())
    assert out.max() == pytest.approx(1.0)
    assert np.median(out) == pytest.approx(0.5, abs=0.02)


def test_modality_detection(ct_phantom, mri_phantom):
    """CT by values below -50 HU (air, fat), so also a CT clipped to its window (no air left) or
    cropped inside the body; an MRI rescaled or z-scored stays an MRI."""
    ct, mri = ct_phantom.image, mri_phantom.image
    assert detect_modality(ct) == "ct" and detect_modality(mri) == "mri"
    assert detect_modality(np.clip(ct, -125, 275)) == "ct"
    x, y, z = (np.flatnonzero(ct_phantom.label.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    inside = ct[x[0]:x[-1] + 1, y[0]:y[-1] + 1, z[0]:z[-1] + 1]
    assert np.percentile(inside, 1) > -500 and detect_modality(inside) == "ct"
    for rescaled in ((mri - mri.mean()) / mri.std(), mri / mri.max(), np.rint(255 * mri / mri.max()).astype(np.uint8)):
        assert detect_modality(rescaled) == "mri"


def test_a_ct_stored_as_hu_plus_1024_is_windowed_as_hu(ct_phantom, mri_phantom):
    """OpenKBP and some converters store CT unsigned, as HU + 1024. Said to be CT, such a scan
    is windowed exactly as its HU; a CT in HU, and one cropped inside the body (no air), is not
    shifted. Auto-detection reads it as MRI: a 12-bit MRI looks the same, so only the user can
    tell (``--modality ct``, the widget's scan type)."""
    profile = PreprocessingProfile()
    hu = np.rint(ct_phantom.image)
    shifted = hu + 1024
    assert stored_hu_offset(hu) == 0 and stored_hu_offset(shifted) == 1024
    np.testing.assert_array_equal(window_intensities(shifted, "ct", profile), window_intensities(hu, "ct", profile))
    x, y, z = (np.flatnonzero(ct_phantom.label.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    inside = hu[x[0]:x[-1] + 1, y[0]:y[-1] + 1, z[0]:z[-1] + 1]  # the organs' box: soft tissue, no air
    assert np.percentile(inside, 1) > -500 and stored_hu_offset(inside) == 0
    spine = inside.copy()  # and one holding bone: a cortical shell (1000 HU) around trabecular bone (400 HU)
    yy, xx = np.mgrid[:spine.shape[0], :spine.shape[1]]
    radius = np.hypot(yy - spine.shape[0] / 2, xx - spine.shape[1] / 2)
    spine[radius < 0.3 * min(spine.shape[:2])] = 400.0
    spine[(radius >= 0.3 * min(spine.shape[:2])) & (radius < 0.36 * min(spine.shape[:2]))] = 1000.0
    assert (spine >= 824).mean() > 0.02 and stored_hu_offset(spine) == 0
    assert detect_modality(shifted) == "mri"
    assert (reading("ct", stored_hu_offset(hu)), reading("ct", stored_hu_offset(shifted)),
            reading("mri", stored_hu_offset(mri_phantom.image))) == ("CT", "CT stored as HU + 1024", "MRI")
    assert reading("mri", stored_hu_offset(shifted)) == "MRI (if it is a CT stored as HU + 1024, choose CT)"  # auto's
    # an offset the caller already knows is used as given, not detected again
    np.testing.assert_array_equal(window_intensities(shifted, "ct", profile, hu_offset=1024.0),
                                  window_intensities(hu, "ct", profile, hu_offset=0.0))
    assert not np.array_equal(window_intensities(hu, "ct", profile, hu_offset=1024.0),
                              window_intensities(hu, "ct", profile))



def test_padding_outside_a_cts_field_of_view_is_no_air(ct_phantom):
    """Scanners store what lies outside their circular field of view as padding (GE: -2000 as
    stored; Siemens: -3024 HU). A CT stored as HU + 1024 with such padding is still found
    shifted and windowed as its HU (before, the padding read as air in HU: the whole scan was
    windowed 1024 HU too high); a CT in HU with any padding is not shifted."""
    profile = PreprocessingProfile()
    hu = np.rint(ct_phantom.image)
    rows, cols = np.ogrid[:hu.shape[0], :hu.shape[1]]
    outside = (np.hypot(rows - hu.shape[0] / 2, cols - hu.shape[1] / 2) > min(hu.shape[:2]) / 2)[..., None]
    assert outside.mean() > 0.2
    for padding in (-2000.0, -3024.0, -32768.0):
        assert stored_hu_offset(np.where(outside, padding, hu + 1024)) == 1024
        assert stored_hu_offset(np.where(outside, padding, hu)) == 0
    np.testing.assert_array_equal(window_intensities(np.where(outside, -2000.0, hu + 1024), "ct", profile),
                                  window_intensities(np.where(outside, -3024.0, hu), "ct", profile))
    assert stored_hu_offset(np.full((4, 4, 4), -2000.0)) == 0  # nothing but padding: nothing to tell


def test_grid_size_follows_training_spacing_within_bounds():
    profile = PreprocessingProfile(in_plane_spacing_mm=1.25, max_in_plane_size=512, min_in_plane_size=64)
    assert model_grid_size((512, 512), (0.7, 0.7), profile) == (287, 287)
    assert model_grid_size((256, 256), (1.25, 1.25), profile) == (256, 256)
    assert model_grid_size((512, 256), (2.0, 2.0), profile) == (512, 256)  # capped: 819 -> 512
    assert model_grid_size((40, 40), (1.0, 1.0), profile) == (64, 64)


def test_prepare_volume_is_zscored_on_model_grid(ct_phantom):
    slices = np.moveaxis(ct_phantom.image, 2, 0)
    prepared, modality = prepare_volume(slices, ct_phantom.spacing[:2], PreprocessingProfile())
    assert modality == "ct"
    expected = model_grid_size(slices.shape[1:], ct_phantom.spacing[:2], PreprocessingProfile())
    assert tuple(prepared.shape) == (slices.shape[0], *expected)
    assert abs(float(prepared.mean())) < 0.05 and abs(float(prepared.std()) - 1) < 0.05


def test_zscore_gives_numpys_float64_figures_slice_block_by_block():
    volume = np.random.default_rng(0).normal(40.0, 7.0, (21, 9, 11)).astype(np.float32)
    expected = (volume - volume.mean(dtype=np.float64)) / volume.std(dtype=np.float64)
    out = zscore(volume.copy())
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=0, atol=1e-6)
    assert abs(float(out.mean(dtype=np.float64))) < 1e-6 and abs(float(out.std(dtype=np.float64)) - 1) < 1e-6


def test_nearest_resize_keeps_label_values():
    labels = torch.tensor([[[0.0, 3.0], [6.0, 1.0]]])
    out = resize_slices(labels, (5, 5), mode="nearest")
    assert set(out.unique().tolist()) <= {0.0, 1.0, 3.0, 6.0}


@pytest.mark.parametrize("bad,message", [
    (np.zeros((4, 4)), "3D"),
    (np.zeros((2, 4, 4, 3)), "3D"),
    (np.full((2, 2, 2), np.nan), "NaN"),
    (np.array([[[1, np.inf]]]), "infinite"),
    (np.array([[["a"]]]), "real numbers"),
])
def test_bad_volumes_are_named(bad, message):
    with pytest.raises(DenseMPError, match=message):
        check_volume(bad)


def test_nifti_round_trip_keeps_affine_and_refuses_overwrite(tmp_path):
    # An oblique-free but permuted, flipped affine; values a NIfTI header (float32) holds exactly.
    affine = np.array([[0.0, -0.8125, 0.0, 10.5], [0.0, 0.0, 2.5, -4.25], [-0.75, 0.0, 0.0, 33.0], [0, 0, 0, 1]])
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = write_nifti(tmp_path / "x.nii.gz", data, affine)
    scan = read_nifti(path)
    np.testing.assert_array_equal(scan.data, data)
    np.testing.assert_array_equal(scan.affine, affine)
    assert scan.spacing == pytest.approx((0.75, 0.8125, 2.5))
    with pytest.raises(DenseMPError, match="exists"):
        write_nifti(path, data * 0, affine)
    np.testing.assert_array_equal(read_nifti(path).data, data)  # untouched
    write_nifti(path, data * 0, affine, overwrite=True)
    assert read_nifti(path).data.sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DenseMPError, match="Cannot read"):
        read_nifti(bad)
    with pytest.raises(DenseMPError, match="not found"):
        read_nifti(tmp_path / "nope.nii")
