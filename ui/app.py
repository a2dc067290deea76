"""The clinician web UI (Gradio 6): studies (local store, upload, PACS), chat with streamed tool steps,
evidence you can click.

Layout: left, the study source (the local store, or a PACS over DICOMweb when one is configured), the
study picker (newest first, patient shown by pseudonym only), the prior picker, an upload box (DICOM files
or a zip, size-limited) and the signed-in user's own conversations; middle, the chat, where each tool
agent's run appears as a collapsible message while it runs, then the answer; right, the evidence of the
last answer: the key images (gallery), the reliability badge (details expandable), and tabs for the
boxes on the slice (``gr.AnnotatedImage``), the before/after comparison with a wipe/blend slider, the
report whose sentences select their findings' boxes, and the findings table.

The UI never calls a tool: every question goes through :class:`agents.engine.Consultant` (studies are
opened through it to draw boxes). Each browser session has its own conversation thread id
(``gr.State``); with sign-in (``--auth``) every thread belongs to the user who started it (a small SQLite
index in the engine home) and is never listed for, reopened by or continued by another user.
Clinician-facing errors (:class:`tools.errors.RadAssistError`) are shown as an assistant message; the
session goes on.

PACS: with ``RADASSIST_PACS_URL`` (a DICOMweb root, e.g. ``http://pacs:8042/dicom-web``; optional
``RADASSIST_PACS_USER``/``RADASSIST_PACS_PASSWORD``) or ``launch_demo(pacs_url=...)`` the source picker
offers "PACS": the picker then lists the archive's studies, and opening one fetches it and the same
patient's most recent earlier study of the same modality into the local store and selects both.

API endpoints (for scripts and tests, through ``gradio_client``):
- ``/ask``: ``ask_api(question, study_uid, thread_id) -> dict`` (the answer contract as JSON);
- ``/chat``: the streaming chat handler (history grows with the tool steps, then the answer);
- ``/upload``: import uploaded files into the store and select the study;
- ``/studies``: the store's studies as a list of dicts;
- ``/pacs_studies`` and ``/open_pacs``: the archive's studies; fetch one (and its prior) into the store;
- ``/conversations``: the caller's own conversations.

Scripts should connect with ``gradio_client.Client(url, download_files=False)``: otherwise the client
takes every dict with a ``"path"`` key (the answer's evidence entries) for a file, downloads it and puts
a local path string in its place.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import html
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from tools.errors import ConfigError, RadAssistError
from tools.schemas import Answer, Finding

if TYPE_CHECKING:
    from agents.engine import Consultant
    from ui.pacs import PacsClient

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger(__name__)

TITLE = "radassist — evidence-grounded assistant for chest imaging"
DISCLAIMER = "Decision support, not diagnosis: confirm every finding on the images before acting."
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUTO_PRIOR = "auto"
SOURCE_LOCAL = "Local store"
SOURCE_PACS = "PACS"
LOCAL_USER = "local"
FINDING_COLUMNS = ["id", "kind", "region", "size", "change", "reliability"]
DEFAULT_CONCURRENCY = 2
MAX_UPLOAD_MB = int(os.environ.get("RADASSIST_MAX_UPLOAD_MB", "512"))
GENERIC_ERROR = ("Something went wrong inside the assistant while answering (the details are in the server "
                 "log). Please try again or rephrase; the conversation goes on.")
LEVEL_COLOURS = {"high": "#1b7f3b", "medium": "#b7791f", "low": "#c53030"}
LUNG_WINDOW = (-600.0, 1500.0)
BOX_COLOURS = ["#ff4040", "#ffc800", "#00dcff", "#50ff50", "#ff78ff", "#ff963c"]
WIPE_MODES = ["wipe", "blend"]
CSS = """
.ra-badge details summary {cursor: pointer; text-decoration: underline dotted;}
.ra-badge ul {margin: 4px 0 0 16px; font-size: 0.9em;}
#ra-sentences {max-height: 330px; overflow-y: auto;}
#ra-sentences label {white-space: normal; text-align: left;}
"""

Message = dict[str, Any]
Choices = list[tuple[str, str]]


# ------------------------------------------------------------------------------------------------
# Studies: labels, choices, upload
# ------------------------------------------------------------------------------------------------
def pseudonym(patient_id: str) -> str:
    """A stable, non-identifying label for a patient (the real id is never shown in the UI)."""
    if not patient_id:
        return "P-unknown"
    return "P-" + hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:6].upper()


def study_label(rec: Any) -> str:
    date = getattr(rec, "study_date", None) or "unknown date"
    modality = getattr(rec, "modality", "") or "?"
    desc = getattr(rec, "description", "") or "no description"
    return f"{date} · {modality} · {desc} · {pseudonym(getattr(rec, 'patient_id', ''))}"


def study_choices(consultant: Consultant) -> Choices:
    """(label, study_uid) for every stored study, newest first."""
    recs = consultant.store.list_studies()
    recs = sorted(recs, key=lambda r: (r.study_date or "", r.study_uid), reverse=True)
    return [(study_label(r), r.study_uid) for r in recs]


def prior_choices(consultant: Consultant, study_uid: str | None) -> Choices:
    """The prior picker: "auto" (labelled with what the store would pick) then the patient's earlier studies."""
    if not study_uid:
        return [("auto: pick a study first", AUTO_PRIOR)]
    rec = consultant.store.get(study_uid)
    if rec is None:
        return [("auto: study not in the store", AUTO_PRIOR)]
    found = consultant.store.find_prior(study_uid)
    auto = f"auto: {study_label(found)}" if found else "auto: none found in the store"
    out: Choices = [(auto, AUTO_PRIOR)]
    for r in consultant.store.list_studies(rec.patient_id):
        if r.study_uid == rec.study_uid:
            continue
        if rec.study_date and r.study_date and r.study_date >= rec.study_date:
            continue
        out.append((study_label(r), r.study_uid))
    return out


def pacs_label(st: Any, in_store: bool = False) -> str:
    n = f" · {st.n_instances} images" if getattr(st, "n_instances", None) else ""
    return f"PACS · {study_label(st)}{n}" + (" · in local store" if in_store else "")


def _unique_dest(folder: Path, name: str) -> Path:
    base = Path(name).name or "upload"
    dest = folder / base
    n = 1
    while dest.exists():
        dest = folder / f"{n}_{base}"
        n += 1
    return dest


def _upload_cache_root() -> Path:
    try:
        from gradio.utils import get_upload_folder

        return Path(get_upload_folder()).resolve()
    except Exception:  # noqa: BLE001 - older/newer gradio: fall back to its documented default
        import tempfile

        return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def discard_uploads(files: list[str]) -> int:
    """Delete uploaded files from Gradio's upload cache (and their per-upload folders when empty).

    Only files inside the cache are touched: a path given by a script elsewhere is left alone."""
    root = _upload_cache_root()
    n = 0
    for f in files:
        try:
            p = Path(f).resolve()
        except (OSError, RuntimeError):
            continue
        if root not in p.parents or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
            parent = p.parent
            while parent != root and root in parent.parents and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    return n


def import_uploads(consultant: Consultant, files: list[str], max_mb: int = MAX_UPLOAD_MB) -> list[Any]:
    """Import uploaded files (DICOM files and/or zips) into the store; returns the study records.

    Zips are imported one by one; the other files are gathered in one folder and imported together.
    Uploads over ``max_mb`` in total are refused with a clear message. The staging folder is removed
    afterwards (the store keeps its own copies)."""
    paths = [Path(f) for f in files if f]
    if not paths:
        raise RadAssistError("No file was uploaded. Choose DICOM files or a zip of a study.")
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > max_mb * 1024 * 1024:
        raise RadAssistError(f"The upload is {total / 1024 / 1024:.0f} MB; the limit is {max_mb} MB. Upload one "
                             "study at a time, or import large studies on the server with `radassist import`.")
    staging = consultant.home / "uploads" / uuid.uuid4().hex
    staging.mkdir(parents=True, exist_ok=True)
    records: list[Any] = []
    try:
        loose = staging / "files"
        zips: list[Path] = []
        for p in paths:
            if p.suffix.lower() == ".zip" and zipfile.is_zipfile(p):
                dest = _unique_dest(staging, p.name)
                shutil.copyfile(p, dest)
                zips.append(dest)
            else:
                loose.mkdir(exist_ok=True)
                shutil.copyfile(p, _unique_dest(loose, p.name))
        for z in zips:
            records.extend(consultant.store.import_path(z))
        if loose.exists():
            records.extend(consultant.store.import_path(loose))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not records:
        raise RadAssistError("The upload held no study that could be imported.")
    return records


# ------------------------------------------------------------------------------------------------
# Conversations: which user owns which thread
# ------------------------------------------------------------------------------------------------
class ConversationIndex:
    """(user, thread_id, study_uid, created, title) in a small SQLite file in the engine home.

    The only way the UI lists or reopens a conversation: a user sees their own threads and nobody else's."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS conversations (thread_id TEXT PRIMARY KEY, user TEXT NOT NULL, "
                        "study_uid TEXT, created TEXT NOT NULL, title TEXT NOT NULL)")
            con.execute("CREATE INDEX IF NOT EXISTS conversations_user ON conversations (user, created)")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30)
        try:
            with con:
                yield con
        finally:
            con.close()

    def owner(self, thread_id: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT user FROM conversations WHERE thread_id=?", (thread_id,)).fetchone()
        return str(row[0]) if row else None

    def add(self, user: str, thread_id: str, study_uid: str | None, title: str) -> bool:
        """Record a new thread for ``user``; False when the thread already exists (any owner)."""
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        title = " ".join((title or "conversation").split())[:80]
        with self._lock, self._connect() as con:
            cur = con.execute("INSERT OR IGNORE INTO conversations VALUES (?, ?, ?, ?, ?)",
                              (thread_id, user, study_uid, created, title))
            return cur.rowcount == 1

    def set_study(self, user: str, thread_id: str, study_uid: str | None) -> None:
        with self._lock, self._connect() as con:
            con.execute("UPDATE conversations SET study_uid=? WHERE thread_id=? AND user=?",
                        (study_uid, thread_id, user))

    def list(self, user: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute("SELECT thread_id, study_uid, created, title FROM conversations WHERE user=? "
                               "ORDER BY created DESC, rowid DESC LIMIT ?", (user, limit)).fetchall()
        return [{"thread_id": r[0], "study_uid": r[1], "created": r[2], "title": r[3]} for r in rows]


def user_of(request: gr.Request | None) -> str:
    """The signed-in user (``local`` without sign-in)."""
    name = getattr(request, "username", None) if request is not None else None
    return str(name) if name else LOCAL_USER


# ------------------------------------------------------------------------------------------------
# Answer -> evidence panel
# ------------------------------------------------------------------------------------------------
def _fmt_size(f: Any) -> str:
    if f.diameter_mm is None:
        return ""
    return f"{f.diameter_mm:.1f} {f.units}"


def _fmt_change(f: Any) -> str:
    ch = f.change
    if ch is None:
        return ""
    parts = [ch.status]
    if ch.prior_diameter_mm is not None:
        parts.append(f"prior {ch.prior_diameter_mm:.1f} mm")
    if ch.interval_days is not None:
        parts.append(f"{ch.interval_days} d")
    if ch.doubling_time_days is not None:
        parts.append(f"VDT {ch.doubling_time_days:.0f} d")
    return ", ".join(parts)


def findings_rows(answer: Answer | None) -> list[list[Any]]:
    if answer is None:
        return []
    rows = []
    for f in answer.findings:
        region = f.region or f.label or ""
        rel = "" if f.reliability is None else f"{f.reliability:.2f}"
        rows.append([f.id, f.kind, region, _fmt_size(f), _fmt_change(f), rel])
    return rows


def _fmt_detail(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt_detail(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(_fmt_detail(x) for x in v[:20])
    return str(v)


def reliability_html(answer: Answer | None) -> str:
    """The badge; "How this was measured" expands to the method's details and per-finding reliability."""
    if answer is None:
        return "<div class='ra-badge'><em>No answer yet.</em></div>"
    r = answer.reliability
    colour = LEVEL_COLOURS.get(r.level, "#555")
    items = [f"<li><b>{html.escape(str(k))}</b>: {html.escape(_fmt_detail(v))}</li>"
             for k, v in r.details.items() if v not in (None, {}, [], "")]
    per = [f"{html.escape(f.id)} {f.reliability:.2f}" for f in answer.findings
           if f.reliability is not None and f.kind != "anatomy"]
    if per:
        items.append(f"<li><b>per finding</b>: {', '.join(per[:30])}</li>")
    items.extend(f"<li>{html.escape(n)}</li>" for n in answer.notes[:5])
    details = (f"<details><summary>How this was measured</summary><ul>"
               f"<li><b>method</b>: {html.escape(r.method)}</li>{''.join(items)}</ul></details>")
    return (f"<div class='ra-badge'><span style='background:{colour};color:white;padding:2px 8px;"
            f"border-radius:8px;font-weight:600'>Reliability: {html.escape(r.level)} ({r.score:.2f})</span> "
            f"<span style='opacity:0.8'>{html.escape(r.method)}</span>{details}</div>")


def report_markdown(answer: Answer | None) -> str:
    if answer is None or answer.report is None:
        return ""
    rep = answer.report
    parts = ["## Report"]
    for name, text in rep.sections.items():
        if text:
            parts.append(f"**{name.replace('_', ' ').capitalize()}**\n\n{text}")
    if rep.lung_rads:
        parts.append(f"**Lung-RADS:** {rep.lung_rads}")
    return "\n\n".join(parts)


def gallery_items(answer: Answer | None, only_ids: list[str] | None = None) -> list[tuple[str, str]]:
    """(path, caption) of the answer's images; with ``only_ids``, those showing one of these findings."""
    if answer is None:
        return []
    out = []
    wanted = set(only_ids or [])
    for e in answer.evidence:
        if e.kind in ("image", "plot") and Path(e.path).is_file():
            if wanted and not wanted.intersection(e.finding_ids):
                continue
            ids = f" [{', '.join(e.finding_ids)}]" if e.finding_ids else ""
            out.append((e.path, e.caption + ids))
    return out


def download_files(answer: Answer | None) -> list[str]:
    if answer is None:
        return []
    paths = [e.path for e in answer.evidence if e.kind == "file"]
    if answer.report is not None:
        paths.extend(answer.report.files.values())
    return [p for p in dict.fromkeys(paths) if Path(p).is_file()]


def panel(answer: Answer | None) -> tuple[Any, ...]:
    """The evidence panel's values, in the order of ``App.panel_outputs``."""
    return (gallery_items(answer), reliability_html(answer), findings_rows(answer), report_markdown(answer),
            download_files(answer) or None)


def sentence_choices(answer: Answer | None) -> Choices:
    """The report's sentences that name findings, as (text, index) radio choices."""
    if answer is None or answer.report is None:
        return []
    return [(s.text, str(i)) for i, s in enumerate(answer.report.sentences) if s.finding_ids]


# -- before/after -------------------------------------------------------------------------------------
def before_after_choices(answer: Answer | None) -> Choices:
    if answer is None:
        return []
    return [(e.caption, str(i)) for i, e in enumerate(answer.evidence)
            if e.role == "before-after" and Path(e.path).is_file()]


def split_pair(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A before/after PNG (current on the left, registered prior on the right, a gap between) -> halves."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    h, w2 = arr.shape[:2]
    w = (w2 - 4) // 2 if w2 > 4 else w2 // 2
    left, right = arr[:, :w], arr[:, w2 - w:]
    if w < 384:  # small phantoms: upscale so that the wipe line and the boxes stay legible
        s = int(np.ceil(384 / max(w, 1)))
        left, right = (a.repeat(s, axis=0).repeat(s, axis=1) for a in (left, right))
    return np.ascontiguousarray(left), np.ascontiguousarray(right)


def compose_pair(current: np.ndarray, prior: np.ndarray, value: float, mode: str = "wipe") -> np.ndarray:
    """``value`` 0-100: how much of the current image is shown (wipe: columns from the left; blend: weight)."""
    v = float(np.clip(value if value is not None else 50.0, 0.0, 100.0)) / 100.0
    if mode == "blend":
        return (current.astype(np.float32) * v + prior.astype(np.float32) * (1.0 - v)).round().astype(np.uint8)
    out = prior.copy()
    x = int(round(v * current.shape[1]))
    out[:, :x] = current[:, :x]
    if 0 < x < current.shape[1]:
        out[:, max(0, x - 1):x + 1] = (255, 200, 0)
    return out


# -- boxes on a slice ---------------------------------------------------------------------------------
def _display_flips(series: Any) -> tuple[bool, bool]:
    """(flip columns, flip rows) so that the patient's right is on the image's left and anterior is up."""
    d = np.asarray(series.direction, dtype=float)
    flip_i = bool(d[0, 0] < 0) if abs(d[0, 0]) >= abs(d[1, 0]) else bool(d[1, 0] < 0)
    flip_j = bool(d[1, 1] < 0) if abs(d[1, 1]) >= abs(d[0, 1]) else bool(d[0, 1] < 0)
    return flip_i, flip_j


def _to_uint8(img: np.ndarray, modality: str, photometric: str) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    if modality == "CT":
        c, w = LUNG_WINDOW
        lo, hi = c - w / 2.0, c + w / 2.0
    else:
        lo, hi = (float(x) for x in np.percentile(img, [0.5, 99.5]))
    out = np.clip((img - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


def _box_label(f: Finding) -> str:
    size = f" {f.diameter_mm:.1f} {f.units}" if f.diameter_mm is not None else ""
    return f"{f.id} {f.kind}{size}"


Box = tuple[tuple[int, int, int, int], str]


def slice_annotations(series: Any, findings: list[Finding], k: int) -> tuple[np.ndarray, list[Box]]:
    """The slice ``k`` of ``series`` (display orientation, RGB) and the boxes of the findings it cuts."""
    nk, nj, ni = series.shape
    k = int(np.clip(k, 0, nk - 1))
    img = _to_uint8(series.pixels[k], series.modality, getattr(series, "photometric", "MONOCHROME2"))
    flip_i, flip_j = _display_flips(series) if nk > 1 else (False, False)
    img = img[:, ::-1] if flip_i else img
    img = img[::-1, :] if flip_j else img
    boxes: list[Box] = []
    for f in findings:
        if nk == 1 and f.bbox_px is not None:  # radiograph: pixel box [x0, y0, x1, y1]
            x0, y0, x1, y1 = (float(v) for v in f.bbox_px)
        elif f.bbox_vox is not None and len(f.bbox_vox) == 6:
            i0, j0, k0, i1, j1, k1 = (float(v) for v in f.bbox_vox)
            if not (min(k0, k1) - 0.5 <= k <= max(k0, k1) + 0.5):
                continue
            x0, x1 = (ni - 1 - i1, ni - 1 - i0) if flip_i else (i0, i1)
            y0, y1 = (nj - 1 - j1, nj - 1 - j0) if flip_j else (j0, j1)
        else:
            continue
        pad = 2
        box = (int(max(0, min(x0, x1) - pad)), int(max(0, min(y0, y1) - pad)),
               int(min(ni - 1, max(x0, x1) + pad)), int(min(nj - 1, max(y0, y1) + pad)))
        boxes.append((box, _box_label(f)))
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    if rgb.shape[1] < 384:  # small phantoms: upscale so that boxes and labels stay legible
        s = int(np.ceil(384 / rgb.shape[1]))
        rgb = rgb.repeat(s, axis=0).repeat(s, axis=1)
        boxes = [((b[0] * s, b[1] * s, b[2] * s + s - 1, b[3] * s + s - 1), lab) for b, lab in boxes]
    return np.ascontiguousarray(rgb), boxes


def boxed_findings(answer: Answer | None) -> list[Finding]:
    """Findings of the current study that can be drawn as a box on a slice, lesions first."""
    if answer is None:
        return []
    out = [f for f in answer.findings if (f.bbox_vox is not None and f.slice_index is not None)
           or f.bbox_px is not None]
    return sorted(out, key=lambda f: f.kind == "anatomy")


# ------------------------------------------------------------------------------------------------
# Streaming a turn
# ------------------------------------------------------------------------------------------------
def step_message(event: dict[str, Any]) -> Message:
    status = event.get("status", "running")
    title = str(event.get("title") or event.get("tool") or "step")
    if status == "error":
        title += " — error"
    elif status == "skipped":
        title += " — skipped"
    meta: dict[str, Any] = {"title": title, "status": "pending" if status == "running" else "done"}
    if status != "running":
        meta["duration"] = round(float(event.get("duration_s") or 0.0), 2)
    content = str(event.get("detail") or "") or ("Running…" if status == "running" else status.capitalize())
    return {"role": "assistant", "content": content, "metadata": meta}


POINT_HALF_MM = 15.0  # a click points at a 30 mm cube around the clicked spot


def point_to_box_mm(series: Any, k: int, x: float, y: float, half_mm: float = POINT_HALF_MM) -> list[float]:
    """A click at display pixel (x, y) of slice k, as drawn by :func:`slice_annotations` (upscaled and flipped
    to radiological display), -> a box [x0, y0, z0, x1, y1, z1] in patient mm around that spot."""
    nk, nj, ni = series.shape
    s = int(np.ceil(384 / ni)) if ni < 384 else 1
    i, j = float(x) / s, float(y) / s
    flip_i, flip_j = _display_flips(series) if nk > 1 else (False, False)
    i = ni - 1 - i if flip_i else i
    j = nj - 1 - j if flip_j else j
    c = series.vox_to_mm([i, j, float(k)])
    half_z = max(half_mm, float(series.spacing[2]))
    return [round(float(v), 1) for v in (c[0] - half_mm, c[1] - half_mm, c[2] - half_z,
                                         c[0] + half_mm, c[1] + half_mm, c[2] + half_z)]


def run_turn(consultant: Consultant, question: str, study: str | None, prior: str | None,
             thread_id: str, box_mm: list[float] | None = None, user: str | None = None
             ) -> Iterator[tuple[str, Any]]:
    """Run ``consultant.ask`` in a worker thread; yield ("step", event) as tool steps arrive, then
    ("answer", Answer) or ("error", exception)."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            ans = consultant.ask(question, study=study, prior=prior, thread_id=thread_id, box_mm=box_mm,
                                 on_step=lambda ev: events.put(("step", ev)), user=user)
            events.put(("answer", ans))
        except Exception as exc:  # noqa: BLE001 - reported to the clinician, logged below
            events.put(("error", exc))

    worker = threading.Thread(target=work, name=f"radassist-turn-{thread_id[:8]}", daemon=True)
    worker.start()
    while True:
        kind, payload = events.get()
        yield kind, payload
        if kind in ("answer", "error"):
            break
    worker.join(timeout=5)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, RadAssistError):
        return str(exc)
    log.error("unexpected error in a turn", exc_info=(type(exc), exc, exc.__traceback__))
    return GENERIC_ERROR


class App:
    """The handlers, bound to one Consultant (and optionally a PACS). Each browser session carries its own
    thread id; every thread belongs to the user who started it."""

    N_PANEL = 5
    N_EXTRA = 9  # answer state, boxes, box picker, pair picker, slider, pair image, sentences, tabs, sentence boxes

    def __init__(self, consultant: Consultant, pacs: PacsClient | None = None, auth_enabled: bool = False) -> None:
        self.c = consultant
        self.pacs = pacs
        self.auth_enabled = auth_enabled
        self.conversations = ConversationIndex(Path(consultant.home) / "ui" / "conversations.sqlite")

    # -- helpers ------------------------------------------------------------------------------------
    def study_path(self, study_uid: str | None) -> str | None:
        if not study_uid:
            return None
        return str(self.c.store.path_of(study_uid))

    def prior_path(self, prior: str | None) -> str | None:
        if not prior or prior == AUTO_PRIOR:
            return None
        return str(self.c.store.path_of(prior))

    def claim(self, thread_id: str | None, user: str, study_uid: str | None, title: str) -> tuple[str, bool]:
        """A thread id ``user`` may write to: theirs, or a new one; (thread id, True if it had to be replaced)."""
        if thread_id:
            owner = self.conversations.owner(thread_id)
            if owner == user:
                return thread_id, False
            foreign = owner is not None or (self.auth_enabled and self._has_history(thread_id))
            if not foreign:
                self.conversations.add(user, thread_id, study_uid, title)
                return thread_id, False
            log.warning("a session asked for a conversation it does not own; a new one was started")
        new = uuid.uuid4().hex
        self.conversations.add(user, new, study_uid, title)
        return new, bool(thread_id)

    def _has_history(self, thread_id: str) -> bool:
        try:
            return bool(self.c.history(thread_id))
        except Exception:  # noqa: BLE001 - unknown thread ids are simply new
            return False

    def extras(self, answer: Answer | None) -> tuple[Any, ...]:
        """The clickable evidence's values, in the order of ``extra_outputs``."""
        keyed = boxed_findings(answer)
        key_choices = [(f"{f.id} · {f.kind} · {f.region or f.label or ''}".strip(" ·"), f.id) for f in keyed]
        pairs = before_after_choices(answer)
        sentences = sentence_choices(answer)
        pair_img = self.pair_image(answer, pairs[0][1], 50, "wipe") if pairs else None
        tab = gr.update(selected="images")
        if pairs:
            tab = gr.update(selected="compare")
        elif sentences:
            tab = gr.update(selected="report")
        elif any(f.kind != "anatomy" for f in keyed):
            tab = gr.update(selected="boxes")
        return (answer,
                self.key_image(answer, keyed[0].id) if keyed else None,
                gr.update(choices=key_choices, value=keyed[0].id if keyed else None),
                gr.update(choices=pairs, value=pairs[0][1] if pairs else None),
                gr.update(value=50),
                pair_img,
                gr.update(choices=sentences, value=None),
                tab,
                None)

    def cleared(self) -> tuple[Any, ...]:
        return (*panel(None), *self.extras(None))

    # -- evidence you can click ---------------------------------------------------------------------
    def _series_for(self, answer: Answer, f: Finding) -> Any:
        uid = f.study_uid or answer.study_uid
        path: str | None = None
        if uid and self.c.store.get(uid) is not None:
            path = str(self.c.store.path_of(uid))
        else:
            ref = self.c.thread_study(answer.thread_id) if hasattr(self.c, "thread_study") else None
            if ref and (not uid or ref.get("study_uid") == uid):
                path = ref.get("path")
        if not path:
            return None
        study, _ = self.c.open_study(path)
        for s in study.series:
            if f.series_uid and s.series_uid == f.series_uid:
                return s
        return study.primary if f.series_uid is None else None

    def key_image(self, answer: Answer | None, finding_id: str | None) -> Any:
        """(slice image, [(box, label)]) for ``gr.AnnotatedImage``: the finding's slice, every box on it."""
        if answer is None or not finding_id:
            return None
        f = next((x for x in answer.findings if x.id == finding_id), None)
        if f is None:
            return None
        try:
            series = self._series_for(answer, f)
            if series is None:
                return None
            if f.slice_index is not None:
                k = int(f.slice_index)
            elif f.bbox_vox is not None:
                k = int(round((f.bbox_vox[2] + f.bbox_vox[5]) / 2))
            else:
                k = 0
            same = [f] + [g for g in answer.findings if g.id != f.id and g.series_uid == f.series_uid
                          and g.study_uid == f.study_uid]
            return slice_annotations(series, same, k)
        except Exception:  # noqa: BLE001 - the gallery still shows the rendered key images
            log.warning("could not draw the boxes of a finding", exc_info=True)
            return None

    def pair_image(self, answer: Answer | None, pick: str | None, value: float, mode: str) -> np.ndarray | None:
        if answer is None or pick is None:
            return None
        try:
            e = answer.evidence[int(pick)]
            current, prior = split_pair(e.path)
        except (ValueError, IndexError, OSError):
            return None
        return compose_pair(current, prior, value, mode if mode in WIPE_MODES else "wipe")

    def show_key(self, finding_id: str | None, answer: Answer | None) -> Any:
        return self.key_image(answer, finding_id)

    def wipe(self, pick: str | None, value: float, mode: str, answer: Answer | None) -> Any:
        return self.pair_image(answer, pick, value, mode)

    def select_sentence(self, index: str | None, answer: Answer | None) -> tuple[Any, Any, Any, Any]:
        """A report sentence was clicked: (gallery of its findings' images, boxes of its first boxed finding,
        that finding in the picker, the same boxes shown next to the report)."""
        keep = (gr.update(), gr.update(), gr.update(), gr.update())
        if answer is None or answer.report is None or index is None:
            return keep
        try:
            sentence = answer.report.sentences[int(index)]
        except (ValueError, IndexError):
            return keep
        ids = list(sentence.finding_ids)
        gallery = gallery_items(answer, only_ids=ids) or gallery_items(answer)
        first = next((f for f in boxed_findings(answer) if f.id in ids), None)
        if first is None:
            return gallery, gr.update(), gr.update(), None
        boxes = self.key_image(answer, first.id)
        return gallery, boxes, gr.update(value=first.id), boxes

    # -- studies ------------------------------------------------------------------------------------
    def refresh(self, current: str | None = None) -> tuple[Any, Any]:
        """Study and prior pickers from the store (keeps the current study when it is still there)."""
        choices = study_choices(self.c)
        uids = [u for _, u in choices]
        value = current if current in uids else (uids[0] if uids else None)
        return (gr.update(choices=choices, value=value),
                gr.update(choices=prior_choices(self.c, value), value=AUTO_PRIOR))

    def pacs_choices(self) -> Choices:
        if self.pacs is None:
            return []
        out = []
        for st in self.pacs.list_studies():
            out.append((pacs_label(st, self.c.store.get(st.study_uid) is not None), st.study_uid))
        return out

    def switch_source(self, source: str) -> tuple[Any, Any, Any]:
        """(source, study picker, prior picker) for the chosen source."""
        if source == SOURCE_PACS and self.pacs is not None:
            try:
                choices = self.pacs_choices()
            except RadAssistError as exc:
                gr.Warning(str(exc))
                return (gr.update(value=SOURCE_LOCAL), *self.refresh())
            return (gr.update(), gr.update(choices=choices, value=None, label="Study in the PACS (newest first)"),
                    gr.update(choices=prior_choices(self.c, None), value=AUTO_PRIOR))
        study_upd, prior_upd = self.refresh()
        return gr.update(value=SOURCE_LOCAL), {**study_upd, "label": "Study (newest first)"}, prior_upd

    def open_from_pacs(self, study_uid: str) -> tuple[Any, Any | None]:
        """Fetch the study and its prior from the PACS into the local store (skipping what is already
        there); returns their store records (prior None when the archive has none)."""
        if self.pacs is None:
            raise RadAssistError("No PACS is configured (set RADASSIST_PACS_URL or start with --pacs URL).")
        cur = self.pacs.get_study(study_uid)
        prior = self.pacs.find_prior(cur)
        tmp = Path(self.c.home) / "pacs" / uuid.uuid4().hex
        try:
            for st, sub in ((cur, "current"), (prior, "prior")):
                if st is None or self.c.store.get(st.study_uid) is not None:
                    continue
                folder = self.pacs.fetch_study(st.study_uid, tmp / sub)
                self.c.store.import_path(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rec = self.c.store.get(cur.study_uid)
        if rec is None:
            raise RadAssistError("The study fetched from the PACS could not be imported into the local store.")
        prior_rec = self.c.store.get(prior.study_uid) if prior is not None else None
        log.info("opened a study from the PACS (prior %s)", "found" if prior_rec else "none")
        return rec, prior_rec

    def pick_study(self, study_uid: str | None, source: str = SOURCE_LOCAL) -> Iterator[tuple[Any, ...]]:
        """A study was picked: from the PACS it is fetched (with its prior) first. Either way a new
        conversation starts (follow-ups never resolve against another study)."""
        if source == SOURCE_PACS and study_uid:
            wait = [{"role": "assistant", "content": "Fetching the study and its prior from the PACS…",
                     "metadata": {"title": "PACS", "status": "pending"}}]
            keep = tuple(gr.update() for _ in range(self.N_PANEL + self.N_EXTRA))
            yield gr.update(), gr.update(), gr.update(), wait, gr.update(), *keep
            t0 = time.monotonic()
            try:
                rec, prior_rec = self.open_from_pacs(study_uid)
            except Exception as exc:  # noqa: BLE001 - shown in the chat; the session goes on
                msg = f"The study could not be opened from the PACS. {error_text(exc)}"
                yield gr.update(), gr.update(), gr.update(), [{"role": "assistant", "content": msg}], gr.update(), *keep
                return
            study_upd, _ = self.refresh(rec.study_uid)
            pchoices = prior_choices(self.c, rec.study_uid)
            prior_val = prior_rec.study_uid if prior_rec is not None else AUTO_PRIOR
            text = (f"Opened from the PACS in {time.monotonic() - t0:.1f} s: {study_label(rec)}; prior: "
                    + (study_label(prior_rec) if prior_rec else "none in the archive") + ". Ask me about it.")
            yield (gr.update(value=SOURCE_LOCAL), {**study_upd, "label": "Study (newest first)"},
                   gr.update(choices=pchoices, value=prior_val), [{"role": "assistant", "content": text}],
                   uuid.uuid4().hex, *self.cleared())
            return
        label = dict((u, lab) for lab, u in study_choices(self.c)).get(study_uid or "", "")
        history: list[Message] = []
        if label:
            history.append({"role": "assistant", "content": f"Study selected: {label}. Ask me about it."})
        yield (gr.update(), gr.update(), gr.update(choices=prior_choices(self.c, study_uid), value=AUTO_PRIOR),
               history, uuid.uuid4().hex, *self.cleared())

    def select_study(self, study_uid: str | None) -> tuple[Any, ...]:
        """(prior, history, thread id, *panel, *extras) for a local study (no PACS)."""
        out = list(self.pick_study(study_uid, SOURCE_LOCAL))[-1]
        return out[2:]

    def upload(self, files: list[str] | None, history: list[Message] | None,
               thread_id: str | None = None) -> tuple[Any, ...]:
        """Import the uploaded files, select the newest imported study and start a new conversation;
        on failure the message goes to the chat and the conversation stays as it was. The uploaded
        files are deleted from the server's upload cache either way."""
        history = list(history or [])
        files = list(files or [])
        try:
            records = import_uploads(self.c, files)
        except Exception as exc:  # noqa: BLE001 - shown in the chat; the session goes on
            history.append({"role": "assistant", "content": f"The upload could not be imported. {error_text(exc)}"})
            return (gr.update(), gr.update(), history, thread_id, *(gr.update() for _ in range(self.N_PANEL)), None,
                    *(gr.update() for _ in range(self.N_EXTRA)), gr.update())
        finally:
            discard_uploads(files)
        newest = max(records, key=lambda r: (r.study_date or "", r.study_uid))
        log.info("upload imported %d study(ies)", len(records))
        names = "; ".join(study_label(r) for r in records)
        history = [{"role": "assistant",
                    "content": f"Imported {len(records)} study(ies): {names}. Selected {study_label(newest)}."}]
        study_upd, prior_upd = self.refresh(newest.study_uid)
        return (study_upd, prior_upd, history, uuid.uuid4().hex, *panel(None), None, *self.extras(None),
                gr.update(value=SOURCE_LOCAL))

    # -- conversations ------------------------------------------------------------------------------
    def conversation_choices(self, user: str) -> Choices:
        out = []
        for row in self.conversations.list(user):
            when = row["created"][:16].replace("T", " ")
            out.append((f"{when} · {row['title']}", row["thread_id"]))
        return out

    def conversations_update(self, thread_id: str | None = None, request: gr.Request | None = None) -> Any:
        choices = self.conversation_choices(user_of(request))
        value = thread_id if thread_id in {c[1] for c in choices} else None
        return gr.update(choices=choices, value=value)

    def open_conversation(self, thread_id: str | None, request: gr.Request | None = None) -> tuple[Any, ...]:
        """Reopen one of the user's own conversations: its messages, its study and its last answer's evidence."""
        user = user_of(request)
        nothing = tuple(gr.update() for _ in range(4 + self.N_PANEL + self.N_EXTRA))
        if not thread_id:
            return nothing
        if self.conversations.owner(thread_id) != user:
            log.warning("refused to reopen a conversation the user does not own")
            gr.Warning("That conversation is not one of yours.")
            return nothing
        history = [m for m in self.c.history(thread_id) if m.get("content")]
        answer = self.c.last_answer(thread_id)
        ref = self.c.thread_study(thread_id) or {}
        uid = ref.get("study_uid") or next((r["study_uid"] for r in self.conversations.list(user)
                                            if r["thread_id"] == thread_id), None)
        study_upd, prior_upd = (gr.update(), gr.update())
        if uid and self.c.store.get(uid) is not None:
            study_upd, prior_upd = self.refresh(uid)
        if not history:
            history = [{"role": "assistant", "content": "This conversation has no messages yet."}]
        return (study_upd, prior_upd, history, thread_id, *panel(answer), *self.extras(answer))

    def new_conversation(self) -> tuple[Any, ...]:
        return ([], uuid.uuid4().hex, *self.cleared())

    # -- chat ---------------------------------------------------------------------------------------
    def chat(self, message: str, history: list[Message] | None, study_uid: str | None, prior: str | None,
             thread_id: str | None, request: gr.Request | None = None,
             box_mm: list[float] | None = None) -> Iterator[tuple[Any, ...]]:
        """Streaming handler: yields (history, textbox, thread_id, *panel, *extras) while the steps run."""
        history = list(history or [])
        message = (message or "").strip()
        keep = tuple(gr.update() for _ in range(self.N_PANEL + self.N_EXTRA))
        if not message:
            yield history, "", thread_id or uuid.uuid4().hex, *keep
            return
        thread_id, replaced = self.claim(thread_id, user_of(request), study_uid, message)
        if replaced:
            history = [{"role": "assistant", "content": "That conversation belongs to another user; "
                        "a new conversation was started."}]
        history.append({"role": "user", "content": message})
        yield history, "", thread_id, *keep
        try:
            study = self.study_path(study_uid)
            prior_path = self.prior_path(prior)
        except RadAssistError as exc:
            history.append({"role": "assistant", "content": str(exc)})
            yield history, "", thread_id, *keep
            return
        open_steps: dict[str, list[int]] = {}
        t0 = time.monotonic()
        for kind, payload in run_turn(self.c, message, study, prior_path, thread_id, box_mm=box_mm,
                                      user=user_of(request)):
            if kind == "step":
                ev = payload
                if ev.get("event") == "plan":
                    tools = ev.get("tools") or []
                    if tools:
                        history.append({"role": "assistant", "content": "Tool agents: " + ", ".join(tools),
                                        "metadata": {"title": "Plan", "status": "done"}})
                    continue
                if ev.get("event") != "step":
                    continue
                tool = str(ev.get("tool") or "")
                msg = step_message(ev)
                if ev.get("status") == "running":
                    history.append(msg)
                    open_steps.setdefault(tool, []).append(len(history) - 1)
                elif open_steps.get(tool):
                    history[open_steps[tool].pop(0)] = msg
                else:
                    history.append(msg)
                yield history, "", thread_id, *keep
            elif kind == "answer":
                answer: Answer = payload
                for idxs in open_steps.values():  # a step that never reported back
                    for i in idxs:
                        history[i] = {**history[i], "metadata": {**history[i]["metadata"], "status": "done"}}
                history.append({"role": "assistant", "content": answer.answer})
                log.info("turn answered in %.1f s (tools=%s)", time.monotonic() - t0, answer.tools)
                if study_uid:
                    self.conversations.set_study(user_of(request), thread_id, study_uid)
                yield history, "", thread_id, *panel(answer), *self.extras(answer)
            else:
                for idxs in open_steps.values():
                    for i in idxs:
                        history[i] = {**history[i], "metadata": {**history[i]["metadata"], "status": "done"}}
                history.append({"role": "assistant", "content": error_text(payload)})
                yield history, "", thread_id, *keep

    def point_select(self, ctx: dict | None, answer: Answer | None,
                     evt: gr.SelectData) -> tuple[list[float] | None, str]:
        """A click on the slice: remember a box around the spot for "what is this?"."""
        if not ctx or answer is None:
            return None, "Open a finding's slice first (pick a finding above)."
        f = next((x for x in answer.findings if x.id == ctx.get("finding_id")), None)
        series = self._series_for(answer, f) if f is not None else None
        if series is None or not evt.index or len(evt.index) < 2:
            return None, "That image cannot be pointed at."
        if series.shape[0] == 1:
            return None, "Pointing is available on CT slices; on films, ask about a zone by name."
        box = point_to_box_mm(series, int(ctx["k"]), float(evt.index[0]), float(evt.index[1]))
        c = [round((box[i] + box[i + 3]) / 2, 1) for i in range(3)]
        return box, f"Pointed at {c} mm (LPS). Ask “what is this?” to hear what lies there."

    def point_context(self, finding_id: str | None, answer: Answer | None) -> dict | None:
        f = next((x for x in (answer.findings if answer else []) if x.id == finding_id), None)
        if f is None:
            return None
        k = f.slice_index if f.slice_index is not None else (
            int(round((f.bbox_vox[2] + f.bbox_vox[5]) / 2)) if f.bbox_vox else 0)
        return {"finding_id": f.id, "k": int(k)}

    def chat_point(self, history: list[Message] | None, study_uid: str | None, prior: str | None,
                   thread_id: str | None, box_mm: list[float] | None,
                   request: gr.Request | None = None) -> Iterator[tuple[Any, ...]]:
        """Region-to-text by pointing: "what is this?" about the clicked spot."""
        if not box_mm:
            keep = tuple(gr.update() for _ in range(self.N_PANEL + self.N_EXTRA))
            msg = {"role": "assistant", "content": "Click on the slice in the Boxes tab first, then ask."}
            yield [*(history or []), msg], "", thread_id or uuid.uuid4().hex, *keep
            return
        yield from self.chat("What is this? (the region I pointed at)", history, study_uid, prior, thread_id,
                             request=request, box_mm=box_mm)

    def send_results(self, thread_id: str | None, user: str) -> str:
        """Send the conversation's last report (DICOM SR and SEG) back to the PACS; a message for the panel."""
        if self.pacs is None:
            return "No PACS is configured, so there is nowhere to send the results."
        if not thread_id or self.conversations.owner(thread_id) != user:
            return "Open one of your conversations with a report first."
        answer = self.c.last_answer(thread_id)
        files = [Path(p) for k, p in ((answer.report.files if answer and answer.report else {}) or {}).items()
                 if k in ("sr", "seg")]
        if not files:
            return "This conversation has no DICOM report yet: ask for a report first (e.g. “write the report”)."
        try:
            res = self.pacs.send(files)
        except RadAssistError as exc:
            return f"The results could not be sent: {exc}"
        return (f"Sent {len(res.stored)} object(s) ({', '.join(p.stem.upper() for p in files)}) to the PACS"
                + (f"; {len(res.failed)} refused." if res.failed else "."))

    def send_results_api(self, thread_id: str, request: gr.Request | None = None) -> str:
        """Send the last report of one of your conversations (SR + SEG) to the PACS."""
        return self.send_results(thread_id, user_of(request))

    # -- API ----------------------------------------------------------------------------------------
    def ask_api(self, question: str, study_uid: str = "", thread_id: str = "",
                request: gr.Request | None = None) -> dict:
        """Ask one question; returns the answer contract as JSON (``thread_id`` continues one of your conversations)."""
        tid, replaced = self.claim(thread_id or None, user_of(request), study_uid or None, question)
        if replaced:
            raise gr.Error("That conversation belongs to another user.")
        try:
            ans = self.c.ask(question, study=self.study_path(study_uid or None), thread_id=tid,
                             user=user_of(request))
        except RadAssistError as exc:
            raise gr.Error(str(exc)) from exc
        return ans.model_dump(mode="json")

    def studies_api(self) -> list[dict]:
        """The store's studies, newest first (patient shown by pseudonym only)."""
        recs = sorted(self.c.store.list_studies(), key=lambda r: (r.study_date or "", r.study_uid), reverse=True)
        return [{"study_uid": r.study_uid, "date": r.study_date, "modality": r.modality,
                 "description": r.description, "patient": pseudonym(r.patient_id), "label": study_label(r)}
                for r in recs]

    def pacs_studies_api(self) -> list[dict]:
        """The PACS's studies, newest first (patient shown by pseudonym only); [] without a PACS."""
        if self.pacs is None:
            return []
        try:
            studies = self.pacs.list_studies()
        except RadAssistError as exc:
            raise gr.Error(str(exc)) from exc
        return [{"study_uid": s.study_uid, "date": s.study_date, "modality": s.modality,
                 "description": s.description, "patient": pseudonym(s.patient_id), "n_instances": s.n_instances,
                 "in_store": self.c.store.get(s.study_uid) is not None, "label": pacs_label(s)} for s in studies]

    def open_pacs_api(self, study_uid: str) -> dict:
        """Fetch a PACS study and its prior into the local store; returns their UIDs and labels."""
        try:
            rec, prior = self.open_from_pacs(study_uid)
        except RadAssistError as exc:
            raise gr.Error(str(exc)) from exc
        return {"study_uid": rec.study_uid, "label": study_label(rec),
                "prior_uid": prior.study_uid if prior else None, "prior_label": study_label(prior) if prior else None}

    def conversations_api(self, request: gr.Request | None = None) -> list[dict]:
        """The caller's own conversations, newest first."""
        return self.conversations.list(user_of(request))


# ------------------------------------------------------------------------------------------------
# Building and launching
# ------------------------------------------------------------------------------------------------
def pacs_from_env() -> PacsClient | None:
    """A PACS client from ``RADASSIST_PACS_URL`` (+ ``RADASSIST_PACS_USER``/``RADASSIST_PACS_PASSWORD``), or None."""
    url = os.environ.get("RADASSIST_PACS_URL", "").strip()
    if not url:
        return None
    from ui.pacs import PacsClient

    user = os.environ.get("RADASSIST_PACS_USER", "")
    return PacsClient(url, auth=(user, os.environ.get("RADASSIST_PACS_PASSWORD", "")) if user else None)


def _install_atomic_image_cache() -> None:
    """Make Gradio's cache writes for images atomic (idempotent).

    Gradio 6 saves every image and ``AnnotatedImage`` mask it returns under a content-hash name with a plain
    ``write_bytes`` (truncate, then write), even when that very file exists already and the browser may be
    fetching it: the same slice or box mask comes back on every streamed update of a turn. A fetch that
    meets the truncated file fails ("Too little data for declared Content-Length") and the image stays
    blank. Here an existing file (same name = same bytes) is reused, and a new one is written under a
    temporary name and renamed into place, as Gradio already does for files it copies."""
    import tempfile

    from gradio import processing_utils as pu

    if not all(hasattr(pu, n) for n in ("save_pil_to_cache", "encode_pil_to_bytes", "hash_bytes")):
        log.warning("Gradio's image cache helpers have changed; its own (non-atomic) image writes are used")
        return
    if getattr(pu.save_pil_to_cache, "_radassist_atomic", False):
        return

    def save_pil_to_cache(img: Any, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = pu.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / pu.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        dest = (folder / f"{name}.{format}").resolve()
        if dest.is_file() and dest.stat().st_size == len(data):
            with contextlib.suppress(OSError):
                os.utime(dest)  # the cache is aged by ctime: a file handed out again must not expire early
            return str(dest)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(staging, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise
        return str(dest)

    save_pil_to_cache._radassist_atomic = True  # type: ignore[attr-defined]
    pu.save_pil_to_cache = save_pil_to_cache


def build_app(consultant: Consultant | None = None, auth: Callable[[str, str], bool] | None = None,
              pacs: PacsClient | str | None = None) -> gr.Blocks:
    """The Blocks app. ``auth`` is kept on the app (``demo.radassist_auth``) for ``launch``; ``pacs`` is a
    client or a DICOMweb URL (default: ``RADASSIST_PACS_URL``, if set)."""
    if consultant is None:
        from agents.engine import Consultant

        consultant = Consultant()
    if isinstance(pacs, str):
        from ui.pacs import PacsClient

        pacs = PacsClient(pacs)
    elif pacs is None:
        pacs = pacs_from_env()
    _install_atomic_image_cache()
    app = App(consultant, pacs=pacs, auth_enabled=auth is not None)
    choices = study_choices(consultant)
    first = choices[0][1] if choices else None

    with gr.Blocks(title="radassist") as demo:
        thread_state = gr.State(None)
        answer_state = gr.State(None)
        gr.Markdown(f"## {TITLE}\n{DISCLAIMER}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                source = gr.Radio([SOURCE_LOCAL, SOURCE_PACS], value=SOURCE_LOCAL, label="Source",
                                  info=f"PACS: {pacs.host}" if pacs is not None else None,
                                  visible=pacs is not None, elem_id="ra-source")
                study = gr.Dropdown(choices=choices, value=first, label="Study (newest first)",
                                    info="date · modality · description · patient pseudonym", interactive=True,
                                    allow_custom_value=True, elem_id="ra-study")
                prior = gr.Dropdown(choices=prior_choices(consultant, first), value=AUTO_PRIOR, label="Prior",
                                    info="auto: the most recent earlier study of the same patient", interactive=True,
                                    allow_custom_value=True, elem_id="ra-prior")
                upload = gr.File(file_count="multiple", label=f"Upload a study (DICOM files or a zip, up to "
                                 f"{MAX_UPLOAD_MB} MB)", file_types=None, height=110)
                conv = gr.Dropdown(choices=[], value=None, label="Your conversations", interactive=True,
                                   info="reopen one of your earlier conversations", elem_id="ra-conversations")
                new_conv = gr.Button("New conversation", variant="secondary")
            with gr.Column(scale=2, min_width=400):
                chatbot = gr.Chatbot(label="Conversation", height=540, elem_id="ra-chat", placeholder=(
                    "Ask about the selected study, e.g. *Show me all pulmonary nodules*, *has it grown?*, "
                    "*write a report*."))
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask a question…", show_label=False, scale=5, autofocus=True,
                                     elem_id="ra-question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="ra-send")
            with gr.Column(scale=2, min_width=320):
                badge = gr.HTML(reliability_html(None), elem_id="ra-badge")
                with gr.Tabs(selected="images") as tabs:
                    with gr.Tab("Key images", id="images"):
                        gallery = gr.Gallery(label="Evidence", columns=2, height=420, object_fit="contain",
                                             elem_id="ra-gallery")
                    with gr.Tab("Boxes", id="boxes"):
                        key_pick = gr.Dropdown(choices=[], value=None, label="Finding", interactive=True,
                                               elem_id="ra-key-pick")
                        keyimg = gr.AnnotatedImage(label="Slice with the findings' boxes", height=400, format="png",
                                                   show_legend=True, elem_id="ra-boxes")
                        with gr.Accordion("Point at a region: click the slice, then ask", open=False):
                            point_img = gr.Image(label="Click a spot", interactive=False, format="png", height=300,
                                                 elem_id="ra-point-image")
                            with gr.Row():
                                point_msg = gr.Markdown("", elem_id="ra-point-msg")
                                point_ask = gr.Button("What is this?", variant="secondary", elem_id="ra-point-ask")
                        point_ctx = gr.State(None)
                        point_box = gr.State(None)
                    with gr.Tab("Before / after", id="compare"):
                        ba_pick = gr.Dropdown(choices=[], value=None, label="Comparison", interactive=True,
                                              elem_id="ra-pair")
                        with gr.Row():
                            ba_mode = gr.Radio(WIPE_MODES, value="wipe", label="Mode", scale=1, min_width=90)
                            ba_slider = gr.Slider(0, 100, value=50, step=1, scale=3, elem_id="ra-wipe",
                                                  label="prior ◀ ▶ current (% of the current image shown)")
                        ba_img = gr.Image(label="Current (left of the line) and registered prior", height=340,
                                          interactive=False, format="png", elem_id="ra-pair-image")
                    with gr.Tab("Report", id="report"):
                        sent_img = gr.AnnotatedImage(label="Boxes of the selected sentence's findings", height=260,
                                                     format="png", show_legend=True, elem_id="ra-sentence-boxes")
                        sentences = gr.Radio(choices=[], value=None, label="Report sentences: click one to see its "
                                             "findings", elem_id="ra-sentences")
                        report = gr.Markdown("", elem_id="ra-report")
                        files = gr.File(label="Files", file_count="multiple", interactive=False)
                        with gr.Row(visible=pacs is not None):
                            to_pacs = gr.Button("Send report (SR + SEG) to the PACS", variant="secondary",
                                                elem_id="ra-send-pacs")
                            sent_msg = gr.Markdown("", elem_id="ra-send-pacs-status")
                    with gr.Tab("Findings", id="findings"):
                        table = gr.Dataframe(headers=FINDING_COLUMNS, value=[], label="Findings", interactive=False,
                                             wrap=True)

        panel_outputs = [gallery, badge, table, report, files]
        extra_outputs = [answer_state, keyimg, key_pick, ba_pick, ba_slider, ba_img, sentences, tabs, sent_img]
        chat_inputs = [box, chatbot, study, prior, thread_state]
        chat_outputs = [chatbot, box, thread_state, *panel_outputs, *extra_outputs]
        convs = dict(fn=app.conversations_update, inputs=[thread_state], outputs=[conv], api_visibility="private")
        send.click(app.chat, chat_inputs, chat_outputs, api_name="chat").then(**convs)
        box.submit(app.chat, chat_inputs, chat_outputs, api_visibility="private").then(**convs)
        study.input(app.pick_study, [study, source],
                    [source, study, prior, chatbot, thread_state, *panel_outputs, *extra_outputs],
                    api_visibility="private", concurrency_limit=1, concurrency_id="import")
        source.input(app.switch_source, [source], [source, study, prior], api_visibility="private")
        upload.upload(app.upload, [upload, chatbot, thread_state],
                      [study, prior, chatbot, thread_state, *panel_outputs, upload, *extra_outputs, source],
                      api_name="upload", concurrency_limit=1, concurrency_id="import")
        new_conv.click(app.new_conversation, None, [chatbot, thread_state, *panel_outputs, *extra_outputs],
                       api_visibility="private").then(**convs)
        conv.input(app.open_conversation, [conv],
                   [study, prior, chatbot, thread_state, *panel_outputs, *extra_outputs], api_visibility="private")
        key_pick.input(app.show_key, [key_pick, answer_state], [keyimg], api_visibility="private")

        def point_view(fid: str | None, answer: Answer | None) -> tuple[Any, Any]:
            shown = app.key_image(answer, fid)
            return (shown[0] if shown else None), app.point_context(fid, answer)

        key_pick.change(point_view, [key_pick, answer_state], [point_img, point_ctx], api_visibility="private")
        point_img.select(app.point_select, [point_ctx, answer_state], [point_box, point_msg],
                         api_visibility="private")
        point_ask.click(app.chat_point, [chatbot, study, prior, thread_state, point_box], chat_outputs,
                        api_visibility="private").then(**convs)
        wipe_args = dict(fn=app.wipe, inputs=[ba_pick, ba_slider, ba_mode, answer_state], outputs=[ba_img],
                         api_visibility="private", show_progress="hidden", trigger_mode="always_last",
                         concurrency_limit=None)
        ba_slider.input(**wipe_args)
        ba_slider.release(**wipe_args)
        ba_mode.input(**wipe_args)
        ba_pick.input(**wipe_args)
        sentences.input(app.select_sentence, [sentences, answer_state], [gallery, keyimg, key_pick, sent_img],
                        api_visibility="private")
        demo.load(app.refresh, [study], [study, prior], api_visibility="private")
        demo.load(**convs)
        gr.api(app.ask_api, api_name="ask")
        gr.api(app.send_results_api, api_name="send_results", concurrency_limit=1, concurrency_id="import")
        def send_to_pacs(tid: str, request: gr.Request) -> str:
            return app.send_results(tid, user_of(request))

        to_pacs.click(send_to_pacs, [thread_state], [sent_msg], api_name=False)
        gr.api(app.studies_api, api_name="studies", concurrency_limit=None)
        gr.api(app.pacs_studies_api, api_name="pacs_studies", concurrency_limit=None)
        gr.api(app.open_pacs_api, api_name="open_pacs", concurrency_limit=1, concurrency_id="import")
        gr.api(app.conversations_api, api_name="conversations", concurrency_limit=None)

    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY)
    demo.radassist_app = app  # type: ignore[attr-defined]
    demo.radassist_auth = auth  # type: ignore[attr-defined]
    demo.radassist_css = CSS  # type: ignore[attr-defined]
    return demo


def load_users(auth_file: str | Path) -> dict[str, str]:
    """Users file: one ``user:sha256hex`` per line (``#`` comments and blank lines ignored)."""
    p = Path(auth_file)
    if not p.is_file():
        raise ConfigError(f"The users file {p.name} was not found.")
    users: dict[str, str] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, digest = line.partition(":")
        digest = digest.strip().lower()
        if not sep or not user.strip() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"Users file line {n}: expected user:sha256-hex-of-password.")
        users[user.strip()] = digest
    if not users:
        raise ConfigError("The users file lists no users.")
    return users


def make_auth(auth_file: str | Path) -> Callable[[str, str], bool]:
    users = load_users(auth_file)

    def check(username: str, password: str) -> bool:
        want = users.get(username)
        got = hashlib.sha256((password or "").encode("utf-8")).hexdigest()
        return want is not None and hmac.compare_digest(want, got)

    return check


def prepare_demo_patient(consultant: Consultant, seed: int = 7) -> list[Any]:
    """Write and import the bundled phantom patient when the store is empty; returns the imported records."""
    if consultant.store.list_studies():
        return []
    try:
        from tools.phantom import write_patient
    except ImportError:
        log.warning("tools.phantom is not available: the demo starts with an empty study store")
        return []
    outdir = consultant.home / "demo" / "patient"
    log.info("writing the demo phantom patient (seed %d)", seed)
    write_patient(outdir, seed=seed)
    records: list[Any] = []
    for part in ("prior", "current"):
        records.extend(consultant.store.import_path(outdir / part))
    return records


def launch_demo(host: str = "127.0.0.1", port: int = 7860, auth_file: str | Path | None = None,
                block: bool = True, consultant: Consultant | None = None, pacs_url: str | None = None,
                demo_patient: bool = True) -> gr.Blocks:
    """Start the web UI (no browser opened, never a public share link). The demo patient is written into an
    empty store unless ``demo_patient`` is False; ``pacs_url`` (or ``RADASSIST_PACS_URL``) adds the PACS source."""
    if host not in LOCAL_HOSTS and not auth_file:
        raise ConfigError(f"Refusing to serve on {host} without sign-in: beyond localhost the demo needs a users "
                          "file (--auth users.txt with user:sha256-of-password lines).")
    auth = make_auth(auth_file) if auth_file else None
    from tools.deid import install_log_scrubber

    install_log_scrubber()
    if consultant is None:
        from agents.engine import Consultant

        consultant = Consultant()
    if demo_patient:
        prepare_demo_patient(consultant)
    (consultant.home / "evidence").mkdir(parents=True, exist_ok=True)
    demo = build_app(consultant, auth=auth, pacs=pacs_url)
    demo.launch(server_name=host, server_port=port, inbrowser=False, share=False, auth=auth,
                auth_message="radassist: sign in" if auth else None, prevent_thread_lock=not block,
                allowed_paths=[str(consultant.home / "evidence")], show_error=False, quiet=False,
                max_file_size=f"{MAX_UPLOAD_MB}mb", css=CSS)
    return demo
