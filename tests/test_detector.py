"""The grounded detector engine on phantoms with known truth (small size, two seeds), plus the
edges: other modalities, a single real CT slice, evidence images, the evaluation helpers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools.cache import CACHE
from tools.detector import DetectRequest, analyze_series, measure_at, run_detector
from tools.errors import UnsupportedError
from tools.evaluate import box_iou, match_nodules
from tools.study import Series, Study

SEEDS = (100, 104)  # 100: a juxtavascular and a ground-glass nodule; 104: a juxtapleural one


def _series(hu: np.ndarray, geom: dict[str, Any], uid: str) -> Series:
    return Series(series_uid=uid, modality="CT", pixels=np.asarray(hu, dtype=np.float32),
                  spacing=tuple(float(v) for v in geom["spacing"]),  # type: ignore[arg-type]
                  origin=np.asarray(geom["origin"], dtype=float),
                  direction=np.asarray(geom["direction"], dtype=float).reshape(3, 3))


@pytest.fixture(scope="module")
def cases() -> dict[int, dict[str, Any]]:
    from tools.phantom import make_study_arrays

    out: dict[int, dict[str, Any]] = {}
    for seed in SEEDS:
        hu, geom, truth = make_study_arrays(seed, size="small", which="current")
        s = _series(hu, geom, f"test-detector-{seed}")
        study = Study(study_uid=f"study-{seed}", patient_id="p", study_date=None, modality="CT", series=[s])
        out[seed] = {"series": s, "study": study, "truth": truth, "analysis": analyze_series(s)}
    return out


def _big(truth: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in truth["nodules"] if n["diameter_mm"] >= 5.0]


@pytest.mark.parametrize("seed", SEEDS)
def test_every_nodule_found_measured_and_placed(cases: dict, seed: int) -> None:
    c = cases[seed]
    found = c["analysis"].nodules
    m = match_nodules(found, c["truth"]["nodules"], min_mm=5.0)
    assert m["fn"] == 0, m["missed"]
    assert m["fp"] <= 1, m["false_positives"]
    for p in m["pairs"]:
        if p["optional"]:
            continue
        assert abs(p["diameter_error_mm"]) <= 1.5, p
        assert p["side_ok"] and p["zone_ok"], p
    # the contract: ids by size, boxes in both frames, uids, slice index
    sizes = [f.diameter_mm for f in found]
    assert sizes == sorted(sizes, reverse=True)
    for n, f in enumerate(found, start=1):
        assert f.id == f"F{n}" and f.kind in ("nodule", "mass")
        assert f.series_uid == c["series"].series_uid and f.slice_index is not None
        assert len(f.bbox_mm or []) == 6 and len(f.bbox_vox or []) == 6
        assert f.long_axis_mm >= f.short_axis_mm > 0 and f.volume_mm3 > 0
        assert 0.0 <= (f.confidence or 0.0) <= 1.0 and f.attenuation is not None
        assert f.region == f"{f.side} {f.zone} zone"


def test_juxtapleural_and_ground_glass_are_recognised(cases: dict) -> None:
    truth = cases[104]["truth"]
    found = cases[104]["analysis"].nodules
    m = match_nodules(found, truth["nodules"], min_mm=5.0)
    by_id = {f.id: f for f in found}
    kinds = {(p["truth"]["juxtapleural"], p["truth"]["attenuation"]): by_id[p["finding_id"]] for p in m["pairs"]}
    assert any(jp for jp, _ in kinds), "the phantom should hold a juxtapleural nodule"
    for (jp, att), f in kinds.items():
        assert f.attenuation == att
        if jp:
            assert any("pleura" in n for n in f.notes)


def test_anatomy_boxes_match_truth(cases: dict) -> None:
    from tools.evaluate import anatomy_ious

    for seed in SEEDS:
        an = cases[seed]["analysis"].anatomy
        ious = anatomy_ious(an.regions, cases[seed]["truth"]["anatomy"])
        assert set(ious) >= {"body", "lungs", "right lung", "left lung", "heart", "trachea", "spine", "ribs"}
        assert float(np.mean(list(ious.values()))) >= 0.85, ious
        for name in ("body", "lungs", "right lung", "left lung"):
            assert ious[name] >= 0.9, (name, ious[name])
        assert an.labels.dtype == np.uint8 and an.labels.shape == an.grid.shape
        for info in an.regions.values():
            assert info.volume_ml > 0 and len(info.centroid_mm) == 3


def test_region_at(cases: dict) -> None:
    from tools.anatomy import region_at

    c = cases[100]
    an = c["analysis"].anatomy
    for n in _big(c["truth"]):
        assert region_at(an, n["center_mm"], lung_snap_mm=10.0) == f"{n['side']} {n['zone']} zone"
    heart = an.regions["heart"].centroid_mm
    assert region_at(an, heart) == "heart"


def test_text_to_region(cases: dict) -> None:
    c = cases[100]
    r = run_detector(c["study"], DetectRequest(regions=["heart"], lesion_kind="nodule"))
    assert r.findings == [] and "No nodule found in the heart." in r.summary
    zones = {f.region for f in c["analysis"].nodules}
    empty = next(z for z in ("right lower zone", "left middle zone", "right upper zone", "left lower zone",
                             "right middle zone", "left upper zone") if z not in zones)
    r = run_detector(c["study"], DetectRequest(regions=[empty], lesion_kind="nodule"))
    assert r.findings == [] and f"No nodule found in the {empty}." in r.summary
    some = c["analysis"].nodules[0]
    r = run_detector(c["study"], DetectRequest(regions=[f"{some.side} lung"]))
    assert some.id in [f.id for f in r.findings] and some.id in r.summary
    assert all(f.side == some.side for f in r.findings)
    assert all(f.study_uid == c["study"].study_uid for f in r.findings)
    assert "Lung-RADS" in r.measured[0]


def test_anatomy_request(cases: dict, tmp_path: Path) -> None:
    c = cases[104]
    r = run_detector(c["study"], DetectRequest(regions=["heart", "trachea"], want="anatomy", evidence_dir=tmp_path))
    assert [f.label for f in r.findings] == ["heart", "trachea"]
    assert all(f.kind == "anatomy" and f.volume_mm3 for f in r.findings)
    assert box_iou(r.findings[0].bbox_mm, c["truth"]["anatomy"]["heart"]["bbox_mm"]) >= 0.6
    assert any(e.role == "key-image" for e in r.evidence)


def test_region_to_text_with_a_box(cases: dict) -> None:
    c = cases[104]
    f = c["analysis"].nodules[0]
    b = f.bbox_mm
    pad = 5.0
    box = [b[0] - pad, b[1] - pad, b[2] - pad, b[3] + pad, b[4] + pad, b[5] + pad]
    r = run_detector(c["study"], DetectRequest(box_mm=box, want="describe"))
    assert f.id in r.summary and f.region in r.summary
    assert r.findings[0].id == f.id
    assert any(x.kind == "anatomy" and x.label == f.region for x in r.findings)
    # a box in the mediastinum holds no lesion
    h = c["analysis"].anatomy.regions["heart"].centroid_mm
    r = run_detector(c["study"], DetectRequest(box_mm=[h[0] - 10, h[1] - 10, h[2] - 10, h[0] + 10, h[1] + 10,
                                                       h[2] + 10], want="describe"))
    assert "heart" in r.summary and "No nodule found inside the box." in r.summary


def test_measure_at_is_stable_under_small_shifts(cases: dict) -> None:
    c = cases[100]
    for n in _big(c["truth"]):
        a = measure_at(c["series"], n["center_mm"], c["analysis"])
        b = measure_at(c["series"], list(np.asarray(n["center_mm"]) + np.array([1.5, -1.5, 1.0])))
        assert a is not None and b is not None
        assert abs(a.diameter_mm - n["diameter_mm"]) <= 1.5
        assert abs(a.diameter_mm - b.diameter_mm) <= 1.0
        assert np.linalg.norm(np.asarray(a.center_mm) - np.asarray(n["center_mm"])) <= 0.5 * n["diameter_mm"]
    assert measure_at(c["series"], [0.0, 0.0, 0.0], roi_mm=1.0) is None


def test_evidence_images(cases: dict, tmp_path: Path) -> None:
    from PIL import Image

    c = cases[104]
    r = run_detector(c["study"], DetectRequest(evidence_dir=tmp_path))
    assert r.evidence and {e.role for e in r.evidence} == {"key-image", "overview"}
    for e in r.evidence:
        p = Path(e.path)
        assert p.exists() and p.stat().st_size < 200_000 and e.caption
        with Image.open(p) as im:
            assert im.width >= 200
    key = [e for e in r.evidence if e.role == "key-image"]
    assert {e.finding_ids[0] for e in key} == {f.id for f in r.findings}


def test_render_orientation(tmp_path: Path) -> None:
    """Patient's right (low x in LPS) is drawn on the image's left; anterior (low y) at the top."""
    from PIL import Image

    from tools.render import render_finding
    from tools.schemas import Finding

    px = np.full((3, 64, 64), -1000.0, dtype=np.float32)
    px[1, 10:14, 5:9] = 100.0  # low i = patient's right, low j = anterior
    s = Series("r", "CT", px, (1.0, 1.0, 1.0), np.zeros(3), np.eye(3))
    f = Finding(id="F1", kind="nodule", center_mm=[6.5, 11.5, 1.0], bbox_vox=[5, 10, 1, 8, 13, 1],
                diameter_mm=4.0)
    e = render_finding(s, f, tmp_path / "o.png", window="lung")
    im = np.asarray(Image.open(e.path).convert("L"), dtype=float)[:, :320]
    ys, xs = np.nonzero(im > 200)
    assert xs.mean() < 160 and ys.mean() < 160
    # a flipped direction matrix is displayed the same way
    s2 = Series("r2", "CT", px[:, ::-1, ::-1].copy(), (1.0, 1.0, 1.0), np.array([63.0, 63.0, 0.0]),
                np.diag([-1.0, -1.0, 1.0]))
    e2 = render_finding(s2, f.model_copy(update={"bbox_vox": None, "bbox_mm": [5, 10, 1, 8, 13, 1]}),
                        tmp_path / "o2.png", window="lung")
    im2 = np.asarray(Image.open(e2.path).convert("L"), dtype=float)[:, :320]
    ys2, xs2 = np.nonzero(im2 > 200)
    assert xs2.mean() < 160 and ys2.mean() < 160


def test_other_modalities_are_refused_clearly() -> None:
    for modality, shape in (("CR", (1, 64, 64)), ("MR", (20, 64, 64))):
        s = Series(f"s-{modality}", modality, np.zeros(shape, np.float32), (1.0, 1.0, 1.0), np.zeros(3), np.eye(3))
        study = Study(study_uid="u", patient_id="p", study_date=None, modality=modality, series=[s])
        with pytest.raises(UnsupportedError, match="not supported for this modality yet"):
            run_detector(study, DetectRequest())


def test_single_real_ct_slice_is_handled() -> None:
    import pydicom.data

    path = pydicom.data.get_testdata_file("CT_small.dcm")
    try:
        from tools.dicom_io import load_study

        study = load_study(path)
    except ImportError:  # pragma: no cover - the loader is another module's
        import pydicom

        ds = pydicom.dcmread(path)
        px = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        s = Series("ct-small", "CT", px[None], (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), 1.0),
                   np.zeros(3), np.eye(3))
        study = Study(study_uid="ct", patient_id="p", study_date=None, modality="CT", series=[s])
    r = run_detector(study, DetectRequest(regions=["right upper zone"]))
    assert r.findings == [] and "single slice" in r.summary
    assert measure_at(study.primary, [0.0, 0.0, 0.0]) is None  # and never raises


def test_box_iou_and_matching() -> None:
    from tools.schemas import Finding

    assert box_iou([0, 0, 0, 2, 2, 2], [0, 0, 0, 2, 2, 2]) == pytest.approx(1.0)
    assert box_iou([0, 0, 0, 2, 2, 2], [1, 0, 0, 3, 2, 2]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]) == 0.0
    truth = [{"center_mm": [0, 0, 0], "diameter_mm": 8.0, "side": "right", "zone": "upper"},
             {"center_mm": [50, 0, 0], "diameter_mm": 4.0, "side": "left", "zone": "lower"}]
    found = [Finding(id="F1", kind="nodule", center_mm=[1, 1, 0], diameter_mm=8.6, side="right", zone="upper"),
             Finding(id="F2", kind="nodule", center_mm=[90, 0, 0], diameter_mm=6.0)]
    m = match_nodules(found, truth, min_mm=5.0)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["diameter_errors"] == [pytest.approx(0.6)] and m["region_ok"] == [True]


def teardown_module() -> None:
    CACHE.clear()


def _lung_volume(rng: np.random.Generator, shape: tuple[int, int, int] = (40, 64, 64)) -> np.ndarray:
    return (-850.0 + rng.normal(0.0, 20.0, shape)).astype(np.float32)


def _paint(vol: np.ndarray, mask: np.ndarray, hu: float = 40.0) -> None:
    vol[mask] = hu + (vol[mask] + 850.0)  # keep the noise


def _synthetic(vol: np.ndarray, uid: str) -> Series:
    return Series(series_uid=uid, modality="CT", pixels=vol, spacing=(0.7, 0.7, 1.0), origin=np.zeros(3),
                  direction=np.eye(3))


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(float)
    return i * 0.7, j * 0.7, k * 1.0  # x, y, z in mm


def test_a_small_nodule_on_a_vessel_as_thick_as_itself_is_found_and_measured() -> None:
    """The juxtavascular hypothesis: a 5.6 mm ball on a 5 mm vessel (no opening separates them) is
    found and sized as the ball; the same vessel alone, or a vessel bend, is not taken for a nodule."""
    rng = np.random.default_rng(3)
    vol = _lung_volume(rng)
    x, y, z = _grid(vol.shape)
    # a vessel along z through (x=20, y=22), radius 2.5 mm; a ball of radius 2.8 mm beside it
    vessel = (x - 20.0) ** 2 + (y - 22.0) ** 2 <= 2.5 ** 2
    cx = 20.0 + 0.65 * 2.5 + 2.8
    ball = (x - cx) ** 2 + (y - 22.0) ** 2 + (z - 20.0) ** 2 <= 2.8 ** 2
    _paint(vol, vessel | ball)
    s = _synthetic(vol, "jv-ball")
    f = measure_at(s, [cx, 22.0, 20.0])
    assert f is not None and (f.confidence or 0.0) >= 0.5, f
    assert abs(f.diameter_mm - 5.6) <= 1.0, f.diameter_mm
    assert np.linalg.norm(np.asarray(f.center_mm) - np.array([cx, 22.0, 20.0])) <= 1.5
    assert any("juxtavascular" in n for n in f.notes)
    # the vessel alone (pointed at its axis) and a bend of it are vessels
    vol2 = _lung_volume(rng)
    _paint(vol2, vessel)
    g = measure_at(_synthetic(vol2, "jv-tube"), [20.0, 22.0, 20.0])
    assert g is None or (g.confidence or 0.0) < 0.5, g
    vol3 = _lung_volume(rng)
    bend = (((x - 20.0) ** 2 + (y - 22.0) ** 2 <= 2.5 ** 2) & (z <= 20.0)) | (
        ((x - 20.0) ** 2 + (z - 20.0) ** 2 <= 2.5 ** 2) & (y >= 22.0))
    _paint(vol3, bend)
    h = measure_at(_synthetic(vol3, "jv-bend"), [20.0, 22.0, 20.0])
    assert h is None or (h.confidence or 0.0) < 0.5, h


def test_ray_shape_tells_a_ball_on_a_vessel_from_a_tube() -> None:
    from tools.detector import _ray_lengths, _ray_shape, _sphere_dirs

    shape = (40, 64, 64)
    x, y, z = _grid(shape)
    dirs = _sphere_dirs()
    c = np.array([20.0, 22.0 / 0.7, 25.0 / 0.7])  # k, j, i of (x=25, y=22, z=20)
    tube = (x - 25.0) ** 2 + (y - 22.0) ** 2 <= 2.5 ** 2
    ball_on = ((x - 25.0) ** 2 + (y - 22.0) ** 2 + (z - 20.0) ** 2 <= 2.8 ** 2) | (
        (x - 25.0 + 4.4) ** 2 + (y - 22.0) ** 2 <= 2.5 ** 2)
    st = _ray_shape(_ray_lengths(tube, c, (1.0, 0.7, 0.7), 12.0, dirs), dirs)
    sb = _ray_shape(_ray_lengths(ball_on, c, (1.0, 0.7, 0.7), 12.0, dirs), dirs)
    assert abs(sb["r_med"] - 2.8) <= 0.5 and sb["long_asym"] >= 0.7 and sb["f_long"] <= 0.3, sb
    assert st["long_asym"] <= 0.3, st  # a tube through the centre runs on both ways


def test_a_cap_on_the_mediastinal_pleura_must_be_clear() -> None:
    """At the hilum vessels leave the mediastinum: the same pleural cap that passes on the costal
    pleura is rejected on the mediastinal pleura unless it is a clear cap (half free, no vessels)."""
    from tools.detector import MIN_CONFIDENCE, _confidence

    seg = {"juxtapleural": True, "elong": 2.6, "nvox": 400, "voxel_mm3": 0.5, "z_extent_mm": 8.0,
           "voxel_in_plane_mm": 0.7, "r_fit": 6.0, "sphere_rms": 0.05, "shell_ratio": 0.2, "opened_frac": 1.0,
           "contrast": 800.0, "mean_d": 12.0, "border_frac": 0.0, "noise": 40.0, "wall_frac": 0.46,
           "n_branch": 3}
    cand = {"blob": 0.6, "resp": 70.0}
    assert _confidence({**seg, "wall_med": 0.0}, cand) >= MIN_CONFIDENCE  # costal: ribs beyond it
    assert _confidence({**seg, "wall_med": 1.0}, cand) < MIN_CONFIDENCE  # mediastinal, vessels leaving
    clear = {**seg, "wall_med": 1.0, "wall_frac": 0.3, "n_branch": 0, "shell_ratio": 0.05}
    assert _confidence(clear, cand) >= MIN_CONFIDENCE


def _pv_volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], inside: Any, hu_in: float,
               rng: np.random.Generator, sub: int = 3) -> np.ndarray:
    """A volume with partial volume: ``inside(x, y, z)`` (mm) sampled ``sub``^3 times per voxel, lung elsewhere,
    then the scanner's blur and noise."""
    from scipy import ndimage as ndi

    di, dj, dk = spacing
    off = (np.arange(sub) + 0.5) / sub - 0.5
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(float)
    frac = np.zeros(shape)
    for ok in off:
        for oj in off:
            for oi in off:
                frac += inside((i + oi) * di, (j + oj) * dj, (k + ok) * dk)
    frac /= sub ** 3
    vol = -850.0 + (hu_in + 850.0) * ndi.gaussian_filter(frac, [0.5 / dk, 0.5 / dj, 0.5 / di])
    return (vol + rng.normal(0.0, 15.0, shape)).astype(np.float32)


def _wall_scene(diameter: float, depth: float, seed: int) -> tuple[Series, np.ndarray]:
    """An oblique chest wall (thick slices, partial volume, blur, noise) with a sphere ``depth`` mm inside
    it (0 = centred on the pleura; no sphere when ``diameter`` is 0); returns the series and the middle of
    the visible cap."""
    spacing = (1.4, 1.4, 2.25)
    n = np.array([0.95, 0.25, 0.18])
    n /= np.linalg.norm(n)
    p0 = np.array([30.0, 25.0, 22.0])  # a point on the pleura; the wall lies beyond it along n
    c = p0 + depth * n
    r = diameter / 2.0

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        wall = (x - p0[0]) * n[0] + (y - p0[1]) * n[1] + (z - p0[2]) * n[2] > 0
        ball = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r * r
        return (wall | ball).astype(float)

    vol = _pv_volume((20, 36, 36), spacing, inside, 40.0, np.random.default_rng(seed))
    s = Series(series_uid=f"wall-{diameter}-{depth}-{seed}", modality="CT", pixels=vol, spacing=spacing,
               origin=np.zeros(3), direction=np.eye(3))
    return s, c - n * (0.5 * max(r - depth, 0.0))


@pytest.mark.parametrize("diameter,depth", [(5.5, -1.0), (5.5, 0.8), (8.0, 0.0), (8.0, 2.5), (12.0, 3.0)])
def test_a_nodule_on_the_pleura_is_sized_from_the_whole_sphere(diameter: float, depth: float) -> None:
    """A nodule partly inside the chest wall (thick slices, partial volume): its size is the sphere's, not
    the visible cap's. ``depth``: how far the centre lies inside the wall (mm; negative: on the lung side) —
    at 5.5 mm and 0.8 mm the cap stands 2 mm proud of the pleura, a voxel and a half."""
    s, visible = _wall_scene(diameter, depth, int(10 * diameter + depth))
    f = measure_at(s, visible.tolist())
    assert f is not None and any("juxtapleural" in t for t in f.notes), f
    assert abs(f.diameter_mm - diameter) <= 1.0, (f.diameter_mm, diameter)
    assert abs(f.volume_mm3 - np.pi / 6.0 * diameter ** 3) <= 0.5 * np.pi / 6.0 * diameter ** 3


@pytest.mark.parametrize("diameter,depth,seed", [(4.6, 0.3, 1), (5.0, 0.0, 2), (5.0, 0.5, 3), (5.5, 0.8, 4)])
def test_a_small_nodule_on_the_pleura_is_taken_for_one_though_its_surface_is_a_speck(
        diameter: float, depth: float, seed: int) -> None:
    """A 4.6-5.5 mm nodule centred on the pleura stands one or two voxels proud of it: thresholded, its
    free surface is a speck or a smear along the pleura, which the free-surface shape tests reject. The
    wall+sphere model explains the image around it; its fit stands for the shape, and it is reported."""
    from tools.detector import MIN_CONFIDENCE

    s, visible = _wall_scene(diameter, depth, seed)
    f = measure_at(s, visible.tolist(), roi_mm=24.0)
    assert f is not None and any("the sphere which, partly hidden" in t for t in f.notes), f
    assert (f.confidence or 0.0) >= MIN_CONFIDENCE, (f.confidence, f.diameter_mm)
    assert abs(f.diameter_mm - diameter) <= 1.0, (f.diameter_mm, diameter)


@pytest.mark.parametrize("seed", [5016, 5019])
def test_a_small_nodule_one_search_voxel_proud_of_the_pleura_is_sought_and_reported(seed: int) -> None:
    """Phantoms whose smallest nodule (4.4 / 4.5 mm) is centred on the costal pleura: it rises ~2 mm into
    the lung, a single voxel of the 1.35 mm search grid, so it is no depth peak for the pleural seeds and
    no blob to the Hessian filter (both versions before the shallow-cap seeds missed it). It is sought among
    the shallow sites ranked by excess density, reported, placed and sized."""
    from tools.phantom import make_study_arrays

    hu, geom, truth = make_study_arrays(seed, size="small", which="current")
    s = _series(hu, geom, f"test-shallow-cap-{seed}")
    small = [n for n in truth["nodules"] if n["juxtapleural"] and n["diameter_mm"] < 5.0]
    assert small, "the phantom should hold a small juxtapleural nodule"
    CACHE.clear()
    found = analyze_series(s).nodules
    m = match_nodules(found, small)
    assert m["fn"] == 0, m["missed"]
    by_id = {f.id: f for f in found}
    for p in m["pairs"]:
        assert abs(p["diameter_error_mm"]) <= 1.5 and p["side_ok"] and p["zone_ok"], p
        assert any("pleura" in t for t in by_id[p["finding_id"]].notes)
    assert match_nodules(found, truth["nodules"])["fp"] == 0


@pytest.mark.parametrize("diameter,depth", [(0.0, 0.0), (16.0, 6.5), (24.0, 10.5)])
def test_a_bare_pleura_or_a_shallow_bulge_of_the_wall_is_no_nodule(diameter: float, depth: float) -> None:
    """The other side of the test above: the bare pleura, and a broad bulge 1.5 mm high (a large sphere
    deep in the wall: the wall's own curve, a rib) are not taken for small caps."""
    from tools.detector import MIN_CONFIDENCE

    for seed in (5, 6, 7):
        s, visible = _wall_scene(diameter, depth, seed)
        f = measure_at(s, visible.tolist(), roi_mm=24.0)
        assert f is None or (f.confidence or 0.0) < MIN_CONFIDENCE, (f.confidence, f.diameter_mm, f.notes)
