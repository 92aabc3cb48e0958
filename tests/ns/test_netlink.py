"""The pod data path (aws-vpc-bridge's datapath over cnicore.rtnl, .veth and .podroutes): pure logic,
then the real data path in namespaces.

Each namespace test builds a small VPC of its own: a "router" namespace (the VPC router: 10.0.0.1
on the primary ENI's subnet, 10.0.1.1 on the secondary ENI's), a "node" namespace with eth0 (the
primary ENI, 10.0.0.10/24) and eth1 (a secondary ENI, device 2, found only by its MAC), and pod
namespaces. The functions under test run in a child process that has entered the node namespace;
nothing is done in the root namespace. The router drops packets from the secondary subnet that
arrive on the primary ENI's link (strict rp_filter on r0), so a reply proves the ENI path.
"""

import hashlib
import os
import pickle
import re
import select
import signal
import socket
import time

import pytest

from aws_vpc_bridge import datapath
from cnicore import podroutes, rtnl
from cnicore.veths import Attachment, host_veth_name, list_host_veths, remove_unfinished_veth
from vpclab import netns, probe

NODE_IP = "10.0.0.10"
ROUTER_PRIMARY_IP = "10.0.0.1"
ROUTER_ENI_IP = "10.0.1.1"
PRIMARY_MAC = "02:00:00:00:00:0a"
ENI_MAC = "02:00:00:00:01:0b"
ENI = podroutes.SecondaryEni(mac=ENI_MAC, device_number=2, subnet="10.0.1.0/24", mtu=9001)


# ---------------------------------------------------------------------------------------------
# Pure logic


def test_host_veth_name_hashes_pod_namespace_and_name():
    name = host_veth_name("eni", pod_namespace="default", pod_name="nginx")
    assert name == "eni" + hashlib.sha1(b"default.nginx").hexdigest()[:11]
    assert len(host_veth_name("abcd", pod_namespace="a", pod_name="b")) == 15


def test_host_veth_name_without_pod_hashes_container_id_and_ifname():
    name = host_veth_name("eni", container_id="cnitool-0123", ifname="eth0")
    assert name == "eni" + hashlib.sha1(b"cnitool-0123/eth0").hexdigest()[:11]
    assert name != host_veth_name("eni", container_id="cnitool-0123", ifname="net1")


@pytest.mark.parametrize("args, message", [
    (dict(prefix="", pod_namespace="a", pod_name="b"), "prefix"),
    (dict(prefix="abcde", pod_namespace="a", pod_name="b"), "prefix"),
    (dict(prefix="eni", pod_namespace="a"), "together"),
    (dict(prefix="eni", pod_name="b", container_id="c", ifname="eth0"), "together"),
    (dict(prefix="eni", container_id="c"), "needs"),
    (dict(prefix="eni"), "needs"),
])
def test_host_veth_name_rejects_incomplete_input(args, message):
    prefix = args.pop("prefix")
    with pytest.raises(ValueError, match=message):
        host_veth_name(prefix, **args)


def test_attachment_alias_round_trip():
    att = Attachment("aws-vpc", "0123abc", "eth0")
    assert att.alias == "cni:aws-vpc/0123abc/eth0"
    assert Attachment.from_alias(att.alias) == att
    for foreign in (None, "", "uplink", "cni:a/b", "cni:a/b/c/d", "cni:a/b/bad name"):
        assert Attachment.from_alias(foreign) is None


@pytest.mark.parametrize("args, message", [
    (("", "c", "eth0"), "network"),
    (("n", "a/b", "eth0"), "container_id"),
    (("n", "c", "eth0:1"), "interface name"),
    (("n", "c", "e" * 16), "interface name"),
    (("n" * 200, "c" * 60, "eth0"), "longer than 255"),
])
def test_attachment_rejects_bad_parts(args, message):
    with pytest.raises(ValueError, match=message):
        Attachment(*args)


def test_secondary_eni_table_and_gateway():
    eni = podroutes.SecondaryEni(mac="02:AB:00:00:00:01", device_number=2, subnet="10.0.64.0/19")
    assert (eni.mac, eni.table, eni.gateway) == ("02:ab:00:00:00:01", 3, "10.0.64.1")


@pytest.mark.parametrize("args, message", [
    (dict(mac="02:00:00:00:01"), "not a MAC"),
    (dict(mac=None), "not a MAC"),
    (dict(device_number=0), "device number"),
    (dict(device_number="2"), "device number"),
    (dict(device_number=252), "device number"),
    (dict(subnet="10.0.1.0"), "too small"),
    (dict(subnet="10.0.1.5/24"), "not an IPv4 CIDR"),
    (dict(subnet="fd00::/64"), "not an IPv4 CIDR"),
    (dict(mtu=60), "MTU"),
    (dict(mtu="9001"), "MTU"),
])
def test_secondary_eni_rejects_bad_fields(args, message):
    fields = dict(mac=ENI_MAC, device_number=2, subnet="10.0.1.0/24", mtu=9001) | args
    with pytest.raises(ValueError, match=message):
        podroutes.SecondaryEni(**fields)


@pytest.mark.parametrize("args, message", [
    (dict(pod_ip="10.0.2.5"), "outside ENI"),
    (dict(pod_ip="10.0.1.1"), "is the gateway"),
    (dict(pod_ip="10.0.1"), "not an IPv4 address"),
    (dict(pod_ip="fd00::5"), "not an IPv4 address"),
    (dict(mtu=70000), "MTU"),
    (dict(host_veth="eni0123456789abc"), "host veth"),
    (dict(netns=""), "netns"),
])
def test_pod_network_rejects_bad_fields(args, message):
    fields = dict(attachment=Attachment("n", "c", "eth0"), netns="/var/run/netns/x",
                  host_veth="eni0123", pod_ip="10.0.1.20", mtu=9001, eni=ENI) | args
    with pytest.raises(ValueError, match=message):
        datapath.PodNetwork(**fields)


@pytest.mark.parametrize("args, message", [
    (dict(pod_ip="10.0.1.300"), "not an IPv4 address"),
    (dict(host_veth="eni/x"), "host veth"),
])
def test_teardown_rejects_bad_input_before_touching_anything(args, message):
    with pytest.raises(ValueError, match=message):
        datapath.teardown_pod(Attachment("n", "c", "eth0"), **args)


# ---------------------------------------------------------------------------------------------
# Running code inside a namespace


class Child:
    """A forked process that enters a namespace, runs one function and pickles back the outcome."""

    def __init__(self, name: str, func, *args, **kwargs):
        self.name = name
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_end)
            self._serve(write_end, func, args, kwargs)
        os.close(write_end)
        self.pipe = read_end

    def _serve(self, write_end, func, args, kwargs):
        try:
            try:
                with netns.entered(self.name):
                    outcome = ("ok", func(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the parent
                outcome = ("error", exc)
            try:
                data = pickle.dumps(outcome)
            except Exception as exc:  # noqa: BLE001
                data = pickle.dumps(("error", RuntimeError(f"unpicklable outcome: {exc}")))
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)

    def result(self, timeout: float = 60):
        chunks, deadline = [], time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.pipe], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    raise TimeoutError(f"child in {self.name} did not finish in {timeout}s")
                chunk = os.read(self.pipe, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self.pipe)
            os.waitpid(self.pid, 0)
        status, value = pickle.loads(b"".join(chunks))
        if status == "error":
            raise value
        return value


def in_netns(name: str, func, *args, **kwargs):
    return Child(name, func, *args, **kwargs).result()


def ping(dst: str, timeout: float = 1.0) -> bool:
    """One ICMP echo from the current namespace (vpclab's probe); True when the matching reply came back."""
    try:
        return probe.ping(dst, None, timeout)["ok"]
    except OSError:  # no route to send it by
        return False


# ---------------------------------------------------------------------------------------------
# A small VPC per test


def ip(ns: str, *args: str) -> str:
    return netns.run(["ip", "-n", ns, *args]).stdout


def ip_batch(ns: str, commands: str) -> None:
    netns.run(["ip", "-n", ns, "-batch", "-"], input=commands)


def sysctl(ns: str, *settings: str) -> None:
    netns.run(["sysctl", "-qw", *settings], netns=ns)


class MiniVpc:
    """The router, the node and its two ENIs; pods on demand."""

    def __init__(self, make_netns):
        self.make_netns = make_netns
        self.router = make_netns("rtr")
        self.node = make_netns("node")
        ip_batch(self.node, f"""
link add eth0 address {PRIMARY_MAC} mtu 9001 type veth peer name r0 netns {self.router}
link add eth1 address {ENI_MAC} mtu 1500 type veth peer name r1 netns {self.router}
addr add {NODE_IP}/24 dev eth0
link set eth0 up
route add default via {ROUTER_PRIMARY_IP} dev eth0
""")
        ip_batch(self.router, f"""
addr add {ROUTER_PRIMARY_IP}/24 dev r0
addr add {ROUTER_ENI_IP}/24 dev r1
link set r0 up
link set r1 up
""")
        sysctl(self.node, "net.ipv4.ip_forward=1")
        sysctl(self.router, "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.r0.rp_filter=1")

    def pod(self, ip_address: str, *, eni=ENI, cid: str = "c1", ifname: str = "eth0",
            host_veth: str | None = None) -> datapath.PodNetwork:
        """A pod namespace and the PodNetwork for it; the router learns where the IP lives."""
        pod_ns = self.make_netns("pod")
        router_dev, mac = ("r1", ENI_MAC) if eni is not None else ("r0", PRIMARY_MAC)
        ip(self.router, "neigh", "replace", ip_address, "lladdr", mac, "dev", router_dev,
           "nud", "permanent")
        host_veth = host_veth or host_veth_name("eni", container_id=cid, ifname=ifname)
        return datapath.PodNetwork(Attachment("aws-vpc", cid, ifname),
                                  f"/var/run/netns/{pod_ns}", host_veth, ip_address, 9001, eni)

    def run(self, func, *args, **kwargs):
        return in_netns(self.node, func, *args, **kwargs)

    def node_state(self) -> str:
        """Links, IPv4 routes of every table and rules of the node, to compare before/after.

        Carrier and operational state are left out: the kernel settles them asynchronously.
        """
        links = re.sub(r"NO-CARRIER,|,LOWER_UP|,M-DOWN| state \S+", "",
                       ip(self.node, "-o", "link", "show"))
        routes = ip(self.node, "-4", "route", "show", "table", "all").replace(" linkdown", "")
        return "\n".join((links, routes, ip(self.node, "rule", "show")))


@pytest.fixture
def vpc(make_netns):
    return MiniVpc(make_netns)


def pod_ns_of(net: datapath.PodNetwork) -> str:
    return os.path.basename(net.netns)


def assert_node_clean(vpc: MiniVpc, net: datapath.PodNetwork) -> None:
    assert net.host_veth not in ip(vpc.node, "link", "show")
    assert net.pod_ip not in ip(vpc.node, "route", "show", "table", "all")
    assert net.pod_ip not in ip(vpc.node, "rule", "show")


# ---------------------------------------------------------------------------------------------
# ADD


def test_add_primary_eni_pod_builds_the_data_path_and_pings_both_ways(vpc):
    net = vpc.pod("10.0.0.20", eni=None)
    pair = vpc.run(datapath.setup_pod, net)
    pod = pod_ns_of(net)

    pod_link = ip(pod, "-o", "link", "show", "dev", "eth0")
    host_link = ip(vpc.node, "-o", "link", "show", "dev", net.host_veth)
    assert pair == datapath.VethPair(net.host_veth, pair.host_mac, "eth0", pair.pod_mac)
    assert f"link/ether {pair.pod_mac}" in pod_link and "mtu 9001" in pod_link
    assert f"link/ether {pair.host_mac}" in host_link and "mtu 9001" in host_link
    assert ",UP," in pod_link and ",UP," in host_link
    assert "alias cni:aws-vpc/c1/eth0" in ip(vpc.node, "link", "show", "dev", net.host_veth)
    assert "inet 10.0.0.20/32 scope global eth0" in ip(pod, "-4", "addr", "show", "dev", "eth0")
    pod_routes = ip(pod, "route", "show").splitlines()
    assert any(re.match(r"default via 169\.254\.1\.1 dev eth0\b", r) for r in pod_routes)
    assert any(re.match(r"169\.254\.1\.1 dev eth0 .*scope link", r) for r in pod_routes)
    assert f"169.254.1.1 dev eth0 lladdr {pair.host_mac} PERMANENT" in ip(pod, "neigh", "show")
    assert re.search(rf"^10\.0\.0\.20 dev {net.host_veth} .*scope link",
                     ip(vpc.node, "route", "show"), re.M)
    rules = ip(vpc.node, "rule", "show")
    assert "512:\tfrom all to 10.0.0.20 lookup main" in rules
    assert "1536:" not in rules

    assert in_netns(pod, ping, NODE_IP)
    assert vpc.run(ping, "10.0.0.20")
    assert in_netns(pod, ping, ROUTER_PRIMARY_IP)


def test_add_secondary_eni_pod_leaves_through_its_eni(vpc):
    net = vpc.pod("10.0.1.20")
    vpc.run(datapath.setup_pod, net)
    pod = pod_ns_of(net)

    eth1 = ip(vpc.node, "-o", "link", "show", "dev", "eth1")
    assert ",UP," in eth1 and "mtu 9001" in eth1
    table = ip(vpc.node, "route", "show", "table", "3")
    assert re.search(r"^default via 10\.0\.1\.1 dev eth1\b", table, re.M)
    assert re.search(r"^10\.0\.1\.1 dev eth1 .*scope link", table, re.M)
    rules = ip(vpc.node, "rule", "show")
    assert "512:\tfrom all to 10.0.1.20 lookup main" in rules
    assert "1536:\tfrom 10.0.1.20 lookup 3" in rules

    assert in_netns(pod, ping, ROUTER_ENI_IP)
    assert in_netns(pod, ping, NODE_IP)
    assert vpc.run(ping, "10.0.1.20")
    # Without rule 1536 the pod's packets leave by eth0, where the router drops them.
    ip(vpc.node, "rule", "del", "pref", "1536", "from", "10.0.1.20")
    assert not in_netns(pod, ping, ROUTER_ENI_IP)


def test_add_with_the_ifname_taken_in_the_pod_changes_nothing(vpc):
    net = vpc.pod("10.0.1.21")
    pod = pod_ns_of(net)
    ip(pod, "link", "add", "eth0", "type", "veth", "peer", "name", "other")
    pod_before, node_before = ip(pod, "-o", "link", "show"), vpc.node_state()

    with pytest.raises(datapath.InterfaceExistsError, match=f"eth0 in pod netns {net.netns}"):
        vpc.run(datapath.setup_pod, net)
    assert ip(pod, "-o", "link", "show") == pod_before
    assert vpc.node_state() == node_before


def ensure_eni_table(eni: podroutes.SecondaryEni) -> str:
    with rtnl.Netns() as host:
        return podroutes.ensure_eni_table(host, eni)


def test_add_failing_midway_undoes_what_it_built(vpc):
    net = vpc.pod("10.0.1.22")
    pod = pod_ns_of(net)
    ip(pod, "route", "add", "169.254.1.1/32", "dev", "lo")  # the pod's gateway route will clash
    vpc.run(ensure_eni_table, ENI)  # shared by the ENI's pods: set up, and kept, by design
    node_before = vpc.node_state()

    clash = r"add route 169\.254\.1\.1/32 dev eth0 scope link table 254 in the pod netns .*exists"
    with pytest.raises(rtnl.DataPathError, match=clash):
        vpc.run(datapath.setup_pod, net)
    assert "eth0" not in ip(pod, "link", "show")
    assert vpc.node_state() == node_before


def test_add_with_an_unknown_eni_mac_changes_nothing(vpc):
    eni = podroutes.SecondaryEni(mac="02:00:00:00:09:09", device_number=3, subnet="10.0.1.0/24")
    net = vpc.pod("10.0.1.23", eni=eni)
    node_before = vpc.node_state()
    with pytest.raises(rtnl.DataPathError, match="find ENI 02:00:00:00:09:09 .*no interface"):
        vpc.run(datapath.setup_pod, net)
    assert vpc.node_state() == node_before
    assert "eth0" not in ip(pod_ns_of(net), "link", "show")


@pytest.mark.parametrize("netns_path, message", [
    ("/var/run/netns/avc-no-such-ns", "open pod netns /var/run/netns/avc-no-such-ns"),
    ("/proc/self/ns/net", "is the host's own network namespace"),
    ("/proc/self/ns/uts", "enter pod netns /proc/self/ns/uts"),
])
def test_add_with_an_unusable_netns_changes_nothing(vpc, netns_path, message):
    net = vpc.pod("10.0.1.24")
    net = datapath.PodNetwork(net.attachment, netns_path, net.host_veth, net.pod_ip, eni=net.eni)
    node_before = vpc.node_state()
    with pytest.raises(rtnl.NetnsError, match=message):
        vpc.run(datapath.setup_pod, net)
    assert vpc.node_state() == node_before


def test_add_refuses_a_host_veth_name_taken_by_another_kind_of_link(vpc):
    net = vpc.pod("10.0.1.25")
    ip(vpc.node, "link", "add", net.host_veth, "type", "bridge")
    node_before = vpc.node_state()
    with pytest.raises(rtnl.DataPathError, match="a bridge link of that name exists"):
        vpc.run(datapath.setup_pod, net)
    assert vpc.node_state() == node_before
    assert "eth0" not in ip(pod_ns_of(net), "link", "show")


def test_add_replaces_a_stale_host_veth_and_the_old_del_spares_the_new_pod(vpc):
    """A pod recreated under the same name gets the same host veth name before its old DEL."""
    veth = host_veth_name("eni", pod_namespace="default", pod_name="web-0")
    old = vpc.pod("10.0.1.30", cid="old", host_veth=veth)
    new = vpc.pod("10.0.1.31", cid="new", host_veth=veth)
    vpc.run(datapath.setup_pod, old)
    vpc.run(datapath.setup_pod, new)
    assert "eth0" not in ip(pod_ns_of(old), "link", "show")

    vpc.run(datapath.teardown_pod, old.attachment, host_veth=veth, pod_ip=old.pod_ip)
    assert vpc.run(datapath.check_pod, new) == []
    assert in_netns(pod_ns_of(new), ping, ROUTER_ENI_IP)
    assert old.pod_ip not in ip(vpc.node, "rule", "show")


def _views_ours_and_pyroute2(pod_netns: str) -> tuple[dict, dict]:
    """What cnicore.rtnl's parser reads from the node and the pod, and what pyroute2 (an independent
    netlink implementation) reads from the same kernel, in the same shapes."""
    from pyroute2.iproute.linux import IPRoute

    def pyroute2_view(ipr) -> dict:
        links = sorted((rtnl.Link(m["index"], m.get("ifname"), (m.get("address") or "").lower(),
                                    m.get(("linkinfo", "kind")), m.get("ifalias"), m.get("link"),
                                    bool(m["flags"] & rtnl.IFF_UP), m.get("mtu")) for m in ipr.get_links()),
                       key=str)
        tables = {}
        for table in (rtnl.MAIN_TABLE, 255, 3):
            for m in ipr.get_routes(family=socket.AF_INET, table=table):
                if m.get("table") == table:
                    tables.setdefault(table, []).append(rtnl.Route(
                        f"{m.get('dst') or '0.0.0.0'}/{m['dst_len']}", m.get("oif"), m.get("gateway"), m["scope"]))
        rules = sorted((rtnl.Rule(m.get("priority") or 0, m.get("table"),
                                  f"{m.get('src')}/{m['src_len']}" if m.get("src") else None,
                                  f"{m.get('dst')}/{m['dst_len']}" if m.get("dst") else None,
                                  m.get("fwmark"), m.get("fwmask") if m.get("fwmark") is not None else None,
                                  m.get("protocol") or 0, False)
                        for m in ipr.get_rules(family=socket.AF_INET)), key=str)
        return {"links": links, "tables": {t: sorted(r, key=str) for t, r in tables.items()}, "rules": rules,
                "addresses": {link.index: sorted(f"{m.get('address')}/{m['prefixlen']}"
                                                 for m in ipr.get_addr(family=socket.AF_INET, index=link.index))
                              for link in links},
                "neighbours": {link.index: {m.get("dst"): (m.get("lladdr") or "").lower()
                                            for m in ipr.get_neighbours(ifindex=link.index)
                                            if m["state"] & rtnl.NUD_PERMANENT}
                               for link in links}}

    def our_view(ns) -> dict:
        links = sorted(ns.links(), key=str)
        tables = {t: sorted(ns.routes(t), key=str) for t in (rtnl.MAIN_TABLE, 255, 3)}
        return {"links": links, "tables": {t: r for t, r in tables.items() if r}, "rules": sorted(ns.rules(), key=str),
                "addresses": {link.index: sorted(ns.addresses(link.index)) for link in links},
                "neighbours": {link.index: ns.permanent_neighbours(link.index) for link in links}}

    ours, theirs = {}, {}
    with rtnl.Netns() as host, IPRoute() as ipr:
        ours["node"], theirs["node"] = our_view(host), pyroute2_view(ipr)
    with rtnl.Netns.at(pod_netns) as pod, netns.entered(os.path.basename(pod_netns)), IPRoute() as ipr:
        ours["pod"], theirs["pod"] = our_view(pod), pyroute2_view(ipr)
    return ours, theirs


def test_our_netlink_parser_reads_what_pyroute2_reads(vpc):
    primary, secondary = vpc.pod("10.0.0.20", eni=None), vpc.pod("10.0.1.20", cid="c2")
    vpc.run(datapath.setup_pod, primary)
    vpc.run(datapath.setup_pod, secondary)
    ours, theirs = vpc.run(_views_ours_and_pyroute2, secondary.netns)
    for side in ("node", "pod"):
        for view in ("links", "tables", "rules", "addresses", "neighbours"):
            assert ours[side][view] == theirs[side][view], (side, view)
    node = ours["node"]
    assert {link.alias for link in node["links"]} >= {"cni:aws-vpc/c1/eth0", "cni:aws-vpc/c2/eth0"}
    assert rtnl.Rule(1536, 3, src="10.0.1.20/32").key in {rule.key for rule in node["rules"]}
    assert any(r.gateway == "10.0.1.1" for r in node["tables"][3])
    assert ours["pod"]["neighbours"] and list(ours["pod"]["neighbours"].values())[-1]


# ---------------------------------------------------------------------------------------------
# DEL and GC


def test_del_removes_everything_and_a_second_del_succeeds(vpc):
    net = vpc.pod("10.0.1.40")
    vpc.run(datapath.setup_pod, net)
    vpc.run(datapath.teardown_pod, net.attachment, host_veth=net.host_veth, pod_ip=net.pod_ip)
    assert_node_clean(vpc, net)
    assert "eth0" not in ip(pod_ns_of(net), "link", "show")
    # The ENI's table is shared by every pod on the ENI: it stays.
    assert "default via 10.0.1.1 dev eth1" in ip(vpc.node, "route", "show", "table", "3")
    vpc.run(datapath.teardown_pod, net.attachment, host_veth=net.host_veth, pod_ip=net.pod_ip)
    vpc.run(datapath.teardown_pod, net.attachment, host_veth=net.host_veth)
    assert_node_clean(vpc, net)


def test_del_finds_the_veth_by_name_or_by_the_route_to_the_pod_ip(vpc):
    by_route, by_name = vpc.pod("10.0.1.45", cid="r"), vpc.pod("10.0.1.46", cid="n")
    for net in (by_route, by_name):
        vpc.run(datapath.setup_pod, net)
    vpc.run(datapath.teardown_pod, by_route.attachment, pod_ip=by_route.pod_ip)
    assert_node_clean(vpc, by_route)
    vpc.run(datapath.teardown_pod, by_name.attachment, host_veth=by_name.host_veth)
    assert by_name.host_veth not in ip(vpc.node, "link", "show")
    assert by_name.pod_ip not in ip(vpc.node, "route", "show", "table", "all")
    assert "from 10.0.1.46 lookup 3" in ip(vpc.node, "rule", "show")  # no IP given: rules stay


def teardown_as_the_pair_vanishes(netns_fd: int, before_request: int, net: datapath.PodNetwork) -> int:
    """Run DEL's teardown while the kernel destroys the pod netns, and the pair with it, right before
    its netlink request number `before_request`: `netns_fd` is the last reference to the deleted
    netns; it is closed then, and the teardown goes on once the host veth is gone. Returns how many
    requests the teardown made."""
    real_ask = rtnl.Netns.ask
    made, probing = 0, False

    def release(sock: rtnl.Netns) -> None:
        nonlocal probing
        os.close(netns_fd)
        probing, deadline = True, time.monotonic() + 30
        while sock.link(net.host_veth) is not None:
            assert time.monotonic() < deadline, "the kernel did not destroy the pod netns in 30 s"
            time.sleep(0.01)
        probing = False

    def ask(self, *args, **kwargs):
        nonlocal made
        if not probing:
            if made == before_request:
                release(self)
            made += 1
        return real_ask(self, *args, **kwargs)

    rtnl.Netns.ask = ask
    datapath.teardown_pod(net.attachment, host_veth=net.host_veth, pod_ip=net.pod_ip)
    if made <= before_request:
        os.close(netns_fd)
    return made


def test_del_leaves_nothing_whenever_the_kernel_destroys_the_deleted_netns(vpc):
    """containerd's RemovePodSandbox: a DEL with the netns deleted, whose pair the kernel destroys
    asynchronously, so at any point of the DEL. Every point is visited, one pod each."""
    before_request = 0
    while True:
        net = vpc.pod("10.0.1.41", cid=f"c{before_request}")
        vpc.run(datapath.setup_pod, net)
        held = os.open(net.netns, os.O_RDONLY)
        netns.delete(pod_ns_of(net))
        child = Child(vpc.node, teardown_as_the_pair_vanishes, held, before_request, net)
        os.close(held)
        made = child.result()
        assert_node_clean(vpc, net)
        if before_request >= made:  # the last run left the pair in place for the whole DEL
            break
        before_request += 1
    assert before_request >= 3


def test_del_of_an_attachment_never_added_changes_nothing(vpc):
    other = vpc.pod("10.0.1.42", cid="other")
    vpc.run(datapath.setup_pod, other)
    before = vpc.node_state()
    vpc.run(datapath.teardown_pod, Attachment("aws-vpc", "never", "eth0"),
            host_veth=other.host_veth, pod_ip=other.pod_ip)
    vpc.run(datapath.teardown_pod, Attachment("aws-vpc", "never", "eth0"),
            host_veth="eninever", pod_ip="10.0.1.43")
    assert vpc.node_state() == before


def test_del_leaves_the_rules_of_an_ip_already_serving_another_attachment(vpc):
    first = vpc.pod("10.0.1.44", cid="first")
    vpc.run(datapath.setup_pod, first)
    vpc.run(datapath.teardown_pod, first.attachment, host_veth=first.host_veth,
            pod_ip=first.pod_ip)
    second = vpc.pod("10.0.1.44", cid="second")
    vpc.run(datapath.setup_pod, second)
    # A late, repeated DEL of the first attachment, now that its IP serves the second:
    vpc.run(datapath.teardown_pod, first.attachment, host_veth=first.host_veth,
            pod_ip=first.pod_ip)
    assert vpc.run(datapath.check_pod, second) == []


def test_gc_lists_host_veths_with_attachments_and_rule_ips(vpc):
    nets = [vpc.pod("10.0.1.50", cid="a"), vpc.pod("10.0.0.51", cid="b", eni=None)]
    for net in nets:
        vpc.run(datapath.setup_pod, net)
    ip(vpc.node, "link", "add", "eniforeign", "type", "veth", "peer", "name", "xforeign")

    veths = {v.name: v for v in vpc.run(list_host_veths, "eni")}
    assert set(veths) == {nets[0].host_veth, nets[1].host_veth, "eniforeign"}
    for net in nets:
        assert veths[net.host_veth].attachment == net.attachment
        assert veths[net.host_veth].pod_ips == (net.pod_ip,)
    assert veths["eniforeign"].attachment is None and veths["eniforeign"].pod_ips == ()
    assert vpc.run(podroutes.list_pod_rule_ips) == {"10.0.1.50", "10.0.0.51"}

    vpc.run(datapath.teardown_pod, veths[nets[0].host_veth].attachment,
            host_veth=nets[0].host_veth, pod_ip="10.0.1.50")
    assert [v.name for v in vpc.run(list_host_veths, "eni")
            if v.attachment] == [nets[1].host_veth]
    assert vpc.run(podroutes.list_pod_rule_ips) == {"10.0.0.51"}


class _CountingSocket:
    """A netlink socket that counts the requests sent on it (into `sent`, shared by several)."""

    def __init__(self, sock, sent: list[int]):
        self.sock, self.sent = sock, sent

    def send(self, data: bytes) -> int:
        self.sent[0] += 1
        return self.sock.send(data)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def close(self) -> None:
        self.sock.close()


def _dump_links_while_others_come_and_go(stable: int, most: int) -> tuple[int, int, int]:
    """In this namespace: `stable` veths, then link dumps while a churn of other veths runs, until a
    dump was asked again (or `most` dumps); (dumps, requests sent, dumps missing a stable veth)."""
    import subprocess
    import threading
    netns.run(["ip", "-batch", "-"], input="".join(f"link add st{i} type veth peer name sp{i}\n" for i in range(stable)))
    done = threading.Event()

    def churn():
        n = 0
        while not done.is_set():
            subprocess.run(["ip", "-batch", "-"], input=f"link add ch{n % 40} type veth peer name cp{n % 40}\n"
                           f"link del ch{(n + 20) % 40}\n", capture_output=True, text=True)
            n += 1

    thread = threading.Thread(target=churn)
    thread.start()
    dumps = missing = 0
    sent = [0]
    try:
        while dumps < most and sent[0] == dumps:
            dumps += 1
            with rtnl.Netns() as host:
                host.sock = _CountingSocket(host.sock, sent)  # the listing's requests, counted
                names = {link.name for link in host.links("veth")}
            missing += any(f"st{i}" not in names for i in range(stable))
    finally:
        done.set()
        thread.join()
    return dumps, sent[0], missing


def test_a_link_dump_the_kernel_marks_interrupted_is_asked_again(make_netns):
    """Links that come and go during a dump make the kernel mark it NLM_F_DUMP_INTR (entries may be
    missing: the agent would take a running pod for gone); such a dump is asked again."""
    dumps, sent, missing = in_netns(make_netns("dump"), _dump_links_while_others_come_and_go, 150, 5000)
    assert sent > dumps, f"no dump was marked interrupted in {dumps} dumps"
    assert missing == 0


def _killed_after_creating_the_pair(net: datapath.PodNetwork) -> None:
    """What an ADD killed right after its first change leaves: the pair, the host end down and unaliased."""
    calls = []

    def change(self, what, *args, **kwargs):
        if calls and calls[-1].startswith("create veth"):
            raise KeyboardInterrupt("killed")  # not a DataPathError: no undo runs, as after a SIGKILL
        calls.append(what)
        return netlink_change(self, what, *args, **kwargs)

    netlink_change = rtnl.Netns.change
    rtnl.Netns.change = change
    try:
        datapath.setup_pod(net)
    except KeyboardInterrupt:
        pass
    finally:
        rtnl.Netns.change = netlink_change
    assert calls[-1] == f"create veth {net.ifname} in pod netns {net.netns} with peer {net.host_veth} in the host netns"


def test_a_pair_left_unmarked_by_a_killed_add_is_removed_by_del_or_by_gc(vpc):
    bystander = vpc.pod("10.0.1.70", cid="up")
    vpc.run(datapath.setup_pod, bystander)
    for cleaner in ("del", "gc"):
        net = vpc.pod("10.0.1.71", cid=f"killed-{cleaner}")
        vpc.run(_killed_after_creating_the_pair, net)
        veths = {v.name: v for v in vpc.run(list_host_veths, "eni")}
        assert veths[net.host_veth].unfinished and veths[net.host_veth].attachment is None
        assert not veths[bystander.host_veth].unfinished
        # DEL without the pod netns cannot tell whose it is, and leaves it
        vpc.run(datapath.teardown_pod, net.attachment, host_veth=net.host_veth, pod_ip=net.pod_ip)
        assert net.host_veth in ip(vpc.node, "link", "show")
        if cleaner == "del":
            vpc.run(datapath.teardown_pod, net.attachment, host_veth=net.host_veth, pod_ip=net.pod_ip,
                    netns=net.netns)
        else:
            assert vpc.run(remove_unfinished_veth, net.host_veth) is True
        assert net.host_veth not in ip(vpc.node, "link", "show")
        assert ip(pod_ns_of(net), "-o", "link", "show").count("\n") == 1  # lo only
    # neither touches a finished attachment (also when someone set it down), nor a veth named otherwise
    vpc.run(datapath.teardown_pod, Attachment("aws-vpc", "other", "eth0"), host_veth=bystander.host_veth,
            netns=bystander.netns)
    assert vpc.run(datapath.check_pod, bystander) == []
    ip(vpc.node, "link", "add", "enihand", "type", "veth", "peer", "name", "xhand")
    ip(vpc.node, "link", "set", bystander.host_veth, "down")  # (which flushes its route)
    veths = {v.name: v for v in vpc.run(list_host_veths, "eni")}
    assert not veths["enihand"].unfinished and not veths[bystander.host_veth].unfinished
    assert vpc.run(remove_unfinished_veth, bystander.host_veth) is False
    assert {bystander.host_veth, "enihand"} <= {v.name for v in vpc.run(list_host_veths, "eni")}


def test_concurrent_adds_on_one_eni_then_concurrent_dels(vpc):
    nets = [vpc.pod(f"10.0.1.{60 + i}", cid=f"p{i}") for i in range(4)]
    children = [Child(vpc.node, datapath.setup_pod, net) for net in nets]
    pairs = [child.result() for child in children]
    assert len({pair.host_mac for pair in pairs}) == len(nets)
    table = ip(vpc.node, "route", "show", "table", "3").splitlines()
    assert len(table) == 2, table
    for net in nets:
        assert vpc.run(datapath.check_pod, net) == []
        assert in_netns(pod_ns_of(net), ping, ROUTER_ENI_IP)

    children = [Child(vpc.node, datapath.teardown_pod, net.attachment, host_veth=net.host_veth,
                      pod_ip=net.pod_ip) for net in nets]
    for child in children:
        child.result()
    for net in nets:
        assert_node_clean(vpc, net)


# ---------------------------------------------------------------------------------------------
# CHECK


def test_check_passes_right_after_add(vpc):
    for net in (vpc.pod("10.0.1.70", cid="s"), vpc.pod("10.0.0.71", cid="p", eni=None)):
        pair = vpc.run(datapath.setup_pod, net)
        assert vpc.run(datapath.check_pod, net, pod_mac=pair.pod_mac.upper(),
                       host_mac=pair.host_mac) == []


PIECES = [
    ("pod", "addr del 10.0.1.80/32 dev eth0", "{netns}: address 10.0.1.80/32 missing"),
    ("pod", "route del default via 169.254.1.1 dev eth0",
     "route default via 169.254.1.1 dev eth0 missing"),
    ("pod", "route del 169.254.1.1/32 dev eth0",
     "route 169.254.1.1/32 dev eth0 scope link missing"),
    ("pod", "neigh del 169.254.1.1 dev eth0", "permanent neighbour 169.254.1.1 missing"),
    ("pod", "neigh replace 169.254.1.1 lladdr 02:00:00:00:00:99 dev eth0 nud permanent",
     "neighbour 169.254.1.1 lladdr 02:00:00:00:00:99, expected the host veth's"),
    ("pod", "link set eth0 down", "eth0 in pod netns {netns}: down"),
    ("pod", "link del eth0", "eth0 in pod netns {netns}: missing"),
    ("node", "link set {veth} down", "host veth {veth}: down"),
    ("node", "link set {veth} alias other", "host veth {veth}: alias 'other'"),
    ("node", "link del {veth}", "host veth {veth}: missing"),
    ("node", "route del 10.0.1.80/32", "host route 10.0.1.80/32 dev {veth} scope link: missing"),
    ("node", "rule del pref 512", "rule 512: from all to 10.0.1.80/32 lookup main: missing"),
    ("node", "rule del pref 1536", "rule 1536: from 10.0.1.80/32 lookup 3: missing"),
    ("node", "route del default table 3", "route default via 10.0.1.1 dev eth1 table 3: missing"),
    ("node", "route del 10.0.1.1/32 table 3",
     "route 10.0.1.1/32 dev eth1 scope link table 3: missing"),
    ("node", "link set eth1 down", f"ENI eth1 ({ENI_MAC}): down"),
    ("node", "link set eth1 address 02:00:00:00:07:07", f"find ENI {ENI_MAC}"),
]


@pytest.mark.parametrize("where, command, problem", PIECES, ids=[p[1] for p in PIECES])
def test_check_reports_each_piece_removed_by_hand(vpc, where, command, problem):
    net = vpc.pod("10.0.1.80")
    vpc.run(datapath.setup_pod, net)
    assert vpc.run(datapath.check_pod, net) == []
    ns = vpc.node if where == "node" else pod_ns_of(net)
    ip(ns, *command.format(veth=net.host_veth).split())
    problems = vpc.run(datapath.check_pod, net)
    expected = problem.format(veth=net.host_veth, netns=net.netns)
    assert any(expected in p for p in problems), problems


def test_check_reports_macs_other_than_recorded(vpc):
    net = vpc.pod("10.0.1.81")
    pair = vpc.run(datapath.setup_pod, net)
    problems = vpc.run(datapath.check_pod, net, pod_mac="02:00:00:00:00:01",
                       host_mac="02:00:00:00:00:02")
    assert problems == [
        f"host veth {net.host_veth}: MAC {pair.host_mac}, expected 02:00:00:00:00:02",
        f"eth0 in pod netns {net.netns}: MAC {pair.pod_mac}, expected 02:00:00:00:00:01",
    ]


def test_check_reports_a_host_veth_and_pod_interface_that_are_not_a_pair(vpc):
    net = vpc.pod("10.0.1.84")
    vpc.run(datapath.setup_pod, net)
    pod = pod_ns_of(net)
    ip(pod, "link", "del", "eth0")
    ip(vpc.node, "link", "add", net.host_veth, "type", "veth", "peer", "name", "x0", "netns", pod)
    ip(pod, "link", "add", "eth0", "type", "veth", "peer", "name", "y0")
    problems = vpc.run(datapath.check_pod, net)
    assert f"eth0 in pod netns {net.netns}: not the peer of host veth {net.host_veth}" in problems


def test_check_reports_a_from_rule_for_a_primary_eni_pod(vpc):
    net = vpc.pod("10.0.0.82", eni=None)
    vpc.run(datapath.setup_pod, net)
    ip(vpc.node, "rule", "add", "pref", "1536", "from", "10.0.0.82", "lookup", "3")
    assert vpc.run(datapath.check_pod, net) == [
        "rule 1536: from 10.0.0.82/32 lookup 3: present, but the IP is on the primary ENI"]


def test_check_reports_a_deleted_pod_netns(vpc):
    net = vpc.pod("10.0.1.83")
    vpc.run(datapath.setup_pod, net)
    netns.delete(pod_ns_of(net))
    problems = vpc.run(datapath.check_pod, net)
    assert f"open pod netns {net.netns}: No such file or directory" in problems
