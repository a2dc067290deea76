"""The self-consistency verifier on the session's phantom patient (seed 3; the calibration uses 5000+).

A perturbation that really changes the answer (the finding moved into empty lung, a one-voxel "nodule",
a hidden near miss) must lower the calibrated reliability; a stable finding keeps it high; the packaged
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


def test_follow_up_reliability_answers_from_the_stored_verification(tmp_path: Path, phantom_patient: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.engine import Consultant

    c = Consultant(home_dir=tmp_path)
    a = c.ask("Show me all pulmonary nodules", study=phantom_patient["current"])
    lesions = [f for f in a.findings if f.kind in ("nodule", "mass")]
    assert lesions and all(f.reliability is not None for f in lesions)
    assert a.reliability.method.count("calibrated on phantom seeds") == 1
    assert a.reliability.details["units"] and a.reliability.details["regions"]
    stored = a.reliability.model_dump()

    def must_not_run(*args: object, **kw: object) -> None:
        raise AssertionError("a reliability follow-up must not recompute")

    import tools.detector

    monkeypatch.setattr(verifier, "perturb_remeasure", must_not_run)
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
