"""De-identification: what may leave the process, and in what form.

Two jobs, one module:

- **Text scrubbing** (:func:`scrub_text`, :func:`scrub_payload`): every request to a served model and
  every log record passes through here. The identifiers of the studies this process has loaded
  (patient name, patient id, birth date, accession number, institution, physicians, optionally UIDs)
  are replaced by bracketed placeholders such as ``[patient]`` or ``[patient-id]``. Studies register
  their identifiers when they are loaded (:func:`register`), so the scrubber knows them without the
  caller passing them around; a caller that knows the current study can pass its
  :class:`Identifiers` explicitly as well.
- **DICOM de-identification** (:func:`deidentify_dataset`, :func:`deidentify_files`): the DICOM PS3.15
  Basic Application Level Confidentiality Profile as far as ``dicognito`` covers it (names, ids,
  UIDs, dates shifted consistently, addresses, equipment), plus the profile's free-text attributes
  and private tags removed here. Images with burned-in annotation are refused (pixels cannot be
  cleaned here). Used for exports marked "research" (``radassist deid``).

A small API for other modules::

    ids = identifiers_from_study(study)          # or identifiers_from_dataset(ds)
    safe = scrub_text(text, ids)                 # ids=None: every identifier this process has seen
    body = scrub_payload(request_body)           # JSON-like bodies (strings inside are scrubbed)
    ds = deidentify_dataset(ds, profile="basic")
    install_log_scrubber()                       # log records never carry a known identifier
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from tools.errors import StudyError, UnsupportedError

log = logging.getLogger(__name__)

#: Placeholders, by kind of identifier.
PLACEHOLDERS = {
    "patient_names": "[patient]",
    "patient_ids": "[patient-id]",
    "birth_dates": "[birth-date]",
    "accessions": "[accession]",
    "institutions": "[institution]",
    "physicians": "[physician]",
    "other": "[redacted]",
    "uids": "[uid]",
}

#: Header attributes read into :class:`Identifiers` (keyword -> kind).
_PN_PATIENT = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName")
_PN_STAFF = ("ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
             "OperatorsName", "RequestingPhysician", "PhysiciansOfRecord", "ScheduledPerformingPhysicianName")
_IDS = ("PatientID", "OtherPatientIDs", "IssuerOfPatientID")
_ACCESSION = ("AccessionNumber", "StudyID", "RequestedProcedureID")
_INSTITUTION = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName")
_OTHER = ("PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence")
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")

#: PS3.15 Table E.1-1 attributes with action X/Z/D on free text that dicognito leaves alone; removed here.
BASIC_PROFILE_TEXT = (
    "PatientComments", "StudyComments", "ImageComments", "AdditionalPatientHistory", "StudyDescription",
    "SeriesDescription", "AdmittingDiagnosesDescription",
    "RequestedProcedureComments", "RequestedProcedureDescription", "ReasonForStudy",
    "InterpretationText", "InterpretationDiagnosisDescription", "ImagingServiceRequestComments",
    "PerformedProcedureStepDescription", "ScheduledProcedureStepDescription", "DerivationDescription",
    "PatientState", "Allergies", "MedicalAlerts", "Occupation", "EthnicGroup", "PregnancyStatus",
    "ContrastBolusAgent", "ProtocolName", "AcquisitionComments", "TextComments", "TextString",
    "ContentSequence", "IconImageSequence", "OriginalAttributesSequence", "ModifiedAttributesSequence",
    "RequestAttributesSequence", "ReferencedPatientSequence", "ReferencedStudySequence",
    "PatientSize", "PatientWeight", "PatientAge", "PatientSex",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "DeviceSerialNumber",
)
_MIN_NAME_PART = 2
_ALNUM = re.compile(r"[0-9A-Za-z]")
_MIN_ID = 3


@dataclass(frozen=True)
class Identifiers:
    """The identifying strings of one study (or of several, merged). Values are as in the header."""

    patient_names: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    birth_dates: tuple[str, ...] = ()  # YYYYMMDD
    accessions: tuple[str, ...] = ()
    institutions: tuple[str, ...] = ()
    physicians: tuple[str, ...] = ()
    other: tuple[str, ...] = ()
    uids: tuple[str, ...] = field(default=(), repr=False)

    def merge(self, other: "Identifiers") -> "Identifiers":
        return Identifiers(**{f.name: tuple(dict.fromkeys(getattr(self, f.name) + getattr(other, f.name)))
                              for f in fields(self)})

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self) if f.name != "uids")

    def key(self) -> tuple[tuple[str, ...], ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


def _values(ds: Dataset, keyword: str) -> list[str]:
    try:
        el = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element identifies nothing we can read
        return []
    if el is None:
        return []
    vals = el if isinstance(el, list | tuple) or type(el).__name__ == "MultiValue" else [el]
    out = []
    for v in vals:
        if isinstance(v, bytes):
            v = v.decode("latin-1", errors="ignore")
        s = str(v).strip().strip("\x00").strip()
        if s:
            out.append(s)
    return out


def identifiers_from_dataset(ds: Dataset) -> Identifiers:
    """The identifiers in one DICOM header (no pixels needed)."""
    return identifiers_from_datasets([ds])


def identifiers_from_datasets(datasets: Iterable[Dataset]) -> Identifiers:
    acc: dict[str, dict[str, None]] = {f.name: {} for f in fields(Identifiers)}
    groups = {"patient_names": _PN_PATIENT, "physicians": _PN_STAFF, "patient_ids": _IDS,
              "accessions": _ACCESSION, "institutions": _INSTITUTION, "other": _OTHER, "uids": _UIDS,
              "birth_dates": ("PatientBirthDate",)}
    for ds in datasets:
        for kind, keywords in groups.items():
            for kw in keywords:
                if kw == "PatientInsurancePlanCodeSequence":
                    continue
                for v in _values(ds, kw):
                    acc[kind][v] = None
    return Identifiers(**{k: tuple(v) for k, v in acc.items()})


def identifiers_from_study(study: Any) -> Identifiers:
    """The identifiers of a loaded :class:`tools.study.Study` (those the loader captured, plus its fields)."""
    base = getattr(study, "identifiers", None)
    own = Identifiers(
        patient_names=tuple(x for x in [getattr(study, "patient_name", "")] if x),
        patient_ids=tuple(x for x in [getattr(study, "patient_id", "")] if x and x != "UNKNOWN"),
        accessions=tuple(x for x in [getattr(study, "accession", "")] if x),
        uids=tuple([study.study_uid] + [s.series_uid for s in getattr(study, "series", [])]),
    )
    return base.merge(own) if isinstance(base, Identifiers) else own


# ------------------------------------------------------------------------------------------------
# Patterns
# ------------------------------------------------------------------------------------------------
def _name_parts(pn: str) -> list[str]:
    """A DICOM person name ("Last^First^Middle^Prefix^Suffix", groups split by '=') as its words."""
    parts: list[str] = []
    for group in pn.split("="):
        for comp in group.split("^"):
            for word in re.split(r"[\s,]+", comp):
                word = word.strip(".")
                if len(word) >= _MIN_NAME_PART:
                    parts.append(word)
    return parts


def _date_variants(d: str) -> list[str]:
    d = re.sub(r"\D", "", d)
    if len(d) != 8:
        return [d] if len(d) >= 6 else []
    y, m, dd = d[:4], d[4:6], d[6:]
    out = [d, f"{y}-{m}-{dd}", f"{y}/{m}/{dd}", f"{y}.{m}.{dd}", f"{dd}/{m}/{y}", f"{m}/{dd}/{y}",
           f"{dd}.{m}.{y}", f"{dd}-{m}-{y}"]
    return list(dict.fromkeys(out))


def _patterns(ids: Identifiers, uids: bool) -> list[tuple[str, str]]:
    """(lower-case literal, placeholder), longest first."""
    items: list[tuple[str, str]] = []

    def lit(s: str, kind: str, min_len: int) -> None:
        s = s.strip()
        if len(s) >= min_len and _ALNUM.search(s):  # "^^" or "--" identify nobody
            items.append((s, PLACEHOLDERS[kind]))

    for pn in ids.patient_names:
        lit(pn, "patient_names", _MIN_NAME_PART)
        for w in _name_parts(pn):
            lit(w, "patient_names", _MIN_NAME_PART)
    for pn in ids.physicians:
        lit(pn, "physicians", _MIN_NAME_PART)
        for w in _name_parts(pn):
            lit(w, "physicians", _MIN_NAME_PART)
    for v in ids.patient_ids:
        lit(v, "patient_ids", _MIN_ID)
    for v in ids.birth_dates:
        for dv in _date_variants(v):
            lit(dv, "birth_dates", 6)
    for v in ids.accessions:
        lit(v, "accessions", _MIN_ID)
    for v in ids.institutions:
        lit(v, "institutions", _MIN_ID)
    for v in ids.other:
        lit(v, "other", _MIN_ID)
    if uids:
        for v in ids.uids:
            lit(v, "uids", 8)
    seen: dict[str, str] = {}
    for s, ph in items:
        seen.setdefault(s.lower(), ph)
    return sorted(seen.items(), key=lambda kv: -len(kv[0]))


def _trie_regex(words: Iterable[str]) -> str:
    """One regex matching any of ``words`` (lower case), built as a trie so that thousands of literals
    cost about as much as a few; the longest alternative is tried first."""
    trie: dict[str, Any] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def build(node: dict[str, Any]) -> str:
        end = "" in node
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch != ""]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if end:
            return "(?:" + body + ")?"
        return body if len(alts) == 1 else body

    return build(trie)


class _Scrubber:
    def __init__(self, ids: Identifiers, uids: bool) -> None:
        pats = _patterns(ids, uids)
        self.placeholder: dict[str, str] = dict(pats)
        self.rx: re.Pattern[str] | None = None
        if pats:
            self.rx = re.compile(r"(?<![0-9A-Za-z])(?:" + _trie_regex(self.placeholder) + r")(?![0-9A-Za-z])",
                                 re.IGNORECASE)

    def __call__(self, text: str) -> str:
        if self.rx is None or not text:
            return text
        rx = self.rx

        def scrub(part: str) -> str:
            return rx.sub(lambda m: self.placeholder.get(m.group(0).lower(), "[redacted]"), part)

        # placeholders a previous pass put in are never scrubbed again (an identifier that happens to be
        # a word such as "patient" must not turn "[patient]" into "[[patient]]")
        pieces = _PLACEHOLDER_RX.split(text)
        marks = _PLACEHOLDER_RX.findall(text)
        out = [scrub(pieces[0])]
        for mark, piece in zip(marks, pieces[1:]):
            out += [mark, scrub(piece)]
        return "".join(out)


_PLACEHOLDER_RX = re.compile("|".join(re.escape(v) for v in PLACEHOLDERS.values()))


# ------------------------------------------------------------------------------------------------
# The process registry of identifiers seen
# ------------------------------------------------------------------------------------------------
class IdentifierRegistry:
    """Identifiers of the studies this process has loaded (bounded, most recent kept), and a scrubber
    over all of them, rebuilt when a new study registers."""

    def __init__(self, max_studies: int = 512) -> None:
        self.max_studies = max_studies
        self._items: OrderedDict[tuple[tuple[str, ...], ...], Identifiers] = OrderedDict()
        self._lock = threading.Lock()
        self._scrubbers: dict[bool, _Scrubber] = {}

    def register(self, ids: Identifiers) -> None:
        if ids.is_empty() and not ids.uids:
            return
        k = ids.key()
        with self._lock:
            if k in self._items:
                self._items.move_to_end(k)
                return
            self._items[k] = ids
            while len(self._items) > self.max_studies:
                self._items.popitem(last=False)
            self._scrubbers = {}

    def merged(self) -> Identifiers:
        with self._lock:
            out = Identifiers()
            for ids in self._items.values():
                out = out.merge(ids)
            return out

    def scrubber(self, uids: bool) -> _Scrubber:
        with self._lock:
            s = self._scrubbers.get(uids)
        if s is None:
            s = _Scrubber(self.merged(), uids)
            with self._lock:
                self._scrubbers[uids] = s
        return s

    def forget(self, ids: Identifiers) -> None:
        with self._lock:
            if self._items.pop(ids.key(), None) is not None:
                self._scrubbers = {}

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._scrubbers = {}


KNOWN = IdentifierRegistry()


def register(ids: Identifiers) -> None:
    """Remember a loaded study's identifiers so that requests and logs can be scrubbed of them."""
    KNOWN.register(ids)


def scrub_text(text: str, identifiers: Identifiers | Sequence[Identifiers] | None = None, *,
               uids: bool = True) -> str:
    """``text`` with every known identifier replaced by a placeholder.

    ``identifiers``: the current study's (one or several); the identifiers of every study this process
    has loaded are scrubbed as well. ``uids``: also replace the studies' UIDs."""
    if not text:
        return text
    if identifiers is not None:
        extra = [identifiers] if isinstance(identifiers, Identifiers) else list(identifiers)
        merged = Identifiers()
        for ids in extra:
            merged = merged.merge(ids)
        text = _Scrubber(merged, uids)(text)
    return KNOWN.scrubber(uids)(text)


def scrub_payload(obj: Any, identifiers: Identifiers | Sequence[Identifiers] | None = None, *,
                  uids: bool = True) -> Any:
    """A JSON-like request body with every string scrubbed (image data URLs are left as they are:
    pixels are the vision path's business, see :func:`deidentify_dataset`)."""
    if isinstance(obj, str):
        if obj.startswith("data:image/"):
            return obj
        return scrub_text(obj, identifiers, uids=uids)
    if isinstance(obj, dict):
        return {k: scrub_payload(v, identifiers, uids=uids) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub_payload(v, identifiers, uids=uids) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------
def _scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_radassist_scrubbed", False):
        return record
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed log call still must not leak its arguments
        msg = str(record.msg)
    record.msg = scrub_text(msg)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = scrub_text(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = scrub_text(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub_text(record.stack_info)
    record._radassist_scrubbed = True  # type: ignore[attr-defined]
    return record


class ScrubFilter(logging.Filter):
    """A logging filter that rewrites each record's message without the identifiers this process knows."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        return True


_factory_lock = threading.Lock()
_installed = False


def install_log_scrubber() -> None:
    """Scrub every log record of this process (record factory, so handlers added later, pytest's
    included, see scrubbed records only) and put a :class:`ScrubFilter` on the root handlers."""
    global _installed
    with _factory_lock:
        if not _installed:
            old = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                return _scrub_record(old(*args, **kwargs))

            logging.setLogRecordFactory(factory)
            _installed = True
        for h in logging.getLogger().handlers:
            if not any(isinstance(f, ScrubFilter) for f in h.filters):
                h.addFilter(ScrubFilter())


# ------------------------------------------------------------------------------------------------
# DICOM (PS3.15 basic profile through dicognito)
# ------------------------------------------------------------------------------------------------
def deidentify_dataset(ds: Dataset, profile: str = "basic", seed: str | None = None,
                       anonymizer: Any = None) -> Dataset:
    """De-identify ``ds`` in place (and return it) following the PS3.15 basic profile.

    ``anonymizer``: a shared ``dicognito.anonymizer.Anonymizer`` keeps UIDs, ids and date shifts consistent
    across the files of one export; ``seed`` makes a new one reproducible. Raises UnsupportedError for
    images with burned-in annotation (their pixels may show the patient's name)."""
    if profile != "basic":
        raise UnsupportedError(f"De-identification profile '{profile}' is not supported; use 'basic'.")
    if str(ds.get("BurnedInAnnotation", "") or "").upper() == "YES":
        raise UnsupportedError("This image has burned-in annotation (text in the pixels); it cannot be "
                               "de-identified here. Leave it out of the research export.")
    if anonymizer is None:
        from dicognito.anonymizer import Anonymizer

        anonymizer = Anonymizer(seed=seed)
    ids_before = identifiers_from_dataset(ds)
    ds.remove_private_tags()
    for kw in BASIC_PROFILE_TEXT:
        if kw in ds:
            del ds[kw]
    anonymizer.anonymize(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 Basic Application Confidentiality Profile (dicognito, radassist)"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "113100", "DCM", "Basic Application Confidentiality Profile")
    ds.DeidentificationMethodCodeSequence = [code]
    left = _Scrubber(Identifiers(**{**{f.name: getattr(ids_before, f.name) for f in fields(ids_before)},
                                    "uids": ()}), uids=False)
    for el in ds.iterall():
        if el.VR in ("LO", "LT", "SH", "ST", "UT", "PN") and isinstance(el.value, str) and el.value:
            cleaned = left(el.value)
            if cleaned != el.value:
                el.value = cleaned
    return ds


@dataclass
class DeidReport:
    written: int = 0
    refused: list[str] = field(default_factory=list)
    skipped: int = 0
    out_dir: str = ""


def deidentify_files(source: str | Path, out_dir: str | Path, seed: str | None = None) -> DeidReport:
    """Write a de-identified copy of every DICOM file in ``source`` (folder, zip, file) to ``out_dir``
    (one consistent pseudonymisation for the whole export; files named by their new SOP UID)."""
    import pydicom
    from dicognito.anonymizer import Anonymizer

    from tools.dicom_io import expanded, is_dicom

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anonymizer = Anonymizer(seed=seed)
    rep = DeidReport(out_dir=str(out))
    with expanded(source) as paths:
        for p in paths:
            if not is_dicom(p):
                rep.skipped += 1
                continue
            try:
                ds = pydicom.dcmread(p, force=True)
            except Exception as exc:  # noqa: BLE001
                raise StudyError(f"'{p.name}' could not be read for de-identification ({type(exc).__name__}).") from exc
            try:
                deidentify_dataset(ds, anonymizer=anonymizer)
            except UnsupportedError as exc:
                rep.refused.append(f"{p.name}: {exc}")
                continue
            name = str(ds.get("SOPInstanceUID", "") or f"file{rep.written:05d}")
            ds.save_as(out / f"{name}.dcm", enforce_file_format=False)
            rep.written += 1
    log.info("de-identified %d file(s), %d refused, %d skipped", rep.written, len(rep.refused), rep.skipped)
    return rep
