"""Synthetic chest-CT patients: a PRIOR and a CURRENT study written as real DICOM, with exact truth.

The phantom is the ground truth for the nodule detector, the anatomy boxes and the longitudinal
comparer (unit tests, demo, benchmark). Everything is deterministic given ``seed``; the patient
(anatomy, trees, nodules) does not depend on ``size``, only the scanner grid does.

Public API: :func:`write_patient` (DICOM + ``truth.json``), :func:`make_study_arrays` (one study in
memory), :func:`render_study` (the same plus the label and lung masks; codes in :data:`LABELS`).

The patient is built once, analytically, in a *body frame* (LPS mm, x to the patient's left,
y posterior, z head-ward; origin at the carina):

- body: an elliptical cross-section varying along z with a flat back (supine) resting on a curved
  table (shells ~220 HU around foam), subcutaneous fat (-100 HU) over muscle (~45 HU), a thoracic
  cavity inside the rib cage (kidney-shaped, narrowing to the thoracic inlet);
- lungs (~-850 HU, varying between the two studies as inspiration does, with a gravity gradient,
  a smooth texture and sometimes a posterior dependent density): apices narrow (paraboloid caps),
  widening to the bases; two diaphragm domes (the right higher) with deep costophrenic recesses;
  the medial borders are carved by the mediastinal structures (cardiac notch on the left);
- trachea (air, ~2 mm wall) bifurcating at the carina into the right (short, steep) and left
  (long, horizontal) main bronchi, then intrapulmonary airway trees (thin walls, air lumen);
- heart (ellipsoid ~40 HU in pericardial fat) sitting on the diaphragm, anterior-left; aorta
  (ascending, arch, descending), pulmonary trunk and arteries, SVC, great vessels, esophagus
  (sometimes with air);
- spine (vertebral bodies with cortex and discs, canal, posterior elements, kyphosis), 12 pairs of
  ribs following the chest wall and descending anteriorly, costal cartilages, sternum, clavicles,
  scapulae; liver/spleen below the domes and, in about half the seeds, a gastric air bubble;
- pulmonary arterial and venous trees grown from the hila by space colonisation (radii by a pipe
  model from ~10 mm at the hila to <1 mm, >10 000 segments, crossing each other, many running
  cranio-caudally and seen end-on: the classic false positives), plus 0-2 linear scars;
- nodules (3-7 by default): ellipsoids (axial axes differing by up to 28 %), sometimes lobulated or
  spiculated, solid (20..60 HU) or ground-glass (-550..-350 HU, ~1 in 5), at least one juxtapleural
  (centre on the costal pleura, half embedded in the chest wall) and one juxtavascular (touching a
  2-7 mm vessel) when there are three or more, >= 8 mm apart; fates between the studies: grew
  (+2..6 mm), shrank (-2..4 mm), stable (+-0.4 mm), new, resolved.

Each study is the same body seen through a different rigid pose (the anatomy moves up to 10 mm per
axis at the carina and rotates up to 5 degrees about z and 2.5 about x/y), a different field of view,
pixel spacing, slice spacing and slice count; the scanner stays axial. Voxels are rendered with a
partial-volume ramp, blurred by a PSF (and the slice profile) and given correlated Gaussian noise
(sigma 15-30 HU; one seed in about four is low-dose, 40-50 HU). The DICOM files store HU + 1024 as
signed int16 with RescaleIntercept -1024; the instance numbers of the current study run head to
foot (reverse of the spatial order) and file names are shuffled in both studies.

Truth (``truth.json``) gives, in EACH study's own patient frame: the anatomy boxes of every region
of :mod:`tools.vocab` (exact: voxel extents of the rasterised masks, +-half a voxel; lung zones are
craniocaudal thirds of that lung's own extent), each nodule's centre, Lung-RADS axial diameters
(mean of the analytic long and short axes), volume and box, and the prior-to-current rigid
transform (4x4, LPS mm to LPS mm; 6 decimals, other floats 0.01).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

F32 = np.float32
SIZES: tuple[str, ...] = ("small", "full")
WHICH: tuple[str, ...] = ("prior", "current")

#: Label codes of :attr:`PhantomStudy.labels` (one label per voxel, last painter wins).
LABELS: dict[str, int] = {
    "outside": 0, "soft_tissue": 1, "mediastinal_fat": 2, "heart": 3, "aorta": 4, "great_vessel": 5,
    "trachea": 6, "right_main_bronchus": 7, "left_main_bronchus": 8, "esophagus": 9, "lung": 10,
    "pulmonary_vessel": 11, "airway": 12, "nodule": 13, "spine": 14, "rib": 15, "other_bone": 16,
    "cartilage": 17, "table": 18, "abdomen": 19, "gas": 20, "spicule": 21, "scar": 22,
}
L = LABELS

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_MED_FAT = -90.0
HU_BLOOD = 40.0

_STREAM_ANATOMY, _STREAM_TREES, _STREAM_NODULES, _STREAM_POSE, _STREAM_META = 1, 2, 3, 4, 5
_STREAM_GEOM, _STREAM_RENDER = 6, 7


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5AD1, *keys]))


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def _rot_xyz(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix R = Rz(az) @ Ry(ay) @ Rx(ax), angles in degrees."""
    x, y, z = (math.radians(a) for a in (ax, ay, az))
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _frame_from_axis(u1: np.ndarray, hint: np.ndarray | None = None) -> np.ndarray:
    """Orthonormal 3x3 matrix whose first column is ``u1``."""
    u1 = _unit(u1)
    h = np.array([0.0, 0.0, 1.0]) if hint is None else _unit(hint)
    if abs(float(u1 @ h)) > 0.95:
        h = np.array([1.0, 0.0, 0.0])
    u2 = _unit(np.cross(h, u1))
    u3 = np.cross(u1, u2)
    return np.stack([u1, u2, u3], axis=1)


def _perp(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random unit vectors perpendicular to each row of ``d`` (n, 3)."""
    r = rng.standard_normal(d.shape)
    r -= (r * d).sum(-1, keepdims=True) * d
    return _unit(r)


# --------------------------------------------------------------------------------------------- shapes
class _Prim:
    """A solid with an approximate signed distance (mm, negative inside) in the body frame."""

    lo: np.ndarray
    hi: np.ndarray

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class _Capsule(_Prim):
    """Tapered tube from ``a`` (radius ``ra``) to ``b`` (radius ``rb``) with round ends."""

    def __init__(self, a: Any, b: Any, ra: float, rb: float | None = None) -> None:
        self.a = np.asarray(a, dtype=float)
        self.b = np.asarray(b, dtype=float)
        self.ra = float(ra)
        self.rb = float(ra if rb is None else rb)
        r = max(self.ra, self.rb)
        self.lo = np.minimum(self.a, self.b) - r
        self.hi = np.maximum(self.a, self.b) + r

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        ab = self.b - self.a
        l2 = float(ab @ ab)
        px, py, pz = x - F32(self.a[0]), y - F32(self.a[1]), z - F32(self.a[2])
        if l2 < 1e-9:
            return np.sqrt(px * px + py * py + pz * pz) - F32(self.ra)
        t = (px * F32(ab[0]) + py * F32(ab[1]) + pz * F32(ab[2])) * F32(1.0 / l2)
        np.clip(t, 0, 1, out=t)
        dx = px - t * F32(ab[0])
        dy = py - t * F32(ab[1])
        dz = pz - t * F32(ab[2])
        return np.sqrt(dx * dx + dy * dy + dz * dz) - (F32(self.ra) + t * F32(self.rb - self.ra))


class _Ellipsoid(_Prim):
    """Ellipsoid with semi-axes ``axes`` along the columns of ``rot``; optionally lobulated."""

    def __init__(self, center: Any, axes: Any, rot: np.ndarray | None = None, lobe_eps: float = 0.0,
                 lobe_vecs: np.ndarray | None = None, lobe_freq: np.ndarray | None = None,
                 lobe_phase: np.ndarray | None = None, lobe_w: np.ndarray | None = None) -> None:
        self.c = np.asarray(center, dtype=float)
        self.axes = np.asarray(axes, dtype=float)
        self.rot = np.eye(3) if rot is None else np.asarray(rot, dtype=float)
        self.eps = float(lobe_eps)
        self.lv, self.lf, self.lp, self.lw = lobe_vecs, lobe_freq, lobe_phase, lobe_w
        ext = np.sqrt(((self.rot * self.axes[None, :]) ** 2).sum(1)) * (1 + abs(self.eps))
        self.lo = self.c - ext
        self.hi = self.c + ext

    def lobulation(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        """Factor (1 + eps * f) with |f| <= 1 for unit local directions."""
        f = np.zeros_like(ux)
        assert self.lv is not None and self.lf is not None and self.lp is not None and self.lw is not None
        for v, fr, ph, w in zip(self.lv, self.lf, self.lp, self.lw):
            f += F32(w) * np.cos(F32(math.pi * fr) * (ux * F32(v[0]) + uy * F32(v[1]) + uz * F32(v[2])) + F32(ph))
        return 1 + F32(self.eps) * f

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        px, py, pz = x - F32(self.c[0]), y - F32(self.c[1]), z - F32(self.c[2])
        m = self.rot.astype(F32)
        lx = px * m[0, 0] + py * m[1, 0] + pz * m[2, 0]
        ly = px * m[0, 1] + py * m[1, 1] + pz * m[2, 1]
        lz = px * m[0, 2] + py * m[1, 2] + pz * m[2, 2]
        a, b, c = (F32(v) for v in self.axes)
        rho = np.sqrt((lx / a) ** 2 + (ly / b) ** 2 + (lz / c) ** 2)
        dist = np.sqrt(lx * lx + ly * ly + lz * lz)
        rs = np.where(rho > 1e-6, dist / np.maximum(rho, F32(1e-6)), F32(min(self.axes)))
        if self.eps and self.lv is not None:
            inv = F32(1) / np.maximum(dist, F32(1e-6))
            rs = rs * self.lobulation(lx * inv, ly * inv, lz * inv)
        return dist - rs

    def radius_along(self, u_body: np.ndarray) -> np.ndarray:
        """Surface radius (no lobulation) along body-frame unit directions (n, 3)."""
        loc = np.asarray(u_body, dtype=float) @ self.rot
        return 1.0 / np.sqrt(((loc / self.axes[None, :]) ** 2).sum(-1))


class _ECyl(_Prim):
    """Z-aligned elliptic cylinder (semi-axes ax, ay, half height hz)."""

    def __init__(self, center: Any, ax: float, ay: float, hz: float) -> None:
        self.c = np.asarray(center, dtype=float)
        self.ax, self.ay, self.hz = float(ax), float(ay), float(hz)
        e = np.array([self.ax, self.ay, self.hz])
        self.lo, self.hi = self.c - e, self.c + e

    def sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        px, py = x - F32(self.c[0]), y - F32(self.c[1])
        rho = np.sqrt((px / F32(self.ax)) ** 2 + (py / F32(self.ay)) ** 2)
        dist = np.sqrt(px * px + py * py)
        rs = np.where(rho > 1e-6, dist / np.maximum(rho, F32(1e-6)), F32(min(self.ax, self.ay)))
        return np.maximum(dist - rs, np.abs(z - F32(self.c[2])) - F32(self.hz))


def _catmull_rom(pts: np.ndarray, n_per: int) -> np.ndarray:
    p = np.asarray(pts, dtype=float)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        for t in np.linspace(0, 1, n_per, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(p[-1])
    return np.asarray(out)


def _tube(points: Any, radii: Any, n_per: int = 1) -> list[_Capsule]:
    pts = np.asarray(points, dtype=float)
    rad = np.asarray(radii, dtype=float)
    if n_per > 1:
        s = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        pts2 = _catmull_rom(pts, n_per)
        s2 = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(pts2, axis=0), axis=1))])
        rad = np.interp(s2 / max(s2[-1], 1e-9), s / max(s[-1], 1e-9), rad)
        pts = pts2
    return [_Capsule(pts[i], pts[i + 1], rad[i], rad[i + 1]) for i in range(len(pts) - 1)]


# --------------------------------------------------------------------------------------------- anatomy
@dataclass
class _Anatomy:
    """The analytic trunk: body, chest wall, thoracic cavity, diaphragm, apices (body frame)."""

    s: float
    hs: float
    sex: str
    age: int
    a_max: float
    b_max: float
    b_post: float
    flat: float
    t_fat: float
    t_fat_post: float
    zc: np.ndarray
    body_a: np.ndarray
    body_b: np.ndarray
    cav_a: np.ndarray
    cav_front: np.ndarray
    cav_back: np.ndarray
    yvb: np.ndarray
    slab_w: np.ndarray
    slab_w_ant: float
    caps: tuple[tuple[float, float, float, float], tuple[float, float, float, float]]
    domes: tuple[tuple[float, ...], tuple[float, ...]]
    liver_hu: float
    spleen_hu: float
    kidney: float = 0.07
    recess: float = 72.0
    _tab: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), F32), repr=False)
    _tz0: float = 0.0

    def __post_init__(self) -> None:
        zt = np.arange(self.zc[0], self.zc[-1] + 0.5, 0.5)
        self._tz0 = float(zt[0])
        self._tab = np.stack([np.interp(zt, self.zc, p) for p in (
            self.body_a, self.body_b, self.cav_a, self.cav_front, self.cav_back, self.yvb, self.slab_w)]).astype(F32)

    # profiles at arbitrary z (vectorised by table lookup)
    def prof(self, z: np.ndarray) -> np.ndarray:
        idx = np.clip(((np.asarray(z, dtype=F32) - F32(self._tz0)) * 2 + 0.5).astype(np.int32), 0,
                      self._tab.shape[1] - 1)
        return self._tab[:, idx]

    def yv(self, z: float) -> float:
        return float(np.interp(z, self.zc, self.yvb))

    def at(self, name: str, z: float) -> float:
        return float(np.interp(z, self.zc, getattr(self, name)))

    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Height of the diaphragm surface and its squared slope at (x, y).

        Each dome is a paraboloid whose drop saturates smoothly at the depth of the costophrenic recess.
        """
        best_z: np.ndarray | None = None
        best_g: np.ndarray | None = None
        inv = F32(1.0 / self.recess)
        for xd, yd, zt, rx, rya, ryp in self.domes:
            dx = x - F32(xd)
            dy = y - F32(yd)
            iry = np.where(dy < 0, F32(1.0 / rya), F32(1.0 / ryp))
            gx = dx * F32(1.0 / rx)
            gy = dy * iry
            q = (dx * gx + dy * gy) * F32(0.5)
            t = q * inv
            t *= t
            u = 1 + t * t
            su = np.sqrt(u)
            zd = F32(zt) - q / np.sqrt(su)
            g = (gx * gx + gy * gy) / (u * u * su)
            if best_z is None:
                best_z, best_g = zd, g
            else:
                sel = zd > best_z
                best_z = np.where(sel, zd, best_z)
                best_g = np.where(sel, g, best_g)
        assert best_z is not None and best_g is not None
        return best_z, best_g

    def dia_sd(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance to the diaphragm: positive below it (abdomen), negative above (chest)."""
        zd, g = self.diaphragm(x, y)
        return (zd - z) / np.sqrt(1 + g)

    def fields(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
        """All analytic fields at body-frame points (any shape, float32)."""
        x = np.asarray(x, dtype=F32)
        y = np.asarray(y, dtype=F32)
        z = np.asarray(z, dtype=F32)
        a, b, ca, cf, cb, yv, sw = self.prof(z)
        yc = F32(self.b_post + self.flat) - b
        dy = y - yc
        rho = np.sqrt(x * x + dy * dy)
        r = np.sqrt((x / a) ** 2 + (dy / b) ** 2)
        depth = rho * (1 - r) / np.maximum(r, F32(1e-4))
        depth = np.minimum(depth, F32(self.b_post) - y)
        tf = F32(self.t_fat) + F32(self.t_fat_post - self.t_fat) * np.clip(dy / b, 0, 1)
        # thoracic cavity (inner surface of the rib cage), wider posteriorly
        ycc = (cf + cb) * F32(0.5)
        bc = (cb - cf) * F32(0.5)
        dyc = y - ycc
        cae = ca * (1 + F32(self.kidney) * np.clip(dyc / bc, -1, 1))
        rhoc = np.sqrt(x * x + dyc * dyc)
        rc = np.sqrt((x / cae) ** 2 + (dyc / bc) ** 2)
        cav_sd = -(rhoc * (1 - rc) / np.maximum(rc, F32(1e-4)))
        zmin, zmax = (float(z.min()), float(z.max())) if z.size else (0.0, 0.0)
        top_dome = max(d[2] for d in self.domes)
        if zmin > top_dome + 12:  # entirely above the domes: only the sign matters
            dia = F32(top_dome) - z
        else:
            dia = self.dia_sd(x, y, z)
        right = x < 0
        (xr, yr, zr, rcr), (xl, yl, zl, rcl) = self.caps
        if zmax < min(zr, zl) - 170:  # far below the apices
            cap_sd = z - F32(min(zr, zl))
        else:
            xa = np.where(right, F32(xr), F32(xl))
            ya = np.where(right, F32(yr), F32(yl))
            za = np.where(right, F32(zr), F32(zl))
            rcap = np.where(right, F32(rcr), F32(rcl))
            q = (x - xa) ** 2 + (y - ya) ** 2
            cap_sd = (z - (za - q / (2 * rcap))) / np.sqrt(1 + q / (rcap * rcap))
        t = np.clip((y - (yv - F32(75 * self.s))) / F32(30.0), 0, 1)
        slab_sd = (F32(self.slab_w_ant) + (sw - F32(self.slab_w_ant)) * t) - np.abs(x)
        pleural_sd = np.maximum(np.maximum(cav_sd, dia), cap_sd)
        lung_sd = np.maximum(pleural_sd, slab_sd)
        return {"depth": depth, "tf": tf, "cav_sd": cav_sd, "dia_sd": dia, "cap_sd": cap_sd, "slab_sd": slab_sd,
                "pleural_sd": pleural_sd, "lung_sd": lung_sd, "right": right, "yv": yv}


def _build_anatomy(seed: int) -> _Anatomy:
    rng = _rng(seed, _STREAM_ANATOMY)
    sex = "F" if rng.random() < 0.45 else "M"
    s = float(rng.uniform(0.94, 1.05) * (0.95 if sex == "F" else 1.0))
    hs = float(rng.uniform(0.92, 1.07) * (0.96 if sex == "F" else 1.0))
    age = int(rng.integers(48, 82))
    a_max = float(min(rng.uniform(148, 166) * s, 168.0))
    b_max = float(rng.uniform(106, 122) * s)
    t_fat = float(rng.uniform(6, 26) * s)
    t_fat_post = 0.6 * t_fat
    b_post, flat = b_max, 8.0
    zc = np.array([-340, -260, -200, -150, -100, -50, 0, 50, 100, 150, 230], dtype=float) * hs
    body_a = a_max * np.array([0.97, 0.98, 0.99, 1.0, 1.0, 0.99, 0.965, 0.93, 0.87, 0.78, 0.6])
    body_b = b_max * np.array([1.04, 1.03, 1.02, 1.0, 0.98, 0.95, 0.91, 0.86, 0.79, 0.7, 0.55])
    yc = b_post + flat - body_b
    body_front = yc - body_b
    inlet = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.95, 0.82, 0.62, 0.45])  # the rib cage narrows upwards
    cav_a = (body_a - t_fat - 9 * s) * inlet
    cav_front = body_front + t_fat + 12 * s
    cav_back = np.full_like(zc, b_post - t_fat_post - 27 * s)
    kyph = 0.00032 * (zc / hs + 60.0) ** 2
    yvb = b_post - t_fat_post - 57 * s - kyph
    slab_w = np.where(zc > 20 * hs, 15.0 * s, 9.0 * s)
    z_apex = 85.0 * hs + rng.uniform(-6, 6)
    caps_list = []
    for side in (-1, 1):
        za = z_apex + (0.0 if side < 0 else rng.uniform(-3, 7))
        ca = float(np.interp(za - 40, zc, cav_a))
        xa = side * 0.5 * ca
        ya = float(np.interp(za, zc, yvb)) - rng.uniform(4, 14) * s
        caps_list.append((float(xa), float(ya), float(za), float(rng.uniform(24, 32) * s)))
    z_dr = -95.0 * hs + rng.uniform(-8, 8)
    z_dl = z_dr - rng.uniform(10, 24)
    domes_list = []
    for side, zt in ((-1, z_dr), (1, z_dl)):
        ca = float(np.interp(zt, zc, cav_a))
        ymid = 0.5 * (float(np.interp(zt, zc, cav_front)) + float(np.interp(zt, zc, cav_back)))
        domes_list.append((float(side * 0.45 * ca), float(ymid - 8 * s), float(zt), float(rng.uniform(34, 42) * s),
                           float(rng.uniform(55, 75) * s), float(rng.uniform(36, 44) * s)))
    return _Anatomy(
        s=s, hs=hs, sex=sex, age=age, a_max=a_max, b_max=b_max, b_post=b_post, flat=flat, t_fat=t_fat,
        t_fat_post=t_fat_post, zc=zc, body_a=body_a, body_b=body_b, cav_a=cav_a, cav_front=cav_front,
        cav_back=cav_back, yvb=yvb, slab_w=slab_w, slab_w_ant=5.0 * s,
        caps=(caps_list[0], caps_list[1]), domes=(domes_list[0], domes_list[1]),
        liver_hu=float(rng.uniform(52, 66)), spleen_hu=float(rng.uniform(42, 50)), recess=float(rng.uniform(84, 100) * hs))


# --------------------------------------------------------------------------------------------- paint jobs
@dataclass
class _Job:
    prim: _Prim
    hu: float | None
    label: int | None
    grow: float = 0.0
    mode: str = "alpha"  # "alpha" | "max"
    clear_lung: bool = False
    medi: bool | None = None  # True: mark mediastinum (above the diaphragm); False: unmark
    allow: tuple[int, ...] | None = None  # only paint over these labels
    clip: str | None = None  # "above_diaphragm" | "below_diaphragm" | "pleural"
    coarse: bool = False  # also shapes the coarse lung map used for growing trees and placing nodules


@dataclass
class _Tree:
    """Capsule segments of the pulmonary vessel (or airway) trees, as arrays."""

    a: np.ndarray  # (n, 3)
    b: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    root: np.ndarray  # (n,) root index
    gen: np.ndarray

    def __len__(self) -> int:
        return int(self.a.shape[0])

    def subset(self, keep: np.ndarray) -> "_Tree":
        return _Tree(self.a[keep], self.b[keep], self.ra[keep], self.rb[keep], self.root[keep], self.gen[keep])

    def dist(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distance from point ``p`` to each segment axis, the local radius there and the closest points."""
        ab = self.b - self.a
        l2 = np.maximum((ab * ab).sum(1), 1e-9)
        t = np.clip(((p[None, :] - self.a) * ab).sum(1) / l2, 0, 1)
        c = self.a + t[:, None] * ab
        d = np.linalg.norm(p[None, :] - c, axis=1)
        return d, self.ra + t * (self.rb - self.ra), c


def _build_structures(an: _Anatomy, rng: np.random.Generator) -> dict[str, Any]:
    """Mediastinum, airways and skeleton as paint jobs, plus the roots of the lung trees."""
    s, hs = an.s, an.hs
    s_ap = (an.yv(0.0) - an.at("cav_front", 0.0)) / 115.0
    s_lat = an.at("cav_a", 0.0) / 110.0

    def pt(x: float, yrel: float, z: float) -> np.ndarray:
        zz = z * hs
        return np.array([x * s_lat, an.yv(zz) + yrel * s_ap, zz])

    jobs: list[_Job] = []
    medi_struct: list[_Job] = []
    margins: list[_Job] = []

    def add(prims: list[_Prim] | _Prim, hu: float, label: int, grow: float, **kw: Any) -> None:
        for p in (prims if isinstance(prims, list) else [prims]):
            margins.append(_Job(p, HU_MED_FAT, L["mediastinal_fat"], grow=grow, clear_lung=True, medi=True,
                                coarse=True))
            medi_struct.append(_Job(p, hu, label, medi=True, **kw))

    # heart: ellipsoid anterior-left, sitting on the diaphragm, in pericardial fat
    zh = an.domes[1][2] + rng.uniform(40, 52) * hs
    axes = np.array([60.0, 44.0, 50.0]) * s * rng.uniform(0.92, 1.12)
    ang = math.radians(rng.uniform(28, 42))
    rot = _frame_from_axis(np.array([math.cos(ang), -math.sin(ang), -rng.uniform(0.25, 0.45)]))
    ext = np.sqrt(((rot * axes[None, :]) ** 2).sum(1))
    front = an.at("cav_front", zh) + 2.0
    back = an.yv(zh) - 31.0 * s
    if back - front < 2 * ext[1]:
        f = (back - front) / (2 * ext[1])
        axes *= f
        ext *= f
    hc = np.array([14.0 * s_lat + rng.uniform(-4, 4), 0.5 * (front + back), zh])
    heart = _Ellipsoid(hc, axes, rot)
    add(heart, HU_BLOOD + 2, L["heart"], 4.0, clip="above_diaphragm")

    ao_f = rng.uniform(0.92, 1.15) * s
    aorta_pts = [hc + np.array([-10 * s, -4 * s, 22 * hs]), pt(2, -86, -22), pt(-2, -86, 10), pt(4, -76, 36),
                 pt(30, -48, 34), pt(30, -14, 10), pt(28, -12, -50), pt(18, -18, -140), pt(8, -26, -260)]
    aorta_r = np.array([14.5, 14.5, 14.5, 13.5, 13, 12.5, 12, 11.5, 11]) * ao_f
    add(_tube(aorta_pts, aorta_r, n_per=6), HU_BLOOD, L["aorta"], 3.0)

    gv: list[_Prim] = []
    gv += _tube([pt(0, -80, 36), pt(-10, -70, 70), pt(-16, -62, 150)], [6.5 * s] * 3, n_per=3)
    gv += _tube([pt(10, -72, 40), pt(14, -62, 150)], [4.5 * s] * 2)
    gv += _tube([pt(24, -56, 38), pt(30, -46, 75), pt(48, -34, 115)], [5 * s] * 3, n_per=3)
    gv += _tube([pt(-28, -80, 150), pt(-28, -80, 40), pt(-28, -82, -20), hc + np.array([-30 * s, -8 * s, 25 * hs])],
                [10 * s] * 4, n_per=3)
    gv += _tube([pt(-45, -60, 130), pt(-30, -78, 50)], [7 * s] * 2)
    gv += _tube([pt(45, -50, 110), pt(20, -92, 62), pt(-24, -82, 48)], [6 * s] * 3, n_per=3)
    pa_f = rng.uniform(0.9, 1.15) * s
    gv += _tube([hc + np.array([10 * s, -25 * s, 28 * hs]), pt(22, -68, -24), pt(26, -52, -12)], [14 * pa_f] * 3,
                n_per=3)
    gv += _tube([pt(18, -60, -18), pt(-6, -62, -24), pt(-30, -56, -28), pt(-44, -46, -30)], [10 * pa_f] * 4, n_per=3)
    gv += _tube([pt(26, -52, -12), pt(38, -44, -4), pt(50, -34, -12)], [10 * pa_f] * 3, n_per=3)
    la = hc + np.array([0.0, 0.55 * ext[1], 18 * hs])
    vein_roots = {"rs": pt(-42, -66, -34), "ri": pt(-38, -38, -64), "ls": pt(44, -58, -26), "li": pt(40, -34, -58)}
    for key, p in vein_roots.items():
        start = la + np.array([(-18 if key[0] == "r" else 18) * s, 0, 0])
        gv += _tube([start, p], [6 * s, 6 * s])
    add(gv, HU_BLOOD, L["great_vessel"], 3.0, allow=(L["soft_tissue"], L["mediastinal_fat"], L["lung"]))

    eso = _tube([pt(4, -24, 200), pt(4, -22, 40), pt(6, -22, -40), pt(10, -28, -100), pt(22, -42, -160)],
                [7 * s] * 5, n_per=3)
    add(eso, 35.0, L["esophagus"], 3.0)
    eso_air = rng.random() < 0.5

    # airways: trachea, carina, main bronchi (wall then lumen)
    rt = 10.0 * s * rng.uniform(0.88, 1.08)
    carina = pt(0, -40, 0)
    trachea = _tube([pt(0, -58, 200), pt(0, -50, 100), pt(-2, -44, 40), carina], [rt] * 4, n_per=3)
    rmb_end = carina + 26 * s * _unit(np.array([-0.62, 0.10, -0.78]))
    lmb_end = carina + 48 * s * _unit(np.array([0.80, 0.12, -0.58]))
    r_rmb, r_lmb = 7.5 * s, 6.5 * s
    rmb = _Capsule(carina, rmb_end, r_rmb * 1.05, r_rmb)
    lmb = _Capsule(carina, lmb_end, r_lmb * 1.05, r_lmb)
    for p in trachea:
        margins.append(_Job(p, HU_MED_FAT, L["mediastinal_fat"], grow=2.0, clear_lung=True, medi=True, coarse=True))
    for p in (rmb, lmb):
        margins.append(_Job(p, HU_MED_FAT, L["mediastinal_fat"], grow=1.5, clear_lung=True, medi=True, coarse=True))
    airway_main: list[_Job] = []
    for p in trachea:
        airway_main.append(_Job(p, 55.0, L["trachea"], medi=True))
    airway_main.append(_Job(rmb, 50.0, L["right_main_bronchus"], medi=True))
    airway_main.append(_Job(lmb, 50.0, L["left_main_bronchus"], medi=True))
    for p in trachea:
        airway_main.append(_Job(_Capsule(p.a, p.b, p.ra - 2.0, p.rb - 2.0), HU_AIR, None))
    airway_main.append(_Job(_Capsule(carina, rmb_end, r_rmb * 1.05 - 1.6, r_rmb - 1.6), HU_AIR, None))
    airway_main.append(_Job(_Capsule(carina, lmb_end, r_lmb * 1.05 - 1.5, r_lmb - 1.5), HU_AIR, None))
    if eso_air:
        for p in eso[: len(eso) // 2]:
            airway_main.append(_Job(_Capsule(p.a, p.b, 2.2, 2.2), HU_AIR, None, allow=(L["esophagus"],)))

    # roots of the trees: (point, direction, radius, side 1=right 2=left, hilum)
    hil_r, hil_l = pt(-44, -46, -30), pt(50, -34, -12)
    art = [(hil_r, (-0.3, 0.0, 1.0), 4.5), (hil_r, (-0.5, -0.8, -0.3), 3.2), (hil_r, (-0.3, 0.35, -1.0), 5.0),
           (hil_l, (0.3, -0.15, 1.0), 4.5), (hil_l, (0.5, -0.8, -0.35), 3.2), (hil_l, (0.3, 0.35, -1.0), 5.0)]
    vei = [(vein_roots["rs"], (-0.5, -0.3, 0.8), 4.5), (vein_roots["rs"], (-0.6, -0.7, -0.2), 3.5),
           (vein_roots["ri"], (-0.5, 0.3, -0.8), 5.0), (vein_roots["ls"], (0.5, -0.3, 0.8), 4.5),
           (vein_roots["ls"], (0.6, -0.7, -0.3), 3.3), (vein_roots["li"], (0.5, 0.3, -0.8), 5.0)]
    vessel_roots = [(np.asarray(p, float), _unit(np.array(d)), r * s, 1 if p[0] < 0 else 2)
                    for p, d, r in art + vei]
    aw = [(rmb_end, (-0.85, 0.05, 0.5), 4.0), (rmb_end, (-0.2, 0.15, -1.0), 5.0),
          (lmb_end, (0.55, -0.3, 0.75), 4.2), (lmb_end, (0.3, 0.3, -0.9), 4.5)]
    airway_roots = [(np.asarray(p, float), _unit(np.array(d)), r * s, 1 if p[0] < 0 else 2) for p, d, r in aw]

    spine_margin, bones = _build_skeleton(an, rng, s_lat)
    abdomen: list[_Job] = []
    if rng.random() < 0.55:  # gastric air under the left dome
        xd, yd, zt = an.domes[1][0], an.domes[1][1], an.domes[1][2]
        gc = np.array([xd + rng.uniform(-5, 15), yd - rng.uniform(5, 25), zt - rng.uniform(28, 40)])
        ga = np.array([rng.uniform(22, 34), rng.uniform(18, 28), rng.uniform(14, 22)]) * s
        abdomen.append(_Job(_Ellipsoid(gc, ga + 3.5), 30.0, L["abdomen"], clip="below_diaphragm"))
        abdomen.append(_Job(_Ellipsoid(gc, ga), HU_AIR, L["gas"], clip="below_diaphragm"))
    return {
        "margins": margins, "spine_margin": spine_margin, "medi_struct": medi_struct, "airway_main": airway_main,
        "bones": bones, "abdomen": abdomen, "vessel_roots": vessel_roots, "airway_roots": airway_roots,
        "carina": carina, "heart": heart, "hila": (hil_r, hil_l),
    }


def _build_skeleton(an: _Anatomy, rng: np.random.Generator, s_lat: float) -> tuple[list[_Job], list[_Job]]:
    s, hs = an.s, an.hs
    margin: list[_Job] = []
    bones: list[_Job] = []
    pitch = 24.0 * hs * rng.uniform(0.95, 1.05)
    cortical = rng.uniform(550, 750)
    cancellous = rng.uniform(170, 300) - max(0, an.age - 60) * 2.0
    for n in range(0, 17):  # C7 .. L4
        zn = (4.5 - n) * pitch
        yv = an.yv(zn)
        ax, ay = (17.0 + 0.5 * n) * s, (13.0 + 0.45 * n) * s
        hh = 0.5 * pitch - 2.5
        margin.append(_Job(_ECyl((0, yv + 6 * s, zn), ax + 9 * s, ay + 15 * s, 0.5 * pitch), 35.0, L["soft_tissue"],
                           clear_lung=True, medi=False, coarse=True))
        bones.append(_Job(_ECyl((0, yv, zn), ax, ay, hh), cortical, L["spine"]))
        bones.append(_Job(_ECyl((0, yv, zn), ax - 1.5, ay - 1.5, hh - 1.2), cancellous, None))
        bones.append(_Job(_ECyl((0, yv, zn - 0.5 * pitch), ax - 0.5, ay - 0.5, 2.5), 85.0, L["spine"]))
        cy = yv + ay + 9.0 * s
        bones.append(_Job(_Capsule((0, cy, zn + hh - 2), (0, cy, zn - hh + 2), 13.0 * s), cortical * 0.8, L["spine"]))
        bones.append(_Job(_Capsule((0, cy, zn + hh + 3), (0, cy, zn - hh - 3), 8.0 * s), 20.0, L["soft_tissue"]))
        bones.append(_Job(_Capsule((0, cy + 10 * s, zn), (0, cy + 36 * s, zn - 20 * hs), 4.5 * s, 3.5 * s),
                          cortical * 0.85, L["spine"]))
        for side in (-1, 1):
            bones.append(_Job(_Capsule((side * 8 * s, cy - 2, zn + 2), (side * 30 * s, cy + 5, zn + 4), 5.0 * s,
                                       4.0 * s), cortical * 0.8, L["spine"]))
    # ribs: 12 pairs following the chest wall, descending anteriorly; cartilages to the sternum
    z_top_st = an.caps[0][2] - 30 * hs
    z_bot_st = an.domes[0][2] - 8 * hs
    rib_cort, rib_marrow = rng.uniform(650, 900), rng.uniform(180, 300)
    cart_hu = 110.0 + (150.0 if an.age > 65 and rng.random() < 0.6 else 0.0)
    for n in range(1, 13):
        zn = (4.5 - n) * pitch + 0.35 * pitch
        if n == 1:
            drop, phi1, r = 30 * hs, 0.72 * math.pi, 5.5 * s
        elif n <= 7:
            drop, phi1, r = (55 + 6 * n) * hs, (0.80 - 0.01 * n) * math.pi, 4.5 * s
        elif n <= 10:
            drop, phi1, r = 90 * hs, 0.64 * math.pi, 4.3 * s
        else:
            drop, phi1, r = 40 * hs, (0.47 if n == 11 else 0.36) * math.pi, 4.0 * s
        for side in (-1, 1):
            pts, phi0 = _rib_path(an, side, zn, drop, r, phi1)
            caps = _tube(pts, [r] * len(pts))
            for c in caps:
                bones.append(_Job(c, rib_cort, L["rib"], clear_lung=True))
            for c in caps:
                bones.append(_Job(_Capsule(c.a, c.b, r - 1.3), rib_marrow, None))
            if n <= 7:
                zst = max(z_top_st - 14 * (n - 1) * hs, z_bot_st + 10)
                cart, _ = _rib_path(an, side, zn, drop, r, math.pi - math.asin(min(0.9, 22 * s / an.at("cav_a", zst))),
                                    phi_start=phi1, z_end=zst)
                for c in _tube(cart, [r * 0.95] * len(cart)):
                    bones.append(_Job(c, cart_hu, L["cartilage"], allow=(L["soft_tissue"], L["mediastinal_fat"],
                                                                       L["cartilage"])))
    # sternum (manubrium then body), just in front of the cavity
    zs = np.arange(z_top_st, z_bot_st, -8.0)
    for i, z in enumerate(zs):
        man = z > z_top_st - 50 * hs
        ax = (24.0 if man else 14.0) * s
        ay = 7.0 * s
        yc = an.at("cav_front", z) - 6.5 * s
        bones.append(_Job(_ECyl((0, yc, z - 4), ax, ay, 4.2), rng.uniform(450, 600) if i == 0 else 520.0, L["other_bone"]))
        bones.append(_Job(_ECyl((0, yc, z - 4), ax - 1.4, ay - 1.4, 4.3), 170.0, None))
    # clavicles and scapulae
    for side in (-1, 1):
        zc0 = z_top_st + 6 * hs
        y0 = an.at("cav_front", zc0) - 6 * s
        lat = min(an.at("body_a", zc0 + 25 * hs) - 18 * s, 115 * s)
        cl = _tube([(side * 20 * s, y0, zc0), (side * 65 * s, y0 - 4, zc0 + 12 * hs), (side * lat, y0 + 30 * s,
                                                                                       zc0 + 24 * hs)],
                   [6.0 * s] * 3, n_per=3)
        for c in cl:
            bones.append(_Job(c, rib_cort * 0.9, L["other_bone"]))
        for c in cl:
            bones.append(_Job(_Capsule(c.a, c.b, c.ra - 1.6), rib_marrow, None))
        zsc = 35 * hs
        phi = 0.62
        ca, cf, cb = an.at("cav_a", zsc), an.at("cav_front", zsc), an.at("cav_back", zsc)
        ycc, bc = 0.5 * (cf + cb), 0.5 * (cb - cf)
        cen = np.array([side * (ca + 24 * s) * math.sin(phi), ycc + (bc + 24 * s) * math.cos(phi), zsc])
        nrm = _unit(np.array([side * math.sin(phi), math.cos(phi), 0.0]))
        rot = _frame_from_axis(nrm)
        bones.append(_Job(_Ellipsoid(cen, np.array([3.5, 45 * s, 75 * hs]), rot), rng.uniform(350, 500),
                          L["other_bone"], allow=(L["soft_tissue"], L["other_bone"])))
    return margin, bones


def _rib_path(an: _Anatomy, side: int, zn: float, drop: float, r: float, phi_end: float,
              phi_start: float | None = None, z_end: float | None = None, npts: int = 20
              ) -> tuple[np.ndarray, float]:
    g = r + 1.5
    ca0 = an.at("cav_a", zn)
    phi0 = math.asin(min(0.95, 30 * an.s / (ca0 + g)))
    start = phi0 if phi_start is None else phi_start
    phis = np.linspace(start, phi_end, npts)
    frac = (phis - phi0) / (math.pi - phi0)
    zs = zn - drop * np.clip(frac, 0, 1) ** 1.25
    if z_end is not None:
        zs = np.linspace(zs[0], z_end, npts)
    ca = np.interp(zs, an.zc, an.cav_a)
    cf = np.interp(zs, an.zc, an.cav_front)
    cb = np.interp(zs, an.zc, an.cav_back)
    ycc, bc = 0.5 * (cf + cb), 0.5 * (cb - cf)
    cae = ca * (1 + an.kidney * np.cos(phis))
    x = side * (cae + g) * np.sin(phis)
    y = ycc + (bc + g) * np.cos(phis)
    return np.stack([x, y, zs], axis=1), phi0


# --------------------------------------------------------------------------------------------- canvas
class _Canvas:
    """A voxel grid (axial, LPS) onto which the body is rendered through a rigid pose (body -> grid frame)."""

    def __init__(self, shape: tuple[int, int, int], origin: Any, spacing: Any, rot: np.ndarray, trans: Any,
                 an: _Anatomy, want_hu: bool = True) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.origin = np.asarray(origin, dtype=float)
        self.spacing = np.asarray(spacing, dtype=float)  # (di, dj, dk)
        self.rot = np.asarray(rot, dtype=float)
        self.trans = np.asarray(trans, dtype=float)
        self.an = an
        self.w = float(np.prod(self.spacing) ** (1.0 / 3.0))
        self.hu: np.ndarray | None = np.full(self.shape, HU_AIR, F32) if want_hu else None
        self.label = np.zeros(self.shape, np.uint8)
        self.lung = np.zeros(self.shape, np.uint8)  # 1 right, 2 left
        self.medi = np.zeros(self.shape, bool)
        self.body = np.zeros(self.shape, bool)
        self.above = np.zeros(self.shape, bool)  # above the diaphragm

    def axes_mm(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ks, js, is_ = sl
        pz = self.origin[2] + np.arange(ks.start, ks.stop) * self.spacing[2]
        py = self.origin[1] + np.arange(js.start, js.stop) * self.spacing[1]
        px = self.origin[0] + np.arange(is_.start, is_.stop) * self.spacing[0]
        return px, py, pz

    def body_coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        px, py, pz = self.axes_mm(sl)
        px = (px - self.trans[0]).astype(F32)
        py = (py - self.trans[1]).astype(F32)
        pz = (pz - self.trans[2]).astype(F32)
        r = self.rot.astype(F32)
        out = []
        for m in range(3):  # q = R^T (p - t)
            out.append(r[2, m] * pz[:, None, None] + r[1, m] * py[None, :, None] + r[0, m] * px[None, None, :])
        return out[0], out[1], out[2]

    def to_grid(self, q: np.ndarray) -> np.ndarray:
        """Body-frame points (n, 3) -> grid-frame LPS mm."""
        return np.asarray(q, dtype=float) @ self.rot.T + self.trans

    def box(self, lo: np.ndarray, hi: np.ndarray, pad: float) -> tuple[slice, slice, slice] | None:
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        v = (self.to_grid(corners) - self.origin) / self.spacing
        a = np.floor(v.min(0) - pad / self.spacing).astype(int)
        b = np.ceil(v.max(0) + pad / self.spacing).astype(int) + 1
        nk, nj, ni = self.shape
        a = np.maximum(a, 0)
        b = np.minimum(b, [ni, nj, nk])
        if np.any(b <= a):
            return None
        return slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0])

    def clip_sd(self, kind: str, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        if kind == "above_diaphragm":
            return self.an.dia_sd(x, y, z)
        if kind == "below_diaphragm":
            return -self.an.dia_sd(x, y, z) + F32(2.0)
        if kind == "pleural":
            return self.an.fields(x, y, z)["pleural_sd"]
        raise ValueError(kind)

    def paint(self, job: _Job) -> list[int] | None:
        """Paint one job; returns the voxel box [i0, j0, k0, i1, j1, k1] of the voxels it now owns."""
        p = job.prim
        sl = self.box(p.lo - job.grow, p.hi + job.grow, pad=1.0 * self.w + 0.5)
        if sl is None:
            return None
        x, y, z = self.body_coords(sl)
        sd = p.sd(x, y, z)
        if job.grow:
            sd = sd - F32(job.grow)
        if job.clip:
            sd = np.maximum(sd, self.clip_sd(job.clip, x, y, z))
        inside = sd <= 0
        allowed = None
        if job.allow is not None:
            allowed = np.isin(self.label[sl], job.allow)
            inside &= allowed
        if self.hu is not None and job.hu is not None:
            occ = np.clip(F32(0.5) - sd * F32(1.0 / self.w), 0, 1)
            if allowed is not None:
                occ *= allowed
            h = self.hu[sl]
            if job.mode == "max":
                h += (np.maximum(h, F32(job.hu)) - h) * occ
            else:
                h += (F32(job.hu) - h) * occ
        if not inside.any():
            return None
        if job.label is not None:
            self.label[sl][inside] = job.label
        if job.clear_lung:
            self.lung[sl][inside] = 0
        if job.medi is True:
            self.medi[sl][inside & self.above[sl]] = True
        elif job.medi is False:
            self.medi[sl][inside] = False
        kk = np.flatnonzero(inside.any((1, 2)))
        jj = np.flatnonzero(inside.any((0, 2)))
        ii = np.flatnonzero(inside.any((0, 1)))
        return [int(ii[0] + sl[2].start), int(jj[0] + sl[1].start), int(kk[0] + sl[0].start),
                int(ii[-1] + sl[2].start), int(jj[-1] + sl[1].start), int(kk[-1] + sl[0].start)]

    def paint_capsules(self, tree: "_Tree", hu: float, label: int | None, allow: tuple[int, ...] | None,
                       shrink: np.ndarray | None = None, chunk: int = 3_000_000) -> None:
        """Paint many capsules at once (union with a partial-volume ramp), e.g. thousands of vessel segments."""
        n = len(tree)
        if n == 0:
            return
        ra = tree.ra - (0 if shrink is None else shrink)
        rb = tree.rb - (0 if shrink is None else shrink)
        keep = (ra > 0.05) & (rb > 0.05)
        a, b, ra, rb = tree.a[keep], tree.b[keep], ra[keep], rb[keep]
        ga, gb = self.to_grid(a), self.to_grid(b)
        r = np.maximum(ra, rb)[:, None] + 1.0 * self.w + 0.5
        lo = np.floor((np.minimum(ga, gb) - r - self.origin) / self.spacing).astype(np.int64)
        hi = np.ceil((np.maximum(ga, gb) + r - self.origin) / self.spacing).astype(np.int64) + 1
        nk, nj, ni = self.shape
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, [ni, nj, nk])
        dims = hi - lo
        ok = np.all(dims > 0, axis=1)
        a, b, ra, rb, lo, dims = a[ok], b[ok], ra[ok], rb[ok], lo[ok], dims[ok]
        if len(a) == 0:
            return
        sdmin = np.full(nk * nj * ni, np.inf, F32)
        # group by box size class so boxes of one batch have one shape
        cls = np.stack([np.ceil(np.log2(np.maximum(dims[:, m], 1)) * 2).astype(int) for m in range(3)], 1)
        keys, inv = np.unique(cls, axis=0, return_inverse=True)
        rot_t = self.rot.T
        for g in range(len(keys)):
            members = np.flatnonzero(inv.ravel() == g)
            bd = dims[members].max(0)  # (di, dj, dk) extents
            per = int(bd.prod())
            step = max(1, chunk // per)
            ii = np.arange(bd[0])
            jj = np.arange(bd[1])
            kk = np.arange(bd[2])
            for c0 in range(0, len(members), step):
                mm = members[c0:c0 + step]
                m = len(mm)
                I = lo[mm, 0][:, None, None, None] + ii[None, None, None, :]
                J = lo[mm, 1][:, None, None, None] + jj[None, None, :, None]
                K = lo[mm, 2][:, None, None, None] + kk[None, :, None, None]
                valid = (I < ni) & (J < nj) & (K < nk)
                px = (self.origin[0] + I * self.spacing[0] - self.trans[0]).astype(F32)
                py = (self.origin[1] + J * self.spacing[1] - self.trans[1]).astype(F32)
                pz = (self.origin[2] + K * self.spacing[2] - self.trans[2]).astype(F32)
                q = [F32(rot_t[c, 0]) * px + F32(rot_t[c, 1]) * py + F32(rot_t[c, 2]) * pz for c in range(3)]
                A = a[mm].astype(F32)
                AB = (b[mm] - a[mm]).astype(F32)
                l2 = np.maximum((AB * AB).sum(1), F32(1e-9))
                sh = (m, 1, 1, 1)
                d = [q[c] - A[:, c].reshape(sh) for c in range(3)]
                t = (d[0] * AB[:, 0].reshape(sh) + d[1] * AB[:, 1].reshape(sh) + d[2] * AB[:, 2].reshape(sh))
                t = np.clip(t / l2.reshape(sh), 0, 1)
                e = [d[c] - t * AB[:, c].reshape(sh) for c in range(3)]
                sd = np.sqrt(e[0] ** 2 + e[1] ** 2 + e[2] ** 2) - (ra[mm].astype(F32).reshape(sh) + t * (
                    rb[mm] - ra[mm]).astype(F32).reshape(sh))
                flat = (np.minimum(K, nk - 1) * nj + np.minimum(J, nj - 1)) * ni + np.minimum(I, ni - 1)
                sel = valid & (sd < F32(0.5 * self.w))
                np.minimum.at(sdmin, flat[sel], sd[sel])
        idx = np.flatnonzero(np.isfinite(sdmin))
        sd = sdmin[idx]
        lab = self.label.reshape(-1)
        allowed = np.ones(idx.size, bool) if allow is None else np.isin(lab[idx], allow)
        if self.hu is not None:
            occ = np.clip(F32(0.5) - sd * F32(1.0 / self.w), 0, 1) * allowed
            h = self.hu.reshape(-1)
            h[idx] += (F32(hu) - h[idx]) * occ
        if label is not None:
            inside = (sd <= 0) & allowed
            lab[idx[inside]] = label

    def render_trunk(self, lung_base: float = -850.0, grav: float = 35.0, tex: np.ndarray | None = None,
                     z_apex: float = 90.0, dependent: float = 0.0, slab_vox: int = 2_000_000) -> None:
        """Body, chest wall, cavity, diaphragm, abdomen and lungs (all analytic), slab by slab."""
        nk, nj, ni = self.shape
        step = max(1, slab_vox // (nj * ni))
        an = self.an
        for k0 in range(0, nk, step):
            k1 = min(nk, k0 + step)
            sl = (slice(k0, k1), slice(0, nj), slice(0, ni))
            x, y, z = self.body_coords(sl)
            f = an.fields(x, y, z)
            depth = f["depth"]
            body = depth >= 0
            lung = f["lung_sd"] <= 0
            cav = f["cav_sd"] <= 0
            above = f["dia_sd"] < 0
            lab = np.where(body, np.uint8(L["soft_tissue"]), np.uint8(L["outside"]))
            lab[cav & ~above & body] = L["abdomen"]
            medreg = cav & above & (f["slab_sd"] >= 0) & body & (y < f["yv"] - F32(10 * an.s))  # front of the spine
            lab[medreg] = L["mediastinal_fat"]
            lab[lung] = L["lung"]
            self.label[sl] = lab
            self.medi[sl] = medreg & ~lung
            self.body[sl] = body
            self.above[sl] = above
            self.lung[sl] = np.where(lung, np.where(f["right"], np.uint8(1), np.uint8(2)), np.uint8(0))
            if self.hu is None:
                continue
            w = F32(1.0 / self.w)
            body_occ = np.clip(F32(0.5) + depth * w, 0, 1)
            fat = np.clip(F32(0.5) + (f["tf"] - depth) * w, 0, 1)
            h = F32(HU_MUSCLE) + F32(HU_FAT - HU_MUSCLE) * fat
            cav_occ = np.clip(F32(0.5) - f["cav_sd"] * w, 0, 1)
            below = np.clip(F32(0.5) + f["dia_sd"] * w, 0, 1)
            abd = F32(an.spleen_hu) + F32(an.liver_hu - an.spleen_hu) * np.clip(F32(0.5) - (x - F32(15)) / F32(10), 0, 1)
            inlet = np.clip((z - F32(z_apex)) / F32(20) + F32(0.5), 0, 1)
            chest = F32(HU_MED_FAT) + F32(25 - HU_MED_FAT) * inlet
            cval = chest + (abd - chest) * below
            h += (cval - h) * cav_occ
            _, py, _ = self.axes_mm(sl)
            lval = F32(lung_base) + F32(grav / 100.0) * (py.astype(F32) - F32(self.trans[1]))[None, :, None]
            if tex is not None:
                lval = lval + tex[k0:k1]
            if dependent > 0:  # gravity-dependent subpleural density (posterior), a GGO mimic
                post = np.clip((y - F32(an.yv(0.0) - 40 * an.s)) / F32(60.0), 0, 1)
                lval = lval + F32(dependent) * np.exp(f["cav_sd"] * F32(0.22)) * post * post
            lung_occ = np.clip(F32(0.5) - f["lung_sd"] * w, 0, 1)
            h += (lval - h) * lung_occ
            assert self.hu is not None
            self.hu[sl] = F32(HU_AIR) + (h - F32(HU_AIR)) * body_occ


# --------------------------------------------------------------------------------------------- lung map, trees
@dataclass
class _LungMap:
    """Coarse (2.5 mm) lung masks in the body frame, with the distance to the lung border."""

    origin: np.ndarray
    h: float
    side: np.ndarray  # uint8 [k, j, i]: 1 right, 2 left
    dist: np.ndarray  # float32 mm to the nearest non-lung voxel

    def lookup(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.asarray(p, dtype=float).reshape(-1, 3)
        v = np.rint((p - self.origin) / self.h).astype(np.int64)
        nk, nj, ni = self.side.shape
        ok = (v[:, 0] >= 0) & (v[:, 0] < ni) & (v[:, 1] >= 0) & (v[:, 1] < nj) & (v[:, 2] >= 0) & (v[:, 2] < nk)
        v = np.where(ok[:, None], v, 0)
        d = np.where(ok, self.dist[v[:, 2], v[:, 1], v[:, 0]], 0.0)
        s = np.where(ok, self.side[v[:, 2], v[:, 1], v[:, 0]], 0)
        return d, s

    def points(self, side: int | None = None) -> np.ndarray:
        m = self.side > 0 if side is None else self.side == side
        kk, jj, ii = np.nonzero(m)
        return self.origin + np.stack([ii, jj, kk], 1) * self.h

    def z_extent(self, side: int) -> tuple[float, float]:
        kk = np.flatnonzero((self.side == side).any((1, 2)))
        return (float(self.origin[2] + (kk[0] - 0.5) * self.h), float(self.origin[2] + (kk[-1] + 0.5) * self.h))


def _lung_map(an: _Anatomy, coarse_jobs: list[_Job], h: float = 2.5) -> _LungMap:
    lo = np.array([-an.a_max - 10, an.b_post + an.flat - 2.15 * an.b_max, -275 * an.hs])
    hi = np.array([an.a_max + 10, an.b_post + 5, 130 * an.hs])
    shape = tuple(int(v) for v in np.ceil((hi - lo) / h)[::-1] + 1)
    cv = _Canvas(shape, lo, (h, h, h), np.eye(3), np.zeros(3), an, want_hu=False)
    cv.render_trunk()
    for j in coarse_jobs:
        cv.paint(j)
    dist = ndimage.distance_transform_edt(cv.lung > 0, sampling=h).astype(F32)
    return _LungMap(lo, h, cv.lung.copy(), dist)


def _colonize(roots: list[tuple[np.ndarray, np.ndarray, float, int]], lmap: _LungMap, rng: np.random.Generator,
              n_att: int, att_min_dist: float, r_leaf: float, step: float = 3.0, d_kill: float = 4.5,
              d_infl: float = 40.0, first_len: float = 12.0, max_iter: int = 160) -> _Tree:
    """Space-colonisation tree growth from ``roots`` towards attractors spread through each lung.

    Radii follow a pipe model: r = r_leaf * N^(1/gamma) with N the number of leaves downstream; gamma is
    chosen per root so that the root gets its target radius (the hilar calibre).
    """
    from scipy.spatial import cKDTree

    pos: list[np.ndarray] = []
    parent: list[int] = []
    rid: list[int] = []
    for ri, (p, d, _r, _side) in enumerate(roots):
        nseg = max(1, int(round(first_len / step)))
        for s_ in range(nseg + 1):
            pos.append(np.asarray(p, float) + d * (first_len * s_ / nseg))
            parent.append(-1 if s_ == 0 else len(pos) - 2)
            rid.append(ri)
    P = np.array(pos)
    par = np.array(parent)
    root_of = np.array(rid)
    side_of_root = np.array([r[3] for r in roots])
    # attractors: uniform in each lung, away from the pleura
    att_l, att_s = [], []
    for side in (1, 2):
        pts = lmap.points(side)
        d, _ = lmap.lookup(pts)
        pts = pts[d >= att_min_dist]
        if len(pts) == 0 or not np.any(side_of_root == side):
            continue
        pick = rng.choice(len(pts), size=min(n_att, len(pts)), replace=False)
        att_l.append(pts[pick] + rng.uniform(-lmap.h / 2, lmap.h / 2, (len(pick), 3)))
        att_s.append(np.full(len(pick), side))
    att = np.vstack(att_l)
    att_side = np.concatenate(att_s)
    alive = np.ones(len(att), bool)
    best_d = np.full(len(att), np.inf)
    best_n = np.full(len(att), -1)
    node_side = side_of_root[root_of]
    new = np.arange(len(P))
    last_dir = np.zeros((len(P), 3))
    for _ in range(max_iter):
        for side in (1, 2):
            nn = new[node_side[new] == side]
            am = np.flatnonzero(alive & (att_side == side))
            if nn.size == 0 or am.size == 0:
                continue
            dd, ii = cKDTree(P[nn]).query(att[am], distance_upper_bound=d_infl)
            upd = dd < best_d[am]
            best_d[am[upd]] = dd[upd]
            best_n[am[upd]] = nn[ii[upd]]
        alive &= best_d > d_kill
        act = np.flatnonzero(alive & np.isfinite(best_d))
        if act.size == 0:
            break
        nodes = best_n[act]
        vec = _unit(att[act] - P[nodes])
        acc = np.zeros((len(P), 3))
        np.add.at(acc, nodes, vec)
        grow = np.unique(nodes)
        g = acc[grow]
        gn = np.linalg.norm(g, axis=1)
        g = g + rng.standard_normal(g.shape) * 0.15 * np.maximum(gn, 1e-3)[:, None]
        ndir = _unit(g)
        newp = P[grow] + step * ndir
        dq, sq = lmap.lookup(newp)
        ok = (dq > 0.5) & (sq == node_side[grow])  # stays inside its own lung
        stuck = (last_dir[grow] * ndir).sum(1) > 0.995
        ok &= ~stuck
        bad = grow[~ok]
        if bad.size:  # attractors these nodes cannot reach are dropped
            alive[act[np.isin(nodes, bad)]] = False
        grow, newp, ndir = grow[ok], newp[ok], ndir[ok]
        if grow.size == 0:
            if not alive.any():
                break
            continue
        last_dir[grow] = ndir
        start = len(P)
        P = np.vstack([P, newp])
        par = np.concatenate([par, grow])
        root_of = np.concatenate([root_of, root_of[grow]])
        node_side = np.concatenate([node_side, node_side[grow]])
        last_dir = np.vstack([last_dir, np.zeros((len(grow), 3))])
        new = np.arange(start, len(P))
    # leaves downstream (children are always created after their parents)
    n = len(P)
    cnt = np.zeros(n)
    has_child = np.zeros(n, bool)
    has_child[par[par >= 0]] = True
    cnt[~has_child] = 1.0
    for i in range(n - 1, -1, -1):
        if par[i] >= 0:
            cnt[par[i]] += cnt[i]
    rad = np.zeros(n)
    for ri, (_p, _d, r_target, _s) in enumerate(roots):
        m = root_of == ri
        if not m.any():
            continue
        nroot = max(cnt[m].max(), 2.0)
        gamma = float(np.clip(math.log(nroot) / math.log(max(r_target / r_leaf, 1.01)), 2.0, 3.6))
        rad[m] = r_leaf * cnt[m] ** (1.0 / gamma)
    child = np.flatnonzero(par >= 0)
    a = P[par[child]]
    b = P[child]
    r = rad[child]
    gen = np.zeros(n, int)
    for i in range(n):
        if par[i] >= 0:
            gen[i] = gen[par[i]] + (1 if has_child[par[i]] and cnt[par[i]] > cnt[i] else 0)
    return _Tree(a, b, r.copy(), r.copy(), root_of[child], gen[child])


# --------------------------------------------------------------------------------------------- nodules
@dataclass(eq=False)
class _Nodule:
    id: str
    fate: str
    attenuation: str
    hu: float
    kind: str  # "regular" | "pleural" | "vascular"
    rot: np.ndarray
    q: float  # short / long axial axis
    cr: float  # cranio-caudal semi-axis / mean axial radius
    d: dict[str, float | None]  # mean axial diameter per study (None: absent)
    lobe: tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    side: int = 0
    spicules: list[tuple[np.ndarray, float]] = field(default_factory=list)

    def axes(self, d: float) -> np.ndarray:
        long = 2.0 * d / (1.0 + self.q)
        return np.array([long / 2.0, self.q * long / 2.0, d / 2.0 * self.cr])

    @property
    def eps(self) -> float:
        return 0.0 if self.lobe is None else self.lobe[0]

    def d_max(self) -> float:
        return max(v for v in self.d.values() if v is not None)

    def r_bound(self) -> float:
        return float(self.axes(self.d_max()).max() * (1 + self.eps))

    def prim(self, d: float) -> _Ellipsoid:
        if self.lobe is None:
            return _Ellipsoid(self.center, self.axes(d), self.rot)
        eps, v, f, p, w = self.lobe
        return _Ellipsoid(self.center, self.axes(d), self.rot, eps, v, f, p, w)

    def volume(self, d: float) -> float:
        u = _fibonacci_sphere(4000)
        e = self.prim(d)
        r = e.radius_along(u @ self.rot.T)
        if self.lobe is not None:
            r = r * e.lobulation(u[:, 0].astype(F32), u[:, 1].astype(F32), u[:, 2].astype(F32)).astype(float)
        return float(4.0 * math.pi * np.mean(r ** 3) / 3.0)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = math.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], 1)


def _nodule_specs(rng: np.random.Generator, n: int) -> list[_Nodule]:
    base = ["grew", "stable", "new", "shrank", "resolved"]
    if n >= 5:
        fates = list(rng.permutation(base)) + list(rng.choice(["grew", "stable", "new", "shrank", "stable"], n - 5))
    elif n >= 2:
        fates = ["grew", "stable"] + list(rng.choice(base[2:], n - 2, replace=False))
    else:
        fates = list(rng.choice(base, n))
    fates = [str(f) for f in rng.permutation(fates)]
    kinds = (["pleural", "vascular"] + ["regular"] * (n - 2)) if n >= 3 else ["regular"] * n
    cats = (["large", "small"] + list(rng.choice(["small", "medium", "medium", "large"], n - 2))) if n >= 2 else \
        list(rng.choice(["small", "medium", "large"], n))
    cats = [str(c) for c in rng.permutation(cats)]
    ggo = [k == "regular" and rng.random() < 0.25 for k in kinds]
    if n >= 4 and not any(ggo):
        regs = [i for i, k in enumerate(kinds) if k == "regular"]
        ggo[int(rng.choice(regs))] = True
    out: list[_Nodule] = []
    for i in range(n):
        fate, cat = fates[i], cats[i]
        dref = {"small": rng.uniform(4.0, 6.0), "medium": rng.uniform(6.0, 10.0),
                "large": rng.uniform(10.0, 18.0 if fate == "grew" else 22.0)}[cat]
        if ggo[i]:
            dref = max(dref, rng.uniform(6.5, 11.0))
        if fate == "grew":
            d = {"prior": dref, "current": dref + rng.uniform(2.0, 6.0)}
        elif fate == "shrank":
            d = {"prior": dref + rng.uniform(2.0, 4.0), "current": dref}
        elif fate == "stable":
            dref = max(dref, 4.5)
            d = {"prior": dref, "current": dref + rng.uniform(-0.4, 0.4)}
        elif fate == "new":
            d = {"prior": None, "current": dref}
        else:
            d = {"prior": dref, "current": None}
        psi = rng.uniform(0, 180)
        rot = _rot_xyz(rng.uniform(-8, 8), 0.0, psi)
        lobe = None
        if rng.random() < 0.35:
            lobe = (float(rng.uniform(0.04, 0.10)), _unit(rng.standard_normal((3, 3))),
                    rng.choice([2.0, 3.0, 4.0], 3), rng.uniform(0, 2 * math.pi, 3), _normalise_w(rng.uniform(0.3, 1, 3)))
        att = "ground-glass" if ggo[i] else "solid"
        hu = float(rng.uniform(-550, -350) if ggo[i] else rng.uniform(20, 60))
        nod = _Nodule(id=f"T{i + 1}", fate=fate, attenuation=att, hu=hu, kind=kinds[i], rot=rot,
                      q=float(rng.uniform(0.72, 1.0)), cr=float(rng.uniform(0.85, 1.15)), d=d, lobe=lobe)
        if att == "solid" and dref >= 10 and kinds[i] != "pleural" and rng.random() < 0.5:
            for _ in range(int(rng.integers(5, 10))):
                nod.spicules.append((_unit(rng.standard_normal(3)), float(rng.uniform(3, 9) * (1 + dref / 20))))
        out.append(nod)
    return out


def _normalise_w(w: np.ndarray) -> np.ndarray:
    return w / np.abs(w).sum()


def _place_nodules(an: _Anatomy, lmap: _LungMap, vessels: _Tree, airways: _Tree, nods: list[_Nodule],
                   rng: np.random.Generator) -> tuple[list[_Nodule], _Tree]:
    """Position the nodules (body frame) under the constraints; returns them and the pruned vessel tree."""
    zb: dict[int, tuple[float, float]] = {}
    for side in (1, 2):
        z0, z1 = lmap.z_extent(side)
        zb[side] = (z0 + (z1 - z0) / 3.0, z0 + 2.0 * (z1 - z0) / 3.0)
    pts = {side: lmap.points(side) for side in (1, 2)}
    dpt = {side: lmap.lookup(pts[side])[0] for side in (1, 2)}
    big = vessels.ra >= 1.0
    vbig = vessels.subset(big)
    awy = airways.subset(airways.ra >= 1.0)
    seg_len = np.linalg.norm(vessels.b - vessels.a, axis=1)
    placed: list[_Nodule] = []
    order = sorted(range(len(nods)), key=lambda i: ({"pleural": 0, "vascular": 1}.get(nods[i].kind, 2),
                                                      -nods[i].d_max()))
    for i in order:
        nod = nods[i]
        R = nod.r_bound()
        ok = False
        for attempt in range(900):
            strict = attempt < 700
            side = 1 if rng.random() < 0.55 else 2
            touch: np.ndarray | None = None
            if nod.kind == "pleural":
                cand = np.flatnonzero((dpt[side] >= 1.0) & (dpt[side] <= 5.0))
                if cand.size == 0:
                    continue
                c = pts[side][int(rng.choice(cand))] + rng.uniform(-1.2, 1.2, 3)
                f = an.fields(c[None, 0], c[None, 1], c[None, 2])
                if not (-8 < float(f["cav_sd"][0]) <= 0.5 and float(f["dia_sd"][0]) < -(R + 6)
                        and float(f["cap_sd"][0]) < -(R + 6) and float(f["slab_sd"][0]) < -(R + 10)):
                    continue
                for _ in range(4):
                    g = _grad(lambda p: an.fields(p[:, 0], p[:, 1], p[:, 2])["cav_sd"], c)
                    n_out = _unit(g)
                    c = c - float(an.fields(c[None, 0], c[None, 1], c[None, 2])["cav_sd"][0]) * n_out
                inner = c[None, :] - n_out[None, :] * np.array([1.5, 0.5 * R, R, R + 2])[:, None]
                di_, si_ = lmap.lookup(inner)
                fi = an.fields(inner[:, 0], inner[:, 1], inner[:, 2])
                if not (np.all(si_ == side) and np.all(fi["lung_sd"] < -0.5)):
                    continue
            elif nod.kind == "vascular":
                mid = 0.5 * (vessels.a + vessels.b)
                dmid, smid = lmap.lookup(mid)
                cand = np.flatnonzero(big & (vessels.ra <= 3.5) & (smid == side) & (dmid >= R + 8) & (seg_len > 1.0))
                if cand.size == 0:
                    continue
                j = int(rng.choice(cand))
                touch = vessels.a[j] + rng.uniform(0.2, 0.8) * (vessels.b[j] - vessels.a[j])
                u = _perp(_unit(vessels.b[j] - vessels.a[j])[None, :], rng)[0]
                nod.center = np.zeros(3)
                rdir = float(nod.prim(nod.d_max()).radius_along(-u[None, :])[0])
                c = touch + u * (vessels.ra[j] * 0.65 + rdir)
            else:
                need = R + 3.0
                cand = np.flatnonzero(dpt[side] >= need)
                if cand.size == 0:
                    continue
                c = pts[side][int(rng.choice(cand))] + rng.uniform(-1.2, 1.2, 3)
            dc, sc = lmap.lookup(c[None, :])
            if int(sc[0]) != side:
                continue
            if nod.kind != "pleural" and float(dc[0]) < R + 3.0:
                continue
            if min(abs(c[2] - zb[side][0]), abs(c[2] - zb[side][1])) < 8.0:
                continue
            if any(np.linalg.norm(c - o.center) < R + o.r_bound() + 8.0 for o in placed):
                continue
            if strict:
                dv, rv, cp = vbig.dist(c)
                gap = dv - rv - R
                if touch is not None:
                    gap = gap[np.linalg.norm(cp - touch, axis=1) > R + 6.0]
                if gap.size and gap.min() < 1.5:
                    continue
                da, ra_, _ = awy.dist(c)
                if da.size and (da - ra_ - R).min() < 1.0:
                    continue
                if nod.attenuation == "ground-glass":
                    dv2, rv2, _ = vessels.dist(c)
                    if (dv2 - rv2).min() < 0.45 * nod.axes(nod.d_max()).min():
                        continue
            nod.center = c
            nod.side = side
            ok = True
            break
        if not ok:
            raise RuntimeError(f"could not place nodule {nod.id} ({nod.kind}, {nod.d_max():.1f} mm)")
        placed.append(nod)
    # prune small vessels running into a nodule (they would be engulfed; keeps GGO centres clean)
    keep = np.ones(len(vessels), bool)
    for nod in placed:
        dv, rv, _ = vessels.dist(nod.center)
        keep &= ~((vessels.ra < 1.0) & (dv - rv < nod.r_bound() + 0.5))
    return nods, vessels.subset(keep)


def _place_scars(lmap: _LungMap, nods: list[_Nodule], rng: np.random.Generator) -> list[tuple[_Ellipsoid, float]]:
    """0-2 linear scars (thin plates, -250..-50 HU): elongated non-nodular opacities, hard negatives."""
    out: list[tuple[_Ellipsoid, float]] = []
    pts = lmap.points()
    d, _ = lmap.lookup(pts)
    cand = pts[d >= 14.0]
    for _ in range(int(rng.integers(0, 3))):
        for _try in range(200):
            c = cand[int(rng.integers(len(cand)))]
            if all(np.linalg.norm(c - n.center) > n.r_bound() + 18.0 for n in nods):
                break
        else:
            continue
        rot = _frame_from_axis(rng.standard_normal(3), rng.standard_normal(3))
        axes = np.array([rng.uniform(0.8, 1.4), rng.uniform(10, 20), rng.uniform(5, 11)])
        out.append((_Ellipsoid(c, axes, rot), float(rng.uniform(-250, -50))))
    return out


def _grad(fn: Any, c: np.ndarray, h: float = 0.5) -> np.ndarray:
    e = np.eye(3) * h
    p = np.vstack([c + e, c - e])
    v = np.asarray(fn(p), dtype=float)
    return (v[:3] - v[3:]) / (2 * h)


# --------------------------------------------------------------------------------------------- patient
@dataclass
class _Patient:
    seed: int
    an: _Anatomy
    st: dict[str, Any]
    lmap: _LungMap
    vessels: _Tree
    airways: _Tree
    nodules: list[_Nodule]
    meta: dict[str, Any]
    poses: dict[str, tuple[np.ndarray, np.ndarray]]
    scars: list[tuple[_Ellipsoid, float]] = field(default_factory=list)


_DIGITS = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")


def _words(n: int) -> str:
    return "".join(_DIGITS[int(c)] for c in str(abs(int(n))))


def _uid(seed: int, size: str, *parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["radassist-phantom", str(seed), size, *parts]))


def _build_patient(seed: int, n_nodules: int | None = None) -> _Patient:
    t0 = time.perf_counter()
    an = _build_anatomy(seed)
    st = _build_structures(an, _rng(seed, _STREAM_ANATOMY, 1))
    coarse = [j for j in st["margins"] + st["spine_margin"] if j.coarse]
    lmap = _lung_map(an, coarse)
    roots = st["vessel_roots"]
    art = _colonize(roots[:6], lmap, _rng(seed, _STREAM_TREES, 1), n_att=2200, att_min_dist=3.0, r_leaf=0.42)
    vei = _colonize(roots[6:], lmap, _rng(seed, _STREAM_TREES, 2), n_att=2200, att_min_dist=3.0, r_leaf=0.42)
    vessels = _Tree(np.vstack([art.a, vei.a]), np.vstack([art.b, vei.b]), np.concatenate([art.ra, vei.ra]),
                    np.concatenate([art.rb, vei.rb]), np.concatenate([art.root, vei.root + 6]),
                    np.concatenate([art.gen, vei.gen]))
    airways = _colonize(st["airway_roots"], lmap, _rng(seed, _STREAM_TREES, 3), n_att=260, att_min_dist=9.0,
                        r_leaf=1.0, step=3.5, d_kill=8.0)
    rng = _rng(seed, _STREAM_NODULES)
    n = int(rng.integers(3, 8)) if n_nodules is None else int(n_nodules)
    if n < 0 or n > 12:
        raise ValueError("n_nodules must be between 0 and 12")
    nods = _nodule_specs(rng, n)
    nods, vessels = _place_nodules(an, lmap, vessels, airways, nods, rng)
    scars = _place_scars(lmap, nods, _rng(seed, _STREAM_NODULES, 1))
    # poses: body frame -> each study's patient frame (the anatomy moves, the scanner stays axial)
    pr = _rng(seed, _STREAM_POSE)
    rp = _rot_xyz(pr.uniform(-1, 1), pr.uniform(-1, 1), pr.uniform(-2, 2))
    tp = np.array([pr.uniform(-5, 5), pr.uniform(-8, 8), pr.uniform(-180, 40)])
    sign = 1.0 if pr.random() < 0.5 else -1.0
    rrel = _rot_xyz(pr.uniform(-2.5, 2.5), pr.uniform(-2.5, 2.5), sign * pr.uniform(1.0, 5.0))
    delta = pr.uniform(-10, 10, 3)
    poses = {"prior": (rp, tp), "current": (rrel @ rp, tp + delta)}
    mr = _rng(seed, _STREAM_META)
    prior_date = dt.date(2017, 1, 1) + dt.timedelta(days=int(mr.integers(0, 2200)))
    interval = int(mr.integers(90, 801))
    low_dose = bool(mr.random() < 0.25)
    meta = {
        "patient_id": f"PHANTOM-{seed:04d}", "patient_name": f"Phantom^{_words(seed)}", "sex": an.sex,
        "birth_date": dt.date(prior_date.year - an.age, int(mr.integers(1, 13)), int(mr.integers(1, 29))),
        "dates": {"prior": prior_date, "current": prior_date + dt.timedelta(days=interval)},
        "times": {w: f"{int(mr.integers(7, 19)):02d}{int(mr.integers(0, 60)):02d}{int(mr.integers(0, 60)):02d}"
                  for w in WHICH},
        "interval_days": interval, "low_dose": low_dose,
        "noise": {w: float(mr.uniform(40, 50) if low_dose else mr.uniform(15, 30)) for w in WHICH},
        "lung_base": {w: float(mr.uniform(-875, -835)) for w in WHICH},
        "kernel": {w: str(mr.choice(["B60f", "LUNG", "B45f", "BONEPLUS", "YC"])) for w in WHICH},
        "psf": {w: float(mr.uniform(0.45, 0.75)) for w in WHICH},
        "dependent": {w: float(mr.choice([0.0, mr.uniform(40, 160)])) for w in WHICH},
    }
    log.debug("phantom patient %d built in %.2fs (%d vessel, %d airway segments, %d nodules)", seed,
              time.perf_counter() - t0, len(vessels), len(airways), len(nods))
    return _Patient(seed, an, st, lmap, vessels, airways, nods, meta, poses, scars)


@dataclass
class _Plan:
    which: str
    size: str
    rot: np.ndarray
    trans: np.ndarray
    shape: tuple[int, int, int]
    origin: np.ndarray
    spacing: tuple[float, float, float]
    thickness: float
    noise: float
    psf: float


def _plan_studies(pt: _Patient, size: str) -> dict[str, _Plan]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    an = pt.an
    rng = _rng(pt.seed, _STREAM_GEOM, SIZES.index(size))
    if size == "small":
        n, lo, hi = 256, 1.30, 1.50
        pairs = [(2.5, 2.0), (2.0, 2.5), (2.5, 2.25), (2.25, 2.0)]
    else:
        n, lo, hi = 512, 0.68, 0.78
        pairs = [(1.25, 1.0), (1.0, 1.25)]
    dks = pairs[int(rng.integers(len(pairs)))]
    dip = float(rng.uniform(lo, hi))
    dic = float(rng.uniform(lo, hi))
    if abs(dip - dic) < 0.03:
        dic = dip + 0.04 if dip + 0.04 <= hi else dip - 0.04
    lung_pts = pt.lmap.points()[::3]
    plans: dict[str, _Plan] = {}
    for w, di, dk in (("prior", dip, dks[0]), ("current", dic, dks[1])):
        rot, trans = pt.poses[w]
        need = 2 * (an.a_max + 12 + abs(trans[0]) + 6) / n
        di = float(round(min(max(di, need), hi), 2))
        cx = float(rng.uniform(-4, 4))
        cy = float(trans[1] + (an.b_post + an.flat - an.b_max) + rng.uniform(-6, 10))
        z = (lung_pts @ rot.T + trans)[:, 2]
        z0 = round(float(z.min() - rng.uniform(8, 20)), 2)
        z1 = float(z.max() + rng.uniform(6, 16))
        nk = int(math.ceil((z1 - z0) / dk)) + 1
        origin = np.array([round(cx - (n - 1) / 2 * di, 2), round(cy - (n - 1) / 2 * di, 2), z0])
        thick = 1.25 if (size == "full" and dk == 1.0) else dk
        plans[w] = _Plan(w, size, rot, trans, (nk, n, n), origin, (di, di, dk), thick, pt.meta["noise"][w],
                         pt.meta["psf"][w])
    return plans


def _upsample_linear(g: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable linear interpolation of a coarse grid onto ``shape`` (cell-centred, edges clamped)."""
    out = g
    for ax in (2, 1, 0):
        n_in, n_out = out.shape[ax], shape[ax]
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        wsh = [1, 1, 1]
        wsh[ax] = n_out
        w = (pos - i0).astype(F32).reshape(wsh)
        a = np.take(out, i0, axis=ax)
        a += (np.take(out, i1, axis=ax) - a) * w
        out = a
    return out


def _lung_texture(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  fine_hu: float = 14.0, coarse_hu: float = 10.0) -> np.ndarray:
    """Smooth random lung texture (two correlation lengths, ~5 and ~14 mm), in HU."""
    step = 2.5
    cs = tuple(max(4, int(math.ceil(shape[a] * spacing[2 - a] / step)) + 2) for a in range(3))
    white = rng.standard_normal(cs).astype(F32)
    f1 = ndimage.gaussian_filter(white, 1.0)
    f2 = ndimage.gaussian_filter(white, 2.8)
    g = f1 * F32(fine_hu / max(float(f1.std()), 1e-6)) + f2 * F32(coarse_hu / max(float(f2.std()), 1e-6))
    return _upsample_linear(g, shape)


def _paint_table(cv: _Canvas, an: _Anatomy) -> None:
    nk, nj, ni = cv.shape
    xs = np.linspace(-0.35 * an.a_max, 0.35 * an.a_max, 9)
    zs = np.linspace(-260 * an.hs, 160 * an.hs, 15)
    back = np.array([[x, an.b_post, z] for x in xs for z in zs])
    y_top0 = float(cv.to_grid(back)[:, 1].max()) + 1.0
    x0 = float(cv.trans[0])
    px, py, _ = cv.axes_mm((slice(0, 1), slice(0, nj), slice(0, ni)))
    top = y_top0 - (px - x0) ** 2 / (2 * 1400.0)
    u = py[:, None] - top[None, :]
    dj = cv.spacing[1]

    def band(u0: float, u1: float) -> np.ndarray:
        return np.clip(np.minimum(u - u0, u1 - u) / dj + 0.5, 0, 1)

    inside_x = (np.abs(px - x0) <= 235.0)[None, :]
    occ_shell = (band(0.0, 2.5) + band(22.5, 25.0)) * inside_x
    occ_foam = band(2.5, 22.5) * inside_x
    rows = np.flatnonzero((occ_shell + occ_foam).any(1))
    if rows.size == 0:
        return
    j0, j1 = int(rows[0]), int(rows[-1]) + 1
    tab = (F32(HU_AIR) + (F32(220.0) - F32(HU_AIR)) * occ_shell[j0:j1] + (F32(-900.0) - F32(HU_AIR)) *
           occ_foam[j0:j1]).astype(F32)
    solid = (occ_shell[j0:j1] + occ_foam[j0:j1]) >= 0.5
    body = cv.body[:, j0:j1, :]
    assert cv.hu is not None
    cv.hu[:, j0:j1, :] = np.where(body, cv.hu[:, j0:j1, :], tab[None])
    lab = cv.label[:, j0:j1, :]
    lab[solid[None] & ~body & (lab == L["outside"])] = L["table"]


def _render(pt: _Patient, plan: _Plan) -> tuple[np.ndarray, _Canvas, dict[str, list[int] | None]]:
    an, st = pt.an, pt.st
    t0 = time.perf_counter()
    cv = _Canvas(plan.shape, plan.origin, plan.spacing, plan.rot, plan.trans, an)
    rng = _rng(pt.seed, _STREAM_RENDER, SIZES.index(plan.size), WHICH.index(plan.which))
    tex = _lung_texture(rng, plan.shape, plan.spacing)
    cv.render_trunk(lung_base=pt.meta["lung_base"][plan.which], grav=35.0, tex=tex,
                    z_apex=max(an.caps[0][2], an.caps[1][2]), dependent=pt.meta["dependent"][plan.which])
    del tex
    for job in st["margins"] + st["spine_margin"] + st["medi_struct"] + st["airway_main"]:
        cv.paint(job)
    aw = pt.airways
    cv.paint_capsules(aw, 15.0, L["airway"], (L["lung"], L["mediastinal_fat"], L["airway"]))
    cv.paint_capsules(aw, HU_AIR, None, (L["airway"],), shrink=np.maximum(0.5, 0.18 * aw.ra))
    cv.paint_capsules(pt.vessels, HU_BLOOD, L["pulmonary_vessel"],
                      (L["mediastinal_fat"], L["lung"], L["pulmonary_vessel"], L["airway"]))
    for prim, hu_scar in pt.scars:
        cv.paint(_Job(prim, hu_scar, L["scar"], mode="max", allow=(L["lung"], L["pulmonary_vessel"], L["scar"])))
    boxes: dict[str, list[int] | None] = {}
    allow_nod = (L["mediastinal_fat"], L["lung"], L["pulmonary_vessel"], L["airway"], L["nodule"], L["spicule"])
    for nod in pt.nodules:
        d = nod.d[plan.which]
        if d is None:
            continue
        ggo = nod.attenuation == "ground-glass"
        boxes[nod.id] = cv.paint(_Job(nod.prim(d), nod.hu, L["nodule"], mode="max" if ggo else "alpha",
                                      allow=allow_nod))
        scale = d / nod.d_max()
        for u, length in nod.spicules:
            r0 = float(nod.prim(d).radius_along(u[None, :])[0])
            a = nod.center + u * r0 * 0.85
            b = a + u * length * scale
            cv.paint(_Job(_Capsule(a, b, 0.8, 0.25), 30.0, L["spicule"],
                          allow=(L["lung"], L["pulmonary_vessel"], L["spicule"])))
    for job in st["bones"] + st["abdomen"]:
        cv.paint(job)
    _paint_table(cv, an)
    assert cv.hu is not None
    hu = cv.hu
    di, dj, dk = plan.spacing
    sig = (plan.thickness / 2.355 / dk, plan.psf / dj, plan.psf / di)
    hu = ndimage.gaussian_filter(hu, sig, truncate=3.0)
    noise = rng.standard_normal(hu.shape, dtype=F32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.7, 0.7), truncate=3.0)
    noise *= F32(plan.noise / max(float(noise[:: 7, :: 5, :: 5].std()), 1e-6))
    hu += noise
    del noise
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    cv.hu = None
    log.debug("rendered %s %s %s in %.2fs", plan.which, plan.size, plan.shape, time.perf_counter() - t0)
    return hu, cv, boxes


# --------------------------------------------------------------------------------------------- truth
def _r2(v: Any) -> Any:
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_r2(x) for x in v]
    return round(float(v), 2)


def _mask_vox_box(mask: np.ndarray) -> list[int] | None:
    kk = np.flatnonzero(mask.any((1, 2)))
    if kk.size == 0:
        return None
    jj = np.flatnonzero(mask.any((0, 2)))
    ii = np.flatnonzero(mask.any((0, 1)))
    return [int(ii[0]), int(jj[0]), int(kk[0]), int(ii[-1]), int(jj[-1]), int(kk[-1])]


def _box_mm(plan: _Plan, box: list[int]) -> list[float]:
    o = plan.origin
    sp = np.asarray(plan.spacing)
    lo = o + (np.asarray(box[:3], float) - 0.5) * sp
    hi = o + (np.asarray(box[3:], float) + 0.5) * sp
    return _r2(np.concatenate([lo, hi]))


def _anatomy_truth(cv: _Canvas, plan: _Plan) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    out: dict[str, dict[str, Any]] = {}
    zones: dict[str, list[float]] = {}
    dk = plan.spacing[2]
    zk = plan.origin[2] + np.arange(plan.shape[0]) * dk

    def put(name: str, mask: np.ndarray, **extra: Any) -> None:
        b = _mask_vox_box(mask)
        if b is not None:
            out[name] = {"bbox_mm": _box_mm(plan, b), "bbox_vox": b, **extra}

    put("body", cv.body)
    lungs = cv.lung > 0
    put("lungs", lungs)
    for code, side in ((1, "right"), (2, "left")):
        m = cv.lung == code
        kk = np.flatnonzero(m.any((1, 2)))
        if kk.size == 0:
            continue
        zlo, zhi = float(zk[kk[0]] - dk / 2), float(zk[kk[-1]] + dk / 2)
        b1, b2 = zlo + (zhi - zlo) / 3.0, zlo + 2.0 * (zhi - zlo) / 3.0
        zones[side] = _r2([zlo, b1, b2, zhi])
        put(f"{side} lung", m, zone_bounds_z_mm=_r2([zlo, b1, b2, zhi]))
        for zone, sel in (("upper", zk >= b2), ("middle", (zk >= b1) & (zk < b2)), ("lower", zk < b1)):
            mz = np.zeros_like(m)
            mz[sel] = m[sel]
            put(f"{side} {zone} zone", mz)
    for name, lab in (("trachea", "trachea"), ("right main bronchus", "right_main_bronchus"),
                      ("left main bronchus", "left_main_bronchus"), ("heart", "heart"), ("aorta", "aorta"),
                      ("spine", "spine"), ("ribs", "rib")):
        put(name, cv.label == L[lab])
    kk = np.flatnonzero(lungs.any((1, 2)))
    med = cv.medi & ~lungs & ~np.isin(cv.label, (L["spine"], L["rib"], L["other_bone"], L["cartilage"]))
    if kk.size:
        med[: kk[0]] = False
        med[kk[-1] + 1:] = False
    put("mediastinum", med)
    return out, zones


def _zone_of(z: float, bounds: list[float] | None) -> str | None:
    if not bounds:
        return None
    if z >= bounds[2]:
        return "upper"
    if z >= bounds[1]:
        return "middle"
    return "lower"


def _nodule_study_truth(nod: _Nodule, plan: _Plan, box: list[int] | None, zones: dict[str, list[float]]
                        ) -> dict[str, Any] | None:
    d = nod.d[plan.which]
    if d is None:
        return None
    c = plan.rot @ nod.center + plan.trans
    axes = nod.axes(d)
    m = plan.rot @ nod.rot
    ext = np.sqrt(((m * axes[None, :]) ** 2).sum(1)) * (1 + nod.eps)
    cv_ = (c - plan.origin) / np.asarray(plan.spacing)
    side = "right" if nod.side == 1 else "left"
    return {
        "center_mm": _r2(c), "diameter_mm": round(float(d), 2), "long_axis_mm": round(float(2 * axes[0]), 2),
        "short_axis_mm": round(float(2 * axes[1]), 2), "volume_mm3": round(nod.volume(d), 2),
        "bbox_mm": _r2(np.concatenate([c - ext, c + ext])), "center_vox": _r2(cv_),
        "slice_index": int(round(float(cv_[2]))), "bbox_vox": box, "side": side,
        "zone": _zone_of(float(c[2]), zones.get(side)),
    }


def _transform(pt: _Patient) -> list[list[float]]:
    rp, tp = pt.poses["prior"]
    rc, tc = pt.poses["current"]
    r = rc @ rp.T
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = tc - r @ tp
    return [[round(float(v), 6) for v in row] for row in m]


def _study_uids(pt: _Patient, size: str, which: str) -> dict[str, str]:
    return {"study_uid": _uid(pt.seed, size, which, "study"), "series_uid": _uid(pt.seed, size, which, "series"),
            "frame_of_reference_uid": _uid(pt.seed, size, which, "for")}


def _study_truth(pt: _Patient, plan: _Plan, cv: _Canvas, boxes: dict[str, list[int] | None]
                 ) -> tuple[dict[str, Any], dict[str, dict[str, Any] | None]]:
    anatomy, zones = _anatomy_truth(cv, plan)
    w = plan.which
    st = {
        **_study_uids(pt, plan.size, w),
        "date": pt.meta["dates"][w].isoformat(), "shape": [int(v) for v in plan.shape],
        "spacing": [float(v) for v in plan.spacing], "origin": _r2(plan.origin),
        "direction": np.eye(3).tolist(), "slice_thickness": float(plan.thickness),
        "anatomy": anatomy, "noise_hu": round(plan.noise, 2), "low_dose": pt.meta["low_dose"],
        "instance_order": "head-to-foot" if w == "current" else "foot-to-head",
    }
    nods = {n.id: _nodule_study_truth(n, plan, boxes.get(n.id), zones) for n in pt.nodules}
    return st, nods


def _nodule_entry(nod: _Nodule, per: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    ref = per.get("current") or per.get("prior") or {}
    return {
        "id": nod.id, "fate": nod.fate, "attenuation": nod.attenuation, "hu": round(nod.hu, 2),
        "juxtapleural": nod.kind == "pleural", "juxtavascular": nod.kind == "vascular",
        "side": ref.get("side"), "zone": ref.get("zone"), "lobulated": nod.lobe is not None,
        "spiculated": bool(nod.spicules), "current": per.get("current"), "prior": per.get("prior"),
    }


# --------------------------------------------------------------------------------------------- DICOM
def _ds_str(v: float) -> str:
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def _write_dicom(folder: Path, hu: np.ndarray, plan: _Plan, pt: _Patient) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.dcm"):
        old.unlink()
    w, size, meta = plan.which, plan.size, pt.meta
    nk, nj, ni = hu.shape
    di, dj, dk = plan.spacing
    uids = _study_uids(pt, size, w)
    rng = _rng(pt.seed, _STREAM_META, 10 + WHICH.index(w), SIZES.index(size))
    names = rng.permutation(nk) + int(rng.integers(1, 5000))
    date = meta["dates"][w].strftime("%Y%m%d")
    low = bool(meta["low_dose"])
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = meta["times"][w]
    ds.AccessionNumber = f"PH{pt.seed:05d}{'P' if w == 'prior' else 'C'}{SIZES.index(size)}"
    ds.Modality = "CT"
    ds.Manufacturer = "radassist phantom"
    ds.ManufacturerModelName = "Synthetic Chest CT"
    ds.InstitutionName = "radassist phantom hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = f"{'LD ' if low else ''}Chest {_ds_str(plan.thickness)}mm {meta['kernel'][w]}"
    ds.PatientName = meta["patient_name"]
    ds.PatientID = meta["patient_id"]
    ds.PatientBirthDate = meta["birth_date"].strftime("%Y%m%d")
    ds.PatientSex = meta["sex"]
    age = (meta["dates"][w] - meta["birth_date"]).days // 365
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds_str(plan.thickness)
    ds.KVP = "100" if low else "120"
    ds.SpacingBetweenSlices = _ds_str(dk)
    ds.ReconstructionDiameter = _ds_str(ni * di)
    ds.ConvolutionKernel = meta["kernel"][w]
    ds.PatientPosition = "HFS"
    ds.XRayTubeCurrent = 35 if low else 180
    ds.StudyInstanceUID = uids["study_uid"]
    ds.SeriesInstanceUID = uids["series_uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = 3 if w == "prior" else 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uids["frame_of_reference_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = nj
    ds.Columns = ni
    ds.PixelSpacing = [_ds_str(dj), _ds_str(di)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (hu + 1024.0).astype("<i2")
    for k in range(nk):
        sop = _uid(pt.seed, size, w, "sop", str(k))
        fm.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = (nk - k) if w == "current" else (k + 1)
        z = plan.origin[2] + k * dk
        ds.ImagePositionPatient = [_ds_str(plan.origin[0]), _ds_str(plan.origin[1]), _ds_str(z)]
        ds.SliceLocation = _ds_str(z)
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"IM{int(names[k]):05d}.dcm", enforce_file_format=True)


# --------------------------------------------------------------------------------------------- API
@dataclass
class PhantomStudy:
    """One rendered study with its masks (for tests and evaluation)."""

    which: str
    hu: np.ndarray  # float32 [k, j, i], HU (integers, clipped to [-1024, 3071])
    labels: np.ndarray  # uint8 [k, j, i], codes in LABELS
    lung: np.ndarray  # uint8 [k, j, i]: 0 none, 1 right lung, 2 left lung
    geometry: dict[str, Any]
    truth: dict[str, Any]


def _geometry(plan: _Plan) -> dict[str, Any]:
    return {"origin": [float(v) for v in plan.origin], "spacing": tuple(float(v) for v in plan.spacing),
            "direction": np.eye(3).tolist()}


def _one_study_truth(pt: _Patient, size: str, st: dict[str, Any], nods: dict[str, dict[str, Any] | None],
                     which: str) -> dict[str, Any]:
    entries = []
    for n in pt.nodules:
        s = nods.get(n.id)
        if s is None:
            continue
        e = _nodule_entry(n, {which: s})
        e.pop("current", None)
        e.pop("prior", None)
        entries.append({**e, **s})
    return {"seed": pt.seed, "size": size, "which": which, "patient_id": pt.meta["patient_id"],
            "interval_days": pt.meta["interval_days"], **st, "nodules": entries}


def render_study(seed: int = 0, size: str = "small", which: str = "current",
                 n_nodules: int | None = None) -> PhantomStudy:
    """Render one study of the phantom patient ``seed`` in memory, with its label and lung masks."""
    if which not in WHICH:
        raise ValueError(f"which must be 'prior' or 'current', not {which!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    pt = _build_patient(seed, n_nodules)
    plan = _plan_studies(pt, size)[which]
    hu, cv, boxes = _render(pt, plan)
    st, nods = _study_truth(pt, plan, cv, boxes)
    return PhantomStudy(which, hu, cv.label, cv.lung, _geometry(plan), _one_study_truth(pt, size, st, nods, which))


def make_study_arrays(seed: int = 0, size: str = "small", which: str = "current"
                      ) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """In-memory study: (HU volume float32 [k, j, i], geometry {origin, spacing (di, dj, dk), direction}, truth).

    The truth is that study's entry of ``truth.json`` (uids, shape, spacing, origin, anatomy boxes, noise)
    plus ``nodules``: the nodules present in it, each with its fields in this study's frame.
    """
    s = render_study(seed, size, which)
    return s.hu, s.geometry, s.truth


def write_patient(outdir: str | Path, seed: int = 0, size: str = "small", n_nodules: int | None = None
                  ) -> dict[str, Any]:
    """Write ``outdir/prior/*.dcm``, ``outdir/current/*.dcm`` and ``outdir/truth.json``; return the truth."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    t0 = time.perf_counter()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    pt = _build_patient(seed, n_nodules)
    plans = _plan_studies(pt, size)
    studies: dict[str, Any] = {}
    per_nod: dict[str, dict[str, dict[str, Any] | None]] = {n.id: {} for n in pt.nodules}
    for w in WHICH:
        hu, cv, boxes = _render(pt, plans[w])
        st, nods = _study_truth(pt, plans[w], cv, boxes)
        studies[w] = st
        for nid, v in nods.items():
            per_nod[nid][w] = v
        del cv
        _write_dicom(out / w, hu, plans[w], pt)
        del hu
    truth = {
        "seed": int(seed), "size": size, "patient_id": pt.meta["patient_id"],
        "interval_days": pt.meta["interval_days"], "studies": studies,
        "nodules": [_nodule_entry(n, per_nod[n.id]) for n in pt.nodules],
        "transform": {"prior_to_current": _transform(pt)},
        "mimics": [{"kind": "scar", **{w: {"center_mm": _r2(plans[w].rot @ prim.c + plans[w].trans)} for w in WHICH}}
                   for prim, _hu in pt.scars],
        "notes": ["coordinates are LPS mm in each study's own patient frame",
                  "diameter_mm is the Lung-RADS mean of the analytic long and short axial axes",
                  "juxtapleural nodules are centred on the costal pleura (half of the shape lies in the chest wall)"],
    }
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    log.info("phantom patient seed %d (%s) written to %s in %.1fs", seed, size, out, time.perf_counter() - t0)
    return truth
