"""The embedded router: tools chosen per clause, regions from the lexicon, follow-ups from context."""
from __future__ import annotations

import numpy as np
import pytest

from agents.router import route, split_clauses
from tools import vocab


def tools_of(q: str, ctx: dict | None = None) -> list[str]:
    return [c.tool for c in route(q, ctx).calls]


@pytest.mark.parametrize("q,tools", [
    ("is there a nodule in the right upper lobe?", ["detector"]),
    ("Show me all pulmonary nodules", ["detector"]),
    ("where is the heart?", ["detector"]),
    ("compare with the prior", ["comparer"]),
    ("has the RUL nodule grown?", ["comparer"]),
    ("write it up", ["report_writer"]),
    ("what is the prognosis?", ["prognosis"]),
    ("how sure are you?", ["verifier"]),
])
def test_single_intent(q: str, tools: list[str]) -> None:
    assert tools_of(q) == tools


@pytest.mark.parametrize("q", ["What is the cardiothoracic ratio?", "How big is the heart?", "is the heart enlarged",
                               "any cardiomegaly?", "what's the CTR on this film"])
def test_heart_size_is_an_anatomy_question_about_the_heart(q: str) -> None:
    """Heart size goes to the heart's measurement (its box and, on a film, the cardiothoracic ratio): it was
    refused as out of scope, or searched for nodules "in the heart" ("how big" is a lesion-size cue)."""
    p = route(q)
    assert [(c.tool, c.args["want"], c.args["regions"]) for c in p.calls] == [("detector", "anatomy", ["heart"])]
    # a lesion by the heart is still a lesion search, and a change in heart size a comparison
    assert route("is there a mass next to the heart?").calls[0].args["want"] == "lesions"
    assert tools_of("has the heart size changed since the prior?") == ["comparer"]
    assert tools_of("how has the cardiothoracic ratio changed?") == ["comparer"]
    # in a compound question the heart is that clause's scope only: the comparison still covers every finding
    p = route("compare with the prior and what is the cardiothoracic ratio")
    assert [(c.tool, c.args["regions"]) for c in p.calls] == [("detector", ["heart"]), ("comparer", [])]


def test_costophrenic_angles_are_measured_with_the_lower_zones() -> None:
    """"Are the costophrenic angles blunted?" was refused as out of scope; the film's anatomy answer measures
    both angles and flags blunting."""
    p = route("Are the costophrenic angles blunted?")
    assert [(c.tool, c.args["want"]) for c in p.calls] == [("detector", "anatomy")]
    assert p.calls[0].args["regions"] == ["right lower zone", "left lower zone"]
    assert route("is the right CP angle sharp?").calls[0].args["regions"] == ["right lower zone"]
    assert tools_of("is there an effusion blunting the left costophrenic angle?") == ["vlm"]


def test_compound_question_picks_every_tool() -> None:
    got = tools_of("localise the lesions, compare with the last scan and write it up")
    assert got == ["detector", "comparer", "report_writer"]


def test_clause_splitting() -> None:
    assert split_clauses("find the nodules and compare with the prior, then write the report") == [
        "find the nodules", "compare with the prior", "write the report"]


@pytest.mark.parametrize("q,region", [
    ("any nodule in the RUL?", "right upper zone"), ("masses at the left base?", "left lower zone"),
    ("check the right mid lung", "right middle zone"), ("what about the lingula", "left middle zone"),
    ("anything at the L apex?", "left upper zone"), ("look at the rt base", "right lower zone"),
    ("is the trachea patent", "trachea"), ("the hilum", "mediastinum"),
])
def test_region_lexicon(q: str, region: str) -> None:
    assert region in [m.region for m in vocab.resolve_regions(q)]


def test_lobe_is_flagged_as_approximation() -> None:
    plan = route("is there a nodule in the right upper lobe?")
    assert plan.regions == ["right upper zone"]
    assert plan.approximate == ["right upper lobe"]


def test_followups_resolve_from_context() -> None:
    ctx = {"last_intents": ["detect"], "last_regions": ["right upper zone"], "last_lesion_kind": "nodule"}
    p = route("and the left one?", ctx)
    assert p.followup and p.calls[0].tool == "detector" and p.regions == ["left upper zone"]
    p = route("how big is it?", ctx)
    assert p.calls[0].tool == "detector" and p.regions == ["right upper zone"] and p.lesion_kind == "nodule"


@pytest.mark.parametrize("q", ["what is the weather tomorrow?", "what dose of amoxicillin should I give?",
                               "write me a sonnet about autumn"])
def test_out_of_scope_refused_with_capabilities(q: str) -> None:
    p = route(q)
    assert p.calls == [] and p.reply and "I can find" in p.reply


def test_numpy_minilm_matches_sentence_transformers() -> None:
    """The in-process numpy encoder gives the packaged model's own vectors."""
    from sentence_transformers import SentenceTransformer

    from models.minilm import get_minilm, model_dir

    texts = ["is there a nodule in the right upper lobe?", "compare with the prior scan"]
    ours = get_minilm().encode(texts)
    ref = SentenceTransformer(str(model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.min(np.sum(ours * ref, axis=1)) > 0.9999
