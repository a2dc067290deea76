"""One registry of the models each role uses.

Roles: ``orchestrator`` (reads the dialogue, picks tool agents), ``vision`` (grounding and visual
questions), ``rewriter`` (report wording), ``embeddings``. Each role has a backend:

- ``embedded``: runs in-process on the CPU with weights shipped inside installed packages (the
  default; no download, no server);
- ``openai``: any OpenAI-compatible server (vLLM in production) at ``url`` serving ``model``;
- ``transformers``: local weights in a folder (``path``).

Configuration: a YAML file named by ``RADASSIST_MODELS`` (or ``<home>/models.yaml``), then the
environment (``RADASSIST_<ROLE>_BACKEND``, ``_MODEL``, ``_URL``, ``_API_KEY``, ``_BOX``), e.g.::

    orchestrator: {backend: openai, model: Qwen/Qwen2.5-7B-Instruct, url: http://gpu1:8000/v1}
    vision: {backend: openai, model: Qwen/Qwen2.5-VL-7B-Instruct, url: http://gpu2:8000/v1, box: pixels}

Patient data: every request to an ``openai`` endpoint is scrubbed of the loaded studies' identifiers
(``deidentify: true``, the default; ``scrub_uids: true`` also replaces UIDs; environment
``RADASSIST_<ROLE>_DEIDENTIFY``). A site that must send identifiers to a trusted endpoint sets
``deidentify: false`` for that role only.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("orchestrator", "vision", "rewriter", "embeddings")
BACKENDS = ("embedded", "openai", "transformers")
BOX_CONVENTIONS = ("grid1000", "pixels", "bins100")

EMBEDDED_NAMES = {
    "orchestrator": "semantic-router(minilm-l6)+region-lexicon",
    "vision": "classical-cv(hessian+morphology)",
    "rewriter": "phrase-bank",
    "embeddings": "all-MiniLM-L6-v2(packaged)",
}


@dataclass
class RoleConfig:
    role: str
    backend: str = "embedded"
    model: str = ""
    url: str = ""
    api_key: str = ""
    path: str = ""
    box: str = "grid1000"
    timeout_s: float = 30.0
    retries: int = 2
    max_images: int = 4
    send_identifiers: bool = False  # legacy spelling of deidentify: false
    deidentify: bool = True  # scrub patient identifiers from every request to this endpoint (tools/deid.py)
    scrub_uids: bool = True  # and the studies' UIDs too
    extra: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        if self.backend == "embedded":
            return "embedded"
        return f"{self.backend}:{self.model or self.path}"

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"Model role '{self.role}': unknown backend '{self.backend}' (use one of {BACKENDS}).")
        if self.backend == "openai" and not (self.url and self.model):
            raise ConfigError(f"Model role '{self.role}': the openai backend needs both a url and a model name.")
        if self.backend == "transformers" and not self.path:
            raise ConfigError(f"Model role '{self.role}': the transformers backend needs a local weights folder (path).")
        if self.box not in BOX_CONVENTIONS:
            raise ConfigError(f"Model role '{self.role}': box convention must be one of {BOX_CONVENTIONS}.")


def home() -> Path:
    p = Path(os.environ.get("RADASSIST_HOME", Path.home() / ".radassist"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def _as_bool(role: str, key: str, v: Any) -> bool:
    t = str(v).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"Model role '{role}': {key} must be true or false, not {v!r}.")


def load_config(path: str | Path | None = None) -> dict[str, RoleConfig]:
    raw: dict[str, Any] = {}
    cfg_path = Path(path) if path else Path(os.environ.get("RADASSIST_MODELS", home() / "models.yaml"))
    if cfg_path.exists():
        try:
            raw = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"The model configuration {cfg_path.name} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"The model configuration {cfg_path.name} must map roles to settings.")
    out: dict[str, RoleConfig] = {}
    for role in ROLES:
        vals = dict(raw.get(role) or {})
        for key in ("backend", "model", "url", "api_key", "path", "box", "max_images", "timeout_s", "retries"):
            env = os.environ.get(f"RADASSIST_{role.upper()}_{key.upper()}")
            if env:
                vals[key] = env
        for key, cast in (("max_images", int), ("timeout_s", float), ("retries", int)):
            if key in vals:
                try:
                    vals[key] = cast(vals[key])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"Model role '{role}': {key} must be a number, not {vals[key]!r}.") from exc
        for key in ("deidentify", "scrub_uids", "send_identifiers"):
            env = os.environ.get(f"RADASSIST_{role.upper()}_{key.upper()}")
            if env is not None:
                vals[key] = env
            if key in vals and not isinstance(vals[key], bool):
                vals[key] = _as_bool(role, key, vals[key])
        if vals.get("send_identifiers"):
            vals["deidentify"] = False
        known = {k: v for k, v in vals.items() if k in RoleConfig.__dataclass_fields__ and k != "role"}
        extra = {k: v for k, v in vals.items() if k not in RoleConfig.__dataclass_fields__}
        rc = RoleConfig(role=role, extra=extra, **known)
        rc.validate()
        out[role] = rc
    return out


def backend_summary(cfg: dict[str, RoleConfig]) -> dict[str, str]:
    """What the answer's ``backend`` field says."""
    out = {}
    for role, rc in cfg.items():
        out[role] = f"embedded:{EMBEDDED_NAMES[role]}" if rc.backend == "embedded" else rc.label()
    out["orchestrator"] = "embedded" if cfg["orchestrator"].backend == "embedded" else cfg["orchestrator"].label()
    return out


def embedder() -> Any:
    """The sentence embedder for routing and phrase retrieval (packaged MiniLM)."""
    from models.minilm import get_minilm

    return get_minilm()


def doctor_report(path: str | Path | None = None) -> list[dict[str, Any]]:
    """What each role will use and why: configured servers are probed (GET /health, GET /v1/models)."""
    from models.openai_backend import probe

    cfg = load_config(path)
    rows: list[dict[str, Any]] = []
    for role, rc in cfg.items():
        if rc.backend == "embedded":
            rows.append({"role": role, "uses": f"embedded:{EMBEDDED_NAMES[role]}",
                         "why": "no server configured for this role (default; runs on the CPU, no download)"})
        elif rc.backend == "openai":
            p = probe(rc.url, timeout_s=min(rc.timeout_s, 5.0))
            if p["healthy"] and (rc.model in p["models"] or not p["models"]):
                rows.append({"role": role, "uses": rc.label(), "why": f"server at {rc.url} is up and serves it"})
            elif p["healthy"]:
                rows.append({"role": role, "uses": f"embedded:{EMBEDDED_NAMES[role]}",
                             "why": f"server at {rc.url} is up but does not serve '{rc.model}' "
                                    f"(serves: {', '.join(p['models'])}); falling back"})
            else:
                rows.append({"role": role, "uses": f"embedded:{EMBEDDED_NAMES[role]}",
                             "why": f"server at {rc.url} is not answering ({p.get('error', 'down')}); falling back"})
        else:
            ok = Path(rc.path).is_dir()
            rows.append({"role": role, "uses": rc.label() if ok else f"embedded:{EMBEDDED_NAMES[role]}",
                         "why": "local weights folder found" if ok else f"weights folder {rc.path} missing; "
                                                                         "falling back"})
        if role == "vision":
            row = rows[-1]
            row.update({"box": rc.box, "max_images": rc.max_images, "timeout_s": rc.timeout_s,
                        "healthy": row["uses"] == rc.label() if rc.backend != "embedded" else None})
            row["why"] += "; " + vision_limits(rc)
    return rows


BOX_NAMES = {"grid1000": "0-999 grid (MedRegA-style)", "pixels": "absolute pixels (Qwen2.5-VL-style)",
             "bins100": "100 bins (MAIRA-2-style)"}


def vision_limits(rc: RoleConfig) -> str:
    """The vision role's box convention and limits, in the words doctor prints."""
    if rc.backend == "embedded":
        return ("visual questions (pneumothorax? effusion?) need a served vision-language model; without one they "
                "are answered with what the embedded tools can do instead")
    return (f"boxes: {rc.box} = {BOX_NAMES[rc.box]}; at most {rc.max_images} images per request; "
            f"timeout {rc.timeout_s:g} s, {rc.retries} retries")
