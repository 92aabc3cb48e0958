"""The VPC data plane: hot-plugged ENIs, delivery only to the ENI EC2 says holds an address, the
source/dest check, and the internet and extra hosts' echo."""

import json

import pytest

from .labtools import probe, start_udp_listener, wait_for


def links(lab, node) -> dict[str, dict]:
    return {link["address"]: link for link in json.loads(lab.exec(node, ["ip", "-j", "link", "show"]).stdout)}


def ip(lab, node, *args, check=True):
    lab.exec(node, ["ip", *args], check=check)


def test_attach_and_detach_hot_plug_an_interface_with_the_eni_mac(fresh_lab):
    node = fresh_lab.status()["nodes"][0]
    eni = fresh_lab.ec2("CreateNetworkInterface", SubnetId=node["subnet_id"])["NetworkInterface"]
    mac = eni["MacAddress"]
    assert mac not in links(fresh_lab, "node1")
    attachment = fresh_lab.ec2("AttachNetworkInterface", NetworkInterfaceId=eni["NetworkInterfaceId"],
                               InstanceId=node["instance_id"], DeviceIndex=2)["AttachmentId"]
    link = wait_for(lambda: links(fresh_lab, "node1").get(mac), timeout=1)
    assert link and link["ifname"] == "eth2" and link["operstate"] == "DOWN"
    fresh_lab.ec2("DetachNetworkInterface", AttachmentId=attachment)
    assert wait_for(lambda: mac not in links(fresh_lab, "node1"), timeout=1)


def test_nodes_reach_each_other_the_gateway_and_the_outside(fresh_lab):
    s = fresh_lab.status()
    node2_ip = s["nodes"][1]["primary_ip"]
    for target in (node2_ip, s["subnets"][0]["gateway"], s["internet"]["address"], s["extra_hosts"][0]["address"]):
        assert probe(fresh_lab, "node1", "ping", target) == {"ok": True}, target
    assert probe(fresh_lab, "internet", "ping", node2_ip) == {"ok": True}
    assert probe(fresh_lab, "node1", "ping", "10.0.0.99") == {"ok": False}  # nobody holds it


@pytest.mark.parametrize("host", ["internet", "x1"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_echo_reports_the_source_address_and_port(fresh_lab, host, proto):
    s = fresh_lab.status()
    target = s["internet"] if host == "internet" else s["extra_hosts"][0]
    out = probe(fresh_lab, "node1", "echo", proto, target["address"], str(target["echo_port"]))
    local_port = out["local"].split()[1]
    assert out["answer"] == f"{s['nodes'][0]['primary_ip']} {local_port}"


def test_a_secondary_ip_is_reachable_only_while_ec2_assigns_it(fresh_lab):
    node1 = fresh_lab.status()["nodes"][0]
    reply = fresh_lab.ec2("AssignPrivateIpAddresses", NetworkInterfaceId=node1["eni_id"],
                          SecondaryPrivateIpAddressCount=1)
    secondary = reply["AssignedPrivateIpAddresses"][0]["PrivateIpAddress"]
    ip(fresh_lab, "node1", "addr", "add", f"{secondary}/24", "dev", "eth0")
    try:
        # the lab's data plane follows EC2 asynchronously, as the VPC does: wait for it, however loaded
        assert wait_for(lambda: probe(fresh_lab, "node2", "ping", secondary, "--timeout", "0.3")["ok"], timeout=20)
        fresh_lab.ec2("UnassignPrivateIpAddresses", NetworkInterfaceId=node1["eni_id"], PrivateIpAddresses=[secondary])
        assert wait_for(lambda: not probe(fresh_lab, "node2", "ping", secondary, "--timeout", "0.3")["ok"], timeout=20)
        # still configured on node1, but the VPC no longer delivers it there
        assert not probe(fresh_lab, "node2", "ping", secondary)["ok"]
    finally:
        ip(fresh_lab, "node1", "addr", "del", f"{secondary}/24", "dev", "eth0", check=False)


def test_a_spoofed_source_is_dropped_until_ec2_assigns_it(fresh_lab):
    node1, node2 = fresh_lab.status()["nodes"]
    spoofed = "10.0.0.77"
    ip(fresh_lab, "node1", "addr", "add", f"{spoofed}/24", "dev", "eth0")
    try:
        listener = start_udp_listener(fresh_lab, "node2", node2["primary_ip"], 9999, seconds=1.0)
        probe(fresh_lab, "node1", "send-udp", node2["primary_ip"], "9999", "--source", spoofed)
        probe(fresh_lab, "node1", "send-udp", node2["primary_ip"], "9999")
        received = json.loads(listener.communicate(timeout=5)[0])["received"]
        assert [r[0] for r in received] == [node1["primary_ip"]]  # the spoofed datagram never arrived

        fresh_lab.ec2("AssignPrivateIpAddresses", NetworkInterfaceId=node1["eni_id"], PrivateIpAddresses=[spoofed])
        listener = start_udp_listener(fresh_lab, "node2", node2["primary_ip"], 9999, seconds=1.5)
        # the router follows the assignment within a second: one datagram every 0.1 s for a second
        probe(fresh_lab, "node1", "send-udp", node2["primary_ip"], "9999", "--source", spoofed, "--count", "10")
        received = json.loads(listener.communicate(timeout=5)[0])["received"]
        assert spoofed in [r[0] for r in received]
    finally:
        ip(fresh_lab, "node1", "addr", "del", f"{spoofed}/24", "dev", "eth0", check=False)


def test_an_address_of_a_secondary_eni_must_leave_by_that_eni(fresh_lab):
    """EC2's source check per ENI: replies from a secondary ENI's address that leave by eth0 are
    dropped; with the CNI's policy route (from that address via ethN) they pass."""
    node1, node2 = fresh_lab.status()["nodes"]
    eni = fresh_lab.ec2("CreateNetworkInterface", SubnetId=node1["subnet_id"])["NetworkInterface"]
    address = eni["PrivateIpAddress"]
    fresh_lab.ec2("AttachNetworkInterface", NetworkInterfaceId=eni["NetworkInterfaceId"],
                  InstanceId=node1["instance_id"], DeviceIndex=1)
    assert wait_for(lambda: eni["MacAddress"] in links(fresh_lab, "node1"), timeout=1)
    ip(fresh_lab, "node1", "link", "set", "eth1", "up")
    ip(fresh_lab, "node1", "addr", "add", f"{address}/32", "dev", "eth1")
    try:
        assert not probe(fresh_lab, "node2", "ping", address, "--timeout", "0.5")["ok"]
        ip(fresh_lab, "node1", "route", "add", "10.0.0.1", "dev", "eth1", "scope", "link", "table", "2")
        ip(fresh_lab, "node1", "route", "add", "default", "via", "10.0.0.1", "dev", "eth1", "table", "2")
        ip(fresh_lab, "node1", "rule", "add", "from", address, "lookup", "2", "priority", "1536")
        assert probe(fresh_lab, "node2", "ping", address) == {"ok": True}
    finally:  # the routes of table 2 leave with eth1 when the lab is reset
        ip(fresh_lab, "node1", "rule", "del", "from", address, "lookup", "2", "priority", "1536", check=False)
