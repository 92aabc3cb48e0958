"""The echo on the internet and extra hosts: each UDP datagram, and each line on a TCP connection, is
answered with the source address and port the host saw, as the text 'ADDR PORT\\n'."""

from __future__ import annotations

import socketserver

from .servers import TcpServer, UdpServer, serve_in


class TcpEcho(socketserver.StreamRequestHandler):
    def handle(self):
        addr, port = self.client_address[:2]
        for _ in self.rfile:
            self.wfile.write(f"{addr} {port}\n".encode())


class UdpEcho(socketserver.BaseRequestHandler):
    def handle(self):
        _, sock = self.request
        addr, port = self.client_address[:2]
        sock.sendto(f"{addr} {port}\n".encode(), self.client_address)


def start(namespace: str, port: int) -> list[socketserver.BaseServer]:
    return [serve_in(namespace, lambda: TcpServer(("0.0.0.0", port), TcpEcho)),
            serve_in(namespace, lambda: UdpServer(("0.0.0.0", port), UdpEcho))]
