"""Faults injected on request: EC2 errors, latency, and an IMDS that does not answer.

A fault matches one EC2 action (or "*" for all), or the IMDS of one node (or of all nodes). It lasts
for `count` matching requests, or for `duration` seconds, or until cleared, and may add latency.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from .errors import LabError

IMDS = "IMDS"
IMDS_DOWN = "down"
ANY_ACTION = "*"
ACTION_RE = re.compile(r"^[A-Z][A-Za-z0-9]{2,80}$")
MAX_LATENCY = 60.0

# code -> (HTTP status, message), as EC2 sends them
EC2_ERRORS = {
    "RequestLimitExceeded": (503, "Request limit exceeded."),
    "InternalError": (500, "An internal error has occurred."),
    "ServiceUnavailable": (503, "The service is unavailable. Try again later."),
    "Unavailable": (503, "The server is overloaded and can't handle the request."),
    "InsufficientFreeAddressesInSubnet": (
        400, "The specified subnet does not have enough free addresses to satisfy the request."),
    "InsufficientCidrBlocks": (
        400, "The specified subnet does not have enough free cidr blocks to satisfy the request."),
    "UnauthorizedOperation": (403, "You are not authorized to perform this operation."),
}


@dataclass
class Fault:
    action: str
    error: str | None = None
    count: int | None = None       # requests left; None: no count limit
    until: float | None = None     # time.monotonic() deadline; None: no time limit
    latency: float = 0.0
    node: str | None = None        # IMDS faults: one node's IMDS, or all

    @classmethod
    def make(cls, action: str, error: str | None = None, count: int | None = None,
             duration: float | None = None, latency: float = 0.0, node: str | None = None) -> "Fault":
        """Check a fault request; raise LabError naming what is wrong."""
        if action != IMDS and action != ANY_ACTION and not (isinstance(action, str) and ACTION_RE.match(action)):
            raise LabError(f"fault action {action!r}: give an EC2 action name (e.g. AssignPrivateIpAddresses), "
                           f"'{ANY_ACTION}' or '{IMDS}'")
        if action == IMDS:
            if error not in (None, IMDS_DOWN):
                raise LabError(f"fault error {error!r}: the IMDS fault is {IMDS_DOWN!r} (it stops answering)")
            if error is None and not latency:
                error = IMDS_DOWN
        else:
            if node is not None:
                raise LabError("fault node: only IMDS faults are per node")
            if error is not None and error not in EC2_ERRORS:
                raise LabError(f"fault error {error!r}: known EC2 errors are {', '.join(sorted(EC2_ERRORS))}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise LabError(f"fault count {count!r}: must be a positive integer")
        if duration is not None and (not is_number(duration) or duration <= 0):
            raise LabError(f"fault duration {duration!r}: must be positive seconds")
        if not is_number(latency) or not 0 <= latency <= MAX_LATENCY:
            raise LabError(f"fault latency {latency!r}: must be seconds in [0, {MAX_LATENCY:g}]")
        if error is None and not latency:
            raise LabError("fault: give an error, a latency, or both")
        until = time.monotonic() + duration if duration is not None else None
        return cls(action, error, count, until, float(latency), node)

    def matches(self, action: str, node: str | None) -> bool:
        if self.action == IMDS:
            return action == IMDS and self.node in (None, node)
        return action != IMDS and self.action in (ANY_ACTION, action)

    def describe(self) -> dict:
        left = None if self.until is None else max(0.0, self.until - time.monotonic())
        return {"action": self.action, "error": self.error, "count": self.count, "seconds_left": left,
                "latency": self.latency, "node": self.node}


class FaultBook:
    """The active faults; `take` consumes the first one matching a request."""

    def __init__(self):
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, action: str, node: str | None = None) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if f.until is None or f.until > now]
            for fault in self._faults:
                if fault.matches(action, node):
                    if fault.count is not None:
                        fault.count -= 1
                        if fault.count == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def listed(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [f.describe() for f in self._faults if f.until is None or f.until > now]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
