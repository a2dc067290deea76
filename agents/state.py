"""The consult graph's typed state and its reducers.

Only small, serialisable things live here (ids, findings, evidence paths, the plan); volumes and
masks live in :data:`tools.cache.CACHE`, keyed by study/series UID. The SQLite checkpointer stores
this state per thread, so a conversation survives a restart.
"""
from __future__ import annotations

from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages

RESET = "__reset__"


def merge_results(left: list[dict[str, Any]] | None, right: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Tool outputs of the current turn: parallel tool agents append; a new turn starts from empty.

    A right-hand list whose first item is ``{"__reset__": True}`` replaces the left one.
    """
    left = left or []
    right = right or []
    if right and right[0].get(RESET):
        return list(right[1:])
    return left + right


class ConsultState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    thread_id: str
    turn: int
    question: str
    study: dict[str, Any] | None  # {"path", "study_uid", "date", "modality"}
    prior: dict[str, Any] | None
    request: dict[str, Any]  # per-turn extras: box_mm, clinical, evidence_dir
    plan: dict[str, Any]
    results: Annotated[list[dict[str, Any]], merge_results]
    verification: dict[str, Any]
    answer: dict[str, Any]
    context: dict[str, Any]  # carried across turns: last intents/regions/findings/verification
