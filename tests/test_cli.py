"""End to end through the real console script: `radassist ask --json` and its error contract."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXE = shutil.which("radassist", path=str(Path(sys.executable).parent)) or "radassist"


def run(args: list[str], home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, RADASSIST_HOME=str(home))
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def inside(point: list[float], nodule: dict, tol: float = 0.0) -> bool:
    return float(np.linalg.norm(np.array(point) - np.array(nodule["center_mm"]))) <= nodule["diameter_mm"] / 2 + tol


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli_home")


def test_ask_json_finds_truth_nodules(phantom_patient: dict, cli_home: Path) -> None:
    r = run(["ask", "--study", str(phantom_patient["current"]), "--prior", str(phantom_patient["prior"]), "--json",
             "Show me all pulmonary nodules"], cli_home)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, "exactly one JSON object on stdout"
    ans = json.loads(lines[0])
    for key in ("answer", "tools", "findings", "evidence", "reliability", "report", "prognosis", "backend",
                "thread_id"):
        assert key in ans
    assert ans["tools"][0] == "detector"
    assert 0.0 <= ans["reliability"]["score"] <= 1.0 and ans["reliability"]["level"] in ("high", "medium", "low")
    truth = [n["current"] for n in phantom_patient["truth"]["nodules"] if n["current"]]
    lesions = [f for f in ans["findings"] if f["kind"] in ("nodule", "mass")]
    assert lesions
    for f in lesions:
        for key in ("id", "kind", "region", "side", "zone", "center_mm", "bbox_mm", "diameter_mm", "change"):
            assert key in f
        b = f["bbox_mm"]
        assert len(b) == 6 and all(b[i] <= b[i + 3] for i in range(3))
        assert b[0] <= f["center_mm"][0] <= b[3] and b[2] <= f["center_mm"][2] <= b[5]
    big = [n for n in truth if n["diameter_mm"] >= 6]
    found = sum(any(inside(f["center_mm"], n) for f in lesions) for n in big)
    assert found >= len(big) - 1, f"found {found} of {len(big)} truth nodules >= 6 mm"
    hits = [f for f in lesions if any(inside(f["center_mm"], n, tol=1.0) for n in truth)]
    assert len(hits) >= len(lesions) - 1, "findings must lie within their truth nodules"
    assert any(e["kind"] == "image" and Path(e["path"]).exists() for e in ans["evidence"])

    # a follow-up on the same thread, no study given again
    r2 = run(["ask", "--thread", ans["thread_id"], "--json", "how big is it?"], cli_home)
    assert r2.returncode == 0, r2.stderr
    ans2 = json.loads(r2.stdout)
    assert ans2["thread_id"] == ans["thread_id"] and ans2["tools"][0] == "detector"


def test_prior_found_in_store(phantom_patient: dict, tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = run(["import", str(phantom_patient["prior"])], home)
    assert r.returncode == 0, r.stderr
    r = run(["ask", "--study", str(phantom_patient["current"]), "--json", "compare with the prior"], home)
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    assert "comparer" in ans["tools"]
    assert ans["comparison"]["prior_study_uid"] == phantom_patient["truth"]["studies"]["prior"]["study_uid"]
    assert ans["comparison"]["interval_days"] == phantom_patient["truth"]["interval_days"]
    assert any(f.get("change") for f in ans["findings"])


@pytest.mark.parametrize("setup,expect", [
    ("missing", "No file or folder"),
    ("notdicom", "not a DICOM file"),
    ("empty", "empty"),
])
def test_bad_input_is_a_clear_error(setup: str, expect: str, tmp_path: Path, cli_home: Path) -> None:
    target = tmp_path / "input"
    if setup == "notdicom":
        target.mkdir()
        (target / "x.dcm").write_text("this is not an image")
    elif setup == "empty":
        target.mkdir()
    r = run(["ask", "--study", str(target), "--json", "Show me all pulmonary nodules"], cli_home)
    assert r.returncode == 2
    assert r.stdout == ""
    assert expect.lower() in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr


def test_film_of_a_limb_gets_a_clear_answer(cli_home: Path) -> None:
    """A CR of a tibia (pydicom-data RG3) dropped into the chat: the answer says it is not a chest film and
    measures nothing; the session goes on (exit 0, a normal answer)."""
    import importlib.metadata

    p = Path(str(importlib.metadata.distribution("pydicom-data").locate_file("data_store/data/RG3_UNCR.dcm")))
    if not p.exists():
        pytest.skip("pydicom-data's RG3_UNCR.dcm is not installed")
    r = run(["ask", "--study", str(p), "--json", "are there any nodules?"], cli_home)
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    assert "not the chest" in ans["answer"] and ans["findings"] == []
    assert "lung" not in ans["answer"].split("not the chest")[0].lower()


def test_film_answer_is_verified_on_perturbed_films(tmp_path: Path, cli_home: Path) -> None:
    """A detection answer on a chest film (DRR) carries a reliability from the film's opacities re-measured on
    perturbed copies of the film, each opacity with its own."""
    from tools.drr import write_drr_patient

    write_drr_patient(tmp_path / "p", 9)
    r = run(["ask", "--study", str(tmp_path / "p" / "current"), "--json", "are there any nodules?"], cli_home)
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    rel = ans["reliability"]
    assert "perturbed re-measurements of the film" in rel["method"], rel["method"]
    lesions = [f["id"] for f in ans["findings"] if f["kind"] in ("nodule", "mass")]
    assert lesions and set(lesions) <= set(rel["details"]["measurements"])
    assert all(0.0 <= u["p"] <= 1.0 for u in rel["details"]["units"])


def test_bad_arguments(cli_home: Path) -> None:
    r = run(["ask", "--box", "1,2,3", "what is this?"], cli_home)
    assert r.returncode != 0 and "six numbers" in r.stderr


def test_phantom_command(tmp_path: Path, cli_home: Path) -> None:
    r = run(["phantom", str(tmp_path / "p"), "--seed", "11"], cli_home)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "truth.json").exists()
    assert any((tmp_path / "p" / "current").iterdir()) and any((tmp_path / "p" / "prior").iterdir())


def test_prognosis_train_command(tmp_path: Path) -> None:
    """`radassist prognosis train` fits, validates and registers a site model that `ask` then names."""
    rng = np.random.default_rng(0)
    n = 160
    age = rng.uniform(40, 80, n)
    kps = rng.choice([50, 60, 70, 80, 90, 100], n)
    hazard = np.exp(0.04 * (age - 60) - 0.03 * (kps - 75))
    t = rng.exponential(400 / hazard)
    c = rng.uniform(100, 900, n)
    lines = ["days,died,age,karnofsky"] + [f"{min(a, b):.0f},{int(a <= b)},{x:.0f},{k}"
                                            for a, b, x, k in zip(t, c, age, kps)]
    csv = tmp_path / "site.csv"
    csv.write_text("\n".join(lines) + "\n")
    home = tmp_path / "home"
    r = run(["prognosis", "train", str(csv), "--time", "days", "--event", "died", "--name", "site_lung",
             "--cancer", "lung", "--json"], home)
    assert r.returncode == 0, r.stderr
    card = json.loads(r.stdout)
    assert card["name"] == "site_lung" and n - 3 <= card["n"] <= n  # rows with zero follow-up are dropped
    assert "site_lung" in json.dumps(card)
    r = run(["prognosis", "models"], home)
    assert "site_lung" in r.stdout
    r = run(["prognosis", "train", str(csv), "--time", "nope", "--event", "died"], home)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
