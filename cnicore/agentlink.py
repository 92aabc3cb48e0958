"""How plugins find the node agent, without ever waiting on it.

The agent holds an exclusive flock on `<dataDir>/agent.lock` for as long as it runs, so a plugin can
tell "an agent is alive" from a non-blocking lock attempt (a crashed agent releases the lock with its
last breath). A plugin that finds the pool empty sends one datagram to `<dataDir>/agent.nudge` so the
agent grows the pool now rather than at its next tick (naming the attachment that waits for an IP,
which the agent counts as demand until it has one); a DEL that could not write its release to the
store sends the release, which the agent retries until it lands (a datagram needs no disk space).
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
# The plugins' resident helper the agent starts (build/zygote.py); build/launcher.c asks the one at the
# default data folder's path, or at $AWS_VPC_CNI_ZYGOTE_SOCKET.
ZYGOTE = "zygote.sock"
RELEASE = "release"
WAITING = "waiting"
MAX_MESSAGE = 4096  # a nudge datagram: a release names a container ID (up to ~1 KiB here)


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


def hold_agent_lock(data_dir: str, on_wait=None, patience: float = 30.0) -> int:
    """Called by the agent: take the lock for the process's lifetime; fail if another agent has it.

    Plugins probe the lock shared (`agent_running`) for an instant; the lock held only shared is
    such a probe, not an agent, and is waited for (`on_wait` is called once, up to `patience` s of
    probes back to back). Only an exclusive holder is another agent."""
    import time
    make_dirs(data_dir)
    fd = os.open(os.path.join(data_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: every holder holds it shared
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another node agent is running on {data_dir}") from None
        if deadline is None:
            deadline = time.monotonic() + patience
            if on_wait is not None:
                on_wait()
        elif time.monotonic() > deadline:
            os.close(fd)
            raise RuntimeError(f"the node agent lock on {data_dir} stayed held shared for {patience:.0f} s")
        time.sleep(0.01)


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


def release_message(network: str, container_id: str, ifname: str, ip: str) -> bytes:
    """The nudge of a DEL that could not write its release (the store unwritable): the agent
    releases `ip` of that attachment itself, retrying until the store takes it."""
    return _message(RELEASE, network, container_id, ifname, ip)


def parse_release(message: bytes) -> tuple[str, str, str, str] | None:
    """(network, container ID, ifname, IP) of a `release_message`, None for any other message."""
    return _parse(message, RELEASE, 4)


def waiting_message(network: str, container_id: str, ifname: str) -> bytes:
    """The nudge of an ADD that found no free IP: the attachment waits for one (the runtime tries
    again), so the agent grows for it as well as for its targets."""
    return _message(WAITING, network, container_id, ifname)


def parse_waiting(message: bytes) -> tuple[str, str, str] | None:
    """(network, container ID, ifname) of a `waiting_message`, None for any other message."""
    return _parse(message, WAITING, 3)


def _message(kind: str, *fields: str) -> bytes:
    return "\0".join((kind, *fields)).encode()


def _parse(message: bytes, kind: str, count: int) -> tuple | None:
    parts = message.decode(errors="replace").split("\0")
    if len(parts) != count + 1 or parts[0] != kind or not all(parts[1:]):
        return None
    return tuple(parts[1:])


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
