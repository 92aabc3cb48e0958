"""When a node's agent may call EC2 (issue #16 point 3): pure policy, an injected clock and RNG.

EC2 throttles per account and Region with a token bucket per API, shared by every node of a cluster,
so a node's steady state must cost EC2 nothing. IMDS is free and per node: the agent compares it with
the store every round and reads EC2's view (DescribeNetworkInterfaces) only
- at start (REASON_START), before it knows anything;
- after an EC2 action of its own (REASON_ACTION): what the action did, once;
- when IMDS and the store disagree for longer than IMDS_GRACE (REASON_DISAGREE): IMDS lags EC2 by
  seconds after a change (upstream #1872), so a fresh disagreement is waited out, not chased;
- on a long interval with jitter (REASON_INTERVAL), so that 1,000 nodes started together spread out.
Throttling (or 5xx, or no answer) backs off all of the node's EC2 use, reads and actions alike: the
pause doubles from BACKOFF_BASE to BACKOFF_MAX with equal jitter and is dropped at the first success.

Upstream (aws/amazon-vpc-cni-k8s pkg/ipamd/ipamd.go) reconciles from IMDS every
nodeIPPoolReconcileInterval (60 s) and calls EC2 when IMDS and its datastore disagree
(eniIPPoolReconcile's needEC2Reconcile); this policy adds the grace for IMDS's lag and the interval.
"""

from __future__ import annotations

import random
from typing import Callable, Mapping

REASON_START = "start"
REASON_ACTION = "after-action"
REASON_DISAGREE = "imds-disagrees"
REASON_INTERVAL = "interval"

EC2_READ_INTERVAL = 3600.0  # s: the longest a node goes without reading EC2's view
INTERVAL_JITTER = 0.2       # each interval is drawn in [1 - j, 1 + j] times EC2_READ_INTERVAL
IMDS_GRACE = 30.0           # s: a disagreement younger than this is IMDS catching up
BACKOFF_BASE = 1.0          # s: the first pause after EC2 throttled
BACKOFF_MAX = 16.0          # s: the longest pause; a throttled node then probes EC2 every 8-16 s


class EC2Budget:
    """One node's permission to call EC2. The agent asks `read_due()` each round, calls `may_act()`
    before any EC2 action, and reports what happened: `compared`, `acted`, `read`, `throttled`,
    `succeeded`."""

    def __init__(self, clock: Callable[[], float], rng: random.Random, *, interval: float = EC2_READ_INTERVAL,
                 jitter: float = INTERVAL_JITTER, imds_grace: float = IMDS_GRACE,
                 backoff_base: float = BACKOFF_BASE, backoff_max: float = BACKOFF_MAX):
        if interval <= 0 or not 0 <= jitter < 1 or imds_grace < 0 or not 0 < backoff_base <= backoff_max:
            raise ValueError("EC2Budget needs interval > 0, 0 <= jitter < 1, imds_grace >= 0, "
                             "0 < backoff_base <= backoff_max")
        self._clock, self._rng = clock, rng
        self.interval, self.jitter, self.imds_grace = interval, jitter, imds_grace
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self._next_read: float | None = None  # None: never read (start)
        self._action_unread = False
        self._disagree_since: float | None = None
        self._delay = 0.0                     # the current backoff delay (0: none)
        self._backoff_until = 0.0

    # --- questions ----------------------------------------------------------------------------
    def backoff_left(self) -> float:
        return max(0.0, self._backoff_until - self._clock())

    def may_act(self) -> bool:
        """False while the node backs off from a throttling EC2."""
        return self.backoff_left() == 0.0

    def read_due(self) -> str | None:
        """Why EC2's view must be read now, or None (IMDS is enough, or the node is backing off)."""
        if not self.may_act():
            return None
        now = self._clock()
        if self._next_read is None:
            return REASON_START
        if self._action_unread:
            return REASON_ACTION
        if self._disagree_since is not None and now - self._disagree_since >= self.imds_grace:
            return REASON_DISAGREE
        if now >= self._next_read:
            return REASON_INTERVAL
        return None

    # --- reports ------------------------------------------------------------------------------
    def compared(self, agrees: bool) -> None:
        """IMDS and the store were compared: a disagreement is timed from its first sight."""
        if agrees:
            self._disagree_since = None
        elif self._disagree_since is None:
            self._disagree_since = self._clock()

    def acted(self) -> None:
        """An EC2 action of ours ran (or may have): read EC2's view next."""
        self._action_unread = True

    def read(self) -> None:
        """EC2's view was read and merged: the store is EC2's, until the next jittered interval."""
        self._action_unread = False
        self._disagree_since = None
        self._next_read = self._clock() + self.interval * self._rng.uniform(1 - self.jitter, 1 + self.jitter)

    def throttled(self) -> None:
        """EC2 throttled (or failed with 5xx, or did not answer) after the client's retries."""
        self._delay = min(self.backoff_max, 2 * self._delay) if self._delay else self.backoff_base
        self._backoff_until = self._clock() + self._delay / 2 + self._rng.uniform(0, self._delay / 2)

    def succeeded(self) -> None:
        """An EC2 call succeeded: the backoff is over."""
        self._delay = 0.0
        self._backoff_until = 0.0

    # --- the backoff as the store keeps it (the plugins' slow path and a restarted agent share it) --
    def backoff_state(self) -> dict | None:
        """{"delay", "until"} while a backoff is on, else None."""
        return {"delay": self._delay, "until": self._backoff_until} if self._delay else None

    def restore_backoff(self, state: dict | None) -> None:
        """Take up a backoff another process (or this one, earlier) recorded with `backoff_state`."""
        self._delay = float((state or {}).get("delay") or 0.0)
        self._backoff_until = float((state or {}).get("until") or 0.0) if self._delay else 0.0


def disagreements(store: Mapping[str, set[str] | frozenset[str]],
                  imds: Mapping[str, set[str] | frozenset[str]]) -> list[str]:
    """ENI IDs on which the store and IMDS differ (secondary IPs by ENI; an ENI only one side lists
    counts), sorted."""
    return sorted(eni for eni in set(store) | set(imds)
                  if eni not in store or eni not in imds or set(store[eni]) != set(imds[eni]))
