"""Fuzzing the study loader and the CLI import with hypothesis (tests run a small budget, the bench a larger one).

Inputs are real DICOM files (pydicom's test files: CT, MR, RLE and JPEG 2000, multi-frame, SR, RT plan /
structure / dose, waveform, SEG; a phantom CT slice when given) mutated three ways:

- **bytes**: flips, truncation, inserted garbage;
- **header**: one or more attributes set to hostile values (huge or zero Rows/Columns/NumberOfFrames,
  NaN spacing, parallel orientation, odd bit depths and photometric interpretations, a wrong transfer
  syntax, truncated pixel data, empty UIDs) and the file written again;
- **zip**: the mutated file wrapped in an archive under a hostile member name (``../``, absolute,
  backslashes, hidden folders), or the archive's own bytes mutated.

Each input goes to :func:`tools.dicom_io.load_study` or through ``radassist import`` (in process). Only a
:class:`tools.errors.RadAssistError` with a short message is an acceptable failure; anything else, a
message that reads like a traceback, or an input running past the per-input bound is a crash.
"""
from __future__ import annotations

import io
import logging
import os
import signal
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEED_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "emri_small.dcm",
              "SC_rgb_small_odd.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm", "no_meta.dcm", "test-SR.dcm",
              "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm", "liver.dcm", "693_J2KI.dcm")
PER_INPUT_S = 20.0  # no single input may take longer (a hang)

# (keyword, VR, hostile values as raw strings / numbers)
HOSTILE: tuple[tuple[str, list[Any]], ...] = (
    ("Rows", [0, 1, 65535, 40000]),
    ("Columns", [0, 1, 65535, 40000]),
    ("NumberOfFrames", ["0", "-3", "1000000000", "abc", "2", "99999", ""]),
    ("BitsAllocated", [0, 1, 7, 12, 64, 65535]),
    ("BitsStored", [0, 1, 33, 65535]),
    ("HighBit", [0, 99]),
    ("SamplesPerPixel", [0, 2, 3, 7]),
    ("PixelRepresentation", [1, 2, 7]),
    ("PlanarConfiguration", [1, 5]),
    ("PhotometricInterpretation", ["YBR_FULL", "PALETTE COLOR", "RGB", "MONOCHROME1", "NONSENSE", ""]),
    ("PixelSpacing", [["0", "0"], ["nan", "nan"], ["-1", "1"], ["1e308", "1"], ["1"], ["x", "y"]]),
    ("ImageOrientationPatient", [["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["nan"] * 6, ["1", "0", "0"]]),
    ("ImagePositionPatient", [["nan", "0", "0"], ["1e308", "-1e308", "0"], ["0"]]),
    ("RescaleSlope", ["0", "nan", "1e308", "-inf", "x"]),
    ("RescaleIntercept", ["nan", "1e308", "x"]),
    ("WindowCenter", ["nan", "x", ["1", "2", "3"]]),
    ("WindowWidth", ["0", "-5", "nan"]),
    ("SliceThickness", ["0", "-1", "nan"]),
    ("StudyInstanceUID", ["", "1." * 40, "../../etc"]),
    ("SeriesInstanceUID", ["", "1.2.3"]),
    ("SOPInstanceUID", ["", "../x"]),
    ("Modality", ["", "SR", "RTDOSE", "ECG", "SEG", "XX"]),
    ("StudyDate", ["", "99999999", "20231345", "abc"]),
    ("PatientID", ["", "../../" + "A" * 100]),
    ("SOPClassUID", ["1.2.840.10008.1.3.10", "1.2.840.10008.5.1.4.1.1.9.1.1", ""]),
    ("TransferSyntaxUID", ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
                           "1.2.840.10008.1.2.1.99", "1.2.3.4", "1.2.840.10008.1.2.2"]),
    ("PixelData", [b"", b"\x00", "truncate", "double"]),
)
ZIP_NAMES = ("a.dcm", "dir/sub/a.dcm", "../evil.dcm", "/abs/evil.dcm", "..\\evil.dcm", "C:/evil.dcm",
             ".hidden/a.dcm", "__MACOSX/a.dcm", "a" * 200 + ".dcm", "dir/../../evil.dcm", "./a.dcm")


class Hang(BaseException):
    """An input ran past the per-input bound (a BaseException so no broad ``except`` swallows it)."""


@dataclass
class FuzzReport:
    inputs: int = 0
    accepted: int = 0  # loaded as a study
    rejected: int = 0  # refused with a clinician-facing message
    via_cli: int = 0
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    max_input_s: float = 0.0
    seconds: float = 0.0
    messages: dict[str, int] = field(default_factory=dict)  # first words of rejections -> count

    def summary(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "accepted": self.accepted, "rejected": self.rejected, "via_cli": self.via_cli,
                "crashes": len(self.crashes), "hangs": len(self.hangs), "max_input_s": round(self.max_input_s, 2),
                "seconds": round(self.seconds, 1)}


def seed_corpus(extra: list[Path] | None = None) -> dict[str, bytes]:
    from pydicom.data import get_testdata_file

    out: dict[str, bytes] = {}
    for name in SEED_FILES:
        p = get_testdata_file(name)
        if p:
            out[name] = Path(str(p)).read_bytes()
    for p in extra or []:
        out[Path(p).name] = Path(p).read_bytes()
    return out


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds`` (no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"input ran past {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _header_mutation(data: bytes, edits: list[tuple[str, Any]]) -> bytes | None:
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # noqa: BLE001 - a seed pydicom cannot parse is mutated as bytes instead
        return None
    for kw, val in edits:
        try:
            if kw == "TransferSyntaxUID":
                if not hasattr(ds, "file_meta"):
                    continue
                ds.file_meta.TransferSyntaxUID = val
                continue
            if kw == "PixelData":
                if "PixelData" not in ds:
                    continue
                raw = ds["PixelData"].value
                raw = raw if isinstance(raw, bytes) else bytes(raw or b"")
                ds.PixelData = raw[: len(raw) // 3] if val == "truncate" else raw * 2 if val == "double" else val
                continue
            tag = tag_for_keyword(kw)
            if tag is None:
                continue
            ds[tag] = DataElement(tag, dictionary_VR(tag), val)
        except Exception:  # noqa: BLE001 - a value pydicom refuses to hold: leave that attribute
            continue
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - unwritable combination
        return None
    return buf.getvalue()


def _byte_mutation(data: bytes, flips: list[tuple[float, int]], cut: float | None,
                   insert: tuple[float, bytes] | None) -> bytes:
    b = bytearray(data)
    for frac, val in flips:
        if b:
            b[min(len(b) - 1, int(frac * len(b)))] = val
    if insert is not None and b:
        pos = int(insert[0] * len(b))
        b[pos:pos] = insert[1]
    if cut is not None:
        b = b[: max(0, int(cut * len(b)))]
    return bytes(b)


def _zip_bytes(name: str, payload: bytes, flips: list[tuple[float, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, payload)
        zf.writestr("readme.txt", "not an image")
    return _byte_mutation(buf.getvalue(), flips, None, None)


def _is_clear(msg: str) -> bool:
    return bool(msg.strip()) and "Traceback" not in msg and len(msg) < 1200


def _check_one(path: Path, via_cli: bool, home: Path, rep: FuzzReport, label: str) -> None:
    from tools.dicom_io import load_study
    from tools.errors import RadAssistError

    t0 = time.monotonic()
    try:
        with time_bound(PER_INPUT_S):
            if via_cli:
                from ui.cli import main

                rep.via_cli += 1
                os.environ["RADASSIST_HOME"] = str(home)
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    rc = main(["import", str(path)])
                if rc not in (0, 2):
                    rep.crashes.append(f"{label}: radassist import exited {rc}")
                rep.accepted += rc == 0
                rep.rejected += rc == 2
            else:
                load_study(path)
                rep.accepted += 1
    except Hang as exc:
        rep.hangs.append(f"{label}: {exc}")
    except RadAssistError as exc:
        msg = str(exc)
        if not _is_clear(msg):
            rep.crashes.append(f"{label}: unclear message {msg[:200]!r}")
        rep.rejected += 1
        key = " ".join(msg.split()[:4])
        rep.messages[key] = rep.messages.get(key, 0) + 1
    except SystemExit as exc:
        if exc.code not in (0, 2):
            rep.crashes.append(f"{label}: exit {exc.code}")
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)
                      if "/tools/" in f.filename or "/ui/" in f.filename or "/agents/" in f.filename), "?")
        rep.crashes.append(f"{label}: {type(exc).__name__} at {where}: {str(exc)[:160]}")
    finally:
        dt = time.monotonic() - t0
        rep.max_input_s = max(rep.max_input_s, dt)
        rep.inputs += 1


def run_fuzz(max_examples: int = 100, extra_seeds: list[Path] | None = None, seed: int | None = 0,
             cli_every: int = 5) -> FuzzReport:
    """Fuzz ``max_examples`` inputs; ``seed=None`` draws fresh random inputs, an int repeats the same ones."""
    import pydicom
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    corpus = seed_corpus(extra_seeds)
    names = sorted(corpus)
    rep = FuzzReport()
    work = Path(tempfile.mkdtemp(prefix="radassist-fuzz-"))
    home = work / "home"
    old_home = os.environ.get("RADASSIST_HOME")
    old_mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    counter = [0]

    flips = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8)
    edit = st.sampled_from(HOSTILE).flatmap(lambda kv: st.tuples(st.just(kv[0]), st.sampled_from(kv[1])))
    case = st.fixed_dictionaries({
        "seed": st.sampled_from(names),
        "kind": st.sampled_from(["bytes", "header", "header", "zip"]),
        "edits": st.lists(edit, min_size=1, max_size=4),
        "flips": flips,
        "cut": st.none() | st.floats(0, 1),
        "insert": st.none() | st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64)),
        "zipname": st.sampled_from(ZIP_NAMES),
        "zipflips": st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3),
    })

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck), phases=[p for p in __import__("hypothesis").Phase
                                                               if p.name in ("explicit", "generate")])
    @given(case)
    def one(c: dict[str, Any]) -> None:
        counter[0] += 1
        data = corpus[c["seed"]]
        label = f"#{counter[0]} {c['kind']} of {c['seed']}"
        if c["kind"] == "header":
            data = _header_mutation(data, c["edits"]) or _byte_mutation(data, c["flips"], None, None)
            label += f" edits={[(k, v if not isinstance(v, bytes) else '<bytes>') for k, v in c['edits']]}"
        else:
            data = _byte_mutation(data, c["flips"], c["cut"], c["insert"])
            label += f" flips={len(c['flips'])} cut={c['cut']}"
        name = f"in{counter[0]:05d}.dcm"
        if c["kind"] == "zip":
            data = _zip_bytes(c["zipname"], data, c["zipflips"])
            name = f"in{counter[0]:05d}.zip"
            label += f" zip member {c['zipname'][:40]!r}"
        path = work / name
        path.write_bytes(data)
        try:
            _check_one(path, cli_every > 0 and counter[0] % cli_every == 0, home, rep, label)
        finally:
            path.unlink(missing_ok=True)

    t0 = time.monotonic()
    try:
        one()
    finally:
        rep.seconds = time.monotonic() - t0
        pydicom.config.settings.writing_validation_mode = old_mode
        if old_home is None:
            os.environ.pop("RADASSIST_HOME", None)
        else:
            os.environ["RADASSIST_HOME"] = old_home
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    log.info("fuzzed %d inputs: %d crashes, %d hangs", rep.inputs, len(rep.crashes), len(rep.hangs))
    return rep
