"""EC2 snapshots over time: the live one for the front and the data plane, older ones for a stale IMDS.

Every mutating call through the front marks the cache dirty before its answer leaves, naming the ENIs
it can have changed (or none named: anything may have changed), so `live()` never returns a state
older than the last answered mutation. moto renders each answer in full, which costs seconds with a
thousand instances: after a change that names its ENIs, only those are read again.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from .ec2model import Snapshot

KEEP_EXTRA = 10.0  # seconds of history kept beyond the IMDS staleness

# read(previous, enis): the whole state when `enis` is None, else `previous` with only `enis` read again
Reader = Callable[[Snapshot | None, frozenset[str] | None], Snapshot]


def fetch(client, previous: Snapshot | None = None, enis: frozenset[str] | None = None) -> Snapshot:
    """Read the VPC state from moto with a botocore EC2 client: all of it, or (with `previous` and
    `enis`) those ENIs only."""
    taken_at = time.time()
    if previous is not None and enis is not None:
        found = client.describe_network_interfaces(
            Filters=[{"Name": "network-interface-id", "Values": sorted(enis)}])["NetworkInterfaces"] if enis else []
        return previous.with_enis_read(taken_at, enis, found)
    return Snapshot.from_describe(
        taken_at,
        client.describe_vpcs()["Vpcs"],
        client.describe_subnets()["Subnets"],
        client.describe_instances()["Reservations"],
        client.describe_network_interfaces()["NetworkInterfaces"],
    )


class StateCache:
    def __init__(self, read: Reader, staleness: float = 0.0):
        self._read = read
        self.staleness = staleness
        self._history: list[tuple[int, Snapshot]] = []  # (mutation generation at read, snapshot)
        self._generation = 0
        self._changed: set[str] | None = None  # ENIs changed since the newest snapshot; None: anything
        self._lock = threading.Lock()        # guards _history, _generation and _changed
        self._read_lock = threading.Lock()   # one read of moto at a time

    def mark_dirty(self, enis: Iterable[str] | None = None) -> None:
        """A change happened: to the ENIs `enis` only, or (None) to anything."""
        with self._lock:
            self._generation += 1
            if enis is None:
                self._changed = None
            elif self._changed is not None:
                self._changed.update(enis)

    def refresh(self) -> Snapshot:
        """Read the whole state again."""
        return self._update(everything=True)

    def live(self) -> Snapshot:
        """The newest snapshot, brought up to date if a mutation happened since it was taken."""
        with self._lock:
            if self._history and self._history[-1][0] == self._generation:
                return self._history[-1][1]
        return self._update(everything=False)

    def _update(self, everything: bool) -> Snapshot:
        with self._read_lock:
            with self._lock:
                if not everything and self._history and self._history[-1][0] == self._generation:
                    return self._history[-1][1]  # read by another caller while this one waited
                generation, changed = self._generation, None if everything else self._changed
                previous = self._history[-1][1] if self._history else None
                self._changed = set()
            try:
                snap = self._read(previous, None if changed is None else frozenset(changed))
            except BaseException:
                self.mark_dirty(changed)  # what was not read stays to be read
                raise
            with self._lock:
                self._history.append((generation, snap))
                self._prune(snap.taken_at)
            return snap

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
