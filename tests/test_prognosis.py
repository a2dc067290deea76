"""Prognosis predictor: parsing, refusals, questions for missing features, site training, plot, cards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tools import prognosis as P
from tools.errors import RadAssistError

CARD_KEYS = {
    "name", "cohort", "source", "citation", "era", "population", "n", "events", "features", "ranges",
    "variants", "selected_model", "cv_c_index", "cv_c_index_ci95", "calibration_12m", "intended_use",
    "not_for", "limitations", "image_features", "image_features_note", "endpoint", "validation",
}


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RADASSIST_HOME", str(home))
    return home


@pytest.fixture
def synthetic_brain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A BrainCancer-shaped CSV (same columns and coding) so the brain path is tested without islp."""
    rng = np.random.default_rng(3)
    n = 90
    dx = rng.choice(["Meningioma", "LG glioma", "HG glioma", "Other"], n, p=[0.45, 0.12, 0.28, 0.15])
    ki = rng.choice([40, 50, 60, 70, 80, 90, 100], n)
    gtv = np.round(rng.uniform(0.1, 35, n), 2)
    lp = (np.select([dx == "HG glioma", dx == "LG glioma", dx == "Other"], [2.0, 0.8, 0.6], 0)
          - 0.04 * (ki - 80) + 0.03 * gtv)
    t = rng.exponential(60 * np.exp(-lp))
    c = rng.uniform(5, 80, n)
    df = pd.DataFrame({"sex": rng.choice(["Female", "Male"], n), "diagnosis": dx,
                       "loc": rng.choice(["Supratentorial", "Infratentorial"], n), "ki": ki, "gtv": gtv,
                       "stereo": rng.choice(["SRS", "SRT"], n), "status": (t <= c).astype(int),
                       "time": np.round(np.minimum(t, c), 2)})
    path = tmp_path / "BrainCancer.csv"
    df.to_csv(path, index=False)
    monkeypatch.setenv("RADASSIST_BRAIN_CSV", str(path))

    def clear() -> None:
        P._CARDS.pop("brain_cancer", None)
        for k in [k for k in P._FITTED if k[0] == "brain_cancer"]:
            del P._FITTED[k]

    clear()
    yield path
    clear()


# ---------------------------------------------------------------- parsing

def test_parse_example_exact() -> None:
    assert P.parse_clinical("67-year-old man, Karnofsky 60, squamous") == {
        "age": 67, "sex": "male", "karnofsky": 60, "histology": "squamous"}


@pytest.mark.parametrize("text, expected", [
    ("58 yo woman, ECOG 1, non-small cell lung cancer", {"age": 58, "sex": "female", "ecog": 1, "cancer": "lung"}),
    ("72M KPS 80 small cell lung cancer, diagnosed 2 years ago, no prior chemo",
     {"age": 72, "sex": "male", "karnofsky": 80, "histology": "smallcell", "months_since_diagnosis": 24,
      "prior_therapy": "no"}),
    ("Patient aged 45, female, WHO grade II astrocytoma, Karnofsky performance status of 90%, Ki-67 20%",
     {"age": 45, "sex": "female", "karnofsky": 90, "diagnosis": "low-grade glioma", "cancer": "brain"}),
    ("Glioblastoma, KI 70, GTV 12 cc; she had SRS",
     {"sex": "female", "karnofsky": 70, "diagnosis": "high-grade glioma", "gtv_cm3": 12, "stereo": "SRS"}),
    ("performance status 2, adenocarcinoma, previously treated, lost 10 lb",
     {"ecog": 2, "histology": "adeno", "prior_therapy": "yes", "weight_loss_kg": 4.5}),
    ("a 61 year old gentleman with performance status 70 and large cell carcinoma",
     {"age": 61, "sex": "male", "karnofsky": 70, "histology": "large"}),
    ("meningioma, 8 months since diagnosis, tumour volume 2500 mm3",
     {"diagnosis": "meningioma", "months_since_diagnosis": 8, "gtv_cm3": 2.5}),
])
def test_parse_phrasings(text: str, expected: dict) -> None:
    got = P.parse_clinical(text)
    for k, v in expected.items():
        assert got.get(k) == v, (k, got)
    assert "histology" not in got or "non-small" not in text  # NSCLC is never read as small cell


def test_parse_pairs_and_errors() -> None:
    got = P.parse_clinical_pairs(["age=67", "Sex=M", "kps=60%", "histology=squamous cell", "ph.ecog=1",
                                  "prior=yes", "gtv=3.2"])
    assert got == {"age": 67, "sex": "male", "karnofsky": 60, "histology": "squamous", "ecog": 1,
                   "prior_therapy": "yes", "gtv_cm3": 3.2}
    with pytest.raises(RadAssistError):
        P.parse_clinical_pairs(["age67"])
    with pytest.raises(RadAssistError):
        P.parse_clinical_pairs(["sex=banana"])


# ---------------------------------------------------------------- prediction, plot, card

def test_lung_prediction_plot_and_card(tmp_path: Path) -> None:
    plot = tmp_path / "out" / "surv.png"
    req = P.PrognosisRequest(clinical=P.parse_clinical("67-year-old man, Karnofsky 60, squamous"),
                             image_features={"largest_diameter_mm": 31.0, "total_volume_mm3": 9000.0,
                                             "n_lesions": 1}, plot_path=plot)
    r = P.predict(req)
    assert r.refused is None and r.missing == []
    assert r.model.startswith(("va_lung/", "ncctg_lung/"))
    assert r.median_survival_days is not None and r.median_survival_days > 0
    assert r.interval is not None and r.interval[0] <= r.median_survival_days <= r.interval[1]
    assert set(r.survival_at) == {"6 months", "12 months", "24 months"}
    s = list(r.survival_at.values())
    assert all(0 <= v <= 1 for v in s) and s == sorted(s, reverse=True)
    assert r.risk_group in {"lower", "intermediate", "higher"}
    assert r.drivers and all({"feature", "direction", "hazard_ratio"} <= set(d) for d in r.drivers)
    assert "NOT used" in r.summary and "not for individual treatment decisions" in r.summary
    assert CARD_KEYS <= set(r.model_card) and "variant" in r.model_card
    assert len(r.evidence) == 1 and r.evidence[0].kind == "plot"
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert r.to_dict()["evidence"][0]["path"] == str(plot)


def test_ncctg_without_histology_uses_ecog() -> None:
    r = P.predict(P.PrognosisRequest(clinical={"age": "67", "sex": "female", "ecog": "2"}, image_features={},
                                     cancer="lung"))
    assert r.model.startswith("ncctg_lung/") and r.refused is None
    assert "1980s" in r.summary
    ecog = next(d for d in r.drivers if d["feature"] == "ecog")
    assert ecog["hazard_ratio"] > 1 and ecog["direction"].startswith("raises")


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("clinical", [
    {"age": 17, "sex": "male", "ecog": 1},
    {"age": 105, "sex": "male", "ecog": 1},
    {"age": 60, "sex": "male", "karnofsky": 150},
])
def test_refuses_out_of_range(clinical: dict) -> None:
    r = P.predict(P.PrognosisRequest(clinical=clinical, image_features={}, cancer="lung"))
    assert r.refused and r.median_survival_days is None and r.survival_at == {}
    assert str(clinical["age"]) in r.refused or "150" in r.refused


def test_refuses_recurrence() -> None:
    r = P.predict(P.PrognosisRequest(clinical={"age": 67, "sex": "male", "ecog": 1}, image_features={},
                                     question="recurrence", cancer="lung"))
    assert r.refused and "recurrence" in r.refused.lower() and r.median_survival_days is None


def test_refuses_karnofsky_below_brain_cohort(synthetic_brain: Path) -> None:
    r = P.predict(P.PrognosisRequest(clinical={"diagnosis": "high-grade glioma", "karnofsky": 10},
                                     image_features={}, cancer="brain"))
    assert r.refused and "Karnofsky" in r.refused and "40" in r.refused


def test_brain_unavailable_without_islp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADASSIST_BRAIN_CSV", str(tmp_path / "absent.csv"))
    r = P.predict(P.PrognosisRequest(clinical={"diagnosis": "meningioma", "karnofsky": 90, "gtv_cm3": 3},
                                     image_features={}))
    assert r.refused and "islp" in r.refused
    assert any(c["name"] == "brain_cancer" and c["available"] is False for c in P.list_models())


# ---------------------------------------------------------------- asking for missing features

def test_asks_for_missing_lung_features() -> None:
    r = P.predict(P.PrognosisRequest(clinical={"age": 67, "sex": "male"}, image_features={}, cancer="lung"))
    assert r.refused is None and r.median_survival_days is None
    assert r.missing == ["ecog or karnofsky"] and "please give" in r.summary
    r = P.predict(P.PrognosisRequest(clinical={"age": 67}, image_features={"total_volume_mm3": 900.0}))
    assert r.missing == ["cancer"]


def test_brain_asks_for_volume_then_uses_detector_volume(synthetic_brain: Path, tmp_path: Path) -> None:
    clin = P.parse_clinical("glioblastoma, Karnofsky 70")
    r = P.predict(P.PrognosisRequest(clinical=clin, image_features={}))
    assert r.missing == ["gtv_cm3"] and r.model == "brain_cancer"
    r = P.predict(P.PrognosisRequest(clinical={"diagnosis": "glioma", "karnofsky": 70}, image_features={}))
    assert "diagnosis" in r.missing  # grade unknown: asked, not guessed
    r = P.predict(P.PrognosisRequest(clinical=clin, image_features={"total_volume_mm3": 12000.0, "n_lesions": 1},
                                     plot_path=tmp_path / "b.png"))
    assert r.refused is None and r.model.startswith("brain_cancer/")
    assert "12" in r.summary and "surrogate" in r.summary
    assert r.model_card["image_features"] == {"gtv_cm3": P.BUILTIN["brain_cancer"].image_features["gtv_cm3"]}
    assert (tmp_path / "b.png").stat().st_size < 200_000


# ---------------------------------------------------------------- site cohort training

def _synthetic_cohort(path: Path, n: int = 240, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    age = rng.uniform(40, 80, n).round()
    stage = rng.choice(["I", "II", "III"], n)
    kps = rng.choice([60, 70, 80, 90, 100], n)
    lp = 0.04 * (age - 60) + np.select([stage == "II", stage == "III"], [0.7, 1.4], 0) - 0.03 * (kps - 80)
    t = rng.exponential(365 * np.exp(-lp))
    c = rng.uniform(100, 1500, n)
    pd.DataFrame({"Age": age, "Stage": stage, "KPS": kps, "os_days": np.minimum(t, c).round(1),
                  "dead": (t <= c).astype(int)}).to_csv(path, index=False)


def test_train_cohort_registers_validated_model(tmp_path: Path, _home: Path) -> None:
    csv = tmp_path / "site.csv"
    _synthetic_cohort(csv)
    card = P.train_cohort(csv, "os_days", "dead", name="site_lung", cancer="lung")
    assert card["cv_c_index"] > 0.6
    lo, hi = card["cv_c_index_ci95"]
    assert lo <= card["cv_c_index"] <= hi
    assert {"age", "stage", "karnofsky"} == {f["key"] for f in card["features"]}
    assert (_home / "prognosis" / "site_lung" / "card.json").is_file()
    assert CARD_KEYS <= set(card)
    assert any(c["name"] == "site_lung" for c in P.list_models())
    r = P.predict(P.PrognosisRequest(clinical=P.parse_clinical_pairs(["age=70", "stage=III", "kps=70"]),
                                     image_features={}, cancer="site_lung"))
    assert r.refused is None and r.model.startswith("site_lung/") and r.median_survival_days
    cv = P.cross_validate("site_lung", folds=3)
    assert cv["models"]["cox"]["c_index"] > 0.6 and cv["models"]["cox"]["calibration_12m"]
    with pytest.raises(RadAssistError):
        P.train_cohort(csv, "no_such_column", "dead")


# ---------------------------------------------------------------- cards

def test_packaged_cards_complete_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(*a, **k):  # the packaged cards must match the data: no cross-validation at run time
        raise AssertionError("card rebuilt at run time")

    monkeypatch.setattr(P, "_build_card", no_rebuild)
    for name in ("ncctg_lung", "va_lung"):
        P._CARDS.pop(name, None)
        card = P._card(P.BUILTIN[name])
        assert CARD_KEYS <= set(card)
        assert card["not_for"] and card["intended_use"] and card["era"]
        for v in card["variants"]:
            assert v["selected_model"] in v["models"]
            for m in v["models"].values():
                assert 0.5 < m["c_index"] < 1 and len(m["c_index_ci95"]) == 2
                assert len(m["calibration_12m"]) == 3
    models = {c["name"]: c for c in P.list_models()}
    assert {"ncctg_lung", "va_lung", "brain_cancer"} <= set(models)
    assert all(CARD_KEYS <= set(c) for c in models.values())
