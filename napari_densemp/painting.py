"""What a painting says: which labels, on which slices of which planes, across which axis.

Plain numpy (and scipy) on the user's mask, before any model runs; bad paintings get a message
that says what to change.
"""

from __future__ import annotations

from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from .errors import DenseMPError


def integer_painting(painted: np.ndarray) -> np.ndarray:
    """Label values as integers (masks saved as floats are rounded); NaN or inf is named."""
    painted = np.asarray(painted)
    if not (np.issubdtype(painted.dtype, np.integer) or painted.dtype == bool):
        if np.issubdtype(painted.dtype, np.floating) and not np.isfinite(painted).all():
            raise DenseMPError("The painted mask holds NaN or infinite values.")
        rounded = np.rint(painted).astype(np.int64)
        if not rounded.any() and painted.any():
            raise DenseMPError(f"The painted mask holds no whole label value, only fractions (largest "
                               f"{float(np.abs(painted).max()):g}): save it with label values 1, 2, ...")
        painted = rounded
    return painted


def painted_labels(painted: np.ndarray) -> list[int]:
    """The label values painted (non-zero), sorted; an error when nothing is painted."""
    painted = integer_painting(painted)
    values = np.unique(painted[painted != 0])  # painted voxels are few: sort only those
    if values.size == 0:
        raise DenseMPError("The painted mask has no painted voxel: paint the structure on at least one slice.")
    return [int(v) for v in values]


def painted_binary(painted: np.ndarray, label: int | None) -> tuple[np.ndarray, int]:
    painted = integer_painting(painted)
    values = painted_labels(painted)
    if label is None:
        if len(values) > 1:
            raise DenseMPError(f"Several label values are painted ({', '.join(map(str, values[:8]))}); "
                               f"choose the one to propagate (label).")
        label = values[0]
    elif label not in values:
        raise DenseMPError(f"Label {label} is not painted; painted values: {', '.join(map(str, values[:8]))}.")
    return painted == label, int(label)


def _painted_slice_counts(binary: np.ndarray) -> list[int]:
    """How many slices along each axis hold painted voxels."""
    return [int(binary.any(axis=tuple(a for a in range(3) if a != k)).sum()) for k in range(3)]


PLANE_NORMALS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the world (RAS) axis that each plane's slices cross


def plane_axis(affine: np.ndarray, plane: Literal["axial", "coronal", "sagittal"] = "axial") -> int:
    """The stored array axis whose slices are closest to ``plane`` for a scan stored as ``affine``
    says (axial: the axis that runs head to foot)."""
    if plane not in PLANE_NORMALS:
        raise DenseMPError(f"plane must be one of {', '.join(PLANE_NORMALS)}; got {plane!r}.")
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return int(np.flatnonzero(ornt[:, 0] == PLANE_NORMALS[plane])[0])


def painting_axis(painted: np.ndarray, default: int = 2, affine: np.ndarray | None = None) -> int:
    """The slicing axis a painting was made across, so a painting made on a coronal view of an
    axial scan needs no option: the one axis along which it lies in a single slice, or in a few
    slices (at most a quarter as many as along any other axis); else (a 3D mask), with the
    scan's affine, its axial axis, the plane the models were trained on; else ``default``."""
    counts = _painted_slice_counts(np.asarray(painted) != 0)
    single = [k for k in range(3) if counts[k] == 1]
    if len(single) == 1:
        return single[0]
    fewest, *others = np.argsort(counts, kind="stable")
    if all(4 * counts[fewest] <= counts[k] for k in others):
        return int(fewest)
    return plane_axis(affine) if affine is not None and np.isfinite(affine).all() else default


def check_painting_axis(binary: np.ndarray, axis: int) -> None:
    """A painting that lies in one plane across ``axis``, or covers areas only of slices across
    another axis, was made on that axis' slices."""
    counts = _painted_slice_counts(binary)
    flat = [k for k in range(3) if k != axis and counts[k] == 1]
    if counts[axis] > 2 and flat:
        raise DenseMPError(f"The painting lies in a single slice along axis {flat[0]} but spans {counts[axis]} "
                           f"slices along the slicing axis {axis}: it was painted on a slice of axis {flat[0]}. "
                           f"Set the slicing axis to {flat[0]}.")
    if counts[axis] > 2 and not _area_slices(binary, axis).any():
        other = next((k for k in range(3) if k != axis and _area_slices(binary, k).any()), None)
        if other is not None:
            raise DenseMPError(f"The painting covers areas only on slices of axis {other}; across the slicing axis "
                               f"{axis} it leaves lines on {counts[axis]} slices: it was painted on slices of axis "
                               f"{other}. Set the slicing axis to {other}.")


def _area_slices(binary: np.ndarray, axis: int) -> np.ndarray:
    """Which slices across ``axis`` were painted on: their painting covers an area (a 2 x 2
    block), not only the lines a painting made on another plane leaves in them."""
    moved = np.moveaxis(binary, axis, 0)
    block = moved[:, :-1, :-1] & moved[:, 1:, :-1] & moved[:, :-1, 1:] & moved[:, 1:, 1:]
    return block.reshape(len(block), -1).any(axis=1)


def in_slices(binary: np.ndarray, axis: int, chosen: np.ndarray) -> np.ndarray:
    shape = [1, 1, 1]
    shape[axis] = -1
    return binary & chosen.reshape(shape)


def on_slices(binary: np.ndarray, axis: int, slices: list[int]) -> np.ndarray:
    """The painting on the given slices across ``axis`` only (one plane's painting)."""
    return in_slices(binary, axis, np.isin(np.arange(binary.shape[axis]), slices))


def painted_planes(binary: np.ndarray, axis: int) -> dict[int, list[int]]:
    """The planes a structure was painted on, {axis: slices}, the slicing axis first: one entry
    unless the painting also covers areas of slices across other axes (a correction painted on a
    coronal view of an axial painting), which then cover the rest of it."""
    own = _area_slices(binary, axis)
    rest = binary & ~in_slices(binary, axis, own)
    if not own.any() or not rest.any():
        return {axis: slices_holding(binary, axis)}
    planes = {axis: [int(z) for z in np.flatnonzero(own)]}
    for other in (a for a in range(3) if a != axis):
        if not rest.any():
            break
        chosen = _area_slices(rest, other)
        if chosen.any():
            planes[other] = [int(z) for z in np.flatnonzero(chosen)]
            rest &= ~in_slices(rest, other, chosen)
    if rest.any():  # lines or dots off every painted plane: walked across the slicing axis as painted
        return {axis: slices_holding(binary, axis)}
    return planes


def walked_axes(mask: np.ndarray, axis: int) -> set[int]:
    """The slicing axes the structures of ``mask`` (one label value each) are walked across:
    ``axis``, and any other plane one of them was also painted on."""
    mask = integer_painting(mask)
    return {a for label in painted_labels(mask) for a in painted_planes(mask == label, axis)}


def slices_holding(binary: np.ndarray, axis: int) -> list[int]:
    return [int(z) for z in np.flatnonzero(np.moveaxis(binary, axis, 0).reshape(binary.shape[axis], -1).any(axis=1))]


# A slice painted on its own with under this share of the structure's largest painted slice is
# named (:func:`tiny_paintings`): a stray click, 5 slices from the painting, ends the walk there.
TINY_SHARE = 0.02


def tiny_paintings(paint: np.ndarray, share: float = TINY_SHARE) -> list[int]:
    """Slices of ``paint`` (slices first) painted on their own (no painted neighbour) with under
    ``share`` of the largest painted slice's area.

    Every painted slice is drawn as painted and ends the walks that reach it, so a stray click
    costs the organ beyond it: on the validation patients, a 5-pixel click in the body 3-6
    slices from the largest slice took CHAOS from 78.9 to 59.1 and the phantoms from 80.5 to
    56.4 mean Dice (``benchmarks/accuracy.py --stray-click 1``).
    Setting such slices aside was tried and not adopted (benchmarks/RESULTS.md): 4.9% of
    organs' end slices are that small too, painted on purpose where the organ tapers. So the
    user is told, and decides."""
    areas = paint.reshape(len(paint), -1).sum(axis=1)
    largest = areas.max(initial=0)
    return [int(z) for z in np.flatnonzero(areas) if areas[z] < share * largest
            and not (z > 0 and areas[z - 1]) and not (z + 1 < len(areas) and areas[z + 1])]


def painted_voxel(binary: np.ndarray, axis: int, z: int) -> tuple[int, int, int]:
    """A painted voxel of slice ``z`` across ``axis`` (the middle one in scan order): where to
    look for a tiny painting, which is hard to find by eye."""
    plane = np.argwhere(np.take(binary, z, axis=axis))
    voxel = [int(v) for v in plane[len(plane) // 2]]
    voxel.insert(axis, int(z))
    return tuple(voxel)


def tiny_painting_tip(axis: int, voxel: tuple[int, int, int]) -> str:
    """:func:`tiny_paintings` as the tip the CLI prints and the widget shows."""
    return (f"slice {voxel[axis]} of axis {axis} is painted (at voxel {list(voxel)}) with under {TINY_SHARE:.0%} "
            f"of the largest painted slice's area: it is drawn as painted and the walks end there; if it is a "
            f"stray click, erase it and run again")


def larger_slice(mask: np.ndarray, painted: np.ndarray, axis: int,
                 ratio: float = 2.0) -> tuple[int, int, float] | None:
    """(axis, slice, times) where a structure painted on one plane came out at least ``ratio`` x
    its painted cross-section (not a painted slice), else None.

    Either the structure is that large there (painted near its end, the walk started from a small,
    untypical cross-section) or the walk leaked there. Painting the structure on that slice too
    mends either (beyond the structure's end: its last slice, and only between the painted
    slices). On the validation patients it fired on 11 of 80 structures painted near
    an end, and following it lifted them from 46.4 to 67.0 mean Dice; it fired on none of the 40
    painted on their largest slice, and on 2 of 48 phantoms (`benchmarks/paint_tip.py`).
    """
    painted = np.asarray(painted) != 0
    planes = painted_planes(painted, axis)
    if len(planes) != 1:
        return None
    (axis,) = planes
    others = tuple(a for a in range(3) if a != axis)
    areas = mask.sum(axis=others).astype(np.float64)
    painted_areas = np.zeros(painted.shape[axis], np.int64)
    for z in np.flatnonzero(painted.any(axis=others)):  # a painted outline counts with its inside
        painted_areas[z] = filled(np.take(painted, z, axis=axis)).sum()
    areas[painted_areas > 0] = 0
    largest = int(areas.argmax())
    times = float(areas[largest] / max(painted_areas.max(), 1))
    return (axis, largest, times) if times >= ratio else None


def larger_slice_tip(mask: np.ndarray, painted: np.ndarray, axis: int) -> str | None:
    """:func:`larger_slice` as the tip the CLI prints and the widget shows."""
    found = larger_slice(mask, painted, axis)
    if found is None:
        return None
    axis, z, times = found
    return f"check slice {z} of axis {axis} ({times:.1f}x the painted area): paint it there too"


def filled(mask: np.ndarray) -> np.ndarray:
    """A 2D mask with its holes filled (as ``ndimage.binary_fill_holes``, 10x faster on a large
    slice): the unmasked parts of its bounding box that do not reach the box's edge."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    components, count = ndimage.label(~mask[box])
    if count == 0:
        return mask
    edge = np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]])
    holes = ~np.isin(components, edge) & (components > 0)
    out = mask.copy()
    out[box] |= holes
    return out


def has_holes(painted: np.ndarray, share: float = 0.01) -> bool:
    """Whether any painted slice (first axis) encloses unpainted holes of more than ``share`` of
    its area: the structure is ring-shaped, or the user left something out, and drawn slices
    keep their holes; a brush's pinholes do not count."""
    for plane in painted:
        area = int(plane.sum())
        if area and (filled(plane).sum() - area) > share * area:
            return True
    return False


# A hand-drawn contour whose ends miss each other by up to about twice this (pixels) still closes.
OUTLINE_GAP_PX = 3
_GAP_DISK = np.hypot(*np.ogrid[-OUTLINE_GAP_PX:OUTLINE_GAP_PX + 1, -OUTLINE_GAP_PX:OUTLINE_GAP_PX + 1]) \
    <= OUTLINE_GAP_PX


def filled_outlines(binary: np.ndarray, axis: int, ratio: float = 1.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``binary`` with every painted slice that is a closed outline filled, and those (axis,
    slice): on each plane painted (:func:`painted_planes`), a slice painted on its own (its
    neighbours are not) whose painting, with gaps of a few pixels closed, encloses unpainted
    holes of at least ``ratio`` x its own area.

    A contour drawn around an organ is the organ to whoever drew it; taken as painted, its
    prototypes are the organ's edge and its inside is background, and phantom organs painted so
    came out at 1-4 Dice instead of 75-96. A ring-shaped structure whose hole is smaller than its
    wall, a painting with a vessel left out, and a finished 3D mask (slices next to each other:
    a hollow structure segmented so is meant) keep their holes.
    """
    out, done = binary, []
    for across, slices in painted_planes(binary, axis).items():
        painted = set(slices)
        for z in slices:
            if z - 1 in painted or z + 1 in painted:
                continue
            index = [slice(None)] * 3
            index[across] = z
            whole = _outline_filled(binary[tuple(index)], ratio)
            if whole is not None:
                if out is binary:
                    out = binary.copy()
                out[tuple(index)] = whole
                done.append((across, int(z)))
    return out, done


def _outline_filled(plane: np.ndarray, ratio: float) -> np.ndarray | None:
    """A 2D painting filled if it is an outline (:func:`filled_outlines`), else None; worked in
    its bounding box, so that a whole 3D mask is checked in a fraction of a second."""
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return None
    area = int(plane.sum())
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    crop = plane[box]
    if crop.size - area < ratio * area:  # too little unpainted room in its box to enclose that much
        return None
    pad = OUTLINE_GAP_PX + 1
    # grown over its gaps, filled, shrunk back: a thin stroke's small gap is bridged
    grown = ndimage.binary_dilation(np.pad(crop, pad), _GAP_DISK)
    inside = ndimage.binary_erosion(filled(grown), _GAP_DISK)[pad:-pad, pad:-pad]
    whole = filled(crop | inside)
    if whole.sum() - area < ratio * area:
        return None
    out = plane.copy()
    out[box] = whole
    return out
