"""Servers whose listening sockets live in a chosen namespace while the process stays in its own.

The lab daemon runs in its ctl namespace; a socket created while the thread is inside a node's
namespace serves that node, with no route or link between the two namespaces.
"""

from __future__ import annotations

import socketserver
import threading
from http.server import ThreadingHTTPServer
from typing import Callable

from . import netns


class HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name (getfqdn), which waits on DNS that is not there
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class UdpServer(socketserver.UDPServer):
    allow_reuse_address = True


def serve_in(namespace: str | None, make: Callable[[], socketserver.BaseServer]) -> socketserver.BaseServer:
    """Create a server inside `namespace` (None: here) and serve it from a daemon thread."""
    if namespace is None:
        server = make()
    else:
        with netns.entered(namespace):
            server = make()
    threading.Thread(target=server.serve_forever, name=f"serve-{namespace}", daemon=True).start()
    return server
