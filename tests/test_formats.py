"""Formats beyond NIfTI: NRRD and MetaImage scans and masks, read and written with exactly the
geometry NIfTI would carry, and results for a DICOM series as a DICOM SEG on its images."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest

from napari_densemp.batch import Support, list_scans, output_path, segment_folder
from napari_densemp.cli import main
from napari_densemp.errors import DenseMPError
from napari_densemp.io import Geometry, read_image_file, read_nifti, read_scan, write_image, write_nifti
from napari_densemp.itk_formats import affine_from_itk
from napari_densemp.napari_io import get_reader, mask_metadata, write_labels
from src_data.phantoms import LIVER, RIGHT_KIDNEY

from .conftest import dice, paint_largest

sitk = pytest.importorskip("SimpleITK")


def _oblique_affine() -> np.ndarray:
    """Rotated about all three axes, anisotropic, shifted: every sign and order shows."""
    a, b, c = np.deg2rad([10.0, -20.0, 30.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag([0.8, 1.1, 3.0])
    affine[:3, 3] = [-120.5, 33.25, 410.0]
    return affine


def test_itk_reads_a_nifti_where_nibabel_places_it(tmp_path):
    """ITK's own NIfTI reader (LPS) and nibabel (RAS) agree through our conversion: the LPS <-> RAS
    rule is checked against an implementation that is not ours."""
    affine = _oblique_affine()
    data = np.random.default_rng(0).integers(-1000, 1000, (17, 13, 9)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "scan.nii.gz"))
    read = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    assert np.abs(read - affine).max() < 1e-5  # NIfTI keeps the affine in float32
    assert np.array_equal(sitk.GetArrayFromImage(image).transpose(), data)


def test_a_nrrd_in_ras_space_is_placed_as_its_header_says(tmp_path):
    """A NRRD written by hand (as any tool may, here in RAS space): its space directions are the
    voxel axes' steps in that space, its space origin the first voxel's centre."""
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2, order="F")  # (x, y, z), x fastest on disk
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\nsizes: 4 3 2\n"
              "space directions: (0,-0.9,0) (1.2,0,0) (0,0,2.5)\nkinds: domain domain domain\n"
              "endian: little\nencoding: raw\nspace origin: (10,-20,30)\n\n")
    path = tmp_path / "ras.nrrd"
    path.write_bytes(header.encode() + data.astype("<i2").tobytes(order="F"))
    scan = read_scan(path)
    assert np.allclose(scan.affine, [[0, 1.2, 0, 10], [-0.9, 0, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    assert np.array_equal(scan.data, data)
    assert nib.aff2axcodes(scan.affine) == ("P", "R", "S")
    assert scan.spacing == pytest.approx((0.9, 1.2, 2.5))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".seg.nrrd"])
def test_nrrd_and_metaimage_round_trip_exactly_and_refuse_to_overwrite(tmp_path, suffix):
    affine = _oblique_affine()
    data = np.random.default_rng(1).integers(0, 5, (17, 13, 9)).astype(np.uint8)
    path = write_image(tmp_path / f"mask{suffix}", data, affine)
    scan = read_image_file(path)
    assert np.array_equal(scan.data, data) and scan.data.dtype == np.uint8
    assert np.abs(scan.affine - affine).max() < 1e-9
    with pytest.raises(DenseMPError, match="exists"):
        write_image(path, data * 0, affine)
    assert np.array_equal(read_image_file(path).data, data)  # untouched
    write_image(path, data * 0, affine, overwrite=True)
    assert not read_image_file(path).data.any()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_bad_nrrd_and_metaimage_input_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(DenseMPError, match=r"Cannot read .*broken.nrrd as NRRD"):
        read_scan(tmp_path / "broken.nrrd")
    colour = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(colour, str(tmp_path / "colour.mha"))
    with pytest.raises(DenseMPError, match="3 values per voxel"):
        read_scan(tmp_path / "colour.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(tmp_path / "flat.nrrd"))
    assert main([str(tmp_path / "flat.nrrd"), str(tmp_path / "flat.nrrd"), "-o", str(tmp_path / "o.nrrd")]) == 2
    assert "flat.nrrd is 2D with shape (6, 5); a 3D volume is needed" in capsys.readouterr().err
    for name in ("out.nhdr", "out.mhd", "out.png"):
        with pytest.raises(DenseMPError, match=r"\.nrrd|\.mha"):
            write_image(tmp_path / name, np.zeros((2, 2, 2), np.uint8), np.eye(4))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # as on an install without the extra
    with pytest.raises(DenseMPError, match=r"needs SimpleITK: pip install \"napari-densemp\[formats\]\""):
        read_scan(tmp_path / "colour.mha")


def test_cli_reads_nrrd_and_a_cropped_slicer_segmentation_and_writes_nrrd(tmp_path, ct_phantom, capsys):
    """A scan saved as NRRD, painted in a Slicer-like segmentation saved on a crop of its grid:
    the same mask as from NIfTI, written with the scan's geometry; an output name of another
    format is refused before any work."""
    affine = _oblique_affine()
    affine[:3, :3] = affine[:3, :3] @ np.diag(np.array(ct_phantom.spacing) / [0.8, 1.1, 3.0])
    image = ct_phantom.image.astype(np.int16)
    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    write_nifti(tmp_path / "ct.nii.gz", image, affine)
    write_nifti(tmp_path / "painted.nii.gz", painted, affine)
    write_image(tmp_path / "ct.nrrd", image, affine)
    low = np.argwhere(painted).min(axis=0) - 2
    high = np.argwhere(painted).max(axis=0) + 3
    cropped = affine.copy()
    cropped[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    write_image(tmp_path / "kidney.seg.nrrd", painted[tuple(slice(a, b) for a, b in zip(low, high))], cropped)

    assert main([str(tmp_path / "ct.nii.gz"), str(tmp_path / "painted.nii.gz"), "-o", str(tmp_path / "a.nii.gz")]) == 0
    assert main([str(tmp_path / "ct.nrrd"), str(tmp_path / "kidney.seg.nrrd"), "-o", str(tmp_path / "b.nrrd")]) == 0
    from_nifti, from_nrrd = read_nifti(tmp_path / "a.nii.gz"), read_image_file(tmp_path / "b.nrrd")
    assert from_nrrd.data.shape == image.shape
    assert np.array_equal(from_nrrd.data, from_nifti.data)
    assert np.abs(from_nrrd.affine - read_image_file(tmp_path / "ct.nrrd").affine).max() == 0
    assert dice(from_nrrd.data.astype(bool), ct_phantom.label == RIGHT_KIDNEY) >= 0.7
    capsys.readouterr()
    assert main([str(tmp_path / "ct.nrrd"), str(tmp_path / "kidney.seg.nrrd"), "-o", str(tmp_path / "c.png")]) == 2
    assert "Output must end in .nii.gz, .nii, .nrrd or .mha (or .dcm" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_folder_lists_every_format_and_answers_each_in_its_own(tmp_path, ct_phantom, other_ct,
                                                                default_model):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_image(scans / "a.mha", other_ct.image, other_ct.affine)
    detached = sitk.GetImageFromArray(np.zeros((6, 5, 4), np.int16))
    sitk.WriteImage(detached, str(scans / "b.mhd"))  # b.mhd + b.raw: one scan
    sitk.WriteImage(detached, str(scans / "c.nhdr"))  # c.nhdr + c.raw(.gz): one scan
    write_nifti(scans / "d.nii.gz", np.zeros((6, 5, 4), np.int16), np.eye(4))
    listed = list_scans(scans)
    assert [p.name for p in listed] == ["a.mha", "b.mhd", "c.nhdr", "d.nii.gz"]
    assert [output_path(p, tmp_path).name for p in listed] == ["a.mha", "b.mha", "c.nrrd", "d.nii.gz"]
    assert [output_path(p, tmp_path, as_nifti=True).name for p in listed] == [f"{n}.nii.gz" for n in "abcd"]
    assert output_path(tmp_path, tmp_path / "out").name == f"{tmp_path.name}.dcm"  # a DICOM series folder

    painted, _ = paint_largest(ct_phantom.label, LIVER)
    write_image(tmp_path / "support.nrrd", ct_phantom.image, ct_phantom.affine)
    write_image(tmp_path / "support_painted.nrrd", painted, ct_phantom.affine)
    support = Support.from_files(tmp_path / "support.nrrd", tmp_path / "support_painted.nrrd")
    [row] = segment_folder(support, listed[:1], tmp_path / "out", default_model)
    assert row.status == "done", row.message
    result = read_image_file(tmp_path / "out" / "a.mha")
    assert result.data.shape == other_ct.image.shape
    assert np.abs(result.affine - other_ct.affine).max() < 1e-9
    assert dice(result.data.astype(bool), other_ct.label == LIVER) >= 0.5


def test_napari_opens_nrrd_and_saves_metaimage_on_the_scans_grid(tmp_path):
    affine = _oblique_affine()
    scan = np.random.default_rng(2).normal(0, 100, (20, 24, 9)).astype(np.float32)
    write_image(tmp_path / "scan.nrrd", scan, affine)
    reader = get_reader(str(tmp_path / "scan.nrrd"))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(tmp_path / "scan.nrrd"))
    assert kind == "image" and kwargs["name"] == "scan"
    assert np.allclose(sorted(kwargs["scale"]), [0.8, 1.1, 3.0])
    mask = np.zeros(data.shape, dtype=np.uint8)
    mask[2:6, 3:9, 1:4] = 3
    [out] = write_labels(str(tmp_path / "mask.mha"), mask, {"metadata": kwargs["metadata"], "name": "m"})
    saved = read_image_file(out)
    assert out.endswith("mask.mha") and saved.data.shape == scan.shape
    assert np.abs(saved.affine - affine).max() < 1e-9
    [(again, _, kind)] = get_reader(out)(out)
    assert kind == "labels" and np.array_equal(again, mask)
    with pytest.raises(DenseMPError, match="written only for a scan given as a DICOM series folder"):
        write_labels(str(tmp_path / "mask.dcm"), mask, {"metadata": mask_metadata(kwargs["metadata"]), "name": "m"})


def _seg_on_series(seg_path, series_folder) -> np.ndarray:
    """A DICOM SEG read back onto the series' grid, each segment as the value its label names."""
    hd = pytest.importorskip("highdicom")
    from napari_densemp.dicom import _sorted_series

    seg = hd.seg.segread(str(seg_path))
    files = _sorted_series(series_folder)[0]
    uids = [ds.SOPInstanceUID for _, ds in files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    values = np.zeros(len(seg.SegmentSequence) + 1, dtype=np.int32)
    for item in seg.SegmentSequence:
        values[item.SegmentNumber] = int(item.SegmentLabel.split()[-1])
    return values[frames].transpose(2, 1, 0)  # (slices, rows, columns) -> (columns, rows, slices)


def test_a_dicom_seg_refers_each_slice_to_its_source_image(tmp_path):
    pytest.importorskip("highdicom")
    from napari_densemp.dicom import read_dicom_series, write_dicom_seg

    from .test_napari_io import _write_dicom_series

    _write_dicom_series(tmp_path / "series", np.zeros((12, 10, 6), np.float32))  # files in shuffled order
    scan = read_dicom_series(tmp_path / "series")
    mask = np.zeros(scan.data.shape, np.uint8)
    mask[2:5, 3:7, 1:4] = 2
    mask[6:9, 1:3, 2] = 5
    path = write_dicom_seg(tmp_path / "mask.dcm", mask, tmp_path / "series")
    assert np.array_equal(_seg_on_series(path, tmp_path / "series"), mask)
    import pydicom

    seg = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.PatientID == "PHANTOM-11"
    assert seg.FrameOfReferenceUID == pydicom.dcmread(next((tmp_path / "series").iterdir())).FrameOfReferenceUID
    assert int(seg.NumberOfFrames) == 4  # frames with a segment on them: 3 slices of 2, 1 of 5
    named = pydicom.dcmread(write_dicom_seg(tmp_path / "named.dcm", mask, tmp_path / "series", names={5: "Spleen"}))
    assert [item.SegmentLabel for item in named.SegmentSequence] == ["label 2", "Spleen"]
    with pytest.raises(DenseMPError, match="exists"):
        write_dicom_seg(path, mask, tmp_path / "series")
    empty = write_dicom_seg(tmp_path / "empty.dcm", np.zeros_like(mask), tmp_path / "series")
    assert not _seg_on_series(empty, tmp_path / "series").any()  # not found: one empty segment
    with pytest.raises(DenseMPError, match="shape"):
        write_dicom_seg(tmp_path / "other.dcm", mask[:, :, :3], tmp_path / "series")
    from .test_napari_io import _write_enhanced_image

    (tmp_path / "enhanced").mkdir()
    _write_enhanced_image(tmp_path / "enhanced" / "IM_0001", np.zeros((12, 10, 6), np.float32))
    with pytest.raises(DenseMPError, match=r"multi-frame .* NIfTI \(\.nii\.gz; in a folder run, --as-nifti\)"):
        write_dicom_seg(tmp_path / "enhanced.dcm", mask, tmp_path / "enhanced")
    # napari: a labels layer drawn on the series' layer, saved as .dcm
    [(image, kwargs, _)] = get_reader(str(tmp_path / "series"))(str(tmp_path / "series"))
    drawn = np.zeros(image.shape, np.uint8)
    drawn[1:3, 2:6, 4:9] = 1
    [saved] = write_labels(str(tmp_path / "drawn.dcm"), drawn, {"metadata": mask_metadata(kwargs["metadata"])})
    stored = Geometry.from_metadata(kwargs["metadata"]).stored(drawn)
    assert np.array_equal(_seg_on_series(saved, tmp_path / "series"), stored) and stored.sum() == 2 * 4 * 5
    for file in (tmp_path / "series").iterdir():  # a header without what a SEG must refer to
        ds = pydicom.dcmread(file)
        del ds.FrameOfReferenceUID
        ds.save_as(file)
    with pytest.raises(DenseMPError, match="Cannot write a DICOM SEG for the series"):
        write_dicom_seg(tmp_path / "broken.dcm", mask, tmp_path / "series")
    assert not (tmp_path / "broken.dcm").exists()


def test_cli_answers_a_dicom_series_with_a_dicom_seg(tmp_path, ct_phantom, capsys):
    pytest.importorskip("highdicom")
    from napari_densemp.dicom import read_dicom_series

    from .test_napari_io import _write_dicom_series

    _write_dicom_series(tmp_path / "series", ct_phantom.image, spacing=ct_phantom.spacing[:2],
                        gap=ct_phantom.spacing[2])
    scan = read_dicom_series(tmp_path / "series")
    painted, _ = paint_largest(ct_phantom.label, RIGHT_KIDNEY)
    painted_path = write_nifti(tmp_path / "painted.nii.gz", painted, scan.affine)
    assert main([str(tmp_path / "series"), str(painted_path), "-o", str(tmp_path / "kidney.dcm")]) == 0
    found = _seg_on_series(tmp_path / "kidney.dcm", tmp_path / "series")
    assert found.shape == ct_phantom.image.shape and set(np.unique(found)) == {0, 1}
    assert dice(found.astype(bool), ct_phantom.label == RIGHT_KIDNEY) >= 0.7
    # painted in a PACS viewer and saved as a DICOM SEG on the series: the same result
    from napari_densemp.dicom import write_dicom_seg

    seg_painting = write_dicom_seg(tmp_path / "painting.dcm", painted, tmp_path / "series")
    assert main([str(tmp_path / "series"), str(seg_painting), "-o", str(tmp_path / "again.nii.gz")]) == 0
    assert np.array_equal(read_nifti(tmp_path / "again.nii.gz").data, found)
    capsys.readouterr()
    assert main([str(tmp_path / "series"), str(tmp_path / "kidney.dcm"), "-o", str(tmp_path / "x.nii.gz"),
                 "--label", "3"]) == 2  # a SEG painting's values are its segment numbers: 1 here
    assert main([str(tmp_path / "series"), str(painted_path), "-o", str(tmp_path / "kidney_rs.dcm"), "--rtstruct",
                 "--name", "1=Kidney_R"]) == 0
    import pydicom

    from napari_densemp.dicom import read_rtstruct, write_rtstruct

    assert np.array_equal(read_rtstruct(tmp_path / "kidney_rs.dcm", tmp_path / "series"), found)
    assert [r.ROIName for r in pydicom.dcmread(tmp_path / "kidney_rs.dcm").StructureSetROISequence] == ["Kidney_R"]
    # painted in a planning system: its ROI names carry over, the one propagated kept with its own name
    both = painted + 2 * paint_largest(ct_phantom.label, LIVER)[0] * (painted == 0)
    contours = write_rtstruct(tmp_path / "rs_painting.dcm", both, tmp_path / "series",
                              names={1: "Kidney_R", 2: "Liver"})
    assert main([str(tmp_path / "series"), str(contours), "-o", str(tmp_path / "liver_rs.dcm"), "--rtstruct",
                 "--label", "2"]) == 0
    liver_rs = pydicom.dcmread(tmp_path / "liver_rs.dcm")
    assert [r.ROIName for r in liver_rs.StructureSetROISequence] == ["Liver"]
    liver = read_rtstruct(tmp_path / "liver_rs.dcm", tmp_path / "series") > 0
    assert dice(liver, ct_phantom.label == LIVER) >= 0.7
    capsys.readouterr()
    assert main([str(tmp_path / "series"), str(painted_path), "-o", str(tmp_path / "n.dcm"), "--name", "Kidney"]) == 2
    assert "--name 'Kidney': expected VALUE=NAME" in capsys.readouterr().err
    _write_dicom_series(tmp_path / "other", ct_phantom.image, spacing=ct_phantom.spacing[:2],
                        gap=ct_phantom.spacing[2])
    assert main([str(tmp_path / "other"), str(seg_painting), "-o", str(tmp_path / "y.nii.gz")]) == 2
    assert "does not lie on the images of the series" in capsys.readouterr().err
    assert main([str(tmp_path / "painted.nii.gz"), str(painted_path), "-o", str(tmp_path / "k.dcm")]) == 2
    assert "a DICOM SEG or RT Structure Set (.dcm) is written only for a scan given as a DICOM series folder" in (
        capsys.readouterr().err)
    assert main([str(tmp_path / "series"), str(painted_path), "-o", str(tmp_path / "k.nrrd"), "--rtstruct"]) == 2
    assert "--rtstruct writes a .dcm output" in capsys.readouterr().err


def test_an_rt_structure_set_holds_contours_that_fill_back_to_the_mask(tmp_path):
    import pydicom

    from napari_densemp.dicom import read_dicom_series, read_rtstruct, write_rtstruct

    from .test_napari_io import _write_dicom_series

    _write_dicom_series(tmp_path / "series", np.zeros((12, 10, 6), np.float32))  # rows 0.7 mm apart, columns 0.9
    scan = read_dicom_series(tmp_path / "series")
    mask = np.zeros(scan.data.shape, np.uint8)
    mask[2:5, 3:7, 1] = 4  # columns 2-4, rows 3-6 of slice 1
    mask[1:10, 1:9, 3] = 4
    mask[4:7, 3:6, 3] = 0  # a hole
    mask[7:9, 0:2, 2] = 9  # another structure
    mask[10:12, 8:10, 2] = 9  # in two parts on one slice
    path = write_rtstruct(tmp_path / "rs.dcm", mask, tmp_path / "series")
    assert np.array_equal(read_rtstruct(path, tmp_path / "series"), np.where(mask == 4, 1, np.where(mask, 2, 0)))
    rs = pydicom.dcmread(path)
    assert rs.Modality == "RTSTRUCT" and [r.ROIName for r in rs.StructureSetROISequence] == ["label 4", "label 9"]
    assert [len(r.ContourSequence) for r in rs.ROIContourSequence] == [3, 2]  # slice 3: outline and hole
    # in patient coordinates (LPS mm), half-way between the outermost pixel centres and the next
    first = rs.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(first.ContourData, dtype=float).reshape(-1, 3)
    image = next(pydicom.dcmread(p) for p in (tmp_path / "series").iterdir()
                 if pydicom.dcmread(p).SOPInstanceUID == first.ContourImageSequence[0].ReferencedSOPInstanceUID)
    x0, y0, z0 = (float(v) for v in image.ImagePositionPatient)
    assert np.allclose(points[:, 2], z0) and z0 == pytest.approx(30.0 + 2.5 * 1)  # slice 1
    assert points[:, 0].min() == pytest.approx(x0 + 1.5 * 0.9) and points[:, 0].max() == pytest.approx(x0 + 4.5 * 0.9)
    assert points[:, 1].min() == pytest.approx(y0 + 2.5 * 0.7) and points[:, 1].max() == pytest.approx(y0 + 6.5 * 0.7)
    referenced = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert len(referenced.ContourImageSequence) == 6
    with pytest.raises(DenseMPError, match="exists"):
        write_rtstruct(path, mask, tmp_path / "series")
    first.ContourData = [f"{v + (1.25 if i % 3 == 2 else 0):.4f}" for i, v in enumerate(points.ravel())]
    rs.save_as(tmp_path / "moved.dcm")  # a contour half a slice off: not drawn on this series
    with pytest.raises(DenseMPError, match="lies off the slices of the series"):
        read_rtstruct(tmp_path / "moved.dcm", tmp_path / "series")
