"""The synthetic chest-CT phantom: deterministic, valid DICOM, truth consistent with the voxels."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage

from tools import phantom
from tools.vocab import REGIONS

FATES = {"grew", "shrank", "stable", "new", "resolved"}


def _load(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset], list[Path]]:
    """Read a series the way a loader must: sort by position along the slice normal, never by name."""
    files = list(folder.glob("*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    normal = np.cross(np.array(dss[0].ImageOrientationPatient[:3], float),
                      np.array(dss[0].ImageOrientationPatient[3:], float))
    order = np.argsort([float(np.dot(normal, np.array(d.ImagePositionPatient, float))) for d in dss])
    vol = np.stack([dss[i].pixel_array.astype(np.float32) * float(dss[i].RescaleSlope)
                    + float(dss[i].RescaleIntercept) for i in order])
    return vol, [dss[i] for i in order], [files[i] for i in order]


@pytest.fixture(scope="module")
def loaded(phantom_patient: dict) -> dict[str, tuple[np.ndarray, list[pydicom.Dataset], list[Path]]]:
    return {w: _load(Path(phantom_patient[w])) for w in ("prior", "current")}


@pytest.fixture(scope="module")
def current_render() -> phantom.PhantomStudy:
    return phantom.render_study(seed=3, size="small", which="current")


def _boxes_ok(b: list[float]) -> bool:
    return len(b) == 6 and b[0] < b[3] and b[1] < b[4] and b[2] < b[5]


def _inside(inner: list[float], outer: list[float], tol: float = 0.02) -> bool:
    return all(inner[i] >= outer[i] - tol for i in range(3)) and all(inner[i] <= outer[i] + tol for i in range(3, 6))


def test_truth_structure(phantom_truth: dict[str, Any]) -> None:
    t = phantom_truth
    assert t["seed"] == 3 and t["size"] == "small" and t["patient_id"] == "PHANTOM-0003"
    assert 90 <= t["interval_days"] <= 800
    pri, cur = t["studies"]["prior"], t["studies"]["current"]
    d0 = dt.date.fromisoformat(pri["date"])
    d1 = dt.date.fromisoformat(cur["date"])
    assert (d1 - d0).days == t["interval_days"]
    assert pri["shape"] != cur["shape"] and pri["spacing"] != cur["spacing"]
    assert pri["study_uid"] != cur["study_uid"] and pri["series_uid"] != cur["series_uid"]
    for st in (pri, cur):
        k, j, i = st["shape"]
        assert j == i == 256 and 100 <= k <= 170
        assert 1.3 <= st["spacing"][0] <= 1.5 and st["spacing"][0] == st["spacing"][1]
        assert 2.0 <= st["spacing"][2] <= 2.5
        assert 15 <= st["noise_hu"] <= 50
        an = st["anatomy"]
        for r in REGIONS:  # every vocabulary region has an exact box
            assert r.name in an, r.name
            assert _boxes_ok(an[r.name]["bbox_mm"]), r.name
        for name in an:
            assert _inside(an[name]["bbox_mm"], an["body"]["bbox_mm"]), name
        for side in ("right", "left"):
            assert _inside(an[f"{side} lung"]["bbox_mm"], an["lungs"]["bbox_mm"])
            z = [an[f"{side} {zone} zone"]["bbox_mm"] for zone in ("lower", "middle", "upper")]
            for b in z:
                assert _inside(b, an[f"{side} lung"]["bbox_mm"])
            assert z[0][5] <= z[1][2] + 0.01 and z[1][5] <= z[2][2] + 0.01  # thirds stack upwards
        assert an["right lung"]["bbox_mm"][0] < an["left lung"]["bbox_mm"][0]  # LPS: the right is at -x
        assert an["heart"]["bbox_mm"][1] < an["spine"]["bbox_mm"][1]  # the heart is anterior to the spine
        tr, rmb = an["trachea"]["bbox_mm"], an["right main bronchus"]["bbox_mm"]
        assert tr[5] > rmb[5] and an["left main bronchus"]["bbox_mm"][3] > tr[3]
    ns = t["nodules"]
    assert 3 <= len(ns) <= 7
    assert any(n["juxtapleural"] for n in ns) and any(n["juxtavascular"] for n in ns)
    assert {n["fate"] for n in ns} <= FATES and {"grew", "stable"} <= {n["fate"] for n in ns}
    for n in ns:
        assert n["side"] in ("right", "left") and n["zone"] in ("upper", "middle", "lower")
        assert n["attenuation"] in ("solid", "ground-glass")
        assert (n["prior"] is None) == (n["fate"] == "new") and (n["current"] is None) == (n["fate"] == "resolved")
        for w in ("prior", "current"):
            s = n[w]
            if s is None:
                continue
            assert 4.0 <= s["diameter_mm"] <= 30.0
            assert s["diameter_mm"] == pytest.approx((s["long_axis_mm"] + s["short_axis_mm"]) / 2, abs=0.02)
            assert s["short_axis_mm"] >= 0.69 * s["long_axis_mm"]
            assert _boxes_ok(s["bbox_mm"]) and all(s["bbox_mm"][a] < s["center_mm"][a] < s["bbox_mm"][a + 3]
                                                   for a in range(3))
            r = s["diameter_mm"] / 2
            assert 0.6 * (4 / 3) * np.pi * r ** 3 < s["volume_mm3"] < 1.6 * (4 / 3) * np.pi * r ** 3
        if n["prior"] and n["current"]:
            delta = n["current"]["diameter_mm"] - n["prior"]["diameter_mm"]
            want = {"grew": (2.0, 6.0), "shrank": (-4.0, -2.0), "stable": (-0.4, 0.4)}[n["fate"]]
            assert want[0] - 0.02 <= delta <= want[1] + 0.02, n
    for w in ("prior", "current"):  # at least ~8 mm between nodules
        pres = [n[w] for n in ns if n[w]]
        for a in range(len(pres)):
            for b in range(a + 1, len(pres)):
                gap = np.linalg.norm(np.subtract(pres[a]["center_mm"], pres[b]["center_mm"]))
                assert gap >= (pres[a]["diameter_mm"] + pres[b]["diameter_mm"]) / 2 + 7.9


def test_dicom_headers_and_geometry(loaded: dict, phantom_truth: dict[str, Any]) -> None:
    frames = set()
    for w in ("prior", "current"):
        vol, dss, files = loaded[w]
        st = phantom_truth["studies"][w]
        assert list(vol.shape) == st["shape"]
        di, dj, dk = st["spacing"]
        origin = np.array(st["origin"])
        frames.add(dss[0].FrameOfReferenceUID)
        for k, ds in enumerate(dss):
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            assert ds.StudyInstanceUID == st["study_uid"] and ds.SeriesInstanceUID == st["series_uid"]
            assert ds.FrameOfReferenceUID == dss[0].FrameOfReferenceUID
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert np.allclose([float(v) for v in ds.ImagePositionPatient], origin + [0, 0, k * dk], atol=1e-3)
            assert [float(v) for v in ds.PixelSpacing] == [dj, di]
            assert float(ds.SpacingBetweenSlices) == dk
        ds = dss[0]
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST" and ds.Manufacturer == "radassist phantom"
        assert ds.PatientID == "PHANTOM-0003" and str(ds.PatientName) == "Phantom^Three"
        assert ds.StudyDescription == "CT CHEST WITHOUT CONTRAST" and ds.SeriesDescription
        assert ds.PatientSex in ("M", "F") and len(ds.PatientBirthDate) == 8 and ds.AccessionNumber
        assert ds.StudyDate == st["date"].replace("-", "")
        assert (ds.Rows, ds.Columns) == (256, 256) and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 1)
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds["WindowCenter"].VM == 2 and ds["WindowWidth"].VM == 2
        assert ds.KVP and ds.ConvolutionKernel and float(ds.SliceThickness) > 0
        inst = [int(d.InstanceNumber) for d in dss]
        assert sorted(inst) == list(range(1, len(inst) + 1))
        if w == "current":  # instance numbers run against the spatial order
            assert inst == sorted(inst, reverse=True)
        names = [f.name for f in files]
        assert names != sorted(names) and names != sorted(names, reverse=True)  # file names are shuffled
        assert -1024 <= vol.min() and vol.max() <= 3071
    assert len(frames) == 2


def test_dicom_equals_in_memory_render(loaded: dict, phantom_truth: dict[str, Any],
                                       current_render: phantom.PhantomStudy) -> None:
    """Determinism by seed, and the DICOM encoding is lossless: a fresh render equals the written files."""
    vol = loaded["current"][0]
    s = current_render
    assert s.hu.dtype == np.float32 and s.hu.shape == vol.shape
    assert np.array_equal(s.hu, vol)
    st = phantom_truth["studies"]["current"]
    assert s.geometry["spacing"] == tuple(st["spacing"]) and s.geometry["origin"] == st["origin"]
    assert np.array_equal(np.array(s.geometry["direction"]), np.eye(3))
    assert s.truth["anatomy"] == st["anatomy"] and s.truth["study_uid"] == st["study_uid"]
    want = {n["id"]: n["current"] for n in phantom_truth["nodules"] if n["current"]}
    got = {n["id"]: n for n in s.truth["nodules"]}
    assert set(got) == set(want)
    for nid, n in want.items():
        assert got[nid]["center_mm"] == n["center_mm"] and got[nid]["diameter_mm"] == n["diameter_mm"]


def test_nodule_attenuation_in_the_dicom(loaded: dict, phantom_truth: dict[str, Any]) -> None:
    for w in ("prior", "current"):
        vol = loaded[w][0]
        for n in phantom_truth["nodules"]:
            s = n[w]
            if s is None:
                continue
            c = np.array(s["center_vox"], float)[::-1]  # (k, j, i)
            offs = np.array([[0, dj, di] for dj in (-1, 0, 1) for di in (-1, 0, 1)], float)
            hu = float(np.mean(ndimage.map_coordinates(vol, (c[None, :] + offs).T, order=1)))
            if n["attenuation"] == "ground-glass":
                assert -780 < hu < -200, (w, n["id"], hu)
            elif n["juxtapleural"]:
                assert hu > -450, (w, n["id"], hu)
            else:
                assert hu > (-150 if s["diameter_mm"] >= 6 else -450), (w, n["id"], hu)


def test_nodules_lie_in_their_lung_and_zone(current_render: phantom.PhantomStudy,
                                            phantom_truth: dict[str, Any]) -> None:
    s = current_render
    sp = np.array(s.geometry["spacing"])
    for n in s.truth["nodules"]:
        code = 1 if n["side"] == "right" else 2
        i, j, k = np.round(n["center_vox"]).astype(int)
        bounds = s.truth["anatomy"][f"{n['side']} lung"]["zone_bounds_z_mm"]
        z = n["center_mm"][2]
        zone = "upper" if z >= bounds[2] else "middle" if z >= bounds[1] else "lower"
        assert zone == n["zone"], n["id"]
        box = s.truth["anatomy"][f"{n['side']} {zone} zone"]["bbox_mm"]
        assert all(box[a] - 2 <= n["center_mm"][a] <= box[a + 3] + 2 for a in range(3)), n["id"]
        if n["juxtapleural"]:  # centred on the pleura: lung on one side, chest wall on the other
            r = max(2.0, n["diameter_mm"] / 2)
            ext = np.ceil((r + 2) / sp).astype(int)
            sl = (slice(max(k - ext[2], 0), k + ext[2] + 1), slice(j - ext[1], j + ext[1] + 1),
                  slice(i - ext[0], i + ext[0] + 1))
            assert (s.lung[sl] == code).any() and (s.lung[sl] == 0).any()
            assert (s.labels[sl] == phantom.LABELS["nodule"]).any()
        else:
            assert s.lung[k, j, i] == code, n["id"]
            assert s.labels[k, j, i] == phantom.LABELS["nodule"], n["id"]
        assert n["bbox_vox"] is not None
        b = n["bbox_vox"]
        assert b[0] <= i <= b[3] and b[1] <= j <= b[4] and b[2] <= k <= b[5]
    ids = {n["id"] for n in s.truth["nodules"]}
    assert ids == {n["id"] for n in phantom_truth["nodules"] if n["current"]}


def test_transform_maps_prior_to_current(phantom_truth: dict[str, Any]) -> None:
    m = np.array(phantom_truth["transform"]["prior_to_current"])
    assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])
    r = m[:3, :3]
    assert np.allclose(r @ r.T, np.eye(3), atol=1e-5) and np.linalg.det(r) == pytest.approx(1, abs=1e-5)
    angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    assert 0.5 < angle <= 6.0
    both = [n for n in phantom_truth["nodules"] if n["prior"] and n["current"]]
    assert any(n["fate"] == "stable" for n in both)
    for n in both:
        p = r @ np.array(n["prior"]["center_mm"]) + m[:3, 3]
        assert np.linalg.norm(p - np.array(n["current"]["center_mm"])) < 0.5, n["id"]
    sts = phantom_truth["studies"]
    for region in ("heart", "spine"):  # the anatomy moves with the same transform
        bp = np.array(sts["prior"]["anatomy"][region]["bbox_mm"])
        bc = np.array(sts["current"]["anatomy"][region]["bbox_mm"])
        if region == "heart":
            cp = r @ ((bp[:3] + bp[3:]) / 2) + m[:3, 3]
            assert np.linalg.norm(cp - (bc[:3] + bc[3:]) / 2) < 6.0
        else:
            assert abs(((bp[0] + bp[3]) / 2 + m[0, 3]) - (bc[0] + bc[3]) / 2) < 12.0


def test_patient_model_is_deterministic_and_varies_by_seed(phantom_truth: dict[str, Any]) -> None:
    a = phantom._build_patient(5, n_nodules=7)
    b = phantom._build_patient(5, n_nodules=7)
    assert len(a.nodules) == 7
    assert np.array_equal(a.vessels.a, b.vessels.a) and np.array_equal(a.vessels.ra, b.vessels.ra)
    for x, y in zip(a.nodules, b.nodules):
        assert np.array_equal(x.center, y.center) and x.d == y.d and x.fate == y.fate
    assert {n.fate for n in a.nodules} == FATES
    assert any(n.attenuation == "ground-glass" for n in a.nodules)
    assert len(a.vessels) > 5000  # dense vessel trees: the classic false positives
    assert (np.abs(_unit_z(a.vessels)) > 0.8).sum() > 500  # many run cranio-caudally, seen end-on
    pa = phantom._plan_studies(a, "small")
    p3 = phantom_truth["studies"]
    assert [list(pa[w].shape) for w in ("prior", "current")] != [p3[w]["shape"] for w in ("prior", "current")]
    assert a.meta["patient_id"] == "PHANTOM-0005" and a.meta["patient_name"] == "Phantom^Five"
    full = phantom._plan_studies(a, "full")["current"]
    assert full.shape[1:] == (512, 512) and 0.68 <= full.spacing[0] <= 0.78 and full.spacing[2] in (1.0, 1.25)
    assert 200 <= full.shape[0] <= 360


def _unit_z(t: Any) -> np.ndarray:
    d = t.b - t.a
    return d[:, 2] / np.maximum(np.linalg.norm(d, axis=1), 1e-9)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        phantom.make_study_arrays(seed=1, size="huge")
    with pytest.raises(ValueError):
        phantom.render_study(seed=1, which="later")
