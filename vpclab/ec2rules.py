"""What EC2 enforces and moto 5.2.5 does not, checked before a call goes on to moto.

`vet` either raises Rejection with EC2's error code and message, or returns what to forward. Address
counts (SecondaryPrivateIpAddressCount, a missing primary address) are replaced by addresses the lab
picks from the subnet's free ones: moto draws random addresses from the whole CIDR, so it hands out the
subnet's reserved addresses and addresses other ENIs hold, and loops forever once a subnet is full.
"""

from __future__ import annotations

import ipaddress
import random
import uuid
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from . import instance_types
from .ec2model import Eni, Snapshot, Subnet

Params = list[tuple[str, str]]


class Rejection(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass
class Plan:
    """The call to forward, calls to make before it (an address taken from another ENI), and the body
    to answer with instead of moto's when moto accepts the call."""
    params: Params
    before: list[tuple[str, Params]] = field(default_factory=list)
    reply: bytes | None = None


def error_xml(code: str, message: str) -> bytes:
    """An error body as EC2 sends it; botocore reads Code and Message from it."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
            f'<Message>{escape(message)}</Message></Error></Errors>'
            f'<RequestID>{uuid.uuid4()}</RequestID></Response>').encode()


def assigned_xml(eni_id: str, addresses: list[str]) -> bytes:
    """AssignPrivateIpAddresses' answer as EC2 gives it: only the addresses this call assigned
    (moto lists all of the ENI's, primary included, which a pool would take for new ones)."""
    items = "".join(f"<item><privateIpAddress>{ip}</privateIpAddress></item>" for ip in addresses)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<AssignPrivateIpAddressesResponse '
            f'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>{uuid.uuid4()}</requestId>'
            f'<networkInterfaceId>{eni_id}</networkInterfaceId><assignedPrivateIpAddressesSet>{items}'
            f'</assignedPrivateIpAddressesSet><assignedIpv4PrefixSet/></AssignPrivateIpAddressesResponse>').encode()


def vet(action: str, params: Params, snap: Snapshot, default_type: str,
        rng: random.Random | None = None) -> Plan:
    """Check one call against `snap`; `default_type` gives the limits of ENIs not attached anywhere."""
    rule = RULES.get(action)
    if rule is None:
        return Plan(params)
    return rule(params, snap, default_type, rng or random.Random())


# --- rules -----------------------------------------------------------------------------------------

def _assign(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    eni = snap.enis.get(_get(params, "NetworkInterfaceId") or "")
    if eni is None:
        return Plan(params)  # moto answers InvalidNetworkInterfaceID.NotFound
    explicit = _indexed(params, "PrivateIpAddress")
    count = _count(params, "SecondaryPrivateIpAddressCount")
    if explicit and count is not None:
        raise Rejection("InvalidParameterCombination",
                        "Specify either PrivateIpAddresses or SecondaryPrivateIpAddressCount, not both.")
    if not explicit and count is None:
        raise Rejection("MissingParameter",
                        "The request must contain PrivateIpAddresses or SecondaryPrivateIpAddressCount.")
    limit = _limits(snap, eni, default_type).ipv4_per_eni
    subnet = snap.subnets[eni.subnet_id]
    if count is not None:
        _check_limit(len(eni.ips) + count, limit)
        chosen = _pick(snap, subnet, count, rng)
        numbered = [(f"PrivateIpAddress.{i}", ip) for i, ip in enumerate(chosen, 1)]
        return Plan(_without(params, "SecondaryPrivateIpAddressCount") + numbered, reply=assigned_xml(eni.id, chosen))
    reassign = (_get(params, "AllowReassignment") or "").lower() == "true"
    new = [ip for ip in dict.fromkeys(explicit) if ip not in eni.ips]
    before = []
    for ip in new:
        _check_address(subnet, ip)
        holder = snap.holder(ip)
        if holder is not None:
            if not reassign or ip == holder.ips[0]:
                raise Rejection("InvalidIPAddress.InUse", "The specified address is already in use.")
            before.append(("UnassignPrivateIpAddresses",
                           [("NetworkInterfaceId", holder.id), ("PrivateIpAddress.1", ip)]))
    _check_limit(len(eni.ips) + len(new), limit)
    return Plan(params, before, assigned_xml(eni.id, new))


def _unassign(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    eni = snap.enis.get(_get(params, "NetworkInterfaceId") or "")
    if eni is None:
        return Plan(params)
    ips = _indexed(params, "PrivateIpAddress")
    if not ips:
        raise Rejection("MissingParameter", "The request must contain the parameter PrivateIpAddresses.")
    for ip in ips:
        if ip not in eni.ips:
            raise Rejection("InvalidParameterValue",
                            f"Some of the specified addresses are not assigned to interface {eni.id}")
        if ip == eni.ips[0]:
            raise Rejection("InvalidParameterValue",
                            f"The primary private IP address {ip} of interface {eni.id} cannot be unassigned.")
    return Plan(params)


def _create(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    subnet = snap.subnets.get(_get(params, "SubnetId") or "")
    if subnet is None:
        return Plan(params)  # moto answers InvalidSubnetID.NotFound
    primary = _get(params, "PrivateIpAddress")
    others = []
    for ip, is_primary in _listed_addresses(params):
        if is_primary:
            if primary is not None and primary != ip:
                raise Rejection("InvalidParameterValue", "Only one primary private IP address is allowed.")
            primary = ip
        elif ip != primary and ip not in others:
            others.append(ip)
    explicit = ([primary] if primary else []) + others
    for ip in explicit:
        _check_address(subnet, ip)
        if snap.holder(ip) is not None:
            raise Rejection("InvalidIPAddress.InUse", "The specified address is already in use.")
    count = _count(params, "SecondaryPrivateIpAddressCount") or 0
    wanted = len(explicit) + count + (0 if primary else 1)
    _check_limit(wanted, instance_types.limits(default_type).ipv4_per_eni)
    picked = _pick(snap, subnet, wanted - len(explicit), rng, exclude=set(explicit))
    if primary is None:
        primary = picked.pop(0)
    rewritten = _without(params, "PrivateIpAddress", "PrivateIpAddresses", "SecondaryPrivateIpAddressCount")
    rewritten.append(("PrivateIpAddress", primary))
    for i, ip in enumerate([primary] + others + picked, 1):
        rewritten += [(f"PrivateIpAddresses.{i}.PrivateIpAddress", ip),
                      (f"PrivateIpAddresses.{i}.Primary", "true" if i == 1 else "false")]
    return Plan(rewritten)


def _attach(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    eni = snap.enis.get(_get(params, "NetworkInterfaceId") or "")
    instance = snap.instances.get(_get(params, "InstanceId") or "")
    if eni is None or instance is None:
        return Plan(params)  # moto answers NotFound
    device = _count(params, "DeviceIndex", low=0)
    if device is None:
        raise Rejection("MissingParameter", "The request must contain the parameter deviceIndex")
    if eni.status == "in-use":
        raise Rejection("InvalidNetworkInterface.InUse", f"Interface: [{eni.id}] in use.")
    if eni.az != instance.az:
        raise Rejection("InvalidParameterCombination", "You may not attach a network interface to an instance "
                        "if they are not in the same availability zone")
    attached = snap.enis_of(instance.id)
    if any(e.device_index == device for e in attached):
        raise Rejection("InvalidParameterValue",
                        f"Instance '{instance.id}' already has an interface attached at device index '{device}'.")
    limits = instance_types.limits(instance.type)
    if len(attached) >= limits.max_enis:
        raise Rejection("AttachmentLimitExceeded",
                        f"Interface count {len(attached) + 1} exceeds the limit for {instance.type}")
    if device >= limits.max_enis:
        raise Rejection("AttachmentLimitExceeded",
                        f"Device index {device} exceeds the limit of {limits.max_enis} interfaces for {instance.type}")
    _check_limit(len(eni.ips), limits.ipv4_per_eni)
    return Plan(params)


def _detach(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    eni = snap.eni_by_attachment(_get(params, "AttachmentId") or "")
    if eni is not None and eni.device_index == 0:
        raise Rejection("OperationNotPermitted",
                        "The network interface at device index 0 and networkCard index 0 cannot be detached.")
    return Plan(params)


def _modify(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    eni = snap.enis.get(_get(params, "NetworkInterfaceId") or "")
    attachment = _get(params, "Attachment.AttachmentId")
    if eni is not None and attachment is not None and attachment != eni.attachment_id:
        raise Rejection("InvalidAttachmentID.NotFound", f"The attachment ID '{attachment}' does not exist")
    return Plan(params)


def _delete(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    eni = snap.enis.get(_get(params, "NetworkInterfaceId") or "")
    if eni is not None and eni.status == "in-use":
        raise Rejection("InvalidNetworkInterface.InUse", f"The network interface '{eni.id}' is currently in use.")
    return Plan(params)


RULES = {
    "AssignPrivateIpAddresses": _assign,
    "UnassignPrivateIpAddresses": _unassign,
    "CreateNetworkInterface": _create,
    "AttachNetworkInterface": _attach,
    "DetachNetworkInterface": _detach,
    "ModifyNetworkInterfaceAttribute": _modify,
    "DeleteNetworkInterface": _delete,
}


# --- helpers ---------------------------------------------------------------------------------------

def _limits(snap: Snapshot, eni: Eni, default_type: str) -> instance_types.Limits:
    instance = snap.instances.get(eni.instance_id or "")
    return instance_types.limits(instance.type if instance else default_type)


def _check_limit(total: int, limit: int) -> None:
    if total > limit:
        raise Rejection("PrivateIpAddressLimitExceeded", "Number of private addresses will exceed limit.")


def _check_address(subnet: Subnet, ip: str) -> None:
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        raise Rejection("InvalidParameterValue", f"Invalid value '{ip}' for IP address") from None
    if not subnet.contains(ip):
        raise Rejection("InvalidParameterValue", "Address does not fall within the subnet's address range")
    if subnet.reserved(ip):
        raise Rejection("InvalidParameterValue", f"Address {ip} is in subnet's reserved address range")


def _pick(snap: Snapshot, subnet: Subnet, n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    """n free addresses of the subnet, at random as EC2 hands them out."""
    free = [ip for ip in snap.free_ips(subnet.id) if ip not in exclude]
    if n > len(free):
        raise Rejection("InsufficientFreeAddressesInSubnet",
                        "The specified subnet does not have enough free addresses to satisfy the request.")
    return rng.sample(free, n)


def _get(params: Params, key: str) -> str | None:
    return next((v for k, v in params if k == key), None)


def _count(params: Params, key: str, low: int = 1) -> int | None:
    text = _get(params, key)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise Rejection("InvalidParameterValue", f"Value ({text}) for parameter {key} is invalid.")
    return value


def _indexed(params: Params, prefix: str) -> list[str]:
    """Values of prefix.1, prefix.2, ... in index order."""
    found = []
    for k, v in params:
        head, _, index = k.rpartition(".")
        if head == prefix and index.isdigit():
            found.append((int(index), v))
    return [v for _, v in sorted(found)]


def _listed_addresses(params: Params) -> list[tuple[str, bool]]:
    """(address, primary) of PrivateIpAddresses.N.PrivateIpAddress / .Primary, in index order."""
    entries: dict[int, dict[str, str]] = {}
    for k, v in params:
        parts = k.split(".")
        if len(parts) == 3 and parts[0] == "PrivateIpAddresses" and parts[1].isdigit():
            entries.setdefault(int(parts[1]), {})[parts[2]] = v
    return [(e["PrivateIpAddress"], e.get("Primary", "false").lower() == "true")
            for _, e in sorted(entries.items()) if "PrivateIpAddress" in e]


def _without(params: Params, *keys: str) -> Params:
    """params minus `keys` and anything under them (key.N...)."""
    return [(k, v) for k, v in params if not any(k == key or k.startswith(key + ".") for key in keys)]
