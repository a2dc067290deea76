"""The audit log: who asked what about which study, which tools and models answered, and the evidence.

Append-only JSON lines in ``<RADASSIST_HOME>/audit.jsonl``, one per turn, written by the engine after
the answer. No identifier is written in clear:

- studies are named by a pseudonymous key, HMAC-SHA256 of the StudyInstanceUID under a per-install
  secret (``<RADASSIST_HOME>/audit.key``, created once, mode 0600), so the same study always has the
  same key on this install and the key cannot be reversed or recomputed elsewhere;
- the question is stored scrubbed of every identifier the process knows (:func:`tools.deid.scrub_text`);
- evidence files are listed by their path relative to the home folder and their SHA-256.

Each line carries ``prev``, the SHA-256 of the line before it, so a removed or edited line breaks the
chain (:meth:`AuditLog.verify`). Writers in several processes append under an exclusive file lock.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tools.deid import scrub_text

log = logging.getLogger(__name__)

GENESIS = "0" * 64


def _sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class AuditLog:
    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.path = self.home / "audit.jsonl"
        self.key_path = self.home / "audit.key"
        self._secret: bytes | None = None

    # -- pseudonyms ----------------------------------------------------------------------------
    def _key(self) -> bytes:
        if self._secret is None:
            self.home.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._secret = self.key_path.read_bytes()
            else:
                secret = secrets.token_bytes(32)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(secret)
                    fh.flush()
                    os.fsync(fh.fileno())
                self._secret = secret
            if len(self._secret) < 16:
                from tools.errors import ConfigError

                raise ConfigError(f"The audit key {self.key_path} is damaged (too short); restore it from backup.")
        return self._secret

    def study_key(self, study_uid: str | None) -> str | None:
        """The pseudonymous key of a study on this install (None for none)."""
        if not study_uid:
            return None
        return "S-" + hmac.new(self._key(), study_uid.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    # -- writing -------------------------------------------------------------------------------
    def record_turn(self, *, user: str | None, thread_id: str, turn: int, question: str,
                    study_uid: str | None, prior_uid: str | None, tools: Iterable[str], models: dict[str, str],
                    evidence: Iterable[str], reliability: str | None = None, answer: str = "",
                    n_findings: int = 0) -> dict[str, Any]:
        ev = []
        for p in evidence:
            path = Path(p)
            try:
                rel = str(path.resolve().relative_to(self.home.resolve()))
            except ValueError:
                rel = path.name
            ev.append({"path": scrub_text(rel), "sha256": _sha256_file(path)})
        entry: dict[str, Any] = {
            "ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "user": user or default_user(),
            "thread": thread_id,
            "turn": int(turn),
            "question": scrub_text(question),
            "study": self.study_key(study_uid),
            "prior": self.study_key(prior_uid),
            "tools": list(tools),
            "models": {k: scrub_text(str(v)) for k, v in (models or {}).items()},
            "evidence": ev,
            "reliability": reliability,
            "n_findings": int(n_findings),
            "answer_sha256": hashlib.sha256(answer.encode("utf-8")).hexdigest(),
        }
        self._append(entry)
        return entry

    def _append(self, entry: dict[str, Any]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                entry["prev"] = self._last_hash(fh)
                line = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
                fh.seek(0, os.SEEK_END)
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _last_hash(fh: Any) -> str:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return GENESIS
        back = min(size, 1 << 16)
        while True:
            fh.seek(size - back)
            tail = fh.read(back)
            lines = tail.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or back == size:
                return hashlib.sha256(lines[-1]).hexdigest()
            back = min(size, back * 4)

    # -- reading -------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def verify(self) -> bool:
        """True when every line's ``prev`` is the hash of the line before it (nothing removed or edited)."""
        if not self.path.exists():
            return True
        prev = GENESIS
        for raw in self.path.read_bytes().splitlines():
            if not raw.strip():
                continue
            if json.loads(raw).get("prev") != prev:
                return False
            prev = hashlib.sha256(raw).hexdigest()
        return True
