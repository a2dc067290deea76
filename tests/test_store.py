"""tools.store: import (atomic, idempotent), listing, priors, delete."""
from __future__ import annotations

import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tools import store as store_mod
from tools.dicom_io import load_study
from tools.errors import StudyError
from tools.store import StudyStore


def write_series(
    folder: Path,
    *,
    patient_id: str = "P1",
    study_date: str = "20240101",
    modality: str = "CT",
    n: int = 4,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
) -> tuple[str, str]:
    """A tiny axial series (16x16, 2 mm steps) in ``folder``; returns (study_uid, series_uid)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName = patient_id, f"Name^{patient_id}"
        ds.StudyDate, ds.Modality, ds.StudyDescription = study_date, modality, f"{modality} study"
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.full((16, 16), 100 + k, dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{series_number}_{k}.dcm", enforce_file_format=True)
    return study_uid, series_uid


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "files").rglob("*") if p.is_file()}


@pytest.fixture()
def store(tmp_path: Path) -> StudyStore:
    return StudyStore(tmp_path / "store")


def test_import_list_get_layout(store: StudyStore, tmp_path: Path) -> None:
    st_a, se_a = write_series(tmp_path / "in" / "a", study_date="20230105")
    st_b, _ = write_series(tmp_path / "in" / "b", study_date="20240110")
    write_series(tmp_path / "in" / "b", study_uid=st_b, series_number=2, n=3)
    recs = store.import_path(tmp_path / "in")
    assert {r.study_uid for r in recs} == {st_a, st_b}
    b = store.get(st_b)
    assert b is not None and b.n_series == 2 and b.n_instances == 7 and b.study_date == "2024-01-10"
    assert b.modality == "CT" and b.patient_id == "P1" and b.description == "CT study"
    a = store.get(st_a)
    assert a is not None
    files = sorted((Path(a.path) / se_a).iterdir())
    assert len(files) == 4 and all(f.suffix == ".dcm" for f in files)
    assert store.path_of(st_a) == store.root / "files" / st_a
    assert [r.study_uid for r in store.list_studies("P1")] == [st_b, st_a]  # newest first
    pats = store.list_patients()
    assert [(p.patient_id, p.n_studies, p.last_study_date) for p in pats] == [("P1", 2, "2024-01-10")]
    # the stored copy loads like the original
    orig = load_study(tmp_path / "in" / "a")
    again = store.load(st_a)
    assert np.array_equal(orig.primary.pixels, again.primary.pixels)
    assert np.allclose(orig.primary.affine, again.primary.affine)
    assert not list((store.root / "tmp").iterdir())


def test_reimport_is_idempotent(store: StudyStore, tmp_path: Path) -> None:
    st, _ = write_series(tmp_path / "in")
    store.import_path(tmp_path / "in")
    before = _files(store.root)
    rec = store.import_path(tmp_path / "in")[0]
    assert rec.n_instances == 4 and rec.n_series == 1
    assert _files(store.root) == before
    assert len(store.list_studies()) == 1


def test_import_zip_and_several_patients(store: StudyStore, tmp_path: Path) -> None:
    write_series(tmp_path / "in" / "x", patient_id="PX")
    write_series(tmp_path / "in" / "y", patient_id="PY")
    z = tmp_path / "two.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in (tmp_path / "in").rglob("*.dcm"):
            zf.write(f, f.relative_to(tmp_path / "in"))
    recs = store.import_path(z)
    assert sorted(r.patient_id for r in recs) == ["PX", "PY"]
    assert [p.patient_id for p in store.list_patients()] == ["PX", "PY"]


def test_find_prior(store: StudyStore, tmp_path: Path) -> None:
    uids = {}
    for date, mod in [("20210101", "CT"), ("20230101", "CT"), ("20230601", "MR"), ("20240101", "CT"),
                      ("20250101", "CT")]:
        uids[(date, mod)], _ = write_series(tmp_path / "in" / f"{date}{mod}", study_date=date, modality=mod)
    write_series(tmp_path / "other", patient_id="P2", study_date="20231201")
    store.import_path(tmp_path / "in")
    store.import_path(tmp_path / "other")
    prior = store.find_prior(uids[("20240101", "CT")])
    assert prior is not None and prior.study_uid == uids[("20230101", "CT")]
    assert store.find_prior(uids[("20230101", "CT")]).study_uid == uids[("20210101", "CT")]  # type: ignore[union-attr]
    assert store.find_prior(uids[("20210101", "CT")]) is None
    assert store.find_prior(uids[("20230601", "MR")]) is None
    # with a Study object (not necessarily stored)
    study = store.load(uids[("20250101", "CT")])
    assert store.find_prior(study).study_uid == uids[("20240101", "CT")]  # type: ignore[union-attr]
    assert store.find_prior("1.2.3.not.stored") is None


def test_failing_copy_leaves_index_unchanged(
    store: StudyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path / "first")
    store.import_path(tmp_path / "first")
    before_rows = store.list_studies()
    before_files = _files(store.root)
    write_series(tmp_path / "second", n=6, study_date="20250101")
    real_copy = shutil.copyfile
    calls = {"n": 0}

    def flaky(src, dst, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(store_mod.shutil, "copyfile", flaky)
    with pytest.raises(OSError, match="disk full"):
        store.import_path(tmp_path / "second")
    assert store.list_studies() == before_rows
    assert _files(store.root) == before_files
    assert not list((store.root / "tmp").iterdir())


def test_failing_index_write_removes_moved_files(
    store: StudyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st, _ = write_series(tmp_path / "a")
    store.import_path(tmp_path / "a")
    before_files = _files(store.root)
    # a new series of the same study plus a new study: both are moved into place, then the DB fails
    write_series(tmp_path / "b", study_uid=st, series_number=2)
    write_series(tmp_path / "b" / "new", study_date="20200101")

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("database is locked")

    monkeypatch.setattr(StudyStore, "_write_rows", boom)
    with pytest.raises(RuntimeError):
        store.import_path(tmp_path / "b")
    assert _files(store.root) == before_files
    assert len(store.list_studies()) == 1 and store.get(st).n_series == 1  # type: ignore[union-attr]


def test_invalid_source_stores_nothing(store: StudyStore, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.dcm").write_text("not dicom")
    with pytest.raises(StudyError, match="not a DICOM file"):
        store.import_path(tmp_path / "bad")
    write_series(tmp_path / "gap", n=5)
    (sorted((tmp_path / "gap").iterdir())[2]).unlink()
    with pytest.raises(StudyError, match="slice spacing is inconsistent"):
        store.import_path(tmp_path / "gap")
    assert store.list_studies() == [] and _files(store.root) == set()


def test_delete(store: StudyStore, tmp_path: Path) -> None:
    st, _ = write_series(tmp_path / "a")
    store.import_path(tmp_path / "a")
    assert store.delete(st) is True
    assert store.get(st) is None and store.list_patients() == [] and _files(store.root) == set()
    with pytest.raises(StudyError, match="not in the local store"):
        store.path_of(st)
    assert store.delete(st) is False


def test_png_import_has_no_prior(store: StudyStore, tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(tmp_path / "img" / "cxr.png")
    rec = store.import_path(tmp_path / "img" / "cxr.png")[0]
    assert rec.patient_id == "UNKNOWN" and rec.n_instances == 1
    assert store.load(rec.study_uid).study_uid == rec.study_uid
    assert store.find_prior(rec.study_uid) is None
    assert store.import_path(tmp_path / "img")[0].study_uid == rec.study_uid  # idempotent


def test_concurrent_readers_during_imports(store: StudyStore, tmp_path: Path) -> None:
    for i in range(4):
        write_series(tmp_path / f"s{i}", study_date=f"202{i}0101")
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        other = StudyStore(store.root)  # another handle, like another process
        while not stop.is_set():
            try:
                other.list_studies()
                other.list_patients()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    def importer(i: int) -> None:
        try:
            store.import_path(tmp_path / f"s{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=importer, args=(i,)) for i in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert len(store.list_studies()) == 4
