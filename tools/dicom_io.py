"""Loading studies from folders, zip archives, single files and PNG/JPEG radiographs.

``load_studies(source)`` returns every study found (grouped by StudyInstanceUID) as
:class:`tools.study.Study` objects; ``load_study(source)`` insists on exactly one.

How it works, and what it guarantees:

- Headers are read first (``stop_before_pixels``) to group files into studies/series and to order
  the slices; pixels are then read once per file, in parallel, straight into a preallocated
  float32 array ``[k, j, i]``.
- Slices (single-frame files or frames of a multi-frame object) are ordered by their position
  along the slice normal, ``dot(IPP, cross(row_dir, col_dir))``; never by InstanceNumber or name.
  Gaps, duplicate positions or mixed orientations are refused with a :class:`StudyError`.
- Stored values go through the modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence),
  so CT is in HU. MONOCHROME1 is inverted to MONOCHROME2 (and the window centre mirrored); colour
  images are converted to grayscale. Both leave a note on the series.
- Pixel spacing comes from PixelSpacing (or PixelMeasuresSequence); ImagerPixelSpacing is a
  fallback with a note; when neither is usable the series has ``spacing_known=False``,
  spacing ``(1, 1, 1)`` and measurements are in pixels.
- Non-image objects (SR, RT plan/structure/dose, SEG, waveforms, presentation states, DICOMDIR)
  are skipped with a note; stray non-DICOM files in a folder are skipped silently.

Patient identifiers are never logged and never appear in error messages.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from tools.errors import StudyError
from tools.study import VOLUME_MODALITIES, Series, Study

log = logging.getLogger(__name__)

Source = str | Path | Sequence[str | Path]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
#: Modalities / objects that carry no image to work on (skipped with a note).
NON_IMAGE_MODALITIES = {
    "SR": "SR document",
    "DOC": "encapsulated document",
    "KO": "key object selection",
    "PR": "presentation state",
    "RTPLAN": "RT plan",
    "RTSTRUCT": "RT structure set",
    "RTDOSE": "RT dose grid",
    "RTRECORD": "RT treatment record",
    "SEG": "segmentation",
    "REG": "registration",
    "ECG": "waveform (ECG)",
    "HD": "waveform",
    "AU": "audio waveform",
    "PLAN": "plan",
}
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# Zip guards (module constants so that deployments/tests can tune them).
MAX_ZIP_TOTAL_BYTES = 8 * 1024**3  # uncompressed
MAX_ZIP_MEMBERS = 200_000
MAX_ZIP_RATIO = 200.0  # per member, checked for members above MAX_ZIP_RATIO_MIN_BYTES
MAX_ZIP_RATIO_MIN_BYTES = 16 * 1024**2

# Size guards: refuse before allocating (a header may claim any size).
MAX_FRAMES_PER_FILE = 10_000
MAX_VOLUME_BYTES = int(float(os.environ.get("RADASSIST_MAX_VOLUME_MB", "6144")) * 1024**2)  # float32 voxels

# Geometry tolerances.
ORIENTATION_TOL = 1e-2  # max abs difference of direction cosines within one series
DUPLICATE_TOL_MM = 0.01
SPACING_VARIATION = 0.20  # relative deviation of a slice step from the median step

_MAX_WORKERS = max(1, min(8, os.cpu_count() or 1))

HEADER_FIELDS = (
    "Manufacturer",
    "ManufacturerModelName",
    "KVP",
    "SliceThickness",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "SeriesDescription",
    "BodyPartExamined",
    "ViewPosition",
    "StudyDescription",
    "PixelSpacing",
    "Rows",
    "Columns",
)


# --------------------------------------------------------------------------------------------
# File discovery
# --------------------------------------------------------------------------------------------


def is_dicom(path: str | Path) -> bool:
    """True when ``path`` looks like a DICOM file: 'DICM' after the preamble, or a dataset
    without preamble/meta whose first element is in group 0002 or 0008 and parses."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return _parse_raw_dataset(p) is not None


def _parse_raw_dataset(p: Path) -> Dataset | None:
    """Parse a DICOM stream without preamble or file meta; None when it does not look like one."""
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    if len(head) < 8 or head[:2] not in (b"\x08\x00", b"\x02\x00"):
        return None
    try:
        ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return None
    if "SOPInstanceUID" in ds or "StudyInstanceUID" in ds or "SeriesInstanceUID" in ds:
        return ds
    return None


def _is_image_file(p: Path) -> bool:
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") or head[:3] == b"\xff\xd8\xff"


def _walk(folder: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            out.append(Path(dirpath) / name)
    return out


def _safe_member_path(dest: Path, name: str) -> Path:
    norm = name.replace("\\", "/")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in parts or not parts:
        raise StudyError(
            f"The zip archive contains an unsafe path ({name!r}) that points outside the archive; "
            "it was not extracted. Re-create the archive from the study folder."
        )
    target = (dest / Path(*parts)).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise StudyError(
            f"The zip archive contains an unsafe path ({name!r}); it was not extracted. "
            "Re-create the archive from the study folder."
        )
    return target


def _extract_zip(zpath: Path, dest: Path) -> None:
    label = zpath.name
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
        raise StudyError(f"'{label}' is not a readable zip archive ({exc}). Re-create or re-download it.") from exc
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_ZIP_MEMBERS:
            raise StudyError(
                f"'{label}' holds {len(infos)} files, more than the {MAX_ZIP_MEMBERS} allowed; "
                "split the export into one study per archive."
            )
        total = sum(i.file_size for i in infos)
        if total > MAX_ZIP_TOTAL_BYTES:
            raise StudyError(
                f"'{label}' would expand to {total / 1024**2:.0f} MiB, more than the "
                f"{MAX_ZIP_TOTAL_BYTES / 1024**2:.0f} MiB allowed (possible zip bomb); it was not extracted. "
                "Export one study per archive."
            )
        for i in infos:
            if i.file_size >= MAX_ZIP_RATIO_MIN_BYTES and i.file_size > MAX_ZIP_RATIO * max(i.compress_size, 1):
                raise StudyError(
                    f"'{label}' looks like a zip bomb (a member is compressed "
                    f"{i.file_size / max(i.compress_size, 1):.0f}:1); "
                    "it was not extracted."
                )
        written = 0
        for i in infos:
            if i.flag_bits & 0x1:
                raise StudyError(f"'{label}' is password-protected; export the study without encryption.")
            parts = i.filename.replace("\\", "/").split("/")
            if any(p.startswith(".") or p == "__MACOSX" for p in parts if p):
                # still validate the path, then skip hidden/metadata entries
                _safe_member_path(dest, i.filename)
                continue
            target = _safe_member_path(dest, i.filename)
            target.parent.mkdir(parents=True, exist_ok=True)
            member_written = 0
            try:
                with zf.open(i) as src, target.open("wb") as dst:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        member_written += len(chunk)
                        written += len(chunk)
                        if member_written > i.file_size or written > MAX_ZIP_TOTAL_BYTES:
                            raise StudyError(
                                f"'{label}' expands beyond its declared size (possible zip bomb); it was not extracted."
                            )
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, ValueError,
                    NotImplementedError) as exc:
                raise StudyError(
                    f"'{label}' is damaged (member '{Path(i.filename).name}': {exc}). Re-create or re-download it."
                ) from exc


@contextmanager
def expanded(source: Source) -> Iterator[list[Path]]:
    """Yield the candidate files of ``source`` (folder walked recursively, zips extracted safely
    to a temporary folder that is removed on exit, lists flattened)."""
    tmpdirs: list[Path] = []
    try:
        items: list[str | Path] = [source] if isinstance(source, str | Path) else list(source)
        if not items:
            raise StudyError("No files were given. Choose a study folder, a zip archive or DICOM files.")
        files: list[Path] = []
        for item in items:
            p = Path(item)
            if not p.exists():
                raise StudyError(f"'{p.name}' does not exist. Check the path and try again.")
            if p.is_dir():
                found = _walk(p)
                if not found and len(items) == 1:
                    raise StudyError(f"The folder '{p.name}' is empty. Choose the folder that holds the DICOM files.")
                files.extend(found)
            elif p.suffix.lower() == ".zip" or (zipfile.is_zipfile(p) and not _looks_dicom_preamble(p)):
                tmp = Path(tempfile.mkdtemp(prefix="radassist-zip-"))
                tmpdirs.append(tmp)
                _extract_zip(p, tmp)
                found = _walk(tmp)
                if not found:
                    raise StudyError(f"The zip archive '{p.name}' is empty.")
                files.extend(found)
            else:
                files.append(p)
        yield files
    finally:
        for t in tmpdirs:
            shutil.rmtree(t, ignore_errors=True)


def _looks_dicom_preamble(p: Path) -> bool:
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) >= 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------------------------
# Header scan
# --------------------------------------------------------------------------------------------


@dataclass
class DicomFile:
    """One DICOM file's header (no pixels) and where it lives."""

    path: Path
    ds: Dataset

    @property
    def study_uid(self) -> str:
        return str(self.ds.get("StudyInstanceUID", "") or "")

    @property
    def series_uid(self) -> str:
        return str(self.ds.get("SeriesInstanceUID", "") or "")

    @property
    def sop_uid(self) -> str:
        return str(self.ds.get("SOPInstanceUID", "") or "")

    @property
    def modality(self) -> str:
        return str(self.ds.get("Modality", "") or "").upper()


@dataclass
class Scan:
    dicom: list[DicomFile] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)  # PNG / JPEG
    skipped: list[Path] = field(default_factory=list)  # not DICOM, not an image
    dicomdirs: list[Path] = field(default_factory=list)


def _damaged_header(p: Path, exc: BaseException) -> StudyError:
    return StudyError(
        f"'{p.name}' is a DICOM file but its header is damaged or truncated ({type(exc).__name__}). "
        "Copy or export it again from the PACS."
    )


def _materialize(ds: Dataset) -> Dataset:
    """Convert every element now (pydicom parses lazily): a damaged element fails here, not deep in the loader."""
    for _ in ds.iterall():
        pass
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for _ in meta.iterall():
            pass
    return ds


def _read_header(p: Path) -> Dataset | None:
    """Header of a DICOM file; None when it is not DICOM; StudyError when it is DICOM but broken."""
    if _looks_dicom_preamble(p):
        try:
            return _materialize(pydicom.dcmread(p, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001
            raise _damaged_header(p, exc) from exc
    ds = _parse_raw_dataset(p)
    if ds is not None:
        try:
            _materialize(ds)
        except Exception as exc:  # noqa: BLE001
            raise _damaged_header(p, exc) from exc
    return ds


def scan_files(paths: Iterable[Path]) -> Scan:
    """Sort candidate files into DICOM headers, PNG/JPEG images and skipped files."""
    scan = Scan()
    paths = list(paths)

    def classify(p: Path) -> tuple[str, Path, Dataset | None]:
        if _is_image_file(p) and not _looks_dicom_preamble(p):
            return "image", p, None
        ds = _read_header(p)
        if ds is None:
            return "skip", p, None
        meta_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
        sop_class = str(ds.get("SOPClassUID", "") or meta_class or "")
        if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
            return "dicomdir", p, None
        return "dicom", p, ds

    if len(paths) > 16 and _MAX_WORKERS > 1:
        with ThreadPoolExecutor(_MAX_WORKERS) as ex:
            results = list(ex.map(classify, paths))
    else:
        results = [classify(p) for p in paths]
    for kind, p, ds in results:
        if kind == "image":
            scan.images.append(p)
        elif kind == "skip":
            scan.skipped.append(p)
        elif kind == "dicomdir":
            scan.dicomdirs.append(p)
        else:
            assert ds is not None
            scan.dicom.append(DicomFile(p, ds))
    return scan


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _first(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        return v[0] if len(v) else None
    return v


def _float(v: Any) -> float | None:
    v = _first(v)
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _floats(v: Any, n: int) -> np.ndarray | None:
    if v is None:
        return None
    try:
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(np.isfinite(vals)):
        return None
    return np.asarray(vals, dtype=float)


def _parse_date(v: Any) -> dt.date | None:
    s = str(v or "").strip()
    if len(s) >= 8 and s[:8].isdigit():
        try:
            return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
        except ValueError:
            return None
    return None


def _plain(v: Any) -> Any:
    """DICOM value -> JSON-friendly Python value (None for bytes and person names)."""
    if v is None or isinstance(v, bytes) or type(v).__name__ == "PersonName":
        return None
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        return [_plain(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    return str(v)


def _fg(ds: Dataset, frame: int | None, seq: str, attr: str) -> Any:
    """Attribute from a functional group: per-frame first, then shared, then top level."""
    if frame is not None:
        groups = []
        pf = ds.get("PerFrameFunctionalGroupsSequence")
        if pf is not None and frame < len(pf):
            groups.append(pf[frame])
        sf = ds.get("SharedFunctionalGroupsSequence")
        if sf is not None and len(sf):
            groups.append(sf[0])
        for item in groups:
            inner = item.get(seq)
            if inner is not None and len(inner) and attr in inner[0]:
                return inner[0][attr].value
    return ds.get(attr)


def _series_label(f: DicomFile) -> str:
    num = f.ds.get("SeriesNumber")
    desc = str(f.ds.get("SeriesDescription", "") or "").strip()
    label = f"series {num}" if num not in (None, "") else "series"
    if desc:
        label += f" ('{desc}')"
    return f"{label} [{f.modality or 'unknown modality'}, UID …{f.series_uid[-12:]}]"


def _ts_name(ds: Dataset) -> str:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        return "unknown transfer syntax"
    try:
        name = UID(ts).name
    except Exception:  # noqa: BLE001
        name = str(ts)
    return f"{name} ({ts})" if name != str(ts) else str(ts)


# --------------------------------------------------------------------------------------------
# Frames and series geometry
# --------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    file: DicomFile
    frame: int | None  # index in a multi-frame file; None for single-frame
    ipp: np.ndarray | None
    iop: np.ndarray | None
    rows: int
    cols: int
    slope: float
    intercept: float
    window: tuple[float, float] | None


def _check_size(name: str, rows: int, cols: int, nframes: int) -> None:
    """Refuse impossible or oversized image dimensions from the header, before any allocation."""
    if rows <= 0 or cols <= 0 or nframes <= 0:
        raise StudyError(f"'{name}' declares an empty image ({rows} rows x {cols} columns x {nframes} frames); "
                         "the file is damaged. Export it again from the PACS.")
    if nframes > MAX_FRAMES_PER_FILE:
        raise StudyError(f"'{name}' declares {nframes} frames, more than the {MAX_FRAMES_PER_FILE} allowed; the "
                         "header is probably damaged. Export it again from the PACS.")
    nbytes = rows * cols * nframes * 4
    if nbytes > MAX_VOLUME_BYTES:
        raise StudyError(f"'{name}' declares {rows} x {cols} pixels x {nframes} frames "
                         f"({nbytes / 1024**3:.1f} GiB once loaded), more than the "
                         f"{MAX_VOLUME_BYTES / 1024**3:.1f} GiB allowed (RADASSIST_MAX_VOLUME_MB). "
                         "Load a smaller series, or raise the limit if the file is genuine.")


def _frames_of(f: DicomFile) -> list[_Frame]:
    ds = f.ds
    rows, cols = int(_float(ds.get("Rows")) or 0), int(_float(ds.get("Columns")) or 0)
    nframes = int(_float(ds.get("NumberOfFrames")) or 1)
    _check_size(f.path.name, rows, cols, nframes)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    multi = nframes > 1 or enhanced
    out: list[_Frame] = []
    for idx in range(nframes):
        fi: int | None = idx if multi else None
        if enhanced:
            ipp = _floats(_fg(ds, fi, "PlanePositionSequence", "ImagePositionPatient"), 3)
            iop = _floats(_fg(ds, fi, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            slope = _float(_fg(ds, fi, "PixelValueTransformationSequence", "RescaleSlope"))
            inter = _float(_fg(ds, fi, "PixelValueTransformationSequence", "RescaleIntercept"))
            wc = _float(_fg(ds, fi, "FrameVOILUTSequence", "WindowCenter"))
            ww = _float(_fg(ds, fi, "FrameVOILUTSequence", "WindowWidth"))
        else:
            # Plain multi-frame: one position for the whole object (the first frame's).
            ipp = _floats(ds.get("ImagePositionPatient"), 3) if idx == 0 or not multi else None
            iop = _floats(ds.get("ImageOrientationPatient"), 6)
            slope = _float(ds.get("RescaleSlope"))
            inter = _float(ds.get("RescaleIntercept"))
            wc = _float(ds.get("WindowCenter"))
            ww = _float(ds.get("WindowWidth"))
        window = (wc, ww) if wc is not None and ww is not None and ww > 0 else None
        out.append(
            _Frame(f, fi, ipp, iop, rows, cols, 1.0 if slope is None or slope == 0 else slope, inter or 0.0, window)
        )
    if multi and not enhanced and nframes > 1:
        # positions of later frames are derived from the stack geometry, not stored per frame
        for fr in out[1:]:
            fr.ipp = None
    return out


def _pixel_spacing(ds: Dataset, frame: int | None) -> tuple[tuple[float, float] | None, str | None]:
    """((row_spacing, col_spacing) or None, note)."""
    ps = _floats(_fg(ds, 0 if frame is not None else None, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if ps is None:
        ps = _floats(ds.get("PixelSpacing"), 2)
    if ps is not None and ps.min() > 0:
        return (float(ps[0]), float(ps[1])), None
    ips = _floats(ds.get("ImagerPixelSpacing"), 2)
    if ips is not None and ips.min() > 0:
        return (float(ips[0]), float(ips[1])), (
            "pixel spacing from ImagerPixelSpacing (at the detector, not corrected for magnification)"
        )
    return None, "pixel spacing missing/zero: measurements in pixels"


def _slice_step_hint(ds: Dataset, frame: int | None) -> float | None:
    for attr in ("SpacingBetweenSlices", "SliceThickness"):
        v = _float(_fg(ds, frame, "PixelMeasuresSequence", attr))
        if v is not None and v > 0:
            return abs(v)
    return None


@dataclass
class _Plan:
    """How to build one Series: frames in sorted order plus geometry."""

    frames: list[_Frame]
    series_uid: str
    spacing: tuple[float, float, float]
    spacing_known: bool
    origin: np.ndarray
    direction: np.ndarray
    notes: list[str]


def _fmt_steps(steps: np.ndarray) -> str:
    c = Counter(round(float(s), 2) for s in steps)
    return ", ".join(f"{k:g} mm ×{v}" for k, v in sorted(c.items()))


def _plan_stack(frames: list[_Frame], series_uid: str, label: str) -> _Plan:
    notes: list[str] = []
    first = frames[0]
    shapes = {(fr.rows, fr.cols) for fr in frames}
    if len(shapes) > 1:
        seen = ", ".join(f"{r}x{c}" for r, c in sorted(shapes))
        raise StudyError(
            f"{label}: its images have different sizes ({seen} rows x columns), so they cannot form one stack. "
            "Re-export the series, or load the files of one size only."
        )
    have_pos = [fr.ipp is not None for fr in frames]
    n = len(frames)
    ps, ps_note = _pixel_spacing(first.file.ds, first.frame)
    if ps_note:
        notes.append(ps_note)

    iops = [fr.iop for fr in frames if fr.iop is not None]
    if iops:
        iop0 = iops[0]
        for o in iops[1:]:
            if float(np.abs(o - iop0).max()) > ORIENTATION_TOL:
                raise StudyError(
                    f"{label}: its slices have different orientations (e.g. "
                    f"{np.round(iop0, 3).tolist()} vs {np.round(o, 3).tolist()}); it may mix a localizer or several "
                    "stacks. Load the axial (or other single-orientation) series on its own."
                )
        row = iop0[:3] / (np.linalg.norm(iop0[:3]) or 1.0)
        col = iop0[3:] / (np.linalg.norm(iop0[3:]) or 1.0)
        normal = np.cross(row, col)
        nn = np.linalg.norm(normal)
        if nn < 1e-6:
            raise StudyError(f"{label}: its image orientation is invalid (row and column directions are parallel).")
        normal /= nn
    else:
        row, col, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])

    if n > 1 and all(have_pos):
        pos = np.array([float(np.dot(fr.ipp, normal)) for fr in frames])  # type: ignore[arg-type]
        order = np.argsort(pos, kind="stable")
        frames = [frames[i] for i in order]
        pos = pos[order]
        steps = np.diff(pos)
        if (steps < DUPLICATE_TOL_MM).any():
            ndup = int((steps < DUPLICATE_TOL_MM).sum())
            raise StudyError(
                f"{label}: {ndup} slice position(s) occur more than once (slice steps seen: {_fmt_steps(steps)}); "
                "the series may hold several acquisitions or duplicated files. Remove the duplicates or "
                "load one acquisition."
            )
        med = float(np.median(steps))
        if (np.abs(steps - med) > SPACING_VARIATION * med).any():
            raise StudyError(
                f"{label}: slice spacing is inconsistent (steps seen: {_fmt_steps(steps)}); a slice may be missing "
                "or the series mixes acquisitions. Re-export the complete series."
            )
        ipps = np.array([fr.ipp for fr in frames], dtype=float)
        v = (ipps[-1] - ipps[0]) / (n - 1)
        dk = float(np.linalg.norm(v))
        kdir = v / dk
        tilt = float(np.degrees(np.arccos(np.clip(abs(np.dot(kdir, normal)), 0.0, 1.0))))
        if tilt > 0.5:
            notes.append(f"slices are sheared by {tilt:.1f}° (gantry tilt); geometry follows the slice positions")
        resid = ipps - (ipps[0] + np.arange(n)[:, None] * v)
        if float(np.abs(resid).max()) > max(1.0, 0.5 * dk):
            notes.append("slice positions are not on a straight line; geometry is approximate")
        origin = ipps[0]
    elif n > 1 and any(have_pos) and not (first.frame is not None and have_pos[0] and not any(have_pos[1:])):
        raise StudyError(
            f"{label}: some slices have no position (ImagePositionPatient), so they cannot be ordered. "
            "Re-export the series from the PACS."
        )
    else:
        # one slice, or a plain multi-frame stack (frames kept in stored order)
        hint = _slice_step_hint(first.file.ds, first.frame)
        if n > 1:
            if hint is None:
                notes.append("slice spacing unknown (no SpacingBetweenSlices/SliceThickness): 1 mm assumed")
            else:
                notes.append("frames treated as a stack in stored order")
        dk = hint or 1.0
        kdir = normal
        origin = first.ipp if first.ipp is not None else np.zeros(3)
        if first.ipp is None and iops == [] and first.file.modality in VOLUME_MODALITIES:
            notes.append("no patient position/orientation in the header: geometry assumed")
    if ps is None:
        spacing = (1.0, 1.0, 1.0)
        known = False
    else:
        spacing = (ps[1], ps[0], dk)
        known = True
    direction = np.column_stack([row, col, kdir]).astype(float)
    return _Plan(frames, series_uid, spacing, known, np.asarray(origin, dtype=float), direction, notes)


def _plan_series(files: list[DicomFile]) -> list[_Plan]:
    """One or more plans for one SeriesInstanceUID (radiograph series with several
    unpositioned images are split into one plan per image)."""
    label = _series_label(files[0])
    uid = files[0].series_uid
    frames = [fr for f in files for fr in _frames_of(f)]
    has_pos = any(fr.ipp is not None for fr in frames)
    modality = files[0].modality
    kinds = {str(v).upper() for f in files for v in (f.ds.get("ImageType") or [])}
    if len(files) > 1 and kinds & {"LOCALIZER", "PROJECTION IMAGE"}:
        # scouts / MIP projections: separate 2-D images, not a stack
        ordered = sorted(files, key=lambda f: (int(_float(f.ds.get("InstanceNumber")) or 0), f.sop_uid))
        plans = []
        for f in ordered:
            p = _plan_stack(_frames_of(f), f.sop_uid or uid, label)
            p.notes.append(f"{label} holds {len(files)} localizer/projection images; each is loaded on its own")
            plans.append(p)
        return plans
    if len(files) > 1 and not has_pos:
        multi_frame = any(fr.frame is not None for fr in frames)
        if modality in VOLUME_MODALITIES and not multi_frame:
            raise StudyError(
                f"{label}: its {len(files)} slices have no position (ImagePositionPatient), so they cannot be "
                "ordered safely. Re-export the series from the PACS with full headers."
            )
        plans = []
        ordered = sorted(files, key=lambda f: (int(_float(f.ds.get("InstanceNumber")) or 0), f.sop_uid))
        for f in ordered:
            p = _plan_stack(_frames_of(f), f.sop_uid or uid, label)
            p.notes.append(f"{label} holds {len(files)} separate images; each is loaded as its own image")
            plans.append(p)
        return plans
    if len(files) > 1 and any(fr.frame is not None for fr in frames) and not all(fr.ipp is not None for fr in frames):
        raise StudyError(
            f"{label}: it holds several multi-frame objects without per-frame positions; they cannot be "
            "combined safely. Load them one at a time."
        )
    return [_plan_stack(frames, uid, label)]


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _decode_error(path: Path, ds: Dataset, exc: BaseException) -> StudyError:
    msg = str(exc)
    name = path.name
    ts = _ts_name(ds)
    if isinstance(exc, AttributeError) and "no pixel data" in msg.lower():
        return StudyError(
            f"'{name}' has no pixel data although its header describes an image. "
            "Copy or export it again from the PACS."
        )
    if isinstance(exc, EOFError) or "less than expected" in msg or "truncat" in msg.lower():
        return StudyError(
            f"'{name}' is truncated or damaged (its pixel data is shorter than the header says). "
            "Copy or export it again from the PACS."
        )
    low = msg.lower()
    if isinstance(exc, NotImplementedError | ImportError | RuntimeError) or "decod" in low or "plugin" in low:
        missing = isinstance(exc, NotImplementedError | ImportError) or "no pixel data handler" in msg.lower()
        why = "no decoder for it is installed" if missing else "the decoder failed (the data may be corrupt)"
        return StudyError(
            f"'{name}' could not be decompressed ({ts}): {why}. Export the study uncompressed "
            "(Explicit VR Little Endian) from the PACS, or install the matching decoder "
            "(pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls)."
        )
    return StudyError(
        f"The pixel data of '{name}' could not be read ({type(exc).__name__}: {msg[:160]}; {ts}). "
        "Copy or export the file again from the PACS."
    )


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (raw datasets): record the encoding they were read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit is None:
        implicit, little = True, True
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )


def _to_gray(arr: np.ndarray, ds: Dataset, nframes_expected: int) -> tuple[np.ndarray, str | None]:
    """Decoded array -> (frames, rows, cols) grayscale; note when colour was converted."""
    spp = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    note = None
    if photometric == "PALETTE COLOR" and spp == 1:
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        spp = 3
    if spp == 3:
        rgb = arr.astype(np.float32)
        arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        note = f"colour image ({photometric}) converted to grayscale"
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] != nframes_expected:
        raise ValueError(f"expected {nframes_expected} frames, decoded {arr.shape[0]}")
    return arr, note


def _read_pixels(plans: list[_Plan]) -> list[tuple[np.ndarray, list[str]]]:
    """Read every file once (threads), write frames into preallocated float32 arrays."""
    outs: list[np.ndarray] = []
    jobs: dict[Path, list[tuple[int, int, _Frame]]] = defaultdict(list)  # path -> (plan, k, frame)
    total = sum(len(p.frames) * p.frames[0].rows * p.frames[0].cols * 4 for p in plans)
    if total > MAX_VOLUME_BYTES:
        raise StudyError(f"The study's images add up to {total / 1024**3:.1f} GiB once loaded, more than the "
                         f"{MAX_VOLUME_BYTES / 1024**3:.1f} GiB allowed (RADASSIST_MAX_VOLUME_MB). Load one series "
                         "at a time, or raise the limit.")
    for pi, plan in enumerate(plans):
        fr0 = plan.frames[0]
        outs.append(np.empty((len(plan.frames), fr0.rows, fr0.cols), dtype=np.float32))
        for k, fr in enumerate(plan.frames):
            jobs[fr.file.path].append((pi, k, fr))
    notes: list[set[str]] = [set() for _ in plans]

    def work(path: Path) -> None:
        items = jobs[path]
        hdr = items[0][2].file.ds
        try:
            ds = pydicom.dcmread(path, force=True)
            _ensure_transfer_syntax(ds)
            nframes = int(_float(ds.get("NumberOfFrames")) or 1)
            raw = ds.pixel_array
            arr, cnote = _to_gray(raw, ds, nframes)
        except StudyError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified into a clinician-facing message
            raise _decode_error(path, hdr, exc) from exc
        lut = "ModalityLUTSequence" in ds
        if lut:
            from pydicom.pixels import apply_modality_lut

            arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        for pi, k, fr in items:
            idx = fr.frame or 0
            dst = outs[pi][k]
            dst[...] = arr[idx]
            if not lut and (fr.slope != 1.0 or fr.intercept != 0.0):
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below
                    dst *= np.float32(fr.slope)
                    dst += np.float32(fr.intercept)
            if cnote:
                notes[pi].add(cnote)

    paths = list(jobs)
    if len(paths) > 1 and _MAX_WORKERS > 1:
        with ThreadPoolExecutor(_MAX_WORKERS) as ex:
            for _ in ex.map(work, paths):
                pass
    else:
        for p in paths:
            work(p)
    for plan, o in zip(plans, outs, strict=True):
        if o.size and not np.isfinite(o).all():
            raise StudyError(
                f"{_series_label(plan.frames[0].file)}: its rescale slope/intercept give pixel values out of range "
                "(overflow); the header is damaged. Export the series again from the PACS."
            )
    return [(o, sorted(n)) for o, n in zip(outs, notes, strict=True)]


def _monochrome1_range(ds: Dataset, slope: float, intercept: float) -> tuple[float, float]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def _build_series(plan: _Plan, pixels: np.ndarray, extra_notes: list[str]) -> Series:
    fr0 = plan.frames[0]
    ds = fr0.file.ds
    notes = list(plan.notes) + list(extra_notes)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    window = fr0.window
    if photometric == "MONOCHROME1":
        lo, hi = _monochrome1_range(ds, fr0.slope, fr0.intercept)
        np.subtract(np.float32(lo + hi), pixels, out=pixels)
        if window is not None:
            window = (lo + hi - window[0], window[1])
        notes.append("MONOCHROME1 (inverted grayscale) converted to MONOCHROME2 for display")
    header: dict[str, Any] = {}
    for key in HEADER_FIELDS:
        val = ds.get(key)
        if val is None and key == "PixelSpacing":
            val = _fg(ds, 0 if fr0.frame is not None else None, "PixelMeasuresSequence", "PixelSpacing")
        if val is None and key == "SliceThickness" and fr0.frame is not None:
            val = _fg(ds, 0, "PixelMeasuresSequence", "SliceThickness")
        pv = _plain(val)
        if pv not in (None, "", []):
            header[key] = pv
    header["NumberOfSlices"] = int(pixels.shape[0])
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts:
        header["TransferSyntaxUID"] = str(ts)
    num = _float(ds.get("SeriesNumber"))
    modality = fr0.file.modality or "OT"
    instance_uids = [fr.file.sop_uid for fr in plan.frames]  # multi-frame: the file's UID per frame
    return Series(
        series_uid=plan.series_uid,
        modality=modality,
        pixels=pixels,
        spacing=tuple(float(x) for x in plan.spacing),  # type: ignore[arg-type]
        origin=plan.origin,
        direction=plan.direction,
        description=str(ds.get("SeriesDescription", "") or ""),
        spacing_known=plan.spacing_known,
        photometric=photometric,
        window=(float(window[0]), float(window[1])) if window else None,
        instance_uids=instance_uids,
        number=int(num) if num is not None else None,
        header=header,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------


def _hash_uid(digest: bytes, salt: str) -> str:
    h = hashlib.sha256(salt.encode() + digest).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def image_uids(path: str | Path) -> tuple[str, str, str]:
    """(study, series, instance) UIDs derived deterministically from an image file's content."""
    digest = hashlib.sha256(Path(path).read_bytes()).digest()
    return _hash_uid(digest, "study"), _hash_uid(digest, "series"), _hash_uid(digest, "instance")


def _load_image(path: Path, source: str) -> Study:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            colour = mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F", "1", "LA")
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float32)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise StudyError(
            f"'{path.name}' could not be read as an image ({exc}). Give a PNG/JPEG radiograph or DICOM files."
        ) from exc
    st_uid, se_uid, sop_uid = image_uids(path)
    notes = ["image file (no DICOM header): pixel spacing unknown, measurements in pixels; no date or patient"]
    if colour:
        notes.append(f"colour image ({mode}) converted to grayscale")
    modality = "OT" if colour else "DX"
    series = Series(
        series_uid=se_uid,
        modality=modality,
        pixels=arr[None].copy(),
        spacing=(1.0, 1.0, 1.0),
        origin=np.zeros(3),
        direction=np.eye(3),
        description=path.stem,
        spacing_known=False,
        instance_uids=[sop_uid],
        number=1,
        header={"Rows": int(arr.shape[0]), "Columns": int(arr.shape[1]), "NumberOfSlices": 1,
                "SourceFormat": path.suffix.lower().lstrip(".") or "image"},
        notes=notes,
    )
    return Study(
        study_uid=st_uid,
        patient_id="UNKNOWN",
        study_date=None,
        modality=modality,
        series=[series],
        description=path.stem,
        source=source,
        notes=list(notes),
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _patient_key(ds: Dataset) -> str:
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return "id:" + pid
    name = str(ds.get("PatientName", "") or "").strip()
    return "name:" + name if name else ""


def _source_str(source: Source) -> str:
    if isinstance(source, str | Path):
        return str(source)
    items = list(source)
    if len(items) == 1:
        return str(items[0])
    return f"{len(items)} files" if items else ""


def _check_scan(scan: Scan, allow_mixed_patients: bool) -> dict[str, list[DicomFile]]:
    if not scan.dicom and not scan.images:
        looked = scan.skipped + scan.dicomdirs
        if not looked:
            raise StudyError("No files were found. Choose the folder that holds the DICOM files.")
        if len(looked) == 1 and not scan.dicomdirs:
            raise StudyError(
                f"'{looked[0].name}' is not a DICOM file (no DICOM marker and it could not be parsed). "
                "Export the study from the PACS as DICOM, or give a PNG/JPEG radiograph."
            )
        examples = ", ".join(sorted({p.name for p in looked})[:3])
        what = (
            "only a DICOMDIR index"
            if scan.dicomdirs and not scan.skipped
            else f"{len(looked)} files (e.g. {examples})"
        )
        raise StudyError(
            f"No DICOM images were found: {what}, none of them DICOM images. "
            "Choose the folder with the image files (often DICOM/ or IMAGES/ next to DICOMDIR)."
        )
    if not allow_mixed_patients:
        patients = {k for k in (_patient_key(f.ds) for f in scan.dicom) if k}
        if len(patients) > 1:
            raise StudyError(
                f"These are files from {len(patients)} different patients; load one patient's studies at a time."
            )
    if scan.skipped:
        log.debug("skipped %d non-DICOM file(s)", len(scan.skipped))
    by_study: dict[str, list[DicomFile]] = defaultdict(list)
    for f in scan.dicom:
        if not f.study_uid:
            raise StudyError(f"'{f.path.name}' has no StudyInstanceUID; re-export it from the PACS.")
        by_study[f.study_uid].append(f)
    return by_study


def iter_studies(scan: Scan, source: str = "", allow_mixed_patients: bool = False) -> Iterator[Study]:
    """Studies of a scan, one at a time (pixels of earlier ones can be released meanwhile).
    All header-level checks (empty, not DICOM, mixed patients) run before the first study."""
    by_study = _check_scan(scan, allow_mixed_patients)
    for st_uid, files in by_study.items():
        yield _build_study(st_uid, files, source)
    for img in scan.images:
        yield _load_image(img, source)


def build_studies(scan: Scan, source: str = "", allow_mixed_patients: bool = False) -> list[Study]:
    """Group scanned headers into studies and load their pixels (oldest study first)."""
    studies = list(iter_studies(scan, source, allow_mixed_patients))
    studies.sort(key=lambda s: (s.study_date or dt.date.min, s.study_uid))
    return studies


def _build_study(st_uid: str, files: list[DicomFile], source: str) -> Study:
    by_series: dict[str, list[DicomFile]] = defaultdict(list)
    seen_sop: set[str] = set()
    notes: list[str] = []
    ndup = 0
    for f in files:
        if f.sop_uid and f.sop_uid in seen_sop:
            ndup += 1
            continue
        seen_sop.add(f.sop_uid)
        by_series[f.series_uid or "unknown"].append(f)
    if ndup:
        notes.append(f"{ndup} duplicate file(s) (same SOP Instance UID) ignored")

    plans: list[_Plan] = []
    skipped_kinds: list[str] = []
    failures: list[tuple[list[DicomFile], StudyError]] = []
    for se_uid, sfiles in by_series.items():
        mod = sfiles[0].modality
        no_pixels = not all("Rows" in f.ds and "Columns" in f.ds for f in sfiles)
        if mod in NON_IMAGE_MODALITIES or no_pixels:
            kind = NON_IMAGE_MODALITIES.get(mod) or (f"{mod} object without pixels" if mod else "object without pixels")
            sop_name = str(getattr(sfiles[0].ds.get("SOPClassUID"), "name", ""))
            if "Waveform" in sop_name and mod not in NON_IMAGE_MODALITIES:
                kind = "waveform"
            skipped_kinds.append(kind)
            notes.append(f"{_series_label(sfiles[0])} skipped: {kind} (no image)")
            continue
        try:
            plans.extend(_plan_series(sfiles))
        except StudyError as exc:
            failures.append((sfiles, exc))

    # A broken series does not sink the whole study when it is a localizer/pilot (or tiny), or when
    # another volume of the same modality loaded; otherwise the error stands.
    ok_volumes = {p.frames[0].file.modality for p in plans if len(p.frames) > 1}
    for sfiles, exc in failures:
        n_images = sum(int(_float(f.ds.get("NumberOfFrames")) or 1) for f in sfiles)
        localizer = n_images <= 3 or any(
            "LOCALIZER" in [str(v).upper() for v in (f.ds.get("ImageType") or [])] for f in sfiles
        )
        if plans and (localizer or sfiles[0].modality in ok_volumes):
            notes.append(f"skipped: {exc}")
            log.warning("series skipped: %s", exc)
        else:
            raise exc

    if not plans:
        found = ", ".join(sorted(set(skipped_kinds))) or "nothing readable"
        raise StudyError(
            f"The study contains no images (found: {found}). Load the image series (CT, MR or radiograph) "
            "of this study."
        )
    pix = _read_pixels(plans)
    series = [_build_series(p, arr, n) for p, (arr, n) in zip(plans, pix, strict=True)]
    series.sort(key=lambda s: (s.number if s.number is not None else 1 << 30, s.series_uid))

    ref = files[0].ds
    study = Study(
        study_uid=st_uid,
        patient_id=str(ref.get("PatientID", "") or ""),
        study_date=_parse_date(ref.get("StudyDate")) or _parse_date(ref.get("SeriesDate")),
        modality="",
        series=series,
        description=str(ref.get("StudyDescription", "") or ""),
        accession=str(ref.get("AccessionNumber", "") or ""),
        patient_name=str(ref.get("PatientName", "") or ""),
        patient_sex=str(ref.get("PatientSex", "") or ""),
        patient_age=str(ref.get("PatientAge", "") or ""),
        body_part="",
        source=source,
        notes=notes,
    )
    from tools import deid

    study.identifiers = deid.identifiers_from_study(study).merge(deid.identifiers_from_datasets(f.ds for f in files))
    deid.register(study.identifiers)
    prim = study.primary
    study.modality = prim.modality
    study.body_part = str(prim.header.get("BodyPartExamined", "") or ref.get("BodyPartExamined", "") or "")
    log.info(
        "loaded study …%s: %d series, primary %s %s",
        st_uid[-8:], len(series), prim.modality, "x".join(str(s) for s in prim.shape),
    )
    return study


def load_studies(source: Source) -> list[Study]:
    """Every study found in ``source`` (folder, zip, file, list of files), oldest first."""
    src = _source_str(source)
    with expanded(source) as paths:
        scan = scan_files(paths)
        return build_studies(scan, src)


def load_study(source: Source) -> Study:
    """Exactly one study from ``source``; StudyError when none or several are found."""
    studies = load_studies(source)
    if len(studies) != 1:
        desc = "; ".join(
            f"{s.date_str} {s.modality} {s.description!r} ({len(s.series)} series)".replace(" ''", "")
            for s in studies[:6]
        )
        raise StudyError(
            f"Found {len(studies)} studies where one was expected: {desc}. Load one study at a time "
            "(or choose which study to use)."
        )
    return studies[0]
