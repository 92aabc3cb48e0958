"""The instance metadata service of one node, IMDSv2 only (tokens required), live from EC2 state.

Paths follow the real service: a directory answers with its entries one per line (sub-directories
with a trailing '/'), a leaf with its value; an unknown path is 404. Tokens: PUT /latest/api/token
with X-aws-ec2-metadata-token-ttl-seconds (1..21600); every GET needs X-aws-ec2-metadata-token (401
without a valid one); a PUT carrying X-Forwarded-For is refused (403), as the real service does.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler

from .ec2model import Eni, Snapshot

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600


def metadata_tree(snap: Snapshot, instance_id: str, region: str) -> dict | None:
    """Everything under /latest/ for one instance, or None if EC2 does not know it."""
    instance = snap.instances.get(instance_id)
    enis = snap.enis_of(instance_id)
    if instance is None or not enis:
        return None
    primary = enis[0]
    hostname = f"ip-{instance.private_ip.replace('.', '-')}.{region}.compute.internal"
    identity = {"accountId": primary.owner_id, "availabilityZone": instance.az, "imageId": instance.image_id,
                "instanceId": instance.id, "instanceType": instance.type, "privateIp": instance.private_ip,
                "region": region}
    return {
        "meta-data": {
            "ami-id": instance.image_id,
            "hostname": hostname,
            "instance-id": instance.id,
            "instance-type": instance.type,
            "local-hostname": hostname,
            "local-ipv4": instance.private_ip,
            "mac": primary.mac,
            "network": {"interfaces": {"macs": {e.mac: _interface(snap, e, hostname) for e in enis}}},
            "placement": {"availability-zone": instance.az, "region": region},
            "security-groups": "\n".join(name for _, name in primary.groups),
        },
        "dynamic": {"instance-identity": {"document": json.dumps(identity, indent=2)}},
    }


def _interface(snap: Snapshot, eni: Eni, hostname: str) -> dict:
    """One ENI's directory. ipv4-prefix lists its delegated prefixes one per line and, as on EC2 (where
    upstream's GetIPv4Prefixes takes a 404 for none), is absent while it has none."""
    subnet = snap.subnets.get(eni.subnet_id)
    vpc = snap.vpcs.get(eni.vpc_id)
    prefixes = {"ipv4-prefix": "\n".join(eni.prefixes)} if eni.prefixes else {}
    return {
        "device-number": str(eni.device_index),
        "interface-id": eni.id,
        **prefixes,
        "local-hostname": hostname,
        "local-ipv4s": "\n".join(eni.ips),
        "mac": eni.mac,
        "owner-id": eni.owner_id,
        "security-group-ids": "\n".join(gid for gid, _ in eni.groups),
        "security-groups": "\n".join(name for _, name in eni.groups),
        "subnet-id": eni.subnet_id,
        "subnet-ipv4-cidr-block": subnet.cidr if subnet else "",
        "vpc-id": eni.vpc_id,
        "vpc-ipv4-cidr-block": vpc.cidrs[0] if vpc else "",
        "vpc-ipv4-cidr-blocks": "\n".join(vpc.cidrs) if vpc else "",
    }


def lookup(tree: dict, path: str) -> str | None:
    """The answer for `path` (under /latest/), or None for 404."""
    node = tree
    for part in (p for p in path.split("/") if p):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        return "\n".join(k + "/" if isinstance(v, dict) else k for k, v in node.items())
    return node


class Tokens:
    def __init__(self):
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self, ttl: int) -> str:
        token = secrets.token_urlsafe(40)
        now = time.monotonic()
        with self._lock:
            self._expiry = {t: e for t, e in self._expiry.items() if e > now}
            self._expiry[token] = now + ttl
        return token

    def valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and self._expiry.get(token, 0) > time.monotonic()


class ImdsHandler(BaseHTTPRequestHandler):
    """Serves one node; the server carries `imds` (an ImdsService)."""
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    sys_version = ""

    def do_PUT(self):
        if not self.server.imds.begin(self):
            return
        self._drain()
        if self.path != TOKEN_PATH:
            return self._answer(404, "Not Found")
        if self.headers.get("X-Forwarded-For"):
            return self._answer(403, "Forbidden")
        ttl = self.headers.get(TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TTL:
            return self._answer(400, "Bad Request")
        token = self.server.imds.tokens.issue(int(ttl))
        self._answer(200, token, {TTL_HEADER: ttl})

    def do_GET(self):
        if not self.server.imds.begin(self):
            return
        if not self.server.imds.tokens.valid(self.headers.get(TOKEN_HEADER)):
            return self._answer(401, "Unauthorized")
        path = self.path.split("?", 1)[0]
        if not path.startswith("/latest/"):
            return self._answer(404, "Not Found")
        tree = self.server.imds.tree()
        body = lookup(tree, path[len("/latest/"):]) if tree is not None else None
        if body is None:
            return self._answer(404, "Not Found")
        self._answer(200, body)

    def _drain(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def _answer(self, status: int, body: str, headers: dict | None = None):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


class ImdsService:
    """State behind one node's IMDS: its instance, tokens, faults and call count."""

    def __init__(self, node: str, instance_id: str, region: str, cache, faults, counter):
        self.node = node
        self.instance_id = instance_id
        self.region = region
        self.tokens = Tokens()
        self._cache = cache
        self._faults = faults
        self._counter = counter

    def begin(self, handler: BaseHTTPRequestHandler) -> bool:
        """Count the request and apply faults; False: the IMDS is down, drop the connection unanswered."""
        self._counter.count(self.node)
        fault = self._faults.take("IMDS", self.node)
        if fault is None:
            return True
        if fault.latency:
            time.sleep(fault.latency)
        if fault.error:
            handler.close_connection = True
            return False
        return True

    def tree(self) -> dict | None:
        return metadata_tree(self._cache.for_imds(), self.instance_id, self.region)
