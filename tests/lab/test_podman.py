"""podman with its CNI backend on our chain, as a user on a node runs it (issue 14 point 3).

podman 4.3 sends CNI_ARGS `IgnoreUnknown=1;K8S_POD_NAME=<container name>` (a generated name such as
`eager_hamilton` unless --name is given) and no K8S_POD_NAMESPACE; port mappings as the portMappings
capability; DEL when the container stops or is removed. See tests/support/podman_world.py for the set-up.
"""

import pytest
from support.podman_world import PodmanNode, http_get
from support.reliability_world import held

SLEEP = ["sleep", "600"]  # outlives any test; `podman rm -f -t 0` ends it


def web(token: str) -> list[str]:
    """A busybox httpd on port 8080 serving `token` at /."""
    return ["sh", "-c", f"echo {token} > /www/index.html && exec httpd -f -p 8080 -h /www"]


@pytest.fixture
def node1(fresh_lab, tmp_path):
    node = PodmanNode(fresh_lab, "node1", tmp_path)
    try:
        node.load_image()
        yield node
    finally:
        node.close()


def primary_ip(lab, node: str) -> str:
    return next(n["primary_ip"] for n in lab.status()["nodes"] if n["name"] == node)


def veths_of(view, cid: str) -> list[str]:
    return [name for name, alias in view.veths.items() if alias and f"/{cid}/" in alias]


def test_podman_run_with_and_without_a_name_gets_a_vpc_address(node1, fresh_lab):
    named = node1.run(SLEEP, "--name", "probe1")
    unnamed = node1.run(SLEEP)
    assert "_" in node1.inspect(unnamed)["Name"]  # podman's generated name, e.g. eager_hamilton
    secondary = {ip: eni for eni, (_, ips) in node1.ec2_enis().items() for ip in ips}
    holders = held(node1.store())
    view = node1.view()
    addresses = set()
    for cid in (named, unnamed):
        ip = node1.address(cid)
        addresses.add(ip)
        assert ip in secondary, f"{ip} is no secondary IP EC2 knows of node1: {secondary}"
        assert holders[(cid, "eth0")] == [(ip, secondary[ip])]
        assert f"inet {ip}/32" in node1.exec(cid, "ip", "-4", "-o", "addr", "show", "eth0")
        assert len(veths_of(view, cid)) == 1 and view.routes[ip] == veths_of(view, cid)[0]
        assert node1.cache_entries(cid)
        assert node1.probe(fresh_lab.netns("node2"), "ping", ip), f"node2 does not reach {ip}"
    assert len(addresses) == 2


def test_a_host_port_is_reached_from_the_other_node(node1, fresh_lab):
    cid = node1.run(web("hello-from-podman"), "--name", "web", "-p", "18080:8080")
    assert node1.podman("port", "web").stdout.split() == ["8080/tcp", "->", "0.0.0.0:18080"]
    assert http_get(fresh_lab, "node2", primary_ip(fresh_lab, "node1"), 18080) == "hello-from-podman\n"
    assert cid in node1.view().dnat_entries


def test_podman_rm_and_rm_f_leave_nothing(node1, fresh_lab):
    stopped = node1.run(web("stopped"), "--name", "stopped", "-p", "18081:8080")
    stopped_ip = node1.address(stopped)
    with_one = node1.view()
    forced = node1.run(web("forced"), "--name", "forced", "-p", "18082:8080")
    forced_ip = node1.address(forced)
    view = node1.view()
    assert veths_of(view, forced) and forced_ip in view.routes and forced_ip in view.rules_to
    assert forced in view.dnat_entries and node1.cache_entries(forced)
    assert http_get(fresh_lab, "node2", primary_ip(fresh_lab, "node1"), 18082) == "forced\n"

    node1.podman("rm", "-f", "-t", "0", "forced")  # running: removal stops it, whose DEL runs
    assert node1.view() == with_one  # links, routes, rules, both iptables variants: all as before
    assert set(held(node1.store())) == {(stopped, "eth0")}
    assert node1.traces_of(forced) == []
    node1.wait_exited(forced)  # its conmon

    node1.podman("stop", "-t", "0", "stopped")  # its DEL runs here
    node1.podman("rm", "stopped")
    view = node1.view()
    assert view.pod_leftovers() == []
    assert not [rule for rule in view.nat_rules if stopped in rule or stopped_ip in rule or "18081" in rule]
    assert set(view.nat_rules) <= set(with_one.nat_rules)
    assert held(node1.store()) == {}
    node1.wait_exited()
    assert node1.leftovers() == []
    assert node1.podman("ps", "-aq").stdout == ""


def test_podman_network_ls_shows_our_network(lab, tmp_path):
    node = PodmanNode(lab, "node2", tmp_path)
    try:
        listed = node.podman("network", "ls", "--format", "{{.Name}} {{.Driver}}").stdout.splitlines()
        assert "aws-vpc aws-vpc-bridge" in listed  # podman names a CNI network's driver by its first plugin
    finally:
        node.close()
