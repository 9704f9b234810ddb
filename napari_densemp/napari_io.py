"""napari reader, writer and sample data: plain functions returning layer data, no Qt.

Scans are shown reoriented (see :class:`napari_densemp.io.Geometry`) with the voxel spacing
as layer scale; the stored grid's affine travels in the layer metadata, and the writer puts a
mask back on that grid, so a saved result opens aligned with the source scan anywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np

from .errors import DenseMPError
from .io import METADATA_KEY, WRITABLE_SUFFIXES, Geometry, image_stem, is_image_file, read_scan, write_image

log = logging.getLogger(__name__)
LayerData = tuple[np.ndarray, dict, str]
CT_DISPLAY_WINDOW = (-160.0, 240.0)  # soft-tissue window for viewing (the model uses its own)
MAX_LABEL_VALUES = 64  # an integer volume with at most this many values is a label map


# --------------------------------------------------------------------------- reader
def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari asks this for every dropped/opened path; None means 'not ours'."""
    from .dicom import looks_like_dicom_folder

    paths = path if isinstance(path, list) else [path]
    if all(is_image_file(p) or looks_like_dicom_folder(p) for p in paths):
        return read_layers
    return None


def read_layers(path: str | list[str]) -> list[LayerData]:
    paths = path if isinstance(path, list) else [path]
    return [scan_layer(p) for p in paths]


def scan_layer(path: str | os.PathLike) -> LayerData:
    """One scan file or DICOM folder as an image (or labels) layer in display orientation."""
    scan = read_scan(path)
    if scan.data.ndim != 3:
        raise DenseMPError(f"{path} holds a {scan.data.ndim}D array of shape {scan.data.shape}; "
                           f"napari-densemp reads 3D scans.")
    return layer_from_array(scan.data, scan.affine, image_stem(path), str(path), scan.forms)


def layer_from_array(data: np.ndarray, affine: np.ndarray, name: str, source: str = "",
                     forms: dict | None = None) -> LayerData:
    geometry = Geometry.for_scan(affine, data.shape, forms)
    display = np.ascontiguousarray(geometry.display(data))
    metadata = {METADATA_KEY: geometry.to_metadata(), "source": source}
    kwargs = {"name": name, "scale": geometry.display_spacing, "metadata": metadata}
    if _is_label_map(display):
        return display.astype(np.int32 if display.max() > 255 else np.uint8), kwargs, "labels"
    if float(np.percentile(display[:: max(1, len(display) // 16)], 1.0)) < -500:  # CT in HU, or padded HU + 1024
        from .preprocessing import stored_hu_offset  # here: opening an MRI need not import torch

        offset = stored_hu_offset(display)
        kwargs["contrast_limits"] = (CT_DISPLAY_WINDOW[0] + offset, CT_DISPLAY_WINDOW[1] + offset)
    return display, {**kwargs, "colormap": "gray"}, "image"


def _is_label_map(data: np.ndarray) -> bool:
    sample = data[:: max(1, len(data) // 16)]
    if np.issubdtype(sample.dtype, np.floating) and not np.array_equal(sample, np.round(sample)):
        return False
    values = np.unique(sample)
    return bool(values.size <= MAX_LABEL_VALUES and values.min() >= 0 and values.max() < 2**31)


def mask_metadata(image_metadata: dict) -> dict:
    """The metadata a mask layer drawn on an image layer carries: the scan's stored geometry (to be
    saved on its grid) and its source (a DICOM series a DICOM SEG refers to)."""
    return {k: v for k, v in image_metadata.items() if k in (METADATA_KEY, "source")}


# --------------------------------------------------------------------------- writer
def write_labels(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """Labels layer -> NIfTI (or NRRD, MetaImage by name) on the source scan's grid with its affine;
    ``.dcm``: a DICOM SEG on the images of the DICOM series the layer's scan was read from.

    napari's save dialog has already asked before replacing a file; the write is atomic.
    """
    geometry = Geometry.from_metadata(attributes.get("metadata"))
    reference = None if geometry is None else geometry.reference_header()
    if geometry is None:
        scale = np.asarray(attributes.get("scale", (1.0, 1.0, 1.0)), dtype=float)[-3:]
        affine = np.diag([*scale, 1.0])
        affine[:3, 3] = np.asarray(attributes.get("translate", (0.0, 0.0, 0.0)), dtype=float)[-3:]
        log.warning("Layer %r carries no source geometry: saved with a diagonal affine from its scale.",
                    attributes.get("name"))
        stored = np.asarray(data)
    else:
        stored = geometry.stored(np.asarray(data))
        affine = geometry.affine
    if not path.lower().endswith((*WRITABLE_SUFFIXES, ".dcm")):
        path = f"{path}.nii.gz"
    values_max = int(stored.max()) if stored.size else 0
    dtype = np.uint8 if values_max <= 255 else np.int32
    source = (attributes.get("metadata") or {}).get("source") or None
    return [str(write_image(path, stored.astype(dtype), affine, reference, overwrite=True, mask=True,
                            dicom_source=source))]


# --------------------------------------------------------------------------- sample data
def phantom_ct_sample() -> list[LayerData]:
    """A synthetic abdominal CT (not a patient) with the liver painted on one slice."""
    from src_data.phantoms import LIVER, make_phantom

    phantom = make_phantom(seed=7, modality="ct")
    truth = phantom.label == LIVER
    z = int(truth.sum(axis=(0, 1)).argmax())
    painted = np.zeros(truth.shape, dtype=np.uint8)
    painted[..., z] = truth[..., z] * LIVER
    image = layer_from_array(phantom.image, phantom.affine, "phantom CT")
    support = layer_from_array(painted, phantom.affine, "liver painted")
    return [image, (support[0], {**support[1], "opacity": 0.6}, "labels")]


def mni152_sample() -> list[LayerData]:
    """The MNI152 T1 template that nilearn ships, with the white matter painted on one slice."""
    try:
        from nilearn import datasets
    except ImportError:
        raise DenseMPError("The MNI152 sample needs nilearn: pip install nilearn.") from None
    template = datasets.load_mni152_template(resolution=1)
    white = datasets.load_mni152_wm_template(resolution=1)
    t1 = np.asarray(template.get_fdata(), dtype=np.float32)
    matter = np.asarray(white.get_fdata()) > 0.5
    z = t1.shape[2] // 2 + 10  # an axial slice through the centrum semiovale
    painted = np.zeros(t1.shape, dtype=np.uint8)
    painted[..., z] = matter[..., z]
    image = layer_from_array(t1, template.affine, "MNI152 T1")
    support = layer_from_array(painted, template.affine, "white matter painted")
    return [image, (support[0], {**support[1], "opacity": 0.6}, "labels")]
