"""Helpers for tests/ns/test_portmap.py: run portmap-compat and the Go reference portmap inside a
namespace, read a namespace's nat table, and a small world of namespaces to send traffic through.

Everything runs inside namespaces made by the `make_netns` fixture; nothing here touches the root
namespace's tables. The reference plugin drives whatever `iptables` its PATH names: the host's
(nf_tables on this Debian), or iptables-legacy through a directory of links (`legacy_bin`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from vpclab import netns

from support.labnode import cnitool_container_id

PLUGIN = os.path.join(sys.prefix, "bin", "portmap-compat")
REFERENCE = "/usr/lib/cni/portmap"
GO_PLUGINS = "/usr/lib/cni"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def legacy_bin(tmp_path) -> str:
    """A directory whose iptables/ip6tables are iptables-legacy (xtables-legacy-multi picks its
    personality from the name it is called by), to put in front of the reference plugin's PATH."""
    bindir = tmp_path / "legacy-bin"
    bindir.mkdir(exist_ok=True)
    for name in ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "iptables-restore", "ip6tables-restore"):
        link = bindir / name
        if not link.exists():
            link.symlink_to(f"/usr/sbin/{name.replace('tables', 'tables-legacy', 1)}")
    return str(bindir)


def mark_mode(ns: str, variant: str) -> None:
    """Make `ns` look like a node of that iptables variant, as kubelet does (and as cnicore.netfilter's
    detection, after kube's iptables-wrapper, recognises): KUBE-KUBELET-CANARY in that variant's mangle."""
    netns.run([f"iptables-{variant}", "-w", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"], netns=ns)


def invoke(ns: str, command: str, conf: dict, *, plugin: str = PLUGIN, cid: str = "c1", ifname: str = "eth0",
           netns_path: str = "/var/run/netns/no-such-pod", path: str = SYSTEM_PATH):
    """Exec one plugin inside `ns` with only the CNI variables (and PATH); (rc, parsed stdout, stderr)."""
    env = {"PATH": path, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns_path,
           "CNI_IFNAME": ifname, "CNI_PATH": GO_PLUGINS}
    argv = ["ip", "netns", "exec", ns, "env", "-i", *(f"{k}={v}" for k, v in env.items()), plugin]
    proc = subprocess.run(argv, input=json.dumps(conf), capture_output=True, text=True, timeout=60)
    out = proc.stdout.strip()
    return proc.returncode, (json.loads(out) if out else None), proc.stderr


def nat(ns: str, variant: str, ipv6: bool = False) -> dict[str, list[str]]:
    """The nat table of one variant in `ns` as {chain: [rule specs in order]} (counters and chain
    declaration order dropped: iptables-save lists the rules of each chain in order)."""
    out = netns.run([f"{'ip6' if ipv6 else 'ip'}tables-{variant}-save"], netns=ns).stdout
    chains: dict[str, list[str]] = {}
    table = None
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif table == "nat" and line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif table == "nat" and line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            chains.setdefault(chain, []).append(spec)
    return chains


def rules(table: dict[str, list[str]]) -> list[str]:
    """Every rule of a `nat()` table as '-A CHAIN spec'."""
    return [f"-A {chain} {spec}" for chain, specs in table.items() for spec in specs]


def user_chains(table: dict[str, list[str]]) -> set[str]:
    return set(table) - {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}


# ---------------------------------------------------------------------------------------------
# Traffic


SERVER = r"""
import socket, sys, threading
name = sys.argv[1].encode()
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 80)); tcp.listen(16)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 80))

def serve_udp():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(name + b": udp " + data + b" from " + peer[0].encode(), peer)

threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, peer = tcp.accept()
    with conn:
        conn.sendall(name + b": tcp from " + peer[0].encode())
"""


def start_server(ns: str, name: str) -> subprocess.Popen:
    """A TCP and UDP echo on port 80 in `ns`; each answer is '<name>: <tcp|udp ping> from <source address>'."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"server in {ns} did not start: {proc.stderr.read()}")
    return proc


def tcp_get(ns: str, host: str, port: int, timeout: float = 3.0) -> str:
    """Connect from `ns` and read the answer; raises OSError (e.g. ConnectionRefusedError) on failure."""
    with netns.entered(ns):
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
    return data.decode()


def udp_ask(ns: str, host: str, port: int, *, source_port: int = 0, timeout: float = 2.0, tries: int = 1) -> str:
    """Send one datagram from `ns` (from `source_port` if given) and wait for the answer."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", source_port))
        sock.settimeout(timeout)
        for attempt in range(tries):
            sock.sendto(b"ping", (host, port))
            try:
                return sock.recvfrom(2048)[0].decode()
            except (TimeoutError, ConnectionRefusedError):
                if attempt == tries - 1:
                    raise
                time.sleep(0.2)
    raise AssertionError("unreachable")


def veth(a: str, a_if: str, b: str, b_if: str) -> None:
    """A veth pair between namespaces `a` and `b`, both ends up."""
    netns.run(["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b], netns=a)
    netns.run(["ip", "link", "set", a_if, "up"], netns=a)
    netns.run(["ip", "link", "set", b_if, "up"], netns=b)


def cnitool(cnitool_path: str, ns: str, command: str, network: str, pod_ns: str, *, netconf_dir: str,
            cni_path: str, cap_args: dict | None = None, cni_args: str | None = None) -> dict | None:
    """`cnitool <command> <network> /run/netns/<pod_ns>` run in namespace `ns` (the node); `cap_args`
    and `cni_args` go to the plugins as runtimeConfig and CNI_ARGS."""
    env = {"PATH": SYSTEM_PATH, "NETCONFPATH": netconf_dir, "CNI_PATH": cni_path}
    if cap_args is not None:
        env["CAP_ARGS"] = json.dumps(cap_args)
    if cni_args is not None:
        env["CNI_ARGS"] = cni_args
    argv = ["ip", "netns", "exec", ns, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
            cnitool_path, command, network, netns.path(pod_ns)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"cnitool {command} failed ({proc.returncode}): {proc.stdout} {proc.stderr}")
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def pod_container_id(pod_ns: str) -> str:
    """cnitool's container ID for a pod namespace."""
    return cnitool_container_id(netns.path(pod_ns))
