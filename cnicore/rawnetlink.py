"""Netlink requests on a raw socket, with the standard library only.

Every kernel conversation of the plugins goes through here (rtnetlink through `cnicore.rtnl`,
nfnetlink for nf_tables and conntrack): `import pyroute2` alone cost 90-200 ms per exec.
The socket is made in the caller's network namespace. A kernel NACK is raised as OSError with its
errno.
"""

from __future__ import annotations

import _socket  # the C module: importing socket.py (enum classes for its constants) costs 2-4 ms per exec
import errno
import os
import struct

NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x2, 0x4, 0x10
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_ATTR = struct.Struct("=HH")       # nlattr: length, type


class Socket(_socket.socket):
    """A socket of the C module, closed at the end of a `with` block."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def open_socket(protocol: int) -> Socket:
    """A netlink socket of `protocol` (NETLINK_ROUTE, NETLINK_NETFILTER, ...)."""
    sock = Socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, protocol)
    sock.bind((0, 0))
    return sock


def control_socket(family: int = _socket.AF_INET) -> Socket:
    """A datagram socket to address ioctls and getsockopt calls to (interfaces, xtables)."""
    return Socket(family, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)


DUMP_TRIES = 50  # consistent dumps tried before giving up (each retry follows a change the kernel made meanwhile)


def transact(sock: Socket, kind: int, flags: int, payload: bytes, seq: int = 1) -> list[tuple[int, bytes]]:
    """Send one request; return (type, body) of each answer, up to DONE or the ACK.

    A dump the kernel marks interrupted (NLM_F_DUMP_INTR: the list changed while it was being sent,
    so entries may be missing, e.g. links while other pods' veths come and go) is asked again, as
    libnl and the Go netlink library do; after DUMP_TRIES such dumps, OSError(EAGAIN)."""
    for _ in range(DUMP_TRIES if flags & NLM_F_DUMP == NLM_F_DUMP else 1):
        answers, interrupted = _exchange(sock, kind, flags, payload, seq)
        if not interrupted:
            return answers
    raise OSError(errno.EAGAIN, f"netlink dump interrupted by changes {DUMP_TRIES} times in a row")


def _exchange(sock: Socket, kind: int, flags: int, payload: bytes, seq: int) -> tuple[list[tuple[int, bytes]], bool]:
    """One request and its answers; and whether the kernel marked any of them NLM_F_DUMP_INTR."""
    flags |= NLM_F_REQUEST
    sock.send(_HEADER.pack(_HEADER.size + len(payload), kind, flags, seq, 0) + payload)
    answers, interrupted = [], False
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, mtype, mflags, mseq, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                raise OSError("malformed netlink answer")
            body = data[offset + _HEADER.size:offset + length]
            offset += (length + 3) & ~3
            if mseq != seq:
                continue
            interrupted |= bool(mflags & NLM_F_DUMP_INTR)
            if mtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", body)[0]
                if code:
                    raise OSError(code, os.strerror(code))
                return answers, interrupted  # the ACK
            if mtype == NLMSG_DONE:
                return answers, interrupted
            answers.append((mtype, body))
            if not mflags & NLM_F_MULTI and not flags & (NLM_F_ACK | NLM_F_DUMP):
                return answers, interrupted


def attr(kind: int, payload: bytes) -> bytes:
    data = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def attributes(data: bytes) -> dict[int, bytes]:
    """Top-level attributes by type (flags masked off)."""
    found, offset = {}, 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        found[kind & NLA_TYPE_MASK] = data[offset + _ATTR.size:offset + length]
        offset += (length + 3) & ~3
    return found
