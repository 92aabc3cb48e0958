"""Delete UDP conntrack entries by original destination port, over ctnetlink, as the reference
portmap does after an ADD (its utils.DeleteConntrackEntriesForDstPort).

A UDP flow that reached a host port before the mapping existed (e.g. a client retrying against a
pod that is starting) keeps its un-NATed conntrack entry, and every later datagram of the flow
follows that entry instead of the new DNAT rule. Dropping those entries lets the next datagram be
NATed. Raw netlink with the standard library only: pyroute2's import alone would cost ~200 ms.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG, CTA_ZONE = 1, 18
CTA_TUPLE_PROTO = 2
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id
_ATTR = struct.Struct("=HH")    # nlattr: len, type


def delete_by_dst_port(ports: set[int], family: int, proto: int = socket.IPPROTO_UDP) -> int:
    """Delete the conntrack entries of `family` (AF_INET/AF_INET6) whose original tuple is `proto` to one
    of `ports`, in this network namespace; return how many were deleted. Raises OSError on failure."""
    if not ports:
        return 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        doomed = [attrs for attrs in _dump(sock, family) if _matches(attrs, ports, proto)]
        deleted = 0
        for seq, attrs in enumerate(doomed, start=2):
            body = _attr_raw(CTA_TUPLE_ORIG | NLA_F_NESTED, attrs[CTA_TUPLE_ORIG])
            if CTA_ZONE in attrs:
                body += _attr_raw(CTA_ZONE, attrs[CTA_ZONE])
            _send(sock, IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, family, body)
            try:
                for _ in _replies(sock, seq):
                    pass
                deleted += 1
            except FileNotFoundError:
                pass  # gone meanwhile (expired, or deleted by someone else)
        return deleted


def _matches(attrs: dict[int, bytes], ports: set[int], proto: int) -> bool:
    tuple_orig = _attrs(attrs.get(CTA_TUPLE_ORIG, b""))
    proto_attrs = _attrs(tuple_orig.get(CTA_TUPLE_PROTO, b""))
    num = proto_attrs.get(CTA_PROTO_NUM)
    dport = proto_attrs.get(CTA_PROTO_DST_PORT)
    return num is not None and num[0] == proto and dport is not None and \
        struct.unpack("!H", dport[:2])[0] in ports


def _dump(sock: socket.socket, family: int):
    _send(sock, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, family, b"")
    for payload in _replies(sock, 1):
        yield _attrs(payload[_NFGEN.size:])


def _send(sock: socket.socket, msg: int, flags: int, seq: int, family: int, body: bytes) -> None:
    payload = _NFGEN.pack(family, 0, 0) + body
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | msg
    sock.send(_HDR.pack(_HDR.size + len(payload), kind, flags, seq, 0) + payload)


def _replies(sock: socket.socket, seq: int):
    """The payloads of the kernel's answers to request `seq`, until DONE or the ACK."""
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind, _flags, got_seq, _pid = _HDR.unpack_from(data, offset)
            if length < _HDR.size:
                raise OSError("malformed netlink message")
            payload = data[offset + _HDR.size:offset + length]
            offset += (length + 3) & ~3
            if got_seq != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                error = -struct.unpack_from("=i", payload)[0]
                if error:
                    raise OSError(error, os.strerror(error))
                return  # the ACK
            yield payload


def _attrs(data: bytes) -> dict[int, bytes]:
    out, offset = {}, 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        out[kind & NLA_TYPE_MASK] = data[offset + _ATTR.size:offset + length]
        offset += (length + 3) & ~3
    return out


def _attr_raw(kind: int, value: bytes) -> bytes:
    raw = _ATTR.pack(_ATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)
