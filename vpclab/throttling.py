"""EC2's request throttling: a token bucket per API action, shared by every node of a lab (EC2 throttles
per account and Region, and a lab is one account in one Region).

The figures are AWS's, "Request throttling for the Amazon EC2 API"
(https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html), table "Request token bucket
sizes and refill rates": each API action has its own bucket, sized by its category, and each request
takes one token; a request that finds less than one token fails with RequestLimitExceeded (HTTP 503,
"Request limit exceeded."), and requests of other actions are not affected.

    category                                         bucket   refill/s
    non-mutating (Describe*, List*, Search*, Get*)      100         20
    unfiltered and unpaginated non-mutating              50         10   (own bucket; UNFILTERED)
    mutating (everything else)                           50          5
    resource-intensive (RESOURCE_INTENSIVE)              50          5
    uncategorized actions with their own figures     UNCATEGORIZED below

"Unfiltered and unpaginated": one of UNFILTERED called with no Filter.N and no MaxResults/NextToken
(IDs are not a filter: a DescribeNetworkInterfaces naming ENI ids draws from the small bucket). The
console's own bucket is not modelled (nothing here is the console), nor are the resource token buckets
of RunInstances & co. (the lab makes its instances itself). Refill is continuous (`rate` tokens per
second, fractions kept), which the docs' "a set number of tokens is added back every second" rounds.

Time can run faster than the wall clock (`time_scale` simulated seconds per second) for compressed-time
simulations: buckets refill `time_scale` times faster.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .errors import LabError
from .faults import is_number

NON_MUTATING = ("Describe", "List", "Search", "Get")
NON_MUTATING_BUCKET = (100, 20)
UNFILTERED_BUCKET = (50, 10)
MUTATING_BUCKET = (50, 5)
RESOURCE_INTENSIVE_BUCKET = (50, 5)
UNFILTERED = frozenset({"DescribeInstances", "DescribeInstanceStatus", "DescribeNetworkInterfaces",
                        "DescribeSecurityGroups", "DescribeSnapshots", "DescribeSpotInstanceRequests",
                        "DescribeVolumes"})
RESOURCE_INTENSIVE = frozenset({"AcceptVpcPeeringConnection", "AuthorizeSecurityGroupIngress",
                                "CancelSpotInstanceRequests", "CreateKeyPair", "CreateVpcPeeringConnection",
                                "DeleteVpcPeeringConnection", "RejectVpcPeeringConnection",
                                "RevokeSecurityGroupIngress", "RequestSpotInstances"})
# The uncategorized actions of the docs' table that concern ENIs, addresses, tags and instances (the
# table lists some 100 more, for services the lab does not stand in for)
UNCATEGORIZED = {
    "AssignIpv6Addresses": (100, 5),
    "AssignPrivateIpAddresses": (100, 5),
    "AssociateIamInstanceProfile": (100, 5),
    "CreateNetworkInterface": (100, 5),
    "CreateSubnetCidrReservation": (5, 1),
    "CreateTags": (100, 10),
    "DeleteNetworkInterface": (100, 5),
    "DeleteSubnetCidrReservation": (5, 1),
    "DeleteTags": (100, 10),
    "ModifyInstanceMetadataOptions": (100, 5),
    "ModifyNetworkInterfaceAttribute": (100, 5),
    "RunInstances": (5, 2),
    "StartInstances": (5, 2),
    "TerminateInstances": (100, 5),
    "UnassignPrivateIpAddresses": (100, 5),
}
UNFILTERED_SUFFIX = " (unfiltered)"
PAGINATION = ("MaxResults", "NextToken")
MAX_TIME_SCALE = 10_000.0
EXCEEDED = (503, "RequestLimitExceeded", "Request limit exceeded.")


class TokenBucket:
    """`capacity` tokens at most, `rate` added per second of `clock` (a monotonic seconds function)."""

    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]):
        self.capacity = capacity
        self.rate = rate
        self._clock = clock
        self._tokens = float(capacity)
        self._at = clock()

    def tokens(self) -> float:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self) -> bool:
        """Spend one token; False (and nothing spent) when less than one is left."""
        if self.tokens() < 1:
            return False
        self._tokens -= 1
        return True


def bucket_key(action: str, params: dict[str, str]) -> str:
    """The bucket a request draws from: its action's, or for an unfiltered and unpaginated call of
    one of UNFILTERED, that action's small bucket."""
    if action in UNFILTERED and not any(k.startswith("Filter.") or k in PAGINATION for k in params):
        return action + UNFILTERED_SUFFIX
    return action


def bucket_figures(key: str) -> tuple[float, float]:
    """(capacity, refill per second) of a bucket, from the docs' table."""
    if key.endswith(UNFILTERED_SUFFIX):
        return UNFILTERED_BUCKET
    if key in UNCATEGORIZED:
        return UNCATEGORIZED[key]
    if key in RESOURCE_INTENSIVE:
        return RESOURCE_INTENSIVE_BUCKET
    return NON_MUTATING_BUCKET if key.startswith(NON_MUTATING) else MUTATING_BUCKET


class Throttling:
    """The lab's buckets, made on first use of each, with per-bucket counts of tokens spent and requests
    throttled. Disabled, every request passes and nothing is counted."""

    def __init__(self, enabled: bool = False, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._wall = clock
        self.configure(enabled)

    def configure(self, enabled: bool, figures: dict | None = None, time_scale: float = 1.0) -> None:
        """Start over with full buckets and zero counts. `figures` maps an action (or an action +
        UNFILTERED_SUFFIX) to [capacity, refill per second], replacing the docs' figures for it."""
        checked = check_figures(figures or {})
        check_time_scale(time_scale)
        wall, start = self._wall, self._wall()
        with self._lock:
            self.enabled = bool(enabled)
            self.time_scale = float(time_scale)
            self.figures = checked
            self._clock = lambda: start + (wall() - start) * time_scale
            self._buckets: dict[str, TokenBucket] = {}
            self._spent: dict[str, int] = {}
            self._throttled: dict[str, int] = {}

    def admit(self, action: str, params: dict[str, str]) -> bool:
        """Take a token for one request; False: throttled."""
        if not self.enabled:
            return True
        key = bucket_key(action, params)
        with self._lock:
            bucket = self._bucket(key)
            taken = bucket.take()
            counts = self._spent if taken else self._throttled
            counts[key] = counts.get(key, 0) + 1
        return taken

    def report(self, reset: bool = False) -> dict:
        """Settings, and per bucket used: tokens spent, requests throttled, tokens left, its figures.
        With reset, the counts start again from zero (the buckets keep their tokens)."""
        with self._lock:
            buckets = {key: {"spent": self._spent.get(key, 0), "throttled": self._throttled.get(key, 0),
                             "tokens": round(self._bucket(key).tokens(), 3), "capacity": self._bucket(key).capacity,
                             "refill_per_second": self._bucket(key).rate}
                       for key in sorted(set(self._spent) | set(self._throttled))}
            if reset:
                self._spent.clear()
                self._throttled.clear()
            return {"enabled": self.enabled, "time_scale": self.time_scale, "figures": dict(self.figures),
                    "buckets": buckets}

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            capacity, rate = self.figures.get(key) or bucket_figures(key)
            bucket = self._buckets[key] = TokenBucket(capacity, rate, self._clock)
        return bucket


def check_figures(figures) -> dict[str, tuple[float, float]]:
    if not isinstance(figures, dict):
        raise LabError(f"throttling figures {figures!r}: give {{action: [capacity, refill per second]}}")
    checked = {}
    for key, value in figures.items():
        ok = isinstance(key, str) and isinstance(value, (list, tuple)) and len(value) == 2 and all(
            is_number(v) for v in value)
        if not ok or value[0] < 1 or value[1] <= 0:
            raise LabError(f"throttling figures for {key!r}: {value!r} must be [capacity >= 1, refill per second > 0]")
        checked[key] = (float(value[0]), float(value[1]))
    return checked


def check_time_scale(time_scale) -> None:
    if not is_number(time_scale) or not 0 < time_scale <= MAX_TIME_SCALE:
        raise LabError(f"time_scale {time_scale!r}: must be simulated seconds per second in (0, {MAX_TIME_SCALE:g}]")

