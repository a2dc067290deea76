"""Longitudinal comparer: align the prior to the current study, match findings, classify change.

- **Registration** (SimpleITK): rigid (Euler 3-D) on both CTs resampled to ~2 mm and clipped to
  [-1000, 200] HU, moments-initialised, multi-resolution (8/4/2 mm), Mattes mutual information; the
  quality is reported as the Dice overlap of the aerated-lung masks after alignment.
- **Matching**: prior findings mapped into the current frame; Hungarian assignment on registered
  distance, gated by size; an unmatched finding is looked for once more at its mapped position in the
  other study (a re-measurement at that point) before it is called new or resolved.
- **Change** (Lung-RADS): grew when the mean diameter rose by more than 1.5 mm, shrank when it fell by
  more than 1.5 mm, else stable; volume doubling time = interval x ln2 / ln(V_now / V_prior) for growth.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from tools import vocab
from tools.cache import CACHE
from tools.errors import StudyError, UnsupportedError
from tools.schemas import Change, Evidence, Finding
from tools.study import Series, Study

log = logging.getLogger(__name__)

GROWTH_MM = 1.5


@dataclass
class CompareRequest:
    regions: list[str] = field(default_factory=list)
    focus: str = "all"
    evidence_dir: Path | None = None


@dataclass
class Registration:
    transform: sitk.Transform  # maps CURRENT (fixed) points to PRIOR (moving) points, LPS mm
    metric: float
    dice_before: float
    dice_after: float
    runtime_s: float

    def prior_to_current(self, p: list[float]) -> list[float]:
        return list(self.transform.GetInverse().TransformPoint([float(v) for v in p]))

    def current_to_prior(self, p: list[float]) -> list[float]:
        return list(self.transform.TransformPoint([float(v) for v in p]))

    def matrix_prior_to_current(self) -> list[list[float]]:
        inv = self.transform.GetInverse()
        o = np.array(inv.TransformPoint((0.0, 0.0, 0.0)))
        cols = [np.array(inv.TransformPoint(tuple(e))) - o for e in np.eye(3)]
        m = np.eye(4)
        m[:3, :3] = np.stack(cols, axis=1)
        m[:3, 3] = o
        return [[round(float(v), 5) for v in row] for row in m]


@dataclass
class CompareResult:
    findings: list[Finding]
    evidence: list[Evidence]
    summary: str
    measured: list[str]
    notes: list[str]
    comparison: dict[str, Any]


def to_sitk(series: Series, clip: tuple[float, float] | None = (-1000.0, 200.0)) -> sitk.Image:
    arr = series.pixels if clip is None else np.clip(series.pixels, *clip)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    img.SetSpacing([float(s) for s in series.spacing])
    img.SetOrigin([float(v) for v in series.origin])
    img.SetDirection([float(v) for v in np.asarray(series.direction).flatten()])
    return img


def _resample_iso(img: sitk.Image, mm: float) -> sitk.Image:
    sp = np.array(img.GetSpacing())
    size = np.array(img.GetSize())
    new_size = np.maximum(1, np.round(size * sp / mm)).astype(int)
    sigma = [max(0.05, (mm - s) / 2.0) for s in sp]
    smooth = sitk.SmoothingRecursiveGaussian(img, sigma) if max(sigma) > 0.05 else img
    return sitk.Resample(smooth, [int(v) for v in new_size], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         [mm] * 3, img.GetDirection(), -1000.0, sitk.sitkFloat32)


def _lung_mask(arr: np.ndarray) -> np.ndarray:
    air = arr < -400
    lab, n = ndimage.label(air)
    if n == 0:
        return air
    # air outside the body touches the in-plane edges; the airway leaves through the top slice, so the
    # cranio-caudal faces are not treated as outside
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(),
                                       lab[:, :, -1].ravel()]))
    inside = air & ~np.isin(lab, border)
    return inside


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 0.0


def register(current: Series, prior: Series, base_mm: float = 2.0) -> Registration:
    """Rigid registration of prior (moving) to current (fixed); cached per pair of series."""
    key = f"reg:{current.cache_key}:{prior.cache_key}"

    def compute() -> Registration:
        t0 = time.perf_counter()
        fixed = _resample_iso(to_sitk(current), base_mm) + 1000.0
        moving = _resample_iso(to_sitk(prior), base_mm) + 1000.0
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.15, seed=7)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=0.01, numberOfIterations=150,
                                                     relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(init, inPlace=False)
        tx = reg.Execute(fixed, moving)
        metric = reg.GetMetricValue()
        fa = sitk.GetArrayFromImage(fixed) - 1000.0
        # outside the prior's field of view the resampled image is set to soft tissue (not air, which would join
        # the lungs to the outside) and the overlap is scored only where both studies have data
        ones = sitk.Cast(moving * 0 + 1, sitk.sitkFloat32)
        before = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 1000.0)) - 1000.0
        after = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 1000.0)) - 1000.0
        v0 = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)) > 0
        v1 = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, tx, sitk.sitkNearestNeighbor, 0.0)) > 0
        lf = _lung_mask(fa)
        d0, d1 = _dice(lf & v0, _lung_mask(before) & v0), _dice(lf & v1, _lung_mask(after) & v1)
        log.info("registration: metric %.4f, lung Dice %.3f -> %.3f", metric, d0, d1)
        return Registration(tx, float(metric), d0, d1, time.perf_counter() - t0)

    return CACHE.get_or_compute(key, compute)


def doubling_time(v_prior: float | None, v_now: float | None, days: int | None) -> float | None:
    if not v_prior or not v_now or not days or v_now <= v_prior:
        return None
    r = math.log(v_now / v_prior)
    if r < 0.02:
        return None
    return round(days * math.log(2) / r, 1)


def classify(d_now: float, d_prior: float) -> str:
    delta = d_now - d_prior
    if delta > GROWTH_MM:
        return "grew"
    if delta < -GROWTH_MM:
        return "shrank"
    return "stable"


NO_MATCH = 1e6


def gated_assignment(cost: np.ndarray) -> list[tuple[int, int]]:
    """Hungarian assignment on a cost matrix where NO_MATCH marks pairs outside the gate."""
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if cost[i, j] < NO_MATCH]


MIN_REMEASURED_MM = 3.0  # a second-look re-measurement smaller than this is residual density, not the lesion


def _is_lesion(m: Finding | None) -> bool:
    return m is not None and m.center_mm is not None and (m.diameter_mm or 0.0) >= MIN_REMEASURED_MM


def _in_regions(f: Finding, regions: list[str]) -> bool:
    if not regions:
        return True
    return any(f.region and vocab.contains(r, f.region) for r in regions)


def check_pair(current: Study, prior: Study) -> None:
    """The one rule for a current/prior pair: same patient, two different studies."""
    if current.patient_id != prior.patient_id:
        raise StudyError("These two studies belong to different patients, so they cannot be compared. "
                         "Pick a prior study of the same patient.")
    if current.study_uid == prior.study_uid:
        raise StudyError("The prior is the same study as the current one; pick an earlier study.")


def compare_studies(current: Study, prior: Study, req: CompareRequest | None = None) -> CompareResult:
    from tools.detector import analyze_series, measure_at

    req = req or CompareRequest()
    check_pair(current, prior)
    cs, ps = current.primary, prior.primary
    if not (cs.is_volume and ps.is_volume):
        raise UnsupportedError("Comparison is implemented for CT volumes; radiograph comparison is not supported "
                               "for this modality yet.")
    interval = (current.study_date - prior.study_date).days if (current.study_date and prior.study_date) else None
    notes: list[str] = []
    if interval is not None and interval < 0:
        notes.append(f"The 'prior' is {-interval} days LATER than the current study; change is described from the "
                     "earlier to the later study as loaded.")
    reg = register(cs, ps)
    ca, pa = analyze_series(cs), analyze_series(ps)
    cur = [f.model_copy(deep=True) for f in ca.nodules]
    pri = [f.model_copy(deep=True) for f in pa.nodules]
    mapped = [np.array(reg.prior_to_current(p.center_mm)) for p in pri]

    pairs: list[tuple[Finding, Finding | None]] = []
    used_c: set[int] = set()
    used_p: set[int] = set()
    if cur and pri:
        cost = np.full((len(cur), len(pri)), NO_MATCH)
        for i, c in enumerate(cur):
            for j, p in enumerate(pri):
                d = float(np.linalg.norm(np.array(c.center_mm) - mapped[j]))
                gate = max(8.0, 0.75 * max(c.diameter_mm or 0, p.diameter_mm or 0))
                if d <= gate:
                    cost[i, j] = d + 0.5 * abs((c.diameter_mm or 0) - (p.diameter_mm or 0))
        for i, j in gated_assignment(cost):
            pairs.append((cur[i], pri[j]))
            used_c.add(i)
            used_p.add(j)
    # second look: an unmatched finding re-measured at its mapped position in the other study
    for i, c in enumerate(cur):
        if i in used_c:
            continue
        q = reg.current_to_prior(c.center_mm)
        m = measure_at(ps, q, pa)
        if _is_lesion(m) and np.linalg.norm(np.array(m.center_mm) - np.array(q)) <= max(  # type: ignore[union-attr]
                5.0, 0.5 * (c.diameter_mm or 0)):
            pairs.append((c, m))
        else:
            pairs.append((c, None))
    resolved: list[Finding] = []
    for j, p in enumerate(pri):
        if j in used_p:
            continue
        q = mapped[j].tolist()
        m = measure_at(cs, q, ca)
        if _is_lesion(m) and np.linalg.norm(np.array(m.center_mm) - np.array(q)) <= max(  # type: ignore[union-attr]
                5.0, 0.5 * (p.diameter_mm or 0)):
            m.id = f"F{len(cur) + len(resolved) + 1}"
            m.notes.append("found on re-inspection at the position of a prior finding")
            pairs.append((m, p))
            cur.append(m)
            continue
        resolved.append(p)

    out: list[Finding] = []
    for c, p in pairs:
        if p is None:
            c.change = Change(status="new", interval_days=interval)
        else:
            status = classify(c.diameter_mm or 0.0, p.diameter_mm or 0.0)
            c.change = Change(status=status, prior_diameter_mm=p.diameter_mm, prior_center_mm=p.center_mm,
                              interval_days=interval, prior_volume_mm3=p.volume_mm3,
                              diameter_change_mm=round((c.diameter_mm or 0) - (p.diameter_mm or 0), 2),
                              doubling_time_days=(doubling_time(p.volume_mm3, c.volume_mm3, interval)
                                                  if status == "grew" else None),
                              prior_finding_id=p.id)
        out.append(c)
    for n, p in enumerate(resolved, start=1):
        q = mapped[pri.index(p)].tolist()
        out.append(Finding(id=f"R{n}", kind=p.kind, label=f"resolved {p.kind}", region=p.region, side=p.side,
                           zone=p.zone, center_mm=None, bbox_mm=None, diameter_mm=None, study_uid=current.study_uid,
                           series_uid=cs.series_uid, attenuation=p.attenuation,
                           change=Change(status="resolved", prior_diameter_mm=p.diameter_mm,
                                         prior_center_mm=p.center_mm, interval_days=interval,
                                         prior_volume_mm3=p.volume_mm3, prior_finding_id=p.id),
                           notes=[f"expected position in the current study: {[round(v, 1) for v in q]} mm"]))
    out.sort(key=lambda f: (f.id[0] != "F", int(f.id[1:]) if f.id[1:].isdigit() else 0))
    shown = [f for f in out if _in_regions(f, req.regions)]
    shown = _focus(shown, req.focus)

    evidence: list[Evidence] = []
    if req.evidence_dir is not None:
        evidence = _evidence(cs, ps, reg, shown, req.evidence_dir)
    summary = _summary(prior, interval, reg, shown, req)
    comparison = {
        "prior_study_uid": prior.study_uid, "prior_date": prior.date_str, "current_date": current.date_str,
        "interval_days": interval, "registration": {
            "method": "rigid (Euler 3-D), Mattes MI, multi-resolution 8/4/2 mm",
            "lung_dice_before": round(reg.dice_before, 3), "lung_dice_after": round(reg.dice_after, 3),
            "prior_to_current": reg.matrix_prior_to_current(), "runtime_s": round(reg.runtime_s, 2)},
        "counts": {s: sum(1 for f in out if f.change and f.change.status == s)
                   for s in ("grew", "shrank", "stable", "new", "resolved")},
    }
    measured = ["mean axial diameter now and on the prior (Lung-RADS growth > 1.5 mm)",
                "volume doubling time where both volumes are known", "registration quality (lung overlap)"]
    return CompareResult(shown, evidence, summary, measured, notes, comparison)


def _focus(findings: list[Finding], focus: str) -> list[Finding]:
    if focus in ("new", "resolved", "grew", "shrank", "stable"):
        return [f for f in findings if f.change and f.change.status == focus]
    if focus == "largest":
        def delta(f: Finding) -> float:
            if not f.change:
                return 0.0
            if f.change.status == "resolved":
                return f.change.prior_diameter_mm or 0.0
            return abs(f.change.diameter_change_mm or (f.diameter_mm or 0.0))
        return sorted(findings, key=delta, reverse=True)[:1]
    return findings


def _fmt_change(f: Finding) -> str:
    ch = f.change
    assert ch is not None
    where = f.region or "lung"
    if ch.status == "new":
        return f"{f.id} ({where}): new {f.kind}, {f.diameter_mm:.1f} mm, not seen on the prior."
    if ch.status == "resolved":
        return f"{f.id} ({where}): the {ch.prior_diameter_mm:.1f} mm {f.kind} of the prior is no longer seen (resolved)."
    d0, d1 = ch.prior_diameter_mm or 0.0, f.diameter_mm or 0.0
    pct = 100.0 * (d1 - d0) / d0 if d0 else 0.0
    verb = {"grew": "increased", "shrank": "decreased", "stable": "stable"}[ch.status]
    txt = (f"{f.id} ({where}) {f.kind}: {verb} from {d0:.1f} to {d1:.1f} mm ({d1 - d0:+.1f} mm, {pct:+.0f}%)"
           if ch.status != "stable" else f"{f.id} ({where}) {f.kind}: stable, {d0:.1f} -> {d1:.1f} mm")
    if ch.doubling_time_days:
        txt += f", volume doubling time {ch.doubling_time_days:.0f} days"
    return txt + "."


def _summary(prior: Study, interval: int | None, reg: Registration, shown: list[Finding], req: CompareRequest) -> str:
    ivl = f"{interval} days earlier" if interval is not None else "date unknown"
    head = (f"Compared with the prior {prior.modality} of {prior.date_str} ({ivl}); rigid registration, lung overlap "
            f"Dice {reg.dice_after:.2f}.")
    if not shown:
        scope = f" in the {', '.join(req.regions)}" if req.regions else ""
        what = {"new": "No new nodule", "resolved": "No resolved nodule", "grew": "No nodule grew",
                "shrank": "No nodule shrank", "stable": "No stable nodule"}.get(req.focus, "No nodule")
        return f"{head} {what}{scope}."
    return head + " " + " ".join(_fmt_change(f) for f in shown)


def _window(img: np.ndarray, center: float = -600.0, width: float = 1500.0) -> np.ndarray:
    lo = center - width / 2
    return (np.clip((img - lo) / width, 0, 1) * 255).astype(np.uint8)


def _prior_slice_on_current(cs: Series, ps: Series, reg: Registration, k: int) -> np.ndarray:
    ref = sitk.Image(int(cs.shape[2]), int(cs.shape[1]), 1, sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in cs.spacing])
    ref.SetOrigin([float(v) for v in cs.vox_to_mm([0, 0, k])])
    ref.SetDirection([float(v) for v in np.asarray(cs.direction).flatten()])
    out = sitk.Resample(to_sitk(ps, clip=None), ref, reg.transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)[0]


def _evidence(cs: Series, ps: Series, reg: Registration, shown: list[Finding], out_dir: Path) -> list[Evidence]:
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    ev: list[Evidence] = []
    todo = [f for f in shown if f.center_mm is not None][:4]
    for f in shown:
        if f.center_mm is None and f.change and f.change.prior_center_mm and len(todo) < 5:
            todo.append(f)
    for f in todo:
        center = f.center_mm if f.center_mm is not None else reg.prior_to_current(f.change.prior_center_mm)  # type: ignore[union-attr]
        k = int(round(cs.mm_to_vox(center)[2]))
        k = min(max(k, 0), cs.shape[0] - 1)
        cur = cs.pixels[k]
        pri = _prior_slice_on_current(cs, ps, reg, k)
        a, b = _window(cur), _window(pri)
        pair = Image.new("L", (a.shape[1] * 2 + 4, a.shape[0]), 0)
        pair.paste(Image.fromarray(a), (0, 0))
        pair.paste(Image.fromarray(b), (a.shape[1] + 4, 0))
        rgb = pair.convert("RGB")
        d = ImageDraw.Draw(rgb)
        ci, cj, _ = cs.mm_to_vox(center)
        r_mm = max(6.0, (f.diameter_mm or (f.change.prior_diameter_mm if f.change else 10) or 10) * 0.8)
        ri, rj = r_mm / cs.spacing[0], r_mm / cs.spacing[1]
        for off in (0, a.shape[1] + 4):
            d.rectangle([ci - ri + off, cj - rj, ci + ri + off, cj + rj], outline=(255, 200, 0), width=2)
        d.text((4, 4), f"current {f.id}", fill=(255, 255, 0))
        d.text((a.shape[1] + 8, 4), "prior (registered)", fill=(0, 255, 255))
        p = out_dir / f"compare_{f.id}.png"
        rgb.save(p, optimize=True)
        status = f.change.status if f.change else ""
        ev.append(Evidence(kind="image", path=str(p), caption=f"{f.id} {status}: current (left) vs registered prior "
                           f"(right), slice {k}", finding_ids=[f.id], role="before-after"))
    if todo:
        f = todo[0]
        center = f.center_mm if f.center_mm is not None else reg.prior_to_current(f.change.prior_center_mm)  # type: ignore[union-attr]
        k = min(max(int(round(cs.mm_to_vox(center)[2])), 0), cs.shape[0] - 1)
        diff = np.clip(cs.pixels[k], -1000, 200) - np.clip(_prior_slice_on_current(cs, ps, reg, k), -1000, 200)
        img = (np.clip(diff / 1200.0 * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
        p = out_dir / "subtraction.png"
        Image.fromarray(img).save(p, optimize=True)
        ev.append(Evidence(kind="image", path=str(p), caption=f"subtraction current - registered prior, slice {k} "
                           "(bright = new density, dark = lost density)", finding_ids=[f.id], role="subtraction"))
    return ev
