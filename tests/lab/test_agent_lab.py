"""The node agent in the VPC lab: its status, metrics, settings, and rebuilding a broken store (issue 4)."""

import json
import os
import subprocess
import time

from prometheus_client.parser import text_string_to_metric_families

from support.labnode import BIN, LabNode, NETWORK


def agent_cli(node, *argv, env=None):
    return node.lab.exec(node.node, [os.path.join(BIN, "aws-vpc-cni-agent"), *argv], check=False,
                         env={"AWS_VPC_CNI_DATA_DIR": node.data_dir, **(env or {})})


def scrape(node, url):
    """The metrics at `url`, parsed by prometheus_client's own parser: {family: (type, {labels: value})}."""
    text = node.http_get(url)
    assert text.returncode == 0, text.stderr
    return {family.name: (family.type, {tuple(sorted(s.labels.items())): s.value for s in family.samples})
            for family in text_string_to_metric_families(text.stdout)}


def test_status_metrics_and_introspection_as_upstream(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.start_agent(metrics=None, introspection=None)  # the defaults: metrics on all addresses, introspection local
    try:
        node.wait_for(lambda: node.agent_status()["figures"]["short"] == 0, what="a warm pool")
        fresh_lab.fault("CreateNetworkInterface", error="InternalError", count=1)  # retried: one error to count
        assert node.ipam("ADD", cid="pod0")[0] == 0  # 8 free < 9: the agent attaches a second ENI
        status = node.wait_for(lambda: (lambda s: s if len(s["enis"]) == 2 and s["figures"]["short"] == 0 else None)(
            node.agent_status()), what="the second ENI")
        assert [(e["device_number"], e["total"], e["assigned"]) for e in status["enis"]] == [(0, 9, 1), (1, 9, 0)]
        assert status["node"]["instance_type"] == "m5.large" and status["blocked"] is None
        table = agent_cli(node, "status").stdout
        assert "(primary)" in table and "assigned" in table
        assert [line.split()[-4:] for line in table.splitlines() if line.startswith("all")] == [["18", "1", "0", "17"]]
        primary_ip = status["node"]["primary_ip"]
        metrics = scrape(node, f"http://{primary_ip}:61678/metrics")  # 0.0.0.0: the node's address answers
        # upstream's names, types and labels (utils/prometheusmetrics/prometheusmetrics.go)
        assert metrics["awscni_eni_allocated"] == ("gauge", {(): 2})
        assert metrics["awscni_eni_max"] == ("gauge", {(): 3})
        assert metrics["awscni_ip_max"] == ("gauge", {(): 27})
        assert metrics["awscni_total_ip_addresses"] == ("gauge", {(): 18})
        assert metrics["awscni_assigned_ip_addresses"] == ("gauge", {(): 1})
        assert metrics["awscni_total_ipv4_prefixes"] == ("gauge", {(): 0})
        per_eni = {e["eni_id"]: e["assigned"] for e in status["enis"]}
        assert metrics["awscni_assigned_ip_per_eni"] == ("gauge", {(("eni", k),): v for k, v in per_eni.items()})
        kind, requests = metrics["awscni_ec2api_req_count"]
        assert kind == "counter" and requests[(("fn", "AttachNetworkInterface"),)] >= 1
        assert metrics["awscni_ec2api_error_count"] == ("counter", {(("fn", "CreateNetworkInterface"),): 1})
        assert metrics["awscni_aws_api_error_count"] == (
            "counter", {(("api", "CreateNetworkInterface"), ("error", "InternalError")): 1})
        latency = {family.name: family for family in text_string_to_metric_families(
            node.http_get(f"http://{primary_ip}:61678/metrics").stdout)}["awscni_aws_api_latency_ms"]
        counts = {(s.labels["api"], s.labels["error"], s.labels["status"]): s.value
                  for s in latency.samples if s.name.endswith("_count")}
        assert latency.type == "summary" and counts[("AttachNetworkInterface", "false", "200")] >= 1, counts
        assert [k for k in counts if k[:2] == ("CreateNetworkInterface", "true")] == [
            ("CreateNetworkInterface", "true", "500")], counts
        assert metrics["awscni_ipamd_action_inprogress"][0] == "gauge"
        assert metrics["awscni_ipamd_error_count"][0] == "counter"
        assert metrics["aws_vpc_cni_py_pool_short"] == ("gauge", {(): 0})
        assert metrics["aws_vpc_cni_py_eni_free_ip_addresses"][1] == {(("eni", e["eni_id"]),): e["free"]
                                                                      for e in status["enis"]}
        # introspection: upstream's paths and shapes, on 127.0.0.1 only
        assert node.http_get(f"http://{primary_ip}:61679/v1/enis").returncode != 0
        enis = json.loads(node.http_get("http://127.0.0.1:61679/v1/enis").stdout)
        assert (enis["TotalIPs"], enis["AssignedIPs"]) == (18, 1)
        assert {eni: (pool["IsPrimary"], pool["DeviceNumber"], pool["AssignedIPv4Addresses"], len(pool["IPv4Addresses"]))
                for eni, pool in enis["ENIIPPools"].items()} == {
            e["eni_id"]: (e["primary"], e["device_number"], e["assigned"], e["total"]) for e in status["enis"]}
        pods = json.loads(node.http_get("http://127.0.0.1:61679/v1/pods").stdout)
        assert list(pods) == ["web_default_pod0"]
        ip, device = pods["web_default_pod0"]["IP"], pods["web_default_pod0"]["DeviceNumber"]
        assert device == 0 and enis["ENIIPPools"][status["enis"][0]["eni_id"]]["IPv4Addresses"][ip] == {"Assigned": True}
        ipamd = json.loads(node.http_get("http://127.0.0.1:61679/v1/ipamd-env-settings").stdout)
        assert ipamd["WARM_ENI_TARGET"] == 1 and ipamd["WARM_IP_TARGET"] == 0 and ipamd["MAX_ENI"] == -1
        network = json.loads(node.http_get("http://127.0.0.1:61679/v1/networkutils-env-settings").stdout)
        assert network["AWS_VPC_K8S_CNI_EXTERNALSNAT"] is False and network["AWS_VPC_K8S_CNI_CONNMARK"] == 128
        assert json.loads(node.http_get("http://127.0.0.1:61679/").stdout)["AvailableCommands"] == sorted(
            ["/v1/enis", "/v1/pods", "/v1/networkutils-env-settings", "/v1/ipamd-env-settings"])
    finally:
        node.stop_agents()


def test_bad_settings_are_refused_by_name_before_anything_starts(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path)
    for env, name in [({"IP_COOLDOWN_PERIOD": "-5"}, "IP_COOLDOWN_PERIOD"),
                      ({"AWS_VPC_K8S_CNI_VETHPREFIX": "eth"}, "AWS_VPC_K8S_CNI_VETHPREFIX")]:
        for command in ("run", "render-conflist"):
            proc = agent_cli(node, command, env=env)
            assert proc.returncode == 2 and name in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(node.data_dir, f"{NETWORK}.json"))
    # what upstream reads as unset is rendered as unset, with a warning naming the variable
    for env, name in [({"WARM_IP_TARGET": "-1"}, "WARM_IP_TARGET"), ({"MAX_ENI": "zero"}, "MAX_ENI")]:
        proc = agent_cli(node, "render-conflist", env=env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc
        assert f"aws-vpc-cni-agent: warning: {name}" in proc.stderr, proc.stderr


def test_write_conflist_renders_the_environment(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path)
    conf_dir = str(tmp_path / "net.d")
    agent_cli(node, "write-conflist", conf_dir, env={"WARM_IP_TARGET": "3", "AWS_VPC_K8S_CNI_EXTERNALSNAT": "true"})
    with open(os.path.join(conf_dir, "10-aws-vpc.conflist")) as f:
        conflist = json.load(f)
    assert conflist["plugins"][0]["ipam"]["warmIPTarget"] == 3
    assert conflist["plugins"][1]["externalSNAT"] is True
    assert [n for n in os.listdir(conf_dir)] == ["10-aws-vpc.conflist"]  # no temp file left


def test_the_agent_writes_the_conflist_only_once_its_pool_can_serve(fresh_lab, tmp_path):
    """Kubelet keeps the node NotReady while no conflist is there (and a runtime keeps using the chain
    whose conflist is there): ours appears once the pool has a free IP, the other one is left alone."""
    node = LabNode(fresh_lab, "node1", tmp_path)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    previous = conf_dir / "10-aws.conflist"  # the chain the node ran before (upstream's file name)
    previous.write_text('{"cniVersion": "0.4.0", "name": "aws-cni", "plugins": [{"type": "aws-cni"}]}\n')
    for action in ("AssignPrivateIpAddresses", "CreateNetworkInterface"):  # the pool cannot get an IP
        fresh_lab.fault(action, error="UnauthorizedOperation")
    node.start_agent(conf_dir=str(conf_dir))
    try:
        node.wait_for(lambda: (lambda s: s["ticks"] >= 3 and s["last_error"])(node.agent_status()),
                      what="three ticks that could not grow the pool")
        status = node.agent_status()
        assert sum(e["free"] for e in status["enis"]) == 0 and status["ready"] is False
        assert sorted(os.listdir(conf_dir)) == ["10-aws.conflist"]
        assert agent_cli(node, "status", "--ready").returncode == 1
        fresh_lab.clear_faults()
        node.wait_for(lambda: (conf_dir / "10-aws-vpc.conflist").exists(), what="the conflist")
        status = node.agent_status()
        assert status["ready"] is True and sum(e["free"] for e in status["enis"]) > 0
        assert agent_cli(node, "status", "--ready").returncode == 0
        rendered = json.loads(agent_cli(node, "render-conflist", env={"IP_COOLDOWN_PERIOD": "0"}).stdout)  # as the agent's
        assert json.loads((conf_dir / "10-aws-vpc.conflist").read_text()) == rendered
        assert sorted(os.listdir(conf_dir)) == ["10-aws-vpc.conflist", "10-aws.conflist"]  # ours sorts first
        assert previous.read_text().startswith('{"cniVersion": "0.4.0"')
        (conf_dir / "10-aws-vpc.conflist").unlink()  # removed by hand: written again
        node.wait_for(lambda: (conf_dir / "10-aws-vpc.conflist").exists(), what="the conflist written again")
    finally:
        node.stop_agents()


def test_corrupt_store_is_rebuilt_from_ec2_and_the_host_keeping_the_bad_file(fresh_lab, tmp_path, make_netns):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist()
    pods = {}
    for i in range(3):
        netns = make_netns(f"pod{i}")
        rc, out, err = node.cnitool("add", netns, f"web-{i}")
        assert rc == 0, err + out
        pods[netns] = json.loads(out)["ips"][0]["address"].split("/")[0]
    store = os.path.join(node.data_dir, f"{NETWORK}.json")
    with open(store, "w") as f:
        f.write('{"schema": 1, "enis": {')  # torn by hand
    node.start_agent()
    try:
        status = node.agent_status()
        assert sum(e["assigned"] for e in status["enis"]) == 3  # the pods on the host, claimed back
        with open(store) as f:
            held = {ip for eni in json.load(f)["enis"].values() for ip, e in eni["ips"].items()
                    if e["state"] == "assigned"}
        assert held == set(pods.values())
        aside = [n for n in os.listdir(node.data_dir) if ".corrupt-" in n]
        assert len(aside) == 1
        with open(os.path.join(node.data_dir, aside[0])) as f:
            assert f.read() == '{"schema": 1, "enis": {'
        netns = make_netns("pod3")
        rc, out, err = node.cnitool("add", netns, "web-3")
        assert rc == 0, err + out
        assert json.loads(out)["ips"][0]["address"].split("/")[0] not in pods.values()
        pods[netns] = None
    finally:
        node.stop_agents()
        for i, netns in enumerate(pods):
            node.cnitool("del", netns, f"web-{i}")


def test_idle_enis_and_surplus_ips_return_to_ec2(fresh_lab, tmp_path):
    """WARM_IP_TARGET=2: 12 pods need a second ENI; once they are gone the agent gives the IPs back
    and, the ENI being 60 s old and idle, detaches and deletes it."""
    node = LabNode(fresh_lab, "node1", tmp_path, warmIPTarget=2)
    for i in range(12):
        assert node.ipam("ADD", cid=f"pod{i}")[0] == 0
    attached = set(node.ec2_enis())
    assert len(attached) == 2
    with open(os.path.join(node.data_dir, f"{NETWORK}.json")) as f:
        attached_at = max(eni["attached_at"] for eni in json.load(f)["enis"].values())
    node.start_agent(WARM_IP_TARGET="2")
    try:
        for i in range(12):
            assert node.ipam("DEL", cid=f"pod{i}")[0] == 0
        node.wait_for(lambda: len(node.ec2_enis()) == 1, timeout=120, what="the idle ENI to be freed")
        assert time.time() - attached_at >= 59  # not before the ENI's minimum age of 60 s
        view = node.ec2_enis()
        assert [d for d, _ in view.values()] == [0] and sum(len(s) for _, s in view.values()) == 2
        gone = (attached - set(view)).pop()
        node.wait_for(lambda: fresh_lab.ec2("DescribeNetworkInterfaces", Filters=[
            {"Name": "network-interface-id", "Values": [gone]}])["NetworkInterfaces"] == [], timeout=30,
            what="the detached ENI to be deleted, not left behind")
    finally:
        node.stop_agents()



def test_an_add_that_leaves_the_pool_short_wakes_the_agent_before_its_next_tick(fresh_lab, tmp_path):
    """WARM_ENI_TARGET=1 on an m5.large keeps 9 IPs available; the ADD that takes one leaves the pool
    short, and asks the agent (ticking every 60 s here) to grow now: a second ENI comes at once."""
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.start_agent(interval=60)
    try:
        node.wait_for(lambda: node.agent_status()["figures"]["short"] == 0, what="the warm pool")
        assert len(node.ec2_enis()) == 1
        ticks = node.agent_status()["ticks"]
        assert node.ipam("ADD", cid="pod0")[0] == 0
        node.wait_for(lambda: len(node.ec2_enis()) == 2, timeout=20, what="a second ENI, grown on the nudge")
        node.wait_for(lambda: node.agent_status()["ticks"] > ticks, timeout=20, what="the nudged round to end")
    finally:
        node.stop_agents()
        node.ipam("DEL", cid="pod0")


def test_the_agent_sets_aws_vpc_eni_mtu_on_the_primary_eni_at_start(fresh_lab, tmp_path):
    """As upstream's ipamd (networkutils SetupHostNetwork): the primary ENI gets AWS_VPC_ENI_MTU."""
    node = LabNode(fresh_lab, "node1", tmp_path)

    def primary():  # (name, MTU) of the node's interface with the primary ENI's address
        ip = next(n["primary_ip"] for n in fresh_lab.status()["nodes"] if n["name"] == "node1")
        return next((link["ifname"], link["mtu"]) for link in json.loads(fresh_lab.exec(
            "node1", ["ip", "-j", "addr"]).stdout) if any(a.get("local") == ip for a in link.get("addr_info", [])))
    name, mtu = primary()
    assert mtu != 1400
    node.start_agent(AWS_VPC_ENI_MTU="1400")
    assert primary() == (name, 1400)
    node.stop_agents()
    node.start_agent()  # the default, 9001
    try:
        assert primary() == (name, 9001)
    finally:
        node.stop_agents()
