"""The node's routing of pods on VPC addresses (ARCHITECTURE §4): rule 512 `to <podIP> lookup main`,
for an IP of a secondary ENI rule 1536 `from <podIP> lookup <table>`, and that ENI's table
(`<gw>/32 dev ethN scope link`, `default via <gw> dev ethN`).

aws-vpc-bridge builds and checks these for one pod (its `datapath`); the agent repairs them for
every running pod (`repair_node`). Both are here, in the core, so the ENI table ADD builds is the
one the agent puts back and the agent needs no plugin package.
"""

from __future__ import annotations

import errno

from cnicore import ipv4
from cnicore.record import record
from cnicore.rtnl import (MAIN_TABLE, RT_SCOPE_LINK, RTPROT_KERNEL, Link, Netns, DataPathError, Route, Rule, is_mac,
                          route_text)

TO_POD_RULE_PRIORITY = 512
FROM_POD_RULE_PRIORITY = 1536


class SecondaryEni(record("SecondaryEni", "mac device_number subnet mtu primary_ip", defaults=(9001, None))):
    """A secondary ENI as a pod's routes need it; it is found on the node by its MAC.

    `primary_ip`, the ENI's own address, is put on ethN so that ARP there has a source.
    """

    __slots__ = ()

    def __new__(cls, mac: str, device_number: int, subnet: str, mtu: int = 9001, primary_ip: str | None = None):
        if not isinstance(mac, str) or not is_mac(mac.lower()):
            raise ValueError(f"ENI MAC {mac!r} is not a MAC address like 02:00:00:00:00:01")
        mac = mac.lower()
        if type(device_number) is not int or not 1 <= device_number <= 251:
            raise ValueError(f"ENI {mac} device number {device_number!r} must be 1..251 "
                             "(0 is the primary ENI, routed by main; tables 253-255 are reserved)")
        try:
            network = ipv4.network(subnet)
        except ValueError as exc:
            raise ValueError(f"ENI {mac} subnet {subnet!r} is not an IPv4 CIDR: {exc}") from None
        if network[1] > 30:
            raise ValueError(f"ENI {mac} subnet {subnet} is too small for a gateway")
        if primary_ip is not None:
            try:
                inside = ipv4.contains(network, ipv4.address(primary_ip))
            except ValueError:
                inside = False
            if not inside:
                raise ValueError(f"ENI {mac} primary IP {primary_ip!r} is not an address of {subnet}")
        check_mtu(f"ENI {mac}", mtu)
        return super().__new__(cls, mac, device_number, subnet, mtu, primary_ip)

    @property
    def table(self) -> int:
        return self.device_number + 1

    @property
    def gateway(self) -> str:
        """The VPC router's address: the subnet's base address + 1."""
        return ipv4.text(ipv4.network(self.subnet)[0] + 1)

    @property
    def address(self) -> str | None:
        """`<primary IP>/<subnet prefix>` as it sits on the ENI's interface."""
        if self.primary_ip is None:
            return None
        return f"{self.primary_ip}/{ipv4.network(self.subnet)[1]}"


def check_mtu(what: str, mtu: int) -> None:
    if type(mtu) is not int or not 68 <= mtu <= 65535:
        raise ValueError(f"{what} MTU {mtu!r} must be an integer from 68 to 65535")


def pod_rules(pod_ip: str, eni: SecondaryEni | None) -> list[Rule]:
    rules = [Rule(TO_POD_RULE_PRIORITY, MAIN_TABLE, dst=f"{pod_ip}/32")]
    if eni is not None:
        rules.append(Rule(FROM_POD_RULE_PRIORITY, eni.table, src=f"{pod_ip}/32"))
    return rules


def delete_pod_rules(host: Netns, pod_ip: str) -> None:
    """Rules 512 to the pod and 1536 from the pod, whatever table they name, by their selectors
    (no dump: a node with 700 pods has 1,400 such rules)."""
    for rule in (Rule(TO_POD_RULE_PRIORITY, 0, dst=f"{pod_ip}/32"),
                 Rule(FROM_POD_RULE_PRIORITY, 0, src=f"{pod_ip}/32")):
        while host.delete_rule(rule):
            pass


def list_pod_rule_ips() -> set[str]:
    """IPs that have a rule 512 (to) or 1536 (from) in the host netns, for GC."""
    with Netns() as host:
        rules = host.rules()
    ips = set()
    for rule in rules:
        if rule.priority == TO_POD_RULE_PRIORITY and rule.dst and rule.dst.endswith("/32"):
            ips.add(rule.dst[:-3])
        elif rule.priority == FROM_POD_RULE_PRIORITY and rule.src and rule.src.endswith("/32"):
            ips.add(rule.src[:-3])
    return ips


# ---------------------------------------------------------------------------------------------
# Secondary ENI tables


def eni_routes(eni: SecondaryEni, oif: int) -> list[Route]:
    return [Route(f"{eni.gateway}/32", oif, scope=RT_SCOPE_LINK),
            Route("0.0.0.0/0", oif, gateway=eni.gateway)]


def find_eni(host: Netns, eni: SecondaryEni) -> Link:
    """The node's interface with the ENI's MAC (never found by name).

    First the interface the ENI's table already routes through, if it has that MAC; only when that
    fails the links are searched by MAC (a busy node has hundreds of veths).
    """
    for route in host.routes(eni.table):
        link = host.link_at(route.oif) if route.oif else None
        if link is not None and link.mac == eni.mac:
            return link
    matches = host.links_with_mac(eni.mac)
    if not matches:
        raise DataPathError(f"find ENI {eni.mac} (device {eni.device_number}): "
                           "no interface with that MAC in the host netns")
    if len(matches) > 1:
        names = ", ".join(link.name for link in matches)
        raise DataPathError(f"find ENI {eni.mac}: several interfaces have that MAC ({names})")
    return matches[0]


def ensure_eni_table(host: Netns, eni: SecondaryEni) -> str:
    """Bring a secondary ENI up with its MTU and fill its route table; return its interface name.

    Idempotent and safe to run from several processes at once (`replace`, not `add`). The table is
    shared by every pod on that ENI; the kernel drops its routes when the ENI is detached.
    """
    link = find_eni(host, eni)
    if link.mtu != eni.mtu or not link.up:
        host.set_link(f"set ENI {link.name} ({eni.mac}) up with MTU {eni.mtu}", link.index, up=True, mtu=eni.mtu)
    if eni.address is not None and eni.address not in host.addresses(link.index):
        # As upstream: the ENI's own address on ethN (the source of its ARP requests), without the
        # subnet route the kernel adds to main, which must keep routing the subnet by eth0.
        host.add_address(f"add address {eni.address} to ENI {link.name}", link.index, eni.address,
                         tolerate=(errno.EEXIST,))
        _delete_kernel_subnet_route(host, eni, link)
    for route in eni_routes(eni, link.index):
        host.add_route(route, link.name, eni.table, replace=True)
    return link.name


def _delete_kernel_subnet_route(host: Netns, eni: SecondaryEni, link: Link) -> None:
    base, prefixlen = ipv4.network(eni.subnet)
    subnet = f"{ipv4.text(base)}/{prefixlen}"
    host.delete_route(f"delete the kernel's route {subnet} dev {link.name}",
                      Route(subnet, link.index, scope=RT_SCOPE_LINK), MAIN_TABLE, RTPROT_KERNEL,
                      tolerate=(errno.ESRCH,))


def check_eni(host: Netns, eni: SecondaryEni, problems: list) -> None:
    """Append what is wrong with the ENI's link and table to `problems`."""
    try:
        link = find_eni(host, eni)
    except DataPathError as exc:
        problems.append(str(exc))
        return
    if not link.up:
        problems.append(f"ENI {link.name} ({eni.mac}): down")
    if eni.address is not None and eni.address not in host.addresses(link.index):
        problems.append(f"ENI {link.name} ({eni.mac}): address {eni.address} missing")
    routes = host.routes(eni.table)
    for route in eni_routes(eni, link.index):
        if route not in routes:
            problems.append(f"route {route_text(route, link.name)} table {eni.table}: missing")


# ---------------------------------------------------------------------------------------------
# The agent's repair


def repair_node(pods) -> list[str]:
    """Put back what live pods need on the node and is gone (a secondary ENI that flapped lost its
    table, a rule deleted by hand); return what was repaired, empty when all is in place.

    `pods`: (pod IP, SecondaryEni or None) of the attachments that hold their veth. Each secondary ENI
    is checked as CHECK checks it (up, its address, its table) and set up again as ADD does, without
    the subnet route the kernel puts back into main when the link comes up; rules 512 and 1536 that
    are missing are added (one dump of the rules for all pods). A pod's DEL may run meanwhile (it
    deletes the veth, with it the /32 route, then the rules): rules added for an IP that no route
    leads to any more are the gone pod's, and are taken back."""
    repaired, failed = [], []
    with Netns() as host:
        for eni in dict.fromkeys(eni for _, eni in pods if eni is not None):
            problems = []
            check_eni(host, eni, problems)
            if not problems:
                continue
            try:
                link = find_eni(host, eni)
                ensure_eni_table(host, eni)
                _delete_kernel_subnet_route(host, eni, link)
                repaired += problems
            except DataPathError as exc:  # this ENI (gone, say); the other ENIs and the rules still
                failed.append(str(exc))
        present = {rule.key for rule in host.rules()}
        for pod_ip, eni in pods:
            added = [rule for rule in pod_rules(pod_ip, eni) if rule.key not in present]
            for rule in added:
                host.add_rule(rule)
            if added and host.route_to(pod_ip) is None:
                for rule in added:
                    host.delete_rule(rule)
            else:
                repaired += [f"rule {rule}: missing" for rule in added]
    if failed:
        raise DataPathError(f"repaired {repaired or 'nothing'}, but not: {'; '.join(failed)}")
    return repaired
