"""IPv4 prefixes (prefix delegation) under the EC2 rules the lab's front enforces, as pure logic on
snapshots: aligned /28s of the subnet, one IPv4 slot each, never overlapping an address, another prefix
or the subnet's reserved addresses, InsufficientCidrBlocks in a fragmented subnet, Nitro types only."""

import ipaddress
import random

import pytest

from vpclab.ec2model import Snapshot
from vpclab.ec2rules import INSUFFICIENT_CIDR_BLOCKS, Rejection, vet
from vpclab.instance_types import limits

from .samples import SUBNET, WIDE, eni, snapshot

NODE = eni("eni-p", ["10.0.1.10"], "i-1", 0, subnet=WIDE)


def wide(*enis, instance_type="m5.large") -> Snapshot:
    return snapshot(*enis, instance_type=instance_type, subnets=(SUBNET, WIDE))


def rejected(action, params, snap) -> Rejection:
    with pytest.raises(Rejection) as e:
        vet(action, params, snap, "m5.large")
    return e.value


def assign(*params, eni_id="eni-p"):
    return [("Action", "AssignPrivateIpAddresses"), ("NetworkInterfaceId", eni_id), *params]


def prefixes_of(plan) -> list[ipaddress.IPv4Network]:
    return [ipaddress.ip_network(p) for p in plan.prefixes]


def test_instance_types_carry_their_hypervisor_from_moto():
    assert (limits("m5.large").hypervisor, limits("m5.large").prefixes_supported) == ("nitro", True)
    assert (limits("m4.large").hypervisor, limits("m4.large").prefixes_supported) == ("xen", False)
    assert (limits("t2.medium").hypervisor, limits("t2.medium").prefixes_supported) == ("xen", False)
    assert limits("m5.metal").prefixes_supported  # bare metal: no hypervisor, prefixes all the same


def test_a_count_takes_aligned_free_blocks_of_the_subnet_and_never_the_reserved_ones():
    snap = wide(NODE, eni("eni-o", ["10.0.1.100"], subnet=WIDE))
    # a /24 has 16 /28s; the first holds .0-.3 and the last .255 (EC2 keeps them), .96/28 holds .100
    assert len(snap.free_prefixes("subnet-w")) == 13 and "10.0.1.96/28" not in snap.free_prefixes("subnet-w")
    plan = vet("AssignPrivateIpAddresses", assign(("Ipv4PrefixCount", "9")), snap, "m5.large", random.Random(3))
    got = prefixes_of(plan)
    assert len(got) == 9 and len(set(got)) == 9
    subnet = ipaddress.ip_network(WIDE.cidr)
    for net in got:
        assert net.prefixlen == 28 and int(net.network_address) % 16 == 0 and net.subnet_of(subnet)
        assert net.network_address != subnet.network_address and net.broadcast_address != subnet.broadcast_address
        assert ipaddress.ip_address("10.0.1.100") not in net
    assert dict(plan.params).keys() == {"Action", "NetworkInterfaceId"}  # nothing of it goes to moto


def test_the_answer_lists_only_the_new_prefixes():
    from botocore import parsers
    import botocore.session

    snap = wide(eni("eni-p", ["10.0.1.10"], "i-1", 0, subnet=WIDE, prefixes=["10.0.1.32/28"]))
    plan = vet("AssignPrivateIpAddresses", assign(("Ipv4Prefix.1", "10.0.1.64/28")), snap, "m5.large")
    shape = botocore.session.get_session().get_service_model("ec2").operation_model(
        "AssignPrivateIpAddresses").output_shape
    parsed = parsers.create_parser("ec2").parse({"status_code": 200, "headers": {}, "body": plan.reply}, shape)
    assert parsed["AssignedIpv4Prefixes"] == [{"Ipv4Prefix": "10.0.1.64/28"}]
    assert parsed["AssignedPrivateIpAddresses"] == []
    assert plan.prefixes == ("10.0.1.32/28", "10.0.1.64/28")


@pytest.mark.parametrize("prefix, code, message", [
    ("10.0.1.17/28", "InvalidParameterValue", "Invalid value '10.0.1.17/28' for Ipv4Prefix: give an aligned /28 IPv4 CIDR block"),
    ("10.0.1.32/27", "InvalidParameterValue", "Invalid value '10.0.1.32/27' for Ipv4Prefix: give an aligned /28 IPv4 CIDR block"),
    ("10.0.1.32", "InvalidParameterValue", "Invalid value '10.0.1.32' for Ipv4Prefix: give an aligned /28 IPv4 CIDR block"),
    ("10.0.2.16/28", "InvalidParameterValue", "Prefix 10.0.2.16/28 does not fall within the subnet's address range"),
    ("10.0.1.0/28", "InvalidParameterValue", "Prefix 10.0.1.0/28 is in subnet's reserved address range"),
    ("10.0.1.240/28", "InvalidParameterValue", "Prefix 10.0.1.240/28 is in subnet's reserved address range"),
    ("10.0.1.16/28", "InvalidIPAddress.InUse", "The specified prefix 10.0.1.16/28 is already in use."),  # holds .20
    ("10.0.1.48/28", "InvalidIPAddress.InUse", "The specified prefix 10.0.1.48/28 is already in use."),  # delegated
])
def test_explicit_prefixes_are_checked(prefix, code, message):
    snap = wide(NODE, eni("eni-o", ["10.0.1.20"], subnet=WIDE, prefixes=["10.0.1.48/28"]))
    r = rejected("AssignPrivateIpAddresses", assign(("Ipv4Prefix.1", prefix)), snap)
    assert (r.code, r.message) == (code, message)


def test_prefixes_and_addresses_share_the_enis_ipv4_slots():
    # m5.large: 10 IPv4 slots per ENI
    nine = eni("eni-p", ["10.0.1.10"] + [f"10.0.1.{n}" for n in range(20, 28)], "i-1", 0, subnet=WIDE)
    snap = wide(nine)
    assert len(vet("AssignPrivateIpAddresses", assign(("Ipv4PrefixCount", "1")), snap, "m5.large").prefixes) == 1
    r = rejected("AssignPrivateIpAddresses", assign(("Ipv4PrefixCount", "2")), snap)
    assert (r.code, r.message) == ("PrivateIpAddressLimitExceeded", "Number of private addresses will exceed limit.")
    # an ENI with 9 prefixes has one slot left for an address
    delegated = eni("eni-p", ["10.0.1.10"], "i-1", 0, subnet=WIDE,
                    prefixes=[f"10.0.1.{16 * n}/28" for n in range(2, 11)])
    snap = wide(delegated)
    r = rejected("AssignPrivateIpAddresses", assign(("SecondaryPrivateIpAddressCount", "1")), snap)
    assert r.code == "PrivateIpAddressLimitExceeded"
    r = rejected("AssignPrivateIpAddresses", assign(("Ipv4PrefixCount", "1")), snap)
    assert r.code == "PrivateIpAddressLimitExceeded"


def test_single_addresses_never_come_from_inside_a_prefix():
    # prefixes over .16-.191 and .208-.239: what is left is .6-.15, .193-.207 and .240-.254
    taken = [f"10.0.1.{16 * n}/28" for n in range(1, 15) if n != 12]
    snap = wide(eni("eni-p", ["10.0.1.192"], "i-1", 0, subnet=WIDE),
                eni("eni-o", ["10.0.1.4"], subnet=WIDE, prefixes=taken[:9]),
                eni("eni-q", ["10.0.1.5"], subnet=WIDE, prefixes=taken[9:]))
    expected = [f"10.0.1.{n}" for n in [*range(6, 16), *range(193, 208), *range(240, 255)]]
    assert snap.free_ips("subnet-w") == expected
    plan = vet("AssignPrivateIpAddresses", assign(("SecondaryPrivateIpAddressCount", "9")), snap, "m5.large")
    assert {v for k, v in plan.params if k.startswith("PrivateIpAddress.")} <= set(expected)
    for ip in ("10.0.1.17", "10.0.1.100"):  # inside prefixes: not even with AllowReassignment
        params = assign(("PrivateIpAddress.1", ip), ("AllowReassignment", "true"))
        assert rejected("AssignPrivateIpAddresses", params, snap).code == "InvalidIPAddress.InUse"
    create = [("SubnetId", "subnet-w"), ("PrivateIpAddress", "10.0.1.33")]
    assert rejected("CreateNetworkInterface", create, snap).code == "InvalidIPAddress.InUse"


def test_a_fragmented_subnet_has_addresses_but_no_cidr_block():
    # one address taken in every /28 that could be delegated
    scattered = [f"10.0.1.{16 * n + 5}" for n in range(1, 15)]
    snap = wide(NODE, eni("eni-o", scattered[:7], subnet=WIDE), eni("eni-q", scattered[7:], subnet=WIDE))
    assert snap.free_prefixes("subnet-w") == [] and len(snap.free_ips("subnet-w")) > 200
    r = rejected("AssignPrivateIpAddresses", assign(("Ipv4PrefixCount", "1")), snap)
    assert (r.status, r.code, r.message) == (400, "InsufficientCidrBlocks", INSUFFICIENT_CIDR_BLOCKS)
    assert r.message == "The specified subnet does not have enough free cidr blocks to satisfy the request."
    plan = vet("AssignPrivateIpAddresses", assign(("SecondaryPrivateIpAddressCount", "1")), snap, "m5.large")
    assert len([k for k, _ in plan.params if k.startswith("PrivateIpAddress.")]) == 1


def test_non_nitro_instance_types_refuse_prefixes():
    snap = wide(NODE, instance_type="m4.large")
    for way in (("Ipv4PrefixCount", "1"), ("Ipv4Prefix.1", "10.0.1.32/28")):
        r = rejected("AssignPrivateIpAddresses", assign(way), snap)
        assert r.code == "InvalidParameterValue" and "not supported for instance type m4.large" in r.message
    # an ENI made with prefixes (no instance yet) is refused at the attach to a Xen instance
    made = eni("eni-f", ["10.0.1.20"], subnet=WIDE, prefixes=["10.0.1.32/28"])
    params = [("NetworkInterfaceId", "eni-f"), ("InstanceId", "i-1"), ("DeviceIndex", "1")]
    assert rejected("AttachNetworkInterface", params, wide(NODE, made, instance_type="m4.large")).code == \
        "InvalidParameterValue"
    assert vet("AttachNetworkInterface", params, wide(NODE, made), "m5.large").params == params


@pytest.mark.parametrize("ways", [
    (("Ipv4PrefixCount", "1"), ("Ipv4Prefix.1", "10.0.1.32/28")),
    (("Ipv4PrefixCount", "1"), ("SecondaryPrivateIpAddressCount", "1")),
    (("Ipv4Prefix.1", "10.0.1.32/28"), ("PrivateIpAddress.1", "10.0.1.20")),
])
def test_assign_takes_exactly_one_way_to_say_what(ways):
    r = rejected("AssignPrivateIpAddresses", assign(*ways), wide(NODE))
    assert r.code == "InvalidParameterCombination"
    assert rejected("AssignPrivateIpAddresses", assign(), wide(NODE)).code == "MissingParameter"
    assert rejected("AssignPrivateIpAddresses", assign(("Ipv4PrefixCount", "0")), wide(NODE)).code == \
        "InvalidParameterValue"


def test_unassign_prefixes():
    snap = wide(eni("eni-p", ["10.0.1.10", "10.0.1.11"], "i-1", 0, subnet=WIDE,
                    prefixes=["10.0.1.32/28", "10.0.1.64/28"]))
    r = rejected("UnassignPrivateIpAddresses", assign(("Ipv4Prefix.1", "10.0.1.96/28")), snap)
    assert (r.code, r.message) == ("InvalidParameterValue",
                                   "Some of the specified prefixes are not assigned to interface eni-p")
    plan = vet("UnassignPrivateIpAddresses", assign(("Ipv4Prefix.1", "10.0.1.32/28")), snap, "m5.large")
    assert plan.prefixes == ("10.0.1.64/28",) and "Ipv4Prefix.1" not in dict(plan.params)
    plan = vet("UnassignPrivateIpAddresses", assign(("PrivateIpAddress.1", "10.0.1.11")), snap, "m5.large")
    assert plan.prefixes is None  # addresses only: the prefixes stay as they are


def test_create_with_prefixes_keeps_them_off_its_own_addresses():
    snap = wide(NODE)
    for seed in range(20):
        params = [("SubnetId", "subnet-w"), ("SecondaryPrivateIpAddressCount", "3"), ("Ipv4PrefixCount", "6")]
        plan = vet("CreateNetworkInterface", params, snap, "m5.large", random.Random(seed))
        addresses = [ipaddress.ip_address(v) for k, v in plan.params if k.endswith(".PrivateIpAddress")]
        assert len(addresses) == 4 and len(plan.prefixes) == 6
        assert not any(a in net for a in addresses for net in prefixes_of(plan))
    explicit = [("SubnetId", "subnet-w"), ("Ipv4Prefix.1.Ipv4Prefix", "10.0.1.32/28")]
    for seed in range(60):  # the primary EC2 picks never falls in the prefix the request names
        plan = vet("CreateNetworkInterface", explicit, snap, "m5.large", random.Random(seed))
        assert plan.prefixes == ("10.0.1.32/28",)
        assert ipaddress.ip_address(dict(plan.params)["PrivateIpAddress"]) not in ipaddress.ip_network("10.0.1.32/28")
    too_many = [("SubnetId", "subnet-w"), ("Ipv4PrefixCount", "10")]  # 1 primary + 10 > 10 slots
    assert rejected("CreateNetworkInterface", too_many, snap).code == "PrivateIpAddressLimitExceeded"
