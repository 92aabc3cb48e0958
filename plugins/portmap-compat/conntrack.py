"""Delete UDP conntrack entries by original destination port, over ctnetlink, as the reference
portmap does after an ADD (its utils.DeleteConntrackEntriesForDstPort).

A UDP flow that reached a host port before the mapping existed (e.g. a client retrying against a
pod that is starting) keeps its un-NATed conntrack entry, and every later datagram of the flow
follows that entry instead of the new DNAT rule. Dropping those entries lets the next datagram be
NATed. Raw netlink with the standard library only: pyroute2's import alone would cost ~200 ms.
"""

from __future__ import annotations

import struct
from _socket import AF_INET, AF_INET6, IPPROTO_UDP

from cnicore import rawnetlink
from cnicore.rawnetlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, attr, attributes

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2

CTA_TUPLE_ORIG, CTA_ZONE = 1, 18
CTA_TUPLE_PROTO = 2
CTA_PROTO_NUM, CTA_PROTO_DST_PORT = 1, 3

_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id


def delete_by_dst_port(ports: set[int], version: int, proto: int = IPPROTO_UDP) -> int:
    """Delete the conntrack entries of IP `version` (4 or 6) whose original tuple is `proto` to one
    of `ports`, in this network namespace; return how many were deleted. Raises OSError on failure."""
    if not ports:
        return 0
    family = AF_INET6 if version == 6 else AF_INET
    with rawnetlink.open_socket(NETLINK_NETFILTER) as sock:
        dump = rawnetlink.transact(sock, _kind(IPCTNL_MSG_CT_GET), NLM_F_DUMP, _NFGEN.pack(family, 0, 0))
        doomed = [attrs for attrs in (attributes(body[_NFGEN.size:]) for _, body in dump)
                  if _matches(attrs, ports, proto)]
        deleted = 0
        for seq, attrs in enumerate(doomed, start=2):
            body = attr(CTA_TUPLE_ORIG | NLA_F_NESTED, attrs[CTA_TUPLE_ORIG])
            if CTA_ZONE in attrs:
                body += attr(CTA_ZONE, attrs[CTA_ZONE])
            try:
                rawnetlink.transact(sock, _kind(IPCTNL_MSG_CT_DELETE), NLM_F_ACK, _NFGEN.pack(family, 0, 0) + body, seq)
                deleted += 1
            except FileNotFoundError:
                pass  # gone meanwhile (expired, or deleted by someone else)
        return deleted


def _kind(msg: int) -> int:
    return (NFNL_SUBSYS_CTNETLINK << 8) | msg


def _matches(attrs: dict[int, bytes], ports: set[int], proto: int) -> bool:
    tuple_orig = attributes(attrs.get(CTA_TUPLE_ORIG, b""))
    proto_attrs = attributes(tuple_orig.get(CTA_TUPLE_PROTO, b""))
    num = proto_attrs.get(CTA_PROTO_NUM)
    dport = proto_attrs.get(CTA_PROTO_DST_PORT)
    return num is not None and num[0] == proto and dport is not None and \
        struct.unpack("!H", dport[:2])[0] in ports
