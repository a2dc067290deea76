"""Self-consistency verifier: re-ask and re-measure, and turn the agreement into a reliability index.

Two kinds of repetition (first cut; the verifier issue deepens and calibrates them):

- **paraphrase consistency** — the question is re-asked in other words (:func:`paraphrases`) and routed
  again by the caller; agreement = share of paraphrases that choose the same tools and regions;
- **perturbation consistency** — each lesion is re-measured on its region of interest after a
  sub-voxel shift, a small in-plane rotation, added noise at the scanner's level, and resampling
  (:func:`perturb_remeasure`); agreement = share re-found, box overlap, spread of the diameter.

The per-finding and per-answer scores map to a level by :func:`tools.schemas.level_for`.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from tools.study import Series

log = logging.getLogger(__name__)

_SWAPS = [
    (r"\bnodules?\b", "lesion"), (r"\blesions?\b", "nodule"), (r"\bmass(es)?\b", "tumour"),
    (r"\bright upper lobe\b", "RUL"), (r"\bRUL\b", "right upper lobe"), (r"\bleft upper lobe\b", "LUL"),
    (r"\bLUL\b", "left upper lobe"), (r"\bright lower lobe\b", "RLL"), (r"\bRLL\b", "right lower lobe"),
    (r"\bleft lower lobe\b", "LLL"), (r"\bLLL\b", "left lower lobe"), (r"\bbase\b", "lower zone"),
    (r"\bprior\b", "previous scan"), (r"\bprevious\b", "prior"), (r"\bshow me\b", "find"),
    (r"\bwhere is\b", "locate"), (r"\bcompare\b", "compare the current study"), (r"\bgrown\b", "increased in size"),
    (r"\breport\b", "radiology report"), (r"\bany\b", "are there any"),
]
_FRAMES = ["Could you check: {q}", "{q} Please answer from the images.", "Question from the reading room: {q}",
           "I would like to know: {q}"]


def paraphrases(question: str, n: int = 4) -> list[str]:
    """Deterministic template paraphrases (the served path asks the LLM instead)."""
    q = question.strip().rstrip("?.!")
    out: list[str] = []
    for pat, rep in _SWAPS:
        if re.search(pat, q, flags=re.IGNORECASE):
            alt = re.sub(pat, rep, q, count=1, flags=re.IGNORECASE)
            if alt.lower() != q.lower():
                out.append(alt + "?")
        if len(out) >= n // 2:
            break
    for f in _FRAMES:
        if len(out) >= n:
            break
        out.append(f.format(q=q[0].lower() + q[1:] + "?" if q else q))
    return out[:n]


def plan_signature(plan: dict[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    tools = frozenset(c["tool"] for c in plan.get("calls", []))
    return tools, frozenset(plan.get("regions", []))


def plan_agreement(plan: dict[str, Any], alternatives: list[dict[str, Any]]) -> dict[str, Any]:
    if not alternatives:
        return {"agreement": 1.0, "n": 0}
    t0, r0 = plan_signature(plan)
    same_tools = sum(1 for a in alternatives if plan_signature(a)[0] == t0)
    same_regions = sum(1 for a in alternatives if plan_signature(a)[1] == r0)
    n = len(alternatives)
    return {"agreement": 0.6 * same_tools / n + 0.4 * same_regions / n, "n": n, "same_tools": same_tools,
            "same_regions": same_regions}


@dataclass
class Remeasure:
    n: int
    found: int
    diameters: list[float]
    ious: list[float]

    @property
    def found_frac(self) -> float:
        return self.found / self.n if self.n else 0.0

    @property
    def spread_mm(self) -> float:
        return float(np.std(self.diameters)) if len(self.diameters) > 1 else 0.0

    @property
    def mean_mm(self) -> float:
        return float(np.mean(self.diameters)) if self.diameters else 0.0


def _noise_level(series: Series) -> float:
    """Scanner noise estimate: robust SD of the air outside the patient in the first slice, else 20 HU."""
    px = series.pixels[series.pixels.shape[0] // 2]
    air = px[px < -900]
    if air.size > 500:
        mad = float(np.median(np.abs(air - np.median(air))))
        return max(5.0, 1.4826 * mad)
    return 20.0


def _roi(series: Series, center_mm: list[float], half_mm: float) -> Series:
    c = series.mm_to_vox(center_mm)
    sp = np.asarray(series.spacing)
    half = np.ceil(half_mm / sp).astype(int)
    nk, nj, ni = series.pixels.shape
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.floor(c).astype(int) + half + 1, [ni, nj, nk])
    crop = series.pixels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    origin = series.vox_to_mm(lo.astype(float))
    return Series(series_uid=series.series_uid + ".roi", modality=series.modality, pixels=np.array(crop),
                  spacing=series.spacing, origin=origin, direction=series.direction, spacing_known=series.spacing_known)


def _perturb(roi: Series, kind: str, rng: np.random.Generator, noise: float) -> Series:
    px = roi.pixels
    if kind == "shift":
        out = ndimage.shift(px, rng.uniform(-0.5, 0.5, size=3), order=1, mode="nearest")
    elif kind == "rotate":
        out = ndimage.rotate(px, float(rng.uniform(-4, 4)), axes=(1, 2), reshape=False, order=1, mode="nearest")
    elif kind == "noise":
        out = px + rng.normal(0, noise, size=px.shape).astype(np.float32)
    elif kind == "resample":
        f = float(rng.uniform(0.85, 0.95))
        small = ndimage.zoom(px, (1.0, f, f), order=1)
        out = ndimage.zoom(small, np.array(px.shape) / np.array(small.shape), order=1)
        out = out[:px.shape[0], :px.shape[1], :px.shape[2]]
    else:
        raise ValueError(kind)
    return Series(series_uid=roi.series_uid + "." + kind, modality=roi.modality,
                  pixels=np.ascontiguousarray(out, dtype=np.float32), spacing=roi.spacing, origin=roi.origin,
                  direction=roi.direction, spacing_known=roi.spacing_known)


def _iou(a: list[float] | None, b: list[float] | None) -> float:
    if not a or not b:
        return 0.0
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    lo, hi = np.maximum(a_[:3], b_[:3]), np.minimum(a_[3:], b_[3:])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    va, vb = float(np.prod(a_[3:] - a_[:3])), float(np.prod(b_[3:] - b_[:3]))
    return inter / (va + vb - inter) if va + vb - inter > 0 else 0.0


PERTURBATIONS = ("shift", "rotate", "noise", "resample")


def perturb_remeasure(series: Series, finding: dict[str, Any], n: int = 8, seed: int = 0) -> Remeasure:
    """Re-measure one lesion n times on perturbed copies of its region of interest."""
    from tools.detector import measure_at

    center = finding["center_mm"]
    diam = float(finding.get("diameter_mm") or 10.0)
    half = max(20.0, 1.5 * diam)
    roi = _roi(series, center, half)
    rng = np.random.default_rng(seed)
    noise = _noise_level(series)
    diams: list[float] = []
    ious: list[float] = []
    found = 0
    for t in range(n):
        p = _perturb(roi, PERTURBATIONS[t % len(PERTURBATIONS)], rng, noise)
        try:
            m = measure_at(p, center, analysis=None, roi_mm=half)
        except Exception as exc:  # noqa: BLE001 - a failed re-measure counts as disagreement
            log.debug("re-measure failed: %s", exc)
            m = None
        if m is None or m.center_mm is None:
            continue
        if np.linalg.norm(np.asarray(m.center_mm) - np.asarray(center)) > max(3.0, diam / 2):
            continue
        found += 1
        if m.diameter_mm:
            diams.append(float(m.diameter_mm))
        ious.append(_iou(m.bbox_mm, finding.get("bbox_mm")))
    return Remeasure(n=n, found=found, diameters=diams, ious=ious)


def finding_score(r: Remeasure, diameter_mm: float | None) -> float:
    if r.n == 0:
        return 0.5
    spread = r.spread_mm
    bias = abs(r.mean_mm - diameter_mm) if (diameter_mm and r.diameters) else 0.0
    size_term = math.exp(-((spread / 0.75) ** 2) / 2) * math.exp(-((bias / 1.5) ** 2) / 2)
    iou = float(np.mean(r.ious)) if r.ious else 0.0
    return float(np.clip(r.found_frac * (0.55 + 0.3 * size_term + 0.15 * iou), 0.0, 1.0))


def combine(paraphrase: dict[str, Any], per_finding: dict[str, float], negative_support: float | None) -> float:
    """Answer-level score: the paraphrase agreement and the weakest findings weigh most."""
    parts = [paraphrase.get("agreement", 1.0)]
    weights = [1.0]
    if per_finding:
        vals = sorted(per_finding.values())
        weakest = float(np.mean(vals[: max(1, len(vals) // 3)]))
        parts += [float(np.mean(vals)), weakest]
        weights += [1.0, 1.0]
    if negative_support is not None:
        parts.append(negative_support)
        weights.append(1.0)
    return float(np.clip(np.average(parts, weights=weights), 0.0, 1.0))


def explain(v: dict[str, Any]) -> str:
    """A clinician-facing account of a stored verification."""
    if not v:
        return "This answer was not verified."
    d = v.get("details", {})
    lines = [f"The last answer's reliability is {v.get('level', '?')} ({v.get('score', 0):.2f}), from "
             f"{v.get('method', 'self-consistency')}."]
    p = d.get("paraphrase")
    if p and p.get("n"):
        lines.append(f"Re-asked in {p['n']} other wordings: {p.get('same_tools', 0)} chose the same tools and "
                     f"{p.get('same_regions', 0)} the same regions.")
    for fid, m in (d.get("measurements") or {}).items():
        lines.append(f"{fid}: re-found in {m['found']}/{m['n']} perturbed re-measurements; diameter "
                     f"{m['mean_mm']:.1f} mm ± {m['spread_mm']:.1f} mm.")
    if v.get("caveat"):
        lines.append(v["caveat"])
    return " ".join(lines)
