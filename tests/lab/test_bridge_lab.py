"""aws-vpc-bridge in the VPC lab, driven by the real cnitool through conflists/10-aws-vpc.conflist (issue 5).

Pods 0-8 of a node get IPs of its primary ENI (9 secondary addresses on an m5.large), pod 9 onwards
IPs of a secondary ENI: the lab router delivers an IP only to the ENI EC2 says holds it, and drops a
packet leaving an ENI with a source that ENI does not hold, so a working ping proves the route.
"""

import json
import os
import subprocess

import pytest

from support.labnode import BIN, LabNode, NETWORK

PODS_PER_NODE = 10  # the 10th lands on a secondary ENI


def ip_of(result):
    return result["ips"][0]["address"].split("/")[0]


class Pods:
    """Pods (namespaces) on one lab node, added through cnitool."""

    def __init__(self, node: LabNode, make_netns):
        self.node, self.make_netns = node, make_netns
        self.results = {}

    def add(self, name):
        netns = self.make_netns(name)
        rc, out, err = self.node.cnitool("add", netns, name)
        assert rc == 0, err + out
        self.results[name] = (netns, json.loads(out))
        return netns, self.results[name][1]


@pytest.fixture
def two_nodes(fresh_lab, tmp_path, make_netns):
    nodes = {}
    for name in ("node1", "node2"):
        node = LabNode(fresh_lab, name, tmp_path)
        node.write_conflist()
        pods = Pods(node, make_netns)
        for i in range(PODS_PER_NODE):
            pods.add(f"{name[-1]}p{i}")
        nodes[name] = pods
    yield nodes
    for pods in nodes.values():
        for name, (netns, _) in pods.results.items():
            pods.node.cnitool("del", netns, name)


def node_ip(lab, node):
    return next(n["primary_ip"] for n in lab.status()["nodes"] if n["name"] == node)


def test_pods_reach_each_other_across_nodes_on_primary_and_secondary_enis(two_nodes, fresh_lab):
    n1, n2 = two_nodes["node1"], two_nodes["node2"]
    primary1, secondary1 = n1.results["1p0"], n1.results["1p9"]
    primary2, secondary2 = n2.results["2p0"], n2.results["2p9"]
    # the 10th pod's IP is on a secondary ENI in EC2's view
    eni_of = {ip: dev for dev, ips in n1.node.ec2_enis().values() for ip in ips}
    assert eni_of[ip_of(primary1[1])] == 0 and eni_of[ip_of(secondary1[1])] == 1
    for (src_ns, src), (dst_ns, dst) in [(primary1, primary2), (secondary1, secondary2), (primary1, secondary2),
                                         (secondary1, primary2)]:
        assert n1.node.probe(src_ns, "ping", ip_of(dst)), f"{ip_of(src)} -> {ip_of(dst)}"
        assert n1.node.probe(dst_ns, "ping", ip_of(src)), f"{ip_of(dst)} -> {ip_of(src)}"


def test_pod_and_its_node_reach_each_other(two_nodes, fresh_lab):
    n1 = two_nodes["node1"]
    for pod in ("1p0", "1p9"):
        netns, result = n1.results[pod]
        assert n1.node.probe(netns, "ping", node_ip(fresh_lab, "node1"))
        assert n1.node.probe(fresh_lab.netns("node1"), "ping", ip_of(result))


def test_pod_traffic_leaves_by_the_eni_that_holds_its_ip(two_nodes, fresh_lab):
    """Without rule 1536 a secondary-ENI pod's packets leave by eth0, and the VPC drops them."""
    n1 = two_nodes["node1"]
    netns, result = n1.results["1p9"]
    ip = ip_of(result)
    fresh_lab.exec("node1", ["ip", "rule", "del", "priority", "1536", "from", f"{ip}/32"])
    assert not n1.node.probe(netns, "ping", ip_of(two_nodes["node2"].results["2p0"][1]), "--timeout", "1")


def node_state(lab, node, ip):
    """What the node holds for an IP: links/routes/rules naming it."""
    rules = [line for line in lab.exec(node, ["ip", "rule"]).stdout.splitlines() if f" {ip} " in line + " "]
    routes = [line for line in lab.exec(node, ["ip", "route", "show", "table", "all"]).stdout.splitlines()
              if line.startswith(f"{ip} ")]
    return rules, routes


@pytest.mark.parametrize("netns_gone_first", [False, True], ids=["netns-alive", "netns-deleted-first"])
def test_del_leaves_nothing_of_the_pod(fresh_lab, tmp_path, make_netns, netns_gone_first):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist()
    pods = Pods(node, make_netns)
    for i in range(PODS_PER_NODE):
        pods.add(f"p{i}")
    def link_names():
        return {line.split(":")[1].strip().split("@")[0]
                for line in fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout.splitlines()}
    links_before = link_names()
    deleted = set()
    for name in ("p0", "p9"):
        netns, result = pods.results[name]
        ip = ip_of(result)
        host_veth = result["interfaces"][0]["name"]
        deleted.add(host_veth)
        assert all(node_state(fresh_lab, "node1", ip))
        if netns_gone_first:
            subprocess.run(["ip", "netns", "delete", netns], check=True)
        for _ in range(2):  # a repeated DEL succeeds too
            rc, out, err = node.cnitool("del", netns, name)
            assert rc == 0, err
        assert node_state(fresh_lab, "node1", ip) == ([], [])
        assert host_veth not in fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout
        with open(os.path.join(node.data_dir, f"{NETWORK}.json")) as f:
            assert ip not in {addr for eni in json.load(f)["enis"].values()
                              for addr, e in eni["ips"].items() if e["state"] == "assigned"}
    assert links_before - link_names() == deleted and not link_names() - links_before
    for name, (netns, _) in pods.results.items():
        node.cnitool("del", netns, name)


# One hand-made break per piece of the data path; CHECK must notice each, one at a time.
BREAKS = {
    "host veth": lambda ip, veth, ns: ("node", ["ip", "link", "del", veth]),
    "pod address": lambda ip, veth, ns: ("pod", ["ip", "addr", "del", f"{ip}/32", "dev", "eth0"]),
    "pod default route": lambda ip, veth, ns: ("pod", ["ip", "route", "del", "default"]),
    "pod gateway route": lambda ip, veth, ns: ("pod", ["ip", "route", "del", "169.254.1.1", "dev", "eth0"]),
    "pod neighbour": lambda ip, veth, ns: ("pod", ["ip", "neigh", "del", "169.254.1.1", "dev", "eth0"]),
    "host route": lambda ip, veth, ns: ("node", ["ip", "route", "del", f"{ip}/32"]),
    "rule 512": lambda ip, veth, ns: ("node", ["ip", "rule", "del", "priority", "512", "to", f"{ip}/32"]),
    "rule 1536": lambda ip, veth, ns: ("node", ["ip", "rule", "del", "priority", "1536", "from", f"{ip}/32"]),
    "eni table default": lambda ip, veth, ns: ("node", ["ip", "route", "del", "default", "table", "2"]),
}


@pytest.fixture
def checked_pod(fresh_lab, tmp_path, make_netns):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist()
    pods = Pods(node, make_netns)
    for i in range(PODS_PER_NODE):
        pods.add(f"p{i}")
    yield node, pods
    for name, (netns, _) in pods.results.items():
        node.cnitool("del", netns, name)


def test_check_passes_after_add_and_fails_for_each_missing_piece(checked_pod, fresh_lab):
    node, pods = checked_pod
    for name in ("p0", "p9"):
        rc, out, err = node.cnitool("check", pods.results[name][0], name)
        assert rc == 0, err + out
    for piece, make in BREAKS.items():
        name = "p9"  # on a secondary ENI: every piece applies
        netns, result = pods.results[name]
        where, argv = make(ip_of(result), result["interfaces"][0]["name"], netns)
        if where == "node":
            fresh_lab.exec("node1", argv)
        else:
            subprocess.run(["ip", "netns", "exec", netns, *argv], check=True)
        rc, out, err = node.cnitool("check", netns, name)
        assert rc != 0, f"CHECK passed with the {piece} missing"
        # repair by re-creating the pod for the next piece
        assert node.cnitool("del", netns, name)[0] == 0
        subprocess.run(["ip", "netns", "delete", netns], check=True)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        rc, out, err = node.cnitool("add", netns, name)
        assert rc == 0, err
        pods.results[name] = (netns, json.loads(out))


def test_check_fails_without_the_ip_reservation(checked_pod):
    node, pods = checked_pod
    netns, result = pods.results["p0"]
    cid_conf = dict(node.ipam_conf(), cniVersion="1.0.0")
    # release the reservation behind the data path's back, as a crashed DEL would
    cid = next(e["container_id"] for eni in json.load(open(os.path.join(node.data_dir, f"{NETWORK}.json")))["enis"].values()
               for e in eni["ips"].values() if e["state"] == "assigned" and e["pod_name"] == "p0")
    assert node.plugin("aws-eni-ipam", "DEL", cid_conf, cid=cid)[0] == 0
    rc, out, err = node.cnitool("check", netns, "p0")
    assert rc != 0 and "no IP is reserved" in out + err


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_every_cnitool_version_adds_checks_and_deletes(fresh_lab, tmp_path, make_netns, version):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist(version=version)
    netns = make_netns("pod")
    rc, out, err = node.cnitool("add", netns, "web")
    assert rc == 0, err + out
    result = json.loads(out)
    assert result["cniVersion"] == version
    assert ("version" in result["ips"][0]) == version.startswith("0.")
    assert node.probe(netns, "ping", node_ip(fresh_lab, "node1"))
    if version != "0.3.0" and version != "0.3.1":
        assert node.cnitool("check", netns, "web")[0] == 0
    assert node.cnitool("del", netns, "web")[0] == 0
    assert node_state(fresh_lab, "node1", ip_of(result)) == ([], [])


def test_version_1_1_0_add_check_gc_status_del_by_direct_exec(fresh_lab, tmp_path, make_netns):
    """Debian's cnitool (libcni 1.1.2) stops at 1.0.0, so 1.1.0 is driven as a 1.1 runtime would."""
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist(version="1.1.0")
    conf = dict(node.conflist["plugins"][0], cniVersion="1.1.0", name=NETWORK)
    netns = make_netns("pod")
    path = f"/var/run/netns/{netns}"
    rc, result = node.plugin("aws-vpc-bridge", "ADD", conf, cid="c11", netns=path)
    assert rc == 0, result
    assert result["cniVersion"] == "1.1.0" and "version" not in result["ips"][0]
    assert node.plugin("aws-vpc-bridge", "CHECK", dict(conf, prevResult=result), cid="c11", netns=path)[0] == 0
    assert node.plugin("aws-vpc-bridge", "STATUS", conf, cid="", netns="", ifname="")[0] == 0
    keep = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "c11", "ifname": "eth0"}]})
    assert node.plugin("aws-vpc-bridge", "GC", keep, cid="", netns="", ifname="")[0] == 0
    assert all(node_state(fresh_lab, "node1", ip_of(result)))  # still there: it is valid
    assert node.plugin("aws-vpc-bridge", "GC", dict(conf, **{"cni.dev/valid-attachments": []}),
                       cid="", netns="", ifname="")[0] == 0
    assert node_state(fresh_lab, "node1", ip_of(result)) == ([], [])
    assert node.plugin("aws-vpc-bridge", "DEL", conf, cid="c11", netns=path)[0] == 0


def test_existing_ifname_is_an_error_that_leaves_nothing(fresh_lab, tmp_path, make_netns):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist()
    netns = make_netns("pod")
    subprocess.run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0"], check=True)
    links_before = fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout
    rc, out, err = node.cnitool("add", netns, "web")
    assert rc != 0 and "already exists" in out + err
    assert fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout == links_before
    with open(os.path.join(node.data_dir, f"{NETWORK}.json")) as f:
        assert '"assigned"' not in f.read()
    assert "other0" in subprocess.run(["ip", "-n", netns, "link", "show", "eth0"], capture_output=True,
                                      text=True).stdout  # the pre-existing interface is untouched
