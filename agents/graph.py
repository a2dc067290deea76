"""The consult graph (LangGraph): understand -> [Send] tool agents -> verify -> compose.

``understand`` asks the planner (semantic router, or a served tool-calling LLM) which tool agents the
turn needs; each call is fanned out with ``Send`` and runs in parallel; ``verify`` re-asks and
re-measures to attach a reliability index; ``compose`` writes the answer with its evidence and
updates the conversation context that follow-ups resolve against. A SQLite checkpointer keeps each
thread, so a conversation survives a restart.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from agents.compose import compose, merge_findings
from agents.planner import EmbeddedPlanner, Planner
from agents.state import RESET, ConsultState
from agents.tool_agents import run_tool
from tools.registry import TOOLS

log = logging.getLogger(__name__)


def _emit(event: dict[str, Any]) -> None:
    try:
        get_stream_writer()(event)
    except Exception:  # noqa: BLE001 - outside a streaming run there is no writer
        pass


def build_graph(planner: Planner | None = None, checkpointer: Any = None,
                backend: dict[str, str] | None = None) -> Any:
    planner = planner or EmbeddedPlanner()
    backend = backend or {"orchestrator": "embedded"}

    def understand(state: ConsultState) -> dict[str, Any]:
        plan = planner.plan(state["question"], state.get("context") or {}, state.get("messages", [])[:-1])
        log.info("turn %s plan: tools=%s intents=%s", state.get("turn"), [c.tool for c in plan.calls], plan.intents)
        _emit({"event": "plan", "tools": [c.tool for c in plan.calls], "intents": plan.intents})
        return {"plan": plan.to_dict(), "results": [{RESET: True}], "verification": {}}

    def fan_out(state: ConsultState) -> list[Send] | str:
        calls = state["plan"]["calls"]
        if not calls:
            return "verify"
        ctx = {
            "study": state.get("study"), "prior": state.get("prior"), "request": state.get("request") or {},
            "evidence_dir": (state.get("request") or {}).get("evidence_dir", "."), "question": state["question"],
            "plan": state["plan"], "context": state.get("context") or {},
        }
        return [Send("tool", {"call": c, "ctx": ctx}) for c in calls]

    def tool(payload: dict[str, Any]) -> dict[str, Any]:
        call = payload["call"]
        _emit({"event": "step", "tool": call["tool"], "title": TOOLS[call["tool"]].title, "status": "running"})
        out = run_tool(call["tool"], call["args"], payload["ctx"])
        _emit({"event": "step", "tool": call["tool"], "title": out["title"], "status": out["status"],
               "duration_s": out["duration_s"], "detail": out.get("summary", "")[:500]})
        return {"results": [out]}

    def verify(state: ConsultState) -> dict[str, Any]:
        from agents.verify import verify_turn

        plan = state["plan"]
        results = state.get("results") or []
        if not plan["calls"]:
            return {"verification": {}}
        if all(r["tool"] == "verifier" for r in results):
            return {"verification": (state.get("context") or {}).get("last_verification") or {}}
        _emit({"event": "step", "tool": "verifier", "title": TOOLS["verifier"].title, "status": "running"})
        v = verify_turn(state["question"], plan, results, state.get("study"), state.get("context") or {}, planner,
                        prior=state.get("prior"), request=state.get("request") or {})
        _emit({"event": "step", "tool": "verifier", "title": TOOLS["verifier"].title, "status": "done",
               "duration_s": v.get("duration_s", 0.0), "detail": v.get("summary", "")})
        return {"verification": v}

    def compose_node(state: ConsultState) -> dict[str, Any]:
        results = state.get("results") or []
        v = state.get("verification") or None
        ans = compose(state["question"], state["plan"], results, v, backend, state.get("thread_id", ""),
                      state.get("study"), state.get("prior"))
        ctx = dict(state.get("context") or {})
        plan = state["plan"]
        if plan["calls"] and not all(r["tool"] == "verifier" for r in results):
            ctx["last_intents"] = [i for i in plan["intents"] if i not in ("reliability",)] or ctx.get("last_intents")
            ctx["last_regions"] = plan["regions"]
            ctx["last_lesion_kind"] = plan.get("lesion_kind") or ctx.get("last_lesion_kind")
            lesion_findings = [f for f in merge_findings(results) if f.get("kind") != "anatomy"]
            ctx["last_findings"] = lesion_findings or ctx.get("last_findings", [])
            if v:
                ctx["last_verification"] = v
        for r in results:
            if r.get("prognosis"):
                ctx["clinical"] = r["prognosis"].get("clinical_used") or ctx.get("clinical")
        return {"answer": ans.model_dump(mode="json"), "messages": [AIMessage(ans.answer)], "context": ctx}

    g = StateGraph(ConsultState)
    g.add_node("understand", understand)
    g.add_node("tool", tool)
    g.add_node("verify", verify)
    g.add_node("compose", compose_node)
    g.add_edge(START, "understand")
    g.add_conditional_edges("understand", fan_out, ["tool", "verify"])
    g.add_edge("tool", "verify")
    g.add_edge("verify", "compose")
    g.add_edge("compose", END)
    return g.compile(checkpointer=checkpointer)


def sqlite_checkpointer(path: Path) -> Any:
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    saver = SqliteSaver(conn)
    saver.setup()
    return saver
