"""Chest CT anatomy without weights: body, lungs (right/left, six zones), airways, heart, aorta,
mediastinum, spine and ribs, from HU thresholds, connectivity and millimetre-scaled morphology.

``segment_anatomy(series)`` returns an :class:`Anatomy`:

- ``labels``: a uint8 label volume ``[k, j, i]`` on a *working grid* (``anatomy.grid``): the series
  block-averaged to about 2 mm voxels (integer block sizes ``grid.factors`` = (fk, fj, fi); working
  voxel ``(i', j', k')`` covers series voxels ``i'*fi .. i'*fi+fi-1`` etc.). Each voxel holds its
  most specific label (:data:`LABELS`): a zone for lung voxels, heart/aorta inside the mediastinum,
  the main bronchi over the trachea.
- ``masks``: boolean working-grid masks for composite regions (``lungs``, ``right lung``,
  ``left lung``, ``body``, and ``lungs_closed``: the lungs closed with a rolling ball and their
  small holes filled, so that juxtapleural nodules and vessels lie inside; the detector searches it).
- ``regions``: per vocabulary name, a :class:`RegionInfo` with ``bbox_mm`` (LPS ``[x0, y0, z0, x1,
  y1, z1]``), ``bbox_vox`` (series voxels ``[i0, j0, k0, i1, j1, k1]``, inclusive), ``volume_ml``
  and ``centroid_mm``.

Methods (thresholds in HU, sizes in mm, so they carry over between scanners and pixel sizes):

- body: the largest component above -500 HU, holes filled per slice;
- lungs: internal air below -400 HU minus the trachea and main bronchi, split into right and left
  by connectivity, or (when they touch at the junction lines) by a watershed on HU from markers
  found by eroding the joined lungs until they separate; small holes (vessels, nodules) filled per
  slice; zones = thirds of each lung's own z-extent;
- airways (on a finer ~1.4 mm crop around the midline): slice-by-slice tracking of air darker than
  half-way between lumen and parenchyma, from a round midline air column high in the scan; leaks
  (exploding areas) are dropped; the carina is the first split; a main bronchus runs from the
  carina (its wall starts about one tracheal radius above the slice where the lumens part) to its
  own first split; boxes include a 2 mm wall;
- spine: per slice, the bone components near the vertebral column's centre line (found as the
  largest posterior-midline bone), within the transverse processes' reach; ribs: the other bone
  (cortical, > ~380 HU nearby, so cartilage is left out) within ~2 cm of the lungs, without the
  sternum (anterior midline);
- heart: the bulky soft tissue (-20..200 HU) inside the lungs' convex hull below the carina that
  survives an opening with a 10 mm ball (EDT-based); aorta: round soft-tissue discs tracked slice by
  slice on the fine grid from the descending aorta (left-anterior of the spine) up through the arch
  and down the ascending aorta to the heart, and down the descending aorta to the scan's end;
- mediastinum: between the lungs' medial borders (rows with both lungs, slices down to the heart's
  base) plus the heart, aorta and trachea, over the lungs' craniocaudal extent.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from tools.errors import UnsupportedError
from tools.study import Series

log = logging.getLogger(__name__)

LABELS: dict[int, str] = {
    1: "body",
    2: "right upper zone", 3: "right middle zone", 4: "right lower zone",
    5: "left upper zone", 6: "left middle zone", 7: "left lower zone",
    8: "trachea", 9: "right main bronchus", 10: "left main bronchus",
    11: "heart", 12: "aorta", 13: "mediastinum", 14: "spine", 15: "ribs",
}
NAME_TO_LABEL: dict[str, int] = {v: k for k, v in LABELS.items()}
ZONE_LABELS = {("right", "upper"): 2, ("right", "middle"): 3, ("right", "lower"): 4,
               ("left", "upper"): 5, ("left", "middle"): 6, ("left", "lower"): 7}
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "body": tuple(range(1, 16)),
    "lungs": (2, 3, 4, 5, 6, 7),
    "right lung": (2, 3, 4),
    "left lung": (5, 6, 7),
    "mediastinum": (13, 11, 12, 8),
}
for _lab, _name in LABELS.items():
    REGION_LABELS.setdefault(_name, (_lab,))
REGION_ORDER: tuple[str, ...] = (
    "body", "lungs", "right lung", "left lung", "right upper zone", "right middle zone", "right lower zone",
    "left upper zone", "left middle zone", "left lower zone", "trachea", "right main bronchus",
    "left main bronchus", "heart", "aorta", "mediastinum", "spine", "ribs")

TARGET_MM = 2.0  # working-grid voxel size (approximately)
FINE_MM = 1.4  # fine central crop (airways, aorta)
AIRWAY_WALL_MM = 3.0
MAX_HOLE_CM2 = 25.0  # per-slice holes filled inside a lung (vessels, nodules, masses up to ~5 cm)


@dataclass
class Grid:
    """A block-averaged grid over the series (or a crop of it): factors = (fk, fj, fi)."""

    full_shape: tuple[int, int, int]
    factors: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (di, dj, dk), mm
    origin: np.ndarray  # LPS mm of grid voxel (0, 0, 0)
    direction: np.ndarray
    offset: tuple[int, int, int] = (0, 0, 0)  # series voxel (k, j, i) where the grid starts

    @property
    def matrix(self) -> np.ndarray:
        return self.direction * np.asarray(self.spacing)[None, :]

    def vox_to_mm(self, ijk: np.ndarray | list[float]) -> np.ndarray:
        return np.asarray(ijk, dtype=float) @ self.matrix.T + self.origin

    def mm_to_vox(self, xyz: np.ndarray | list[float]) -> np.ndarray:
        return (np.asarray(xyz, dtype=float) - self.origin) @ np.linalg.inv(self.matrix).T

    def coord(self, axis: int) -> np.ndarray:
        """LPS coordinate ``axis`` (0=x, 1=y, 2=z) of every grid voxel, broadcastable to [k, j, i]."""
        nk, nj, ni = self.shape
        m = self.matrix
        return (self.origin[axis] + m[axis, 0] * np.arange(ni)[None, None, :]
                + m[axis, 1] * np.arange(nj)[None, :, None] + m[axis, 2] * np.arange(nk)[:, None, None])

    def full_box(self, box: list[int] | np.ndarray) -> list[int]:
        """Grid voxel box [i0, j0, k0, i1, j1, k1] -> series voxel box (inclusive, clipped)."""
        fk, fj, fi = self.factors
        ok, oj, oi = self.offset
        nk, nj, ni = self.full_shape
        i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
        return [oi + i0 * fi, oj + j0 * fj, ok + k0 * fk, min(ni - 1, oi + i1 * fi + fi - 1),
                min(nj - 1, oj + j1 * fj + fj - 1), min(nk - 1, ok + k1 * fk + fk - 1)]

    def roi_from_full(self, vol: np.ndarray, k0: int, k1: int, j0: int, j1: int, i0: int, i1: int) -> np.ndarray:
        """A grid volume resampled (nearest) onto the series-voxel ROI [k0:k1, j0:j1, i0:i1]."""
        fk, fj, fi = self.factors
        ok, oj, oi = self.offset
        nk, nj, ni = self.shape
        kk = np.clip((np.arange(k0, k1) - ok) // fk, 0, nk - 1)
        jj = np.clip((np.arange(j0, j1) - oj) // fj, 0, nj - 1)
        ii = np.clip((np.arange(i0, i1) - oi) // fi, 0, ni - 1)
        return vol[np.ix_(kk, jj, ii)]


@dataclass
class RegionInfo:
    name: str
    bbox_mm: list[float]
    bbox_vox: list[int]
    volume_ml: float
    centroid_mm: list[float]


@dataclass
class Anatomy:
    series_uid: str
    grid: Grid
    labels: np.ndarray  # uint8 [k, j, i] on the working grid
    masks: dict[str, np.ndarray]
    regions: dict[str, RegionInfo]
    lung_z_extent: dict[str, tuple[float, float]]  # side -> (z_min, z_max) mm
    midline_x: float
    notes: list[str] = field(default_factory=list)
    work_hu: np.ndarray | None = None  # the block-averaged HU volume (float32)

    def mask(self, region: str) -> np.ndarray:
        if region in self.masks:
            return self.masks[region]
        labs = REGION_LABELS.get(region)
        if labs is None:
            raise KeyError(region)
        return np.isin(self.labels, labs)

    def zone_of(self, side: str, z_mm: float) -> str:
        """'upper' | 'middle' | 'lower' for a height on that lung's own craniocaudal extent."""
        lo, hi = self.lung_z_extent.get(side, (np.nan, np.nan))
        if not np.isfinite(lo) or hi <= lo:
            return "middle"
        t = (z_mm - lo) / (hi - lo)
        return "lower" if t < 1 / 3 else ("middle" if t < 2 / 3 else "upper")


# ----------------------------------------------------------------------------------------------
# helpers


def _downsample(series: Series, target_mm: float, crop: tuple[int, int, int, int, int, int] | None = None
                ) -> tuple[np.ndarray, Grid]:
    """Block-average the series (optionally a crop [k0, k1, j0, j1, i0, i1), exclusive ends)."""
    di, dj, dk = (float(s) for s in series.spacing)
    fi = max(1, int(round(target_mm / di)))
    fj = max(1, int(round(target_mm / dj)))
    fk = max(1, int(round(target_mm / dk)))
    nk, nj, ni = series.pixels.shape
    k0, k1, j0, j1, i0, i1 = crop if crop is not None else (0, nk, 0, nj, 0, ni)
    px = series.pixels[k0:k1, j0:j1, i0:i1]
    ck, cj, ci = px.shape
    wk, wj, wi = -(-ck // fk), -(-cj // fj), -(-ci // fi)
    out = np.empty((wk, wj, wi), dtype=np.float32)
    pj, pi = wj * fj - cj, wi * fi - ci
    for kw in range(wk):
        blk = px[kw * fk: min(ck, (kw + 1) * fk)].astype(np.float32).mean(axis=0)
        if pj or pi:
            blk = np.pad(blk, ((0, pj), (0, pi)), mode="edge")
        out[kw] = blk.reshape(wj, fj, wi, fi).mean(axis=(1, 3))
    d = np.asarray(series.direction, dtype=float)
    off = np.array([i0 + (fi - 1) / 2.0, j0 + (fj - 1) / 2.0, k0 + (fk - 1) / 2.0])
    origin = np.asarray(series.origin, dtype=float) + (d * np.array([di, dj, dk])[None, :]) @ off
    grid = Grid(full_shape=(nk, nj, ni), factors=(fk, fj, fi), shape=(wk, wj, wi), spacing=(di * fi, dj * fj, dk * fk),
                origin=origin, direction=d, offset=(k0, j0, i0))
    return out, grid


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Ellipsoidal structuring element [k, j, i] for a ball of ``radius_mm``."""
    di, dj, dk = spacing
    rk, rj, ri = (max(0, int(np.floor(radius_mm / s + 1e-6))) for s in (dk, dj, di))
    k, j, i = np.ogrid[-rk:rk + 1, -rj:rj + 1, -ri:ri + 1]
    return (k * dk) ** 2 + (j * dj) ** 2 + (i * di) ** 2 <= radius_mm ** 2 + 1e-6


def _sizes(lab: np.ndarray) -> np.ndarray:
    s = np.bincount(lab.ravel())
    s[0] = 0
    return s


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    return lab == int(np.argmax(_sizes(lab)))


def _fill_slices(mask: np.ndarray, max_px: int | None = None) -> np.ndarray:
    """Per-slice hole filling; with ``max_px``, only holes up to that many pixels."""
    out = mask.copy()
    for k in range(mask.shape[0]):
        if not mask[k].any():
            continue
        filled = ndi.binary_fill_holes(mask[k])
        if max_px is None:
            out[k] = filled
            continue
        holes = filled & ~mask[k]
        if holes.any():
            lab, n = ndi.label(holes)
            small = _sizes(lab) <= max_px
            small[0] = False
            out[k] = mask[k] | small[lab]
    return out


def _close_slices(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Per-slice closing with a disk (EDT-based, exact, no border artefacts)."""
    di, dj, _ = spacing
    pad = int(np.ceil(radius_mm / min(di, dj))) + 2
    out = np.zeros_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        if not mask[k].any():
            continue
        jj = np.flatnonzero(mask[k].any(axis=1))
        ii = np.flatnonzero(mask[k].any(axis=0))
        j0, j1, i0, i1 = jj[0], jj[-1] + 1, ii[0], ii[-1] + 1
        # a closing never leaves the mask's bounding box (it only fills concavities)
        box = mask[k, j0:j1, i0:i1]
        out[k, j0:j1, i0:i1] = close_disk(box, radius_mm, dj, di, pad_mode="constant") | box
    return out


def close_disk(mask: np.ndarray, radius_mm: float, dj: float, di: float,
               pad_mode: str = "constant") -> np.ndarray:
    """Closing of a 2-D mask with a disk of ``radius_mm`` by two distance transforms (exact; the cost does not
    grow with the radius, unlike a structuring element). ``pad_mode``: ``constant`` treats the outside as
    background; ``edge`` treats a concavity open to the border as if it went on."""
    if not mask.any() or mask.all():
        return mask.copy()
    pad = int(np.ceil(radius_mm / min(di, dj))) + 2
    a = np.pad(mask, pad, mode=pad_mode)
    dil = ndi.distance_transform_edt(~a, sampling=(dj, di)) <= radius_mm + 1e-6
    if dil.all():
        return np.ones_like(mask)
    clo = ndi.distance_transform_edt(dil, sampling=(dj, di)) > radius_mm + 1e-6
    return clo[pad:-pad, pad:-pad]


def _close3d(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """3-D closing with a ball via two distance transforms on the mask's padded box."""
    bb = _bbox(mask)
    if bb is None:
        return mask.copy()
    di, dj, dk = spacing
    pk, pj, pi = (int(np.ceil(radius_mm / s)) + 2 for s in (dk, dj, di))
    sub = np.pad(mask[bb[2]:bb[5] + 1, bb[1]:bb[4] + 1, bb[0]:bb[3] + 1], ((pk, pk), (pj, pj), (pi, pi)))
    sp = (dk, dj, di)
    dil = ndi.distance_transform_edt(~sub, sampling=sp) <= radius_mm
    clo = ndi.distance_transform_edt(dil, sampling=sp) > radius_mm
    out = mask.copy()
    out[bb[2]:bb[5] + 1, bb[1]:bb[4] + 1, bb[0]:bb[3] + 1] |= clo[pk:-pk, pj:-pj, pi:-pi]
    return out


def _open_edt(mask: np.ndarray, radius_mm: float, spacing_kji: tuple[float, float, float]) -> np.ndarray:
    """3-D opening with a ball via two distance transforms (fast for large radii)."""
    if not mask.any():
        return mask
    er = ndi.distance_transform_edt(mask, sampling=spacing_kji) > radius_mm
    if not er.any():
        return er
    return (ndi.distance_transform_edt(~er, sampling=spacing_kji) <= radius_mm) & mask


def _dilate_mm(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """3-D dilation by a ball of ``radius_mm`` via a distance transform on the mask's padded box."""
    bb = _bbox(mask)
    if bb is None:
        return np.zeros_like(mask, dtype=bool)
    di, dj, dk = spacing
    pk, pj, pi = (int(np.ceil(radius_mm / s)) + 1 for s in (dk, dj, di))
    sl = (slice(max(0, bb[2] - pk), bb[5] + pk + 1), slice(max(0, bb[1] - pj), bb[4] + pj + 1),
          slice(max(0, bb[0] - pi), bb[3] + pi + 1))
    out = np.zeros_like(mask, dtype=bool)
    sub = mask[sl]
    st = [max(1, int(radius_mm / (4.0 * s))) for s in (dk, dj, di)]  # coarse steps for big radii
    if max(st) > 1:
        # any-pooling onto a coarser grid, distance there, then back (a slight over-dilation)
        shp = sub.shape
        pads = [(0, (-n) % f) for n, f in zip(shp, st)]
        p = np.pad(sub, pads)
        c = p.reshape(p.shape[0] // st[0], st[0], p.shape[1] // st[1], st[1], p.shape[2] // st[2],
                      st[2]).any(axis=(1, 3, 5))
        dc = ndi.distance_transform_edt(~c, sampling=(dk * st[0], dj * st[1], di * st[2])) <= radius_mm + 1e-6
        up = dc.repeat(st[0], 0).repeat(st[1], 1).repeat(st[2], 2)[: shp[0], : shp[1], : shp[2]]
        out[sl] = up
        return out
    out[sl] = ndi.distance_transform_edt(~sub, sampling=(dk, dj, di)) <= radius_mm + 1e-6
    return out


def _bbox(mask: np.ndarray) -> list[int] | None:
    """[i0, j0, k0, i1, j1, k1] of a [k, j, i] mask, or None."""
    if not mask.any():
        return None
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    js = np.flatnonzero(mask.any(axis=(0, 2)))
    is_ = np.flatnonzero(mask.any(axis=(0, 1)))
    return [int(is_[0]), int(js[0]), int(ks[0]), int(is_[-1]), int(js[-1]), int(ks[-1])]


def _to_grid(mask: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    """A mask on ``src`` mapped onto ``dst`` (a destination voxel is set if any source voxel centre in it)."""
    out = np.zeros(dst.shape, dtype=bool)
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return out
    fk, fj, fi = src.factors
    ok, oj, oi = src.offset
    full = [ok + idx[0] * fk + (fk - 1) // 2, oj + idx[1] * fj + (fj - 1) // 2, oi + idx[2] * fi + (fi - 1) // 2]
    gk, gj, gi = dst.factors
    dk_, dj_, di_ = dst.offset
    kk = np.clip((full[0] - dk_) // gk, 0, dst.shape[0] - 1)
    jj = np.clip((full[1] - dj_) // gj, 0, dst.shape[1] - 1)
    ii = np.clip((full[2] - di_) // gi, 0, dst.shape[2] - 1)
    out[kk, jj, ii] = True
    return out


# ----------------------------------------------------------------------------------------------
# body, lungs


def _body(work: np.ndarray, grid: Grid) -> np.ndarray:
    m = work > -500.0
    m = ndi.binary_opening(m, structure=_ball(3.0, grid.spacing))  # cut the table and blankets off
    body = _largest(m)
    body = _dilate_mm(body, 3.0, grid.spacing) & (work > -500.0)
    return _fill_slices(body)


def _split_lungs(lungs: np.ndarray, sm: np.ndarray, xb: np.ndarray, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    lab, n = ndi.label(lungs)
    sizes = _sizes(lab)
    order = np.argsort(sizes)[::-1]
    if n >= 2 and sizes[order[1]] >= 0.15 * sizes[order[0]]:
        a, b = lab == order[0], lab == order[1]
        return (a, b) if float(xb[a].mean()) < float(xb[b].mean()) else (b, a)  # lower x = patient's right
    main = lab == order[0] if n else lungs
    from skimage.segmentation import watershed

    markers = np.zeros(lungs.shape, dtype=np.int32)
    er = main.copy()
    found = False
    for _ in range(8):
        er = ndi.binary_erosion(er)
        lab2, n2 = ndi.label(er)
        if n2 < 2:
            if n2 == 0:
                break
            continue
        s2 = _sizes(lab2)
        o2 = np.argsort(s2)[::-1]
        if s2[o2[1]] >= 0.15 * s2[o2[0]]:
            a, b = lab2 == o2[0], lab2 == o2[1]
            if float(xb[a].mean()) > float(xb[b].mean()):
                a, b = b, a
            markers[a] = 1
            markers[b] = 2
            found = True
            break
    if not found:
        mid = float(np.median(xb[main]))
        markers[main & (xb < mid - 15.0)] = 1
        markers[main & (xb > mid + 15.0)] = 2
    ws = watershed(ndi.gaussian_filter(sm, 1.0), markers=markers, mask=main)
    notes.append("The lungs touch (junction line); they were split along it.")
    return ws == 1, ws == 2


# ----------------------------------------------------------------------------------------------
# airways (fine grid)


def _trachea_seed(sm: np.ndarray, body: np.ndarray, air: np.ndarray, grid: Grid, xb: np.ndarray,
                  yb: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(seed position in mm, lumen HU) of a round midline air column high in the scan."""
    nk = sm.shape[0]
    di, dj, _ = grid.spacing
    z_up = grid.matrix[2, 2] > 0
    order = list(range(nk - 1, -1, -1)) if z_up else list(range(nk))
    run: list[tuple[int, np.ndarray]] = []
    for k in order:
        bk = body[k]
        if not bk.any():
            run = []
            continue
        cx = float(xb[k][bk].mean())
        lab, n = ndi.label(air[k] & (sm[k] < -700.0))
        found = None
        for c in range(1, n + 1):
            cm = lab == c
            area = cm.sum() * di * dj
            if not (40.0 <= area <= 1200.0):
                continue
            eqd = 2.0 * np.sqrt(area / np.pi)
            jj, ii = np.nonzero(cm)
            ext = max((jj.max() - jj.min() + 1) * dj, (ii.max() - ii.min() + 1) * di)
            if ext > 1.8 * eqd + 2 * max(di, dj) or abs(float(xb[k][cm].mean()) - cx) > 35.0:
                continue
            found = cm
            break
        if found is None:
            run = []
            continue
        run.append((k, found))
        if len(run) >= 3:
            k0, m0 = run[0]
            pos = np.array([float(xb[k0][m0].mean()), float(yb[k0][m0].mean()),
                            float(grid.vox_to_mm([0, 0, k0])[2])])
            return pos, float(np.median(sm[k0][m0]))
    return None


def _component_near(mask2d: np.ndarray, probe: np.ndarray, st: np.ndarray) -> list[np.ndarray]:
    lab, _ = ndi.label(mask2d, structure=st)
    ids = np.unique(lab[probe & (lab > 0)])
    return [lab == c for c in ids if c > 0]


def _airways(fsm: np.ndarray, fgrid: Grid, seed_mm: np.ndarray, lumen: float, paren: float,
             notes: list[str]) -> dict[str, np.ndarray]:
    """Trachea and main bronchi lumens on the fine grid (slice-by-slice tracking)."""
    nk = fsm.shape[0]
    di, dj, dk = fgrid.spacing
    pix = di * dj
    shape = fsm.shape
    out = {n: np.zeros(shape, dtype=bool) for n in ("trachea", "right main bronchus", "left main bronchus")}
    z_up = fgrid.matrix[2, 2] > 0
    order = list(range(nk - 1, -1, -1)) if z_up else list(range(nk))
    thr = min(-800.0, 0.5 * (lumen + paren)) if paren > lumen + 40 else lumen + 50.0
    dark = fsm < thr
    st = ndi.generate_binary_structure(2, 2)
    sv = fgrid.mm_to_vox(seed_mm)
    ks = int(np.clip(round(sv[2]), 0, nk - 1))
    J, I_ = np.ogrid[:shape[1], :shape[2]]
    near = ((J - sv[1]) * dj) ** 2 + ((I_ - sv[0]) * di) ** 2 <= 12.0 ** 2
    comps = _component_near(dark[ks], near, st)
    if not comps:
        notes.append("The trachea could not be traced.")
        return out
    seed = max(comps, key=lambda c: c.sum())
    x = fgrid.coord(0)
    x2 = np.broadcast_to(x, shape)
    trachea = out["trachea"]
    trachea[ks] = seed
    pos = order.index(ks)
    prev = seed
    for k in reversed(order[:pos]):  # up to the top of the scan
        cs = _component_near(dark[k], ndi.binary_dilation(prev, st, iterations=2), st)
        cs = [c for c in cs if c.sum() <= 2.5 * prev.sum() + 6]
        if not cs:
            break
        prev = max(cs, key=lambda c: c.sum())
        trachea[k] = prev
    t_area = float(seed.sum())
    min_px = max(3.0, 6.0 / pix)
    prev = seed
    split_pos: int | None = None
    branches: list[tuple[str, np.ndarray]] = []
    for p in range(pos + 1, len(order)):
        k = order[p]
        cs = _component_near(dark[k], ndi.binary_dilation(prev, st, iterations=2), st)
        cs = [c for c in cs if c.sum() >= min_px and c.sum() <= 2.5 * max(prev.sum(), t_area) + 6]
        if not cs:
            break
        big = sorted(cs, key=lambda c: -c.sum())
        if len(big) >= 2 and big[1].sum() >= 0.1 * t_area:
            a, b = big[0], big[1]
            if float(x2[k][a].mean()) > float(x2[k][b].mean()):
                a, b = b, a
            branches = [("right main bronchus", a), ("left main bronchus", b)]
            out["right main bronchus"][k] = a
            out["left main bronchus"][k] = b
            split_pos = p
            break
        prev = big[0]
        t_area = max(t_area, 0.0) if prev.sum() > 2.5 * t_area else t_area
        trachea[k] = prev
    if split_pos is None:
        notes.append("The carina was not found; main bronchi not labelled.")
        return out
    max_len = 70.0
    for name, start in branches:
        b = start
        m = out[name]
        length = 0.0
        for p in range(split_pos + 1, len(order)):
            k = order[p]
            cs = _component_near(dark[k], ndi.binary_dilation(b, st, iterations=2), st)
            cs = [c for c in cs if c.sum() >= min_px]
            if not cs:
                break
            big = sorted(cs, key=lambda c: -c.sum())
            if len(big) >= 2 and big[1].sum() >= max(min_px, 0.15 * big[0].sum()):
                break  # its first split: lobar bronchi start here
            c = big[0]
            if c.sum() > 2.5 * b.sum() + 6:
                break  # leak into the parenchyma
            # distance travelled (centroid shift and slice step)
            c0 = np.array(ndi.center_of_mass(b)) * [dj, di]
            c1 = np.array(ndi.center_of_mass(c)) * [dj, di]
            length += float(np.sqrt(np.sum((c1 - c0) ** 2) + dk * dk))
            if length > max_len:
                break
            m[k] = c
            b = c
    # the main bronchi's walls begin about one tracheal radius above the slice where the lumens part:
    # give them the lower end of the tracheal lumen, split at the midpoint between the two bronchi
    ks_split = order[split_pos]
    r_out = float(np.sqrt(t_area * pix / np.pi)) + AIRWAY_WALL_MM
    n_up = int(np.ceil(r_out / dk))
    xr = float(x2[ks_split][out["right main bronchus"][ks_split]].mean())
    xl = float(x2[ks_split][out["left main bronchus"][ks_split]].mean())
    xc = 0.5 * (xr + xl)
    r_b = float(np.sqrt(0.5 * (out["right main bronchus"][ks_split].sum() + out["left main bronchus"][ks_split].sum())
                        * pix / np.pi))
    for p in range(max(0, split_pos - n_up), split_pos):
        k = order[p]
        lum = trachea[k]
        out["right main bronchus"][k] |= lum & (x2[k] <= xc + r_b)
        out["left main bronchus"][k] |= lum & (x2[k] > xc - r_b)
    # where the lumen widens into the bifurcation, the trachea keeps only its own round column
    above = [order[p] for p in range(max(0, split_pos - n_up - 6), max(0, split_pos - n_up)) if trachea[order[p]].any()]
    if above:
        cen = np.array([ndi.center_of_mass(trachea[k]) for k in above]).mean(axis=0)
        r_t = float(np.median([np.sqrt(trachea[k].sum() / np.pi) for k in above]))
        J2, I2 = np.ogrid[:shape[1], :shape[2]]
        col = ((J2 - cen[0]) * dj) ** 2 + ((I2 - cen[1]) * di) ** 2 <= ((r_t + 1.0) * max(di, dj)) ** 2
        for p in range(max(0, split_pos - n_up), split_pos):
            trachea[order[p]] &= col
    return out


# ----------------------------------------------------------------------------------------------
# bones, heart, aorta, mediastinum


def _bones(work: np.ndarray, sm: np.ndarray, body: np.ndarray, lungs: np.ndarray, grid: Grid, xb: np.ndarray,
           yb: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Spine and ribs masks and the spine's centre line (per slice: x, anterior y)."""
    nk = sm.shape[0]
    bone = (sm > 180.0) & body
    spine = np.zeros_like(bone)
    info = {"cx": np.full(nk, np.nan), "front": np.full(nk, np.nan), "cy": np.full(nk, np.nan)}
    if not bone.any():
        return spine, bone, info
    y_post = float(np.median(yb[lungs])) if lungs.any() else float(np.median(yb[body]))
    body_cx = float(np.median(xb[body]))
    # 1) the vertebral column: per slice the largest posterior bone component near the midline
    for k in range(nk):
        lab, n = ndi.label(bone[k])
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        area = ndi.sum(np.ones_like(lab), lab, idx)
        cxs = ndi.mean(xb[k], lab, idx)
        cys = ndi.mean(yb[k], lab, idx)
        ok_c = (np.abs(cxs - body_cx) < 60.0) & (cys > y_post)
        if not ok_c.any():
            continue
        c = int(np.argmax(np.where(ok_c, area, -1)))
        cm = lab == c + 1
        info["cx"][k] = float(cxs[c])
        info["cy"][k] = float(cys[c])
        info["front"][k] = float(yb[k][cm].min())
    ok = np.isfinite(info["cx"])
    if ok.sum() < 3:
        return spine, bone, info
    ks = np.arange(nk)
    # the column is nearly straight: a robust line through the per-slice centres rejects slices
    # where a rib or scapula was taken for the vertebra
    inl = ok.copy()
    for _ in range(3):
        if inl.sum() < 3:
            inl = ok.copy()
            break
        coef = np.polyfit(ks[inl], info["cx"][inl], 1)
        res = np.abs(info["cx"] - np.polyval(coef, ks))
        inl = ok & (res < max(6.0, 2.5 * float(np.median(res[inl]))))
    for key in ("cy", "front"):
        v = info[key].copy()
        info[key] = ndi.median_filter(np.interp(ks, ks[inl], v[inl]), size=9, mode="nearest")
    info["cx"] = np.polyval(np.polyfit(ks[inl], info["cx"][inl], 1), ks)
    # 2) spine = bone within the transverse processes' reach of the centre line, behind its front
    reach = 35.0
    spine = bone & (np.abs(xb - info["cx"][:, None, None]) < reach) & (yb > info["front"][:, None, None] - 5.0)
    # 3) ribs: cortical bone near the lungs, not spine, not the sternum
    cortical = ndi.maximum_filter(work, size=3) > 380.0
    rest = bone & ~ndi.binary_dilation(spine, structure=np.ones((1, 3, 3), bool)) & cortical
    ribs = np.zeros_like(bone)
    if rest.any() and lungs.any():
        near = _dilate_mm(lungs, 20.0, grid.spacing)
        lab, n = ndi.label(rest)
        if n:
            idx = np.arange(1, n + 1)
            med = 20.0 + 1.0 - 2.0 * ndi.mean(near, lab, idx)  # <= 20 when most of it lies near the lungs
            cxs = ndi.mean(np.broadcast_to(xb, rest.shape), lab, idx)
            cys = ndi.mean(np.broadcast_to(yb, rest.shape), lab, idx)
            sizes = _sizes(lab)[1:]
            vox_ml = float(np.prod(grid.spacing)) / 1000.0
            y_front = float(np.percentile(yb[lungs], 20))
            keep = np.zeros(n + 1, dtype=bool)
            for c in range(n):
                if med[c] > 20.0 or sizes[c] * vox_ml < 0.2:
                    continue
                if abs(cxs[c] - float(np.nanmedian(info["cx"]))) < 30.0 and cys[c] < y_front:
                    continue  # sternum
                keep[c + 1] = True
            ribs = keep[lab]
    return spine, ribs, info


def _hull_cavity(lungs: np.ndarray, lungs_filled: np.ndarray, body: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    cav = np.zeros_like(lungs)
    for k in range(lungs.shape[0]):
        if lungs[k].sum() < 10:
            continue
        cav[k] = convex_hull_image(lungs[k]) & ~lungs_filled[k] & body[k]
    return cav


def _heart(sm: np.ndarray, cav: np.ndarray, bone: np.ndarray, grid: Grid, zb: np.ndarray,
           carina_z: float | None, body: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    soft = cav & (sm > -20.0) & (sm < 200.0) & ~bone
    if carina_z is not None:
        soft &= zb < carina_z - 5.0
    if not soft.any():
        return soft
    bb = _bbox(soft)
    assert bb is not None
    sl = (slice(bb[2], bb[5] + 1), slice(bb[1], bb[4] + 1), slice(bb[0], bb[3] + 1))
    sp = (grid.spacing[2], grid.spacing[1], grid.spacing[0])
    op = _open_edt(soft[sl], 16.0, sp)
    lab, n = ndi.label(op)
    if n == 0:
        return np.zeros_like(soft)
    sizes = _sizes(lab)
    vox_ml = float(np.prod(grid.spacing)) / 1000.0
    # the heart hangs below the carina (its centre ~2-15 cm lower); the liver under the domes is lower
    zc = ndi.mean(zb[sl], lab, np.arange(n + 1))
    ok = sizes * vox_ml >= 50.0
    score = sizes.astype(float)
    if carina_z is not None:
        ok &= (zc < carina_z - 15.0) & (zc > carina_z - 160.0)
        score *= np.exp(-(((zc - (carina_z - 70.0)) / 40.0) ** 2))
    ok[0] = False
    if not ok.any():
        return np.zeros_like(soft)
    c = int(np.argmax(np.where(ok, score, 0)))
    h = np.zeros_like(soft)
    h[sl] = lab == c
    # the heart may reach beyond the lungs' hull (it touches the anterior chest wall): grow it within
    # mediastinal soft tissue up to 2.5 cm, then open again so thin attachments (chest wall, vessels)
    # fall off
    tissue = body & ~lungs & ~bone & (sm > -20.0) & (sm < 200.0)
    hk = np.flatnonzero(h.any(axis=(1, 2)))
    yb = np.broadcast_to(grid.coord(1).astype(np.float32), soft.shape)
    y_c = float(yb[h].mean())
    allowed = tissue & ~cav & (yb < y_c)  # in front of the heart, outside the lungs' hull
    allowed[: hk.min()] = False
    allowed[hk.max() + 1:] = False
    step = min(grid.spacing[:2])
    grown = h.copy()
    st2 = np.zeros((3, 3, 3), dtype=bool)
    st2[1] = ndi.generate_binary_structure(2, 1)  # in-plane growth only
    for _ in range(int(np.ceil(25.0 / step))):
        nxt = grown | (ndi.binary_dilation(grown, structure=st2) & allowed)
        if nxt.sum() == grown.sum():
            break
        grown = nxt
    if grown.sum() > h.sum():
        bb = _bbox(grown)
        assert bb is not None
        sl2 = (slice(bb[2], bb[5] + 1), slice(bb[1], bb[4] + 1), slice(bb[0], bb[3] + 1))
        op2 = _open_edt(grown[sl2], 10.0, sp)
        lab2, _ = ndi.label(op2)
        ids = np.unique(lab2[h[sl2] & (lab2 > 0)])
        if ids.size:
            h2 = np.zeros_like(soft)
            h2[sl2] = np.isin(lab2, ids[ids > 0])
            h = h2
    h = _dilate_mm(h, 2.5, grid.spacing) & tissue
    # the great vessels leave the heart's base through a narrower neck: cut above the first slice
    # (over the widest one) whose area falls under 30 % of the widest
    area = h.sum(axis=(1, 2))
    if area.max() > 0:
        kmax = int(np.argmax(area))
        z_up = grid.matrix[2, 2] > 0
        rng_up = range(kmax, h.shape[0]) if z_up else range(kmax, -1, -1)
        for k in rng_up:
            if area[k] < 0.3 * area[kmax]:
                if z_up:
                    h[k:] = False
                else:
                    h[: k + 1] = False
                break
    return h


def _track_discs(soft: np.ndarray, dt: Callable[[int], np.ndarray], fgrid: Grid, order: list[int], start: int,
                 c0: np.ndarray, r0: float, max_step_mm: float = 8.0, grow: float = 1.35,
                 coast_mm: float = 10.0, stop: np.ndarray | None = None) -> list[tuple[int, np.ndarray, float]]:
    """Follow a round structure slice by slice: [(k, centre (j, i), radius mm)].

    Where the structure is briefly cut (a darker neighbour) or merges with other soft tissue, the
    track coasts on its last centre and radius for up to ``coast_mm`` while the disc stays soft tissue.
    """
    di, dj, dk = fgrid.spacing
    out: list[tuple[int, np.ndarray, float]] = []
    c, r = c0.astype(float), r0
    J, I_ = np.ogrid[:soft.shape[1], :soft.shape[2]]
    coasted = 0.0
    pending: list[tuple[int, np.ndarray, float]] = []
    for k in order[start:]:
        d = dt(k)
        win = ((J - c[0]) * dj) ** 2 + ((I_ - c[1]) * di) ** 2 <= max_step_mm ** 2
        vals = np.where(win, d, 0.0)
        m = float(vals.max())
        if max(0.65 * r, 5.0) <= m <= min(grow * r, 1.5 * r0):
            jj, ii = np.nonzero(vals >= m - 0.5 * max(di, dj))
            c = np.array([jj.mean(), ii.mean()])
            if stop is not None and stop[k, int(round(c[0])), int(round(c[1]))]:
                break
            r = 0.7 * r + 0.3 * m
            out += pending
            pending = []
            coasted = 0.0
            out.append((k, c.copy(), m))
            continue
        disc = ((J - c[0]) * dj) ** 2 + ((I_ - c[1]) * di) ** 2 <= r ** 2
        coasted += dk
        if coasted > coast_mm or float(soft[k][disc].mean()) < 0.7:
            break
        pending.append((k, c.copy(), r))
    if coast_mm > 50.0:
        out += pending  # a long coast (down the abdominal aorta) is kept to the scan's end
    return out


def _aorta(fsm: np.ndarray, fgrid: Grid, spine_info: dict[str, np.ndarray], wgrid: Grid, heart_f: np.ndarray,
           lung_f: np.ndarray, carina_z: float | None, notes: list[str]) -> np.ndarray:
    """The aorta on the fine grid: descending (tracked up and down), arch, ascending."""
    nk = fsm.shape[0]
    di, dj, dk = fgrid.spacing
    out = np.zeros(fsm.shape, dtype=bool)
    # blood and soft tissue, without bone (the cancellous interior of a vertebra can read ~150 HU)
    bone_f = _fill_slices(fsm > 250.0)
    bone_f = ndi.binary_dilation(bone_f, structure=np.ones((1, 3, 3), dtype=bool))
    soft = (fsm > -15.0) & (fsm < 160.0) & ~lung_f & ~bone_f
    z_up = fgrid.matrix[2, 2] > 0
    zs = fgrid.coord(2)[:, 0, 0]
    xs = fgrid.coord(0)[0, 0, :]
    ys = fgrid.coord(1)[0, :, 0]
    wz = wgrid.coord(2)[:, 0, 0]
    cache: list[np.ndarray | None] = [None] * nk

    def dt_of(k: int) -> np.ndarray:
        if cache[k] is None:
            cache[k] = ndi.distance_transform_edt(soft[k], sampling=(dj, di))
        return cache[k]  # type: ignore[return-value]

    def spine_at(z: float) -> tuple[float, float]:
        o = np.argsort(wz)
        return (float(np.interp(z, wz[o], spine_info["cx"][o])), float(np.interp(z, wz[o], spine_info["front"][o])))

    if not np.isfinite(spine_info["cx"]).any():
        return out
    # seed: a disc left-anterior of the vertebral body, ~5 cm below the carina (or mid-chest)
    lz = fgrid.coord(2)[:, 0, 0][lung_f.any(axis=(1, 2))]
    if lz.size == 0:
        return out
    z_seed = (carina_z - 50.0) if carina_z is not None else float(lz.min() + 0.5 * (lz.max() - lz.min()))
    best = None
    J_, I_ = np.ogrid[:fsm.shape[1], :fsm.shape[2]]
    for dz in (0.0, -10.0, 10.0, -20.0, 20.0, -30.0, 30.0, -40.0):
        k = int(np.argmin(np.abs(zs - (z_seed + dz))))
        sx, sf = spine_at(float(zs[k]))
        d = dt_of(k)
        cand = (d >= 7.0) & (d <= 22.0) & (d == ndi.maximum_filter(d, size=5))
        jj, ii = np.nonzero(cand)
        for j, i in zip(jj, ii):
            x, y = xs[i], ys[j]
            if not (sx - 10.0 <= x <= sx + 55.0 and sf - 30.0 <= y <= sf + 10.0):
                continue
            if heart_f[k, j, i]:
                continue
            r = float(d[j, i])
            # roundness: a vessel is ringed by fat or lung, a merged blob is not
            rr = ((J_ - j) * dj) ** 2 + ((I_ - i) * di) ** 2
            ring = (rr > (r + 1.0) ** 2) & (rr <= (1.35 * r + 2.0) ** 2)
            ring_free = 1.0 - float(soft[k][ring].mean()) if ring.any() else 0.0
            score = r + 12.0 * ring_free - 0.3 * np.hypot(x - (sx + 25.0), y - (sf - 2.0))
            if best is None or score > best[0]:
                best = (score, k, np.array([j, i], dtype=float), r)
    if best is None:
        notes.append("The aorta was not found.")
        return out
    _, k0, c0, r0 = best
    order_up = list(range(k0, nk)) if z_up else list(range(k0, -1, -1))
    order_dn = list(range(k0, -1, -1)) if z_up else list(range(k0, nk))
    lazy = dt_of
    up = _track_discs(soft, lazy, fgrid, order_up, 0, c0, r0)
    dn = _track_discs(soft, lazy, fgrid, order_dn, 1, c0, r0, grow=1.6, coast_mm=400.0)
    J, I_ = np.ogrid[:fsm.shape[1], :fsm.shape[2]]
    for k, c, r in up + dn:
        disc = ((J - c[0]) * dj) ** 2 + ((I_ - c[1]) * di) ** 2 <= (r + 0.5 * max(di, dj)) ** 2
        out[k] |= disc & soft[k]
    if not up:
        return out
    # the arch: at the top of the descending part, the thick soft tissue connected to it
    r_ao = float(np.median([r for _, _, r in up]))
    top = up[-3:] if len(up) >= 3 else up
    far_pt = None
    far_k = None
    for k, c, r in top:
        d = dt_of(k)
        thick = d >= 0.6 * r_ao
        lab, _ = ndi.label(thick)
        cid = lab[int(round(c[0])), int(round(c[1]))]
        if cid == 0:
            continue
        comp = lab == cid
        recon = ndi.distance_transform_edt(~comp, sampling=(dj, di)) <= r_ao
        out[k] |= recon & soft[k]
        jj, ii = np.nonzero(comp)
        dd = ((jj - c[0]) * dj) ** 2 + ((ii - c[1]) * di) ** 2
        m = int(np.argmax(dd))
        if dd[m] > (2.5 * r_ao) ** 2:
            far_pt, far_k = np.array([jj[m], ii[m]], dtype=float), k
    # the ascending aorta: down from the arch's far (anterior) end to the heart
    if far_pt is not None and far_k is not None:
        order_asc = list(range(far_k, -1, -1)) if z_up else list(range(far_k, nk))
        asc = _track_discs(soft, lazy, fgrid, order_asc, 1, far_pt, r_ao, max_step_mm=10.0, stop=heart_f)
        for k, c, r in asc:
            disc = ((J - c[0]) * dj) ** 2 + ((I_ - c[1]) * di) ** 2 <= (r + 0.5 * max(di, dj)) ** 2
            out[k] |= disc & soft[k]
    return out


def _mediastinum(lungs: np.ndarray, right: np.ndarray, left: np.ndarray, body: np.ndarray, bone: np.ndarray,
                 xb: np.ndarray, heart: np.ndarray, k_range: tuple[int, int]) -> np.ndarray:
    """Per slice (down to the heart's base): the space between the lungs' medial borders."""
    med = np.zeros(body.shape, dtype=bool)
    k0, k1 = k_range
    for k in range(k0, k1 + 1):
        r, l_ = right[k], left[k]
        if not (r.any() and l_.any()):
            continue
        sl = np.zeros(body.shape[1:], dtype=bool)
        both = np.flatnonzero(r.any(axis=1) & l_.any(axis=1))
        if both.size == 0:
            continue
        right_is_low = float(xb[k][r].mean()) < float(xb[k][l_].mean())
        lo_m, hi_m = (r, l_) if right_is_low else (l_, r)  # lower-index lung, higher-index lung

        def borders(j: int) -> tuple[int | None, int | None]:
            a_ = np.flatnonzero(lo_m[j])
            b_ = np.flatnonzero(hi_m[j])
            return (int(a_.max()) if a_.size else None), (int(b_.min()) if b_.size else None)

        for j in both:
            a, b = borders(j)
            if a is not None and b is not None and b > a + 1:
                sl[j, a + 1:b] = True
        # in front of the first row with both lungs: between whichever medial borders exist
        any_rows = np.flatnonzero(r.any(axis=1) | l_.any(axis=1))
        ja = int(both.min())
        a0, b0 = borders(ja)
        if a0 is not None and b0 is not None:
            for j in range(int(any_rows.min()), ja):
                a, b = borders(j)
                a = a0 if a is None else a
                b = b0 if b is None else b
                if b > a + 1:
                    sl[j, a + 1:b] = True
        med[k] = sl & body[k] & ~lungs[k]
    return med & ~bone


# ----------------------------------------------------------------------------------------------


def _info(name: str, mask: np.ndarray, grid: Grid, series: Series) -> RegionInfo | None:
    bb = _bbox(mask)
    if bb is None:
        return None
    full = grid.full_box(bb)
    idx = np.argwhere(mask)
    cen = grid.vox_to_mm(idx[:, ::-1].mean(axis=0))
    vox_ml = float(np.prod(grid.spacing)) / 1000.0
    return RegionInfo(name=name, bbox_mm=series.box_vox_to_mm(full), bbox_vox=full,
                      volume_ml=round(float(mask.sum()) * vox_ml, 1), centroid_mm=[round(float(v), 1) for v in cen])


def segment_anatomy(series: Series) -> Anatomy:
    """Segment the chest anatomy of a CT series (see the module docstring)."""
    if series.modality != "CT":
        raise UnsupportedError(f"Anatomy segmentation needs CT; {series.modality} is not supported for this "
                               "modality yet.")
    nk = series.pixels.shape[0]
    if nk < 8 or nk * float(series.spacing[2]) < 40.0:
        raise UnsupportedError("This CT series is a single slice or a very thin stack: anatomy segmentation "
                               "needs a chest volume.")
    notes: list[str] = []
    d = np.asarray(series.direction, dtype=float)
    if abs(d[2, 2]) < 0.8:
        notes.append("The series is not axial; anatomy labels assume axial slices and may be rough.")
    work, grid = _downsample(series, TARGET_MM)
    sm = ndi.gaussian_filter(work, 0.7)
    xb = np.broadcast_to(grid.coord(0).astype(np.float32), work.shape)
    yb = np.broadcast_to(grid.coord(1).astype(np.float32), work.shape)
    zb = np.broadcast_to(grid.coord(2).astype(np.float32), work.shape)
    vox_ml = float(np.prod(grid.spacing)) / 1000.0

    body = _body(work, grid)
    if body.sum() * vox_ml < 100.0:
        raise UnsupportedError("No body found in this CT series (is it a chest CT?).")
    air = body & (sm < -400.0)
    lab, n = ndi.label(air)
    sizes = _sizes(lab)
    big = sizes >= max(0.1 * sizes.max(), 30.0 / vox_ml)
    big[0] = False
    air = big[lab]
    if not air.any():
        raise UnsupportedError("No lungs found in this CT series (is it a chest CT?).")
    paren = float(np.median(sm[air]))

    # --- airways on a fine central crop
    seed = _trachea_seed(sm, body, air, grid, xb, yb)
    fine: dict[str, np.ndarray] = {}
    fgrid: Grid | None = None
    fsm: np.ndarray | None = None
    if seed is None:
        notes.append("No trachea found (the scan may start below the carina).")
    lungs_y = yb[air]
    ymin_l, ymax_l = float(lungs_y.min()), float(lungs_y.max())
    cx0 = float(seed[0][0]) if seed is not None else float(np.median(xb[air]))
    corners = np.array([[x, y, z] for x in (cx0 - 95.0, cx0 + 95.0) for y in (ymin_l - 15.0, ymax_l)
                        for z in (-1e5, 1e5)])
    v = series.mm_to_vox(corners)
    nkf, njf, nif = series.shape
    i0, i1 = int(np.clip(np.floor(v[:, 0].min()), 0, nif)), int(np.clip(np.ceil(v[:, 0].max()) + 1, 0, nif))
    j0, j1 = int(np.clip(np.floor(v[:, 1].min()), 0, njf)), int(np.clip(np.ceil(v[:, 1].max()) + 1, 0, njf))
    if i1 - i0 >= 8 and j1 - j0 >= 8:
        fwork, fgrid = _downsample(series, FINE_MM, (0, nkf, j0, j1, i0, i1))
        fsm = ndi.gaussian_filter(fwork, 0.7)
        del fwork
        if seed is not None:
            fine = _airways(fsm, fgrid, seed[0], seed[1], paren, notes)
    main_airway = np.zeros(work.shape, dtype=bool)
    if fine and fgrid is not None:
        for nm in ("trachea", "right main bronchus", "left main bronchus"):
            main_airway |= _to_grid(fine[nm], fgrid, grid)

    # --- lungs
    lungs_raw = air & ~_dilate_mm(main_airway, 2.5, grid.spacing)
    lab, n = ndi.label(lungs_raw)
    sizes = _sizes(lab)
    keep = sizes >= 0.05 * sizes.max()
    keep[0] = False
    lungs_raw = keep[lab]
    right, left = _split_lungs(lungs_raw, sm, xb, notes)
    max_px = int(MAX_HOLE_CM2 * 100.0 / (grid.spacing[0] * grid.spacing[1]))
    right = _fill_slices(right, max_px) & ~main_airway
    left = _fill_slices(left, max_px) & ~main_airway & ~right
    lungs = right | left

    # --- bones
    spine, ribs, spine_info = _bones(work, sm, body, lungs, grid, xb, yb)
    bone = (sm > 180.0) & body
    mid_x = float(np.nanmedian(spine_info["cx"])) if np.isfinite(spine_info["cx"]).any() else float(np.median(xb[lungs]))

    # --- heart, aorta, mediastinum
    carina_z = None
    if fine and fine["right main bronchus"].any() and fgrid is not None:
        zz = fgrid.coord(2)[:, 0, 0]
        kk = np.flatnonzero(fine["right main bronchus"].any(axis=(1, 2)) | fine["left main bronchus"].any(axis=(1, 2)))
        carina_z = float(zz[kk].max()) if fgrid.matrix[2, 2] > 0 else float(zz[kk].min())
    lungs_filled = _fill_slices(right) | _fill_slices(left)
    cav = _hull_cavity(lungs, lungs_filled, body)
    heart = _heart(sm, cav, bone, grid, zb, carina_z, body, lungs)
    aorta_f = np.zeros((1, 1, 1), dtype=bool)
    if fgrid is not None and fsm is not None:
        heart_f = np.zeros(fsm.shape, dtype=bool)
        lung_f = np.zeros(fsm.shape, dtype=bool)
        # working -> fine (nearest)
        ks_ = np.clip((np.arange(fsm.shape[0]) * fgrid.factors[0] + fgrid.offset[0]) // grid.factors[0], 0,
                      grid.shape[0] - 1)
        js_ = np.clip((np.arange(fsm.shape[1]) * fgrid.factors[1] + fgrid.offset[1]) // grid.factors[1], 0,
                      grid.shape[1] - 1)
        is_ = np.clip((np.arange(fsm.shape[2]) * fgrid.factors[2] + fgrid.offset[2]) // grid.factors[2], 0,
                      grid.shape[2] - 1)
        heart_f = heart[np.ix_(ks_, js_, is_)]
        lung_f = lungs[np.ix_(ks_, js_, is_)]
        aorta_f = _aorta(fsm, fgrid, spine_info, grid, heart_f, lung_f, carina_z, notes)
        aorta = _to_grid(aorta_f, fgrid, grid) & ~heart
    else:
        aorta = np.zeros(work.shape, dtype=bool)
    lk = np.flatnonzero(lungs.any(axis=(1, 2)))
    k_lo, k_hi = (int(lk.min()), int(lk.max())) if lk.size else (0, work.shape[0] - 1)
    med_range = (k_lo, k_hi)
    if heart.any():
        hk = np.flatnonzero(heart.any(axis=(1, 2)))
        z_up = grid.matrix[2, 2] > 0
        med_range = (int(hk.min()), k_hi) if z_up else (k_lo, int(hk.max()))
    med = _mediastinum(lungs, right, left, body, bone, xb, heart, med_range)
    if np.isfinite(spine_info["front"]).all():
        # the posterior mediastinum ends at the prevertebral fascia: the paravertebral gutters are
        # not mediastinum (the descending aorta, which lies beside the vertebra, is added back below)
        med &= yb < (spine_info["front"] - 8.0)[:, None, None]
    trachea_w = _to_grid(fine["trachea"], fgrid, grid) if fine and fgrid is not None else np.zeros_like(med)
    med |= heart | aorta | trachea_w
    in_lung_z = np.zeros(work.shape[0], dtype=bool)
    in_lung_z[k_lo:k_hi + 1] = True
    med &= in_lung_z[:, None, None]
    med &= ~lungs & ~spine & ~ribs

    # closed lungs for the detector: a rolling ball brings juxtapleural nodules in; what it adds next
    # to the mediastinum (hilar vessels, the heart's notch) stays out
    closed = (_fill_slices(_close_slices(right, 15.0, grid.spacing) | _close3d(right, 15.0, grid.spacing), max_px)
              | _fill_slices(_close_slices(left, 15.0, grid.spacing) | _close3d(left, 15.0, grid.spacing),
                             max_px)) & body
    added = closed & ~lungs
    # (the paravertebral gutters behind the vertebral bodies' front are costal pleura: kept)
    front = spine_info["front"] if np.isfinite(spine_info["front"]).all() else np.full(work.shape[0], np.inf)
    hilar = med & (yb < front[:, None, None])
    near_med = _dilate_mm(hilar | main_airway, 8.0, grid.spacing) | _dilate_mm(heart | aorta, 3.0, grid.spacing)
    closed = lungs | (added & ~near_med)

    # --- labels
    labels = np.zeros(work.shape, dtype=np.uint8)
    labels[body] = 1
    labels[med] = 13
    labels[ribs] = 15
    labels[spine] = 14
    labels[aorta] = 12
    labels[heart] = 11
    z_ext: dict[str, tuple[float, float]] = {}
    half = 0.5 * abs(float(grid.matrix[2, 2]))
    for side, m in (("right", right), ("left", left)):
        if not m.any():
            z_ext[side] = (float("nan"), float("nan"))
            continue
        zz = zb[m]
        lo, hi = float(zz.min()) - half, float(zz.max()) + half
        z_ext[side] = (lo, hi)
        t = (zb - lo) / max(hi - lo, 1e-6)
        for zone, cond in (("lower", t < 1 / 3), ("middle", (t >= 1 / 3) & (t < 2 / 3)), ("upper", t >= 2 / 3)):
            labels[m & cond] = ZONE_LABELS[(side, zone)]
    if fine and fgrid is not None:
        labels[_to_grid(fine["trachea"], fgrid, grid)] = 8
        labels[_to_grid(fine["right main bronchus"], fgrid, grid)] = 9
        labels[_to_grid(fine["left main bronchus"], fgrid, grid)] = 10

    masks = {"lungs_closed": closed, "right lung": right, "left lung": left, "lungs": lungs, "body": body}
    anat = Anatomy(series_uid=series.series_uid, grid=grid, labels=labels, masks=masks, regions={},
                   lung_z_extent=z_ext, midline_x=mid_x, notes=notes, work_hu=work)
    for name in REGION_ORDER:
        if name in ("trachea", "right main bronchus", "left main bronchus"):
            if not fine or fgrid is None or not fine[name].any():
                continue
            m = fine[name]
            bb = _bbox(m)
            assert bb is not None
            pad = int(np.ceil(AIRWAY_WALL_MM / min(fgrid.spacing))) + 1
            sl = (slice(max(0, bb[2] - pad), bb[5] + pad + 1), slice(max(0, bb[1] - pad), bb[4] + pad + 1),
                  slice(max(0, bb[0] - pad), bb[3] + pad + 1))
            sub = np.zeros(m.shape, dtype=bool)
            sub[sl] = _dilate_mm(m[sl], AIRWAY_WALL_MM, fgrid.spacing)
            info = _info(name, sub, fgrid, series)
        elif name == "aorta" and fgrid is not None and aorta_f.shape == (fsm.shape if fsm is not None else ()):
            info = _info(name, aorta_f, fgrid, series)
        elif name == "mediastinum":
            info = _info(name, med, grid, series)
            if info is not None and lk.size:
                # the mediastinum spans the lungs' craniocaudal extent
                lb = anat.regions["lungs"].bbox_mm if "lungs" in anat.regions else None
                if lb is not None:
                    info.bbox_mm[2], info.bbox_mm[5] = lb[2], lb[5]
                    lv = anat.regions["lungs"].bbox_vox
                    info.bbox_vox[2], info.bbox_vox[5] = lv[2], lv[5]
        else:
            info = _info(name, anat.mask(name), grid, series)
        if info is not None:
            anat.regions[name] = info
    missing = [n for n in REGION_ORDER if n not in anat.regions]
    if missing:
        notes.append("Not found: " + ", ".join(missing) + ".")
    log.info("anatomy %s: %d regions, grid %s (factors %s)", series.series_uid[-8:], len(anat.regions), grid.shape,
             grid.factors)
    return anat


def region_at(anatomy: Anatomy, point_mm: list[float] | np.ndarray, lung_snap_mm: float = 6.0) -> str:
    """The most specific region containing ``point_mm``; a point just outside the lungs (within
    ``lung_snap_mm``) goes to the nearest lung zone; outside everything: "body"."""
    g = anatomy.grid
    p = np.asarray(point_mm, dtype=float)
    v = np.round(g.mm_to_vox(p)).astype(int)  # i, j, k
    nk, nj, ni = g.shape
    inside = 0 <= v[0] < ni and 0 <= v[1] < nj and 0 <= v[2] < nk
    lab = int(anatomy.labels[v[2], v[1], v[0]]) if inside else 0
    if 2 <= lab <= 7:
        side = "right" if lab <= 4 else "left"
        return f"{side} {anatomy.zone_of(side, float(p[2]))} zone"
    di, dj, dk = g.spacing
    ri, rj, rk = (int(np.ceil(lung_snap_mm / s)) for s in (di, dj, dk))
    k0, k1 = max(0, v[2] - rk), min(nk, v[2] + rk + 1)
    j0, j1 = max(0, v[1] - rj), min(nj, v[1] + rj + 1)
    i0, i1 = max(0, v[0] - ri), min(ni, v[0] + ri + 1)
    if k0 < k1 and j0 < j1 and i0 < i1:
        sub = anatomy.labels[k0:k1, j0:j1, i0:i1]
        lung = (sub >= 2) & (sub <= 7)
        if lung.any():
            kk, jj, ii = np.nonzero(lung)
            d2 = ((kk + k0 - v[2]) * dk) ** 2 + ((jj + j0 - v[1]) * dj) ** 2 + ((ii + i0 - v[0]) * di) ** 2
            best = int(np.argmin(d2))
            if d2[best] <= lung_snap_mm ** 2:
                side = "right" if sub[kk[best], jj[best], ii[best]] <= 4 else "left"
                return f"{side} {anatomy.zone_of(side, float(p[2]))} zone"
    if lab > 0:
        return LABELS[lab]
    return "body"
