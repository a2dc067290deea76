"""Fair queuing for turns: a bounded number run at once, the others wait in arrival order (FIFO).

One :class:`FairGate` per engine: the web app's users share it, so a burst from one clinician cannot
starve another (a turn is admitted only when it is first in line and a slot is free). The number of
slots comes from ``RADASSIST_WORKERS`` (default: the CPU count, at most 4).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tools.cache import positive_env


def default_slots() -> int:
    n = positive_env("RADASSIST_WORKERS", int)
    return n if n is not None else max(1, min(4, os.cpu_count() or 1))


class FairGate:
    """A FIFO semaphore: ``with gate.slot(): ...`` runs when this caller is first in line and a slot is free."""

    def __init__(self, slots: int | None = None) -> None:
        self.slots = default_slots() if slots is None else max(1, int(slots))
        self._cv = threading.Condition()
        self._line: deque[object] = deque()
        self._active = 0
        self.admitted = 0
        self.peak_active = 0
        self.peak_waiting = 0

    @property
    def waiting(self) -> int:
        with self._cv:
            return len(self._line)

    @property
    def active(self) -> int:
        with self._cv:
            return self._active

    @contextmanager
    def slot(self, on_wait: Callable[[int], None] | None = None) -> Iterator[int]:
        """Yields this caller's admission number; ``on_wait(position)`` is called once if it must queue."""
        me = object()
        with self._cv:
            self._line.append(me)
            self.peak_waiting = max(self.peak_waiting, len(self._line))
            if on_wait is not None and (self._active >= self.slots or self._line[0] is not me):
                on_wait(len(self._line))
            while self._line[0] is not me or self._active >= self.slots:
                self._cv.wait()
            self._line.popleft()
            self._active += 1
            self.peak_active = max(self.peak_active, self._active)
            ticket = self.admitted
            self.admitted += 1
            self._cv.notify_all()  # the next in line may take another free slot
        try:
            yield ticket
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()
