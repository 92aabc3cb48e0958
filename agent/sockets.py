"""The agent's end of `cnicore.agentlink`: the nudge socket (`<dataDir>/agent.nudge`: plugins wake
the loop; an ADD that found no free IP names its attachment; a DEL hands over a release it could
not write) and the read-only status socket
(`<dataDir>/agent.sock`: `aws-vpc-cni-agent status`). Each serves in its own daemon thread."""

from __future__ import annotations

import json
import os
import socket

from cnicore import agentlink


def serve_nudges(agent) -> None:
    path = os.path.join(agent.data_dir, agentlink.NUDGE)
    sock = _bind_unix(path, socket.SOCK_DGRAM)
    while not agent.stopping.is_set():
        message = sock.recv(agentlink.MAX_MESSAGE)
        release, waiting = agentlink.parse_release(message), agentlink.parse_waiting(message)
        if release is not None and release[0] == agent.store.network:
            agent.hand_over(*release[1:])
        elif waiting is not None and waiting[0] == agent.store.network:
            agent.wait_for_ip(*waiting[1:])
        agent.wake.set()


def serve_status(agent) -> None:
    sock = _bind_unix(os.path.join(agent.data_dir, agentlink.STATUS), socket.SOCK_STREAM)
    sock.listen(8)
    while not agent.stopping.is_set():
        conn, _ = sock.accept()
        with conn:
            try:
                conn.sendall(json.dumps(agent.status(), default=str).encode())
            except Exception as exc:
                agent.log.error(f"status request failed: {exc}")


def _bind_unix(path: str, kind: int) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    return sock
