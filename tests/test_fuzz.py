"""Bad input, fuzzed and by hand: the loader and the CLI import refuse it with a clear message, never crash or hang.

The fuzz budget here is small (``RADASSIST_FUZZ_EXAMPLES``, default 150, a fixed derandomised set so a
failure repeats); ``radassist bench`` runs a larger random budget. Hand-written attacks: zip bombs,
path traversal in zip names, gigantic dimensions in a header, non-image DICOM.
"""
from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from agents.fuzz import run_fuzz, time_bound
from tools import dicom_io
from tools.dicom_io import load_study
from tools.errors import StudyError


def _testfile(name: str) -> Path:
    p = get_testdata_file(name)
    assert p, name
    return Path(str(p))


def _ct_with(tmp_path: Path, **attrs: object) -> Path:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    for k, v in attrs.items():
        setattr(ds, k, v)
    out = tmp_path / "mutated.dcm"
    ds.save_as(out, enforce_file_format=False)
    return out


# ------------------------------------------------------------------------------------------------
# The fuzzer
# ------------------------------------------------------------------------------------------------
def test_fuzz_loader_and_cli_import(phantom_patient: dict) -> None:
    n = int(os.environ.get("RADASSIST_FUZZ_EXAMPLES", "150"))
    slice0 = sorted(Path(phantom_patient["current"]).glob("*.dcm"))[0]
    rep = run_fuzz(n, extra_seeds=[slice0], seed=0, cli_every=5)
    assert rep.crashes == [], "\n".join(rep.crashes[:20])
    assert rep.hangs == [], "\n".join(rep.hangs)
    assert rep.inputs >= n * 0.9  # hypothesis may stop a few short of the budget once it has exhausted a space
    assert rep.via_cli >= rep.inputs // 6  # the CLI import path really ran
    assert rep.rejected > 0 and rep.accepted > 0  # both outcomes happened: the mutations are neither all
    # fatal nor all harmless
    assert rep.max_input_s < 20


def test_time_bound_fires() -> None:
    from agents.fuzz import Hang

    with pytest.raises(Hang):
        with time_bound(0.2):
            time.sleep(2)


# ------------------------------------------------------------------------------------------------
# Zips
# ------------------------------------------------------------------------------------------------
def test_corrupt_deflate_stream_is_a_clear_error(tmp_path: Path) -> None:
    """Found by the fuzzer: a damaged deflate stream raised zlib.error out of the loader."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dir/a.dcm", _testfile("MR_small.dcm").read_bytes())
    data = bytearray(buf.getvalue())
    start = 30 + len("dir/a.dcm")  # local header + name: the compressed stream starts here
    for i in range(start + 20, start + 60):
        data[i] ^= 0x5A
    z = tmp_path / "damaged.zip"
    z.write_bytes(bytes(data))
    with pytest.raises(StudyError, match=r"damaged|not a readable zip"):
        load_study(z)


@pytest.mark.parametrize("name", ["/abs/evil.dcm", "..\\evil.dcm", "C:/evil.dcm", "dir/../../evil.dcm",
                                  "ok/../../../evil.dcm"])
def test_zip_traversal_names(tmp_path: Path, name: str) -> None:
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/a.dcm", _testfile("CT_small.dcm").read_bytes())
        zf.writestr(name, b"x" * 10)
    before = set(tmp_path.parent.rglob("evil.dcm"))
    with pytest.raises(StudyError, match=r"unsafe path"):
        load_study(z)
    assert set(tmp_path.parent.rglob("evil.dcm")) == before
    assert not Path("/abs/evil.dcm").exists()


def test_zip_symlink_member_is_not_followed(tmp_path: Path) -> None:
    """A member stored as a symlink to /etc/passwd is written as a plain small file, never followed."""
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.dcm", _testfile("CT_small.dcm").read_bytes())
        info = zipfile.ZipInfo("link.dcm")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    st = load_study(z)  # the symlink member is just a non-DICOM file that is skipped
    assert st.modality == "CT"


def test_zip_lying_about_its_size(tmp_path: Path) -> None:
    """A member whose header declares 100 bytes but inflates to 4 MiB (a bomb that hides from the size check)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (4 * 1024**2))
    data = bytearray(buf.getvalue())
    # patch the uncompressed size in the local header (offset 22) and the central directory entry
    struct.pack_into("<I", data, 22, 100)
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 100)
    z = tmp_path / "liar.zip"
    z.write_bytes(bytes(data))
    with pytest.raises(StudyError, match=r"zip bomb|damaged|not a readable"):
        load_study(z)


def test_zip_member_count_and_nested_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(10):
            zf.writestr(f"f{i}.txt", "x")
    monkeypatch.setattr(dicom_io, "MAX_ZIP_MEMBERS", 5)
    with pytest.raises(StudyError, match=r"holds 10 files, more than the 5 allowed"):
        load_study(z)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("a.dcm", _testfile("CT_small.dcm").read_bytes())
    outer = tmp_path / "nested.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.writestr("inner.zip", inner.getvalue())
    with pytest.raises(StudyError, match=r"not a DICOM file"):  # archives inside archives are not opened
        load_study(outer)


# ------------------------------------------------------------------------------------------------
# Gigantic dimensions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attrs, expect", [
    ({"Rows": 65535, "Columns": 65535}, r"65535 x 65535 pixels x 1 frames \(16\.0 GiB"),
    ({"NumberOfFrames": "1000000000"}, r"declares 1000000000 frames"),
    ({"NumberOfFrames": "9000", "Rows": 4096, "Columns": 4096}, r"GiB once loaded"),
    ({"Rows": 0}, r"declares an empty image"),
])
def test_gigantic_dimensions_refused_before_allocating(tmp_path: Path, attrs: dict, expect: str) -> None:
    f = _ct_with(tmp_path, **attrs)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with time_bound(20):
            with pytest.raises(StudyError, match=expect):
                load_study(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 20
    assert peak < 64 * 1024**2, f"{peak / 1024**2:.0f} MiB allocated before refusing"


def test_damaged_value_representation_is_a_clear_error(tmp_path: Path) -> None:
    """Found by the fuzzer: pydicom parses lazily, so a damaged VR raised NotImplementedError deep in the loader."""
    data = _testfile("CT_small.dcm").read_bytes()
    tag = b"\x20\x00\x37\x00DS"  # ImageOrientationPatient, explicit VR
    assert tag in data
    f = tmp_path / "badvr.dcm"
    f.write_bytes(data.replace(tag, b"\x20\x00\x37\x00\x44\x96", 1))
    with pytest.raises(StudyError, match=r"header is damaged or truncated"):
        load_study(f)


def test_rescale_overflow_is_refused(tmp_path: Path) -> None:
    """Found by the fuzzer: RescaleSlope 1e308 overflowed float32 into inf pixels that reached the tools."""
    with pytest.raises(StudyError, match=r"out of range \(overflow\)"):
        load_study(_ct_with(tmp_path, RescaleSlope="1e308"))


def test_study_over_the_volume_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicom_io, "MAX_VOLUME_BYTES", 32 * 1024)  # CT_small is 128x128x4 bytes = 64 KiB
    with pytest.raises(StudyError, match=r"RADASSIST_MAX_VOLUME_MB"):
        load_study(_testfile("CT_small.dcm"))


# ------------------------------------------------------------------------------------------------
# Non-image DICOM (SR, RT plan/dose, waveform, SEG are covered one by one in test_dicom_io)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [("rtdose.dcm", "RT dose grid"), ("liver.dcm", "segmentation"),
                                        ("test-SR.dcm", "SR document")])
def test_non_image_objects(name: str, kind: str, tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=rf"contains no images \(found: {kind}\)"):
        load_study(_testfile(name))


def test_non_image_objects_next_to_images_are_skipped_with_a_note(tmp_path: Path) -> None:
    """An SR and a waveform in the same study as an image: the image loads, the others are named in a note."""
    ct = pydicom.dcmread(_testfile("CT_small.dcm"))
    folder = tmp_path / "study"
    folder.mkdir()
    ct.save_as(folder / "ct.dcm")
    for name in ("test-SR.dcm", "waveform_ecg.dcm"):
        ds = pydicom.dcmread(_testfile(name))
        ds.StudyInstanceUID = ct.StudyInstanceUID
        ds.PatientID = ct.PatientID
        ds.PatientName = ct.PatientName
        ds.save_as(folder / name)
    st = load_study(folder)
    assert st.modality == "CT" and len(st.series) == 1
    joined = " ".join(st.notes)
    assert "SR document (no image)" in joined and "waveform" in joined
