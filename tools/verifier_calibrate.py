"""Calibrating and evaluating the verifier on phantom patients with known truth.

``collect(seed)`` writes one phantom patient (prior + current DICOM), answers as the assistant does
(the detector on the current study, the comparer against the prior), builds the verifier's answer
units (:func:`tools.verifier.assess`) and labels each against the truth:

- ``finding``: wrong when no truth nodule lies within its radius (>= 3 mm) of the finding's centre
  (invented) or the mean axial diameter is off by more than 1.5 mm;
- ``region`` (one per lung zone, "nothing else here"): wrong when a truth nodule in that zone was
  missed by the detector;
- ``change``: wrong when the status differs from the truth fate (an invented finding's status is
  wrong; a "resolved" call is right only for a truly resolved nodule).

``fit`` fits one logistic model per unit kind (sign-constrained: a feature whose fitted effect
contradicts :data:`tools.verifier.MONOTONE` is dropped and the model refitted; its regularisation
chosen by cross-validation over patients, :func:`choose_c`; a zone with a strong near miss capped
by :class:`tools.verifier.NearMissRule`) and writes the
versioned JSON that the verifier loads. ``evaluate`` scores held-out units: AUC of (1 - P) for
predicting a wrong answer, expected calibration error, the share of wrong answers rated high, and
the verifier's cost as a ratio to the answer's own cost.

Seeds: calibration 5000+, evaluation 6000+ (tests use small seeds and 3, and two calibration phantoms
for the detector's small caps on the pleura; the detector bench 1000+).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools import verifier
from tools.schemas import Finding, level_for

log = logging.getLogger(__name__)

CALIBRATION_SEEDS = list(range(5000, 5064))
EVALUATION_SEEDS = list(range(6000, 6012))


def detector_fingerprint() -> str:
    """A short hash of the detector's source: the calibration says which detector it was fitted on."""
    import tools.detector as det

    return hashlib.sha256(Path(det.__file__).read_bytes()).hexdigest()[:12]


def _dicts(findings: list[Finding]) -> list[dict[str, Any]]:
    return [f.model_dump(mode="json") for f in findings]


def collect(seed: int, size: str = "small", workdir: Path | None = None) -> dict[str, Any]:
    """Answer units of one phantom patient with features, labels and costs (see the module docstring)."""
    from tools.cache import CACHE
    from tools.comparer import compare_studies
    from tools.detector import DetectRequest, analyze_series, run_detector
    from tools.dicom_io import load_study
    from tools.evaluate import match_nodules
    from tools.phantom import write_patient

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        pdir = Path(tmp) / f"p{seed}"
        truth = write_patient(pdir, seed=seed, size=size)
        cur, pri = load_study(pdir / "current"), load_study(pdir / "prior")
    CACHE.clear()
    cs, ps = cur.primary, pri.primary
    t0 = time.perf_counter()
    det = run_detector(cur, DetectRequest())
    answer_s = time.perf_counter() - t0
    analysis = analyze_series(cs)
    found = det.findings
    t1 = time.perf_counter()
    noise = verifier.noise_level(cs)
    f_units = verifier.finding_units(cs, _dicts(found), noise)
    r_units = verifier.region_units(cs, analysis, _dicts(found), list(verifier.LUNG_ZONES), noise)
    verify_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    cmp = compare_studies(cur, pri)
    compare_s = time.perf_counter() - t2
    matrix = cmp.comparison["registration"]["prior_to_current"]
    t3 = time.perf_counter()
    c_units = verifier.change_units(cs, ps, matrix, _dicts(cmp.findings), f_units)
    change_s = time.perf_counter() - t3

    tn_cur = [{**n["current"], "fate": n["fate"], "truth_id": n["id"], "juxtapleural": n["juxtapleural"],
               "juxtavascular": n["juxtavascular"]} for n in truth["nodules"] if n["current"]]
    m = match_nodules(found, tn_cur)
    paired = {p["finding_id"]: p for p in m["pairs"]}
    units: list[dict[str, Any]] = []

    def add(u: verifier.Unit, correct: bool, why: str, **extra: Any) -> None:
        units.append({"seed": seed, "kind": u.kind, "key": u.key, "features": u.features, "correct": bool(correct),
                      "why": why, **extra})

    for u in f_units:
        p = paired.get(u.key)
        if p is None:
            add(u, False, "invented")
        else:
            err = p["diameter_error_mm"]
            t = tn_cur[p["truth_index"]]
            ok = err is not None and abs(err) <= verifier.GROWTH_MM
            add(u, ok, "ok" if ok else f"size off by {err:+.1f} mm", truth_d_mm=p["truth_diameter_mm"],
                juxtapleural=t["juxtapleural"], juxtavascular=t["juxtavascular"])
    missed_zones: dict[str, list[float]] = {}
    for miss in m["missed"]:
        z = f"{miss['side']} {miss['zone']} zone"
        missed_zones.setdefault(z, []).append(float(miss["diameter_mm"]))
    for u in r_units:
        miss = missed_zones.get(u.key, [])
        add(u, not miss, "ok" if not miss else f"missed {', '.join(f'{d:.1f} mm' for d in miss)}")

    cur_ch = [f for f in cmp.findings if f.center_mm is not None]
    mc = match_nodules(cur_ch, tn_cur)
    paired_c = {p["finding_id"]: tn_cur[p["truth_index"]] for p in mc["pairs"]}
    tn_pri = [{**n["prior"], "fate": n["fate"]} for n in truth["nodules"] if n["prior"]]
    for u in c_units:
        f = next(x for x in cmp.findings if x.id == u.key)
        status = f.change.status if f.change else None
        if status == "resolved":
            pf = Finding(id=f.id, kind=f.kind, center_mm=f.change.prior_center_mm)  # type: ignore[union-attr]
            mp = match_nodules([pf], tn_pri)
            fate = tn_pri[mp["pairs"][0]["truth_index"]]["fate"] if mp["pairs"] else None
        else:
            t = paired_c.get(f.id)
            fate = t["fate"] if t else None
        ok = fate == status
        add(u, ok, "ok" if ok else f"called {status}, truth {fate or 'no nodule'}")
    return {"seed": seed, "size": size, "units": units, "low_dose": bool(truth["studies"]["current"]["low_dose"]),
            "noise_hu": truth["studies"]["current"]["noise_hu"],
            "n_truth": len(tn_cur), "cost": {"answer_s": answer_s, "verify_s": verify_s, "compare_s": compare_s,
                                            "change_s": change_s}}


def _cached(path: Path | None) -> dict[str, Any] | None:
    """A cached collection, or None when there is none or its units' features are of another version."""
    if path is None or not path.exists():
        return None
    rec: dict[str, Any] = json.loads(path.read_text())
    if rec.get("features_version", 1) != verifier.UNIT_FEATURES_VERSION:
        log.info("cached verifier units %s have features of version %s; collecting again", path.name,
                 rec.get("features_version", 1))
        return None
    return rec


def collect_many(seeds: list[int], size: str = "small", cache_dir: Path | None = None,
                 reuse_any: bool = False) -> list[dict[str, Any]]:
    """``collect`` for each seed; with ``cache_dir``, a seed already collected for this detector is reused
    (``reuse_any``: the newest collection of any detector version; each record names its own)."""
    out = []
    fp = detector_fingerprint()
    for seed in seeds:
        path = cache_dir / f"units-{size}-{seed}-{fp}.json" if cache_dir else None
        if cache_dir is not None and reuse_any and (path is None or not path.exists()):
            older = sorted(cache_dir.glob(f"units-{size}-{seed}-*.json"), key=lambda p: p.stat().st_mtime)
            path = older[-1] if older else path
        rec = _cached(path)
        if rec is not None and path is not None:
            rec.setdefault("detector", path.stem.rsplit("-", 1)[-1])
            for u in rec["units"]:  # units cached before a zone feature existed get it from their key
                if u["kind"] == "region":
                    u["features"] = {**verifier.zone_features(u["key"]), **u["features"]}
            out.append(rec)
            continue
        path = cache_dir / f"units-{size}-{seed}-{fp}.json" if cache_dir else None
        t0 = time.perf_counter()
        rec = collect(seed, size)
        rec["detector"] = fp
        rec["features_version"] = verifier.UNIT_FEATURES_VERSION
        log.info("verifier units for seed %d: %d units, %d wrong, %.0f s", seed, len(rec["units"]),
                 sum(1 for u in rec["units"] if not u["correct"]), time.perf_counter() - t0)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec))
        out.append(rec)
    return out


#: inverse regularisation strengths tried for each kind's logistic model; the one with the lowest
#: cross-validated log-loss (folds by patient) is used. Wrong answers are rare (a few per hundred units),
#: so a model free to follow them fits the calibration seeds' accidents and rates the next miss "high"
C_GRID = (0.03, 0.1, 0.3, 1.0)
CV_FOLDS = 5


def _cv_log_loss(Z: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float) -> float:
    """Out-of-fold log-loss of a logistic model with strength ``c``, the folds split by patient."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    total = 0.0
    for tr, te in GroupKFold(n_splits=min(CV_FOLDS, len(set(groups.tolist())))).split(Z, y, groups):
        if len(set(y[tr].tolist())) < 2:
            p = np.full(len(te), (y[tr].sum() + 0.5) / (len(tr) + 1.0))
        else:
            p = LogisticRegression(C=c, max_iter=2000).fit(Z[tr], y[tr]).predict_proba(Z[te])[:, 1]
        p = np.clip(p, 1e-6, 1 - 1e-6)
        total -= float(np.sum(y[te] * np.log(p) + (1 - y[te]) * np.log(1 - p)))
    return total / len(y)


def choose_c(Z: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """The regularisation strength of :data:`C_GRID` with the best cross-validated log-loss (ties: the
    stronger regularisation); the middle of the grid when there are too few patients or wrong units."""
    if len(set(groups.tolist())) < 2 or min(int((y == 0).sum()), int((y == 1).sum())) < 2:
        return C_GRID[len(C_GRID) // 2]
    losses = [_cv_log_loss(Z, y, groups, c) for c in C_GRID]
    return C_GRID[int(np.argmin(np.round(losses, 6)))]


def _fit_kind(kind: str, X: np.ndarray, y: np.ndarray, names: list[str],
              groups: np.ndarray | None = None) -> verifier.KindModel:
    from sklearn.linear_model import LogisticRegression

    groups = np.arange(len(y)) if groups is None else groups
    keep = [i for i in range(len(names)) if np.std(X[:, i]) > 1e-9]
    signs = verifier.MONOTONE.get(kind, {})
    c = C_GRID[len(C_GRID) // 2]
    while True:
        mean = X[:, keep].mean(0)
        scale = X[:, keep].std(0)
        Z = (X[:, keep] - mean) / scale
        if len(set(y.tolist())) < 2:
            coef, intercept = np.zeros(len(keep)), float(np.log((y.mean() + 0.5 / len(y)) / (1 - y.mean() + 0.5 / len(y))))
            break
        c = choose_c(Z, y, groups)
        lr = LogisticRegression(C=c, max_iter=2000).fit(Z, y)
        coef, intercept = lr.coef_[0], float(lr.intercept_[0])
        bad = [j for j, i in enumerate(keep) if names[i] in signs and np.sign(coef[j]) * signs[names[i]] < 0]
        if not bad:
            break
        drop = keep[max(bad, key=lambda j: abs(coef[j]))]
        log.info("calibration %s: dropping %s (fitted against its expected direction)", kind, names[drop])
        keep = [i for i in keep if i != drop]
    log.info("calibration %s: C=%g (cross-validated by patient)", kind, c)
    return verifier.KindModel(features=[names[i] for i in keep], mean=[float(v) for v in mean],
                              scale=[float(v) for v in scale], coef=[float(v) for v in coef], intercept=intercept,
                              n=int(len(y)), n_wrong=int((y == 0).sum()), c=c)


def fit(records: list[dict[str, Any]], size: str, command: str) -> verifier.Calibration:
    units = [u for r in records for u in r["units"]]
    models: dict[str, verifier.KindModel] = {}
    for kind in ("finding", "region", "change"):
        ku = [u for u in units if u["kind"] == kind]
        if not ku:
            continue
        names = sorted(ku[0]["features"])
        X = np.array([[u["features"][k] for k in names] for u in ku], float)
        y = np.array([1 if u["correct"] else 0 for u in ku])
        groups = np.array([int(u.get("seed", -1)) for u in ku])
        models[kind] = _fit_kind(kind, X, y, names, groups)
    near = [u for u in units if u["kind"] == "region"
            and u["features"].get("near_conf_mean", 0.0) >= verifier.NEAR_MISS_STRONG]
    n_wrong = sum(1 for u in near if not u["correct"])
    rule = verifier.NearMissRule(threshold=verifier.NEAR_MISS_STRONG, n=len(near), n_wrong=n_wrong,
                                 p=(len(near) - n_wrong + 1.0) / (len(near) + 2.0))
    cal = verifier.Calibration(version=verifier.CALIBRATION_VERSION, created=dt.date.today().isoformat(),
                               command=command, size=size, seeds=sorted({r["seed"] for r in records}),
                               detector=",".join(sorted({r.get("detector", "?") for r in records})), models=models,
                               near_miss=rule)
    cal.fit_metrics = metrics(records, cal)
    return cal


def _ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def metrics(records: list[dict[str, Any]], cal: verifier.Calibration | None = None) -> dict[str, Any]:
    """AUC of 1 - P for 'wrong', ECE of P for 'correct', wrong answers rated high, cost ratio; overall and per kind."""
    from sklearn.metrics import roc_auc_score

    units = [u for r in records for u in r["units"]]
    for u in units:
        u["p"] = verifier.predict(u["kind"], u["features"], cal)[0]

    def summary(us: list[dict[str, Any]]) -> dict[str, Any]:
        if not us:
            return {"n": 0}
        p = np.array([u["p"] for u in us])
        y = np.array([1 if u["correct"] else 0 for u in us])
        wrong = y == 0
        out: dict[str, Any] = {"n": int(len(us)), "n_wrong": int(wrong.sum()), "ece": _ece(p, y),
                               "wrong_rated_high": (float(np.mean([level_for(v) == "high" for v in p[wrong]]))
                                                    if wrong.any() else None),
                               "correct_rated_high": (float(np.mean([level_for(v) == "high" for v in p[~wrong]]))
                                                      if (~wrong).any() else None)}
        out["auc_wrong"] = float(roc_auc_score(wrong, 1 - p)) if 0 < wrong.sum() < len(us) else None
        return out

    res = {"all": summary(units)}
    for kind in ("finding", "region", "change"):
        res[kind] = summary([u for u in units if u["kind"] == kind])
    ans = sum(r["cost"]["answer_s"] for r in records)
    ver = sum(r["cost"]["verify_s"] for r in records)
    cmp_s = sum(r["cost"]["compare_s"] for r in records)
    ch = sum(r["cost"]["change_s"] for r in records)
    res["cost"] = {"detect_answer_s": ans / len(records), "detect_verify_s": ver / len(records),
                   "detect_ratio": ver / ans if ans else None, "compare_answer_s": cmp_s / len(records),
                   "compare_verify_s": ch / len(records), "compare_ratio": ch / cmp_s if cmp_s else None}
    res["wrong_examples"] = [f"seed {u['seed']} {u['kind']} {u['key']}: {u['why']} (P={u['p']:.2f})"
                             for u in units if not u["correct"]]
    res["mix"] = {"scans": len(records), "low_dose_scans": sum(1 for r in records if r["low_dose"]),
                  "truth_nodules": sum(r["n_truth"] for r in records)}
    return res


def calibrate(seeds: list[int], size: str = "small", out: Path | None = None, cache_dir: Path | None = None,
              reuse_any: bool = False) -> verifier.Calibration:
    """Collect units on ``seeds``, fit, and write the calibration JSON (default: the packaged file)."""
    overlap = set(seeds) & set(EVALUATION_SEEDS)
    if overlap:
        raise ValueError(f"calibration seeds {sorted(overlap)} are evaluation seeds; pick others (5000+).")
    records = collect_many(seeds, size, cache_dir, reuse_any)
    cmd = f"radassist verifier calibrate --seeds {seeds[0]}-{seeds[-1]} --size {size}"
    cal = fit(records, size, cmd)
    path = Path(out or verifier.CALIBRATION_PATH)
    path.write_text(json.dumps(cal.model_dump(mode="json"), indent=1) + "\n")
    verifier._load.cache_clear()
    log.info("verifier calibration written to %s", path)
    return cal


def evaluate(seeds: list[int], size: str = "small", cache_dir: Path | None = None,
             reuse_any: bool = False) -> dict[str, Any]:
    cal = verifier.load_calibration()
    if cal is not None and set(seeds) & set(cal.seeds):
        raise ValueError("evaluation seeds overlap the calibration seeds; pick held-out seeds (6000+).")
    records = collect_many(seeds, size, cache_dir, reuse_any)
    res = metrics(records, cal)
    res["seeds"] = list(seeds)
    res["calibration"] = {"seeds": cal.seeds if cal else [], "detector": cal.detector if cal else None,
                          "detector_now": detector_fingerprint(),
                          "evaluated_on": sorted({r.get("detector", "?") for r in records})}
    return res
