"""The grounded detector engine for chest CT (embedded default: CPU, no weights).

``analyze_series(series)`` (cached per series uid) segments the anatomy (:mod:`tools.anatomy`) and
finds lung nodules and masses:

1. *Search volume*: the series block-averaged to ~1.25 mm voxels over the lungs' box; voxels
   outside the closed lung mask (rolling-ball closed, holes filled, so juxtapleural nodules and
   vessels are inside) are set to the parenchyma's HU, which removes the chest wall and mediastinum
   but keeps nodules touching them.
2. *Candidates*: multi-scale Hessian "dot" enhancement (Li et al. 2003: ``|l3|^2/|l1|`` when all
   three eigenvalues are negative, zero for tubes and plates), scale-normalised, over sigmas for
   radii ~2-22 mm on a pyramid (each scale at ~1.5 voxels), local maxima above a contrast-scaled
   threshold, greedy non-maximum suppression across scales. On the pleura, where a cap cut flat by
   the wall is plate-like to that filter: peaks of the depth of solid tissue into the lung air, ranked
   by how alone they stand (:func:`_pleural_candidates`), and, for caps only one search voxel high
   (a 4-5 mm nodule centred on the pleura), sites on the wall ranked by their excess density over the
   pleura beside them (:func:`_shallow_cap_candidates`).
3. *Segmentation* of each candidate at full resolution in a small ROI: local parenchyma and core HU,
   threshold half-way between them (half-maximum: unbiased borders under blur and partial volume),
   the lung side of the pleura only (a local rolling-ball closing of the air), no bone, vessel
   detachment by an opening scaled to the blob's own largest inscribed sphere (distance transform;
   the chest wall counts as solid so a juxtapleural nodule is not eroded from its flat side), then
   a second pass with the core re-measured inside the blob. Two more hypotheses where that one
   fails: on the pleura, a wider rolling ball for the lung side (a flat cap of a large nodule); off
   it, a *juxtavascular* one for a small ball on a vessel about as thick as itself, which no
   opening separates: rays cast from the (re-centred) candidate give its radius in every direction,
   the blob is what lies within 1.15 median radii, and the rays that run on into the vessel must lie
   on one side of it (a vessel passing by), not spread out as at a bend, a bifurcation or along a
   tube. The most nodule-like hypothesis is kept.
4. *Measurement*: long and short axial diameters on the slice of largest area (long = maximal
   Feret diameter, short = widest extent perpendicular to it, area-corrected), their mean
   (Lung-RADS), partial-volume-weighted volume, mean/core HU, attenuation (solid / part-solid /
   ground-glass). A juxtapleural nodule (broad contact with the wall) is sized as a sphere partly
   hidden in the wall: the HU around it are fitted by a blurred, voxel-averaged model of the wall (a
   half-space) united with a sphere (:func:`_cap_model_fit`), so a cap one or two voxels proud of the
   pleura gives the whole nodule's size (for caps seen up to 12 mm: over a larger window the wall is
   no plane, and a large cap's visible surface sizes it well); otherwise, or where that fit is poor,
   by a sphere fitted to its free, lung-facing surface.
5. *False-positive reduction*: a confidence in 0-1 from soft ramps on compactness (3-D inertia
   elongation), Hessian blobness, filter response per HU of contrast, vessel burden (structure
   leaving a shell around the blob), what the opening kept, contrast and signal-to-noise for small
   blobs; juxtapleural caps have their own limits (flat but whole, not fed by vessels, dense, on more
   than one slice) and, on the mediastinal pleura (the hilum, where the pulmonary vessels leave the
   mediastinum: the anatomy's labels just beyond the contact), must be clear caps; a round blob that
   nothing leaves in 3-D needs less from the Hessian (ground glass dilutes it). Only candidates
   above ``MIN_CONFIDENCE`` are reported.

``run_detector(study, request)`` answers text-to-region (lesions in named regions), anatomy and
region-to-text (what lies in a box) requests, with evidence images. ``measure_at`` re-segments the
nodule nearest a point in an ROI (cheap; used by the verifier and the comparer).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools import vocab
from tools.anatomy import REGION_LABELS, Anatomy, RegionInfo, close_disk, region_at, segment_anatomy
from tools.cache import CACHE
from tools.errors import UnsupportedError
from tools.schemas import Evidence, Finding
from tools.study import Series, Study

log = logging.getLogger(__name__)

SEARCH_MM = 1.25
SIGMAS_MM: tuple[float, ...] = (1.2, 1.6, 2.15, 2.9, 3.9, 5.2, 7.0, 9.4, 12.6)
SIGMA_TO_RADIUS = 1.0 / 0.6  # sphere radius whose normalised Hessian peaks at sigma
DOT_THRESHOLD = 28.0  # normalised dot response (HU): ~0.31 x contrast at the matched scale
MAX_CANDIDATES = 400
MIN_DIAMETER_MM = 4.0
MIN_CONFIDENCE = 0.5
MASS_MM = 30.0
PLEURAL_CLOSING_MM = 12.0  # second lung-side hypothesis for pleural candidates: brings flat caps in
RAY_DIRS = 162  # directions of the ray-cast shape of a blob (juxtavascular hypothesis)
JV_MAX_RADIUS_MM = 4.5  # juxtavascular hypothesis only for balls up to this radius (segmental vessels' size)
CAP_FIT_MAX_VOXELS = 1500  # voxels of its window the cap model is fitted to (an even subsample beyond)
CAP_FIT_MIN_CONF = 0.1  # caps this plausible (shape aside) are sized by the wall+sphere model, then scored again
CAP_FIT_MAX_MM = 12.0  # ... for caps seen up to this size: over a small cap's window the wall is a plane
CAP_FIT_MAX_RESID = 0.12  # RMS residual (fraction of wall contrast) up to which the wall+sphere model sizes a cap
CAP_FIT_GOOD_RESID = 0.09  # ... and below which its fit fully stands for the cap's shape in the plausibility
SIZED_BY_FREE_SURFACE = "its size comes from a sphere fitted to its free (lung-facing) surface"  # said in the note
CAP_SHAPE_MAX_MM = 8.0  # caps up to this size may pass on the model's fit rather than their ragged free surface
SHALLOW_CAP_SEEDS = 60  # sites on the pleura, ranked by excess density, where a cap one search voxel high is sought
SHALLOW_CAP_MEDIASTINUM_MM = 3.0  # ... none this close to the mediastinal structures (hilar vessels crowd there)


# ----------------------------------------------------------------------------------------------
# request / result types


@dataclass
class DetectRequest:
    regions: list[str] = field(default_factory=list)  # canonical vocab names; [] = whole chest
    lesion_kind: str | None = None  # "nodule" | "mass" | "opacity" | None
    box_mm: list[float] | None = None  # region-to-text: what lies in this box?
    want: str = "lesions"  # "lesions" | "anatomy" | "describe"
    evidence_dir: Path | None = None  # where to write PNG evidence; None = no images


@dataclass
class SeriesAnalysis:
    anatomy: Anatomy
    nodules: list[Finding]
    runtime_s: float
    notes: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # all scored candidates (debug)


@dataclass
class DetectResult:
    findings: list[Finding]
    evidence: list[Evidence]
    summary: str
    measured: list[str]
    notes: list[str]


# ----------------------------------------------------------------------------------------------
# small numeric helpers


def _block_mean(vol: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    fk, fj, fi = f
    if f == (1, 1, 1):
        return np.array(vol, dtype=np.float32, copy=True)  # never a view: callers write into it
    nk, nj, ni = vol.shape
    pk, pj, pi = (-nk) % fk, (-nj) % fj, (-ni) % fi
    v = np.pad(vol, ((0, pk), (0, pj), (0, pi)), mode="edge") if (pk or pj or pi) else vol
    K, J, I_ = v.shape
    return v.reshape(K // fk, fk, J // fj, fj, I_ // fi, fi).mean(axis=(1, 3, 5), dtype=np.float32)


def _eig3(hxx: np.ndarray, hyy: np.ndarray, hzz: np.ndarray, hxy: np.ndarray, hxz: np.ndarray,
          hyz: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of symmetric 3x3 matrices given by their 6 entries (1-D arrays)."""
    m = np.empty((hxx.size, 3, 3), dtype=np.float64)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = hxx, hyy, hzz
    m[:, 0, 1] = m[:, 1, 0] = hxy
    m[:, 0, 2] = m[:, 2, 0] = hxz
    m[:, 1, 2] = m[:, 2, 1] = hyz
    return np.linalg.eigvalsh(m)


def _dot_from_eig(ev: np.ndarray) -> np.ndarray:
    """Li's dot enhancement from ascending eigenvalues: |l3|^2/|l1| when all are negative."""
    l1, l3 = ev[:, 0], ev[:, 2]  # l1 most negative, l3 closest to zero
    out = np.where(l3 < 0, (l3 * l3) / np.maximum(-l1, 1e-6), 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# candidate search


@dataclass
class _Level:
    vol: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]  # (di, dj, dk)
    offset: np.ndarray  # full-voxel index (i, j, k) of level voxel (0, 0, 0)
    scale: np.ndarray  # full voxels per level voxel along (i, j, k)


def _search_volume(series: Series, anat: Anatomy, paren: float) -> tuple[_Level, list[int]] | None:
    g = anat.grid
    closed = anat.masks["lungs_closed"]
    bb = None
    if closed.any():
        from tools.anatomy import _bbox

        bb = _bbox(closed)
    if bb is None:
        return None
    full = g.full_box(bb)
    di, dj, dk = (float(s) for s in series.spacing)
    nk, nj, ni = series.shape
    m = 8
    i0, i1 = max(0, full[0] - int(m / di)), min(ni - 1, full[3] + int(m / di))
    j0, j1 = max(0, full[1] - int(m / dj)), min(nj - 1, full[4] + int(m / dj))
    k0, k1 = max(0, full[2] - int(m / dk)), min(nk - 1, full[5] + int(m / dk))
    fi, fj, fk = (max(1, int(round(SEARCH_MM / s))) for s in (di, dj, dk))
    sub = series.pixels[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
    vol = _block_mean(sub, (fk, fj, fi))
    # closed lung mask on the search grid (nearest working voxel of each search voxel's centre)
    K, J, I_ = vol.shape
    kk = k0 + np.arange(K) * fk + (fk - 1) // 2
    jj = j0 + np.arange(J) * fj + (fj - 1) // 2
    ii = i0 + np.arange(I_) * fi + (fi - 1) // 2
    fk_, fj_, fi_ = g.factors
    mask = closed[np.ix_(np.clip(kk // fk_, 0, g.shape[0] - 1), np.clip(jj // fj_, 0, g.shape[1] - 1),
                         np.clip(ii // fi_, 0, g.shape[2] - 1))]
    np.clip(vol, -1000.0, 250.0, out=vol)
    vol[~mask] = paren
    lvl = _Level(vol=vol, mask=mask, spacing=(di * fi, dj * fj, dk * fk),
                 offset=np.array([i0 + (fi - 1) / 2.0, j0 + (fj - 1) / 2.0, k0 + (fk - 1) / 2.0]),
                 scale=np.array([fi, fj, fk], dtype=float))
    return lvl, [i0, j0, k0, i1, j1, k1]


def _decimate(base: _Level, f: tuple[int, int, int]) -> _Level:
    """f = (fi, fj, fk) integer decimation of the base level by block means."""
    fi, fj, fk = f
    vol = _block_mean(base.vol, (fk, fj, fi))
    mask = _block_mean(base.mask.astype(np.float32), (fk, fj, fi)) > 0.5
    sc = base.scale * np.array([fi, fj, fk])
    off = base.offset + base.scale * (np.array([fi, fj, fk]) - 1) / 2.0
    return _Level(vol=vol, mask=mask, spacing=(base.spacing[0] * fi, base.spacing[1] * fj, base.spacing[2] * fk),
                  offset=off, scale=sc)


def _candidates(base: _Level, notes: list[str]) -> list[dict[str, Any]]:
    levels: dict[tuple[int, int, int], _Level] = {(1, 1, 1): base}
    cands: list[dict[str, Any]] = []
    for sigma in SIGMAS_MM:
        f = tuple(max(1, 2 ** int(np.floor(np.log2(max(1.0, sigma / (1.5 * s)))))) for s in base.spacing)
        if f not in levels:
            levels[f] = _decimate(base, f)  # type: ignore[arg-type]
        lv = levels[f]  # type: ignore[index]
        if min(lv.vol.shape) < 3:
            continue
        sv = [sigma / s for s in (lv.spacing[2], lv.spacing[1], lv.spacing[0])]  # per axis k, j, i
        sp = (lv.spacing[2], lv.spacing[1], lv.spacing[0])
        norm = sigma * sigma

        def d2(order: tuple[int, int, int]) -> np.ndarray:
            out = ndi.gaussian_filter(lv.vol, sv, order=order, mode="nearest", truncate=3.0)
            den = 1.0
            for ax, o in enumerate(order):
                den *= sp[ax] ** o
            out *= norm / den
            return out

        hkk, hjj, hii = d2((2, 0, 0)), d2((0, 2, 0)), d2((0, 0, 2))
        trace = hkk + hjj + hii
        sel = lv.mask & (trace < -3.0 * DOT_THRESHOLD) & (hkk < 0) & (hjj < 0) & (hii < 0)
        if not sel.any():
            continue
        idx = np.nonzero(sel)
        hkj, hki, hji = d2((1, 1, 0)), d2((1, 0, 1)), d2((0, 1, 1))
        ev = _eig3(hkk[idx], hjj[idx], hii[idx], hkj[idx], hki[idx], hji[idx])
        dot = _dot_from_eig(ev)
        resp = np.zeros(lv.vol.shape, dtype=np.float32)
        resp[idx] = dot
        peaks = (resp >= DOT_THRESHOLD) & (resp == ndi.maximum_filter(resp, size=3, mode="constant"))
        pk = np.argwhere(peaks)
        for k, j, i in pk:
            full = lv.offset + lv.scale * np.array([i, j, k], dtype=float)
            e = ev[np.searchsorted(np.ravel_multi_index(idx, lv.vol.shape),
                                   np.ravel_multi_index((k, j, i), lv.vol.shape))]
            cands.append({"ijk": full, "sigma": sigma, "resp": float(resp[k, j, i]),
                          "blob": float(e[2] / min(e[0], -1e-6)),  # l3/l1 in (0, 1]
                          "radius": sigma * SIGMA_TO_RADIUS})
    cands.sort(key=lambda c: -c["resp"])
    return cands


def _wall_depth(base: _Level) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The search volume's solid voxels (over -500 HU inside the closed lung mask), each voxel's
    distance to the lung air counting the wall as solid, and its distance to the wall; None when
    nothing in the lungs is solid. Shared by the two pleural seeders."""
    sp = (base.spacing[2], base.spacing[1], base.spacing[0])  # k, j, i
    solid = base.mask & (base.vol > -500.0)
    if not solid.any():
        return None
    depth = ndi.distance_transform_edt(solid | ~base.mask, sampling=sp)  # distance to the lung air
    to_wall = ndi.distance_transform_edt(base.mask, sampling=sp)  # distance to the wall
    return solid, depth, to_wall


def _pleural_candidates(base: _Level, max_n: int = 30, max_around: float = 0.2,
                        wall: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Candidates for nodules on the pleura, which the Hessian dot filter under-ranks (a cap cut flat
    by the chest wall is plate-like): local maxima of the distance to the air, counting the wall as
    solid, among solid voxels right against the wall. A cap of height h peaks at ~h at its base; the
    smooth pleura stays near 0 and peripheral vessels at their (small) radius."""
    sp = (base.spacing[2], base.spacing[1], base.spacing[0])  # k, j, i
    wd = wall if wall is not None else _wall_depth(base)
    if wd is None:
        return []
    solid, depth, to_wall = wd
    vmin = min(base.spacing)
    sel = solid & (to_wall <= 1.5 * max(base.spacing)) & (depth >= max(2.0, 1.5 * vmin))
    if not sel.any():
        return []
    dpk = np.where(solid & base.mask, depth, 0.0)
    win = tuple(max(3, 2 * int(round(5.0 / s)) + 1) for s in sp)  # one seed per ~10 mm of pleura
    peaks = sel & (dpk >= ndi.maximum_filter(dpk, size=win, mode="constant"))
    pk = np.argwhere(peaks)
    vals = dpk[peaks]
    # a cap stands alone on the pleura: air around it on the lung side, just beyond its own reach;
    # pleural thickening, the diaphragm's partial volume and a fold carry on sideways
    out: list[dict[str, Any]] = []
    spa = np.asarray(sp)
    for (k, j, i), h in zip(pk, vals):
        r_out = 1.5 * h + 3.0
        n = np.ceil(r_out / spa).astype(int)
        lo = np.maximum([k, j, i] - n, 0)
        hi = np.minimum(np.array([k, j, i]) + n + 1, base.vol.shape)
        win = tuple(slice(a, b) for a, b in zip(lo, hi))
        zz, yy, xx = np.ogrid[win]
        d = np.sqrt(((zz - k) * spa[0]) ** 2 + ((yy - j) * spa[1]) ** 2 + ((xx - i) * spa[2]) ** 2)
        ring = base.mask[win] & (d >= 1.2 * h + 1.5) & (d <= r_out)
        if ring.sum() < 8:
            continue
        around = float(solid[win][ring].mean())
        out.append({"ijk": base.offset + base.scale * np.array([i, j, k], dtype=float),
                     "radius": float(max(h, 2.0)), "sigma": 0.0, "source": "pleural", "around": around})
    out = [c for c in out if c["around"] <= max_around]
    out.sort(key=lambda c: c["around"])
    return out[:max_n]


def _shallow_cap_candidates(base: _Level, anat: Anatomy, paren: float, max_n: int = SHALLOW_CAP_SEEDS,
                            wall: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Candidates for small nodules on the pleura, which stand only one search voxel proud of it.

    A 4-5 mm nodule centred on the pleura rises about 2 mm into the lung: on the search grid it is a
    single voxel of partial volume against the wall, so it is neither a depth peak for
    :func:`_pleural_candidates` nor a blob to the Hessian filter. Here every solid voxel against the
    wall that is a local maximum of its depth (ties broken by density) is a site, and the sites are
    ranked by their excess density: the lung side's mean density within ~1.5 mm minus that within
    ~4 mm (a cap is denser than the pleura beside it; smooth pleura and its partial volume are not).
    Bone inside the closed lung mask (HU over 150) and the mediastinal surface are left out: a site
    within ``SHALLOW_CAP_MEDIASTINUM_MM`` of the mediastinum, heart, aorta or airways, or whose wall
    within ``HILAR_LOOK_MM`` is mostly mediastinal rather than ribs and spine (hilar vessels crowd
    there, and their stumps look like caps). The best ``max_n`` are segmented and scored like any
    other candidate."""
    sp = (base.spacing[2], base.spacing[1], base.spacing[0])  # k, j, i
    wd = wall if wall is not None else _wall_depth(base)
    if wd is None:
        return []
    solid, depth, to_wall = wd
    vmin = min(base.spacing)
    sel = solid & (to_wall <= 1.5 * max(base.spacing)) & (depth >= vmin - 1e-6) & (base.vol < 150.0)
    if not sel.any():
        return []
    soft = np.where(solid, depth + (base.vol + 1000.0) / 2000.0, 0.0)
    win = tuple(max(3, 2 * int(round(4.0 / s)) + 1) for s in sp)
    pk = np.argwhere(sel & (soft >= ndi.maximum_filter(soft, size=win, mode="constant")))
    if len(pk) == 0:
        return []
    dens = np.where(base.mask, np.clip((base.vol - paren) / (40.0 - paren), 0.0, 1.0), 0.0).astype(np.float32)
    inside = base.mask.astype(np.float32)
    near_s, far_s = [1.5 / s for s in sp], [4.0 / s for s in sp]
    near = ndi.gaussian_filter(dens, near_s) / np.maximum(ndi.gaussian_filter(inside, near_s), 0.05)
    far = ndi.gaussian_filter(dens, far_s) / np.maximum(ndi.gaussian_filter(inside, far_s), 0.05)
    excess = (near - far)[tuple(pk.T)]
    g = anat.grid
    gsp = np.array([g.spacing[2], g.spacing[1], g.spacing[0]], dtype=float)
    n = np.maximum(1, np.round(SHALLOW_CAP_MEDIASTINUM_MM / gsp).astype(int))
    out: list[tuple[float, np.ndarray]] = []
    for q in np.argsort(-excess):
        if len(out) >= max_n:
            break
        k, j, i = pk[q]
        full = base.offset + base.scale * np.array([i, j, k], dtype=float)
        w = np.clip(np.round((full[::-1] - np.asarray(g.offset)) / np.asarray(g.factors)).astype(int), 0,
                    np.asarray(g.shape) - 1)
        lo, hi = np.maximum(w - n, 0), w + n + 1
        if np.isin(anat.labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], _MEDIASTINAL_LABELS).any():
            continue
        if _mediastinal_share(anat, full[::-1][None, :]) > 0.5:
            continue
        out.append((float(excess[q]), full))
    return [{"ijk": f, "radius": 2.0, "sigma": 0.0, "source": "pleural", "shallow": True, "excess": e}
            for e, f in out]


def _nms(cands: list[dict[str, Any]], spacing: tuple[float, float, float]) -> list[dict[str, Any]]:
    sp = np.asarray(spacing, dtype=float)
    kept: list[dict[str, Any]] = []
    pts: list[np.ndarray] = []
    rads: list[float] = []
    for c in cands:
        p = c["ijk"] * sp
        ok = True
        for q, r in zip(pts, rads):
            if np.linalg.norm(p - q) < 0.8 * max(r, c["radius"]):
                ok = False
                break
        if ok:
            kept.append(c)
            pts.append(p)
            rads.append(c["radius"])
        if len(kept) >= MAX_CANDIDATES:
            break
    return kept


# ----------------------------------------------------------------------------------------------
# segmentation and measurement at full resolution


def _roi_bounds(series: Series, center_ijk: np.ndarray, half_mm: float) -> tuple[slice, slice, slice]:
    nk, nj, ni = series.shape
    di, dj, dk = (float(s) for s in series.spacing)
    c = np.round(center_ijk).astype(int)
    hi_, hj, hk = (int(np.ceil(half_mm / s)) for s in (di, dj, dk))
    return (slice(max(0, c[2] - hk), min(nk, c[2] + hk + 1)), slice(max(0, c[1] - hj), min(nj, c[1] + hj + 1)),
            slice(max(0, c[0] - hi_), min(ni, c[0] + hi_ + 1)))


def _axial_diameters(sl_mask: np.ndarray, weights: np.ndarray, di: float, dj: float) -> tuple[float, float]:
    """Long (max Feret) and short (max width perpendicular) axial diameters of a 2-D mask, mm.

    Uses the pixel-edge hull (each pixel as a square) corrected by the mean partial-volume border
    so that a half-maximum mask of a disc of diameter d measures ~d.
    """
    jj, ii = np.nonzero(sl_mask)
    if jj.size == 0:
        return 0.0, 0.0
    # corners of every pixel in mm
    cj = np.concatenate([jj - 0.5, jj - 0.5, jj + 0.5, jj + 0.5]) * dj
    ci = np.concatenate([ii - 0.5, ii + 0.5, ii - 0.5, ii + 0.5]) * di
    pts = np.stack([ci, cj], axis=1)
    if pts.shape[0] > 4:
        try:
            from scipy.spatial import ConvexHull

            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # degenerate (a line of pixels)
            pass
    d = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=-1)
    a, b = np.unravel_index(int(np.argmax(d)), d.shape)
    long_ = float(d[a, b])
    u = (pts[b] - pts[a]) / max(long_, 1e-9)
    perp = np.array([-u[1], u[0]])
    proj = pts @ perp
    short = float(proj.max() - proj.min())
    return long_, short


def _sphere_dirs(n: int = RAY_DIRS) -> np.ndarray:
    """``n`` nearly uniform unit vectors (Fibonacci sphere), rows (x, y, z)."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = np.pi * (3.0 - np.sqrt(5.0)) * k
    rr = np.sqrt(1.0 - z * z)
    return np.stack([rr * np.cos(phi), rr * np.sin(phi), z], axis=1)


def _ray_lengths(inside: np.ndarray, c_kji: np.ndarray, sp_kji: tuple[float, float, float], r_max: float,
                 dirs: np.ndarray, step: float = 0.25) -> np.ndarray:
    """Distance (mm) from ``c_kji`` (ROI voxel, continuous) along each direction to the first sample
    outside ``inside`` (trilinear, >= 0.5), capped at ``r_max``: the blob's radius in every direction."""
    n = int(np.ceil(r_max / step))
    t = (np.arange(n) + 1) * step
    sp = np.asarray(sp_kji, dtype=float)
    d_kji = dirs[:, ::-1] / sp  # mm direction (x, y, z) -> voxel steps (k, j, i)
    pts = c_kji[None, None, :] + t[None, :, None] * d_kji[:, None, :]
    vals = ndi.map_coordinates(inside.astype(np.float32), pts.reshape(-1, 3).T, order=1, mode="constant",
                               cval=0.0).reshape(len(dirs), n)
    out = vals < 0.5
    first = np.where(out.any(axis=1), out.argmax(axis=1), n)
    return np.minimum(t[np.minimum(first, n - 1)] * (first < n) + r_max * (first >= n), r_max)


def _ray_shape(r: np.ndarray, dirs: np.ndarray) -> dict[str, float]:
    """Statistics of a blob's ray lengths: median radius, the share of rays running on (into a vessel
    or along one), how round the rest is (CV), and how one-sided the long rays are (norm of their
    mean direction: a vessel passing a nodule lies on one side of it, a tube through the centre or a
    bifurcation spreads them out)."""
    med = float(np.median(r))
    long_ = r > 1.5 * med
    short = ~long_
    cv = float(np.std(r[short]) / max(np.mean(r[short]), 1e-6)) if short.sum() >= 5 else 1.0
    asym = float(np.linalg.norm(dirs[long_].mean(axis=0))) if long_.sum() >= 3 else 1.0
    return {"r_med": med, "f_long": float(long_.mean()), "ray_cv": cv, "long_asym": asym}


def _constrained_blob(above: np.ndarray, allowed: np.ndarray, c_kji: np.ndarray, sp_kji: tuple[float, float, float],
                      r: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    """The juxtavascular hypothesis of :func:`_segment`: (structure, ball part, ray statistics)."""
    inside = above & allowed
    lab, n = ndi.label(inside)
    if n == 0:
        return None
    dirs = _sphere_dirs()
    shape = np.array(inside.shape)
    sp = np.asarray(sp_kji, dtype=float)
    cc = c_kji.copy()
    r_max = max(3.0 * r, 8.0)
    rl = np.zeros(len(dirs))
    for _ in range(3):
        if not inside[tuple(np.clip(np.round(cc).astype(int), 0, shape - 1))]:
            return None
        rl = _ray_lengths(inside, cc, sp_kji, r_max, dirs)
        med = float(np.median(rl))
        rc = np.where(rl > 1.5 * med, med, rl)  # rays into the vessel count as the ball's radius
        shift = 3.0 * (rc[:, None] * dirs).mean(axis=0)  # mm (x, y, z): a ball's rays are symmetric
        cc = np.clip(cc + shift[::-1] / sp, 0, shape - 1)
    ci = tuple(np.round(cc).astype(int))
    if not inside[ci]:
        return None
    rl = _ray_lengths(inside, cc, sp_kji, r_max, dirs)
    ray = _ray_shape(rl, dirs)
    obj = lab == lab[ci]
    K, J, I_ = np.ogrid[:shape[0], :shape[1], :shape[2]]
    d2 = ((K - cc[0]) * sp[0]) ** 2 + ((J - cc[1]) * sp[1]) ** 2 + ((I_ - cc[2]) * sp[2]) ** 2
    ball = obj & (d2 <= (1.15 * ray["r_med"] + 0.5 * max(sp[1], sp[2])) ** 2)
    lab2, n2 = ndi.label(ball)
    if n2 == 0 or not lab2[ci]:
        return None
    return obj, lab2 == lab2[ci], ray


def _cap_model_fit(sm: np.ndarray, lung: np.ndarray, bone: np.ndarray, cen_mm: np.ndarray, r0: float,
                   sp_kji: tuple[float, float, float], bg: float) -> dict[str, Any] | None:
    """Size a nodule on the pleura from its image, not from its visible surface: the HU around it are
    fitted by a blurred model of the chest wall (a half-space beyond a plane) united with a sphere,
    both at soft-tissue density over the local parenchyma. The part of the sphere inside the wall is
    invisible, but the visible cap's height and base width fix its radius, and partial volume at the
    cap's thin rim is modelled instead of thresholded away (a 5 mm nodule two voxels proud of the
    pleura). ``cen_mm``: the visible blob's centroid (ROI mm, i j k order); ``r0``: a radius estimate.
    Returns radius, nodule density (0-1 of the wall's), blur, the plane's offset from the centre and the
    robust residual; None when the fit does not converge or the wall is not seen."""
    from scipy.optimize import least_squares
    from scipy.special import ndtr

    dk, dj, di = sp_kji
    r0 = max(r0, 1.5)
    win = r0 + max(4.0, r0)
    K, J, I_ = np.ogrid[:sm.shape[0], :sm.shape[1], :sm.shape[2]]
    d2 = (I_ * di - cen_mm[0]) ** 2 + (J * dj - cen_mm[1]) ** 2 + (K * dk - cen_mm[2]) ** 2
    sel = d2 <= win * win
    wall_vox = sel & ~lung & ~bone
    if wall_vox.sum() < 10 or (sel & lung).sum() < 10:
        return None
    level = float(np.median(sm[wall_vox]))
    if level - bg < 300.0:
        return None
    kk, jj, ii = np.nonzero(sel)
    X = np.stack([ii * di, jj * dj, kk * dk], axis=1)
    u = np.clip((sm[sel] - bg) / (level - bg), 0.0, 1.0)
    in_wall = ~lung[sel]
    if len(u) > CAP_FIT_MAX_VOXELS:  # a large nodule: an even subsample of its window is plenty
        keep = np.linspace(0, len(u) - 1, CAP_FIT_MAX_VOXELS).astype(int)
        X, u, in_wall = X[keep], u[keep], in_wall[keep]
    wk, wj, wi = np.nonzero(wall_vox)
    n0 = np.array([wi.mean() * di, wj.mean() * dj, wk.mean() * dk]) - cen_mm
    if np.linalg.norm(n0) < 1e-6:
        return None
    n0 /= np.linalg.norm(n0)
    t = (X - cen_mm) @ n0
    edge = t[in_wall & (u > 0.5)]
    d0 = float(np.percentile(edge, 10)) if edge.size else r0
    th0, ph0 = float(np.arccos(np.clip(n0[2], -1, 1))), float(np.arctan2(n0[1], n0[0]))

    # each voxel is the mean of its volume: sub-samples along the axes thicker than 1 mm
    offs = [((np.arange(2) + 0.5) / 2.0 - 0.5) * sp if sp > 1.0 else np.zeros(1) for sp in (di, dj, dk)]
    sub = np.stack(np.meshgrid(*offs, indexing="ij"), axis=-1).reshape(-1, 3)
    Xs = (X[:, None, :] + sub[None, :, :]).reshape(-1, 3)
    m_sub = sub.shape[0]

    def parts(p: np.ndarray) -> tuple[np.ndarray, ...]:
        cx, cy, cz, rad, th, ph, d, a, sblur = p
        n = np.array([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)])
        rel = Xs - np.array([cx, cy, cz])
        dw = rel @ n - d  # signed distance into the wall
        dist = np.maximum(np.sqrt((rel * rel).sum(axis=1)), 1e-9)
        db = rad - dist  # ... into the sphere
        return n, rel, dw, dist, db

    def model(p: np.ndarray) -> np.ndarray:
        a, sblur = p[7], p[8]
        _, _, dw, _, db = parts(p)
        # the blurred union: the signed distance to it is the larger of the two (exact outside both); a
        # nodule less dense than the wall (density a) shows as less where only the sphere is
        occ = ndtr(np.maximum(dw, db) / sblur) - (1.0 - a) * np.clip(ndtr(db / sblur) - ndtr(dw / sblur), 0.0, None)
        return occ.reshape(-1, m_sub).mean(axis=1) - u

    def jac(p: np.ndarray) -> np.ndarray:
        th, ph, a, sblur = p[4], p[5], p[7], p[8]
        n, rel, dw, dist, db = parts(p)
        dn_th = np.array([np.cos(th) * np.cos(ph), np.cos(th) * np.sin(ph), -np.sin(th)])
        dn_ph = np.array([-np.sin(th) * np.sin(ph), np.sin(th) * np.cos(ph), 0.0])
        # d(dw)/dp and d(db)/dp, columns cx cy cz rad th ph d a s
        g_w = np.zeros((len(dw), 9))
        g_w[:, :3] = -n
        g_w[:, 4], g_w[:, 5], g_w[:, 6] = rel @ dn_th, rel @ dn_ph, -1.0
        g_b = np.zeros((len(db), 9))
        g_b[:, :3] = rel / dist[:, None]
        g_b[:, 3] = 1.0
        top = np.where((dw >= db)[:, None], g_w, g_b)
        zm, zw, zb = np.maximum(dw, db) / sblur, dw / sblur, db / sblur
        pm, pw, pb = (np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi) for z in (zm, zw, zb))
        J = (pm / sblur)[:, None] * top
        J[:, 8] = -pm * zm / sblur
        on = (ndtr(zb) - ndtr(zw)) > 0
        dD = (pb / sblur)[:, None] * g_b - (pw / sblur)[:, None] * g_w
        dD[:, 8] = -pb * zb / sblur + pw * zw / sblur
        J -= (1.0 - a) * np.where(on[:, None], dD, 0.0)
        J[:, 7] = np.where(on, ndtr(zb) - ndtr(zw), 0.0)
        return J.reshape(-1, m_sub, 9).mean(axis=1)

    lo = np.array([*(cen_mm - 2.0 * r0 - 3.0), 0.5, -np.inf, -np.inf, -4.0 * r0 - 5.0, 0.4, 0.3])
    hi = np.array([*(cen_mm + 2.0 * r0 + 3.0), 3.0 * r0 + 3.0, np.inf, np.inf, 4.0 * r0 + 5.0, 1.2, 2.5])
    # a shallow cap is nearly as well explained by a smaller sphere less deep in the wall: start from a few
    # radii with the same cap (the centre moved along the normal) and keep the best fit
    h0 = r0 + d0
    res = None
    for k in (1.0, 1.6, 2.4):
        rad0 = k * r0
        p0 = np.array([*(cen_mm + (rad0 - r0) * n0), rad0, th0, ph0, h0 - rad0, 1.0, 0.8])
        try:
            r_ = least_squares(model, np.clip(p0, lo + 1e-6, hi - 1e-6), jac=jac, bounds=(lo, hi),
                               loss="soft_l1", f_scale=0.15, max_nfev=60, tr_solver="lsmr")
        except (ValueError, np.linalg.LinAlgError):
            continue
        if r_.success and (res is None or r_.cost < res.cost):
            res = r_
    if res is None:
        return None
    cx, cy, cz, rad, th, ph, d, a, sblur = res.x
    return {"radius": float(rad), "at_bound": bool(rad >= 0.98 * hi[3] or rad <= 1.02 * lo[3]),
            "density": float(a), "blur": float(sblur), "plane_offset": float(d),
            "height": float(min(rad + d, 2.0 * rad)),  # how far the sphere stands out of the wall
            "nfev": int(res.nfev), "resid": float(np.sqrt(np.mean(res.fun ** 2))),
            "center": [float(cx), float(cy), float(cz)]}


def _size_cap(seg: dict[str, Any]) -> None:
    """Size a juxtapleural blob by the wall+sphere model (:func:`_cap_model_fit`) when the fit is good and
    the cap stands out of the wall by most of a voxel; else it keeps the free-surface sphere's size."""
    args = seg.pop("_cap_args", None)
    if args is None or seg["mean_d"] > CAP_FIT_MAX_MM:
        return  # a large cap: its visible surface sizes it well, and the wall is no plane over its window
    fit = _cap_model_fit(*args)
    seg["cap_fit"] = fit
    sp_kji = args[5]
    if (fit is None or fit["resid"] > CAP_FIT_MAX_RESID or fit["at_bound"]
            or fit["height"] < 0.7 * 0.5 * (sp_kji[1] + sp_kji[2])
            or fit["radius"] > CAP_FIT_MAX_MM):  # a sphere this large under a small cap is the wall's curve
        return
    d_cap = 2.0 * fit["radius"]
    seg["long"] = float(np.clip(seg["long"], d_cap, 1.25 * d_cap))
    seg["short"] = 2.0 * d_cap - seg["long"]
    seg["mean_d"] = d_cap
    seg["volume"] = float(np.pi / 6.0 * d_cap ** 3)
    seg["eq_d"] = d_cap
    fit["used"] = True


def _segment(series: Series, center_ijk: np.ndarray, radius_mm: float, paren_hint: float | None,
             lung_closed_full: np.ndarray | None = None, roi_half_mm: float | None = None,
             closing_mm: float | None = None, constrain: bool = False) -> dict[str, Any] | None:
    """Segment the blob near ``center_ijk`` (continuous i, j, k; radius estimate ``radius_mm``) in an
    ROI and measure it. ``lung_closed_full``: the anatomy's closed lung mask resampled onto the ROI
    (optional; it keeps the segmentation on the lung side of the pleura). ``closing_mm``: radius of
    the rolling ball that defines the lung side locally (default: scaled to the blob). ``constrain``:
    the juxtavascular hypothesis — the blob is a ball on a structure as thick as itself, which no
    opening separates: rays cast from the candidate's centre (re-centred on the ball) measure its
    radius in every direction; the blob is what lies within 1.15 median radii, and the rays that run
    on (into the vessel) are measured. None when nothing fits."""
    di, dj, dk = (float(s) for s in series.spacing)
    sp_kji = (dk, dj, di)
    r = float(np.clip(radius_mm, 1.5, 35.0))
    half = roi_half_mm if roi_half_mm is not None else max(3.0 * r + 6.0, 14.0)
    sk, sj, si = _roi_bounds(series, center_ijk, half)
    roi = series.pixels[sk, sj, si].astype(np.float32)
    if min(roi.shape) < 2:
        return None
    sigma_vox = [min(0.8, 0.6 / s) for s in sp_kji]
    sm = ndi.gaussian_filter(roi, sigma_vox, mode="nearest")
    c = np.array([center_ijk[2] - sk.start, center_ijk[1] - sj.start, center_ijk[0] - si.start])
    ci = np.clip(np.round(c).astype(int), 0, np.array(roi.shape) - 1)
    K, J, I_ = np.ogrid[:roi.shape[0], :roi.shape[1], :roi.shape[2]]
    dist2 = ((K - c[0]) * dk) ** 2 + ((J - c[1]) * dj) ** 2 + ((I_ - c[2]) * di) ** 2
    # core: robust peak near the centre
    inner = dist2 <= max(0.5 * r, 1.2 * max(di, dj)) ** 2
    smc = np.minimum(sm, 150.0)  # a rib next to a juxtapleural nodule must not set its core
    core = float(np.percentile(smc[inner], 60)) if inner.any() else float(smc[tuple(ci)])
    # bone (a rib or vertebra the rolling ball brought in) is never part of a nodule; calcified
    # nodules are the price (they are benign by pattern anyway)
    bone = ndi.binary_dilation(sm > 300.0, iterations=1)
    # the lung side of the pleura: local air closed with a rolling ball wider than the blob
    air = sm < -400.0
    if air.sum() < 0.05 * air.size:
        return None
    R = closing_mm if closing_mm is not None else _local_ball_mm(r)
    lung = np.empty_like(air)
    for k in range(air.shape[0]):
        lung[k] = ndi.binary_fill_holes(close_disk(air[k], R, dj, di, pad_mode="edge")) | air[k]
    if lung_closed_full is not None and lung_closed_full.shape == lung.shape:
        lung &= ndi.binary_dilation(lung_closed_full, iterations=2)
    bg_vals = sm[air & lung & (dist2 > (1.5 * r) ** 2)]
    if bg_vals.size < 20:
        bg_vals = sm[air]
    bg = float(np.median(bg_vals)) if bg_vals.size else (paren_hint if paren_hint is not None else -850.0)
    # local noise of the parenchyma at the blob's scale (robust spread of the lightly smoothed HU)
    noise = float(1.4826 * np.median(np.abs(bg_vals - bg))) if bg_vals.size >= 20 else 30.0
    contrast = core - bg
    if contrast < 80.0:
        return None
    def grow_from(thr: float, ci: np.ndarray, dist2: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, float] | None:
        """Threshold, centre component, vessel detachment: (obj, final, raw voxels, kept fraction)."""
        obj = (sm > thr) & lung & ~bone
        lab, n = ndi.label(obj)
        if n == 0:
            return None
        cid = int(lab[tuple(ci)])
        if cid == 0:
            near = dist2 <= (0.6 * r + max(di, dj)) ** 2
            ids = lab[near & (lab > 0)]
            if ids.size == 0:
                return None
            cid = int(np.bincount(ids).argmax())
        obj = lab == cid
        raw_n = int(obj.sum())
        # vessel detachment: an opening scaled to the blob's own thickness (its largest inscribed
        # sphere near the candidate, from the distance transform) cuts vessels thinner than ~2/3 of
        # it; the centre component is then given back what the opening shaved off the nodule itself
        # (the chest wall counts as solid here, so a nodule cut flat by the pleura keeps its size)
        final = obj
        opened_frac = 1.0
        edt_obj = ndi.distance_transform_edt(obj, sampling=sp_kji)
        edt = ndi.distance_transform_edt(obj | ~lung, sampling=sp_kji)
        search = obj & (dist2 <= (r + 3.0) ** 2)
        if search.any():
            r_in = float(edt_obj[search].max())
            ro = 0.65 * r_in
            if ro >= 1.05 * max(di, dj):
                er = (edt > ro) & obj
                lab2, n2 = ndi.label(er)
                if n2:
                    pk = np.unravel_index(int(np.argmax(np.where(search, edt, -1.0))), edt.shape)
                    cid2 = int(lab2[pk])
                    if cid2 == 0:
                        ids = lab2[search & (lab2 > 0)]
                        cid2 = int(np.bincount(ids).argmax()) if ids.size else 0
                    if cid2:
                        core_er = lab2 == cid2
                        grow = ndi.distance_transform_edt(~core_er, sampling=sp_kji) <= ro + 0.75 * max(di, dj)
                        final = obj & grow
                        opened_frac = float(final.sum()) / max(raw_n, 1)
        lab3, n3 = ndi.label(final)
        if n3 > 1:
            cid3 = int(lab3[tuple(ci)]) or int(np.bincount(lab3[lab3 > 0]).argmax())
            final = lab3 == cid3
        return obj, final, raw_n, opened_frac

    thr = bg + 0.5 * contrast
    res = grow_from(thr, ci, dist2)
    if res is None:
        return None
    # second pass: the core measured inside the segmented blob itself (the candidate's centre may
    # sit off the nodule, e.g. on a juxtapleural one), then the half-maximum threshold again
    fin0 = res[1]
    core_first = core
    if fin0.sum() >= 3:
        core2 = float(np.percentile(smc[fin0], 75))
        if abs(core2 - core) > 0.1 * contrast and core2 - bg >= 80.0:
            core = core2
            contrast = core - bg
            thr = bg + 0.5 * contrast
            # re-seed at the blob's own centre
            fk_, fj_, fi_ = np.nonzero(fin0)
            cc = np.array([fk_.mean(), fj_.mean(), fi_.mean()])
            m = int(np.argmin((fk_ - cc[0]) ** 2 + (fj_ - cc[1]) ** 2 + (fi_ - cc[2]) ** 2))
            ci2 = np.array([fk_[m], fj_[m], fi_[m]])
            d2b = ((K - ci2[0]) * dk) ** 2 + ((J - ci2[1]) * dj) ** 2 + ((I_ - ci2[2]) * di) ** 2
            res2 = grow_from(thr, ci2, d2b)
            if res2 is not None and res2[1].sum() >= 0.4 * fin0.sum():
                res = res2
                ci, dist2 = ci2, d2b
            else:
                contrast = core_first - bg
                core = core_first
                thr = bg + 0.5 * contrast
    obj, final, raw_n, opened_frac = res
    ray: dict[str, Any] = {}
    if constrain:
        cons = _constrained_blob(sm > thr, lung & ~bone, c.astype(float), sp_kji, r)
        if cons is None:
            return None
        obj, final, ray = cons
        raw_n = int(obj.sum())
        opened_frac = float(final.sum()) / max(raw_n, 1)
    nvox = int(final.sum())
    if nvox == 0:
        return None
    vox = di * dj * dk
    # touching the ROI border = it runs on (vessel, chest wall, diaphragm)
    border = np.zeros(final.shape, dtype=bool)
    border[[0, -1], :, :] = True
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    border_frac = float((final & border).sum()) / max(1, nvox)
    kk, jj, ii = np.nonzero(final)
    pts = np.stack([ii * di, jj * dj, kk * dk], axis=1)
    cen = pts.mean(axis=0)
    cov = np.cov((pts - cen).T) if nvox > 3 else np.eye(3)
    cov = cov + np.diag([di * di, dj * dj, dk * dk]) / 12.0
    ev = np.clip(np.linalg.eigvalsh(cov), 1e-6, None)
    elong = float(np.sqrt(ev[-1] / ev[0]))
    # partial-volume-aware volume: weights in a one-voxel shell around the mask
    shell = ndi.binary_dilation(final) & ~final & ~(sm > thr)
    w = np.clip((sm[shell] - bg) / max(contrast, 1e-6), 0.0, 1.0)
    inside_w = np.clip((sm[final] - bg) / max(contrast, 1e-6), 0.0, 1.0)
    vol_hm = nvox * vox
    vol_pv = float(inside_w.sum() + w.sum()) * vox
    volume = 0.5 * (vol_hm + vol_pv)
    # best axial slice: largest area
    areas = final.sum(axis=(1, 2))
    kbest = int(np.argmax(areas))
    long_, short = _axial_diameters(final[kbest], sm[kbest], di, dj)
    # pixel-edge hull over-measures by ~ one pixel minus the partial-volume border: correct by the
    # area-equivalent check (an ellipse with these axes has area pi/4 * L * S)
    area = float(areas[kbest]) * di * dj
    if long_ > 0 and short > 0:
        k_corr = np.sqrt(area / (np.pi / 4.0 * long_ * short))
        k_corr = float(np.clip(k_corr, 0.8, 1.0))
        long_ *= k_corr
        short *= k_corr
    mean_d = 0.5 * (long_ + short)
    eq_d = float((6.0 * volume / np.pi) ** (1.0 / 3.0))
    vals = roi[final]
    mean_hu = float(vals.mean())
    solid_frac = float((sm[final] > -250.0).mean())
    if core < -300.0 and solid_frac < 0.15:
        att = "ground-glass"
    elif solid_frac < 0.6 and core > -300 and float(np.percentile(sm[final], 20)) < -450:
        att = "part-solid"
    else:
        att = "solid" if core >= -300.0 else "ground-glass"
    box = [int(ii.min() + si.start), int(jj.min() + sj.start), int(kk.min() + sk.start),
           int(ii.max() + si.start), int(jj.max() + sj.start), int(kk.max() + sk.start)]
    center_ijk_out = np.array([cen[0] / di + si.start, cen[1] / dj + sj.start, cen[2] / dk + sk.start])
    lung_frac = float(lung[final].mean())
    # contact with the chest wall (outside the lung side of the pleura): juxtapleural
    bnd = ndi.binary_dilation(final) & ~final
    wall = bnd & ~lung
    wall_frac = float(wall.sum()) / max(1, int(bnd.sum()))
    # where the contact lies (series voxels, k j i; a subsample), for the anatomy's labels beyond it
    wall_kji = np.argwhere(wall) + np.array([sk.start, sj.start, si.start])
    wall_kji = wall_kji[::max(1, len(wall_kji) // 200)]
    # branches leaving a shell around the blob (vessels run through it, a nodule does not)
    K2 = (K * dk - cen[2]) ** 2 + (J * dj - cen[1]) ** 2 + (I_ * di - cen[0]) ** 2
    R = 0.5 * eq_d + max(2.5, 0.3 * eq_d)
    th = max(di, dj, dk)
    shell = (K2 >= R * R) & (K2 < (R + th) ** 2)
    cross = obj & shell & lung
    shell_ratio = float(cross.sum()) * vox / th / (np.pi * (0.5 * eq_d) ** 2)
    # what the opening kept of the structure near the blob (the ROI-wide share above counts the whole
    # vessel tree in the ROI, which grows with the ROI: a large nodule on vessels looks "mostly vessel")
    near_obj = obj & (K2 <= (0.5 * eq_d + max(2.0, 0.25 * eq_d)) ** 2)
    opened_local = float((final & near_obj).sum()) / max(int(near_obj.sum()), 1)
    n_branch = int(ndi.label(cross, structure=np.ones((3, 3, 3), bool))[1]) if cross.any() else 0
    juxta = wall_frac >= 0.12
    sphere_rms, r_fit = 1.0, 0.5 * mean_d
    if juxta:
        # a nodule cut by the pleura: fit a sphere to its free (lung-facing) surface
        free = bnd & lung & ~(sm > thr)
        fk, fj, fi = np.nonzero(free)
        if fk.size >= 12:
            P = np.stack([fi * di, fj * dj, fk * dk], axis=1)
            A = np.concatenate([2.0 * P, np.ones((P.shape[0], 1))], axis=1)
            sol, *_ = np.linalg.lstsq(A, (P ** 2).sum(axis=1), rcond=None)
            r_fit = float(np.sqrt(max(sol[3] + float(sol[:3] @ sol[:3]), 0.0)))
            # how well a sphere explains the free surface (a cap: well; a vessel stump or a fold: not)
            resid = np.linalg.norm(P - sol[:3], axis=1) - r_fit
            sphere_rms = float(np.sqrt(np.mean(resid ** 2)) / max(r_fit, 1e-6))
            d_fit = 2.0 * r_fit - 0.5 * (di + dj)  # outer boundary voxels sit half a voxel out
            if mean_d < d_fit <= 2.2 * max(mean_d, 1.0) and d_fit <= 1.6 * long_ + 2.0 * max(di, dj):
                long_ = max(long_, d_fit)
                short = max(short, 2.0 * d_fit - long_)
                mean_d = 0.5 * (long_ + short)
                volume = max(volume, np.pi / 6.0 * d_fit ** 3)
    return {
        # what the wall+sphere model of a cap needs (fitted only for the hypothesis kept: _size_cap)
        "_cap_args": (sm, lung, bone, cen, max(r_fit, 0.5 * mean_d), sp_kji, bg) if juxta else None,
        **ray, "constrained": constrain, "wall_kji": wall_kji,
        "z_extent_mm": float((kk.max() - kk.min() + 1) * dk), "sphere_rms": sphere_rms,
        "opened_local": opened_local, "r_fit": r_fit,
        "voxel_in_plane_mm": 0.5 * (di + dj), "voxel_mm3": vox, "noise": noise, "wall_frac": wall_frac,
        "shell_ratio": shell_ratio, "n_branch": n_branch, "juxtapleural": juxta,
        "center_ijk": center_ijk_out, "bbox_vox": box, "nvox": nvox, "volume": volume, "eq_d": eq_d,
        "long": long_, "short": short, "mean_d": mean_d, "slice_index": kbest + sk.start,
        "elong": elong, "border_frac": border_frac, "opened_frac": opened_frac, "core": core, "bg": bg,
        "contrast": contrast, "mean_hu": mean_hu, "attenuation": att, "lung_frac": lung_frac,
        "raw_n": raw_n, "extent_mm": float(np.sqrt(ev[-1]) * np.sqrt(20.0)),
    }


def _ramp(x: float, zero: float, one: float) -> float:
    """0 at ``zero``, 1 at ``one`` (either order), linear between."""
    if one == zero:
        return 1.0 if x >= one else 0.0
    return float(np.clip((x - zero) / (one - zero), 0.0, 1.0))


def _used_cap(seg: dict[str, Any]) -> dict[str, Any] | None:
    """The wall+sphere fit that sized this blob, if one did (:func:`_size_cap`)."""
    fit = seg.get("cap_fit")
    return fit if isinstance(fit, dict) and fit.get("used") else None


def _cap_volume(fit: dict[str, Any]) -> float:
    """mm3 of the fitted sphere out of the wall (a spherical cap of the fitted height)."""
    r = float(fit["radius"])
    h = float(np.clip(fit["height"], 0.0, 2.0 * r))
    return float(np.pi * h * h * (3.0 * r - h) / 3.0)


def _confidence(seg: dict[str, Any], cand: dict[str, Any], assume_cap: bool = False) -> float:
    """0-1 plausibility that a segmented blob is a nodule rather than a vessel, the wall or noise.
    ``assume_cap``: a blob on the pleura scored without the free-surface shape tests (the plausibility
    it would have if the wall+sphere model explained it: whether that model is worth fitting).

    Evidence used (each a soft ramp; their product is the score):
    - compactness: elongation of the 3-D inertia ellipsoid (a juxtapleural nodule, cut flat by
      the pleura, is allowed more);
    - blobness: l3/l1 of the Hessian at the detected scale (1 for a ball, 0 for a tube);
    - normalised dot response: the filter response per HU of contrast (shape only);
    - vessel burden: cross-section of the thresholded structure leaving a shell around the blob,
      relative to the blob's own (vessels run through, a nodule does not);
    - what the opening kept (a blob made mostly of vessel is not a nodule);
    - contrast against the local parenchyma and size.
    """
    rn = cand.get("resp", 0.0) / max(seg["contrast"], 1.0) if "resp" in cand else 0.15
    blob = cand.get("blob", 0.8)
    s = 1.0
    if seg.get("constrained"):
        # juxtavascular hypothesis: a ball on a vessel about as thick as itself. The rays from its
        # centre end at one radius except those that run into the vessel, and those lie on one side
        # of it (a vessel passing by); a bend or a bifurcation spreads them over several sides, a tube
        # through the centre sends them both ways. Only for small balls (the opening of the default
        # hypothesis separates a nodule thicker than ~1.5x its vessel), and only dense ones: a small
        # vessel's partial volume keeps its contrast low.
        s *= _ramp(seg["elong"], 1.6, 1.45)
        s *= _ramp(seg.get("ray_cv", 1.0), 0.2, 0.15)
        s *= _ramp(seg.get("f_long", 1.0), 0.3, 0.2)
        s *= _ramp(seg.get("long_asym", 0.0), 0.6, 0.7)
        s *= _ramp(seg.get("r_med", 99.0), JV_MAX_RADIUS_MM + 0.5, JV_MAX_RADIUS_MM)
        s *= _ramp(blob, 0.55, 0.6)
        s *= _ramp(rn, 0.08, 0.09)
        s *= _ramp(seg["contrast"], 500.0, 600.0)
    elif seg.get("juxtapleural"):
        # the visible cap of a nodule on the pleura: flat on one side (elongated), but whole, not
        # fed by vessels, and dense; the hilum's vessel stumps are none of these. A cap is flatter than a
        # ball, so its Hessian blobness is lower; what marks it is that a sphere explains its free surface
        # (within the voxel grid's roughness)
        lim = 0.10 + 0.5 * seg.get("voxel_in_plane_mm", 1.0) / max(seg.get("r_fit", 1.0), 1.0)
        shape = (_ramp(seg["elong"], 3.6, 3.2)
                 * _ramp(seg["nvox"] * seg.get("voxel_mm3", 1.0), 20.0, 30.0)  # a visible cap, not a speck
                 * _ramp(seg.get("z_extent_mm", 99.0), 3.0, 4.0)  # on more than one thin slice
                 * _ramp(blob, 0.35, 0.45) * _ramp(rn, 0.035, 0.045)  # the seed's Hessian: a blob, if a flat one
                 * _ramp(seg.get("sphere_rms", 1.0), lim + 0.08, lim))
        cap = _used_cap(seg)
        if cap is not None and 2.0 * cap["radius"] <= CAP_SHAPE_MAX_MM:
            # or, for a small nodule, the wall+sphere model that sized it: its fit to the HU around the
            # cap stands for the thresholded free surface, which a small cap's partial volume makes ragged
            # (a 5 mm cap two voxels proud segments as a speck, or runs along the pleura), and for the
            # search grid's Hessian, on which it is a flat smudge at the lung's edge; the sphere must
            # stand out of the wall as a cap worth the name, and be solid (a faint sphere is a vessel's
            # partial volume or noise; a small ground-glass cap is not worth a false alarm). A larger cap's
            # free surface is tested as it is.
            shape = max(shape, _ramp(_cap_volume(cap), 10.0, 16.0)
                        * _ramp(cap["resid"], CAP_FIT_MAX_RESID, CAP_FIT_GOOD_RESID)
                        * _ramp(cap["density"], 0.55, 0.7))
        s *= 1.0 if assume_cap else shape
        s *= _ramp(seg["shell_ratio"], 0.4, 0.3)
        s *= _ramp(seg["opened_frac"], 0.7, 0.8)
        s *= _ramp(seg["contrast"], 400.0, 500.0)
        # at the hilum the pulmonary vessels leave the mediastinum: a blob on the mediastinal pleura
        # is taken for a nodule only as a clear cap (at least half of it free, no vessel leaving it)
        hilar = _ramp(seg.get("wall_med", 0.5), 0.5, 0.7)
        clear = (_ramp(seg["wall_frac"], 0.4, 0.35) * _ramp(float(seg.get("n_branch", 0)), 2.5, 1.5)
                 * _ramp(seg["shell_ratio"], 0.2, 0.12))
        s *= 1.0 - hilar * (1.0 - clear)
    else:
        el = seg["elong"]
        s *= _ramp(el, 2.1, 1.7)
        # a round blob that nothing leaves in 3-D (no vessel through its shell, nothing opened off) is
        # a ball whatever the Hessian says: a ground-glass nodule's soft, uneven density dilutes the
        # filter's blobness and response (not for small ones, where noise makes such blobs)
        iso = (_ramp(el, 1.5, 1.35) * _ramp(seg["shell_ratio"], 0.15, 0.05) * _ramp(seg["opened_frac"], 0.9, 0.97)
               * (1.0 if seg.get("n_branch", 0) == 0 else 0.0) * _ramp(seg["mean_d"], 6.0, 7.0))
        s *= _ramp(blob, 0.55 - 0.15 * iso, 0.65 - 0.15 * iso)
        # a round segmented blob that is also round to the Hessian is a ball even when the filter's
        # response is diluted (a large nodule between two scales, or on a vessel)
        round_ = max(_ramp(el, 1.45, 1.3) * _ramp(blob, 0.7, 0.75), iso)
        s *= _ramp(rn, 0.09 - 0.03 * round_, 0.11 - 0.03 * round_)
        # a compact blob may carry more vessel (juxtavascular); an elongated one may not
        compact = _ramp(el, 1.6, 1.4)
        sh_lim = 0.45 + 0.35 * compact
        s *= _ramp(seg["shell_ratio"], sh_lim + 0.15, sh_lim)
        op_lim = 0.5 - 0.2 * compact
        opened = max(seg["opened_frac"], round_ * seg.get("opened_local", 0.0))
        s *= _ramp(opened, op_lim - 0.1, op_lim)
        # vessels met by the shell grow with its area: allow more branches around a larger blob
        nb_lim = 4.0 * max(1.0, (seg.get("eq_d", 10.0) / 12.0) ** 2)
        s *= _ramp(float(seg.get("n_branch", 0)), nb_lim + 2.0, nb_lim)
    s *= _ramp(seg["contrast"], 100.0, 150.0)
    # small blobs must stand well out of the noise (low-dose scans make many); pure ground-glass
    # under 6 mm is not actionable (Lung-RADS 2) and is not worth a false alarm
    if seg["mean_d"] < 6.0:
        s *= _ramp(seg["contrast"], 300.0, 400.0)
        s *= _ramp(seg["contrast"] / max(seg.get("noise", 30.0), 1.0), 8.0, 12.0)
    s *= 1.0 if assume_cap else _ramp(seg["mean_d"], 2.5, 3.5)  # a cap's size is the model's to say
    s *= _ramp(seg["border_frac"], 0.1, 0.0)
    return float(np.clip(s, 0.0, 1.0))


# ----------------------------------------------------------------------------------------------


def _paren_hu(anat: Anatomy) -> float:
    if anat.work_hu is None:
        return -850.0
    lungs = anat.mask("lungs")
    v = anat.work_hu[lungs]
    v = v[v < -500]
    return float(np.median(v)) if v.size else -850.0


def _to_finding(series: Series, anat: Anatomy | None, seg: dict[str, Any], conf: float, fid: str) -> Finding:
    center_mm = series.vox_to_mm(seg["center_ijk"])
    side: str | None = None
    zone: str | None = None
    region = None
    if anat is not None:
        region = region_at(anat, center_mm, lung_snap_mm=max(8.0, 0.6 * seg["mean_d"] + 4.0))
        reg = vocab.BY_NAME.get(region)
        if reg is not None and reg.kind == "zone":
            side, zone = reg.side, reg.zone
    d = seg["mean_d"]
    kind = "mass" if d >= MASS_MM else "nodule"
    notes: list[str] = []
    if seg.get("juxtapleural"):
        if (seg.get("cap_fit") or {}).get("used"):
            notes.append("juxtapleural: it touches the pleura; its size is that of the sphere which, partly "
                         "hidden in the chest wall, best explains the image around it")
        else:
            notes.append(f"juxtapleural: it touches the pleura; {SIZED_BY_FREE_SURFACE}")
    if seg.get("constrained"):
        notes.append("juxtavascular: it sits on a vessel about as thick as itself; measured as the ball around "
                     "its centre, the vessel cut off at its surface")
    elif seg.get("opened_frac", 1.0) < 0.85:
        notes.append("juxtavascular: attached vessels were cut off before measuring")
    return Finding(
        id=fid, kind=kind, label=f"{seg['attenuation']} {kind}", region=region, side=side, zone=zone,  # type: ignore[arg-type]
        center_mm=[round(float(v), 2) for v in center_mm], bbox_mm=series.box_vox_to_mm(seg["bbox_vox"]),
        bbox_vox=[int(v) for v in seg["bbox_vox"]], diameter_mm=round(d, 1), long_axis_mm=round(seg["long"], 1),
        short_axis_mm=round(seg["short"], 1), volume_mm3=round(seg["volume"], 1), attenuation=seg["attenuation"],
        mean_hu=round(seg["mean_hu"], 1), series_uid=series.series_uid, slice_index=int(seg["slice_index"]),
        confidence=round(conf, 3), notes=notes,
    )


def _check_volume(series: Series) -> None:
    if series.modality != "CT":
        raise UnsupportedError(f"Lesion detection on {series.modality or 'this'} images is not supported for this "
                               "modality yet (chest CT only).")
    if not series.spacing_known:
        raise UnsupportedError("The pixel spacing of this CT is unknown, so nothing can be measured in mm.")
    nk = series.shape[0]
    if nk < 8 or nk * float(series.spacing[2]) < 40.0:
        what = "a single slice" if nk == 1 else f"only {nk} slices ({nk * float(series.spacing[2]):.0f} mm)"
        raise UnsupportedError(f"This CT series is {what}: 3-D nodule detection needs a chest volume.")


def _local_ball_mm(radius_mm: float) -> float:
    """Radius of the rolling ball that defines the lung side around a blob of ``radius_mm`` (default hypothesis)."""
    return max(1.3 * float(np.clip(radius_mm, 1.5, 35.0)) + 2.0, 6.0)


_MEDIASTINAL_LABELS = tuple(sorted({lab for n in ("mediastinum", "trachea", "right main bronchus", "left main bronchus")
                                     for lab in REGION_LABELS[n]}))
_WALL_LABELS = (REGION_LABELS["ribs"][0], REGION_LABELS["spine"][0])
HILAR_LOOK_MM = 6.0  # how far beyond a pleural contact the anatomy is looked at


def _mediastinal_share(anat: Anatomy | None, wall_kji: np.ndarray) -> float:
    """What lies just beyond a blob's contact with the wall (within ``HILAR_LOOK_MM`` of its centre):
    the share of mediastinal structures (mediastinum, heart, aorta, airways) among those and the
    bony chest wall (ribs, spine), from the anatomy's labels; 0.5 when neither is there."""
    if anat is None or len(wall_kji) == 0:
        return 0.5
    g = anat.grid
    cen = (np.asarray(wall_kji, dtype=float).mean(axis=0) - np.asarray(g.offset)) / np.asarray(g.factors)
    n = [int(np.ceil(HILAR_LOOK_MM / s)) for s in (g.spacing[2], g.spacing[1], g.spacing[0])]
    lo = np.clip(np.round(cen).astype(int) - n, 0, np.asarray(g.shape) - 1)
    hi = np.clip(np.round(cen).astype(int) + n + 1, 1, np.asarray(g.shape))
    sub = anat.labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    med = int(np.isin(sub, _MEDIASTINAL_LABELS).sum())
    wall = int(np.isin(sub, _WALL_LABELS).sum())
    return 0.5 if med + wall == 0 else med / (med + wall)


def _segment_scored(series: Series, anat: Anatomy | None, paren: float | None, ijk: np.ndarray, r: float,
                    cand: dict[str, Any], size_all_caps: bool = False) -> tuple[float, dict[str, Any]] | None:
    """Segment a candidate and score it. A blob against the pleura gets a second hypothesis for the
    lung side (a wider rolling ball: a flat cap of a large nodule is a shallow dent in the air that a
    ball scaled to the candidate does not fill) and keeps the more nodule-like of the two. A cap kept
    with some plausibility, or that would have it were its shape left to the model (a small cap whose
    thresholded surface is a speck), or any (``size_all_caps``: a re-measurement at a known place) is
    then sized by the wall+sphere model and scored again with that size."""
    half = max(3.0 * r + 6.0, 14.0)
    lung_roi = None
    if anat is not None:
        sk, sj, si = _roi_bounds(series, ijk, half)
        lung_roi = anat.grid.roi_from_full(anat.masks["lungs_closed"], sk.start, sk.stop, sj.start, sj.stop,
                                           si.start, si.stop)
    best: tuple[float, dict[str, Any]] | None = None
    seg2 = seg3 = None
    seg = _segment(series, ijk, r, paren, lung_roi, half)
    if seg is not None:
        seg["wall_med"] = _mediastinal_share(anat, seg["wall_kji"])
        best = (_confidence(seg, cand), seg)
    if seg is not None and seg["wall_frac"] >= 0.05 and _local_ball_mm(r) < PLEURAL_CLOSING_MM:
        seg2 = _segment(series, ijk, r, paren, lung_roi, half, closing_mm=PLEURAL_CLOSING_MM)
        if seg2 is not None:
            seg2["wall_med"] = _mediastinal_share(anat, seg2["wall_kji"])
            conf2 = _confidence(seg2, cand)
            if best is None or conf2 > best[0]:
                best = (conf2, seg2)
    # a small ball on a vessel as thick as itself: the opening cannot separate them
    weak = best is None or (best[0] < MIN_CONFIDENCE and not best[1]["juxtapleural"])
    if weak and cand.get("blob", 0.8) >= 0.55 and r <= 2.0 * JV_MAX_RADIUS_MM:
        seg3 = _segment(series, ijk, r, paren, lung_roi, half, constrain=True)
        if seg3 is not None and seg3["wall_frac"] < 0.05:
            conf3 = _confidence(seg3, cand)
            if best is None or conf3 > best[0]:
                best = (conf3, seg3)
    if best is not None and best[1].get("_cap_args") is not None and (
            size_all_caps or best[0] >= CAP_FIT_MIN_CONF
            or _confidence(best[1], cand, assume_cap=True) >= CAP_FIT_MIN_CONF):
        _size_cap(best[1])
        best = (_confidence(best[1], cand), best[1])
    for sg in (seg, seg2, seg3):
        if sg is not None:  # the ROI arrays kept for the cap model are not kept with the analysis
            sg.pop("_cap_args", None)
            sg.setdefault("cap_fit", None)
    return best


def _analyze(series: Series) -> SeriesAnalysis:
    t0 = time.time()
    _check_volume(series)
    anat = segment_anatomy(series)
    notes = list(anat.notes)
    paren = _paren_hu(anat)
    sv = _search_volume(series, anat, paren)
    if sv is None:
        return SeriesAnalysis(anatomy=anat, nodules=[], runtime_s=time.time() - t0, notes=notes + ["No lungs."])
    base, _ = sv
    cands = _nms(_candidates(base, notes), series.spacing)
    wall = _wall_depth(base)
    if wall is not None:
        cands += _pleural_candidates(base, wall=wall)
        cands += _shallow_cap_candidates(base, anat, paren, wall=wall)
    t1 = time.time()
    scored: list[dict[str, Any]] = []
    for c in cands:
        best = _segment_scored(series, anat, paren, c["ijk"], c["radius"], c)
        if best is None or best[1]["mean_d"] < MIN_DIAMETER_MM * 0.8:
            continue
        if c.get("source") == "pleural" and not best[1]["juxtapleural"]:
            continue  # a pleural seed only stands for a blob on the pleura; the rest is the filter's job
        scored.append({"cand": c, "seg": best[1], "conf": best[0]})
    # merge duplicates: a candidate whose centre lies inside a stronger one's box
    scored.sort(key=lambda s: -s["conf"])
    kept: list[dict[str, Any]] = []
    for s in scored:
        cc = s["seg"]["center_ijk"]
        dup = False
        for k in kept:
            b = k["seg"]["bbox_vox"]
            if all(b[a] - 0.5 <= cc[a] <= b[a + 3] + 0.5 for a in range(3)):
                dup = True
                break
        if not dup:
            kept.append(s)
    good = [s for s in kept if s["conf"] >= MIN_CONFIDENCE and s["seg"]["mean_d"] >= MIN_DIAMETER_MM]
    good.sort(key=lambda s: -s["seg"]["mean_d"])
    nodules = [_to_finding(series, anat, s["seg"], s["conf"], f"F{n + 1}") for n, s in enumerate(good)]
    rt = time.time() - t0
    log.info("analysis %s: %d candidates, %d scored, %d nodules, %.1fs (segmentation %.1fs)",
             series.series_uid[-8:], len(cands), len(scored), len(nodules), rt, time.time() - t1)
    return SeriesAnalysis(anatomy=anat, nodules=nodules, runtime_s=rt, notes=notes, candidates=kept)


def analyze_series(series: Series) -> SeriesAnalysis:
    """Anatomy + nodules of a CT series, cached per series (its UID plus a pixel fingerprint)."""
    _check_volume(series)
    return CACHE.get_or_compute(f"analysis:{series.cache_key}", lambda: _analyze(series))


def measure_at(series: Series, center_mm: list[float], analysis: SeriesAnalysis | None = None,
               roi_mm: float = 40.0) -> Finding | None:
    """Segment and measure the nodule nearest ``center_mm`` within an ROI of ``roi_mm`` (cheap)."""
    if series.modality != "CT" or series.shape[0] < 3:
        return None
    c = series.mm_to_vox(np.asarray(center_mm, dtype=float))
    half = roi_mm / 2.0
    sk, sj, si = _roi_bounds(series, c, half)
    roi = series.pixels[sk, sj, si].astype(np.float32)
    if min(roi.shape) < 3:
        return None
    di, dj, dk = (float(s) for s in series.spacing)
    # the blob nearest the point: dot filter over a few scales on the ROI
    best: tuple[float, np.ndarray, float] | None = None
    sp = (dk, dj, di)
    cl = np.clip(roi, -1000.0, 250.0)
    c_roi = np.array([c[2] - sk.start, c[1] - sj.start, c[0] - si.start])
    K, J, I_ = np.ogrid[:roi.shape[0], :roi.shape[1], :roi.shape[2]]
    dist2 = ((K - c_roi[0]) * dk) ** 2 + ((J - c_roi[1]) * dj) ** 2 + ((I_ - c_roi[2]) * di) ** 2
    for sigma in SIGMAS_MM:
        rad = sigma * SIGMA_TO_RADIUS
        if rad > half * 0.8:
            break
        sv = [sigma / s for s in sp]
        h = {}
        for name, order in (("kk", (2, 0, 0)), ("jj", (0, 2, 0)), ("ii", (0, 0, 2)), ("kj", (1, 1, 0)),
                            ("ki", (1, 0, 1)), ("ji", (0, 1, 1))):
            den = 1.0
            for ax, o in enumerate(order):
                den *= sp[ax] ** o
            h[name] = ndi.gaussian_filter(cl, sv, order=order, mode="nearest") * (sigma * sigma / den)
        near = dist2 <= max(rad, 4.0) ** 2
        idx = np.nonzero(near)
        ev = _eig3(h["kk"][idx], h["jj"][idx], h["ii"][idx], h["kj"][idx], h["ki"][idx], h["ji"][idx])
        dot = _dot_from_eig(ev)
        # prefer strong blobs close to the point
        score = dot * np.exp(-dist2[idx] / (2.0 * max(rad, 4.0) ** 2))
        m = int(np.argmax(score))
        if dot[m] <= 0:
            continue
        if best is None or score[m] > best[0]:
            pos = np.array([idx[2][m] + si.start, idx[1][m] + sj.start, idx[0][m] + sk.start], dtype=float)
            best = (float(score[m]), pos, rad)
    if best is None:
        return None
    _, pos, rad = best
    anat = analysis.anatomy if analysis is not None else None
    paren = _paren_hu(anat) if anat is not None else None
    scored = _segment_scored(series, anat, paren, pos, rad, {"radius": rad}, size_all_caps=True)
    if scored is None:
        return None
    conf, seg = scored
    return _to_finding(series, anat, seg, conf, "M1")


# ----------------------------------------------------------------------------------------------
# requests


def _anatomy_finding(info: RegionInfo, n: int, series: Series) -> Finding:
    reg = vocab.BY_NAME.get(info.name)
    c = np.asarray(info.centroid_mm, dtype=float)
    k = int(round(float(series.mm_to_vox(c)[2])))
    k = int(np.clip(k, 0, series.shape[0] - 1))
    return Finding(id=f"A{n}", kind="anatomy", label=info.name, region=info.name,
                   side=reg.side if reg else None, zone=reg.zone if reg else None,  # type: ignore[arg-type]
                   center_mm=[round(float(v), 1) for v in c], bbox_mm=info.bbox_mm, bbox_vox=info.bbox_vox,
                   volume_mm3=round(info.volume_ml * 1000.0, 0), series_uid=series.series_uid, slice_index=k)


def _size_text(f: Finding) -> str:
    if f.diameter_mm is None:
        return ""
    t = f"{f.diameter_mm:.1f} mm"
    if f.long_axis_mm is not None and f.short_axis_mm is not None:
        t += f" ({f.long_axis_mm:.1f} x {f.short_axis_mm:.1f} mm"
        if f.volume_mm3:
            t += f", {f.volume_mm3:.0f} mm3"
        t += ")"
    return t


def _lesion_sentence(f: Finding) -> str:
    att = f"{f.attenuation} " if f.attenuation else ""
    return f"{f.id}: {att}{f.kind}, {_size_text(f)}, {f.region or 'lung'} (slice {(f.slice_index or 0) + 1})"


def _box_overlap(anat: Anatomy, series: Series, box_mm: list[float]) -> list[tuple[str, float, float]]:
    """(region, fraction of the box it fills, fraction of the region inside the box) per region."""
    g = anat.grid
    b = np.asarray(box_mm, dtype=float)
    corners = np.array([[x, y, z] for x in (b[0], b[3]) for y in (b[1], b[4]) for z in (b[2], b[5])])
    v = g.mm_to_vox(corners)
    lo = np.clip(np.floor(v.min(0) + 0.5).astype(int), 0, np.array(g.shape[::-1]) - 1)
    hi = np.clip(np.floor(v.max(0) + 0.5).astype(int), 0, np.array(g.shape[::-1]) - 1)
    sub = anat.labels[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    if sub.size == 0:
        return []
    out: list[tuple[str, float, float]] = []
    names = ["right upper zone", "right middle zone", "right lower zone", "left upper zone", "left middle zone",
             "left lower zone", "trachea", "right main bronchus", "left main bronchus", "heart", "aorta",
             "mediastinum", "spine", "ribs", "body"]
    from tools.anatomy import REGION_LABELS

    for name in names:
        labs = (13,) if name == "mediastinum" else ((1,) if name == "body" else REGION_LABELS[name])
        m = np.isin(sub, labs)
        cnt = int(m.sum())
        if cnt == 0:
            continue
        tot = int(np.isin(anat.labels, labs).sum())
        out.append((name, cnt / sub.size, cnt / max(tot, 1)))
    out.sort(key=lambda t: -t[1])
    return out


def run_detector(study: Study, req: DetectRequest) -> DetectResult:
    """Answer a detection / anatomy / description request on the study's primary series."""
    series = study.primary
    notes: list[str] = []
    if series.modality != "CT":
        raise UnsupportedError(
            f"Lesion detection and anatomy on {series.modality or 'these'} images are not supported for this "
            "modality yet; the detector works on chest CT volumes.")
    try:
        analysis = analyze_series(series)
    except UnsupportedError as e:
        nk = series.shape[0]
        msg = str(e)
        if nk < 8:
            note = ("This CT is a single slice: 3-D nodule detection needs a volume." if nk == 1 else
                    f"This CT has only {nk} slices: 3-D nodule detection needs a volume.")
            return DetectResult(findings=[], evidence=[], summary=note, measured=[], notes=[note, msg])
        raise
    anat = analysis.anatomy
    notes += analysis.notes
    regions = [r for r in req.regions if r]
    unknown = [r for r in regions if r not in vocab.BY_NAME]
    if unknown:
        notes.append("Unknown region(s) ignored: " + ", ".join(unknown))
        regions = [r for r in regions if r in vocab.BY_NAME]
    lesions = [f.model_copy(update={"study_uid": study.study_uid}) for f in analysis.nodules]
    kind = req.lesion_kind
    if kind == "mass":
        lesions_k = [f for f in lesions if f.kind == "mass"]
    else:
        lesions_k = lesions
    findings: list[Finding] = []
    evidence: list[Evidence] = []
    lines: list[str] = []
    measured = ["long and short axial diameter and their mean (Lung-RADS), volume (mm3), mean HU"]
    word = {"mass": "mass", "opacity": "opacity", "nodule": "nodule"}.get(kind or "nodule", "nodule")

    if req.box_mm is not None:
        ov = _box_overlap(anat, series, req.box_mm)
        b = req.box_mm
        inside = [f for f in lesions_k if f.center_mm is not None and all(
            b[a] <= f.center_mm[a] <= b[a + 3] for a in range(3))]
        parts = [f"{n} ({100 * fb:.0f}% of the box)" for n, fb, _ in ov if fb >= 0.01]
        lines.append("The box covers " + (", ".join(parts) if parts else "no segmented structure") + ".")
        if inside:
            lines.append("Inside it: " + "; ".join(_lesion_sentence(f) for f in inside) + ".")
        else:
            lines.append(f"No {word} found inside the box.")
        n = 0
        for name, fb, _ in ov:
            if fb >= 0.01 and name in anat.regions:
                n += 1
                findings.append(_anatomy_finding(anat.regions[name], n, series).model_copy(
                    update={"study_uid": study.study_uid, "notes": [f"fills {100 * fb:.0f}% of the box"]}))
        findings = inside + findings
    elif req.want in ("anatomy", "describe"):
        names = regions or [n for n in ("body", "lungs", "right lung", "left lung", "right upper zone",
                                        "right middle zone", "right lower zone", "left upper zone",
                                        "left middle zone", "left lower zone", "trachea", "right main bronchus",
                                        "left main bronchus", "heart", "aorta", "mediastinum", "spine", "ribs")]
        n = 0
        for name in names:
            info = anat.regions.get(name)
            if info is None:
                lines.append(f"The {name} was not found on this scan.")
                continue
            n += 1
            findings.append(_anatomy_finding(info, n, series).model_copy(update={"study_uid": study.study_uid}))
            bb = info.bbox_mm
            lines.append(f"{name}: {info.volume_ml:.0f} ml, extent {bb[3] - bb[0]:.0f} x {bb[4] - bb[1]:.0f} x "
                         f"{bb[5] - bb[2]:.0f} mm (x, y, z).")
            if req.want == "describe":
                inside = [f for f in lesions_k if f.region and vocab.contains(name, f.region)]
                if inside:
                    lines.append("  Lesions there: " + "; ".join(_lesion_sentence(f) for f in inside) + ".")
                    findings += [f for f in inside if f not in findings]
                elif vocab.contains("lungs", name) or name in ("lungs", "body"):
                    lines.append(f"  No {word} found in the {name}.")
        measured = ["region boxes (mm, LPS) and volumes (ml)"]
    else:
        if regions:
            for name in regions:
                inside = [f for f in lesions_k if f.region and vocab.contains(name, f.region)]
                if inside:
                    lines.append(f"In the {name}: " + "; ".join(_lesion_sentence(f) for f in inside) + ".")
                    findings += [f for f in inside if f not in findings]
                else:
                    lines.append(f"No {word} found in the {name}.")
        else:
            findings = list(lesions_k)
            if findings:
                lines.append(f"{len(findings)} lesion{'s' if len(findings) != 1 else ''} found: "
                             + "; ".join(_lesion_sentence(f) for f in findings) + ".")
            else:
                lines.append(f"No {word} found in the lungs.")
        if kind == "nodule":
            masses = [f for f in findings if f.kind == "mass"]
            if masses:
                notes.append("Lesions of 30 mm or more are reported as masses.")
    if req.evidence_dir is not None:
        evidence = _evidence(series, findings, anat, Path(req.evidence_dir))
    summary = "\n".join(lines)
    return DetectResult(findings=findings, evidence=evidence, summary=summary, measured=measured, notes=notes)


def _evidence(series: Series, findings: list[Finding], anat: Anatomy, outdir: Path) -> list[Evidence]:
    from tools.render import render_finding, render_overview, window_for

    outdir.mkdir(parents=True, exist_ok=True)
    ev: list[Evidence] = []
    uid = series.series_uid[-8:].replace(".", "_")
    for f in findings[:8]:
        p = outdir / f"{uid}_{f.id}.png"
        try:
            ev.append(render_finding(series, f, p, window=window_for(f), others=findings))
        except Exception as e:  # evidence must never break the answer
            log.warning("could not render %s: %s", f.id, e)
    if findings:
        tag = "-".join(f.id for f in findings[:6])
        p = outdir / f"{uid}_overview_{tag}.png"
        try:
            ev.append(render_overview(series, findings, p))
        except Exception as e:
            log.warning("could not render the overview: %s", e)
    return ev
