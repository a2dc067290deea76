"""Real servers for the tests: an Orthanc DICOMweb archive, the radassist web app, headless Chromium.

Each is started once per test session and shared by every test module that imports its fixture
(``from servers import orthanc, demo_patient_dir``): the servers live in module-level singletons and
the fixtures' finalizers (one per importing module) all stop the same process, idempotently.

Missing programs are installed on demand: ``apt-get install`` for Debian's ``orthanc``,
``orthanc-dicomweb`` and ``chromium``; ``pip install playwright`` for the browser driver (never
``playwright install``: the browser is Debian's). A test is skipped, with the reason, only when the
installer itself is unavailable or fails (no apt, no network to the mirror, not root).
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

log = logging.getLogger(__name__)

ORTHANC_BIN = "Orthanc"
DICOMWEB_PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                              "/usr/lib/orthanc/libOrthancDicomWeb.so")
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
_APT_LOCK = threading.Lock()
_apt_updated = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------
# Installing what is missing
# ------------------------------------------------------------------------------------------------
def apt_install(packages: list[str]) -> str | None:
    """``apt-get install -y packages``; returns None on success, else why it could not (a skip reason)."""
    global _apt_updated
    apt = shutil.which("apt-get")
    if apt is None:
        return "apt-get is not available on this machine"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "apt-get needs root to install " + " ".join(packages)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _APT_LOCK:
        try:
            if not _apt_updated:
                subprocess.run([apt, "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
                _apt_updated = True
            log.info("apt-get install %s", " ".join(packages))
            subprocess.run([apt, "install", "-y", "-qq", *packages], check=True, env=env, capture_output=True,
                           timeout=1200)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            tail = getattr(exc, "stderr", b"") or b""
            return f"apt-get install {' '.join(packages)} failed: {tail.decode(errors='replace')[-300:] or exc}"
    return None


def pip_install(requirement: str, module: str) -> str | None:
    """``pip install requirement`` into this interpreter when ``module`` is missing; None on success."""
    if importlib.util.find_spec(module) is not None:
        return None
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True,
                       capture_output=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        tail = getattr(exc, "stderr", b"") or b""
        return f"pip install {requirement} failed: {tail.decode(errors='replace')[-300:] or exc}"
    importlib.invalidate_caches()
    return None if importlib.util.find_spec(module) is not None else f"{module} is still not importable"


def _first_file(candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if Path(c).is_file()), None)


def ensure_orthanc() -> tuple[str, str]:
    """(Orthanc binary, DICOMweb plugin path), installing them with apt when missing; skips otherwise."""
    binary = shutil.which(ORTHANC_BIN) or _first_file(("/usr/sbin/Orthanc",))
    plugin = _first_file(DICOMWEB_PLUGIN_CANDIDATES)
    if binary is None or plugin is None:
        why = apt_install(["orthanc", "orthanc-dicomweb"])
        if why is not None:
            pytest.skip(f"no Orthanc archive: {why}")
        binary = shutil.which(ORTHANC_BIN) or _first_file(("/usr/sbin/Orthanc",))
        plugin = _first_file(DICOMWEB_PLUGIN_CANDIDATES)
    if binary is None or plugin is None:
        pytest.fail("orthanc/orthanc-dicomweb were installed but the binary or the DICOMweb plugin is missing")
    return binary, plugin


def ensure_chromium() -> str:
    """Debian's chromium binary (installed with apt when missing) and the playwright driver (pip)."""
    path = _first_file(CHROMIUM_CANDIDATES)
    if path is None:
        why = apt_install(["chromium"])
        if why is not None:
            pytest.skip(f"no headless Chromium: {why}")
        path = _first_file(CHROMIUM_CANDIDATES)
        if path is None:
            pytest.fail("chromium was installed but /usr/bin/chromium is missing")
    why = pip_install("playwright>=1.45", "playwright")
    if why is not None:
        pytest.skip(f"no Playwright driver: {why}")
    return path


# ------------------------------------------------------------------------------------------------
# Orthanc
# ------------------------------------------------------------------------------------------------
@dataclass
class OrthancServer:
    """A running Orthanc with the DICOMweb plugin, bound to localhost, storage in a temporary folder."""

    url: str  # Orthanc's REST root, e.g. http://127.0.0.1:8042
    workdir: Path
    process: subprocess.Popen[bytes]
    uploaded: dict[str, Any] = field(default_factory=dict)

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def upload(self, paths: list[Path]) -> int:
        """``POST /instances`` every file; returns how many were stored."""
        n = 0
        with httpx.Client(timeout=60) as c:
            for p in paths:
                r = c.post(self.url + "/instances", content=Path(p).read_bytes(),
                           headers={"Content-Type": "application/dicom"})
                r.raise_for_status()
                n += 1
        return n

    def upload_folder(self, folder: Path) -> int:
        return self.upload(sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix == ".dcm"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_orthanc(workdir: Path | None = None, timeout_s: float = 60.0) -> OrthancServer:
    binary, plugin = ensure_orthanc()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="radassist-orthanc-"))
    (workdir / "db").mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    cfg = {
        "Name": "radassist-test", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "RADTEST",
        "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
        "Plugins": [plugin], "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "HttpServerEnabled": True, "DicomServerEnabled": True, "StorageCompression": False,
        "HttpThreadsCount": 8, "ConcurrentJobs": 1, "SaveJobs": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"},
    }
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    logf = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen([binary, str(cfg_path)], cwd=workdir, stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logf.close()
            tail = (workdir / "orthanc.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"Orthanc exited with status {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/system", timeout=2).status_code == 200:
                plugins = httpx.get(url + "/plugins", timeout=5).json()
                if "dicom-web" not in plugins:
                    raise RuntimeError(f"Orthanc runs without the DICOMweb plugin (plugins: {plugins})")
                log.info("Orthanc up on port %d", http_port)
                return OrthancServer(url=url, workdir=workdir, process=proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"Orthanc did not answer /system within {timeout_s:.0f} s")


_ORTHANC: OrthancServer | None = None
_DEMO: dict[str, Any] | None = None
_LOCK = threading.Lock()


def orthanc_singleton() -> OrthancServer:
    global _ORTHANC
    with _LOCK:
        if _ORTHANC is None or _ORTHANC.process.poll() is not None:
            _ORTHANC = start_orthanc()
            atexit.register(stop_orthanc)  # also when the session ends abnormally
        return _ORTHANC


def stop_orthanc() -> None:
    global _ORTHANC
    with _LOCK:
        if _ORTHANC is not None:
            _ORTHANC.stop()
            _ORTHANC = None


@pytest.fixture(scope="session")
def orthanc() -> Iterator[OrthancServer]:
    """A running, empty-at-start Orthanc archive with DICOMweb (shared by all modules)."""
    yield orthanc_singleton()
    stop_orthanc()


def demo_patient_singleton(server: OrthancServer, seed: int = 7) -> dict[str, Any]:
    """The phantom demo patient (prior + current CT), written once and uploaded to ``server``."""
    global _DEMO
    with _LOCK:
        if _DEMO is None or _DEMO.get("url") != server.url:
            from tools.phantom import write_patient

            out = Path(tempfile.mkdtemp(prefix="radassist-pacs-patient-")) / "patient"
            truth = write_patient(out, seed=seed, size="small")
            n = server.upload_folder(out / "prior") + server.upload_folder(out / "current")
            _DEMO = {"url": server.url, "dir": out, "truth": truth, "n_instances": n,
                     "patient_id": truth["patient_id"]}
        return _DEMO


@pytest.fixture(scope="session")
def pacs_patient(orthanc: OrthancServer) -> dict[str, Any]:
    """The demo phantom patient stored in the shared Orthanc: ``dir``, ``truth``, ``patient_id``."""
    return demo_patient_singleton(orthanc)
