"""The lab daemon's control socket (a Unix socket in the lab's state directory, so it needs no network).

One request per connection: a JSON line {"op": ..., "args": {...}}, answered by a JSON line
{"result": ...} or {"error": {"message": ..., and for EC2 errors "code" and "status"}}.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
from typing import Any, Callable

from .errors import Ec2Error, LabError

log = logging.getLogger("vpclab.control")
TIMEOUT = 120.0


def call(path: str, op: str, timeout: float = TIMEOUT, **args) -> Any:
    """Ask the daemon; raise LabError (or Ec2Error) with its answer when it refuses or fails."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline()
    except OSError as e:
        raise LabError(f"lab daemon at {path} does not answer ({e}); is the lab up?") from None
    if not line:
        raise LabError(f"lab daemon at {path} closed the connection without answering {op!r}")
    reply = json.loads(line)
    error = reply.get("error")
    if error is None:
        return reply["result"]
    if "code" in error:
        raise Ec2Error(error["code"], error["message"], error["status"])
    raise LabError(error["message"])


class ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, handlers: dict[str, Callable[..., Any]]):
        self.handlers = handlers
        super().__init__(path, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        try:
            request = json.loads(self.rfile.readline())
            op, args = request["op"], request.get("args", {})
            handler = self.server.handlers.get(op)
            if handler is None:
                raise LabError(f"unknown lab operation {op!r}")
            reply = {"result": handler(**args)}
        except Ec2Error as e:
            reply = {"error": {"message": e.message, "code": e.code, "status": e.status}}
        except LabError as e:
            reply = {"error": {"message": str(e)}}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": {"message": f"bad lab request: {e}"}}
        except Exception as e:  # the daemon must outlive any one request
            log.exception("control request failed")
            reply = {"error": {"message": f"lab daemon failed: {e!r}"}}
        self.wfile.write(json.dumps(reply).encode() + b"\n")
