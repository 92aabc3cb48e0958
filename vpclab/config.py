"""What a lab is made of: its settings, checked, and the layout derived from them.

Pure logic: nothing here touches the machine, so a bad setting is refused before anything exists.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass

from . import instance_types, netns
from .errors import LabError

DEFAULT_NAME = "avclab"
STATE_ROOT = "/run/vpclab"  # <STATE_ROOT>/<name>/: config.json, daemon.pid, ctl.sock, daemon.log
REGION = "us-west-2"
AZ_LETTERS = "abc"
MAX_NODES = 16
MAX_VPC_CIDRS = 5
MAX_EXTRA_HOSTS = 8
MAX_STALENESS = 300.0

INTERNET_CIDR = "203.0.113.0/24"
ECHO_PORT = 7007
IMDS_ADDRESS = "169.254.169.254"
EC2_ADDRESS = "169.254.169.200"  # the EC2 front, on each node's lo
EC2_PORT = 80
ENI_MTU = 9001
HOST_OFFSET = 10  # a host (node primary IP, external host) sits at network + 10 + n
FORBIDDEN = [ipaddress.ip_network(c) for c in
             ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")]


@dataclass(frozen=True)
class SubnetPlan:
    cidr: str
    az: str

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.cidr).network_address + 1)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.cidr).prefixlen


@dataclass(frozen=True)
class NodePlan:
    name: str          # node1..nodeN
    netns: str
    subnet: SubnetPlan
    primary_ip: str


@dataclass(frozen=True)
class HostPlan:
    """A host outside the VPC (the internet host, or an extra host), behind the router."""
    name: str          # "internet", "x1", ...
    netns: str
    cidr: str
    address: str
    router_address: str
    router_if: str


@dataclass(frozen=True)
class LabConfig:
    name: str = DEFAULT_NAME
    nodes: int = 2
    instance_type: str = "m5.large"
    vpc_cidrs: tuple[str, ...] = ("10.0.0.0/16",)
    subnet_prefix: int = 24
    azs: int = 1
    imds_staleness: float = 0.0
    extra_hosts: tuple[str, ...] = ()
    owner_pid: int | None = None  # the lab removes itself when this process ends
    # EC2's request throttling (vpclab.throttling) and action latency (vpclab.latency): both off by
    # default, so the suite's exact call counts and injected faults never meet a bucket another test
    # drained, and it runs at moto's speed; the scale scenarios turn them on
    ec2_throttling: bool = False
    ec2_latency: bool = False

    def __post_init__(self):
        # accept lists from callers and JSON; keep the dataclass hashable and immutable
        object.__setattr__(self, "vpc_cidrs", _as_tuple("vpc_cidrs", self.vpc_cidrs))
        object.__setattr__(self, "extra_hosts", _as_tuple("extra_hosts", self.extra_hosts))

    # --- checks ----------------------------------------------------------------------------------

    def validate(self) -> "LabConfig":
        """Return self, or raise LabError naming the first bad setting."""
        if not isinstance(self.name, str) or not netns.PREFIX_RE.match(self.name):
            raise LabError(f"name: {self.name!r} must be 'avc' followed by 1 to 12 of [a-z0-9]")
        _int_in("nodes", self.nodes, 1, MAX_NODES)
        if not isinstance(self.instance_type, str):
            raise LabError(f"instance_type: {self.instance_type!r} is not a string")
        instance_types.limits(self.instance_type)
        _int_in("azs", self.azs, 1, len(AZ_LETTERS))
        check_staleness(self.imds_staleness)
        if self.owner_pid is not None:
            _int_in("owner_pid", self.owner_pid, 1, 2**22)
        for field in ("ec2_throttling", "ec2_latency"):
            if not isinstance(getattr(self, field), bool):
                raise LabError(f"{field}: {getattr(self, field)!r} must be true or false")
        vpcs = self._check_vpc_cidrs()
        self._check_subnets(vpcs[0])
        self._check_extra_hosts(vpcs)
        return self

    def _check_vpc_cidrs(self) -> list[ipaddress.IPv4Network]:
        if not 1 <= len(self.vpc_cidrs) <= MAX_VPC_CIDRS:
            raise LabError(f"vpc_cidrs: give 1 to {MAX_VPC_CIDRS} CIDRs, not {len(self.vpc_cidrs)}")
        nets = [_network("vpc_cidrs", c) for c in self.vpc_cidrs]
        for net in nets:
            if not 16 <= net.prefixlen <= 28:
                raise LabError(f"vpc_cidrs: {net} must be between /16 and /28 (as in EC2)")
        _no_overlaps("vpc_cidrs", [ipaddress.ip_network(INTERNET_CIDR)] + nets)
        return nets

    def _check_subnets(self, first: ipaddress.IPv4Network) -> None:
        _int_in("subnet_prefix", self.subnet_prefix, first.prefixlen, 28)
        available = 2 ** (self.subnet_prefix - first.prefixlen)
        if available < self.azs:
            raise LabError(f"subnet_prefix: {first} holds {available} /{self.subnet_prefix} subnet(s), "
                           f"{self.azs} AZs need one each")
        per_subnet = -(-self.nodes // self.azs)
        room = 2 ** (32 - self.subnet_prefix) - HOST_OFFSET - 1
        if per_subnet > room:
            raise LabError(f"subnet_prefix: a /{self.subnet_prefix} subnet has room for {room} node(s) "
                           f"from .{HOST_OFFSET} on, {per_subnet} are needed")

    def _check_extra_hosts(self, vpcs: list[ipaddress.IPv4Network]) -> None:
        if len(self.extra_hosts) > MAX_EXTRA_HOSTS:
            raise LabError(f"extra_hosts: at most {MAX_EXTRA_HOSTS}, not {len(self.extra_hosts)}")
        nets = [_network("extra_hosts", c) for c in self.extra_hosts]
        for net in nets:
            if net.prefixlen > 28:
                raise LabError(f"extra_hosts: {net} is smaller than /28")
        _no_overlaps("extra_hosts", [ipaddress.ip_network(INTERNET_CIDR)] + vpcs + nets)

    # --- layout ----------------------------------------------------------------------------------

    @property
    def state_dir(self) -> str:
        return state_dir(self.name)

    def netns(self, role: str) -> str:
        return f"{self.name}-{role}"

    @property
    def ctl_netns(self) -> str:
        return self.netns("ctl")

    @property
    def router_netns(self) -> str:
        return self.netns("rtr")

    def subnets(self) -> list[SubnetPlan]:
        first = ipaddress.ip_network(self.vpc_cidrs[0])
        cidrs = first.subnets(new_prefix=self.subnet_prefix)
        return [SubnetPlan(str(next(cidrs)), REGION + AZ_LETTERS[i]) for i in range(self.azs)]

    def node_plans(self) -> list[NodePlan]:
        """Nodes spread over the subnets in turn, at .10, .11, ... of their subnet."""
        subnets = self.subnets()
        plans = []
        for i in range(self.nodes):
            subnet = subnets[i % self.azs]
            ip = ipaddress.ip_network(subnet.cidr).network_address + HOST_OFFSET + i // self.azs
            name = f"node{i + 1}"
            plans.append(NodePlan(name, self.netns(name), subnet, str(ip)))
        return plans

    def host_plans(self) -> list[HostPlan]:
        named = [("internet", "inet", INTERNET_CIDR)]
        named += [(f"x{i + 1}", f"x{i + 1}", c) for i, c in enumerate(self.extra_hosts)]
        plans = []
        for name, short, cidr in named:
            net = ipaddress.ip_network(cidr)
            plans.append(HostPlan(name, self.netns(short), str(net), str(net.network_address + HOST_OFFSET),
                                  str(net.network_address + 1), f"to-{short}"))
        return plans

    # --- storage ---------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LabConfig":
        return cls(**json.loads(text))


def check_staleness(seconds) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_STALENESS:
        raise LabError(f"imds_staleness: {seconds!r} must be seconds in [0, {MAX_STALENESS:g}]")


def state_dir(name: str) -> str:
    return os.path.join(STATE_ROOT, name)


def _as_tuple(field: str, value) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise LabError(f"{field}: {value!r} must be a list of CIDRs")
    return tuple(value)


def _int_in(field: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LabError(f"{field}: {value!r} must be an integer in [{low}, {high}]")


def _network(field: str, text) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text)
    except (ValueError, TypeError) as e:
        raise LabError(f"{field}: {text!r} is not an IPv4 CIDR ({e})") from None
    if "/" not in str(text):
        raise LabError(f"{field}: {text!r} has no prefix length")
    for bad in FORBIDDEN:
        if net.overlaps(bad):
            raise LabError(f"{field}: {net} overlaps the reserved range {bad}")
    return net


def _no_overlaps(field: str, nets: list[ipaddress.IPv4Network]) -> None:
    for i, a in enumerate(nets):
        for b in nets[:i]:
            if a.overlaps(b):
                raise LabError(f"{field}: {a} overlaps {b}")
