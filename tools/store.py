"""The local study store: files under ``root/files`` plus a SQLite index (``root/index.sqlite``).

Layout: ``root/files/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (PNG/JPEG radiographs keep
their suffix). An import is all-or-nothing: every study is validated with
:mod:`tools.dicom_io` first, the files are staged in ``root/tmp`` and renamed into place, and
the index rows are committed only after the files are there; on any failure the files moved so
far are removed again and the transaction is rolled back. Re-importing the same study is
idempotent (existing instances are kept, new ones added).

Threads share one store object (writes are serialised by a lock); other processes may read the
index concurrently (WAL journal). Patient identifiers are stored in the index (the workstation
needs them to find priors) but never logged.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools import dicom_io
from tools.errors import StudyError
from tools.study import Series, Study

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_id   TEXT PRIMARY KEY,
    patient_name TEXT NOT NULL DEFAULT '',
    patient_sex  TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid   TEXT PRIMARY KEY,
    patient_id  TEXT NOT NULL,
    study_date  TEXT,
    modality    TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    accession   TEXT NOT NULL DEFAULT '',
    dirname     TEXT NOT NULL,
    imported_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_by_patient ON studies (patient_id, study_date);
CREATE TABLE IF NOT EXISTS series (
    study_uid   TEXT NOT NULL,
    series_uid  TEXT NOT NULL,
    modality    TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    number      INTEGER,
    PRIMARY KEY (study_uid, series_uid)
);
CREATE TABLE IF NOT EXISTS instances (
    study_uid  TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_uid    TEXT NOT NULL,
    relpath    TEXT NOT NULL,
    PRIMARY KEY (study_uid, sop_uid)
);
"""

#: Modalities treated as the same kind of examination when looking for a prior.
_EQUIVALENT_MODALITIES = [{"CR", "DX"}]
_UNKNOWN_PATIENTS = {"", "UNKNOWN"}
_SAFE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


def _safe_name(uid: str) -> str:
    """A UID as a directory/file name; anything unusual is replaced by a hash."""
    if _SAFE.fullmatch(uid) and ".." not in uid:
        return uid
    return "h" + hashlib.sha256(uid.encode()).hexdigest()[:40]


def _modality_group(modality: str) -> set[str]:
    m = (modality or "").upper()
    for group in _EQUIVALENT_MODALITIES:
        if m in group:
            return set(group)
    return {m}


@dataclass
class StudyRecord:
    study_uid: str
    patient_id: str
    study_date: str | None  # ISO date
    modality: str
    description: str
    n_series: int
    n_instances: int
    path: str


@dataclass
class PatientRecord:
    patient_id: str
    patient_name: str
    n_studies: int
    last_study_date: str | None


@dataclass
class _Planned:
    """One file to place in the store."""

    src: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    relpath: str  # relative to root/files


class StudyStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.tmp_dir = self.root / "tmp"
        self.db_path = self.root / "index.sqlite"
        self._lock = threading.RLock()
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
        self._clean_tmp()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=NORMAL")
            yield con
        finally:
            con.close()

    def _clean_tmp(self) -> None:
        """Remove staging folders left by a crashed import (never indexed, so safe to drop)."""
        for p in self.tmp_dir.iterdir():
            if p.is_dir() and p.name.startswith(("import-", "trash-")):
                try:
                    age = dt.datetime.now().timestamp() - p.stat().st_mtime
                except OSError:
                    continue
                if age > 3600:
                    shutil.rmtree(p, ignore_errors=True)

    def _record(self, con: sqlite3.Connection, row: sqlite3.Row | tuple) -> StudyRecord:
        study_uid, patient_id, study_date, modality, description, dirname = row
        n_series, n_inst = con.execute(
            "SELECT COUNT(DISTINCT series_uid), COUNT(*) FROM instances WHERE study_uid=?", (study_uid,)
        ).fetchone()
        return StudyRecord(
            study_uid=study_uid,
            patient_id=patient_id,
            study_date=study_date,
            modality=modality,
            description=description,
            n_series=int(n_series),
            n_instances=int(n_inst),
            path=str(self.files_dir / dirname),
        )

    _STUDY_COLS = "study_uid, patient_id, study_date, modality, description, dirname"

    # ------------------------------------------------------------------ queries

    def get(self, study_uid: str) -> StudyRecord | None:
        with self._connect() as con:
            row = con.execute(f"SELECT {self._STUDY_COLS} FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            return self._record(con, row) if row else None

    def list_studies(self, patient_id: str | None = None) -> list[StudyRecord]:
        """Studies, newest first (all patients, or one)."""
        q = f"SELECT {self._STUDY_COLS} FROM studies"
        args: tuple = ()
        if patient_id is not None:
            q += " WHERE patient_id=?"
            args = (patient_id,)
        q += " ORDER BY patient_id, COALESCE(study_date, '') DESC, study_uid"
        with self._connect() as con:
            return [self._record(con, r) for r in con.execute(q, args).fetchall()]

    def list_patients(self) -> list[PatientRecord]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT p.patient_id, p.patient_name, COUNT(s.study_uid), MAX(s.study_date) "
                "FROM patients p LEFT JOIN studies s ON s.patient_id = p.patient_id "
                "GROUP BY p.patient_id ORDER BY p.patient_id"
            ).fetchall()
        return [PatientRecord(r[0], r[1], int(r[2]), r[3]) for r in rows]

    def path_of(self, study_uid: str) -> Path:
        rec = self.get(study_uid)
        if rec is None:
            raise StudyError("This study is not in the local store; import it first.")
        return Path(rec.path)

    def load(self, study_uid: str) -> Study:
        """The stored study as a :class:`Study` (reads the files again)."""
        return dicom_io.load_study(self.path_of(study_uid))

    def find_prior(self, study: str | Study) -> StudyRecord | None:
        """The most recent earlier study of the same patient and modality (CR and DX count as
        the same), or None. Studies without a date or of an unknown patient have no prior."""
        if isinstance(study, Study):
            uid, pid = study.study_uid, study.patient_id
            date = study.study_date.isoformat() if study.study_date else None
            modality = study.modality
        else:
            rec = self.get(study)
            if rec is None:
                return None
            uid, pid, date, modality = rec.study_uid, rec.patient_id, rec.study_date, rec.modality
        if not date or (pid or "").strip().upper() in _UNKNOWN_PATIENTS:
            return None
        mods = sorted(_modality_group(modality))
        marks = ",".join("?" for _ in mods)
        with self._connect() as con:
            row = con.execute(
                f"SELECT {self._STUDY_COLS} FROM studies WHERE patient_id=? AND study_date IS NOT NULL "
                f"AND study_date < ? AND modality IN ({marks}) AND study_uid != ? "
                "ORDER BY study_date DESC, study_uid LIMIT 1",
                (pid, date, *mods, uid),
            ).fetchone()
            return self._record(con, row) if row else None

    # ------------------------------------------------------------------ import

    def import_path(self, source: dicom_io.Source) -> list[StudyRecord]:
        """Validate and store every study in ``source`` (folder, zip, file(s)); all or nothing.

        Several patients in one import are allowed here (each study is filed under its own
        patient); every study must load (else StudyError and nothing is stored)."""
        src = dicom_io._source_str(source)
        with dicom_io.expanded(source) as paths:
            scan = dicom_io.scan_files(paths)
            studies: dict[str, Study] = {}
            for st in dicom_io.iter_studies(scan, src, allow_mixed_patients=True):
                st.series = [_light(s) for s in st.series]  # keep metadata, drop pixels
                studies[st.study_uid] = st
            planned = self._plan_files(scan, studies)
            with self._lock:
                return self._commit(studies, planned)

    def _plan_files(self, scan: dicom_io.Scan, studies: dict[str, Study]) -> list[_Planned]:
        out: list[_Planned] = []
        seen: set[tuple[str, str]] = set()
        for f in scan.dicom:
            if f.study_uid not in studies:
                continue
            sop = f.sop_uid or hashlib.sha256(f.path.read_bytes()).hexdigest()
            key = (f.study_uid, sop)
            if key in seen:
                continue
            seen.add(key)
            series = f.series_uid or "unknown-series"
            rel = f"{_safe_name(f.study_uid)}/{_safe_name(series)}/{_safe_name(sop)}.dcm"
            out.append(_Planned(f.path, f.study_uid, series, sop, rel))
        for img in scan.images:
            st_uid, se_uid, sop = dicom_io.image_uids(img)
            if st_uid not in studies or (st_uid, sop) in seen:
                continue
            seen.add((st_uid, sop))
            suffix = img.suffix.lower() if img.suffix.lower() in dicom_io.IMAGE_SUFFIXES else ".png"
            rel = f"{_safe_name(st_uid)}/{_safe_name(se_uid)}/{_safe_name(sop)}{suffix}"
            out.append(_Planned(img, st_uid, se_uid, sop, rel))
        return out

    def _commit(self, studies: dict[str, Study], planned: list[_Planned]) -> list[StudyRecord]:
        staging = self.tmp_dir / f"import-{uuid.uuid4().hex}"
        moved: list[tuple[str, Path]] = []  # ("dir" | "file", path) placed in files/
        try:
            with self._connect() as con:
                for st in studies.values():
                    row = con.execute("SELECT patient_id FROM studies WHERE study_uid=?", (st.study_uid,)).fetchone()
                    if row and row[0] != st.patient_id:
                        raise StudyError(
                            "A study with the same Study Instance UID is already stored under another patient; "
                            "nothing was imported. Check the export (UIDs must be unique)."
                        )
            # 1. stage copies
            for p in planned:
                if (self.files_dir / p.relpath).exists():
                    continue  # already stored (re-import)
                dst = staging / p.relpath
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p.src, dst)
            # 2. move into place
            for st_dir in sorted(staging.iterdir()) if staging.exists() else []:
                target = self.files_dir / st_dir.name
                if not target.exists():
                    os.rename(st_dir, target)
                    moved.append(("dir", target))
                    continue
                for se_dir in sorted(st_dir.iterdir()):
                    se_target = target / se_dir.name
                    if not se_target.exists():
                        os.rename(se_dir, se_target)
                        moved.append(("dir", se_target))
                        continue
                    for f in sorted(se_dir.iterdir()):
                        f_target = se_target / f.name
                        if not f_target.exists():
                            os.rename(f, f_target)
                            moved.append(("file", f_target))
            # 3. index, one transaction
            self._write_rows(studies, planned)
        except BaseException:
            for kind, path in reversed(moved):
                if kind == "dir":
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("imported %d study(ies), %d file(s)", len(studies), len(planned))
        recs = [self.get(uid) for uid in studies]
        return [r for r in recs if r is not None]

    def _write_rows(self, studies: dict[str, Study], planned: list[_Planned]) -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                for st in studies.values():
                    con.execute(
                        "INSERT INTO patients (patient_id, patient_name, patient_sex) VALUES (?, ?, ?) "
                        "ON CONFLICT(patient_id) DO UPDATE SET "
                        "patient_name = CASE WHEN excluded.patient_name != '' THEN excluded.patient_name "
                        "ELSE patients.patient_name END, "
                        "patient_sex = CASE WHEN excluded.patient_sex != '' THEN excluded.patient_sex "
                        "ELSE patients.patient_sex END",
                        (st.patient_id, st.patient_name, st.patient_sex),
                    )
                    old = con.execute("SELECT modality FROM studies WHERE study_uid=?", (st.study_uid,)).fetchone()
                    modality = st.modality
                    if old and old[0] in {"CT", "MR", "PT"} and modality not in {"CT", "MR", "PT"}:
                        modality = old[0]  # a later partial import (e.g. a scout) keeps the volume's modality
                    con.execute(
                        "INSERT INTO studies (study_uid, patient_id, study_date, modality, description, accession, "
                        "dirname, imported_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(study_uid) DO UPDATE SET study_date=excluded.study_date, "
                        "modality=excluded.modality, description=excluded.description, "
                        "accession=excluded.accession, imported_at=excluded.imported_at",
                        (
                            st.study_uid,
                            st.patient_id,
                            st.study_date.isoformat() if st.study_date else None,
                            modality,
                            st.description,
                            st.accession,
                            _safe_name(st.study_uid),
                            now,
                        ),
                    )
                    for se in st.series:
                        con.execute(
                            "INSERT OR REPLACE INTO series (study_uid, series_uid, modality, description, number) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (st.study_uid, se.series_uid, se.modality, se.description, se.number),
                        )
                con.executemany(
                    "INSERT OR IGNORE INTO instances (study_uid, series_uid, sop_uid, relpath) VALUES (?, ?, ?, ?)",
                    [(p.study_uid, p.series_uid, p.sop_uid, p.relpath) for p in planned],
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ delete

    def delete(self, study_uid: str) -> bool:
        """Remove a study's files and index rows; False when it was not stored."""
        with self._lock:
            rec = self.get(study_uid)
            if rec is None:
                return False
            folder = Path(rec.path)
            trash = self.tmp_dir / f"trash-{uuid.uuid4().hex}"
            if folder.exists():
                os.rename(folder, trash)
            try:
                with self._connect() as con:
                    con.execute("BEGIN IMMEDIATE")
                    try:
                        con.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
                        con.execute("DELETE FROM series WHERE study_uid=?", (study_uid,))
                        con.execute("DELETE FROM studies WHERE study_uid=?", (study_uid,))
                        con.execute(
                            "DELETE FROM patients WHERE patient_id=? AND NOT EXISTS "
                            "(SELECT 1 FROM studies WHERE patient_id=?)",
                            (rec.patient_id, rec.patient_id),
                        )
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
            except BaseException:
                if trash.exists():
                    os.rename(trash, folder)
                raise
            shutil.rmtree(trash, ignore_errors=True)
            log.info("deleted study …%s", study_uid[-8:])
            return True


def _light(series: Series) -> Series:
    """The series without its pixel array (the store only needs metadata)."""
    series.pixels = np.zeros((0, 0, 0), dtype=np.float32)
    return series
