"""IPv4 prefixes through the lab, as a node's boto3 and IMDS clients see them, and in the data plane:
assigned by count and explicitly, shown by DescribeNetworkInterfaces and IMDS's ipv4-prefix, released;
InsufficientCidrBlocks in a fragmented subnet; a Xen instance type refused; a prefix's addresses
delivered to its ENI only while it is assigned."""

import ipaddress
import json

import pytest

from .labtools import probe, python_in, wait_for


MD = "/latest/meta-data/"

# Runs in a node: performs the steps on the node's primary ENI, records each outcome.
PREFIX_SCRIPT = r'''
import json, boto3
from botocore.exceptions import ClientError
ec2 = boto3.client("ec2")
eni, explicit = %r
out = {}
def step(name, call, **kw):
    try:
        reply = getattr(ec2, call)(NetworkInterfaceId=eni, **kw)
        reply.pop("ResponseMetadata")
        out[name] = reply
    except ClientError as e:
        out[name] = [e.response["Error"]["Code"], e.response["Error"]["Message"]]
def described():
    return ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0].get("Ipv4Prefixes", [])
step("explicit", "assign_private_ip_addresses", Ipv4Prefixes=[explicit])
step("explicit_again", "assign_private_ip_addresses", Ipv4Prefixes=[explicit])
step("by_count", "assign_private_ip_addresses", Ipv4PrefixCount=2)
step("both", "assign_private_ip_addresses", Ipv4PrefixCount=1, SecondaryPrivateIpAddressCount=1)
step("addresses", "assign_private_ip_addresses", SecondaryPrivateIpAddressCount=6)
step("slots_full", "assign_private_ip_addresses", Ipv4PrefixCount=1)
out["described"] = described()
print(json.dumps(out))
'''


def imds_prefixes(lab, node, mac) -> tuple[list, str]:
    per_mac = f"{MD}network/interfaces/macs/{mac}/"
    answers = probe(lab, node, "imds", per_mac, per_mac + "ipv4-prefix")["answers"]
    return answers[per_mac + "ipv4-prefix"], answers[per_mac][1]


def test_prefixes_by_count_and_explicit_share_the_slots_and_show_in_describe_and_imds(fresh_lab):
    node = fresh_lab.status()["nodes"][0]
    explicit = "10.0.0.112/28"
    out = python_in(fresh_lab, "node1", PREFIX_SCRIPT % ((node["eni_id"], explicit),), env={"AWS_MAX_ATTEMPTS": "1"})
    by_count = [p["Ipv4Prefix"] for p in out["by_count"]["AssignedIpv4Prefixes"]]
    assert len(by_count) == 2 and out["by_count"]["AssignedPrivateIpAddresses"] == []
    for prefix in by_count:
        net = ipaddress.ip_network(prefix)
        assert net.prefixlen == 28 and net.subnet_of(ipaddress.ip_network("10.0.0.0/24"))
    assert out["explicit"]["AssignedIpv4Prefixes"] == [{"Ipv4Prefix": explicit}] and explicit not in by_count
    assert out["explicit_again"][0] == "InvalidIPAddress.InUse"
    assert out["both"][0] == "InvalidParameterCombination"
    # m5.large: 10 slots = the primary address + 3 prefixes + 6 addresses
    assert len(out["addresses"]["AssignedPrivateIpAddresses"]) == 6
    assert out["slots_full"] == ["PrivateIpAddressLimitExceeded", "Number of private addresses will exceed limit."]
    held = sorted({*by_count, explicit}, key=lambda p: ipaddress.ip_network(p).network_address)
    assert sorted(p["Ipv4Prefix"] for p in out["described"]) == sorted(held)
    addresses = [a["PrivateIpAddress"] for a in out["addresses"]["AssignedPrivateIpAddresses"]]
    assert not any(ipaddress.ip_address(a) in ipaddress.ip_network(p) for a in addresses for p in held)

    # IMDS: one prefix per line; gone from the listing and 404 once none is left
    status, body = imds_prefixes(fresh_lab, "node1", node["mac"])[0]
    assert status == 200 and sorted(body.split("\n")) == sorted(held)
    fresh_lab.ec2("UnassignPrivateIpAddresses", NetworkInterfaceId=node["eni_id"], Ipv4Prefixes=held[:1])
    assert sorted(imds_prefixes(fresh_lab, "node1", node["mac"])[0][1].split("\n")) == sorted(held[1:])
    fresh_lab.ec2("UnassignPrivateIpAddresses", NetworkInterfaceId=node["eni_id"], Ipv4Prefixes=held[1:])
    answer, listing = imds_prefixes(fresh_lab, "node1", node["mac"])
    assert answer[0] == 404 and "ipv4-prefix" not in listing.split("\n") and "local-ipv4s" in listing.split("\n")
    described = fresh_lab.ec2("DescribeNetworkInterfaces", NetworkInterfaceIds=[node["eni_id"]])
    assert described["NetworkInterfaces"][0].get("Ipv4Prefixes", []) == []


FRAGMENT_SCRIPT = r'''
import json, boto3
from botocore.exceptions import ClientError
ec2 = boto3.client("ec2")
out = []
for kw in [{"Ipv4PrefixCount": 1}, {"Ipv4PrefixCount": 1}, {"SecondaryPrivateIpAddressCount": 1}]:
    try:
        reply = ec2.assign_private_ip_addresses(NetworkInterfaceId=%r, **kw)
        out.append(len(reply["AssignedIpv4Prefixes"]) + len(reply["AssignedPrivateIpAddresses"]))
    except ClientError as e:
        out.append([e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"],
                    e.response["Error"]["Message"]])
print(json.dumps(out))
'''


def test_a_fragmented_subnet_answers_insufficient_cidr_blocks_with_addresses_left(fresh_lab):
    node = fresh_lab.status()["nodes"][0]
    fragmented = fresh_lab.fragment_subnet(keep=1)
    assert fragmented["subnet_id"] == node["subnet_id"] and fragmented["enis"]
    # a /24 offers 14 delegable /28s; the node's .10 and .11 sit in the reserved first one; one is kept
    assert len(fragmented["addresses"]) == 13
    out = python_in(fresh_lab, "node1", FRAGMENT_SCRIPT % node["eni_id"], env={"AWS_MAX_ATTEMPTS": "1"})
    assert out == [1, ["InsufficientCidrBlocks", 400,
                       "The specified subnet does not have enough free cidr blocks to satisfy the request."], 1]
    with pytest.raises(Exception, match="fragment_subnet: no subnet 'subnet-nope'"):
        fresh_lab.fragment_subnet("subnet-nope")


def test_a_xen_instance_type_refuses_prefixes(make_lab):
    lab = make_lab(nodes=1, instance_type="m4.large")
    node = lab.status()["nodes"][0]
    assert lab.status()["limits"]["hypervisor"] == "xen"
    script = r'''
import json, boto3
from botocore.exceptions import ClientError
try:
    boto3.client("ec2").assign_private_ip_addresses(NetworkInterfaceId=%r, Ipv4PrefixCount=1)
    print(json.dumps("ok"))
except ClientError as e:
    print(json.dumps([e.response["Error"]["Code"], e.response["Error"]["Message"]]))
''' % node["eni_id"]
    code, message = python_in(lab, "node1", script, env={"AWS_MAX_ATTEMPTS": "1"})
    assert code == "InvalidParameterValue" and "not supported for instance type m4.large" in message


def test_an_address_inside_a_prefix_is_delivered_to_its_eni_only_while_assigned(fresh_lab):
    node1 = fresh_lab.status()["nodes"][0]
    reply = fresh_lab.ec2("AssignPrivateIpAddresses", NetworkInterfaceId=node1["eni_id"], Ipv4PrefixCount=1)
    prefix = ipaddress.ip_network(reply["AssignedIpv4Prefixes"][0]["Ipv4Prefix"])
    pod = str(prefix.network_address + 7)
    fresh_lab.exec("node1", ["ip", "addr", "add", f"{pod}/32", "dev", "eth0"])
    try:
        # the reply leaves node1 from the prefix address: the source/dest check lets it through
        assert wait_for(lambda: probe(fresh_lab, "node2", "ping", pod, "--timeout", "0.3")["ok"], timeout=20)
        fresh_lab.ec2("UnassignPrivateIpAddresses", NetworkInterfaceId=node1["eni_id"], Ipv4Prefixes=[str(prefix)])
        assert wait_for(lambda: not probe(fresh_lab, "node2", "ping", pod, "--timeout", "0.3")["ok"], timeout=20)
        routes = json.loads(fresh_lab.exec("router", ["ip", "-j", "route", "show", "proto", "static"]).stdout)
        assert not [r for r in routes if ipaddress.ip_address(r["dst"].split("/")[0]) in prefix]
    finally:
        fresh_lab.exec("node1", ["ip", "addr", "del", f"{pod}/32", "dev", "eth0"], check=False)
