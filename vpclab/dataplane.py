"""The VPC data plane: the router namespace wired to every attached ENI, as EC2 says they are.

- Each attached ENI is a veth pair: `n<K>d<D>` in the router (node K, device index D) and `eth<D>` in
  the node, carrying the ENI's MAC (Amazon Linux names ENIs ethN by device index the same way). The
  node's eth0 gets the primary IP, the subnet prefix, MTU 9001 and a default route via the subnet
  gateway (base + 1), as DHCP does on EC2; later ENIs arrive down and unconfigured.
- Delivery: a /32 route per address EC2 says an ENI holds (primary, secondary, and each of the 16
  addresses of each IPv4 prefix delegated to it), with a permanent neighbour entry for the ENI's MAC:
  the VPC delivers to the ENI, it does not ARP for addresses. The rest of each VPC CIDR, and every
  unknown destination, is a blackhole.
- Source/dest check: strict reverse-path filtering (rp_filter=1) on the router. A packet that enters
  from an ENI's veth is dropped unless the route back to its source leaves by that veth, that is,
  unless that very ENI holds the source address (itself or inside one of its prefixes).
- ARP: the gateway addresses live on the router's lo (answered on every veth); proxy_arp answers for
  addresses routed out of another veth, so nodes of one subnet reach each other through the router.
- External hosts (the internet host, extra hosts) hang off the router on veths `to-<host>`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
from collections import defaultdict
from dataclasses import dataclass

from . import netns
from .config import EC2_ADDRESS, ENI_MTU, IMDS_ADDRESS, LabConfig, NodePlan
from .ec2model import Snapshot
from .errors import LabError

log = logging.getLogger("vpclab.dataplane")

PORT_RE = re.compile(r"^n\d+d\d+$")
ROUTER_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv4/conf/all/rp_filter": "1",
    "net/ipv4/conf/default/rp_filter": "1",
    "net/ipv4/conf/default/proxy_arp": "1",
    "net/ipv4/conf/all/send_redirects": "0",
    "net/ipv4/conf/default/send_redirects": "0",
}
# like an EKS node on Amazon Linux: forwarding on, strict reverse-path filtering
NODE_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv4/conf/all/rp_filter": "1",
    "net/ipv4/conf/default/rp_filter": "1",
}


@dataclass(frozen=True)
class Port:
    """One attached ENI as wired: the router side `name`, the node side eth<device> in `netns`."""
    name: str
    eni_id: str
    mac: str
    netns: str
    device: int
    ips: tuple[str, ...]  # every address delivered to it, the ENI's primary first
    subnet_cidr: str

    @property
    def alias(self) -> str:
        """Kept on the router link, so a link can be matched to its ENI from the kernel alone."""
        return f"{self.eni_id}/{self.mac}"


def desired_ports(snap: Snapshot, nodes: dict[str, NodePlan]) -> dict[str, Port]:
    """The ports EC2 state calls for; `nodes` maps instance id to node."""
    ports = {}
    for eni in snap.enis.values():
        node = nodes.get(eni.instance_id or "")
        subnet = snap.subnets.get(eni.subnet_id)
        if node is None or subnet is None:
            continue
        name = f"n{node.name.removeprefix('node')}d{eni.device_index}"
        ports[name] = Port(name, eni.id, eni.mac, node.netns, eni.device_index, eni.addresses(), subnet.cidr)
    return ports


def plan_commands(want: dict[str, Port], links: dict[str, str], routes: dict[str, str],
                  neighbours: dict[tuple[str, str], str]) -> tuple[list[str], dict[str, list[str]]]:
    """`ip -batch` commands that turn the router's current state into `want`.

    links: router port -> alias; routes: address -> port; neighbours: (address, port) -> MAC.
    Returns the router's commands, and per node namespace the commands to run after them.
    """
    router: list[str] = []
    nodes: dict[str, list[str]] = defaultdict(list)
    gone = {n for n, alias in links.items() if n not in want or want[n].alias != alias}
    router += [f"link del {n}" for n in sorted(gone)]
    fresh = {n for n in want if n not in links or n in gone}
    for name in sorted(fresh):
        p = want[name]
        router += [f"link add {name} mtu {ENI_MTU} type veth peer name eth{p.device} netns {p.netns} address {p.mac}",
                   f"link set {name} alias {p.alias}",
                   # answer proxied ARP at once, not after up to 0.8 s (a non-initial namespace has no
                   # neigh/default to set this for every link)
                   f"ntable change name arp_cache dev {name} proxy_delay 0",
                   f"link set {name} up"]
        if p.device == 0:
            net = ipaddress.ip_network(p.subnet_cidr)
            nodes[p.netns] += [f"link set eth0 mtu {ENI_MTU} up",
                               f"addr add {p.ips[0]}/{net.prefixlen} dev eth0",
                               f"route add default via {net.network_address + 1} dev eth0"]
    holder = {ip: p for p in want.values() for ip in p.ips}
    for ip, dev in sorted(routes.items()):
        if dev not in gone and (ip not in holder or holder[ip].name != dev):
            router.append(f"route del {ip}/32 dev {dev}")
            if (ip, dev) in neighbours:
                router.append(f"neigh del {ip} dev {dev}")
    for ip, p in sorted(holder.items()):
        if p.name in fresh or routes.get(ip) != p.name or neighbours.get((ip, p.name)) != p.mac:
            router += [f"route replace {ip}/32 dev {p.name} proto static scope link",
                       f"neigh replace {ip} lladdr {p.mac} dev {p.name} nud permanent"]
    return router, dict(nodes)


def build(config: LabConfig) -> None:
    """The router with its gateways, blackholes and external hosts; the nodes' sysctls and lo addresses.

    Every namespace of `config` must exist already.
    """
    router = config.router_netns
    sysctl(router, ROUTER_SYSCTLS)
    commands = [f"addr add {s.gateway}/32 dev lo" for s in config.subnets()]
    commands += [f"route add blackhole {c}" for c in config.vpc_cidrs] + ["route add blackhole default"]
    for h in config.host_plans():
        prefix = ipaddress.ip_network(h.cidr).prefixlen
        commands += [f"link add {h.router_if} type veth peer name eth0 netns {h.netns}",
                     f"addr add {h.router_address}/{prefix} dev {h.router_if}",
                     f"link set {h.router_if} up"]
    batch(router, commands)
    for h in config.host_plans():
        prefix = ipaddress.ip_network(h.cidr).prefixlen
        batch(h.netns, ["link set eth0 up", f"addr add {h.address}/{prefix} dev eth0",
                        f"route add default via {h.router_address}"])
    for node in config.node_plans():
        sysctl(node.netns, NODE_SYSCTLS)
        batch(node.netns, [f"addr add {IMDS_ADDRESS}/32 dev lo", f"addr add {EC2_ADDRESS}/32 dev lo"])


class Wiring:
    """Keeps the router's ports, routes and neighbours in line with EC2 snapshots."""

    def __init__(self, router_netns: str, instance_nodes: dict[str, NodePlan]):
        self._router = router_netns
        self._nodes = instance_nodes
        self._lock = threading.Lock()

    def apply(self, snap: Snapshot) -> None:
        """Converge on `snap`; failures are logged and retried at the next call."""
        with self._lock:
            router, nodes = plan_commands(desired_ports(snap, self._nodes), self._links(), self._routes(),
                                          self._neighbours())
            for ns, commands in [(self._router, router), *nodes.items()]:
                if commands:
                    log.info("%s: %s", ns, "; ".join(commands))
                    batch(ns, commands, force=True)

    def _links(self) -> dict[str, str]:
        return {link["ifname"]: link.get("ifalias", "")
                for link in _ip_json(self._router, "link", "show", "type", "veth") if PORT_RE.match(link["ifname"])}

    def _routes(self) -> dict[str, str]:
        return {r["dst"]: r["dev"] for r in _ip_json(self._router, "route", "show", "proto", "static")
                if "dev" in r}

    def _neighbours(self) -> dict[tuple[str, str], str]:
        return {(n["dst"], n["dev"]): n.get("lladdr", "")
                for n in _ip_json(self._router, "neigh", "show", "nud", "permanent")}


def batch(namespace: str, commands: list[str], force: bool = False) -> None:
    """Run `ip` commands in a namespace in one process; with force, go on past errors and log them."""
    args = ["ip", "-n", namespace] + (["-force"] if force else []) + ["-batch", "-"]
    proc = netns.run(args, input="\n".join(commands) + "\n", check=False)
    if proc.returncode != 0:
        if not force:
            raise LabError(f"ip -n {namespace} -batch failed: {proc.stderr.strip()}")
        log.warning("ip -n %s -batch: %s", namespace, proc.stderr.strip())


def sysctl(namespace: str, settings: dict[str, str]) -> None:
    """Write /proc/sys entries as seen from inside a namespace (net sysctls are per namespace)."""
    with netns.entered(namespace):
        for key, value in settings.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)


def _ip_json(namespace: str, *args: str) -> list[dict]:
    proc = netns.run(["ip", "-j", "-n", namespace, *args])
    return json.loads(proc.stdout or "[]")
