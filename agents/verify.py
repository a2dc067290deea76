"""The verify step of the consult graph: paraphrase re-routing (needs the planner) + tool re-measurement."""
from __future__ import annotations

import logging
import time
from typing import Any

from agents.compose import merge_findings
from agents.planner import EmbeddedPlanner, Planner
from tools import verifier
from tools.cache import cached_study
from tools.schemas import level_for

log = logging.getLogger(__name__)

# Priors for answers the perturbation step cannot re-measure (to be calibrated on phantoms, issue 7):
NEGATIVE_SUPPORT = 0.8  # "none found": bounded by the detector's sensitivity
UNMEASURED_SUPPORT = 0.6  # findings that were not re-measured (radiographs, pixel units)
MAX_REMEASURED = 6  # findings re-measured per answer (largest first): keeps the verifier's cost bounded


def verify_turn(question: str, plan: dict[str, Any], results: list[dict[str, Any]], study: dict[str, Any] | None,
                context: dict[str, Any], planner: Planner | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    # Paraphrases are routed by the embedded router: cheap, and independent of a served model's sampling.
    router = EmbeddedPlanner()
    alts = [router.plan(p, context, []).to_dict() for p in verifier.paraphrases(question)]
    para = verifier.plan_agreement(plan, alts)

    per_finding: dict[str, float] = {}
    measurements: dict[str, Any] = {}
    findings = [f for f in merge_findings(results) if f.get("kind") in ("nodule", "mass", "opacity")
                and f.get("center_mm") and f.get("units", "mm") == "mm"]
    findings.sort(key=lambda f: -(f.get("diameter_mm") or 0))
    errors = [r for r in results if r["status"] == "error"]
    if findings and study:
        series = cached_study(study["path"]).primary
        for f in findings[:MAX_REMEASURED]:
            r = verifier.perturb_remeasure(series, f, n=8, seed=abs(hash(f["id"])) % 2**32)
            per_finding[f["id"]] = round(verifier.finding_score(r, f.get("diameter_mm")), 3)
            measurements[f["id"]] = {"n": r.n, "found": r.found, "mean_mm": round(r.mean_mm, 2),
                                     "spread_mm": round(r.spread_mm, 2)}
    lesion_search = any(r["tool"] in ("detector", "comparer") and r["status"] == "done" for r in results)
    all_lesions = [f for f in merge_findings(results) if f.get("kind") in ("nodule", "mass", "opacity")]
    negative_support = None
    if lesion_search and not all_lesions:
        # a "none found" answer is only as good as the detector's sensitivity: never rated as certain
        negative_support = NEGATIVE_SUPPORT
    elif all_lesions and not per_finding:
        negative_support = UNMEASURED_SUPPORT  # findings in pixels / on films are not re-measured yet
    score = verifier.combine(para, per_finding, negative_support)
    if errors:
        score *= 0.5
    caveat = ""
    weak = [fid for fid, s in per_finding.items() if s < 0.5]
    if weak:
        caveat = (f"{', '.join(weak)} did not hold up under re-measurement: check these on the images before "
                  "relying on their size or presence.")
    elif para["agreement"] < 0.6:
        caveat = "Other wordings of the question were read differently: check that the answer addresses what you meant."
    elif errors:
        caveat = "Part of the request could not be completed (see the steps)."
    n_pert = sum(m["n"] for m in measurements.values())
    method = f"self-consistency: {para.get('n', 0)} paraphrases"
    if n_pert:
        method += f" + {n_pert} perturbed re-measurements (shift, rotation, noise, resampling)"
    out = {
        "score": round(score, 3), "level": level_for(score), "method": method, "caveat": caveat,
        "per_finding": per_finding,
        "details": {"paraphrase": para, "measurements": measurements,
                    "repeated": {"paraphrases": para.get("n", 0), "re_measurements": n_pert}},
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    out["summary"] = verifier.explain(out)
    return out
