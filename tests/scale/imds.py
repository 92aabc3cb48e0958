"""A per-node IMDS for simulated nodes, served from the lab's EC2 state.

The lab serves IMDS only to its namespaced nodes; a simulated node has no namespace. One HTTP server
here answers every simulated node, telling them apart by the loopback address they connect to (node
i at 127.20.i/256.i%256: every 127/8 address is local), with the lab's own IMDS tree
(vpclab.imds.metadata_tree) over the lab's snapshot of EC2 (Lab.snapshot: no EC2 call, no token spent,
not counted), which a thread reads again every `refresh` wall seconds. So a simulated
node's IMDS lags EC2 by up to `refresh` x time_scale simulated seconds, as IMDS does on EC2 (seconds).
"""

from __future__ import annotations

import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from vpclab.imds import MAX_TTL, TOKEN_HEADER, TOKEN_PATH, TTL_HEADER, Tokens, lookup, metadata_tree

BASE = int(ipaddress.IPv4Address("127.20.0.0"))


def node_address(index: int) -> str:
    return str(ipaddress.IPv4Address(BASE + index))


class SimIMDS:
    def __init__(self, lab, instances: list[str], region: str, port: int = 8169, refresh: float = 1.0):
        self.lab, self.region, self.port, self.refresh = lab, region, port, refresh
        self.instances = {node_address(i): iid for i, iid in enumerate(instances)}
        self.tokens = Tokens()
        self.snapshot = lab.snapshot()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)
        self._server.daemon_threads = True
        self._server.sim = self
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True),
                         threading.Thread(target=self._follow, daemon=True)]
        for t in self._threads:
            t.start()

    def endpoint(self, index: int) -> str:
        return f"http://{node_address(index)}:{self.port}"

    def reread(self) -> None:
        self.snapshot = self.lab.snapshot(since=self.snapshot)

    def _follow(self) -> None:
        while not self._stop.wait(self.refresh):
            self.reread()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        sim = self.server.sim
        if self.path != TOKEN_PATH:
            return self._answer(404, "Not Found")
        ttl = self.headers.get(TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TTL:
            return self._answer(400, "Bad Request")
        self._answer(200, sim.tokens.issue(int(ttl)))

    def do_GET(self):
        sim = self.server.sim
        if not sim.tokens.valid(self.headers.get(TOKEN_HEADER)):
            return self._answer(401, "Unauthorized")
        instance = sim.instances.get(self.connection.getsockname()[0])
        tree = metadata_tree(sim.snapshot, instance, sim.region) if instance else None
        body = lookup(tree, self.path.split("?", 1)[0][len("/latest/"):]) if tree else None
        if body is None or not self.path.startswith("/latest/"):
            return self._answer(404, "Not Found")
        self._answer(200, body)

    def _answer(self, status: int, body: str):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass
