"""The DICOMweb client (ui/pacs.py): multipart parsing and privacy on canned bytes, then a REAL archive
(Debian's Orthanc with its DICOMweb plugin, started by tests/servers.py) holding the phantom patient:
list, fetch a study with its prior into the local store, send a result back, clear errors; and the UI's
PACS source opening a study from it."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import OrthancServer, orthanc, pacs_patient  # noqa: F401 - session fixtures

from ui.pacs import PacsClient, PacsError, PacsStudy, boundary_of, build_multipart, iter_multipart


# ------------------------------------------------------------------------------------------------
# multipart/related, privacy, errors (no server)
# ------------------------------------------------------------------------------------------------
def _chunks(data: bytes, n: int) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_multipart_stream_parsing(chunk: int) -> None:
    parts = [b"DICM" + bytes(range(256)) * 3, b"", b"--not-a-boundary\r\n--b0undary-ish", b"x" * 5000]
    body = build_multipart(parts, "b0undary")
    got = list(iter_multipart(_chunks(body, chunk), "b0undary"))
    assert [b for _, b in got] == parts
    assert all(h["content-type"] == "application/dicom" for h, _ in got)
    # preamble, transport padding, no Content-Length, epilogue
    raw = (b"preamble\r\n--B \t\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--B\r\n"
           b"Content-Type: application/dicom\r\n\r\nBB\r\nB\r\n--B--\r\nepilogue")
    got = list(iter_multipart(_chunks(raw, chunk), "B"))
    assert [b for _, b in got] == [b"AAA", b"BB\r\nB"]


def test_multipart_errors_and_boundary() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b:c"') == "a b:c"
    with pytest.raises(PacsError, match="boundary"):
        boundary_of("multipart/related")
    with pytest.raises(PacsError, match="not a multipart"):
        list(iter_multipart([b"just bytes"], "B"))
    with pytest.raises(PacsError, match="ended"):
        list(iter_multipart([b"--B\r\nContent-Type: application/dicom\r\n\r\ntruncated"], "B"))


def _qido_study(pid: str, name: str, uid: str, date: str) -> dict[str, Any]:
    return {"00100020": {"vr": "LO", "Value": [pid]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
            "0020000D": {"vr": "UI", "Value": [uid]}, "00080020": {"vr": "DA", "Value": [date]},
            "00080061": {"vr": "CS", "Value": ["CT"]}, "00201208": {"vr": "IS", "Value": [3]}}


def test_identifiers_never_logged_nor_in_repr(caplog: pytest.LogCaptureFixture) -> None:
    rows = [_qido_study("PAT-SECRET-1", "Doe^Jane", "1.2.3", "20240102"),
            _qido_study("PAT-SECRET-1", "Doe^Jane", "1.2.4", "20230102"),
            _qido_study("PAT-SECRET-10", "Roe^Rich", "1.2.5", "20220102")]  # fuzzy QIDO match: dropped

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=rows, headers={"content-type": "application/dicom+json"})

    client = PacsClient("http://pacs.example:8042/dicom-web/", transport=httpx.MockTransport(handler))
    with caplog.at_level(logging.DEBUG):
        studies = client.list_studies(patient_id="PAT-SECRET-1")
        prior = client.find_prior(studies[0])
    assert [s.study_uid for s in studies] == ["1.2.3", "1.2.4"] and studies[0].study_date == "2024-01-02"
    assert prior is not None and prior.study_uid == "1.2.4"
    assert studies[0].patient_name == "Doe^Jane" and studies[0].modality == "CT"
    text = caplog.text + repr(studies) + repr(client.list_patients()) + repr(client)
    assert "PAT-SECRET" not in text and "Doe" not in text
    assert "[redacted]" in caplog.text  # httpx's request line kept, its query string not


@pytest.mark.parametrize("status,match", [(401, "refused access"), (404, "no such"), (500, "HTTP 500")])
def test_http_errors_are_clear(status: int, match: str) -> None:
    client = PacsClient("http://pacs.example/dicom-web",
                        transport=httpx.MockTransport(lambda r: httpx.Response(status, text="nope")))
    with pytest.raises(PacsError, match=match):
        client.list_studies()
    with pytest.raises(PacsError, match=match):
        client.fetch_study("1.2.3", Path("/nonexistent-never-written"))


def test_unreachable_and_bad_url() -> None:
    from servers import free_port

    with pytest.raises(PacsError, match="Could not reach the PACS at 127.0.0.1"):
        PacsClient(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5).list_studies()
    with pytest.raises(PacsError, match="http://"):
        PacsClient("pacs.example:8042")


# ------------------------------------------------------------------------------------------------
# A real archive
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(orthanc: OrthancServer) -> PacsClient:  # noqa: F811 - the imported fixture
    with PacsClient(orthanc.dicomweb, timeout=60) as c:
        yield c


def _patient_studies(client: PacsClient, pacs_patient: dict[str, Any]) -> list[PacsStudy]:  # noqa: F811
    return [s for s in client.list_studies() if s.patient_id == pacs_patient["patient_id"] and "CT" in s.modalities]


def test_list_patient_studies(client: PacsClient, pacs_patient: dict[str, Any]) -> None:  # noqa: F811
    truth = pacs_patient["truth"]["studies"]
    studies = _patient_studies(client, pacs_patient)
    assert len(studies) == 2
    current, prior = studies  # newest first
    assert current.study_date and prior.study_date and current.study_date > prior.study_date
    assert {current.study_uid, prior.study_uid} == {truth["current"]["study_uid"], truth["prior"]["study_uid"]}
    assert current.modality == "CT" and current.n_instances and current.n_series == 1
    import pydicom

    header = pydicom.dcmread(next((pacs_patient["dir"] / "current").glob("*.dcm")), stop_before_pixels=True)
    assert current.description == header.StudyDescription and current.description
    same = client.list_studies(patient_id=pacs_patient["patient_id"])
    assert {s.study_uid for s in same} >= {current.study_uid, prior.study_uid}
    patients = [p for p in client.list_patients() if p.patient_id == pacs_patient["patient_id"]]
    assert patients and patients[0].n_studies >= 2 and patients[0].last_study_date == current.study_date
    series = client.list_series(current.study_uid)
    assert len(series) == 1 and series[0].modality == "CT" and series[0].n_instances == current.n_instances
    assert len(client.list_instances(current.study_uid)) == current.n_instances


def test_fetch_with_prior_into_the_store(client: PacsClient, pacs_patient: dict[str, Any],  # noqa: F811
                                         tmp_path: Path) -> None:
    from tools.store import StudyStore

    current, prior = _patient_studies(client, pacs_patient)
    assert client.find_prior(current).study_uid == prior.study_uid  # type: ignore[union-attr]
    assert client.find_prior(prior) is None  # the earliest study has no prior
    cur_dir, prior_dir = client.fetch_with_prior(current.study_uid, tmp_path / "fetched")
    assert prior_dir is not None
    assert len(list(cur_dir.glob("*.dcm"))) == current.n_instances
    assert len(list(prior_dir.glob("*.dcm"))) == prior.n_instances
    assert not list(tmp_path.rglob("*.part"))
    store = StudyStore(tmp_path / "store")
    recs = store.import_path(cur_dir) + store.import_path(prior_dir)
    assert {r.study_uid for r in recs} == {current.study_uid, prior.study_uid}
    found = store.find_prior(current.study_uid)
    assert found is not None and found.study_uid == prior.study_uid
    # fetched bytes are the archive's originals: the same pixels as the files uploaded
    import pydicom

    src = {pydicom.dcmread(p).SOPInstanceUID: p for p in (pacs_patient["dir"] / "current").glob("*.dcm")}
    one = sorted(cur_dir.glob("*.dcm"))[0]
    ds = pydicom.dcmread(one)
    assert ds.pixel_array.tobytes() == pydicom.dcmread(src[ds.SOPInstanceUID]).pixel_array.tobytes()
    with pytest.raises(PacsError, match="no study"):
        client.fetch_with_prior("1.2.3.999999", tmp_path / "none")


def test_send_a_result_back(client: PacsClient, orthanc: OrthancServer, pacs_patient: dict[str, Any],  # noqa: F811
                            tmp_path: Path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    current, _ = _patient_studies(client, pacs_patient)
    ref = pydicom.dcmread(next((pacs_patient["dir"] / "current").glob("*.dcm")), stop_before_pixels=True)
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "StudyID"):
        setattr(sr, kw, getattr(ref, kw, ""))
    sr.SeriesInstanceUID, sr.SOPInstanceUID = generate_uid(), generate_uid()
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.SeriesDescription = "radassist results"
    path = tmp_path / "result-sr.dcm"
    sr.save_as(path)
    result = client.send([path])
    try:
        assert result.stored == [sr.SOPInstanceUID] and result.failed == []
        series = client.list_series(current.study_uid)
        assert {s.modality for s in series} == {"CT", "SR"}
        assert any(s.description == "radassist results" for s in series)
    finally:  # leave the shared archive as the other tests expect it
        found = httpx.post(orthanc.url + "/tools/lookup", content=sr.SeriesInstanceUID).json()
        for item in found:
            httpx.delete(orthanc.url + item["Path"])
    with pytest.raises(PacsError, match="does not exist"):
        client.send([tmp_path / "missing.dcm"])
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(PacsError):
        client.send([bad])


# ------------------------------------------------------------------------------------------------
# The UI's PACS source
# ------------------------------------------------------------------------------------------------
def test_ui_opens_a_pacs_study_with_its_prior(orthanc: OrthancServer, pacs_patient: dict[str, Any],  # noqa: F811
                                              tmp_path: Path) -> None:
    from agents.engine import Consultant
    from ui import app as ui_app

    consultant = Consultant(home_dir=tmp_path / "home")
    app = ui_app.App(consultant, pacs=PacsClient(orthanc.dicomweb))
    choices = app.pacs_choices()
    truth = pacs_patient["truth"]["studies"]
    labels = dict((uid, label) for label, uid in choices)
    cur_uid, prior_uid = truth["current"]["study_uid"], truth["prior"]["study_uid"]
    assert cur_uid in labels and prior_uid in labels
    assert all(pacs_patient["patient_id"] not in lab for lab in labels.values())
    assert ui_app.pseudonym(pacs_patient["patient_id"]) in labels[cur_uid]
    src, study_upd, _ = app.switch_source(ui_app.SOURCE_PACS)
    assert {u for _, u in study_upd["choices"]} == set(labels)

    outputs = list(app.pick_study(cur_uid, ui_app.SOURCE_PACS))
    assert "Fetching" in outputs[0][3][0]["content"]  # the chat says what is going on
    source, study, prior, history, thread_id = outputs[-1][:5]
    assert source["value"] == ui_app.SOURCE_LOCAL and study["value"] == cur_uid and prior["value"] == prior_uid
    assert "Opened from the PACS" in history[-1]["content"] and thread_id
    assert pacs_patient["patient_id"] not in json.dumps(history)
    assert {r.study_uid for r in consultant.store.list_studies()} == {cur_uid, prior_uid}
    assert consultant.store.find_prior(cur_uid).study_uid == prior_uid  # type: ignore[union-attr]
    assert not list((tmp_path / "home" / "pacs").glob("*"))  # the fetch folder was removed
    assert "in local store" in dict((u, lab) for lab, u in app.pacs_choices())[cur_uid]
    # opening again uses the store's copies; a study the archive lacks is a clear chat message
    again = list(app.pick_study(cur_uid, ui_app.SOURCE_PACS))[-1]
    assert again[1]["value"] == cur_uid
    bad = list(app.pick_study("1.2.3.999999", ui_app.SOURCE_PACS))[-1]
    assert "could not be opened from the PACS" in bad[3][-1]["content"] and "no study" in bad[3][-1]["content"]


def test_report_sent_back_to_the_pacs(orthanc: OrthancServer, pacs_patient: dict[str, Any],  # noqa: F811
                                      tmp_path: Path) -> None:
    """A report turn writes SR + SEG; the workspace sends them to the archive, where QIDO-RS finds them."""
    from agents.engine import Consultant
    from ui import app as ui_app

    consultant = Consultant(home_dir=tmp_path / "home")
    client = PacsClient(orthanc.dicomweb)
    app = ui_app.App(consultant, pacs=client)
    cur_uid = pacs_patient["truth"]["studies"]["current"]["study_uid"]
    list(app.pick_study(cur_uid, ui_app.SOURCE_PACS))
    assert "nowhere" not in app.send_results(None, ui_app.user_of(None))
    tid, _ = app.claim(None, ui_app.user_of(None), cur_uid, "report")
    ans = consultant.ask("write the report", study=consultant.store.path_of(cur_uid), thread_id=tid)
    assert {"sr", "seg"} <= set(ans.report.files)  # type: ignore[union-attr]
    msg = app.send_results(tid, ui_app.user_of(None))
    assert msg.startswith("Sent 2 object(s)"), msg
    assert app.send_results(tid, "someone-else").startswith("Open one of your conversations")
    assert {"SR", "SEG"} <= {s.modality for s in client.list_series(cur_uid)}
