"""rtnetlink, the one home of the kernel's network objects for every program of the bundle: links,
addresses, neighbours, routes (and the route lookup), policy rules, IPv4 interface settings
(net.ipv4.conf.<if>.*), interfaces by MAC, and entering a network namespace.

Spoken with the standard library over `cnicore.rawnetlink` (~30-60 µs per request; pyroute2 cost
~90-150 ms of import per exec and ~0.1 ms of parsing per message). A `Netns` is an rtnetlink socket
bound to the namespace it was made in; its reads return the plain records below and every request
that changes something goes through `Netns.change` (the tests' crash points hook it). Dumps are
filtered by the kernel where the request says so (strict checking); where a dump cannot be
filtered (links by MAC, rules with a mark, the route to one address), only the messages that hold
the encoded attribute looked for are parsed: a node with 700 pods has 1,400 rules and 700 routes.

A kernel refusal is a `DataPathError` (CNI code 102) naming the operation and the namespace. aws-snat
imports this module on every exec: it imports nothing that aws-snat's start does not load anyway
(tests/data/startup-modules.json).
"""

from __future__ import annotations

import errno
import os
import struct
from _socket import AF_INET, AF_UNSPEC, NETLINK_ROUTE, inet_aton, inet_ntoa  # socket.py costs 2-4 ms more

from cnicore.errors import NETLINK_FAILURE, CNIError
from cnicore.rawnetlink import (NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, attr, attributes,
                                open_socket, transact)
from cnicore.record import record

MAIN_TABLE = 254
MAX_IFNAME = 15  # IFNAMSIZ - 1
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTPROT_KERNEL, RTPROT_BOOT, RTPROT_STATIC = 2, 3, 4  # `ip` shows "proto kernel / boot / static"
RTN_UNICAST = 1
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
IPV4_DEVCONF_RP_FILTER, IPV4_DEVCONF_ROUTE_LOCALNET = 8, 26  # include/uapi/linux/ip.h
NS_GET_NSTYPE = 0xB703    # ioctl on a namespace file: its CLONE_NEW* type
CLONE_NEWNET = 0x40000000
GONE_ERRNOS = (errno.ENOENT, errno.ENODEV)  # rule, link
UNREACHABLE_ERRNOS = (errno.ENETUNREACH, errno.EHOSTUNREACH)

# rtnetlink message types, attributes and headers (linux/rtnetlink.h, if_link.h, if_addr.h,
# neighbour.h, fib_rules.h)
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO = 1, 3, 4, 5, 18
IFLA_IFALIAS, IFLA_AF_SPEC, IFLA_NET_NS_FD, IFLA_EXT_MASK = 20, 26, 28, 29
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFLA_INET_CONF = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_FWMARK, FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN = 1, 2, 6, 10, 13, 14
FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 15, 16, 21
# rule attributes that a Rule holds; any other (iif, oif, uid range, ports, ...) is a selector it does not
_RULE_ATTRS = {FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_FWMARK, FRA_FWMASK, FRA_TABLE, FRA_PROTOCOL}
_UNSET = b"\xff\xff\xff\xff"  # the kernel reports the suppress_* options with -1 when not set
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12  # dumps filtered by the kernel, as the request says
_IFINFO = struct.Struct("=BxHiII")       # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")        # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")     # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type,
                                         # flags; fib_rule_hdr has the same layout (..., table, 0, 0, action, flags)
_NDMSG = struct.Struct("=BxxxiHBB")      # ndmsg: family, ifindex, state, flags, type
_U32 = struct.Struct("=I")
_FWMARK_ATTR = struct.pack("=HH", 8, FRA_FWMARK)  # the header of an FRA_FWMARK attribute
_HEX = frozenset("0123456789abcdef")


class DataPathError(CNIError):
    """An rtnetlink operation failed (CNI error code NETLINK_FAILURE)."""

    def __init__(self, msg: str, errno: int | None = None):
        super().__init__(NETLINK_FAILURE, msg)
        self.errno = errno  # the kernel's, when it refused a request


class NetnsError(DataPathError):
    """A network namespace cannot be used."""


# ---------------------------------------------------------------------------------------------
# Plain views of kernel objects

Link = record("Link", "index name mac kind alias peer_index up mtu")
Route = record("Route", "dst oif gateway scope", defaults=(None, RT_SCOPE_UNIVERSE))  # dst "a.b.c.d/len"


class Rule(record("Rule", "priority table src dst mark mask protocol other",
                  defaults=(None, None, None, None, None, False))):
    """An IPv4 policy rule `<priority>: from <src> to <dst> fwmark <mark>/<mask> lookup <table>`; src and
    dst "a.b.c.d/len" or None (all). `protocol` says who made it (RTPROT_*; deleting with it set spares
    same-looking rules of others; None: not said). `other`, on rules read from the kernel: it has a
    selector or an action beyond these (iif, uid range, inverted, a goto, ...)."""

    __slots__ = ()

    @property
    def key(self) -> tuple:
        """What the rule matches and does, whoever made it."""
        return self.priority, self.table, self.src, self.dst, self.mark, self.mask

    def __str__(self) -> str:
        to = f" to {self.dst}" if self.dst else ""
        mark = f" fwmark {self.mark:#x}/{self.mask:#x}" if self.mark is not None else ""
        table = "main" if self.table == MAIN_TABLE else self.table
        return f"{self.priority}: from {self.src or 'all'}{to}{mark} lookup {table}"


def route_text(route: Route, dev: str) -> str:
    """The route as `ip route` shows it."""
    dst = "default" if route.dst == "0.0.0.0/0" else route.dst
    via = f" via {route.gateway}" if route.gateway else ""
    scope = " scope link" if route.scope == RT_SCOPE_LINK else ""
    return f"{dst}{via} dev {dev}{scope}"


def is_mac(text) -> bool:
    """`text` is a MAC address in lower-case hex, aa:bb:cc:dd:ee:ff."""
    parts = text.split(":") if isinstance(text, str) else ()
    return len(parts) == 6 and all(len(part) == 2 and part[0] in _HEX and part[1] in _HEX for part in parts)


def check_ifname(what: str, name: str) -> None:
    """ValueError unless `name` is a name the kernel takes for an interface."""
    if not name or len(name.encode()) > MAX_IFNAME or name in (".", "..") \
            or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise ValueError(f"{what} name {name!r} is not a valid interface name")


# ---------------------------------------------------------------------------------------------
# One rtnetlink socket in one namespace


class Netns:
    """An rtnetlink socket bound to the namespace it was made in (the caller's, or with `at` the one
    at a path); closed at the end of a `with` block."""

    def __init__(self, label: str = "host netns"):
        self.label = label
        self.seq = 0
        try:
            self.sock = open_socket(NETLINK_ROUTE)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except OSError as exc:
            raise DataPathError(f"open an rtnetlink socket in the {label}: {os.strerror(exc.errno)}", exc.errno) \
                from None

    @classmethod
    def at(cls, path: str, label: str = "pod netns") -> Netns:
        """A socket in the namespace at `path`, never the caller's own (NetnsError)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(f"open {label} {path}: {exc.strerror}") from exc
        try:
            if _same_file(fd, "/proc/thread-self/ns/net"):
                raise NetnsError(f"{label} {path} is the host's own network namespace")
            with entered(fd, f"{label} {path}"):
                return cls(f"{label} {path}")  # the socket stays in the namespace it was made in
        finally:
            os.close(fd)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def ask(self, what: str, kind: int, flags: int, payload: bytes,
            tolerate: tuple[int, ...] = ()) -> list[tuple[int, bytes]] | None:
        """One request; a kernel error not in `tolerate` becomes a DataPathError, one in it None."""
        self.seq += 1
        try:
            return transact(self.sock, kind, flags, payload, self.seq)
        except OSError as exc:
            if exc.errno in tolerate:
                return None
            raise DataPathError(f"{what} in the {self.label}: {os.strerror(exc.errno)}", exc.errno) from None

    def change(self, what: str, kind: int, flags: int, payload: bytes, tolerate: tuple[int, ...] = ()) -> bool:
        """A request that changes something, acknowledged; False when its error was tolerated."""
        return self.ask(what, kind, flags | NLM_F_ACK, payload, tolerate) is not None

    # Links

    def links(self, kind: str | None = None) -> list[Link]:
        """Every link, or those of one kind (filtered by the kernel)."""
        return [_link(body) for body in self._link_messages(kind)]

    def links_with_mac(self, mac: str) -> list[Link]:
        """The links whose hardware address is `mac` (aa:bb:cc:dd:ee:ff)."""
        wanted = attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        return [link for link in map(_link, (body for body in self._link_messages() if wanted in body))
                if link.mac == mac.lower()]

    def _link_messages(self, kind: str | None = None) -> list[bytes]:
        request = _IFINFO.pack(0, 0, 0, 0, 0) + _ext_mask()
        if kind:
            request += attr(IFLA_LINKINFO, attr(IFLA_INFO_KIND, kind.encode()))
        return [body for kind_, body in self.ask("list links", RTM_GETLINK, NLM_F_DUMP, request)
                if kind_ == RTM_NEWLINK]

    def link(self, name: str) -> Link | None:
        found = self.ask(f"get link {name}", RTM_GETLINK, 0,
                         _IFINFO.pack(0, 0, 0, 0, 0) + _ext_mask() + _name(name), tolerate=(errno.ENODEV,))
        return _link(found[0][1]) if found else None

    def link_at(self, index: int) -> Link | None:
        found = self.ask(f"get link #{index}", RTM_GETLINK, 0, _IFINFO.pack(0, 0, index, 0, 0) + _ext_mask(),
                         tolerate=(errno.ENODEV,))
        return _link(found[0][1]) if found else None

    def existing_link(self, name: str) -> Link:
        link = self.link(name)
        if link is None:
            raise DataPathError(f"find link {name} in the {self.label}: it is gone")
        return link

    def add_veth(self, what: str, name: str, mtu: int, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: `name` here, `peer` straight in the namespace `peer_netns_fd` (no move)."""
        mtu_attr = attr(IFLA_MTU, _U32.pack(mtu))
        peer_msg = (_IFINFO.pack(0, 0, 0, 0, 0) + _name(peer) + mtu_attr
                    + attr(IFLA_NET_NS_FD, _U32.pack(peer_netns_fd)))
        info = attr(IFLA_INFO_KIND, b"veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_msg))
        self.change(what, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL,
                    _IFINFO.pack(0, 0, 0, 0, 0) + _name(name) + mtu_attr + attr(IFLA_LINKINFO, info))

    def set_link(self, what: str, index: int, *, up: bool = False, mtu: int | None = None,
                 alias: str | None = None) -> None:
        attrs = attr(IFLA_MTU, _U32.pack(mtu)) if mtu is not None else b""
        if alias is not None:
            attrs += attr(IFLA_IFALIAS, alias.encode())
        self.change(what, RTM_SETLINK, 0, _IFINFO.pack(0, 0, index, IFF_UP if up else 0, IFF_UP if up else 0) + attrs)

    def delete_link(self, link: Link) -> None:
        self.change(f"delete link {link.name}", RTM_DELLINK, 0, _IFINFO.pack(0, 0, link.index, 0, 0),
                    tolerate=GONE_ERRNOS)

    def set_ipv4_conf(self, what: str, link: int | str, conf_id: int, value: int) -> None:
        """Set one IPv4 setting of an interface (net.ipv4.conf.<if>.*, by its IPV4_DEVCONF_ id; the link
        by index or name): needs NET_ADMIN only, not a writable /proc/sys (read-only in a container
        that is not privileged, such as the aws-node agent's)."""
        conf = attr(IFLA_AF_SPEC, attr(AF_INET, attr(IFLA_INET_CONF, attr(conf_id, _U32.pack(value)))))
        index, name = (link, b"") if isinstance(link, int) else (0, _name(link))
        self.change(what, RTM_SETLINK, 0, _IFINFO.pack(AF_UNSPEC, 0, index, 0, 0) + name + conf)

    # Addresses and neighbours

    def addresses(self, index: int) -> list[str]:
        found = []
        for kind, body in self.ask("list addresses", RTM_GETADDR, NLM_F_DUMP,
                                   _IFADDR.pack(AF_INET, 0, 0, 0, index)):
            family, prefixlen, _, _, at = _IFADDR.unpack_from(body)
            local = attributes(body[_IFADDR.size:]).get(IFA_LOCAL)
            if kind == RTM_NEWADDR and at == index and local:
                found.append(f"{inet_ntoa(local)}/{prefixlen}")
        return found

    def add_address(self, what: str, index: int, address: str, *, tolerate: tuple[int, ...] = ()) -> None:
        ip, prefixlen = address.split("/")
        packed = inet_aton(ip)
        self.change(what, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL,
                    _IFADDR.pack(AF_INET, int(prefixlen), 0, RT_SCOPE_UNIVERSE, index)
                    + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed), tolerate)

    def permanent_neighbours(self, index: int) -> dict[str, str]:
        """IP -> MAC of the permanent neighbour entries on one link."""
        found = {}
        for kind, body in self.ask("list neighbours", RTM_GETNEIGH, NLM_F_DUMP,
                                   _NDMSG.pack(AF_INET, 0, 0, 0, 0) + attr(NDA_IFINDEX, _U32.pack(index))):
            _, at, state, _, _ = _NDMSG.unpack_from(body)
            attrs = attributes(body[_NDMSG.size:])
            if kind == RTM_NEWNEIGH and at == index and state & NUD_PERMANENT and NDA_DST in attrs:
                found[inet_ntoa(attrs[NDA_DST])] = _mac(attrs.get(NDA_LLADDR, b""))
        return found

    def add_permanent_neighbour(self, what: str, index: int, ip: str, mac: str) -> None:
        self.change(what, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL,
                    _NDMSG.pack(AF_INET, index, NUD_PERMANENT, 0, 0)
                    + attr(NDA_DST, inet_aton(ip)) + attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", ""))))

    # Routes

    def routes(self, table: int) -> list[Route]:
        """The IPv4 routes of one table (a table that does not exist has none)."""
        return [route for in_table, route in map(_route, self._route_messages(table)) if in_table == table]

    def route_to(self, ip: str, table: int = MAIN_TABLE) -> Route | None:
        """The /32 route to `ip` in `table`, if there is one (only messages that hold the encoded
        RTA_DST are parsed: main has a route per pod, 7 ms to parse in full on a node with 700)."""
        dst_attr = attr(RTA_DST, inet_aton(ip))
        for body in self._route_messages(table):
            if dst_attr in body:
                in_table, route = _route(body)
                if in_table == table and route.dst == f"{ip}/32":
                    return route
        return None

    def _route_messages(self, table: int) -> list[bytes]:
        found = self.ask(f"list routes of table {table}", RTM_GETROUTE, NLM_F_DUMP,
                         _RTMSG.pack(AF_INET, 0, 0, 0, table if table < 256 else 0, 0, 0, 0, 0)
                         + attr(RTA_TABLE, _U32.pack(table)), tolerate=(errno.ENOENT,))
        return [body for kind, body in found or () if kind == RTM_NEWROUTE]

    def route_get(self, ip: str) -> Route | None:
        """The route the kernel would send a packet to `ip` by (`ip route get`); None: unreachable."""
        found = self.ask(f"look up the route to {ip}", RTM_GETROUTE, 0,
                         _RTMSG.pack(AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, inet_aton(ip)),
                         tolerate=UNREACHABLE_ERRNOS)
        return _route(found[0][1])[1] if found else None

    def add_route(self, route: Route, dev: str, table: int, *, replace: bool = False) -> None:
        self.change(f"add route {route_text(route, dev)} table {table}", RTM_NEWROUTE,
                    NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL),
                    _route_request(route, table, RTPROT_STATIC))

    def delete_route(self, what: str, route: Route, table: int, protocol: int,
                     tolerate: tuple[int, ...] = ()) -> None:
        self.change(what, RTM_DELROUTE, 0, _route_request(route, table, protocol), tolerate)

    # Rules

    def rules(self, *, marked: bool = False) -> list[Rule]:
        """The IPv4 rules; with `marked`, only those with a fwmark (the others are not parsed: a node has
        two rules per pod, none with a mark)."""
        found = []
        for kind, body in self.ask("list rules", RTM_GETRULE, NLM_F_DUMP, _RTMSG.pack(AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)):
            if kind == RTM_NEWRULE and len(body) >= _RTMSG.size and (not marked or _FWMARK_ATTR in body):
                rule = _rule(body)
                if not marked or rule.mark is not None:
                    found.append(rule)
        return found

    def add_rule(self, rule: Rule) -> bool:
        """Add a rule; False if the very same rule was already there (a concurrent ADD, a retry): it is
        never added twice."""
        return self.change(f"add rule {rule}", RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, _rule_request(rule),
                           tolerate=(errno.EEXIST,))

    def delete_rule(self, rule: Rule) -> bool:
        """Delete one rule like `rule`; False: none was there.

        The kernel deletes the first rule matching every attribute given, and one left out (a table,
        a protocol) matches anything: `1024 fwmark 0x80/0x80 lookup main` would also match an earlier
        `1024 iif eth0 fwmark 0x80/0x80 lookup main`, unless a protocol the other has not is named."""
        return self.change(f"delete rule {rule}", RTM_DELRULE, 0, _rule_request(rule), tolerate=GONE_ERRNOS)


def _ext_mask() -> bytes:
    return attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))


def _name(name: str) -> bytes:
    return attr(IFLA_IFNAME, name.encode() + b"\0")


def _text(value: bytes | None) -> str | None:
    return value.split(b"\0", 1)[0].decode(errors="replace") if value is not None else None


def _mac(value: bytes) -> str:
    return ":".join(f"{b:02x}" for b in value)


def _link(body: bytes) -> Link:
    _, _, index, flags, _ = _IFINFO.unpack_from(body)
    attrs = attributes(body[_IFINFO.size:])
    info = attributes(attrs[IFLA_LINKINFO]) if IFLA_LINKINFO in attrs else {}
    return Link(index=index, name=_text(attrs.get(IFLA_IFNAME)), mac=_mac(attrs.get(IFLA_ADDRESS, b"")),
                kind=_text(info.get(IFLA_INFO_KIND)), alias=_text(attrs.get(IFLA_IFALIAS)),
                peer_index=_U32.unpack(attrs[IFLA_LINK])[0] if IFLA_LINK in attrs else None,
                up=bool(flags & IFF_UP), mtu=_U32.unpack(attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else None)


def _route_request(route: Route, table: int, protocol: int) -> bytes:
    dst, dst_len = route.dst.split("/")
    request = _RTMSG.pack(AF_INET, int(dst_len), 0, 0, table if table < 256 else 0, protocol, route.scope,
                          RTN_UNICAST, 0) + attr(RTA_TABLE, _U32.pack(table))
    if int(dst_len):
        request += attr(RTA_DST, inet_aton(dst))
    if route.oif is not None:
        request += attr(RTA_OIF, _U32.pack(route.oif))
    if route.gateway:
        request += attr(RTA_GATEWAY, inet_aton(route.gateway))
    return request


def _route(body: bytes) -> tuple[int, Route]:
    """(table, route) of one route message."""
    _, dst_len, _, _, table, _, scope, _, _ = _RTMSG.unpack_from(body)
    attrs = attributes(body[_RTMSG.size:])
    dst = inet_ntoa(attrs[RTA_DST]) if RTA_DST in attrs else "0.0.0.0"
    oif = _U32.unpack(attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
    gateway = inet_ntoa(attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None
    table = _U32.unpack(attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else table
    return table, Route(f"{dst}/{dst_len}", oif, gateway, scope)


def _rule_request(rule: Rule) -> bytes:
    src_len = int(rule.src.split("/")[1]) if rule.src else 0
    dst_len = int(rule.dst.split("/")[1]) if rule.dst else 0
    table = rule.table or 0
    request = _RTMSG.pack(AF_INET, dst_len, src_len, 0, table if table < 256 else 0, 0, 0,
                          FR_ACT_TO_TBL, 0) + attr(FRA_PRIORITY, _U32.pack(rule.priority))
    if rule.mark is not None:
        request += attr(FRA_FWMARK, _U32.pack(rule.mark)) + attr(FRA_FWMASK, _U32.pack(rule.mask))
    if table:
        request += attr(FRA_TABLE, _U32.pack(table))
    if rule.src:
        request += attr(FRA_SRC, inet_aton(rule.src.split("/")[0]))
    if rule.dst:
        request += attr(FRA_DST, inet_aton(rule.dst.split("/")[0]))
    if rule.protocol is not None:
        request += attr(FRA_PROTOCOL, bytes((rule.protocol,)))
    return request


def _rule(body: bytes) -> Rule:
    _, dst_len, src_len, tos, table, _, _, action, flags = _RTMSG.unpack_from(body)
    attrs = {key: value for key, value in attributes(body[_RTMSG.size:]).items()
             if not (key in (FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN) and value == _UNSET)}
    u32 = lambda key, default: _U32.unpack(attrs[key])[0] if key in attrs else default  # noqa: E731
    src, dst, mark = attrs.get(FRA_SRC), attrs.get(FRA_DST), u32(FRA_FWMARK, None)
    return Rule(priority=u32(FRA_PRIORITY, 0), table=u32(FRA_TABLE, table),
                src=f"{inet_ntoa(src)}/{src_len}" if src else None, dst=f"{inet_ntoa(dst)}/{dst_len}" if dst else None,
                mark=mark, mask=u32(FRA_FWMASK, 0xFFFFFFFF) if mark is not None else None,
                protocol=attrs[FRA_PROTOCOL][0] if attrs.get(FRA_PROTOCOL) else 0,
                other=bool(tos or action != FR_ACT_TO_TBL or flags & FIB_RULE_INVERT or set(attrs) - _RULE_ATTRS))


# ---------------------------------------------------------------------------------------------
# Network namespaces


def check_netns(path: str) -> None:
    """Refuse (NetnsError) a pod netns path that is not absolute, cannot be opened, is not a network
    namespace, or is the caller's own; cheap enough to run before any IP is taken."""
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


class entered:
    """The calling thread in the network namespace `target` (a path or an open fd) for a `with`
    block, then back in its own. Only this thread moves: sockets made inside stay in `target` for
    their whole life, and threads started inside inherit it. Failing to enter: NetnsError naming
    `label` (default: the path)."""

    def __init__(self, target: str | int, label: str | None = None):
        self.target, self.label = target, label or f"netns {target}"

    def __enter__(self) -> None:
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if isinstance(self.target, int):
                setns(self.target)
            else:
                fd = os.open(self.target, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            os.close(self.home)
            raise NetnsError(f"enter {self.label}: {os.strerror(exc.errno)} (is it a network namespace?)") from exc

    def __exit__(self, *exc_info) -> None:
        try:
            setns(self.home)
        finally:
            os.close(self.home)


def setns(fd: int) -> None:
    """setns(2) into a network namespace (os.setns is Python 3.12+), by the libc already loaded."""
    from .libc import ctypes_lite
    c = ctypes_lite()
    if c.function("setns")(fd, CLONE_NEWNET) != 0:
        err = c.get_errno()
        raise OSError(err, os.strerror(err))


def _same_file(fd: int, path: str) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
