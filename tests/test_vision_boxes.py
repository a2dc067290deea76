"""Box parsing on recorded-style answers of grounding models, and the mapping to patient mm."""
from __future__ import annotations

import numpy as np
import pytest

from models.vision import box_px_to_mm, parse_boxes
from tools.study import Series

# Answers in the formats the models publish (MedRegA 0-999 grid, Qwen2.5-VL absolute-pixel JSON,
# MAIRA-2 100 bins), written for these tests.
MEDREGA = ("The lesion is located at <ref>nodule in the right upper lobe</ref><box>[[120,200,250,330]]</box> and "
           "<ref>heart</ref><box>[[400,450,700,800],[410,460,690,790]]</box>.")
QWEN = 'Here you go:\n```json\n[{"bbox_2d": [30, 50, 94, 114], "label": "nodule"}]\n```'
MAIRA = "Finding <obj>opacity</obj><box>[10, 20, 29, 39]</box>"


def test_medrega_grid_1000_to_pixels() -> None:
    boxes = parse_boxes(MEDREGA, "grid1000", width=512, height=512)
    assert [b.label for b in boxes] == ["nodule in the right upper lobe", "heart", "heart"]
    x0, y0, x1, y1 = boxes[0].box_px
    assert x0 == pytest.approx(120 * 0.512, abs=0.1) and x1 == pytest.approx(251 * 0.512, abs=0.1)
    assert y0 == pytest.approx(200 * 0.512, abs=0.1)


def test_absolute_pixels_json() -> None:
    (b,) = parse_boxes(QWEN, "pixels", width=256, height=256)
    assert b.label == "nodule" and b.box_px == (30.0, 50.0, 94.0, 114.0)


def test_bins100() -> None:
    (b,) = parse_boxes(MAIRA, "bins100", width=200, height=400)
    assert b.box_px == (20.0, 80.0, 60.0, 160.0)


@pytest.mark.parametrize("text", ["no boxes here", "<box>[[1,2,3]]</box>", "<ref>x</ref><box>[[5,5,5,5]]</box>",
                                  '[{"bbox_2d": "oops"}]'])
def test_malformed_answers_give_no_box(text: str) -> None:
    assert parse_boxes(text, "pixels", 100, 100) == []


def test_out_of_range_is_clipped() -> None:
    (b,) = parse_boxes("<box>[[-50, 10, 2000, 90]]</box>", "pixels", 100, 100)
    assert b.box_px == (0.0, 10.0, 100.0, 90.0)


def test_pixel_box_to_patient_mm() -> None:
    s = Series(series_uid="1", modality="CT", pixels=np.zeros((10, 100, 200), np.float32), spacing=(0.5, 0.8, 2.0),
               origin=np.array([-50.0, -40.0, 100.0]), direction=np.eye(3))
    mm = box_px_to_mm(s, 3, (10, 20, 30, 40), sent_shape=(50, 100))  # the image was sent at half size
    # pixel (10, 20) on the half-size image = voxel (20, 40); edges are half a voxel out
    assert mm[0] == pytest.approx(-50 + (20 - 0.5) * 0.5) and mm[1] == pytest.approx(-40 + (40 - 0.5) * 0.8)
    assert mm[2] == pytest.approx(100 + 2.5 * 2.0) and mm[5] == pytest.approx(100 + 3.5 * 2.0)
    assert mm[3] == pytest.approx(-50 + (60 - 0.5) * 0.5)
