"""The EC2 endpoint the nodes talk to: it counts every call, injects faults, throttles (throttling) and
delays (latency) as EC2 does when those models are on, enforces what moto does not (ec2rules),
forwards the rest to moto, and then has `backend` apply what moto accepted but ignored (IPv4
prefixes, DeleteOnTermination).

A node's request goes: count, injected fault, token bucket, latency, then the call itself. Calls that
change state are serialized, checked against a snapshot that reflects every earlier change, and
followed by `changed()` so the data plane and IMDS catch up at once. The lab's own calls (`counted`
False) skip counts, faults, buckets and latency.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Callable, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from .counting import CallCounter
from .ec2rules import RULES, Params, Plan, Rejection, created_eni_id, error_xml, vet, with_prefix_set
from .faults import EC2_ERRORS, FaultBook
from .latency import Latency
from .state import StateCache
from .throttling import EXCEEDED, Throttling

READ_ONLY = ("Describe", "Get", "List")
HOP_BY_HOP = {"connection", "keep-alive", "content-length", "transfer-encoding", "expect", "proxy-connection",
              "te", "trailer", "upgrade"}
MOTO_TIMEOUT = 60

Response = tuple[int, list[tuple[str, str]], bytes]


class Backend(Protocol):
    """What the front needs of moto beyond its API (moto runs in the lab daemon's process)."""

    def complete(self, action: str, params: dict[str, str]) -> None:
        """Apply what moto accepted in a successful call but ignored."""

    def set_prefixes(self, eni_id: str, prefixes: tuple[str, ...]) -> None:
        """Make `prefixes` the ENI's IPv4 prefixes, as moto's answers then show them."""


class Ec2Front:
    def __init__(self, moto: tuple[str, int], cache: StateCache, faults: FaultBook, default_type: str,
                 changed: Callable[[], None], backend: Backend, throttling: Throttling, latency: Latency):
        self.calls = CallCounter()
        self.mutating = threading.Lock()  # held while a change is checked and made
        self.throttling = throttling
        self.latency = latency
        self._moto = moto
        self._cache = cache
        self._faults = faults
        self._default_type = default_type
        self._changed = changed
        self.backend = backend

    def handle(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, counted: bool) -> Response:
        """One EC2 Query API request; `counted` is False for the lab's own calls (no count, no faults)."""
        query = body.decode("utf-8", "replace") if method == "POST" else urlsplit(path).query
        params = parse_qsl(query, keep_blank_values=True)
        action = dict(params).get("Action", "")
        if counted:
            self.calls.count(action)
            fault = self._faults.take(action)
            if fault is not None:
                time.sleep(fault.latency)
                if fault.error:
                    status, message = EC2_ERRORS[fault.error]
                    return _error(status, fault.error, message)
            if not self.throttling.admit(action, dict(params)):
                return _error(*EXCEEDED)
            time.sleep(self.latency.delay(action))
        if action.startswith(READ_ONLY):
            return self._forward(headers, params)
        with self.mutating:
            snap = self._cache.live()
            try:
                plan = vet(action, params, snap, self._default_type)
            except Rejection as r:
                return _error(r.status, r.code, r.message)
            response = None
            try:
                response = self._forward_plan(headers, params, plan)
                if response[0] == 200:
                    response = self._complete(action, dict(params), plan, response)
            finally:
                self._cache.mark_dirty(changed_enis(action, dict(params), plan, snap, response))
        self._changed()
        return response

    def _complete(self, action: str, params: dict[str, str], plan: Plan, response: Response) -> Response:
        """Apply what moto ignored; a created ENI's prefixes also go into the answer (moto's has none)."""
        self.backend.complete(action, params)
        if plan.prefixes is None:
            return response
        eni_id = params.get("NetworkInterfaceId")
        status, headers, body = response
        if eni_id is None:  # the call created the ENI
            eni_id = created_eni_id(body)
            body = with_prefix_set(body, plan.prefixes)
        self.backend.set_prefixes(eni_id, plan.prefixes)
        return status, headers, body

    def _forward_plan(self, headers: list[tuple[str, str]], params: Params, plan: Plan) -> Response:
        version = dict(params).get("Version", "2016-11-15")
        for action, before_params in plan.before:
            response = self._forward(headers, [("Action", action), ("Version", version)] + before_params)
            if response[0] != 200:
                return response
        response = self._forward(headers, plan.params)
        if response[0] == 200 and plan.reply is not None:
            return 200, [("Content-Type", "text/xml;charset=UTF-8")], plan.reply
        return response

    def _forward(self, headers: list[tuple[str, str]], params: Params) -> Response:
        body = urlencode(params).encode()
        sent = {k: v for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != "content-type"}
        sent["Content-Type"] = "application/x-www-form-urlencoded; charset=utf-8"
        conn = http.client.HTTPConnection(*self._moto, timeout=MOTO_TIMEOUT)
        try:
            conn.request("POST", "/", body, sent)
            reply = conn.getresponse()
            data = reply.read()
            kept = [(k, v) for k, v in reply.getheaders() if k.lower() not in HOP_BY_HOP]
            return reply.status, kept, data
        except OSError as e:
            return _error(500, "InternalError", f"An internal error has occurred. (lab: moto: {e})")
        finally:
            conn.close()


def changed_enis(action: str, params: dict[str, str], plan: Plan, snap, response: Response | None) -> set[str] | None:
    """The ENIs a mutating call can have changed, or None if it can have changed more (instances,
    subnets, anything else the snapshot holds). Tags are not in the snapshot: tagging changes none."""
    if action in ("CreateTags", "DeleteTags"):
        return set()
    if action not in RULES:
        return None
    enis = {dict(before).get("NetworkInterfaceId") for _, before in plan.before}
    if action == "CreateNetworkInterface":
        enis.add(created_eni_id(response[2]) if response is not None and response[0] == 200 else None)
    elif action == "DetachNetworkInterface":
        eni = snap.eni_by_attachment(params.get("AttachmentId", ""))
        if eni is None:
            return None
        enis.add(eni.id)
    else:
        enis.add(params.get("NetworkInterfaceId"))
    return {e for e in enis if e}


def _error(status: int, code: str, message: str) -> Response:
    return status, [("Content-Type", "text/xml;charset=UTF-8")], error_xml(code, message)


class FrontHandler(BaseHTTPRequestHandler):
    """The server carries `front` (an Ec2Front) and `counted` (False on the lab's internal listener)."""
    protocol_version = "HTTP/1.1"
    server_version = "AmazonEC2"
    sys_version = ""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, data = self.server.front.handle(self.command, self.path, list(self.headers.items()),
                                                         body, self.server.counted)
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, format, *args):
        pass
