"""Answer composition: one clinician-facing answer from the turn's tool outputs, with its evidence.

Every answer says what was measured, shows where (findings with boxes, evidence images), and how
sure it is (the reliability index). Decision support, not diagnosis.
"""
from __future__ import annotations

from typing import Any

from tools import vocab
from tools.schemas import Answer, Change, Evidence, Finding, Reliability, Report, Step, level_for

DISCLAIMER = "Decision support only: confirm on the images before acting."


def merge_findings(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Findings of all tools, one per id; the comparer's (with change) win over the detector's."""
    order = {"detector": 0, "report_writer": 1, "comparer": 2, "verifier": -1}
    merged: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: order.get(r["tool"], 0)):
        for f in r.get("findings", []):
            if f.get("kind") == "anatomy" and f.get("label") in vocab.BY_NAME:
                # stable ids for anatomy across parallel detector calls: the region's place in the vocabulary
                f = {**f, "id": f"A{[x.name for x in vocab.REGIONS].index(f['label']) + 1}"}
            prev = merged.get(f["id"])
            if prev is None or order.get(r["tool"], 0) >= 1:
                merged[f["id"]] = {**(prev or {}), **{k: v for k, v in f.items() if v is not None}}
    return list(merged.values())


def weak_zone_checks(verification: dict[str, Any] | None, most: int = 2) -> list[str]:
    """What to check in the lung zones whose "nothing found" the verifier rated under high (weakest first)."""
    regions = ((verification or {}).get("details") or {}).get("regions") or {}
    weak = sorted((r for r in regions.values() if r.get("check")), key=lambda r: r.get("p", 1.0))
    return [r["check"] for r in weak[:most]]


def compose(question: str, plan: dict[str, Any], results: list[dict[str, Any]], verification: dict[str, Any] | None,
            backend: dict[str, str], thread_id: str, study: dict[str, Any] | None,
            prior: dict[str, Any] | None) -> Answer:
    steps = [Step(tool=r["tool"], title=r["title"], status=r["status"], detail=r.get("summary", "")[:2000],
                  duration_s=r.get("duration_s", 0.0)) for r in results]
    if plan.get("reply") and not results:
        rel = Reliability(score=1.0, level="high", method="no measurement in this answer",
                          details={"note": "The answer describes what the assistant can do; nothing was measured."})
        return Answer(answer=plan["reply"], tools=[], findings=[], evidence=[], reliability=rel, backend=backend,
                      thread_id=thread_id, steps=steps, study_uid=(study or {}).get("study_uid"))

    findings_raw = merge_findings(results)
    per_finding = (verification or {}).get("per_finding", {})
    findings: list[Finding] = []
    for f in findings_raw:
        f = dict(f)
        if f.get("id") in per_finding and f.get("kind") != "anatomy":
            f["reliability"] = per_finding[f["id"]]
        if isinstance(f.get("change"), dict):
            f["change"] = Change(**f["change"])
        findings.append(Finding(**f))
    evidence = list({e["path"]: Evidence(**e) for r in results for e in r.get("evidence", [])}.values())

    parts: list[str] = []
    for r in results:
        if r["tool"] == "verifier" and r.get("recall"):
            parts.append(r["summary"])
            continue
        if r.get("summary"):
            parts.append(r["summary"] if r["status"] == "done" else f"{r['title']}: {r['summary']}")
    notes = list(plan.get("notes") or []) + [n for r in results for n in r.get("notes", [])]
    measured = sorted({m for r in results for m in r.get("measured", [])})

    if verification:
        rel = Reliability(score=verification["score"], level=level_for(verification["score"]),
                          method=verification["method"], details=verification.get("details", {}))
    else:
        rel = Reliability(score=0.5, level="medium", method="not verified", details={})
    text = "\n\n".join(p for p in parts if p)
    caveat = (verification or {}).get("caveat") or ""
    recall = any(r.get("recall") for r in results)
    zone_checks = [] if recall else weak_zone_checks(verification)
    for check in zone_checks:  # said once, with the zone's "nothing found"
        caveat = " ".join(caveat.replace(check, " ").split())
    if (caveat or zone_checks) and rel.level == "low" and not recall:
        # low reliability changes the answer: what to check comes first, not after the findings
        text = f"Uncertain: {' '.join(zone_checks + ([caveat] if caveat else []))}\n\n{text}"
        caveat = ""
    elif zone_checks:
        # a zone reported empty but rated under high is not called clear: the answer says what to check there
        text += "\n\nNot ruled out: " + " ".join(zone_checks)
    if notes:
        text += "\n\nNotes: " + " ".join(n if n.rstrip().endswith((".", "!", "?")) else n.rstrip() + "."
                                          for n in dict.fromkeys(notes))
    if measured:
        text += "\n\nMeasured: " + "; ".join(measured) + "."
    text += f"\n\nReliability: {rel.level} ({rel.score:.2f})"
    if caveat:
        text += f" — {caveat.rstrip('.')}"
    text += f". {DISCLAIMER}"

    report = next((Report(**r["report"]) for r in results if r.get("report")), None)
    prognosis = next((r["prognosis"] for r in results if r.get("prognosis")), None)
    comparison = next((r["comparison"] for r in results if r.get("comparison")), None)
    tools = [r["tool"] for r in results if r["status"] != "skipped" or r["tool"] != "verifier"]
    if verification and "verifier" not in tools:
        tools.append("verifier")
    return Answer(answer=text, tools=list(dict.fromkeys(tools)), findings=findings, evidence=evidence,
                  reliability=rel, report=report, prognosis=prognosis, backend=backend, thread_id=thread_id,
                  steps=steps, study_uid=(study or {}).get("study_uid"),
                  prior_study_uid=(prior or {}).get("study_uid"), comparison=comparison, notes=notes)
