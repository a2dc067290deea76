"""Boxes from vision-language models, mapped back to the image and the patient.

Models answer grounding questions in different box conventions (the registry's ``box`` setting):
- ``grid1000``: MedRegA-style ``<ref>label</ref><box>[[x1,y1,x2,y2]]</box>`` on a 0–999 grid;
- ``pixels``: absolute pixel coordinates of the image sent (Qwen2.5-VL ``bbox_2d`` JSON or the same tags);
- ``bins100``: 100 bins per axis (MAIRA-2 style ``<obj>…</obj>`` boxes as four integers 0–99).

:func:`parse_boxes` reads any of these into pixel boxes ``[x0, y0, x1, y1]`` (column, row) on the
image that was sent; :func:`box_px_to_mm` places a pixel box on an axial slice into patient LPS mm.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from tools.study import Series

_REF_BOX = re.compile(r"<ref>(?P<label>.*?)</ref>\s*<box>(?P<boxes>.*?)</box>", re.DOTALL)
_BOX_ONLY = re.compile(r"<box>(?P<boxes>.*?)</box>", re.DOTALL)
_NUMS = re.compile(r"-?\d+(?:\.\d+)?")
_JSON_BLOCK = re.compile(r"\[\s*\{.*?\}\s*\]|\{[^{}]*\"bbox_2d\"[^{}]*\}", re.DOTALL)


@dataclass(frozen=True)
class ModelBox:
    label: str
    box_px: tuple[float, float, float, float]  # [x0, y0, x1, y1] on the image sent


def _to_px(vals: list[float], convention: str, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = vals
    if convention == "grid1000":
        sx, sy = width / 1000.0, height / 1000.0
        x0, x1 = x0 * sx, (x1 + 1) * sx
        y0, y1 = y0 * sy, (y1 + 1) * sy
    elif convention == "bins100":
        sx, sy = width / 100.0, height / 100.0
        x0, x1 = x0 * sx, (x1 + 1) * sx
        y0, y1 = y0 * sy, (y1 + 1) * sy
    elif convention != "pixels":
        raise ValueError(f"unknown box convention {convention!r}")
    x0, x1 = sorted((float(np.clip(x0, 0, width)), float(np.clip(x1, 0, width))))
    y0, y1 = sorted((float(np.clip(y0, 0, height)), float(np.clip(y1, 0, height))))
    return (round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1))


def _groups_of_four(text: str) -> list[list[float]]:
    nums = [float(v) for v in _NUMS.findall(text)]
    return [nums[i:i + 4] for i in range(0, len(nums) - len(nums) % 4, 4)]


def parse_boxes(text: str, convention: str, width: int, height: int) -> list[ModelBox]:
    """All boxes in a model's answer, as pixel boxes on the image sent; malformed boxes are skipped."""
    out: list[ModelBox] = []
    matched = False
    for m in _REF_BOX.finditer(text):
        matched = True
        for vals in _groups_of_four(m.group("boxes")):
            out.append(ModelBox(m.group("label").strip(), _to_px(vals, convention, width, height)))
    if not matched:
        for m in _BOX_ONLY.finditer(text):
            matched = True
            for vals in _groups_of_four(m.group("boxes")):
                out.append(ModelBox("", _to_px(vals, convention, width, height)))
    if not matched:
        for m in _JSON_BLOCK.finditer(text):
            try:
                data = json.loads(m.group(0))
            except json.JSONDecodeError:
                continue
            for item in data if isinstance(data, list) else [data]:
                if isinstance(item, dict) and isinstance(item.get("bbox_2d"), list) and len(item["bbox_2d"]) == 4:
                    try:
                        vals = [float(v) for v in item["bbox_2d"]]
                    except (TypeError, ValueError):
                        continue
                    out.append(ModelBox(str(item.get("label", "")), _to_px(vals, convention, width, height)))
    return [b for b in out if b.box_px[2] > b.box_px[0] and b.box_px[3] > b.box_px[1]]


def box_px_to_mm(series: Series, k: int, box_px: tuple[float, float, float, float],
                 sent_shape: tuple[int, int] | None = None) -> list[float]:
    """A pixel box on axial slice k (of an image possibly resized to ``sent_shape`` = (height, width)) ->
    an LPS mm box ``[x0, y0, z0, x1, y1, z1]`` one slice thick."""
    nj, ni = series.shape[1], series.shape[2]
    h, w = sent_shape or (nj, ni)
    x0, y0, x1, y1 = box_px
    sx, sy = ni / w, nj / h
    corners = np.array([[x0 * sx - 0.5, y0 * sy - 0.5, k - 0.5], [x1 * sx - 0.5, y1 * sy - 0.5, k + 0.5]])
    pts = series.vox_to_mm(corners)
    lo, hi = pts.min(0), pts.max(0)
    return [round(float(v), 2) for v in (*lo, *hi)]


# ------------------------------------------------------------------------------------------------
# Images sent to a vision-language model, and their boxes mapped back
# ------------------------------------------------------------------------------------------------
SOFT_TISSUE_WORDS = ("effusion", "heart", "cardi", "pericard", "mediastin", "aorta", "lymph", "node", "fluid")
BONE_WORDS = ("fracture", "bone", "rib", "spine", "vertebr", "lytic", "sclerotic")


@dataclass(frozen=True)
class SentImage:
    """One windowed PNG as sent to a model: no overlay, no text burned in, geometry described in words.

    ``k`` is the axial slice index in the series (0 for a radiograph); the PNG is ``width`` x
    ``height`` pixels, the slice's column/row grid scaled by (``width``/ni, ``height``/nj) and flipped
    (``flip_x``, ``flip_y``) into radiological display (patient right on the image's left, anterior up).
    """

    k: int
    png: bytes
    width: int
    height: int
    flip_x: bool
    flip_y: bool
    window: str
    geometry: str

    def data_uri(self) -> str:
        import base64

        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def window_for_question(text: str) -> str:
    """Display window that suits a visual question: bone, mediastinal (soft tissue, fluid) or lung."""
    t = text.lower()
    if any(w in t for w in BONE_WORDS):
        return "bone"
    if any(w in t for w in SOFT_TISSUE_WORDS):
        return "mediastinal"
    return "lung"


def _sent_size(ni: int, nj: int, max_side: int, multiple: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(ni, nj))
    w, h = max(1, round(ni * scale)), max(1, round(nj * scale))
    if multiple > 1:  # Qwen2.5-VL reads absolute pixels on its own 28-px grid: send that size already
        w, h = max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
    return int(w), int(h)


def render_for_model(series: Series, k: int, window: str = "lung", max_side: int = 512,
                     multiple: int = 1) -> SentImage:
    """Slice ``k`` of a CT (or the radiograph) as a plain windowed PNG for a model, with its geometry.

    Only pixels go into the PNG (no labels, names, dates or annotations are drawn); the text states
    slice position, pixel spacing, image size and orientation, nothing that identifies the patient.
    """
    import io

    from PIL import Image

    from tools.render import _axis_flips, _to_uint8

    nk, nj, ni = series.shape
    k = int(np.clip(k, 0, nk - 1))
    plane = np.asarray(series.pixels[k], dtype=np.float32)
    if series.is_radiograph:
        lo, hi = np.percentile(plane, [0.5, 99.5])
        img8 = np.clip((plane - lo) * (255.0 / max(float(hi - lo), 1e-6)), 0, 255).astype(np.uint8)
        flip_x = flip_y = False
        window = "film (0.5-99.5 % intensity range)"
    else:
        img8 = _to_uint8(plane, window)
        flip_x, flip_y, _ = _axis_flips(series)
    if flip_x:
        img8 = img8[:, ::-1]
    if flip_y:
        img8 = img8[::-1, :]
    w, h = _sent_size(ni, nj, max_side, multiple)
    im = Image.fromarray(np.ascontiguousarray(img8))
    if (w, h) != (ni, nj):
        im = im.resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    di, dj = float(series.spacing[0]) * ni / w, float(series.spacing[1]) * nj / h
    if series.is_radiograph:
        spacing = f"{di:.3f} x {dj:.3f} mm per pixel" if series.spacing_known else "pixel spacing unknown"
        geometry = (f"Frontal chest radiograph, {w} x {h} pixels (width x height), {spacing}; "
                    "displayed as acquired.")
    else:
        z = float(series.vox_to_mm([ni / 2.0, nj / 2.0, k])[2])
        dk = float(series.spacing[2])
        geometry = (f"Axial CT slice {k + 1} of {nk} (z = {z:.1f} mm, slice spacing {dk:.2f} mm), "
                    f"{w} x {h} pixels (width x height), {di:.3f} x {dj:.3f} mm per pixel, {window} window; "
                    "patient's right on the image's left, anterior at the top.")
    return SentImage(k=k, png=buf.getvalue(), width=w, height=h, flip_x=flip_x, flip_y=flip_y,
                     window=window, geometry=geometry)


def sent_box_to_source_px(series: Series, img: SentImage, box_px: tuple[float, float, float, float]
                          ) -> tuple[float, float, float, float]:
    """A pixel box on the image sent -> the same box on the slice's own column/row grid (undoing
    the display flips and the resize)."""
    nj, ni = series.shape[1], series.shape[2]
    x0, y0, x1, y1 = box_px
    if img.flip_x:
        x0, x1 = img.width - x1, img.width - x0
    if img.flip_y:
        y0, y1 = img.height - y1, img.height - y0
    sx, sy = ni / img.width, nj / img.height
    return (round(x0 * sx, 2), round(y0 * sy, 2), round(x1 * sx, 2), round(y1 * sy, 2))


def sent_box_to_mm(series: Series, img: SentImage, box_px: tuple[float, float, float, float]) -> list[float]:
    """A pixel box on the image sent -> an LPS mm box one slice thick (see :func:`box_px_to_mm`)."""
    return box_px_to_mm(series, img.k, sent_box_to_source_px(series, img, box_px))


def key_slices(n_slices: int, n: int, prefer: list[int] | None = None, k_range: tuple[int, int] | None = None
               ) -> list[int]:
    """Up to ``n`` slice indices: the preferred ones first (e.g. through findings), then evenly spaced
    over ``k_range`` (default: the middle 80 % of the series)."""
    if n <= 0 or n_slices <= 0:
        return []
    lo, hi = k_range if k_range else (int(n_slices * 0.1), int(np.ceil(n_slices * 0.9)) - 1)
    lo, hi = max(0, min(lo, hi)), min(n_slices - 1, max(lo, hi))
    out: list[int] = []
    for k in prefer or []:
        if 0 <= k < n_slices and k not in out and len(out) < n:
            out.append(int(k))
    free = n - len(out)
    if free > 0:
        for k in np.linspace(lo, hi, free + 2)[1:-1] if hi > lo else [lo]:
            kk = int(round(float(k)))
            while kk in out and kk < hi:
                kk += 1
            if kk not in out and len(out) < n:
                out.append(kk)
    return sorted(out)


BOX_INSTRUCTIONS = {
    "grid1000": ("Give every box as <ref>label</ref><box>[[x1,y1,x2,y2]]</box> with coordinates on a 0-999 grid "
                 "over the image (0,0 top left, 999,999 bottom right)."),
    "pixels": ('Give every box as JSON: [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}] in absolute pixel '
               "coordinates of the image ({w} x {h} pixels, 0,0 top left)."),
    "bins100": ("Give every box as <obj>label</obj><box>[x1, y1, x2, y2]</box> with coordinates in 100 bins per "
                "axis (0-99, 0,0 top left)."),
}


def box_instruction(convention: str, width: int, height: int) -> str:
    """How to ask a model for boxes in its own convention (the registry's ``box`` setting)."""
    if convention not in BOX_INSTRUCTIONS:
        raise ValueError(f"unknown box convention {convention!r}")
    return BOX_INSTRUCTIONS[convention].replace("{w}", str(width)).replace("{h}", str(height))
