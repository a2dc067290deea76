"""The consult graph with a tool-calling fake chat model, and on the embedded router.

The fake model is a real LangChain ``BaseChatModel`` whose ``bind_tools`` returns itself and whose
replies are scripted tool calls, so the graph's planner path (tool schemas -> tool calls -> typed
args -> Send fan-out -> verify -> compose) runs for real without a model server.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from agents.engine import Consultant
from agents.planner import ChatModelPlanner, tool_schemas
from tools.registry import TOOL_NAMES


class FakeToolModel(BaseChatModel):
    script: list[AIMessage]
    seen: list[list[BaseMessage]] = []
    bound: list[dict] = []

    @property
    def _llm_type(self) -> str:
        return "fake-tool-calling"

    def bind_tools(self, tools: Sequence[Any], **kw: Any) -> "FakeToolModel":
        self.bound = list(tools)
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kw: Any) -> ChatResult:
        self.seen.append(list(messages))
        msg = self.script.pop(0) if self.script else AIMessage("I can only help with chest imaging.")
        return ChatResult(generations=[ChatGeneration(message=msg)])


def call(name: str, args: dict, i: int = 0) -> dict:
    return {"name": name, "args": args, "id": f"call_{name}_{i}", "type": "tool_call"}


def test_tool_schemas_cover_the_registry() -> None:
    names = [t["function"]["name"] for t in tool_schemas()]
    assert names == list(TOOL_NAMES)
    det = next(t for t in tool_schemas() if t["function"]["name"] == "detector")
    assert "regions" in det["function"]["parameters"]["properties"]


def test_fake_model_drives_fan_out_and_follow_up(tmp_path, phantom_patient) -> None:
    model = FakeToolModel(script=[
        AIMessage("", tool_calls=[call("detector", {"regions": ["lungs"], "lesion_kind": "nodule"}),
                                  call("comparer", {"focus": "all"}, 1)]),
        AIMessage("", tool_calls=[call("detector", {"regions": ["not a region"], "want": "anatomy"}),
                                  call("no_such_tool", {})]),
    ])
    c = Consultant(home_dir=tmp_path, planner=ChatModelPlanner(model, label="fake"))
    assert model.bound, "the planner must bind the registry's tools"
    steps: list[dict] = []
    a = c.ask("nodules and change please", study=phantom_patient["current"], prior=phantom_patient["prior"],
              on_step=steps.append)
    assert a.tools[:2] == ["detector", "comparer"] and "verifier" in a.tools
    assert any(s.get("status") == "running" for s in steps) and any(s.get("status") == "done" for s in steps)
    assert a.findings and all(f.bbox_mm for f in a.findings if f.center_mm)
    assert a.backend["orchestrator"] == "fake"
    # invalid region and unknown tool are dropped, the valid call still runs
    b = c.ask("where are things", thread_id=a.thread_id)
    assert b.tools[0] == "detector"
    # the second planner call saw the conversation so far
    assert any("nodules and change please" in str(m.content) for m in model.seen[-1])


def test_model_without_tool_calls_falls_back_or_refuses(tmp_path, phantom_patient) -> None:
    model = FakeToolModel(script=[AIMessage("Sorry, I only do imaging."), AIMessage("I cannot do that.")])
    c = Consultant(home_dir=tmp_path, planner=ChatModelPlanner(model, label="fake"))
    a = c.ask("Show me all pulmonary nodules", study=phantom_patient["current"])
    assert "detector" in a.tools  # the router saw a tool request the model did not act on
    b = c.ask("what's the weather in Paris?", thread_id=a.thread_id)
    assert b.tools == [] and b.findings == []


def test_conversation_survives_restart(tmp_path, phantom_patient) -> None:
    c1 = Consultant(home_dir=tmp_path)
    a = c1.ask("is there a nodule in the right upper lobe?", study=phantom_patient["current"])
    del c1
    c2 = Consultant(home_dir=tmp_path)  # a new process would do the same: state comes from SQLite
    hist = c2.history(a.thread_id)
    assert hist[0]["content"].startswith("is there a nodule") and hist[1]["role"] == "assistant"
    b = c2.ask("and the left one?", thread_id=a.thread_id)
    assert b.thread_id == a.thread_id
    assert all((f.side in (None, "left")) for f in b.findings if f.kind != "anatomy")
    assert "left" in b.answer.lower()


def test_threads_are_isolated(tmp_path, phantom_patient) -> None:
    c = Consultant(home_dir=tmp_path)
    a = c.ask("where is the heart?", study=phantom_patient["current"])
    b = c.ask("how big is it?")  # a new thread with no study
    assert b.thread_id != a.thread_id
    assert b.findings == []


def test_out_of_scope_gets_short_refusal(tmp_path) -> None:
    c = Consultant(home_dir=tmp_path)
    a = c.ask("Please prescribe an antibiotic dose")
    assert a.tools == [] and "I can find" in a.answer
    assert a.reliability.method == "no measurement in this answer"


def test_reliability_question_answers_from_last_turn(tmp_path, phantom_patient) -> None:
    c = Consultant(home_dir=tmp_path)
    a = c.ask("Show me all pulmonary nodules", study=phantom_patient["current"])
    b = c.ask("how sure are you?", thread_id=a.thread_id)
    assert b.tools == ["verifier"]
    assert b.reliability.score == pytest.approx(a.reliability.score)
    assert "re-measurement" in b.answer or "paraphrase" in b.answer or "wordings" in b.answer
