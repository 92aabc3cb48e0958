"""How plugins find the node agent, without ever waiting on it.

The agent holds an exclusive flock on `<dataDir>/agent.lock` for as long as it runs, so a plugin can
tell "an agent is alive" from a non-blocking lock attempt (a crashed agent releases the lock with its
last breath). A plugin that finds the pool empty sends one datagram to `<dataDir>/agent.nudge` so the
agent grows the pool now rather than at its next tick.
"""

from __future__ import annotations

import fcntl
import os

from .fsutil import make_dirs

# `socket` is imported where a socket is made: importing it costs ~3 ms (with selectors and enum),
# and every aws-eni-ipam exec imports this module while only an empty pool sends anything.

LOCK = "agent.lock"
NUDGE = "agent.nudge"
STATUS = "agent.sock"


def agent_running(data_dir: str) -> bool:
    try:
        fd = os.open(os.path.join(data_dir, LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def hold_agent_lock(data_dir: str) -> int:
    """Called by the agent: take the lock for the process's lifetime; fail if another agent has it."""
    make_dirs(data_dir)
    fd = os.open(os.path.join(data_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another node agent is running on {data_dir}") from None
    return fd


def read_status(data_dir: str, timeout: float = 10.0) -> dict:
    """The running agent's status (what `aws-vpc-cni-agent status --json` prints); OSError or
    ValueError if no agent answers."""
    import json
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(os.path.join(data_dir, STATUS))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return json.loads(b"".join(chunks))


def nudge(data_dir: str, message: bytes = b"grow") -> bool:
    """Ask the agent to look at the pool now; True if the datagram was delivered."""
    import _socket  # not socket.py: this runs on pod ADDs that leave the pool short
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        sock.sendto(message, os.path.join(data_dir, NUDGE))
        return True
    except OSError:
        return False
    finally:
        sock.close()
