"""Shared fixtures: an isolated RADASSIST_HOME per test session, and phantom patients with known truth."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session", autouse=True)
def radassist_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("radassist_home")
    os.environ["RADASSIST_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def phantom_patient(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small phantom patient (prior + current DICOM) written once per session; returns paths and truth."""
    from tools.phantom import write_patient

    out = tmp_path_factory.mktemp("phantom") / "patient"
    truth = write_patient(out, seed=3, size="small")
    return {"dir": out, "prior": out / "prior", "current": out / "current", "truth": truth,
            "truth_path": out / "truth.json"}


@pytest.fixture(scope="session")
def phantom_truth(phantom_patient: dict) -> dict:
    return json.loads(Path(phantom_patient["truth_path"]).read_text())
