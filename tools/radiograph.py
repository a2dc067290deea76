"""Chest radiographs (PA films, CR/DX): anatomy, cardiothoracic ratio, rounded opacities, comparison.

Classical methods only (no weights), the embedded default on CPU. ``analyze_radiograph(series)``
(cached per series uid) works on a *working image*: the film block-averaged so that its longer side
is ~``WORK_PX`` pixels and scaled to its 0.5-99.5 % intensity range (MONOCHROME1 films were already
inverted by :mod:`tools.dicom_io`, so bone and soft tissue are bright and the lungs dark).

1. *Lung fields*: a row-wise black top-hat (a grey closing along each row with a line half the
   film wide, the film padded with black at its sides) measures how much darker each pixel is than
   the brighter walls on both sides of it on its row (chest wall and mediastinum); this removes slow
   intensity trends (breasts, exposure, processing) and leaves the air outside the body at zero.
   Hysteresis thresholding (Otsu on the top-hat and half of it), a cut at the midline (the brightest
   column of the central part: spine/mediastinum), an opening, and the largest component on each
   side that does not touch the film's border give the right and left lung fields (standard display:
   the patient's right on the image left), holes filled. Zones are craniocaudal thirds (rows) of each
   field.
2. *Mediastinum, trachea, heart, diaphragm*: the mediastinum lies between the fields' medial
   borders; the trachea is the darkest band near the midline above the hila; the heart's right and
   left borders are the medial borders of the fields in the lower part of the thorax (median
   filtered along the rows); the diaphragm domes are the highest points of the fields' lower borders.
3. *Cardiothoracic ratio*: (largest distance of the right heart border from the midline + that of
   the left heart border) / the largest distance on one row between the fields' lateral borders.
4. *Costophrenic angles*: the infero-lateral corner of each field; the angle between lines fitted
   to the lateral border above it and to the diaphragm contour medial to it (sharp < ``CP_BLUNT_DEG``).
5. *Rounded opacities*: at every pixel of the lung fields and for radii from 3 mm up (ratio
   ``FIT_STEP``), a projected sphere ``A sqrt(1 - d^2/R^2)`` on a sloping local background is fitted by
   least squares to the *lung pixels only* within ``FIT_WINDOW`` radii (dense, by FFT correlations:
   :func:`_sphere_fit_maps`), so the bright mediastinum, apex or chest wall next to an opacity neither
   hides it nor passes for it; local maxima of ``t = A / se(A)`` (the contrast against the local
   texture) are the candidates. Each is scored by a logistic model (``OPACITY_WEIGHTS``, fitted on the
   100 DRR films of seeds 20-29 and 40-79): its t, contrast and contrast over the local texture
   *relative to the film's own median spot* (:func:`_film_stats`: exposure and texture differ between films), size, the
   background-subtracted annulus per angular sector (vessels, ribs and the hilum leave bright sectors or
   bright surroundings; a nodule's are flat), elongation, how much better a sphere explains the spot
   than one or two straight bands through it (:func:`_band_evidence`: ribs, vessels and their bright
   crossings), and how many branches (ridges along rays) leave it (:func:`_ridge_evidence`: a vessel
   seen end-on sits on a tree). Sizes come from the fitted radius, refined
   (sub-pixel centre, continuous radius) by least squares on a fixed window. Long/short axis and their
   mean are reported in mm when the pixel spacing is known, else pixels.

``run_radiograph_detector(study, req)`` answers the same requests as the CT detector;
``compare_radiographs(current, prior)`` registers the prior to the current film (SimpleITK 2-D,
similarity then affine, on the lung-field region), matches opacities (Hungarian on registered
distance), re-measures both films of each matched pair the same way (:func:`_paired_remeasure`: same start
radius and window in mm, so the fit's biases cancel in the difference) and classifies size change (Lung-RADS
rule: grew when the mean diameter rose > 1.5 mm).
``evaluate_radiographs(seeds)`` measures all this on DRR pairs projected from the CT phantoms.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools import vocab
from tools.cache import CACHE
from tools.errors import StudyError, UnsupportedError
from tools.schemas import Change, Evidence, Finding
from tools.study import Series, Study

log = logging.getLogger(__name__)

WORK_PX = 512  # longer side of the working image
ASSUMED_THORAX_MM = 280.0  # only to choose blob scales on films without pixel spacing (never reported)
MIN_OPACITY_MM = 6.0  # smallest opacity reported
MASS_MM = 30.0
GROWTH_MM = 1.5
CP_BLUNT_DEG = 90.0
MIN_CONFIDENCE = 0.175  # opacity probability (logistic, below) reported: 0.9 false positive per film on the fit films
MAX_OPACITIES = 12
HEART_TOP_FRAC = 0.65  # the heart borders are sought below this fraction of the fields' height
# the heart's right border lies about half as far from the midline as its left (0.3-0.75 on the projected phantoms,
# 1st-99th percentile); a right border traced further out than this share of the left is the hilum or the lung
# field's edge, and the ratio is not reported
HEART_RIGHT_MAX = 0.8
# a change in the ratio between two films smaller than this is within the measurement's variation: the error of the
# measured change on the projected phantom pairs (147 pairs of seeds 20-29, 40-79, 100-219) is 0.014 mean, 0.047 at
# the 95th percentile
CTR_CHANGE_NOISE = 0.05
LINE_MM = 35.0  # line openings: nodules shorter than this in every direction survive
MAX_FIT_MM = 45.0  # largest opacity diameter fitted
FIT_WINDOW = 2.2  # the projected-sphere fit sees lung pixels within this many radii
FIT_STEP = 1.15  # ratio of successive fitted radii
FIT_CORE_FRAC = 0.6  # ... and needs this fraction of its disk inside the lung fields
SIZE_RANGE = (0.6, 1.6)  # sizing: the refined radius stays within these factors of the detected one
N_SECTORS = 12  # angular sectors of the annulus test
MAX_PEAKS = 80  # fitted spots scored per film
# logistic model of "this fitted spot is an opacity", fitted on the MAX_PEAKS candidates of each of the 100 DRR
# films of seeds 20-29 and 40-79 (a candidate is positive when it lies on a truth nodule of any size),
# L2-regularised (C = 0.1 on standardised features); seeds 100-109 held out, and 110-139 kept as a fresh check of
# the refit: the spot's prominence over its film's own null level (log t, log A, log A/sigma minus their medians
# over the film's fitted spots: films differ in exposure and texture, so absolute contrasts do not transfer),
# size, bright annulus sectors (vessels, ribs, hilum), elongation, and the sphere-versus-bands evidence (ribs,
# vessels and their crossings), and the branches leaving the spot (:func:`_ridge_evidence`: the phantoms' false
# positives are mostly vessels seen end-on or crossing, bright spots on a tree). The earlier fit on the 20 films of
# seeds 20-29 alone found 0.47 of the >= 10 mm in-field opacities of seeds 110-139 at 0.52 false positive per film
# (at its 0.15); the ten-feature fit on the 100 films 0.51 at 0.67. Adding the branch count raised the
# cross-validated (5 folds by seed, three splits) in-field sensitivity on the fitting films at 0.9 false positive
# per film from 0.51 to 0.54; other added spot features (quadrant and 8-sector consistency of the sphere's
# contrast, the contralateral mirror spot, scale ratios; and a gradient-boosted model on all of them) did not.
OPACITY_WEIGHTS = {"rel_t": 2.2505, "rel_a": 0.893, "rel_as": 0.4384, "log_d_mm": -0.937, "sec_max": 0.8223,
                   "sec_2": 0.3652, "sec_mean": -13.3684, "elong": -1.2313, "llr_band": 0.5762, "t_bands": 0.6344,
                   "ridge_n": -0.1345}
OPACITY_BIAS = -1.8051
N_BAND_DIR = 12  # band hypotheses (ribs, vessels): orientations ...
BAND_WIDTHS = (0.6, 1.0, 1.6)  # ... and half-widths in units of the spot's radius
N_RAYS = 24  # branch test (:func:`_ridge_evidence`): rays from the spot ...
RAY_SPAN = (1.3, 3.0)  # ... sampled (8 points) from this many radii out to this many
RIDGE_MIN = 0.1  # a ray carries a branch when its mean ridge contrast exceeds this fraction of the spot's A
# uncertainty of a size change measured by the paired re-measurement (_paired_remeasure): the RMS error of the
# diameter change against the CT truth over the matched pairs of seeds 20-29 (0.53 mm; 100-109: 0.68 mm)
PAIRED_CHANGE_SD_MM = 0.55
FIT_BLUR_PX = 0.7  # the projected-sphere fits work on the working image lightly blurred (working px)
# a second look at a known position (the prior's opacity, a pointed pixel): a lower bar, one that would pass
# about 3.2 spots per film on the fitting films (as 0.07 did for the scorer fitted on seeds 20-29 alone)
REMEASURE_MIN_CONF = 0.1
# conspicuity of a truth nodule on its film (tools.drr._conspicuity: a matched-filter model observer told where
# the nodule is and what it looks like, against the film's own texture around it). The bench reports the
# sensitivity for nodules below and above d' = 2 apart (d' = 2: 92 % correct when that observer is shown the
# nodule's place and a place of lung without it; a search over a whole film needs more)
CONSPICUOUS_DPRIME = 2.0
HYST_LOW = 0.4  # hysteresis: weak threshold as a fraction of the Otsu threshold of the top-hat

SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class RadiographAnalysis:
    series_uid: str
    shape: tuple[int, int]  # full film (rows, cols)
    factor: int  # full pixels per working pixel
    spacing_mm: tuple[float, float] | None  # (column, row) spacing, None when unknown
    work: np.ndarray  # float32 working image in [0, 1]
    fields: np.ndarray  # uint8 working grid: 0, 1 right lung field, 2 left lung field
    midline_col: float  # full-film column of the midline
    boxes: dict[str, list[int]]  # region name -> full-film pixel box [x0, y0, x1, y1]
    ctr: float | None
    ctr_geometry: dict[str, Any]  # heart / thorax widths (px, mm) and the lines to draw
    costophrenic: dict[str, dict[str, Any]]  # side -> point_px, angle_deg, blunted
    diaphragm: dict[str, dict[str, Any]]  # side -> dome_px
    opacities: list[Finding]
    px_per_mm_est: float  # working pixels per mm (from the spacing, or assumed from the thorax width)
    runtime_s: float
    notes: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # all scored blob candidates (debug)
    residual: np.ndarray | None = None  # line-opening residual of the working image (blobs)
    residual_rms: float = 1.0
    film_stats: dict[str, float] = field(default_factory=dict)  # the film's null level (see _film_stats)

    @property
    def units(self) -> str:
        return "mm" if self.spacing_mm is not None else "px"

    @cached_property
    def fit_image(self) -> np.ndarray:
        """The image every projected-sphere fit of this film works on (see :func:`_fit_image`)."""
        return _fit_image(self.work)

    def field_mask(self, side: str | None = None) -> np.ndarray:
        if side is None:
            return self.fields > 0
        return self.fields == (1 if side == "right" else 2)


def _fit_image(work: np.ndarray) -> np.ndarray:
    """The working image blurred by ``FIT_BLUR_PX``: what the projected-sphere fits see."""
    return ndi.gaussian_filter(work.astype(np.float32), FIT_BLUR_PX)


# ----------------------------------------------------------------------------------------------
# small helpers


def _bbox(mask: np.ndarray) -> list[int] | None:
    rr = np.flatnonzero(mask.any(axis=1))
    if rr.size == 0:
        return None
    cc = np.flatnonzero(mask.any(axis=0))
    return [int(cc[0]), int(rr[0]), int(cc[-1]), int(rr[-1])]


def _disk(r: int) -> np.ndarray:
    r = max(1, int(r))
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    v = values[np.isfinite(values)]
    if v.size == 0 or float(v.max()) <= float(v.min()):
        return float(v.max()) if v.size else 0.0
    return float(threshold_otsu(v))


def _work_image(series: Series) -> tuple[np.ndarray, int]:
    a = np.asarray(series.pixels[0], dtype=np.float32)
    f = max(1, int(math.ceil(max(a.shape) / WORK_PX)))
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    if f > 1:
        a = a[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        raise StudyError("This radiograph has no contrast (a blank image); it cannot be analysed.")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), f


def _full_box(b: list[int], f: int, shape: tuple[int, int]) -> list[int]:
    return [int(b[0] * f), int(b[1] * f), int(min(shape[1] - 1, b[2] * f + f - 1)),
            int(min(shape[0] - 1, b[3] * f + f - 1))]


def zone_bounds(box: list[int]) -> list[float]:
    """Row cuts [r0, r1, r2, r3] of the craniocaudal thirds of a field box (full pixels)."""
    r0, r3 = float(box[1]), float(box[3] + 1)
    h = (r3 - r0) / 3.0
    return [r0, r0 + h, r0 + 2 * h, r3]


def _zone_of_row(row: float, box: list[int]) -> str:
    _, b1, b2, _ = zone_bounds(box)
    return "upper" if row < b1 else ("middle" if row < b2 else "lower")


# ----------------------------------------------------------------------------------------------
# lung fields


def _row_tophat(sm: np.ndarray) -> np.ndarray:
    """Black top-hat along rows: how much darker each pixel is than the bright walls on both sides."""
    w = sm.shape[1]
    length = max(3, int(0.5 * w))
    p = np.pad(sm, ((0, 0), (length, length)), mode="constant", constant_values=0.0)
    cl = ndi.grey_closing(p, size=(1, length))[:, length:-length]
    return cl - sm


def _midline(sm: np.ndarray) -> int:
    h, w = sm.shape
    # the upper mediastinum and spine: a bright column centred on the midline (the heart, lower down,
    # lies to one side and can be brighter than the spine on processed films)
    prof = sm[int(0.1 * h):int(0.5 * h)].mean(axis=0)
    prof = ndi.uniform_filter1d(prof, max(3, w // 15))
    c0, c1 = int(0.3 * w), int(0.7 * w)
    return c0 + int(np.argmax(prof[c0:c1]))


def _segment_fields(work: np.ndarray, notes: list[str]) -> tuple[np.ndarray, int, np.ndarray]:
    from skimage.filters import apply_hysteresis_threshold

    h, w = work.shape
    sm = ndi.gaussian_filter(work, 1.5)
    bth = _row_tophat(sm)
    t = _otsu(bth)
    mask = apply_hysteresis_threshold(bth, HYST_LOW * t, t)
    mid = _midline(sm)
    mask[:, max(0, mid - 1):mid + 2] = False
    raw = mask.copy()
    r_open = max(2, int(round(0.012 * w)))
    mask = ndi.binary_opening(mask, structure=_disk(r_open))
    lab, n = ndi.label(mask)
    fields = np.zeros((h, w), dtype=np.uint8)
    if n == 0:
        notes.append("no lung fields found: the image may not be a chest film")
        return fields, mid, bth
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist()) - {0}
    objs = ndi.find_objects(lab)
    min_area = 0.01 * h * w
    for code, side in ((1, "right"), (2, "left")):
        best = None
        for strict in (True, False):
            for i in np.argsort(-sizes):
                if sizes[i] < min_area:
                    break
                sl = objs[i - 1]
                cx = 0.5 * (sl[1].start + sl[1].stop - 1)
                on_side = cx < mid if code == 1 else cx > mid
                if on_side and (not strict or i not in border):
                    best = int(i)
                    break
            if best is not None:
                if not strict:
                    notes.append(f"the {side} lung field touches the film's edge (cropped film?)")
                break
        if best is None:
            notes.append(f"the {side} lung field was not found")
            continue
        core = lab == best
        # give back what the opening shaved off (the costophrenic tips): the hysteresis mask near the core
        near = ndi.binary_dilation(core, structure=_disk(4 * r_open))
        m = _component_touching(raw & near, core)
        m = _cap_below_costophrenic(m, code)
        m = _cut_below_dome(m, bth, t, code, r_open)
        m = ndi.binary_closing(m, structure=_disk(r_open), border_value=0) | m
        m = ndi.binary_fill_holes(m)
        if code == 1:
            m[:, mid:] = False
        else:
            m[:, :mid + 1] = False
        fields[m & (fields == 0)] = code
    return fields, mid, bth


def _component_touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    lab, _ = ndi.label(mask)
    ids = np.unique(lab[seed & mask])
    ids = ids[ids > 0]
    return np.isin(lab, ids) if ids.size else seed


def _column_runs(col: np.ndarray) -> list[tuple[int, int]]:
    idx = np.flatnonzero(col)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def _cap_below_costophrenic(m: np.ndarray, code: int) -> np.ndarray:
    """The lung field ends at its costophrenic recess: nothing of it lies lower than the lowest point of
    its lateral quarter (dark gas under a hemidiaphragm joining the field is cut there)."""
    cols = np.flatnonzero(m.any(axis=0))
    if cols.size < 8:
        return m
    q = max(2, cols.size // 4)
    lat = cols[:q] if code == 1 else cols[-q:]
    low = int(max(np.flatnonzero(m[:, c])[-1] for c in lat))
    out = m.copy()
    out[low + max(2, m.shape[0] // 100):] = False
    return out


def _cut_below_dome(m: np.ndarray, bth: np.ndarray, t: float, code: int, r_open: int) -> np.ndarray:
    """Below the dome's apex and medial to it, keep only clearly dark pixels (the strong threshold):
    the faintly dark region under the medial diaphragm (lung behind the liver or heart) is not lung field."""
    d = _dome(m.astype(np.uint8) * code, code)
    if d is None:
        return m
    col_d, row_d = d
    rows = np.arange(m.shape[0])[:, None]
    cols = np.arange(m.shape[1])[None, :]
    medial = cols > col_d if code == 1 else cols < col_d
    below = (rows > row_d) & medial
    out = m & ~(below & (bth < t))
    # and no thin strips there (along the heart border under the dome)
    op = ndi.binary_opening(out, structure=_disk(r_open))
    out &= ~below | op
    lab, n = ndi.label(out)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out = lab == int(np.argmax(sizes))
    return out


# ----------------------------------------------------------------------------------------------
# heart, thorax, diaphragm, costophrenic angles


def _medial_lateral(fields: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: medial and lateral border columns of one field (-1 where absent)."""
    m = fields == code
    h, w = m.shape
    cols = np.arange(w)
    any_ = m.any(axis=1)
    first = np.where(any_, np.argmax(m, axis=1), -1)
    last = np.where(any_, w - 1 - np.argmax(m[:, ::-1], axis=1), -1)
    del cols
    if code == 1:  # right field, image left: lateral = first, medial = last
        return last, first
    return first, last


def _heart_and_thorax(fields: np.ndarray, mid: int, f: int) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    med_r, lat_r = _medial_lateral(fields, 1)
    med_l, lat_l = _medial_lateral(fields, 2)
    both = (med_r >= 0) & (med_l >= 0)
    out: dict[str, Any] = {}
    rows_both = np.flatnonzero(both)
    if rows_both.size == 0:
        return out, ["the cardiothoracic ratio needs both lung fields"]
    width = np.where(both, lat_l - lat_r, -1)
    tr = int(np.argmax(width))
    out["thorax"] = {"row": tr, "cols": [int(lat_r[tr]), int(lat_l[tr])], "width": int(lat_l[tr] - lat_r[tr] + 1)}
    # heart rows: the lower part of the thorax, down to where each field's medial border stops
    # following the heart (it jumps laterally under the dome, or the field ends)
    top = int(min(np.flatnonzero(med_r >= 0)[0], np.flatnonzero(med_l >= 0)[0]))
    bot = int(max(np.flatnonzero(med_r >= 0)[-1], np.flatnonzero(med_l >= 0)[-1]))
    r_a = int(top + HEART_TOP_FRAC * (bot - top))
    k = max(3, int(round(0.04 * (bot - top))) | 1)
    jump = max(3.0, 0.03 * fields.shape[1])
    mrd = np.full(fields.shape[0], -1.0)
    mld = np.full(fields.shape[0], -1.0)
    for arr, med, sgn, code in ((mrd, med_r, -1, 1), (mld, med_l, 1, 2)):
        valid = med >= 0
        dome = _dome(fields, code)
        r_end = dome[1] if dome is not None else fields.shape[0] - 1
        idx = np.flatnonzero(valid)
        if idx.size == 0:
            continue
        vals = np.where(valid, sgn * (med - mid), np.nan).astype(float)
        vals[~valid] = np.interp(np.flatnonzero(~valid), idx, vals[idx])
        smv = ndi.median_filter(vals, size=k, mode="nearest")
        prev = None
        for r in range(r_a, r_end + 1):
            if not valid[r]:
                if r > idx[-1]:
                    break
                continue
            if prev is not None and smv[r] - prev > jump:
                break
            arr[r] = smv[r]
            prev = smv[r]
    rows_r = np.flatnonzero(mrd >= 0)
    rows_l = np.flatnonzero(mld >= 0)
    if rows_r.size == 0 or rows_l.size == 0:
        return out, notes + ["the heart borders could not be traced"]
    rr = int(rows_r[np.argmax(mrd[rows_r])])
    rl = int(rows_l[np.argmax(mld[rows_l])])
    right_col = mid - mrd[rr]
    left_col = mid + mld[rl]
    if mrd[rr] > HEART_RIGHT_MAX * max(mld[rl], 1.0):
        return out, notes + [f"the heart's right border was traced {mrd[rr] / max(mld[rl], 1.0):.2f} times as far from "
                             "the midline as its left border (it is about half as far): that border is probably the "
                             "hilum or the lung field's edge, not the heart, so the cardiothoracic ratio is not reported"]
    hw = float(left_col - right_col + 1)
    heart_top = r_a
    heart_bot = int(min(bot, max(rr, rl) + 0.25 * (bot - top)))
    out["heart"] = {"right": [float(right_col), rr], "left": [float(left_col), rl], "width": hw,
                    "box": [int(right_col), heart_top, int(left_col), heart_bot]}
    out["ctr"] = hw / max(out["thorax"]["width"], 1)
    out["midline"] = mid
    return out, notes


def _costophrenic(fields: np.ndarray, code: int, px_per_mm: float) -> dict[str, Any] | None:
    m = fields == code
    rr, cc = np.nonzero(m)
    if rr.size == 0:
        return None
    side = "right" if code == 1 else "left"
    score = rr - cc if code == 1 else rr + cc
    i = int(np.argmax(score))
    pr, pc = int(rr[i]), int(cc[i])
    med, lat = _medial_lateral(fields, code)
    reach = max(6, int(round(25.0 * px_per_mm)))  # ~25 mm
    # lateral border above the corner: (row, lateral col)
    rows = np.arange(max(0, pr - reach), pr)
    rows = rows[lat[rows] >= 0]
    # diaphragm contour medial to the corner: per column, the field's lowest row
    colsel = np.arange(pc + 1, min(fields.shape[1], pc + reach)) if code == 1 else np.arange(max(0, pc - reach), pc)
    low = np.array([np.flatnonzero(m[:, c])[-1] if m[:, c].any() else -1 for c in colsel], dtype=float)
    ok = low >= 0
    angle = None
    if rows.size >= 3 and ok.sum() >= 3:
        a1 = np.polyfit(rows.astype(float), lat[rows].astype(float), 1)  # col = a*row + b
        v1 = np.array([-1.0, -a1[0]])  # (drow, dcol) going up the lateral wall
        a2 = np.polyfit(colsel[ok].astype(float), low[ok], 1)  # row = a*col + b
        dc = 1.0 if code == 1 else -1.0
        v2 = np.array([a2[0] * dc, dc])  # going medially along the diaphragm
        cosang = float(v1 @ v2 / (np.linalg.norm(v1) * np.linalg.norm(v2)))
        angle = float(np.degrees(np.arccos(np.clip(cosang, -1.0, 1.0))))
    return {"side": side, "point": [pc, pr], "angle_deg": angle,
            "blunted": bool(angle is not None and angle > CP_BLUNT_DEG)}


def _dome(fields: np.ndarray, code: int) -> list[int] | None:
    """[col, row] of the diaphragm's dome under one field: the highest point of the field's lower border
    over the middle 60 % of its columns, among the columns whose field reaches the lower half of the
    field's height (a column over the mediastinum or the heart, where the field stops high up beside the
    aortic knob or the hilum, has no diaphragm under it)."""
    m = fields == code
    cols = np.flatnonzero(m.any(axis=0))
    if cols.size < 5:
        return None
    rows = np.flatnonzero(m.any(axis=1))
    half = rows[0] + 0.5 * (rows[-1] - rows[0])
    c0, c1 = cols[0], cols[-1]
    span = c1 - c0
    sel = np.arange(int(c0 + 0.2 * span), int(c1 - 0.2 * span) + 1)
    bottoms = np.array([np.flatnonzero(m[:, c])[-1] if m[:, c].any() else -1 for c in sel])
    ok = bottoms >= half
    if not ok.any():
        return None
    sel, bottoms = sel[ok], bottoms[ok]
    j = int(np.argmin(bottoms))
    return [int(sel[j]), int(bottoms[j])]


def _trachea_box(sm: np.ndarray, fields: np.ndarray, mid: int) -> list[int] | None:
    h, w = sm.shape
    rows = np.flatnonzero((fields > 0).any(axis=1))
    if rows.size == 0:
        return None
    top, bot = int(rows[0]), int(rows[-1])
    r1 = int(top + 0.35 * (bot - top))
    half = max(4, int(0.06 * w))
    c0, c1 = max(0, mid - half), min(w, mid + half + 1)
    band = sm[max(0, top - int(0.05 * h)):r1, c0:c1].mean(axis=0)
    if band.size < 5:
        return None
    band = ndi.uniform_filter1d(band, 3)
    j = int(np.argmin(band))
    depth = float(band.max() - band[j])
    if depth <= 0:
        return None
    half_level = band[j] + 0.5 * depth
    lo = j
    while lo > 0 and band[lo - 1] < half_level:
        lo -= 1
    hi = j
    while hi < band.size - 1 and band[hi + 1] < half_level:
        hi += 1
    return [c0 + lo, max(0, top - int(0.05 * h)), c0 + hi, r1]


# ----------------------------------------------------------------------------------------------
# rounded opacities


def _line_footprint(length: float, theta: float) -> np.ndarray:
    from skimage.draw import line as sk_line

    h = 0.5 * length
    n = int(math.ceil(h)) + 1
    dx, dy = h * math.cos(theta), h * math.sin(theta)
    fp = np.zeros((2 * n + 1, 2 * n + 1), dtype=bool)
    rr, cc = sk_line(int(round(n - dy)), int(round(n - dx)), int(round(n + dy)), int(round(n + dx)))
    fp[rr, cc] = True
    return fp


def _line_residual(img: np.ndarray, length_px: float, n_dir: int = 12) -> np.ndarray:
    """Image minus its largest grey opening by a line of ``length_px`` over ``n_dir`` orientations: what
    remains is bright and shorter than the line in every direction (the lungs' small-scale texture of
    vessel crossings and noise), while ribs, vessels and edges, which contain such a line, are flattened."""
    b: np.ndarray | None = None
    for th in np.arange(n_dir) * np.pi / n_dir:
        o = ndi.grey_opening(img, footprint=_line_footprint(length_px, float(th)))
        b = o if b is None else np.maximum(b, o)
    assert b is not None
    return img - b


def _fit_radii(px_per_mm: float, lo_mm: float = MIN_OPACITY_MM, hi_mm: float = MAX_FIT_MM) -> list[float]:
    radii: list[float] = []
    rad = 0.5 * lo_mm * px_per_mm
    while rad <= 0.5 * hi_mm * px_per_mm:
        radii.append(rad)
        rad *= FIT_STEP
    return radii


def _sphere_fit_maps(img: np.ndarray, allow: np.ndarray, rad: float) -> dict[str, np.ndarray]:
    """Dense least-squares fit, at every pixel, of a projected sphere of radius ``rad`` (working px) on a
    sloping local background: ``y = b0 + b1 u + b2 v + A sqrt(1 - u^2 - v^2)`` with (u, v) the offset
    from the pixel in units of ``rad``, over the ``allow`` pixels (the lung fields) within ``FIT_WINDOW``
    radii. The model is linear, so its normal equations are correlations of the mask and of the masked
    image with fixed kernels (FFT); a bright mediastinum, chest wall or diaphragm next to an opacity is
    outside the mask and neither hides it nor passes for it. Returns maps of the contrast ``A``, the
    residual RMS ``sigma`` (the local texture: vessels, ribs, noise), ``t = A / se(A)`` and ``valid``
    (centre in the mask, ``FIT_CORE_FRAC`` of the disk in it)."""
    from scipy.signal import fftconvolve

    n = int(math.ceil(FIT_WINDOW * rad))
    yy, xx = np.mgrid[-n:n + 1, -n:n + 1].astype(np.float64)
    u, v = yy / rad, xx / rad
    d2 = u * u + v * v
    win = (d2 <= FIT_WINDOW ** 2).astype(np.float64)
    disk = (d2 <= 1.0).astype(np.float64)
    s = np.sqrt(np.clip(1.0 - d2, 0.0, None))
    m = allow.astype(np.float64)
    y = img.astype(np.float64) * m

    def corr(a: np.ndarray, k: np.ndarray) -> np.ndarray:  # sum_q a(p + q) k(q)
        return np.asarray(fftconvolve(a, k[::-1, ::-1], mode="same"))

    basis = [win, win * u, win * v, win * s]
    xtx = np.empty(img.shape + (4, 4))
    for i in range(4):
        for j in range(i, 4):
            xtx[..., i, j] = xtx[..., j, i] = corr(m, basis[i] * basis[j])
    xty = np.stack([corr(y, b) for b in basis], axis=-1)
    yty = corr(y * img, win)
    npx = xtx[..., 0, 0]
    ncore = corr(m, disk)
    valid = (npx >= 20) & (ncore >= FIT_CORE_FRAC * disk.sum()) & allow
    out_a = np.zeros(img.shape)
    out_sig = np.full(img.shape, np.inf)
    out_t = np.zeros(img.shape)
    idx = np.flatnonzero(valid.ravel())
    if idx.size:
        a = xtx.reshape(-1, 4, 4)[idx] + np.eye(4) * 1e-9
        b = xty.reshape(-1, 4)[idx]
        inv = np.linalg.pinv(a)
        beta = np.einsum("nij,nj->ni", inv, b)
        rss = np.clip(yty.ravel()[idx] - np.einsum("ni,ni->n", beta, b), 0.0, None)
        sig = np.sqrt(rss / np.maximum(npx.ravel()[idx] - 4.0, 1.0)) + 1e-6
        out_a.ravel()[idx] = beta[:, 3]
        out_sig.ravel()[idx] = sig
        out_t.ravel()[idx] = beta[:, 3] / (sig * np.sqrt(np.clip(inv[:, 3, 3], 1e-12, None)))
    return {"A": out_a, "sigma": out_sig, "t": out_t, "valid": valid}


def _local_fit(img: np.ndarray, allow: np.ndarray, row: float, col: float, rad: float,
               window: float | None = None) -> dict[str, Any] | None:
    """The fit of :func:`_sphere_fit_maps` at one point (sub-pixel centre and any radius allowed), with shape
    tests on the background-subtracted window: ``sec_*`` (per angular sector, the mean over the annulus
    1.3-2.0 radii in units of A: vessels or ribs running out of a spot leave bright sectors, a vessel
    tree or the hilum bright surroundings, a nodule's surroundings are flat) and ``elong`` (second
    moments of the positive part of the core). ``window``: the fit's radius in px (default
    ``FIT_WINDOW`` radii; fixed when radii are compared by their residual)."""
    h, w = img.shape
    win_px = FIT_WINDOW * rad if window is None else window
    n = int(math.ceil(max(win_px, 2.0 * rad))) + 1
    r0, r1 = max(0, int(round(row)) - n), min(h, int(round(row)) + n + 1)
    c0, c1 = max(0, int(round(col)) - n), min(w, int(round(col)) + n + 1)
    if r1 - r0 < 3 or c1 - c0 < 3:
        return None
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    u, v = (yy - row) / rad, (xx - col) / rad
    d2 = u * u + v * v
    roi = img[r0:r1, c0:c1].astype(np.float64)
    al = allow[r0:r1, c0:c1]
    m = al & (d2 * rad * rad <= win_px * win_px)
    if m.sum() < 20:
        return None
    s = np.sqrt(np.clip(1.0 - d2, 0.0, None))
    x = np.stack([np.ones(int(m.sum())), u[m], v[m], s[m]], axis=1)
    y = roi[m]
    inv = np.linalg.pinv(x.T @ x + np.eye(4) * 1e-9)
    beta = inv @ (x.T @ y)
    res = y - x @ beta
    sig = math.sqrt(float(res @ res) / max(1, y.size - 4)) + 1e-6
    a = float(beta[3])
    if a <= 0:
        return None
    patch = roi - (beta[0] + beta[1] * u + beta[2] * v)  # the opacity plus texture, background removed
    ring = al & (d2 >= 1.3 ** 2) & (d2 <= 2.0 ** 2)
    sec = np.floor((np.arctan2(u, v) + np.pi) / (2 * np.pi) * N_SECTORS).astype(int) % N_SECTORS
    vals = sorted((float(patch[ring & (sec == k)].mean()) / a for k in range(N_SECTORS)
                   if int((ring & (sec == k)).sum()) >= 2), reverse=True)
    core = al & (d2 <= 1.2 ** 2)
    wgt = np.clip(patch, 0.0, None) * core
    tot = float(wgt.sum())
    elong = 4.0
    if tot > 0:
        cy, cx = float((wgt * yy).sum() / tot), float((wgt * xx).sum() / tot)
        cyy, cxx = float((wgt * (yy - cy) ** 2).sum() / tot), float((wgt * (xx - cx) ** 2).sum() / tot)
        cxy = float((wgt * (yy - cy) * (xx - cx)).sum() / tot)
        ev = np.clip(np.linalg.eigvalsh(np.array([[cyy, cxy], [cxy, cxx]])), 1e-6, None)
        elong = min(4.0, float(math.sqrt(ev[1] / ev[0])))
    return {"A": a, "sigma": sig, "t": a / (sig * math.sqrt(max(float(inv[3, 3]), 1e-12))),
            "sec_max": vals[0] if vals else 1.0, "sec_2": vals[1] if len(vals) > 1 else 1.0,
            "sec_mean": float(np.mean(vals)) if vals else 1.0, "elong": elong, "rss": float(res @ res)}


def _band_evidence(img: np.ndarray, allow: np.ndarray, row: float, col: float, rad: float) -> dict[str, float]:
    """Sphere versus line structures at a spot: the window of :func:`_local_fit` is explained (least squares,
    sloping background) either by the projected sphere or by one or two straight bands through the spot
    (a projected cylinder's profile, ``N_BAND_DIR`` orientations, half-widths ``BAND_WIDTHS`` radii: ribs
    and vessels, and the bright crossing of two of them that a blob detector takes for a nodule). Returns
    ``llr_band``: log(RSS of the best band model / RSS of the sphere model), > 0 when the sphere explains
    the window better, and ``t_given_bands``: the sphere's t when the best pair of bands is fitted with it."""
    h, w = img.shape
    n = int(math.ceil(FIT_WINDOW * rad)) + 1
    r0, r1 = max(0, int(round(row)) - n), min(h, int(round(row)) + n + 1)
    c0, c1 = max(0, int(round(col)) - n), min(w, int(round(col)) + n + 1)
    yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    u, v = (yy - row) / rad, (xx - col) / rad
    m = allow[r0:r1, c0:c1] & (u * u + v * v <= FIT_WINDOW ** 2)
    if int(m.sum()) < 30:
        return {"llr_band": 0.0, "t_given_bands": 0.0}
    y = img[r0:r1, c0:c1].astype(np.float64)[m]
    uu, vv = u[m], v[m]
    cols = [np.ones_like(uu), uu, vv, np.sqrt(np.clip(1.0 - uu * uu - vv * vv, 0.0, None))]
    for k in range(N_BAND_DIR):
        th = k * math.pi / N_BAND_DIR
        dist = np.abs(-math.sin(th) * uu + math.cos(th) * vv)
        cols += [np.sqrt(np.clip(1.0 - (dist / wf) ** 2, 0.0, None)) for wf in BAND_WIDTHS]
    x = np.column_stack(cols)
    g, b, yty = x.T @ x, x.T @ y, float(y @ y)
    nb = len(cols) - 4

    def fits(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # batched least squares
        gs = g[idx[:, :, None], idx[:, None, :]]
        gs = gs + np.eye(idx.shape[1])[None] * (1e-9 + 1e-7 * np.trace(gs, axis1=1, axis2=2)[:, None, None])
        bs = b[idx]
        beta = np.linalg.solve(gs, bs[..., None])[..., 0]
        return beta, np.maximum(yty - np.einsum("pk,pk->p", beta, bs), 1e-12), gs

    ii, jj = np.triu_indices(nb, 1)
    bg = np.tile(np.arange(3), (ii.size, 1))
    _, rss_sph, _ = fits(np.array([[0, 1, 2, 3]]))
    singles = np.column_stack([np.tile(np.arange(3), (nb, 1)), 4 + np.arange(nb)])
    _, rss_1, _ = fits(singles)
    _, rss_2, _ = fits(np.column_stack([bg, 4 + ii, 4 + jj]))
    beta, rss_f, gs = fits(np.column_stack([bg, np.full(ii.size, 3), 4 + ii, 4 + jj]))
    j = int(np.argmin(rss_f))
    sig = math.sqrt(float(rss_f[j]) / max(1, y.size - 6))
    se = sig * math.sqrt(max(float(np.linalg.inv(gs[j])[3, 3]), 1e-12))
    rss_band = min(float(rss_1.min()), float(rss_2.min()))
    return {"llr_band": math.log(rss_band / float(rss_sph[0])), "t_given_bands": float(beta[j, 3]) / se}


def _ridge_evidence(img: np.ndarray, allow: np.ndarray, row: float, col: float, rad: float, a: float
                    ) -> dict[str, float]:
    """Branches leaving a spot (vessels, seen end-on or crossing, sit on a tree; a nodule sits in the lung's
    plain texture): along each of ``N_RAYS`` rays from the centre, 8 points from ``RAY_SPAN[0]`` to
    ``RAY_SPAN[1]`` radii, the image on the ray minus the mean of its two sides (half a radius, >= 1.5 px,
    either side): a ridge along the ray. Lung pixels only (all three samples of a point inside ``allow``; a
    ray with fewer than 3 such points counts as none). Returns ``ridge_n``: the number of rays whose mean
    ridge exceeds ``RIDGE_MIN`` of the spot's contrast ``a``."""
    th = np.arange(N_RAYS) * 2.0 * np.pi / N_RAYS
    ds = np.linspace(RAY_SPAN[0], RAY_SPAN[1], 8) * rad
    w = max(1.5, 0.5 * rad)
    ct, st = np.cos(th)[:, None], np.sin(th)[:, None]
    pr, pc = row + ds[None, :] * st, col + ds[None, :] * ct
    lr, lc = -ct * w, st * w  # the side offset (rows, cols), perpendicular to the ray

    def sample(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.asarray(ndi.map_coordinates(img, [r.ravel(), c.ravel()], order=1, mode="nearest")).reshape(r.shape)

    def inside(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        ri = np.clip(np.round(r).astype(int), 0, img.shape[0] - 1)
        ci = np.clip(np.round(c).astype(int), 0, img.shape[1] - 1)
        return allow[ri, ci]

    ok = inside(pr, pc) & inside(pr + lr, pc + lc) & inside(pr - lr, pc - lc)
    ridge = sample(pr, pc) - 0.5 * (sample(pr + lr, pc + lc) + sample(pr - lr, pc - lc))
    cnt = ok.sum(axis=1)
    mean = (ridge * ok).sum(axis=1) / np.maximum(cnt, 1)
    per_ray = np.where(cnt >= 3, mean, 0.0) / max(a, 1e-6)
    return {"ridge_n": float((per_ray > RIDGE_MIN).sum())}


_NO_STATS = {"log_t": 0.0, "log_a": 0.0, "log_as": 0.0}


def _film_stats(fits: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over one film's fitted spots (nearly all of them background texture) of log t, log A and
    log(A / sigma): the film's own null level, against which a spot's prominence is measured (films differ
    in exposure, processing and texture, so an absolute contrast does not transfer between films)."""
    if not fits:
        return dict(_NO_STATS)
    return {"log_t": float(np.median([math.log(max(f["t"], 1.0)) for f in fits])),
            "log_a": float(np.median([math.log(max(f["A"], 1e-4)) for f in fits])),
            "log_as": float(np.median([math.log(max(f["A"], 1e-4) / f["sigma"]) for f in fits]))}


def _opacity_features(fit: dict[str, Any], rad: float, px_per_mm: float, noise: float,
                      stats: dict[str, float]) -> dict[str, float]:
    """The scorer's inputs for one fitted spot (see ``OPACITY_WEIGHTS``)."""
    log_t = math.log(max(fit["t"], 1.0))
    log_a = math.log(max(fit["A"], 1e-4))
    t_b = float(fit.get("t_given_bands", 0.0))
    return {"log_t": log_t, "log_a_noise": log_a - math.log(max(noise, 1e-6)),
            "log_a_sigma": log_a - math.log(fit["sigma"]), "log_d_mm": math.log(2.0 * rad / px_per_mm),
            "sec_max": fit["sec_max"], "sec_2": fit["sec_2"], "sec_mean": fit["sec_mean"], "elong": fit["elong"],
            "rel_t": log_t - stats["log_t"], "rel_a": log_a - stats["log_a"],
            "rel_as": log_a - math.log(fit["sigma"]) - stats["log_as"],
            "llr_band": float(fit.get("llr_band", 0.0)), "t_bands": math.copysign(math.log1p(abs(t_b)), t_b),
            "ridge_n": float(fit.get("ridge_n", 0.0))}


def _opacity_score(fit: dict[str, Any], rad: float, px_per_mm: float, noise: float,
                   stats: dict[str, float] | None = None) -> float:
    """Log-odds that a fitted spot is an opacity (logistic model over the fit's features, see
    ``OPACITY_WEIGHTS``)."""
    feats = _opacity_features(fit, rad, px_per_mm, noise, stats or _NO_STATS)
    return OPACITY_BIAS + sum(w * feats[k] for k, w in OPACITY_WEIGHTS.items())


def _disk_inside_frac(allow: np.ndarray, row: float, col: float, rad: float) -> float:
    """The fraction of the disk (centre (row, col), radius ``rad`` px) that lies in ``allow``."""
    h, w = allow.shape
    ri = int(math.ceil(rad)) + 1
    r0, c0 = int(round(row)) - ri, int(round(col)) - ri
    yy, xx = np.mgrid[r0:r0 + 2 * ri + 1, c0:c0 + 2 * ri + 1]
    disk = (yy - row) ** 2 + (xx - col) ** 2 <= rad * rad
    ok = disk & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    n = int(disk.sum())
    return float(allow[yy[ok], xx[ok]].sum()) / n if n else 0.0


def _refine_fit(img: np.ndarray, allow: np.ndarray, row: float, col: float, rad: float
                ) -> tuple[float, float, float]:
    """Sub-pixel centre and continuous radius: least squares of the projected-sphere model over a fixed
    window (``FIT_WINDOW`` detection radii), Nelder-Mead from the detection's grid point with the centre
    kept within half a radius and the radius within ``SIZE_RANGE`` of the grid's, and ``FIT_CORE_FRAC`` of
    the disk in ``allow`` as the detection required: the fit sees lung pixels only, so nothing held a sphere
    on a field's border back from sliding out of the field and swelling over the wall or mediastinum there
    (a 17 mm nodule of seed 79 over the mediastinum was sized 31 mm on one film and called grown; on seeds
    40-79 the mean diameter error of the found opacities went from 1.43 to 1.23 mm, on 110-139 from 1.18 to 1.23)."""
    from scipy.optimize import minimize

    win = FIT_WINDOW * rad
    lo_r, hi_r = SIZE_RANGE[0] * rad, SIZE_RANGE[1] * rad

    def cost(p: np.ndarray) -> float:
        if math.hypot(p[0] - row, p[1] - col) > 0.5 * p[2] or not lo_r <= p[2] <= hi_r:
            return 1e9
        if _disk_inside_frac(allow, float(p[0]), float(p[1]), float(p[2])) < FIT_CORE_FRAC:
            return 1e9
        f = _local_fit(img, allow, float(p[0]), float(p[1]), float(p[2]), window=win)
        return 1e9 if f is None else f["rss"]

    try:
        r = minimize(cost, np.array([row, col, rad]), method="Nelder-Mead",
                     options={"xatol": 0.05, "fatol": 1e-9, "maxiter": 120,
                              "initial_simplex": np.array([[row, col, rad], [row + 0.5, col, rad],
                                                           [row, col + 0.5, rad], [row, col, rad * 1.1]])})
        if r.fun < 1e8:
            return float(r.x[0]), float(r.x[1]), float(r.x[2])
    except Exception as e:  # keep the grid point
        log.debug("opacity refinement failed: %s", e)
    return row, col, rad


def _opacity_candidates(img: np.ndarray, fields: np.ndarray, px_per_mm: float
                        ) -> tuple[list[dict[str, Any]], np.ndarray, float, dict[str, float]]:
    """Rounded opacities: dense projected-sphere fits (:func:`_sphere_fit_maps`) over ``FIT_STEP``-spaced
    radii inside the lung fields; local maxima of ``t`` at each radius, suppressed across radii (the
    highest t wins within the larger radius), the best ``MAX_PEAKS`` scored by :func:`_opacity_score`.
    ``img``: the film's fit image (:func:`_fit_image`)."""
    lung = fields > 0
    if not lung.any():
        return [], np.zeros_like(img), 1.0, dict(_NO_STATS)
    allow = lung
    res_s = _line_residual(img, max(7.0, LINE_MM * px_per_mm))
    noise = float(np.sqrt(np.mean(res_s[lung] ** 2))) + 1e-6
    peaks: list[dict[str, Any]] = []
    for rad in _fit_radii(px_per_mm):
        mp = _sphere_fit_maps(img, allow, rad)
        t = mp["t"]
        pk = (t == ndi.maximum_filter(t, size=max(3, int(rad) | 1))) & mp["valid"] & (t > 3.0) & (mp["A"] > 0)
        for rr, cc in np.argwhere(pk):
            peaks.append({"row": float(rr), "col": float(cc), "radius": rad, "t": float(t[rr, cc])})
    peaks.sort(key=lambda c: -c["t"])
    kept: list[dict[str, Any]] = []
    for c in peaks:
        if any(math.hypot(c["row"] - k["row"], c["col"] - k["col"]) < max(c["radius"], k["radius"]) for k in kept):
            continue
        kept.append(c)
        if len(kept) >= MAX_PEAKS:
            break
    out: list[dict[str, Any]] = []
    for c in kept:
        fit = _local_fit(img, allow, c["row"], c["col"], c["radius"])
        if fit is None:
            continue
        fit.update(_band_evidence(img, allow, c["row"], c["col"], c["radius"]))
        fit.update(_ridge_evidence(img, allow, c["row"], c["col"], c["radius"], fit["A"]))
        ri, ci = int(round(c["row"])), int(round(c["col"]))
        out.append({**c, "fit": fit, "in_field": bool(lung[ri, ci]), "z_contrast": fit["A"] / noise})
    stats = _film_stats([c["fit"] for c in out])
    for c in out:
        c["score"] = _opacity_score(c["fit"], c["radius"], px_per_mm, noise, stats)
        c["conf"] = 1.0 / (1.0 + math.exp(-c["score"]))
    out.sort(key=lambda c: -c["conf"])
    return out, res_s, noise, stats


def _opacity_seg(img: np.ndarray, allow: np.ndarray, c: dict[str, Any], px_per_mm: float) -> dict[str, Any]:
    """Outline and size of a reported opacity from its refined fit: the fitted circle (a projected sphere's
    silhouette), long/short axes from the elongation of its core."""
    row, col, rad = _refine_fit(img, allow, c["row"], c["col"], c["radius"])
    fit = _local_fit(img, allow, row, col, rad) or c["fit"]
    k = math.sqrt(max(1.0, min(fit["elong"], 1.5)))
    ri = int(math.ceil(rad)) + 1
    yy, xx = np.mgrid[-ri:ri + 1, -ri:ri + 1]
    r0, c0 = int(round(row)) - ri, int(round(col)) - ri
    mask = (yy + round(row) - row) ** 2 + (xx + round(col) - col) ** 2 <= rad * rad  # index i is row i + r0
    return {"row": row, "col": col, "diam": 2.0 * rad, "long": 2.0 * rad * k, "short": 2.0 * rad / k,
            "mask": mask, "offset": (r0, c0), "contrast": fit["A"], "fit": fit}


def _lateral_distance(fields: np.ndarray) -> np.ndarray:
    """Distance (working px) of each pixel from the lateral border of its field (0 outside the fields)."""
    out = np.zeros(fields.shape, dtype=np.float32)
    w = fields.shape[1]
    cols = np.arange(w)[None, :].astype(np.float32)
    for code in (1, 2):
        med, lat = _medial_lateral(fields, code)
        latc = lat.astype(np.float32)[:, None]
        d = (cols - latc) if code == 1 else (latc - cols)
        m = (fields == code) & (lat[:, None] >= 0)
        out[m] = np.maximum(d, 0)[m]
    return out


# ----------------------------------------------------------------------------------------------
# analysis


def _side_zone(an_fields: np.ndarray, boxes: dict[str, list[int]], row_w: float, col_w: float, f: int,
               mid_w: int) -> tuple[str | None, str | None]:
    h, w = an_fields.shape
    ri, ci = int(np.clip(round(row_w), 0, h - 1)), int(np.clip(round(col_w), 0, w - 1))
    code = int(an_fields[ri, ci])
    if code == 0:
        # nearest field
        d = ndi.distance_transform_edt(an_fields == 0, return_distances=False, return_indices=True)
        code = int(an_fields[d[0][ri, ci], d[1][ri, ci]])
    side = "right" if code == 1 else ("left" if code == 2 else ("right" if col_w < mid_w else "left"))
    box = boxes.get(f"{side} lung")
    zone = _zone_of_row(row_w * f + (f - 1) / 2.0, box) if box else None
    return side, zone


def heart_side_bias(work: np.ndarray, fields: np.ndarray, mid: int) -> float | None:
    """Mean brightness just right of the midline minus just left of it, over the lower part of the lung
    fields (the cardiac bulk): positive on a PA film in standard display (heart on the image right)."""
    rows = np.flatnonzero((fields > 0).any(axis=1))
    if rows.size < 10:
        return None
    top, bot = int(rows[0]), int(rows[-1])
    r0, r1 = int(top + 0.55 * (bot - top)), int(top + 0.85 * (bot - top))
    w = max(4, int(0.2 * work.shape[1]))
    off = max(2, int(0.03 * work.shape[1]))  # skip the spine itself
    left_img = work[r0:r1, max(0, mid - off - w):mid - off]
    right_img = work[r0:r1, mid + off:mid + off + w]
    if left_img.size == 0 or right_img.size == 0:
        return None
    return float(right_img.mean() - left_img.mean())


# BodyPartExamined words of a chest film, and words that name another part (a film labelled so is not read)
_CHEST_WORDS = ("CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "TORAX", "CXR", "PECHO", "BRUST", "THORAKS")
_OTHER_PARTS = ("EXTREMITY", "SKULL", "HEAD", "BRAIN", "NECK", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE",
                "ABDOMEN", "PELVIS", "HIP", "SHOULDER", "CLAVICLE", "SCAPULA", "ARM", "HUMERUS", "ELBOW", "FOREARM",
                "WRIST", "HAND", "FINGER", "THUMB", "LEG", "FEMUR", "KNEE", "PATELLA", "TIBIA", "FIBULA", "ANKLE",
                "FOOT", "HEEL", "TOE", "BREAST", "JAW", "MANDIBLE", "SINUS", "ORBIT", "FACE", "NOSE", "TMJ",
                "SACRUM", "COCCYX", "DENTAL", "TOOTH")


def check_chest_label(series: Series) -> None:
    """Refuse a film whose header names a body part other than the chest (BodyPartExamined): the lung
    fields, heart and opacities would be read into a knee or a hand. An empty or unfamiliar label passes
    (PNG films have none); the image itself is checked by :func:`_check_chest_fields`."""
    import re

    part = str((series.header or {}).get("BodyPartExamined", "") or "").strip()
    words = [w for w in re.split(r"[^A-Z]+", part.upper()) if w]
    if not words or any(w in _CHEST_WORDS for w in words):
        return
    if any(w in _OTHER_PARTS for w in words):
        raise UnsupportedError(
            f"This film is labelled as an image of the {part.lower()} (DICOM BodyPartExamined), not the chest. The "
            "radiograph tools read frontal chest films only (lung fields, heart, opacities), so nothing was measured. "
            "If the label is wrong, correct it at the modality or in the PACS and load the film again.")


def _check_chest_fields(fields: np.ndarray) -> None:
    """Refuse an image with no plausible lung fields: none found, or a 'field' running from the film's top
    edge to its bottom edge (a lung has an apex and a diaphragm below it, inside any chest film; the dark
    background beside a limb does not)."""
    if not (fields > 0).any():
        raise UnsupportedError(
            "No lung fields were found on this image, so it does not look like a frontal chest film (PA or AP). "
            "The radiograph tools read frontal chest films only; nothing was measured.")
    h = fields.shape[0]
    for code, side in ((1, "right"), (2, "left")):
        rows = np.flatnonzero((fields == code).any(axis=1))
        if rows.size and rows[0] == 0 and rows[-1] == h - 1:
            raise UnsupportedError(
                f"The dark region taken for the {side} lung field runs from the top edge of the image to its bottom "
                "edge, with no lung apex or diaphragm: this does not look like a frontal chest film. The radiograph "
                "tools read frontal chest films only; nothing was measured.")


def _analyze(series: Series) -> RadiographAnalysis:
    t0 = time.perf_counter()
    notes: list[str] = []
    check_chest_label(series)
    work, f = _work_image(series)
    full_shape = (int(series.pixels.shape[1]), int(series.pixels.shape[2]))
    spacing = (float(series.spacing[0]), float(series.spacing[1])) if series.spacing_known else None
    if spacing is None:
        notes.append("pixel spacing unknown: sizes and distances are in pixels")
    fields, mid, _ = _segment_fields(work, notes)
    _check_chest_fields(fields)
    boxes: dict[str, list[int]] = {}
    for code, side in ((1, "right"), (2, "left")):
        b = _bbox(fields == code)
        if b is None:
            continue
        fb = _full_box(b, f, full_shape)
        boxes[f"{side} lung"] = fb
        m = fields == code
        r0, r3 = b[1], b[3] + 1
        hh = (r3 - r0) / 3.0
        cuts = [r0, int(round(r0 + hh)), int(round(r0 + 2 * hh)), r3]
        for n, zone in enumerate(ZONES):
            sub = np.zeros_like(m)
            sub[cuts[n]:cuts[n + 1]] = m[cuts[n]:cuts[n + 1]]
            zb = _bbox(sub)
            if zb is not None:
                boxes[f"{side} {zone} zone"] = _full_box(zb, f, full_shape)
    lb = _bbox(fields > 0)
    if lb is not None:
        boxes["lungs"] = _full_box(lb, f, full_shape)
    # scale: working pixels per mm (known spacing, else assumed from the thorax width)
    geo, gnotes = _heart_and_thorax(fields, mid, f)
    notes += gnotes
    if spacing is not None:
        px_per_mm = 1.0 / (f * 0.5 * (spacing[0] + spacing[1]))
    elif "thorax" in geo:
        px_per_mm = geo["thorax"]["width"] / ASSUMED_THORAX_MM
    else:
        px_per_mm = work.shape[1] / 400.0
    ctr = None
    ctr_geo: dict[str, Any] = {}
    if "ctr" in geo and not 0.25 <= float(geo["ctr"]) <= 0.8:
        notes.append(f"the cardiothoracic ratio measured {float(geo['ctr']):.2f}, outside the plausible range: the "
                     "heart borders were not traced reliably, so it is not reported")
        geo.pop("ctr")
    if "ctr" in geo:
        ctr = float(geo["ctr"])
        hwid = geo["heart"]["width"] * f
        twid = geo["thorax"]["width"] * f
        ctr_geo = {
            "heart_width_px": round(hwid, 1), "thorax_width_px": round(twid, 1),
            "heart_width_mm": round(hwid * spacing[0], 1) if spacing else None,
            "thorax_width_mm": round(twid * spacing[0], 1) if spacing else None,
            "midline_col": mid * f + (f - 1) / 2.0,
            "thorax_line": [geo["thorax"]["cols"][0] * f, geo["thorax"]["row"] * f + (f - 1) / 2.0,
                            geo["thorax"]["cols"][1] * f + f - 1, geo["thorax"]["row"] * f + (f - 1) / 2.0],
            "heart_right_line": [geo["heart"]["right"][0] * f, geo["heart"]["right"][1] * f + (f - 1) / 2.0,
                                 mid * f + (f - 1) / 2.0, geo["heart"]["right"][1] * f + (f - 1) / 2.0],
            "heart_left_line": [mid * f + (f - 1) / 2.0, geo["heart"]["left"][1] * f + (f - 1) / 2.0,
                                geo["heart"]["left"][0] * f + f - 1, geo["heart"]["left"][1] * f + (f - 1) / 2.0],
        }
        boxes["heart"] = _full_box(geo["heart"]["box"], f, full_shape)
    # mediastinum: between the fields' medial borders, apex to the lower heart
    med_r, _ = _medial_lateral(fields, 1)
    med_l, _ = _medial_lateral(fields, 2)
    both = np.flatnonzero((med_r >= 0) & (med_l >= 0))
    if both.size:
        y1 = boxes["heart"][3] // f if "heart" in boxes else int(both[-1])
        boxes["mediastinum"] = _full_box([int(med_r[both].min()) + 1, int(both[0]),
                                          int(med_l[both].max()) - 1, int(y1)], f, full_shape)
    sm = ndi.gaussian_filter(work, 1.5)
    tb = _trachea_box(sm, fields, mid)
    if tb is not None:
        boxes["trachea"] = _full_box(tb, f, full_shape)
    cps: dict[str, dict[str, Any]] = {}
    domes: dict[str, dict[str, Any]] = {}
    for code, side in ((1, "right"), (2, "left")):
        cp = _costophrenic(fields, code, px_per_mm)
        if cp is not None:
            cp["point_px"] = [cp["point"][0] * f + (f - 1) / 2.0, cp["point"][1] * f + (f - 1) / 2.0]
            cps[side] = cp
            if cp["blunted"]:
                notes.append(f"the {side} costophrenic angle looks blunted ({cp['angle_deg']:.0f} degrees)")
        d = _dome(fields, code)
        if d is not None:
            domes[side] = {"dome_px": [d[0] * f + (f - 1) / 2.0, d[1] * f + (f - 1) / 2.0]}
    # orientation sanity check: the heart bulk lies on the image right (patient's left) on a PA film
    side_bias = heart_side_bias(work, fields, mid)
    if side_bias is not None:
        if side_bias < -0.08:
            notes.append("the heart lies mostly on the image left: the film may be displayed mirrored (or "
                         "dextrocardia); sides are reported as displayed (patient's right on the image left)")
    img = _fit_image(work)
    cands, residual, res_noise, film_stats = _opacity_candidates(img, fields, px_per_mm)
    domain = fields > 0
    good = [c for c in cands if c["conf"] >= MIN_CONFIDENCE][:MAX_OPACITIES]
    for c in good:
        c["seg"] = _opacity_seg(img, domain, c, px_per_mm)
        c["diam_mm_est"] = c["seg"]["diam"] / px_per_mm
    good.sort(key=lambda c: -c["seg"]["diam"])
    opac = [_opacity_finding(series, c, n + 1, f, spacing, fields, boxes, mid) for n, c in enumerate(good)]
    rt = time.perf_counter() - t0
    log.info("radiograph %s: fields %s, CTR %s, %d candidates, %d opacities, %.2fs", series.series_uid[-8:],
             [k for k in boxes if k.endswith("lung")], None if ctr is None else round(ctr, 3), len(cands),
             len(opac), rt)
    dbg = [{k: v for k, v in c.items() if k not in ("seg", "fit")} | {k: v for k, v in c["fit"].items()}
           for c in cands[:MAX_PEAKS]]
    return RadiographAnalysis(series.series_uid, full_shape, f, spacing, work, fields, mid * f + (f - 1) / 2.0, boxes,
                              ctr, ctr_geo, cps, domes, opac, px_per_mm, rt, notes, dbg, residual, res_noise,
                              film_stats)


def _opacity_finding(series: Series, c: dict[str, Any], n: int, f: int, spacing: tuple[float, float] | None,
                     fields: np.ndarray, boxes: dict[str, list[int]], mid: int, fid: str | None = None) -> Finding:
    s = c["seg"]
    r_w, c_w = s["row"], s["col"]
    row, col = r_w * f + (f - 1) / 2.0, c_w * f + (f - 1) / 2.0
    ys, xs = np.nonzero(s["mask"])
    r0, c0 = s["offset"]
    box = [float((xs.min() + c0) * f), float((ys.min() + r0) * f), float((xs.max() + c0) * f + f - 1),
           float((ys.max() + r0) * f + f - 1)]
    long_px, short_px = s["long"] * f, s["short"] * f
    side, zone = _side_zone(fields, boxes, r_w, c_w, f, mid)
    if spacing is not None:
        sp = 0.5 * (spacing[0] + spacing[1])
        d, lo, sh, units = 0.5 * (long_px + short_px) * sp, long_px * sp, short_px * sp, "mm"
    else:
        d, lo, sh, units = 0.5 * (long_px + short_px), long_px, short_px, "px"
    d_mm_est = c["diam_mm_est"]
    kind = "mass" if d_mm_est >= MASS_MM else "nodule"
    region = vocab.zone_region(side, zone)
    center_mm = bbox_mm = None
    if spacing is not None:
        center_mm = [round(float(v), 2) for v in series.vox_to_mm([col, row, 0.0])]
        bbox_mm = series.box_vox_to_mm([box[0], box[1], 0, box[2], box[3], 0])
    label = f"rounded opacity ({kind})"
    return Finding(
        id=fid or f"F{n}", kind=kind, label=label, region=region, side=side, zone=zone,  # type: ignore[arg-type]
        center_mm=center_mm, bbox_mm=bbox_mm, bbox_px=[round(v, 1) for v in box],
        diameter_mm=round(d, 1), long_axis_mm=round(lo, 1), short_axis_mm=round(sh, 1),
        series_uid=series.series_uid, slice_index=0, confidence=round(float(c["conf"]), 3),
        units=units,  # type: ignore[arg-type]
        notes=[f"centre (col, row) = ({col:.0f}, {row:.0f}) px"] + ([] if spacing else ["size in pixels"]))


def analyze_radiograph(series: Series) -> RadiographAnalysis:
    """Lung fields, zones, heart, mediastinum, CTR, diaphragm, costophrenic angles and rounded opacities of
    a chest film; cached per series uid. Raises :class:`UnsupportedError` for a film of another body part
    (:func:`check_chest_label`, :func:`_check_chest_fields`)."""
    if not series.is_radiograph:
        raise UnsupportedError("This is not a radiograph (a single 2-D image); use the CT detector for volumes.")
    return CACHE.get_or_compute(f"radiograph:{series.cache_key}", lambda: _analyze(series))


def measure_at_px(series: Series, col: float, row: float, analysis: RadiographAnalysis | None = None,
                  search_mm: float = 10.0, keep_confidence: bool = False,
                  diameter_mm: float | None = None) -> Finding | None:
    """Re-measure the rounded opacity nearest the full-film pixel (col, row), within ``search_mm``: the same
    projected-sphere fits as the detection on a crop around the point, the best by ``t``; None when its
    opacity score is below ``REMEASURE_MIN_CONF`` (a second look at a known position: a lower bar than
    a detection). ``keep_confidence``: the finding keeps that score as its confidence (the verifier's
    re-measurements); by default a re-measurement carries none. ``diameter_mm``: the size already measured
    there (the film's units): only radii within ``SIZE_RANGE`` of it are fitted."""
    an = analysis or analyze_radiograph(series)
    f = an.factor
    r_w, c_w = (row - (f - 1) / 2.0) / f, (col - (f - 1) / 2.0) / f
    ppm = an.px_per_mm_est
    lung = an.fields > 0
    radii = _fit_radii(ppm)
    if diameter_mm:
        r_known = 0.5 * float(diameter_mm) * (ppm if an.spacing_mm is not None else 1.0 / f)
        radii = [r for r in radii if SIZE_RANGE[0] * r_known <= r <= SIZE_RANGE[1] * r_known] or radii
    search = max(2.0, search_mm * ppm)
    pad = int(math.ceil(search + FIT_WINDOW * radii[-1])) + 2
    h, w = lung.shape
    r0, r1 = max(0, int(r_w) - pad), min(h, int(r_w) + pad + 1)
    c0, c1 = max(0, int(c_w) - pad), min(w, int(c_w) + pad + 1)
    if r1 - r0 < 5 or c1 - c0 < 5 or not lung[r0:r1, c0:c1].any():
        return None
    img = an.fit_image
    yy, xx = np.mgrid[r0:r1, c0:c1]
    inside = (yy - r_w) ** 2 + (xx - c_w) ** 2 <= search * search
    best: tuple[float, float, float, float] | None = None
    for rad in radii:
        mp = _sphere_fit_maps(img[r0:r1, c0:c1], lung[r0:r1, c0:c1], rad)
        t = np.where(mp["valid"] & inside & (mp["A"] > 0), mp["t"], -np.inf)
        j = np.unravel_index(int(np.argmax(t)), t.shape)
        if np.isfinite(t[j]) and (best is None or t[j] > best[0]):
            best = (float(t[j]), float(j[0] + r0), float(j[1] + c0), rad)
    if best is None:
        return None
    _, pr, pc, rad = best
    fit = _local_fit(img, lung, pr, pc, rad)
    if fit is None:
        return None
    fit.update(_band_evidence(img, lung, pr, pc, rad))
    fit.update(_ridge_evidence(img, lung, pr, pc, rad, fit["A"]))
    score = _opacity_score(fit, rad, ppm, an.residual_rms, an.film_stats or None)
    conf = 1.0 / (1.0 + math.exp(-score))
    if conf < REMEASURE_MIN_CONF:
        return None
    cand: dict[str, Any] = {"row": pr, "col": pc, "radius": rad, "fit": fit, "conf": conf}
    cand["seg"] = _opacity_seg(img, lung, cand, ppm)
    cand["diam_mm_est"] = cand["seg"]["diam"] / ppm
    mid_w = int(round((an.midline_col - (f - 1) / 2.0) / f))
    fnd = _opacity_finding(series, cand, 1, f, an.spacing_mm, an.fields, an.boxes, mid_w, fid="M1")
    fnd.confidence = round(conf, 3) if keep_confidence else None
    return fnd


FILM_PERTURBATIONS = ("noise", "shift", "gamma", "blur")


def perturb_film(an: RadiographAnalysis, kind: str, rng: np.random.Generator
                 ) -> tuple[RadiographAnalysis, Any]:
    """A perturbed copy of a film's analysis, for a second look at its findings (the verifier): the working
    image changed as a repeat exposure or other processing might change it: quantum-like noise (half the
    film's own texture level), a shift of up to 2 working pixels (the fields move with it), a gamma of
    0.85-1.15 (exposure, processing curve) or a blur of 0.6 working pixel (another detector). Returns the copy
    and the map of a full-film point (col, row) onto the perturbed film."""
    import dataclasses

    work, fields = an.work, an.fields

    def same(col: float, row: float) -> tuple[float, float]:
        return col, row

    mapping: Any = same
    if kind == "noise":
        work = np.clip(work + rng.normal(0.0, 0.5 * an.residual_rms, work.shape), 0.0, 1.0).astype(np.float32)
    elif kind == "gamma":
        work = (np.clip(work, 0.0, 1.0) ** float(rng.uniform(0.85, 1.15))).astype(np.float32)
    elif kind == "blur":
        work = ndi.gaussian_filter(work, 0.6).astype(np.float32)
    elif kind == "shift":
        dy, dx = (float(v) for v in rng.uniform(-2.0, 2.0, 2))
        work = ndi.shift(work, (dy, dx), order=1, mode="nearest").astype(np.float32)
        fields = ndi.shift(fields, (round(dy), round(dx)), order=0, mode="constant", cval=0)
        fy, fx = dy * an.factor, dx * an.factor

        def mapping(col: float, row: float) -> tuple[float, float]:
            return col + fx, row + fy
    else:
        raise ValueError(f"unknown film perturbation {kind!r}")
    return dataclasses.replace(an, work=work, fields=fields, series_uid=f"{an.series_uid}~{kind}"), mapping


# ----------------------------------------------------------------------------------------------
# requests


def _center_px(f: Finding) -> tuple[float, float]:
    b = f.bbox_px or [0, 0, 0, 0]
    return 0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])


def _size_text(f: Finding) -> str:
    if f.diameter_mm is None:
        return ""
    u = f.units
    t = f"{f.diameter_mm:.1f} {u}"
    if f.long_axis_mm is not None and f.short_axis_mm is not None:
        t += f" ({f.long_axis_mm:.1f} x {f.short_axis_mm:.1f} {u})"
    return t


def _lesion_sentence(f: Finding) -> str:
    cx, cy = _center_px(f)
    return f"{f.id}: rounded {f.kind}, {_size_text(f)}, {f.region or 'lung'} (at x {cx:.0f}, y {cy:.0f} px)"


_ANATOMY_ORDER = ("lungs", "right lung", "left lung", "right upper zone", "right middle zone", "right lower zone",
                  "left upper zone", "left middle zone", "left lower zone", "heart", "mediastinum", "trachea")


def _anatomy_findings(series: Series, an: RadiographAnalysis, names: list[str], study_uid: str) -> list[Finding]:
    out: list[Finding] = []
    for name in names:
        b = an.boxes.get(name)
        if b is None:
            continue
        reg = vocab.BY_NAME.get(name)
        notes: list[str] = []
        if name == "heart" and an.ctr is not None:
            notes.append(_ctr_text(an))
        bbox_mm = center_mm = None
        if an.spacing_mm is not None:
            bbox_mm = series.box_vox_to_mm([b[0], b[1], 0, b[2], b[3], 0])
            center_mm = [round(float(v), 2) for v in series.vox_to_mm([0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3]), 0])]
        out.append(Finding(id=f"A{len(out) + 1}", kind="anatomy", label=name, region=name,
                           side=reg.side if reg else None, zone=reg.zone if reg else None,  # type: ignore[arg-type]
                           bbox_px=[float(v) for v in b], bbox_mm=bbox_mm, center_mm=center_mm,
                           study_uid=study_uid, series_uid=series.series_uid, slice_index=0,
                           units="mm" if an.spacing_mm else "px", notes=notes))
    return out


def _ctr_text(an: RadiographAnalysis) -> str:
    g = an.ctr_geometry
    if an.ctr is None:
        return "cardiothoracic ratio not measurable"
    if g.get("heart_width_mm") is not None:
        return (f"cardiothoracic ratio {an.ctr:.2f} (heart {g['heart_width_mm'] / 10:.1f} cm / thorax "
                f"{g['thorax_width_mm'] / 10:.1f} cm)")
    return (f"cardiothoracic ratio {an.ctr:.2f} (heart {g['heart_width_px']:.0f} px / thorax "
            f"{g['thorax_width_px']:.0f} px)")


def _box_to_px(series: Series, box: list[float]) -> list[float]:
    if len(box) == 4:
        return [float(v) for v in box]
    if len(box) == 6:
        if not series.spacing_known:
            raise UnsupportedError("This film has no pixel spacing, so a box in millimetres cannot be placed on it; "
                                   "give the box in pixels [x0, y0, x1, y1].")
        corners = np.array([[x, y, z] for x in (box[0], box[3]) for y in (box[1], box[4]) for z in (box[2], box[5])])
        v = series.mm_to_vox(corners)
        return [float(v[:, 0].min()), float(v[:, 1].min()), float(v[:, 0].max()), float(v[:, 1].max())]
    raise UnsupportedError("A box is [x0, y0, x1, y1] in pixels or [x0, y0, z0, x1, y1, z1] in mm.")


def _box_overlap_px(an: RadiographAnalysis, box: list[float]) -> list[tuple[str, float]]:
    """(region, fraction of the box it fills), largest first, from the lung fields' zones and the boxes."""
    f = an.factor
    x0, y0, x1, y1 = box
    c0, r0 = max(0, int(x0 // f)), max(0, int(y0 // f))
    c1, r1 = min(an.fields.shape[1] - 1, int(x1 // f)), min(an.fields.shape[0] - 1, int(y1 // f))
    if c1 < c0 or r1 < r0:
        return []
    area = float((c1 - c0 + 1) * (r1 - r0 + 1))
    out: list[tuple[str, float]] = []
    for code, side in ((1, "right"), (2, "left")):
        fb = an.boxes.get(f"{side} lung")
        if fb is None:
            continue
        cuts = zone_bounds(fb)
        m = an.fields[r0:r1 + 1, c0:c1 + 1] == code
        rows = (np.arange(r0, r1 + 1) * f + (f - 1) / 2.0)[:, None]
        for n, zone in enumerate(ZONES):
            sel = m & (rows >= cuts[n]) & (rows < cuts[n + 1])
            if sel.any():
                out.append((f"{side} {zone} zone", float(sel.sum()) / area))
    for name in ("heart", "mediastinum", "trachea"):
        b = an.boxes.get(name)
        if b is None:
            continue
        ix = max(0.0, min(x1, b[2]) - max(x0, b[0]))
        iy = max(0.0, min(y1, b[3]) - max(y0, b[1]))
        if ix * iy > 0:
            out.append((name, ix * iy / max((x1 - x0) * (y1 - y0), 1.0)))
    out.sort(key=lambda t: -t[1])
    return out


def run_radiograph_detector(study: Study, req: Any, box_px: list[float] | None = None) -> Any:
    """Answer a detection / anatomy / description request on a chest film (the CT detector's contract:
    ``tools.detector.DetectRequest`` in, ``DetectResult`` out). A box is taken from ``box_px`` (pixels
    [x0, y0, x1, y1]) or ``req.box_mm`` (4 values: pixels; 6 values: mm)."""
    from tools.detector import DetectResult

    series = study.primary
    if not series.is_radiograph:
        raise UnsupportedError("This study is not a radiograph; use the CT detector.")
    an = analyze_radiograph(series)
    notes = list(an.notes)
    regions = [r for r in (req.regions or []) if r]
    unknown = [r for r in regions if r not in vocab.BY_NAME]
    if unknown:
        notes.append("Unknown region(s) ignored: " + ", ".join(unknown))
        regions = [r for r in regions if r in vocab.BY_NAME]
    not_on_film = [r for r in regions if r in vocab.BY_NAME and "CR" not in vocab.BY_NAME[r].modalities]
    if not_on_film:
        notes.append("Not assessed on a radiograph: " + ", ".join(not_on_film))
        regions = [r for r in regions if r not in not_on_film]
    lesions = [o.model_copy(update={"study_uid": study.study_uid}) for o in an.opacities]
    kind = req.lesion_kind
    lesions_k = [o for o in lesions if o.kind == "mass"] if kind == "mass" else lesions
    word = {"mass": "mass", "opacity": "rounded opacity", "nodule": "nodule"}.get(kind or "nodule", "nodule")
    findings: list[Finding] = []
    lines: list[str] = []
    measured = [_ctr_text(an)]
    box = box_px if box_px is not None else (getattr(req, "box_px", None) or req.box_mm)
    if box is not None:
        bpx = _box_to_px(series, list(box))
        ov = _box_overlap_px(an, bpx)
        parts = [f"{n} ({100 * fb:.0f}% of the box)" for n, fb in ov if fb >= 0.01]
        covered = ", ".join(parts) if parts else "no lung field or mediastinal structure"
        lines.append(f"The box covers {covered}.")
        inside = [o for o in lesions_k if bpx[0] <= _center_px(o)[0] <= bpx[2] and bpx[1] <= _center_px(o)[1] <= bpx[3]]
        if inside:
            lines.append("Inside it: " + "; ".join(_lesion_sentence(o) for o in inside) + ".")
        else:
            lines.append(f"No {word} found inside the box.")
        names = [n for n, fb in ov if fb >= 0.01]
        findings = inside + _anatomy_findings(series, an, names, study.study_uid)
    elif req.want in ("anatomy", "describe"):
        names = regions or [n for n in _ANATOMY_ORDER]
        if "body" in names:
            names = [n for n in _ANATOMY_ORDER]
        for name in names:
            if name not in an.boxes:
                lines.append(f"The {name} was not found on this film.")
                continue
            b = an.boxes[name]
            u = "px"
            if an.spacing_mm is not None:
                wmm, hmm = (b[2] - b[0] + 1) * an.spacing_mm[0], (b[3] - b[1] + 1) * an.spacing_mm[1]
                ext = f"{wmm:.0f} x {hmm:.0f} mm"
            else:
                ext = f"{b[2] - b[0] + 1} x {b[3] - b[1] + 1} {u}"
            lines.append(f"{name}: box [{b[0]}, {b[1]}, {b[2]}, {b[3]}] px, {ext} (width x height).")
            if name == "heart":
                lines.append("  " + _ctr_text(an) + ".")
            if req.want == "describe":
                inside = [o for o in lesions_k if o.region and vocab.contains(name, o.region)]
                if inside:
                    lines.append("  Opacities there: " + "; ".join(_lesion_sentence(o) for o in inside) + ".")
                    findings += [o for o in inside if o not in findings]
                elif name in ("lungs",) or vocab.contains("lungs", name):
                    lines.append(f"  No {word} found in the {name}.")
        findings = findings + _anatomy_findings(series, an, [n for n in names if n in an.boxes], study.study_uid)
        for side, cp in an.costophrenic.items():
            if cp.get("angle_deg") is not None:
                lines.append(f"{side} costophrenic angle: {cp['angle_deg']:.0f} degrees, "
                             f"{'blunted' if cp['blunted'] else 'sharp'}.")
        measured.append("region boxes in pixels [x0, y0, x1, y1]" + (" and mm" if an.spacing_mm else ""))
    else:
        if regions and not any(r in ("body", "lungs") for r in regions):
            for name in regions:
                inside = [o for o in lesions_k if o.region and vocab.contains(name, o.region)]
                if inside:
                    lines.append(f"In the {name}: " + "; ".join(_lesion_sentence(o) for o in inside) + ".")
                    findings += [o for o in inside if o not in findings]
                else:
                    lines.append(f"No {word} found in the {name}.")
        else:
            findings = list(lesions_k)
            if findings:
                lines.append(f"{len(findings)} rounded opacit{'ies' if len(findings) != 1 else 'y'} found: "
                             + "; ".join(_lesion_sentence(o) for o in findings) + ".")
            else:
                lines.append(f"No {word} found in the lung fields.")
        measured.append("opacity long and short axis and their mean" + (" (mm)" if an.spacing_mm else " (pixels)"))
        if kind == "nodule" and any(o.kind == "mass" for o in findings):
            notes.append("Opacities of 30 mm or more are reported as masses.")
    if an.spacing_mm is None:
        lines.append("Measurements are in pixels: this film has no pixel spacing.")
    evidence: list[Evidence] = []
    if req.evidence_dir is not None:
        try:
            evidence = render_radiograph_evidence(series, an, findings, Path(req.evidence_dir))
        except Exception as e:  # evidence must never break the answer
            log.warning("could not render radiograph evidence: %s", e)
    return DetectResult(findings=findings, evidence=evidence, summary="\n".join(lines), measured=measured,
                        notes=notes)


# ----------------------------------------------------------------------------------------------
# evidence images

MAX_PNG_BYTES = 290_000
_COLORS = [(255, 64, 64), (255, 200, 0), (0, 220, 255), (80, 255, 80), (255, 120, 255), (255, 150, 60)]


def _display(an: RadiographAnalysis, max_side: int = 900) -> tuple[Any, float]:
    """The film as an RGB Pillow image (standard display) and its scale (display px per full-film px)."""
    from PIL import Image

    img = (an.work * 255.0).astype(np.uint8)
    pil = Image.fromarray(img)
    scale_w = min(1.0, max_side / max(img.shape)) if max(img.shape) > max_side else max_side / max(img.shape)
    size = (max(1, int(round(img.shape[1] * scale_w))), max(1, int(round(img.shape[0] * scale_w))))
    pil = pil.resize(size, Image.BILINEAR).convert("RGB")
    return pil, scale_w / an.factor


def _save_png(img: Any, path: Path) -> None:
    """Encode under ``MAX_PNG_BYTES`` (adaptive palette, then smaller), then write atomically."""
    import io

    from tools.render import write_atomic

    def encode(im: Any) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    data = encode(img)
    if len(data) > MAX_PNG_BYTES:
        data = encode(img.convert("P", palette=1, colors=128))  # adaptive palette
    while len(data) > MAX_PNG_BYTES and img.width > 300:
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4))
        data = encode(img.convert("P", palette=1, colors=96))
    write_atomic(path, data)


def _draw_overview(an: RadiographAnalysis, findings: list[Finding], title: str = "") -> Any:
    from PIL import ImageDraw

    im, s = _display(an)
    ov = im.copy()
    d = ImageDraw.Draw(ov)
    f = an.factor
    # lung fields: outlines, zone cut lines
    for code, col in ((1, (255, 90, 90)), (2, (90, 140, 255))):
        m = an.fields == code
        if not m.any():
            continue
        edge = m & ~ndi.binary_erosion(m)
        rr, cc = np.nonzero(edge)
        for r, c in zip(rr[::1], cc[::1]):
            x, y = (c * f + (f - 1) / 2.0) * s, (r * f + (f - 1) / 2.0) * s
            d.point((x, y), fill=col)
        side = "right" if code == 1 else "left"
        fb = an.boxes.get(f"{side} lung")
        if fb:
            cuts = zone_bounds(fb)
            for yv in cuts[1:3]:
                rw = int(min(an.fields.shape[0] - 1, max(0, yv // f)))
                cols = np.flatnonzero(m[rw])
                if cols.size:
                    d.line([(cols[0] * f * s, yv * s), ((cols[-1] * f + f - 1) * s, yv * s)], fill=col, width=1)
            for n, z in enumerate(ZONES):
                yz = 0.5 * (cuts[n] + cuts[n + 1]) * s
                xz = (fb[0] if code == 1 else fb[2] - 0.12 * (fb[2] - fb[0])) * s
                d.text((xz + 3, yz), f"{side[0].upper()}{z[0].upper()}Z", fill=col)
    # CTR lines
    g = an.ctr_geometry
    if g:
        d.line([tuple(np.array(g["thorax_line"][:2]) * s), tuple(np.array(g["thorax_line"][2:]) * s)],
               fill=(0, 255, 160), width=2)
        for k in ("heart_right_line", "heart_left_line"):
            d.line([tuple(np.array(g[k][:2]) * s), tuple(np.array(g[k][2:]) * s)], fill=(255, 220, 0), width=2)
        mx = g["midline_col"] * s
        for y in range(0, im.height, 12):
            d.line([(mx, y), (mx, y + 6)], fill=(200, 200, 200), width=1)
        d.text((6, im.height - 16), _ctr_text(an), fill=(255, 220, 0))
    for cp in an.costophrenic.values():
        x, y = cp["point_px"][0] * s, cp["point_px"][1] * s
        d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(255, 120, 255) if cp["blunted"] else (120, 255, 120))
    for n, fnd in enumerate(findings):
        if fnd.bbox_px is None:
            continue
        col = _COLORS[n % len(_COLORS)]
        b = [v * s for v in fnd.bbox_px]
        if fnd.kind == "anatomy":
            d.rectangle(b, outline=col, width=1)
            d.text((b[0] + 2, b[1] + 2), fnd.label or fnd.region or "", fill=col)
        else:
            pad = 4
            d.rectangle([b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad], outline=col, width=2)
            d.text((b[0], max(0, b[1] - 16)), f"{fnd.id} {fnd.diameter_mm:.0f}{fnd.units}", fill=col)
    if title:
        d.text((6, 4), title, fill=(255, 255, 255))
    d.text((im.width - 70, 4), "R      L", fill=(255, 255, 255))
    return ov


def render_radiograph_evidence(series: Series, an: RadiographAnalysis, findings: list[Finding], outdir: Path,
                               prefix: str | None = None) -> list[Evidence]:
    """Overview PNG (lung fields, zones, CTR lines, costophrenic points, boxes) plus a zoomed crop per
    opacity (at most 4)."""
    outdir.mkdir(parents=True, exist_ok=True)
    uid = prefix or series.series_uid[-8:].replace(".", "_")
    ev: list[Evidence] = []
    ov = _draw_overview(an, findings)
    p = outdir / f"{uid}_film_overview.png"
    _save_png(ov, p)
    units = "pixels (no pixel spacing)" if an.spacing_mm is None else "mm"
    ev.append(Evidence(kind="image", path=str(p), role="overview", finding_ids=[x.id for x in findings],
                       caption=("PA film: lung fields (red: right, blue: left) with zones, cardiothoracic ratio lines, "
                                f"costophrenic points and findings; measurements in {units}")))
    from PIL import Image, ImageDraw

    full = np.asarray(series.pixels[0], dtype=np.float32)
    lo, hi = np.percentile(full[:: max(1, an.factor), :: max(1, an.factor)], [0.5, 99.5])
    for fnd in [x for x in findings if x.kind != "anatomy" and x.bbox_px][:4]:
        b = fnd.bbox_px
        assert b is not None
        cx, cy = 0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])
        half = max(40.0, 1.6 * max(b[2] - b[0], b[3] - b[1]))
        x0, x1 = int(max(0, cx - half)), int(min(full.shape[1], cx + half))
        y0, y1 = int(max(0, cy - half)), int(min(full.shape[0], cy + half))
        crop = np.clip((full[y0:y1, x0:x1] - lo) / max(hi - lo, 1e-6), 0, 1)
        im = Image.fromarray((crop * 255).astype(np.uint8)).convert("RGB")
        sc = 320.0 / max(im.size)
        im = im.resize((max(1, int(im.width * sc)), max(1, int(im.height * sc))), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        d.rectangle([(b[0] - x0) * sc - 3, (b[1] - y0) * sc - 3, (b[2] - x0) * sc + 3, (b[3] - y0) * sc + 3],
                    outline=(255, 200, 0), width=2)
        d.text((4, 4), f"{fnd.id} {_size_text(fnd)} {fnd.region or ''}", fill=(255, 255, 0))
        p = outdir / f"{uid}_{fnd.id}.png"
        _save_png(im, p)
        ev.append(Evidence(kind="image", path=str(p), role="key-image", finding_ids=[fnd.id],
                           caption=f"{fnd.id}: {_size_text(fnd)}, {fnd.region or 'lung'} (zoomed)"))
    return ev


# ----------------------------------------------------------------------------------------------
# comparison


@dataclass
class FilmRegistration:
    transform: Any  # SimpleITK transform: CURRENT physical point -> PRIOR physical point
    units: str  # "mm" (both spacings known) or "px" (each film in its own pixels)
    cur_spacing: tuple[float, float]
    pri_spacing: tuple[float, float]
    dice_before: float
    dice_after: float
    scale: float  # prior -> current size factor (prior units per current unit, inverted)
    runtime_s: float

    def prior_px_to_current_px(self, col: float, row: float) -> tuple[float, float]:
        p = (col * self.pri_spacing[0], row * self.pri_spacing[1])
        q = self.transform.GetInverse().TransformPoint(p)
        return q[0] / self.cur_spacing[0], q[1] / self.cur_spacing[1]

    def current_px_to_prior_px(self, col: float, row: float) -> tuple[float, float]:
        q = self.transform.TransformPoint((col * self.cur_spacing[0], row * self.cur_spacing[1]))
        return q[0] / self.pri_spacing[0], q[1] / self.pri_spacing[1]


def _sitk_work(an: RadiographAnalysis, spacing: tuple[float, float], arr: np.ndarray | None = None) -> Any:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(an.work if arr is None else arr, dtype=np.float32))
    f = an.factor
    img.SetSpacing((spacing[0] * f, spacing[1] * f))
    img.SetOrigin(((f - 1) / 2.0 * spacing[0], (f - 1) / 2.0 * spacing[1]))
    return img


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = float(a.sum() + b.sum())
    return float(2.0 * (a & b).sum() / s) if s else 0.0


def register_films(cur_s: Series, pri_s: Series, ca: RadiographAnalysis, pa: RadiographAnalysis
                   ) -> FilmRegistration:
    """2-D registration of the prior film (moving) to the current (fixed): lung-field centroids, then a
    similarity and an affine transform (correlation metric on the current's lung-field region,
    multi-resolution); cached per pair."""
    key = f"rgreg:{cur_s.cache_key}:{pri_s.cache_key}"

    def compute() -> FilmRegistration:
        import SimpleITK as sitk

        t0 = time.perf_counter()
        mm = ca.spacing_mm is not None and pa.spacing_mm is not None
        cs = ca.spacing_mm if mm else (1.0, 1.0)
        ps = pa.spacing_mm if mm else (1.0, 1.0)
        assert cs is not None and ps is not None
        fixed = _sitk_work(ca, cs)
        moving = _sitk_work(pa, ps)
        fmask = ndi.binary_dilation(ca.fields > 0, structure=_disk(max(2, int(8 * ca.px_per_mm_est))))
        mask_img = _sitk_work(ca, cs, fmask.astype(np.float32))
        mask_img = sitk.Cast(mask_img, sitk.sitkUInt8)

        def centroid(an: RadiographAnalysis, sp: tuple[float, float]) -> np.ndarray:
            rr, cc = np.nonzero(an.fields > 0)
            if rr.size == 0:
                rr, cc = np.nonzero(np.ones_like(an.fields))
            f = an.factor
            return np.array([(cc.mean() * f + (f - 1) / 2.0) * sp[0], (rr.mean() * f + (f - 1) / 2.0) * sp[1]])

        cf, cm = centroid(ca, cs), centroid(pa, ps)
        sim = sitk.Similarity2DTransform()
        sim.SetCenter([float(v) for v in cf])
        sim.SetTranslation([float(v) for v in (cm - cf)])

        def run(tx: Any, iters: int) -> Any:
            reg = sitk.ImageRegistrationMethod()
            reg.SetMetricAsCorrelation()
            reg.SetMetricFixedMask(mask_img)
            reg.SetMetricSamplingStrategy(reg.REGULAR)
            reg.SetMetricSamplingPercentage(0.5)
            reg.SetInterpolator(sitk.sitkLinear)
            reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iters,
                                                         relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetShrinkFactorsPerLevel([4, 2, 1])
            reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
            reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
            reg.SetInitialTransform(tx, inPlace=True)
            reg.Execute(fixed, moving)
            return tx

        try:
            run(sim, 120)
            aff = sitk.AffineTransform(2)
            aff.SetCenter(sim.GetCenter())
            aff.SetMatrix(sim.GetMatrix())
            aff.SetTranslation(sim.GetTranslation())
            tx = run(aff, 80)
        except Exception as e:  # fall back to the centroid alignment
            log.warning("film registration failed (%s); using the lung-field centroids", e)
            tx = sitk.TranslationTransform(2, [float(v) for v in (cm - cf)])

        def warp_fields(t: Any) -> np.ndarray:
            mv = _sitk_work(pa, ps, (pa.fields > 0).astype(np.float32))
            out = sitk.Resample(mv, fixed, t, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
            return sitk.GetArrayFromImage(out) > 0.5

        cur_m = ca.fields > 0
        d0 = _dice(cur_m, warp_fields(sitk.TranslationTransform(2, [float(v) for v in (cm - cf)])))
        d1 = _dice(cur_m, warp_fields(tx))
        inv = tx.GetInverse()
        o = np.array(inv.TransformPoint((0.0, 0.0)))
        ex = np.array(inv.TransformPoint((1.0, 0.0))) - o
        ey = np.array(inv.TransformPoint((0.0, 1.0))) - o
        scale = float(np.sqrt(abs(np.linalg.det(np.stack([ex, ey])))))
        log.info("film registration: lung-field Dice %.3f -> %.3f", d0, d1)
        return FilmRegistration(tx, "mm" if mm else "px", cs, ps, d0, d1, scale, time.perf_counter() - t0)

    return CACHE.get_or_compute(key, compute)


def _classify(d_now: float, d_prior: float, thr: float) -> str:
    if d_now - d_prior > thr:
        return "grew"
    if d_now - d_prior < -thr:
        return "shrank"
    return "stable"


def _paired_remeasure(cs: Series, ps: Series, ca: RadiographAnalysis, pa: RadiographAnalysis, c: Finding,
                      p: Finding) -> tuple[Finding, Finding] | None:
    """Both films' opacity of a matched pair measured again the same way, so that the method's biases
    (the background window, the start radius, the texture it includes) are the same on both and cancel in
    the change: each film's projected-sphere fit is refined (:func:`_opacity_seg`) from the pair's mean
    radius in mm, over a window of the same size in mm, from that film's own centre. Films with a known
    pixel spacing only; returns the re-measured (current, prior) findings, None when a fit fails."""
    if c.diameter_mm is None or p.diameter_mm is None or c.bbox_px is None or p.bbox_px is None:
        return None
    rad_mm = 0.25 * (float(c.diameter_mm) + float(p.diameter_mm))
    out: list[Finding] = []
    for series, an, fnd in ((cs, ca, c), (ps, pa, p)):
        f, ppm = an.factor, an.px_per_mm_est
        col, row = _center_px(fnd)
        r_w, c_w = (row - (f - 1) / 2.0) / f, (col - (f - 1) / 2.0) / f
        img = an.fit_image
        lung = an.fields > 0
        fit = _local_fit(img, lung, r_w, c_w, rad_mm * ppm)
        if fit is None:
            return None
        cand: dict[str, Any] = {"row": r_w, "col": c_w, "radius": rad_mm * ppm, "fit": fit,
                                "conf": fnd.confidence or 0.0}
        cand["seg"] = _opacity_seg(img, lung, cand, ppm)
        cand["diam_mm_est"] = cand["seg"]["diam"] / ppm
        mid_w = int(round((an.midline_col - (f - 1) / 2.0) / f))
        m = _opacity_finding(series, cand, 1, f, an.spacing_mm, an.fields, an.boxes, mid_w, fid=fnd.id)
        out.append(fnd.model_copy(update={
            "diameter_mm": m.diameter_mm, "long_axis_mm": m.long_axis_mm, "short_axis_mm": m.short_axis_mm,
            "bbox_px": m.bbox_px, "bbox_mm": m.bbox_mm, "center_mm": m.center_mm,
            "notes": fnd.notes + ["size re-measured together with the other film (same start radius and window)"]}))
    return out[0], out[1]


def _change_uncertainty_note(delta: float, thr: float) -> str:
    """The measured change with its 95 % interval (``PAIRED_CHANGE_SD_MM``), and whether that interval
    straddles the growth threshold: the status keeps the Lung-RADS rule on the measured value (the clinical
    wording), the note says when the film cannot decide it."""
    half = 1.96 * PAIRED_CHANGE_SD_MM
    text = f"diameter change {delta:+.1f} mm (95% interval +-{half:.1f} mm, paired re-measurement)"
    if abs(abs(delta) - thr) < half:
        text += f"; within the measurement uncertainty of the {thr:.1f} mm threshold: the status is uncertain"
    return text


def compare_radiographs(current_study: Study, prior_study: Study, regions: list[str] | None = None,
                        focus: str = "all", evidence_dir: Path | str | None = None) -> Any:
    """Compare the current chest film with a prior one of the same patient: registration, matched rounded
    opacities with their change (grew / shrank / stable / new / resolved) and the change in the
    cardiothoracic ratio. Returns ``tools.comparer.CompareResult``."""
    from tools.comparer import NO_MATCH, CompareResult, _focus, check_pair, gated_assignment

    check_pair(current_study, prior_study)
    cs, ps = current_study.primary, prior_study.primary
    if not (cs.is_radiograph and ps.is_radiograph):
        raise UnsupportedError("Radiograph comparison needs two films; for CT volumes use the CT comparer.")
    regions = regions or []
    notes: list[str] = []
    interval = ((current_study.study_date - prior_study.study_date).days
                if current_study.study_date and prior_study.study_date else None)
    if interval is not None and interval < 0:
        notes.append(f"The 'prior' is {-interval} days LATER than the current film; change is described from the "
                     "prior as loaded to the current.")
    ca, pa = analyze_radiograph(cs), analyze_radiograph(ps)
    reg = register_films(cs, ps, ca, pa)
    units = reg.units
    if units == "px":
        notes.append("At least one film has no pixel spacing: sizes are compared in pixels of the current film "
                     "(prior sizes scaled by the registration).")
    # growth threshold in the current film's units
    thr = GROWTH_MM if units == "mm" else GROWTH_MM * ca.px_per_mm_est / ca.factor
    cur = [o.model_copy(deep=True, update={"study_uid": current_study.study_uid}) for o in ca.opacities]
    pri = [o.model_copy(deep=True) for o in pa.opacities]

    def d_cur(o: Finding) -> float:
        return float(o.diameter_mm or 0.0)

    def d_pri(o: Finding) -> float:  # prior size in current units
        d = float(o.diameter_mm or 0.0)
        return d if units == "mm" else d * reg.scale

    cur_unit = (ca.spacing_mm[0] if units == "mm" and ca.spacing_mm else 1.0)
    mapped = [np.array(reg.prior_px_to_current_px(*_center_px(p))) for p in pri]
    pairs: list[tuple[Finding, Finding | None]] = []
    used_c: set[int] = set()
    used_p: set[int] = set()
    if cur and pri:
        cost = np.full((len(cur), len(pri)), NO_MATCH)
        for i, c in enumerate(cur):
            cc = np.array(_center_px(c))
            for j, p in enumerate(pri):
                dist = float(np.linalg.norm(cc - mapped[j])) * cur_unit  # current units
                gate = max(10.0 if units == "mm" else 10.0 * ca.px_per_mm_est / ca.factor,
                           0.75 * max(d_cur(c), d_pri(p)))
                if dist <= gate:
                    cost[i, j] = dist + 0.5 * abs(d_cur(c) - d_pri(p))
        for i, j in gated_assignment(cost):
            pairs.append((cur[i], pri[j]))
            used_c.add(i)
            used_p.add(j)
    for i, c in enumerate(cur):
        if i in used_c:
            continue
        q = reg.current_px_to_prior_px(*_center_px(c))
        m = measure_at_px(ps, q[0], q[1], pa, search_mm=6.0)
        pairs.append((c, m))
    resolved: list[tuple[Finding, np.ndarray]] = []
    for j, p in enumerate(pri):
        if j in used_p:
            continue
        q = mapped[j]
        m = measure_at_px(cs, float(q[0]), float(q[1]), ca, search_mm=6.0)
        if m is not None and m.diameter_mm and m.diameter_mm * (1.0 if units == "mm" else 1.0) >= 0.5 * d_pri(p):
            m = m.model_copy(update={"id": f"F{len(cur) + 1}", "study_uid": current_study.study_uid,
                                     "notes": m.notes + ["found on re-inspection at the position of a prior opacity"]})
            cur.append(m)
            pairs.append((m, p))
            continue
        resolved.append((p, q))
    out: list[Finding] = []
    for c, p in pairs:
        if p is None:
            c.change = Change(status="new", interval_days=interval)
            c.notes.append("not seen on the prior film; a small or faint nodule often does not show on a film, so "
                           "it may have been there, smaller (a prior CT would tell)")
        else:
            pm = _paired_remeasure(cs, ps, ca, pa, c, p) if units == "mm" else None
            if pm is not None:
                c, p = pm
            dp = d_pri(p)
            status = _classify(d_cur(c), dp, thr)
            if pm is not None:
                c.notes.append(_change_uncertainty_note(d_cur(c) - dp, thr))
            c.change = Change(status=status, prior_diameter_mm=round(dp, 1), prior_center_mm=p.center_mm,
                              interval_days=interval, diameter_change_mm=round(d_cur(c) - dp, 2),
                              prior_finding_id=p.id)
            if units == "px":
                c.notes.append("prior and change sizes in pixels of the current film")
        out.append(c)
    for n, (p, q) in enumerate(resolved, start=1):
        out.append(Finding(id=f"R{n}", kind=p.kind, label=f"resolved {p.kind}", region=p.region, side=p.side,
                           zone=p.zone, study_uid=current_study.study_uid, series_uid=cs.series_uid, units=p.units,
                           change=Change(status="resolved", prior_diameter_mm=round(d_pri(p), 1),
                                         prior_center_mm=p.center_mm, interval_days=interval, prior_finding_id=p.id),
                           notes=[f"expected position on the current film: x {q[0]:.0f}, y {q[1]:.0f} px"]))
    out.sort(key=lambda f: (f.id[0] != "F", int(f.id[1:]) if f.id[1:].isdigit() else 0))
    shown = [f for f in out if not regions or any(f.region and vocab.contains(r, f.region) for r in regions)]
    shown = _focus(shown, focus)
    ctr_c, ctr_p = ca.ctr, pa.ctr
    lines = [f"Compared with the prior film of {prior_study.date_str}"
             + (f" ({interval} days earlier)" if interval is not None else "")
             + f"; 2-D affine registration, lung-field overlap Dice {reg.dice_after:.2f}."]
    if ctr_c is not None and ctr_p is not None:
        lines.append(f"Cardiothoracic ratio {ctr_p:.2f} -> {ctr_c:.2f} ({ctr_c - ctr_p:+.2f})"
                     + (f", within what the measurement varies between two films (about ±{CTR_CHANGE_NOISE:.2f})."
                        if abs(ctr_c - ctr_p) < CTR_CHANGE_NOISE else "."))
    u = units
    for f in shown:
        ch = f.change
        assert ch is not None
        where = f.region or "lung"
        if ch.status == "new":
            lines.append(f"{f.id} ({where}): new {f.kind}, {d_cur(f):.1f} {u}, not seen on the prior.")
        elif ch.status == "resolved":
            lines.append(f"{f.id} ({where}): the {ch.prior_diameter_mm:.1f} {u} {f.kind} of the prior is no longer "
                         "seen (resolved).")
        else:
            verb = {"grew": "increased", "shrank": "decreased", "stable": "stable"}[ch.status]
            lines.append(f"{f.id} ({where}) {f.kind}: {verb}, {ch.prior_diameter_mm:.1f} -> {d_cur(f):.1f} {u} "
                         f"({(ch.diameter_change_mm or 0):+.1f} {u}).")
    if not shown:
        lines.append("No rounded opacity to compare" + (f" in the {', '.join(regions)}" if regions else "") + ".")
    if units == "px":
        lines.append(f"Sizes are in pixels; growth means more than {thr:.0f} px (about 1.5 mm at an assumed thoracic "
                     "width).")
    evidence: list[Evidence] = []
    if evidence_dir is not None:
        try:
            evidence = _compare_evidence(ca, pa, reg, shown, Path(evidence_dir))
        except Exception as e:  # evidence must never break the answer
            log.warning("could not render the film comparison: %s", e)
    comparison = {
        "prior_study_uid": prior_study.study_uid, "prior_date": prior_study.date_str,
        "current_date": current_study.date_str, "interval_days": interval, "units": units,
        "registration": {"method": "2-D similarity then affine (SimpleITK), correlation on the lung fields",
                         "lung_dice_before": round(reg.dice_before, 3), "lung_dice_after": round(reg.dice_after, 3),
                         "scale": round(reg.scale, 4), "runtime_s": round(reg.runtime_s, 2)},
        "cardiothoracic_ratio": {"current": None if ctr_c is None else round(ctr_c, 3),
                                 "prior": None if ctr_p is None else round(ctr_p, 3),
                                 "change": None if ctr_c is None or ctr_p is None else round(ctr_c - ctr_p, 3)},
        "counts": {s: sum(1 for f in out if f.change and f.change.status == s)
                   for s in ("grew", "shrank", "stable", "new", "resolved")},
    }
    measured = [f"mean diameter now and on the prior ({'mm' if units == 'mm' else 'pixels'}; growth > 1.5 mm)",
                "cardiothoracic ratio now and on the prior", "registration quality (lung-field overlap)"]
    return CompareResult(shown, evidence, "\n".join(lines), measured, notes, comparison)


def _compare_evidence(ca: RadiographAnalysis, pa: RadiographAnalysis, reg: FilmRegistration, shown: list[Finding],
                      outdir: Path) -> list[Evidence]:
    import SimpleITK as sitk
    from PIL import Image, ImageDraw

    outdir.mkdir(parents=True, exist_ok=True)
    fixed = _sitk_work(ca, reg.cur_spacing)
    moving = _sitk_work(pa, reg.pri_spacing)
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, reg.transform, sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32))
    cur = ca.work
    a = Image.fromarray((cur * 255).astype(np.uint8))
    b = Image.fromarray((np.clip(warped, 0, 1) * 255).astype(np.uint8))
    sc = min(1.0, 640.0 / max(a.size)) if max(a.size) > 640 else 640.0 / max(a.size)
    a = a.resize((int(a.width * sc), int(a.height * sc))).convert("RGB")
    b = b.resize((int(b.width * sc), int(b.height * sc))).convert("RGB")
    pair = Image.new("RGB", (a.width * 2 + 6, a.height), (0, 0, 0))
    pair.paste(a, (0, 0))
    pair.paste(b, (a.width + 6, 0))
    d = ImageDraw.Draw(pair)
    s = sc / ca.factor
    ids: list[str] = []
    for n, f in enumerate(shown[:8]):
        col = _COLORS[n % len(_COLORS)]
        if f.bbox_px is not None:
            bb = [v * s for v in f.bbox_px]
            for off in (0, a.width + 6):
                d.rectangle([bb[0] - 4 + off, bb[1] - 4, bb[2] + 4 + off, bb[3] + 4], outline=col, width=2)
            d.text((bb[0], max(0, bb[1] - 16)), f"{f.id} {f.change.status if f.change else ''}", fill=col)
            ids.append(f.id)
    d.text((4, 4), "current", fill=(255, 255, 0))
    d.text((a.width + 10, 4), "prior (registered)", fill=(0, 255, 255))
    p1 = outdir / "film_compare.png"
    _save_png(pair, p1)
    diff = cur - warped
    lim = float(np.percentile(np.abs(diff[ca.fields > 0]), 99)) if (ca.fields > 0).any() else 0.2
    dimg = Image.fromarray((np.clip(diff / max(lim, 1e-3) * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8))
    dimg = dimg.resize((int(dimg.width * sc), int(dimg.height * sc))).convert("RGB")
    dd = ImageDraw.Draw(dimg)
    for n, f in enumerate(shown[:8]):
        if f.bbox_px is not None:
            bb = [v * s for v in f.bbox_px]
            dd.rectangle([bb[0] - 4, bb[1] - 4, bb[2] + 4, bb[3] + 4], outline=_COLORS[n % len(_COLORS)], width=2)
    p2 = outdir / "film_difference.png"
    _save_png(dimg, p2)
    return [Evidence(kind="image", path=str(p1), caption="current film (left) and the registered prior (right)",
                     finding_ids=ids, role="before-after"),
            Evidence(kind="image", path=str(p2), caption="difference: current - registered prior (bright = new "
                     "density, dark = density gone)", finding_ids=ids, role="subtraction")]


# ----------------------------------------------------------------------------------------------
# evaluation on projected phantoms


def _box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return float(inter / ua) if ua > 0 else 0.0


def _match_truth(found: list[Finding], truth: list[dict[str, Any]], spacing: float) -> dict[str, str]:
    """truth id -> finding id (greedy by distance; a match lies within 0.6 x the truth diameter, >= 4 mm)."""
    cands: list[tuple[float, str, str]] = []
    for t in truth:
        for f in found:
            if f.bbox_px is None:
                continue
            c = _center_px(f)
            d = math.hypot(c[0] - t["center_px"][0], c[1] - t["center_px"][1])
            if d <= max(0.6 * t["diameter_px"], 4.0 / spacing):
                cands.append((d, t["id"], f.id))
    from tools.evaluate import greedy_pairs

    return greedy_pairs(cands)


def evaluate_radiographs(seeds: list[int] | tuple[int, ...], workdir: str | Path | None = None,
                         min_mm: float = 10.0) -> dict[str, Any]:
    """Project the CT phantom pairs of ``seeds`` to PA films (DX DICOM, loaded back through
    :func:`tools.dicom_io.load_study`) and measure: lung-field box IoU, |CTR error|, sensitivity for
    opacities >= ``min_mm`` whose centre lies in a lung field (and over all of them), false positives per
    film (a detection matching no truth nodule of any size), mean |diameter error| (mm) of the matched
    ones, and change-status accuracy on the pairs (truth nodules >= ``min_mm`` on either film; also over
    those whose centre lies in a lung field on each film that shows them), and the comparison's findings on
    the current film that match no truth nodule, per pair."""
    import tempfile

    from tools.dicom_io import load_study
    from tools.drr import write_drr_patient

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    ious: list[float] = []
    ctr_err: list[float] = []
    ctr_n = 0  # films with a truth ratio (the error is over those where one was measured)
    n_films = 0
    fp = 0
    tp_in = n_in = tp_all = n_all = 0
    by_dp: dict[str, list[int]] = {"low": [0, 0], "high": [0, 0]}  # in-field, by conspicuity (found, n)
    d_err: list[float] = []
    ch_ok = ch_n = 0
    ch_false = 0  # the comparison's current-film findings that match no truth nodule
    ch_ok_in = ch_n_in = 0  # the same over nodules whose centre lies in a lung field on each film showing them
    per_seed: list[dict[str, Any]] = []
    run_s: list[float] = []
    try:
        for seed in seeds:
            out = root / f"drr_{seed}"
            truth = write_drr_patient(out, seed)
            studies = {w: load_study(out / w) for w in ("prior", "current")}
            row: dict[str, Any] = {"seed": seed}
            for w, st in studies.items():
                t0 = time.perf_counter()
                an = analyze_radiograph(st.primary)
                run_s.append(time.perf_counter() - t0)
                tr = truth["studies"][w]
                n_films += 1
                sp = float(tr["pixel_spacing_mm"])
                for side in SIDES:
                    tb = tr["anatomy"].get(f"{side} lung", {}).get("bbox_px")
                    pb = an.boxes.get(f"{side} lung")
                    if tb is not None:
                        ious.append(_box_iou(tb, pb) if pb is not None else 0.0)
                if tr.get("cardiothoracic"):
                    ctr_n += 1
                    if an.ctr is not None:
                        ctr_err.append(abs(an.ctr - tr["cardiothoracic"]["ctr"]))
                m = _match_truth(an.opacities, tr["nodules"], sp)
                fp += sum(1 for f in an.opacities if f.id not in m.values())
                for t in tr["nodules"]:
                    if t["diameter_mm"] < min_mm:
                        continue
                    hit = t["id"] in m
                    n_all += 1
                    tp_all += hit
                    if t["in_field"]:
                        n_in += 1
                        tp_in += hit
                        if t.get("conspicuity") is not None:
                            b = by_dp["high" if t["conspicuity"] >= CONSPICUOUS_DPRIME else "low"]
                            b[0] += hit
                            b[1] += 1
                    if hit:
                        f = next(x for x in an.opacities if x.id == m[t["id"]])
                        if f.units == "mm" and f.diameter_mm is not None:
                            d_err.append(abs(f.diameter_mm - t.get("projected_diameter_mm", t["diameter_mm"])))
                row[w] = {"ctr": an.ctr, "truth_ctr": (tr.get("cardiothoracic") or {}).get("ctr"),
                          "opacities": len(an.opacities), "matched": len(m)}
            res = compare_radiographs(studies["current"], studies["prior"])
            cur_tr = {t["id"]: t for t in truth["studies"]["current"]["nodules"]}
            pri_tr = {t["id"]: t for t in truth["studies"]["prior"]["nodules"]}
            cur_found = [f for f in res.findings if f.bbox_px is not None]
            mc = _match_truth(cur_found, list(cur_tr.values()), float(truth["studies"]["current"]["pixel_spacing_mm"]))
            ch_false += sum(1 for f in cur_found if f.id not in mc.values())
            pa = analyze_radiograph(studies["prior"].primary)
            mp = _match_truth(pa.opacities, list(pri_tr.values()), float(truth["studies"]["prior"]["pixel_spacing_mm"]))
            for n in truth["nodules"]:
                sizes = [x["diameter_mm"] for x in (n["prior"], n["current"]) if x]
                if not sizes or max(sizes) < min_mm:
                    continue
                ch_n += 1
                fate = n["fate"]
                got: str | None = None
                if n["current"] is not None and n["id"] in mc:
                    f = next(x for x in res.findings if x.id == mc[n["id"]])
                    got = f.change.status if f.change else None
                elif n["current"] is None and n["id"] in mp:
                    pid = mp[n["id"]]
                    got = "resolved" if any(f.change and f.change.status == "resolved" and
                                            f.change.prior_finding_id == pid for f in res.findings) else None
                ch_ok += got == fate
                if all(x["in_field"] for x in (n["prior"], n["current"]) if x):
                    ch_n_in += 1
                    ch_ok_in += got == fate
            per_seed.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "seeds": list(seeds), "films": n_films,
        "lung_field_box_iou": round(float(np.mean(ious)), 3) if ious else None,
        "lung_field_box_iou_min": round(float(np.min(ious)), 3) if ious else None,
        "ctr_abs_error": round(float(np.mean(ctr_err)), 4) if ctr_err else None,
        "ctr_abs_error_max": round(float(np.max(ctr_err)), 4) if ctr_err else None,
        "ctr_measured": f"{len(ctr_err)} of {ctr_n}",
        f"sensitivity_ge{min_mm:g}mm_in_field": round(tp_in / n_in, 3) if n_in else None,
        f"sensitivity_ge{min_mm:g}mm_all": round(tp_all / n_all, 3) if n_all else None,
        "opacities_ge_min_in_field": n_in, "opacities_ge_min_all": n_all,
        f"sensitivity_ge{min_mm:g}mm_in_field_by_conspicuity": {
            k: {"found": v[0], "n": v[1], "sensitivity": round(v[0] / v[1], 3) if v[1] else None}
            for k, v in ((f"dprime_lt_{CONSPICUOUS_DPRIME:g}", by_dp["low"]),
                         (f"dprime_ge_{CONSPICUOUS_DPRIME:g}", by_dp["high"]))},
        "fp_per_film": round(fp / max(n_films, 1), 3),
        "diameter_abs_error_mm": round(float(np.mean(d_err)), 2) if d_err else None,
        "change_status_accuracy": round(ch_ok / ch_n, 3) if ch_n else None, "change_pairs": ch_n,
        "change_status_accuracy_in_field": round(ch_ok_in / ch_n_in, 3) if ch_n_in else None,
        "change_pairs_in_field": ch_n_in,
        "change_false_findings_per_pair": round(ch_false / max(len(per_seed), 1), 3),
        "analysis_s_per_film": round(float(np.mean(run_s)), 2) if run_s else None,
        "runtime_s": round(time.perf_counter() - t_start, 1), "per_seed": per_seed,
    }
