"""How long EC2 takes to answer each action, when the lab models it (off by default, so the tests and
the demo run at the speed of moto; the cluster-scale scenarios turn it on).

The defaults are near what EC2 shows, from upstream's logs and notes (aws/amazon-vpc-cni-k8s):
issue #1872 logs CreateNetworkInterface, AttachNetworkInterface and AssignPrivateIpAddresses done
within 1.8 s, then the ENI missing from IMDS for a while longer; PR #648 measures assigning a node's
first IPs at 400-600 ms. EC2 answers an attach (or detach) at once and completes it in the background;
the lab applies a change when it answers, so it folds the completion into the answer: an attach takes
seconds, not milliseconds. An action's latency is spent before the lab makes the change, outside the
lock that orders changes, so concurrent callers wait side by side as they would on EC2.
"""

from __future__ import annotations

import threading

from .errors import LabError
from .faults import is_number
from .throttling import NON_MUTATING, check_time_scale

DEFAULT_SECONDS = {
    "AttachNetworkInterface": 2.0,
    "DetachNetworkInterface": 2.0,
    "CreateNetworkInterface": 0.5,
    "AssignPrivateIpAddresses": 0.5,
    "UnassignPrivateIpAddresses": 0.3,
    "DeleteNetworkInterface": 0.3,
    "ModifyNetworkInterfaceAttribute": 0.3,
    "CreateTags": 0.2,
}
NON_MUTATING_SECONDS = 0.15  # Describe*, List*, Search*, Get*
OTHER_SECONDS = 0.3
MAX_SECONDS = 60.0


class Latency:
    def __init__(self, enabled: bool = False):
        self._lock = threading.Lock()
        self.configure(enabled)

    def configure(self, enabled: bool, seconds: dict | None = None, time_scale: float = 1.0) -> None:
        """`seconds` maps actions to their latency in simulated seconds, replacing the defaults for them;
        the wall-clock delay is that over `time_scale`."""
        checked = _check_seconds(seconds or {})
        check_time_scale(time_scale)
        with self._lock:
            self.enabled = bool(enabled)
            self.seconds = checked
            self.time_scale = float(time_scale)

    def delay(self, action: str) -> float:
        """Wall-clock seconds to hold a request of `action` (0 when the model is off)."""
        with self._lock:
            if not self.enabled:
                return 0.0
            return self.of(action) / self.time_scale

    def of(self, action: str) -> float:
        """Simulated seconds `action` takes."""
        if action in self.seconds:
            return self.seconds[action]
        if action in DEFAULT_SECONDS:
            return DEFAULT_SECONDS[action]
        return NON_MUTATING_SECONDS if action.startswith(NON_MUTATING) else OTHER_SECONDS

    def describe(self) -> dict:
        with self._lock:
            return {"enabled": self.enabled, "time_scale": self.time_scale,
                    "seconds": {**DEFAULT_SECONDS, **self.seconds}, "non_mutating_seconds": NON_MUTATING_SECONDS,
                    "other_seconds": OTHER_SECONDS}


def _check_seconds(seconds) -> dict[str, float]:
    if not isinstance(seconds, dict):
        raise LabError(f"latency seconds {seconds!r}: give {{action: seconds}}")
    for action, value in seconds.items():
        if not isinstance(action, str) or not is_number(value) or not 0 <= value <= MAX_SECONDS:
            raise LabError(f"latency for {action!r}: {value!r} must be seconds in [0, {MAX_SECONDS:g}]")
    return {a: float(v) for a, v in seconds.items()}
