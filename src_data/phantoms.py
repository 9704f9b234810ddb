"""A synthetic abdominal cohort: CT-like and MRI-like "patients" with labelled organs.

Every patient differs (organ size, shape, position, intensity, noise, slice count, spacing)
and is fully determined by its seed, so tests, demos and benchmarks are reproducible without
any real data. Labels use the Synapse integers: 1 spleen, 2 right kidney, 3 left kidney,
6 liver. Arrays are (x, y, z) with z the slice axis, as NIfTI stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

SPLEEN, RIGHT_KIDNEY, LEFT_KIDNEY, LIVER = 1, 2, 3, 6
ORGAN_NAMES = {SPLEEN: "spleen", RIGHT_KIDNEY: "right kidney", LEFT_KIDNEY: "left kidney", LIVER: "liver"}

# Mean intensity of each tissue: CT in HU (portal-venous phase), MRI as T2 with fat
# suppression (like CHAOS T2-SPIR) in arbitrary scanner units.
TISSUE = {
    "ct": {"air": -1000, "fat": -100, "muscle": 55, "bone": 600, LIVER: 105, SPLEEN: 115,
           RIGHT_KIDNEY: 170, LEFT_KIDNEY: 170, "bowel": 35},
    "mri": {"air": 5, "fat": 110, "muscle": 150, "bone": 90, LIVER: 260, SPLEEN: 520,
            RIGHT_KIDNEY: 650, LEFT_KIDNEY: 650, "bowel": 380},
}


@dataclass
class Phantom:
    image: np.ndarray  # float32 (x, y, z): HU for CT, scanner units for MRI
    label: np.ndarray  # uint8 (x, y, z): Synapse organ integers, 0 background
    spacing: tuple[float, float, float]  # mm
    modality: Literal["ct", "mri"]
    seed: int

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> RAS mm, centred on the origin. The array's x runs from the patient's right
        to left and y from front to back (LPS axes, as DICOM), so the world axes flip x and y."""
        affine = np.diag([-self.spacing[0], -self.spacing[1], self.spacing[2], 1.0])
        affine[:3, 3] = -0.5 * np.diag(affine)[:3] * (np.array(self.image.shape) - 1)
        return affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(np.abs(field).max()), 1e-6)


def _upsampled_field(rng: np.random.Generator, coarse: tuple[int, int, int],
                     shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Smooth random field in [-1, 1] of ``shape``, varying on the scale of ``shape / coarse``."""
    zoom = [n / c for n, c in zip(shape, coarse)]
    return ndimage.zoom(_smooth_field(rng, coarse, sigma), zoom, order=1)[: shape[0], : shape[1], : shape[2]]


def _ellipsoid(coords: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray,
               wobble: np.ndarray, amount: float) -> np.ndarray:
    x, y, z = coords
    r2 = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
    return r2 < 1.0 + amount * wobble


def make_phantom(seed: int, modality: Literal["ct", "mri"] = "ct") -> Phantom:
    """One synthetic abdomen; the same seed always gives the same patient."""
    rng = np.random.default_rng(seed)
    if modality == "ct":
        in_plane = float(rng.uniform(1.4, 2.0))
        thickness = float(rng.choice([2.5, 3.0, 5.0]))
    else:
        in_plane = float(rng.uniform(1.25, 1.7))
        thickness = float(rng.uniform(6.0, 8.0))
    fov = rng.uniform(300.0, 360.0)  # mm
    nxy = round(fov / in_plane)
    length = rng.uniform(220.0, 300.0)  # mm of abdomen covered
    nz = round(length / thickness)
    spacing = (in_plane, in_plane, thickness)
    # Millimetre coordinates centred on the volume; x runs patient right -> left.
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip((nxy, nxy, nz), spacing)]
    coords = np.meshgrid(*axes, indexing="ij", sparse=True)
    x, y, _z = coords
    shape = (nxy, nxy, nz)
    wobble = _upsampled_field(rng, (12, 12, 10), shape, 1.5)
    tissue = TISSUE[modality]
    image = np.full(shape, tissue["air"], dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    body_a, body_b = rng.uniform(130, 165), rng.uniform(95, 120)
    body = (x / body_a) ** 2 + (y / body_b) ** 2 < 1.0 + 0.04 * wobble
    inner = (x / (body_a - rng.uniform(8, 20))) ** 2 + (y / (body_b - rng.uniform(8, 18))) ** 2 < 1.0
    # Subcutaneous fat, the abdominal wall's muscle, then fat between bowel loops inside.
    wall = rng.uniform(8, 16)
    cavity = (x / (body_a - rng.uniform(8, 20) - wall)) ** 2 + (y / (body_b - rng.uniform(8, 18) - wall)) ** 2 < 1.0
    image[body] = tissue["fat"]
    image[body & inner] = tissue["muscle"]
    image[body & cavity] = tissue["fat"]
    inner = cavity
    bowel = body & inner & (_upsampled_field(rng, (24, 24, 12), shape, 1.0) > rng.uniform(-0.2, 0.1))
    image[bowel] = tissue["bowel"]
    spine_y = body_b * rng.uniform(0.55, 0.7)
    spine_disc = (x / rng.uniform(14, 20)) ** 2 + ((y - spine_y) / rng.uniform(14, 18)) ** 2 < 1.0
    psoas = sum(((x - side * rng.uniform(25, 35)) / rng.uniform(10, 16)) ** 2
                + ((y - spine_y + 5) / rng.uniform(12, 18)) ** 2 < 1.0 for side in (-1, 1))
    image[np.broadcast_to(psoas.astype(bool), shape)] = tissue["muscle"]
    spine = np.broadcast_to(spine_disc, shape)
    image[spine] = tissue["bone"]

    top = axes[2][-1]
    liver_centre = np.array([-rng.uniform(45, 75), rng.uniform(-15, 20), top - rng.uniform(60, 90)])
    organs = [
        (LIVER, liver_centre, np.array([rng.uniform(60, 85), rng.uniform(55, 75), rng.uniform(65, 90)])),
        (SPLEEN, np.array([rng.uniform(70, 95), rng.uniform(20, 45), liver_centre[2] - rng.uniform(0, 25)]),
         np.array([rng.uniform(22, 32), rng.uniform(35, 50), rng.uniform(40, 60)])),
        (RIGHT_KIDNEY, np.array([-rng.uniform(40, 60), spine_y - rng.uniform(0, 15),
                                 liver_centre[2] - rng.uniform(60, 90)]),
         np.array([rng.uniform(22, 30), rng.uniform(25, 35), rng.uniform(45, 60)])),
        (LEFT_KIDNEY, np.array([rng.uniform(40, 60), spine_y - rng.uniform(0, 15),
                                liver_centre[2] - rng.uniform(50, 80)]),
         np.array([rng.uniform(22, 30), rng.uniform(25, 35), rng.uniform(45, 60)])),
    ]
    for organ, centre, radii in organs:
        region = _ellipsoid(coords, centre, radii, wobble, 0.3) & body & inner & ~spine
        contrast = rng.uniform(0.85, 1.15)
        image[region] = tissue[organ] * contrast if modality == "mri" else tissue[organ] + rng.uniform(-15, 15)
        label[region] = organ

    # Texture, partial volume and noise differ per patient, as scanners and doses do.
    scale = 1000.0 if modality == "ct" else 500.0
    image += 0.02 * scale * _smooth_field(rng, image.shape, 2.0)
    image = ndimage.gaussian_filter(image, (0.8, 0.8, 0.5))
    noise = rng.uniform(0.005, 0.02) * scale
    image += noise * rng.standard_normal(image.shape).astype(np.float32)
    if modality == "mri":
        bias = 1.0 + 0.25 * _upsampled_field(rng, (4, 4, 3), shape, 0.8)
        image = np.clip(image * bias, 0, None)
    return Phantom(image=image.astype(np.float32), label=label, spacing=spacing, modality=modality, seed=seed)


def write_cohort(out_dir: str | Path, count: int, modality: Literal["ct", "mri"] = "ct",
                 first_seed: int = 0) -> list[tuple[Path, Path]]:
    """Write ``count`` phantoms as ``phantom_<modality>_<seed>.nii.gz`` + ``_label`` files."""
    from napari_densemp.io import write_nifti

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in range(first_seed, first_seed + count):
        phantom = make_phantom(seed, modality)
        image_path = out_dir / f"phantom_{modality}_{seed}.nii.gz"
        label_path = out_dir / f"phantom_{modality}_{seed}_label.nii.gz"
        write_nifti(image_path, phantom.image, phantom.affine, overwrite=True)
        write_nifti(label_path, phantom.label, phantom.affine, overwrite=True)
        written.append((image_path, label_path))
    return written
