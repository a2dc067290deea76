"""Evidence images: small PNGs that show a finding where it is, in standard radiological display.

- ``render_finding`` draws the axial slice through a finding (lung window by default; mediastinal
  window for soft-tissue anatomy such as heart, aorta, spine) with the finding's box and a label
  (id, size), next to a zoomed crop around it.
- ``render_overview`` draws a coronal projection of the chest (an average-intensity projection, like
  a radiograph, with the lungs' maximum-intensity projection when an anatomy is given) with every
  finding's box.

Orientation: the patient's right is on the image's left and anterior is up (axial), head up
(coronal), whatever the direction matrix says; pixels are resampled to square millimetres.
Images are drawn with Pillow (fast, no display) and kept small (< ~200 KB).
"""
from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tools.schemas import Evidence, Finding
from tools.study import Series

log = logging.getLogger(__name__)

WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinal": (40.0, 400.0),
    "soft": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}
SOFT_TISSUE_REGIONS = {"heart", "aorta", "mediastinum", "spine", "ribs", "body"}
MAX_BYTES = 200_000
COLORS = [(255, 64, 64), (255, 200, 0), (0, 220, 255), (80, 255, 80), (255, 120, 255), (255, 150, 60)]


def window_for(finding: Finding) -> str:
    """The display window that suits a finding: mediastinal for soft-tissue/bone anatomy."""
    if finding.kind == "anatomy" and (finding.label or finding.region or "") in SOFT_TISSUE_REGIONS:
        return "mediastinal"
    return "lung"


def _to_uint8(img: np.ndarray, window: str | tuple[float, float]) -> np.ndarray:
    c, w = WINDOWS.get(window, WINDOWS["lung"]) if isinstance(window, str) else window
    lo = c - w / 2.0
    out = (np.asarray(img, dtype=np.float32) - lo) * (255.0 / max(w, 1e-6))
    return np.clip(out, 0, 255).astype(np.uint8)


def _axis_flips(series: Series) -> tuple[bool, bool, bool]:
    """(flip columns, flip rows, flip slices) so that right->image left, anterior up, head up."""
    d = np.asarray(series.direction, dtype=float)
    flip_i = bool(d[0, 0] < 0) if abs(d[0, 0]) >= abs(d[1, 0]) else bool(d[1, 0] < 0)
    flip_j = bool(d[1, 1] < 0) if abs(d[1, 1]) >= abs(d[0, 1]) else bool(d[0, 1] < 0)
    flip_k = bool(d[2, 2] > 0)  # display head up: highest z at the top row
    return flip_i, flip_j, flip_k


def _font(size: int = 12) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _png_bytes(img: Image.Image, quantize: bool = False) -> bytes:
    buf = io.BytesIO()
    (img.convert("RGB").quantize(colors=64) if quantize else img).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _save_png(img: Image.Image, path: Path) -> None:
    """Encode under ``MAX_BYTES`` (palette, then smaller), then write atomically: a viewer or the UI's copy
    that reads the file while a later turn writes it again sees the old image or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _png_bytes(img)
    if len(data) > MAX_BYTES:
        data = _png_bytes(img, quantize=True)
    while len(data) > MAX_BYTES and img.width > 200:
        img = img.resize((int(img.width * 0.8), int(img.height * 0.8)), Image.BILINEAR)
        data = _png_bytes(img, quantize=True)
    write_atomic(path, data)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name beside ``path`` and rename it into place (evidence images)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _label_text(f: Finding) -> str:
    if f.kind == "anatomy":
        return f.label or f.region or f.id
    size = f"{f.diameter_mm:.1f} mm" if f.diameter_mm is not None else ""
    return f"{f.id} {size}".strip()


def _finding_center_vox(series: Series, f: Finding) -> np.ndarray:
    if f.center_mm is not None:
        return series.mm_to_vox(np.asarray(f.center_mm, dtype=float))
    if f.bbox_vox is not None:
        b = np.asarray(f.bbox_vox, dtype=float)
        return (b[:3] + b[3:]) / 2.0
    nk, nj, ni = series.shape
    return np.array([ni / 2.0, nj / 2.0, nk / 2.0])


def _finding_box_vox(series: Series, f: Finding) -> np.ndarray | None:
    if f.bbox_vox is not None:
        return np.asarray(f.bbox_vox, dtype=float)
    if f.bbox_mm is not None:
        return np.asarray(series.box_mm_to_vox(f.bbox_mm), dtype=float)
    return None


def render_finding(series: Series, finding: Finding, path: str | Path, window: str | None = "lung",
                   others: list[Finding] | None = None) -> Evidence:
    """Axial key image through ``finding``: the whole slice and a zoomed crop, box and label drawn."""
    path = Path(path)
    win = window or window_for(finding)
    if finding.kind == "anatomy" and window == "lung" and window_for(finding) == "mediastinal":
        win = "mediastinal"
    nk, nj, ni = series.shape
    c = _finding_center_vox(series, finding)
    k = int(finding.slice_index) if finding.slice_index is not None else int(round(float(c[2])))
    k = int(np.clip(k, 0, nk - 1))
    sl = _to_uint8(series.pixels[k], win)
    di, dj = float(series.spacing[0]), float(series.spacing[1])
    flip_i, flip_j, _ = _axis_flips(series)

    def to_disp(ii: float, jj: float, scale_x: float, scale_y: float, x0: float = 0.0, y0: float = 0.0,
                ) -> tuple[float, float]:
        u = (ni - 1 - ii) if flip_i else ii
        v = (nj - 1 - jj) if flip_j else jj
        return (u - x0) * scale_x, (v - y0) * scale_y

    img = sl[:, ::-1] if flip_i else sl
    img = img[::-1, :] if flip_j else img
    # full slice, square mm pixels, at most 320 px wide
    w_mm, h_mm = ni * di, nj * dj
    full_w = 320
    full_h = max(1, int(round(full_w * h_mm / w_mm)))
    full = Image.fromarray(np.ascontiguousarray(img)).resize((full_w, full_h), Image.BILINEAR).convert("RGB")
    sx, sy = full_w / ni, full_h / nj
    draw = ImageDraw.Draw(full)
    font = _font(12)
    items = [finding] + [o for o in (others or []) if o.id != finding.id]
    for n, f in enumerate(items):
        b = _finding_box_vox(series, f)
        if b is None or not (b[2] - 0.5 <= k <= b[5] + 0.5):
            continue
        col = COLORS[0] if n == 0 else COLORS[1 + (n % (len(COLORS) - 1))]
        xa, ya = to_disp(b[0] - 0.5, b[1] - 0.5, sx, sy)
        xb, yb = to_disp(b[3] + 0.5, b[4] + 0.5, sx, sy)
        x0, x1 = sorted((xa, xb))
        y0, y1 = sorted((ya, yb))
        pad = 2
        draw.rectangle([x0 - pad, y0 - pad, x1 + pad, y1 + pad], outline=col, width=2 if n == 0 else 1)
        draw.text((x0, max(0, y0 - 16)), _label_text(f), fill=col, font=font)
    draw.text((4, 4), "R", fill=(255, 255, 255), font=font)
    draw.text((full_w - 12, 4), "L", fill=(255, 255, 255), font=font)
    draw.text((4, full_h - 16), f"slice {k + 1}/{nk}", fill=(200, 200, 200), font=font)

    panels = [full]
    if finding.kind != "anatomy":
        b = _finding_box_vox(series, finding)
        size_mm = 20.0
        if b is not None:
            size_mm = max((b[3] - b[0] + 1) * di, (b[4] - b[1] + 1) * dj)
        half_mm = max(20.0, 1.5 * size_mm)
        ci, cj = float(c[0]), float(c[1])
        i0, i1 = int(max(0, ci - half_mm / di)), int(min(ni, ci + half_mm / di + 1))
        j0, j1 = int(max(0, cj - half_mm / dj)), int(min(nj, cj + half_mm / dj + 1))
        if i1 - i0 >= 4 and j1 - j0 >= 4:
            crop = sl[j0:j1, i0:i1]
            crop = crop[:, ::-1] if flip_i else crop
            crop = crop[::-1, :] if flip_j else crop
            zw = 240
            zh = max(1, int(round(zw * ((j1 - j0) * dj) / ((i1 - i0) * di))))
            zoom = Image.fromarray(np.ascontiguousarray(crop)).resize((zw, zh), Image.BICUBIC).convert("RGB")
            zsx, zsy = zw / (i1 - i0), zh / (j1 - j0)
            zd = ImageDraw.Draw(zoom)
            if b is not None:
                # display coordinates inside the crop
                def crop_disp(ii: float, jj: float) -> tuple[float, float]:
                    u = (i1 - 1 - ii) if flip_i else (ii - i0)
                    v = (j1 - 1 - jj) if flip_j else (jj - j0)
                    return u * zsx, v * zsy
                xa, ya = crop_disp(b[0] - 0.5, b[1] - 0.5)
                xb, yb = crop_disp(b[3] + 0.5, b[4] + 0.5)
                x0, x1 = sorted((xa, xb))
                y0, y1 = sorted((ya, yb))
                zd.rectangle([x0 - 3, y0 - 3, x1 + 3, y1 + 3], outline=COLORS[0], width=2)
            zd.text((4, 4), _label_text(finding), fill=COLORS[0], font=font)
            # 10 mm scale bar
            bar = 10.0 / di * zsx
            zd.line([(8, zh - 10), (8 + bar, zh - 10)], fill=(255, 255, 255), width=2)
            zd.text((12 + bar, zh - 20), "10 mm", fill=(255, 255, 255), font=font)
            panels.append(zoom)
    W = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    H = max(p.height for p in panels)
    out = Image.new("RGB", (W, H), (0, 0, 0))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 4
    _save_png(out, path)
    cap = _caption(finding, k, nk, win)
    return Evidence(kind="image", path=str(path), caption=cap, finding_ids=[finding.id], role="key-image")


def _caption(f: Finding, k: int, nk: int, win: str) -> str:
    where = f.region or "chest"
    if f.kind == "anatomy":
        return f"{f.label or f.region}: axial slice {k + 1}/{nk} ({win} window), box drawn."
    parts = [f"{f.id}: {f.kind} in the {where}"]
    if f.diameter_mm is not None:
        parts.append(f"mean axial diameter {f.diameter_mm:.1f} mm")
        if f.long_axis_mm is not None and f.short_axis_mm is not None:
            parts[-1] += f" ({f.long_axis_mm:.1f} x {f.short_axis_mm:.1f} mm)"
    return ", ".join(parts) + f"; axial slice {k + 1}/{nk}, {win} window."


def render_overview(series: Series, findings: list[Finding], path: str | Path,
                    lung_mask: np.ndarray | None = None, title: str = "") -> Evidence:
    """Coronal overview of the whole scan with every finding's box (x across, head up).

    ``lung_mask`` (bool, same shape as the series, optional) adds a maximum-intensity projection of
    the lungs, which shows nodules and vessels, over the radiograph-like mean projection.
    """
    path = Path(path)
    vol = series.pixels
    nk, nj, ni = vol.shape
    di, dk = float(series.spacing[0]), float(series.spacing[2])
    step = max(1, nj // 128)  # project a subsample of rows: fast and nearly identical
    sub = np.clip(vol[:, ::step, :], -1000.0, 1500.0)
    mean_proj = sub.mean(axis=1)
    lo, hi = np.percentile(mean_proj, [1, 99.5])
    base = np.clip((mean_proj - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255)
    if lung_mask is not None and lung_mask.shape == vol.shape:
        m = lung_mask[:, ::step, :]
        mip = np.where(m, np.clip(vol[:, ::step, :], -1000.0, 200.0), -1000.0).max(axis=1)
        inside = m.any(axis=1)
        mip8 = _to_uint8(mip, "lung").astype(np.float32)
        base = np.where(inside, 0.35 * base + 0.65 * mip8, base)
    img = base.astype(np.uint8)  # rows = k, cols = i
    flip_i, _, flip_k = _axis_flips(series)
    if flip_i:
        img = img[:, ::-1]
    if flip_k:
        img = img[::-1, :]
    w_mm, h_mm = ni * di, nk * dk
    scale = 480.0 / max(w_mm, h_mm)
    W, H = max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale)))
    pic = Image.fromarray(np.ascontiguousarray(img)).resize((W, H), Image.BILINEAR).convert("RGB")
    sx, sy = W / ni, H / nk
    draw = ImageDraw.Draw(pic)
    font = _font(12)
    ids: list[str] = []
    for n, f in enumerate(findings):
        b = _finding_box_vox(series, f)
        if b is None:
            continue
        col = COLORS[n % len(COLORS)]
        u0, u1 = b[0] - 0.5, b[3] + 0.5
        v0, v1 = b[2] - 0.5, b[5] + 0.5
        if flip_i:
            u0, u1 = ni - u1, ni - u0
        if flip_k:
            v0, v1 = nk - v1, nk - v0
        pad = 2
        draw.rectangle([u0 * sx - pad, v0 * sy - pad, u1 * sx + pad, v1 * sy + pad], outline=col, width=2)
        draw.text((u1 * sx + 3, max(0, v0 * sy - 2)), _label_text(f), fill=col, font=font)
        ids.append(f.id)
    draw.text((4, 4), "R", fill=(255, 255, 255), font=font)
    draw.text((W - 12, 4), "L", fill=(255, 255, 255), font=font)
    if title:
        draw.text((20, H - 16), title, fill=(220, 220, 220), font=font)
    _save_png(pic, path)
    n = len(ids)
    cap = (f"Coronal overview with {n} finding box{'es' if n != 1 else ''}"
           f"{': ' + ', '.join(ids) if ids else ''} (patient's right on the left, head up).")
    return Evidence(kind="image", path=str(path), caption=cap, finding_ids=ids, role="overview")
