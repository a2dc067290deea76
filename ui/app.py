"""The clinician web UI (Gradio 6): study picker and upload, chat with streamed tool steps, evidence panel.

Layout: left, the study picker (the local store's studies, newest first, shown with a pseudonymous
patient id only), an upload box (DICOM files or a zip) and the prior picker; middle, the chat, where each
tool agent's run appears as a collapsible message while it runs, then the answer; right, the evidence of
the last answer (key images, reliability badge, findings table, report).

The UI never calls a tool: every question goes through :class:`agents.engine.Consultant`. Each browser
session has its own conversation thread id (``gr.State``), never shared between users. Clinician-facing
errors (:class:`tools.errors.RadAssistError`) are shown as an assistant message; the session goes on.

API endpoints (for scripts and tests, through ``gradio_client``):
- ``/ask``: ``ask_api(question, study_uid, thread_id) -> dict`` (the answer contract as JSON);
- ``/chat``: the streaming chat handler (history grows with the tool steps, then the answer);
- ``/upload``: import uploaded files into the store and select the study;
- ``/studies``: the store's studies as a list of dicts.

Scripts should connect with ``gradio_client.Client(url, download_files=False)``: otherwise the client
takes every dict with a ``"path"`` key (the answer's evidence entries) for a file, downloads it and puts
a local path string in its place.
"""
from __future__ import annotations

import hashlib
import hmac
import html
import logging
import os
import queue
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from tools.errors import ConfigError, RadAssistError

if TYPE_CHECKING:
    from agents.engine import Consultant
    from tools.schemas import Answer

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger(__name__)

TITLE = "radassist — evidence-grounded assistant for chest imaging"
DISCLAIMER = "Decision support, not diagnosis: confirm every finding on the images before acting."
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUTO_PRIOR = "auto"
FINDING_COLUMNS = ["id", "kind", "region", "size", "change", "reliability"]
DEFAULT_CONCURRENCY = 2
GENERIC_ERROR = ("Something went wrong inside the assistant while answering (the details are in the server "
                 "log). Please try again or rephrase; the conversation goes on.")
LEVEL_COLOURS = {"high": "#1b7f3b", "medium": "#b7791f", "low": "#c53030"}

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


def _unique_dest(folder: Path, name: str) -> Path:
    base = Path(name).name or "upload"
    dest = folder / base
    n = 1
    while dest.exists():
        dest = folder / f"{n}_{base}"
        n += 1
    return dest


def import_uploads(consultant: Consultant, files: list[str]) -> list[Any]:
    """Import uploaded files (DICOM files and/or zips) into the store; returns the study records.

    Zips are imported one by one; the other files are gathered in one folder and imported together.
    The staging folder is removed afterwards (the store keeps its own copies)."""
    paths = [Path(f) for f in files if f]
    if not paths:
        raise RadAssistError("No file was uploaded. Choose DICOM files or a zip of a study.")
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
    if answer is None:
        return "<div class='ra-badge'><em>No answer yet.</em></div>"
    r = answer.reliability
    colour = LEVEL_COLOURS.get(r.level, "#555")
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(_fmt_detail(v))}</li>"
                    for k, v in r.details.items() if v not in (None, {}, [], ""))
    details = f"<details><summary>How this was measured</summary><ul>{items}</ul></details>" if items else ""
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


def gallery_items(answer: Answer | None) -> list[tuple[str, str]]:
    if answer is None:
        return []
    out = []
    for e in answer.evidence:
        if e.kind in ("image", "plot") and Path(e.path).is_file():
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


def run_turn(consultant: Consultant, question: str, study: str | None, prior: str | None,
             thread_id: str) -> Iterator[tuple[str, Any]]:
    """Run ``consultant.ask`` in a worker thread; yield ("step", event) as tool steps arrive, then
    ("answer", Answer) or ("error", exception)."""
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def work() -> None:
        try:
            ans = consultant.ask(question, study=study, prior=prior, thread_id=thread_id,
                                 on_step=lambda ev: events.put(("step", ev)))
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
    """The handlers, bound to one Consultant. Each browser session carries its own thread id."""

    def __init__(self, consultant: Consultant) -> None:
        self.c = consultant

    # -- helpers ------------------------------------------------------------------------------------
    def study_path(self, study_uid: str | None) -> str | None:
        if not study_uid:
            return None
        return str(self.c.store.path_of(study_uid))

    def prior_path(self, prior: str | None) -> str | None:
        if not prior or prior == AUTO_PRIOR:
            return None
        return str(self.c.store.path_of(prior))

    # -- events -------------------------------------------------------------------------------------
    def refresh(self, current: str | None = None) -> tuple[Any, Any]:
        """Study and prior pickers from the store (keeps the current study when it is still there)."""
        choices = study_choices(self.c)
        uids = [u for _, u in choices]
        value = current if current in uids else (uids[0] if uids else None)
        return (gr.update(choices=choices, value=value),
                gr.update(choices=prior_choices(self.c, value), value=AUTO_PRIOR))

    def select_study(self, study_uid: str | None) -> tuple[Any, ...]:
        """A new study: a new conversation (follow-ups never resolve against another study)."""
        label = dict((u, lab) for lab, u in study_choices(self.c)).get(study_uid or "", "")
        history: list[Message] = []
        if label:
            history.append({"role": "assistant", "content": f"Study selected: {label}. Ask me about it."})
        return (gr.update(choices=prior_choices(self.c, study_uid), value=AUTO_PRIOR), history,
                uuid.uuid4().hex, *panel(None))

    def upload(self, files: list[str] | None, history: list[Message] | None,
               thread_id: str | None = None) -> tuple[Any, ...]:
        """Import the uploaded files, select the newest imported study and start a new conversation;
        on failure the message goes to the chat and the conversation stays as it was."""
        history = list(history or [])
        try:
            records = import_uploads(self.c, list(files or []))
        except Exception as exc:  # noqa: BLE001 - shown in the chat; the session goes on
            history.append({"role": "assistant", "content": f"The upload could not be imported. {error_text(exc)}"})
            return gr.update(), gr.update(), history, thread_id, *(gr.update() for _ in range(5)), None
        newest = max(records, key=lambda r: (r.study_date or "", r.study_uid))
        log.info("upload imported %d study(ies)", len(records))
        names = "; ".join(study_label(r) for r in records)
        history = [{"role": "assistant",
                    "content": f"Imported {len(records)} study(ies): {names}. Selected {study_label(newest)}."}]
        study_upd, prior_upd = self.refresh(newest.study_uid)
        return study_upd, prior_upd, history, uuid.uuid4().hex, *panel(None), None

    def chat(self, message: str, history: list[Message] | None, study_uid: str | None, prior: str | None,
             thread_id: str | None) -> Iterator[tuple[Any, ...]]:
        """Streaming handler: yields (history, textbox, thread_id, *panel) while the steps run."""
        history = list(history or [])
        thread_id = thread_id or uuid.uuid4().hex
        message = (message or "").strip()
        keep = tuple(gr.update() for _ in range(5))
        if not message:
            yield history, "", thread_id, *keep
            return
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
        for kind, payload in run_turn(self.c, message, study, prior_path, thread_id):
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
                yield history, "", thread_id, *panel(answer)
            else:
                for idxs in open_steps.values():
                    for i in idxs:
                        history[i] = {**history[i], "metadata": {**history[i]["metadata"], "status": "done"}}
                history.append({"role": "assistant", "content": error_text(payload)})
                yield history, "", thread_id, *keep

    def ask_api(self, question: str, study_uid: str = "", thread_id: str = "") -> dict:
        """Ask one question; returns the answer contract as JSON (``thread_id`` continues a conversation)."""
        try:
            ans = self.c.ask(question, study=self.study_path(study_uid or None), thread_id=thread_id or None)
        except RadAssistError as exc:
            raise gr.Error(str(exc)) from exc
        return ans.model_dump(mode="json")

    def studies_api(self) -> list[dict]:
        """The store's studies, newest first (patient shown by pseudonym only)."""
        recs = sorted(self.c.store.list_studies(), key=lambda r: (r.study_date or "", r.study_uid), reverse=True)
        return [{"study_uid": r.study_uid, "date": r.study_date, "modality": r.modality,
                 "description": r.description, "patient": pseudonym(r.patient_id), "label": study_label(r)}
                for r in recs]


# ------------------------------------------------------------------------------------------------
# Building and launching
# ------------------------------------------------------------------------------------------------
def build_app(consultant: Consultant | None = None,
              auth: Callable[[str, str], bool] | None = None) -> gr.Blocks:
    """The Blocks app. ``auth`` is kept on the app (``demo.radassist_auth``) for ``launch``."""
    if consultant is None:
        from agents.engine import Consultant

        consultant = Consultant()
    app = App(consultant)
    choices = study_choices(consultant)
    first = choices[0][1] if choices else None

    with gr.Blocks(title="radassist") as demo:
        thread_state = gr.State(None)
        gr.Markdown(f"# {TITLE}\n{DISCLAIMER}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                study = gr.Dropdown(choices=choices, value=first, label="Study (newest first)",
                                    info="date · modality · description · patient pseudonym", interactive=True,
                                    allow_custom_value=True)
                prior = gr.Dropdown(choices=prior_choices(consultant, first), value=AUTO_PRIOR, label="Prior",
                                    info="auto: the most recent earlier study of the same patient", interactive=True,
                                    allow_custom_value=True)
                upload = gr.File(file_count="multiple", label="Upload a study (DICOM files or a zip)",
                                 file_types=None)
                new_conv = gr.Button("New conversation", variant="secondary")
            with gr.Column(scale=2, min_width=400):
                chatbot = gr.Chatbot(label="Conversation", height=560, placeholder=(
                    "Ask about the selected study, e.g. *Show me all pulmonary nodules*, *has it grown?*, "
                    "*write a report*."))
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask a question…", show_label=False, scale=5, autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1)
            with gr.Column(scale=2, min_width=320):
                gallery = gr.Gallery(label="Evidence", columns=2, height=340, object_fit="contain")
                badge = gr.HTML(reliability_html(None))
                table = gr.Dataframe(headers=FINDING_COLUMNS, value=[], label="Findings", interactive=False,
                                     wrap=True)
                report = gr.Markdown("")
                files = gr.File(label="Files", file_count="multiple", interactive=False)

        panel_outputs = [gallery, badge, table, report, files]
        chat_inputs = [box, chatbot, study, prior, thread_state]
        chat_outputs = [chatbot, box, thread_state, *panel_outputs]
        send.click(app.chat, chat_inputs, chat_outputs, api_name="chat")
        box.submit(app.chat, chat_inputs, chat_outputs, api_visibility="private")
        study.input(app.select_study, [study], [prior, chatbot, thread_state, *panel_outputs],
                    api_visibility="private")
        upload.upload(app.upload, [upload, chatbot, thread_state], [study, prior, chatbot, thread_state, *panel_outputs, upload],
                      api_name="upload", concurrency_limit=1)
        new_conv.click(lambda: ([], uuid.uuid4().hex, *panel(None)), None,
                       [chatbot, thread_state, *panel_outputs], api_visibility="private")
        demo.load(app.refresh, [study], [study, prior], api_visibility="private")
        gr.api(app.ask_api, api_name="ask")
        gr.api(app.studies_api, api_name="studies", concurrency_limit=None)

    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY)
    demo.radassist_app = app  # type: ignore[attr-defined]
    demo.radassist_auth = auth  # type: ignore[attr-defined]
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
                block: bool = True, consultant: Consultant | None = None) -> gr.Blocks:
    """Start the web UI with the demo patient (no browser opened, never a public share link)."""
    if host not in LOCAL_HOSTS and not auth_file:
        raise ConfigError(f"Refusing to serve on {host} without sign-in: beyond localhost the demo needs a users "
                          "file (--auth users.txt with user:sha256-of-password lines).")
    auth = make_auth(auth_file) if auth_file else None
    if consultant is None:
        from agents.engine import Consultant

        consultant = Consultant()
    prepare_demo_patient(consultant)
    (consultant.home / "evidence").mkdir(parents=True, exist_ok=True)
    demo = build_app(consultant, auth=auth)
    demo.launch(server_name=host, server_port=port, inbrowser=False, share=False, auth=auth,
                auth_message="radassist: sign in" if auth else None, prevent_thread_lock=not block,
                allowed_paths=[str(consultant.home / "evidence")], show_error=False, quiet=False)
    return demo
