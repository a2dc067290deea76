"""The verify step of the consult graph: re-ask, re-measure, (on the served path) re-sample, then calibrate.

- paraphrase consistency: the question in other words, routed again by the embedded router;
- perturbation consistency: the answer's units (:func:`tools.verifier.assess`: each finding, "nothing
  else" in each lung zone the answer covers, each change status) re-measured on perturbed regions of
  interest, mapped to P(correct) by the packaged calibration;
- sampling consistency (served orchestrator only): the served model's plan sampled a few times at a
  higher temperature, each plan written as a sentence, the sentences clustered by meaning with the
  MiniLM embeddings (semantic-entropy style); the share of samples in the chosen plan's cluster is the
  agreement. ``RADASSIST_VERIFY_SAMPLES`` sets how many (default 3; 0 turns it off).

The turn's score is the weakest unit's P(correct) times a routing factor from the re-asking agreements.
Units rated low become a caveat saying what a reader should check; each lung zone whose "nothing found"
is rated under high keeps its own check (``details.regions[zone].check``), which the answer shows.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from agents.compose import merge_findings
from agents.planner import EmbeddedPlanner, Planner
from tools import verifier
from tools.cache import CACHE, cached_study
from tools.schemas import level_for

log = logging.getLogger(__name__)

# Priors for answers the perturbation step cannot re-measure:
UNMEASURED_SUPPORT = 0.6  # lesion findings that were not re-measured (a report's, a vision-language model's)
UNVERIFIED_CAP = 0.45  # an answer resting on a vision-language model's words (tool output "unverified")
MAX_REMEASURED = 6  # findings re-measured per answer (largest first): keeps the verifier's cost bounded
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TIMEOUT_S = 20.0
ZONE_CHECK_BELOW = 0.8  # a "nothing found in this zone" rated under "high" carries what a reader should check
SAME_MEANING = 0.9  # cosine of MiniLM sentence vectors above which two readings count as one meaning
LESION_KINDS = ("nodule", "mass", "opacity")


def routing_factor(agreements: list[float]) -> float:
    """1.0 when every re-asking agrees; down to 0.6 when none does."""
    return 0.6 + 0.4 * min(agreements) if agreements else 1.0


# ------------------------------------------------------------------------------------------ sampling
def plan_sentence(plan: dict[str, Any]) -> str:
    """A plan written as a sentence, so that plans can be compared by meaning."""
    if not plan.get("calls"):
        return "answer without looking at the images"
    parts = []
    for c in plan["calls"]:
        a = c.get("args") or {}
        where = ", ".join(a.get("regions") or []) or "the whole chest"
        what = {"detector": f"look for {a.get('lesion_kind') or 'lesions'} ({a.get('want', 'lesions')}) in {where}",
                "comparer": f"compare with the prior study in {where}", "report_writer": "write the radiology report",
                "prognosis": "estimate survival", "verifier": "rate the reliability of the last answer"}
        parts.append(what.get(c["tool"], c["tool"]))
    return "; ".join(parts)


def cluster_by_meaning(texts: list[str], threshold: float = SAME_MEANING) -> list[int]:
    """Greedy clustering of sentences by the cosine of their MiniLM embeddings; returns a cluster id per text."""
    from models.registry import embedder

    vecs = embedder().encode(texts)
    reps: list[int] = []
    labels: list[int] = []
    for i, v in enumerate(vecs):
        for c, r in enumerate(reps):
            if float(v @ vecs[r]) >= threshold:
                labels.append(c)
                break
        else:
            reps.append(i)
            labels.append(len(reps) - 1)
    return labels


def sampling_consistency(planner: Planner | None, question: str, context: dict[str, Any], plan: dict[str, Any],
                         n: int | None = None) -> dict[str, Any] | None:
    """Semantic agreement of n sampled plans of the served orchestrator with the chosen plan (None if not served)."""
    from models.openai_backend import OpenAIChatModel

    n = int(os.environ.get("RADASSIST_VERIFY_SAMPLES", "3")) if n is None else n
    model = getattr(planner, "model", None)
    if n <= 0 or not isinstance(model, OpenAIChatModel):
        return None  # only a served orchestrator is sampled
    if any("did not" in note for note in plan.get("notes") or []):
        return None  # the served model did not answer this turn: nothing to sample
    hot = planner.__class__.__new__(planner.__class__)  # same planner, hotter model
    hot.__dict__.update(planner.__dict__)
    # cheap: short timeout, no retries; the first failed call ends the sampling (a failed call is no sample)
    hot.model = model.model_copy(update={"temperature": SAMPLE_TEMPERATURE, "retries": 0,
                                         "timeout_s": min(float(model.timeout_s), SAMPLE_TIMEOUT_S)})
    samples: list[str] = []
    for _ in range(n):
        p = hot.plan(question, context, []).to_dict()
        if any("did not" in note for note in p.get("notes") or []):
            break
        samples.append(plan_sentence(p))
    if not samples:
        return None
    labels = cluster_by_meaning([plan_sentence(plan)] + samples)
    chosen, rest = labels[0], labels[1:]
    counts = np.bincount(rest)
    probs = counts[counts > 0] / len(rest)
    return {"n": len(samples), "agreement": float(np.mean([c == chosen for c in rest])),
            "clusters": int((counts > 0).sum()),
            "semantic_entropy": round(abs(float((probs * np.log(probs)).sum())), 4),
            "samples": samples}


# ------------------------------------------------------------------------------------------ units
def _zones_answered(plan: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """Lung zones a lesion search of this turn speaks for ("nothing else there")."""
    zones: list[str] = []
    done = {r["tool"] for r in results if r["status"] == "done"}
    for c in plan.get("calls", []):
        a = c.get("args") or {}
        if c["tool"] == "detector" and "detector" in done and a.get("want", "lesions") in ("lesions", "describe") \
                and not a.get("box_mm") and not a.get("finding_ids"):
            zones += verifier.zones_for(list(a.get("regions") or []))
    return list(dict.fromkeys(zones))


def _units(study: dict[str, Any], prior: dict[str, Any] | None, plan: dict[str, Any], results: list[dict[str, Any]],
           findings: list[dict[str, Any]], request: dict[str, Any]) -> list[verifier.Unit]:
    from tools.detector import analyze_series

    series = cached_study(study["path"]).primary
    if series.is_radiograph:  # a chest film: its opacities re-measured on perturbed copies of the film
        from tools.radiograph import analyze_radiograph

        fkey = ("verify-film", series.cache_key, tuple((f["id"], tuple(f.get("bbox_px") or ()), f.get("diameter_mm"))
                                                       for f in findings))
        return CACHE.get_or_compute(repr(fkey), lambda: verifier.film_units(
            series, analyze_radiograph(series), findings, max_findings=MAX_REMEASURED))
    if not series.is_volume or series.modality != "CT":
        return []
    zones = [] if request.get("box_mm") else _zones_answered(plan, results)
    comparison = next((r.get("comparison") for r in results if r.get("comparison")), None)
    pseries = cached_study(prior["path"]).primary if (prior and comparison) else None
    matrix = (comparison or {}).get("registration", {}).get("prior_to_current") if pseries is not None else None
    key = ("verify", series.cache_key, pseries.cache_key if pseries is not None else "",
           tuple((f["id"], tuple(f.get("center_mm") or ()), f.get("diameter_mm"),
                  (f.get("change") or {}).get("status")) for f in findings), tuple(zones))
    return CACHE.get_or_compute(repr(key), lambda: verifier.assess(
        series, analyze_series(series), findings, zones, prior=pseries, prior_to_current=matrix,
        max_findings=MAX_REMEASURED))


def verify_turn(question: str, plan: dict[str, Any], results: list[dict[str, Any]], study: dict[str, Any] | None,
                context: dict[str, Any], planner: Planner | None = None, prior: dict[str, Any] | None = None,
                request: dict[str, Any] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    # Paraphrases are routed by the embedded router: cheap, and independent of a served model's sampling.
    router = EmbeddedPlanner()
    alts = [router.plan(p, context, []).to_dict() for p in verifier.paraphrases(question)]
    para = verifier.plan_agreement(plan, alts)
    sampling = None
    if planner is not None and not isinstance(planner, EmbeddedPlanner):
        try:
            sampling = sampling_consistency(planner, question, context, plan)
        except Exception as exc:  # noqa: BLE001 - sampling is optional; the rest of the verification stands
            log.warning("sampling consistency failed: %s", type(exc).__name__)
    agreements = [para["agreement"]] + ([sampling["agreement"]] if sampling else [])

    merged = merge_findings(results)
    lesions = [f for f in merged if f.get("kind") in LESION_KINDS]
    errors = [r for r in results if r["status"] == "error"]
    units: list[verifier.Unit] = []
    if study and any(r["tool"] in ("detector", "comparer") and r["status"] == "done" for r in results):
        try:
            units = _units(study, prior, plan, results, lesions, request or {})
        except Exception as exc:  # noqa: BLE001 - a verifier failure lowers the score, never ends the turn
            log.exception("verification failed")
            errors.append({"tool": "verifier", "summary": str(exc)})
    film = any(u.info.get("film") for u in units)
    method_cal = "film weights" if film else verifier.score_units(units)
    per_finding: dict[str, float] = {}
    for u in units:
        if u.kind in ("finding", "change") and u.p is not None:
            per_finding[u.key] = round(min(u.p, per_finding.get(u.key, 1.0)), 3)
    if units:
        weakest = min(u.p or 0.0 for u in units)
        score = weakest * routing_factor(agreements)
    else:
        support = UNMEASURED_SUPPORT if lesions else None
        score = verifier.combine({"agreement": min(agreements)}, {}, support)
    if errors:
        score *= 0.5
    ranked = sorted((u for u in units if u.p is not None), key=lambda u: u.p or 0.0)
    low = [u for u in ranked if (u.p or 0.0) < 0.5]
    checks = [verifier.caveat_for(u) for u in (low[:3] if low else ranked[:1] if ranked and (ranked[0].p or 1) < 0.8
                                               else [])]
    if min(agreements) < 0.6:
        checks.append("Other wordings of the question were read differently: check that the answer addresses what "
                      "you meant.")
    if errors:
        checks.append("Part of the request could not be completed (see the steps).")
    if any(r.get("unverified") for r in results):  # a vision-language model's words alone are rated low
        score = min(score, UNVERIFIED_CAP)
        checks.append("The vision-language model's answer rests on no measurement: confirm it on the images.")
    caveat = " ".join(checks)

    measurements = {u.key: u.info["remeasure"] for u in units if u.kind == "finding"}
    regions = {u.key: {"p": round(u.p or 0.0, 3), **{k: v for k, v in u.info.items() if k != "zone"},
                       **({"check": verifier.caveat_for(u)} if (u.p or 0.0) < ZONE_CHECK_BELOW else {})}
               for u in units if u.kind == "region"}
    changes = {u.key: {"p": round(u.p or 0.0, 3), **u.info} for u in units if u.kind == "change"}
    n_pert = sum(m["n"] for m in measurements.values()) + sum(
        (r.get("remeasure") or {}).get("n", 0) for r in regions.values()) + sum(
        (c.get("other") or c.get("prior_remeasure") or {}).get("n", 0) for c in changes.values())
    n_probe = sum((r.get("probe") or {}).get("n", 0) for r in regions.values())
    method = f"self-consistency: {para.get('n', 0)} paraphrases"
    if sampling:
        method += f" + {sampling['n']} sampled plans clustered by meaning"
    if n_pert:
        method += f" + {n_pert} perturbed re-measurements " + (
            "of the film (noise, shift, gamma, blur)" if film else "(shift, rotation, noise, resampling)")
    if n_probe:
        method += f" + {n_probe} injected {verifier.PROBE_D_MM:.0f} mm test nodules (the detector's sensitivity per zone)"
    if film:
        method += f"; {verifier.FILM_CALIBRATION_NOTE}"
    elif units:
        cal = verifier.load_calibration()
        method += (f"; {method_cal} on phantom seeds {cal.seeds[0]}-{cal.seeds[-1]}" if cal and method_cal == "calibrated"
                   else f"; {method_cal}")
    out = {
        "score": round(float(score), 3), "level": level_for(score), "method": method, "caveat": caveat,
        "per_finding": per_finding,
        "details": {"paraphrase": para, "sampling": sampling, "measurements": measurements, "regions": regions,
                    "changes": changes,
                    "units": [{"kind": u.kind, "key": u.key, "p": round(u.p or 0.0, 3)} for u in units],
                    "weakest": ({"kind": ranked[0].kind, "key": ranked[0].key} if ranked else None),
                    "routing_factor": round(routing_factor(agreements), 3),
                    "repeated": {"paraphrases": para.get("n", 0), "samples": (sampling or {}).get("n", 0),
                                 "re_measurements": n_pert, "test_nodules": n_probe}},
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    out["summary"] = verifier.explain(out)
    return out
