"""A small DICOMweb client for a PACS: QIDO-RS (find), WADO-RS (retrieve), STOW-RS (store).

``PacsClient(base_url)`` talks to a DICOMweb root such as ``http://pacs:8042/dicom-web`` (Orthanc's
DICOMweb plugin, dcm4chee-arc's ``/dcm4chee-arc/aets/DCM4CHEE/rs``, Google Healthcare, ...):

- ``list_studies(patient_id=None)`` / ``list_patients()`` / ``list_series(uid)`` / ``list_instances(uid)``
  (QIDO-RS ``GET {base}/studies?PatientID=...``);
- ``fetch_study(uid, dest_dir)`` writes the study's instances as ``.dcm`` files (WADO-RS
  ``GET {base}/studies/{uid}``, ``multipart/related; type="application/dicom"``, parsed as a stream so a
  large study is never held in memory at once);
- ``fetch_with_prior(uid, dest)`` also fetches the same patient's most recent earlier study of the same
  modality (CR and DX count as one), the prior the comparer needs;
- ``send(paths)`` stores files (an SR, a SEG, a secondary capture) back (STOW-RS ``POST {base}/studies``).

Privacy: patient ids and names are held in memory for matching, never logged and hidden from ``repr``;
httpx's own request log lines have their query strings (``PatientID=...``) redacted. Errors a clinician
can act on are :class:`PacsError` (a :class:`tools.errors.RadAssistError`) with a plain message.
"""
from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import httpx

from tools.errors import RadAssistError

log = logging.getLogger(__name__)

DICOM_MULTIPART = 'multipart/related; type="application/dicom"'
ACCEPT_INSTANCES = DICOM_MULTIPART + "; transfer-syntax=*"
JSON_ACCEPT = "application/dicom+json, application/json"
STOW_BATCH_BYTES = 64 * 1024 * 1024
EQUIVALENT_MODALITIES = [{"CR", "DX"}]
_SAFE = re.compile(r"[0-9A-Za-z._-]{1,128}")

# DICOM JSON tags (QIDO-RS)
T_PATIENT_ID, T_PATIENT_NAME = "00100020", "00100010"
T_STUDY_UID, T_SERIES_UID, T_SOP_UID = "0020000D", "0020000E", "00080018"
T_STUDY_DATE, T_STUDY_TIME = "00080020", "00080030"
T_MODALITIES, T_MODALITY = "00080061", "00080060"
T_STUDY_DESC, T_SERIES_DESC = "00081030", "0008103E"
T_ACCESSION = "00080050"
T_N_STUDY_SERIES, T_N_STUDY_INSTANCES, T_N_SERIES_INSTANCES = "00201206", "00201208", "00201209"
T_SERIES_NUMBER, T_INSTANCE_NUMBER, T_SOP_CLASS = "00200011", "00200013", "00080016"
T_FAILED_SOPS, T_REFERENCED_SOPS, T_REF_SOP_UID, T_FAILURE_REASON = "00081198", "00081199", "00081155", "00081197"
STUDY_FIELDS = [T_PATIENT_ID, T_PATIENT_NAME, T_STUDY_DATE, T_STUDY_TIME, T_MODALITIES, T_STUDY_DESC,
                T_ACCESSION, T_N_STUDY_SERIES, T_N_STUDY_INSTANCES]


class PacsError(RadAssistError):
    """The PACS could not be reached, refused the request, or answered something unusable."""


class _RedactQuery(logging.Filter):
    """Keep query strings (PatientID=...) out of httpx's request log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_redact(a) for a in record.args)
        elif isinstance(record.msg, str):
            # already formatted (e.g. by the de-identifying record factory): redact in the text
            record.msg = _QUERY_RX.sub(r"\1?[redacted]", record.msg)
        return True


_QUERY_RX = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")


def _redact(arg: Any) -> Any:
    if isinstance(arg, httpx.URL) and arg.query:
        return str(arg.copy_with(query=None)) + "?[redacted]"
    return arg


for _name in ("httpx", "httpcore"):
    _lg = logging.getLogger(_name)
    if not any(isinstance(f, _RedactQuery) for f in _lg.filters):
        _lg.addFilter(_RedactQuery())


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
@dataclass
class PacsStudy:
    study_uid: str
    patient_id: str = field(repr=False)  # never logged or shown; used for matching priors
    patient_name: str = field(repr=False)
    study_date: str | None  # ISO date
    study_time: str
    modalities: list[str]
    description: str
    accession: str = field(repr=False, default="")
    n_series: int | None = None
    n_instances: int | None = None

    @property
    def modality(self) -> str:
        """The study's main modality (the first image modality listed)."""
        for m in self.modalities:
            if m not in ("SR", "SEG", "KO", "PR", "OT", "REG", "RTSTRUCT"):
                return m
        return self.modalities[0] if self.modalities else ""


@dataclass
class PacsPatient:
    patient_id: str = field(repr=False)
    patient_name: str = field(repr=False)
    n_studies: int
    last_study_date: str | None


@dataclass
class PacsSeries:
    series_uid: str
    modality: str
    description: str
    number: int | None
    n_instances: int | None


@dataclass
class PacsInstance:
    sop_uid: str
    sop_class_uid: str
    number: int | None


@dataclass
class StowResult:
    stored: list[str]  # SOP instance UIDs the PACS accepted
    failed: list[tuple[str, str]]  # (SOP instance UID, failure reason code)


def _value(ds: dict[str, Any], tag: str, default: Any = None) -> Any:
    v = (ds.get(tag) or {}).get("Value")
    return v[0] if v else default


def _values(ds: dict[str, Any], tag: str) -> list[Any]:
    return list((ds.get(tag) or {}).get("Value") or [])


def _person_name(ds: dict[str, Any], tag: str) -> str:
    v = _value(ds, tag)
    if isinstance(v, dict):
        return str(v.get("Alphabetic") or v.get("Ideographic") or v.get("Phonetic") or "")
    return str(v or "")


def _iso_date(da: Any) -> str | None:
    s = str(da or "").strip()
    if len(s) == 8 and s.isdigit():
        return f"{s[:4]}-{s[4:6]}-{s[6:]}"
    return None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _modality_group(modality: str) -> set[str]:
    m = (modality or "").upper()
    for group in EQUIVALENT_MODALITIES:
        if m in group:
            return set(group)
    return {m}


def _safe_name(uid: str) -> str:
    return uid if _SAFE.fullmatch(uid) and ".." not in uid else "x" + uuid.uuid5(uuid.NAMESPACE_OID, uid).hex


# ------------------------------------------------------------------------------------------------
# multipart/related
# ------------------------------------------------------------------------------------------------
def boundary_of(content_type: str) -> str:
    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise PacsError("The PACS answered without a multipart boundary; it may not support WADO-RS.")
    return boundary


class _Stream:
    """A byte buffer fed from an iterator of chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self.buf = bytearray()

    def _more(self) -> bool:
        for chunk in self._it:
            if chunk:
                self.buf += chunk
                return True
        return False

    def find(self, pattern: bytes, start: int = 0) -> int:
        """Index of ``pattern`` at or after ``start`` in the buffer (reading on as needed), or -1 at the end."""
        pos = start
        while True:
            i = self.buf.find(pattern, pos)
            if i >= 0:
                return i
            pos = max(start, len(self.buf) - len(pattern) + 1)
            if not self._more():
                return -1

    def ensure(self, n: int) -> bool:
        while len(self.buf) < n:
            if not self._more():
                return False
        return True

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def iter_multipart(chunks: Iterable[bytes], boundary: str) -> Iterator[tuple[dict[str, str], bytes]]:
    """Parts of a ``multipart/related`` body as (lower-cased headers, body), read as a stream."""
    delim = b"--" + boundary.encode("ascii")
    s = _Stream(chunks)
    i = s.find(delim)
    if i < 0:
        raise PacsError("The PACS answer is not a multipart body (no boundary found).")
    s.take(i + len(delim))
    while True:
        if not s.ensure(2):
            raise PacsError("The PACS answer ended in the middle of a part.")
        if s.buf[:2] == b"--":
            return
        eol = s.find(b"\r\n")  # the rest of the boundary line (transport padding)
        if eol < 0:
            raise PacsError("The PACS answer ended in the middle of a part.")
        s.take(eol + 2)
        headers: dict[str, str] = {}
        if not (s.ensure(2) and s.buf[:2] == b"\r\n"):
            h = s.find(b"\r\n\r\n")
            if h < 0:
                raise PacsError("The PACS answer ended in the middle of a part's headers.")
            for line in s.take(h).decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        s.take(2 if not headers else 4)
        skip = _int(headers.get("content-length")) or 0
        end = s.find(b"\r\n" + delim, skip)
        if end < 0:
            raise PacsError("The PACS answer ended in the middle of a part.")
        body = s.take(end)
        s.take(2 + len(delim))
        yield headers, body


def build_multipart(parts: list[bytes], boundary: str, content_type: str = "application/dicom") -> bytes:
    out = io.BytesIO()
    for body in parts:
        out.write(f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                  .encode("ascii"))
        out.write(body)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode("ascii"))
    return out.getvalue()


def _sop_uid_of(data: bytes) -> str | None:
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                             specific_tags=["SOPInstanceUID"])
        uid = str(getattr(ds, "SOPInstanceUID", "") or "")
        return uid or None
    except Exception:  # noqa: BLE001 - a name is all we want; the store validates the file later
        return None


# ------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------
class PacsClient:
    """DICOMweb client for one archive. ``auth``: (user, password) for HTTP basic, or any httpx.Auth."""

    def __init__(self, base_url: str, auth: tuple[str, str] | httpx.Auth | None = None, timeout: float = 120.0,
                 headers: dict[str, str] | None = None, transport: httpx.BaseTransport | None = None) -> None:
        base_url = (base_url or "").strip().rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise PacsError("The PACS address must be a DICOMweb URL starting with http:// or https:// "
                            "(e.g. http://pacs:8042/dicom-web).")
        self.base_url = base_url
        self._client = httpx.Client(auth=auth, timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
                                    headers=headers or {}, transport=transport, follow_redirects=True)

    def __repr__(self) -> str:
        return f"PacsClient({self.host!r})"

    @property
    def host(self) -> str:
        u = httpx.URL(self.base_url)
        return f"{u.host}:{u.port}" if u.port else str(u.host)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------
    def _check(self, r: httpx.Response, what: str) -> None:
        if r.status_code in (401, 403):
            raise PacsError(f"The PACS at {self.host} refused access while {what} (HTTP {r.status_code}); "
                            "check the PACS user and password.")
        if r.status_code == 404:
            raise PacsError(f"The PACS at {self.host} has no such resource while {what} (HTTP 404).")
        if r.status_code >= 400:
            raise PacsError(f"The PACS at {self.host} answered HTTP {r.status_code} while {what}.")

    def _get_json(self, path: str, params: list[tuple[str, str]] | None, what: str) -> list[dict[str, Any]]:
        try:
            r = self._client.get(self.base_url + path, params=params, headers={"Accept": JSON_ACCEPT})
        except httpx.HTTPError as exc:
            raise PacsError(f"Could not reach the PACS at {self.host} while {what}: {type(exc).__name__}.") from exc
        if r.status_code == 204:
            return []
        self._check(r, what)
        try:
            data = r.json() if r.content.strip() else []
        except ValueError as exc:
            raise PacsError(f"The PACS at {self.host} did not answer DICOM JSON while {what}.") from exc
        if not isinstance(data, list):
            raise PacsError(f"The PACS at {self.host} answered an unexpected document while {what}.")
        return data

    # -- QIDO-RS ----------------------------------------------------------------------------------
    def list_studies(self, patient_id: str | None = None, study_uid: str | None = None, limit: int = 500,
                     ) -> list[PacsStudy]:
        """Studies in the archive (optionally of one patient), newest first."""
        # includefield repeated (not comma-separated): every DICOMweb server understands that form
        params: list[tuple[str, str]] = [("includefield", t) for t in STUDY_FIELDS] + [("limit", str(limit))]
        if patient_id is not None:
            params.append(("PatientID", patient_id))
        if study_uid is not None:
            params.append(("StudyInstanceUID", study_uid))
        rows = self._get_json("/studies", params, "listing studies")
        out = []
        for ds in rows:
            uid = _value(ds, T_STUDY_UID)
            if not uid:
                continue
            out.append(PacsStudy(
                study_uid=str(uid), patient_id=str(_value(ds, T_PATIENT_ID, "") or ""),
                patient_name=_person_name(ds, T_PATIENT_NAME), study_date=_iso_date(_value(ds, T_STUDY_DATE)),
                study_time=str(_value(ds, T_STUDY_TIME, "") or ""),
                modalities=[str(m) for m in _values(ds, T_MODALITIES)],
                description=str(_value(ds, T_STUDY_DESC, "") or ""), accession=str(_value(ds, T_ACCESSION, "") or ""),
                n_series=_int(_value(ds, T_N_STUDY_SERIES)), n_instances=_int(_value(ds, T_N_STUDY_INSTANCES))))
        if patient_id is not None:  # QIDO matching may be fuzzy or case-insensitive: keep exact matches
            out = [s for s in out if s.patient_id == patient_id]
        out.sort(key=lambda s: (s.study_date or "", s.study_time, s.study_uid), reverse=True)
        return out

    def get_study(self, study_uid: str) -> PacsStudy:
        found = [s for s in self.list_studies(study_uid=study_uid) if s.study_uid == study_uid]
        if not found:
            raise PacsError(f"The PACS at {self.host} has no study with that StudyInstanceUID.")
        return found[0]

    def list_patients(self) -> list[PacsPatient]:
        """Patients with studies in the archive (from the study list), most recently seen first."""
        by: dict[str, list[PacsStudy]] = {}
        for s in self.list_studies():
            by.setdefault(s.patient_id, []).append(s)
        out = [PacsPatient(patient_id=pid, patient_name=ss[0].patient_name, n_studies=len(ss),
                           last_study_date=max((s.study_date or "" for s in ss), default="") or None)
               for pid, ss in by.items()]
        out.sort(key=lambda p: p.last_study_date or "", reverse=True)
        return out

    def list_series(self, study_uid: str) -> list[PacsSeries]:
        rows = self._get_json(f"/studies/{study_uid}/series", None, "listing a study's series")
        out = [PacsSeries(series_uid=str(_value(ds, T_SERIES_UID, "")), modality=str(_value(ds, T_MODALITY, "") or ""),
                          description=str(_value(ds, T_SERIES_DESC, "") or ""),
                          number=_int(_value(ds, T_SERIES_NUMBER)), n_instances=_int(_value(ds, T_N_SERIES_INSTANCES)))
               for ds in rows]
        return sorted(out, key=lambda s: (s.number is None, s.number or 0, s.series_uid))

    def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[PacsInstance]:
        path = f"/studies/{study_uid}" + (f"/series/{series_uid}" if series_uid else "") + "/instances"
        rows = self._get_json(path, None, "listing a study's instances")
        out = [PacsInstance(sop_uid=str(_value(ds, T_SOP_UID, "")),
                            sop_class_uid=str(_value(ds, T_SOP_CLASS, "") or ""),
                            number=_int(_value(ds, T_INSTANCE_NUMBER))) for ds in rows]
        return sorted(out, key=lambda i: (i.number is None, i.number or 0, i.sop_uid))

    def find_prior(self, study: PacsStudy | str) -> PacsStudy | None:
        """The same patient's most recent earlier study of the same modality in the archive, or None."""
        cur = study if isinstance(study, PacsStudy) else self.get_study(study)
        if not cur.study_date or not cur.patient_id.strip() or cur.patient_id.strip().upper() == "UNKNOWN":
            return None
        group = _modality_group(cur.modality)
        earlier = [s for s in self.list_studies(patient_id=cur.patient_id)
                   if s.study_uid != cur.study_uid and s.study_date and s.study_date < cur.study_date
                   and _modality_group(s.modality) & group]
        return earlier[0] if earlier else None  # newest first

    # -- WADO-RS ----------------------------------------------------------------------------------
    def fetch_study(self, study_uid: str, dest_dir: str | Path) -> Path:
        """Retrieve every instance of the study into ``dest_dir`` (``<SOPInstanceUID>.dcm``); returns it."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        n = 0
        try:
            with self._client.stream("GET", f"{self.base_url}/studies/{study_uid}",
                                     headers={"Accept": ACCEPT_INSTANCES}) as r:
                if r.status_code == 406:  # no transfer-syntax=* support: ask for the default
                    r.close()
                    return self._fetch_default(study_uid, dest)
                self._check(r, "retrieving a study")
                n = self._write_parts(r, dest)
        except httpx.HTTPError as exc:
            raise PacsError(f"Could not retrieve the study from the PACS at {self.host}: "
                            f"{type(exc).__name__}.") from exc
        if n == 0:
            raise PacsError(f"The PACS at {self.host} returned no DICOM instance for that study.")
        log.info("fetched %d instance(s) of one study from %s", n, self.host)
        return dest

    def _fetch_default(self, study_uid: str, dest: Path) -> Path:
        with self._client.stream("GET", f"{self.base_url}/studies/{study_uid}",
                                 headers={"Accept": DICOM_MULTIPART}) as r:
            self._check(r, "retrieving a study")
            if self._write_parts(r, dest) == 0:
                raise PacsError(f"The PACS at {self.host} returned no DICOM instance for that study.")
        return dest

    def _write_parts(self, r: httpx.Response, dest: Path) -> int:
        ctype = r.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/"):
            raise PacsError(f"The PACS at {self.host} answered {ctype.split(';')[0] or 'no content type'} "
                            "instead of multipart/related DICOM.")
        n = 0
        for headers, body in iter_multipart(r.iter_bytes(), boundary_of(ctype)):
            ptype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if ptype != "application/dicom" or not body:
                continue
            name = _sop_uid_of(body) or f"instance{n:05d}"
            path = dest / f"{_safe_name(name)}.dcm"
            tmp = path.with_suffix(".part")
            tmp.write_bytes(body)
            tmp.replace(path)
            n += 1
        return n

    def fetch_with_prior(self, study_uid: str, dest: str | Path) -> tuple[Path, Path | None]:
        """Fetch the study into ``dest/current`` and its prior (if the archive has one) into ``dest/prior``."""
        dest = Path(dest)
        cur = self.get_study(study_uid)
        current_dir = self.fetch_study(cur.study_uid, dest / "current")
        prior = self.find_prior(cur)
        prior_dir = self.fetch_study(prior.study_uid, dest / "prior") if prior is not None else None
        return current_dir, prior_dir

    # -- STOW-RS ----------------------------------------------------------------------------------
    def send(self, paths: Iterable[str | Path], study_uid: str | None = None) -> StowResult:
        """Store DICOM files in the archive (e.g. an SR or SEG of the results); raises if none was stored."""
        files = [Path(p) for p in paths]
        if not files:
            raise PacsError("Nothing to send to the PACS.")
        for p in files:
            if not p.is_file():
                raise PacsError(f"Cannot send {p.name} to the PACS: the file does not exist.")
        result = StowResult(stored=[], failed=[])
        batch: list[bytes] = []
        size = 0
        for p in files:
            data = p.read_bytes()
            if batch and size + len(data) > STOW_BATCH_BYTES:
                self._stow(batch, study_uid, result)
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            self._stow(batch, study_uid, result)
        if not result.stored:
            raise PacsError(f"The PACS at {self.host} stored none of the {len(files)} file(s) sent "
                            f"({len(result.failed)} refused).")
        log.info("sent %d instance(s) to %s (%d refused)", len(result.stored), self.host, len(result.failed))
        return result

    def _stow(self, parts: list[bytes], study_uid: str | None, result: StowResult) -> None:
        boundary = "radassist-" + uuid.uuid4().hex
        url = f"{self.base_url}/studies" + (f"/{study_uid}" if study_uid else "")
        try:
            r = self._client.post(url, content=build_multipart(parts, boundary), headers={
                "Content-Type": f'{DICOM_MULTIPART}; boundary={boundary}', "Accept": JSON_ACCEPT})
        except httpx.HTTPError as exc:
            raise PacsError(f"Could not send to the PACS at {self.host}: {type(exc).__name__}.") from exc
        if r.status_code not in (200, 202, 409):
            self._check(r, "storing files")
        try:
            doc = r.json() if r.content.strip() else {}
        except ValueError:
            doc = {}
        if isinstance(doc, list):
            doc = doc[0] if doc else {}
        for item in _values(doc, T_REFERENCED_SOPS):
            result.stored.append(str(_value(item, T_REF_SOP_UID, "")))
        for item in _values(doc, T_FAILED_SOPS):
            result.failed.append((str(_value(item, T_REF_SOP_UID, "")), str(_value(item, T_FAILURE_REASON, ""))))
        if r.status_code == 200 and not doc:  # a server that answers 200 without a body stored them all
            result.stored.extend(_sop_uid_of(p) or "" for p in parts)
