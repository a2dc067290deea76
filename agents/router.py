"""Understanding a turn on the embedded default: a semantic router plus the region lexicon.

The question is split into clauses ("localise the lesions, compare with the last scan and write it
up" -> three clauses); each clause is embedded with the packaged MiniLM and compared with exemplar
utterances of each intent (nearest-exemplar similarity), with a few unambiguous cue words as a
second opinion. Regions come from :mod:`tools.vocab` (synonyms, abbreviations, lobes -> zones).
Follow-ups with no intent of their own ("and the left one?", "how big is it?") inherit the last
turn's intent and regions from the conversation context.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from tools import vocab

log = logging.getLogger(__name__)

# intent -> exemplar utterances (written for this project)
EXEMPLARS: dict[str, list[str]] = {
    "detect": [
        "is there a nodule in the right upper lobe", "show me all pulmonary nodules", "find the lesions",
        "any masses at the left base", "are there any nodules", "localise the lesions", "locate the nodules",
        "detect lung nodules", "any suspicious lesions in the lungs", "where is the nodule",
        "is there a mass", "do you see any opacity", "list the nodules with their sizes",
        "how big is it", "what size is the nodule", "measure the lesion", "how large is the mass",
        "anything abnormal in the lungs", "check the lungs for nodules", "point out the tumour",
        "any findings in the right lung", "what about the left lung", "is the lung clear",
    ],
    "locate": [
        "where is the heart", "show me the trachea", "locate the aorta", "where is the spine",
        "highlight the left lung", "outline the mediastinum", "box the right lower zone", "where are the ribs",
        "show the anatomy", "segment the lungs", "where is the carina", "find the main bronchi",
        "what is the cardiothoracic ratio", "is the heart enlarged", "measure the heart size",
    ],
    "describe": [
        "describe the left lower zone", "what is in this region", "what is this", "what lies in this box",
        "tell me about the right upper zone", "what do you see in the left apex", "describe this area",
        "what is at the right base", "characterise this region", "what structures are here",
    ],
    "compare": [
        "compare with the prior", "compare with the last scan", "has the nodule grown", "anything new",
        "what resolved", "how much has the biggest one changed", "is it stable", "any change since last time",
        "compare to the previous study", "did it get bigger", "has anything disappeared", "interval change",
        "what changed since the prior exam", "is the lesion growing", "has it shrunk", "progression",
        "doubling time", "compare current and prior", "follow-up comparison",
    ],
    "report": [
        "write the report", "write it up", "draft a radiology report", "generate a structured report",
        "summarize in a report", "give me the impression", "report the findings", "dictate a report",
        "export the report as DICOM SR", "make a report with comparison and impression",
    ],
    "prognosis": [
        "what is the prognosis", "what is the expected survival", "how long will the patient live",
        "estimate survival", "risk of recurrence", "median survival", "survival probability at one year",
        "what are the chances", "life expectancy", "prognostic estimate for this lung cancer",
        "glioma survival", "what is the outlook",
    ],
    "reliability": [
        "how sure are you", "double-check that", "how reliable is that measurement", "are you certain",
        "how confident are you", "verify that", "can I trust this", "what is the uncertainty",
        "check again", "how accurate is that",
    ],
    "help": [
        "hello", "hi", "what can you do", "help", "how do I use this", "who are you", "thanks",
        "good morning", "what are your capabilities",
    ],
    "visual": [
        "is there a pneumothorax", "any pleural effusion", "describe the image", "what does this image show",
        "any signs of pneumonia", "any rib fractures", "is there emphysema", "any atelectasis",
        "is there pulmonary edema", "describe this scan", "give me a read of this film",
        "are the lines and tubes in a good position", "is there free air under the diaphragm",
        "any interstitial lung disease", "signs of fibrosis", "is there bronchiectasis",
    ],
    "out_of_scope": [
        "what is the weather tomorrow", "write me a poem", "what dose of amoxicillin should I prescribe",
        "book an appointment", "tell me a joke", "what is the capital of France", "how do I cook pasta",
        "translate this into German", "write python code", "what is the stock price", "play music",
        "who won the football match", "prescribe a treatment", "what medication should the patient take",
        "order a pizza", "send an email to the patient",
    ],
}

CUES: dict[str, tuple[str, ...]] = {
    "compare": ("compare", "comparison", "prior", "previous", "last scan", "last study", "earlier", "grown", "grew",
                "growing", "shrunk", "shrank", "resolved", "disappeared", "interval", "changed", "since",
                "progress", "doubling", "new nodule", "anything new", "stable", " grow", "gone", "went away",
                "bigger", "smaller"),
    "report": ("report", "write it up", "write up", "impression", "dictate", "structured report", "sr "),
    "prognosis": ("prognosis", "survival", "survive", "life expectancy", "recurrence", "outlook", "how long will"),
    "reliability": ("how sure", "confident", "confidence", "reliable", "reliability", "double-check", "double check",
                    "certain", "uncertainty", "trust"),
    "detect": ("nodule", "nodules", "mass", "masses", "lesion", "lesions", "opacity", "opacities", "tumour",
               "tumor", "how big", "size", "measure"),
    "describe": ("describe", "what is this", "what is in", "what lies", "what do you see", "characteri"),
    "locate": ("where is the", "where are the", "show me the", "highlight", "outline", "segment"),
    # visual questions the measuring tools cannot answer: they go to the vision-language model
    "visual": ("pneumothora", "effusion", "pleural fluid", "pneumonia", "atelecta", "collapse", "emphysema",
               "fracture", "edema", "oedema", "interstitial", "fibros", "honeycomb", "bronchiectasis", "free air",
               "pneumomediastinum", "tube", "catheter", "pacemaker", "cavitat", "tree-in-bud", "hernia",
               "describe the image", "describe this image", "describe the scan", "describe this scan",
               "describe the film", "describe this film", "describe the study", "describe this study",
               "image show", "scan show", "film show", "read this film", "read the film", "read this image"),
}

# heart size: answered by the heart's box and, on a film, the cardiothoracic ratio (the detector's anatomy answer),
# not by a search for nodules "in the heart"
_HEART_SIZE = re.compile(r"\b(cardio-?thoracic|ctr|cardiomegal\w*|heart size|size of the heart|enlarged heart|heart "
                         r"(?:is |looks? )?(?:enlarged|big|large)|is the heart (?:enlarged|big|large)|how (?:big|large|wide) "
                         r"is the heart|heart(?:'s)? width|width of the heart|measure the heart)\b", re.IGNORECASE)
# the costophrenic angles: measured (and blunting flagged) with the anatomy of the lower zones on a film
_COSTOPHRENIC = re.compile(r"\b(costo-?phrenic|cp angles?|blunt\w*)", re.IGNORECASE)

TOOL_OF = {
    "detect": "detector", "locate": "detector", "describe": "detector", "compare": "comparer",
    "report": "report_writer", "prognosis": "prognosis", "reliability": "verifier", "visual": "vlm",
}

ACCEPT = 0.55  # nearest-exemplar cosine that accepts an intent on its own
OOS_MARGIN = 0.03

CAPABILITIES = (
    "I can find, box and measure lung nodules and anatomy on chest CT and radiographs (\"is there a nodule in the "
    "right upper lobe?\", \"where is the heart?\", \"describe the left base\"), compare with the prior study "
    "(\"has it grown?\"), write a structured report, estimate survival with a validated model, and tell you how "
    "reliable each answer is; visual questions (\"is there a pneumothorax?\") go to a vision-language model when "
    "one is configured. I support decisions; I do not diagnose or prescribe."
)


@dataclass
class ToolCall:
    tool: str
    args: dict[str, Any]


@dataclass
class Plan:
    calls: list[ToolCall]
    intents: list[str]
    regions: list[str]
    approximate: list[str] = field(default_factory=list)  # lobe words mapped to zones
    lesion_kind: str | None = None
    reply: str | None = None  # set for help / out-of-scope: answer without tools
    followup: bool = False
    scores: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": [{"tool": c.tool, "args": c.args} for c in self.calls],
            "intents": self.intents, "regions": self.regions, "approximate": self.approximate,
            "lesion_kind": self.lesion_kind, "reply": self.reply, "followup": self.followup,
            "scores": {k: round(v, 3) for k, v in self.scores.items()}, "notes": self.notes,
        }


class _Index:
    def __init__(self) -> None:
        from models.registry import embedder

        self.emb = embedder()
        self.labels: list[str] = []
        texts: list[str] = []
        for intent, ex in EXEMPLARS.items():
            texts += ex
            self.labels += [intent] * len(ex)
        self.vecs = self.emb.encode(texts)
        self.label_arr = np.array(self.labels)

    def scores(self, clauses: list[str]) -> list[dict[str, float]]:
        if not clauses:
            return []
        q = self.emb.encode(clauses)
        sims = q @ self.vecs.T
        out = []
        for row in sims:
            out.append({intent: float(row[self.label_arr == intent].max()) for intent in EXEMPLARS})
        return out


@lru_cache(maxsize=1)
def _index() -> _Index:
    return _Index()


_SPLIT = re.compile(r"\s*(?:[,;.!?]|\bthen\b|\band then\b|\balso\b|\band\b(?=\s+(?:compare|write|show|find|"
                    r"localis|localiz|locate|give|estimate|tell|describe|check|report|what|how|is|are|has|any|draft|"
                    r"make|list|measure)))\s*", re.IGNORECASE)


def split_clauses(text: str) -> list[str]:
    parts = [p.strip() for p in _SPLIT.split(text) if p and p.strip()]
    return [p for p in parts if len(p) > 1] or [text.strip()]


def _cue_hits(clause: str) -> set[str]:
    t = f" {clause.lower()} "
    return {intent for intent, cues in CUES.items() if any(c in t for c in cues)}


def route(question: str, context: dict[str, Any] | None = None) -> Plan:
    """Turn one clinician message into the tool calls it needs."""
    context = context or {}
    q = question.strip()
    mentions = vocab.resolve_regions(q)
    regions = [m.region for m in mentions if m.region not in ("body",)]
    approximate = [m.lobe for m in mentions if m.approximate and m.lobe]
    lesion = vocab.lesion_kind(q)
    clauses = split_clauses(q)
    clause_scores = _index().scores(clauses)
    intents: list[str] = []
    best: dict[str, float] = {}
    clause_rows: list[tuple[list[str], list[str], str | None]] = []
    for clause, sc in zip(clauses, clause_scores):
        for k, v in sc.items():
            best[k] = max(best.get(k, -1.0), v)
        cues = _cue_hits(clause)
        top = max(sc, key=lambda k: sc[k])
        chosen: list[str] = []
        # cue words take priority; the embedding alone decides only where no cue word is present
        if top not in ("out_of_scope", "help") and sc[top] >= ACCEPT and (
                top in cues or (not cues and sc[top] > sc["out_of_scope"] + 0.08)):
            chosen.append(top)
        for c in cues:
            # a cue word is a second opinion; accept when the embedding does not flatly disagree
            if c not in chosen and sc.get(c, 0) >= ACCEPT - 0.2:
                chosen.append(c)
        if "reliability" in chosen and "detect" in chosen and not lesion:
            chosen.remove("detect")
        if "visual" in chosen:  # "describe the image", "is there an effusion at the left base": the VLM's
            chosen = [c for c in chosen if c not in ("describe", "locate")]
        if "compare" in chosen and "detect" in chosen and not (vocab.lesion_kind(clause) and
                                                                ("any" in clause.lower() or "find" in clause.lower())):
            chosen.remove("detect")
        heart_size = bool(_HEART_SIZE.search(clause)) and not vocab.lesion_kind(clause)
        cp_angle = bool(_COSTOPHRENIC.search(clause)) and not vocab.lesion_kind(clause)
        if heart_size or cp_angle:  # "what is the CTR?", "are the CP angles blunted?": measurements, not a lesion search
            chosen = [c for c in chosen if c not in ("detect", "describe", "out_of_scope", "help")]
            if "compare" in cues and "compare" not in chosen:  # "how has the CTR changed?": in scope, trust the cue
                chosen.append("compare")
            if "compare" not in chosen and "visual" not in chosen and "locate" not in chosen:
                chosen.insert(0, "locate")
        if not chosen and (vocab.resolve_regions(clause) or vocab.lesion_kind(clause)):
            oos_like = sc["out_of_scope"] > max(v for k, v in sc.items() if k != "out_of_scope") + OOS_MARGIN
            if not oos_like:
                chosen.append("describe" if vocab.resolve_regions(clause) and not vocab.lesion_kind(clause)
                              else "detect")
        for c in chosen:
            if c not in intents:
                intents.append(c)
        c_regions = [m.region for m in vocab.resolve_regions(clause) if m.region != "body"]
        extra: list[str] = ["heart"] if heart_size else []
        if cp_angle:
            side = vocab.side_words(clause)
            extra += [f"{sd} lower zone" for sd in ("right", "left") if side in (None, sd)]
        for r in extra:
            if r not in c_regions:
                c_regions.append(r)
            if r not in regions and len(clauses) == 1:  # else the other clauses' tools keep their own scope
                regions.append(r)
        if not c_regions and clause_rows and chosen and clause_rows[-1][1]:
            c_regions = list(clause_rows[-1][1])  # "is there a nodule in the RUL and how big is it"
        clause_rows.append((chosen, c_regions, vocab.lesion_kind(clause)))

    followup = False
    if not intents:
        top = max(best, key=lambda k: best[k]) if best else "out_of_scope"
        last = context.get("last_intents") or []
        short = len(q.split()) <= 6
        side = vocab.side_words(q)
        if last and short and (side or regions or top in ("detect", "describe", "locate") or _is_anaphora(q)):
            followup = True
            intents = [i for i in last if i not in ("reliability", "help")] or ["detect"]
        elif top == "help" and best[top] >= ACCEPT:
            return Plan([], ["help"], regions, reply=CAPABILITIES, scores=best)
        else:
            return Plan([], ["out_of_scope"], regions, reply=(
                "That is outside what I can help with here. " + CAPABILITIES), scores=best)

    # follow-ups resolve regions and lesion kind from context
    if not regions:
        side = vocab.side_words(q)
        last_regions = context.get("last_regions") or []
        if side and last_regions:
            regions = [vocab.swap_side(r) if vocab.BY_NAME.get(r) and vocab.BY_NAME[r].side != side else r
                       for r in last_regions]
            if regions == last_regions and not any(vocab.BY_NAME.get(r, vocab.Region("x")).side for r in regions):
                regions = [f"{side} lung"]
            followup = True
        elif side:
            regions = [f"{side} lung"]
        elif (followup or (_is_anaphora(q) and len(q.split()) <= 8 and not lesion)) and last_regions:
            regions = list(last_regions)
            followup = True
    if lesion is None and (followup or _is_anaphora(q)):
        lesion = context.get("last_lesion_kind")

    calls: list[ToolCall] = []
    detector_wants: list[str] = []
    for intent in intents:
        tool = TOOL_OF.get(intent)
        if tool is None:
            continue
        if tool == "detector":
            want = {"detect": "lesions", "locate": "anatomy", "describe": "describe"}[intent]
            if want == "anatomy" and lesion:
                want = "lesions"
            detector_wants.append(want)
            continue
        if any(c.tool == tool for c in calls):
            continue
        if tool == "comparer":
            calls.append(ToolCall(tool, {"regions": regions, "focus": _compare_focus(q)}))
        elif tool == "report_writer":
            calls.append(ToolCall(tool, {"include_comparison": True}))
        elif tool == "prognosis":
            calls.append(ToolCall(tool, {"clinical": {}, "question": "recurrence" if "recurr" in q.lower()
                                         else "survival"}))
        elif tool == "verifier":
            calls.append(ToolCall(tool, {"recheck": any(w in q.lower() for w in ("double", "check", "verify"))}))
        elif tool == "vlm":
            calls.append(ToolCall(tool, {"question": q, "regions": regions}))
    if detector_wants:
        det_calls = _detector_calls(clause_rows, regions, lesion, followup)
        ids = _finding_ids(q, regions, context, followup)
        if ids and len(det_calls) == 1:
            det_calls[0].args["finding_ids"] = ids
        calls[0:0] = det_calls
    return Plan(calls, intents, regions, approximate=approximate, lesion_kind=lesion, followup=followup, scores=best)


WANT_OF = {"detect": "lesions", "locate": "anatomy", "describe": "describe"}


def _detector_calls(rows: list[tuple[list[str], list[str], str | None]], regions: list[str], lesion: str | None,
                    followup: bool) -> list[ToolCall]:
    """One detector call per distinct (want, regions) of the clauses: "any nodules? where is the heart?"
    is a whole-chest lesion search and an anatomy question, not a search for nodules in the heart."""
    wanted: list[tuple[str, list[str], str | None]] = []
    for chosen, c_regions, c_lesion in rows:
        for intent in chosen:
            if intent in WANT_OF:
                want = WANT_OF[intent]
                if want == "anatomy" and c_lesion:
                    want = "lesions"
                wanted.append((want, c_regions, c_lesion))
    if followup or not wanted:
        want = "lesions"
        if rows and any(i in WANT_OF for ch, _, _ in rows for i in ch):
            want = next(WANT_OF[i] for ch, _, _ in rows for i in ch if i in WANT_OF)
        if want == "anatomy" and lesion:
            want = "lesions"
        return [ToolCall("detector", {"regions": regions, "lesion_kind": lesion, "want": want})]
    if len(wanted) == 1:
        want, c_regions, _ = wanted[0]
        return [ToolCall("detector", {"regions": c_regions or regions, "lesion_kind": lesion, "want": want})]
    calls: list[ToolCall] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    whole_chest_lesions = any(w == "lesions" and not r for w, r, _ in wanted)
    for want, c_regions, c_lesion in wanted:
        if want == "lesions" and whole_chest_lesions:
            c_regions = []
        key = (want, tuple(c_regions))
        if key in seen:
            continue
        seen.add(key)
        kind = (c_lesion or lesion) if want == "lesions" else c_lesion
        calls.append(ToolCall("detector", {"regions": c_regions, "lesion_kind": kind, "want": want}))
    return calls


_FID = re.compile(r"\b([FR]\d+)\b", re.IGNORECASE)
_SINGULAR = re.compile(r"\b(it|its|that one|this one|the one|that nodule|this nodule|that lesion|this lesion)\b",
                       re.IGNORECASE)


def _finding_ids(q: str, regions: list[str], context: dict[str, Any], followup: bool) -> list[str]:
    """Findings a turn points at: named ids ("F2"), or "it" after an answer with several findings."""
    named = [m.upper() for m in _FID.findall(q)]
    if named:
        return list(dict.fromkeys(named))
    last = [f for f in context.get("last_findings") or [] if f.get("center_mm")]
    if not (followup or _is_anaphora(q)) or not _SINGULAR.search(q) or len(last) < 2:
        return []
    if regions:
        last = [f for f in last if f.get("region") and any(vocab.contains(r, f["region"]) for r in regions)]
    if not last:
        return []
    return [max(last, key=lambda f: f.get("diameter_mm") or 0.0)["id"]]


_ANAPHORA = re.compile(r"\b(it|its|that|this one|that one|the one|them|those|these|same)\b", re.IGNORECASE)


def _is_anaphora(q: str) -> bool:
    return bool(_ANAPHORA.search(q)) or q.strip().lower().startswith(("and ", "what about", "how about"))


def _compare_focus(q: str) -> str:
    t = q.lower()
    for word, focus in (("new", "new"), ("resolv", "resolved"), ("disappear", "resolved"), ("grow", "grew"),
                        ("grew", "grew"), ("bigger", "grew"), ("shr", "shrank"), ("smaller", "shrank"),
                        ("biggest", "largest"), ("largest", "largest"), ("stable", "stable")):
        if word in t:
            return focus
    return "all"
