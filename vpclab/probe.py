"""Small network probes to run inside lab namespaces, each printing one JSON line:

    python -m vpclab.probe ping ADDR [--source IP] [--timeout S]
    python -m vpclab.probe echo tcp|udp ADDR PORT [--source IP] [--timeout S]
    python -m vpclab.probe listen-udp ADDR PORT [--timeout S]   # prints {"ready": true} first
    python -m vpclab.probe send-udp ADDR PORT [--source IP] [--count N] [--interval S]
    python -m vpclab.probe imds PATH... [--ttl N] [--no-token]

The machine has no ping binary; these serve the tests, and a person at `vpclab exec`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import struct
import sys
import time

IMDS_HOST = "169.254.169.254"


def ping(addr: str, source: str | None, timeout: float) -> dict:
    """One ICMP echo request; ok when the reply comes back from `addr` in time."""
    ident, seq = os.getpid() & 0xFFFF, 1
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        if source:
            s.bind((source, 0))
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        payload = b"vpclab-probe"
        s.sendto(struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload, (addr, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data, (peer, _) = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if kind == 0 and rid == ident and rseq == seq and peer == addr:
                return {"ok": True}
    return {"ok": False}


def echo(proto: str, addr: str, port: int, source: str | None, timeout: float) -> dict:
    """Ask the lab echo which source address and port it sees."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        try:
            if proto == "tcp":
                s.connect((addr, port))
                s.sendall(b"hello\n")
                answer = s.makefile().readline()
            else:
                s.sendto(b"hello\n", (addr, port))
                answer = s.recv(200).decode()
        except OSError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "answer": answer.strip(), "local": "%s %d" % s.getsockname()}


def listen_udp(addr: str, port: int, timeout: float) -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((addr, port))
        print(json.dumps({"ready": True}), flush=True)
        received = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                data, peer = s.recvfrom(2048)
                received.append([peer[0], peer[1], data.decode(errors="replace")])
        return {"received": received}


def send_udp(addr: str, port: int, source: str | None, count: int, interval: float) -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if source:
            s.bind((source, 0))
        for i in range(count):
            if i:
                time.sleep(interval)
            s.sendto(b"probe %d" % i, (addr, port))
    return {"ok": True}


def imds(paths: list[str], ttl: str, token: bool, timeout: float) -> dict:
    """IMDSv2: get a token (unless --no-token), then GET each path; report statuses and bodies."""
    result: dict = {"answers": {}}
    headers = {}
    try:
        if token:
            status, body = _http("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl}, timeout)
            result["token_status"] = status
            if status == 200:
                headers["X-aws-ec2-metadata-token"] = body
        for path in paths:
            result["answers"][path] = list(_http("GET", path, headers, timeout))
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def _http(method: str, path: str, headers: dict, timeout: float) -> tuple[int, str]:
    conn = http.client.HTTPConnection(IMDS_HOST, 80, timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpclab.probe")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ping")
    p.add_argument("addr")
    p.add_argument("--source")
    p.add_argument("--timeout", type=float, default=1.0)
    p = sub.add_parser("echo")
    p.add_argument("proto", choices=["tcp", "udp"])
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--source")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("listen-udp")
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("send-udp")
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--source")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--interval", type=float, default=0.1)
    p = sub.add_parser("imds")
    p.add_argument("paths", nargs="+")
    p.add_argument("--ttl", default="21600")
    p.add_argument("--no-token", dest="token", action="store_false")
    p.add_argument("--timeout", type=float, default=2.0)
    a = parser.parse_args(argv)
    if a.command == "ping":
        out = ping(a.addr, a.source, a.timeout)
    elif a.command == "echo":
        out = echo(a.proto, a.addr, a.port, a.source, a.timeout)
    elif a.command == "listen-udp":
        out = listen_udp(a.addr, a.port, a.timeout)
    elif a.command == "send-udp":
        out = send_udp(a.addr, a.port, a.source, a.count, a.interval)
    else:
        out = imds(a.paths, a.ttl, a.token, a.timeout)
    print(json.dumps(out), flush=True)
    return 0 if out.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
