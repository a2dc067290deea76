"""Pure evaluation helpers for the detector against phantom truth (used by ``radassist bench``).

- ``box_iou(a_mm, b_mm)``: intersection over union of two mm boxes ``[x0, y0, z0, x1, y1, z1]``.
- ``match_nodules(found, truth_nodules)``: greedy one-to-one matching of detections to truth
  nodules; a detection matches when its centre lies within the truth nodule's radius (at least
  3 mm) of the truth centre. Returns TP/FP/FN, per-nodule diameter errors, side/zone correctness.
- ``evaluate_detector(seeds, size)``: runs phantoms and returns sensitivity (truth >= 5 mm), false
  positives per scan, mean |diameter error|, region accuracy, anatomy box IoU (mean and per
  region) and runtime per scan.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from tools.schemas import Finding

log = logging.getLogger(__name__)

MIN_EVAL_MM = 5.0


def box_iou(a_mm: list[float] | np.ndarray, b_mm: list[float] | np.ndarray) -> float:
    a = np.asarray(a_mm, dtype=float)
    b = np.asarray(b_mm, dtype=float)
    lo = np.maximum(a[:3], b[:3])
    hi = np.minimum(a[3:], b[3:])
    inter = float(np.prod(np.clip(hi - lo, 0.0, None)))
    va = float(np.prod(np.clip(a[3:] - a[:3], 0.0, None)))
    vb = float(np.prod(np.clip(b[3:] - b[:3], 0.0, None)))
    union = va + vb - inter
    return inter / union if union > 0 else 0.0


def _truth_radius(t: dict[str, Any]) -> float:
    d = t.get("long_axis_mm") or t.get("diameter_mm") or 0.0
    return max(0.5 * float(d), 3.0)


def greedy_pairs(cands: list[tuple[float, Any, Any]]) -> dict[Any, Any]:
    """Greedy one-to-one matching, nearest first: (distance, truth key, found key) -> {truth key: found key}."""
    out: dict[Any, Any] = {}
    used: set[Any] = set()
    for _, t, f in sorted(cands, key=lambda c: c[0]):
        if t in out or f in used:
            continue
        out[t] = f
        used.add(f)
    return out


def match_nodules(found: list[Finding], truth_nodules: list[dict[str, Any]],
                  min_mm: float = 0.0) -> dict[str, Any]:
    """Match detections to truth (greedy by distance). ``min_mm``: truth nodules smaller than this
    are "optional": missing them is not a FN and detecting them is not a FP."""
    cands: list[tuple[float, int, int]] = []
    for ti, t in enumerate(truth_nodules):
        c = np.asarray(t["center_mm"], dtype=float)
        r = _truth_radius(t)
        for fi, f in enumerate(found):
            if f.center_mm is None:
                continue
            d = float(np.linalg.norm(np.asarray(f.center_mm, dtype=float) - c))
            if d <= r:
                cands.append((d, ti, fi))
    t_used: dict[int, int] = greedy_pairs(cands)
    f_used = set(t_used.values())
    pairs: list[dict[str, Any]] = []
    missed: list[dict[str, Any]] = []
    for ti, t in enumerate(truth_nodules):
        optional = float(t.get("diameter_mm", 0.0)) < min_mm
        if ti in t_used:
            f = found[t_used[ti]]
            err = None if f.diameter_mm is None else float(f.diameter_mm) - float(t["diameter_mm"])
            pairs.append({
                "truth_index": ti, "finding_id": f.id, "truth_diameter_mm": float(t["diameter_mm"]),
                "found_diameter_mm": f.diameter_mm, "diameter_error_mm": err,
                "distance_mm": float(np.linalg.norm(np.asarray(f.center_mm) - np.asarray(t["center_mm"]))),
                "side_ok": (t.get("side") is None) or (f.side == t.get("side")),
                "zone_ok": (t.get("zone") is None) or (f.zone == t.get("zone")),
                "optional": optional, "attenuation_ok": (t.get("attenuation") is None)
                or (f.attenuation == t.get("attenuation")),
                "truth": {k: t.get(k) for k in ("side", "zone", "attenuation", "juxtapleural", "juxtavascular")},
            })
        elif not optional:
            missed.append({"truth_index": ti, **{k: t.get(k) for k in (
                "center_mm", "diameter_mm", "side", "zone", "attenuation", "juxtapleural", "juxtavascular")}})
    fps = [found[i] for i in range(len(found)) if i not in f_used]
    tp = sum(1 for p in pairs if not p["optional"])
    return {
        "tp": tp, "fp": len(fps), "fn": len(missed), "pairs": pairs, "missed": missed,
        "false_positives": [{"id": f.id, "center_mm": f.center_mm, "diameter_mm": f.diameter_mm,
                             "confidence": f.confidence, "region": f.region} for f in fps],
        "diameter_errors": [p["diameter_error_mm"] for p in pairs if p["diameter_error_mm"] is not None],
        "region_ok": [bool(p["side_ok"] and p["zone_ok"]) for p in pairs],
    }


def anatomy_ious(regions: dict[str, Any], truth_anatomy: dict[str, Any]) -> dict[str, float]:
    """IoU per vocabulary region between detected ``regions`` (name -> object with ``bbox_mm``) and
    truth ``{"region": {"bbox_mm": [...]}}``; a region missing from the detection scores 0."""
    out: dict[str, float] = {}
    for name, t in truth_anatomy.items():
        tb = t.get("bbox_mm") if isinstance(t, dict) else t
        if tb is None:
            continue
        r = regions.get(name)
        bb = getattr(r, "bbox_mm", None) if r is not None else None
        if bb is None and isinstance(r, dict):
            bb = r.get("bbox_mm")
        out[name] = box_iou(bb, tb) if bb is not None else 0.0
    return out


def evaluate_detector(seeds: list[int], size: str = "small", which: str = "current") -> dict[str, Any]:
    """Run the detector on phantoms and summarise (see the module docstring)."""
    from tools.cache import CACHE
    from tools.detector import _analyze
    from tools.phantom import make_study_arrays
    from tools.study import Series

    per_scan: list[dict[str, Any]] = []
    tp = fn = fp = 0
    derr: list[float] = []
    reg_ok: list[bool] = []
    iou_by_region: dict[str, list[float]] = {}
    runtimes: list[float] = []
    for seed in seeds:
        hu, geom, truth = make_study_arrays(seed, size=size, which=which)
        series = Series(series_uid=f"phantom-{seed}-{size}-{which}", modality="CT", pixels=np.asarray(hu, np.float32),
                        spacing=tuple(float(v) for v in geom["spacing"]),  # type: ignore[arg-type]
                        origin=np.asarray(geom["origin"], dtype=float),
                        direction=np.asarray(geom["direction"], dtype=float).reshape(3, 3))
        t0 = time.time()
        an = _analyze(series)
        rt = time.time() - t0
        CACHE.clear()
        runtimes.append(rt)
        tn = truth.get("nodules", [])
        m = match_nodules(an.nodules, tn, min_mm=MIN_EVAL_MM)
        tp += m["tp"]
        fn += m["fn"]
        fp += m["fp"]
        derr += [abs(e) for e in m["diameter_errors"]]
        reg_ok += m["region_ok"]
        ious = anatomy_ious(an.anatomy.regions, truth.get("anatomy", {}))
        for k, v in ious.items():
            iou_by_region.setdefault(k, []).append(v)
        per_scan.append({"seed": seed, "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "runtime_s": round(rt, 2),
                         "missed": m["missed"], "false_positives": m["false_positives"], "pairs": m["pairs"],
                         "mean_iou": float(np.mean(list(ious.values()))) if ious else None, "ious": ious})
        log.info("seed %d: tp %d fp %d fn %d, %.1fs", seed, m["tp"], m["fp"], m["fn"], rt)
    n = max(len(seeds), 1)
    region_iou = {k: float(np.mean(v)) for k, v in iou_by_region.items()}
    return {
        "seeds": list(seeds), "size": size,
        "sensitivity": tp / max(tp + fn, 1), "tp": tp, "fn": fn, "fp": fp, "fp_per_scan": fp / n,
        "mean_abs_diameter_error_mm": float(np.mean(derr)) if derr else None,
        "region_accuracy": float(np.mean(reg_ok)) if reg_ok else None,
        "mean_anatomy_iou": float(np.mean(list(region_iou.values()))) if region_iou else None,
        "anatomy_iou": region_iou,
        "runtime_s_per_scan": float(np.mean(runtimes)) if runtimes else None,
        "per_scan": per_scan,
    }
