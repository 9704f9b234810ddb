"""The figure script users see in README: one phantom, two organs, colours where they belong."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src_data.phantoms import write_cohort

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.slow
def test_figure_shows_the_painting_the_truth_and_the_propagated_mask(tmp_path, capsys):
    import figure

    write_cohort(tmp_path / "data", 1, "ct", first_seed=40)
    out = tmp_path / "figure.png"
    assert figure.main(["--data", str(tmp_path / "data"), "--scans", "phantom_ct_40", "--organs", "6", "99",
                        "--names", "liver", "--columns", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "organ 99 absent" in printed.err
    dice = float(printed.out.split("3D Dice ")[1].split()[0])
    assert dice > 70  # the liver of a phantom, as the engine tests find it
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    for colour in figure.COLOURS.values():
        assert (np.abs(pixels.astype(int) - colour).sum(axis=1) == 0).sum() > 50, colour
    width, height = Image.open(out).size
    assert width >= 5 * figure.TILE and height < 2 * (figure.TILE + 40)  # 1 painted + 4 slices, one row


@pytest.mark.slow
def test_bundled_model_finds_the_brain_of_real_mri_it_never_saw(capsys):
    """nilearn's MNI152 T1: an anatomy and contrast outside every training set, with tissue maps
    as the truth. One painted axial slice must give the brain, well above copying the slice."""
    pytest.importorskip("nilearn")
    import accuracy

    assert accuracy.main(["--mni152", "--device", "cpu"]) == 0
    rows = {line.split()[0]: [float(v) for v in line.split()[1:4]]
            for line in capsys.readouterr().out.split("(mean 3D Dice over scans)")[1].strip().splitlines()}
    assert set(rows) == {"brain", "grey", "white", "mean"}
    propagated, copy_all, copy_z = rows["brain"]
    assert propagated > 85 and propagated > copy_z + 10 and copy_z > copy_all


@pytest.mark.parametrize("slice_mm", [0.625, 1.25, 5.0, 7.5])
def test_reslicing_keeps_every_slice_at_its_world_position(slice_mm):
    """accuracy.py --slice-mm: a scan whose value is its world z (2.5 mm slices, axial axis
    stored second) keeps that value at each new slice's world z; the label follows it."""
    import accuracy

    affine = np.array([[0, 0, -1.5, 10], [1.2, 0, 0, 5], [0, 2.5, 0, -40], [0, 0, 0, 1]], dtype=float)
    shape = (6, 20, 7)
    z_world = (affine @ np.stack([np.zeros(20), np.arange(20), np.zeros(20), np.ones(20)]))[2]
    volume = np.broadcast_to(z_world[None, :, None], shape).astype(np.float32)
    label = np.broadcast_to((z_world > -20)[None, :, None], shape).astype(np.uint8)
    new_volume, new_label, new_affine = accuracy.resliced(volume, label, affine, slice_mm)
    n = new_volume.shape[1]
    assert new_volume.shape == new_label.shape == (6, 1 + int(19 * 2.5 // slice_mm), 7)
    assert np.allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [1.2, slice_mm, 1.5])
    new_z = (new_affine @ np.stack([np.zeros(n), np.arange(n), np.zeros(n), np.ones(n)]))[2]
    inside = slice(1, -1) if slice_mm > 2.5 else slice(None)  # a slab cut by the scan's end is not centred
    assert np.allclose(new_volume[0, inside, 0], new_z[inside], atol=1e-4)
    nearest = np.floor((new_z - z_world[0]) / 2.5 + 0.5 + 1e-9).astype(int)  # halfway (8.5): the next
    assert (new_label[0, :, 0] == label[0, nearest, 0]).all() and 0 < new_label.mean() < 1


def test_the_painted_slice_is_the_largest_or_the_one_that_far_through_the_organ():
    """accuracy.py --paint-at: 0 paints the organ's first slice, 1 its last, 0.5 its middle one."""
    import accuracy

    truth = np.zeros((8, 8, 12), bool)
    for z, r in zip(range(2, 11), [1, 2, 3, 3, 2, 1, 1, 1, 1]):
        truth[4 - r:4 + r, 4 - r:4 + r, z] = True
    picked = {at: accuracy.paint_largest_slice(truth, 2, at) for at in (None, 0.0, 0.5, 1.0)}
    assert {at: z for at, (_, z) in picked.items()} == {None: 4, 0.0: 2, 0.5: 6, 1.0: 10}
    for painted, z in picked.values():
        np.testing.assert_array_equal(painted[..., z], truth[..., z])
        assert painted.sum() == truth[..., z].sum()


def test_bias_field_spans_its_strength_smoothly_and_repeats():
    """accuracy.py --bias-field: exp(S * p) with p spanning [-1, 1], smooth, the same per seed."""
    import accuracy

    field = accuracy.bias_field((40, 30, 20), 0.3, seed=7)
    assert field.shape == (40, 30, 20) and field.dtype == np.float32
    assert np.isclose(field.min(), np.exp(-0.3), rtol=1e-4) and np.isclose(field.max(), np.exp(0.3), rtol=1e-4)
    # smooth: neighbouring voxels differ by a small fraction of the field's whole range
    steps = max(float(np.abs(np.diff(np.log(field), axis=a)).max()) for a in range(3))
    assert steps < 0.1 * 0.6
    np.testing.assert_array_equal(field, accuracy.bias_field((40, 30, 20), 0.3, seed=7))
    assert not np.allclose(field, accuracy.bias_field((40, 30, 20), 0.3, seed=8))


def test_a_stray_click_lands_in_the_body_off_the_organ_3_to_6_slices_from_the_painting():
    """accuracy.py --stray-click: a disc of the radius given, outside the organ but inside the
    body, on a slice of the organ 3-6 slices from the painted one; the same per seed."""
    import accuracy

    from src_data.phantoms import LIVER, make_phantom

    phantom = make_phantom(seed=11, modality="ct")
    truth = phantom.label == LIVER
    z = int(truth.sum(axis=(0, 1)).argmax())
    for seed in range(5):
        click = accuracy.stray_click(phantom.image, truth, 2, z, 1, seed)
        (k,) = np.flatnonzero(click.any(axis=(0, 1)))
        assert 3 <= abs(k - z) <= 6 and truth[..., k].any()
        assert click.sum() == 5 and not (click & truth).any() and (phantom.image[click] > -500).all()
        np.testing.assert_array_equal(click, accuracy.stray_click(phantom.image, truth, 2, z, 1, seed))
    assert accuracy.stray_click(phantom.image, truth[..., z:z + 1].repeat(3, axis=2), 2, 1, 1, 0).sum() == 0


def test_a_header_without_codes_gives_the_affine_nibabel_reads_from_such_a_file(tmp_path):
    """``accuracy.py --header no-orientation`` simulates exactly what a reader finds in a file
    whose qform and sform codes are 0: the voxel sizes kept, the orientation nibabel's guess."""
    import nibabel as nib
    from accuracy import header_as

    affine = np.array([[0.0, 0.9, 0.0, 10.0], [-0.8, 0.0, 0.0, 20.0], [0.0, 0.0, 3.0, -5.0], [0, 0, 0, 1]])
    shape = (12, 10, 7)
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms((0.8, 0.9, 3.0))
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), None, header), tmp_path / "no_codes.nii")
    np.testing.assert_allclose(header_as("no-orientation", affine, shape), nib.load(tmp_path / "no_codes.nii").affine)
    assert nib.aff2axcodes(header_as("no-orientation", affine, shape)) == ("L", "A", "S")
    np.testing.assert_array_equal(header_as("identity", affine, shape), np.eye(4))
    np.testing.assert_array_equal(header_as("kept", affine, shape), affine)


def test_a_rough_painting_grows_or_shrinks_each_painted_slice_by_millimetres():
    """``accuracy.py --paint-margin``: past the edge by 2 mm on 0.5 x 1 mm pixels is 4 pixels one
    way and 2 the other, on the painted slice only; short of it keeps at least the innermost pixels."""
    from accuracy import rough_painting

    painted = np.zeros((40, 30, 5), bool)
    painted[10:20, 10:16, 2] = True
    grown = rough_painting(painted, 2, (0.5, 1.0, 3.0), 2.0)
    assert grown[..., [0, 1, 3, 4]].sum() == 0
    rows, cols = np.flatnonzero(grown[..., 2].any(axis=1)), np.flatnonzero(grown[..., 2].any(axis=0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (6, 23, 8, 17)
    shrunk = rough_painting(painted, 2, (0.5, 1.0, 3.0), -1.0)
    assert shrunk[..., 2].sum() == (10 - 4) * (6 - 2)
    assert rough_painting(painted, 2, (0.5, 1.0, 3.0), -50.0)[..., 2].sum() > 0


def test_resampling_in_plane_keeps_the_first_and_last_pixels_where_they_are():
    """``accuracy.py --pixel-mm``: 3.9 mm pixels re-sampled to about 1.3 mm; the slices and the
    corner pixels keep their world positions, and the label keeps its values."""
    from accuracy import resampled_in_plane

    rng = np.random.default_rng(0)
    volume = rng.normal(0, 1, (10, 8, 4)).astype(np.float32)
    label = rng.integers(0, 3, (10, 8, 4)).astype(np.uint8)
    affine = np.diag([3.9, 3.9, 2.5, 1.0])
    affine[:3, 3] = [5.0, 6.0, 7.0]
    scan, labels, moved = resampled_in_plane(volume, label, affine, 1.3)
    assert scan.shape == labels.shape == (30, 24, 4)
    for old, new in [((0, 0, 0), (0, 0, 0)), ((9, 7, 3), (29, 23, 3))]:
        np.testing.assert_allclose(affine @ [*old, 1], moved @ [*new, 1])
        assert labels[new] == label[old]
    assert set(np.unique(labels)) == set(np.unique(label))
    assert 1.15 < moved[0, 0] < 1.35 and moved[2, 2] == 2.5
