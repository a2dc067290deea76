"""Heavy results (volumes, masks, analyses) live here, keyed by study/series UID, not in graph state.

A thread-safe LRU with a byte cap and a lock per key, so that two tool agents fanned out in
parallel that need the same analysis compute it once.
"""
from __future__ import annotations

import logging
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


class AnalysisCache:
    def __init__(self, max_bytes: int = 3 * 1024**3) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

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
                del self._data[key]
            self._data[key] = (value, size)
            total = sum(s for _, s in self._data.values())
            while total > self.max_bytes and len(self._data) > 1:
                old, (_, s) = self._data.popitem(last=False)
                total -= s
                log.debug("cache evicted %s (%d bytes)", old, s)

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

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s for _, s in self._data.values())


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
