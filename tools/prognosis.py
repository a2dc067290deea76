"""Prognosis predictor: overall-survival estimates from clinical (and, where a cohort has them,
image-derived) features, with validated models and their model cards.

Decision support, not diagnosis. Every estimate is a population-level figure from a public cohort
(or a site cohort registered with :func:`train_cohort`), stated with the cohort's era and limits.

Cohorts that ship inside installed packages (no download at run time):

- ``ncctg_lung``: NCCTG advanced lung cancer (``lifelines.datasets.load_lung``, 228 patients, 1980s).
- ``va_lung``: Veterans Administration lung cancer trial (``sksurv.datasets``, 137, 1960s-70s);
  needs scikit-survival.
- ``brain_cancer``: primary brain tumours treated with stereotactic radiation
  (``ISLP/data/BrainCancer.csv``, 88). Read from an installed ``islp`` distribution (its files are
  found through package metadata; the package is never imported) or from ``RADASSIST_BRAIN_CSV``;
  unavailable otherwise. ``islp`` is deliberately not a dependency: it pulls PyTorch Lightning,
  statsmodels and an older SciPy.

Models per cohort: Cox proportional hazards (lifelines, small ridge penalty) and a random survival
forest (scikit-survival), the one with the higher 5-fold cross-validated C-index being used. Cards
for the built-in cohorts ship in ``tools/prognosis_models/`` (rebuild with :func:`rebuild_cards`); the
models themselves are refitted at first use (well under a second each) and kept in memory.
Times are handled in days throughout.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tools.errors import RadAssistError, UnsupportedError
from tools.schemas import Evidence

log = logging.getLogger(__name__)

DAYS_PER_MONTH = 365.25 / 12.0
HORIZONS_MONTHS = (6, 12, 24)
CAL_HORIZON_DAYS = 365.25
CARD_DIR = Path(__file__).with_name("prognosis_models")
COX_PENALIZER = 0.01
RSF_PARAMS: dict[str, Any] = {
    "n_estimators": 200, "min_samples_split": 10, "min_samples_leaf": 15, "max_features": "sqrt",
    "random_state": 0, "n_jobs": 1, "low_memory": False,
}
DISCLAIMER = ("Decision support only, not a diagnosis: a population-level estimate from a historical cohort, "
              "not a prediction for this individual; not for individual treatment decisions.")
SURVIVAL_WORDS = {"survival", "overall survival", "os", "death", "mortality", "prognosis", "life expectancy"}
RECURRENCE_WORDS = {"recurrence", "relapse", "progression", "recurrence-free survival", "rfs",
                    "progression-free survival", "pfs", "disease-free survival", "dfs", "local control"}


# --------------------------------------------------------------------------------------------------
# Features: canonical names, aliases, value normalisation
# --------------------------------------------------------------------------------------------------

_ALIASES: dict[str, str] = {}
for _canon, _names in {
    "age": ["age", "age_years", "age_in_years", "years"],
    "sex": ["sex", "gender"],
    "karnofsky": ["karnofsky", "kps", "ki", "karno", "ph.karno", "ph_karno", "karnofsky_score", "karnofsky_index"],
    "ecog": ["ecog", "ph.ecog", "ph_ecog", "ecog_ps", "who_ps", "zubrod", "ps"],
    "histology": ["histology", "celltype", "cell_type", "histotype"],
    "diagnosis": ["diagnosis", "dx", "tumour_type", "tumor_type", "grade"],
    "weight_loss_kg": ["weight_loss_kg", "weight_loss", "wt_loss_kg"],
    "weight_loss_lb": ["weight_loss_lb", "wt.loss", "wt_loss", "weight_loss_lbs"],
    "prior_therapy": ["prior_therapy", "prior_treatment", "prior", "pretreated"],
    "months_since_diagnosis": ["months_since_diagnosis", "months_from_diagnosis", "months_from_dx",
                               "time_since_diagnosis"],
    "location": ["location", "loc"],
    "stereo": ["stereo", "stereotactic"],
    "gtv_cm3": ["gtv_cm3", "gtv", "gross_tumour_volume", "gross_tumor_volume", "tumour_volume_cm3",
                "tumor_volume_cm3"],
    "cancer": ["cancer", "cancer_type", "tumour_site", "tumor_site"],
}.items():
    for _n in _names:
        _ALIASES[_n] = _canon

NUMERIC_KEYS = {"age", "karnofsky", "ecog", "weight_loss_kg", "months_since_diagnosis", "gtv_cm3"}
LABELS = {
    "age": "age (years)", "sex": "sex", "karnofsky": "Karnofsky performance status",
    "ecog": "ECOG performance status", "histology": "histology (squamous, adeno, small cell, large cell)",
    "diagnosis": "diagnosis (meningioma, low-grade glioma, high-grade glioma, other)",
    "weight_loss_kg": "weight loss (kg)", "prior_therapy": "prior anticancer therapy (yes/no)",
    "months_since_diagnosis": "months since diagnosis", "location": "tumour location (supra/infratentorial)",
    "stereo": "stereotactic method (SRS/SRT)", "gtv_cm3": "gross tumour volume (cm3)",
    "cancer": "cancer type (lung or brain)",
}


def _key(name: str) -> str:
    k = re.sub(r"[\s\-/]+", "_", str(name).strip().lower())
    if k in _ALIASES:
        return _ALIASES[k]
    k2 = re.sub(r"[^a-z0-9_]+", "_", k).strip("_")
    return _ALIASES.get(k2, k2)


def _num(v: Any) -> int | float | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | float | np.integer | np.floating):
        f = float(v)
    else:
        m = re.search(r"-?\d+(?:\.\d+)?", str(v))
        if not m:
            return None
        f = float(m.group())
    if math.isnan(f):
        return None
    return int(f) if f.is_integer() else round(f, 4)


def _sex(v: Any) -> str | None:
    s = str(v).strip().lower()
    if s in {"m", "male", "man", "men", "gentleman", "boy", "1", "mr"}:
        return "male"
    if s in {"f", "female", "woman", "women", "lady", "girl", "2", "mrs", "ms"}:
        return "female"
    return None


def _histology(v: Any) -> str | None:
    s = re.sub(r"[\s_\-]+", " ", str(v).strip().lower())
    if re.search(r"non ?small|nsclc", s):
        return None
    if re.search(r"squamous|^scc$|epidermoid", s):
        return "squamous"
    if re.search(r"adeno", s):
        return "adeno"
    if re.search(r"small ?cell|^small$|sclc|oat cell", s):
        return "smallcell"
    if re.search(r"large ?cell|^large$", s):
        return "large"
    return None


_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "1": 1, "2": 2, "3": 3, "4": 4}


def _diagnosis(v: Any) -> str | None:
    s = re.sub(r"[\s_]+", " ", str(v).strip().lower())
    if "mening" in s:
        return "meningioma"
    if re.search(r"glioblastoma|\bgbm\b|high ?-?grade|\bhgg?\b|\bhg glioma|anaplastic", s):
        return "high-grade glioma"
    if re.search(r"low ?-?grade|\blgg?\b|\blg glioma|pilocytic|diffuse astrocytoma", s):
        return "low-grade glioma"
    m = re.search(r"grade\s*(iv|iii|ii|i|[1-4])\b", s)
    if m:
        return "high-grade glioma" if _ROMAN[m.group(1)] >= 3 else "low-grade glioma"
    if re.search(r"glioma|astrocytoma|oligodendroglioma|ependymoma", s):
        return "glioma"  # grade unknown: the model needs it, the answer asks for it
    if s in {"other", "others"}:
        return "other"
    return None


def _yes_no(v: Any) -> str | None:
    if isinstance(v, bool):
        return "yes" if v else "no"
    s = str(v).strip().lower()
    if s in {"yes", "y", "true", "1", "prior", "pretreated", "treated"}:
        return "yes"
    if s in {"no", "n", "false", "0", "none", "naive", "untreated"}:
        return "no"
    return None


def _location(v: Any) -> str | None:
    s = str(v).strip().lower()
    if s.startswith("infra"):
        return "infratentorial"
    if s.startswith("supra"):
        return "supratentorial"
    return None


def _stereo(v: Any) -> str | None:
    s = str(v).strip().lower()
    if s in {"srs", "radiosurgery", "stereotactic radiosurgery"}:
        return "SRS"
    if s in {"srt", "stereotactic radiotherapy", "fractionated"}:
        return "SRT"
    return None


def _cancer(v: Any) -> str | None:
    s = str(v).strip().lower()
    if re.search(r"lung|nsclc|sclc|bronch|pulmonary", s):
        return "lung"
    if re.search(r"brain|glio|mening|gbm|astrocyt|intracranial|cerebr", s):
        return "brain"
    return s or None


def _normalize_value(key: str, value: Any) -> Any:
    """Canonical value for a canonical key; raises RadAssistError if it cannot be read."""
    if value is None:
        return None
    if key in NUMERIC_KEYS:
        n = _num(value)
        if n is None:
            raise RadAssistError(f"Could not read a number for '{key}' from '{value}'.")
        if key == "weight_loss_kg" and isinstance(value, str) and re.search(r"lb|pound", value.lower()):
            n = round(float(n) / 2.20462, 1)
        return n
    if key == "weight_loss_lb":
        n = _num(value)
        if n is None:
            raise RadAssistError(f"Could not read a number for weight loss from '{value}'.")
        return round(float(n) / 2.20462, 1)
    readers: dict[str, Callable[[Any], Any]] = {
        "sex": _sex, "histology": _histology, "diagnosis": _diagnosis, "prior_therapy": _yes_no,
        "location": _location, "stereo": _stereo, "cancer": _cancer,
    }
    if key in readers:
        out = readers[key](value)
        if out is None:
            raise RadAssistError(f"Could not understand {LABELS.get(key, key)} '{value}'.")
        return out
    n = _num(value) if not isinstance(value, str) or re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value) else None
    return n if n is not None else str(value).strip().lower()


def normalize_clinical(clinical: dict[str, Any]) -> dict[str, Any]:
    """Canonical keys and values for a clinical dict (as given by the agent, the CLI or the UI)."""
    out: dict[str, Any] = {}
    for k, v in (clinical or {}).items():
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        key = _key(k)
        if key == "weight_loss_lb":
            out["weight_loss_kg"] = _normalize_value(key, v)
        else:
            out[key] = _normalize_value(key, v)
    return out


def parse_clinical_pairs(pairs: list[str]) -> dict[str, Any]:
    """``["age=67", "sex=M", "kps=60", "histology=squamous cell"]`` -> canonical features."""
    raw: dict[str, str] = {}
    for p in pairs or []:
        m = re.match(r"\s*([^=:]+?)\s*[=:]\s*(.*?)\s*$", str(p))
        if not m or not m.group(2):
            raise RadAssistError(f"Clinical feature '{p}' should be written key=value, e.g. age=67 or kps=60.")
        raw[m.group(1)] = m.group(2)
    return normalize_clinical(raw)


_NUM = r"(\d{1,3}(?:\.\d+)?)"


def parse_clinical(text: str) -> dict[str, Any]:
    """Clinical features from chat text.

    ``"67-year-old man, Karnofsky 60, squamous"`` ->
    ``{"age": 67, "sex": "male", "karnofsky": 60, "histology": "squamous"}``.
    Only what the text states is returned; nothing is guessed.
    """
    t = " " + str(text or "") + " "
    low = t.lower()
    out: dict[str, Any] = {}

    # age (and sex from "67M" / "67 F")
    for pat in (r"\b(\d{1,3})\s*-?\s*(?:years?|yrs?|y)\s*-?\s*(?:old|of age)\b",
                r"\b(\d{1,3})\s*(?:yo|y/o|y\.o\.)(?![a-z])",
                r"\bage[d]?\s*(?:of|:|=|is|was)?\s*(\d{1,3})\b"):
        m = re.search(pat, low)
        if m:
            out["age"] = _num(m.group(1))
            break
    m = re.search(r"(?<![\w.])(\d{2,3})\s?([MF])\b", t)
    if m:
        out.setdefault("age", _num(m.group(1)))
        out["sex"] = "male" if m.group(2) == "M" else "female"

    # sex
    if "sex" not in out:
        male = re.search(r"\b(male|man|gentleman|gent|boy|mr)\b", low)
        female = re.search(r"\b(female|woman|lady|girl|mrs|ms)\b", low)
        if male and female:
            out["sex"] = "male" if male.start() < female.start() else "female"
        elif male or female:
            out["sex"] = "male" if male else "female"
        else:
            he = re.search(r"\b(he|his|him)\b", low)
            she = re.search(r"\b(she|her|hers)\b", low)
            if bool(he) != bool(she):
                out["sex"] = "male" if he else "female"

    # performance status
    m = re.search(r"\b(?:karnofsky|kps|ki(?!\s*-?\s*67))\b(?:\s*\([^)]{0,20}\))?"
                  r"(?:\s*(?:performance)?\s*(?:status|score|index|scale|ps))?\s*(?:of|=|:|is|was|at)?\s*"
                  r"(\d{1,3})\s*%?", low)
    if m:
        out["karnofsky"] = _num(m.group(1))
    m = re.search(r"\b(?:ecog|who|zubrod)\b(?:\s*(?:performance)?\s*(?:status|score|grade|ps))?"
                  r"\s*(?:of|=|:|is|was)?\s*(\d)\b", low)
    if m:
        out["ecog"] = _num(m.group(1))
    elif not re.search(r"\b(?:karnofsky|kps)\b", low):
        m = re.search(r"\b(?:ps|performance status)\s*(?:of|=|:|is|was)?\s*(\d{1,3})\b", low)
        if m:
            v = int(m.group(1))
            if v <= 5:
                out["ecog"] = v
            elif v >= 10:
                out["karnofsky"] = v

    # lung histology ("non-small cell" is not "small cell")
    hist_text = re.sub(r"non[\s-]*small[\s-]*cell|nsclc", " ", low)
    for pat, val in ((r"\bsquamous\b|\bscc\b|\bepidermoid\b", "squamous"),
                     (r"\badeno(?:carcinoma)?s?\b", "adeno"),
                     (r"\bsmall[\s-]*cell\b|\bsclc\b|\boat[\s-]cell\b", "smallcell"),
                     (r"\blarge[\s-]*cell\b", "large")):
        if re.search(pat, hist_text):
            out["histology"] = val
            break

    # brain diagnosis
    m = re.search(r"(?:who\s*)?grade\s*(iv|iii|ii|i|[1-4])\b[^.,;]{0,20}?(?:glioma|astrocytoma|oligodendroglioma)"
                  r"|(?:glioma|astrocytoma|oligodendroglioma)[^.,;]{0,20}?(?:who\s*)?grade\s*(iv|iii|ii|i|[1-4])\b",
                  low)
    if "mening" in low:
        out["diagnosis"] = "meningioma"
    elif re.search(r"glioblastoma|\bgbm\b|high[\s-]*grade\s+glioma|\bhgg\b|anaplastic\s+(?:astrocytoma|oligo)", low):
        out["diagnosis"] = "high-grade glioma"
    elif re.search(r"low[\s-]*grade\s+glioma|\blgg\b|pilocytic|diffuse\s+astrocytoma", low):
        out["diagnosis"] = "low-grade glioma"
    elif m:
        g = _ROMAN[m.group(1) or m.group(2)]
        out["diagnosis"] = "high-grade glioma" if g >= 3 else "low-grade glioma"
    elif re.search(r"glioma|astrocytoma|oligodendroglioma|ependymoma", low):
        out["diagnosis"] = "glioma"

    # weight loss (kg)
    if re.search(r"\bno\s+(?:significant\s+)?weight\s+loss\b", low):
        out["weight_loss_kg"] = 0
    else:
        m = (re.search(r"(?:lost|weight\s+loss(?:\s+of)?|wt\.?\s+loss(?:\s+of)?)\s*" + _NUM +
                       r"\s*(kg|kilos?|kilograms?|lbs?|pounds?)\b", low)
             or re.search(_NUM + r"\s*(kg|kilos?|kilograms?|lbs?|pounds?)\s+(?:of\s+)?weight\s+loss", low))
        if m:
            v = float(m.group(1))
            out["weight_loss_kg"] = _num(round(v / 2.20462, 1) if m.group(2).startswith(("lb", "pound")) else v)

    # prior therapy
    if re.search(r"\b(?:no|without)\s+(?:prior|previous)\b|treatment[\s-]*na[iï]ve|chemo[\s-]*na[iï]ve|"
                 r"\buntreated\b|\bnot\s+previously\s+treated\b", low):
        out["prior_therapy"] = "no"
    elif re.search(r"\b(?:prior|previous|previously)\s+(?:\w+\s+)?(?:therapy|treatment|chemo\w*|radiotherapy|"
                   r"radiation|surgery|treated|resection|lines?)\b|\bpre-?treated\b|\bpost[\s-]*chemo", low):
        out["prior_therapy"] = "yes"

    # months since diagnosis
    m = (re.search(r"diagnosed\s+(?:about\s+|some\s+)?" + _NUM
                   + r"\s*(months?|mo|years?|yrs?|weeks?|wks?)\s+ago", low)
         or re.search(_NUM + r"\s*(months?|mo|years?|yrs?|weeks?|wks?)\s+(?:since|from|after)\s+(?:the\s+|initial\s+)?"
                      r"diagnosis", low))
    if m:
        v, unit = float(m.group(1)), m.group(2)
        months = v * 12 if unit.startswith(("y",)) else v / (52.18 / 12) if unit.startswith("w") else v
        out["months_since_diagnosis"] = _num(round(months, 1))

    # brain-specific descriptors
    if "infratentorial" in low:
        out["location"] = "infratentorial"
    elif "supratentorial" in low:
        out["location"] = "supratentorial"
    if re.search(r"\bsrs\b|radiosurgery|gamma\s*knife", low):
        out["stereo"] = "SRS"
    elif re.search(r"\bsrt\b|stereotactic\s+radiotherapy|fractionated\s+stereotactic", low):
        out["stereo"] = "SRT"
    m = re.search(r"(?:\bgtv\b|gross\s+tumou?r\s+volume|tumou?r\s+volume|\bvolume)\s*(?:of|=|:|is|was)?\s*"
                  r"(\d+(?:\.\d+)?)\s*(cm3|cm³|cc|ml|mm3|mm³)", low)
    if m:
        v = float(m.group(1))
        out["gtv_cm3"] = _num(round(v / 1000.0, 3) if m.group(2).startswith("mm") else v)

    # cancer type, when named
    if re.search(r"\blung\b|\bnsclc\b|\bsclc\b|\bbronch\w*|\bpulmonary\s+(?:carcinoma|cancer|malignancy)", low):
        out["cancer"] = "lung"
    elif re.search(r"\bbrain\b|glioma|glioblastoma|\bgbm\b|meningioma|astrocytoma|intracranial|\bcns\b", low):
        out["cancer"] = "brain"
    return out


# --------------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureSpec:
    key: str
    kind: str  # "numeric" | "categorical"
    label: str
    unit: str = ""
    levels: tuple[str, ...] = ()  # categorical; the first is the reference
    scale: float = 1.0  # hazard ratios are reported per `scale` units

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "kind": self.kind, "label": self.label}
        if self.kind == "numeric":
            d.update(unit=self.unit, hr_per=self.scale)
        else:
            d.update(levels=list(self.levels), reference=self.levels[0] if self.levels else None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(key=d["key"], kind=d["kind"], label=d.get("label", d["key"]), unit=d.get("unit", ""),
                   levels=tuple(d.get("levels") or ()), scale=float(d.get("hr_per", 1.0)))


@dataclass
class Cohort:
    name: str
    title: str
    cancer: str | None
    endpoint: str
    source: str
    citation: str
    era: str
    population: str
    features: dict[str, FeatureSpec]
    variants: list[tuple[str, ...]]  # alternative feature sets, richest first
    loader: Callable[[], pd.DataFrame]  # canonical columns + time (days) + event (0/1)
    intended_use: str
    not_for: list[str]
    limitations: list[str]
    image_features: dict[str, str] = field(default_factory=dict)  # cohort feature -> how it maps
    builtin: bool = True
    available: Callable[[], str | None] = lambda: None  # reason when unavailable


def _home() -> Path:
    return Path(os.environ.get("RADASSIST_HOME") or Path.home() / ".radassist").expanduser()


def _site_dir() -> Path:
    return _home() / "prognosis"


def _has_sksurv() -> bool:
    try:
        import sksurv  # noqa: F401
    except ImportError:
        return False
    return True


def _load_ncctg() -> pd.DataFrame:
    from lifelines.datasets import load_lung

    d = load_lung()
    return pd.DataFrame({
        "time": d["time"].astype(float), "event": d["status"].astype(int),
        "age": d["age"].astype(float), "sex": d["sex"].map({1: "male", 2: "female"}),
        "ecog": d["ph.ecog"].astype(float), "karnofsky": d["ph.karno"].astype(float),
    })


def _load_va() -> pd.DataFrame:
    from sksurv.datasets import load_veterans_lung_cancer

    x, y = load_veterans_lung_cancer()
    return pd.DataFrame({
        "time": y["Survival_in_days"].astype(float), "event": y["Status"].astype(int),
        "age": x["Age_in_years"].astype(float).values, "karnofsky": x["Karnofsky_score"].astype(float).values,
        "histology": x["Celltype"].astype(str).values,
        "months_since_diagnosis": x["Months_from_Diagnosis"].astype(float).values,
        "prior_therapy": x["Prior_therapy"].astype(str).values,
    })


def _brain_csv() -> Path | None:
    env = os.environ.get("RADASSIST_BRAIN_CSV")
    if env:
        p = Path(env).expanduser()
        return p if p.is_file() else None
    for dist in ("islp", "ISLP"):
        try:
            p = Path(str(importlib.metadata.distribution(dist).locate_file("ISLP/data/BrainCancer.csv")))
        except importlib.metadata.PackageNotFoundError:
            continue
        if p.is_file():
            return p
    return None


def _brain_unavailable() -> str | None:
    if _brain_csv() is not None:
        return None
    return ("The brain tumour cohort (BrainCancer, 88 patients) ships inside the 'islp' package, which is not "
            "installed here (radassist does not depend on it: it pulls PyTorch Lightning and an older SciPy). "
            "Install its data with `pip install --no-deps islp`, or set RADASSIST_BRAIN_CSV to BrainCancer.csv.")


def _load_brain() -> pd.DataFrame:
    p = _brain_csv()
    if p is None:
        raise UnsupportedError(_brain_unavailable() or "BrainCancer.csv not found.")
    d = pd.read_csv(p)
    dx = {"meningioma": "meningioma", "lg glioma": "low-grade glioma", "hg glioma": "high-grade glioma",
          "other": "other"}
    return pd.DataFrame({
        "time": d["time"].astype(float) * DAYS_PER_MONTH, "event": d["status"].astype(int),
        "diagnosis": d["diagnosis"].str.strip().str.lower().map(dx),
        "karnofsky": d["ki"].astype(float), "gtv_cm3": d["gtv"].astype(float),
        "sex": d["sex"].str.strip().str.lower(), "location": d["loc"].str.strip().str.lower(),
        "stereo": d["stereo"].str.strip().str.upper(),
    })


_COMMON_NOT_FOR = [
    "individual treatment decisions (start, stop or withhold therapy; eligibility for trials or surgery)",
    "telling a patient how long they will live",
    "populations unlike the cohort (other cancers, children, modern targeted or immunotherapy-era care)",
    "recurrence or progression: the cohort records death only",
]

BUILTIN: dict[str, Cohort] = {
    "ncctg_lung": Cohort(
        name="ncctg_lung", title="NCCTG advanced lung cancer", cancer="lung", endpoint="overall survival",
        source="lifelines.datasets.load_lung (R survival::lung)",
        citation="Loprinzi CL et al. Prospective evaluation of prognostic variables from patient-completed "
                 "questionnaires. J Clin Oncol 1994;12:601-607.",
        era="1980s, North Central Cancer Treatment Group, USA",
        population="Patients with advanced lung cancer treated at NCCTG institutions; histology not recorded.",
        features={
            "age": FeatureSpec("age", "numeric", "age", "years", scale=10.0),
            "sex": FeatureSpec("sex", "categorical", "sex", levels=("male", "female")),
            "ecog": FeatureSpec("ecog", "numeric", "ECOG performance status (physician)", "grade", scale=1.0),
            "karnofsky": FeatureSpec("karnofsky", "numeric", "Karnofsky (physician)", "points", scale=10.0),
        },
        variants=[("age", "sex", "ecog", "karnofsky"), ("age", "sex", "ecog"), ("age", "sex", "karnofsky")],
        loader=_load_ncctg,
        intended_use="Context for a multidisciplinary discussion: how patients with advanced lung cancer "
                     "and a similar age, sex and performance status fared in a 1980s cohort.",
        not_for=_COMMON_NOT_FOR,
        limitations=["Pre-targeted-therapy, pre-immunotherapy era: absolute survival is likely pessimistic today.",
                     "No stage, histology or imaging variables in the cohort.",
                     "Model chosen by the same cross-validation that is reported (slightly optimistic)."],
        image_features={},
    ),
    "va_lung": Cohort(
        name="va_lung", title="Veterans Administration lung cancer trial", cancer="lung",
        endpoint="overall survival", source="sksurv.datasets.load_veterans_lung_cancer",
        citation="Kalbfleisch JD, Prentice RL. The Statistical Analysis of Failure Time Data. Wiley, 1980 "
                 "(Veterans Administration Lung Cancer Study Group trial).",
        era="1960s-1970s, US Veterans Administration randomised chemotherapy trial",
        population="Patients with inoperable lung cancer randomised to standard or test chemotherapy; "
                   "treatment arm is not used as a feature.",
        features={
            "age": FeatureSpec("age", "numeric", "age", "years", scale=10.0),
            "karnofsky": FeatureSpec("karnofsky", "numeric", "Karnofsky", "points", scale=10.0),
            "histology": FeatureSpec("histology", "categorical", "histology",
                                     levels=("squamous", "smallcell", "adeno", "large")),
            "months_since_diagnosis": FeatureSpec("months_since_diagnosis", "numeric", "months since diagnosis",
                                                  "months", scale=6.0),
            "prior_therapy": FeatureSpec("prior_therapy", "categorical", "prior therapy", levels=("no", "yes")),
        },
        variants=[("age", "karnofsky", "histology", "months_since_diagnosis", "prior_therapy"),
                  ("age", "karnofsky", "histology")],
        loader=_load_va,
        intended_use="Context: how patients with inoperable lung cancer of a given histology and performance "
                     "status fared in a 1960s-70s chemotherapy trial.",
        not_for=_COMMON_NOT_FOR,
        limitations=["Chemotherapy of the 1960s-70s: absolute survival is not representative of current care.",
                     "Small cohort (137 patients, 128 deaths); no stage or imaging variables.",
                     "Model chosen by the same cross-validation that is reported (slightly optimistic)."],
        image_features={},
        available=lambda: None if _has_sksurv() else "scikit-survival is not installed (pip install scikit-survival).",
    ),
    "brain_cancer": Cohort(
        name="brain_cancer", title="Primary brain tumours treated with stereotactic radiation (BrainCancer)",
        cancer="brain", endpoint="overall survival", source="ISLP/data/BrainCancer.csv (islp package)",
        citation="Selingerova I et al. Survival of patients with primary brain tumors: comparison of two "
                 "statistical approaches. PLoS One 2016;11:e0148733.",
        era="2000s-2010s, Masaryk Memorial Cancer Institute, Brno (published 2016; accrual years in the paper)",
        population="88 patients with primary brain tumours (meningioma, low- and high-grade glioma, other) "
                   "treated with stereotactic radiosurgery or radiotherapy (SRS/SRT).",
        features={
            "diagnosis": FeatureSpec("diagnosis", "categorical", "diagnosis",
                                     levels=("meningioma", "low-grade glioma", "high-grade glioma", "other")),
            "karnofsky": FeatureSpec("karnofsky", "numeric", "Karnofsky index", "points", scale=10.0),
            "gtv_cm3": FeatureSpec("gtv_cm3", "numeric", "gross tumour volume", "cm3", scale=10.0),
        },
        variants=[("diagnosis", "karnofsky", "gtv_cm3")],
        loader=_load_brain,
        intended_use="Context for patients with a primary brain tumour considered for stereotactic radiation: "
                     "how a similar diagnosis, Karnofsky index and tumour volume fared in this cohort.",
        not_for=_COMMON_NOT_FOR + ["brain metastases (the cohort holds primary tumours only)"],
        limitations=["Very small cohort (87 usable patients, 35 deaths): wide uncertainty.",
                     "Gross tumour volume was a radiotherapy planning volume; the detector's lesion volume is "
                     "only a surrogate for it.",
                     "No age, molecular markers (IDH, MGMT, 1p/19q) or WHO 2021 grading.",
                     "Model chosen by the same cross-validation that is reported (slightly optimistic)."],
        image_features={"gtv_cm3": "detector total_volume_mm3 / 1000 (surrogate for the planning GTV)"},
        available=_brain_unavailable,
    ),
}


def _site_cohorts() -> dict[str, Cohort]:
    out: dict[str, Cohort] = {}
    root = _site_dir()
    if not root.is_dir():
        return out
    for card_path in sorted(root.glob("*/card.json")):
        try:
            card = json.loads(card_path.read_text())
            out[card["name"]] = _cohort_from_card(card, card_path.parent / "data.csv")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Skipping unreadable site cohort %s: %s", card_path, exc)
    return out


def _cohort_from_card(card: dict[str, Any], data_path: Path) -> Cohort:
    feats = {f["key"]: FeatureSpec.from_dict(f) for f in card["features"]}
    cats = {k: str for k, f in feats.items() if f.kind == "categorical"}
    return Cohort(
        name=card["name"], title=card.get("title", card["name"]), cancer=card.get("cancer"),
        endpoint=card.get("endpoint", "overall survival"), source=card.get("source", str(data_path)),
        citation=card.get("citation", "site cohort"), era=card.get("era", "site data"),
        population=card.get("population", "site cohort"), features=feats,
        variants=[tuple(v["features"]) for v in card["variants"]],
        loader=lambda: pd.read_csv(data_path, dtype=cats), intended_use=card.get("intended_use", ""),
        not_for=list(card.get("not_for", [])), limitations=list(card.get("limitations", [])),
        image_features=dict(card.get("image_features", {})), builtin=False,
    )


def _all_cohorts() -> dict[str, Cohort]:
    out = dict(BUILTIN)
    out.update(_site_cohorts())
    return out


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def _encode(df: pd.DataFrame, specs: list[FeatureSpec]) -> pd.DataFrame:
    cols: dict[str, np.ndarray] = {}
    for s in specs:
        if s.kind == "numeric":
            cols[s.key] = pd.to_numeric(df[s.key], errors="coerce").astype(float).values
        else:
            vals = df[s.key].astype(str).values
            for lev in s.levels[1:]:
                cols[f"{s.key}={lev}"] = (vals == lev).astype(float)
    return pd.DataFrame(cols, index=df.index)


def _surv_y(t: np.ndarray, e: np.ndarray) -> np.ndarray:
    """scikit-survival's structured outcome array."""
    y = np.empty(len(t), dtype=[("event", bool), ("time", float)])
    y["event"], y["time"] = np.asarray(e, dtype=bool), np.asarray(t, dtype=float)
    return y


class _Cox:
    kind = "cox"

    def fit(self, x: pd.DataFrame, t: np.ndarray, e: np.ndarray) -> _Cox:
        from lifelines import CoxPHFitter

        self.cols = [c for c in x.columns if float(np.nanstd(x[c].values)) > 1e-9]
        d = x[self.cols].copy()
        d["_t"], d["_e"] = t, e
        self.cph = CoxPHFitter(penalizer=COX_PENALIZER)
        self.cph.fit(d, "_t", "_e")
        return self

    def risk(self, x: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.cph.predict_log_partial_hazard(x[self.cols]), dtype=float).ravel()

    def survival(self, x: pd.DataFrame, times: np.ndarray) -> np.ndarray:
        sf = self.cph.predict_survival_function(x[self.cols], times=np.asarray(times, dtype=float))
        return np.asarray(sf.values, dtype=float).T


class _RSF:
    kind = "rsf"

    def fit(self, x: pd.DataFrame, t: np.ndarray, e: np.ndarray) -> _RSF:
        from sksurv.ensemble import RandomSurvivalForest

        y = _surv_y(t, e)
        self.cols = list(x.columns)
        self.rsf = RandomSurvivalForest(**RSF_PARAMS).fit(x[self.cols].values, y)
        times = getattr(self.rsf, "unique_times_", None)
        self.times = np.asarray(times if times is not None else self.rsf.event_times_, dtype=float)
        return self

    def risk(self, x: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.rsf.predict(x[self.cols].values), dtype=float)

    def survival(self, x: pd.DataFrame, times: np.ndarray) -> np.ndarray:
        arr = np.asarray(self.rsf.predict_survival_function(x[self.cols].values, return_array=True), dtype=float)
        idx = np.searchsorted(self.times, np.asarray(times, dtype=float), side="right") - 1
        out = np.ones((arr.shape[0], len(idx)))
        ok = idx >= 0
        out[:, ok] = arr[:, idx[ok]]
        return out


def _model_kinds() -> list[str]:
    return ["cox", "rsf"] if _has_sksurv() else ["cox"]


def _make(kind: str) -> _Cox | _RSF:
    return _Cox() if kind == "cox" else _RSF()


def _cindex(t: np.ndarray, risk: np.ndarray, e: np.ndarray) -> float:
    from lifelines.utils import concordance_index

    return float(concordance_index(t, -risk, e))


def _folds(e: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    assign = np.empty(len(e), dtype=int)
    for val in (0, 1):
        idx = np.flatnonzero(e == val)
        idx = idx[rng.permutation(len(idx))]
        assign[idx] = np.arange(len(idx)) % k
    return [np.flatnonzero(assign == i) for i in range(k)]


def _km_at(t: np.ndarray, e: np.ndarray, h: float) -> tuple[float | None, list[float] | None]:
    from lifelines import KaplanMeierFitter

    if len(t) == 0 or h > float(np.max(t)):
        return None, None
    kmf = KaplanMeierFitter().fit(t, e)
    s = float(kmf.predict(h))
    ci = kmf.confidence_interval_survival_function_
    row = ci[ci.index <= h].iloc[-1] if (ci.index <= h).any() else ci.iloc[0]
    return round(s, 3), [round(float(row.iloc[0]), 3), round(float(row.iloc[1]), 3)]


def _ibs(train_t: np.ndarray, train_e: np.ndarray, test_t: np.ndarray, test_e: np.ndarray,
         model: _Cox | _RSF, x_test: pd.DataFrame, grid: np.ndarray) -> float | None:
    if not _has_sksurv():
        return None
    from sksurv.metrics import integrated_brier_score

    g = grid[(grid >= test_t.min()) & (grid < test_t.max()) & (grid < train_t.max())]
    if len(g) < 2:
        return None
    try:
        return float(integrated_brier_score(_surv_y(train_t, train_e), _surv_y(test_t, test_e),
                                            model.survival(x_test, g), g))
    except ValueError as exc:
        log.debug("IBS skipped: %s", exc)
        return None


def _ci_t(vals: list[float]) -> list[float]:
    from scipy import stats

    a = np.asarray(vals, dtype=float)
    if len(a) < 2:
        return [float(a.mean()), float(a.mean())]
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return [round(float(a.mean()) - half, 3), round(float(a.mean()) + half, 3)]


def _cv_variant(df: pd.DataFrame, specs: list[FeatureSpec], folds: int, seed: int) -> dict[str, Any]:
    """Cross-validated C-index (mean, 95% t-interval over folds), integrated Brier score and 12-month
    calibration (out-of-fold predicted vs Kaplan-Meier observed, by tertile of predicted survival)."""
    x = _encode(df, specs)
    t, e = df["time"].to_numpy(float), df["event"].to_numpy(int)
    grid = np.percentile(t[e == 1], np.linspace(10, 80, 15)) if e.sum() >= 5 else np.array([])
    parts = _folds(e, folds, seed)
    res: dict[str, Any] = {}
    for kind in _model_kinds():
        cs, ibs = [], []
        oof = np.full(len(t), np.nan)
        for test_idx in parts:
            train_idx = np.setdiff1d(np.arange(len(t)), test_idx)
            m = _make(kind).fit(x.iloc[train_idx], t[train_idx], e[train_idx])
            xt = x.iloc[test_idx]
            cs.append(_cindex(t[test_idx], m.risk(xt), e[test_idx]))
            if len(grid):
                b = _ibs(t[train_idx], e[train_idx], t[test_idx], e[test_idx], m, xt, grid)
                if b is not None:
                    ibs.append(b)
            if t.max() >= CAL_HORIZON_DAYS:
                oof[test_idx] = m.survival(xt, np.array([CAL_HORIZON_DAYS]))[:, 0]
        cal = []
        if np.isfinite(oof).all():
            cuts = np.quantile(oof, [1 / 3, 2 / 3])
            grp = np.where(oof <= cuts[0], "higher", np.where(oof <= cuts[1], "intermediate", "lower"))
            for g in ("lower", "intermediate", "higher"):
                sel = grp == g
                obs, obs_ci = _km_at(t[sel], e[sel], CAL_HORIZON_DAYS)
                cal.append({"risk_group": g, "n": int(sel.sum()), "predicted": round(float(oof[sel].mean()), 3),
                            "observed_km": obs, "observed_ci95": obs_ci})
        res[kind] = {
            "c_index": round(float(np.mean(cs)), 3), "c_index_ci95": _ci_t(cs),
            "c_index_folds": [round(c, 3) for c in cs],
            "integrated_brier_score": round(float(np.mean(ibs)), 3) if ibs else None,
            "calibration_12m": cal,
        }
    return res


def _select(models: dict[str, Any]) -> str:
    best = "cox"
    for kind, r in models.items():
        if r["c_index"] > models[best]["c_index"]:
            best = kind
    return best


def _fingerprint(df: pd.DataFrame) -> str:
    cols = sorted(df.columns)
    txt = df[cols].to_csv(index=False, float_format="%.6g")
    return hashlib.sha256(txt.encode()).hexdigest()[:16]


def _rows_for(df: pd.DataFrame, variant: tuple[str, ...]) -> pd.DataFrame:
    return df.dropna(subset=list(variant) + ["time", "event"]).reset_index(drop=True)


def _ranges(df: pd.DataFrame, cohort: Cohort) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, s in cohort.features.items():
        col = df[k].dropna()
        if s.kind == "numeric":
            out[k] = {"min": _num(col.min()), "max": _num(col.max())}
        else:
            out[k] = {"levels": [lev for lev in s.levels if (col.astype(str) == lev).any()]}
    return out


def _build_card(cohort: Cohort, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    df = cohort.loader()
    variants = []
    for v in cohort.variants:
        sub = _rows_for(df, v)
        specs = [cohort.features[k] for k in v]
        models = _cv_variant(sub, specs, folds, seed)
        sel = _select(models)
        variants.append({"features": list(v), "n": int(len(sub)), "events": int(sub["event"].sum()),
                         "models": models, "selected_model": sel,
                         "cv_c_index": models[sel]["c_index"], "cv_c_index_ci95": models[sel]["c_index_ci95"]})
    full = _rows_for(df, tuple(cohort.features))
    versions = {}
    for pkg in ("lifelines", "scikit-survival", "numpy", "pandas"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    primary = variants[0]
    return {
        "name": cohort.name, "title": cohort.title, "cancer": cohort.cancer, "endpoint": cohort.endpoint,
        "cohort": cohort.title, "source": cohort.source, "citation": cohort.citation, "era": cohort.era,
        "population": cohort.population,
        "n": int(len(df)), "events": int(df["event"].sum()),
        "n_complete": int(len(full)), "follow_up_max_days": round(float(df["time"].max()), 1),
        "time_unit": "days",
        "features": [cohort.features[k].to_dict() for k in cohort.features],
        "ranges": _ranges(df, cohort),
        "variants": variants,
        "selected_model": primary["selected_model"], "cv_c_index": primary["cv_c_index"],
        "cv_c_index_ci95": primary["cv_c_index_ci95"],
        "calibration_12m": primary["models"][primary["selected_model"]]["calibration_12m"],
        "models_compared": {
            "cox": f"Cox proportional hazards (lifelines CoxPHFitter, penalizer={COX_PENALIZER})",
            "rsf": "Random survival forest (scikit-survival; 200 trees, min_samples_leaf=15, max_features=sqrt)",
        },
        "selection": "per feature set, the model with the higher mean 5-fold cross-validated C-index (Cox on ties)",
        "validation": {"method": "stratified 5-fold cross-validation", "folds": folds, "seed": seed,
                       "c_index_ci": "95% t-interval over folds",
                       "integrated_brier_score": "IPCW, 10th-80th percentile of event times (scikit-survival)",
                       "calibration": "12 months: out-of-fold predicted vs Kaplan-Meier observed by tertile"},
        "interval_definition": "interquartile range of the predicted survival time (25th-75th percentile)",
        "image_features": dict(cohort.image_features),
        "image_features_note": ("; ".join(f"{k} <- {v}" for k, v in cohort.image_features.items())
                                or "none: the cohort has no imaging variables; detector measurements are "
                                   "reported but not used"),
        "intended_use": cohort.intended_use, "not_for": cohort.not_for, "limitations": cohort.limitations,
        "data_fingerprint": _fingerprint(df),
        "built": {"date": dt.date.today().isoformat(), "versions": versions},
    }


def rebuild_cards(names: list[str] | None = None, out_dir: Path | None = None) -> list[Path]:
    """Recompute the built-in cohorts' cards (cross-validation) and write them as JSON (maintainers)."""
    out_dir = Path(out_dir or CARD_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or list(BUILTIN):
        c = BUILTIN[name]
        reason = c.available()
        if reason:
            log.warning("Cohort %s unavailable, card not rebuilt: %s", name, reason)
            continue
        p = out_dir / f"{name}.json"
        p.write_text(json.dumps(_build_card(c), indent=1) + "\n")
        written.append(p)
        log.info("Wrote %s", p)
    return written


_LOCK = threading.RLock()
_CARDS: dict[str, dict[str, Any]] = {}
_FITTED: dict[tuple[str, int, str], dict[str, Any]] = {}


def _card(cohort: Cohort) -> dict[str, Any]:
    """The cohort's card: the packaged one if it matches the data, else a cached or freshly built one."""
    with _LOCK:
        if cohort.name in _CARDS:
            return _CARDS[cohort.name]
        if not cohort.builtin:
            card = json.loads((_site_dir() / cohort.name / "card.json").read_text())
            _CARDS[cohort.name] = card
            return card
        fp = _fingerprint(cohort.loader())
        for p in (CARD_DIR / f"{cohort.name}.json", _site_dir() / "cards" / f"{cohort.name}.json"):
            if p.is_file():
                try:
                    card = json.loads(p.read_text())
                except ValueError:
                    continue
                if card.get("data_fingerprint") == fp:
                    _CARDS[cohort.name] = card
                    return card
        log.warning("No card matches the %s data; cross-validating now (one-off, cached).", cohort.name)
        card = _build_card(cohort)
        cache = _site_dir() / "cards" / f"{cohort.name}.json"
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(card, indent=1) + "\n")
        except OSError as exc:
            log.warning("Could not cache card %s: %s", cache, exc)
        _CARDS[cohort.name] = card
        return card


def _fitted(cohort: Cohort, vi: int, kind: str) -> dict[str, Any]:
    key = (cohort.name, vi, kind)
    with _LOCK:
        if key in _FITTED:
            return _FITTED[key]
        df = _rows_for(cohort.loader(), cohort.variants[vi])
        specs = [cohort.features[k] for k in cohort.variants[vi]]
        x = _encode(df, specs)
        t, e = df["time"].to_numpy(float), df["event"].to_numpy(int)
        model = _make(kind).fit(x, t, e)
        cox = model if kind == "cox" else _Cox().fit(x, t, e)
        risk = model.risk(x)
        cuts = np.quantile(risk, [1 / 3, 2 / 3])
        grp = np.where(risk <= cuts[0], "lower", np.where(risk <= cuts[1], "intermediate", "higher"))
        bundle = {"model": model, "cox": cox, "specs": specs, "x": x, "t": t, "e": e, "cuts": cuts,
                  "groups": grp, "means": x.mean()}
        _FITTED[key] = bundle
        return bundle


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------

@dataclass
class PrognosisRequest:
    clinical: dict[str, Any]
    image_features: dict[str, float] = field(default_factory=dict)
    question: str = "survival"
    cancer: str | None = None
    plot_path: Path | None = None


@dataclass
class PrognosisResult:
    model: str
    model_card: dict
    median_survival_days: float | None
    interval: tuple[float, float] | None
    survival_at: dict[str, float]
    risk_group: str
    drivers: list[dict]
    evidence: list[Evidence]
    missing: list[str]
    refused: str | None
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "model_card": self.model_card,
            "median_survival_days": self.median_survival_days,
            "interval": list(self.interval) if self.interval else None, "survival_at": self.survival_at,
            "risk_group": self.risk_group, "drivers": self.drivers,
            "evidence": [ev.model_dump() for ev in self.evidence], "missing": self.missing,
            "refused": self.refused, "summary": self.summary,
        }


def _empty(summary: str, *, refused: str | None = None, missing: list[str] | None = None, model: str = "",
           card: dict | None = None) -> PrognosisResult:
    return PrognosisResult(model=model, model_card=card or {}, median_survival_days=None, interval=None,
                           survival_at={}, risk_group="unknown", drivers=[], evidence=[], missing=missing or [],
                           refused=refused, summary=summary)


def _infer_cancer(clin: dict[str, Any], image: dict[str, float]) -> str | None:
    if clin.get("cancer") in ("lung", "brain"):
        return str(clin["cancer"])
    if any(k in clin for k in ("histology", "ecog", "months_since_diagnosis", "prior_therapy")):
        return "lung"
    if any(k in clin for k in ("diagnosis", "gtv_cm3", "location", "stereo")):
        return "brain"
    return None


def _range_problems(cohort: Cohort, card: dict[str, Any], variant: tuple[str, ...],
                    clin: dict[str, Any]) -> list[str]:
    probs = []
    for k in variant:
        v, rng, spec = clin[k], card["ranges"].get(k, {}), cohort.features[k]
        if spec.kind == "numeric":
            lo, hi = rng.get("min"), rng.get("max")
            if lo is not None and hi is not None and not (float(lo) <= float(v) <= float(hi)):
                probs.append(f"{spec.label} {v} is outside the cohort's range {lo}-{hi} {spec.unit}".rstrip())
        elif str(v) not in rng.get("levels", spec.levels):
            probs.append(f"{spec.label} '{v}' is not represented in the cohort "
                         f"(levels: {', '.join(rng.get('levels', spec.levels))})")
    return probs


def _validity_problems(clin: dict[str, Any]) -> list[str]:
    probs = []
    if "age" in clin and clin["age"] < 18:
        probs.append(f"age {clin['age']}: every cohort is adult; no paediatric estimate is available")
    if "age" in clin and clin["age"] > 120:
        probs.append(f"age {clin['age']} is not plausible")
    if "karnofsky" in clin and not 0 <= clin["karnofsky"] <= 100:
        probs.append(f"Karnofsky {clin['karnofsky']} is not a valid score (0-100)")
    if "ecog" in clin and not 0 <= clin["ecog"] <= 5:
        probs.append(f"ECOG {clin['ecog']} is not a valid grade (0-5)")
    if clin.get("ecog") == 5 or clin.get("karnofsky") == 0:
        probs.append("the performance status given means death; no survival estimate applies")
    if "gtv_cm3" in clin and clin["gtv_cm3"] <= 0:
        probs.append(f"tumour volume {clin['gtv_cm3']} cm3 is not plausible")
    return probs


def _missing_label(keys: list[str]) -> str:
    return "; ".join(" or ".join(LABELS.get(p, p) for p in k.split(" or ")) for k in keys)


def _variant_missing(variant: tuple[str, ...], clin: dict[str, Any]) -> list[str]:
    return [k for k in variant if k not in clin]


def _cohort_missing(cohort: Cohort, clin: dict[str, Any]) -> list[str]:
    """The smallest set of features to ask for; alternatives across feature sets are joined with 'or'."""
    per = [_variant_missing(v, clin) for v in cohort.variants]
    best = min(per, key=len)
    alts = [m for m in per if len(m) == len(best)]
    if len(alts) > 1:
        common = [k for k in best if all(k in m for m in alts)]
        ors = sorted({k for m in alts for k in m if k not in common}, key=list(cohort.features).index)
        return common + ([" or ".join(ors)] if ors else [])
    return best


def _predict_curve(model: _Cox | _RSF, xrow: pd.DataFrame, t_max: float) -> tuple[np.ndarray, np.ndarray]:
    grid = np.unique(np.concatenate([np.linspace(0, t_max, 400),
                                     np.array([h * DAYS_PER_MONTH for h in HORIZONS_MONTHS])]))
    grid = grid[grid <= t_max]
    return grid, model.survival(xrow, grid)[0]


def _time_at(grid: np.ndarray, s: np.ndarray, level: float) -> float | None:
    below = np.flatnonzero(s <= level)
    return round(float(grid[below[0]]), 1) if len(below) else None


def _drivers(b: dict[str, Any], clin: dict[str, Any], xrow: pd.DataFrame, selected: str) -> list[dict]:
    cox: _Cox = b["cox"]
    summ = cox.cph.summary
    out = []
    for s in b["specs"]:
        cols = [c for c in cox.cols if c == s.key or c.startswith(s.key + "=")]
        contrib = float(sum(summ.loc[c, "coef"] * (xrow[c].iloc[0] - b["means"][c]) for c in cols))
        d: dict[str, Any] = {"feature": s.key, "label": s.label, "value": clin[s.key],
                             "log_hazard_vs_cohort_average": round(contrib, 3),
                             "direction": ("raises risk" if contrib > 0.02 else
                                           "lowers risk" if contrib < -0.02 else "neutral")
                             + " vs the cohort average"}
        if s.kind == "numeric" and s.key in cols:
            coef, se = float(summ.loc[s.key, "coef"]), float(summ.loc[s.key, "se(coef)"])
            d.update(hazard_ratio=round(math.exp(coef * s.scale), 3),
                     ci95=[round(math.exp((coef - 1.96 * se) * s.scale), 3),
                           round(math.exp((coef + 1.96 * se) * s.scale), 3)],
                     per=f"{s.scale:g} {s.unit}".strip())
        elif s.kind == "categorical":
            c = f"{s.key}={clin[s.key]}"
            if c in cols:
                coef, se = float(summ.loc[c, "coef"]), float(summ.loc[c, "se(coef)"])
                d.update(hazard_ratio=round(math.exp(coef), 3),
                         ci95=[round(math.exp(coef - 1.96 * se), 3), round(math.exp(coef + 1.96 * se), 3)],
                         per=f"vs {s.levels[0]}")
            else:
                d.update(hazard_ratio=1.0, per=f"reference level ({s.levels[0]})")
        d["source"] = "Cox model on the same features" + ("" if selected == "cox" else
                                                            " (the forest itself has no hazard ratios)")
        out.append(d)
    out.sort(key=lambda r: -abs(r["log_hazard_vs_cohort_average"]))
    return out


def _hr_text(d: dict[str, Any]) -> str:
    per = str(d.get("per", ""))
    if d.get("hazard_ratio") is None or per.startswith("reference"):
        return ""
    return f", HR {d['hazard_ratio']:.2f} " + (per if per.startswith("vs ") else f"per {per}")


def _pct(v: float) -> str:
    return "<1%" if v < 0.005 else ">99%" if v > 0.995 else f"{v:.0%}"


def _fmt_days(d: float | None) -> str:
    if d is None:
        return "not reached"
    return f"{d:.0f} days (~{d / DAYS_PER_MONTH:.1f} months)"


def _plot(path: Path, b: dict[str, Any], grid: np.ndarray, s: np.ndarray, title: str, median: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=100)
    colours = {"lower": "#2a9d8f", "intermediate": "#e9c46a", "higher": "#e76f51"}
    for g in ("lower", "intermediate", "higher"):
        sel = b["groups"] == g
        if not sel.any():
            continue
        kmf = KaplanMeierFitter().fit(b["t"][sel], b["e"][sel])
        sf = kmf.survival_function_
        ax.step(sf.index.values / DAYS_PER_MONTH, sf.values[:, 0], where="post", color=colours[g], lw=1.4,
                label=f"cohort, {g} risk (KM, n={int(sel.sum())})")
    ax.plot(grid / DAYS_PER_MONTH, s, color="black", lw=2.4, label="this patient (model)")
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    if median is not None:
        ax.axvline(median / DAYS_PER_MONTH, color="black", lw=0.6, ls="--")
    ax.set_xlabel("months")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, float(grid.max()) / DAYS_PER_MONTH)
    ax.set_title(textwrap.fill(title, 95), fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.text(0.01, 0.01, "Decision support only; historical cohort; not for individual treatment decisions.",
             fontsize=6.5, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def predict(req: PrognosisRequest) -> PrognosisResult:
    """Survival estimate for the request, or a refusal / a list of features to ask for."""
    clin = normalize_clinical(req.clinical)
    image = {k: float(v) for k, v in (req.image_features or {}).items() if v is not None}
    question = (req.question or "survival").strip().lower()
    cohorts = _all_cohorts()

    endpoint = "overall survival"
    if question in RECURRENCE_WORDS or "recur" in question or "relapse" in question or "progress" in question:
        endpoint = "recurrence"
    elif question not in SURVIVAL_WORDS and "surviv" not in question:
        return _empty(f"Question '{req.question}' is not supported: the prognosis tool estimates overall survival.",
                      refused=f"unsupported question '{req.question}'")
    if endpoint == "recurrence" and not any(c.endpoint.lower().startswith(("recur", "relapse", "progress"))
                                            for c in cohorts.values()):
        reason = ("Recurrence is not estimated: none of the available cohorts (NCCTG lung, VA lung, BrainCancer"
                  + (", site cohorts" if any(not c.builtin for c in cohorts.values()) else "")
                  + ") records recurrence or progression, only death. An overall-survival estimate can be given "
                    "instead if asked.")
        return _empty(reason + " " + DISCLAIMER, refused=reason)

    problems = _validity_problems(clin)
    if problems:
        reason = "; ".join(problems)
        return _empty(f"No estimate: {reason}. {DISCLAIMER}", refused=reason)

    # candidate cohorts
    wanted = (req.cancer or "").strip().lower() or None
    if wanted in cohorts:
        cands = [cohorts[wanted]]
    else:
        cancer = _cancer(wanted) if wanted else _infer_cancer(clin, image)
        if cancer is None:
            return _empty("Which cancer is this (lung or brain)? The survival models are cohort-specific. "
                          + DISCLAIMER, missing=["cancer"])
        cands = [c for c in cohorts.values() if (c.cancer or "") == cancer
                 and c.endpoint.lower().startswith("recur" if endpoint == "recurrence" else "overall")]
        if not cands:
            reason = f"No {endpoint} model is available for '{cancer}' (cohorts: lung, brain)."
            return _empty(reason + " " + DISCLAIMER, refused=reason)

    notes: list[str] = []
    # image-derived gross tumour volume
    if "gtv_cm3" not in clin and image.get("total_volume_mm3") and any("gtv_cm3" in c.features for c in cands):
        clin["gtv_cm3"] = round(image["total_volume_mm3"] / 1000.0, 3)
        notes.append(f"Tumour volume {clin['gtv_cm3']} cm3 was taken from the detector's total lesion volume "
                     "as a surrogate for the planning gross tumour volume.")
    if clin.get("diagnosis") == "glioma" and any("diagnosis" in c.features for c in cands):
        del clin["diagnosis"]
        notes.append("Glioma grade was not stated: low-grade (WHO 1-2) or high-grade (WHO 3-4)?")

    unavailable = [(c, c.available()) for c in cands]
    avail = [c for c, why in unavailable if not why]
    if not avail:
        reason = " ".join(why for _, why in unavailable if why)
        return _empty(reason + " " + DISCLAIMER, refused=reason)

    # values already given that a cohort does not cover exclude it; if none is left, refuse
    given = {c.name: _range_problems(c, _card(c), tuple(k for k in c.features if k in clin), clin) for c in avail}
    if all(given.values()):
        where = [f"{cohorts[n].title}: {'; '.join(p)}" for n, p in given.items()]
        reason = ("Inputs fall outside the training range of "
                  + ("every applicable cohort: " if len(where) > 1 else "") + " | ".join(where)
                  + ". Extrapolating would be a guess, so no estimate is given.")
        return _empty(reason + " " + DISCLAIMER, refused=reason, model=avail[0].name, card=_card(avail[0]))
    avail = [c for c in avail if not given[c.name]]

    options = []  # (score, cohort, variant index, card)
    for c in avail:
        card = _card(c)
        for vi, v in enumerate(c.variants):
            if not _variant_missing(v, clin):
                options.append(((sum(1 for k in v if k in clin), card["variants"][vi]["cv_c_index"]), c, vi, card))
                break
    if not options:
        best = min(avail, key=lambda c: len(_cohort_missing(c, clin)))
        miss = _cohort_missing(best, clin)
        ask = f"To estimate survival with the {best.title} model, please give: {_missing_label(miss)}."
        if len(avail) > 1:
            others = [f"{c.title}: {_missing_label(_cohort_missing(c, clin))}" for c in avail if c is not best]
            ask += " (Alternatively " + "; ".join(others) + ".)"
        return _empty(" ".join([ask, *notes, DISCLAIMER]), missing=miss, model=best.name, card=_card(best))
    _, cohort, vi, card = max(options, key=lambda o: o[0])
    vcard = card["variants"][vi]
    kind = vcard["selected_model"]
    if kind not in _model_kinds():
        notes.append(f"The cross-validated choice was '{kind}' but it is not installed here; Cox was used.")
        kind = "cox"
    b = _fitted(cohort, vi, kind)
    variant = cohort.variants[vi]
    row = pd.DataFrame([{k: clin[k] for k in variant}])
    xrow = _encode(row, b["specs"])
    t_max = float(b["t"].max())
    grid, s = _predict_curve(b["model"], xrow, t_max)
    median = _time_at(grid, s, 0.5)
    q1, q3 = _time_at(grid, s, 0.75), _time_at(grid, s, 0.25)
    interval = (q1, q3) if q1 is not None and q3 is not None else None
    surv_at = {}
    for h in HORIZONS_MONTHS:
        hd = h * DAYS_PER_MONTH
        if hd <= t_max:
            surv_at[f"{h} months"] = round(float(b["model"].survival(xrow, np.array([hd]))[0, 0]), 3)
    r = float(b["model"].risk(xrow)[0])
    group = "lower" if r <= b["cuts"][0] else "intermediate" if r <= b["cuts"][1] else "higher"
    drivers = _drivers(b, clin, xrow, kind)
    model_name = f"{cohort.name}/{kind}[{','.join(variant)}]"
    model_card = dict(card)
    model_card["variant"] = vcard
    model_card["model_used"] = kind

    evidence: list[Evidence] = []
    if req.plot_path is not None:
        path = Path(req.plot_path)
        _plot(path, b, grid, s, f"{cohort.title}, {cohort.era.split(',')[0].strip()}: "
              f"{'Cox PH' if kind == 'cox' else 'random survival forest'} on {', '.join(variant)}", median)
        evidence.append(Evidence(kind="plot", path=str(path), role="survival-curve",
                                 caption=f"Predicted survival for this patient ({kind}) over Kaplan-Meier curves "
                                         f"of the {cohort.title} cohort by model risk tertile."))

    # summary
    unused = [k for k in clin if k not in variant and k != "cancer"]
    m = vcard["models"][kind]
    parts = [
        f"Estimated overall survival, from the {cohort.title} cohort ({cohort.era}; N={vcard['n']}, "
        f"{vcard['events']} deaths), {'Cox proportional hazards' if kind == 'cox' else 'random survival forest'} "
        f"on {', '.join(LABELS.get(k, k) for k in variant)}:",
        (f"median {_fmt_days(median)}" if median is not None else
         f"median not reached within the cohort's follow-up ({t_max / DAYS_PER_MONTH:.0f} months)")
        + (f"; half of comparable cohort patients between {interval[0]:.0f} and {interval[1]:.0f} days"
           if interval else "") + ".",
    ]
    if surv_at:
        parts.append("Survival probability " + ", ".join(f"{k} {_pct(v)}" for k, v in surv_at.items()) + ".")
    parts.append(f"Risk group: {group} (tertiles of the cohort's predicted risk).")
    top = [d for d in drivers if d["direction"].split()[0] != "neutral"][:3]
    if top:
        parts.append("Main drivers: " + "; ".join(
            f"{d['label']} {d['value']} ({d['direction']}"
            + _hr_text(d) + ")" for d in top) + ".")
    parts.append(f"Validation: 5-fold cross-validated C-index {m['c_index']:.2f} "
                 f"(95% CI {m['c_index_ci95'][0]:.2f}-{m['c_index_ci95'][1]:.2f})"
                 + (f", integrated Brier score {m['integrated_brier_score']:.3f}"
                    if m.get("integrated_brier_score") is not None else "") + ".")
    img = {k: v for k, v in image.items() if v}
    if img and "gtv_cm3" not in variant:
        parts.append("Image-derived features (" + ", ".join(f"{k} {v:g}" for k, v in img.items())
                     + ") are reported but NOT used: this cohort has no imaging variables.")
    if unused:
        parts.append("Given but not used by this model: " + ", ".join(LABELS.get(k, k) for k in unused) + ".")
    if "gtv_cm3" in variant and img.get("n_lesions", 1) > 1:
        parts.append("Several lesions were detected; the cohort holds single primary tumours.")
    parts += notes
    parts.append(f"Limits: {' '.join(cohort.limitations[:2])}")
    parts.append(DISCLAIMER)
    summary = " ".join(parts)
    log.info("prognosis %s: median=%s group=%s", model_name, median, group)
    return PrognosisResult(model=model_name, model_card=model_card, median_survival_days=median,
                           interval=interval, survival_at=surv_at, risk_group=group, drivers=drivers,
                           evidence=evidence, missing=[], refused=None, summary=summary)


# --------------------------------------------------------------------------------------------------
# Cards, site cohorts, benchmark
# --------------------------------------------------------------------------------------------------

def list_models() -> list[dict]:
    """Model cards of every cohort (built-in and site), with availability."""
    out = []
    for c in _all_cohorts().values():
        why = c.available()
        if why:
            p = CARD_DIR / f"{c.name}.json"
            card = json.loads(p.read_text()) if p.is_file() else {"name": c.name, "title": c.title}
            card.update(available=False, unavailable_reason=why)
        else:
            card = dict(_card(c))
            card["available"] = True
        out.append(card)
    return out


_SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def train_cohort(csv_path: str | Path, time_col: str, event_col: str, name: str | None = None,
                 features: list[str] | None = None, *, time_unit: str = "days", cancer: str | None = None,
                 endpoint: str = "overall survival", era: str | None = None) -> dict:
    """Fit and validate (5-fold CV C-index with CI) a site cohort and register it under
    ``RADASSIST_HOME/prognosis/<name>/`` (card.json + the cleaned data.csv). Returns the card.

    Feature columns are matched to canonical names where they are known (``kps`` -> karnofsky, ...);
    numeric columns are numeric features, others categorical (most frequent level = reference).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise RadAssistError(f"Cohort file not found: {path}")
    try:
        raw = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise RadAssistError(f"Could not read the cohort CSV {path}: {exc}") from exc
    for col in (time_col, event_col):
        if col not in raw.columns:
            raise RadAssistError(f"Column '{col}' is not in {path.name} (columns: {', '.join(map(str, raw.columns))}).")
    name = (name or _key(path.stem)).lower()
    if not _SAFE_NAME.match(name):
        raise RadAssistError(f"Cohort name '{name}' should be lower-case letters, digits, '_' or '-'.")
    if name in BUILTIN:
        raise RadAssistError(f"'{name}' is a built-in cohort; choose another name.")
    factor = {"days": 1.0, "weeks": 7.0, "months": DAYS_PER_MONTH, "years": 365.25}.get(time_unit.lower())
    if factor is None:
        raise RadAssistError("time_unit must be days, weeks, months or years.")
    ev = raw[event_col]
    if ev.dtype == bool:
        ev = ev.astype(int)
    ev = pd.to_numeric(ev, errors="coerce")
    uniq = set(ev.dropna().unique().tolist())
    if uniq <= {1, 2} and 2 in uniq:
        log.info("Event column coded 1/2: reading 2 as the event (R survival convention).")
        ev = ev - 1
    elif not uniq <= {0, 1}:
        raise RadAssistError(f"Event column '{event_col}' must be 0/1 (1 = event); found {sorted(uniq)[:6]}.")
    cols = features or [c for c in raw.columns if c not in (time_col, event_col)]
    missing = [c for c in cols if c not in raw.columns]
    if missing:
        raise RadAssistError(f"Feature columns not in the file: {', '.join(missing)}.")
    data = pd.DataFrame({"time": pd.to_numeric(raw[time_col], errors="coerce") * factor, "event": ev})
    specs: dict[str, FeatureSpec] = {}
    for c in cols:
        k = _key(c)
        if k in specs or k in ("time", "event"):
            raise RadAssistError(f"Feature '{c}' clashes with another column after normalisation ('{k}').")
        col = raw[c]
        if k in NUMERIC_KEYS or (pd.api.types.is_numeric_dtype(col) and col.nunique() > 2):
            data[k] = pd.to_numeric(col, errors="coerce")
            scale = 10.0 if k in ("age", "karnofsky", "gtv_cm3") else 1.0
            unit = {"age": "years", "karnofsky": "points", "ecog": "grade", "gtv_cm3": "cm3",
                    "months_since_diagnosis": "months", "weight_loss_kg": "kg"}.get(k, "")
            specs[k] = FeatureSpec(k, "numeric", LABELS.get(k, c), unit=unit, scale=scale)
        else:
            vals = col.map(lambda v, k=k: None if pd.isna(v) else _safe_norm(k, v))
            data[k] = vals
            levels = [str(x) for x in vals.value_counts().index]
            if len(levels) < 2:
                log.warning("Feature %s has a single level; dropped.", c)
                data = data.drop(columns=[k])
                continue
            if len(levels) > 12:
                raise RadAssistError(f"Feature '{c}' has {len(levels)} categories; group them (12 at most).")
            specs[k] = FeatureSpec(k, "categorical", LABELS.get(k, c), levels=tuple(levels))
    data = data.dropna(subset=["time", "event"])
    data = data[data["time"] > 0]
    complete = data.dropna(subset=list(specs))
    if not specs:
        raise RadAssistError("No usable feature columns.")
    if len(complete) < 30 or complete["event"].sum() < 10:
        raise RadAssistError(f"Too few complete patients ({len(complete)}) or events "
                             f"({int(complete['event'].sum())}) to fit and validate a model (need 30 and 10).")
    cohort = Cohort(
        name=name, title=f"{name} (site)", cancer=_cancer(cancer) if cancer else None, endpoint=endpoint,
        source=str(path.resolve()), citation="site data", era=era or f"site data registered {dt.date.today()}",
        population=f"site cohort from {path.name}", features=specs, variants=[tuple(specs)],
        loader=lambda: data, intended_use="Site-specific context; validate locally before any clinical use.",
        not_for=_COMMON_NOT_FOR[:3], limitations=["Internal cross-validation only; no external validation.",
                                                  "Model chosen by the same cross-validation that is reported."],
        builtin=False,
    )
    card = _build_card(cohort)
    target = _site_dir() / name
    target.mkdir(parents=True, exist_ok=True)
    data.to_csv(target / "data.csv", index=False)
    (target / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    with _LOCK:
        _CARDS.pop(name, None)
        for key in [k for k in _FITTED if k[0] == name]:
            del _FITTED[key]
    log.info("Registered site cohort %s (N=%d, C-index %.3f)", name, card["n"], card["cv_c_index"])
    return card


def _safe_norm(key: str, v: Any) -> str:
    try:
        out = _normalize_value(key, v)
    except RadAssistError:
        out = None
    return str(out if out is not None else v).strip().lower()


def cross_validate(cohort: str, folds: int = 5, seed: int = 0) -> dict:
    """Fresh k-fold cross-validation of every model on every feature set of a cohort (benchmark):
    C-index (mean, 95% CI), integrated Brier score, 12-month calibration by risk tertile."""
    cohorts = _all_cohorts()
    if cohort not in cohorts:
        raise RadAssistError(f"Unknown cohort '{cohort}'. Known: {', '.join(cohorts)}.")
    c = cohorts[cohort]
    why = c.available()
    if why:
        raise UnsupportedError(why)
    if folds < 2:
        raise RadAssistError("folds must be at least 2.")
    df = c.loader()
    variants = []
    for v in c.variants:
        sub = _rows_for(df, v)
        models = _cv_variant(sub, [c.features[k] for k in v], folds, seed)
        variants.append({"features": list(v), "n": int(len(sub)), "events": int(sub["event"].sum()),
                         "models": models, "selected_model": _select(models)})
    return {"cohort": c.name, "title": c.title, "folds": folds, "seed": seed, "variants": variants,
            "models": variants[0]["models"], "selected_model": variants[0]["selected_model"]}


__all__ = [
    "PrognosisRequest", "PrognosisResult", "parse_clinical", "parse_clinical_pairs", "normalize_clinical",
    "predict", "list_models", "train_cohort", "cross_validate", "rebuild_cards",
]
