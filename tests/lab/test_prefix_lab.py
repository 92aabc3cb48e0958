"""Prefix delegation in the VPC lab (issue 17): pods get /32s out of the ENIs' /28 prefixes, checked
against EC2's own view; the node's full prefix capacity; a fragmented subnet and a Xen instance type
give clear answers; the mode switched both ways with pods running. aws-vpc-bridge and aws-snat run
unchanged on prefix addresses (pods on prefixes of primary and secondary ENIs reach the other node's
pods and the internet host).

The module runs its own lab with a /22 subnet: a /24 offers 14 delegable /28s, fewer than one node's
27 (3 ENIs x 9 prefixes on an m5.large).
"""

import concurrent.futures
import ipaddress
import json
import os
import time

import pytest

from lab.conftest import reset_lab
from support.labnode import LabNode

PD_IPAM = {"enablePrefixDelegation": True, "warmPrefixTarget": 1}
PD_ENV = {"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "1"}
INTERNET = "203.0.113.10"
TRY_AGAIN_LATER = 11


@pytest.fixture(scope="module")
def prefix_lab():
    from vpclab import api, netns
    api.sweep_orphans()
    lab = api.Lab.up(name=netns.new_prefix("p"), nodes=2, subnet_prefix=22, owner_pid=os.getpid())
    yield lab
    lab.down()


@pytest.fixture
def lab(prefix_lab):
    reset_lab(prefix_lab)
    yield prefix_lab
    reset_lab(prefix_lab)


def ec2_view(node: LabNode) -> dict:
    """{eni_id: (device index, [prefixes], [secondary IPs])} of the node's instance, as EC2 lists it."""
    found = node.lab.ec2("DescribeNetworkInterfaces",
                         Filters=[{"Name": "attachment.instance-id", "Values": [node.instance_id]}])
    return {e["NetworkInterfaceId"]: (e["Attachment"]["DeviceIndex"],
                                      sorted(p["Ipv4Prefix"] for p in e.get("Ipv4Prefixes", [])),
                                      sorted(a["PrivateIpAddress"] for a in e["PrivateIpAddresses"] if not a["Primary"]))
            for e in found["NetworkInterfaces"]}


def eni_of_prefix_ip(view: dict, ip: str) -> str | None:
    """The ENI one of whose prefixes holds `ip`, in EC2's view."""
    address = ipaddress.ip_address(ip)
    return next((eni for eni, (_, prefixes, _) in view.items()
                 if any(address in ipaddress.ip_network(p) for p in prefixes)), None)


def held_by(node: LabNode) -> dict[str, str]:
    """{pod IP: ENI ID} of the assignments in the node's store."""
    return {ip: eni_id for eni_id, eni in node.store()["enis"].items()
            for ip, entry in eni["ips"].items() if entry["state"] == "assigned"}


def ip_of(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


def retrying(attempt, what: str, timeout: float = 60):
    """Run `attempt` until it succeeds, retrying a code-11 answer as a runtime does (the agent is
    growing the pool); any other failure fails at once. `attempt` gives (True, result) or (False,
    whether the answer was code 11, the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        ok, *answer = attempt()
        if ok:
            return answer[0]
        retry, answer = answer
        assert retry and time.monotonic() < deadline, f"{what}: {answer}"
        time.sleep(0.2)


def add_pod(node: LabNode, make_netns, name: str) -> tuple[str, str]:
    """A pod (namespace) added through cnitool on the node's conflist; (netns, IP)."""
    netns = make_netns(name)

    def attempt():
        rc, out, err = node.cnitool("add", netns, name)
        if rc == 0:
            return True, json.loads(out)
        node.cnitool("del", netns, name)  # a runtime DELs a failed ADD before it retries
        # cnitool prints the plugin's message (not its code) on stderr: ours for code 11 starts so
        return False, "no free IP on this node" in err, out + err
    return netns, ip_of(retrying(attempt, f"ADD of pod {name}"))


def ipam_add(node: LabNode, cid: str) -> str:
    """An IPAM-only ADD (no namespace: the point is the address); the IP."""
    def attempt():
        rc, answer = node.ipam("ADD", cid=cid)
        return (True, answer) if rc == 0 else (False, (answer or {}).get("code") == TRY_AGAIN_LATER, answer)
    return ip_of(retrying(attempt, f"ADD {cid}"))


def prefix_node(lab, name, tmp_path, **extra) -> LabNode:
    node = LabNode(lab, name, tmp_path, **PD_IPAM, **extra)
    node.write_conflist()
    return node


def test_110_pods_on_prefixes_reach_the_other_node_and_the_internet_then_432_then_a_clear_error(
        lab, tmp_path, make_netns):
    node1, node2 = prefix_node(lab, "node1", tmp_path), prefix_node(lab, "node2", tmp_path)
    node1.start_agent(**PD_ENV)
    node2.start_agent(**PD_ENV)
    try:
        remote_ns, remote_ip = add_pod(node2, make_netns, "remote")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            pods = list(pool.map(lambda i: add_pod(node1, make_netns, f"p{i}"), range(110)))
        ips = [ip for _, ip in pods]
        assert len(set(ips)) == 110
        view = ec2_view(node1)
        held = held_by(node1)
        for ip in ips:  # inside a prefix EC2 lists on the very ENI the store says holds it
            assert eni_of_prefix_ip(view, ip) == held[ip], ip
        assert all(not secondary for _, _, secondary in view.values())  # no secondary IP in prefix mode

        # IPAM alone fills the primary ENI's 9 prefixes; two more pods land on a secondary ENI's prefix
        filler = [ipam_add(node1, f"fill{i}") for i in range(144 - 110)]
        on_secondary = [add_pod(node1, make_netns, f"s{i}") for i in range(2)]
        view = ec2_view(node1)
        devices = {eni: device for eni, (device, _, _) in view.items()}
        assert {devices[eni_of_prefix_ip(view, ip)] for _, ip in on_secondary} == {1}
        sample = [pods[0], pods[109], *on_secondary]
        assert devices[eni_of_prefix_ip(view, pods[0][1])] == 0
        for netns, ip in sample:
            assert node1.probe(netns, "ping", remote_ip), f"{ip} -> {remote_ip}"
            assert node1.probe(remote_ns, "ping", ip), f"{remote_ip} -> {ip}"
            assert node1.probe(netns, "ping", INTERNET), f"{ip} -> the internet host"

        # the rest of the node's capacity: 3 ENIs x 9 prefixes x 16 addresses = 432, then a clear error
        filler += [ipam_add(node1, f"fill{i}") for i in range(144 - 110, 432 - 112)]
        everything = ips + filler + [ip for _, ip in on_secondary]
        assert len(everything) == len(set(everything)) == 432
        view = ec2_view(node1)
        assert sorted((device, len(prefixes)) for device, prefixes, _ in view.values()) == [(0, 9), (1, 9), (2, 9)]
        held = held_by(node1)
        assert all(eni_of_prefix_ip(view, ip) == held[ip] for ip in everything)
        node1.wait_for(lambda: (node1.agent_status().get("blocked") or {}).get("limit"), what="the limit reported")
        rc, err = node1.ipam("ADD", cid="one-too-many")
        assert rc != 0 and err["code"] == TRY_AGAIN_LATER
        assert "m5.large" in err["msg"] and "432 pod IPs" in err["msg"] and "9 /28 prefixes x 16" in err["msg"]
    finally:
        node1.stop_agents()
        node2.stop_agents()


def test_a_fragmented_subnet_answers_code_11_naming_insufficient_cidr_blocks_and_growth_backs_off(lab, tmp_path):
    fragmented = lab.fragment_subnet()
    node = prefix_node(lab, "node1", tmp_path)
    lab.ec2_calls(reset=True)
    for cid in ("first", "second"):  # no agent: the IPAM grows itself, then backs off
        rc, err = node.ipam("ADD", cid=cid)
        assert rc != 0 and err["code"] == TRY_AGAIN_LATER, err
        assert "InsufficientCidrBlocks" in err["msg"] and fragmented["subnet_id"] in err["msg"], err
    assert lab.ec2_calls().get("AssignPrivateIpAddresses") == 1
    node.start_agent(**PD_ENV)
    try:
        ticks = node.agent_status()["ticks"]
        status = node.wait_for(lambda: (lambda s: s if s["ticks"] >= ticks + 5 else None)(node.agent_status()),
                               what="five more ticks of the agent")
        assert "InsufficientCidrBlocks" in status["blocked"]["reason"]
        assert lab.ec2_calls().get("AssignPrivateIpAddresses") == 1  # the pause outlives the plugin's attempt
    finally:
        node.stop_agents()


def test_switching_the_mode_both_ways_keeps_running_pods_and_drains_the_other_kind(lab, tmp_path, make_netns):
    node1, node2 = LabNode(lab, "node1", tmp_path), LabNode(lab, "node2", tmp_path)
    node2.write_conflist()
    remote_ns, remote_ip = add_pod(node2, make_netns, "remote")
    node1.write_conflist()
    node1.start_agent()
    try:
        old = [add_pod(node1, make_netns, f"old{i}") for i in range(2)]
    finally:
        node1.stop_agents()
    primary = next(eni for eni, (device, _, _) in ec2_view(node1).items() if device == 0)

    def reaches(pods):
        return all(node1.probe(netns, "ping", remote_ip) for netns, _ in pods)

    # to prefix mode: the free secondary IPs go back at once, the pods' stay; new pods get prefix IPs
    node1.ipam_settings.update(PD_IPAM)
    node1.write_conflist()
    node1.start_agent(**PD_ENV)
    try:
        node1.wait_for(lambda: ec2_view(node1)[primary][2] == sorted(ip for _, ip in old) and ec2_view(node1)[primary][1],
                       what="free secondary IPs given back and a prefix assigned")
        assert reaches(old)
        new = [add_pod(node1, make_netns, "new0")]
        assert eni_of_prefix_ip(ec2_view(node1), new[0][1]) == primary
        assert node1.cnitool("del", old[0][0], "old0")[0] == 0
        node1.wait_for(lambda: ec2_view(node1)[primary][2] == [old[1][1]], what="the deleted pod's secondary IP drained")
        assert reaches(old[1:] + new)
    finally:
        node1.stop_agents()

    # and back: free prefixes go back, the one with a pod stays until its pod goes
    for key in PD_IPAM:
        del node1.ipam_settings[key]
    node1.write_conflist()
    node1.start_agent()
    try:
        holding = [p for p in ec2_view(node1)[primary][1] if ipaddress.ip_address(new[0][1]) in ipaddress.ip_network(p)]
        node1.wait_for(lambda: ec2_view(node1)[primary][1] == holding, what="free prefixes given back")
        assert reaches(old[1:] + new)
        newer = add_pod(node1, make_netns, "newer")
        assert eni_of_prefix_ip(ec2_view(node1), newer[1]) is None  # a secondary IP
        assert newer[1] in {ip for _, _, secondary in ec2_view(node1).values() for ip in secondary}
        assert node1.cnitool("del", new[0][0], "new0")[0] == 0
        node1.wait_for(lambda: not any(prefixes for _, prefixes, _ in ec2_view(node1).values()),
                       what="the last prefix drained with its pod")
        assert reaches(old[1:] + [newer])
    finally:
        node1.stop_agents()
        for netns, name in [(old[1][0], "old1"), (newer[0], "newer")]:
            node1.cnitool("del", netns, name)
        node2.cnitool("del", remote_ns, "remote")


def test_a_xen_instance_type_refuses_prefix_delegation_naming_the_type_and_the_setting(make_lab_of_type, tmp_path):
    lab = make_lab_of_type("m4.large")
    node = LabNode(lab, "node1", tmp_path, **PD_IPAM)
    rc, err = node.ipam("ADD", cid="pod")
    assert rc != 0 and err["code"] == TRY_AGAIN_LATER, err
    assert "m4.large" in err["msg"] and "ENABLE_PREFIX_DELEGATION" in err["msg"], err
    # the remedy works: secondary IPs on the same node
    plain = LabNode(lab, "node1", tmp_path)
    rc, result = plain.ipam("ADD", cid="pod")
    assert rc == 0, result


@pytest.fixture
def make_lab_of_type():
    from vpclab import api, netns
    labs = []

    def make(instance_type):
        labs.append(api.Lab.up(name=f"{netns.new_prefix('x')}{len(labs)}", nodes=1, instance_type=instance_type,
                               owner_pid=os.getpid()))
        return labs[-1]
    yield make
    for made in labs:
        made.down()
