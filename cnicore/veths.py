"""The host veth contract that aws-vpc-bridge writes and the agent reads: how a host veth is named,
the alias that marks it as one attachment's (`cni:<network>/<container-id>/<ifname>`), and the
listing of the host veths of ours with their pod IPs.

The alias lets DEL, GC and the agent tell whose a veth is, even when pods share a veth name over
time; a veth without it, down and routeless, is what an ADD killed between making the pair and
marking the host end leaves ("unfinished").
"""

from __future__ import annotations

from cnicore.hashes import sha1
from cnicore.record import record
from cnicore.rtnl import MAIN_TABLE, MAX_IFNAME, Netns, check_ifname

ALIAS_TAG = "cni:"
MAX_ALIAS = 255  # IFALIASZ - 1
MAX_PREFIX = MAX_IFNAME - 11


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
    return prefix + sha1(key.encode()).hexdigest()[:11]


class Attachment(record("Attachment", "network container_id ifname")):
    """One CNI attachment: network name, container ID, interface name in the container."""

    __slots__ = ()

    def __new__(cls, network: str, container_id: str, ifname: str):
        self = super().__new__(cls, network, container_id, ifname)
        for field, value in zip(self._fields, self):
            if not value or not isinstance(value, str) or "/" in value:
                raise ValueError(f"attachment {field} {value!r} must be non-empty without '/'")
        check_ifname("pod interface", ifname)
        if len(self.alias.encode()) > MAX_ALIAS:
            raise ValueError(f"attachment alias {self.alias!r} is longer than {MAX_ALIAS} bytes")
        return self

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


HostVeth = record("HostVeth", "name attachment pod_ips unfinished")
HostVeth.__doc__ = """A host veth of ours, for GC and the agent: its attachment (None when the alias is not
ours), the pod IPs of the /32 routes through it in main, and whether it is unfinished (named as ADD
names host veths, down, without alias or route: an ADD was killed right after creating it)."""


def list_host_veths(prefix: str) -> list[HostVeth]:
    """Host veths that carry an attachment's alias, whatever their name (a veth made under an earlier
    vethPrefix is as much ours), and those whose name starts with `prefix`; with their attachment
    and routed pod IPs."""
    with Netns() as host:
        links = host.links("veth")
        routes = host.routes(MAIN_TABLE)
    found = []
    for link in links:
        if link.kind != "veth" or not (link.name.startswith(prefix) or Attachment.from_alias(link.alias)):
            continue
        ips = tuple(sorted(route.dst[:-3] for route in routes
                           if route.oif == link.index and route.dst.endswith("/32")))
        unfinished = link.alias is None and not link.up and not ips and _is_veth_name(link.name, prefix)
        found.append(HostVeth(link.name, Attachment.from_alias(link.alias), ips, unfinished))
    return found


def remove_unfinished_veth(name: str) -> bool:
    """Delete host veth `name` if it is still unfinished (down, no alias); True if deleted.

    Such a veth is what an ADD killed between creating the pair and marking the host end leaves (a
    down link carries no route: the kernel refuses one and flushes them when a link goes down). An
    ADD still running at that instant then fails (its next request finds no link) and is retried.
    """
    with Netns() as host:
        link = host.link(name)
        if link is None or link.kind != "veth" or link.alias is not None or link.up:
            return False
        host.delete_link(link)
        return True


def _is_veth_name(name: str, prefix: str) -> bool:
    """`name` is a host veth name as ADD makes them: the prefix and 11 hex digits."""
    digits = name[len(prefix):]
    return len(digits) == 11 and all(c in "0123456789abcdef" for c in digits)
