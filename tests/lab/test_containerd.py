"""containerd's CRI, as on an EKS node: kubelet's calls reach our chain through containerd 1.6 (issue 14).

Two lab nodes each run a private containerd (tests/support/cri_world.py) with the CRI plugin on the conflist
our agent renders and our frozen binaries; there is no node agent: the IPAM grows the pool from EC2
at the first ADD. The tests call the CRI as kubelet does and look at what containerd sent the
plugins (recorded by a wrapper around aws-vpc-bridge and portmap-compat), at the pods' network from
inside their namespaces and from the other node, and at what the node holds after Stop and Remove.
"""

import json
import sys
import time

import grpc
import pytest

from conftest import RUN_PREFIX
from lab.conftest import reset_lab as reset
from support.cri_world import cri, cri_nodes
from support.reliability_world import held


HOST_PORT, CONTAINER_PORT = 18080, 8080
PLUGINS = ("aws-vpc-bridge", "aws-snat", "portmap-compat")  # the agent's chain
# The reference bandwidth plugin taking the rates from the pod's annotations alone: rates in its own
# entry (as conflists/20-aws-vpc-bandwidth-tuning.conflist has) win over the annotations.
BANDWIDTH = {"type": "bandwidth", "capabilities": {"bandwidth": True}}


@pytest.fixture(scope="module")
def cluster(lab, tmp_path_factory):
    """Both nodes with containerd running, shared by the module's tests (each removes its pods); the
    lab reset around them as fresh_lab does (a function-scoped fixture cannot serve a module's)."""
    reset(lab)
    try:
        with cri_nodes(lab, str(tmp_path_factory.mktemp("cri")), RUN_PREFIX) as nodes:
            yield nodes
    finally:
        reset(lab)


@pytest.fixture
def kube(cluster):
    """Runs pods as kubelet would; at the end every pod of the test is stopped and removed, and the
    nodes are back to the module's conflist."""
    pods = []

    def run(node, name, **kw):
        pod = cluster[node].containerd.run_pod(name, **kw)
        pods.append((node, pod))
        return pod

    yield run
    for node, pod in pods:
        containerd = cluster[node].containerd
        if pod.id in containerd.sandbox_ids():
            containerd.stop_pod(pod)
            containerd.remove_pod(pod)
    for node in cluster.values():
        if [p["type"] for p in node.conflist["plugins"]] != list(PLUGINS):
            node.install_conflist()
            node.containerd.wait_cni_config(list(PLUGINS))


# --------------------------------------------------------------------------------------------------


def ec2_ips(node) -> set[str]:
    return {ip for _, ips in node.ec2_enis().values() for ip in ips}


def ping(containerd, pod, address: str, timeout: float = 20) -> bool:
    """An ICMP echo from inside the pod's netns answered, retried until `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = containerd.in_pod(pod, [sys.executable, "-m", "vpclab.probe", "ping", address, "--timeout", "1"])
        if proc.returncode == 0 and json.loads(proc.stdout).get("ok"):
            return True
    return False


def assert_nothing_left(node, sandbox_ids):
    """Nothing of the pods on the node: veth, routes, rules, DNAT chains and entries, store
    reservation, libcni cache entry."""
    view = node.view()
    assert view.pod_leftovers() == [], f"left on {node.node}: {view.pod_leftovers()}"
    assert held(node.store()) == {}, f"the store of {node.node} still holds {held(node.store())}"
    cached = [e for e in node.containerd.cache_entries() if any(sid in e for sid in sandbox_ids)]
    assert cached == [], f"libcni's cache still has {cached}"


def bridge_calls(node, pod_id):
    return [c for c in node.calls(pod_id) if c.plugin == "aws-vpc-bridge"]


# --------------------------------------------------------------------------------------------------


def test_sandboxes_with_kubelets_metadata_get_vpc_ips(cluster, kube):
    node = cluster["node1"]
    pods = [kube("node1", f"web-{i}", namespace="shop") for i in range(2)]
    known = ec2_ips(node)
    holders = held(node.store())
    for pod in pods:
        assert pod.ip in known, f"{pod.name} got {pod.ip}, which EC2 does not assign to {node.node}: {known}"
        assert [ip for ip, _ in holders[(pod.id, "eth0")]] == [pod.ip]
        addrs = json.loads(node.containerd.in_pod(pod, ["ip", "-j", "-4", "addr", "show", "eth0"]).stdout)
        assert [a["local"] for a in addrs[0]["addr_info"]] == [pod.ip]
        add = bridge_calls(node, pod.id)[0]
        assert (add.command, add.rc) == ("ADD", 0)
        # what containerd sends, kubelet's metadata in CNI_ARGS
        assert add.cni_args == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": pod.name,
                                "K8S_POD_INFRA_CONTAINER_ID": pod.id, "K8S_POD_UID": pod.uid}
        assert (add.env["CNI_NETNS"], add.env["CNI_IFNAME"]) == (pod.netns_path, "eth0")
        assert add.conf["name"] == "aws-vpc" and "prevResult" not in add.conf
    assert pods[0].ip != pods[1].ip


def test_pod_to_pod_across_nodes(cluster, kube):
    a, b = kube("node1", "ping-a"), kube("node2", "ping-b")
    assert ping(cluster["node1"].containerd, a, b.ip), f"{a.ip} on node1 cannot reach {b.ip} on node2"
    assert ping(cluster["node2"].containerd, b, a.ip), f"{b.ip} on node2 cannot reach {a.ip} on node1"


def serve_hello(containerd, pod) -> None:
    """An app container in the pod answering HTTP on CONTAINER_PORT with 'hello from <hostname>'."""
    containerd.run_container(pod, "web", ["/bin/sh", "-c", f"echo hello from $(hostname) >/www/index.html && "
                                                           f"exec httpd -f -p {CONTAINER_PORT} -h /www"])


def fetch(lab, from_node: str, url: str, timeout: float = 30) -> str:
    """An HTTP GET from a node, retried until it answers (the server starts with its container)."""
    deadline = time.monotonic() + timeout
    get = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')"
    while True:
        proc = lab.exec(from_node, [sys.executable, "-c", get, url], check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            return proc.stdout
        time.sleep(0.2)


def test_a_host_port_is_reached_from_the_other_node(cluster, kube, lab):
    node1 = cluster["node1"]
    pod = kube("node1", "hostport-web", port_mappings=[(HOST_PORT, CONTAINER_PORT)])
    portmap = [c for c in node1.calls(pod.id) if c.plugin == "portmap-compat"]
    # what containerd sends: go-cni's PortMapping has no JSON tags, so the keys are Go's field names
    assert portmap[0].conf["runtimeConfig"]["portMappings"] == [
        {"HostPort": HOST_PORT, "ContainerPort": CONTAINER_PORT, "Protocol": "tcp", "HostIP": ""}]
    serve_hello(node1.containerd, pod)
    assert fetch(lab, "node2", f"http://{node1.primary_ip}:{HOST_PORT}/") == "hello from hostport-web\n"


def test_stop_and_remove_leave_nothing(cluster, kube, lab):
    node = cluster["node1"]
    pod = kube("node1", "short-lived", port_mappings=[(HOST_PORT, CONTAINER_PORT)])
    view = node.view()
    assert view.pod_leftovers(), "the pod is not on the node"
    assert f"aws-vpc-{pod.id}-eth0" in node.containerd.cache_entries()

    node.containerd.stop_pod(pod)
    stop_del = bridge_calls(node, pod.id)[-1]
    assert (stop_del.command, stop_del.rc) == ("DEL", 0)
    assert stop_del.env["CNI_NETNS"] == pod.netns_path and "prevResult" in stop_del.conf
    assert node.view().pod_leftovers() == [] and held(node.store()) == {}

    node.containerd.remove_pod(pod)
    remove_del = bridge_calls(node, pod.id)[-1]
    assert remove_del is not stop_del and (remove_del.command, remove_del.rc) == ("DEL", 0)
    assert remove_del.env.get("CNI_NETNS", "") == "" and "prevResult" not in remove_del.conf
    assert [c.command for c in bridge_calls(node, pod.id)] == ["ADD", "DEL", "DEL"]
    assert_nothing_left(node, [pod.id])
    assert pod.id not in node.containerd.sandbox_ids()


def test_pods_keep_their_network_across_a_containerd_restart(cluster, kube):
    node1, node2 = cluster["node1"], cluster["node2"]
    a, b = kube("node1", "survivor"), kube("node2", "peer")
    assert ping(node1.containerd, a, b.ip)

    node1.containerd.kill_daemon()
    assert ping(node2.containerd, b, a.ip), "the pod lost its network when containerd died"
    node1.containerd.run_daemon()

    status, _ = node1.containerd.sandbox_status(a.id)
    assert (status.state, status.network.ip) == (cri.SANDBOX_READY, a.ip)
    assert ping(node1.containerd, a, b.ip) and ping(node2.containerd, b, a.ip)
    assert [c.command for c in bridge_calls(node1, a.id)] == ["ADD"]  # no CNI call on restart

    node1.containerd.stop_pod(a)
    node1.containerd.remove_pod(a)
    assert [(c.command, c.rc) for c in bridge_calls(node1, a.id)] == [("ADD", 0), ("DEL", 0), ("DEL", 0)]
    assert_nothing_left(node1, [a.id])


def test_a_sandbox_failing_after_the_ipam_leaves_nothing(cluster, kube):
    """A chained plugin fails the ADD after our chain set the pod up (here the reference `tuning` with a
    sysctl the kernel does not have); containerd DELs at once and drops the sandbox."""
    node = cluster["node1"]
    bad_tuning = {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.avc_no_such_sysctl": "1"}}
    node.install_conflist([bad_tuning])
    node.containerd.wait_cni_config([*PLUGINS, "tuning"])
    before = {c.env["CNI_CONTAINERID"] for c in node.calls()}

    with pytest.raises(grpc.RpcError) as failed:
        kube("node1", "doomed")
    assert 'plugin type="tuning" failed (add)' in failed.value.details()

    sandbox_id, = {c.env["CNI_CONTAINERID"] for c in node.calls()} - before
    calls = bridge_calls(node, sandbox_id)
    assert [(c.command, c.rc) for c in calls] == [("ADD", 0), ("DEL", 0)]  # one DEL, at once
    assert json.loads(calls[0].stdout)["ips"], "the IPAM gave the pod no IP"
    assert_nothing_left(node, [sandbox_id])
    assert sandbox_id not in node.containerd.sandbox_ids()


def test_the_bandwidth_annotation_shapes_the_pod(cluster, kube, lab):
    """The pod's kubernetes.io/*-bandwidth annotations reach the reference `bandwidth` plugin chained
    after ours (containerd passes them as runtimeConfig.bandwidth), which shapes the pod's veth."""
    node = cluster["node1"]
    node.install_conflist([BANDWIDTH])
    node.containerd.wait_cni_config([*PLUGINS, "bandwidth"])
    pod = kube("node1", "shaped", annotations={"kubernetes.io/ingress-bandwidth": "10M",
                                               "kubernetes.io/egress-bandwidth": "20M"})
    result = json.loads(bridge_calls(node, pod.id)[0].stdout)
    host_veth = next(i["name"] for i in result["interfaces"] if not i.get("sandbox"))

    def qdiscs(dev):
        return json.loads(lab.exec("node1", ["tc", "-j", "qdisc", "show", "dev", dev]).stdout)

    # ingress (to the pod): a tbf on the host veth; egress (from the pod): redirected to an ifb with a tbf
    veth_tbf = [q for q in qdiscs(host_veth) if q["kind"] == "tbf"]
    assert [q["options"]["rate"] for q in veth_tbf] == [10_000_000 // 8], qdiscs(host_veth)
    ifbs = [link["ifname"] for link in json.loads(lab.exec("node1", ["ip", "-j", "link", "show", "type", "ifb"]).stdout)]
    assert len(ifbs) == 1, ifbs
    assert [q["options"]["rate"] for q in qdiscs(ifbs[0]) if q["kind"] == "tbf"] == [20_000_000 // 8]

    node.containerd.stop_pod(pod)
    node.containerd.remove_pod(pod)
    assert json.loads(lab.exec("node1", ["ip", "-j", "link", "show", "type", "ifb"]).stdout) == []
    assert_nothing_left(node, [pod.id])
