"""Tool agents: the graph's adapters from a typed tool call to the pure engines in ``tools/``.

Each agent takes its validated arguments and the turn's context (study references, evidence
folder, conversation context) and returns a serialisable ``ToolOutput`` dict: what it found, the
evidence it wrote, what it measured, a clinician-facing summary, and its own payload (report,
prognosis, comparison). Errors a clinician can act on become a step with status "error" and the
message; the conversation goes on.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.cache import cached_study
from tools.errors import RadAssistError
from tools.registry import (TOOLS, ComparerArgs, DetectorArgs, PrognosisArgs, ReportArgs, VerifierArgs,
                            VisualQuestionArgs, validate_args)

log = logging.getLogger(__name__)

LOBE_NOTE = ("Lobes are approximated by lung zones (craniocaudal thirds of each lung) until the fissures are "
             "segmented.")


def _out(tool: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"tool": tool, "title": TOOLS[tool].title, "status": "done", "summary": "",
                            "findings": [], "evidence": [], "measured": [], "notes": [], "duration_s": 0.0}
    base.update(kw)
    return base


def _dump(items: list[Any]) -> list[dict[str, Any]]:
    return [i.model_dump(mode="json") if hasattr(i, "model_dump") else dict(i) for i in items]


def detector_agent(args: DetectorArgs, ctx: dict[str, Any]) -> dict[str, Any]:
    from tools.detector import DetectRequest, run_detector

    study = cached_study(ctx["study"]["path"])
    box = ctx.get("request", {}).get("box_mm") or args.box_mm
    want = "describe" if box else args.want
    req = DetectRequest(regions=list(args.regions), lesion_kind=args.lesion_kind, box_mm=box, want=want,
                        evidence_dir=Path(ctx["evidence_dir"]))
    if study.primary.is_radiograph:
        from tools.radiograph import run_radiograph_detector

        res = run_radiograph_detector(study, req)
    else:
        res = run_detector(study, req)
    notes = list(res.notes)
    if ctx.get("plan", {}).get("approximate"):
        notes.insert(0, LOBE_NOTE)
    findings, evidence, summary = res.findings, res.evidence, res.summary
    if args.finding_ids:
        wanted = set(args.finding_ids)
        picked = [f for f in findings if f.id in wanted]
        if picked:
            findings = picked
            evidence = [e for e in evidence if wanted & set(e.finding_ids)] or evidence
            summary = " ".join(_describe(f) for f in picked)
            if not any(i.upper() in ctx.get("question", "").upper() for i in wanted):
                notes.insert(0, f"“{ctx.get('question', '')}” was taken to mean {', '.join(sorted(wanted))}, the "
                                "largest finding of the last answer; name another by its id (e.g. “how big is F2?”).")
        else:
            summary = f"{', '.join(sorted(wanted))} is not among the findings of this study. " + summary
    if want == "lesions" and not args.finding_ids and study.primary.is_volume:
        findings, evidence, summary = _vlm_boxes(study, args, ctx, findings, evidence, summary, notes)
    return _out("detector", summary=summary, findings=_dump(findings), evidence=_dump(evidence),
                measured=list(res.measured), notes=notes)


def _vlm_boxes(study: Any, args: DetectorArgs, ctx: dict[str, Any], findings: list[Any], evidence: list[Any],
               summary: str, notes: list[str]) -> tuple[list[Any], list[Any], str]:
    """With a served VLM configured, its boxes join the embedded findings as unmeasured observations."""
    from tools.vlm import describe_observations, ground_lesions, k_range_of, vision_role

    rc = vision_role()
    if rc is None or str(rc.extra.get("grounding", True)).lower() in ("false", "0", "no"):
        return findings, evidence, summary  # no VLM, or one without a box format (e.g. MedGemma)
    vres = ground_lesions(study, rc, args.lesion_kind, list(findings), k_range_of(study, list(args.regions)),
                          Path(ctx["evidence_dir"]))
    notes += vres.notes
    for f in findings:
        if f.id in vres.corroborated.values():
            f.notes.append(f"Also boxed by the vision-language model ({vres.model}).")
    said = describe_observations(vres)
    return list(findings) + vres.findings, list(evidence) + vres.evidence, (summary + " " + said).strip()


def vlm_agent(args: VisualQuestionArgs, ctx: dict[str, Any]) -> dict[str, Any]:
    """A visual question for the served VLM; without one, says so and what the embedded tools can do."""
    from tools.vlm import ask_visual_question, k_range_of, vision_role

    rc = vision_role()
    study = cached_study(ctx["study"]["path"])
    question = args.question or ctx.get("question", "")
    k_range = k_range_of(study, list(args.regions)) if rc is not None else None
    res = ask_visual_question(study, question, rc, k_range, Path(ctx["evidence_dir"]))
    measured = [] if res.status != "answered" else ["nothing: the vision-language model's answer is not measured"]
    return _out("vlm", summary=res.answer, evidence=_dump(res.evidence), notes=res.notes, measured=measured,
                unverified=res.status == "answered", vlm_status=res.status)


def _describe(f: Any) -> str:
    unit = getattr(f, "units", "mm")
    parts = [f"{f.id} ({f.region or 'lung'}): {f.label or f.kind}"]
    if f.diameter_mm:
        parts.append(f"{f.diameter_mm:.1f} {unit} mean axial diameter")
    if f.long_axis_mm and f.short_axis_mm:
        parts.append(f"({f.long_axis_mm:.1f} x {f.short_axis_mm:.1f} {unit})")
    if f.volume_mm3:
        parts.append(f"volume {f.volume_mm3:.0f} mm3")
    if f.slice_index is not None:
        parts.append(f"best seen on slice {f.slice_index + 1}")
    return ", ".join(parts) + "."


def comparer_agent(args: ComparerArgs, ctx: dict[str, Any]) -> dict[str, Any]:
    from tools.comparer import CompareRequest, compare_studies

    if not ctx.get("prior"):
        return _out("comparer", status="skipped", summary=(
            "No prior study of this patient was found in the study store, so there is nothing to compare with. "
            "Load one with --prior (CLI) or pick one in the study list."))
    current = cached_study(ctx["study"]["path"])
    prior = cached_study(ctx["prior"]["path"])
    if current.primary.is_radiograph and prior.primary.is_radiograph:
        from tools.radiograph import compare_radiographs

        res = compare_radiographs(current, prior, regions=list(args.regions), focus=args.focus,
                                  evidence_dir=Path(ctx["evidence_dir"]))
    else:
        res = compare_studies(current, prior, CompareRequest(regions=list(args.regions), focus=args.focus,
                                                             evidence_dir=Path(ctx["evidence_dir"])))
    return _out("comparer", summary=res.summary, findings=_dump(res.findings), evidence=_dump(res.evidence),
                measured=list(res.measured), notes=list(res.notes), comparison=res.comparison)


def report_agent(args: ReportArgs, ctx: dict[str, Any]) -> dict[str, Any]:
    from tools.report_writer import ReportRequest, write_report

    current = cached_study(ctx["study"]["path"])
    prior = cached_study(ctx["prior"]["path"]) if ctx.get("prior") and args.include_comparison else None
    from models.registry import load_config

    rc = load_config()["rewriter"]
    rewriter = None
    if rc.backend == "openai":
        from models.openai_backend import make_rewriter

        rewriter = make_rewriter(rc)
    res = write_report(current, prior, ReportRequest(out_dir=Path(ctx["evidence_dir"]), rewriter=rewriter))
    return _out("report_writer", summary=res.summary, findings=_dump(res.findings), evidence=_dump(res.evidence),
                measured=["every number in the report is checked against the measured findings"],
                notes=list(res.notes), report=res.report.model_dump(mode="json"))


def prognosis_agent(args: PrognosisArgs, ctx: dict[str, Any]) -> dict[str, Any]:
    from tools.prognosis import PrognosisRequest, parse_clinical, predict

    clinical: dict[str, Any] = dict(ctx.get("context", {}).get("clinical") or {})
    clinical.update(parse_clinical(ctx.get("question", "")))
    clinical.update(args.clinical)
    clinical.update(ctx.get("request", {}).get("clinical") or {})
    image_features: dict[str, float] = {}
    if ctx.get("study"):
        try:
            from tools.detector import analyze_series

            study = cached_study(ctx["study"]["path"])
            if study.primary.is_volume:
                nods = analyze_series(study.primary).nodules
                if nods:
                    image_features = {
                        "largest_diameter_mm": max(n.diameter_mm or 0.0 for n in nods),
                        "total_volume_mm3": sum(n.volume_mm3 or 0.0 for n in nods),
                        "n_lesions": float(len(nods)),
                    }
        except RadAssistError as exc:
            log.info("no image features for prognosis: %s", exc)
    res = predict(PrognosisRequest(clinical=clinical, image_features=image_features, question=args.question,
                                   plot_path=Path(ctx["evidence_dir"]) / "survival.png"))
    payload = {
        "model": res.model, "median_survival_days": res.median_survival_days,
        "interval": list(res.interval) if res.interval else None, "survival_at": res.survival_at,
        "risk_group": res.risk_group, "drivers": res.drivers, "missing": res.missing, "refused": res.refused,
        "model_card": res.model_card, "clinical_used": clinical, "image_features": image_features,
    }
    return _out("prognosis", summary=res.summary, evidence=_dump(res.evidence), prognosis=payload,
                measured=["survival model on a public cohort"], notes=[],
                status="done" if not res.refused else "done")


def verifier_agent(args: VerifierArgs, ctx: dict[str, Any]) -> dict[str, Any]:
    """Answers "how sure are you?" from the last turn's stored verification (no recomputation)."""
    last = (ctx.get("context") or {}).get("last_verification")
    if not last:
        return _out("verifier", status="skipped", summary=(
            "There is no earlier answer in this conversation to rate yet. Ask a question about the study first."))
    from tools.verifier import explain

    return _out("verifier", summary=explain(last), verification=last, recall=True,
                findings=(ctx.get("context") or {}).get("last_findings", []))


AGENTS: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "detector": detector_agent,
    "comparer": comparer_agent,
    "report_writer": report_agent,
    "prognosis": prognosis_agent,
    "verifier": verifier_agent,
    "vlm": vlm_agent,
}
assert set(AGENTS) == set(TOOLS), "every registered tool needs an agent"


def run_tool(tool: str, args: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        typed = validate_args(tool, args)
        if TOOLS[tool].looks_at_pixels and tool != "prognosis" and not ctx.get("study"):
            out = _out(tool, status="skipped", summary="No study is open. Load a study (upload or pick one) first.")
        else:
            out = AGENTS[tool](typed, ctx)
    except RadAssistError as exc:
        out = _out(tool, status="error", summary=str(exc))
    except Exception as exc:  # noqa: BLE001 - a tool failure must never end the conversation
        log.exception("tool %s failed", tool)
        out = _out(tool, status="error", summary=(
            f"The {TOOLS[tool].title.lower()} failed unexpectedly ({type(exc).__name__}); the rest of the answer "
            "stands. The incident is in the server log."))
    out["duration_s"] = round(time.perf_counter() - t0, 3)
    return out
