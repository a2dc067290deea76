"""Chest CT anatomy without weights: body, lungs (right/left, six zones), airways, heart, aorta,
mediastinum, spine and ribs, from HU thresholds, connectivity and millimetre-scaled morphology.

``segment_anatomy(series)`` returns an :class:`Anatomy`:

- ``labels``: a uint8 label volume ``[k, j, i]`` on a *working grid* (``anatomy.grid``) that is the
  series block-averaged to about 2 mm voxels (integer block sizes ``grid.factors`` along k, j, i;
  working voxel ``(i', j', k')`` covers series voxels ``i'*fi .. i'*fi+fi-1`` and so on). Each voxel
  holds its most specific label (:data:`LABELS`); zones for lung voxels, heart/aorta/airways inside
  the mediastinum.
- ``masks``: boolean working-grid masks for composite regions (``lungs``, ``right lung``,
  ``left lung``, ``lungs_closed`` = the lungs closed with a rolling ball and hole-filled so that
  juxtapleural nodules and vessels lie inside, ...).
- ``regions``: per vocabulary name, a :class:`RegionInfo` with ``bbox_mm`` (LPS ``[x0, y0, z0, x1,
  y1, z1]``), ``bbox_vox`` (series voxels ``[i0, j0, k0, i1, j1, k1]``, inclusive), ``volume_ml``
  and ``centroid_mm``.

Methods (all thresholds in HU, all sizes in mm, so they carry over between scanners):
body = largest component above -500 HU, holes filled per slice; internal air below -400 HU;
airways = slice-by-slice tracking, from a round midline air column at the top, of air darker than
half-way between the lumen and the lung parenchyma, stopped where a branch's area explodes (leak);
carina = first split; trachea above it, main bronchi from it to their first split; lungs = internal
air minus trachea and main bronchi, split into right/left by connectivity or, when they touch at
the anterior junction, by a watershed on HU seeded from both sides of the midline; zones = thirds
of each lung's own z-extent; bone above ~180 HU split into spine (the midline posterior column) and
ribs (the rest but the sternum); mediastinum = the space between the lungs (per slice, between their
medial borders, in front of the spine); heart = the bulky soft tissue of the lower mediastinum
(opening with a ~12 mm ball); aorta = round soft-tissue columns (descending, beside the spine, and
ascending/arch above the heart) tracked through slices.
"""
from __future__ import annotations

import logging
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
# composite regions: the labels they are made of
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "body": tuple(range(1, 16)),
    "lungs": (2, 3, 4, 5, 6, 7),
    "right lung": (2, 3, 4),
    "left lung": (5, 6, 7),
    "mediastinum": (13, 11, 12),
}
for _lab, _name in LABELS.items():
    REGION_LABELS.setdefault(_name, (_lab,))

TARGET_MM = 2.0  # working-grid voxel size (approximately)


@dataclass
class Grid:
    """The working grid: the series block-averaged by ``factors`` = (fk, fj, fi)."""

    full_shape: tuple[int, int, int]
    factors: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # (di, dj, dk) of the working grid, mm
    origin: np.ndarray  # LPS mm of working voxel (0, 0, 0)
    direction: np.ndarray

    @property
    def matrix(self) -> np.ndarray:
        return self.direction * np.asarray(self.spacing)[None, :]

    def vox_to_mm(self, ijk: np.ndarray | list[float]) -> np.ndarray:
        return np.asarray(ijk, dtype=float) @ self.matrix.T + self.origin

    def mm_to_vox(self, xyz: np.ndarray | list[float]) -> np.ndarray:
        return (np.asarray(xyz, dtype=float) - self.origin) @ np.linalg.inv(self.matrix).T

    def coord(self, axis: int) -> np.ndarray:
        """LPS coordinate ``axis`` (0=x, 1=y, 2=z) of every working voxel, broadcastable [k, j, i]."""
        nk, nj, ni = self.shape
        m = self.matrix
        return (self.origin[axis] + m[axis, 0] * np.arange(ni)[None, None, :]
                + m[axis, 1] * np.arange(nj)[None, :, None] + m[axis, 2] * np.arange(nk)[:, None, None])

    def full_box(self, box: list[int] | np.ndarray) -> list[int]:
        """Working voxel box [i0, j0, k0, i1, j1, k1] -> series voxel box (inclusive, clipped)."""
        fk, fj, fi = self.factors
        nk, nj, ni = self.full_shape
        i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
        return [i0 * fi, j0 * fj, k0 * fk, min(ni - 1, i1 * fi + fi - 1), min(nj - 1, j1 * fj + fj - 1),
                min(nk - 1, k1 * fk + fk - 1)]

    def sample(self, vol: np.ndarray, kk: np.ndarray, jj: np.ndarray, ii: np.ndarray) -> np.ndarray:
        """Values of a working-grid volume at series voxel indices (nearest block)."""
        fk, fj, fi = self.factors
        nk, nj, ni = self.shape
        return vol[np.clip(np.asarray(kk) // fk, 0, nk - 1), np.clip(np.asarray(jj) // fj, 0, nj - 1),
                   np.clip(np.asarray(ii) // fi, 0, ni - 1)]

    def roi_from_full(self, vol: np.ndarray, k0: int, k1: int, j0: int, j1: int, i0: int, i1: int) -> np.ndarray:
        """A working-grid volume resampled (nearest) onto the series-voxel ROI [k0:k1, j0:j1, i0:i1]."""
        fk, fj, fi = self.factors
        nk, nj, ni = self.shape
        kk = np.clip(np.arange(k0, k1) // fk, 0, nk - 1)
        jj = np.clip(np.arange(j0, j1) // fj, 0, nj - 1)
        ii = np.clip(np.arange(i0, i1) // fi, 0, ni - 1)
        return vol[np.ix_(kk, jj, ii)]


@dataclass
class RegionInfo:
    name: str
    bbox_mm: list[float]
    bbox_vox: list[int]
    volume_ml: float
    centroid_mm: list[float]
    bbox_work: list[int] = field(default_factory=list)  # on the working grid


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


def _downsample(series: Series) -> tuple[np.ndarray, Grid]:
    di, dj, dk = (float(s) for s in series.spacing)
    fi = max(1, int(round(TARGET_MM / di)))
    fj = max(1, int(round(TARGET_MM / dj)))
    fk = max(1, int(round(TARGET_MM / dk)))
    px = series.pixels
    nk, nj, ni = px.shape
    wk, wj, wi = -(-nk // fk), -(-nj // fj), -(-ni // fi)
    out = np.empty((wk, wj, wi), dtype=np.float32)
    pj, pi = wj * fj - nj, wi * fi - ni
    for kw in range(wk):
        blk = px[kw * fk: min(nk, (kw + 1) * fk)].astype(np.float32).mean(axis=0)
        if pj or pi:
            blk = np.pad(blk, ((0, pj), (0, pi)), mode="edge")
        out[kw] = blk.reshape(wj, fj, wi, fi).mean(axis=(1, 3))
    sp = (di * fi, dj * fj, dk * fk)
    d = np.asarray(series.direction, dtype=float)
    off = np.array([(fi - 1) / 2.0, (fj - 1) / 2.0, (fk - 1) / 2.0])
    origin = np.asarray(series.origin, dtype=float) + (d * np.array([di, dj, dk])[None, :]) @ off
    grid = Grid(full_shape=(nk, nj, ni), factors=(fk, fj, fi), shape=(wk, wj, wi), spacing=sp,
                origin=origin, direction=d)
    return out, grid


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Ellipsoidal structuring element [k, j, i] for a ball of ``radius_mm``."""
    di, dj, dk = spacing
    rk, rj, ri = (max(0, int(np.floor(radius_mm / s))) for s in (dk, dj, di))
    k, j, i = np.ogrid[-rk:rk + 1, -rj:rj + 1, -ri:ri + 1]
    return (k * dk) ** 2 + (j * dj) ** 2 + (i * di) ** 2 <= radius_mm ** 2 + 1e-6


def _disk(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    di, dj, _ = spacing
    rj, ri = (max(0, int(np.floor(radius_mm / s))) for s in (dj, di))
    j, i = np.ogrid[-rj:rj + 1, -ri:ri + 1]
    return (j * dj) ** 2 + (i * di) ** 2 <= radius_mm ** 2 + 1e-6


def _largest(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    lab, n = ndi.label(mask, structure=structure)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k])
    return out


def _close_slices(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """Per-slice closing with padding (no border artefacts), then hole filling."""
    r = max(disk.shape) // 2 + 1
    out = np.empty_like(mask, dtype=bool)
    for k in range(mask.shape[0]):
        if not mask[k].any():
            out[k] = False
            continue
        p = np.pad(mask[k], r)
        c = ndi.binary_closing(p, structure=disk)[r:-r, r:-r]
        out[k] = ndi.binary_fill_holes(c | mask[k])
    return out


def _bbox(mask: np.ndarray) -> list[int] | None:
    """[i0, j0, k0, i1, j1, k1] of a [k, j, i] mask, or None."""
    if not mask.any():
        return None
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    js = np.flatnonzero(mask.any(axis=(0, 2)))
    is_ = np.flatnonzero(mask.any(axis=(0, 1)))
    return [int(is_[0]), int(js[0]), int(ks[0]), int(is_[-1]), int(js[-1]), int(ks[-1])]


# ----------------------------------------------------------------------------------------------
# steps


def _body(work: np.ndarray, grid: Grid) -> np.ndarray:
    m = work > -500.0
    # cut thin attachments (table, blankets) before keeping the largest component
    m = ndi.binary_opening(m, structure=_ball(3.0, grid.spacing))
    body = _largest(m)
    body = ndi.binary_dilation(body, structure=_ball(3.0, grid.spacing)) & (work > -500.0)
    return _fill_slices(body)


def _airways(sm: np.ndarray, body: np.ndarray, air: np.ndarray, grid: Grid, x: np.ndarray,
             notes: list[str]) -> dict[str, np.ndarray]:
    """Trachea and main bronchi by slice-by-slice tracking from a round midline air column."""
    nk = sm.shape[0]
    di, dj, dk = grid.spacing
    pix_area = di * dj
    z_up = grid.matrix[2, 2] > 0  # does k increase head-ward?
    order = list(range(nk - 1, -1, -1)) if z_up else list(range(nk))  # from head to feet
    empty = {n: np.zeros(sm.shape, dtype=bool) for n in ("airway", "trachea", "right main bronchus",
                                                         "left main bronchus")}
    lung_vals = sm[air]
    if lung_vals.size < 100:
        return empty
    # the trachea seed: a round air column close to the body's midline, high in the scan
    seed_k, seed_mask = None, None
    run = 0
    for k in order:
        bk = body[k]
        if not bk.any():
            continue
        cx = float(x[k][bk].mean()) if x.ndim == 3 else float(np.mean(x[0, 0, :][bk.any(axis=0)]))
        lab, n = ndi.label(air[k] & (sm[k] < -700.0))
        found = None
        for c in range(1, n + 1):
            cm = lab == c
            area = cm.sum() * pix_area
            if not (40.0 <= area <= 1200.0):
                continue
            eqd = 2.0 * np.sqrt(area / np.pi)
            jj, ii = np.nonzero(cm)
            ext = max((jj.max() - jj.min() + 1) * dj, (ii.max() - ii.min() + 1) * di)
            if ext > 1.8 * eqd:
                continue
            cxx = float(x[k][cm].mean())
            if abs(cxx - cx) > 30.0:
                continue
            found = cm
            break
        if found is not None:
            run += 1
            if run == 1:
                first_k, first_mask = k, found
            if run >= 3:
                seed_k, seed_mask = first_k, first_mask
                break
        else:
            run = 0
    if seed_k is None:
        notes.append("No trachea found (the scan may start below the carina).")
        return empty
    lumen = float(np.median(sm[seed_k][seed_mask]))
    paren = float(np.median(lung_vals))
    thr = min(-800.0, (lumen + paren) / 2.0) if paren > lumen + 40 else lumen + 50.0
    dark = (sm < thr) & body
    airway = np.zeros(sm.shape, dtype=bool)
    st = ndi.generate_binary_structure(2, 2)
    # upward from the seed: one component per slice
    pos = order.index(seed_k)
    seed_comp = _component_containing(dark[seed_k], seed_mask, st)
    if seed_comp is None:
        seed_comp = seed_mask
    airway[seed_k] = seed_comp
    prev = seed_comp
    for k in reversed(order[:pos]):
        comp = _component_containing(dark[k], ndi.binary_dilation(prev, st), st)
        if comp is None or comp.sum() > 3 * max(prev.sum(), 4):
            break
        airway[k] = comp
        prev = comp
    # downward: track branches; a branch whose area explodes is a leak and is dropped
    branches: list[np.ndarray] = [seed_comp]
    trachea_area = float(seed_comp.sum())
    carina_k = None
    split_k: dict[str, int | None] = {"right": None, "left": None}
    side_of: list[str | None] = [None]
    bronchi = {"right": np.zeros(sm.shape, dtype=bool), "left": np.zeros(sm.shape, dtype=bool)}
    trachea = np.zeros(sm.shape, dtype=bool)
    trachea[seed_k] = seed_comp
    max_len_slices = int(np.ceil(70.0 / dk))  # main bronchi are 2-6 cm long
    for k in order[pos + 1:]:
        lab, n = ndi.label(dark[k], structure=st)
        new_branches: list[np.ndarray] = []
        new_sides: list[str | None] = []
        for b, side in zip(branches, side_of):
            grown = ndi.binary_dilation(b, st, iterations=2)
            ids = np.unique(lab[grown & (lab > 0)])
            comps = [lab == c for c in ids if c > 0]
            comps = [c for c in comps if c.sum() <= max(2.5 * b.sum() + 6, 12)]  # leak guard
            comps = [c for c in comps if c.sum() * pix_area >= 4.0]
            if not comps:
                continue
            if side is None:
                if len(comps) >= 2 and carina_k is None:
                    carina_k = k
                    comps = sorted(comps, key=lambda c: -c.sum())[:2]
                    xs = [float(x[k][c].mean()) for c in comps]
                    order_lr = np.argsort(xs)  # lower x = patient's right
                    for idx, s in zip(order_lr, ("right", "left")):
                        new_branches.append(comps[idx])
                        new_sides.append(s)
                        bronchi[s][k] = comps[idx]
                else:
                    c = comps[0] if len(comps) == 1 else max(comps, key=lambda c: c.sum())
                    if c.sum() > 2.0 * trachea_area + 10:
                        continue
                    new_branches.append(c)
                    new_sides.append(None)
                    trachea[k] = c
            else:
                if split_k[side] is not None:
                    continue
                if len(comps) >= 2:
                    split_k[side] = k
                    continue
                if carina_k is not None and abs(order.index(k) - order.index(carina_k)) > max_len_slices:
                    split_k[side] = k
                    continue
                new_branches.append(comps[0])
                new_sides.append(side)
                bronchi[side][k] = comps[0]
        branches, side_of = new_branches, new_sides
        if not branches:
            break
    # upward slices belong to the trachea
    trachea |= airway
    if carina_k is None:
        notes.append("The carina was not found; main bronchi not labelled.")
    airway = trachea | bronchi["right"] | bronchi["left"]
    return {"airway": airway, "trachea": trachea, "right main bronchus": bronchi["right"],
            "left main bronchus": bronchi["left"]}


def _component_containing(mask2d: np.ndarray, probe: np.ndarray, st: np.ndarray) -> np.ndarray | None:
    lab, n = ndi.label(mask2d, structure=st)
    ids = np.unique(lab[probe & (lab > 0)])
    ids = ids[ids > 0]
    if ids.size == 0:
        return None
    if ids.size == 1:
        return lab == ids[0]
    sizes = np.bincount(lab.ravel())
    return lab == ids[np.argmax(sizes[ids])]


def _split_lungs(lungs: np.ndarray, sm: np.ndarray, x: np.ndarray, grid: Grid,
                 notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    lab, n = ndi.label(lungs)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    xb = np.broadcast_to(x, lungs.shape)
    if n >= 2 and sizes[order[1]] >= 0.15 * sizes[order[0]]:
        a, b = lab == order[0], lab == order[1]
        if float(xb[a].mean()) < float(xb[b].mean()):  # lower x = patient's right
            return a, b
        return b, a
    # joined lungs: watershed on the HU (the junction line is brighter) from both sides of the midline
    from skimage.segmentation import watershed

    main = lab == order[0] if n else lungs
    xs = xb[main]
    mid = float(np.median(xs))
    # the midline is where the lung is thinnest near the median x
    markers = np.zeros(lungs.shape, dtype=np.int32)
    markers[main & (xb < mid - 15.0)] = 1
    markers[main & (xb > mid + 15.0)] = 2
    ws = watershed(ndi.gaussian_filter(sm, 1.0), markers=markers, mask=main)
    notes.append("The lungs touch (anterior junction); split by watershed.")
    return ws == 1, ws == 2


def _bones(sm: np.ndarray, body: np.ndarray, lungs: np.ndarray, grid: Grid, x: np.ndarray, y: np.ndarray,
           mid_x: float) -> tuple[np.ndarray, np.ndarray]:
    bone = (sm > 180.0) & body
    bone = ndi.binary_opening(bone, structure=np.ones((1, 2, 2), bool)) | (bone & (sm > 400.0))
    if not bone.any():
        return bone, bone
    xb = np.broadcast_to(x, bone.shape)
    yb = np.broadcast_to(y, bone.shape)
    # spine: the bone column behind the mediastinum, near the midline
    lung_y = yb[lungs] if lungs.any() else yb[body]
    y_mid_lungs = float(np.median(lung_y))
    core = bone & (np.abs(xb - mid_x) < 15.0) & (yb > y_mid_lungs)
    if not core.any():
        return np.zeros_like(bone), bone
    lab, n = ndi.label(core)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= 0.1 * sizes.max()
    keep[0] = False
    core = keep[lab]
    # grow the column laterally into connected bone, up to the transverse processes (~40 mm)
    spine = core.copy()
    near = bone & (np.abs(xb - mid_x) < 42.0) & (yb > y_mid_lungs - 10.0)
    for _ in range(int(np.ceil(25.0 / min(grid.spacing[:2])))):
        grown = ndi.binary_dilation(spine, structure=np.ones((1, 3, 3), bool)) & near
        if grown.sum() == spine.sum():
            break
        spine = grown
    # ribs: the rest of the bone but the sternum (anterior midline)
    y_front = yb < float(np.percentile(lung_y, 15))
    sternum = bone & (np.abs(xb - mid_x) < 25.0) & y_front & ~spine
    ribs = bone & ~ndi.binary_dilation(spine, structure=np.ones((1, 3, 3), bool)) & ~sternum
    ribs = ribs & ~((np.abs(xb - mid_x) < 45.0) & (yb > y_mid_lungs) & ndi.binary_dilation(
        spine, structure=_ball(6.0, grid.spacing)))
    # small specks are not ribs
    lab, n = ndi.label(ribs)
    if n:
        sizes = np.bincount(lab.ravel())
        vox_ml = float(np.prod(grid.spacing)) / 1000.0
        ok = sizes * vox_ml >= 0.3
        ok[0] = False
        ribs = ok[lab]
    return spine, ribs


def _mediastinum(body: np.ndarray, lungs: np.ndarray, right: np.ndarray, left: np.ndarray,
                 spine: np.ndarray, bone: np.ndarray, xb: np.ndarray, yb: np.ndarray) -> np.ndarray:
    """Per slice: the soft tissue between the two lungs' medial borders, in front of the spine."""
    med = np.zeros(body.shape, dtype=bool)
    nk = body.shape[0]
    for k in range(nk):
        r, l_ = right[k], left[k]
        if not (r.any() and l_.any()):
            continue
        ii = np.arange(body.shape[2])
        # medial borders, row by row
        rows = np.flatnonzero(r.any(axis=1) | l_.any(axis=1))
        if rows.size == 0:
            continue
        sl = np.zeros(body.shape[1:], dtype=bool)
        for j in rows:
            rj, lj = np.flatnonzero(r[j]), np.flatnonzero(l_[j])
            if rj.size and lj.size:
                a, b = (rj.max(), lj.min()) if xb[k, j, rj.max()] < xb[k, j, lj.min()] else (lj.max(), rj.min())
                if b > a + 1:
                    sl[j, a + 1:b] = True
        sl &= body[k] & ~lungs[k]
        med[k] = ndi.binary_fill_holes(sl) & ~lungs[k]
    med &= ~ndi.binary_dilation(spine, structure=np.ones((1, 3, 3), bool))
    med &= ~bone
    return med


def _heart(sm: np.ndarray, med: np.ndarray, grid: Grid, below_k: int | None, z_up: bool) -> np.ndarray:
    soft = med & (sm > -60.0) & (sm < 300.0)
    if below_k is not None:
        nk = sm.shape[0]
        ks = np.arange(nk)
        above = ks >= below_k if z_up else ks <= below_k
        soft[above] = False
    if not soft.any():
        return soft
    opened = ndi.binary_opening(soft, structure=_ball(10.0, grid.spacing))
    heart = _largest(opened)
    if heart.any():
        heart = ndi.binary_dilation(heart, structure=_ball(3.0, grid.spacing)) & soft
        heart = _largest(heart)
    return heart


def _aorta(sm: np.ndarray, med: np.ndarray, heart: np.ndarray, spine: np.ndarray, grid: Grid,
           xb: np.ndarray, yb: np.ndarray, mid_x: float) -> np.ndarray:
    """Round soft-tissue columns of radius 8-22 mm in the mediastinum, outside the heart."""
    soft = med & (sm > -40.0) & (sm < 400.0) & ~ndi.binary_dilation(heart, structure=_ball(2.0, grid.spacing))
    if not soft.any():
        return soft
    di, dj, dk = grid.spacing
    out = np.zeros(soft.shape, dtype=bool)
    rmin = 7.0
    for k in range(soft.shape[0]):
        s = soft[k]
        if not s.any():
            continue
        dt = ndi.distance_transform_edt(s, sampling=(dj, di))
        core = dt >= rmin
        if not core.any():
            continue
        lab, n = ndi.label(core)
        for c in range(1, n + 1):
            cm = lab == c
            r = float(dt[cm].max())
            if r > 22.0:
                continue
            # reconstruct the disc: pixels within the maximal inscribed circle
            jj, ii = np.nonzero(cm & (dt >= r - 0.5))
            j0, i0 = float(jj.mean()), float(ii.mean())
            J, I = np.ogrid[:s.shape[0], :s.shape[1]]
            disc = ((J - j0) * dj) ** 2 + ((I - i0) * di) ** 2 <= (r + 1.0) ** 2
            out[k] |= disc & s
    # keep tube-like 3-D components spanning several slices
    lab, n = ndi.label(out)
    if n == 0:
        return out
    keep = np.zeros(n + 1, dtype=bool)
    for c, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        if (sl[0].stop - sl[0].start) * dk >= 30.0:
            keep[c] = True
    return keep[lab]


# ----------------------------------------------------------------------------------------------


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
    work, grid = _downsample(series)
    sm = ndi.gaussian_filter(work, 0.7)
    x = grid.coord(0).astype(np.float32)
    y = grid.coord(1).astype(np.float32)
    z = grid.coord(2).astype(np.float32)
    xb = np.broadcast_to(x, work.shape)
    yb = np.broadcast_to(y, work.shape)
    zb = np.broadcast_to(z, work.shape)
    z_up = grid.matrix[2, 2] > 0

    body = _body(work, grid)
    if body.sum() * np.prod(grid.spacing) < 1e5:
        raise UnsupportedError("No body found in this CT series (is it a chest CT?).")
    air = body & (sm < -400.0)
    lab, n = ndi.label(air)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    big = sizes >= max(0.05 * sizes.max(), 20000.0 / np.prod(grid.spacing))
    big[0] = False
    air = big[lab]
    if not air.any():
        raise UnsupportedError("No lungs found in this CT series (is it a chest CT?).")

    aw = _airways(sm, body, air, grid, xb, notes)
    main_airway = aw["trachea"] | aw["right main bronchus"] | aw["left main bronchus"]
    # lungs: internal air minus the central airways (and their walls)
    lungs_raw = air & ~ndi.binary_dilation(main_airway, structure=_ball(2.5, grid.spacing))
    lab, n = ndi.label(lungs_raw)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= 0.05 * sizes.max()
    keep[0] = False
    lungs_raw = keep[lab]
    right, left = _split_lungs(lungs_raw, sm, xb, grid, notes)
    # fill vessels/nodules inside each lung, slice by slice
    right = _fill_slices(right) & ~main_airway
    left = _fill_slices(left) & ~main_airway & ~right
    lungs = right | left
    # closed lungs for the detector: a rolling ball brings juxtapleural nodules and hilar vessels in
    disk = _disk(12.0, grid.spacing)
    closed = (_close_slices(right, disk) | _close_slices(left, disk)) & body
    closed &= ~ndi.binary_dilation(main_airway, structure=_ball(2.0, grid.spacing))

    mid_x = float(np.median(xb[main_airway])) if main_airway.any() else (
        0.5 * (float(xb[right].max()) + float(xb[left].min())) if right.any() and left.any() else float(xb[body].mean()))
    spine, ribs = _bones(sm, body, lungs, grid, x, y, mid_x)
    if spine.any():
        mid_x = float(np.median(xb[spine]))
    bone = (sm > 180.0) & body
    med = _mediastinum(body, lungs, right, left, spine, bone, xb, yb)
    med &= ~main_airway | aw["trachea"]
    carina_k = None
    if aw["trachea"].any():
        ks = np.flatnonzero(aw["trachea"].any(axis=(1, 2)))
        carina_k = int(ks.min()) if z_up else int(ks.max())
    heart = _heart(sm, med, grid, carina_k, z_up)
    aorta = _aorta(sm, med, heart, spine, grid, xb, yb, mid_x)

    labels = np.zeros(work.shape, dtype=np.uint8)
    labels[body] = 1
    labels[med] = 13
    labels[ribs] = 15
    labels[spine] = 14
    labels[heart] = 11
    labels[aorta & ~heart] = 12
    z_ext: dict[str, tuple[float, float]] = {}
    for side, m in (("right", right), ("left", left)):
        if not m.any():
            z_ext[side] = (float("nan"), float("nan"))
            continue
        zz = zb[m]
        lo, hi = float(zz.min()), float(zz.max())
        # extend by half a working voxel: the mask covers its voxels' extent
        half = 0.5 * abs(grid.matrix[2, 2])
        lo, hi = lo - half, hi + half
        z_ext[side] = (lo, hi)
        t = (zb - lo) / max(hi - lo, 1e-6)
        for zone, cond in (("lower", t < 1 / 3), ("middle", (t >= 1 / 3) & (t < 2 / 3)), ("upper", t >= 2 / 3)):
            labels[m & cond] = ZONE_LABELS[(side, zone)]
    labels[aw["trachea"]] = 8
    labels[aw["right main bronchus"]] = 9
    labels[aw["left main bronchus"]] = 10

    masks = {"lungs_closed": closed, "right lung": right, "left lung": left, "lungs": lungs, "body": body,
             "airway": aw["airway"]}
    anat = Anatomy(series_uid=series.series_uid, grid=grid, labels=labels, masks=masks, regions={},
                   lung_z_extent=z_ext, midline_x=mid_x, notes=notes, work_hu=work)
    vox_ml = float(np.prod(grid.spacing)) / 1000.0
    for name in ["body", "lungs", "right lung", "left lung"] + [LABELS[v] for v in range(2, 16)]:
        m = anat.mask(name)
        bb = _bbox(m)
        if bb is None:
            continue
        full = grid.full_box(bb)
        idx = np.argwhere(m)  # [k, j, i]
        cen = grid.vox_to_mm(idx[:, ::-1].mean(axis=0))
        anat.regions[name] = RegionInfo(name=name, bbox_mm=series.box_vox_to_mm(full), bbox_vox=full,
                                        volume_ml=round(float(m.sum()) * vox_ml, 1),
                                        centroid_mm=[round(float(v), 1) for v in cen], bbox_work=bb)
    missing = [n for n in LABELS.values() if n not in anat.regions]
    if missing:
        notes.append("Not found: " + ", ".join(missing) + ".")
    log.info("anatomy %s: %d regions, grid %s, factors %s", series.series_uid[-8:], len(anat.regions),
             grid.shape, grid.factors)
    return anat


def region_at(anatomy: Anatomy, point_mm: list[float] | np.ndarray, lung_snap_mm: float = 6.0) -> str:
    """The most specific region containing ``point_mm``; a point just outside the lungs (within
    ``lung_snap_mm``) goes to the nearest lung zone; outside everything: "body"."""
    g = anatomy.grid
    v = np.round(g.mm_to_vox(np.asarray(point_mm, dtype=float))).astype(int)  # i, j, k
    nk, nj, ni = g.shape
    inside = 0 <= v[0] < ni and 0 <= v[1] < nj and 0 <= v[2] < nk
    lab = int(anatomy.labels[v[2], v[1], v[0]]) if inside else 0
    if 2 <= lab <= 7:
        return LABELS[lab]
    # nearest lung voxel within the snap distance
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
                return f"{side} {anatomy.zone_of(side, float(point_mm[2]))} zone"
    if lab > 0:
        return LABELS[lab]
    return "body"
