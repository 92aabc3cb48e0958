"""cnicore.rtnl's mechanisms that the pod data path's tests (test_netlink.py) do not cover: the route
lookup, interfaces by MAC, IPv4 interface settings, fwmark rules and entering a namespace, each
checked against iproute2 in a namespace of the test's own."""

import os

import pytest

from cnicore import rtnl
from vpclab import netns

MAC = "02:00:00:00:0a:01"


def ip(ns: str, *args: str) -> str:
    return netns.run(["ip", "-n", ns, *args]).stdout


@pytest.fixture
def node(make_netns) -> str:
    """A namespace with veths v0 (10.9.0.1/24, MAC `MAC`, a route to 10.9.5.0/24 via 10.9.0.2) and v1."""
    name = make_netns("rtnl")
    for command in ("link add v0 address 02:00:00:00:0a:01 type veth peer name v1", "link set v0 up",
                    "link set v1 up", "address add 10.9.0.1/24 dev v0", "route add 10.9.5.0/24 via 10.9.0.2"):
        ip(name, *command.split())
    return name


def test_route_get_is_the_kernels_route_to_an_address_as_ip_route_get_shows_it(node):
    with rtnl.Netns.at(netns.path(node), "test netns") as ns:
        v0 = ns.existing_link("v0")
        on_link, via = ns.route_get("10.9.0.7"), ns.route_get("10.9.5.5")
        unreachable = ns.route_get("192.0.2.1")  # no default route
    assert on_link.oif == v0.index and on_link.gateway is None and on_link.dst == "10.9.0.7/32"
    assert via.oif == v0.index and via.gateway == "10.9.0.2"
    assert unreachable is None
    assert " dev v0 " in ip(node, "-o", "route", "get", "10.9.5.5")


def test_links_with_mac_are_every_link_with_that_hardware_address(node):
    ip(node, "link", "add", "x0", "address", MAC, "type", "veth", "peer", "name", "x1")
    with rtnl.Netns.at(netns.path(node), "test netns") as ns:
        found = sorted(link.name for link in ns.links_with_mac(MAC.upper()))
        assert ns.links_with_mac("02:00:00:00:0a:99") == []
    assert found == ["v0", "x0"]


def test_set_ipv4_conf_writes_the_interfaces_setting_by_name_or_index(node):
    def setting(name: str) -> str:
        return netns.run(["cat", f"/proc/sys/net/ipv4/conf/v0/{name}"], netns=node).stdout.strip()

    with rtnl.Netns.at(netns.path(node), "test netns") as ns:
        ns.set_ipv4_conf("set rp_filter", "v0", rtnl.IPV4_DEVCONF_RP_FILTER, 2)
        ns.set_ipv4_conf("set route_localnet", ns.existing_link("v0").index, rtnl.IPV4_DEVCONF_ROUTE_LOCALNET, 1)
        with pytest.raises(rtnl.DataPathError, match="set rp_filter of nothing in the test netns .*: No such device"):
            ns.set_ipv4_conf("set rp_filter of nothing", "nothing", rtnl.IPV4_DEVCONF_RP_FILTER, 2)
    assert (setting("rp_filter"), setting("route_localnet")) == ("2", "1")


def test_a_fwmark_rule_is_added_once_read_back_and_deleted_without_anothers_lookalike(node):
    ours = rtnl.Rule(1024, rtnl.MAIN_TABLE, mark=0x80, mask=0x80, protocol=rtnl.RTPROT_BOOT)
    ip(node, *"rule add pref 1024 iif lo fwmark 0x80/0x80 lookup main".split())  # someone else's
    with rtnl.Netns.at(netns.path(node), "test netns") as ns:
        assert ns.add_rule(ours) and not ns.add_rule(ours)  # never twice
        marked = ns.rules(marked=True)
        assert [rule.other for rule in marked if rule.priority == 1024] == [True, False]
        assert str(marked[-1]) == "1024: from all fwmark 0x80/0x80 lookup main"
        assert marked[-1].key == ours.key and marked[-1].protocol == rtnl.RTPROT_BOOT
        assert all(rule.mark is None for rule in ns.rules() if rule.priority != 1024)
        assert ns.delete_rule(marked[-1]) and not ns.delete_rule(marked[-1])
    rules = ip(node, "rule", "show", "pref", "1024")
    assert "iif lo" in rules and "proto boot" not in rules


def test_entered_moves_this_thread_into_the_namespace_and_back(node):
    def here() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    home = here()
    with rtnl.entered(netns.path(node)):
        assert here() == os.stat(netns.path(node)).st_ino
        with rtnl.Netns() as ns:
            assert ns.link("v0") is not None
    assert here() == home
    with pytest.raises(rtnl.NetnsError, match="enter netns /proc/self/ns/uts: Invalid argument"):
        with rtnl.entered("/proc/self/ns/uts"):
            pass
    assert here() == home
