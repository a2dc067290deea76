"""The served vision-language model path: routing, requests on the wire, fallbacks, boxes as findings.

No VLM weights exist offline, so the request path runs against the REAL llama.cpp server (SmolLM2, a
text-only model) behind a recording proxy on real sockets: the proxy keeps every request body, so
the tests see exactly what would leave the process (image parts, their count, the geometry text, no
identifiers). llama.cpp's server rejects image parts for a text-only chat template with HTTP 500;
that rejection must become a visible fallback note. Grounding answers are replayed by the same proxy
in the published box formats (no upstream), because no grounding model runs here.
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from agents.router import route
from models.registry import RoleConfig, doctor_report
from test_served import ALIAS, Server
from tools.dicom_io import load_study
from tools.vlm import ask_visual_question

Reply = Callable[[dict[str, Any]], str]


class RecordingProxy:
    """A tiny HTTP proxy on a free loopback port: forwards to ``upstream`` (or answers with ``reply``,
    an OpenAI chat completion built from the request) and records every POST body and answer status."""

    def __init__(self, upstream: str | None = None, reply: Reply | None = None) -> None:
        self.upstream = re.sub(r"/v1/?$", "", upstream.rstrip("/")) if upstream else None  # paths come whole
        self.reply = reply
        self.bodies: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.answers: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:  # quiet
                pass

            def _send(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if proxy.upstream is None:
                    data = {"object": "list", "data": [{"id": "replay-vlm", "object": "model"}]}
                    self._send(200, json.dumps(data).encode() if self.path.endswith("/models") else b"{}")
                    return
                r = httpx.get(proxy.upstream + self.path, timeout=30)
                self._send(r.status_code, r.content)

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = json.loads(raw)
                proxy.bodies.append(body)
                if proxy.reply is not None:
                    text = proxy.reply(body)
                    data = {"id": "r", "object": "chat.completion", "model": body.get("model"),
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}]}
                    proxy.statuses.append(200)
                    proxy.answers.append(text)
                    self._send(200, json.dumps(data).encode())
                    return
                r = httpx.post(proxy.upstream + self.path, content=raw, timeout=120,
                               headers={"Content-Type": "application/json"})
                proxy.statuses.append(r.status_code)
                proxy.answers.append(r.text)
                self._send(r.status_code, r.content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def image_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"]
            if p.get("type") == "image_url"]


def text_of(body: dict[str, Any]) -> str:
    out = []
    for m in body["messages"]:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        out += [p["text"] for p in parts if p.get("type") == "text"]
    return "\n".join(out)


def decode_png(part: dict[str, Any]) -> Image.Image:
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.fixture(scope="module")
def llama() -> Iterator[Server]:
    s = Server()
    s.start()
    yield s
    s.stop()


@pytest.fixture()
def proxy(llama: Server) -> Iterator[RecordingProxy]:
    p = RecordingProxy(upstream=llama.url)
    yield p
    p.stop()


def vision_env(monkeypatch: pytest.MonkeyPatch, url: str, model: str, box: str = "grid1000",
               max_images: int = 3) -> None:
    monkeypatch.setenv("RADASSIST_VISION_BACKEND", "openai")
    monkeypatch.setenv("RADASSIST_VISION_URL", url)
    monkeypatch.setenv("RADASSIST_VISION_MODEL", model)
    monkeypatch.setenv("RADASSIST_VISION_BOX", box)
    monkeypatch.setenv("RADASSIST_VISION_MAX_IMAGES", str(max_images))


# -- routing -------------------------------------------------------------------------------------------
# phrasings that are neither router exemplars nor in the bench set
@pytest.mark.parametrize("q", ["Could there be a small pneumothorax at the apex?", "What does the scan show overall?",
                               "Is there a pleural effusion on the right?", "any evidence of pulmonary fibrosis?"])
def test_visual_questions_route_to_the_vlm(q: str) -> None:
    assert [c.tool for c in route(q).calls] == ["vlm"]


@pytest.mark.parametrize("q,want", [("describe the left lower zone", "describe"), ("where is the heart?", "anatomy")])
def test_region_questions_stay_with_the_detector(q: str, want: str) -> None:
    calls = route(q).calls
    assert [c.tool for c in calls] == ["detector"] and calls[0].args["want"] == want


def test_compound_visual_and_lesion_question() -> None:
    assert [c.tool for c in route("any nodules, and is there a pneumothorax?").calls] == ["detector", "vlm"]


# -- no VLM configured -----------------------------------------------------------------------------------
def test_without_a_vlm_the_answer_says_so(tmp_path: Path, phantom_patient: dict) -> None:
    from agents.engine import Consultant

    c = Consultant(home_dir=tmp_path)
    t0 = time.time()
    a = c.ask("Is there a pneumothorax?", study=phantom_patient["current"])
    assert time.time() - t0 < 60
    assert a.tools[0] == "vlm" and a.findings == []
    assert "needs a vision-language model" in a.answer and "embedded tools can instead" in a.answer
    assert "unverified" not in a.answer  # nothing was asked of a model, so nothing is claimed


# -- the real llama.cpp server behind the recording proxy --------------------------------------------
def test_doctor_shows_the_vision_role_and_its_health(proxy: RecordingProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    vision_env(monkeypatch, proxy.url, ALIAS, box="pixels", max_images=2)
    row = next(r for r in doctor_report() if r["role"] == "vision")
    assert row["uses"] == f"openai:{ALIAS}" and row["healthy"] is True
    assert row["box"] == "pixels" and row["max_images"] == 2
    assert "absolute pixels" in row["why"] and "at most 2 images" in row["why"]
    monkeypatch.setenv("RADASSIST_VISION_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    row = next(r for r in doctor_report() if r["role"] == "vision")
    assert row["healthy"] is False and "falling back" in row["why"]


def test_image_request_on_the_wire_and_the_real_servers_rejection(proxy: RecordingProxy,
                                                                   phantom_patient: dict, tmp_path: Path) -> None:
    study = load_study(phantom_patient["current"])
    rc = RoleConfig(role="vision", backend="openai", url=proxy.url, model=ALIAS, max_images=3, retries=1,
                    timeout_s=30)
    name_part = study.patient_name.split("^")[-1]
    q = f"Is there a pneumothorax in {name_part} ({study.patient_id})?"
    t0 = time.time()
    res = ask_visual_question(study, q, rc, evidence_dir=tmp_path)
    assert time.time() - t0 < 30
    # llama.cpp's server cannot put image parts into a text-only chat template: HTTP 500, retried, then a note
    assert proxy.statuses and all(s == 500 for s in proxy.statuses) and len(proxy.bodies) == rc.retries + 1
    assert "concatenate" in proxy.answers[0]
    assert res.status == "failed" and "did not answer" in res.notes[0] and ALIAS in res.notes[0]
    assert "not answered" in res.answer and "embedded tools can instead" in res.answer
    body = proxy.bodies[0]
    parts = image_parts(body)
    assert len(parts) == rc.max_images
    for part, img in zip(parts, res.images):
        png = decode_png(part)
        assert png.size == (img.width, img.height) and png.mode == "L"  # plain grayscale: nothing drawn on it
    text = text_of(body)
    assert "pneumothorax" in text and text.count("mm per pixel") == rc.max_images and "Axial CT slice" in text
    for ident in (study.patient_name, name_part, study.patient_id, study.accession):
        assert ident and ident.lower() not in json.dumps(body).lower()
    assert len(res.evidence) == rc.max_images and all(Path(e.path).is_file() for e in res.evidence)


def test_max_images_bounds_every_request(proxy: RecordingProxy, phantom_patient: dict) -> None:
    study = load_study(phantom_patient["current"])
    for n in (1, 5):
        proxy.bodies.clear()
        rc = RoleConfig(role="vision", backend="openai", url=proxy.url, model=ALIAS, max_images=n, retries=0)
        ask_visual_question(study, "describe the image", rc)
        assert [len(image_parts(b)) for b in proxy.bodies] == [n]


def test_the_proxy_passes_real_answers(proxy: RecordingProxy) -> None:
    body = {"model": ALIAS, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]}
    r = httpx.post(proxy.url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and proxy.statuses == [200] and proxy.bodies == [body]
    assert r.json()["choices"][0]["message"]["content"].strip()


# -- grounding: replayed answers in the model's box convention -------------------------------------
def _truth_reply(truth_nodules: list[dict[str, Any]], shape: tuple[int, int, int], extra_box: list[int]) -> Reply:
    """Answers like MedRegA (0-999 grid): every truth nodule crossing the slice sent, plus ``extra_box``
    (a 0-999 box that is no truth nodule) on the first slice asked."""
    nk, nj, ni = shape
    asked: list[int] = []

    def reply(body: dict[str, Any]) -> str:
        m = re.search(r"Axial CT slice (\d+) of", text_of(body))
        assert m, "the geometry names the slice"
        k = int(m.group(1)) - 1
        asked.append(k)
        out = []
        for t in truth_nodules:
            i0, j0, k0, i1, j1, k1 = t["bbox_vox"]
            if k0 <= k <= k1:
                g = [int(i0 / ni * 1000), int(j0 / nj * 1000), round((i1 + 1) / ni * 1000) - 1,
                     round((j1 + 1) / nj * 1000) - 1]
                out.append(f"<ref>nodule</ref><box>[[{g[0]},{g[1]},{g[2]},{g[3]}]]</box>")
        if len(asked) == 1:
            out.append(f"<ref>nodule</ref><box>[[{','.join(map(str, extra_box))}]]</box>")
        return " ".join(out) or "none"

    return reply


def test_detector_asks_the_vlm_for_boxes_then_falls_back(tmp_path: Path, phantom_patient: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.engine import Consultant

    study = load_study(phantom_patient["current"])
    nods = [n["current"] for n in phantom_patient["truth"]["nodules"] if n.get("current")]
    # a 0-999 box in the right lung's lateral middle (image left, mid-height) where no truth nodule lies
    extra = [250, 480, 262, 492]
    replay = RecordingProxy(reply=_truth_reply(nods, study.primary.shape, extra))
    try:
        vision_env(monkeypatch, replay.url, "replay-vlm", box="grid1000", max_images=3)
        c = Consultant(home_dir=tmp_path)
        a = c.ask("Show me all pulmonary nodules", study=phantom_patient["current"])
    finally:
        replay.stop()
    assert 1 <= len(replay.bodies) <= 3 and all(len(image_parts(b)) == 1 for b in replay.bodies)
    embedded = [f for f in a.findings if f.source is None and f.kind != "anatomy"]
    vlm = [f for f in a.findings if f.source == "vlm"]
    asked = [int(re.search(r"slice (\d+) of", text_of(b)).group(1)) - 1 for b in replay.bodies]
    assert {f.slice_index for f in embedded[:3]} <= set(asked)  # the findings' own slices are shown first
    assert vlm and all(f.diameter_mm is None and f.volume_mm3 is None and f.bbox_mm for f in vlm)
    assert "Model observations without measurement" in a.answer and "unverified" in a.answer
    assert any("Also boxed by the vision-language model" in n for f in embedded for n in f.notes)
    assert all(f.id.startswith("V") and "replay-vlm" in f.notes[0] for f in vlm)

    # the VLM server is gone: the embedded answer stands, with a visible note, quickly
    t0 = time.time()
    b = c.ask("is there a nodule in the right upper lobe?", thread_id=a.thread_id)
    assert time.time() - t0 < 60
    assert "vision-language model (openai:replay-vlm) did not answer" in b.answer
    assert not any(f.source == "vlm" for f in b.findings) and b.tools[0] == "detector"


def test_a_vlm_without_a_box_format_is_not_asked_for_boxes(tmp_path: Path, phantom_patient: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.tool_agents import _vlm_boxes
    from tools.registry import DetectorArgs

    replay = RecordingProxy(reply=lambda body: "<ref>nodule</ref><box>[[100,100,200,200]]</box>")
    try:
        cfg = tmp_path / "models.yaml"
        ctx = {"evidence_dir": str(tmp_path)}
        study = load_study(phantom_patient["current"])
        for grounding, n_requests in (("false", 0), ("true", 1)):
            cfg.write_text(f"vision: {{backend: openai, model: medgemma, url: '{replay.url}', max_images: 1, "
                           f"grounding: {grounding}}}\n")
            monkeypatch.setenv("RADASSIST_MODELS", str(cfg))
            replay.bodies.clear()
            findings, _, summary = _vlm_boxes(study, DetectorArgs(), ctx, [], [], "No nodule found.", [])
            assert len(replay.bodies) == n_requests
            assert bool(findings) == bool(n_requests) and ("Model observations" in summary) == bool(n_requests)
    finally:
        replay.stop()


def test_an_answered_visual_question_is_marked_unverified_and_rated_low(tmp_path: Path, phantom_patient: dict,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.engine import Consultant

    replay = RecordingProxy(reply=lambda body: "No pneumothorax is seen on these slices.")
    try:
        vision_env(monkeypatch, replay.url, "replay-vlm", max_images=2)
        a = Consultant(home_dir=tmp_path).ask("Is there a pneumothorax?", study=phantom_patient["current"])
    finally:
        replay.stop()
    assert a.tools[0] == "vlm" and len(replay.bodies) == 1 and len(image_parts(replay.bodies[0])) == 2
    assert "No pneumothorax is seen on these slices." in a.answer and "unverified" in a.answer
    assert "openai:replay-vlm" in a.answer and a.findings == []
    assert a.reliability.level == "low" and "rests on no measurement" in a.answer
    inputs = [e for e in a.evidence if e.role == "vlm-input"]
    assert len(inputs) == 2 and all(Path(e.path).is_file() and "mm per pixel" in e.caption for e in inputs)
