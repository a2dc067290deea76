"""The region vocabulary: the single source of truth for anatomical names.

Each :class:`Region` has a canonical name (used in answers and in findings' ``region``), its
synonyms and abbreviations (used by the router to read the clinician's words), laterality, zone and
parent. Lobe names are accepted and mapped to lung zones (craniocaudal thirds of that lung); the
mapping is an approximation until fissures are found, and :func:`resolve_regions` says so.

Importable without numpy or torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Region:
    name: str
    synonyms: tuple[str, ...] = ()
    side: str | None = None  # "right" | "left"
    zone: str | None = None  # "upper" | "middle" | "lower"
    parent: str | None = None
    kind: str = "organ"  # "body" | "organ" | "zone" | "airway" | "vessel" | "bone" | "space"
    modalities: tuple[str, ...] = ("CT",)
    approximate_of: str | None = None  # lobe name when this entry is an approximation
    lobes: tuple[str, ...] = field(default_factory=tuple)


def _zone_synonyms(side: str, zone: str) -> tuple[str, ...]:
    s, S = side[0], side
    z = zone
    out = [
        f"{S} {z} zone", f"{S} {z} lung", f"{S} {z} lung zone", f"{S} {z} field", f"{S} {z} lung field",
        f"{s} {z} zone", f"{S} lung {z} zone",
    ]
    if z == "upper":
        out += [f"{S} apex", f"{S} apical", f"{S} lung apex", f"apex of the {S} lung", f"{S} upper"]
    if z == "middle":
        out += [f"{S} mid lung", f"{S} mid zone", f"{S} midzone", f"{S} mid-lung", f"{S} mid", f"{S} middle"]
    if z == "lower":
        out += [f"{S} base", f"{S} lung base", f"{S} basal", f"base of the {S} lung", f"{S} lower",
                f"{S} basilar"]
    return tuple(out)


def _build() -> tuple[Region, ...]:
    regions: list[Region] = [
        Region("body", ("body", "whole body", "patient", "chest", "thorax", "whole chest", "scan"), kind="body",
               modalities=("CT", "CR", "DX")),
        Region("lungs", ("lungs", "both lungs", "lung", "lung fields", "pulmonary", "bilateral lungs",
                         "chest", "anywhere"), kind="organ", parent="body", modalities=("CT", "CR", "DX")),
        Region("trachea", ("trachea", "windpipe", "tracheal"), kind="airway", parent="body",
               modalities=("CT", "CR", "DX")),
        Region("right main bronchus", ("right main bronchus", "right mainstem bronchus", "rmb",
                                       "right main stem bronchus", "right bronchus"), side="right",
               kind="airway", parent="trachea"),
        Region("left main bronchus", ("left main bronchus", "left mainstem bronchus", "lmb",
                                      "left main stem bronchus", "left bronchus"), side="left",
               kind="airway", parent="trachea"),
        Region("heart", ("heart", "cardiac", "cardiac silhouette", "heart shadow", "pericardium"), kind="organ",
               parent="mediastinum", modalities=("CT", "CR", "DX")),
        Region("aorta", ("aorta", "aortic", "thoracic aorta", "descending aorta", "aortic arch", "ascending aorta"),
               kind="vessel", parent="mediastinum"),
        Region("mediastinum", ("mediastinum", "mediastinal", "hilum", "hila", "hilar", "mediastinal structures"),
               kind="space", parent="body", modalities=("CT", "CR", "DX")),
        Region("spine", ("spine", "vertebrae", "vertebra", "spinal column", "thoracic spine", "vertebral column",
                         "t-spine"), kind="bone", parent="body"),
        Region("ribs", ("ribs", "rib", "rib cage", "costal", "bony thorax"), kind="bone", parent="body"),
    ]
    lobe_map = {
        ("right", "upper"): ("right upper lobe", "rul"),
        ("right", "middle"): ("right middle lobe", "rml", "lingula"),
        ("right", "lower"): ("right lower lobe", "rll"),
        ("left", "upper"): ("left upper lobe", "lul"),
        ("left", "middle"): ("lingula", "lingular"),
        ("left", "lower"): ("left lower lobe", "lll"),
    }
    for side in ("right", "left"):
        regions.append(Region(f"{side} lung", (f"{side} lung", f"{side} hemithorax", f"{side} side",
                                               f"{side} lung field", f"{side} chest", f"{side[0]} lung"),
                              side=side, kind="organ", parent="lungs", modalities=("CT", "CR", "DX")))
        for zone in ("upper", "middle", "lower"):
            lobes = tuple(x for x in lobe_map[(side, zone)] if not (side == "right" and x == "lingula"))
            regions.append(Region(f"{side} {zone} zone", _zone_synonyms(side, zone), side=side, zone=zone,
                                  parent=f"{side} lung", kind="zone", modalities=("CT", "CR", "DX"),
                                  lobes=lobes))
    return tuple(regions)


REGIONS: tuple[Region, ...] = _build()
BY_NAME: dict[str, Region] = {r.name: r for r in REGIONS}

# Lobe words -> zone region (approximation until fissures are segmented).
LOBE_TO_ZONE: dict[str, str] = {}
for _r in REGIONS:
    for _lobe in _r.lobes:
        LOBE_TO_ZONE.setdefault(_lobe, _r.name)
# spelled-out lobes are more specific than the zone synonyms
LOBE_TO_ZONE.update({
    "right upper lobe": "right upper zone", "right middle lobe": "right middle zone",
    "right lower lobe": "right lower zone", "left upper lobe": "left upper zone",
    "left lower lobe": "left lower zone", "lingula": "left middle zone", "lingular": "left middle zone",
})

LESION_WORDS: dict[str, str] = {
    "nodule": "nodule", "nodules": "nodule", "nodular": "nodule", "lesion": "nodule", "lesions": "nodule",
    "mass": "mass", "masses": "mass", "tumour": "mass", "tumor": "mass", "tumours": "mass", "tumors": "mass",
    "opacity": "opacity", "opacities": "opacity", "spot": "nodule", "spots": "nodule", "growth": "nodule",
    "cancer": "mass", "metastasis": "nodule", "metastases": "nodule", "ggo": "nodule",
    "ground glass": "nodule", "ground-glass": "nodule", "density": "opacity", "densities": "opacity",
    "consolidation": "opacity", "shadow": "opacity",
}


@dataclass(frozen=True)
class RegionMention:
    region: str  # canonical name
    text: str  # the words that matched
    approximate: bool = False  # a lobe mapped to a zone
    lobe: str | None = None


def _norm(text: str) -> str:
    t = text.lower()
    t = re.sub(r"[^a-z0-9\- ]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def _phrase_table() -> list[tuple[str, str, str | None]]:
    """(phrase, region, lobe) sorted longest first so the most specific phrase wins."""
    rows: list[tuple[str, str, str | None]] = []
    for r in REGIONS:
        rows.append((r.name, r.name, None))
        for s in r.synonyms:
            rows.append((_norm(s), r.name, None))
    for lobe, zone in LOBE_TO_ZONE.items():
        rows.append((_norm(lobe), zone, lobe))
    # short forms like "rt upper", "lt base"
    extra: list[tuple[str, str, str | None]] = []
    for phrase, region, lobe in rows:
        for long, short in (("right ", "rt "), ("left ", "lt "), ("right ", "r "), ("left ", "l ")):
            if phrase.startswith(long):
                extra.append((short + phrase[len(long):], region, lobe))
    rows += extra
    rows.sort(key=lambda x: -len(x[0]))
    return rows


_PHRASES = _phrase_table()


def resolve_regions(text: str) -> list[RegionMention]:
    """All region mentions in ``text``, most specific first, without overlaps."""
    t = f" {_norm(text)} "
    taken = [False] * len(t)
    found: list[tuple[int, RegionMention]] = []
    for phrase, region, lobe in _PHRASES:
        if not phrase:
            continue
        start = 0
        needle = f" {phrase} "
        while True:
            idx = t.find(needle, start)
            if idx < 0:
                break
            span = range(idx + 1, idx + 1 + len(phrase))
            if not any(taken[i] for i in span):
                for i in span:
                    taken[i] = True
                found.append((idx, RegionMention(region, phrase, approximate=lobe is not None, lobe=lobe)))
            start = idx + 1
    found.sort(key=lambda x: x[0])
    out: list[RegionMention] = []
    for _, m in found:
        if m.region not in [o.region for o in out]:
            out.append(m)
    return out


def lesion_kind(text: str) -> str | None:
    t = f" {_norm(text)} "
    for w, k in sorted(LESION_WORDS.items(), key=lambda x: -len(x[0])):
        if f" {w} " in t:
            return k
    return None


def side_words(text: str) -> str | None:
    """A bare laterality in a follow-up ("and the left one?")."""
    t = f" {_norm(text)} "
    r = " right " in t or " rt " in t
    l_ = " left " in t or " lt " in t
    if r and not l_:
        return "right"
    if l_ and not r:
        return "left"
    return None


def zone_region(side: str | None, zone: str | None) -> str | None:
    if side and zone:
        return f"{side} {zone} zone"
    if side:
        return f"{side} lung"
    return None


def contains(parent: str, child: str) -> bool:
    """True when region ``child`` lies within region ``parent`` (or is it)."""
    name: str | None = child
    while name is not None:
        if name == parent:
            return True
        name = BY_NAME[name].parent if name in BY_NAME else None
    return parent in ("body", "chest")


def swap_side(region: str) -> str:
    if region.startswith("right "):
        cand = "left " + region[len("right "):]
    elif region.startswith("left "):
        cand = "right " + region[len("left "):]
    else:
        return region
    return cand if cand in BY_NAME else region
