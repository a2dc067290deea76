"""The structured report on a phantom pair: sections, grounding, longitudinal wording, the number check,
the site phrase bank, and the DICOM SR / SEG export (read back with pydicom, validated by dciodvfy)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tools.errors import ConfigError, ToolError
from tools.report_writer import (
    PHRASEBANK_ENV,
    ReportRequest,
    ReportResult,
    check_numbers,
    load_phrasebank,
    lung_rads,
    to_markdown,
    to_text,
    write_report,
)
from tools.schemas import Change, Finding, ReportSentence

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tools.dicom_io import load_study
    from tools.phantom import write_patient

    root = tmp_path_factory.mktemp("report_pair")
    truth = write_patient(root / "patient", seed=5)
    cur = load_study(root / "patient" / "current")
    pri = load_study(root / "patient" / "prior")
    out = root / "out"
    t0 = time.perf_counter()
    res = write_report(cur, pri, ReportRequest(out_dir=out))
    return {"truth": truth, "current": cur, "prior": pri, "res": res, "out": out, "root": root,
            "seconds": time.perf_counter() - t0}


def _sent(res: ReportResult, section: str) -> list[ReportSentence]:
    return [s for s in res.report.sentences if s.section == section]


def _lesions(res: ReportResult) -> list[Finding]:
    return [f for f in res.findings if not (f.change and f.change.status == "resolved")]


# ------------------------------------------------------------------------------------------ content

def test_sections_present_and_correct(pair: dict[str, Any]) -> None:
    res, cur, pri = pair["res"], pair["current"], pair["prior"]
    assert list(res.report.sections) == ["examination", "comparison", "technique", "findings", "impression"]
    assert cur.date_str in res.report.sections["examination"]
    assert res.report.sections["examination"].startswith("CT chest")
    comp = res.report.sections["comparison"]
    assert pri.date_str in comp and f"({pair['truth']['interval_days']} days earlier)" in comp
    tech = res.report.sections["technique"]
    h = cur.primary.header
    assert f"{cur.primary.shape[0]} axial images" in tech
    assert f"{float(h['SliceThickness']):g} mm slice thickness" in tech and f"{float(h['KVP']):g} kVp" in tech
    assert f"{h['ConvolutionKernel']} kernel" in tech and "no intravenous contrast" in tech

    findings = _sent(res, "findings")
    texts = [s.text for s in findings]
    lesions = _lesions(res)
    assert lesions, "the phantom has nodules the detector finds"
    # lungs by side (right before left), then the other structures
    sides = [("right" if s.text.lower().startswith("right") else "left") for s in findings
             if s.text.lower().startswith(("right", "left"))]
    assert sides == sorted(sides, key=["right", "left"].index)
    assert any(t.startswith("Airways:") for t in texts)
    assert any(t.startswith("Heart and mediastinum:") for t in texts)
    assert any(t.startswith("Bones:") for t in texts)
    # "no nodule" exactly where nothing was found (zone by zone)
    for side in ("right", "left"):
        have = {f.zone for f in res.findings if f.side == side}
        neg = [t for t in texts if t.startswith(f"{side.capitalize()} lung: no")]
        if not have:
            assert neg == [f"{side.capitalize()} lung: no pulmonary nodule detected."]
        else:
            empty = [z for z in ("upper", "middle", "lower") if z not in have]
            assert bool(neg) == bool(empty)
            for z in empty:
                assert z in neg[0]
            for z in have:
                assert not neg or z not in neg[0]

    imp = _sent(res, "impression")
    cats = {f.id: lung_rads(f) for f in lesions}
    order = ["1", "2", "3", "4A", "4B"]
    overall = max(cats.values(), key=order.index)
    assert res.report.lung_rads == overall
    assert any(f"Lung-RADS category {overall}" in s.text for s in imp)
    mgmt = [s for s in imp if s.text.startswith(f"Lung-RADS {overall} (")]
    assert len(mgmt) == 1 and "per guideline" in mgmt[0].text and ("LDCT" in mgmt[0].text or "CT" in mgmt[0].text)
    assert imp[-1].text.startswith("Guideline wording")
    # what matters first: the highest category; within it growing / new, then the largest
    first = [s for s in imp if s.finding_ids and len(s.finding_ids) == 1][0]
    f0 = next(f for f in res.findings if f.id == first.finding_ids[0])
    assert cats[f0.id] == overall
    top = [f for f in lesions if cats[f.id] == overall]
    changed = [f for f in top if f.change and f.change.status in ("grew", "new")]
    pool = changed or top
    assert f0 in pool and f0.diameter_mm == max(f.diameter_mm or 0 for f in pool)
    for s in imp:
        for fid in s.finding_ids:
            if s.text.startswith(("Growing", "New", "Stable", "Decreasing", "Solid", "Ground")):
                assert f"Lung-RADS {cats[fid]}" in s.text

    md, txt = to_markdown(res.report), to_text(res.report)
    for title in ("EXAMINATION", "COMPARISON", "TECHNIQUE", "FINDINGS", "IMPRESSION"):
        assert f"## {title}" in md and f"{title}:" in txt
    assert Path(res.report.files["md"]).read_text() == md and Path(res.report.files["txt"]).read_text() == txt


def test_every_sentence_is_grounded(pair: dict[str, Any]) -> None:
    res = pair["res"]
    ids = {f.id for f in res.findings}
    for s in res.report.sentences:
        assert set(s.finding_ids) <= ids
        assert set(re.findall(r"\b[FR]\d+\b", s.text)) <= set(s.finding_ids), s.text
    cited_in_findings = {i for s in _sent(res, "findings") for i in s.finding_ids}
    assert cited_in_findings == ids, "every finding has its sentence, and no sentence cites a stranger"
    for s in _sent(res, "findings"):
        if re.search(r"\d+\.\d mm", s.text):
            assert s.finding_ids, f"a measured sentence without its finding: {s.text}"
    data = json.loads(json.dumps(res.report.model_dump(mode="json")))
    assert all({"text", "finding_ids"} <= set(s) for s in data["sentences"])
    assert {"md", "txt", "sr", "seg"} <= set(data["files"])


def test_longitudinal_wording_with_the_comparers_numbers(pair: dict[str, Any]) -> None:
    res, pri = pair["res"], pair["prior"]
    by_id = {s.finding_ids[0]: s.text for s in _sent(res, "findings") if len(s.finding_ids) == 1}
    statuses = {f.change.status for f in res.findings if f.change}
    assert "grew" in statuses and ("stable" in statuses or "resolved" in statuses)
    for f in res.findings:
        ch = f.change
        assert ch is not None
        text = by_id[f.id]
        if ch.status == "grew":
            assert (f"increased from {ch.prior_diameter_mm:.1f} to {f.diameter_mm:.1f} mm since {pri.date_str} "
                    f"({ch.interval_days} days)") in text
            if ch.doubling_time_days:
                assert f"doubling time about {ch.doubling_time_days:.0f} days" in text
        elif ch.status == "shrank":
            assert f"decreased from {ch.prior_diameter_mm:.1f} to {f.diameter_mm:.1f} mm" in text
        elif ch.status == "stable":
            months = round((ch.interval_days or 0) / 30.4375)
            assert f"stable for {months} months" in text or "unchanged since" in text
            assert f"{f.diameter_mm:.1f} mm" in text and f"{ch.prior_diameter_mm:.1f} mm" in text
        elif ch.status == "new":
            assert "new" in text and f"not present on {pri.date_str}" in text
        elif ch.status == "resolved":
            assert "no longer visible" in text and f"{ch.prior_diameter_mm:.1f} mm" in text
    # the truth's growing nodule is reported as growing, with numbers within 1 mm of the truth
    grew = [n for n in pair["truth"]["nodules"] if n["fate"] == "grew" and n["current"]]
    for n in grew:
        c = np.array(n["current"]["center_mm"])
        near = [f for f in res.findings if f.center_mm is not None
                and np.linalg.norm(np.array(f.center_mm) - c) <= n["current"]["diameter_mm"] / 2]
        assert near and near[0].change and near[0].change.status == "grew"
        assert abs((near[0].diameter_mm or 0) - n["current"]["diameter_mm"]) <= 1.0


# ------------------------------------------------------------------------------------------ the number check

def test_number_check_rejects_wrong_reports(pair: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.report_writer import _finding_numbers

    res = pair["res"]
    sents = res.report.sentences
    extra = res.allowed_numbers
    check_numbers(sents, res.findings, extra)  # the report as written passes
    used = set().union(*(_finding_numbers(f) for f in res.findings), *extra.values())
    wrong = next(v for v in ("9.9", "99.9", "97.3") if v not in used)
    target = next(s for s in sents if s.section == "findings" and s.finding_ids
                  and re.search(r"\d+\.\d mm", s.text) and s.finding_ids[0].startswith("F"))
    f = next(x for x in res.findings if x.id == target.finding_ids[0])

    def swap(old: str, new: str) -> list[ReportSentence]:
        return [s.model_copy(update={"text": s.text.replace(old, new, 1)}) if s is target else s for s in sents]

    with pytest.raises(ToolError, match=re.escape(wrong)):  # a size the findings do not have
        check_numbers(swap(f"{f.diameter_mm:.1f} mm", f"{wrong} mm"), res.findings, extra)
    other = "Left" if f.side == "right" else "Right"
    with pytest.raises(ToolError, match="says"):  # a flipped side
        check_numbers(swap(target.text.split()[0], other), res.findings, extra)
    zone = next(z for z in ("upper", "middle", "lower") if z != f.zone)
    with pytest.raises(ToolError, match="zone"):  # a wrong zone
        check_numbers(swap(f"{f.zone} zone", f"{zone} zone"), res.findings, extra)
    with pytest.raises(ToolError, match="contradicts"):  # "nothing there" where a finding is
        check_numbers(sents + [ReportSentence(text=f"{f.side.capitalize()} lung: no pulmonary nodule detected.",
                                              section="findings")], res.findings, extra)
    with pytest.raises(ToolError, match="does not rest on"):  # an id the sentence does not cite
        check_numbers([target.model_copy(update={"finding_ids": []})], res.findings, extra)

    # end to end: a site template with a number typed into it is refused, and no report comes back
    bank = tmp_path / "bad.yaml"
    bank.write_text("slots:\n  nodule_grew:\n    templates:\n"
                    f"      - text: '{{Region}}: {{kind}} {{id}} grew to {wrong} mm since {{date}}.'\n"
                    "  nodule_stable:\n    templates:\n"
                    f"      - text: '{{Region}}: {{kind}} {{id}} is stable at {wrong} mm.'\n"
                    "  nodule_current:\n    templates:\n"
                    f"      - text: '{{Region}}: {{kind}} {{id}}, {wrong} mm.'\n")
    monkeypatch.setenv(PHRASEBANK_ENV, str(bank))
    with pytest.raises(ToolError, match="Report check failed"):
        write_report(pair["current"], pair["prior"], ReportRequest(out_dir=tmp_path / "never"))
    assert not (tmp_path / "never" / "report.md").exists()


def test_rewriter_cannot_touch_numbers_or_guideline(pair: dict[str, Any]) -> None:
    seen: list[str] = []

    def bump(text: str) -> str:
        seen.append(text)
        return re.sub(r"(\d+)\.(\d) mm", lambda m: f"{int(m.group(1)) + 1}.{m.group(2)} mm", text)

    res = write_report(pair["current"], pair["prior"], ReportRequest(rewriter=bump))
    assert [s.text for s in res.report.sentences] == [s.text for s in pair["res"].report.sentences]
    assert not any(t.startswith(("Lung-RADS", "Guideline")) for t in seen), "guideline wording is quoted, not sent"


# ------------------------------------------------------------------------------------------ phrase bank

def test_phrasebank_override_by_env(pair: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "slots:\n"
        "  nodule_grew:\n"
        "    describe: growing nodule\n"
        "    templates:\n"
        "      - when: house style for growth\n"
        "        text: '{Region} -- {kind} {id} has grown: {prior_d} mm on {date}, {d} mm today ({days} days).'\n"
        "  airways_normal:\n"
        "    templates: ['Central airways: clear.']\n"
        "lung_rads_management:\n"
        "  '4B': 'Lung-RADS 4B per our site protocol: refer to the nodule clinic.'\n")
    monkeypatch.setenv(PHRASEBANK_ENV, str(site))
    res = write_report(pair["current"], pair["prior"], ReportRequest())
    texts = [s.text for s in res.report.sentences]
    grew = [f for f in res.findings if f.change and f.change.status == "grew"]
    for f in grew:
        assert any(t.startswith(f"{f.region.capitalize()} -- {f.kind} {f.id} has grown: "
                                f"{f.change.prior_diameter_mm:.1f} mm") for t in texts)
    assert "Central airways: clear." in texts
    assert any(t.startswith("Bones:") for t in texts), "slots the site left out come from the packaged bank"
    if res.report.lung_rads == "4B":
        assert "Lung-RADS 4B per our site protocol: refer to the nodule clinic." in texts
    bad = tmp_path / "bad.yaml"
    bad.write_text("slots:\n  lung_clear:\n    templates: ['{Side} lung: {secret.__class__}']\n")
    monkeypatch.setenv(PHRASEBANK_ENV, str(bad))
    with pytest.raises(ConfigError, match="placeholder"):
        load_phrasebank()
    monkeypatch.setenv(PHRASEBANK_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_phrasebank()


def test_retrieval_picks_the_template_by_the_findings_properties() -> None:
    import faiss

    from tools.report_writer import _finding_values, _query

    bank = load_phrasebank()
    assert isinstance(bank.index(), faiss.IndexFlatIP) and bank.index().ntotal == len(bank.templates)
    base = {"kind": "nodule", "region": "right upper zone", "side": "right", "zone": "upper", "diameter_mm": 9.1,
            "long_axis_mm": 9.8, "short_axis_mm": 8.4, "volume_mm3": 400.0, "attenuation": "solid",
            "slice_index": 41, "center_mm": [0.0, 0.0, 0.0]}

    def say(slot: str, ch: Change | None, **kw: Any) -> str:
        f = Finding(id="F1", change=ch, **{**base, **kw})
        return bank.render(slot, _query(f), _finding_values(f, "2025-03-02"))

    grew = Change(status="grew", prior_diameter_mm=6.0, interval_days=343, doubling_time_days=210.0)
    assert say("nodule_grew", grew) == ("Right upper zone: solid nodule F1 increased from 6.0 to 9.1 mm since "
                                        "2025-03-02 (343 days), now 9.8 x 8.4 mm, image 42; volume doubling time "
                                        "about 210 days.")
    assert "doubling" not in say("nodule_grew", grew.model_copy(update={"doubling_time_days": None}))
    assert "since the prior study" in say("nodule_grew", grew.model_copy(update={"interval_days": None}))
    stable = Change(status="stable", prior_diameter_mm=9.0, interval_days=426)
    assert "stable for 14 months (prior 9.0 mm on 2025-03-02)" in say("nodule_stable", stable)
    assert "(30 days; prior 9.0 mm)" in say("nodule_stable", stable.model_copy(update={"interval_days": 30}))
    assert "volume 400 mm³" in say("nodule_current", None, kind="mass", diameter_mm=34.0)
    assert "image 42" in say("nodule_current", None)


# ------------------------------------------------------------------------------------------ DICOM export

def _walk(items: Any) -> list[Any]:
    out = []
    for it in items:
        out.append(it)
        if "ContentSequence" in it:
            out += _walk(it.ContentSequence)
    return out


def test_seg_frames_are_the_nodule_masks(pair: dict[str, Any]) -> None:
    from tools.dicom_export import segment_nodule

    res, cur = pair["res"], pair["current"]
    series = cur.primary
    seg = pydicom.dcmread(res.report.files["seg"])
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == cur.study_uid and seg.FrameOfReferenceUID
    segs = {int(s.SegmentNumber): s.TrackingID for s in seg.SegmentSequence}
    lesions = {f.id: f for f in _lesions(res)}
    assert set(segs.values()) == set(lesions), "one segment per measured nodule"
    k_of = {uid: k for k, uid in enumerate(series.instance_uids)}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    got: dict[str, set[tuple[int, int, int]]] = {fid: set() for fid in segs.values()}
    for n, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        fid = segs[int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = k_of[uid]
        pos = np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        assert np.allclose(pos, series.vox_to_mm([0, 0, k]), atol=0.01)
        for j, i in np.argwhere(frames[n] > 0):
            got[fid].add((k, int(j), int(i)))
    for fid, f in lesions.items():
        m = segment_nodule(series, f)
        assert m is not None
        want = {tuple(int(v) for v in p) for p in m.voxels_kji()}
        assert got[fid] == want, f"{fid}: SEG frames differ from the nodule mask"
        kji = np.array(sorted(want))
        b = f.bbox_vox
        margin = 3
        assert kji[:, 0].min() >= b[2] - margin and kji[:, 0].max() <= b[5] + margin
        assert kji[:, 2].min() >= b[0] - margin and kji[:, 2].max() <= b[3] + margin
        c = series.mm_to_vox(f.center_mm)
        d = np.min(np.linalg.norm((kji - np.array([c[2], c[1], c[0]])) * np.array(series.spacing)[::-1], axis=1))
        assert d <= 1.5 * max(series.spacing), f"{fid}: mask not connected to its centre"
    big = [f for f in lesions.values() if (f.diameter_mm or 0) >= 10 and f.attenuation == "solid"
           and (f.mean_hu or 0) < 100]  # (a dense, bone-like candidate is the detector's business)
    for f in big:  # half maximum = the detector's own size definition: volumes agree
        vol = len(got[f.id]) * series.voxel_volume_mm3
        assert abs(vol - (f.volume_mm3 or 0)) <= 0.25 * (f.volume_mm3 or 0), f"{f.id}: {vol:.0f} mm3"


def test_sr_measurements_are_the_findings_numbers(pair: dict[str, Any]) -> None:
    res, cur = pair["res"], pair["current"]
    sr = pydicom.dcmread(res.report.files["sr"])
    seg = pydicom.dcmread(res.report.files["seg"])
    assert sr.SOPClassUID == SR_3D_STORAGE and sr.StudyInstanceUID == cur.study_uid
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report (TID 1500)
    evidence = {i.ReferencedSOPInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and set(cur.primary.instance_uids) <= evidence
    groups = [it for it in _walk(sr.ContentSequence) if it.ValueType == "CONTAINER"
              and it.ConceptNameCodeSequence[0].CodeValue == "125007"]  # Measurement Group
    lesions = {f.id: f for f in _lesions(res)}
    assert len(groups) == len(lesions)
    codes = {"103339001": "long_axis_mm", "103340004": "short_axis_mm", "81827009": "diameter_mm",
             "118565006": "volume_mm3"}
    for g in groups:
        items = list(g.ContentSequence)
        fid = next(it.TextValue for it in items if it.ConceptNameCodeSequence[0].CodeValue == "112039")
        f = lesions[fid]
        nums = {it.ConceptNameCodeSequence[0].CodeValue: it.MeasuredValueSequence[0] for it in items
                if it.ValueType == "NUM"}
        assert set(nums) == set(codes)
        for code, attr in codes.items():
            assert float(nums[code].NumericValue) == pytest.approx(getattr(f, attr), abs=1e-6)
            unit = nums[code].MeasurementUnitsCodeSequence[0]
            assert unit.CodingSchemeDesignator == "UCUM" and unit.CodeValue == ("mm3" if "volume" in attr else "mm")
        site = next(it for it in items if it.ConceptNameCodeSequence[0].CodeValue == "363698007")
        zone_code = {"upper": "281392002", "middle": "281393007", "lower": "281394001"}[f.zone]
        assert site.ConceptCodeSequence[0].CodeValue == zone_code
        lat = site.ContentSequence[0].ConceptCodeSequence[0].CodeValue
        assert lat == {"right": "24028007", "left": "7771000"}[f.side]
        refs = [it for it in items if it.ValueType == "IMAGE"]
        seg_ref = [r.ReferencedSOPSequence[0] for r in refs
                   if r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID]
        assert len(seg_ref) == 1
        srcs = {r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs} - {seg.SOPInstanceUID}
        assert srcs and srcs <= set(cur.primary.instance_uids)
        assert all(r.ReferencedSOPSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for r in refs
                   if r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in srcs)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_dciodvfy_accepts_sr_and_seg(pair: dict[str, Any]) -> None:
    for kind in ("sr", "seg"):
        r = subprocess.run(["dciodvfy", pair["res"].report.files[kind]], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, f"{kind}: {errors[:5]}"


def test_cli_report_writes_all_four(pair: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    from ui.cli import main

    root = pair["root"] / "patient"
    out = tmp_path / "cli"
    assert main(["report", "--study", str(root / "current"), "--prior", str(root / "prior"), "--out", str(out)]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert sorted(Path(p).name for p in printed) == ["report.md", "report.seg.dcm", "report.sr.dcm", "report.txt"]
    assert all(Path(p).is_file() for p in printed)
    assert main(["report", "--study", str(root / "current"), "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["report"]["sections"]["comparison"].startswith("None available")
    assert set(data["files"]) == {"md", "txt", "sr", "seg"} and data["report"]["sentences"]


def test_report_stays_fast_once_analysed(pair: dict[str, Any], tmp_path: Path) -> None:
    t0 = time.perf_counter()
    res = write_report(pair["current"], pair["prior"], ReportRequest(out_dir=tmp_path / "again"))
    assert time.perf_counter() - t0 < 10.0, "drafting + SR/SEG export on cached analyses"
    assert [s.text for s in res.report.sentences] == [s.text for s in pair["res"].report.sentences]
