"""What EC2 enforces and moto 5.2.5 does not, checked before a call goes on to moto.

`vet` either raises Rejection with EC2's error code and message, or returns what to forward. Address
counts (SecondaryPrivateIpAddressCount, a missing primary address) are replaced by addresses the lab
picks from the subnet's free ones: moto draws random addresses from the whole CIDR, so it hands out the
subnet's reserved addresses and addresses other ENIs hold, and loops forever once a subnet is full.

IPv4 prefixes (prefix delegation): moto 5.2.5 ignores Ipv4Prefix* parameters, so the lab keeps them.
AssignPrivateIpAddresses takes Ipv4PrefixCount or Ipv4Prefix.N, UnassignPrivateIpAddresses
Ipv4Prefix.N, CreateNetworkInterface Ipv4PrefixCount or Ipv4Prefix.N.Ipv4Prefix. A prefix is an aligned
/28 of the ENI's subnet; it fills one of the ENI's IPv4 slots (Ipv4AddressesPerInterface, shared with
its addresses); it never overlaps an address an ENI holds, another prefix, or the subnet's reserved
addresses (first four, last), and no address inside a prefix is handed out on its own. A count that
finds no aligned free /28 is InsufficientCidrBlocks, even when single addresses are left. Only ENIs of
Nitro (or bare metal) instance types take prefixes. The Plan carries the ENI's prefixes after the
call (`prefixes`), which the front applies once moto accepted the call.
"""

from __future__ import annotations

import ipaddress
import random
import re
import uuid
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from . import instance_types
from .ec2model import PREFIX_LEN, Eni, Snapshot, Subnet

Params = list[tuple[str, str]]

ADDRESS_WAYS = "PrivateIpAddresses, SecondaryPrivateIpAddressCount, Ipv4Prefixes or Ipv4PrefixCount"
# EC2's own text (as EKS's best-practices guide quotes the node event); InsufficientFreeAddressesInSubnet's
# is EC2's too
INSUFFICIENT_CIDR_BLOCKS = "The specified subnet does not have enough free cidr blocks to satisfy the request."
INSUFFICIENT_ADDRESSES = "The specified subnet does not have enough free addresses to satisfy the request."


class Rejection(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass
class Plan:
    """The call to forward, calls to make before it (an address taken from another ENI), the body to
    answer with instead of moto's when moto accepts the call, and the ENI's IPv4 prefixes once the call
    succeeded (None: unchanged; the ENI is the call's NetworkInterfaceId, or the one it creates)."""
    params: Params
    before: list[tuple[str, Params]] = field(default_factory=list)
    reply: bytes | None = None
    prefixes: tuple[str, ...] | None = None


def error_xml(code: str, message: str) -> bytes:
    """An error body as EC2 sends it; botocore reads Code and Message from it."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
            f'<Message>{escape(message)}</Message></Error></Errors>'
            f'<RequestID>{uuid.uuid4()}</RequestID></Response>').encode()


def assigned_xml(eni_id: str, addresses: list[str], prefixes: list[str] = ()) -> bytes:
    """AssignPrivateIpAddresses' answer as EC2 gives it: only the addresses and prefixes this call
    assigned (moto lists all of the ENI's, primary included, which a pool would take for new ones)."""
    items = "".join(f"<item><privateIpAddress>{ip}</privateIpAddress></item>" for ip in addresses)
    delegated = "".join(f"<item><ipv4Prefix>{p}</ipv4Prefix></item>" for p in prefixes)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<AssignPrivateIpAddressesResponse '
            f'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>{uuid.uuid4()}</requestId>'
            f'<networkInterfaceId>{eni_id}</networkInterfaceId><assignedPrivateIpAddressesSet>{items}'
            f'</assignedPrivateIpAddressesSet><assignedIpv4PrefixSet>{delegated}</assignedIpv4PrefixSet>'
            f'</AssignPrivateIpAddressesResponse>').encode()


def created_eni_id(body: bytes) -> str | None:
    """The ENI id in CreateNetworkInterface's answer."""
    found = re.search(rb"<networkInterfaceId>(eni-[0-9a-f]+)</networkInterfaceId>", body)
    return found.group(1).decode() if found else None


def with_prefix_set(body: bytes, prefixes: tuple[str, ...]) -> bytes:
    """CreateNetworkInterface's answer with the new ENI's ipv4PrefixSet (moto's has none)."""
    items = "".join(f"<item><ipv4Prefix>{p}</ipv4Prefix></item>" for p in prefixes).encode()
    head, tail = body.rsplit(b"</networkInterface>", 1)
    return head + b"<ipv4PrefixSet>" + items + b"</ipv4PrefixSet></networkInterface>" + tail


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
    prefixes = _indexed(params, "Ipv4Prefix")
    prefix_count = _count(params, "Ipv4PrefixCount")
    ways = sum(1 for way in (explicit, count, prefixes, prefix_count) if way)
    if ways > 1:
        raise Rejection("InvalidParameterCombination", f"Specify only one of {ADDRESS_WAYS}.")
    if ways == 0:
        raise Rejection("MissingParameter", f"The request must contain {ADDRESS_WAYS}.")
    limits = _limits(snap, eni, default_type)
    subnet = snap.subnets[eni.subnet_id]
    if prefixes or prefix_count:
        _check_prefixes_supported(limits)
        chosen = _delegate(snap, eni, subnet, limits, prefixes, prefix_count or 0, rng)
        return Plan(_without(params, "Ipv4Prefix", "Ipv4PrefixCount"), reply=assigned_xml(eni.id, [], chosen),
                    prefixes=eni.prefixes + tuple(chosen))
    if count is not None:
        _check_limit(eni.slots_used + count, limits.ipv4_per_eni)
        chosen = _pick(snap, subnet, count, rng)
        numbered = [(f"PrivateIpAddress.{i}", ip) for i, ip in enumerate(chosen, 1)]
        return Plan(_without(params, "SecondaryPrivateIpAddressCount") + numbered, reply=assigned_xml(eni.id, chosen))
    reassign = (_get(params, "AllowReassignment") or "").lower() == "true"
    new = [ip for ip in dict.fromkeys(explicit) if ip not in eni.ips]
    before = []
    for ip in new:
        _check_address(subnet, ip)
        _check_not_delegated(snap, ip)
        holder = snap.holder(ip)
        if holder is not None:
            if not reassign or ip == holder.ips[0]:
                raise Rejection("InvalidIPAddress.InUse", "The specified address is already in use.")
            before.append(("UnassignPrivateIpAddresses",
                           [("NetworkInterfaceId", holder.id), ("PrivateIpAddress.1", ip)]))
    _check_limit(eni.slots_used + len(new), limits.ipv4_per_eni)
    return Plan(params, before, assigned_xml(eni.id, new))


def _unassign(params: Params, snap: Snapshot, default_type: str, rng: random.Random) -> Plan:
    eni = snap.enis.get(_get(params, "NetworkInterfaceId") or "")
    if eni is None:
        return Plan(params)
    ips = _indexed(params, "PrivateIpAddress")
    prefixes = _indexed(params, "Ipv4Prefix")
    if not ips and not prefixes:
        raise Rejection("MissingParameter", "The request must contain the parameter PrivateIpAddresses or Ipv4Prefixes.")
    for ip in ips:
        if ip not in eni.ips:
            raise Rejection("InvalidParameterValue",
                            f"Some of the specified addresses are not assigned to interface {eni.id}")
        if ip == eni.ips[0]:
            raise Rejection("InvalidParameterValue",
                            f"The primary private IP address {ip} of interface {eni.id} cannot be unassigned.")
    for prefix in prefixes:
        if prefix not in eni.prefixes:
            raise Rejection("InvalidParameterValue",
                            f"Some of the specified prefixes are not assigned to interface {eni.id}")
    kept = tuple(p for p in eni.prefixes if p not in prefixes)
    return Plan(_without(params, "Ipv4Prefix"), prefixes=kept if prefixes else None)


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
        _check_not_delegated(snap, ip)
        if snap.holder(ip) is not None:
            raise Rejection("InvalidIPAddress.InUse", "The specified address is already in use.")
    count = _count(params, "SecondaryPrivateIpAddressCount") or 0
    prefixes = _listed_prefixes(params)
    prefix_count = _count(params, "Ipv4PrefixCount")
    if prefixes and prefix_count:
        raise Rejection("InvalidParameterCombination", "Specify either Ipv4Prefixes or Ipv4PrefixCount, not both.")
    wanted = len(explicit) + count + (0 if primary else 1)
    limits = instance_types.limits(default_type)
    _check_limit(wanted + len(prefixes) + (prefix_count or 0), limits.ipv4_per_eni)
    # EC2 picks the addresses it chooses outside the prefixes the request names
    in_named_prefixes = {str(a) for prefix in prefixes for a in _prefix(prefix)}
    picked = _pick(snap, subnet, wanted - len(explicit), rng, exclude=set(explicit) | in_named_prefixes)
    if primary is None:
        primary = picked.pop(0)
    delegated = None
    if prefixes or prefix_count:
        # the new ENI's addresses are not in `snap`: a prefix must not take them either
        holding = _with_eni(snap, subnet, [primary] + others + picked)
        delegated = tuple(_delegate(holding, holding.enis[NEW_ENI], subnet, limits, prefixes, prefix_count or 0, rng))
    rewritten = _without(params, "PrivateIpAddress", "PrivateIpAddresses", "SecondaryPrivateIpAddressCount",
                         "Ipv4Prefix", "Ipv4PrefixCount")
    rewritten.append(("PrivateIpAddress", primary))
    for i, ip in enumerate([primary] + others + picked, 1):
        rewritten += [(f"PrivateIpAddresses.{i}.PrivateIpAddress", ip),
                      (f"PrivateIpAddresses.{i}.Primary", "true" if i == 1 else "false")]
    return Plan(rewritten, prefixes=delegated)


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
    _check_limit(eni.slots_used, limits.ipv4_per_eni)
    if eni.prefixes:
        _check_prefixes_supported(limits)
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


NEW_ENI = "eni-being-created"


def _delegate(snap: Snapshot, eni: Eni, subnet: Subnet, limits: instance_types.Limits, explicit: list[str],
              count: int, rng: random.Random) -> list[str]:
    """The prefixes to add to `eni`: `explicit` ones checked, or `count` aligned free /28s at random."""
    new = list(dict.fromkeys(explicit))
    _check_limit(eni.slots_used + (len(new) or count), limits.ipv4_per_eni)
    if not new:
        free = snap.free_prefixes(subnet.id)
        if count > len(free):
            raise Rejection("InsufficientCidrBlocks", INSUFFICIENT_CIDR_BLOCKS)
        return sorted(rng.sample(free, count), key=lambda p: ipaddress.ip_network(p).network_address)
    free = set(snap.free_prefixes(subnet.id))
    for prefix in new:
        net = _prefix(prefix)
        if not net.subnet_of(ipaddress.ip_network(subnet.cidr)):
            raise Rejection("InvalidParameterValue", f"Prefix {prefix} does not fall within the subnet's address range")
        if str(net) not in free:
            if any(subnet.reserved(str(a)) for a in (net.network_address, net.broadcast_address)):
                raise Rejection("InvalidParameterValue", f"Prefix {prefix} is in subnet's reserved address range")
            raise Rejection("InvalidIPAddress.InUse", f"The specified prefix {prefix} is already in use.")
    return new


def _prefix(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError:
        net = None
    if net is None or net.prefixlen != PREFIX_LEN:
        raise Rejection("InvalidParameterValue",
                        f"Invalid value '{text}' for Ipv4Prefix: give an aligned /{PREFIX_LEN} IPv4 CIDR block")
    return net


def _check_prefixes_supported(limits: instance_types.Limits) -> None:
    # EC2's exact wording for a Xen type was not found in its documentation; code and gist as EC2's
    # parameter refusals give them
    if not limits.prefixes_supported:
        raise Rejection("InvalidParameterValue", f"IPv4 prefix delegation is not supported for instance type "
                        f"{limits.instance_type} (hypervisor {limits.hypervisor or 'none'}): Nitro instances only.")


def _check_not_delegated(snap: Snapshot, ip: str) -> None:
    """An address inside a delegated prefix is that prefix's: never assigned on its own, not even
    with AllowReassignment."""
    if snap.prefix_holder(ip) is not None:
        raise Rejection("InvalidIPAddress.InUse", "The specified address is already in use.")


def _with_eni(snap: Snapshot, subnet: Subnet, ips: list[str]) -> Snapshot:
    """`snap` plus a detached ENI holding `ips` in `subnet`, standing for one being created."""
    eni = Eni(NEW_ENI, "", subnet.id, subnet.vpc_id, subnet.az, "", tuple(ips), (), "available")
    return Snapshot(snap.taken_at, snap.vpcs, snap.subnets, snap.instances, {**snap.enis, NEW_ENI: eni})


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
    excluded = {int(ipaddress.ip_address(ip)) for ip in exclude}
    free = [a for a in snap.free_addresses(subnet.id) if a not in excluded]
    if n > len(free):
        raise Rejection("InsufficientFreeAddressesInSubnet", INSUFFICIENT_ADDRESSES)
    return [str(ipaddress.IPv4Address(a)) for a in rng.sample(free, n)]


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


def _listed_prefixes(params: Params) -> list[str]:
    """CreateNetworkInterface's Ipv4Prefix.N.Ipv4Prefix values, in index order."""
    found = []
    for k, v in params:
        parts = k.split(".")
        if len(parts) == 3 and parts[0] == "Ipv4Prefix" and parts[1].isdigit() and parts[2] == "Ipv4Prefix":
            found.append((int(parts[1]), v))
    return [v for _, v in sorted(found)]


def _without(params: Params, *keys: str) -> Params:
    """params minus `keys` and anything under them (key.N...)."""
    return [(k, v) for k, v in params if not any(k == key or k.startswith(key + ".") for key in keys)]
