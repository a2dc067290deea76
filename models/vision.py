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
