"""The consultation engine: the one entry point the CLI and the web UI share.

``Consultant.ask`` validates and loads the study (clear errors for bad input, before any tool runs),
finds the prior in the local study store when none is given, runs the consult graph on the thread's
checkpointed state, and returns the typed :class:`tools.schemas.Answer`. Tool steps are streamed to an
optional ``on_step`` callback while they run. Turns pass a FIFO gate (a bounded number at once, the rest
in arrival order), and each answered turn is appended to the audit log (no identifiers in clear).
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage

from agents.audit import AuditLog
from agents.gate import FairGate
from agents.graph import build_graph, sqlite_checkpointer
from agents.planner import EmbeddedPlanner, Planner
from models.registry import backend_summary, home, load_config
from tools.cache import cached_study
from tools.comparer import check_pair
from tools.errors import StudyError
from tools.schemas import Answer
from tools.study import Study

log = logging.getLogger(__name__)


def _study_ref(study: Study, path: str) -> dict[str, Any]:
    return {"path": path, "study_uid": study.study_uid, "date": study.date_str, "modality": study.modality,
            "description": study.description}


class Consultant:
    def __init__(self, home_dir: Path | None = None, planner: Planner | None = None,
                 models_config: str | Path | None = None) -> None:
        from tools.store import StudyStore

        self.home = Path(home_dir) if home_dir else home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.config = load_config(models_config)
        self.planner = planner or self._planner_from_config()
        self.backend = backend_summary(self.config)
        if planner is not None:
            self.backend["orchestrator"] = getattr(planner, "name", "custom")
        self.store = StudyStore(self.home / "store")
        self.checkpointer = sqlite_checkpointer(self.home / "conversations.sqlite")
        self.graph = build_graph(self.planner, self.checkpointer, self.backend)
        self._lock = threading.Lock()
        self.gate = FairGate()
        self.audit = AuditLog(self.home)

    def _planner_from_config(self) -> Planner:
        rc = self.config["orchestrator"]
        if rc.backend == "openai":
            from agents.planner import ChatModelPlanner, StructuredOutputPlanner
            from models.openai_backend import OpenAIChatModel

            model = OpenAIChatModel.from_config(rc)
            # "tools": native tool calling (vLLM with --tool-call-parser); "json": schema-constrained output
            if str(rc.extra.get("planning", os.environ.get("RADASSIST_ORCHESTRATOR_PLANNING", "tools"))) == "json":
                return StructuredOutputPlanner(model, label=rc.label())
            return ChatModelPlanner(model, label=rc.label())
        return EmbeddedPlanner()

    # -- studies -------------------------------------------------------------------------------------
    def open_study(self, path: str | Path) -> tuple[Study, dict[str, Any]]:
        p = str(Path(path).resolve())
        if not Path(p).exists():
            raise StudyError(f"No file or folder at {Path(path).name!s}: check the path.")
        study = cached_study(p)
        return study, _study_ref(study, p)

    def resolve_prior(self, study: Study, prior: str | Path | None) -> dict[str, Any] | None:
        if prior:
            pstudy, ref = self.open_study(prior)
            check_pair(study, pstudy)
            return ref
        rec = self.store.find_prior(study)
        if rec is None:
            return None
        pstudy, ref = self.open_study(self.store.path_of(rec.study_uid))
        return ref

    # -- conversation --------------------------------------------------------------------------------
    def ask(self, question: str, study: str | Path | None = None, prior: str | Path | None = None,
            thread_id: str | None = None, box_mm: list[float] | None = None,
            clinical: dict[str, Any] | None = None,
            on_step: Callable[[dict[str, Any]], None] | None = None, user: str | None = None) -> Answer:
        question = (question or "").strip()
        if not question:
            raise StudyError("Please type a question.")
        if len(question) > 4000:
            raise StudyError("That message is too long (over 4000 characters); please shorten it.")
        thread_id = thread_id or uuid.uuid4().hex[:16]
        config = {"configurable": {"thread_id": thread_id}}
        snapshot = self.graph.get_state(config)
        prev = snapshot.values if snapshot and snapshot.values else {}

        study_ref = prev.get("study")
        prior_ref = prev.get("prior")
        if study is not None:
            st, study_ref = self.open_study(study)
            prior_ref = self.resolve_prior(st, prior)
        elif prior is not None and study_ref:
            st = cached_study(study_ref["path"])
            prior_ref = self.resolve_prior(st, prior)
        elif study_ref:
            # reopened conversation: make sure its study is still readable
            cached_study(study_ref["path"])

        turn = int(prev.get("turn", 0)) + 1
        evidence_dir = self.home / "evidence" / thread_id / f"turn{turn:03d}"
        evidence_dir.mkdir(parents=True, exist_ok=True)
        inputs = {
            "messages": [HumanMessage(question)], "question": question, "thread_id": thread_id, "turn": turn,
            "study": study_ref, "prior": prior_ref,
            "request": {"box_mm": box_mm, "clinical": clinical or {}, "evidence_dir": str(evidence_dir)},
        }
        final: dict[str, Any] = {}

        def step(event: dict[str, Any]) -> None:
            if on_step is not None:
                try:
                    on_step(event)
                except Exception:  # noqa: BLE001 - a UI callback must not break the turn
                    log.exception("step callback failed")

        with self.gate.slot(on_wait=lambda n: step({"event": "queued", "position": n})):
            for mode, chunk in self.graph.stream(inputs, config, stream_mode=["custom", "values"]):
                if mode == "custom":
                    step(chunk)
                elif mode == "values":
                    final = chunk
        answer = Answer(**final["answer"])
        self._audit(answer, question, user, thread_id, turn, study_ref, prior_ref)
        return answer

    def _audit(self, answer: Answer, question: str, user: str | None, thread_id: str, turn: int,
               study_ref: dict[str, Any] | None, prior_ref: dict[str, Any] | None) -> None:
        try:
            self.audit.record_turn(
                user=user, thread_id=thread_id, turn=turn, question=question,
                study_uid=(study_ref or {}).get("study_uid"), prior_uid=(prior_ref or {}).get("study_uid"),
                tools=answer.tools, models=answer.backend, evidence=[e.path for e in answer.evidence],
                reliability=answer.reliability.level if answer.reliability else None, answer=answer.answer,
                n_findings=len(answer.findings))
        except OSError as exc:  # the answer stands; the failure is loud in the log
            log.error("audit log write failed (%s): turn %d of thread %s is not audited", exc, turn, thread_id)

    def history(self, thread_id: str) -> list[dict[str, Any]]:
        snap = self.graph.get_state({"configurable": {"thread_id": thread_id}})
        if not snap or not snap.values:
            return []
        out = []
        for m in snap.values.get("messages", []):
            out.append({"role": "user" if m.type == "human" else "assistant", "content": str(m.content)})
        return out

    def last_answer(self, thread_id: str) -> Answer | None:
        snap = self.graph.get_state({"configurable": {"thread_id": thread_id}})
        if not snap or not snap.values or "answer" not in snap.values:
            return None
        return Answer(**snap.values["answer"])

    def thread_study(self, thread_id: str) -> dict[str, Any] | None:
        snap = self.graph.get_state({"configurable": {"thread_id": thread_id}})
        return (snap.values or {}).get("study") if snap else None
