"""Paint once, segment many: segment_like on another phantom, the folder run and its CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_densemp.batch import Support, list_scans, scan_counts, segment_folder, shard
from napari_densemp.cli import main as segment_main
from napari_densemp.engine import chunk_centres, search_slices, segment_like, segment_like_labels
from napari_densemp.errors import DenseMPError
from napari_densemp.io import Scan, read_nifti, write_nifti
from src_data.phantoms import LEFT_KIDNEY, LIVER, RIGHT_KIDNEY, SPLEEN, make_phantom

from .conftest import dice, paint_largest


def _extent(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.any(axis=(0, 1)))


def test_chunk_centres_are_the_papers_support_slices():
    assert chunk_centres(list(range(12)), 3) == [2, 6, 10]  # 1/6, 1/2, 5/6 of the list
    assert chunk_centres([3, 4, 5, 9, 10, 11], 3) == [4, 9, 11]
    assert chunk_centres([7], 3) == [7]


def test_the_search_scores_slices_a_few_mm_apart():
    assert search_slices(10, 2.5, 5.0) == [0, 2, 4, 6, 8, 9]  # the last slice always looked at
    assert search_slices(9, 1.0, 5.0) == [0, 5, 8]
    assert search_slices(6, 7.7, 5.0) == list(range(6))  # thick slices: every one
    assert search_slices(6, 1.0, 0.0) == list(range(6))  # 0: every slice
    assert search_slices(1, 1.0, 5.0) == [0]


def test_a_thin_slice_query_is_searched_every_5_mm_at_no_cost_in_accuracy(ct_phantom, default_model, monkeypatch):
    """On a 2.5 mm query the structure is looked for on every second slice; the walk embeds the
    rest it reaches. Same organ, found in the same place, a fraction of the slices embedded."""
    import napari_densemp.engine as engine

    query = make_phantom(seed=20, modality="ct")  # 105 slices of 2.5 mm
    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    made = []
    real = engine.VolumeFeatures.of
    monkeypatch.setattr(engine.VolumeFeatures, "of", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    results = {}
    for step_mm in (0.0, 5.0):
        options = default_model.default_options(search_step_mm=step_mm)
        results[step_mm] = segment_like(ct_phantom.image, painted, query.image, default_model, ct_phantom.spacing,
                                        query.spacing, options=options)
    every, sparse = (made[i + 1] for i in (0, 2))  # (support, query) per run
    assert every.computed == every.count == 105 and sparse.computed < 0.75 * sparse.count
    truth = query.label == RIGHT_KIDNEY
    assert dice(results[5.0].mask, truth) > 0.4  # 0.45; 0.47 searching every slice
    assert abs(dice(results[5.0].mask, truth) - dice(results[0.0].mask, truth)) < 0.03


# overshoot: slices segmented past the organ's ends (the spleen's walk runs on into the liver's level)
@pytest.mark.parametrize("organ,minimum,overshoot", [(LIVER, 0.70, 4), (SPLEEN, 0.50, 14)])
def test_segment_like_finds_the_organ_at_another_height(ct_phantom, other_ct, default_model, organ, minimum,
                                                        overshoot):
    painted, z = paint_largest(ct_phantom.label, organ)
    truth = other_ct.label == organ
    extent = _extent(truth)
    # the organ lies elsewhere in the query: the painted slice index says nothing about it
    assert z < extent[0] or z > extent[-1] or abs(z - (extent[0] + extent[-1]) / 2) > 3
    result = segment_like(ct_phantom.image, painted, other_ct.image, default_model, ct_phantom.spacing,
                          other_ct.spacing)
    assert result.mask.shape == other_ct.image.shape
    assert extent[0] <= result.found_at[0] <= extent[-1]
    assert dice(result.mask, truth) > minimum
    first, last = result.slice_range
    assert first >= extent[0] - overshoot and last <= extent[-1] + overshoot



def test_a_walk_in_another_patient_ends_within_the_supports_extent(ct_phantom, default_model):
    """The same organ has a similar length in another patient: phantom 11's spleen found in phantom
    12 runs on, unlimited, to the scan's first slice (0-46 against the truth's 16-38); within 1.5 x
    the support's own extent on each side of its painted slice (the default) it stops near the
    spleen's end and Dice rises (0.36 -> 0.52)."""
    query = make_phantom(seed=12, modality="ct")
    painted, _ = paint_largest(ct_phantom.label, SPLEEN)
    truth = query.label == SPLEEN
    first_true = _extent(truth)[0]
    free, limited = (segment_like(ct_phantom.image, painted, query.image, default_model, ct_phantom.spacing,
                                  query.spacing, options=options, support_affine=ct_phantom.affine,
                                  query_affine=query.affine)
                     for options in (default_model.default_options(extent_limit=0.0), default_model.default_options()))
    assert free.slice_range[0] == 0
    assert first_true - 3 <= limited.slice_range[0] and limited.slice_range[1] <= free.slice_range[1]
    assert dice(limited.mask, truth) > dice(free.mask, truth) + 0.1

def test_a_support_painted_as_an_outline_is_found_as_if_painted_whole(ct_phantom, other_ct, default_model):
    """The support's liver drawn as its contour is filled, so the query's mask is that of the
    liver painted whole; kept as a ring, the query's liver is not found."""
    from scipy import ndimage

    painted, z = paint_largest(ct_phantom.label, LIVER)
    contour = painted.copy()
    contour[..., z] &= ~ndimage.binary_erosion(painted[..., z], iterations=2)
    run = dict(support_spacing=ct_phantom.spacing, query_spacing=other_ct.spacing)
    whole, drawn = (segment_like(ct_phantom.image, p, other_ct.image, default_model, **run) for p in (painted, contour))
    assert drawn.filled_outlines == [(2, z)]
    np.testing.assert_array_equal(drawn.mask, whole.mask)
    ring = segment_like(ct_phantom.image, contour, other_ct.image, default_model,
                        options=default_model.default_options(fill_outlines=False), **run)
    truth = other_ct.label == LIVER
    assert dice(whole.mask, truth) > 0.7 and dice(ring.mask, truth) < 0.1  # 0.73 and 0.002


def test_segment_like_tells_the_right_kidney_from_the_left(ct_phantom, other_ct, default_model):
    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    result = segment_like(ct_phantom.image, painted, other_ct.image, default_model, ct_phantom.spacing,
                          other_ct.spacing)
    assert dice(result.mask, other_ct.label == RIGHT_KIDNEY) > 0.3
    assert dice(result.mask, other_ct.label == LEFT_KIDNEY) < 0.02


def test_a_support_painted_on_two_planes_is_found_across_both(ct_phantom, other_ct, default_model):
    """The support's liver painted on its largest axial and coronal slices: each plane is found
    and walked in the query, and the walks combined (the coronal painting's lines never become
    axial supports)."""
    truth = ct_phantom.label == LIVER
    painted, z = paint_largest(ct_phantom.label, LIVER)
    y = int(truth.sum(axis=(0, 2)).argmax())
    painted[:, y] |= truth[:, y]
    result = segment_like(ct_phantom.image, painted, other_ct.image, default_model, ct_phantom.spacing,
                          other_ct.spacing, support_affine=ct_phantom.affine, query_affine=other_ct.affine)
    assert result.planes == {2: [z], 1: [y]} and result.mask.shape == other_ct.image.shape
    assert dice(result.mask, other_ct.label == LIVER) > 0.70  # 0.728; its axial slice alone 0.777


def test_a_3d_support_is_paired_by_chunks(ct_phantom, other_ct, default_model):
    support = (ct_phantom.label == LIVER).astype(np.uint8)
    result = segment_like(ct_phantom.image, support, other_ct.image, default_model, ct_phantom.spacing,
                          other_ct.spacing)
    assert len(result.found_at) == 3 and result.found_at == sorted(result.found_at)
    assert dice(result.mask, other_ct.label == LIVER) > 0.70


def test_several_support_structures_are_found_in_one_run(ct_phantom, other_ct, default_model):
    """Liver and right kidney painted on their own slices of one patient: both found in another,
    each exactly as alone but for voxels the other also claims, in one label volume; the
    support's and query's features computed once."""
    painted = np.zeros(ct_phantom.label.shape, np.uint8)
    for organ in (LIVER, RIGHT_KIDNEY):
        painted = np.maximum(painted, paint_largest(ct_phantom.label, organ)[0] * np.uint8(organ))
    out, results = segment_like_labels(ct_phantom.image, painted, other_ct.image, default_model, ct_phantom.spacing,
                                       other_ct.spacing)
    assert out.shape == other_ct.image.shape and set(np.unique(out)) == {0, LIVER, RIGHT_KIDNEY}
    assert [r.reused_features for r in results.values()] == [False, True]
    alone = {organ: segment_like(ct_phantom.image, painted, other_ct.image, default_model, ct_phantom.spacing,
                                 other_ct.spacing, label=organ).mask for organ in (LIVER, RIGHT_KIDNEY)}
    for organ, other in ((LIVER, RIGHT_KIDNEY), (RIGHT_KIDNEY, LIVER)):
        np.testing.assert_array_equal(results[organ].mask, alone[organ])
        assert not ((out == organ) & ~alone[organ]).any()
        assert not (alone[organ] & (out != organ) & ~alone[other]).any()  # lost only where both claim
    assert dice(out == LIVER, other_ct.label == LIVER) > 0.7
    assert dice(out == RIGHT_KIDNEY, other_ct.label == RIGHT_KIDNEY) > 0.3


def test_segment_like_names_bad_input(ct_phantom, default_model):
    with pytest.raises(DenseMPError, match="no painted voxel"):
        segment_like(ct_phantom.image, np.zeros(ct_phantom.image.shape, np.uint8), ct_phantom.image, default_model)
    with pytest.raises(DenseMPError, match="query image must be a 3D"):
        segment_like(ct_phantom.image, ct_phantom.label == LIVER, ct_phantom.image[..., 0], default_model)


def test_shard_splits_a_list_and_names_bad_specs():
    items = list(range(7))
    assert shard(items, "0/3") + shard(items, "1/3") + shard(items, "2/3") == [0, 3, 6, 1, 4, 2, 5]
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(DenseMPError, match="shard"):
            shard(items, bad)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ct_phantom, other_ct):
    """A support (phantom 11, liver painted) and a folder: two good scans, a corrupt one, a 2D one."""
    root = tmp_path_factory.mktemp("batch")
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    write_nifti(root / "support.nii.gz", ct_phantom.image, ct_phantom.affine)
    write_nifti(root / "support_painted.nii.gz", painted, ct_phantom.affine)
    scans = root / "scans"
    scans.mkdir()
    third = make_phantom(seed=22, modality="ct")
    # the second scan is stored flipped (another orientation); its mask must come back on its grid
    flipped_affine = third.affine @ np.array([[-1, 0, 0, third.image.shape[0] - 1], [0, 1, 0, 0],
                                              [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    write_nifti(scans / "a.nii.gz", other_ct.image, other_ct.affine)
    write_nifti(scans / "b.nii.gz", third.image[::-1], flipped_affine)
    (scans / "c.nii.gz").write_bytes(b"corrupt")
    write_nifti(scans / "d.nii.gz", np.zeros((30, 30), np.float32), np.eye(4))
    return root, {"a": other_ct.label == LIVER, "b": (third.label == LIVER)[::-1]}


def test_folder_run_isolates_bad_scans_writes_atomically_and_resumes(folder, default_model):
    root, truths = folder
    support = Support.from_files(root / "support.nii.gz", root / "support_painted.nii.gz")
    scans = list_scans(root / "scans")
    assert [p.name for p in scans] == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"]
    out = root / "out"
    rows = segment_folder(support, scans, out, default_model)
    assert [r.status for r in rows] == ["done", "done", "failed", "failed"]
    assert "Cannot read" in rows[2].message and "2D" in rows[3].message
    for name, truth in truths.items():
        mask = read_nifti(out / f"{name}.nii.gz")
        source = read_nifti(root / "scans" / f"{name}.nii.gz")
        assert np.array_equal(mask.affine, source.affine) and mask.data.shape == source.data.shape
        assert dice(mask.data.astype(bool), truth) > 0.6
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]  # no temporary files left
    before = (out / "a.nii.gz").stat().st_mtime_ns
    again = segment_folder(support, scans[:2], out, default_model)
    assert [r.status for r in again] == ["skipped (exists)"] * 2
    assert (out / "a.nii.gz").stat().st_mtime_ns == before


def test_folder_cli_reports_a_summary_and_exit_code(folder, capsys):
    root, _ = folder
    out = root / "cli-out"
    code = segment_main(["--support-image", str(root / "support.nii.gz"), "--support-mask",
                         str(root / "support_painted.nii.gz"), "--scans", str(root / "scans"), "--out", str(out),
                         "--shard", "0/2"])
    assert code == 3  # c.nii.gz (index 2) failed; a and c were this shard's
    with open(out / "summary_0of2.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scan"], r["status"]) for r in rows] == [("a.nii.gz", "done"), ("c.nii.gz", "failed")]
    assert int(rows[0]["first_slice"]) <= int(rows[0]["last_slice"]) and float(rows[0]["volume_ml"]) > 100
    assert "1 segmented, 0 already done, 1 failed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # a folder run without the support's mask
        segment_main(["--support-image", str(root / "support.nii.gz"), "--scans", str(root / "scans"),
                      "--out", str(out)])
    assert exit_info.value.code == 2
    assert "needs --support-image, --support-mask and --scans" in capsys.readouterr().err


def test_a_folder_run_says_when_the_support_is_an_outline(folder, ct_phantom, tmp_path, capsys):
    """The support's liver drawn as its contour: the folder run says once that it was filled, and
    the scan's liver is found as from the filled painting."""
    from scipy import ndimage

    root, truths = folder
    painted, z = paint_largest(ct_phantom.label, LIVER)
    painted[..., z] &= ~ndimage.binary_erosion(painted[..., z], iterations=2)
    contour = write_nifti(tmp_path / "contour.nii.gz", painted, ct_phantom.affine)
    code = segment_main(["--support-image", str(root / "support.nii.gz"), "--support-mask", str(contour),
                         "--scans", str(root / "scans"), "--pattern", "a.nii.gz", "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("is a closed outline") == 1 and f"on slice {z} of axis 2 is a closed outline" in printed
    assert dice(read_nifti(tmp_path / "out" / "a.nii.gz").data.astype(bool), truths["a"]) > 0.7


def test_a_folder_run_reads_scans_as_told_and_says_how(folder, tmp_path):
    """A scan read as another modality than the support (an MRI; a CT stored as HU + 1024, which
    reads as MRI) is refused with the way out, not segmented into a confident wrong mask;
    ``--modality`` reaches every scan of the folder, and the table says how each was read."""
    root, truths = folder
    scans = tmp_path / "scans"
    scans.mkdir()
    source = read_nifti(root / "scans" / "a.nii.gz")
    write_nifti(scans / "a.nii.gz", np.rint(source.data) + 1024, source.affine)  # HU + 1024
    mri = make_phantom(seed=12, modality="mri")
    write_nifti(scans / "mri.nii.gz", mri.image, mri.affine)
    support = ["--support-image", str(root / "support.nii.gz"), "--support-mask", str(root / "support_painted.nii.gz")]
    assert segment_main([*support, "--scans", str(scans), "--out", str(tmp_path / "auto")]) == 3
    with open(tmp_path / "auto" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scan"], r["status"]) for r in rows] == [("a.nii.gz", "failed"), ("mri.nii.gz", "failed")]
    for row in rows:
        assert row["message"] == ("The support was read as CT and this scan as MRI: a structure is found only in "
                                  "scans of the support's kind. If both are CT (or both MRI), say so with the "
                                  "modality (--modality, or the widget's scan type).")
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["summary.csv"]
    assert segment_main([*support, "--scans", str(scans), "--pattern", "a.nii.gz", "--out", str(tmp_path / "ct"),
                         "--modality", "ct"]) == 0
    with open(tmp_path / "ct" / "summary.csv") as f:
        [row] = list(csv.DictReader(f))
    assert row["read_as"] == "CT stored as HU + 1024"
    assert dice(read_nifti(tmp_path / "ct" / "a.nii.gz").data.astype(bool), truths["a"]) > 0.6


def test_support_with_a_mismatched_mask_is_named(tmp_path, ct_phantom):
    write_nifti(tmp_path / "s.nii.gz", ct_phantom.image, ct_phantom.affine)
    coarse = ct_phantom.affine @ np.diag([3, 3, 3, 1])  # neither the image's grid nor a part of it
    write_nifti(tmp_path / "m.nii.gz", np.ones((4, 4, 4), np.uint8), coarse)
    with pytest.raises(DenseMPError, match=r"support mask \(shape \(4, 4, 4\), voxels 4.43 x 4.43 x 15 mm\) does not "
                                           r"lie on the support image's voxel grid"):
        Support.from_files(tmp_path / "s.nii.gz", tmp_path / "m.nii.gz")


def test_a_folder_run_segments_every_structure_of_the_support(folder, ct_phantom, default_model):
    """A support with liver (6) and right kidney (2) painted: one label volume per scan and one
    summary row per structure; --label still picks one (0/1 output)."""
    root, _ = folder
    painted = np.zeros(ct_phantom.label.shape, np.uint8)
    for organ in (LIVER, RIGHT_KIDNEY):
        painted = np.maximum(painted, paint_largest(ct_phantom.label, organ)[0] * np.uint8(organ))
    write_nifti(root / "support_two.nii.gz", painted, ct_phantom.affine)
    support = Support.from_files(root / "support.nii.gz", root / "support_two.nii.gz")
    scans = list_scans(root / "scans")
    out = root / "out-two"
    rows = segment_folder(support, scans, out, default_model)
    assert [(r.scan, r.status, r.structure) for r in rows] == [
        ("a.nii.gz", "done", RIGHT_KIDNEY), ("a.nii.gz", "done", LIVER), ("b.nii.gz", "done", RIGHT_KIDNEY),
        ("b.nii.gz", "done", LIVER), ("c.nii.gz", "failed", None), ("d.nii.gz", "failed", None)]
    assert scan_counts(rows)["done"] == 2 and scan_counts(rows)["failed"] == 2
    third = make_phantom(seed=22, modality="ct")
    truths = {"a": make_phantom(seed=21, modality="ct").label, "b": third.label[::-1]}
    for name, truth in truths.items():
        mask = read_nifti(out / f"{name}.nii.gz").data
        assert set(np.unique(mask)) == {0, LIVER, RIGHT_KIDNEY}
        assert dice(mask == LIVER, truth == LIVER) > 0.6 and dice(mask == RIGHT_KIDNEY, truth == RIGHT_KIDNEY) > 0.3
        row = next(r for r in rows if r.scan == f"{name}.nii.gz" and r.structure == LIVER)
        voxel_ml = np.prod(read_nifti(root / "scans" / f"{name}.nii.gz").spacing) / 1000
        assert row.volume_ml == pytest.approx((mask == LIVER).sum() * voxel_ml, rel=1e-6)
    code = segment_main(["--support-image", str(root / "support.nii.gz"), "--support-mask",
                         str(root / "support_two.nii.gz"), "--scans", str(root / "scans"), "--out",
                         str(root / "cli-liver"), "--pattern", "a.nii.gz", "--label", str(LIVER)])
    assert code == 0
    assert set(np.unique(read_nifti(root / "cli-liver" / "a.nii.gz").data)) == {0, 1}


def test_a_support_without_the_structure_is_named_before_any_scan(ct_phantom):
    with pytest.raises(DenseMPError, match="no painted voxel"):
        Support(Scan(ct_phantom.image, ct_phantom.affine, None, None), np.zeros(ct_phantom.image.shape, np.uint8))
    with pytest.raises(DenseMPError, match="Label 3 is not in the support mask; its values: 6"):
        Support(Scan(ct_phantom.image, ct_phantom.affine, None, None),
                (ct_phantom.label == LIVER).astype(np.uint8) * 6, label=3)


def test_a_two_plane_support_is_embedded_once_per_plane_for_a_whole_folder(folder, ct_phantom, default_model,
                                                                            tmp_path, monkeypatch):
    """Painted on an axial and a coronal slice, the support's features of both planes stay
    cached while the folder's scans pass through: 2 support passes + 2 per scan, not 4 per scan."""
    import napari_densemp.engine as engine

    root, _ = folder
    truth = ct_phantom.label == LIVER
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    y = int(truth.sum(axis=(0, 2)).argmax())
    painted[:, y] |= truth[:, y]
    support = Support(Scan(ct_phantom.image, ct_phantom.affine, None, None), painted, None)
    passes = []
    real = engine.VolumeFeatures.of
    monkeypatch.setattr(engine.VolumeFeatures, "of", lambda *a, **k: passes.append(1) or real(*a, **k))
    scans = list_scans(root / "scans", "[ab].nii.gz")
    rows = segment_folder(support, scans, tmp_path / "out", default_model)
    assert [r.status for r in rows] == ["done", "done"] and len(passes) == 2 + 2 * len(scans)
