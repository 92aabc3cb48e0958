"""EC2 as the lab sees it at one moment: a snapshot read from moto, and the questions asked of it."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from functools import cached_property

# EC2 keeps five addresses of every subnet: network, router (+1), DNS (+2), future use (+3), broadcast.
RESERVED_LOW = 4
PREFIX_LEN = 28  # EC2 delegates IPv4 prefixes of this length only, aligned on their size
PREFIX_SIZE = 2 ** (32 - PREFIX_LEN)


@dataclass(frozen=True)
class Vpc:
    id: str
    cidrs: tuple[str, ...]  # primary first


@dataclass(frozen=True)
class Subnet:
    id: str
    vpc_id: str
    cidr: str
    az: str

    def reserved(self, ip: str) -> bool:
        net = ipaddress.ip_network(self.cidr)
        n = int(ipaddress.ip_address(ip))
        return n < int(net.network_address) + RESERVED_LOW or n == int(net.broadcast_address)

    def contains(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(self.cidr)


@dataclass(frozen=True)
class Instance:
    id: str
    type: str
    az: str
    subnet_id: str
    vpc_id: str
    private_ip: str
    image_id: str


@dataclass(frozen=True)
class Eni:
    id: str
    mac: str
    subnet_id: str
    vpc_id: str
    az: str
    owner_id: str
    ips: tuple[str, ...]          # primary first
    groups: tuple[tuple[str, str], ...]  # (group id, group name)
    status: str                   # "available" | "in-use"
    instance_id: str | None = None
    device_index: int | None = None
    attachment_id: str | None = None
    prefixes: tuple[str, ...] = ()  # delegated IPv4 /28 prefixes, each in one of the ENI's IPv4 slots

    @property
    def slots_used(self) -> int:
        return len(self.ips) + len(self.prefixes)

    def addresses(self) -> tuple[str, ...]:
        """Every address the VPC delivers to this ENI: its own (primary first), then its prefixes' (all 16)."""
        return self.ips + tuple(str(a) for p in self.prefixes for a in ipaddress.ip_network(p))

    @cached_property
    def taken(self) -> frozenset[int]:
        """addresses() as integers, worked out once per ENI (snapshots share the ENIs no change touched)."""
        return frozenset(int(ipaddress.ip_address(ip)) for ip in self.addresses())


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    vpcs: dict[str, Vpc] = field(default_factory=dict)
    subnets: dict[str, Subnet] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    enis: dict[str, Eni] = field(default_factory=dict)

    def enis_of(self, instance_id: str) -> list[Eni]:
        """The ENIs attached to an instance, by device index."""
        attached = [e for e in self.enis.values() if e.instance_id == instance_id]
        return sorted(attached, key=lambda e: e.device_index)

    def eni_by_attachment(self, attachment_id: str) -> Eni | None:
        return next((e for e in self.enis.values() if e.attachment_id == attachment_id), None)

    def holder(self, ip: str) -> Eni | None:
        """The ENI that holds `ip` as one of its own addresses (not through a prefix)."""
        return next((e for e in self.enis.values() if ip in e.ips), None)

    def prefix_holder(self, ip: str) -> Eni | None:
        """The ENI with a delegated prefix that contains `ip`."""
        address = ipaddress.ip_address(ip)
        return next((e for e in self.enis.values() for p in e.prefixes if address in ipaddress.ip_network(p)), None)

    def free_ips(self, subnet_id: str) -> list[str]:
        """Addresses of a subnet that no ENI holds, no prefix covers and EC2 does not keep, lowest first."""
        return [str(ipaddress.IPv4Address(n)) for n in self.free_addresses(subnet_id)]

    def free_addresses(self, subnet_id: str) -> list[int]:
        """free_ips as integers (a /16 has 65,000 of them: no text made for those not picked)."""
        net = ipaddress.ip_network(self.subnets[subnet_id].cidr)
        used = self._taken(subnet_id)
        low, high = int(net.network_address) + RESERVED_LOW, int(net.broadcast_address)
        return [n for n in range(low, high) if n not in used]

    def free_prefixes(self, subnet_id: str) -> list[str]:
        """The aligned /28 blocks of a subnet holding no reserved address, no ENI's address and no
        part of another prefix, lowest first: what EC2 can still delegate."""
        net = ipaddress.ip_network(self.subnets[subnet_id].cidr)
        used = self._taken(subnet_id)
        low, high = int(net.network_address) + RESERVED_LOW, int(net.broadcast_address)
        free = []
        for block in net.subnets(new_prefix=PREFIX_LEN) if net.prefixlen <= PREFIX_LEN else ():
            first = int(block.network_address)
            if first >= low and first + PREFIX_SIZE - 1 < high and not used.intersection(range(first, first + PREFIX_SIZE)):
                free.append(str(block))
        return free

    def _taken(self, subnet_id: str) -> set[int]:
        return set().union(*(e.taken for e in self.enis.values() if e.subnet_id == subnet_id))

    @classmethod
    def from_describe(cls, taken_at: float, vpcs: list[dict], subnets: list[dict],
                      reservations: list[dict], enis: list[dict]) -> "Snapshot":
        """Build from the responses of DescribeVpcs, -Subnets, -Instances, -NetworkInterfaces."""
        return cls(
            taken_at,
            {v["VpcId"]: _vpc(v) for v in vpcs},
            {s["SubnetId"]: Subnet(s["SubnetId"], s["VpcId"], s["CidrBlock"], s["AvailabilityZone"])
             for s in subnets},
            {i["InstanceId"]: _instance(i) for r in reservations for i in r["Instances"]
             if i["State"]["Name"] not in ("terminated", "shutting-down")},
            {e["NetworkInterfaceId"]: _eni(e) for e in enis},
        )

    def to_dict(self) -> dict:
        """As JSON can carry it (the lab's control socket); `from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Snapshot":
        return cls(
            d["taken_at"],
            {k: Vpc(v["id"], tuple(v["cidrs"])) for k, v in d["vpcs"].items()},
            {k: Subnet(**v) for k, v in d["subnets"].items()},
            {k: Instance(**v) for k, v in d["instances"].items()},
            {k: Eni(**{**v, "ips": tuple(v["ips"]), "groups": tuple(tuple(g) for g in v["groups"]),
                       "prefixes": tuple(v["prefixes"])}) for k, v in d["enis"].items()},
        )

    def with_enis_read(self, taken_at: float, read: frozenset[str], enis: list[dict]) -> "Snapshot":
        """This snapshot with the ENIs in `read` as DescribeNetworkInterfaces now shows them (`enis`);
        one of them missing from the answer is gone."""
        kept = {k: v for k, v in self.enis.items() if k not in read}
        kept.update((e["NetworkInterfaceId"], _eni(e)) for e in enis)
        return Snapshot(taken_at, self.vpcs, self.subnets, self.instances, kept)


def _vpc(v: dict) -> Vpc:
    associated = [a["CidrBlock"] for a in v.get("CidrBlockAssociationSet", [])
                  if a.get("CidrBlockState", {}).get("State") == "associated"]
    others = [c for c in associated if c != v["CidrBlock"]]
    return Vpc(v["VpcId"], (v["CidrBlock"], *others))


def _instance(i: dict) -> Instance:
    return Instance(i["InstanceId"], i["InstanceType"], i["Placement"]["AvailabilityZone"],
                    i.get("SubnetId", ""), i.get("VpcId", ""), i.get("PrivateIpAddress", ""),
                    i.get("ImageId", ""))


def _eni(e: dict) -> Eni:
    addresses = e.get("PrivateIpAddresses", [])
    ips = [a["PrivateIpAddress"] for a in addresses if a.get("Primary")]
    ips += [a["PrivateIpAddress"] for a in addresses if not a.get("Primary")]
    attachment = e.get("Attachment") or {}
    attached = e.get("Status") == "in-use" and attachment.get("InstanceId")
    return Eni(
        e["NetworkInterfaceId"], e["MacAddress"], e["SubnetId"], e["VpcId"], e["AvailabilityZone"],
        e.get("OwnerId", ""), tuple(ips), tuple((g["GroupId"], g.get("GroupName", "")) for g in e.get("Groups", [])),
        e.get("Status", "available"),
        attachment.get("InstanceId") if attached else None,
        int(attachment["DeviceIndex"]) if attached else None,
        attachment.get("AttachmentId") if attached else None,
        tuple(p["Ipv4Prefix"] for p in e.get("Ipv4Prefixes", [])),
    )
