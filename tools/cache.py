"""Heavy results (volumes, masks, analyses) live here, keyed by study/series UID, not in graph state.

A thread-safe LRU with a byte cap and a lock per key, so that two tool agents fanned out in
parallel that need the same analysis compute it once. The cap comes from ``RADASSIST_CACHE_MB``
(default: a quarter of the machine's memory, at most 3 GiB); least-recently-used volumes and analyses
are evicted past it (the newest entry is always kept, so the bound is max(cap, largest entry)).
``stats()`` reports hits, misses, evictions and the peak bytes held.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")


def _nbytes(obj: Any, _depth: int = 0) -> int:
    if _depth > 4:
        return 0
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v, _depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v, _depth + 1) for v in obj[:1000])
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(v, _depth + 1) for v in vars(obj).values())
    return 64


def positive_env(name: str, cast: Callable[[str], T]) -> T | None:
    """A positive number from the environment (None when unset); ConfigError when it is not one."""
    env = os.environ.get(name)
    if not env:
        return None
    from tools.errors import ConfigError

    try:
        val = cast(env)
    except ValueError:
        raise ConfigError(f"{name} must be a positive number, not {env!r}.") from None
    if not val > 0:  # type: ignore[operator]
        raise ConfigError(f"{name} must be a positive number, not {env!r}.")
    return val


def default_max_bytes() -> int:
    """``RADASSIST_CACHE_MB`` in bytes; else a quarter of physical memory, at most 3 GiB."""
    mb = positive_env("RADASSIST_CACHE_MB", float)
    if mb is not None:
        return int(mb * 1024**2)
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 12 * 1024**3
    return int(min(3 * 1024**3, phys // 4))


class AnalysisCache:
    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._total = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.evicted_bytes = 0
        self.peak_bytes = 0

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            lk = self._key_locks.get(key)
            if lk is None:
                lk = self._key_locks[key] = threading.Lock()
            return lk

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            self._data.move_to_end(key)
            return item[0]

    def put(self, key: str, value: Any) -> None:
        size = _nbytes(value)
        with self._lock:
            if key in self._data:
                self._total -= self._data.pop(key)[1]
            self._data[key] = (value, size)
            self._total += size
            while self._total > self.max_bytes and len(self._data) > 1:
                old, (_, s) = self._data.popitem(last=False)
                self._total -= s
                self.evictions += 1
                self.evicted_bytes += s
                self._key_locks.pop(old, None)
                log.debug("cache evicted %s (%d bytes)", old.split(":", 1)[0], s)
            self.peak_bytes = max(self.peak_bytes, self._total)

    def get_or_compute(self, key: str, fn: Callable[[], T]) -> T:
        v = self.get(key)
        if v is not None:
            self.hits += 1
            return v
        with self._key_lock(key):
            v = self.get(key)
            if v is not None:
                self.hits += 1
                return v
            self.misses += 1
            v = fn()
            self.put(key, v)
            return v

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._total = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._total

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"max_bytes": self.max_bytes, "bytes": self._total, "peak_bytes": self.peak_bytes,
                    "entries": len(self._data), "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions, "evicted_bytes": self.evicted_bytes}

    def reset_stats(self) -> None:
        with self._lock:
            self.hits = self.misses = self.evictions = self.evicted_bytes = 0
            self.peak_bytes = self._total


CACHE = AnalysisCache()


def cached_study(path: str) -> "Study":  # noqa: F821 - imported lazily to keep this module light
    """Load a study once per process (keyed by path and modification time) and keep it in the cache."""
    import os

    from tools.dicom_io import load_study

    try:
        stamp = max((os.stat(os.path.join(d, f)).st_mtime for d, _, fs in os.walk(path) for f in fs),
                    default=os.stat(path).st_mtime) if os.path.isdir(path) else os.stat(path).st_mtime
    except OSError:
        stamp = 0.0
    return CACHE.get_or_compute(f"study:{path}:{stamp}", lambda: load_study(path))
