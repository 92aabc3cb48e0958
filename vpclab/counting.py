"""Exact, thread-safe request counts, read and optionally reset in one step."""

from __future__ import annotations

import threading
from collections import Counter


class CallCounter:
    def __init__(self):
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def read(self, reset: bool = False) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
            if reset:
                self._counts.clear()
        return counts
