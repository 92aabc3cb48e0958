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
- Pods waiting for an IP (`waiting`: their ADD found no free address and they have none yet) are
  demand the targets do not see: every formula takes `available - waiting` for `available`, so one
  round grows for all of them (a node given 30 pods at once adds every ENI they need in one round,
  not one WARM_ENI_TARGET step per round as pods trickle in). Upstream's ipamd has no such input.
- Grow by filling existing ENIs first (lowest device index first), then new ENIs, never beyond
  the instance type's limits or MAX_ENI; not at all for GROWTH_PAUSE after EC2 said the subnet
  is out of addresses.
- An ENI may be freed only if this CNI created it, it is not the primary, is ENI_MIN_AGE old, holds no pod and no IP
  in cool-down, and (with IP targets) the other ENIs still meet both targets.

Prefix delegation (ENABLE_PREFIX_DELEGATION): each IPv4 slot of an ENI holds a /28 prefix of 16
addresses (its primary address keeps one slot), and pods get addresses of the prefixes. As upstream's
ipamd (datastoreTargetState, datastorePrefixTargetState, isDatastorePoolTooLow/High, getPrefixesNeeded):
- IP targets: `short` and `over` as above in IPs, then short = ceil(short / 16) prefixes and
  over = min(free prefixes, prefixes - ceil((assigned + WARM_IP_TARGET) / 16),
  prefixes - ceil(MINIMUM_IP_TARGET / 16)) prefixes.
- Otherwise WARM_PREFIX_TARGET (P; WARM_ENI_TARGET plays no part): too low when
  available < 16 * P (with P = 0: when nothing is available); grow by max(1, P - free prefixes)
  prefixes. A prefix is free when none of its addresses is assigned or cooling; only free prefixes
  are given back. Upstream gives back free prefixes beyond P; here only as many as leave the pool not
  too low (on purpose: upstream, with P = 0 or a partly used prefix, gives back a prefix that the next
  round asks EC2 for again).
- Grow by prefixes on existing ENIs first (as many as their free slots hold), then new ENIs with as
  many prefixes as still needed; give back free prefixes from the highest device index down, at most
  every IP_RELEASE_INTERVAL.
- Switching the mode drains the other kind: free addresses of the other kind (secondary IPs in
  prefix mode, addresses of prefixes otherwise) count for nothing and are given back (a prefix once
  all its addresses are free); the ones pods hold stay until the pods go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from cnicore.instance_limits import InstanceLimits
from cnicore.pool import PREFIX_SIZE

GROWTH_PAUSE = 120.0        # s without growing after InsufficientFreeAddressesInSubnet/InsufficientCidrBlocks
IP_RELEASE_INTERVAL = 30.0  # s between two give-backs of single IPs
ENI_MIN_AGE = 60.0          # s an ENI stays attached before it may be freed

MODE_IP_TARGET = "ip-target"
MODE_ENI_TARGET = "eni-target"
MODE_PREFIX_TARGET = "prefix-target"


@dataclass(frozen=True)
class PoolSettings:
    """The pool's settings, already parsed (cnicore.settings validates what users write)."""

    warm_ip_target: int | None = None
    minimum_ip_target: int | None = None
    warm_eni_target: int = 1
    max_eni: int | None = None
    prefix_delegation: bool = False
    warm_prefix_target: int = 1

    def __post_init__(self):
        if type(self.prefix_delegation) is not bool:
            raise ValueError(f"ENABLE_PREFIX_DELEGATION must be a boolean, got {self.prefix_delegation!r}")
        for name, value, floor, optional in (("WARM_IP_TARGET", self.warm_ip_target, 0, True),
                                             ("MINIMUM_IP_TARGET", self.minimum_ip_target, 0, True),
                                             ("WARM_ENI_TARGET", self.warm_eni_target, 0, False),
                                             ("MAX_ENI", self.max_eni, 1, True),
                                             ("WARM_PREFIX_TARGET", self.warm_prefix_target, 0, False)):
            if value is None and optional:
                continue
            if type(value) is not int or value < floor:
                raise ValueError(f"{name} must be an integer >= {floor}, got {value!r}")

    @classmethod
    def from_settings(cls, values) -> "PoolSettings":
        """From a settings record holding the pool's settings (`cnicore.settings.IPAM` or `AGENT`)."""
        return cls(**{name: getattr(values, name) for name in cls.__dataclass_fields__})

    @property
    def mode(self) -> str:
        if self.warm_ip_target or self.minimum_ip_target:
            return MODE_IP_TARGET
        return MODE_PREFIX_TARGET if self.prefix_delegation else MODE_ENI_TARGET


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
    prefixes: int = 0         # /28 prefixes held; their addresses count in total, assigned, cooling
    free_prefixes: int = 0    # prefixes none of whose addresses is assigned or cooling
    free_of_prefixes: int = 0  # free addresses inside prefixes (the rest of `free` are secondary IPs)

    def __post_init__(self):
        if not (self.device_index >= 0 and self.total >= 0 and 0 <= self.assigned <= self.total
                and 0 <= self.cooling <= self.total - self.assigned
                and 0 <= self.free_prefixes <= self.prefixes and PREFIX_SIZE * self.prefixes <= self.total
                and PREFIX_SIZE * self.free_prefixes <= self.free_of_prefixes <= self.free):
            raise ValueError(f"inconsistent ENI state {self}: need device_index >= 0, "
                             "0 <= assigned, 0 <= cooling, assigned + cooling <= total, "
                             "free prefixes <= prefixes, 16 * prefixes <= total, "
                             "16 * free prefixes <= free addresses of prefixes <= free")

    @classmethod
    def from_stats(cls, row: Mapping[str, Any]) -> "ENIState":
        free = row["total"] - row["assigned"] - row["cooling"]
        return cls(row["eni_id"], row["device_number"], row["total"], row["assigned"], row["cooling"],
                   row["attached_at"], row.get("ours", True), row.get("prefixes", 0), row.get("free_prefixes", 0),
                   free - row.get("free_secondary", free))

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

    @property
    def free_secondary(self) -> int:
        """Free secondary IPs (not of a prefix)."""
        return self.free - self.free_of_prefixes

    @property
    def slots_used(self) -> int:
        """IPv4 slots of the ENI taken by secondary IPs and prefixes (its primary address aside)."""
        return self.total - PREFIX_SIZE * self.prefixes + self.prefixes

    def slots_kept(self, prefix_delegation: bool) -> int:
        """Slots still taken once the free addresses of the other kind are given back."""
        return self.slots_used - (self.free_secondary if prefix_delegation else self.free_prefixes)

    def other_kind_free(self, prefix_delegation: bool) -> int:
        """Free addresses of the kind the mode does not hand out (they drain): secondary IPs in
        prefix mode, addresses of prefixes otherwise."""
        return self.free_secondary if prefix_delegation else self.free_of_prefixes


@dataclass(frozen=True)
class AssignIPs:
    """AssignPrivateIpAddresses of `count` IPs on an attached ENI."""
    eni_id: str
    count: int


@dataclass(frozen=True)
class AssignPrefixes:
    """AssignPrivateIpAddresses of `count` /28 prefixes on an attached ENI."""
    eni_id: str
    count: int


@dataclass(frozen=True)
class NewENI:
    """Create and attach an ENI, then assign it `count` IPs (prefixes if `prefixes`)."""
    count: int
    prefixes: bool = False


@dataclass(frozen=True)
class ReleaseIPs:
    """UnassignPrivateIpAddresses of `count` free (not cooling) secondary IPs of an ENI."""
    eni_id: str
    count: int


@dataclass(frozen=True)
class ReleasePrefixes:
    """UnassignPrivateIpAddresses of `count` free prefixes of an ENI (none of their addresses
    assigned or cooling)."""
    eni_id: str
    count: int


GrowStep = Union[AssignIPs, AssignPrefixes, NewENI]
ReleaseStep = Union[ReleaseIPs, ReleasePrefixes]


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
    short: int   # in prefixes with prefix delegation, else in IPs
    over: int    # the same
    prefix_delegation: bool = False
    prefixes: int = 0
    free_prefixes: int = 0
    waiting: int = 0  # pods waiting for an IP, counted as demand

    @property
    def capacity(self) -> int:
        return self.max_enis * self.ips_per_eni


@dataclass(frozen=True)
class Decision:
    figures: Figures
    grow: tuple[GrowStep, ...] = ()
    release: tuple[ReleaseStep, ...] = ()
    free_eni: str | None = None
    blocked: str | None = None  # why the pool is short yet cannot grow (fully) now
    limited: bool = False       # blocked by the instance type's limits or MAX_ENI (not for a while)


def max_enis(settings: PoolSettings, limits: InstanceLimits) -> int:
    """The instance type's ENI limit, lowered by MAX_ENI."""
    return min(limits.max_enis, settings.max_eni or limits.max_enis)


def measure(enis: Sequence[ENIState], settings: PoolSettings, limits: InstanceLimits, waiting: int = 0) -> Figures:
    pd = settings.prefix_delegation
    draining = sum(e.other_kind_free(pd) for e in enis)
    ips = limits.ips_per_eni * (PREFIX_SIZE if pd else 1)
    total = sum(e.total for e in enis) - draining
    assigned = sum(e.assigned for e in enis)
    available = total - assigned
    left = available - waiting  # what stays available once the waiting pods have an IP each
    prefixes, free_prefixes = sum(e.prefixes for e in enis), sum(e.free_prefixes for e in enis)
    if settings.mode == MODE_IP_TARGET:
        warm, minimum = settings.warm_ip_target or 0, settings.minimum_ip_target or 0
        short = max(max(warm - left, 0), minimum - total)
        over = max(min(max(left - warm, 0), total - minimum), 0)
        if pd:
            short = -(-short // PREFIX_SIZE)
            over = max(min(free_prefixes, prefixes - -(-(assigned + waiting + warm) // PREFIX_SIZE),
                           prefixes - -(-minimum // PREFIX_SIZE)), 0)
    elif settings.mode == MODE_PREFIX_TARGET:
        target = settings.warm_prefix_target
        floor = _prefix_floor(settings)
        # with nothing waiting, the last term never exceeds the second (free prefixes <= available / 16)
        short = max(1, target - free_prefixes, -(-(floor - left) // PREFIX_SIZE)) if left < floor else 0
        over = max(min(free_prefixes - target, (left - floor) // PREFIX_SIZE), 0)
    else:
        want = settings.warm_eni_target * ips
        short = max(want - left, 0) or (1 if want == 0 and available == 0 else 0)
        over = max(left - want, 0)
    return Figures(mode=settings.mode, enis=len(enis), max_enis=max_enis(settings, limits), ips_per_eni=ips,
                   total=total, assigned=assigned, cooling=sum(e.cooling for e in enis),
                   available=available, free=sum(e.free for e in enis) - draining, short=short, over=over,
                   prefix_delegation=pd, prefixes=prefixes, free_prefixes=free_prefixes, waiting=waiting)


def _prefix_floor(settings: PoolSettings) -> int:
    """The fewest available addresses WARM_PREFIX_TARGET allows: 16 per prefix, or one with 0."""
    return PREFIX_SIZE * settings.warm_prefix_target or 1


def warm_floor(settings: PoolSettings, limits: InstanceLimits) -> int:
    """The fewest available IPs (free or cooling) that do not leave the pool short (see `measure`):
    an ADD that takes the pool below it asks the agent to grow now rather than at its next tick."""
    if settings.mode == MODE_IP_TARGET:
        return settings.warm_ip_target or 0  # MINIMUM_IP_TARGET counts IPs held, which an ADD does not change
    if settings.mode == MODE_PREFIX_TARGET:
        return _prefix_floor(settings)
    return settings.warm_eni_target * limits.ips_per_eni or 1


def decide(enis: Sequence[ENIState], settings: PoolSettings, limits: InstanceLimits, now: float, *,
           last_release_at: float | None = None, insufficient_addresses_at: float | None = None,
           insufficient_reason: str | None = None, prefixes_refused_at: float | None = None,
           waiting: int = 0) -> Decision:
    """What the pool should do now: grow, or give back IPs (prefixes) and/or free one ENI; and give
    back the free addresses of the kind the mode does not hand out. `insufficient_reason` says
    what EC2 answered when it last found the subnet short (InsufficientCidrBlocks, ...);
    `prefixes_refused_at` when EC2 last refused prefixes to this instance type; `waiting` how many
    pods wait for an IP."""
    _check_unique(enis)
    figures = measure(enis, settings, limits, waiting)
    drain = _drain_plan(enis, settings.prefix_delegation)
    if figures.short:
        if settings.prefix_delegation and prefixes_refused_at is not None and now - prefixes_refused_at < GROWTH_PAUSE:
            return Decision(figures, release=drain, limited=True,
                            blocked=f"instance type {limits.instance_type} does not support IPv4 prefixes "
                                    f"(ENABLE_PREFIX_DELEGATION=true needs a Nitro instance type; EC2 refused "
                                    f"with InvalidParameterValue): set ENABLE_PREFIX_DELEGATION=false on this node")
        if insufficient_addresses_at is not None and now - insufficient_addresses_at < GROWTH_PAUSE:
            wait = GROWTH_PAUSE - (now - insufficient_addresses_at)
            return Decision(figures, release=drain,
                            blocked=f"{insufficient_reason or 'EC2 reported the subnet out of addresses'}; "
                                    f"growth paused for {wait:.0f} s more")
        if settings.prefix_delegation:
            steps, missing = prefix_grow_plan(enis, figures.short, limits.ips_per_eni, figures.max_enis)
        else:
            whole_enis = settings.mode == MODE_ENI_TARGET
            steps, missing = grow_plan(enis, figures.short, figures.ips_per_eni, figures.max_enis, whole_enis)
        blocked = _limit_reason(settings, limits, figures) if missing else None
        return Decision(figures, grow=steps, release=drain, blocked=blocked, limited=bool(missing))

    free_eni = _eni_to_free(enis, settings, limits, figures, now)
    release = ()
    release_due = last_release_at is None or now - last_release_at >= IP_RELEASE_INTERVAL
    if settings.mode != MODE_ENI_TARGET and release_due:
        rest = [e for e in enis if e.eni_id != free_eni]
        over = measure(rest, settings, limits, waiting).over
        release = _release_plan(rest, over, prefixes=settings.prefix_delegation)
    return Decision(figures, release=drain + release, free_eni=free_eni)


def grow_plan(enis: Sequence[ENIState], need: int, ips_per_eni: int, eni_limit: int,
               whole_enis: bool) -> tuple[tuple[GrowStep, ...], int]:
    """Steps adding `need` IPs (whole ENIs' worth if `whole_enis`), existing ENIs first; and how
    many IPs the limits leave missing."""
    steps: list[GrowStep] = []
    for eni in sorted(enis, key=lambda e: e.device_index):
        room = max(ips_per_eni - eni.slots_kept(False), 0)
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


def prefix_grow_plan(enis: Sequence[ENIState], need: int, slots_per_eni: int,
                     eni_limit: int) -> tuple[tuple[GrowStep, ...], int]:
    """Steps adding `need` prefixes: on existing ENIs' free slots first (lowest device index first),
    then on new ENIs; and how many prefixes the limits leave missing. The slots of free secondary IPs
    count as free: they are given back first (`drain_steps`)."""
    steps: list[GrowStep] = []
    for eni in sorted(enis, key=lambda e: e.device_index):
        room = max(slots_per_eni - eni.slots_kept(True), 0)
        if need > 0 and room:
            steps.append(AssignPrefixes(eni.eni_id, min(room, need)))
            need -= min(room, need)
    new_enis = eni_limit - len(enis)
    while need > 0 and new_enis > 0:
        steps.append(NewENI(min(slots_per_eni, need), prefixes=True))
        need -= min(slots_per_eni, need)
        new_enis -= 1
    return tuple(steps), max(need, 0)


def _limit_reason(settings: PoolSettings, limits: InstanceLimits, figures: Figures) -> str:
    if settings.max_eni is not None and settings.max_eni < limits.max_enis:
        cap = f"MAX_ENI={settings.max_eni}"
    else:
        cap = f"the ENI limit of {limits.instance_type} ({limits.max_enis} ENIs)"
    if settings.prefix_delegation:
        per_eni = f"{limits.ips_per_eni} /28 prefixes x {PREFIX_SIZE} addresses"
    else:
        per_eni = f"{figures.ips_per_eni} secondary IPs"
    return f"{cap} reached: at most {figures.capacity} pod IPs ({figures.max_enis} ENIs x {per_eni})"


def _eni_to_free(enis: Sequence[ENIState], settings: PoolSettings, limits: InstanceLimits, figures: Figures,
                 now: float) -> str | None:
    """The ENI to detach and delete now, if any: the idle one with the highest device index."""
    if (settings.mode == MODE_ENI_TARGET
            and figures.available - figures.waiting < (settings.warm_eni_target + 1) * figures.ips_per_eni):
        return None
    for eni in sorted(enis, key=lambda e: -e.device_index):
        if (eni.primary or not eni.ours or eni.assigned or eni.cooling
                or now - eni.attached_at < ENI_MIN_AGE):
            continue
        if settings.mode != MODE_ENI_TARGET:
            # the other ENIs must still meet the targets
            if measure([e for e in enis if e is not eni], settings, limits, figures.waiting).short:
                continue
        return eni.eni_id
    return None


def _release_plan(enis: Sequence[ENIState], over: int, prefixes: bool = False) -> tuple:
    """Give back `over` free IPs (or prefixes), from the highest device index down, so low ENIs stay
    full and high ones empty out and can be freed."""
    plan = []
    for eni in sorted(enis, key=lambda e: -e.device_index):
        count = min(eni.free_prefixes if prefixes else eni.free_secondary, over)
        if count:
            plan.append((ReleasePrefixes if prefixes else ReleaseIPs)(eni.eni_id, count))
            over -= count
    return tuple(plan)


def drain_steps(decision: Decision) -> tuple[ReleaseStep, ...]:
    """The steps of a decision that give back the other kind (see `_drain_plan`)."""
    kind = ReleaseIPs if decision.figures.prefix_delegation else ReleasePrefixes
    return tuple(step for step in decision.release if isinstance(step, kind))


def _drain_plan(enis: Sequence[ENIState], prefix_delegation: bool) -> tuple[ReleaseStep, ...]:
    """Give back every free address of the kind the mode does not hand out: free secondary IPs in
    prefix mode, free prefixes otherwise."""
    if prefix_delegation:
        return tuple(ReleaseIPs(e.eni_id, e.free_secondary) for e in enis if e.free_secondary)
    return tuple(ReleasePrefixes(e.eni_id, e.free_prefixes) for e in enis if e.free_prefixes)


def _check_unique(enis: Sequence[ENIState]) -> None:
    if len({e.eni_id for e in enis}) != len(enis) or len({e.device_index for e in enis}) != len(enis):
        raise ValueError("pool state lists an ENI ID or a device index twice")
