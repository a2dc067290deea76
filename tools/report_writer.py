"""Report writer: a structured chest-CT report whose every sentence points at the findings it rests on.

Sections: EXAMINATION, COMPARISON, TECHNIQUE (from the DICOM header), FINDINGS (lungs by side and
zone, airways, heart and mediastinum, bones; "no other finding" where it looked and found nothing),
IMPRESSION (largest and changed first, Lung-RADS category and the management that category carries in
the guideline, quoted as guideline wording, not advice).

Numbers are never invented: :func:`check_numbers` compares every number and laterality in the text
with the findings; a report that fails is not returned.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.errors import ToolError, UnsupportedError
from tools.schemas import Evidence, Finding, Report, ReportSentence
from tools.study import Study

log = logging.getLogger(__name__)

# Lung-RADS v2022 management wording (American College of Radiology), per category.
LUNG_RADS_MANAGEMENT = {
    "1": "Lung-RADS 1 (negative): continue annual screening with LDCT in 12 months.",
    "2": "Lung-RADS 2 (benign appearance or behaviour): continue annual screening with LDCT in 12 months.",
    "3": "Lung-RADS 3 (probably benign): the guideline calls for LDCT in 6 months.",
    "4A": "Lung-RADS 4A (suspicious): the guideline calls for LDCT in 3 months; PET/CT may be considered if there "
          "is a solid component of 8 mm or more.",
    "4B": "Lung-RADS 4B (very suspicious): the guideline calls for diagnostic chest CT with or without contrast, "
          "PET/CT and/or tissue sampling, depending on the probability of malignancy and comorbidities.",
}
_ORDER = ["1", "2", "3", "4A", "4B"]


def lung_rads(f: Finding) -> str:
    """Simplified Lung-RADS v2022 category for one nodule (solid / ground-glass; new and growing)."""
    d = f.diameter_mm or 0.0
    status = f.change.status if f.change else None
    if f.attenuation == "ground-glass":
        return "2" if d < 30 else "3"
    if status == "new":
        if d < 4:
            return "2"
        if d < 6:
            return "3"
        return "4A" if d < 8 else "4B"
    if status == "grew":
        return "4A" if d < 8 else "4B"
    if status == "stable" and f.change and (f.change.interval_days or 0) >= 90 and d < 8:
        return "2"
    if d < 6:
        return "2"
    if d < 8:
        return "3"
    if d < 15:
        return "4A"
    return "4B"


@dataclass
class ReportRequest:
    out_dir: Path | None = None
    formats: tuple[str, ...] = ("md", "txt")
    # served path: a function that rewrites one sentence for fluency (an LLM); every rewrite is number-checked
    rewriter: Callable[[str], str] | None = None


@dataclass
class ReportResult:
    report: Report
    findings: list[Finding]
    evidence: list[Evidence]
    summary: str
    notes: list[str] = field(default_factory=list)


def _size(f: Finding) -> str:
    return f"{f.diameter_mm:.1f} mm"


def _nodule_sentence(f: Finding) -> str:
    att = f"{f.attenuation} " if f.attenuation else ""
    s = f"{f.region.capitalize() if f.region else 'Lung'}: {att}{f.kind} {f.id}, {_size(f)} mean diameter"
    if f.long_axis_mm and f.short_axis_mm:
        s += f" ({f.long_axis_mm:.1f} x {f.short_axis_mm:.1f} mm)"
    if f.slice_index is not None:
        s += f", image {f.slice_index + 1}"
    ch = f.change
    if ch and ch.status in ("grew", "shrank") and ch.prior_diameter_mm:
        verb = "increased" if ch.status == "grew" else "decreased"
        s += f"; {verb} from {ch.prior_diameter_mm:.1f} mm"
        if ch.interval_days is not None:
            s += f" over {ch.interval_days} days"
        if ch.doubling_time_days:
            s += f", volume doubling time {ch.doubling_time_days:.0f} days"
    elif ch and ch.status == "stable" and ch.prior_diameter_mm:
        s += f"; stable (prior {ch.prior_diameter_mm:.1f} mm"
        s += f", {ch.interval_days} days)" if ch.interval_days is not None else ")"
    elif ch and ch.status == "new":
        s += "; new since the prior"
    return s + "."


def write_report(current: Study, prior: Study | None, req: ReportRequest | None = None) -> ReportResult:
    from tools.detector import analyze_series

    req = req or ReportRequest()
    series = current.primary
    if not series.is_volume:
        raise UnsupportedError("Structured reports are implemented for chest CT; radiograph reports are not "
                               "supported for this modality yet.")
    analysis = analyze_series(series)
    findings = [f.model_copy(deep=True) for f in analysis.nodules]
    comparison_text = "None available."
    notes: list[str] = []
    resolved: list[Finding] = []
    if prior is not None:
        from tools.comparer import CompareRequest, compare_studies

        cmp = compare_studies(current, prior, CompareRequest())
        by_id = {f.id: f for f in cmp.findings}
        findings = [by_id.get(f.id, f) for f in findings] + [f for f in cmp.findings
                                                             if f.id not in {g.id for g in findings}
                                                             and f.change and f.change.status != "resolved"]
        resolved = [f for f in cmp.findings if f.change and f.change.status == "resolved"]
        ivl = cmp.comparison.get("interval_days")
        comparison_text = f"{prior.modality} of {prior.date_str}" + (f" ({ivl} days earlier)." if ivl is not None
                                                                     else ".")
    sentences: list[ReportSentence] = []

    def add(section: str, text: str, ids: list[str] | None = None) -> None:
        sentences.append(ReportSentence(text=text, finding_ids=ids or [], section=section))

    h = series.header
    add("examination", f"{current.description or 'CT chest'}, {current.date_str}.")
    add("comparison", comparison_text)
    tech = [f"{series.shape[0]} axial images"]
    if h.get("SliceThickness"):
        tech.append(f"{float(h['SliceThickness']):.1f} mm slice thickness")
    if h.get("KVP"):
        tech.append(f"{float(h['KVP']):.0f} kVp")
    if h.get("ConvolutionKernel"):
        tech.append(f"{h['ConvolutionKernel']} kernel")
    tech.append("with contrast" if h.get("ContrastBolusAgent") else "without intravenous contrast")
    add("technique", ", ".join(tech).capitalize() + ".")

    lesions = sorted(findings, key=lambda f: -(f.diameter_mm or 0))
    for side in ("right", "left"):
        mine = [f for f in lesions if f.side == side]
        for f in mine:
            add("findings", _nodule_sentence(f), [f.id])
        if not mine:
            add("findings", f"{side.capitalize()} lung: no pulmonary nodule of 4 mm or more.")
    for f in resolved:
        add("findings", f"The {f.change.prior_diameter_mm:.1f} mm {f.kind} previously seen in the {f.region} "  # type: ignore[union-attr]
                        f"is no longer seen ({f.id}).", [f.id])
    anat = analysis.anatomy
    seen = set(getattr(anat, "regions", {}) or {})
    if {"trachea"} & seen:
        add("findings", "Airways: trachea and main bronchi are patent.")
    if {"heart", "aorta", "mediastinum"} & seen:
        add("findings", "Heart and mediastinum: no measured abnormality; this engine does not assess them further.")
    if {"spine", "ribs"} & seen:
        add("findings", "Bones: no lesion assessed; bone review is not automated.")

    # impression: changed first, then by size
    def rank(f: Finding) -> tuple[int, float]:
        changed = 0 if (f.change and f.change.status in ("grew", "new")) else 1
        return changed, -(f.diameter_mm or 0)

    cats = {f.id: lung_rads(f) for f in lesions}
    top = sorted(lesions, key=rank)[:3]
    for f in top:
        what = f"{f.kind.capitalize()} {f.id} in the {f.region}, {_size(f)}"
        if f.change and f.change.status in ("grew", "new", "shrank", "stable"):
            what += {"grew": ", increased", "new": ", new", "shrank": ", decreased", "stable": ", stable"}[
                f.change.status]
        add("impression", what + f" (Lung-RADS {cats[f.id]}).", [f.id])
    if resolved:
        add("impression", f"{len(resolved)} previously seen nodule(s) resolved.", [f.id for f in resolved])
    overall = max((cats[f.id] for f in lesions), key=_ORDER.index, default="1")
    if not lesions:
        add("impression", "No pulmonary nodule of 4 mm or more detected.")
    add("impression", LUNG_RADS_MANAGEMENT[overall] + " Stated as guideline wording; the reading radiologist decides.",
        [f.id for f in lesions if cats[f.id] == overall])

    allowed = _allowed_numbers(current, prior, series, comparison_text)
    check_numbers(sentences, lesions + resolved, extra_numbers=allowed)
    if req.rewriter is not None:
        sentences, stats = rewrite_sentences(sentences, lesions + resolved, allowed, req.rewriter)
        notes.append(f"Wording rewritten by the served model: {stats['accepted']} sentence(s) accepted, "
                     f"{stats['rejected']} rejected by the number check and kept as written.")
    sections = {}
    for s in sentences:
        sections[s.section] = (sections.get(s.section, "") + " " + s.text).strip()
    report = Report(sections=sections, sentences=sentences, lung_rads=overall)
    evidence: list[Evidence] = []
    if req.out_dir is not None:
        req.out_dir.mkdir(parents=True, exist_ok=True)
        md = req.out_dir / "report.md"
        md.write_text(to_markdown(report))
        txt = req.out_dir / "report.txt"
        txt.write_text(to_text(report))
        report.files = {"md": str(md), "txt": str(txt)}
        evidence.append(Evidence(kind="file", path=str(md), caption="structured report (Markdown)",
                                 finding_ids=[f.id for f in lesions]))
    summary = "Report drafted (Lung-RADS " + overall + "). IMPRESSION: " + sections.get("impression", "")
    return ReportResult(report, lesions + resolved, evidence, summary, notes)


TITLES = {"examination": "EXAMINATION", "comparison": "COMPARISON", "technique": "TECHNIQUE",
          "findings": "FINDINGS", "impression": "IMPRESSION"}


def to_markdown(r: Report) -> str:
    out = []
    for key, title in TITLES.items():
        items = [s for s in r.sentences if s.section == key]
        if not items:
            continue
        out.append(f"## {title}")
        if key in ("findings", "impression"):
            out += [f"- {s.text}" + (f" <!-- {','.join(s.finding_ids)} -->" if s.finding_ids else "") for s in items]
        else:
            out.append(" ".join(s.text for s in items))
        out.append("")
    return "\n".join(out)


def to_text(r: Report) -> str:
    return "\n\n".join(f"{TITLES[k]}:\n{v}" for k, v in r.sections.items() if k in TITLES)


_NUM = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)")
_FID = re.compile(r"\b([FR]\d+)\b")


def _allowed_numbers(current: Study, prior: Study | None, series, comparison_text: str) -> set[str]:
    allowed = set(_NUM.findall(current.description or "")) | set(_NUM.findall(comparison_text))
    allowed |= set(_NUM.findall(current.date_str)) | {str(series.shape[0])}
    h = series.header
    for key in ("SliceThickness", "KVP"):
        if h.get(key):
            allowed |= {f"{float(h[key]):.1f}", f"{float(h[key]):.0f}"}
    allowed |= set(_NUM.findall(str(h.get("ConvolutionKernel", ""))))
    if prior is not None:
        allowed |= set(_NUM.findall(prior.date_str))
    allowed |= {"1", "2", "3", "4", "6", "8", "12", "15", "30"}  # Lung-RADS wording and categories
    return allowed


REWRITE_SECTIONS = ("findings", "impression")  # never send dates or header text out


def rewrite_sentences(sentences: list[ReportSentence], findings: list[Finding], allowed: set[str],
                      rewrite: Callable[[str], str]) -> tuple[list[ReportSentence], dict[str, int]]:
    """Let a model reword sentences; a rewrite that changes a number or a side is rejected."""
    out: list[ReportSentence] = []
    stats = {"accepted": 0, "rejected": 0, "failed": 0}
    for s in sentences:
        if s.section not in REWRITE_SECTIONS:
            out.append(s)
            continue
        try:
            new = (rewrite(s.text) or "").strip()
        except Exception as exc:  # noqa: BLE001 - a failed rewrite keeps the checked original
            log.info("rewrite failed (%s); keeping the original sentence", type(exc).__name__)
            stats["failed"] += 1
            out.append(s)
            continue
        cand = s.model_copy(update={"text": new})
        try:
            if not new:
                raise ToolError("empty rewrite")
            check_numbers([cand], findings, allowed)
            if sorted(set(_NUM.findall(new))) != sorted(set(_NUM.findall(s.text))):
                raise ToolError("numbers dropped or added")
            if set(_FID.findall(new)) != set(_FID.findall(s.text)):
                raise ToolError("finding ids changed")
        except ToolError as exc:
            log.info("rewrite rejected: %s", str(exc)[:120])
            stats["rejected"] += 1
            out.append(s)
            continue
        stats["accepted"] += 1
        out.append(cand)
    return out, stats


def check_numbers(sentences: list[ReportSentence], findings: list[Finding], extra_numbers: set[str]) -> None:
    """Every number and laterality in a sentence must come from its findings (or the header/guideline)."""
    by_id = {f.id: f for f in findings}
    for s in sentences:
        nums = set(_NUM.findall(s.text))
        allowed = set(extra_numbers)
        sides: set[str] = set()
        for fid in s.finding_ids:
            f = by_id.get(fid)
            if f is None:
                raise ToolError(f"Report check failed: a sentence cites an unknown finding {fid}.")
            allowed |= set(re.findall(r"\d+", fid))
            for v in (f.diameter_mm, f.long_axis_mm, f.short_axis_mm):
                if v is not None:
                    allowed.add(f"{v:.1f}")
            if f.slice_index is not None:
                allowed.add(str(f.slice_index + 1))
            if f.change:
                ch = f.change
                for v in (ch.prior_diameter_mm,):
                    if v is not None:
                        allowed.add(f"{v:.1f}")
                if ch.interval_days is not None:
                    allowed.add(str(ch.interval_days))
                if ch.doubling_time_days:
                    allowed.add(f"{ch.doubling_time_days:.0f}")
            if f.side:
                sides.add(f.side)
        allowed.add(str(len([f for f in findings if f.change and f.change.status == "resolved"])))
        cited = set(_FID.findall(s.text)) - set(s.finding_ids)
        if cited:
            raise ToolError(f"Report check failed: “{s.text}” names {', '.join(sorted(cited))}, which it does not "
                            "rest on.")
        bad = sorted(n for n in nums if n not in allowed)
        if bad:
            raise ToolError(f"Report check failed: the number(s) {', '.join(bad)} in “{s.text}” do not come from "
                            "the measured findings; the report was not returned.")
        if s.finding_ids:
            for side in ("right", "left"):
                if re.search(rf"\b{side}\b", s.text, re.IGNORECASE) and side not in sides:
                    raise ToolError(f"Report check failed: “{s.text}” says {side} but its findings are "
                                    f"{', '.join(sorted(sides)) or 'unlateralised'}.")
