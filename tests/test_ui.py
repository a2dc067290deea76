"""The web UI (ui/app.py): handlers on a scripted consultant, then the real app served in-process and
driven through ``gradio_client`` (the /ask, /chat, /upload and /studies endpoints)."""
from __future__ import annotations

import hashlib
import importlib.util
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.errors import ConfigError, StudyError
from tools.schemas import Answer, Reliability
from ui import app as ui_app


def _have_phantom() -> bool:
    try:
        from tools.phantom import write_patient  # noqa: F401
    except ImportError:
        return False
    return True


HAVE_PHANTOM = _have_phantom()
HAVE_DETECTOR = importlib.util.find_spec("tools.detector") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _text(msg: dict[str, Any]) -> str:
    """A chat message's text, whether served (list of parts) or local (str)."""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def _answer(text: str, thread_id: str) -> Answer:
    return Answer(answer=text, tools=["detector"], findings=[], evidence=[],
                  reliability=Reliability(score=0.9, level="high", method="scripted", details={"n": 1}),
                  backend={"orchestrator": "fake"}, thread_id=thread_id)


# ------------------------------------------------------------------------------------------------
# Handlers on a scripted consultant (no server)
# ------------------------------------------------------------------------------------------------
class ScriptedConsultant:
    """Emits a plan and one tool step, waits until the UI has shown the running step, then answers."""

    def __init__(self, home: Path, fail: Exception | None = None) -> None:
        self.home = home
        self.fail = fail
        self.seen_running = threading.Event()
        self.threads: list[str | None] = []

    def ask(self, question: str, study: Any = None, prior: Any = None, thread_id: str | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None, **_: Any) -> Answer:
        self.threads.append(thread_id)
        if self.fail is not None:
            raise self.fail
        assert on_step is not None
        on_step({"event": "plan", "tools": ["detector"], "intents": ["detect"]})
        on_step({"event": "step", "tool": "detector", "title": "Grounded detector", "status": "running"})
        assert self.seen_running.wait(10), "the UI did not show the running step before the answer"
        on_step({"event": "step", "tool": "detector", "title": "Grounded detector", "status": "done",
                 "duration_s": 0.42, "detail": "2 nodules found."})
        return _answer("Two nodules.", thread_id or "")


def test_chat_handler_streams_pending_then_done(tmp_path: Path) -> None:
    fake = ScriptedConsultant(tmp_path)
    app = ui_app.App(fake)  # type: ignore[arg-type]
    saw_pending = False
    final: tuple[Any, ...] = ()
    for out in app.chat("Show me all pulmonary nodules", [], None, "auto", None):
        history = out[0]
        steps = [m for m in history if m.get("metadata", {}).get("title") == "Grounded detector"]
        if steps and steps[-1]["metadata"]["status"] == "pending":
            saw_pending = True
            fake.seen_running.set()
        final = out
    assert saw_pending
    history, box, thread_id = final[0], final[1], final[2]
    assert box == "" and thread_id and fake.threads == [thread_id]
    step = next(m for m in history if m.get("metadata", {}).get("title") == "Grounded detector")
    assert step["metadata"]["status"] == "done" and step["metadata"]["duration"] == pytest.approx(0.42)
    assert step["content"] == "2 nodules found."
    assert history[-1] == {"role": "assistant", "content": "Two nodules."}
    assert "high" in final[4] and "<details>" in final[4]  # reliability badge
    # the same session keeps its thread; a second session gets its own
    fake.seen_running.set()
    list(app.chat("and the left?", history, None, "auto", thread_id))
    list(app.chat("hello", [], None, "auto", None))
    assert fake.threads[1] == thread_id and fake.threads[2] not in (None, thread_id)


def test_chat_handler_shows_clear_errors(tmp_path: Path) -> None:
    app = ui_app.App(ScriptedConsultant(tmp_path, fail=StudyError("This study has no image series.")))  # type: ignore[arg-type]
    *_, last = app.chat("hello", [], None, "auto", "t1")
    assert last[0][-1] == {"role": "assistant", "content": "This study has no image series."}
    app = ui_app.App(ScriptedConsultant(tmp_path, fail=ValueError("internal detail")))  # type: ignore[arg-type]
    *_, last = app.chat("hello", [], None, "auto", "t1")
    assert last[0][-1]["content"] == ui_app.GENERIC_ERROR and "internal detail" not in last[0][-1]["content"]


def test_users_file_and_host_guard(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("# clinicians\nalice:" + hashlib.sha256(b"s3cret").hexdigest() + "\n\n")
    check = ui_app.make_auth(users)
    assert check("alice", "s3cret") and not check("alice", "wrong") and not check("bob", "s3cret")
    bad = tmp_path / "bad.txt"
    bad.write_text("alice:plaintext\n")
    with pytest.raises(ConfigError, match="line 1"):
        ui_app.load_users(bad)
    with pytest.raises(ConfigError, match="without sign-in"):
        ui_app.launch_demo(host="0.0.0.0", port=_free_port(), auth_file=None, block=False)


# ------------------------------------------------------------------------------------------------
# The real app, served in-process
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from gradio_client import Client

    from agents.engine import Consultant

    home = tmp_path_factory.mktemp("ui_home")
    consultant = Consultant(home_dir=home)
    imported = ui_app.prepare_demo_patient(consultant) if HAVE_PHANTOM else []
    demo = ui_app.build_app(consultant)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, server_name="127.0.0.1", quiet=True,
                allowed_paths=[str(home / "evidence")])
    try:
        # download_files=False: keep the answer's evidence dicts ({"path": ...}) as the server sent them
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        yield {"client": client, "consultant": consultant, "imported": imported, "port": port}
    finally:
        demo.close()


def _current_uid(served: dict[str, Any]) -> str:
    if not served["imported"]:
        pytest.skip("no demo patient in the store (tools.phantom not available)")
    return str(max(served["imported"], key=lambda r: r.study_date or "").study_uid)


def test_studies_endpoint_lists_newest_first_with_pseudonyms(served: dict[str, Any]) -> None:
    studies = served["client"].predict(api_name="/studies")
    if not served["imported"]:
        assert studies == []
        pytest.skip("tools.phantom not available: demo patient not written")
    demo_uids = {r.study_uid for r in served["imported"]}
    studies = [s for s in studies if s["study_uid"] in demo_uids]
    assert len(studies) == 2 and studies[0]["date"] > studies[1]["date"]
    real_ids = {r.patient_id for r in served["consultant"].store.list_studies()}
    for s in studies:
        assert s["patient"].startswith("P-") and s["patient"] not in real_ids
        assert not any(pid and pid in s["label"] for pid in real_ids)
    prior = ui_app.prior_choices(served["consultant"], studies[0]["study_uid"])
    assert prior[0][1] == ui_app.AUTO_PRIOR and studies[1]["label"] in prior[0][0]


@pytest.mark.skipif(not (HAVE_PHANTOM and HAVE_DETECTOR), reason="tools.phantom / tools.detector not available yet")
def test_ask_endpoint_nodules_and_follow_up(served: dict[str, Any]) -> None:
    client = served["client"]
    uid = _current_uid(served)
    ans = client.predict("Show me all pulmonary nodules", uid, "ui-thread-1", api_name="/ask")
    assert ans["thread_id"] == "ui-thread-1" and "detector" in ans["tools"]
    nodules = [f for f in ans["findings"] if f["kind"] != "anatomy"]
    assert nodules and all(f["diameter_mm"] for f in nodules)
    images = [e for e in ans["evidence"] if e["kind"] == "image"]
    assert images and all(Path(e["path"]).is_file() for e in images)
    # narrow down, then a follow-up with a pronoun on the same thread (no study given: the thread's)
    rul = client.predict("Is there a nodule in the right upper lobe?", "", "ui-thread-1", api_name="/ask")
    rul_lesions = [f for f in rul["findings"] if f["kind"] != "anatomy"]
    rul_ids = {f["id"] for f in rul_lesions}
    assert rul_ids and all(f["zone"] == "upper" and f["side"] == "right" for f in rul_lesions)
    follow = client.predict("how big is it?", "", "ui-thread-1", api_name="/ask")
    assert follow["thread_id"] == "ui-thread-1" and "mm" in follow["answer"]
    follow_ids = {f["id"] for f in follow["findings"] if f["kind"] != "anatomy"}
    assert follow_ids and follow_ids <= rul_ids


def test_chat_endpoint_streams_steps_and_answer(served: dict[str, Any]) -> None:
    # runs after the /ask test, so on the demo patient the analysis is cached and the turn is quick
    uid = _current_uid(served) if served["imported"] else None
    job = served["client"].submit("Is there a nodule in the right upper lobe?", [], uid, "auto", api_name="/chat")
    final = job.result(timeout=150)
    history = final[0]
    steps = [m for m in history if (m.get("metadata") or {}).get("title")]
    assert any("detector" in m["metadata"]["title"].lower() for m in steps)
    assert all(m["metadata"].get("status") == "done" for m in steps)
    assert history[-1]["role"] == "assistant" and not history[-1].get("metadata")
    assert "Decision support" in _text(history[-1])
    assert len(job.outputs()) >= 3  # user echo, step updates, answer: it streamed
    if served["imported"]:
        gallery, findings = final[2], final[4]
        assert gallery and findings["data"] and findings["data"][0][0].startswith("F")


def test_bad_upload_shows_clear_error_and_session_continues(served: dict[str, Any], tmp_path: Path) -> None:
    from gradio_client import handle_file

    client = served["client"]
    bad = tmp_path / "bad.dcm"
    bad.write_text("this is not a DICOM file\n")
    out = client.predict([handle_file(str(bad))], [], api_name="/upload")
    history = out[2]
    msg = _text(history[-1])
    assert history[-1]["role"] == "assistant"
    assert "could not be imported" in msg and "bad.dcm" in msg and "not a DICOM file" in msg
    assert "Traceback" not in msg
    assert not list((served["consultant"].home / "uploads").glob("*"))  # staging cleaned up
    final = client.submit("hello", history, None, "auto", api_name="/chat").result(timeout=120)
    assert final[0][-1]["role"] == "assistant" and "nodule" in _text(final[0][-1]).lower()


def test_upload_imports_and_selects_the_study(served: dict[str, Any], tmp_path: Path) -> None:
    import shutil
    import time

    from gradio.utils import get_upload_folder
    from gradio_client import handle_file
    from pydicom.data import get_testdata_file

    client = served["client"]
    src = tmp_path / "CT_small.dcm"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), src)
    t0 = time.time() - 1
    out = client.predict([handle_file(str(src))], [], api_name="/upload")
    left = [p for p in Path(get_upload_folder()).rglob("CT_small.dcm") if p.stat().st_mtime >= t0]
    assert not left  # the server's upload cache no longer holds the study
    uid = out[0]["value"] if isinstance(out[0], dict) else out[0]  # the picker's update
    rec = served["consultant"].store.get(uid)
    assert rec is not None and rec.modality == "CT"
    assert "Imported 1 study" in _text(out[2][-1])
    final = client.submit("Show me all pulmonary nodules", out[2], uid, "auto", api_name="/chat").result(timeout=150)
    steps = [m for m in final[0] if "detector" in ((m.get("metadata") or {}).get("title") or "").lower()]
    assert steps and "skipped" not in steps[0]["metadata"]["title"]  # the study was open for the detector
    assert final[0][-1]["role"] == "assistant" and not final[0][-1].get("metadata")


def test_film_pair_upload_report_and_evidence(served: dict[str, Any], tmp_path: Path) -> None:
    """Two DX films of one patient dropped into the UI: the newer is selected, the older found as its prior;
    "write the report" answers with the chest-film report (its impression in the chat), the film comparison's
    before/after and difference images in the gallery, and the opacities in the findings table."""
    from gradio_client import handle_file

    from tools.drr import write_drr_patient

    write_drr_patient(tmp_path / "films", 9)
    client = served["client"]
    files = [handle_file(str(p)) for p in sorted((tmp_path / "films").rglob("*.dcm"))]
    out = client.predict(files, [], api_name="/upload")
    uid = out[0]["value"] if isinstance(out[0], dict) else out[0]
    rec = served["consultant"].store.get(uid)
    assert rec is not None and rec.modality == "DX" and "Imported 2 study" in _text(out[2][-1])
    final = client.submit("write the report", out[2], uid, "auto", api_name="/chat").result(timeout=300)
    text = _text(final[0][-1])
    assert "Chest film report drafted" in text and "IMPRESSION" in text, text[:400]
    assert "increased from" in text  # compared with the prior film found in the store (seed 9's grown nodule)
    gallery, findings = final[2], final[4]
    assert gallery and len(gallery) >= 2
    ids = [row[0] for row in findings["data"]]
    assert any(i.startswith("F") for i in ids)


def test_evidence_panel_from_answer(tmp_path: Path) -> None:
    from PIL import Image

    from tools.schemas import Change, Evidence, Finding, Report, ReportSentence

    img = tmp_path / "F1.png"
    Image.new("L", (8, 8)).save(img)
    ans = _answer("One nodule grew.", "t").model_copy(update={
        "findings": [Finding(id="F1", kind="nodule", region="right upper zone", diameter_mm=8.14, reliability=0.91,
                             change=Change(status="grew", prior_diameter_mm=6.0, interval_days=343))],
        "evidence": [Evidence(kind="image", path=str(img), caption="F1 key image", finding_ids=["F1"]),
                     Evidence(kind="image", path=str(tmp_path / "missing.png"), caption="gone")],
        "report": Report(sections={"findings": "An 8 mm nodule.", "impression": "Growing nodule."},
                         sentences=[ReportSentence(text="An 8 mm nodule.", finding_ids=["F1"])], lung_rads="4A"),
    })
    gallery, badge, rows, report, files = ui_app.panel(ans)
    assert gallery == [(str(img), "F1 key image [F1]")]
    assert rows == [["F1", "nodule", "right upper zone", "8.1 mm", "grew, prior 6.0 mm, 343 d", "0.91"]]
    assert "Growing nodule." in report and "4A" in report and "high (0.90)" in badge
    assert files is None


# ------------------------------------------------------------------------------------------------
# Sessions, uploads, clickable evidence (no server)
# ------------------------------------------------------------------------------------------------
def _req(user: str) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(username=user)


def test_conversations_belong_to_their_user(tmp_path: Path) -> None:
    fake = ScriptedConsultant(tmp_path)
    fake.seen_running.set()
    app = ui_app.App(fake, auth_enabled=True)  # type: ignore[arg-type]
    *_, last = app.chat("nodules in the right upper lobe?", [], None, "auto", None, request=_req("alice"))
    alice_thread = last[2]
    assert [c["thread_id"] for c in app.conversations.list("alice")] == [alice_thread]
    assert app.conversations.list("bob") == []
    assert app.conversation_choices("bob") == [] and "right upper lobe" in app.conversation_choices("alice")[0][0]
    # bob cannot continue alice's thread: he gets a new one, and alice's is untouched
    *_, last = app.chat("how big is it?", [], None, "auto", alice_thread, request=_req("bob"))
    assert last[2] != alice_thread and fake.threads[-1] == last[2]
    assert "another user" in _text(last[0][0])
    assert app.conversations.owner(alice_thread) == "alice" and app.conversations.owner(last[2]) == "bob"
    # nor reopen it, nor ask on it through the API
    with pytest.warns(UserWarning, match="not one of yours"):
        out = app.open_conversation(alice_thread, request=_req("bob"))
    assert all(isinstance(v, dict) and set(v) <= {"__type__"} for v in out)  # nothing changed
    import gradio as gr

    with pytest.raises(gr.Error, match="another user"):
        app.ask_api("how big is it?", "", alice_thread, request=_req("bob"))
    # the same thread keeps going for its owner
    *_, last = app.chat("and the left?", [], None, "auto", alice_thread, request=_req("alice"))
    assert last[2] == alice_thread


def test_upload_limit_and_cache_cleanup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ScriptedConsultant(tmp_path / "home")
    big = tmp_path / "big.dcm"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    with pytest.raises(ui_app.RadAssistError, match="limit is 1 MB"):
        ui_app.import_uploads(fake, [str(big)], max_mb=1)  # type: ignore[arg-type]
    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    inside = cache / "abc123" / "study.dcm"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    outside = tmp_path / "keep.dcm"
    outside.write_bytes(b"y")
    assert ui_app.discard_uploads([str(inside), str(outside)]) == 1
    assert not inside.exists() and not inside.parent.exists() and cache.exists() and outside.exists()


def test_before_after_wipe_and_blend(tmp_path: Path) -> None:
    from PIL import Image

    w, h = 40, 30
    pair = Image.new("RGB", (2 * w + 4, h), (0, 0, 0))
    pair.paste(Image.new("RGB", (w, h), (200, 200, 200)), (0, 0))
    pair.paste(Image.new("RGB", (w, h), (100, 100, 100)), (w + 4, 0))
    path = tmp_path / "compare_F1.png"
    pair.save(path)
    cur, pri = ui_app.split_pair(path)
    assert cur.shape == pri.shape and cur.shape[1] >= 384  # upscaled for legibility
    assert (cur == 200).all() and (pri == 100).all()
    assert (ui_app.compose_pair(cur, pri, 100) == 200).all()
    assert (ui_app.compose_pair(cur, pri, 0) == 100).all()
    half = ui_app.compose_pair(cur, pri, 50)
    assert half[0, 0, 0] == 200 and half[0, -1, 0] == 100
    assert (ui_app.compose_pair(cur, pri, 25, "blend") == 125).all()
    from tools.schemas import Evidence

    ans = _answer("compared", "t").model_copy(update={"evidence": [
        Evidence(kind="image", path=str(path), caption="F1 grew: current vs prior", finding_ids=["F1"],
                 role="before-after")]})
    assert ui_app.before_after_choices(ans) == [("F1 grew: current vs prior", "0")]
    app = ui_app.App(ScriptedConsultant(tmp_path))  # type: ignore[arg-type]
    extras = app.extras(ans)
    assert extras[3]["value"] == "0" and extras[5] is not None and extras[7]["selected"] == "compare"
    assert (app.wipe("0", 100, "wipe", ans) == 200).all()


def test_boxes_on_the_slice_and_report_sentences(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from tools.schemas import Evidence, Finding, Report, ReportSentence

    class FakeSeries:
        series_uid, modality, photometric = "S1", "CT", "MONOCHROME2"
        pixels = np.full((5, 20, 30), -1000.0, dtype=np.float32)
        direction = np.diag([-1.0, 1.0, 1.0])  # columns run to the patient's right: displayed flipped
        shape = (5, 20, 30)

    f1 = Finding(id="F1", kind="nodule", bbox_vox=[2, 3, 1, 5, 6, 2], slice_index=2, series_uid="S1",
                 study_uid="ST", diameter_mm=6.0)
    f2 = Finding(id="F2", kind="nodule", bbox_vox=[10, 10, 4, 12, 12, 4], slice_index=4, series_uid="S1",
                 study_uid="ST")
    img, boxes = ui_app.slice_annotations(FakeSeries(), [f1, f2], 2)
    scale = img.shape[1] // 30
    assert img.shape == (20 * scale, 30 * scale, 3) and [lab for _, lab in boxes] == ["F1 nodule 6.0 mm"]
    x0, y0, x1, y1 = boxes[0][0]
    assert x0 == (29 - 5 - 2) * scale and y0 == (3 - 2) * scale  # flipped columns, 2 px padding
    assert x1 > x0 and y1 > y0
    png = tmp_path / "F1.png"
    Image.new("L", (8, 8)).save(png)
    ans = _answer("report", "t").model_copy(update={
        "findings": [f1, f2],
        "evidence": [Evidence(kind="image", path=str(png), caption="F1 key image", finding_ids=["F1"]),
                     Evidence(kind="image", path=str(png), caption="F2 key image", finding_ids=["F2"])],
        "report": Report(sections={"findings": "..."}, sentences=[
            ReportSentence(text="Technique.", finding_ids=[]),
            ReportSentence(text="F2 is small.", finding_ids=["F2"])])})
    assert ui_app.sentence_choices(ans) == [("F2 is small.", "1")]
    app = ui_app.App(ScriptedConsultant(tmp_path))  # type: ignore[arg-type]
    app._series_for = lambda answer, f: FakeSeries()  # type: ignore[method-assign]
    gallery, keyimg, pick, sent_img = app.select_sentence("1", ans)
    assert [c for _, c in gallery] == ["F2 key image [F2]"]
    assert pick["value"] == "F2" and keyimg[1][0][1].startswith("F2") and sent_img is keyimg
    assert app.extras(ans)[7]["selected"] == "report"


def test_point_to_box_mm_respects_display_flips_and_upscaling() -> None:
    import numpy as np

    from tools.study import Series
    from ui.app import point_to_box_mm

    s = Series(series_uid="1", modality="CT", pixels=np.zeros((20, 128, 128), np.float32), spacing=(1.0, 1.0, 2.0),
               origin=np.array([-64.0, -64.0, 0.0]), direction=np.eye(3))
    # 128 px wide is shown upscaled x3; a click at display (30, 60) is voxel (10, 20)
    box = point_to_box_mm(s, 5, 30, 60)
    assert [round((box[i] + box[i + 3]) / 2, 1) for i in range(3)] == [-54.0, -44.0, 10.0]
    flipped = Series(series_uid="2", modality="CT", pixels=s.pixels, spacing=s.spacing,
                     origin=np.array([64.0, -64.0, 0.0]), direction=np.diag([-1.0, 1.0, 1.0]))
    box = point_to_box_mm(flipped, 5, 30, 60)  # columns displayed mirrored: voxel i = 127 - 10
    assert round((box[0] + box[3]) / 2, 1) == round(64.0 - 117.0, 1)


def test_pointing_asks_what_lies_there(tmp_path, phantom_patient) -> None:
    import gradio as gr
    import numpy as np

    from agents.engine import Consultant
    from ui import app as ui_app

    c = Consultant(home_dir=tmp_path / "home")
    recs = c.store.import_path(phantom_patient["current"])
    app = ui_app.App(c)
    uid = recs[0].study_uid
    tid, _ = app.claim(None, ui_app.user_of(None), uid, "point")
    ans = c.ask("Show me all pulmonary nodules", study=c.store.path_of(uid), thread_id=tid)
    f = next(x for x in ans.findings if x.kind in ("nodule", "mass"))
    ctx = app.point_context(f.id, ans)
    series = c.open_study(c.store.path_of(uid))[0].primary
    ci, cj, _ = series.mm_to_vox(f.center_mm)
    scale = int(np.ceil(384 / series.shape[2])) if series.shape[2] < 384 else 1
    evt = gr.SelectData(target=None, data={"index": [ci * scale, cj * scale], "value": None})
    box, msg = app.point_select(ctx, ans, evt)
    assert box and "Pointed at" in msg
    assert all(box[i] <= f.center_mm[i] <= box[i + 3] for i in range(3))
    out = list(app.chat_point([], uid, None, tid, box))[-1]
    history = out[0]
    assert history[-1]["role"] == "assistant" and f.id in history[-1]["content"]


def test_every_event_handler_takes_its_inputs(tmp_path: Path) -> None:
    """Gradio warns (and the click then fails) when a handler's signature does not match its inputs, e.g. a
    ``request`` parameter without the ``gr.Request`` annotation that makes Gradio fill it in."""
    import warnings

    from agents.engine import Consultant

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ui_app.build_app(Consultant(home_dir=tmp_path / "home"))
    bad = [str(w.message) for w in caught if "arguments for function" in str(w.message)]
    assert bad == []


def test_image_cache_writes_are_atomic_and_reused(tmp_path: Path) -> None:
    """The same slice or box mask returned again (every streamed update of a turn) must not rewrite the
    file a browser may be fetching: Gradio's own writer truncated it in place and a fetch failed with
    "Too little data for declared Content-Length", leaving the image blank."""
    import numpy as np
    from gradio import processing_utils as pu
    from PIL import Image

    ui_app._install_atomic_image_cache()
    ui_app._install_atomic_image_cache()  # idempotent
    img = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))
    first = Path(pu.save_pil_to_cache(img, str(tmp_path), format="png"))
    data = first.read_bytes()
    ino = first.stat().st_ino
    # the name is the content's hash: a file there is reused as it is, never truncated and rewritten
    marked = bytearray(data)
    marked[-1] ^= 0xFF
    first.write_bytes(bytes(marked))
    with first.open("rb") as reader:  # a fetch in progress
        again = Path(pu.save_pil_to_cache(img, str(tmp_path), format="png"))
        assert again == first and again.stat().st_ino == ino
        assert reader.read() == bytes(marked) == again.read_bytes()
    # a short file (a write cut off) is replaced by a whole new one, renamed into place
    first.write_bytes(data[: len(data) // 2])
    assert Path(pu.save_pil_to_cache(img, str(tmp_path), format="png")) == first
    assert first.read_bytes() == data and first.stat().st_ino != ino
    # numpy arrays (gr.Image) and AnnotatedImage masks take the same path; nothing half-written is left
    arr_path = Path(pu.save_img_array_to_cache(np.asarray(img), str(tmp_path), format="png"))
    assert arr_path.read_bytes() == data
    import gradio as gr

    out = gr.AnnotatedImage(format="png").postprocess((np.asarray(img), [((4, 4, 20, 20), "N1")]))
    mask = Path(out.annotations[0].image.path)
    assert mask.is_file() and Image.open(mask).size == (64, 64)
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]
