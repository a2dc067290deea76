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


# -- boxes on the images actually sent, mapped back to the phantom's truth --------------------------------
from models.vision import key_slices, render_for_model, sent_box_to_mm, sent_box_to_source_px  # noqa: E402


def _encode(convention: str, box_sent: tuple[float, float, float, float], w: int, h: int) -> str:
    """A recorded-style answer in each model's published format that encodes ``box_sent`` (edges, sent pixels)."""
    x0, y0, x1, y1 = box_sent
    if convention == "grid1000":
        g = [int(x0 / w * 1000), int(y0 / h * 1000), round(x1 / w * 1000) - 1, round(y1 / h * 1000) - 1]
        return f"The nodule is at <ref>nodule</ref><box>[[{g[0]},{g[1]},{g[2]},{g[3]}]]</box>."
    if convention == "bins100":
        b = [int(x0 / w * 100), int(y0 / h * 100), round(x1 / w * 100) - 1, round(y1 / h * 100) - 1]
        return f"<obj>nodule</obj><box>[{b[0]}, {b[1]}, {b[2]}, {b[3]}]</box>"
    return '```json\n[{"bbox_2d": [%d, %d, %d, %d], "label": "nodule"}]\n```' % tuple(round(v) for v in box_sent)


@pytest.mark.parametrize("convention,multiple", [("grid1000", 1), ("pixels", 28), ("bins100", 1)])
def test_truth_nodule_box_maps_back_to_its_truth_in_mm(convention: str, multiple: int, phantom_patient: dict) -> None:
    from tools.dicom_io import load_study

    series = load_study(phantom_patient["current"]).primary
    nk, nj, ni = series.shape
    nods = [n["current"] for n in phantom_patient["truth"]["nodules"] if n.get("current")]
    assert nods
    di, dj = float(series.spacing[0]), float(series.spacing[1])
    for t in nods:
        k = int(t["slice_index"])
        img = render_for_model(series, k, "lung", max_side=512, multiple=multiple)
        assert img.width % multiple == 0 and img.height % multiple == 0
        i0, j0, _, i1, j1, _ = t["bbox_vox"]
        sx, sy = img.width / ni, img.height / nj
        xs = (i0 * sx, (i1 + 1) * sx) if not img.flip_x else (img.width - (i1 + 1) * sx, img.width - i0 * sx)
        ys = (j0 * sy, (j1 + 1) * sy) if not img.flip_y else (img.height - (j1 + 1) * sy, img.height - j0 * sy)
        (b,) = parse_boxes(_encode(convention, (xs[0], ys[0], xs[1], ys[1]), img.width, img.height), convention,
                           img.width, img.height)
        mm = sent_box_to_mm(series, img, b.box_px)
        truth = series.box_vox_to_mm(t["bbox_vox"])  # the truth pixel box in mm (juxtapleural ones are clipped)
        assert abs(truth[0] - t["bbox_mm"][0]) < 12 and abs(truth[1] - t["bbox_mm"][1]) < 12
        # quantisation of the convention in source voxels: a 0-999 cell, a 1/100 bin, or one sent pixel
        q = {"grid1000": ni / 1000.0, "bins100": ni / 100.0, "pixels": ni / img.width}[convention]
        for a, (sp, extent) in enumerate(((di, ni), (dj, nj))):
            tol = sp * (1.0 + q * extent / ni)
            assert abs(mm[a] - truth[a]) <= tol, (convention, t, mm)
            assert abs(mm[a + 3] - truth[a + 3]) <= tol, (convention, t, mm)
        assert mm[2] <= t["center_mm"][2] + float(series.spacing[2]) and mm[5] >= t["center_mm"][2] - float(
            series.spacing[2])


def test_display_flips_are_undone() -> None:
    """A series stored left-right and front-back mirrored is sent in radiological display; its boxes come back
    to the stored grid."""
    px = np.full((3, 40, 60), -1000.0, np.float32)
    px[1, 5:9, 10:14] = 0.0  # a blob near the stored grid's corner
    s = Series(series_uid="2", modality="CT", pixels=px, spacing=(0.7, 0.7, 2.0), origin=np.zeros(3),
               direction=np.diag([-1.0, -1.0, 1.0]))
    img = render_for_model(s, 1, "lung", max_side=512)
    assert img.flip_x and img.flip_y and (img.width, img.height) == (60, 40)
    from PIL import Image
    import io

    arr = np.asarray(Image.open(io.BytesIO(img.png)))
    rows, cols = np.nonzero(arr > 128)
    box_sent = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert sent_box_to_source_px(s, img, box_sent) == (10.0, 5.0, 14.0, 9.0)
    mm = sent_box_to_mm(s, img, box_sent)
    assert mm[:2] == pytest.approx(s.vox_to_mm([13.5, 8.5, 0])[:2].tolist())  # mirrored axes: far corner is min


def test_geometry_text_has_no_identifiers_and_key_slices_respect_the_limit(phantom_patient: dict) -> None:
    from tools.dicom_io import load_study

    study = load_study(phantom_patient["current"])
    img = render_for_model(study.primary, 5, "lung")
    for ident in (study.patient_name, study.patient_id, study.accession, study.study_uid):
        assert ident and ident not in img.geometry
    assert "mm per pixel" in img.geometry and "slice 6 of" in img.geometry
    assert key_slices(100, 3, prefer=[50, 50, 7]) == [7, 50, 51]  # preferred first, deduplicated, then spaced
    assert key_slices(100, 3) == [30, 50, 69]  # evenly inside the middle 80 %
    ks = key_slices(100, 4, prefer=[99, 0, 50])
    assert len(ks) == 4 and {0, 50, 99} <= set(ks)
    assert key_slices(5, 10) == sorted(set(key_slices(5, 10))) and len(key_slices(5, 10)) <= 5
