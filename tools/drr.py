"""Digitally reconstructed chest radiographs (DRRs) projected from the CT phantoms, with exact truth.

A PA chest film is simulated from a phantom CT study (:mod:`tools.phantom`) by a parallel-beam
projection along y (anterior-posterior):

1. *Attenuation*: the linear attenuation ``mu = MU_WATER * (1 + HU / 1000)`` (clipped >= 0; the CT
   table is removed, a chest film is taken standing) summed along y times the voxel length gives the
   line integral ``P`` at each (x, z); ``exp(-P)`` is the transmitted fraction.
2. *Film*: ``P`` is resampled from the CT grid (columns x, rows z, head up, the patient's right on
   the image left: standard PA display) to square pixels of 0.35-0.45 mm; quantum noise is added to
   the transmitted photons (``N0`` photons per pixel, Poisson approximated by a Gaussian), then the
   detector blur; the stored value is film-like: ``4095 * (1 - exp(-gamma * P))`` (higher
   attenuation brighter, the log-like characteristic curve of a film/CR read-out).
3. *DICOM*: one DX image per study (Digital X-Ray, For Presentation), ``PixelSpacing`` and
   ``ImagerPixelSpacing`` set (no magnification: parallel beam), ``ImageOrientationPatient``
   ``[1,0,0, 0,0,-1]`` and ``ImagePositionPatient`` so that pixel (col, row) maps to the CT's
   patient frame (x = patient's left, z head-ward); ``PatientOrientation`` ``L\\F``. The
   pixel-only variant writes ``PixelSpacing 0\\0`` and no ``ImagerPixelSpacing``.

Truth (:func:`write_drr_patient` writes ``truth.json``), in each film's own pixels ``[x, y]`` =
(column, row) and boxes ``[x0, y0, x1, y1]`` (inclusive pixel indices):

- *lung fields*: the radiologist's (unobscured) lung field: pixels whose ray crosses more than
  ``FIELD_LUNG_MM`` of that lung and less than ``OBSCURE_MM`` of the dense structures that hide it
  on a film (heart, mediastinum, great vessels, spine, liver/spleen/abdomen). The retrocardiac lung
  and the posterior costophrenic recesses behind the liver are therefore *not* lung field, as in the
  JSRT/Montgomery conventions; zones are craniocaudal thirds of each field (rows);
- *heart*: the cardiac silhouette: the heart and the pericardial fat around it (mediastinal fat
  within ``PERICARDIUM_MM`` of the heart), projected, outside the lung fields (its border is the
  fields' medial border, as a reader sees it); *mediastinum*: the projected mediastinal
  structures (>= ``OBSCURE_MM`` thick) between the apices and the diaphragm; *trachea*;
- *cardiothoracic ratio*: the heart silhouette's width (its box) over the maximal inner thoracic
  width (the largest distance, on one row, between the lateral borders of the two lung fields);
- *costophrenic angles*: the infero-lateral corner of each field (maximal ``row -/+ column``);
- *nodules*: projected centre, diameter (px and mm), side, zone (of the 2-D field), fate, whether
  the centre lies in the lung field (visible), its projected contrast ``delta P`` and its
  *conspicuity*: the d' of a matched-filter model observer told where the nodule is and what it looks
  like on this film, against the film's own texture around it (:func:`_conspicuity`). Ground-glass
  nodules and nodules on busy texture (ribs, hila, the chest wall) score low: they do not stand out of
  the lung's texture on a film even when one knows where to look.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from tools.radiograph import _bbox

log = logging.getLogger(__name__)

MU_WATER = 0.0195  # 1/mm, effective energy of a ~120 kVp chest film
FIELD_LUNG_MM = 3.0  # a ray must cross this much lung to be in the lung field
OBSCURE_MM = 12.0  # ... and less than this of heart / mediastinum / spine / abdomen
PERICARDIUM_MM = 6.0  # mediastinal fat within this distance of the heart belongs to its silhouette
MAX_STORED = 4095
CONSPICUITY_MM = 40.0  # the model observer's background: the lung field within this distance of the nodule
WHICH: tuple[str, ...] = ("prior", "current")
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

_OBSCURING = ("heart", "mediastinal_fat", "aorta", "great_vessel", "trachea", "right_main_bronchus",
              "left_main_bronchus", "esophagus", "spine", "abdomen", "gas")
_MEDIASTINUM = ("heart", "mediastinal_fat", "aorta", "great_vessel", "trachea", "right_main_bronchus",
                "left_main_bronchus", "esophagus")


@dataclass
class Drr:
    """One projected film with its truth (pixels ``[row, col]``, stored values 0..4095, brighter = denser)."""

    which: str
    image: np.ndarray  # float32 [row, col], MONOCHROME2 stored values
    spacing_mm: float  # square pixels
    x0_mm: float  # patient x of column 0 (LPS, the CT study's frame)
    z0_mm: float  # patient z of row 0 (the top row, head-ward)
    y_mm: float  # the detector plane's y (behind the patient)
    fields: np.ndarray  # uint8 [row, col]: 0, 1 right lung field, 2 left lung field
    heart: np.ndarray  # bool [row, col]: the cardiac silhouette
    truth: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def zone_boxes(field_mask: np.ndarray) -> dict[str, list[int]]:
    """Boxes of the craniocaudal thirds (rows) of one lung field: {"upper": [x0, y0, x1, y1], ...}."""
    b = _bbox(field_mask)
    out: dict[str, list[int]] = {}
    if b is None:
        return out
    r0, r1 = b[1], b[3]
    h = (r1 - r0 + 1) / 3.0
    cuts = [r0, int(round(r0 + h)), int(round(r0 + 2 * h)), r1 + 1]
    for n, zone in enumerate(("upper", "middle", "lower")):
        sub = np.zeros_like(field_mask)
        sub[cuts[n]:cuts[n + 1]] = field_mask[cuts[n]:cuts[n + 1]]
        zb = _bbox(sub)
        if zb is not None:
            out[zone] = zb
    return out


def zone_of_row(row: float, field_box: list[int] | None) -> str | None:
    if field_box is None:
        return None
    r0, r1 = field_box[1], field_box[3]
    h = (r1 - r0 + 1) / 3.0
    if row < r0 + h:
        return "upper"
    if row < r0 + 2 * h:
        return "middle"
    return "lower"


def thoracic_width(fields: np.ndarray) -> tuple[int, int, int] | None:
    """(row, right-lateral col, left-lateral col) of the widest inner thorax: the largest distance on
    one row between the lateral border of the right field (image left) and that of the left field."""
    r_any = (fields == 1).any(axis=1)
    l_any = (fields == 2).any(axis=1)
    rows = np.flatnonzero(r_any & l_any)
    if rows.size == 0:
        return None
    ncol = fields.shape[1]
    cols = np.arange(ncol)
    best: tuple[int, int, int] | None = None
    for r in rows:
        rc = cols[fields[r] == 1]
        lc = cols[fields[r] == 2]
        w = int(lc.max() - rc.min())
        if best is None or w > best[2] - best[1]:
            best = (int(r), int(rc.min()), int(lc.max()))
    return best


def costophrenic_point(field_mask: np.ndarray, side: str) -> list[int] | None:
    """The infero-lateral corner of a lung field, [col, row]: maximal row - col (right field, image
    left) or row + col (left field)."""
    rr, cc = np.nonzero(field_mask)
    if rr.size == 0:
        return None
    score = rr - cc if side == "right" else rr + cc
    i = int(np.argmax(score))
    return [int(cc[i]), int(rr[i])]


# ----------------------------------------------------------------------------------------------
# projection


def _edt_near(mask: np.ndarray, spacing_kji: tuple[float, float, float], radius: float) -> np.ndarray:
    """Voxels within ``radius`` mm of ``mask`` (computed on the mask's padded box only)."""
    out = np.zeros(mask.shape, dtype=bool)
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return out
    pad = [int(np.ceil(radius / s)) + 1 for s in spacing_kji]
    sl = tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + p + 1))
               for i, p, n in zip(idx, pad, mask.shape))
    d = ndimage.distance_transform_edt(~mask[sl], sampling=spacing_kji)
    out[sl] = d <= radius
    return out


def _resample(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, order: int = 1) -> np.ndarray:
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(img, [rr, cc], order=order, mode="nearest").astype(np.float32)


def project_study(seed: int, which: str, spacing_mm: float | None = None, size: str = "small",
                  n_nodules: int | None = None) -> Drr:
    """Render the phantom study ``(seed, which)`` and project it to a PA film with its truth."""
    from tools.phantom import LABELS, render_study

    t0 = time.perf_counter()
    ps = render_study(seed, size, which, n_nodules=n_nodules)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0xD88, WHICH.index(which)]))
    hu = ps.hu
    lab = ps.labels
    di, dj, dk = (float(v) for v in ps.geometry["spacing"])
    ox, oy, oz = (float(v) for v in ps.geometry["origin"])
    nk, nj, ni = hu.shape
    mu = np.clip(hu, -1000.0, None)
    mu[lab == LABELS["table"]] = -1000.0
    mu += 1000.0
    mu *= MU_WATER / 1000.0 * dj
    P = mu.sum(axis=1, dtype=np.float64).astype(np.float32)  # [k, i]
    del mu
    lung_r = (ps.lung == 1).sum(axis=1).astype(np.float32) * dj
    lung_l = (ps.lung == 2).sum(axis=1).astype(np.float32) * dj
    obsc = np.isin(lab, [LABELS[n] for n in _OBSCURING]).sum(axis=1).astype(np.float32) * dj
    medi = np.isin(lab, [LABELS[n] for n in _MEDIASTINUM]).sum(axis=1).astype(np.float32) * dj
    trach = (lab == LABELS["trachea"]).sum(axis=1).astype(np.float32) * dj
    heart3 = lab == LABELS["heart"]
    near = _edt_near(heart3, (dk, dj, di), PERICARDIUM_MM)
    sil3 = heart3 | (near & (lab == LABELS["mediastinal_fat"]))
    sil = sil3.sum(axis=1).astype(np.float32) * dj
    del near, sil3, heart3

    # film grid: square pixels, head up (row 0 = highest z), patient's right on the image left
    s = float(spacing_mm if spacing_mm is not None else round(float(rng.uniform(0.35, 0.45)), 3))
    x_lo, x_hi = ox, ox + (ni - 1) * di
    z_lo, z_hi = oz, oz + (nk - 1) * dk
    ncol = int(np.floor((x_hi - x_lo) / s)) + 1
    nrow = int(np.floor((z_hi - z_lo) / s)) + 1
    xs = x_lo + np.arange(ncol) * s
    zs = z_hi - np.arange(nrow) * s
    ci = (xs - ox) / di
    rk = (zs - oz) / dk

    def rs(a: np.ndarray) -> np.ndarray:
        return _resample(a, rk, ci)

    Pf = rs(P)
    # quantum noise on the transmitted photons, then the detector blur
    n0 = float(rng.uniform(3e4, 8e4))
    trans = np.exp(-Pf.astype(np.float64)) * n0
    trans += rng.standard_normal(trans.shape) * np.sqrt(np.maximum(trans, 1.0))
    Pn = -np.log(np.maximum(trans, 0.5) / n0)
    blur = float(rng.uniform(0.6, 1.0))
    Pn = ndimage.gaussian_filter(Pn, blur)
    gamma = float(rng.uniform(0.3, 0.45))
    img = (MAX_STORED * (1.0 - np.exp(-gamma * Pn))).astype(np.float32)
    np.clip(np.rint(img), 0, MAX_STORED, out=img)
    gain = MAX_STORED * gamma * np.exp(-gamma * Pn)  # d(stored value) / dP: the film's local contrast gain

    lr, ll, ob = rs(lung_r), rs(lung_l), rs(obsc)
    fields = np.zeros((nrow, ncol), dtype=np.uint8)
    for code, lt in ((1, lr), (2, ll)):
        m = (lt > FIELD_LUNG_MM) & (ob < OBSCURE_MM) & (lt >= (ll if code == 1 else lr))
        m = ndimage.binary_fill_holes(_largest(ndimage.binary_opening(m, iterations=1)))
        fields[m & (fields == 0)] = code
    # the silhouette ends where the lung field begins: a pixel is not both (on a film the heart's border
    # is the field's medial border; the field admits up to OBSCURE_MM of heart on the ray)
    heart = _largest((rs(sil) > 2.0) & (fields == 0))
    lung_rows = np.flatnonzero((lr + ll > FIELD_LUNG_MM).any(axis=1))
    medi2 = rs(medi) >= OBSCURE_MM
    if lung_rows.size:
        medi2[: lung_rows[0]] = False
        medi2[lung_rows[-1] + 1:] = False
    medi2 = _largest(medi2)
    trachea = _largest(rs(trach) > 2.0)

    proj = _projected_nodules(ps, LABELS["nodule"], di, dk)
    signals = _nodule_signals(ps, LABELS["nodule"], dj, rs, blur, gain)
    truth = _film_truth(ps.truth, fields, heart, medi2, trachea, s, float(x_lo), float(z_hi), proj,
                        _conspicuity(img, fields, signals, s))
    truth["photons_per_pixel"] = round(n0, 1)
    truth["gamma"] = round(gamma, 4)
    log.debug("DRR seed %d %s: %dx%d px at %.3f mm in %.1fs", seed, which, nrow, ncol, s, time.perf_counter() - t0)
    return Drr(which, img, s, float(x_lo), float(z_hi), float(oy + nj * dj), fields, heart, truth,
               meta={"ct_truth": ps.truth})


def _projected_nodules(ps: Any, code: int, di: float, dk: float) -> dict[str, dict[str, float]]:
    """Each nodule's silhouette on the film (its voxels projected along y): long and short axes (mm,
    from the second moments of the silhouette) and their mean: what a film can measure."""
    out: dict[str, dict[str, float]] = {}
    for n in ps.truth.get("nodules", []):
        b = n.get("bbox_vox")
        if not b:
            continue
        i0, j0, k0, i1, j1, k1 = (int(v) for v in b)
        sub = ps.labels[max(0, k0 - 1):k1 + 2, max(0, j0 - 1):j1 + 2, max(0, i0 - 1):i1 + 2] == code
        sil = sub.any(axis=1)
        if not sil.any():
            continue
        kk, ii = np.nonzero(sil)
        pts = np.stack([ii * di, kk * dk], axis=1)
        cov = np.cov(pts.T) + np.diag([di * di, dk * dk]) / 12.0 if len(pts) > 2 else np.diag([di * di, dk * dk])
        ev = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 1e-6, None)) * 4.0  # ellipse: axis = 4 sqrt(lambda)
        out[n["id"]] = {"long": float(ev[1]), "short": float(ev[0]), "mean": float(ev.mean()),
                        "area_mm2": float(sil.sum() * di * dk)}
    return out


def _nodule_signals(ps: Any, code: int, dj: float, rs: Any, blur: float, gain: np.ndarray
                    ) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """Each nodule's own image on the film: its excess line integral over the lung it displaces
    (``MU_WATER * (HU + 850) / 1000`` per mm of nodule along the ray), resampled to the film, blurred as
    the film was and scaled by the film's local contrast gain. Returns ``id -> (patch, (row0, col0))``,
    the patch cropped to where the signal is non-zero."""
    out: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
    nk, _, ni = ps.labels.shape
    for n in ps.truth.get("nodules", []):
        b = n.get("bbox_vox")
        if not b:
            continue
        i0, j0, k0, i1, j1, k1 = (int(v) for v in b)
        ks, js, is_ = slice(max(0, k0 - 1), k1 + 2), slice(max(0, j0 - 1), j1 + 2), slice(max(0, i0 - 1), i1 + 2)
        sub = ps.labels[ks, js, is_] == code
        if not sub.any():
            continue
        dp = np.zeros((nk, ni), dtype=np.float32)
        exc = np.where(sub, np.clip(ps.hu[ks, js, is_] + 850.0, 0.0, None), 0.0)
        dp[ks, is_] = exc.sum(axis=1) * (MU_WATER / 1000.0 * dj)
        sig = ndimage.gaussian_filter(rs(dp), blur) * gain
        rows, cols = np.nonzero(sig > 1e-3 * float(sig.max()))
        if rows.size == 0:
            continue
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        out[n["id"]] = (sig[r0:r1, c0:c1].astype(np.float64), (r0, c0))
    return out


def _conspicuity(img: np.ndarray, fields: np.ndarray, signals: dict[str, tuple[np.ndarray, tuple[int, int]]],
                 s: float) -> dict[str, float]:
    """Each nodule's detectability on its film by a matched-filter model observer (the signal known exactly:
    its position and its own projected image) that ignores a locally planar background: the template is
    the nodule's signal minus its least-squares plane over a disk of twice the signal's radius, correlated
    with the film around the nodule; d' = (template . signal) / SD of that response over the lung field
    within ``CONSPICUITY_MM`` of the nodule (other nodules' surroundings left out). The background is the
    film itself: ribs, vessels, their crossings and quantum noise, as a reader sees them."""
    from scipy.signal import fftconvolve

    out: dict[str, float] = {}
    h, w = img.shape
    lung = fields > 0
    cent: dict[str, tuple[float, float, float]] = {}
    for k, (sig, (r0, c0)) in signals.items():
        tot = float(sig.sum())
        if tot <= 0:
            continue
        yy, xx = np.mgrid[0:sig.shape[0], 0:sig.shape[1]]
        cy, cx = float((sig * yy).sum() / tot), float((sig * xx).sum() / tot)
        rad = max(2.0, float(np.sqrt((sig > 0.5 * float(sig.max())).sum() / np.pi)) * 1.3)
        cent[k] = (r0 + cy, c0 + cx, rad)
    reach = int(round(CONSPICUITY_MM / s))
    for nid, (sig, (r0, c0)) in signals.items():
        if nid not in cent:
            continue
        cr, cc, rad = cent[nid]
        n = int(np.ceil(2.0 * rad)) + 1
        yy, xx = np.mgrid[-n:n + 1, -n:n + 1].astype(np.float64)
        win = yy * yy + xx * xx <= (2.0 * rad) ** 2
        full = np.zeros(yy.shape)
        ir, ic = int(round(cr)), int(round(cc))
        ra, cb = r0 - ir + n, c0 - ic + n  # the patch's corner in the template's frame
        a0, b0 = max(0, -ra), max(0, -cb)
        a1, b1 = min(sig.shape[0], full.shape[0] - ra), min(sig.shape[1], full.shape[1] - cb)
        if a1 > a0 and b1 > b0:
            full[ra + a0:ra + a1, cb + b0:cb + b1] = sig[a0:a1, b0:b1]
        x = np.stack([np.ones(int(win.sum())), yy[win], xx[win]], axis=1)
        coef, *_ = np.linalg.lstsq(x, full[win], rcond=None)
        tpl = np.where(win, full - (coef[0] + coef[1] * yy + coef[2] * xx), 0.0)
        energy = float((tpl * full).sum())
        a0, a1 = max(0, ir - reach - n), min(h, ir + reach + n + 1)
        b0, b1 = max(0, ic - reach - n), min(w, ic + reach + n + 1)
        roi = img[a0:a1, b0:b1].astype(np.float64)
        if roi.shape[0] <= 2 * n + 1 or roi.shape[1] <= 2 * n + 1:
            continue
        resp = fftconvolve(roi, tpl[::-1, ::-1], mode="same")
        gy, gx = np.mgrid[a0:a1, b0:b1]
        keep = lung[a0:a1, b0:b1] & ((gy - cr) ** 2 + (gx - cc) ** 2 <= reach * reach)
        for r2, c2, rad2 in cent.values():
            keep &= (gy - r2) ** 2 + (gx - c2) ** 2 > (rad2 + 2.0 * rad) ** 2
        keep[:n] = keep[keep.shape[0] - n:] = False
        keep[:, :n] = keep[:, keep.shape[1] - n:] = False
        if int(keep.sum()) < 50:
            continue
        rv = resp[keep]
        sd = 1.4826 * float(np.median(np.abs(rv - np.median(rv))))  # robust: rib and field edges are outliers
        if sd > 0:
            out[nid] = energy / sd
    return out


def _film_truth(ct: dict[str, Any], fields: np.ndarray, heart: np.ndarray, medi: np.ndarray, trachea: np.ndarray,
                s: float, x0: float, z0: float, proj: dict[str, dict[str, float]] | None = None,
                conspicuity: dict[str, float] | None = None) -> dict[str, Any]:
    anatomy: dict[str, Any] = {}
    field_boxes: dict[str, list[int] | None] = {}
    for code, side in ((1, "right"), (2, "left")):
        m = fields == code
        b = _bbox(m)
        field_boxes[side] = b
        if b is None:
            continue
        anatomy[f"{side} lung"] = {"bbox_px": b, "area_px": int(m.sum())}
        for zone, zb in zone_boxes(m).items():
            anatomy[f"{side} {zone} zone"] = {"bbox_px": zb}
    both = _bbox(fields > 0)
    if both is not None:
        anatomy["lungs"] = {"bbox_px": both}
    for name, m in (("heart", heart), ("mediastinum", medi), ("trachea", trachea)):
        b = _bbox(m)
        if b is not None:
            anatomy[name] = {"bbox_px": b}
    tw = thoracic_width(fields)
    hb = anatomy.get("heart", {}).get("bbox_px")
    ctr: dict[str, Any] | None = None
    if tw is not None and hb is not None:
        hw = hb[2] - hb[0] + 1
        tww = tw[2] - tw[1] + 1
        ctr = {"ctr": round(hw / tww, 4), "heart_width_px": hw, "thorax_width_px": tww,
               "heart_width_mm": round(hw * s, 2), "thorax_width_mm": round(tww * s, 2),
               "thorax_row": tw[0], "thorax_cols": [tw[1], tw[2]]}
    cp = {side: costophrenic_point(fields == code, side) for code, side in ((1, "right"), (2, "left"))}
    nods = []
    for n in ct.get("nodules", []):
        c = n["center_mm"]
        col = (c[0] - x0) / s
        row = (z0 - c[2]) / s
        ri, ci = int(round(row)), int(round(col))
        inside = 0 <= ri < fields.shape[0] and 0 <= ci < fields.shape[1]
        fcode = int(fields[ri, ci]) if inside else 0
        side = n.get("side")
        lung_hu = -850.0
        contrast = MU_WATER * (float(n["hu"]) - lung_hu) / 1000.0 * float(n["diameter_mm"])
        nods.append({
            "id": n["id"], "fate": n["fate"], "attenuation": n["attenuation"], "side": side,
            "zone": zone_of_row(row, field_boxes.get(side or "")), "center_px": [round(col, 2), round(row, 2)],
            "diameter_mm": n["diameter_mm"], "diameter_px": round(float(n["diameter_mm"]) / s, 2),
            "long_axis_mm": n["long_axis_mm"], "short_axis_mm": n["short_axis_mm"],
            "in_field": fcode > 0, "juxtapleural": n["juxtapleural"], "contrast": round(contrast, 4),
            "projected_diameter_mm": round((proj or {}).get(n["id"], {}).get("mean", float(n["diameter_mm"])), 2),
            "conspicuity": round(float((conspicuity or {})[n["id"]]), 2) if n["id"] in (conspicuity or {}) else None,
            "ct_center_mm": c,
        })
    return {"pixel_spacing_mm": s, "shape": list(fields.shape), "x0_mm": round(x0, 3), "z0_mm": round(z0, 3),
            "anatomy": anatomy, "cardiothoracic": ctr, "costophrenic_angles": cp, "nodules": nods}


# ----------------------------------------------------------------------------------------------
# DICOM


def _ds_str(v: float) -> str:
    s = f"{v:.5f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def _uid(seed: int, *parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["radassist-drr", str(seed), *parts]))


def write_dx(path: Path, drr: Drr, seed: int, patient: dict[str, Any], date: dt.date, pixel_spacing: bool = True,
             monochrome1: bool = False) -> dict[str, str]:
    """Write one DX DICOM file for ``drr``; returns its uids."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    w = drr.which
    uids = {"study_uid": _uid(seed, w, "study", str(pixel_spacing)), "series_uid": _uid(seed, w, "series",
                                                                                        str(pixel_spacing)),
            "sop_uid": _uid(seed, w, "sop", str(pixel_spacing))}
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = DX_SOP_CLASS
    fm.MediaStorageSOPInstanceUID = uids["sop_uid"]
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = uids["sop_uid"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500" if w == "prior" else "111500"
    ds.AccessionNumber = f"DRR{seed:05d}{'P' if w == 'prior' else 'C'}"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "radassist phantom"
    ds.ManufacturerModelName = "Synthetic DRR (parallel-beam PA)"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "Chest PA (DRR)"
    ds.PatientName = patient["patient_name"]
    ds.PatientID = patient["patient_id"]
    ds.PatientSex = patient.get("sex", "")
    ds.PatientBirthDate = ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.StudyInstanceUID = uids["study_uid"]
    ds.SeriesInstanceUID = uids["series_uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = [_ds_str(drr.x0_mm), _ds_str(drr.y_mm), _ds_str(drr.z0_mm)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = int(drr.image.shape[0]), int(drr.image.shape[1])
    if pixel_spacing:
        ds.PixelSpacing = [_ds_str(drr.spacing_mm)] * 2
        ds.ImagerPixelSpacing = [_ds_str(drr.spacing_mm)] * 2
    else:
        ds.PixelSpacing = ["0", "0"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    stored = drr.image.astype(np.uint16)
    if monochrome1:
        stored = (MAX_STORED - stored).astype(np.uint16)
        ds.WindowCenter, ds.WindowWidth = str(MAX_STORED - 2300), "3000"
    else:
        ds.WindowCenter, ds.WindowWidth = "2300", "3000"
    ds.PixelData = stored.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uids


def make_drr_pair(seed: int, size: str = "small") -> dict[str, Drr]:
    """The prior and current films of phantom patient ``seed`` (in memory)."""
    return {w: project_study(seed, w, size=size) for w in WHICH}


def write_drr_patient(outdir: str | Path, seed: int = 0, pixel_spacing: bool = True,
                      drrs: dict[str, Drr] | None = None) -> dict[str, Any]:
    """Write ``outdir/prior/*.dcm`` and ``outdir/current/*.dcm`` (one DX film each, projected from the CT
    phantom pair of ``seed``) and ``outdir/truth.json``; return the truth.

    ``pixel_spacing=False`` writes ``PixelSpacing 0\\0`` (and no ``ImagerPixelSpacing``): the films are then
    measured in pixels. ``drrs`` reuses films already projected by :func:`make_drr_pair`."""
    from tools.phantom import _build_patient

    t0 = time.perf_counter()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    drrs = drrs or make_drr_pair(seed)
    pt = _build_patient(seed)
    meta = pt.meta
    patient = {"patient_id": meta["patient_id"], "patient_name": meta["patient_name"], "sex": meta["sex"]}
    studies: dict[str, Any] = {}
    mono1 = bool(seed % 3 == 2)  # every third patient's prior is stored MONOCHROME1 (inverted)
    for w in WHICH:
        d = drrs[w]
        folder = out / w
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.dcm"):
            old.unlink()
        m1 = mono1 and w == "prior"
        uids = write_dx(folder / "DX000001.dcm", d, seed, patient, meta["dates"][w], pixel_spacing, m1)
        studies[w] = {**uids, "date": meta["dates"][w].isoformat(), "photometric": "MONOCHROME1" if m1 else
                      "MONOCHROME2", "pixel_spacing_written": pixel_spacing, **d.truth}
    nodules = []
    ids = sorted({n["id"] for w in WHICH for n in studies[w]["nodules"]})
    for nid in ids:
        per = {w: next((n for n in studies[w]["nodules"] if n["id"] == nid), None) for w in WHICH}
        ref = per["current"] or per["prior"] or {}
        nodules.append({"id": nid, "fate": ref.get("fate"), "attenuation": ref.get("attenuation"),
                        "side": ref.get("side"), "prior": per["prior"], "current": per["current"]})
    truth = {"seed": int(seed), "kind": "drr", "patient_id": meta["patient_id"],
             "interval_days": meta["interval_days"], "studies": studies, "nodules": nodules,
             "notes": ["pixel coordinates [x, y] = (column, row) of each film; boxes [x0, y0, x1, y1] inclusive",
                       "lung fields: unobscured lung (ray crosses > 3 mm of lung and < 12 mm of heart, "
                       "mediastinum, spine or abdomen)",
                       "cardiothoracic ratio: heart silhouette (heart + pericardial fat, outside the lung "
                       "fields) width over the widest "
                       "distance between the lateral borders of the lung fields on one row"]}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    log.info("DRR patient seed %d written to %s in %.1fs", seed, out, time.perf_counter() - t0)
    return truth
