"""The node's IP pool as kept in the state store document.

Document shape (schema 2; `schema` and `network` are added by the store):

    {"node": {"instance_id", "instance_type", "primary_eni", ...},
     "enis": {"eni-...": {"mac", "device_number", "subnet_cidr", "primary_ip", "primary", "attached_at", "ours"?,
                          "prefixes": ["10.0.1.16/28", ...],
                          "ips": {"10.0.1.7": {"state": "free"}
                                              | {"state": "assigned", "container_id", "ifname",
                                                 "pod_namespace", "pod_name", "since", "owner"?}
                                              | {"state": "cooling", "since"}}}},
     "agent": {...what the agent last did...}}

`owner` ([pid, start time in clock ticks since boot]) is the process that builds the attachment
around the IP (the main plugin): while it lives, an assignment without its host veth is an ADD in
flight, not a leftover. Only secondary IPs are in `ips`: an ENI's primary IP is never handed out. A released IP cools down
for `cooldown` seconds before it can be handed out again (it still counts as available).

Prefix delegation (schema 2): `prefixes` lists the /28 IPv4 prefixes EC2 assigned to the ENI, and
each of their 16 addresses is an entry of `ips` like a secondary IP, so handing out, releasing and
cooling work alike for both kinds; an address belongs to a prefix when its /28 is listed. A prefix
is free (may be given back) only when none of its addresses is assigned or cooling. A schema-1
document is a schema-2 one without prefixes (the store reads both).

This module is the one that knows the document's key names: everyone else reads and writes it
through the views below (`Document`, `NodeFacts`, `ENI`, `IPEntry`, `AgentState`, `Blocked`,
`LastError`; tests/unit/test_store_schema.py holds that) or through `Pool`.
"""

from __future__ import annotations

from .record import record

FREE, ASSIGNED, COOLING = "free", "assigned", "cooling"
# The small members a reader may want without the ENIs (aws-snat: the node facts): the store writes
# them first, so `Transaction.read_head` parses no further (a node with 700 pods has 150 KB of ENIs).
HEAD = ("node",)
PREFIX_LENGTH = 28
PREFIX_SIZE = 16  # addresses in an IPv4 /28 prefix
_PREFIX_MASK = 0xFFFFFFFF ^ (PREFIX_SIZE - 1)


class PoolExhausted(Exception):
    """No IP can be handed out right now; `cooling` says how many are only cooling down, `free_in`
    in how many seconds the first of them can be handed out again."""

    def __init__(self, cooling: int, free_in: float = 0.0):
        super().__init__("no free IP in the pool" + (f" ({cooling} cooling down)" if cooling else ""))
        self.cooling = cooling
        self.free_in = free_in


class Assignment(record("Assignment", "ip eni_id device_number subnet_cidr primary_eni")):
    """An IP handed out: which ENI it is on, that ENI's device number and subnet."""

    __slots__ = ()

    @property
    def gateway(self) -> str:
        """The VPC router: the subnet's base address + 1."""
        net = _ipv4_network(self.subnet_cidr)
        if net is not None and net[0] + 1 <= 0xFFFFFFFF:
            return _ipv4_str(net[0] + 1)
        import ipaddress
        return str(ipaddress.ip_network(self.subnet_cidr).network_address + 1)


# --- the document's views ---------------------------------------------------------------------------
_REQUIRED = object()


class _Key:
    """A key of a document dict, read and written as the view's attribute of the same name. One that
    some documents lack reads as `default` (else KeyError); `view` wraps its dict value, `each` every
    value of its dict value (a new dict of views over the stored ones)."""

    __slots__ = ("name", "default", "view", "each")

    def __init__(self, default=_REQUIRED, *, view=None, each=None):
        self.default, self.view, self.each = default, view, each

    def __set_name__(self, owner, name):
        self.name = name

    def _raw(self, d: dict):
        return d[self.name] if self.default is _REQUIRED else d.get(self.name, self.default)

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        raw = self._raw(obj._d)
        if raw is None or not (self.view or self.each):
            return raw
        return self.view(raw) if self.view else {key: self.each(value) for key, value in raw.items()}

    def __set__(self, obj, value):
        obj._d[self.name] = value._d if isinstance(value, _View) else value


class _Section(_Key):
    """A section of the document: created empty when missing, so that writes through it are kept."""

    __slots__ = ()

    def _raw(self, d: dict):
        return d.setdefault(self.name, {})


class _View:
    """A typed view of one dict of the document: its attributes (`_Key`s) read and write that dict."""

    __slots__ = ("_d",)

    def __init__(self, d: dict):
        self._d = d

    @classmethod
    def new(cls, **values):
        """A view of a new dict holding `values` (AttributeError for a name the view does not have)."""
        view = cls({})
        for name, value in values.items():
            setattr(view, name, value)
        return view

    def as_dict(self) -> dict:
        """A copy of the dict as stored (for JSON out of the store: the agent's status)."""
        return dict(self._d)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other._d == self._d

    __hash__ = None

    def __bool__(self) -> bool:
        return bool(self._d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._d!r})"


class NodeFacts(_View):
    """The node's facts (`node`): from IMDS at the document's creation, the instance's limits, and the
    VPC's CIDR blocks and ID as the agent refreshes them (a document written before it kept the VPC's
    ID lacks it)."""

    __slots__ = ()
    instance_id = _Key()
    instance_type = _Key()
    region = _Key()
    availability_zone = _Key()
    primary_mac = _Key(None)
    primary_eni = _Key()
    primary_ip = _Key(None)
    subnet_id = _Key()
    subnet_cidr = _Key()
    security_groups = _Key()
    vpc_id = _Key(None)
    vpc_cidrs = _Key(None)
    max_enis = _Key()
    ipv4_per_eni = _Key()


class IPEntry(_View):
    """An address of an ENI's pool (`ips`): free, assigned (to an attachment: container ID and ifname,
    the pod, since when, the process building it) or cooling (since when)."""

    __slots__ = ()
    state = _Key()
    container_id = _Key(None)
    ifname = _Key(None)
    pod_namespace = _Key(None)
    pod_name = _Key(None)
    since = _Key(None)
    owner = _Key(None)


class ENI(_View):
    """An attached ENI (`enis`): its facts, whether this CNI created it (`ours`), its /28 prefixes and
    its addresses (`ips`: IPEntry views by IP)."""

    __slots__ = ()
    mac = _Key()
    device_number = _Key()
    subnet_cidr = _Key()
    primary_ip = _Key()
    primary = _Key()
    attached_at = _Key()
    ours = _Key(False)
    prefixes = _Key(())
    ips = _Key(each=IPEntry)

    @property
    def holds_pods(self) -> bool:
        return any(entry.state == ASSIGNED for entry in self.ips.values())


class Blocked(_View):
    """Why the pool is short and cannot grow (`agent.blocked`), since when, and whether the instance's
    limit is the reason (`limit`: then only a leaving pod frees an IP)."""

    __slots__ = ()
    reason = _Key()
    since = _Key()
    limit = _Key(False)


class LastError(_View):
    """The pool's last EC2 error (`agent.last_error`): the action, EC2's code and message, its kind
    (throttled, unreachable, insufficient-addresses, prefixes-unsupported, error) and when."""

    __slots__ = ()
    action = _Key()
    code = _Key()
    message = _Key()
    kind = _Key()
    at = _Key()


class AgentState(_View):
    """What the agent (or the plugins' slow path) last did (`agent`; cnicore.poolmgr says what each
    is for). Each reads None until it is first written."""

    __slots__ = ()
    blocked = _Key(None, view=Blocked)
    last_error = _Key(None, view=LastError)
    backoff = _Key(None)  # cnicore.ec2budget's backoff state
    adopted = _Key(None)  # {eni_id: attachment_id}
    insufficient_addresses_at = _Key(None)
    insufficient_reason = _Key(None)
    prefixes_refused_at = _Key(None)
    last_release_at = _Key(None)
    last_refresh = _Key(None)
    last_tick = _Key(None)
    warm_floor = _Key(None)

    def adopt(self, eni_id: str, attachment_id: str) -> None:
        self.adopted = {**(self.adopted or {}), eni_id: attachment_id}

    def forget_adopted(self, eni_id: str) -> None:
        adopted = self.adopted or {}
        if eni_id in adopted:
            self.adopted = {key: value for key, value in adopted.items() if key != eni_id}


class Document(_View):
    """The whole document (the store adds its envelope): node facts, ENIs by ID, agent state."""

    __slots__ = ()
    node = _Section(view=NodeFacts)
    enis = _Section(each=ENI)
    agent = _Section(view=AgentState)


def new_document(node: dict) -> dict:
    """A document with these node facts (a dict as `NodeFacts.new(...).as_dict()` makes), no ENI and no
    agent state."""
    return {"node": dict(node), "enis": {}, "agent": {}}


class Pool:
    """Operations on a pool document; the caller holds the store lock and writes the document back."""

    def __init__(self, doc: dict, now: float, cooldown: float = 30.0):
        self.doc = doc
        self.now = now
        self.cooldown = cooldown

    @property
    def enis(self) -> dict:
        """The stored ENI dicts by ID (outside this module: `Document(doc).enis`, their views)."""
        return self.doc.setdefault("enis", {})

    # --- ENIs ------------------------------------------------------------------------------------
    def put_eni(self, eni_id: str, *, mac: str, device_number: int, subnet_cidr: str, primary_ip: str,
                primary: bool, attached_at: float) -> ENI:
        """Add an ENI, or update its facts keeping its IPs."""
        eni = self.enis.setdefault(eni_id, {"ips": {}})
        eni.update(mac=mac.lower(), device_number=device_number, subnet_cidr=subnet_cidr,
                   primary_ip=primary_ip, primary=primary, attached_at=attached_at)
        return ENI(eni)

    def set_secondary_ips(self, eni_id: str, ips: list[str], prefixes: list[str] = ()) -> list[str]:
        """Make the ENI's secondary IPs and /28 prefixes those EC2 reports: new addresses (a new
        prefix's 16) are free, vanished free or cooling ones are dropped. An assigned IP that EC2 no
        longer reports is kept and returned, so the caller can surface it rather than silently break
        a running pod."""
        eni = self.enis[eni_id]
        held = eni["ips"]
        eni["prefixes"] = sorted(prefixes, key=_ip_key_of_cidr)
        ips = list(ips) + [ip for prefix in eni["prefixes"] for ip in prefix_addresses(prefix)]
        for ip in ips:
            held.setdefault(ip, {"state": FREE})
        ips = set(ips)
        lost = []
        for ip in list(held):
            if ip not in ips:
                if held[ip]["state"] == ASSIGNED:
                    lost.append(ip)
                else:
                    del held[ip]
        return lost

    def remove_eni(self, eni_id: str) -> None:
        self.enis.pop(eni_id, None)

    # --- attachments -----------------------------------------------------------------------------
    def find(self, container_id: str, ifname: str) -> Assignment | None:
        for eni_id, eni in self.enis.items():
            for ip, entry in eni["ips"].items():
                if (entry["state"] == ASSIGNED and entry["container_id"] == container_id
                        and entry["ifname"] == ifname):
                    return self._assignment(eni_id, ip)
        return None

    def assign(self, container_id: str, ifname: str, pod_namespace: str = "", pod_name: str = "",
               owner: list[int] | None = None, prefixes: bool = False) -> Assignment:
        """Hand out a free IP (lowest device number, then lowest address) of the pool's kind: an
        address of a /28 prefix if `prefixes` (prefix delegation), else a secondary IP; one of the
        other kind only when none is free, so that after a switch of mode the other kind drains as
        pods go. Raise PoolExhausted."""
        cooling, free_in = 0, None
        candidates = ([], [])  # (ENI ID, IP) of the wanted kind, of the other kind
        for eni_id, eni in sorted(self.enis.items(), key=lambda kv: kv[1]["device_number"]):
            if all(entry["state"] == ASSIGNED for entry in eni["ips"].values()):
                continue  # a full ENI: not worth sorting (a node with 700 pods has 14 of them)
            bases = _prefix_bases(eni)
            for ip in sorted(eni["ips"], key=_ip_key):
                entry = eni["ips"][ip]
                if entry["state"] == COOLING and not self._cooled(entry):
                    cooling += 1
                    left = self.cooldown - (self.now - entry["since"])
                    free_in = left if free_in is None else min(free_in, left)
                    continue
                if entry["state"] in (FREE, COOLING):
                    wanted = (bool(bases) and _ip_key(ip) & _PREFIX_MASK in bases) == prefixes
                    if wanted:
                        return self._take(eni_id, ip, container_id, ifname, pod_namespace, pod_name, owner)
                    candidates[1].append((eni_id, ip))
        if candidates[1]:
            return self._take(*candidates[1][0], container_id, ifname, pod_namespace, pod_name, owner)
        raise PoolExhausted(cooling, free_in or 0.0)

    def _take(self, eni_id: str, ip: str, container_id: str, ifname: str, pod_namespace: str, pod_name: str,
              owner: list[int] | None) -> Assignment:
        entry = {"state": ASSIGNED, "container_id": container_id, "ifname": ifname,
                 "pod_namespace": pod_namespace, "pod_name": pod_name, "since": self.now}
        if owner:
            entry["owner"] = owner
        self.enis[eni_id]["ips"][ip] = entry
        return self._assignment(eni_id, ip)

    def claim(self, ip: str, container_id: str, ifname: str) -> bool:
        """Record that the attachment holds `ip` (found on the host after the store was rebuilt).
        False if the pool does not have the IP or another attachment holds it."""
        for eni in self.enis.values():
            entry = eni["ips"].get(ip)
            if entry is None:
                continue
            if entry["state"] == ASSIGNED:
                return (entry["container_id"], entry["ifname"]) == (container_id, ifname)
            eni["ips"][ip] = {"state": ASSIGNED, "container_id": container_id, "ifname": ifname,
                              "pod_namespace": "", "pod_name": "", "since": self.now}
            return True
        return False

    def release(self, container_id: str, ifname: str, ip: str | None = None) -> str | None:
        """Put the attachment's IP (if `ip`: only that one) into cool-down; return it, or None if
        there was none."""
        found = self.find(container_id, ifname)
        if found is None or ip not in (None, found.ip):
            return None
        self.enis[found.eni_id]["ips"][found.ip] = {"state": COOLING, "since": self.now}
        return found.ip

    def entry(self, ip: str) -> IPEntry | None:
        """The pool's entry of `ip` (free, assigned or cooling), None if the pool has no such IP."""
        for eni in self.enis.values():
            if ip in eni["ips"]:
                return IPEntry(eni["ips"][ip])
        return None

    def attachments(self) -> list[tuple[str, str, str]]:
        """(container_id, ifname, ip) of every assigned IP."""
        return [(e["container_id"], e["ifname"], ip)
                for eni in self.enis.values() for ip, e in eni["ips"].items() if e["state"] == ASSIGNED]

    # --- figures ---------------------------------------------------------------------------------
    def eni_stats(self) -> list[dict]:
        """Per ENI: total, assigned, cooling (still in cool-down) and free (can be handed out now)
        addresses of both kinds; prefixes held, free prefixes (none of their addresses assigned or
        cooling) and free secondary IPs (not of a prefix)."""
        out = []
        for eni_id, eni in sorted(self.enis.items(), key=lambda kv: kv[1]["device_number"]):
            states = [self._effective_state(e) for e in eni["ips"].values()]
            prefixes = eni.get("prefixes", [])
            out.append({"eni_id": eni_id, "device_number": eni["device_number"], "primary": eni["primary"],
                        "ours": eni.get("ours", False),
                        "attached_at": eni["attached_at"], "total": len(states),
                        "assigned": states.count(ASSIGNED), "cooling": states.count(COOLING),
                        "free": states.count(FREE), "prefixes": len(prefixes),
                        "free_prefixes": len(self.free_prefixes(eni_id)) if prefixes else 0,
                        "free_secondary": len(self.free_ips(eni_id)) if prefixes else states.count(FREE)})
        return out

    def free_ips(self, eni_id: str) -> list[str]:
        """The ENI's secondary IPs (not of a prefix) that can be handed out (or given back) now,
        lowest first."""
        eni = self.enis[eni_id]
        bases = _prefix_bases(eni)
        return sorted((ip for ip, e in eni["ips"].items()
                       if self._effective_state(e) == FREE and not (bases and _ip_key(ip) & _PREFIX_MASK in bases)),
                      key=_ip_key)

    def free_prefixes(self, eni_id: str) -> list[str]:
        """The ENI's prefixes none of whose addresses is assigned or cooling, lowest first."""
        ips = self.enis[eni_id]["ips"]
        return [prefix for prefix in self.enis[eni_id].get("prefixes", [])
                if all(ip in ips and self._effective_state(ips[ip]) == FREE for ip in prefix_addresses(prefix))]

    def remove_ip(self, eni_id: str, ip: str) -> None:
        """Take a secondary IP out of the pool (before EC2 is asked to unassign it)."""
        del self.enis[eni_id]["ips"][ip]

    def remove_prefix(self, eni_id: str, prefix: str) -> None:
        """Take a prefix and its addresses out of the pool (before EC2 is asked to unassign it)."""
        eni = self.enis[eni_id]
        eni["prefixes"] = [p for p in eni.get("prefixes", []) if p != prefix]
        for ip in prefix_addresses(prefix):
            eni["ips"].pop(ip, None)

    def free_count(self) -> int:
        return sum(s["free"] for s in self.eni_stats())

    def _effective_state(self, entry: dict) -> str:
        if entry["state"] == COOLING and self._cooled(entry):
            return FREE
        return entry["state"]

    def _cooled(self, entry: dict) -> bool:
        return self.now - entry["since"] >= self.cooldown

    def _assignment(self, eni_id: str, ip: str) -> Assignment:
        eni = self.enis[eni_id]
        return Assignment(ip=ip, eni_id=eni_id, device_number=eni["device_number"],
                          subnet_cidr=eni["subnet_cidr"], primary_eni=eni["primary"])


# What an IPAM ADD run in its caller's process (cnicore.invoke) handed out, with its ENI's facts, left
# for that caller, which then need not lock, read and parse the store again (a 150 KB document on a
# node with 700 pods). Keyed by the attachment, taken once.
_handed_out: dict = {}


def leave_handed_out(network: str, container_id: str, ifname: str, held: Assignment, eni: ENI) -> None:
    _handed_out[(network, container_id, ifname)] = (held, eni)


def take_handed_out(network: str, container_id: str, ifname: str) -> tuple[Assignment, ENI] | None:
    """(the assignment, its ENI's view) an ADD of this process left for this attachment, or None."""
    return _handed_out.pop((network, container_id, ifname), None)


def prefix_addresses(prefix: str) -> list[str]:
    """The 16 addresses of an IPv4 /28 prefix."""
    net = _ipv4_network(prefix)
    if net is None or net[1] != PREFIX_LENGTH:
        raise ValueError(f"not an IPv4 /{PREFIX_LENGTH} prefix: {prefix!r}")
    return [_ipv4_str(net[0] + i) for i in range(PREFIX_SIZE)]


def _prefix_bases(eni: dict) -> set[int]:
    """The network addresses (as integers) of the ENI's prefixes."""
    return {_ip_key(p.partition("/")[0]) for p in eni.get("prefixes", ())}


def _ip_key_of_cidr(cidr: str) -> int:
    return _ip_key(cidr.partition("/")[0])


def _ip_key(ip: str) -> int:
    value = _ipv4_int(ip)
    if value is None:
        import ipaddress
        return int(ipaddress.ip_address(ip))
    return value


def _ipv4_int(text: str) -> int | None:
    """The dotted quad's value, or None for anything ipaddress would have to judge (the callers then
    ask ipaddress, so results and errors are exactly ipaddress's)."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        # what IPv4Address accepts: 1-3 ASCII digits, no leading zero, at most 255
        if not (0 < len(part) <= 3 and part.isascii() and part.isdigit()) or (part[0] == "0" and len(part) > 1):
            return None
        octet = int(part)
        if octet > 255:
            return None
        value = value << 8 | octet
    return value


def _ipv4_network(text: str) -> tuple[int, int] | None:
    """(network address, prefix length) of an `a.b.c.d/n` with no host bits set; None otherwise."""
    addr, sep, length = text.partition("/")
    if not sep or not (0 < len(length) <= 2 and length.isascii() and length.isdigit()) or \
            (length[0] == "0" and len(length) > 1):
        return None
    value, prefix = _ipv4_int(addr), int(length)
    if value is None or prefix > 32 or value & (0xFFFFFFFF >> prefix):
        return None
    return value, prefix


def _ipv4_str(value: int) -> str:
    return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"
