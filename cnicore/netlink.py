"""Netlink data path of one pod attachment (ARCHITECTURE §4), built with pyroute2.

Inside the pod: `<podIP>/32` on the pod interface, `169.254.1.1 dev <ifname> scope link`,
`default via 169.254.1.1` and a permanent neighbour 169.254.1.1 -> host veth MAC.
On the node: the host veth (up), `<podIP>/32 dev <hostveth> scope link` in main, rule 512
`to <podIP> lookup main` and, for an IP on a secondary ENI, rule 1536 `from <podIP> lookup <table>`
with that ENI's table (`<gw>/32 dev ethN scope link`, `default via <gw> dev ethN`).

All calls run in the caller's (the node's) network namespace; the pod namespace is reached
through its path (CNI_NETNS). The host veth carries the attachment in its alias
(`cni:<network>/<container-id>/<ifname>`), so DEL and GC remove only what one attachment built,
even when pods share a veth name over time.

Failures are `DataPathError`s naming the operation and the object; bad arguments are `ValueError`s
raised before anything changes. pyroute2 is imported on first use: its package `__init__` pulls in
the whole library (~110-150 ms here), whichever submodule is asked for.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from cnicore.errors import NETLINK_FAILURE, CNIError

POD_GATEWAY = "169.254.1.1"
TO_POD_RULE_PRIORITY = 512
FROM_POD_RULE_PRIORITY = 1536
MAIN_TABLE = 254
ALIAS_TAG = "cni:"
MAX_IFNAME = 15  # IFNAMSIZ - 1
MAX_ALIAS = 255  # IFALIASZ - 1
MAX_PREFIX = MAX_IFNAME - 11
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTPROT_KERNEL = 2
NS_GET_NSTYPE = 0xB703    # ioctl on a namespace file: its CLONE_NEW* type
CLONE_NEWNET = 0x40000000
GONE_ERRNOS = (errno.ENOENT, errno.ENODEV)  # rule, link
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class DataPathError(CNIError):
    """A netlink operation on the pod's data path failed (CNI error code NETLINK_FAILURE)."""

    def __init__(self, msg: str):
        super().__init__(NETLINK_FAILURE, msg)


class InterfaceExistsError(DataPathError):
    """The pod interface name is already taken in the pod's namespace."""


class NetnsError(DataPathError):
    """The pod's network namespace cannot be used."""


# ---------------------------------------------------------------------------------------------
# What an attachment is made of


def host_veth_name(prefix: str, *, pod_namespace: str = "", pod_name: str = "",
                   container_id: str = "", ifname: str = "") -> str:
    """The host-side veth name: prefix + 11 hex digits of a SHA-1.

    Hashed is "<pod_namespace>.<pod_name>" (upstream's choice, stable across pod restarts) or, when
    the runtime sent no pod name, "<container_id>/<ifname>". The "/" cannot occur in the first form,
    so the two never collide, and two interfaces of one container get distinct veths.
    """
    if not 1 <= len(prefix) <= MAX_PREFIX:
        raise ValueError(f"veth prefix {prefix!r} must be 1 to {MAX_PREFIX} characters")
    if pod_namespace and pod_name:
        key = f"{pod_namespace}.{pod_name}"
    elif pod_namespace or pod_name:
        raise ValueError(f"pod namespace {pod_namespace!r} and pod name {pod_name!r} "
                         "must be given together")
    elif container_id and ifname:
        key = f"{container_id}/{ifname}"
    else:
        raise ValueError("a host veth name needs the pod namespace and name, "
                         "or the container ID and interface name")
    return prefix + hashlib.sha1(key.encode()).hexdigest()[:11]


@dataclass(frozen=True)
class Attachment:
    """One CNI attachment: network name, container ID, interface name in the container."""

    network: str
    container_id: str
    ifname: str

    def __post_init__(self):
        for field in ("network", "container_id", "ifname"):
            value = getattr(self, field)
            if not value or "/" in value:
                raise ValueError(f"attachment {field} {value!r} must be non-empty without '/'")
        _check_ifname("pod interface", self.ifname)
        if len(self.alias.encode()) > MAX_ALIAS:
            raise ValueError(f"attachment alias {self.alias!r} is longer than {MAX_ALIAS} bytes")

    @property
    def alias(self) -> str:
        """The host veth's alias that marks it as this attachment's."""
        return f"{ALIAS_TAG}{self.network}/{self.container_id}/{self.ifname}"

    @classmethod
    def from_alias(cls, alias: str | None) -> Attachment | None:
        if not alias or not alias.startswith(ALIAS_TAG):
            return None
        parts = alias[len(ALIAS_TAG):].split("/")
        if len(parts) != 3:
            return None
        try:
            return cls(*parts)
        except ValueError:
            return None


@dataclass(frozen=True)
class SecondaryEni:
    """A secondary ENI as a pod's routes need it; it is found on the node by its MAC."""

    mac: str
    device_number: int
    subnet: str
    mtu: int = 9001
    primary_ip: str | None = None  # the ENI's own address: put on ethN so ARP there has a source

    def __post_init__(self):
        if not isinstance(self.mac, str) or not MAC_RE.match(self.mac.lower()):
            raise ValueError(f"ENI MAC {self.mac!r} is not a MAC address like 02:00:00:00:00:01")
        object.__setattr__(self, "mac", self.mac.lower())
        if not isinstance(self.device_number, int) or not 1 <= self.device_number <= 251:
            raise ValueError(f"ENI {self.mac} device number {self.device_number!r} must be 1..251 "
                             "(0 is the primary ENI, routed by main; tables 253-255 are reserved)")
        try:
            network = ipaddress.IPv4Network(self.subnet)
        except ValueError as exc:
            raise ValueError(f"ENI {self.mac} subnet {self.subnet!r} is not an IPv4 CIDR: "
                             f"{exc}") from None
        if network.prefixlen > 30:
            raise ValueError(f"ENI {self.mac} subnet {self.subnet} is too small for a gateway")
        if self.primary_ip is not None:
            try:
                inside = ipaddress.IPv4Address(self.primary_ip) in network
            except ValueError:
                inside = False
            if not inside:
                raise ValueError(f"ENI {self.mac} primary IP {self.primary_ip!r} is not an address of {self.subnet}")
        _check_mtu(f"ENI {self.mac}", self.mtu)

    @property
    def table(self) -> int:
        return self.device_number + 1

    @property
    def gateway(self) -> str:
        """The VPC router's address: the subnet's base address + 1."""
        return str(ipaddress.IPv4Network(self.subnet).network_address + 1)

    @property
    def address(self) -> str | None:
        """`<primary IP>/<subnet prefix>` as it sits on the ENI's interface."""
        if self.primary_ip is None:
            return None
        return f"{self.primary_ip}/{ipaddress.IPv4Network(self.subnet).prefixlen}"


@dataclass(frozen=True)
class PodNetwork:
    """Everything one attachment's data path is built from."""

    attachment: Attachment
    netns: str
    host_veth: str
    pod_ip: str
    mtu: int = 9001
    eni: SecondaryEni | None = None  # None: the IP is on the primary ENI and leaves by main

    def __post_init__(self):
        if not self.netns:
            raise ValueError("pod netns path is empty")
        _check_ifname("host veth", self.host_veth)
        try:
            ip = ipaddress.IPv4Address(self.pod_ip)
        except ValueError:
            raise ValueError(f"pod IP {self.pod_ip!r} is not an IPv4 address") from None
        _check_mtu("pod veth", self.mtu)
        if self.eni is not None:
            if ip not in ipaddress.IPv4Network(self.eni.subnet):
                raise ValueError(f"pod IP {ip} is outside ENI {self.eni.mac} "
                                 f"subnet {self.eni.subnet}")
            if str(ip) == self.eni.gateway:
                raise ValueError(f"pod IP {ip} is the gateway of subnet {self.eni.subnet}")

    @property
    def ifname(self) -> str:
        return self.attachment.ifname


@dataclass(frozen=True)
class VethPair:
    """The links ADD made, as the CNI result lists them."""

    host_name: str
    host_mac: str
    pod_name: str
    pod_mac: str


@dataclass(frozen=True)
class HostVeth:
    """A host veth with our prefix, for GC."""

    name: str
    attachment: Attachment | None  # None when the alias is not ours
    pod_ips: tuple[str, ...]  # from the /32 routes through it in main


def _check_ifname(what: str, name: str) -> None:
    if not name or len(name.encode()) > MAX_IFNAME or name in (".", "..") \
            or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise ValueError(f"{what} name {name!r} is not a valid interface name")


def _check_mtu(what: str, mtu: int) -> None:
    if not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise ValueError(f"{what} MTU {mtu!r} must be an integer from 68 to 65535")


# ---------------------------------------------------------------------------------------------
# Plain views of kernel objects


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str
    kind: str | None
    alias: str | None
    peer_index: int | None
    up: bool
    mtu: int


@dataclass(frozen=True)
class Route:
    dst: str  # "a.b.c.d/len"
    oif: int | None
    gateway: str | None = None
    scope: int = RT_SCOPE_UNIVERSE


@dataclass(frozen=True)
class Rule:
    priority: int
    table: int
    src: str | None = None  # "a.b.c.d/len"
    dst: str | None = None


def _pod_rules(pod_ip: str, eni: SecondaryEni | None) -> list[Rule]:
    rules = [Rule(TO_POD_RULE_PRIORITY, MAIN_TABLE, dst=f"{pod_ip}/32")]
    if eni is not None:
        rules.append(Rule(FROM_POD_RULE_PRIORITY, eni.table, src=f"{pod_ip}/32"))
    return rules


def _is_pod_rule(rule: Rule, pod_ip: str) -> bool:
    """A rule 512 to the pod or 1536 from the pod, whatever table it names."""
    host = f"{pod_ip}/32"
    return (rule.priority == TO_POD_RULE_PRIORITY and rule.dst == host and rule.src is None) or \
        (rule.priority == FROM_POD_RULE_PRIORITY and rule.src == host and rule.dst is None)


def _eni_routes(eni: SecondaryEni, oif: int) -> list[Route]:
    return [Route(f"{eni.gateway}/32", oif, scope=RT_SCOPE_LINK),
            Route("0.0.0.0/0", oif, gateway=eni.gateway)]


def _pod_routes(oif: int) -> list[Route]:
    return [Route(f"{POD_GATEWAY}/32", oif, scope=RT_SCOPE_LINK),
            Route("0.0.0.0/0", oif, gateway=POD_GATEWAY)]


# ---------------------------------------------------------------------------------------------
# One rtnetlink socket in one namespace


class _Netns:
    """An rtnetlink socket bound to one namespace; reads return the plain views above."""

    def __init__(self, ipr, label: str):
        from pyroute2.netlink.exceptions import NetlinkError

        self.ipr = ipr
        self.label = label
        self.kernel_error = NetlinkError

    def do(self, what: str, method, *args, tolerate: tuple[int, ...] = (), **kwargs):
        """Call an IPRoute method; a kernel error not in `tolerate` becomes a DataPathError."""
        try:
            return method(*args, **kwargs)
        except self.kernel_error as exc:
            if exc.code in tolerate:
                return None
            raise DataPathError(f"{what} in the {self.label}: {os.strerror(exc.code)}") from exc

    def links(self) -> list[Link]:
        return [_link(m) for m in self.do("list links", self.ipr.get_links)]

    def link(self, name: str) -> Link | None:
        found = self.do(f"get link {name}", self.ipr.link, "get", ifname=name,
                        tolerate=(errno.ENODEV,))
        return _link(found[0]) if found else None

    def link_at(self, index: int) -> Link | None:
        found = self.do(f"get link #{index}", self.ipr.link, "get", index=index,
                        tolerate=(errno.ENODEV,))
        return _link(found[0]) if found else None

    def existing_link(self, name: str) -> Link:
        link = self.link(name)
        if link is None:
            raise DataPathError(f"find link {name} in the {self.label}: it is gone")
        return link

    def routes(self, table: int) -> list[Route]:
        found = []
        for m in self.do(f"list routes of table {table}", self.ipr.get_routes,
                         family=socket.AF_INET, table=table):
            if m.get("table") != table:
                continue
            dst = f"{m.get('dst') or '0.0.0.0'}/{m['dst_len']}"
            found.append(Route(dst, m.get("oif"), m.get("gateway"), m["scope"]))
        return found

    def rules(self) -> list[Rule]:
        found = []
        for m in self.do("list rules", self.ipr.get_rules, family=socket.AF_INET):
            src, dst = m.get("src"), m.get("dst")
            found.append(Rule(priority=m.get("priority") or 0, table=m.get("table"),
                              src=f"{src}/{m['src_len']}" if src else None,
                              dst=f"{dst}/{m['dst_len']}" if dst else None))
        return found

    def addresses(self, index: int) -> list[str]:
        return [f"{m.get('address')}/{m['prefixlen']}"
                for m in self.do("list addresses", self.ipr.get_addr, family=socket.AF_INET,
                                 index=index)]

    def permanent_neighbours(self, index: int) -> dict[str, str]:
        """IP -> MAC of the permanent neighbour entries on one link."""
        return {m.get("dst"): (m.get("lladdr") or "").lower()
                for m in self.do("list neighbours", self.ipr.get_neighbours, ifindex=index)
                if m["state"] & NUD_PERMANENT}

    def add_route(self, route: Route, dev: str, table: int, *, replace: bool = False) -> None:
        self.do(f"add route {_route_text(route, dev)} table {table}", self.ipr.route,
                "replace" if replace else "add", dst=route.dst, oif=route.oif,
                gateway=route.gateway, scope=route.scope, table=table)

    def add_rule(self, rule: Rule) -> None:
        """Add a rule; the same rule already there (a concurrent ADD, a retry) is fine."""
        self.do(f"add rule {_rule_text(rule)}", self.ipr.rule, "add", **_rule_args(rule),
                tolerate=(errno.EEXIST,))

    def delete_rule(self, rule: Rule) -> None:
        self.do(f"delete rule {_rule_text(rule)}", self.ipr.rule, "del", **_rule_args(rule),
                tolerate=GONE_ERRNOS)

    def delete_link(self, link: Link) -> None:
        self.do(f"delete link {link.name}", self.ipr.link, "del", index=link.index,
                tolerate=GONE_ERRNOS)


def _link(msg) -> Link:
    return Link(index=msg["index"], name=msg.get("ifname"), mac=(msg.get("address") or "").lower(),
                kind=msg.get(("linkinfo", "kind")), alias=msg.get("ifalias"),
                peer_index=msg.get("link"), up=bool(msg["flags"] & IFF_UP), mtu=msg.get("mtu"))


def _rule_args(rule: Rule) -> dict:
    args = {"priority": rule.priority, "table": rule.table}
    for key, cidr in (("src", rule.src), ("dst", rule.dst)):
        if cidr:
            address, length = cidr.split("/")
            args[key], args[f"{key}_len"] = address, int(length)
    return args


def _rule_text(rule: Rule) -> str:
    match = f"from {rule.src}" if rule.src else f"to {rule.dst}"
    return f"{rule.priority} {match} lookup {rule.table}"


def _route_text(route: Route, dev: str) -> str:
    dst = "default" if route.dst == "0.0.0.0/0" else route.dst
    via = f" via {route.gateway}" if route.gateway else ""
    scope = " scope link" if route.scope == RT_SCOPE_LINK else ""
    return f"{dst}{via} dev {dev}{scope}"


@contextmanager
def _host():
    from pyroute2.iproute.linux import IPRoute

    with IPRoute(groups=0) as ipr:  # no multicast: only replies to our requests
        yield _Netns(ipr, "host netns")


def check_netns(path: str) -> None:
    """Refuse (NetnsError) a pod netns path that is not absolute, cannot be opened, is not a network
    namespace, or is the host's own; cheap enough to run before any IP is taken."""
    import fcntl
    if not path.startswith("/"):
        raise NetnsError(f"pod netns {path!r} is not an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"open pod netns {path}: {exc.strerror}") from exc
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = None
        if kind != CLONE_NEWNET:
            raise NetnsError(f"pod netns {path} is not a network namespace")
        if _same_file(fd, "/proc/thread-self/ns/net"):
            raise NetnsError(f"pod netns {path} is the host's own network namespace")
    finally:
        os.close(fd)


@contextmanager
def _pod(path: str):
    """The pod namespace: an _Netns bound to it, and an open fd of it (for moving links there)."""
    from pyroute2.iproute.linux import IPRoute

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise NetnsError(f"open pod netns {path}: {exc.strerror}") from exc
    try:
        if _same_file(fd, "/proc/thread-self/ns/net"):
            raise NetnsError(f"pod netns {path} is the host's own network namespace")
        with _inside(fd, path):
            ipr = IPRoute(groups=0)  # the socket stays in the namespace it was made in
        with ipr:
            yield _Netns(ipr, f"pod netns {path}"), fd
    finally:
        os.close(fd)


@contextmanager
def _inside(fd: int, path: str):
    """Run the body with this thread in the namespace `fd`, then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            _setns(fd)
        except OSError as exc:
            raise NetnsError(f"enter pod netns {path}: {os.strerror(exc.errno)} "
                             "(is it a network namespace?)") from exc
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def _setns(fd: int) -> None:
    """setns(2) into a network namespace, by the libc already loaded (pyroute2's own setns looks
    libc up with ctypes.util.find_library, which forks `ldconfig -p` on every call)."""
    import ctypes

    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_LIBC = None
CLONE_NEWNET = 0x40000000


def _same_file(fd: int, path: str) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _find_eni(host: _Netns, eni: SecondaryEni) -> Link:
    """The node's interface with the ENI's MAC (never found by name).

    First the interface the ENI's table already routes through, if it has that MAC: a dump of
    all links costs ~0.2 ms per link here, and a busy node has hundreds of veths.
    """
    for route in host.routes(eni.table):
        link = host.link_at(route.oif) if route.oif else None
        if link is not None and link.mac == eni.mac:
            return link
    matches = [link for link in host.links() if link.mac == eni.mac]
    if not matches:
        raise DataPathError(f"find ENI {eni.mac} (device {eni.device_number}): "
                            "no interface with that MAC in the host netns")
    if len(matches) > 1:
        names = ", ".join(link.name for link in matches)
        raise DataPathError(f"find ENI {eni.mac}: several interfaces have that MAC ({names})")
    return matches[0]


# ---------------------------------------------------------------------------------------------
# ADD


def ensure_eni_table(eni: SecondaryEni) -> str:
    """Bring a secondary ENI up with its MTU and fill its route table; return its interface name.

    Idempotent and safe to run from several processes at once (`replace`, not `add`). The table is
    shared by every pod on that ENI; the kernel drops its routes when the ENI is detached.
    """
    with _host() as host:
        return _ensure_eni_table(host, eni)


def _ensure_eni_table(host: _Netns, eni: SecondaryEni) -> str:
    link = _find_eni(host, eni)
    if link.mtu != eni.mtu or not link.up:
        host.do(f"set ENI {link.name} ({eni.mac}) up with MTU {eni.mtu}", host.ipr.link, "set",
                index=link.index, mtu=eni.mtu, state="up")
    if eni.address is not None and eni.address not in host.addresses(link.index):
        # As upstream: the ENI's own address on ethN (the source of its ARP requests), without the
        # subnet route the kernel adds to main, which must keep routing the subnet by eth0.
        ip, prefixlen = eni.address.split("/")
        host.do(f"add address {eni.address} to ENI {link.name}", host.ipr.addr, "add", index=link.index,
                address=ip, prefixlen=int(prefixlen), tolerate=(errno.EEXIST,))
        subnet = str(ipaddress.IPv4Network(eni.subnet))
        host.do(f"delete the kernel's route {subnet} dev {link.name}", host.ipr.route, "del", dst=subnet,
                oif=link.index, table=MAIN_TABLE, scope=RT_SCOPE_LINK, proto=RTPROT_KERNEL,
                tolerate=(errno.ESRCH,))
    for route in _eni_routes(eni, link.index):
        host.add_route(route, link.name, eni.table, replace=True)
    return link.name


def setup_pod(net: PodNetwork) -> VethPair:
    """Build the attachment's data path; on any failure undo what was built and raise.

    Checked before anything changes: the pod netns (NetnsError), the interface name in it
    (InterfaceExistsError), the ENI by its MAC, the host veth name. A stale host veth of that name
    (a pod recreated before its old DEL) is replaced, as upstream does; so are leftover rules
    512/1536 for the pod IP, since IPAM has just given that IP to this attachment.

    Crash safety: the veth pair is made inside the pod netns and its host end gets the attachment's
    alias there, before it moves to the host netns (as the reference plugins make their pairs in the
    container). A process killed at any instant thus leaves on the node either nothing or a host veth
    whose alias names its attachment, which that attachment's DEL and GC find; an unmoved pair stays in
    the pod netns, where DEL removes it (`teardown_pod(netns=...)`) and which dies with the netns.
    """
    with _host() as host, _pod(net.netns) as (pod, pod_fd):
        if pod.link(net.ifname) is not None:
            raise InterfaceExistsError(f"create {net.ifname} in pod netns {net.netns}: "
                                       "an interface of that name already exists there")
        stale = host.link(net.host_veth)
        if stale is not None and stale.kind != "veth":
            raise DataPathError(f"create host veth {net.host_veth}: a {stale.kind or 'non-veth'} "
                                "link of that name exists in the host netns")
        if net.eni is not None:
            _ensure_eni_table(host, net.eni)
        if stale is not None:
            host.delete_link(stale)
        undo = []
        host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
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


def _build(host: _Netns, pod: _Netns, host_fd: int, net: PodNetwork, undo: list) -> VethPair:
    """Create and configure the veth pair, then the host route and rules; log undo steps."""
    try:
        pod.ipr.link("add", ifname=net.ifname, kind="veth", mtu=net.mtu,
                     peer={"ifname": net.host_veth, "mtu": net.mtu})
    except pod.kernel_error as exc:
        error = InterfaceExistsError if exc.code == errno.EEXIST else DataPathError
        raise error(f"create veth {net.ifname} / {net.host_veth} in pod netns {net.netns}: "
                    f"{os.strerror(exc.code)}") from exc
    pod_link = pod.existing_link(net.ifname)
    undo.append(lambda: pod.delete_link(pod_link))  # takes its peer along, wherever that is
    peer = pod.existing_link(net.host_veth)
    pod.do(f"set alias {net.attachment.alias} on {net.host_veth} in pod netns {net.netns}", pod.ipr.link,
           "set", index=peer.index, ifalias=net.attachment.alias)
    try:
        pod.ipr.link("set", index=peer.index, net_ns_fd=host_fd)
    except pod.kernel_error as exc:
        error = InterfaceExistsError if exc.code == errno.EEXIST else DataPathError
        raise error(f"move host veth {net.host_veth} from pod netns {net.netns} to the host netns: "
                    f"{os.strerror(exc.code)}") from exc
    host_link = host.existing_link(net.host_veth)
    undo.append(lambda: host.delete_link(host_link))
    host.do(f"set host veth {net.host_veth} up", host.ipr.link, "set", index=host_link.index, state="up")

    pod.do(f"set {net.ifname} up", pod.ipr.link, "set", index=pod_link.index, state="up")
    pod.do(f"add address {net.pod_ip}/32 to {net.ifname}", pod.ipr.addr, "add",
           index=pod_link.index, address=net.pod_ip, prefixlen=32)
    for route in _pod_routes(pod_link.index):
        pod.add_route(route, net.ifname, MAIN_TABLE)
    pod.do(f"add permanent neighbour {POD_GATEWAY} lladdr {host_link.mac} dev {net.ifname}",
           pod.ipr.neigh, "add", dst=POD_GATEWAY, lladdr=host_link.mac, ifindex=pod_link.index,
           state=NUD_PERMANENT)

    host_route = Route(f"{net.pod_ip}/32", host_link.index, scope=RT_SCOPE_LINK)
    host.add_route(host_route, net.host_veth, MAIN_TABLE, replace=True)
    for rule in host.rules():
        if _is_pod_rule(rule, net.pod_ip):
            host.delete_rule(rule)
    for rule in _pod_rules(net.pod_ip, net.eni):
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
    Rules 512/1536 for `pod_ip` are removed only when no /32 route to it remains (a remaining one
    means the IP already serves another attachment). ENI tables are shared and left in place.
    With `netns` (the pod's, if it still exists): also a pair that an ADD killed before it moved
    the host end out is removed from the pod netns (the pod's `ifname` whose veth peer, in the pod
    netns too, carries the host veth's name).
    """
    if host_veth is not None:
        _check_ifname("host veth", host_veth)
    if pod_ip is not None:
        try:
            ipaddress.IPv4Address(pod_ip)
        except ValueError:
            raise ValueError(f"pod IP {pod_ip!r} is not an IPv4 address") from None
    with _host() as host:
        route = None
        if pod_ip is not None:
            route = next((r for r in host.routes(MAIN_TABLE) if r.dst == f"{pod_ip}/32"), None)
        candidates = [host.link(host_veth) if host_veth else None,
                      host.link_at(route.oif) if route is not None else None]
        deleted = set()
        for link in candidates:
            if link is not None and link.alias == attachment.alias and link.index not in deleted:
                host.delete_link(link)  # the kernel drops the routes through it
                deleted.add(link.index)
        if pod_ip is not None and (route is None or route.oif in deleted):
            for rule in host.rules():
                if _is_pod_rule(rule, pod_ip):
                    host.delete_rule(rule)
    if netns and host_veth is not None:
        _remove_unmoved_pair(netns, attachment.ifname, host_veth)


def _remove_unmoved_pair(path: str, ifname: str, host_veth: str) -> None:
    """Delete the veth pair an ADD made in the pod netns and was killed before moving out."""
    try:
        with _pod(path) as (pod, _):
            pod_link, peer = pod.link(ifname), pod.link(host_veth)
            if (pod_link is not None and peer is not None and pod_link.kind == peer.kind == "veth"
                    and pod_link.peer_index == peer.index):
                pod.delete_link(peer)
    except NetnsError:
        return  # the netns is gone, and the pair with it


def list_host_veths(prefix: str) -> list[HostVeth]:
    """Host veths whose name starts with `prefix`, with their attachment and routed pod IPs."""
    with _host() as host:
        links = host.links()
        routes = host.routes(MAIN_TABLE)
    found = []
    for link in links:
        if link.kind != "veth" or not link.name.startswith(prefix):
            continue
        ips = tuple(sorted(route.dst[:-3] for route in routes
                           if route.oif == link.index and route.dst.endswith("/32")))
        found.append(HostVeth(link.name, Attachment.from_alias(link.alias), ips))
    return found


def list_pod_rule_ips() -> set[str]:
    """IPs that have a rule 512 (to) or 1536 (from) in the host netns, for GC."""
    with _host() as host:
        rules = host.rules()
    ips = set()
    for rule in rules:
        if rule.priority == TO_POD_RULE_PRIORITY and rule.dst and rule.dst.endswith("/32"):
            ips.add(rule.dst[:-3])
        elif rule.priority == FROM_POD_RULE_PRIORITY and rule.src and rule.src.endswith("/32"):
            ips.add(rule.src[:-3])
    return ips


# ---------------------------------------------------------------------------------------------
# CHECK


def check_pod(net: PodNetwork, *, pod_mac: str | None = None,
              host_mac: str | None = None) -> list[str]:
    """What is missing or wrong in the attachment's data path; empty when all is in place.

    `pod_mac`/`host_mac` are the MACs the CNI result recorded (a later plugin, e.g. tuning, may
    have changed them). MTUs are not checked: such a plugin may change them too.
    """
    problems: list[str] = []
    with _host() as host:
        host_link = _check_host(host, net, host_mac, problems)
        try:
            with _pod(net.netns) as (pod, _):
                _check_pod_side(pod, net, pod_mac, host_link, problems)
        except NetnsError as exc:
            problems.append(str(exc))
    return problems


def _check_host(host: _Netns, net: PodNetwork, host_mac: str | None, problems: list) -> Link | None:
    link = host.link(net.host_veth)
    rules = host.rules()
    for rule in _pod_rules(net.pod_ip, net.eni):
        if rule not in rules:
            problems.append(f"rule {_rule_text(rule)}: missing")
    if net.eni is None:
        for rule in rules:
            if rule.priority == FROM_POD_RULE_PRIORITY and rule.src == f"{net.pod_ip}/32":
                problems.append(f"rule {_rule_text(rule)}: present, "
                                "but the IP is on the primary ENI")
    else:
        _check_eni(host, net.eni, problems)
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
        problems.append(f"host route {_route_text(route, net.host_veth)}: missing")
    return link


def _check_eni(host: _Netns, eni: SecondaryEni, problems: list) -> None:
    try:
        link = _find_eni(host, eni)
    except DataPathError as exc:
        problems.append(str(exc))
        return
    if not link.up:
        problems.append(f"ENI {link.name} ({eni.mac}): down")
    if eni.address is not None and eni.address not in host.addresses(link.index):
        problems.append(f"ENI {link.name} ({eni.mac}): address {eni.address} missing")
    routes = host.routes(eni.table)
    for route in _eni_routes(eni, link.index):
        if route not in routes:
            problems.append(f"route {_route_text(route, link.name)} table {eni.table}: missing")


def _check_pod_side(pod: _Netns, net: PodNetwork, pod_mac: str | None, host_link: Link | None,
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
            problems.append(f"{where}: route {_route_text(route, net.ifname)} missing")
    neighbour = pod.permanent_neighbours(link.index).get(POD_GATEWAY)
    expected = host_link.mac if host_link is not None else None
    if neighbour is None:
        problems.append(f"{where}: permanent neighbour {POD_GATEWAY} missing")
    elif expected and neighbour != expected:
        problems.append(f"{where}: neighbour {POD_GATEWAY} lladdr {neighbour}, "
                        f"expected the host veth's {expected}")
