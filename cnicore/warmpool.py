"""Warm-pool decisions: pure functions of the pool's state, the settings and the clock; no I/O.

Upstream ipamd's semantics (ARCHITECTURE §3). Counts are secondary IPs (an ENI's primary address
never serves a pod). `available = total - assigned`: an IP in cool-down counts as available but
cannot be handed out (`free` excludes it).

- IP targets (WARM_IP_TARGET or MINIMUM_IP_TARGET set and non-zero; 0 means unset, as upstream):
  short = max(WARM_IP_TARGET - available, 0), then max(short, MINIMUM_IP_TARGET - total);
  over = max(available - WARM_IP_TARGET, 0), then max(min(over, total - MINIMUM_IP_TARGET), 0).
  Grow by exactly `short`; give back `over` free IPs, at most every IP_RELEASE_INTERVAL.
- Otherwise WARM_ENI_TARGET (W): too low when available < W * ips_per_eni (with W = 0: when
  nothing is available); grow by whole ENIs' worth; free an ENI when
  available >= (W + 1) * ips_per_eni. Single IPs are not given back in this mode.
- Grow by filling existing ENIs first (lowest device index first), then new ENIs, never beyond
  the instance type's limits or MAX_ENI; not at all for GROWTH_PAUSE after EC2 said the subnet
  is out of addresses.
- An ENI may be freed only if this CNI created it, it is not the primary, is ENI_MIN_AGE old, holds no pod and no IP
  in cool-down, and (with IP targets) the other ENIs still meet both targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from cnicore.instance_limits import InstanceLimits

GROWTH_PAUSE = 120.0        # s without growing after InsufficientFreeAddressesInSubnet/InsufficientCidrBlocks
IP_RELEASE_INTERVAL = 30.0  # s between two give-backs of single IPs
ENI_MIN_AGE = 60.0          # s an ENI stays attached before it may be freed

MODE_IP_TARGET = "ip-target"
MODE_ENI_TARGET = "eni-target"


@dataclass(frozen=True)
class PoolSettings:
    """The pool's settings, already parsed (cnicore.settings validates what users write)."""

    warm_ip_target: int | None = None
    minimum_ip_target: int | None = None
    warm_eni_target: int = 1
    max_eni: int | None = None

    def __post_init__(self):
        for name, value, floor, optional in (("WARM_IP_TARGET", self.warm_ip_target, 0, True),
                                             ("MINIMUM_IP_TARGET", self.minimum_ip_target, 0, True),
                                             ("WARM_ENI_TARGET", self.warm_eni_target, 0, False),
                                             ("MAX_ENI", self.max_eni, 1, True)):
            if value is None and optional:
                continue
            if type(value) is not int or value < floor:
                raise ValueError(f"{name} must be an integer >= {floor}, got {value!r}")

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> "PoolSettings":
        """From `cnicore.settings.from_env` / `from_conf` output (keyed by upstream name)."""
        return cls(warm_ip_target=values.get("WARM_IP_TARGET"), minimum_ip_target=values.get("MINIMUM_IP_TARGET"),
                   warm_eni_target=values.get("WARM_ENI_TARGET", 1), max_eni=values.get("MAX_ENI"))

    @property
    def mode(self) -> str:
        return MODE_IP_TARGET if self.warm_ip_target or self.minimum_ip_target else MODE_ENI_TARGET


@dataclass(frozen=True)
class ENIState:
    """One attached ENI as the pool sees it (a row of `cnicore.pool.Pool.eni_stats()`); IP
    counts exclude the ENI's primary address. The primary ENI is the one at device index 0."""

    eni_id: str
    device_index: int
    total: int
    assigned: int = 0
    cooling: int = 0         # released IPs still in cool-down (not assigned)
    attached_at: float = 0.0  # when the node started using the ENI (clock seconds)
    ours: bool = True         # created by this CNI: only such an ENI may be freed

    def __post_init__(self):
        if not (self.device_index >= 0 and self.total >= 0 and 0 <= self.assigned <= self.total
                and 0 <= self.cooling <= self.total - self.assigned):
            raise ValueError(f"inconsistent ENI state {self}: need device_index >= 0 and "
                             "0 <= assigned, 0 <= cooling, assigned + cooling <= total")

    @classmethod
    def from_stats(cls, row: Mapping[str, Any]) -> "ENIState":
        return cls(row["eni_id"], row["device_number"], row["total"], row["assigned"], row["cooling"],
                   row["attached_at"], row.get("ours", True))

    @property
    def primary(self) -> bool:
        return self.device_index == 0

    @property
    def available(self) -> int:
        return self.total - self.assigned

    @property
    def free(self) -> int:
        """IPs that can be handed out (or given back) now."""
        return self.total - self.assigned - self.cooling


@dataclass(frozen=True)
class AssignIPs:
    """AssignPrivateIpAddresses of `count` IPs on an attached ENI."""
    eni_id: str
    count: int


@dataclass(frozen=True)
class NewENI:
    """Create and attach an ENI, then assign it `count` IPs."""
    count: int


@dataclass(frozen=True)
class ReleaseIPs:
    """UnassignPrivateIpAddresses of `count` free (not cooling) IPs of an ENI."""
    eni_id: str
    count: int


GrowStep = Union[AssignIPs, NewENI]


@dataclass(frozen=True)
class Figures:
    """The pool at a glance, for the agent's status and metrics."""

    mode: str
    enis: int
    max_enis: int
    ips_per_eni: int
    total: int
    assigned: int
    cooling: int
    available: int
    free: int
    short: int
    over: int

    @property
    def capacity(self) -> int:
        return self.max_enis * self.ips_per_eni


@dataclass(frozen=True)
class Decision:
    figures: Figures
    grow: tuple[GrowStep, ...] = ()
    release: tuple[ReleaseIPs, ...] = ()
    free_eni: str | None = None
    blocked: str | None = None  # why the pool is short yet cannot grow (fully) now
    limited: bool = False       # blocked by the instance type's limits or MAX_ENI (not for a while)


def max_enis(settings: PoolSettings, limits: InstanceLimits) -> int:
    """The instance type's ENI limit, lowered by MAX_ENI."""
    return min(limits.max_enis, settings.max_eni or limits.max_enis)


def measure(enis: Sequence[ENIState], settings: PoolSettings, limits: InstanceLimits) -> Figures:
    ips = limits.ips_per_eni
    total = sum(e.total for e in enis)
    assigned = sum(e.assigned for e in enis)
    available = total - assigned
    if settings.mode == MODE_IP_TARGET:
        warm, minimum = settings.warm_ip_target or 0, settings.minimum_ip_target or 0
        short = max(max(warm - available, 0), minimum - total)
        over = max(min(max(available - warm, 0), total - minimum), 0)
    else:
        want = settings.warm_eni_target * ips
        short = max(want - available, 0) or (1 if want == 0 and available == 0 else 0)
        over = max(available - want, 0)
    return Figures(mode=settings.mode, enis=len(enis), max_enis=max_enis(settings, limits), ips_per_eni=ips,
                   total=total, assigned=assigned, cooling=sum(e.cooling for e in enis),
                   available=available, free=sum(e.free for e in enis), short=short, over=over)


def warm_floor(settings: PoolSettings, limits: InstanceLimits) -> int:
    """The fewest available IPs (free or cooling) that do not leave the pool short (see `measure`):
    an ADD that takes the pool below it asks the agent to grow now rather than at its next tick."""
    if settings.mode == MODE_IP_TARGET:
        return settings.warm_ip_target or 0  # MINIMUM_IP_TARGET counts IPs held, which an ADD does not change
    return settings.warm_eni_target * limits.ips_per_eni or 1


def decide(enis: Sequence[ENIState], settings: PoolSettings, limits: InstanceLimits, now: float, *,
           last_release_at: float | None = None, insufficient_addresses_at: float | None = None) -> Decision:
    """What the pool should do now: grow, or give back IPs and/or free one ENI."""
    _check_unique(enis)
    figures = measure(enis, settings, limits)
    if figures.short:
        if insufficient_addresses_at is not None and now - insufficient_addresses_at < GROWTH_PAUSE:
            wait = GROWTH_PAUSE - (now - insufficient_addresses_at)
            return Decision(figures, blocked=f"EC2 reported the subnet out of addresses; "
                                             f"growth paused for {wait:.0f} s more")
        whole_enis = settings.mode == MODE_ENI_TARGET
        steps, missing = grow_plan(enis, figures.short, figures.ips_per_eni, figures.max_enis, whole_enis)
        blocked = _limit_reason(settings, limits, figures) if missing else None
        return Decision(figures, grow=steps, blocked=blocked, limited=bool(missing))

    free_eni = _eni_to_free(enis, settings, figures, now)
    release = ()
    release_due = last_release_at is None or now - last_release_at >= IP_RELEASE_INTERVAL
    if settings.mode == MODE_IP_TARGET and release_due:
        rest = [e for e in enis if e.eni_id != free_eni]
        release = _release_plan(rest, measure(rest, settings, limits).over)
    return Decision(figures, release=release, free_eni=free_eni)


def grow_plan(enis: Sequence[ENIState], need: int, ips_per_eni: int, eni_limit: int,
               whole_enis: bool) -> tuple[tuple[GrowStep, ...], int]:
    """Steps adding `need` IPs (whole ENIs' worth if `whole_enis`), existing ENIs first; and how
    many IPs the limits leave missing."""
    steps: list[GrowStep] = []
    for eni in sorted(enis, key=lambda e: e.device_index):
        room = max(ips_per_eni - eni.total, 0)
        if need > 0 and room:
            count = room if whole_enis else min(room, need)
            steps.append(AssignIPs(eni.eni_id, count))
            need -= count
    slots = eni_limit - len(enis) if ips_per_eni else 0
    while need > 0 and slots > 0:
        count = ips_per_eni if whole_enis else min(ips_per_eni, need)
        steps.append(NewENI(count))
        need -= count
        slots -= 1
    return tuple(steps), max(need, 0)


def _limit_reason(settings: PoolSettings, limits: InstanceLimits, figures: Figures) -> str:
    if settings.max_eni is not None and settings.max_eni < limits.max_enis:
        cap = f"MAX_ENI={settings.max_eni}"
    else:
        cap = f"the ENI limit of {limits.instance_type} ({limits.max_enis} ENIs)"
    return (f"{cap} reached: at most {figures.capacity} pod IPs "
            f"({figures.max_enis} ENIs x {figures.ips_per_eni} secondary IPs)")


def _eni_to_free(enis: Sequence[ENIState], settings: PoolSettings, figures: Figures, now: float) -> str | None:
    """The ENI to detach and delete now, if any: the idle one with the highest device index."""
    if settings.mode == MODE_ENI_TARGET and figures.available < (settings.warm_eni_target + 1) * figures.ips_per_eni:
        return None
    for eni in sorted(enis, key=lambda e: -e.device_index):
        if (eni.primary or not eni.ours or eni.assigned or eni.cooling
                or now - eni.attached_at < ENI_MIN_AGE):
            continue
        if settings.mode == MODE_IP_TARGET:
            others_available = figures.available - eni.available
            others_total = figures.total - eni.total
            if (others_available < (settings.warm_ip_target or 0)
                    or others_total < (settings.minimum_ip_target or 0)):
                continue
        return eni.eni_id
    return None


def _release_plan(enis: Sequence[ENIState], over: int) -> tuple[ReleaseIPs, ...]:
    """Give back `over` free IPs, from the highest device index down, so low ENIs stay full and
    high ones empty out and can be freed."""
    plan = []
    for eni in sorted(enis, key=lambda e: -e.device_index):
        count = min(eni.free, over)
        if count:
            plan.append(ReleaseIPs(eni.eni_id, count))
            over -= count
    return tuple(plan)


def _check_unique(enis: Sequence[ENIState]) -> None:
    if len({e.eni_id for e in enis}) != len(enis) or len({e.device_index for e in enis}) != len(enis):
        raise ValueError("pool state lists an ENI ID or a device index twice")
