"""EC2 snapshots over time: the live one for the front and the data plane, older ones for a stale IMDS.

Every mutating call through the front marks the cache dirty before its answer leaves, so `live()`
never returns a state older than the last answered mutation.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .ec2model import Snapshot

KEEP_EXTRA = 10.0  # seconds of history kept beyond the IMDS staleness


def fetch(client) -> Snapshot:
    """Read the whole VPC state from moto with a botocore EC2 client."""
    taken_at = time.time()
    return Snapshot.from_describe(
        taken_at,
        client.describe_vpcs()["Vpcs"],
        client.describe_subnets()["Subnets"],
        client.describe_instances()["Reservations"],
        client.describe_network_interfaces()["NetworkInterfaces"],
    )


class StateCache:
    def __init__(self, read: Callable[[], Snapshot], staleness: float = 0.0):
        self._read = read
        self.staleness = staleness
        self._history: list[tuple[int, Snapshot]] = []  # (mutation generation at read, snapshot)
        self._generation = 0
        self._lock = threading.Lock()        # guards _history and _generation
        self._read_lock = threading.Lock()   # one read of moto at a time

    def mark_dirty(self) -> None:
        with self._lock:
            self._generation += 1

    def refresh(self) -> Snapshot:
        with self._read_lock:
            with self._lock:
                generation = self._generation
            snap = self._read()
            with self._lock:
                self._history.append((generation, snap))
                self._prune(snap.taken_at)
            return snap

    def live(self) -> Snapshot:
        """The newest snapshot, read again if a mutation happened since it was taken."""
        with self._lock:
            if self._history and self._history[-1][0] == self._generation:
                return self._history[-1][1]
        return self.refresh()

    def for_imds(self) -> Snapshot:
        """EC2 state as of `staleness` seconds ago (the oldest kept one if the lab is younger)."""
        if self.staleness <= 0:
            return self.live()
        cutoff = time.time() - self.staleness
        with self._lock:
            older = [snap for _, snap in self._history if snap.taken_at <= cutoff]
            if older:
                return older[-1]
            if self._history:
                return self._history[0][1]
        return self.refresh()

    def _prune(self, now: float) -> None:
        """Drop snapshots no IMDS answer can need, keeping the newest one older than the horizon."""
        horizon = now - self.staleness - KEEP_EXTRA
        while len(self._history) > 1 and self._history[1][1].taken_at <= horizon:
            self._history.pop(0)
