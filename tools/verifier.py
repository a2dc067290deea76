"""Self-consistency verifier: re-ask and re-measure, and turn the agreement into a calibrated reliability.

Repetitions:

- **paraphrase consistency** — the question is re-asked in other words (:func:`paraphrases`) and routed
  again by the caller; agreement = share of paraphrases that choose the same tools and regions;
- **perturbation consistency** — each lesion is re-measured on its region of interest after a
  sub-voxel shift, a small in-plane rotation, added noise at the scanner's level, and resampling
  (:func:`perturb_remeasure`); agreement = share re-found, the re-measured lesion's plausibility,
  box overlap, spread of the diameter;
- (the served path adds sampling consistency: see ``agents/verify.py``).

**Answer units** (what gets a probability of being right, :func:`assess`):

- ``finding`` — "there is a nodule here, of this size": wrong when nothing is there (invented) or the
  mean diameter is off by more than 1.5 mm;
- ``region`` — "nothing (else) in this lung zone": one per lung zone the question covers; wrong when
  a nodule there was missed. Its evidence is the detector's best *sub-threshold* candidate in the zone,
  re-measured under perturbation (a near miss that keeps looking like a nodule is a warning), and the
  detector's measured sensitivity there (:func:`probe_zone`): 5 mm test nodules are injected where small
  nodules hide (on the zone's costal pleura, against its vessels), each on a small region of interest,
  and the detector is asked again whether it would report them — a zone where they go unseen is one
  where a real one can hide, whatever the scan's noise, slice thickness or anatomy made it so;
- ``change`` — "this finding grew / shrank / is stable / new / resolved": wrong when the status is;
  evidence: the margin of the diameter change to the 1.5 mm growth threshold against the combined
  re-measurement spread, and, for new or resolved, whether something is re-found at the registered
  position in the other study.

Each unit's features go through a logistic model fitted on phantom patients of a calibration seed set
(``tools/verifier_calibration.json``, written by ``radassist verifier calibrate``; see
:mod:`tools.verifier_calibrate`), giving P(correct). Without that file the verifier falls back to a
hand-set score (``method`` says "uncalibrated").

On a chest film (:func:`film_units`) each reported opacity is re-measured on perturbed copies of the whole
film (noise, shift, gamma, blur: :func:`tools.radiograph.perturb_film`) and its P(real) comes from a small
logistic model fitted on DRR films (``FILM_WEIGHTS``); zones and changes are not rated on films.
"""
from __future__ import annotations

import json
import logging
import math
import re
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from tools import vocab
from tools.errors import ConfigError
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


# ------------------------------------------------------------------------------------------ perturbation
@dataclass
class Remeasure:
    """Re-measurements of one point under perturbation; ``confidences`` are the re-found blobs' plausibility."""

    n: int
    found: int
    diameters: list[float]
    ious: list[float]
    confidences: list[float] = field(default_factory=list)

    @property
    def found_frac(self) -> float:
        return self.found / self.n if self.n else 0.0

    @property
    def spread_mm(self) -> float:
        return float(np.std(self.diameters)) if len(self.diameters) > 1 else 0.0

    @property
    def mean_mm(self) -> float:
        return float(np.mean(self.diameters)) if self.diameters else 0.0

    @property
    def conf_mean(self) -> float:
        """Mean plausibility over all n tries (a try that found nothing counts 0)."""
        return float(np.sum(self.confidences)) / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "found": self.found, "mean_mm": round(self.mean_mm, 2),
                "spread_mm": round(self.spread_mm, 2), "conf_mean": round(self.conf_mean, 3),
                "iou_mean": round(float(np.mean(self.ious)) if self.ious else 0.0, 3)}


def noise_level(series: Series) -> float:
    """Scanner noise estimate: robust SD of the air outside the patient in the middle slice, else 20 HU."""
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
        raise ValueError(f"unknown perturbation {kind!r}")
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
MIN_REFOUND_MM = 3.0  # a re-measurement smaller than this is residual density, not a lesion


def stable_seed(*parts: Any) -> int:
    """A per-process-stable seed (``hash()`` of a str changes between runs)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


def perturb_remeasure(series: Series, finding: dict[str, Any], n: int = 8, seed: int = 0) -> Remeasure:
    """Re-measure the lesion at ``finding["center_mm"]`` n times on perturbed copies of its region of interest.

    A try re-finds it when a blob of at least 3 mm is segmented within max(3 mm, radius) of the centre.
    """
    from tools.detector import measure_at

    center = finding["center_mm"]
    diam = float(finding.get("diameter_mm") or 6.0)
    half = max(20.0, 1.5 * diam)
    roi = _roi(series, center, half)
    rng = np.random.default_rng(seed)
    noise = noise_level(series)
    out = Remeasure(n=n, found=0, diameters=[], ious=[], confidences=[])
    for t in range(n):
        p = _perturb(roi, PERTURBATIONS[t % len(PERTURBATIONS)], rng, noise)
        try:
            m = measure_at(p, center, analysis=None, roi_mm=half)
        except Exception as exc:  # noqa: BLE001 - a failed re-measure counts as disagreement
            log.debug("re-measure failed: %s", exc)
            m = None
        if m is None or m.center_mm is None or (m.diameter_mm or 0.0) < MIN_REFOUND_MM:
            continue
        if np.linalg.norm(np.asarray(m.center_mm) - np.asarray(center)) > max(3.0, diam / 2):
            continue
        out.found += 1
        out.diameters.append(float(m.diameter_mm or 0.0))
        out.ious.append(_iou(m.bbox_mm, finding.get("bbox_mm")))
        out.confidences.append(float(m.confidence or 0.0))
    return out


# ------------------------------------------------------------------------------------------ answer units
N_FINDING = 8  # perturbed re-measurements per finding
N_SECOND = 4  # per near-miss candidate / other-study position
GROWTH_MM = 1.5
LUNG_ZONES = tuple(f"{s} {z} zone" for s in ("right", "left") for z in ("upper", "middle", "lower"))


@dataclass
class Unit:
    """One checkable part of an answer, with the features its reliability is computed from."""

    kind: str  # "finding" | "region" | "change"
    key: str  # finding id or zone name
    features: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)  # what a reader should look at (slice, position, spreads)
    p: float | None = None  # P(correct), set by :func:`score_units`


def finding_features(f: dict[str, Any], r: Remeasure, noise: float) -> dict[str, float]:
    """What a finding's reliability is computed from: its re-measurements under perturbation (found again,
    box overlap, diameter spread and bias), the detector's own plausibility, and what kind of finding it is.
    ``surface_large``: a large nodule on the pleura sized from its free surface (the wall+sphere model sizes
    caps seen up to 12 mm): a systematic error that re-measuring repeats, so agreement cannot reveal it."""
    from tools.detector import SIZED_BY_FREE_SURFACE

    d = float(f.get("diameter_mm") or 0.0)
    notes = " ".join(f.get("notes") or [])
    return {
        "refound": r.found_frac, "conf_mean": r.conf_mean,
        "iou": float(np.mean(r.ious)) if r.ious else 0.0,
        "spread": min(r.spread_mm, 5.0),
        "bias": min(abs(r.mean_mm - d), 5.0) if r.diameters else 5.0,
        "det_conf": float(f.get("confidence") if f.get("confidence") is not None else 0.5),
        "log_d": math.log(max(d, 1.0)), "small": float(d < 6.0),
        "pleural": float("juxtapleural" in notes), "vascular": float("juxtavascular" in notes),
        "ggo": float(f.get("attenuation") == "ground-glass"), "noise": noise / 30.0,
        "surface_large": float(SIZED_BY_FREE_SURFACE in notes) * float(np.clip((d - 10.0) / 4.0, 0.0, 1.0)),
    }


def _zone_of_candidate(anat: Any, seg: dict[str, Any], series: Series) -> str | None:
    from tools.anatomy import region_at

    c = series.vox_to_mm(seg["center_ijk"])
    reg = region_at(anat, c, lung_snap_mm=max(8.0, 0.6 * float(seg.get("mean_d", 0.0)) + 4.0))
    return reg if reg in LUNG_ZONES else None


def zones_for(regions: list[str]) -> list[str]:
    """Lung zones a question covers: named zones, the zones of a named lung, or all of them."""
    regions = [r for r in regions if r]
    if not regions or any(r in ("body", "chest") for r in regions):
        return list(LUNG_ZONES)
    return [z for z in LUNG_ZONES if any(vocab.contains(r, z) for r in regions)]


def zone_features(zone: str) -> dict[str, float]:
    """What the zone itself says: the middle zones hold the hila, whose crowded vessels hide juxtavascular nodules."""
    return {"middle": float(zone.endswith("middle zone"))}


# ------------------------------------------------------------------------------------------ sensitivity probes
PROBE_D_MM = 5.0  # the injected test nodule: small, solid, and still one a reader must not miss
PROBE_HU = 40.0  # soft tissue
PROBE_ROI_MM = 24.0  # the cube each test nodule is re-measured on
PROBE_PAD_MM = 8.0  # ... inside a wider injected one (the segmentation looks past the re-measured cube)
N_PROBES = 5  # per kind of site (on the pleura, against a vessel) and zone
PROBE_SPACING_MM = 20.0  # probes of a zone stand at least this far apart
PROBE_AVOID_MM = 15.0  # ... and this far from a reported finding (the probe must not re-find a real one)
_WALL_REGIONS = ("body", "ribs", "spine")  # what a costal nodule sits against


@dataclass
class Probe:
    """The detector's sensitivity in one zone, measured by injecting test nodules and re-asking it.

    ``sites`` are where the test nodules were placed ("pleural" / "vascular", LPS mm); ``confidences``
    the detector's plausibility of each re-found test nodule (0 when it was not re-found), ``seen``
    whether it would have been reported (confidence and size above the detector's reporting limits).
    """

    sites: list[tuple[str, list[float]]] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    seen: list[bool] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.seen)

    def share(self, kind: str | None = None) -> float:
        """Share of the test nodules (of one kind of site, or all) that would have been reported."""
        s = [v for (k, _), v in zip(self.sites, self.seen) if kind is None or k == kind]
        return float(np.mean(s)) if s else 1.0

    def counts(self, kind: str) -> list[int]:
        """[reported, injected] test nodules at one kind of site."""
        s = [v for (k, _), v in zip(self.sites, self.seen) if k == kind]
        return [int(sum(s)), len(s)]

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seen": int(sum(self.seen)), "d_mm": PROBE_D_MM, "pleural": self.counts("pleural"),
                "vascular": self.counts("vascular"),
                "conf_mean": round(float(np.mean(self.confidences)) if self.confidences else 0.0, 3)}


def _spread_out(points: np.ndarray, rng: np.random.Generator, n: int, avoid_mm: list[np.ndarray]) -> list[np.ndarray]:
    """Up to ``n`` of ``points`` (LPS mm) in random order, each far from the others and from ``avoid_mm``."""
    out: list[np.ndarray] = []
    for o in rng.permutation(len(points))[:5000]:
        p = points[o]
        if any(np.linalg.norm(p - a) < PROBE_AVOID_MM for a in avoid_mm) or \
                any(np.linalg.norm(p - q) < PROBE_SPACING_MM for q in out):
            continue
        out.append(p)
        if len(out) >= n:
            break
    return out


def probe_sites(anat: Any, zone: str, avoid_mm: list[np.ndarray], rng: np.random.Generator,
                n: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Where a small nodule is hardest to see in ``zone``: on its costal pleura, and against its vessels.

    Pleural sites are lung voxels of the zone touching the chest wall (the test nodule is centred on the
    pleura, half of it in the wall, as a juxtapleural nodule is); vascular sites are solid voxels inside
    the zone's lung at least 10 mm from the wall (the test nodule's centre is put half a diameter off the
    vessel, so the two touch). On the anatomy's working grid, cropped to the zone; nothing within 15 mm
    of a reported finding.
    """
    from tools.anatomy import NAME_TO_LABEL

    n = n or N_PROBES
    g = anat.grid
    zm_full = anat.labels == NAME_TO_LABEL[zone]
    if not zm_full.any():
        return []
    di, dj, dk = g.spacing
    pad = [int(np.ceil(12.0 / v)) for v in (dk, dj, di)]
    idx = np.nonzero(zm_full)
    box = tuple(slice(max(int(x.min()) - q, 0), int(x.max()) + q + 1) for x, q in zip(idx, pad))
    labels = anat.labels[box]
    zm = zm_full[box]
    wall = np.isin(labels, [NAME_TO_LABEL[r] for r in _WALL_REGIONS]) | (labels == 0)
    near_wall = ndimage.binary_dilation(wall, iterations=1)
    off = np.array([box[2].start, box[1].start, box[0].start], float)  # i, j, k of the crop's corner

    def to_mm(mask: np.ndarray) -> np.ndarray:
        kk, jj, ii = np.nonzero(mask)
        return g.vox_to_mm(np.stack([ii, jj, kk], 1).astype(float) + off)

    sites: list[tuple[str, np.ndarray]] = [("pleural", p) for p in _spread_out(to_mm(zm & near_wall), rng, n,
                                                                                 avoid_mm)]
    if anat.work_hu is not None:
        wall_d = ndimage.distance_transform_edt(~near_wall, sampling=(dk, dj, di))
        for p in _spread_out(to_mm(zm & (anat.work_hu[box] > -500.0) & (wall_d > 10.0)), rng, n, avoid_mm):
            u = rng.normal(size=3)
            sites.append(("vascular", p + 0.5 * PROBE_D_MM * u / max(float(np.linalg.norm(u)), 1e-6)))
    return sites


def inject_nodule(series: Series, center_mm: np.ndarray, d_mm: float, half_mm: float, rng: np.random.Generator,
                  noise: float) -> Series:
    """The region of interest around ``center_mm`` with a solid sphere of ``d_mm`` added: partial volume
    (3x3x3 sub-voxel coverage), a 0.6 mm blur, and the scanner's noise inside it."""
    roi = _roi(series, list(center_mm), half_mm)
    px = roi.pixels.astype(np.float32)
    c = roi.mm_to_vox(np.asarray(center_mm, float))  # i, j, k
    di, dj, dk = (float(v) for v in roi.spacing)
    kk, jj, ii = np.ogrid[:px.shape[0], :px.shape[1], :px.shape[2]]
    offs = (np.arange(3) + 0.5) / 3 - 0.5
    cover = np.zeros(px.shape, np.float32)
    for ok in offs:
        for oj in offs:
            for oi in offs:
                d2 = ((ii + oi - c[0]) * di) ** 2 + ((jj + oj - c[1]) * dj) ** 2 + ((kk + ok - c[2]) * dk) ** 2
                cover += d2 <= (0.5 * d_mm) ** 2
    cover = ndimage.gaussian_filter(cover / 27.0, [0.6 / dk, 0.6 / dj, 0.6 / di])
    tissue = PROBE_HU + rng.normal(0.0, noise, size=px.shape).astype(np.float32)
    out = px * (1.0 - cover) + tissue * cover
    return Series(series_uid=roi.series_uid + ".probe", modality=roi.modality, pixels=out.astype(np.float32),
                  spacing=roi.spacing, origin=roi.origin, direction=roi.direction, spacing_known=roi.spacing_known)


def probe_zone(series: Series, anat: Any, zone: str, avoid_mm: list[np.ndarray], noise: float,
               seed: int = 0, n: int | None = None) -> Probe:
    """Would the detector have reported a 5 mm nodule in this zone? Test nodules are injected at the
    zone's hardest sites (:func:`probe_sites`) on small regions of interest and the detector re-measures
    each (``measure_at``: the same segmentation and plausibility as a full run); cheap, ROI only."""
    from tools.detector import MIN_CONFIDENCE, MIN_DIAMETER_MM, measure_at

    rng = np.random.default_rng(stable_seed(seed, zone))
    out = Probe()
    for kind, c in probe_sites(anat, zone, avoid_mm, rng, n):
        p = inject_nodule(series, c, PROBE_D_MM, 0.5 * PROBE_ROI_MM + PROBE_PAD_MM, rng, noise)
        try:
            m = measure_at(p, [float(v) for v in c], analysis=None, roi_mm=PROBE_ROI_MM)
        except Exception as exc:  # noqa: BLE001 - a failed re-measure counts as not seen
            log.debug("probe re-measure failed: %s", exc)
            m = None
        conf, seen = 0.0, False
        if m is not None and m.center_mm is not None and \
                float(np.linalg.norm(np.asarray(m.center_mm) - c)) <= 0.5 * PROBE_D_MM + 1.5:  # re-found there
            conf = float(m.confidence or 0.0)
            seen = conf >= MIN_CONFIDENCE and (m.diameter_mm or 0.0) >= MIN_DIAMETER_MM  # it would be reported
        out.sites.append((kind, [round(float(v), 1) for v in c]))
        out.confidences.append(conf)
        out.seen.append(seen)
    return out


def region_units(series: Series, analysis: Any, reported: list[dict[str, Any]], zones: list[str],
                 noise: float, seed: int = 0) -> list[Unit]:
    """One "nothing (else) here" unit per zone.

    Its evidence: the best sub-threshold candidate there, re-measured under perturbation (a near miss
    that keeps looking like a nodule is a warning), the unreported compact blobs, and the detector's
    measured sensitivity in the zone (:func:`probe_zone`: a zone where an injected 5 mm nodule on the
    pleura or against a vessel goes unreported is one where a real one can hide).
    """
    from tools.detector import MIN_CONFIDENCE, MIN_DIAMETER_MM

    reported_c = [np.asarray(f["center_mm"], float) for f in reported if f.get("center_mm")]
    near: dict[str, tuple[float, dict[str, Any]]] = {}
    compact: dict[str, float] = {}  # largest unreported compact, dense blob per zone, whatever its score
    for c in getattr(analysis, "candidates", []) or []:
        seg = c["seg"]
        conf = float(c["conf"])
        if conf >= MIN_CONFIDENCE and seg["mean_d"] >= MIN_DIAMETER_MM:
            continue  # reported
        if seg["mean_d"] < MIN_REFOUND_MM:
            continue
        cmm = series.vox_to_mm(seg["center_ijk"])
        if any(np.linalg.norm(cmm - rc) < 5.0 for rc in reported_c):
            continue
        z = _zone_of_candidate(analysis.anatomy, seg, series)
        if z not in zones:
            continue
        if seg.get("elong", 9.0) < 2.0 and seg.get("contrast", 0.0) >= 150.0:
            compact[z] = max(compact.get(z, 0.0), min(float(seg["mean_d"]), 30.0) / 10.0)
        if conf > 0.0 and (z not in near or conf > near[z][0]):
            near[z] = (conf, seg)
    units: list[Unit] = []
    anat = getattr(analysis, "anatomy", None)
    for z in zones:
        n_rep = sum(1 for f in reported if f.get("region") == z)
        feats = {"near_conf": 0.0, "near_refound": 0.0, "near_conf_mean": 0.0, "near_d": 0.0, "near_pleural": 0.0,
                 "n_reported": float(min(n_rep, 3)), "noise": noise / 30.0, "compact_d": compact.get(z, 0.0),
                 "probe_seen": 1.0, "probe_pleural": 1.0, "probe_vascular": 1.0, "probe_conf": 1.0,
                 **zone_features(z)}
        info: dict[str, Any] = {"zone": z}
        if z in near:
            conf, seg = near[z]
            cmm = [round(float(v), 1) for v in series.vox_to_mm(seg["center_ijk"])]
            r = perturb_remeasure(series, {"center_mm": cmm, "diameter_mm": seg["mean_d"]}, n=N_SECOND,
                                  seed=stable_seed(seed, z))
            feats.update(near_conf=conf, near_refound=r.found_frac, near_conf_mean=r.conf_mean,
                         near_d=min(float(seg["mean_d"]), 20.0) / 10.0, near_pleural=float(bool(seg.get("juxtapleural"))))
            info.update(candidate_mm=cmm, candidate_d_mm=round(float(seg["mean_d"]), 1),
                        slice_index=int(round(float(seg["center_ijk"][2]))), candidate_conf=round(conf, 3),
                        remeasure=r.to_dict())
        if anat is not None:
            pr = probe_zone(series, anat, z, reported_c, noise, seed=seed)
            if pr.n:
                feats.update(probe_seen=pr.share(), probe_pleural=pr.share("pleural"),
                             probe_vascular=pr.share("vascular"), probe_conf=float(np.mean(pr.confidences)))
                info["probe"] = pr.to_dict()
        units.append(Unit("region", z, feats, info))
    return units


def _apply(matrix: list[list[float]], p: list[float]) -> list[float]:
    m = np.asarray(matrix, float)
    return (m[:3, :3] @ np.asarray(p, float) + m[:3, 3]).tolist()


def _inverse(matrix: list[list[float]]) -> list[list[float]]:
    return np.linalg.inv(np.asarray(matrix, float)).tolist()


def finding_units(series: Series, findings: list[dict[str, Any]], noise: float, max_findings: int = 8) -> list[Unit]:
    """A "there is a nodule here, this size" unit per lesion finding in mm (largest first, at most ``max_findings``)."""
    cur = [f for f in findings if f.get("center_mm") and f.get("units", "mm") == "mm"]
    cur.sort(key=lambda f: -(f.get("diameter_mm") or 0.0))
    units = []
    for f in cur[:max_findings]:
        r = perturb_remeasure(series, f, n=N_FINDING, seed=stable_seed(f["id"], f["center_mm"]))
        units.append(Unit("finding", f["id"], finding_features(f, r, noise),
                          {"remeasure": r.to_dict(), "diameter_mm": f.get("diameter_mm"), "region": f.get("region"),
                           "slice_index": f.get("slice_index"), "center_mm": f.get("center_mm")}))
    return units


def change_units(series: Series, prior: Series, prior_to_current: list[list[float]],
                 findings: list[dict[str, Any]], known: list[Unit] | None = None) -> list[Unit]:
    """A "this is its change status" unit per finding with a ``change`` (comparison answers)."""
    noise = noise_level(series)
    c2p = _inverse(prior_to_current)
    fu = {u.key: u for u in known or [] if u.kind == "finding"}
    units: list[Unit] = []
    for f in findings:
        ch = f.get("change")
        if not isinstance(ch, dict):
            continue
        status = ch.get("status")
        feats = {"is_new": float(status == "new"), "is_resolved": float(status == "resolved"),
                 "margin": 0.0, "pair_spread": 0.0, "other_conf": 0.0, "other_refound": 0.0, "ex_refound": 0.0,
                 "ex_conf": 0.0, "prior_refound": 0.0, "prior_conf": 0.0}
        info: dict[str, Any] = {"status": status, "region": f.get("region")}
        if status == "resolved" and ch.get("prior_center_mm"):
            pf = {"center_mm": ch["prior_center_mm"], "diameter_mm": ch.get("prior_diameter_mm"), "notes": []}
            rp = perturb_remeasure(prior, pf, n=N_SECOND, seed=stable_seed(f["id"], "prior"))
            feats.update(ex_refound=rp.found_frac, ex_conf=rp.conf_mean)
            q = _apply(prior_to_current, ch["prior_center_mm"])
            ro = perturb_remeasure(series, {"center_mm": q, "diameter_mm": ch.get("prior_diameter_mm")},
                                   n=N_SECOND, seed=stable_seed(f["id"], "other"))
            feats.update(other_conf=ro.conf_mean, other_refound=ro.found_frac)
            info.update(expected_mm=[round(v, 1) for v in q], other=ro.to_dict())
        elif f.get("center_mm"):
            u = fu.get(f["id"])
            if u is None:
                r = perturb_remeasure(series, f, n=N_SECOND, seed=stable_seed(f["id"], f["center_mm"]))
                u = Unit("finding", f["id"], finding_features(f, r, noise), {"remeasure": r.to_dict()})
            feats.update(ex_refound=u.features["refound"], ex_conf=u.features["conf_mean"])
            if status == "new":
                q = _apply(c2p, f["center_mm"])
                ro = perturb_remeasure(prior, {"center_mm": q, "diameter_mm": f.get("diameter_mm")},
                                       n=N_SECOND, seed=stable_seed(f["id"], "other"))
                feats.update(other_conf=ro.conf_mean, other_refound=ro.found_frac)
                info.update(prior_position_mm=[round(v, 1) for v in q], other=ro.to_dict())
            elif ch.get("prior_center_mm") and ch.get("prior_diameter_mm") is not None:
                rp = perturb_remeasure(prior, {"center_mm": ch["prior_center_mm"],
                                               "diameter_mm": ch["prior_diameter_mm"]},
                                       n=N_SECOND, seed=stable_seed(f["id"], "prior"))
                delta = float(f.get("diameter_mm") or 0.0) - float(ch["prior_diameter_mm"])
                spread = math.hypot(u.features["spread"], min(rp.spread_mm, 5.0))
                feats.update(margin=min(abs(abs(delta) - GROWTH_MM), 5.0), pair_spread=spread,
                             prior_refound=rp.found_frac, prior_conf=rp.conf_mean)
                info.update(delta_mm=round(delta, 2), prior_remeasure=rp.to_dict())
        units.append(Unit("change", f["id"], feats, info))
    return units


# ------------------------------------------------------------------------------------------ chest films
N_FILM = 8  # perturbed re-measurements per film finding (two of each kind)
# P(a reported film opacity is a real nodule) from its re-measurements on the perturbed films: a logistic model
# (C = 1) of the share re-found and the mean plausibility over the tries (0 for a try that found nothing), fitted
# on the 185 opacities reported on the DRR films of seeds 20-29 and 40-79 (53 % real). Held out on seeds 100-119
# (75 opacities, 60 % real): AUC 0.85 (100-109: 0.77, 110-119: 0.93), ECE 0.10 (under-confident: mean P 0.54).
# The box overlap and the diameter's spread added nothing, and the detector's own score alone ranks as well (AUC
# 0.85): a vessel crossing re-measures as steadily as a nodule, so on a film agreement under perturbation mostly
# confirms what the detector already scored; a spot that perturbation does not re-find is rated low.
FILM_WEIGHTS = {"refound": 0.285, "conf_mean": 4.091}
FILM_BIAS = -1.729
FILM_CALIBRATION_NOTE = "film weights fitted on DRR seeds 20-29 and 40-79"


def film_finding_features(r: Remeasure) -> dict[str, float]:
    """A film opacity's reliability inputs (``FILM_WEIGHTS``): the share re-found on the perturbed films and
    their mean plausibility (box overlap and diameter spread stay in the re-measurement's record)."""
    return {"refound": r.found_frac, "conf_mean": r.conf_mean}


def film_probability(feats: dict[str, float]) -> float:
    z = FILM_BIAS + sum(w * feats[k] for k, w in FILM_WEIGHTS.items())
    return float(1.0 / (1.0 + math.exp(-z)))


def film_remeasure(series: Series, an: Any, f: dict[str, Any], n: int = N_FILM, seed: int = 0) -> Remeasure:
    """Re-measure the film opacity ``f`` (its full-film box ``bbox_px``) on ``n`` perturbed copies of the film
    (:func:`tools.radiograph.perturb_film`): re-found when the best fit near its centre lies within half its
    diameter (>= 3 working pixels) and passes the re-measurement bar."""
    from tools.radiograph import FILM_PERTURBATIONS, measure_at_px, perturb_film

    b = f.get("bbox_px")
    if not b:
        return Remeasure(n=0, found=0, diameters=[], ious=[])
    col, row = 0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])
    half_w, half_h = 0.5 * (b[2] - b[0]), 0.5 * (b[3] - b[1])
    d_px = b[2] - b[0] + 1.0
    rng = np.random.default_rng(seed)
    found, diams, ious, confs = 0, [], [], []
    for t in range(n):
        an2, mapping = perturb_film(an, FILM_PERTURBATIONS[t % len(FILM_PERTURBATIONS)], rng)
        c2, r2 = mapping(col, row)
        search_mm = max(4.0, 0.25 * d_px / an.factor / an.px_per_mm_est)
        m = measure_at_px(series, c2, r2, analysis=an2, search_mm=search_mm, keep_confidence=True,
                          diameter_mm=f.get("diameter_mm"))
        if m is None or m.bbox_px is None:
            continue
        mc, mr = 0.5 * (m.bbox_px[0] + m.bbox_px[2]), 0.5 * (m.bbox_px[1] + m.bbox_px[3])
        if math.hypot(mc - c2, mr - r2) > max(0.5 * d_px, 3.0 * an.factor):
            continue
        found += 1
        diams.append(float(m.diameter_mm or 0.0))
        confs.append(float(m.confidence or 0.0))
        ious.append(_iou([c2 - half_w, r2 - half_h, 0.0, c2 + half_w, r2 + half_h, 1.0],
                         [m.bbox_px[0], m.bbox_px[1], 0.0, m.bbox_px[2], m.bbox_px[3], 1.0]))
    return Remeasure(n=n, found=found, diameters=diams, ious=ious, confidences=confs)


def film_units(series: Series, an: Any, findings: list[dict[str, Any]], max_findings: int = 6) -> list[Unit]:
    """Answer units of a chest-film answer: each reported opacity (largest first, at most ``max_findings``)
    re-measured on perturbed films, with its P(correct) (``FILM_WEIGHTS``)."""
    out: list[Unit] = []
    lesions = sorted((f for f in findings if f.get("bbox_px") and f.get("kind") in ("nodule", "mass", "opacity")
                      and (f.get("change") or {}).get("status") != "resolved"),
                     key=lambda f: -(f.get("diameter_mm") or 0.0))[:max_findings]
    for f in lesions:
        r = film_remeasure(series, an, f, seed=stable_seed(f["id"], f.get("bbox_px")))
        feats = film_finding_features(r)
        u = Unit("finding", f["id"], feats, info={"remeasure": {**r.to_dict(), "units": f.get("units", "mm")},
                                                  "region": f.get("region"), "diameter_mm": f.get("diameter_mm"),
                                                  "film": True})
        u.p = film_probability(feats)
        out.append(u)
    return out


def assess(series: Series, analysis: Any, findings: list[dict[str, Any]], zones: list[str],
           prior: Series | None = None, prior_to_current: list[list[float]] | None = None,
           max_findings: int = 8) -> list[Unit]:
    """The answer units of a turn with their features (the expensive part: perturbed re-measurements).

    ``findings``: the lesion findings the answer reports (dicts of the answer contract; with ``change``
    when the answer is a comparison). ``zones``: the lung zones the answer speaks for ("nothing else
    there"). ``prior`` and ``prior_to_current`` (4x4, LPS mm) are needed for change units.
    """
    noise = noise_level(series)
    units = finding_units(series, findings, noise, max_findings)
    reported = [f for f in findings if f.get("center_mm")]
    units += region_units(series, analysis, reported, zones, noise)
    if prior is not None and prior_to_current is not None:
        units += change_units(series, prior, prior_to_current, findings, units)
    return units


# ------------------------------------------------------------------------------------------ calibration
CALIBRATION_PATH = Path(__file__).with_name("verifier_calibration.json")
CALIBRATION_VERSION = 1
#: what the answer units' features are; a cached collection of another version is collected again
UNIT_FEATURES_VERSION = 3  # 2: the region unit's sensitivity probes (probe_*); 3: finding surface_large
#: expected direction of each feature's effect on P(correct); the fit drops a feature whose sign disagrees,
#: so the mapping is monotone in these (a re-found share that rises can never lower the score)
MONOTONE: dict[str, dict[str, int]] = {
    "finding": {"refound": 1, "conf_mean": 1, "iou": 1, "spread": -1, "bias": -1, "det_conf": 1, "surface_large": -1},
    "region": {"near_conf": -1, "near_refound": -1, "near_conf_mean": -1, "near_d": -1, "noise": -1, "probe_seen": 1,
               "probe_pleural": 1, "probe_vascular": 1, "probe_conf": 1},
    "change": {"margin": 1, "pair_spread": -1, "other_conf": -1, "other_refound": -1, "ex_refound": 1, "ex_conf": 1,
               "prior_refound": 1, "prior_conf": 1},
}


class KindModel(BaseModel):
    """Logistic model of P(correct) for one kind of unit, on standardised features."""

    model_config = ConfigDict(extra="forbid")
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    n: int
    n_wrong: int
    c: float | None = None  # the regularisation strength it was fitted with (cross-validated)

    def prob(self, feats: dict[str, float]) -> float:
        x = np.array([(feats.get(k, 0.0) - m) / s for k, m, s in zip(self.features, self.mean, self.scale)])
        z = float(x @ np.asarray(self.coef) + self.intercept)
        return 1.0 / (1.0 + math.exp(-z))


class NearMissRule(BaseModel):
    """A zone whose best sub-threshold candidate keeps scoring when re-measured: too rare on the calibration
    seeds for the regularised zone model to follow (a few in hundreds of zones), yet a large share of them
    hide a missed nodule. Its "nothing (else) here" is capped at the share of such zones that were right
    (Laplace-smoothed: (right + 1) / (n + 2))."""

    model_config = ConfigDict(extra="forbid")
    threshold: float  # near_conf_mean at or above which the rule applies
    n: int
    n_wrong: int
    p: float


NEAR_MISS_STRONG = 0.3  # re-measured confidence of a sub-threshold candidate that makes it a near miss


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    created: str
    command: str
    size: str
    seeds: list[int]
    detector: str = ""  # what the detector was when fitted (a fingerprint of its module)
    models: dict[str, KindModel]
    near_miss: NearMissRule | None = None
    fit_metrics: dict[str, Any] = {}


@lru_cache(maxsize=4)
def _load(path: str) -> Calibration | None:
    p = Path(path)
    if not p.exists():
        log.warning("no verifier calibration at %s; reliability is uncalibrated (run `radassist verifier "
                    "calibrate`)", p)
        return None
    try:
        cal = Calibration(**json.loads(p.read_text()))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"The verifier calibration {p.name} is unreadable ({exc}); re-create it with "
                          "`radassist verifier calibrate`.") from exc
    if cal.version != CALIBRATION_VERSION:
        raise ConfigError(f"The verifier calibration {p.name} is version {cal.version}, this code expects "
                          f"{CALIBRATION_VERSION}; re-create it with `radassist verifier calibrate`.")
    return cal


def load_calibration(path: str | Path | None = None) -> Calibration | None:
    return _load(str(path or CALIBRATION_PATH))


def _fallback(kind: str, feats: dict[str, float]) -> float:
    """Hand-set scores used only when no calibration file exists."""
    if kind == "finding":
        size = math.exp(-((feats["spread"] / 0.75) ** 2) / 2) * math.exp(-((feats["bias"] / 1.5) ** 2) / 2)
        return float(np.clip(feats["refound"] * (0.55 + 0.3 * size + 0.15 * feats["iou"]), 0.0, 1.0))
    if kind == "region":
        return 0.85 - 0.4 * feats["near_conf_mean"]
    return 0.5 + 0.4 * feats["ex_conf"] - 0.3 * feats["other_conf"]


def predict(kind: str, feats: dict[str, float], cal: Calibration | None = None) -> tuple[float, str]:
    """P(correct) for one unit and the method that gave it."""
    cal = cal or load_calibration()
    if cal is not None and kind in cal.models:
        p = cal.models[kind].prob(feats)
        rule = cal.near_miss
        if kind == "region" and rule is not None and feats.get("near_conf_mean", 0.0) >= rule.threshold:
            p = min(p, rule.p)
        return p, "calibrated"
    return _fallback(kind, feats), "uncalibrated"


def score_units(units: list[Unit], cal: Calibration | None = None) -> str:
    methods = set()
    for u in units:
        u.p, m = predict(u.kind, u.features, cal)
        methods.add(m)
    return "uncalibrated" if "uncalibrated" in methods else "calibrated"


# ------------------------------------------------------------------------------------------ legacy helpers
def finding_score(r: Remeasure, diameter_mm: float | None) -> float:
    """Uncalibrated per-finding score (kept for callers without a calibration)."""
    return _fallback("finding", finding_features({"diameter_mm": diameter_mm}, r, 20.0))


def combine(paraphrase: dict[str, Any], per_finding: dict[str, float], negative_support: float | None) -> float:
    """Answer-level score without units: the paraphrase agreement and the weakest findings weigh most."""
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


def _region_caveat(u: Unit, where: str) -> str:
    """What to check in a zone reported empty: the near miss if there is one, else where the probes went unseen."""
    i = u.info
    if i.get("candidate_mm"):
        return (f"No nodule is reported in the {u.key}, but a borderline candidate ({i['candidate_d_mm']:.1f} mm, "
                f"{where}, at {i['candidate_mm']} mm) fell just under the detection threshold: look there.")
    pr = i.get("probe") or {}
    if pr.get("n") and pr.get("seen", 0) < pr["n"]:
        hard = [k for k in ("pleural", "vascular") if pr.get(k) and pr[k][0] < pr[k][1]] or ["pleural", "vascular"]
        placed = {"pleural": "on the pleura (juxtapleural)", "vascular": "against a vessel (juxtavascular)"}
        look = {"pleural": "pleural surface", "vascular": "vessels"}
        return (f"No nodule is reported in the {u.key}, but a {pr['d_mm']:.0f} mm test nodule placed "
                f"{' or '.join(placed[k] for k in hard)} was detected in only {pr['seen']}/{pr['n']} tries on this "
                f"scan: small nodules there can be missed; review the {u.key}'s "
                f"{' and '.join(look[k] for k in hard)} on thin lung-window slices.")
    return f"No nodule is reported in the {u.key}; on this scan's noise a small nodule there could be missed."


def caveat_for(u: Unit) -> str:
    """What a reader should check for a weak unit (one sentence)."""
    i = u.info
    where = f"slice {int(i['slice_index']) + 1}" if i.get("slice_index") is not None else ""
    if u.kind == "finding":
        rm = i.get("remeasure", {})
        at = f"{u.key} ({i.get('region') or 'lung'}{', ' + where if where else ''})"
        if u.features["refound"] < 0.75:
            return (f"{at} was re-found in only {rm.get('found', 0)}/{rm.get('n', 0)} perturbed re-measurements: "
                    "check on the images that it is a nodule and not a vessel, the pleura or noise.")
        if u.features["conf_mean"] < 0.5:
            return (f"{at} was re-found in {rm.get('found', 0)}/{rm.get('n', 0)} perturbed re-measurements but "
                    f"looks only in part like a nodule (plausibility {u.features['conf_mean']:.2f}): check on the "
                    "images that it is a nodule and not a vessel, a rib crossing or the pleura.")
        un = rm.get("units", "mm")
        return (f"{u.key}'s size is uncertain (re-measured {rm.get('mean_mm', 0):.1f} ± {rm.get('spread_mm', 0):.1f} "
                f"{un} against {i.get('diameter_mm') or 0:.1f} {un} reported): measure it by hand before using it "
                "for follow-up.")
    if u.kind == "region":
        return _region_caveat(u, where)
    st = i.get("status")
    if st == "new":
        return (f"{u.key} is called new, but something is seen at its position on the prior "
                f"({i.get('prior_position_mm')} mm): compare the two slices side by side.")
    if st == "resolved":
        return (f"{u.key} is called resolved, but its expected position in the current study "
                f"({i.get('expected_mm')} mm) still shows density: check it.")
    if i.get("delta_mm") is not None:
        return (f"{u.key} is called {st} from a {i['delta_mm']:+.1f} mm change, close to the 1.5 mm threshold given the "
                "re-measurement spread: compare the two measurements by hand.")
    return f"The change status of {u.key} ({st}) is uncertain: compare it with the prior by hand."


def explain(v: dict[str, Any]) -> str:
    """A clinician-facing account of a stored verification (no recomputation)."""
    if not v:
        return "This answer was not verified."
    d = v.get("details", {})
    lines = [f"The last answer's reliability is {v.get('level', '?')} ({v.get('score', 0):.2f}), from "
             f"{v.get('method', 'self-consistency')}."]
    p = d.get("paraphrase")
    if p and p.get("n"):
        lines.append(f"Re-asked in {p['n']} other wordings: {p.get('same_tools', 0)} chose the same tools and "
                     f"{p.get('same_regions', 0)} the same regions.")
    s = d.get("sampling")
    if s and s.get("n"):
        lines.append(f"The served model, sampled {s['n']} times, gave {s.get('clusters', 0)} distinct readings of the "
                     f"question (agreement {s.get('agreement', 0):.2f}).")
    pf = v.get("per_finding") or {}
    for fid, m in (d.get("measurements") or {}).items():
        rel = f" (P correct {pf[fid]:.2f})" if fid in pf else ""
        lines.append(f"{fid}: re-found in {m['found']}/{m['n']} perturbed re-measurements; diameter "
                     f"{m['mean_mm']:.1f} mm ± {m['spread_mm']:.1f} mm{rel}.")
    regions = d.get("regions") or {}
    if regions:
        weak = {z: r for z, r in regions.items() if r.get("p", 1.0) < 0.8}
        probes = [r["probe"] for r in regions.values() if (r.get("probe") or {}).get("n")]
        lines.append(f"'Nothing else found' was checked in {len(regions)} lung zone(s)"
                     + (": weakest " + ", ".join(f"{z} ({r['p']:.2f})" for z, r in weak.items()) if weak else
                        ", all rated high") + ".")
        if probes:
            lines.append(f"{probes[0]['d_mm']:.0f} mm test nodules injected on the pleura and against vessels there "
                         f"were detected in {sum(p['seen'] for p in probes)}/{sum(p['n'] for p in probes)} tries.")
    for fid, c in (d.get("changes") or {}).items():
        lines.append(f"{fid} change '{c.get('status')}': P correct {c.get('p', 0):.2f}.")
    if v.get("caveat"):
        lines.append(v["caveat"])
    return " ".join(lines)
