"""tools.dicom_io: synthetic series (geometry, sorting, HU, windows) and real test files."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tools import dicom_io
from tools.dicom_io import is_dicom, load_studies, load_study
from tools.errors import StudyError

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _data_store(name: str) -> Path:
    p = Path(str(importlib.metadata.distribution("pydicom-data").locate_file(f"data_store/data/{name}")))
    if not p.exists():
        pytest.skip(f"pydicom-data file {name} not installed")
    return p


def _testfile(name: str) -> Path:
    p = TEST_FILES / name
    if not p.exists():
        pytest.skip(f"pydicom test file {name} not in the wheel")
    return p


def hu_of(z: float, i: np.ndarray | int) -> np.ndarray | int:
    """The synthetic volume's HU at slice position z (mm) and column i."""
    return np.round(2 * z).astype(int) + i - 100 if isinstance(i, np.ndarray) else int(round(2 * z)) + i - 100


def write_ct_series(
    folder: Path,
    n: int = 20,
    rows: int = 64,
    cols: int = 64,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),  # (row spacing, column spacing)
    step: float = 2.5,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    origin: tuple[float, float, float] = (-20.0, -30.0, 10.0),
    patient_id: str = "PAT-1",
    patient_name: str = "Doe^Jane",
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_date: str = "20240115",
    window_center: object = ("40", "-600"),
    window_width: object = ("400", "1500"),
    drop: tuple[int, ...] = (),
    seed: int = 0,
    modality: str = "CT",
    prefix: str = "IM",
) -> dict:
    """Write an axial-ish CT series; InstanceNumber runs against the position and file names are
    shuffled. Voxel value (HU) = round(2*z_along_normal) + column - 100."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    row = np.asarray(iop[:3], float)
    col = np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    names = [f"{prefix}{idx:04d}" for idx in range(n)]
    random.Random(seed).shuffle(names)
    jj, ii = np.mgrid[0:rows, 0:cols]
    ipps = []
    for k in range(n):
        if k in drop:
            continue
        ipp = np.asarray(origin, float) + k * step * normal
        ipps.append(ipp)
        z = float(np.dot(ipp, normal))
        hu = np.round(2 * z).astype(int) + ii - 100 + 0 * jj
        stored = (hu + 1024).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "F"
        ds.PatientAge = "064Y"
        ds.StudyDate = study_date
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "Axial 2.5"
        ds.AccessionNumber = "ACC1"
        ds.Modality = modality
        ds.Manufacturer = "Synthetic"
        ds.KVP = "120"
        ds.SliceThickness = str(step)
        ds.ConvolutionKernel = "B30f"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesNumber = 3
        ds.InstanceNumber = n - k  # against the position on purpose
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        if pixel_spacing is not None:
            ds.PixelSpacing = [str(pixel_spacing[0]), str(pixel_spacing[1])]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        if window_center is not None:
            ds.WindowCenter = list(window_center) if isinstance(window_center, tuple) else window_center
            ds.WindowWidth = list(window_width) if isinstance(window_width, tuple) else window_width
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / names[k], enforce_file_format=True)
    return {"study_uid": study_uid, "series_uid": series_uid, "ipps": ipps, "normal": normal}


@pytest.fixture()
def ct_dir(tmp_path: Path) -> tuple[Path, dict]:
    info = write_ct_series(tmp_path / "ct")
    return tmp_path / "ct", info


# ------------------------------------------------------------------------------------------
# Synthetic series: sorting, geometry, HU, windows, header
# ------------------------------------------------------------------------------------------


def test_synthetic_ct_sorted_geometry_hu(ct_dir: tuple[Path, dict]) -> None:
    folder, info = ct_dir
    (folder / "README.txt").write_text("exported by PACS")
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    st = load_study(folder)
    s = st.primary
    assert s.shape == (20, 64, 64)
    assert s.pixels.dtype == np.float32
    assert s.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert s.spacing_known
    # sorted along the normal: z increases with k, whatever InstanceNumber and names say
    zs = [float(s.vox_to_mm([0, 0, k])[2]) for k in range(20)]
    assert np.all(np.diff(zs) > 0)
    # the affine maps voxel (0, 0, k) to each slice's IPP
    for k, ipp in enumerate(info["ipps"]):
        assert np.allclose(s.vox_to_mm([0, 0, k]), ipp, atol=1e-3)
    assert np.allclose(s.affine @ [3, 5, 7, 1], [*(info["ipps"][7] + [3 * 0.8, 5 * 0.7, 0]), 1], atol=1e-3)
    # HU (modality LUT applied)
    for k in (0, 7, 19):
        z = info["ipps"][k][2]
        assert s.pixels[k, 10, 0] == pytest.approx(hu_of(z, 0))
        assert s.pixels[k, 3, 33] == pytest.approx(hu_of(z, 33))
    # multi-valued window: first value
    assert s.window == (40.0, 400.0)
    # instance uids follow the sorted order
    assert len(s.instance_uids) == 20 and len(set(s.instance_uids)) == 20
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in folder.glob("IM*")}
    z_of = [float(pydicom.dcmread(by_uid[u], stop_before_pixels=True).ImagePositionPatient[2]) for u in s.instance_uids]
    assert z_of == sorted(z_of)
    # study fields
    assert st.study_uid == info["study_uid"] and s.series_uid == info["series_uid"]
    assert st.patient_id == "PAT-1" and st.patient_name == "Doe^Jane"
    assert st.study_date == dt.date(2024, 1, 15)
    assert st.modality == "CT" and st.description == "CT CHEST" and st.accession == "ACC1"
    assert st.patient_sex == "F" and st.patient_age == "064Y" and st.body_part == "CHEST"
    h = s.header
    assert h["Manufacturer"] == "Synthetic" and h["KVP"] == 120.0 and h["ConvolutionKernel"] == "B30f"
    assert h["NumberOfSlices"] == 20 and h["Rows"] == 64 and h["PixelSpacing"] == [0.7, 0.8]
    assert h["TransferSyntaxUID"] == ExplicitVRLittleEndian
    assert "PatientName" not in h and "PatientID" not in h


def test_oblique_orientation_affine(tmp_path: Path) -> None:
    c, s_ = np.cos(np.radians(20)), np.sin(np.radians(20))
    iop = (c, s_, 0.0, 0.0, 0.0, -1.0)  # a tilted coronal plane
    info = write_ct_series(tmp_path / "obl", n=6, iop=iop, step=3.0)
    s = load_study(tmp_path / "obl").primary
    for k in range(6):
        assert np.allclose(s.vox_to_mm([0, 0, k]), info["ipps"][k], atol=1e-3)
    assert np.allclose(s.direction[:, 0], iop[:3], atol=1e-5)
    assert np.allclose(s.direction[:, 1], iop[3:], atol=1e-5)
    assert s.voxel_volume_mm3 == pytest.approx(0.8 * 0.7 * 3.0, rel=1e-4)


def test_single_valued_window_and_list_source(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "a", n=4, window_center="50", window_width="350")
    files = sorted((tmp_path / "a").iterdir())
    st = load_study([str(f) for f in files])
    assert st.primary.window == (50.0, 350.0)
    assert load_study(files[0]).primary.shape == (1, 64, 64)


def test_zip_source_and_is_dicom(tmp_path: Path, ct_dir: tuple[Path, dict]) -> None:
    folder, info = ct_dir
    zpath = tmp_path / "study.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in folder.iterdir():
            zf.write(f, f"export/DICOM/{f.name}")
        zf.writestr("__MACOSX/._IM0001", b"mac junk")
    st = load_study(zpath)
    assert st.primary.shape == (20, 64, 64) and st.study_uid == info["study_uid"]
    assert is_dicom(next(folder.iterdir()))
    (tmp_path / "x.txt").write_text("hello")
    assert not is_dicom(tmp_path / "x.txt")


def test_load_studies_two_studies_same_patient(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "s" / "new", n=3, study_date="20240301")
    write_ct_series(tmp_path / "s" / "old", n=3, study_date="20230301")
    studies = load_studies(tmp_path / "s")
    assert [s.study_date.year for s in studies] == [2023, 2024]  # type: ignore[union-attr]
    with pytest.raises(StudyError, match=r"Found 2 studies"):
        load_study(tmp_path / "s")


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


def test_not_dicom(tmp_path: Path) -> None:
    f = tmp_path / "x.dcm"
    f.write_text("this is a radiology report, not an image")
    with pytest.raises(StudyError, match=r"'x\.dcm' is not a DICOM file"):
        load_study(f)
    with pytest.raises(StudyError, match=r"'x\.dcm' is not a DICOM file"):
        load_study(tmp_path)


def test_no_pixel_data_sr() -> None:
    with pytest.raises(StudyError, match=r"contains no images \(found: SR document\)"):
        load_study(_testfile("test-SR.dcm"))
    with pytest.raises(StudyError, match=r"found: RT plan"):
        load_study(_testfile("rtplan.dcm"))
    with pytest.raises(StudyError, match=r"found: waveform"):
        load_study(_testfile("waveform_ecg.dcm"))


def test_missing_pixel_spacing(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "nops", n=3, pixel_spacing=None)  # type: ignore[arg-type]
    s = load_study(tmp_path / "nops").primary
    assert not s.spacing_known and s.spacing == (1.0, 1.0, 1.0)
    assert "pixel spacing missing/zero: measurements in pixels" in s.notes


def test_zero_pixel_spacing(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "zps", n=3, pixel_spacing=(0.0, 0.0))
    s = load_study(tmp_path / "zps").primary
    assert not s.spacing_known and "pixel spacing missing/zero: measurements in pixels" in s.notes


def test_imager_pixel_spacing_fallback(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "dx", n=1, pixel_spacing=None)  # type: ignore[arg-type]
    f = next((tmp_path / "dx").iterdir())
    ds = pydicom.dcmread(f)
    ds.Modality = "DX"
    ds.ImagerPixelSpacing = ["0.15", "0.14"]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(f)
    s = load_study(f).primary
    assert s.is_radiograph and s.spacing_known and s.spacing[:2] == pytest.approx((0.14, 0.15))
    assert any("ImagerPixelSpacing" in n for n in s.notes)


def test_inconsistent_slice_spacing(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "gap", n=12, drop=(6,))
    pattern = r"series 3 \('Axial 2.5'\).*slice spacing is inconsistent.*2.5 mm ×9, 5 mm ×1"
    with pytest.raises(StudyError, match=pattern):
        load_study(tmp_path / "gap")


def test_duplicate_positions(tmp_path: Path) -> None:
    info = write_ct_series(tmp_path / "dup", n=5)
    write_ct_series(
        tmp_path / "dup", n=5, study_uid=info["study_uid"], series_uid=info["series_uid"], seed=1, prefix="B"
    )
    with pytest.raises(StudyError, match=r"occur more than once|inconsistent"):
        load_study(tmp_path / "dup")


def test_inconsistent_orientation(tmp_path: Path) -> None:
    info = write_ct_series(tmp_path / "ori", n=5)
    write_ct_series(
        tmp_path / "ori2", n=1, iop=(1, 0, 0, 0, 0, -1), study_uid=info["study_uid"], series_uid=info["series_uid"]
    )
    (tmp_path / "ori2" / "IM0000").rename(tmp_path / "ori" / "LOCALIZER")
    with pytest.raises(StudyError, match=r"different orientations"):
        load_study(tmp_path / "ori")


def test_different_sizes_in_series(tmp_path: Path) -> None:
    info = write_ct_series(tmp_path / "sz", n=4)
    write_ct_series(
        tmp_path / "sz2", n=1, rows=32, cols=32, origin=(-20, -30, 30), study_uid=info["study_uid"],
        series_uid=info["series_uid"],
    )
    (tmp_path / "sz2" / "IM0000").rename(tmp_path / "sz" / "SMALL")
    with pytest.raises(StudyError, match=r"different sizes \(32x32, 64x64"):
        load_study(tmp_path / "sz")


def test_truncated_file() -> None:
    with pytest.raises(StudyError, match=r"'MR_truncated\.dcm' is truncated or damaged"):
        load_study(_testfile("MR_truncated.dcm"))


def test_truncated_copy_in_folder(tmp_path: Path, ct_dir: tuple[Path, dict]) -> None:
    folder, _ = ct_dir
    victim = sorted(folder.iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 3000])
    with pytest.raises(StudyError, match=rf"'{victim.name}' is truncated or damaged"):
        load_study(folder)


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "ts", n=1)
    f = next((tmp_path / "ts").iterdir())
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # unknown compression
    ds.save_as(f)
    with pytest.raises(StudyError, match=rf"'{f.name}' could not be decompressed .*no decoder"):
        load_study(f)


def test_decoder_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Dataset) -> np.ndarray:  # the plugin is "not installed"
        raise RuntimeError("Unable to decode as no plugins are available (pylibjpeg-openjpeg missing)")

    monkeypatch.setattr(Dataset, "pixel_array", property(boom))
    with pytest.raises(StudyError, match=r"'JPEG2000\.dcm' could not be decompressed \(JPEG 2000"):
        load_study(_testfile("JPEG2000.dcm"))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyError, match=r"folder 'empty' is empty"):
        load_study(tmp_path / "empty")


def test_only_junk_in_folder(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "README").write_text("x")
    (tmp_path / "j" / "notes.txt").write_text("y")
    with pytest.raises(StudyError, match=r"No DICOM images were found: 2 files"):
        load_study(tmp_path / "j")


def test_several_patients(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "mix" / "a", n=2, patient_id="SECRET-A", patient_name="Alpha^Ann")
    write_ct_series(tmp_path / "mix" / "b", n=2, patient_id="SECRET-B", patient_name="Beta^Bob")
    with pytest.raises(StudyError, match=r"files from 2 different patients") as ei:
        load_studies(tmp_path / "mix")
    msg = str(ei.value)
    assert "SECRET" not in msg and "Alpha" not in msg and "Beta" not in msg


def test_zip_path_traversal(tmp_path: Path) -> None:
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/readme.txt", "fine")
        zf.writestr("../evil.dcm", b"x" * 10)
    with pytest.raises(StudyError, match=r"unsafe path \('\.\./evil\.dcm'\)"):
        load_study(z)
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_zip_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (4 * 1024**2))
    monkeypatch.setattr(dicom_io, "MAX_ZIP_TOTAL_BYTES", 1024**2)
    with pytest.raises(StudyError, match=r"zip bomb"):
        load_study(z)
    monkeypatch.setattr(dicom_io, "MAX_ZIP_TOTAL_BYTES", 1024**3)
    monkeypatch.setattr(dicom_io, "MAX_ZIP_RATIO_MIN_BYTES", 1024**2)
    with pytest.raises(StudyError, match=r"looks like a zip bomb"):
        load_study(z)


# ------------------------------------------------------------------------------------------
# Real files
# ------------------------------------------------------------------------------------------


def test_real_ct_small() -> None:
    st = load_study(_testfile("CT_small.dcm"))
    s = st.primary
    assert st.modality == "CT" and s.shape == (1, 128, 128)
    assert s.spacing[:2] == pytest.approx((0.661468, 0.661468))
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(s.pixels[0], hu)
    assert np.allclose(s.origin, [float(v) for v in ds.ImagePositionPatient])


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm"])
def test_real_mr(name: str) -> None:
    s = load_study(_testfile(name)).primary
    assert s.modality == "MR" and s.shape == (1, 64, 64) and s.window == (600.0, 1600.0)


def test_real_jpeg2000() -> None:
    s = load_study(_testfile("JPEG2000.dcm")).primary
    assert s.shape == (1, 1024, 256)


def test_real_multiframe_enhanced_mr() -> None:
    s = load_study(_data_store("emri_small.dcm")).primary
    assert s.shape == (10, 64, 64)
    assert "frames treated as a stack in stored order" in s.notes


def test_real_enhanced_ct_functional_groups() -> None:
    s = load_study(_data_store("eCT_Supplemental.dcm")).primary
    ds = pydicom.dcmread(_data_store("eCT_Supplemental.dcm"), stop_before_pixels=True)
    ipps = [np.array([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
            for f in ds.PerFrameFunctionalGroupsSequence]
    assert s.shape == (2, 512, 512) and s.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    # frames are stored at z=-159, -149; the normal of this orientation is -z, so sorting along it
    # puts frame 1 first: k=0 is the frame at z=-149
    assert np.allclose(s.vox_to_mm([0, 0, 0]), ipps[1], atol=1e-3)
    assert np.allclose(s.vox_to_mm([0, 0, 1]), ipps[0], atol=1e-3)
    raw = pydicom.dcmread(_data_store("eCT_Supplemental.dcm")).pixel_array.astype(np.float32)
    assert np.allclose(s.pixels[0], raw[1] - 1024) and np.allclose(s.pixels[1], raw[0] - 1024)
    assert s.window == (49.0, 102.0)
    assert s.pixels.min() >= -1024  # rescale intercept from PixelValueTransformationSequence


def test_real_chest_cr_monochrome1_zero_spacing() -> None:
    path = _data_store("RG1_UNCR.dcm")
    st = load_study(path)
    s = st.primary
    assert st.modality == "CR" and s.shape == (1, 1955, 1841) and s.is_radiograph
    assert s.photometric == "MONOCHROME1"
    assert not s.spacing_known
    assert "pixel spacing missing/zero: measurements in pixels" in s.notes
    assert any("MONOCHROME1" in n for n in s.notes)
    raw = pydicom.dcmread(path).pixel_array.astype(float)
    # inverted: the brightest stored value is now the darkest
    assert np.corrcoef(raw.ravel()[::97], s.pixels[0].ravel()[::97])[0, 1] < -0.99


def test_real_dicomdir_skipped_with_images(tmp_path: Path) -> None:
    d = TEST_FILES / "dicomdirtests"
    if not d.exists():
        pytest.skip("dicomdirtests not in the wheel")
    studies = load_studies(d / "98892001")
    assert studies and all(s.series for s in studies)


def test_no_meta_is_rejected() -> None:
    with pytest.raises(StudyError, match=r"'no_meta\.dcm' is not a DICOM file"):
        load_study(_testfile("no_meta.dcm"))


# ------------------------------------------------------------------------------------------
# PNG / JPEG
# ------------------------------------------------------------------------------------------


def test_png_radiograph(tmp_path: Path) -> None:
    arr = (np.linspace(0, 255, 80 * 60).reshape(60, 80)).astype(np.uint8)
    p = tmp_path / "cxr.png"
    Image.fromarray(arr).save(p)
    st = load_study(p)
    s = st.primary
    assert st.patient_id == "UNKNOWN" and st.study_date is None
    assert s.modality in {"DX", "OT"} and s.shape == (1, 60, 80) and not s.spacing_known
    assert np.allclose(s.pixels[0], arr)
    st2 = load_study(p)
    assert st2.study_uid == st.study_uid and st2.series[0].instance_uids == s.instance_uids
    assert st.study_uid.startswith("2.25.") and len(st.study_uid) <= 64
    buf = io.BytesIO()
    Image.fromarray(np.stack([arr] * 3, -1)).save(buf, format="JPEG")
    (tmp_path / "photo.jpg").write_bytes(buf.getvalue())
    s3 = load_study(tmp_path / "photo.jpg").primary
    assert s3.shape == (1, 60, 80) and any("grayscale" in n for n in s3.notes)
