"""The shipped conflists in a lab node, chained with the reference plugins (issue 8)."""

import json
import subprocess

from support.labnode import LabNode


def test_chain_with_reference_tuning_and_bandwidth_after_ours(fresh_lab, tmp_path, make_netns):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist(source="20-aws-vpc-bandwidth-tuning.conflist")
    pod = make_netns("pod")
    rc, out, err = node.cnitool("add", pod, "shaped")
    assert rc == 0, err + out
    result = json.loads(out)
    host_veth = result["interfaces"][0]["name"]
    somaxconn = subprocess.run(["ip", "netns", "exec", pod, "sysctl", "-n", "net.core.somaxconn"],
                               capture_output=True, text=True).stdout.strip()
    assert somaxconn == "1024"  # tuning ran after us, in the pod
    qdiscs = fresh_lab.exec("node1", ["tc", "qdisc", "show", "dev", host_veth]).stdout
    assert "tbf" in qdiscs  # bandwidth shaped our host veth (from our prevResult)
    assert "bwp" in fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout  # its ifb for egress
    rc, out, err = node.cnitool("check", pod, "shaped")
    assert rc == 0, err + out
    rc, out, err = node.cnitool("del", pod, "shaped")
    assert rc == 0, err + out
    links = fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout
    assert host_veth not in links and "bwp" not in links


def test_external_snat_conflist_writes_no_snat_rules(fresh_lab, tmp_path, make_netns):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist(source="10-aws-vpc-external-snat.conflist")
    pod = make_netns("pod")
    rc, out, err = node.cnitool("add", pod, "ext")
    assert rc == 0, err + out
    try:
        nat = fresh_lab.exec("node1", ["iptables-save", "-t", "nat"]).stdout
        assert "AWS-SNAT-CHAIN-0" not in nat
    finally:
        assert node.cnitool("del", pod, "ext")[0] == 0
