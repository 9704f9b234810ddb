"""The propagation engine: the walk's rules on hand-made probabilities, then the whole
engine with the bundled default model on phantoms."""

from __future__ import annotations

import numpy as np
import pytest

import napari_densemp.engine as engine
from napari_densemp.engine import (
    Cancelled,
    FeatureCache,
    PropagationOptions,
    SliceScorer,
    _calibrated_threshold,
    _walk,
    compute_features,
    painted_planes,
    painting_axis,
    parse_rules,
    plane_axis,
    propagate,
    propagate_labels,
)
from napari_densemp.errors import DenseMPError
from napari_densemp.painting import filled_outlines, larger_slice_tip, tiny_paintings
from src_data.phantoms import LIVER, RIGHT_KIDNEY, SPLEEN

from .conftest import dice, paint_largest

PIXEL = (1.0, 1.0)


def _disc(shape, centre, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _run_walk(prob: np.ndarray, seeds: dict, limits: tuple, options: PropagationOptions) -> np.ndarray:
    """The walk on a stack of hand-made probabilities, as a boolean volume."""
    out = np.zeros(prob.shape, dtype=bool)
    for z, kept in _walk(lambda z, step, until: prob[z], len(prob), seeds, limits, options, PIXEL).items():
        out[z] = kept
    return out


def test_walk_follows_the_structure_and_stops_where_it_ends():
    prob = np.zeros((12, 40, 40))
    for z in range(3, 9):
        prob[z][_disc((40, 40), (20, 20), 8)] = 0.9
    prob[:, 2:6, 2:6] = 0.9  # an unconnected look-alike on every slice: never kept
    seeds = {5: _disc((40, 40), (20, 20), 8)}
    region = _run_walk(prob, seeds, (0, 11), PropagationOptions())
    assert [z for z in range(12) if region[z].any()] == [3, 4, 5, 6, 7, 8]
    assert not region[:, 2:6, 2:6].any()


def test_walk_stops_when_the_region_balloons_into_a_neighbour():
    prob = np.zeros((10, 60, 60))
    for z in range(0, 10):
        prob[z][_disc((60, 60), (30, 30), 6)] = 0.9
    prob[7][:, :] = 0.9  # slice 7: everything looks like the structure
    seeds = {4: _disc((60, 60), (30, 30), 6)}
    options = PropagationOptions(clip_to_neighbour=False)
    region = _run_walk(prob, seeds, (0, 9), options)
    assert [z for z in range(10) if region[z].any()] == list(range(0, 7))
    # Clipping to the neighbourhood instead keeps the growth bounded and goes on.
    clipped = _run_walk(prob, seeds, (0, 9), PropagationOptions(max_growth=100.0))
    assert clipped[7].sum() < _disc((60, 60), (30, 30), 6 + 10).sum() + 1
    assert clipped[9].any()


def test_painted_near_its_end_a_widening_structure_is_followed_and_a_later_leak_still_stops():
    """An organ painted near its tip widens fast (here 4 -> 22 mm in radius over 6 slices, up to
    3x in area per slice): the ratio alone stops the walk at once; growth within the previous
    region grown by 5 mm is accepted while the structure has only widened. Once it narrows, a
    region over 1.2x the previous one (a leak into a neighbour) ends it, as before."""
    radii = [4, 7, 10, 13, 16, 19, 22, 20, 20, 20]
    prob = np.zeros((10, 80, 80))
    for z, r in enumerate(radii):
        prob[z][_disc((80, 80), (40, 40), r)] = 0.9
    prob[8, 25:55, 60:70] = 0.9  # slice 8: a neighbour joins on one side (within the 10 mm clip)
    seeds = {0: _disc((80, 80), (40, 40), 4)}
    reached = {g: [z for z, kept in enumerate(_run_walk(prob, seeds, (0, 9), PropagationOptions(growth_margin_mm=g)))
                   if kept.any()] for g in (0.0, 5.0)}
    assert 1.2 * (prob[7] > 0.5).sum() < (prob[8] > 0.5).sum() < _disc((80, 80), (40, 40), 25).sum()  # ring: would pass
    assert reached[0.0] == [0] and reached[5.0] == list(range(8))


def test_walk_stops_below_the_minimum_area_and_between_painted_slices():
    prob = np.zeros((10, 30, 30))
    for z in range(10):
        prob[z][_disc((30, 30), (15, 15), 5 if z != 2 else 1)] = 0.9
    seeds = {5: _disc((30, 30), (15, 15), 5)}
    region = _run_walk(prob, seeds, (0, 9), PropagationOptions(min_area_mm2=10.0))
    assert [z for z in range(10) if region[z].any()] == [3, 4, 5, 6, 7, 8, 9]
    two = {4: seeds[5], 6: seeds[5]}
    bounded = _run_walk(prob, two, (4, 6), PropagationOptions())
    assert [z for z in range(10) if bounded[z].any()] == [4, 5, 6]


def test_output_threshold_is_the_one_that_redraws_the_painting():
    # A prediction that comes out wider than the painting (as small structures do at
    # stride 8): a cone of probability; the painting is its part above 0.8.
    yy, xx = np.mgrid[:50, :50]
    prob = np.clip(1.0 - np.hypot(yy - 25, xx - 25) / 20.0, 0, 1) ** 0.25
    painting = prob > 0.8
    threshold = _calibrated_threshold(lambda z: prob, {0: painting}, PropagationOptions(), PIXEL)
    assert 0.76 <= threshold <= 0.82
    assert (prob > 0.5).sum() > 1.5 * painting.sum()  # what the fixed threshold would draw



def test_holes_in_a_drawn_slice_are_filled_unless_the_painting_has_its_own():
    """A vessel inside an organ comes out as a hole; the structure has none unless the painting
    shows one (a ring, or a vessel the user left out, over 1% of its area): then holes stay."""
    from types import SimpleNamespace

    from scipy import ndimage

    from napari_densemp.engine import _render, filled, has_holes

    disc = _disc((40, 40), (20, 20), 12)
    ring = disc & ~_disc((40, 40), (20, 20), 5)
    pinhole = disc.copy()
    pinhole[20, 20] = False  # one pixel of 449: a brush's slip
    assert not has_holes(disc[None]) and has_holes(ring[None]) and not has_holes(pinhole[None])
    assert has_holes(np.stack([disc, ring]))  # any painted slice with a hole
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):  # the fast fill is scipy's, holes touching the box's edge included
        noise = rng.random((30, 40)) < density
        np.testing.assert_array_equal(filled(noise), ndimage.binary_fill_holes(noise))
    assert not filled(np.zeros((5, 5), bool)).any()

    prob = np.where(ring, 0.9, 0.1).astype(np.float32)
    feats = SimpleNamespace(native_size=(40, 40))
    for fill, expected in ((True, disc), (False, ring)):
        out, confidence = _render(lambda z: prob, {1: ring}, feats, 0.5, 3, fill)
        np.testing.assert_array_equal(out[1], expected)
        assert not out[[0, 2]].any() and confidence[1] == pytest.approx(0.9)

# ------------------------------------------------------------------ with the default model
@pytest.mark.parametrize("organ,minimum", [(LIVER, 0.80), (SPLEEN, 0.70), (RIGHT_KIDNEY, 0.70)])
def test_phantom_propagation_dice(ct_phantom, default_model, organ, minimum):
    """Well above copying the painted slice everywhere (0.58, 0.55, 0.49 on this phantom)."""
    painted, z = paint_largest(ct_phantom.label, organ)
    truth = ct_phantom.label == organ
    result = propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, axis=2)
    assert result.mask.shape == ct_phantom.image.shape and result.mask.dtype == bool
    np.testing.assert_array_equal(result.mask[..., z], truth[..., z])  # the painted slice is kept
    assert dice(result.mask, truth) >= minimum
    true_z = np.flatnonzero(truth.any(axis=(0, 1)))
    # it stops where the organ ends: within 5 slices, far from the volume's ends
    assert abs(result.slice_range[0] - true_z[0]) <= 5 and abs(result.slice_range[1] - true_z[-1]) <= 5
    assert result.confidence.shape == (ct_phantom.image.shape[2],)
    assert result.confidence[z] > 0.8 and result.confidence[true_z[-1] + 6:].max(initial=0) == 0


def test_every_painted_structure_is_propagated_in_one_run(ct_phantom, default_model, monkeypatch):
    """Liver, spleen and right kidney painted on their own largest slices: one label volume,
    each structure as good as when propagated alone, the painting kept, no slice embedded twice."""
    painted = np.zeros(ct_phantom.label.shape, np.uint8)
    for organ in (LIVER, SPLEEN, RIGHT_KIDNEY):
        painted = np.maximum(painted, paint_largest(ct_phantom.label, organ)[0] * np.uint8(organ))
    embedded = []
    original = default_model.network.embed
    monkeypatch.setattr(default_model.network, "embed", lambda x: embedded.append(len(x)) or original(x))
    out, _ = propagate_labels(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing)
    monkeypatch.undo()
    assert out.shape == painted.shape and set(np.unique(out)) == {0, LIVER, SPLEEN, RIGHT_KIDNEY}
    np.testing.assert_array_equal(out[painted != 0], painted[painted != 0])
    assert sum(embedded) <= ct_phantom.image.shape[2]
    for organ in (LIVER, SPLEEN, RIGHT_KIDNEY):
        truth = ct_phantom.label == organ
        alone = propagate(ct_phantom.image, paint_largest(ct_phantom.label, organ)[0], default_model,
                          spacing=ct_phantom.spacing)
        assert dice(out == organ, truth) >= dice(alone.mask, truth) - 0.01, organ


def test_a_voxel_two_structures_claim_goes_to_the_more_confident(monkeypatch):
    def fake_propagate(volume, painted, model, spacing, axis, label, *args):
        mask = np.zeros(volume.shape, bool)
        mask[slice(2, 6) if label == 1 else slice(4, 8), :, 1] = True
        confidence = np.array([0.0, 0.9 if label == 1 else 0.8, 0.0], np.float32)
        return engine.PropagationResult(mask, confidence, (1, 1), [1], 0.0, 0.0, label == 2)

    monkeypatch.setattr(engine, "propagate", fake_propagate)
    painted = np.zeros((10, 4, 3), np.int16)
    painted[5, 0, 1], painted[7, 0, 1] = 1, 2  # label 2 painted on a voxel label 1 also claims
    out, _ = propagate_labels(np.zeros((10, 4, 3), np.float32), painted, model=None)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 1, 1], [0, 0, 1, 1, 1, 1, 2, 2, 0, 0])  # 4-5: both, 1 is surer
    assert out[5, 0, 1] == 1 and out[7, 0, 1] == 2


def test_structures_walked_across_different_planes_are_merged_by_their_own_slices(monkeypatch):
    def fake_propagate(volume, painted, model, spacing, axis, label, *args):
        mask = np.zeros(volume.shape, bool)
        mask[2:6, 1:3, 1] = True  # both claim voxels (2..5, 1..2, 1)
        confidence = np.zeros(volume.shape[axis], np.float32)
        if label == 1:  # walked across axis 2: one confidence for its slice 1
            confidence[1] = 0.85
        else:  # walked across axis 0: surer than label 1 on slices 2-3 only
            confidence[2:6] = [0.9, 0.9, 0.8, 0.8]
        return engine.PropagationResult(mask, confidence, (1, 1), [1], 0.0, 0.0, False, axis=axis)

    monkeypatch.setattr(engine, "propagate", fake_propagate)
    painted = np.zeros((10, 4, 3), np.uint8)
    painted[3:5, 0:2, 1] = 1  # four voxels in one slice along axis 2 only
    painted[7, 0:2, 0:2] = 2  # four voxels in one slice along axis 0 only
    out, results = propagate_labels(np.zeros((10, 4, 3), np.float32), painted, model=None, axis="auto")
    assert results[1].axis == 2 and results[2].axis == 0
    np.testing.assert_array_equal(out[2:6, 2, 1], [2, 2, 1, 1])
    np.testing.assert_array_equal(out[painted != 0], painted[painted != 0])


def test_each_structure_walks_the_plane_it_was_painted_on(ct_phantom, default_model):
    """The liver painted on an axial slice and the right kidney on a coronal one: with "auto"
    each is walked across its own plane and comes out as when propagated alone that way."""
    liver, _ = paint_largest(ct_phantom.label, LIVER)
    kidney = ct_phantom.label == RIGHT_KIDNEY
    y = int(kidney.sum(axis=(0, 2)).argmax())
    painted = liver * np.uint8(LIVER)
    painted[:, y][kidney[:, y]] = RIGHT_KIDNEY
    out, results = propagate_labels(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, axis="auto",
                                    affine=ct_phantom.affine)
    assert results[LIVER].axis == 2 and results[RIGHT_KIDNEY].axis == 1
    alone = {organ: propagate(ct_phantom.image, np.where(painted == organ, organ, 0), default_model,
                              spacing=ct_phantom.spacing, axis=axis, affine=ct_phantom.affine).mask
             for organ, axis in ((LIVER, 2), (RIGHT_KIDNEY, 1))}
    contested = alone[LIVER] & alone[RIGHT_KIDNEY]  # both claim these: each goes to one (merge_structures)
    for organ in (LIVER, RIGHT_KIDNEY):
        np.testing.assert_array_equal((out == organ) & ~contested, alone[organ] & ~contested)
    assert np.isin(out[contested], [LIVER, RIGHT_KIDNEY]).all()
    assert dice(out == RIGHT_KIDNEY, kidney) > 0.4  # its coronal slice copied everywhere: 0.19 (5 mm slices)


def test_mri_phantom_propagation(mri_phantom, default_model):
    painted, _ = paint_largest(mri_phantom.label, RIGHT_KIDNEY)
    result = propagate(mri_phantom.image, painted, default_model, spacing=mri_phantom.spacing)
    assert dice(result.mask, mri_phantom.label == RIGHT_KIDNEY) >= 0.70  # copying everywhere: 0.52



def test_on_mri_the_drawn_mask_keeps_to_the_painted_intensity_band(mri_phantom, ct_phantom, default_model):
    """On MRI a walk that spills into a neighbour of another intensity is cut back to the painted
    organ's band (this phantom, gated / not: liver 0.96 / 0.63, spleen 0.96 / 0.51, right kidney
    0.86 / 0.78); CT is left alone (a mandible is bone and marrow)."""
    def dices(phantom, organ):
        painted, _ = paint_largest(phantom.label, organ)
        cache, truth = FeatureCache(), phantom.label == organ
        return [dice(propagate(phantom.image, painted, default_model, spacing=phantom.spacing, cache=cache,
                               options=PropagationOptions(intensity_gate=gate)).mask, truth) for gate in (0.25, 0.0)]

    for organ in (LIVER, SPLEEN, RIGHT_KIDNEY):
        gated, ungated = dices(mri_phantom, organ)
        assert gated >= 0.85 and gated > ungated + 0.05, (organ, gated, ungated)
    gated, ungated = dices(ct_phantom, LIVER)
    assert gated == ungated


def test_intensity_band_cuts_a_neighbour_and_empties_slices_it_leaves_nothing_on():
    from napari_densemp.engine import _intensity_gated

    organ, neighbour = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    organ[10:30, 5:20], neighbour[10:30, 20:35] = True, True  # side by side; squares survive the opening
    slices = np.zeros((3, 40, 40), np.float32)
    slices[:, organ], slices[:, neighbour] = 100.0, 200.0
    slices[2, organ] = 200.0  # on slice 2 the "organ" has the neighbour's intensity
    paint = np.zeros((3, 40, 40), bool)
    paint[0] = organ
    out = np.zeros((3, 40, 40), bool)
    out[1] = out[2] = organ | neighbour  # the walk spilled over
    confidence = np.full(3, 0.9, np.float32)
    gated = _intensity_gated(out, confidence, slices, paint, [0], 0.25, True)
    np.testing.assert_array_equal(gated[1], organ)  # a painting of one flat value still has a band
    assert not gated[2].any() and confidence[2] == 0.0 and confidence[1] == pytest.approx(0.9)


def test_on_ct_a_walk_ends_where_it_leaves_the_painted_intensity_band():
    """A walk that runs on with the organ's shape over tissue of another HU range is ended there,
    on each side, and everything beyond it goes; a bimodal painting (bone and marrow) keeps slices
    of the same mix."""
    from napari_densemp.engine import _band_stopped

    organ = np.zeros((20, 20), bool)
    organ[5:15, 5:15] = True  # 100 voxels
    slices = np.zeros((7, 20, 20), np.float32)
    slices[:, organ] = 60.0  # organ HU
    slices[:, :, :10] = np.where(organ[:, :10], 600.0, 0.0)  # its left half is "bone"
    slices[1, organ] = -100.0  # slice 1: the walk is on fat, 0% in the band
    slices[2][organ & (np.arange(20)[None, :] >= 13)] = -100.0  # slice 2: 80% in the band
    slices[6, organ] = -500.0  # slice 6: lung, outside 60-600 HU widened by a quarter
    paint = np.zeros((7, 20, 20), bool)
    paint[3] = organ
    out = np.broadcast_to(organ, (7, 20, 20)).copy()
    confidence = np.full(7, 0.9, np.float32)
    stopped = _band_stopped(out, confidence, slices, paint, [3], 0.2)
    assert [bool(s.any()) for s in stopped] == [False, False, True, True, True, True, False]
    np.testing.assert_array_equal(stopped[2], organ)  # the rule ends walks, it cuts no voxel
    np.testing.assert_allclose(confidence, [0, 0, 0.9, 0.9, 0.9, 0.9, 0])


def test_the_band_stop_acts_on_ct_walks_only(ct_phantom, mri_phantom, default_model):
    """A share no drawn slice can reach (above 1) ends a CT walk at its painted slice; an MRI walk
    is not touched by it (the MRI has its own band, which cuts voxels)."""
    for phantom, ends_at_painting in ((ct_phantom, True), (mri_phantom, False)):
        painted, z = paint_largest(phantom.label, LIVER)
        cache = FeatureCache()
        walks = [propagate(phantom.image, painted, default_model, spacing=phantom.spacing, cache=cache,
                           options=PropagationOptions(ct_band_stop=share)) for share in (1.01, 0.0)]
        assert walks[1].slice_range[1] - walks[1].slice_range[0] >= 10
        if ends_at_painting:
            assert walks[0].slice_range == (z, z)
            assert np.flatnonzero(walks[0].confidence).tolist() == [z]  # only the painted slice's
        else:
            np.testing.assert_array_equal(walks[0].mask, walks[1].mask)


def test_axis_is_respected(ct_phantom, default_model):
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    volume = np.ascontiguousarray(ct_phantom.image[:, :, 10:50])
    paint = np.ascontiguousarray(painted[:, :, 10:50])
    spacing = ct_phantom.spacing
    a = propagate(volume, paint, default_model, spacing=spacing, axis=2)
    moved = propagate(np.moveaxis(volume, 2, 0), np.moveaxis(paint, 2, 0), default_model,
                      spacing=(spacing[2], spacing[0], spacing[1]), axis=0)
    np.testing.assert_array_equal(np.moveaxis(moved.mask, 0, 2), a.mask)


def test_second_run_reuses_features_and_uses_every_painted_slice(ct_phantom, default_model, monkeypatch):
    truth = ct_phantom.label == LIVER
    zs = np.flatnonzero(truth.any(axis=(0, 1)))
    cache = FeatureCache()
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    first = propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, cache=cache)
    calls = []
    original = default_model.network.embed
    monkeypatch.setattr(default_model.network, "embed", lambda x: calls.append(1) or original(x))
    low, high = zs[0] + 4, zs[-1] - 4
    painted[..., low] = truth[..., low]
    painted[..., high] = truth[..., high]
    second = propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, cache=cache,
                       options=PropagationOptions(between_painted_only=True))
    assert calls == [] and second.reused_features and not first.reused_features
    assert second.painted_slices[0] == low and second.painted_slices[-1] == high
    assert second.slice_range == (low, high)


def test_mirror_averaging_makes_the_result_mirror_with_the_scan(ct_phantom, default_model, monkeypatch):
    """A scan stored mirrored left-right gets exactly the mirrored mask (without averaging the
    default model's masks differ), as good as without; a re-run reuses both feature sets."""
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    truth = ct_phantom.label == LIVER
    spacing, options = ct_phantom.spacing, PropagationOptions(mirror_average=True)
    image, mirrored_image, mirrored_paint = ct_phantom.image, ct_phantom.image[::-1].copy(), painted[::-1].copy()
    plain = [propagate(v, p, default_model, spacing=spacing).mask for v, p in
             ((image, painted), (mirrored_image, mirrored_paint))]
    assert dice(plain[0], plain[1][::-1]) < 0.99
    cache = FeatureCache()
    stored = propagate(image, painted, default_model, spacing=spacing, options=options, cache=cache)
    mirrored = propagate(mirrored_image, mirrored_paint, default_model, spacing=spacing, options=options)
    np.testing.assert_array_equal(mirrored.mask[::-1], stored.mask)
    assert dice(stored.mask, truth) >= dice(plain[0], truth) - 0.02
    calls = []
    original = default_model.network.embed
    monkeypatch.setattr(default_model.network, "embed", lambda x: calls.append(1) or original(x))
    again = propagate(image, painted, default_model, spacing=spacing, options=options, cache=cache)
    assert calls == [] and again.reused_features and not stored.reused_features
    np.testing.assert_array_equal(again.mask, stored.mask)


def _profiled(**orientations):
    """A stand-in model that carries only a preprocessing profile (all InPlaneView reads)."""
    from types import SimpleNamespace

    from napari_densemp.preprocessing import PreprocessingProfile

    return SimpleNamespace(profile=PreprocessingProfile(orientations=orientations))


@pytest.mark.parametrize("columns,axis,expected", [
    ([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], 2, (False, (True, True))),  # LPS (DICOM) axial -> RAS
    ([[0, 1, 0], [1, 0, 0], [0, 0, 1]], 2, (True, (False, False))),  # first axis runs A, second R
    ([[0, -1, 0], [1, 0, 0], [0, 0, 1]], 2, (True, (False, True))),  # first axis runs P, second R
    ([[1, 0, 0], [0, 1, 0], [0, 0, -1]], 2, (False, (False, False))),  # the slicing axis is left alone
    ([[-1, 0, 0], [0, 1, 0], [0, 0, -1]], 0, (False, (False, True))),  # sagittal slices: A and S in-plane
])
def test_slices_are_shown_in_the_models_training_orientation(columns, axis, expected):
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, dtype=float).T * 0.8  # columns: each stored axis' world direction
    view = engine.InPlaneView.for_scan(_profiled(ct="RAS"), np.full((4, 5, 6), -1000.0), affine, axis, "ct")
    assert (view.swap, view.flips) == expected
    slices = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(view.back(view.show(slices)), slices)
    assert view.spacing((1.0, 2.0)) == ((2.0, 1.0) if view.swap else (1.0, 2.0))
    # without an affine, or for a modality the model has no orientation for: slices as stored
    for model, known, modality in ((_profiled(ct="RAS"), None, "ct"), (_profiled(ct="RAS"), affine, "mri")):
        unchanged = engine.InPlaneView.for_scan(model, np.zeros((4, 5, 6)), known, axis, modality)
        assert (unchanged.swap, unchanged.flips) == (False, (False, False))


def test_a_scan_stored_another_way_gets_the_same_mask(ct_phantom, default_model):
    """The phantom CT (stored LPS) rewritten as RAS and with its in-plane axes swapped, each with
    the matching affine: the default model sees the same slices, so the masks agree voxel for voxel."""
    import nibabel as nib

    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    assert default_model.profile.orientations["ct"] == "RAS"
    stored = propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing,
                       affine=ct_phantom.affine)
    for ornt in ([[0, -1], [1, -1], [2, 1]], [[1, 1], [0, 1], [2, 1]]):  # each its own inverse
        ornt = np.array(ornt, dtype=float)
        image, paint = (nib.orientations.apply_orientation(a, ornt) for a in (ct_phantom.image, painted))
        affine = ct_phantom.affine @ nib.orientations.inv_ornt_aff(ornt, ct_phantom.image.shape)
        spacing = tuple(np.linalg.norm(affine[:3, :3], axis=0))
        other = propagate(np.ascontiguousarray(image), np.ascontiguousarray(paint), default_model,
                          spacing=spacing, affine=affine)
        np.testing.assert_array_equal(nib.orientations.apply_orientation(other.mask, ornt), stored.mask)
    assert dice(stored.mask, ct_phantom.label == RIGHT_KIDNEY) >= 0.70


def test_an_organ_painted_as_its_outline_gives_the_painted_organs_mask(ct_phantom, default_model):
    """The liver drawn as a 2-pixel contour on its largest slice: filled, it gives exactly the mask
    of the liver painted whole, and the result says which slice was filled; kept as painted (the
    option off) the contour's inside is background and the walk finds nothing like the liver."""
    from scipy import ndimage

    painted, z = paint_largest(ct_phantom.label, LIVER)
    truth = ct_phantom.label == LIVER
    contour = painted.copy()
    contour[..., z] = truth[..., z] & ~ndimage.binary_erosion(truth[..., z], iterations=2)
    assert (ndimage.binary_fill_holes(contour[..., z]) == truth[..., z]).all()
    run = dict(spacing=ct_phantom.spacing, affine=ct_phantom.affine)
    whole, drawn = (propagate(ct_phantom.image, p, default_model, **run) for p in (painted, contour))
    assert drawn.filled_outlines == [(2, z)] and whole.filled_outlines == []
    np.testing.assert_array_equal(drawn.mask, whole.mask)
    assert dice(drawn.mask, truth) >= 0.8
    kept = propagate(ct_phantom.image, contour, default_model,
                     options=default_model.default_options(fill_outlines=False), **run)
    assert kept.filled_outlines == [] and dice(kept.mask, truth) < 0.1


def test_a_ct_clipped_to_its_window_is_read_as_the_ct_it_is(ct_phantom, default_model):
    """Shipped clipped to [-125, 275] HU (no air left), the phantom CT is still read as CT, and the
    mask is the unclipped scan's, voxel for voxel (the model's CT window is that range)."""
    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    assert default_model.profile.ct_window == (-125.0, 275.0)
    hu, clipped = (propagate(image, painted, default_model, spacing=ct_phantom.spacing, affine=ct_phantom.affine)
                   for image in (ct_phantom.image, np.clip(ct_phantom.image, -125, 275)))
    assert clipped.read_as == hu.read_as == "CT"
    np.testing.assert_array_equal(clipped.mask, hu.mask)


def test_only_the_slices_the_walk_reaches_are_embedded(ct_phantom, default_model, monkeypatch):
    """A kidney walk embeds its own slices and a batch beyond each end, not the whole volume,
    and gives exactly the mask of a run whose every slice was embedded beforehand."""
    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    truth_z = np.flatnonzero((ct_phantom.label == RIGHT_KIDNEY).any(axis=(0, 1)))
    embedded = []
    original = default_model.network.embed
    monkeypatch.setattr(default_model.network, "embed", lambda x: embedded.append(len(x)) or original(x))
    lazy = propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing)
    monkeypatch.undo()
    n = ct_phantom.image.shape[2]
    assert len(truth_z) + 2 * SliceScorer.ahead < n
    assert sum(embedded) <= len(truth_z) + 2 * SliceScorer.ahead + 2
    cache = FeatureCache()
    slices = np.moveaxis(ct_phantom.image, 2, 0)
    key = FeatureCache.key(default_model, slices, ct_phantom.spacing[:2], "auto")
    cache.put(key, compute_features(default_model, slices, ct_phantom.spacing[:2]))
    eager = propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, cache=cache)
    assert eager.reused_features and not lazy.reused_features
    np.testing.assert_array_equal(lazy.mask, eager.mask)
    np.testing.assert_allclose(lazy.confidence, eager.confidence, atol=1e-6)


def test_cancel_stops_a_run(ct_phantom, default_model):
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    seen = []
    with pytest.raises(Cancelled):
        propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing,
                  progress=lambda done, total, stage: seen.append(done), cancel=lambda: len(seen) >= 1)
    assert len(seen) == 1


def test_progress_counts_the_walk_and_fills_a_known_total(ct_phantom, default_model):
    """Where the walk ends is not known beforehand: it reports a rising count with total 0 (a busy
    bar), never a bar that jumps to full. Embedding a whole volume reports a total it reaches."""
    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    seen = []
    result = propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing,
                       progress=lambda done, total, stage: seen.append((done, total, stage)))
    assert {(total, stage) for _, total, stage in seen} == {(0, "following the structure")}
    counts = [done for done, _, _ in seen]
    first, last = result.slice_range
    assert counts == sorted(counts) and last - first + 1 <= counts[-1] < ct_phantom.image.shape[2]
    seen.clear()
    compute_features(default_model, np.moveaxis(ct_phantom.image, 2, 0), ct_phantom.spacing[:2],
                     progress=lambda done, total, stage: seen.append((done, total)))
    assert seen[-1] == (ct_phantom.image.shape[2],) * 2 and all(total == seen[-1][1] for _, total in seen)


def _with_second_label(painted: np.ndarray) -> np.ndarray:
    painted = painted.copy()
    painted[:2, :2, 0] = 3
    return painted


@pytest.mark.parametrize("make,message", [
    (lambda v, p: (v, np.zeros_like(p)), "no painted voxel"),
    (lambda v, p: (v, _with_second_label(p)), "Several label values"),
    (lambda v, p: (v, p[:-1]), "shape"),
    (lambda v, p: (v[..., 0], p[..., 0]), "3D"),
    (lambda v, p: (v[..., None], p[..., None]), "3D"),
    (lambda v, p: (np.where(p > 0, np.nan, v), p), "NaN"),
    (lambda v, p: (np.full_like(v, -1000.0), p), r"same value \(-1000.0\) in every voxel"),
    (lambda v, p: (v, p * 0.4), r"only fractions \(largest 0.4\)"),
])
def test_bad_input_is_named(ct_phantom, default_model, make, message):
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    volume, paint = make(ct_phantom.image, painted)
    with pytest.raises(DenseMPError, match=message):
        propagate(volume, paint, default_model, spacing=ct_phantom.spacing)


def test_painting_on_another_axis_is_named(ct_phantom, default_model):
    painted = np.zeros(ct_phantom.label.shape, np.uint8)
    x = ct_phantom.label.shape[0] // 3
    painted[x] = ct_phantom.label[x] == LIVER  # a sagittal slice painted, axial slicing asked
    with pytest.raises(DenseMPError, match="Set the slicing axis to 0"):
        propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, axis=2)
    painted[x + 12] = ct_phantom.label[x + 12] == LIVER  # two sagittal slices: lines on every axial slice
    with pytest.raises(DenseMPError, match=r"covers areas only on slices of axis 0.*Set the slicing axis to 0"):
        propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, axis=2)


def test_painting_axis_is_the_one_plane_painted():
    painted = np.zeros((20, 30, 40), np.uint8)
    painted[5, 10:20, 10:30] = 1
    assert painting_axis(painted) == 0
    painted[:] = 0
    painted[2:12, 7, 10:30] = 3
    assert painting_axis(painted) == 1
    painted[:] = 0
    painted[2:12, 10:20, 9] = 1
    painted[2:12, 10:20, 31] = 1  # two axial slices
    assert painting_axis(painted) == 2
    painted[:] = 0
    painted[2:18, 4, 10:30] = 1
    painted[2:18, 25, 10:30] = 1  # top and bottom painted on coronal slices
    assert painting_axis(painted) == 1
    painted[:] = 0
    painted[4, 5, 6] = 1  # a dot lies in one slice along every axis: the default
    assert painting_axis(painted, default=1) == 1


def test_the_tip_names_the_slice_where_the_result_outgrew_the_painting():
    """A cone painted at its tip: the tip names the cone's widest unpainted slice and the ratio;
    painted on its widest slice, on two planes, or with a result no larger, there is no tip."""
    yy, xx = np.ogrid[:40, :40]
    cone = np.stack([(yy - 20) ** 2 + (xx - 20) ** 2 <= r * r for r in (2, 4, 6, 8, 10, 12)], axis=-1)
    tip_painting = np.zeros_like(cone)
    tip_painting[..., 1] = cone[..., 1]  # 49 voxels; the widest slice, 5, holds 441
    tip = larger_slice_tip(cone, tip_painting, axis=2)
    assert tip is not None and tip == "check slice 5 of axis 2 (9.0x the painted area): paint it there too"
    widest = np.zeros_like(cone)
    widest[..., 5] = cone[..., 5]
    assert larger_slice_tip(cone, widest, axis=2) is None
    assert larger_slice_tip(cone & (np.arange(6) < 2), tip_painting, axis=2) is None  # at most 1.0x larger
    two_planes = tip_painting.copy()
    two_planes[20, 10:30, :] = True  # a coronal correction too: walked across both, no single slice to name
    assert larger_slice_tip(cone, two_planes, axis=2) is None
    coronal = np.moveaxis(cone, 2, 1)  # the same cone walked across axis 1
    assert larger_slice_tip(coronal, np.moveaxis(tip_painting, 2, 1), axis=1).startswith("check slice 5 of axis 1")
    outline = np.zeros_like(cone)  # the widest slice painted as its outline: its inside counts, no tip
    outline[..., 5] = cone[..., 5] & ~_disc((40, 40), (20, 20), 10)
    assert larger_slice_tip(cone, outline, axis=2) is None


def test_a_painted_closed_outline_is_filled_and_a_ring_or_a_left_out_vessel_is_not():
    """An outline drawn around a structure (inside unpainted, at least as large as the stroke) is
    the structure, also when its ends miss by a few pixels; a ring whose hole is smaller than its
    wall, a vessel left out, a stroke open by 10 pixels, a 3D mask of a tube and a painting on a
    coronal slice are told apart, each on its own plane."""
    disc = _disc((40, 40), (20, 20), 12)
    outline, ring, vessel = (disc & ~_disc((40, 40), (20, 20), r) for r in (10, 5, 2))
    nearly_closed = outline.copy()
    nearly_closed[19:22, 28:] = False  # the stroke's ends 3 pixels apart on the right
    open_stroke = outline & (np.arange(40) < 30)[None, :]  # 10 pixels open: nothing enclosed
    volume = np.zeros((40, 40, 10), bool)
    for i, painting in enumerate((outline, nearly_closed, ring, vessel, open_stroke)):
        volume[..., 2 * i] = painting  # each slice painted on its own
    out, done = filled_outlines(volume, axis=2)
    assert done == [(2, 0), (2, 2)]
    np.testing.assert_array_equal(out[..., 0], disc)
    gap = disc & ~out[..., 2]  # filled but for the gap's outer edge
    assert not (out[..., 2] & ~disc).any() and gap.sum() <= (outline & ~nearly_closed).sum()
    np.testing.assert_array_equal(out[..., 3:], volume[..., 3:])
    coronal = np.zeros((40, 3, 40), bool)
    coronal[:, 1, :] = outline  # drawn on slice 1 across axis 1
    out, done = filled_outlines(coronal, axis=1)
    assert done == [(1, 1)]
    np.testing.assert_array_equal(out[:, 1, :], disc)
    untouched, none = filled_outlines(volume[..., 3:], axis=2)
    assert none == [] and np.array_equal(untouched, volume[..., 3:])
    tube = np.repeat(outline[..., None], 4, axis=2)  # a finished 3D mask of a hollow structure: kept
    assert filled_outlines(tube, axis=2)[1] == []


def test_tiny_paintings_are_slices_painted_on_their_own_with_under_2_percent():
    """A 1-pixel and a 9-pixel painting beside a 1600-pixel one are tiny; a 100-pixel one (6%),
    the small ends of a finished 3D mask and a single painted slice are not."""
    paint = np.zeros((12, 60, 60), bool)
    paint[5, 10:50, 10:50] = True
    paint[9, 2, 2] = True
    paint[2, 30:33, 30:33] = True
    paint[7, 30:40, 30:40] = True
    assert tiny_paintings(paint) == [2, 9]
    mask_3d = paint.copy()
    mask_3d[3:5, 20:40, 20:40] = mask_3d[6, 20:40, 20:40] = True  # slices 2-7 painted: a 3D mask
    assert tiny_paintings(mask_3d) == [9]
    assert tiny_paintings(paint[5:6]) == [] and tiny_paintings(np.zeros((3, 4, 4), bool)) == []


def test_a_stray_click_is_drawn_as_painted_and_named(ct_phantom, default_model):
    """The liver painted on its largest slice and one voxel clicked in the air 5 slices away: that
    slice is drawn as painted and the walk ends there, which costs the liver beyond it; the
    result names the slice, so the user can erase the click."""
    painted, z = paint_largest(ct_phantom.label, LIVER)
    truth = ct_phantom.label == LIVER
    stray = painted.copy()
    stray[10, 10, z + 5] = 1
    run = dict(spacing=ct_phantom.spacing, affine=ct_phantom.affine)
    clean, clicked = (propagate(ct_phantom.image, p, default_model, **run) for p in (painted, stray))
    assert clicked.tiny_paintings == [(2, (10, 10, z + 5))] and clean.tiny_paintings == []
    assert clicked.painted_slices == [z, z + 5] and clicked.mask[..., z + 5].sum() == 1
    assert dice(clean.mask, truth) >= 0.8 and dice(clicked.mask, truth) < dice(clean.mask, truth) - 0.2


def test_a_3d_mask_is_walked_across_the_scans_axial_axis():
    mask = np.zeros((20, 30, 40), np.uint8)
    mask[5:15, 8:22, 10:30] = 1  # a finished 3D mask: no plane was painted
    assert painting_axis(mask) == 2
    sagittal = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # axes run S, R, A
    assert painting_axis(mask, affine=sagittal) == 0
    assert [plane_axis(sagittal, p) for p in ("axial", "coronal", "sagittal")] == [0, 2, 1]
    lps = np.diag([-0.7, -0.7, 3.0, 1.0])
    assert [plane_axis(lps, p) for p in ("axial", "coronal", "sagittal")] == [2, 1, 0]
    with pytest.raises(DenseMPError, match="plane must be one of axial, coronal, sagittal"):
        plane_axis(lps, "oblique")


def test_painted_planes_are_found_from_areas_not_lines():
    painted = np.zeros((20, 30, 40), bool)
    painted[4:16, 5:25, 12] = True
    assert painted_planes(painted, 2) == {2: [12]}
    painted[4:16, 5:25, 13:15] = True  # a few adjacent axial slices: still one plane
    assert painted_planes(painted, 2) == {2: [12, 13, 14]}
    painted[:] = False
    painted[4:16, 5:25, 12] = True
    painted[4:16, 9, 6:30] = True  # a correction painted on coronal slice 9
    assert painted_planes(painted, 2) == {2: [12], 1: [9]}
    assert painted_planes(painted, 1) == {1: [9], 2: [12]}
    painted[:] = False
    painted[4:16, 9, 12] = True  # a line: no area anywhere, walked as painted
    assert painted_planes(painted, 2) == {2: [12]}


def test_walks_across_two_planes_agree_where_both_reached():
    def walk(axis: int, reach: tuple[int, int], kept: np.ndarray) -> engine.PropagationResult:
        return engine.PropagationResult(kept, np.zeros(4, np.float32), reach, [], 0.0, 0.0, False, axis=axis)

    axial, coronal = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    axial[:, :, 0:2] = True  # walked axial slices 0-1 (axis 2), kept everything there
    coronal[1:3, 0:3, :] = True  # walked coronal slices 0-2 (axis 1), kept rows 1-2
    painted = np.zeros((4, 4, 4), bool)
    painted[0, 0, 0] = True
    out = engine._agreeing([walk(2, (0, 1), axial), walk(1, (0, 2), coronal)], painted)
    assert out[:, 0:3, 0:2].sum() == 2 * 3 * 2 + 1  # both reached: kept where both kept, and the painting
    assert out[:, 3, 0:2].all()  # only the axial walk reached coronal slice 3: it decides
    assert out[1:3, 0:3, 2:].all() and not out[[0, 3], 0:3, 2:].any()  # only the coronal walk reached z 2-3
    assert not out[:, 3, 2:].any()  # neither reached


def test_a_correction_painted_on_another_plane_is_walked_across_it(ct_phantom, default_model):
    """The liver painted on its largest axial slice and on its largest coronal slice, in one
    layer: each plane is walked across its own axis and the walks combined (until they were,
    the coronal painting's lines were taken as axial paintings: Dice 0.14)."""
    truth = ct_phantom.label == LIVER
    axial, z = paint_largest(ct_phantom.label, LIVER)
    y = int(truth.sum(axis=(0, 2)).argmax())
    both = axial.copy()
    both[:, y] |= truth[:, y]
    result = propagate(ct_phantom.image, both, default_model, spacing=ct_phantom.spacing, axis=2,
                       affine=ct_phantom.affine)
    assert result.planes == {2: [z], 1: [y]} and result.axis == 2
    assert result.mask[both.astype(bool)].all()
    on_slices = np.flatnonzero(result.mask.any(axis=(0, 1)))
    assert (result.confidence[on_slices] > 0.5).all()  # also where only the coronal walk segmented
    assert (result.confidence > 0).sum() == on_slices.size
    alone = propagate(ct_phantom.image, axial, default_model, spacing=ct_phantom.spacing, axis=2,
                      affine=ct_phantom.affine)
    assert dice(result.mask, truth) > 0.85 and dice(result.mask, truth) >= dice(alone.mask, truth)  # 0.889, 0.863


def test_between_painted_slices_bounds_the_slicing_axis_when_painted_on_two_planes(ct_phantom, v0_model):
    """Top and bottom painted on axial slices and a coronal slice too, "only between the painted
    slices": the coronal walk still runs, but nothing beyond the axial paintings is added
    (before, the coronal walk was held to its own single slice). Figures of v0 (v3: 0.850 against
    0.830 for the axial paintings alone)."""
    truth = ct_phantom.label == LIVER
    zs = np.flatnonzero(truth.any(axis=(0, 1)))
    top, bottom = int(zs[3]), int(zs[-4])
    y = int(truth.sum(axis=(0, 2)).argmax())
    painted = np.zeros(truth.shape, np.uint8)
    painted[..., [top, bottom]] = truth[..., [top, bottom]]
    painted[:, y] |= truth[:, y]
    result = propagate(ct_phantom.image, painted, v0_model, spacing=ct_phantom.spacing, axis=2,
                       affine=ct_phantom.affine, options=v0_model.default_options(between_painted_only=True))
    assert result.planes == {2: [top, bottom], 1: [y]}
    outside = np.ones(truth.shape[2], bool)
    outside[top:bottom + 1] = False
    np.testing.assert_array_equal(result.mask[..., outside], painted[..., outside].astype(bool))
    inside = slice(top, bottom + 1)
    assert dice(result.mask[..., inside], truth[..., inside]) > 0.85  # 0.864; the axial paintings alone 0.828


def test_label_choice(ct_phantom, default_model):
    painted, _ = paint_largest(ct_phantom.label, LIVER)
    with pytest.raises(DenseMPError, match="Label 4 is not painted"):
        propagate(ct_phantom.image, painted, default_model, spacing=ct_phantom.spacing, label=4)


def _synthetic_scorer(organ_slices: range):
    """A scorer over hand-made features: organ cells carry e1, the rest e2 (+ a little e3)."""
    import torch

    from napari_densemp.engine import Model, SliceScorer, VolumeFeatures, slice_prototypes
    from napari_densemp.network import FewShotSegmenter, NetworkConfig
    from napari_densemp.preprocessing import PreprocessingProfile

    n, size = 10, 16
    features = torch.zeros(n, 4, size, size)
    features[:, 1] = 1.0
    features[:, 2] = 0.1
    organ = torch.from_numpy(_disc((size, size), (8, 8), 4))
    for z in organ_slices:
        features[z, :, organ] = torch.tensor([1.0, 0.0, 0.1, 0.0])[:, None]
    feats = VolumeFeatures.precomputed(features.to(torch.bfloat16), (64, 64), (64, 64), "ct")
    network = FewShotSegmenter(NetworkConfig(depth=18, last_layer=3, feature_dim=4))
    model = Model(network, PreprocessingProfile(), torch.device("cpu"), "synthetic")
    painted = torch.from_numpy(_disc((64, 64), (33, 33), 16).astype(np.float32))
    return SliceScorer(model, feats, slice_prototypes(model, feats, {5: painted})), painted.numpy() > 0.5


def test_scorer_and_walk_on_synthetic_features():
    scorer, seed = _synthetic_scorer(range(2, 8))
    assert scorer(5)[seed].mean() > 0.9 and scorer(5)[~seed].mean() < 0.1
    assert scorer(9).max() < 0.5  # no organ features: nothing above threshold
    region = _walk(scorer, 10, {5: seed}, (0, 9), PropagationOptions(), PIXEL)
    assert sorted(z for z, kept in region.items() if kept.any()) == [2, 3, 4, 5, 6, 7]


def test_a_walk_in_another_patient_goes_at_most_its_share_of_the_supports_extent():
    """The support's structure spans slices 2-7 of 2 mm, painted at 5: 6 mm below and 4 mm above.
    On a query of 1 mm slices, a walk may go 1.5 x that: 9 slices down, 6 up. A 3D support's
    extent is its mask's."""
    import torch

    scorer, seed = _synthetic_scorer(range(2, 8))
    masks = {5: torch.from_numpy(seed.astype(np.float32))}
    options = PropagationOptions(extent_limit=1.5)
    reach = engine._support_reach(scorer, 10, [5], 5, masks, 2.0, 1.0, options, PIXEL)
    assert reach == (9, 6)
    assert engine._support_reach(scorer, 10, [1, 5, 9], 5, masks, 2.0, 1.0, options, PIXEL) == (12, 12)
    unlimited = engine._support_reach(scorer, 10, [5], 5, masks, 2.0, 1.0, PropagationOptions(extent_limit=0), PIXEL)
    assert min(unlimited) >= 10


def test_rules_parse_to_typed_option_values_and_name_what_is_wrong():
    rules = parse_rules(["min_confidence=0.7", "seed_candidates=3", "calibrate_threshold=no"])
    assert rules == {"min_confidence": 0.7, "seed_candidates": 3, "calibrate_threshold": False}
    assert PropagationOptions(**rules).seed_candidates == 3
    with pytest.raises(DenseMPError, match=r"expected NAME=VALUE.*min_confidence"):
        parse_rules(["confidence=0.7"])
    with pytest.raises(DenseMPError, match="'many' is not a whole number"):
        parse_rules(["seed_candidates=many"])
    with pytest.raises(DenseMPError, match="'maybe' is not true or false"):
        parse_rules(["calibrate_threshold=maybe"])
