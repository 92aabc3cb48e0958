"""Measures the design sketch "the node agent does the netlink work, the plugin asks it over a unix socket".

Not product code: a prototype that puts numbers on the idea (BENCHMARKS.md, "Netlink in the agent").

    python -m tests.bench.agent_sketch [--lab NAME] [--ops 30]

boots a one-node lab (or uses a running one), then in the node's namespace:
  - `serve`: a process with cnicore.netlink (so pyroute2) imported once, listening on a unix socket.
    A request is one JSON line plus the pod's netns as a file descriptor (SCM_RIGHTS); the server
    runs cnicore.netlink.setup_pod / teardown_pod with netns=/proc/self/fd/<fd> and answers one
    JSON line. The fd means the agent needs no access to the runtime's netns paths, and a netns
    that is gone cannot be confused with a new one of the same name;
  - the client side three ways, alternating: (a) in one warm process, the socket round trip of
    setup+teardown; (b) a fresh `python -S` process per operation (stdlib only: socket, json, os),
    as a plugin without pyroute2 would be; (c) in-process netlink in a fresh process per operation,
    what aws-vpc-bridge does today (import pyroute2, then setup_pod / teardown_pod).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# The agent side


def serve(path: str) -> None:
    from cnicore import netlink

    with netlink._host() as host:  # warm: pyroute2 imported, one socket opened and closed
        host.links()

    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                msg, fds = recv_with_fd(conn)
                if not msg:
                    return
                req = json.loads(msg)
                t0 = time.perf_counter()
                try:
                    att = netlink.Attachment(req["network"], req["container_id"], req["ifname"])
                    if req["op"] == "setup":
                        pair = netlink.setup_pod(netlink.PodNetwork(
                            attachment=att, netns=f"/proc/self/fd/{fds[0]}", host_veth=req["host_veth"],
                            pod_ip=req["pod_ip"], mtu=req.get("mtu", 9001)))
                        answer = {"ok": True, "host_mac": pair.host_mac, "pod_mac": pair.pod_mac}
                    else:
                        netlink.teardown_pod(att, host_veth=req["host_veth"], pod_ip=req["pod_ip"])
                        answer = {"ok": True}
                except Exception as exc:  # the sketch reports, the real agent would map to CNI codes
                    answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                finally:
                    for fd in fds:
                        os.close(fd)
                answer["agent_ms"] = (time.perf_counter() - t0) * 1000
                conn.sendall(json.dumps(answer).encode() + b"\n")

    with suppress_missing():
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


class suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is FileNotFoundError


def recv_with_fd(conn: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        msg, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
        if not msg:
            return b"", list(fds)
        data += msg
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


# ---------------------------------------------------------------------------------------------
# The plugin side (stdlib only)

CLIENT = r"""
import json, os, socket, sys
req = json.loads(sys.argv[2])
fd = os.open(req.pop("netns"), os.O_RDONLY | os.O_CLOEXEC)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendmsg([json.dumps(req).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
data = b""
while not data.endswith(b"\n"):
    data += s.recv(65536)
answer = json.loads(data)
sys.exit(0 if answer["ok"] else 1)
"""

INPROC = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from cnicore import netlink
req = json.loads(sys.argv[2])
att = netlink.Attachment(req["network"], req["container_id"], req["ifname"])
if req["op"] == "setup":
    netlink.setup_pod(netlink.PodNetwork(attachment=att, netns=req["netns"], host_veth=req["host_veth"],
                                         pod_ip=req["pod_ip"], mtu=9001))
else:
    netlink.teardown_pod(att, host_veth=req["host_veth"], pod_ip=req["pod_ip"])
"""


def ask(path: str, req: dict) -> dict:
    req = dict(req)
    fd = os.open(req.pop("netns"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendmsg([json.dumps(req).encode() + b"\n"],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(65536)
        s.close()
    finally:
        os.close(fd)
    return json.loads(data)


def bench(sock_path: str, pods: list[tuple[str, str]], network: str) -> dict:
    """Runs in the node's namespace: the three client ways, alternating, over the given pods."""
    from .stats import percentile

    results = {"warm_rtt_setup": [], "warm_rtt_teardown": [], "agent_setup": [], "agent_teardown": [],
               "exec_client_setup": [], "exec_client_teardown": [], "exec_inproc_setup": [],
               "exec_inproc_teardown": [], "cpu_exec_client": [], "cpu_exec_inproc": []}

    def req(op: str, n: int, netns_path: str) -> dict:
        return {"op": op, "network": network, "container_id": f"sketch{n}", "ifname": "eth0",
                "host_veth": f"sk{n:011d}"[:15], "pod_ip": f"10.0.9.{n % 250 + 1}", "netns": netns_path}

    def timed_exec(argv: list[str]) -> tuple[float, float]:
        r0 = os.times()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True)
        wall = time.perf_counter() - t0
        r1 = os.times()
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[:3]} failed: {proc.stderr.decode()[-1000:]}")
        return wall, (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)

    py = sys.executable
    for n, (_, netns_path) in enumerate(pods):
        ways = ["warm", "client", "inproc"]
        for way in (ways if n % 2 == 0 else ways[::-1]):
            if way == "warm":
                for op in ("setup", "teardown"):
                    t0 = time.perf_counter()
                    answer = ask(sock_path, req(op, n, netns_path))
                    if not answer["ok"]:
                        raise RuntimeError(answer["error"])
                    results[f"warm_rtt_{op}"].append(time.perf_counter() - t0)
                    results[f"agent_{op}"].append(answer["agent_ms"] / 1000)
            elif way == "client":
                cpu = 0.0
                for op in ("setup", "teardown"):
                    wall, c = timed_exec([py, "-S", "-c", CLIENT, sock_path, json.dumps(req(op, n, netns_path))])
                    results[f"exec_client_{op}"].append(wall)
                    cpu += c
                results["cpu_exec_client"].append(cpu / 2)
            else:
                cpu = 0.0
                for op in ("setup", "teardown"):
                    wall, c = timed_exec([py, "-c", INPROC, ROOT, json.dumps(req(op, n, netns_path))])
                    results[f"exec_inproc_{op}"].append(wall)
                    cpu += c
                results["cpu_exec_inproc"].append(cpu / 2)
    return {k: round(percentile([x * 1000 for x in v], 50), 2) for k, v in results.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.agent_sketch")
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve")
    s.add_argument("socket")
    c = sub.add_parser("client")
    c.add_argument("socket")
    c.add_argument("network")
    c.add_argument("netns", nargs="+")
    parser.add_argument("--ops", type=int, default=30)
    opts = parser.parse_args(argv)
    if opts.command == "serve":
        serve(opts.socket)
        return 0
    if opts.command == "client":
        print(json.dumps(bench(opts.socket, [(p, p) for p in opts.netns], opts.network)))
        return 0
    return orchestrate(opts.ops)


def orchestrate(ops: int) -> int:
    """Boot a lab, run the server and the client in node1, print the medians, clean up."""
    import tempfile

    from vpclab import api, netns

    prefix = netns.new_prefix("b")
    tmp = tempfile.mkdtemp(prefix=f"{prefix}-sketch-")
    lab = api.Lab.up(name=prefix, nodes=1, owner_pid=os.getpid())
    server = None
    try:
        sock_path = os.path.join(tmp, "agent-netlink.sock")
        env = lab.exec_env("node1", {"PYTHONPATH": ROOT})
        server = subprocess.Popen(lab.exec_argv("node1", [sys.executable, "-m", "tests.bench.agent_sketch", "serve",
                                                          sock_path]), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  text=True)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the sketch server did not start")
        pods = [netns.create(f"{prefix}-k{n}") for n in range(ops)]
        out = lab.exec("node1", [sys.executable, "-m", "tests.bench.agent_sketch", "client", sock_path,
                                 "sketch", *pods], env={"PYTHONPATH": ROOT}, timeout=1800)
        print(out.stdout.strip())
    finally:
        if server is not None:
            server.kill()
            server.wait()
        lab.down()
        netns.sweep(prefix)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
