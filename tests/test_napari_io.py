"""Reader, writer and sample data (no Qt): geometry is kept exactly."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from napari_densemp.errors import DenseMPError
from napari_densemp.io import DISPLAY_AXCODES, METADATA_KEY, Geometry, read_nifti, write_nifti
from napari_densemp.napari_io import get_reader, layer_from_array, mni152_sample, phantom_ct_sample, write_labels
from src_data.phantoms import LIVER


def _oblique_affine() -> np.ndarray:
    """Stored axes P, S, R (a sagittal acquisition), anisotropic, rotated and shifted."""
    angle = np.deg2rad(7.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    axes = np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, 1.0, 0]])  # columns: stored i, j, k in RAS
    affine = np.eye(4)
    affine[:3, :3] = rotation @ axes @ np.diag([0.8, 1.1, 3.0])
    affine[:3, 3] = [-12.5, 40.0, 7.25]
    return affine


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("R", "P", "I"), ("P", "S", "R")])
def test_display_orientation_is_radiological_and_exactly_invertible(codes):
    ornt = nib.orientations.axcodes2ornt(codes)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for stored_axis, (world_axis, flip) in enumerate(ornt):
        affine[int(world_axis), stored_axis] = flip * (1.0 + stored_axis)
    geometry = Geometry.for_scan(affine, (5, 6, 7))
    data = np.random.default_rng(0).random((5, 6, 7))
    shown = geometry.display(data)
    display_affine = affine @ nib.orientations.inv_ornt_aff(geometry.to_display, (5, 6, 7))
    assert nib.aff2axcodes(display_affine) == DISPLAY_AXCODES  # slider feet->head, anterior up, R on left
    assert np.array_equal(geometry.stored(shown), data)
    assert np.allclose(np.linalg.norm(display_affine[:3, :3], axis=0), geometry.display_spacing)
    for voxel in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:  # a voxel's index on each grid holds the same value
        assert shown[geometry.display_index(voxel)] == data[voxel]
    with pytest.raises(DenseMPError, match="does not match"):
        geometry.stored(np.zeros((2, 2, 2)))


def test_nifti_reader_writer_round_trip_keeps_affine_and_grid(tmp_path):
    affine = _oblique_affine()
    rng = np.random.default_rng(1)
    scan = rng.normal(0, 100, (20, 24, 9)).astype(np.float32)
    write_nifti(tmp_path / "scan.nii.gz", scan, affine)
    reader = get_reader(str(tmp_path / "scan.nii.gz"))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(tmp_path / "scan.nii.gz"))
    assert kind == "image"
    assert data.shape == (24, 20, 9)  # S, P, L display axes of a P, S, R stored grid
    assert np.allclose(sorted(kwargs["scale"]), sorted([0.8, 1.1, 3.0]))
    # a mask painted on the display array is saved on the stored grid with the same affine
    mask = np.zeros(data.shape, dtype=np.uint8)
    mask[10:14, 2:5, 3:9] = 4
    [out] = write_labels(str(tmp_path / "mask.nii.gz"), mask, {"metadata": kwargs["metadata"], "name": "m"})
    saved = read_nifti(out)
    assert np.array_equal(saved.affine, read_nifti(tmp_path / "scan.nii.gz").affine)  # bit for bit
    assert np.allclose(saved.affine, affine, atol=1e-6)  # NIfTI stores the affine in float32
    assert saved.data.shape == scan.shape
    assert np.array_equal(saved.data, Geometry.from_metadata(kwargs["metadata"]).stored(mask))
    # the saved mask is itself read back as a labels layer on the same display grid
    [(again, _, kind)] = get_reader(out)(out)
    assert kind == "labels" and np.array_equal(again, mask)


def test_a_mask_saved_from_napari_keeps_the_scans_qform_sform_and_codes(tmp_path):
    """The writer keeps the scan's qform and sform with their codes: a registered scan's (the
    scanner's placement in the qform, code 1; another in the sform, code 4), and an ANALYZE-era
    header's (0, 0) with its voxel sizes, so other viewers place the mask where they place the
    scan (before, the qform was dropped, and a header without codes got a sform of nibabel's
    guess, which a viewer that follows the standard places elsewhere)."""
    data = np.random.default_rng(2).normal(0, 1, (12, 10, 6)).astype(np.float32)
    scanner_placement = _oblique_affine()
    scanner_placement[:3, 3] += [30.0, -12.0, 4.0]
    scanner = nib.Nifti1Image(data, _oblique_affine())
    scanner.set_qform(scanner_placement, code=1)
    scanner.set_sform(_oblique_affine(), code=4)
    nib.save(scanner, tmp_path / "scanner.nii.gz")
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_zooms((0.7, 0.9, 4.0))
    nib.save(nib.Nifti1Image(data, None, header), tmp_path / "analyze.nii")
    for name, codes in [("scanner.nii.gz", (1, 4)), ("analyze.nii", (0, 0))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ANALYZE header's missing orientation is named (test_cli)
            [(shown, kwargs, _)] = get_reader(str(tmp_path / name))(str(tmp_path / name))
        painted = (shown > 1).astype(np.uint8)
        [out] = write_labels(str(tmp_path / f"mask_{name}"), painted, {"metadata": kwargs["metadata"], "name": "m"})
        saved, scan = nib.load(out), nib.load(str(tmp_path / name))
        assert (int(saved.header["qform_code"]), int(saved.header["sform_code"])) == codes
        np.testing.assert_allclose(saved.header.get_zooms(), scan.header.get_zooms(), rtol=1e-6)
        np.testing.assert_allclose(saved.affine, scan.affine, atol=1e-5)
        if codes[0]:  # the scanner's placement, not the sform's
            np.testing.assert_allclose(saved.get_qform(), scan.get_qform(), atol=1e-5)
        assert np.array_equal(np.asarray(saved.dataobj), Geometry.from_metadata(kwargs["metadata"]).stored(painted))


def test_a_ct_is_shown_in_a_soft_tissue_window_however_it_is_stored(ct_phantom):
    """In HU, and stored as HU + 1024 with padding outside the field of view (GE's -2000), the
    soft-tissue window lands on the same tissue (before, the stored scan was shown all white)."""
    hu = np.rint(ct_phantom.image)
    rows, cols = np.ogrid[:hu.shape[0], :hu.shape[1]]
    outside = (np.hypot(rows - hu.shape[0] / 2, cols - hu.shape[1] / 2) > min(hu.shape[:2]) / 2)[..., None]
    shown = {}
    for name, volume in [("hu", np.where(outside, -3024.0, hu)), ("stored", np.where(outside, -2000.0, hu + 1024))]:
        _, kwargs, _ = layer_from_array(volume.astype(np.float32), ct_phantom.affine, name)
        shown[name] = kwargs["contrast_limits"]
    assert shown == {"hu": (-160.0, 240.0), "stored": (864.0, 1264.0)}


def test_reader_declines_other_files_and_names_bad_ones(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(DenseMPError, match="Cannot read"):
        get_reader(str(broken))(str(broken))
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32), np.eye(4))
    with pytest.raises(DenseMPError, match="2D"):
        get_reader(str(tmp_path / "flat.nii.gz"))(str(tmp_path / "flat.nii.gz"))


def test_writer_without_source_geometry_uses_the_layer_scale(tmp_path):
    [out] = write_labels(str(tmp_path / "plain"), np.ones((3, 4, 5), np.uint8), {"scale": (2.0, 1.5, 1.0)})
    saved = read_nifti(out)
    assert out.endswith(".nii.gz")
    assert np.allclose(saved.affine, np.diag([2.0, 1.5, 1.0, 1.0]))


def _write_dicom_series(folder, volume_crs: np.ndarray, spacing=(0.7, 0.9), gap=2.5, shuffle=True,
                        number: int | None = None, description: str = ""):
    """A CT series as a scanner writes it: one file per slice, files in arbitrary order."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    n = volume_crs.shape[2]
    order = np.random.default_rng(3).permutation(n) if shuffle else np.arange(n)
    for file_index, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{number or ''}f{file_index:03d}.dcm"), {}, file_meta=meta,
                         preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame_of_reference
        ds.PatientName, ds.PatientID = "Phantom^Eleven", "PHANTOM-11"
        if number is not None:
            ds.SeriesNumber, ds.SeriesDescription = number, description
        ds.Modality = "CT"
        ds.Rows, ds.Columns = volume_crs.shape[1], volume_crs.shape[0]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -80.0, 30.0 + gap * k]
        ds.InstanceNumber = int(file_index + 1)  # deliberately not the spatial order
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume_crs[:, :, k].T + 1024).astype(np.uint16).tobytes()
        pydicom.dcmwrite(ds.filename, ds, enforce_file_format=True)


def test_dicom_series_folder_is_sorted_by_position_with_spacing_and_affine(tmp_path):
    volume = np.random.default_rng(2).integers(-1000, 1000, (12, 10, 6)).astype(np.float32)  # (cols, rows, k)
    _write_dicom_series(tmp_path / "series", volume)
    reader = get_reader(str(tmp_path / "series"))
    assert reader is not None
    from napari_densemp.dicom import read_dicom_series

    scan = read_dicom_series(tmp_path / "series")
    assert np.array_equal(scan.data, volume)  # HU restored, slices in spatial order
    assert np.allclose(scan.affine, [[-0.9, 0, 0, 100], [0, -0.7, 0, 80], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    [(data, kwargs, kind)] = reader(str(tmp_path / "series"))
    assert kind == "image" and data.shape == (6, 10, 12)
    assert np.allclose(kwargs["scale"], (2.5, 0.7, 0.9))


def test_dicom_series_with_a_missing_slice_is_named(tmp_path):
    _write_dicom_series(tmp_path / "series", np.zeros((8, 8, 5), np.float32), shuffle=False)
    (tmp_path / "series" / "f002.dcm").unlink()
    from napari_densemp.dicom import read_dicom_series

    with pytest.raises(DenseMPError, match="uneven slice gaps"):
        read_dicom_series(tmp_path / "series")


def test_a_study_folder_reads_its_largest_series_and_names_it(tmp_path):
    """A folder with a 3-slice localizer, a 6-slice axial series and a 4-slice one: the axial
    series is read and named with the others; two series of the same size are an error that
    names both, since either might not be the scan that was painted."""
    from napari_densemp.dicom import read_dicom_series

    volume = np.random.default_rng(2).integers(-1000, 1000, (12, 10, 6)).astype(np.float32)
    study = tmp_path / "study"
    _write_dicom_series(study, volume, number=4, description="AX abdomen")
    _write_dicom_series(study, volume[..., :3], number=1, description="localizer")
    _write_dicom_series(study, volume[..., :4], gap=5.0, number=7)
    with pytest.warns(UserWarning) as warned:
        scan = read_dicom_series(study)
    assert np.array_equal(scan.data, volume)
    assert str(warned[0].message) == (f'{study} holds 3 image series; read series 4 "AX abdomen" (6 slices). The '
                                      f'others: series 7 (4), series 1 "localizer" (3). To read another, give its '
                                      f'folder.')
    _write_dicom_series(study, volume, number=5, description="AX abdomen late")
    with pytest.raises(DenseMPError, match=r'holds 2 image series of 6 slices: series \d "AX abdomen( late)?", '
                                           r'series \d "AX abdomen( late)?"\. Give the folder of the one to read'):
        read_dicom_series(study)


def _write_enhanced_image(path, volume_crs: np.ndarray, spacing=(0.7, 0.9), gap=2.5, tilted_frame=None):
    """One multi-frame (enhanced) file as newer scanners write it: frames out of spatial order,
    each frame's position and rescaling in its own functional group, orientation and spacing
    shared (``tilted_frame``: that frame gets an orientation of its own)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def group(**sequences):
        item = Dataset()
        for name, attributes in sequences.items():
            inner = Dataset()
            for attribute, value in attributes.items():
                setattr(inner, attribute, value)
            setattr(item, name, Sequence([inner]))
        return item

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    n = volume_crs.shape[2]
    order = np.random.default_rng(4).permutation(n)
    ds.Modality, ds.NumberOfFrames = "CT", n
    ds.Rows, ds.Columns = volume_crs.shape[1], volume_crs.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = Sequence([group(
        PlaneOrientationSequence={"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
        PixelMeasuresSequence={"PixelSpacing": [spacing[0], spacing[1]], "SliceThickness": gap})])
    frames = []
    for k in order:
        tilted = {"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}
        own = {"PlaneOrientationSequence": tilted} if k == tilted_frame else {}
        frames.append(group(PlanePositionSequence={"ImagePositionPatient": [-100.0, -80.0, 30.0 + gap * k]},
                            PixelValueTransformationSequence={"RescaleSlope": 1, "RescaleIntercept": -1024}, **own))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([(volume_crs[:, :, k].T + 1024).astype(np.uint16) for k in order]).tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def test_a_multi_frame_dicom_image_reads_as_its_series_would(tmp_path):
    """The same CT as one enhanced file and as a classic series: the same volume and affine; a
    file mixing frame orientations is named."""
    from napari_densemp.dicom import read_dicom_series

    volume = np.random.default_rng(2).integers(-1000, 1000, (12, 10, 6)).astype(np.float32)
    _write_dicom_series(tmp_path / "series", volume)
    (tmp_path / "enhanced").mkdir()
    _write_enhanced_image(tmp_path / "enhanced" / "IM_0001", volume)
    classic, enhanced = read_dicom_series(tmp_path / "series"), read_dicom_series(tmp_path / "enhanced")
    assert np.array_equal(enhanced.data, volume) and np.array_equal(enhanced.data, classic.data)
    np.testing.assert_allclose(enhanced.affine, classic.affine)
    (tmp_path / "mixed").mkdir()
    _write_enhanced_image(tmp_path / "mixed" / "IM_0001", volume, tilted_frame=3)
    with pytest.raises(DenseMPError, match=r"IM_0001 .* holds frames of 2 orientations"):
        read_dicom_series(tmp_path / "mixed")


def test_phantom_sample_is_a_painted_scan_with_geometry():
    (image, image_kwargs, image_kind), (painted, painted_kwargs, painted_kind) = phantom_ct_sample()
    assert (image_kind, painted_kind) == ("image", "labels")
    assert image.shape == painted.shape and image_kwargs["scale"] == painted_kwargs["scale"]
    assert METADATA_KEY in image_kwargs["metadata"]
    painted_slices = np.flatnonzero(painted.reshape(len(painted), -1).any(axis=1))
    assert len(painted_slices) == 1 and set(np.unique(painted)) == {0, LIVER}


def test_mni152_sample_paints_white_matter_on_one_axial_slice():
    pytest.importorskip("nilearn")
    (image, kwargs, _), (painted, _, _) = mni152_sample()
    assert image.shape == painted.shape == (189, 233, 197)  # axial slices first
    assert np.allclose(kwargs["scale"], (1.0, 1.0, 1.0))
    painted_slices = np.flatnonzero(painted.reshape(len(painted), -1).any(axis=1))
    assert len(painted_slices) == 1
    # the painted white matter is brighter than the grey matter around it on T1
    slice_, white = image[painted_slices[0]], painted[painted_slices[0]] > 0
    assert slice_[white].mean() > 1.2 * slice_[(slice_ > 0) & ~white].mean()
