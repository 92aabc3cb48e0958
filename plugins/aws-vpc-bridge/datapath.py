"""The data path of one pod attachment (ARCHITECTURE §4): what aws-vpc-bridge's ADD builds, CHECK
checks, and DEL and GC remove, kept beside its main as the reference plugins' ptp keeps its veth
setup beside ADD.

Inside the pod: `<podIP>/32` on the pod interface, `169.254.1.1 dev <ifname> scope link`,
`default via 169.254.1.1` and a permanent neighbour 169.254.1.1 -> host veth MAC.
On the node: the host veth (up, with the attachment's alias: `cnicore.veths`), `<podIP>/32 dev
<hostveth> scope link` in main, and the rules and ENI table of `cnicore.podroutes` (shared with
the agent's repair, hence in the core).

All calls run in the caller's (the node's) network namespace; the pod namespace is reached
through its path (CNI_NETNS). ADD makes no dump at all (links are asked for by name, stale rules
deleted by their exact selectors, the /32 route replaced); DEL dumps only the main table, which
the kernel filters, to find the /32 route to the pod IP.

Failures are `DataPathError`s naming the operation and the object; bad arguments are `ValueError`s
raised before anything changes.
"""

from __future__ import annotations

import errno
import os

from cnicore import ipv4
from cnicore.podroutes import (FROM_POD_RULE_PRIORITY, SecondaryEni, check_eni, check_mtu, delete_pod_rules,
                               ensure_eni_table, pod_rules)
from cnicore.record import record
from cnicore.rtnl import (MAIN_TABLE, RT_SCOPE_LINK, Link, Netns, DataPathError, NetnsError, Route, check_ifname,
                          route_text)
from cnicore.veths import Attachment

POD_GATEWAY = "169.254.1.1"


class InterfaceExistsError(DataPathError):
    """The pod interface name is already taken in the pod's namespace."""


class PodNetwork(record("PodNetwork", "attachment netns host_veth pod_ip mtu eni", defaults=(9001, None))):
    """Everything one attachment's data path is built from; `eni` None: the IP is on the primary
    ENI and leaves by main."""

    __slots__ = ()

    def __new__(cls, attachment: Attachment, netns: str, host_veth: str, pod_ip: str, mtu: int = 9001,
                eni: SecondaryEni | None = None):
        if not netns:
            raise ValueError("pod netns path is empty")
        check_ifname("host veth", host_veth)
        try:
            value = ipv4.address(pod_ip)
        except ValueError:
            raise ValueError(f"pod IP {pod_ip!r} is not an IPv4 address") from None
        check_mtu("pod veth", mtu)
        if eni is not None:
            ip = ipv4.text(value)
            if not ipv4.contains(ipv4.network(eni.subnet), value):
                raise ValueError(f"pod IP {ip} is outside ENI {eni.mac} subnet {eni.subnet}")
            if ip == eni.gateway:
                raise ValueError(f"pod IP {ip} is the gateway of subnet {eni.subnet}")
        return super().__new__(cls, attachment, netns, host_veth, pod_ip, mtu, eni)

    @property
    def ifname(self) -> str:
        return self.attachment.ifname


VethPair = record("VethPair", "host_name host_mac pod_name pod_mac")
VethPair.__doc__ = "The links ADD made, as the CNI result lists them."


def _pod_routes(oif: int) -> list[Route]:
    return [Route(f"{POD_GATEWAY}/32", oif, scope=RT_SCOPE_LINK),
            Route("0.0.0.0/0", oif, gateway=POD_GATEWAY)]


# ---------------------------------------------------------------------------------------------
# ADD


def setup_pod(net: PodNetwork) -> VethPair:
    """Build the attachment's data path; on any failure undo what was built and raise.

    Checked before anything changes: the pod netns (NetnsError), the interface name in it
    (InterfaceExistsError), the ENI by its MAC, the host veth name. A stale host veth of that name
    (a pod recreated before its old DEL) is replaced, as upstream does; so are leftover rules
    512/1536 for the pod IP, since IPAM has just given that IP to this attachment.

    Crash safety: the pair is made with its host end straight in the host netns (moving a link
    between namespaces costs the kernel an RCU grace period, 15-30 ms here), and that end gets the
    attachment's alias in the same request that sets it up. A process killed at any instant thus
    leaves on the node nothing, a host veth whose alias names its attachment (which that attachment's
    DEL and GC find), or, killed between those two requests, a host veth that is down and has no
    alias: DEL removes it through the pod end (`teardown_pod(netns=...)`), GC as an unfinished veth
    (`cnicore.veths.list_host_veths`), and it goes with the pod netns in any case.
    """
    with Netns() as host, Netns.at(net.netns) as pod:
        if pod.link(net.ifname) is not None:
            raise InterfaceExistsError(f"create {net.ifname} in pod netns {net.netns}: "
                                       "an interface of that name already exists there")
        stale = host.link(net.host_veth)
        if stale is not None and stale.kind != "veth":
            raise DataPathError(f"create host veth {net.host_veth}: a {stale.kind or 'non-veth'} "
                               "link of that name exists in the host netns")
        if net.eni is not None:
            ensure_eni_table(host, net.eni)
        if stale is not None:
            host.delete_link(stale)
        undo = []
        host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _build(host, pod, host_fd, net, undo)
        except BaseException as exc:
            for step in reversed(undo):
                try:
                    step()
                except DataPathError as cleanup_exc:
                    exc.add_note(f"while undoing: {cleanup_exc}")
            raise
        finally:
            os.close(host_fd)


def _build(host: Netns, pod: Netns, host_fd: int, net: PodNetwork, undo: list) -> VethPair:
    """Create and configure the veth pair, then the host route and rules; log undo steps."""
    try:
        pod.add_veth(f"create veth {net.ifname} in pod netns {net.netns} with peer {net.host_veth} in the host netns",
                     net.ifname, net.mtu, net.host_veth, host_fd)
    except DataPathError as exc:
        if exc.errno == errno.EEXIST:
            raise InterfaceExistsError(exc.msg, exc.errno) from None
        raise
    host_link = host.existing_link(net.host_veth)
    undo.append(lambda: host.delete_link(host_link))  # takes its peer along
    host.set_link(f"set alias {net.attachment.alias} on host veth {net.host_veth} and set it up", host_link.index,
                  up=True, alias=net.attachment.alias)
    pod_link = pod.existing_link(net.ifname)
    pod.set_link(f"set {net.ifname} up", pod_link.index, up=True)
    pod.add_address(f"add address {net.pod_ip}/32 to {net.ifname}", pod_link.index, f"{net.pod_ip}/32")
    for route in _pod_routes(pod_link.index):
        pod.add_route(route, net.ifname, MAIN_TABLE)
    pod.add_permanent_neighbour(f"add permanent neighbour {POD_GATEWAY} lladdr {host_link.mac} dev {net.ifname}",
                                pod_link.index, POD_GATEWAY, host_link.mac)

    host_route = Route(f"{net.pod_ip}/32", host_link.index, scope=RT_SCOPE_LINK)
    host.add_route(host_route, net.host_veth, MAIN_TABLE, replace=True)
    delete_pod_rules(host, net.pod_ip)
    for rule in pod_rules(net.pod_ip, net.eni):
        host.add_rule(rule)
        undo.append(lambda rule=rule: host.delete_rule(rule))
    return VethPair(net.host_veth, host_link.mac, net.ifname, pod_link.mac)


# ---------------------------------------------------------------------------------------------
# DEL and GC


def teardown_pod(attachment: Attachment, *, host_veth: str | None = None,
                 pod_ip: str | None = None, netns: str | None = None) -> None:
    """Remove the attachment's host veth (with it the pod end and the /32 route) and its rules.

    Works from the host side alone, so also after the pod netns is gone; idempotent. The veth is
    looked for under the name `host_veth` and behind the /32 route to `pod_ip`, and deleted only if
    its alias names this attachment: a veth now serving another attachment is left alone.
    Rules 512/1536 for `pod_ip` are removed unless the /32 route to it goes through a live link of
    another attachment (the IP already serves another pod). ENI tables are shared and left in place.
    The kernel destroys a deleted pod netns, and the pair with it, asynchronously, so the pair may
    vanish between any two requests here: a route whose link is gone by the time it is looked up
    is the vanishing pair's, and its rules are removed.
    With `netns` (the pod's, if it still exists): a host veth `host_veth` without alias (an ADD killed
    before it marked the host end) is removed when its peer is the pod's `ifname` in that netns.
    """
    if host_veth is not None:
        check_ifname("host veth", host_veth)
    if pod_ip is not None:
        try:
            ipv4.address(pod_ip)
        except ValueError:
            raise ValueError(f"pod IP {pod_ip!r} is not an IPv4 address") from None
    with Netns() as host:
        route = host.route_to(pod_ip) if pod_ip is not None else None
        by_name = host.link(host_veth) if host_veth else None
        by_route = host.link_at(route.oif) if route is not None else None
        deleted = set()
        for link in (by_name, by_route):
            if link is not None and link.alias == attachment.alias and link.index not in deleted:
                host.delete_link(link)  # the kernel drops the routes through it
                deleted.add(link.index)
        if pod_ip is not None and (by_route is None or by_route.index in deleted):
            delete_pod_rules(host, pod_ip)
        if netns and by_name is not None and by_name.alias is None and by_name.kind == "veth":
            _remove_unfinished_pair(host, by_name, netns, attachment.ifname)


def _remove_unfinished_pair(host: Netns, host_link: Link, path: str, ifname: str) -> None:
    """Delete an unaliased host veth whose peer is the pod's `ifname` in the pod netns `path`."""
    try:
        with Netns.at(path) as pod:
            pod_link = pod.link(ifname)
    except NetnsError:
        return  # the netns is gone, and the pair with it
    if pod_link is not None and pod_link.kind == "veth" and pod_link.peer_index == host_link.index \
            and host_link.peer_index == pod_link.index:
        host.delete_link(host_link)


# ---------------------------------------------------------------------------------------------
# CHECK


def check_pod(net: PodNetwork, *, pod_mac: str | None = None,
              host_mac: str | None = None) -> list[str]:
    """What is missing or wrong in the attachment's data path; empty when all is in place.

    `pod_mac`/`host_mac` are the MACs the CNI result recorded (a later plugin, e.g. tuning, may
    have changed them). MTUs are not checked: such a plugin may change them too.
    """
    problems: list[str] = []
    with Netns() as host:
        host_link = _check_host(host, net, host_mac, problems)
        try:
            with Netns.at(net.netns) as pod:
                _check_pod_side(pod, net, pod_mac, host_link, problems)
        except NetnsError as exc:
            problems.append(str(exc))
    return problems


def _check_host(host: Netns, net: PodNetwork, host_mac: str | None, problems: list) -> Link | None:
    link = host.link(net.host_veth)
    rules = host.rules()
    present = {rule.key for rule in rules}
    for rule in pod_rules(net.pod_ip, net.eni):
        if rule.key not in present:
            problems.append(f"rule {rule}: missing")
    if net.eni is None:
        for rule in rules:
            if rule.priority == FROM_POD_RULE_PRIORITY and rule.src == f"{net.pod_ip}/32":
                problems.append(f"rule {rule}: present, but the IP is on the primary ENI")
    else:
        check_eni(host, net.eni, problems)
    if link is None or link.kind != "veth":
        problems.append(f"host veth {net.host_veth}: missing")
        return None
    if link.alias != net.attachment.alias:
        problems.append(f"host veth {net.host_veth}: alias {link.alias!r}, "
                        f"expected {net.attachment.alias!r}")
    if host_mac and link.mac != host_mac.lower():
        problems.append(f"host veth {net.host_veth}: MAC {link.mac}, expected {host_mac.lower()}")
    if not link.up:
        problems.append(f"host veth {net.host_veth}: down")
    route = Route(f"{net.pod_ip}/32", link.index, scope=RT_SCOPE_LINK)
    if route not in host.routes(MAIN_TABLE):
        problems.append(f"host route {route_text(route, net.host_veth)}: missing")
    return link


def _check_pod_side(pod: Netns, net: PodNetwork, pod_mac: str | None, host_link: Link | None,
                    problems: list) -> None:
    where = f"{net.ifname} in pod netns {net.netns}"
    link = pod.link(net.ifname)
    if link is None:
        problems.append(f"{where}: missing")
        return
    if pod_mac and link.mac != pod_mac.lower():
        problems.append(f"{where}: MAC {link.mac}, expected {pod_mac.lower()}")
    if not link.up:
        problems.append(f"{where}: down")
    if host_link is not None and (link.peer_index != host_link.index
                                  or host_link.peer_index != link.index):
        problems.append(f"{where}: not the peer of host veth {net.host_veth}")
    if f"{net.pod_ip}/32" not in pod.addresses(link.index):
        problems.append(f"{where}: address {net.pod_ip}/32 missing")
    routes = pod.routes(MAIN_TABLE)
    for route in _pod_routes(link.index):
        if route not in routes:
            problems.append(f"{where}: route {route_text(route, net.ifname)} missing")
    neighbour = pod.permanent_neighbours(link.index).get(POD_GATEWAY)
    expected = host_link.mac if host_link is not None else None
    if neighbour is None:
        problems.append(f"{where}: permanent neighbour {POD_GATEWAY} missing")
    elif expected and neighbour != expected:
        problems.append(f"{where}: neighbour {POD_GATEWAY} lladdr {neighbour}, "
                        f"expected the host veth's {expected}")
