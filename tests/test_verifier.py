"""The self-consistency verifier on the session's phantom patient (seed 3; the calibration uses 5000+).

A perturbation that really changes the answer (the finding moved into empty lung, a one-voxel "nodule",
a hidden near miss, thick slices on which injected 5 mm test nodules go unseen) must lower the
calibrated reliability; a stable finding keeps it high; the packaged
calibration loads and is monotone; "how sure are you?" answers from the stored verification without
re-running any tool; on the served path, sampled plans are clustered by meaning with MiniLM.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tools import verifier
from tools.study import Series


@pytest.fixture(scope="module")
def ct(phantom_patient: dict) -> dict:
    from tools.cache import cached_study
    from tools.detector import analyze_series

    series = cached_study(str(Path(phantom_patient["current"]).resolve())).primary
    analysis = analyze_series(series)
    truth = phantom_patient["truth"]
    tn = [n["current"] for n in truth["nodules"] if n["current"]]
    return {"series": series, "analysis": analysis, "truth": tn}


def _stable_finding(ct: dict) -> dict:
    """A detected nodule (>= 6 mm) whose size agrees with the truth: the answer is right."""
    for f in ct["analysis"].nodules:
        for t in ct["truth"]:
            if np.linalg.norm(np.subtract(f.center_mm, t["center_mm"])) < 3 and abs(f.diameter_mm - t["diameter_mm"]) < 1 \
                    and f.diameter_mm >= 6:
                return f.model_dump(mode="json")
    raise AssertionError("seed 3 should have a well-measured nodule of 6 mm or more")


def _empty_lung_point(ct: dict) -> list[float]:
    """A point in aerated lung with no structure within 5 mm (searched on the image, away from every nodule)."""
    s: Series = ct["series"]
    px = s.pixels
    nk, nj, ni = px.shape
    rng = np.random.default_rng(0)
    for _ in range(5000):
        k, j, i = int(rng.integers(nk // 4, 3 * nk // 4)), int(rng.integers(nj // 4, 3 * nj // 4)), \
            int(rng.integers(ni // 5, 4 * ni // 5))
        r = [int(np.ceil(5 / float(v))) for v in (s.spacing[2], s.spacing[1], s.spacing[0])]
        cube = px[max(k - r[0], 0):k + r[0] + 1, max(j - r[1], 0):j + r[1] + 1, max(i - r[2], 0):i + r[2] + 1]
        p = s.vox_to_mm(np.array([i, j, k], float))
        if cube.max() < -400 and cube.mean() > -950 and all(
                np.linalg.norm(p - np.asarray(t["center_mm"])) > 30 for t in ct["truth"]):
            return [float(v) for v in p]
    raise AssertionError("no empty lung found")


def _p(units: list[verifier.Unit]) -> float:
    assert verifier.score_units(units) == "calibrated"
    return float(units[0].p)


def test_stable_finding_keeps_a_high_score_and_a_moved_one_drops(ct: dict) -> None:
    s = ct["series"]
    noise = verifier.noise_level(s)
    good = _stable_finding(ct)
    p_good = _p(verifier.finding_units(s, [good], noise))
    assert p_good >= 0.8, p_good

    # the same answer with its box put in empty lung: nothing is there to re-find
    c = _empty_lung_point(ct)
    shift = np.subtract(c, good["center_mm"])
    moved = {**good, "center_mm": c, "bbox_mm": (np.asarray(good["bbox_mm"]) + np.tile(shift, 2)).tolist()}
    u = verifier.finding_units(s, [moved], noise)
    assert _p(u) < 0.5 and _p(u) < p_good - 0.3
    assert "re-found in only" in verifier.caveat_for(u[0])


def test_one_voxel_fake_nodule_gets_a_low_score(ct: dict) -> None:
    s: Series = ct["series"]
    c = _empty_lung_point(ct)
    ijk = np.round(s.mm_to_vox(c)).astype(int)
    px = s.pixels.copy()
    px[ijk[2], ijk[1], ijk[0]] = 60.0  # one voxel of soft tissue in the air
    fake_series = dataclasses.replace(s, pixels=px, series_uid=s.series_uid + ".fake")
    sp = np.asarray(s.spacing, float)
    fake = {"id": "F9", "kind": "nodule", "center_mm": c, "diameter_mm": 5.0, "confidence": 0.6,
            "bbox_mm": (np.concatenate([np.asarray(c) - sp / 2, np.asarray(c) + sp / 2])).tolist(), "notes": []}
    u = verifier.finding_units(fake_series, [fake], verifier.noise_level(s))
    assert _p(u) < 0.5
    assert u[0].info["remeasure"]["found"] <= 2


def test_a_hidden_near_miss_lowers_the_none_found_answer(ct: dict) -> None:
    """"Nothing in this zone" next to a nodule the detector scored just under its threshold is rated lower
    than the same zone without it."""
    s, an = ct["series"], ct["analysis"]
    good = _stable_finding(ct)
    zone = good["region"]
    cand = next(c for c in an.candidates if np.linalg.norm(
        s.vox_to_mm(c["seg"]["center_ijk"]) - np.asarray(good["center_mm"])) < 3)
    missed = dataclasses.replace(an, candidates=[{**cand, "conf": 0.45}])
    empty = dataclasses.replace(an, candidates=[])
    noise = verifier.noise_level(s)
    p_missed = _p(verifier.region_units(s, missed, [], [zone], noise))
    p_empty = _p(verifier.region_units(s, empty, [], [zone], noise))
    assert p_missed < p_empty - 0.2, (p_missed, p_empty)
    u = verifier.region_units(s, missed, [], [zone], noise)
    verifier.score_units(u)
    assert "borderline candidate" in verifier.caveat_for(u[0])


def test_injected_test_nodule_is_a_real_nodule_on_the_pleura_or_a_vessel(ct: dict) -> None:
    """The sensitivity probe's sites are where small nodules hide, and what it injects measures as a 5 mm nodule."""
    from tools.anatomy import NAME_TO_LABEL
    from tools.detector import measure_at

    s, an = ct["series"], ct["analysis"]
    anat = an.anatomy
    zone = "right lower zone"
    sites = verifier.probe_sites(anat, zone, [], np.random.default_rng(0))
    kinds = [k for k, _ in sites]
    assert kinds.count("pleural") == verifier.N_PROBES and kinds.count("vascular") >= 1
    for kind, c in sites:
        v = np.round(anat.grid.mm_to_vox(c)).astype(int)
        if kind == "pleural":  # on the zone's lung, next to the chest wall
            assert anat.labels[v[2], v[1], v[0]] == NAME_TO_LABEL[zone]
            around = anat.labels[v[2] - 1:v[2] + 2, v[1] - 1:v[1] + 2, v[0] - 1:v[0] + 2]
            assert np.isin(around, [NAME_TO_LABEL[r] for r in ("body", "ribs", "spine")] + [0]).any()
    c = np.asarray(_empty_lung_point(ct))
    probe = verifier.inject_nodule(s, c, 6.0, 20.0, np.random.default_rng(1), verifier.noise_level(s))
    m = measure_at(probe, c.tolist(), roi_mm=verifier.PROBE_ROI_MM)
    assert m is not None and abs((m.diameter_mm or 0) - 6.0) < 1.0 and np.linalg.norm(np.subtract(m.center_mm, c)) < 1.5
    before = measure_at(s, c.tolist(), roi_mm=verifier.PROBE_ROI_MM)  # nothing there before the injection
    assert before is None or (before.diameter_mm or 0) < verifier.MIN_REFOUND_MM


def _thick_slices(s: Series, f: int) -> Series:
    """The same scan reconstructed with ``f`` times thicker slices (block means along the slice axis)."""
    nk = s.pixels.shape[0] // f * f
    px = s.pixels[:nk].reshape(nk // f, f, *s.pixels.shape[1:]).mean(axis=1)
    return dataclasses.replace(s, series_uid=f"{s.series_uid}.thick{f}", pixels=px.astype(np.float32),
                               spacing=(s.spacing[0], s.spacing[1], s.spacing[2] * f),
                               origin=s.vox_to_mm(np.array([0.0, 0.0, (f - 1) / 2.0])))


def test_thick_slices_lower_the_measured_sensitivity_and_the_none_found_answer(ct: dict) -> None:
    """The same patient on a thick-slice reconstruction (partial volume hides small nodules): fewer injected
    5 mm test nodules would be reported, and "nothing found" in its zones is rated lower; a perturbation that
    really makes a miss likelier lowers the score."""
    s, an = ct["series"], ct["analysis"]
    thick = _thick_slices(s, 2)
    empty = dataclasses.replace(an, candidates=[])
    zones = list(verifier.LUNG_ZONES)
    thin_u = verifier.region_units(s, empty, [], zones, verifier.noise_level(s))
    thick_u = verifier.region_units(thick, empty, [], zones, verifier.noise_level(thick))
    seen = [sum(u.info["probe"]["seen"] for u in us) for us in (thin_u, thick_u)]
    assert all(u.info["probe"]["n"] == 2 * verifier.N_PROBES for u in thin_u)
    assert seen[0] >= seen[1] + 8, seen
    verifier.score_units(thin_u)
    verifier.score_units(thick_u)
    p_thin, p_thick = (float(np.mean([u.p for u in us])) for us in (thin_u, thick_u))
    # by how much is the calibration's to say: on the calibration phantoms the probes' share predicts few
    # misses, so the cross-validated zone model leans on it lightly (about 0.005 here)
    assert p_thick < p_thin, (p_thin, p_thick)
    weakest = min(thick_u, key=lambda u: u.p or 0.0)
    assert weakest.info["probe"]["seen"] < weakest.info["probe"]["n"]
    assert "test nodule" in verifier.caveat_for(weakest) and "lung-window slices" in verifier.caveat_for(weakest)


def test_a_weak_zone_changes_the_answer_wording() -> None:
    """A zone whose "nothing found" is rated under high is not called clear: the answer says what to check
    there; rated low, that comes first."""
    from agents.compose import compose

    check = ("No nodule is reported in the left lower zone, but a 5 mm test nodule placed on the pleura "
             "(juxtapleural) was detected in only 1/5 tries on this scan: small nodules there can be missed; "
             "review the left lower zone's pleural surface and vessels on thin lung-window slices.")
    result = {"tool": "detector", "title": "Detector", "status": "done", "summary": "No nodule found in the left "
              "lower zone.", "findings": []}

    def answer(score: float) -> str:
        v = {"score": score, "method": "self-consistency", "caveat": check,
             "details": {"regions": {"left lower zone": {"p": score, "check": check}}}}
        return compose("any nodules in the left lower zone?", {"calls": []}, [result], v, {}, "t1", None, None).answer

    medium, low = answer(0.65), answer(0.3)
    assert "Not ruled out: " + check in medium and medium.count(check) == 1
    assert medium.index("No nodule found") < medium.index("Not ruled out")
    assert low.startswith("Uncertain: " + check) and low.count(check) == 1
    high = compose("q", {"calls": []}, [result], {"score": 0.95, "method": "m", "caveat": "", "details": {
        "regions": {"left lower zone": {"p": 0.95}}}}, {}, "t1", None, None).answer
    assert "Not ruled out" not in high and "Uncertain" not in high


def test_calibration_file_loads_is_disjoint_and_monotone() -> None:
    from tools.verifier_calibrate import EVALUATION_SEEDS

    cal = verifier.load_calibration()
    assert cal is not None and cal.version == verifier.CALIBRATION_VERSION
    assert cal.seeds and min(cal.seeds) >= 5000 and not set(cal.seeds) & set(EVALUATION_SEEDS)
    assert {"finding", "region"} <= set(cal.models)
    for kind, signs in verifier.MONOTONE.items():
        m = cal.models.get(kind)
        if m is None:
            continue
        base = dict(zip(m.features, m.mean))
        for feat, sign in signs.items():
            if feat not in m.features:
                continue
            lo, hi = m.mean[m.features.index(feat)] - 2 * m.scale[m.features.index(feat)], \
                m.mean[m.features.index(feat)] + 2 * m.scale[m.features.index(feat)]
            ps = [m.prob({**base, feat: v}) for v in np.linspace(lo, hi, 7)]
            diffs = np.diff(ps) * sign
            assert np.all(diffs >= -1e-12), (kind, feat, ps)
    # the re-found share is what the finding model leans on most
    fm = cal.models["finding"]
    assert fm.prob({**dict(zip(fm.features, fm.mean)), "refound": 1.0, "conf_mean": 1.0}) > \
        fm.prob({**dict(zip(fm.features, fm.mean)), "refound": 0.0, "conf_mean": 0.0})


def test_regularisation_is_chosen_by_patient_cross_validation() -> None:
    """With a handful of wrong units among hundreds, noise features must not be followed (the strongest
    regularisation wins), while a feature that truly separates them keeps a weak one."""
    from tools.verifier_calibrate import C_GRID, _fit_kind, choose_c

    rng = np.random.default_rng(0)
    n, per = 400, 12  # 400 units of 33 patients
    groups = np.arange(n) // per
    y = (rng.random(n) > 0.04).astype(int)  # ~4 % wrong, as zone misses
    noise = rng.normal(size=(n, 8))
    assert choose_c(noise, y, groups) == min(C_GRID)
    signal = np.column_stack([noise[:, :2], np.where(y == 1, 0.0, -4.0) + 0.3 * rng.normal(size=n)])
    assert choose_c(signal, y, groups) > min(C_GRID)
    m = _fit_kind("region", noise, y, [f"f{i}" for i in range(8)], groups)
    assert m.c == min(C_GRID) and max(abs(c) for c in m.coef) < 0.2
    assert all(abs(m.prob(dict(zip(m.features, row))) - y.mean()) < 0.03 for row in noise[:20])


def test_follow_up_reliability_answers_from_the_stored_verification(tmp_path: Path, phantom_patient: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.engine import Consultant

    c = Consultant(home_dir=tmp_path)
    a = c.ask("Show me all pulmonary nodules", study=phantom_patient["current"])
    lesions = [f for f in a.findings if f.kind in ("nodule", "mass")]
    assert lesions and all(f.reliability is not None for f in lesions)
    assert a.reliability.method.count("calibrated on phantom seeds") == 1
    assert a.reliability.details["units"] and a.reliability.details["regions"]
    assert all(r["probe"]["n"] >= 2 for r in a.reliability.details["regions"].values())
    assert "injected 5 mm test nodules" in a.reliability.method
    stored = a.reliability.model_dump()

    def must_not_run(*args: object, **kw: object) -> None:
        raise AssertionError("a reliability follow-up must not recompute")

    import tools.detector

    monkeypatch.setattr(verifier, "perturb_remeasure", must_not_run)
    monkeypatch.setattr(verifier, "probe_zone", must_not_run)
    monkeypatch.setattr(verifier, "assess", must_not_run)
    monkeypatch.setattr(tools.detector, "run_detector", must_not_run)
    for q in ("How sure are you?", "double-check that", "how reliable is that measurement?"):
        b = c.ask(q, thread_id=a.thread_id)
        assert b.tools == ["verifier"], (q, b.tools)
        assert b.reliability.model_dump() == stored
        assert "re-found in" in b.answer and f"({a.reliability.score:.2f})" in b.answer


def test_cluster_by_meaning_on_minilm() -> None:
    from agents.verify import cluster_by_meaning, plan_sentence

    a = plan_sentence({"calls": [{"tool": "detector", "args": {"regions": ["right upper zone"], "want": "lesions",
                                                               "lesion_kind": "nodule"}}]})
    b = plan_sentence({"calls": [{"tool": "report_writer", "args": {}}]})
    assert cluster_by_meaning([a, a, b, a]) == [0, 0, 1, 0]


def test_sampling_consistency_on_a_real_served_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans sampled from a real llama.cpp server (SmolLM2), clustered by meaning (a sample whose call
    fails on a loaded machine is left out, never counted as agreement)."""
    from test_served import ALIAS, Server

    from agents.planner import StructuredOutputPlanner
    from agents.verify import sampling_consistency
    from models.openai_backend import OpenAIChatModel

    import agents.verify

    monkeypatch.setattr(agents.verify, "SAMPLE_TIMEOUT_S", 120.0)  # two shared cores: give the small model time
    srv = Server()
    srv.start()
    try:
        planner = StructuredOutputPlanner(OpenAIChatModel(base_url=srv.url, model=ALIAS, timeout_s=120), label=ALIAS)
        q = "Show me all pulmonary nodules"
        plan = planner.plan(q, {}, []).to_dict()
        s = sampling_consistency(planner, q, {}, plan, n=2)
        srv.stop()
        assert sampling_consistency(planner, q, {}, plan, n=2) is None  # server gone: no samples, no score
    finally:
        srv.stop()
    assert s is not None and 1 <= s["n"] <= 2 and len(s["samples"]) == s["n"]
    assert 1 <= s["clusters"] <= s["n"] and 0.0 <= s["agreement"] <= 1.0
    assert 0.0 <= s["semantic_entropy"] <= np.log(2) + 1e-9
