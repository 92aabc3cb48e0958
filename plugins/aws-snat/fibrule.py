"""IPv4 policy routing rules of the form `<priority>: from all fwmark M/K lookup <table>`, over
rtnetlink with the standard library only.

aws-snat needs one such rule (priority 1024, node-wide) and looks at it on every ADD. Measured here:
`import pyroute2` costs ~150 ms per process, an `ip rule` subprocess ~1.5 ms, one rule dump on a raw
netlink socket well under 1 ms; hence this. The socket is made in the caller's network namespace.
"""

from __future__ import annotations

import errno
import os
import struct
from _socket import AF_INET, NETLINK_ROUTE

from cnicore.rawnetlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, attr, attributes, request
from cnicore.record import record

RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
FRA_PRIORITY, FRA_FWMARK, FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN = 6, 10, 13, 14
FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 15, 16, 21
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # the origin we record on our rule (`ip rule` shows "proto boot")
# Attributes that say nothing about which packets a rule matches (besides the mark we read).
_PLAIN = {FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL, FRA_FWMARK, FRA_FWMASK}
_UNSET = b"\xff\xff\xff\xff"  # the kernel reports the suppress_* options with -1 when not set
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table res1 res2 action flags
_FWMARK_ATTR = struct.pack("=HH", 8, FRA_FWMARK)  # the header of an FRA_FWMARK attribute: none, no mark


class RuleError(Exception):
    """The kernel refused a request (the message names it and the errno text)."""


class FwmarkRule(record("FwmarkRule", "priority mark mask table protocol", defaults=(RT_TABLE_MAIN, RTPROT_BOOT))):
    """`<priority>: from all fwmark <mark>/<mask> lookup <table>`; `protocol` says who made it (deleting
    with it set spares same-looking rules of others)."""

    __slots__ = ()

    @property
    def key(self) -> tuple[int, int, int, int]:
        """What the rule does, whoever made it."""
        return self.priority, self.mark, self.mask, self.table

    def __str__(self) -> str:
        table = "main" if self.table == RT_TABLE_MAIN else str(self.table)
        return f"{self.priority}: from all fwmark {self.mark:#x}/{self.mask:#x} lookup {table}"


def fwmark_rules() -> list[FwmarkRule]:
    """The IPv4 rules whose one selector is a fwmark and whose action is a table lookup."""
    found = []
    for kind, body in request(NETLINK_ROUTE, RTM_GETRULE, NLM_F_DUMP,
                              _FIB_RULE_HDR.pack(AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)):
        if kind != RTM_NEWRULE or len(body) < _FIB_RULE_HDR.size or _FWMARK_ATTR not in body:
            continue  # (a node has two rules per pod, none with a mark: not parsing them saves ~3 ms at 700)
        family, dst_len, src_len, tos, table, _, _, action, flags = _FIB_RULE_HDR.unpack_from(body)
        attrs = {key: value for key, value in attributes(body[_FIB_RULE_HDR.size:]).items()
                 if not (key in (FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN) and value == _UNSET)}
        if (family != AF_INET or dst_len or src_len or tos or action != FR_ACT_TO_TBL
                or flags & FIB_RULE_INVERT or FRA_FWMARK not in attrs or set(attrs) - _PLAIN):
            continue
        u32 = lambda key, default: struct.unpack_from("=I", attrs[key])[0] if key in attrs else default  # noqa: E731
        protocol = attrs[FRA_PROTOCOL][0] if attrs.get(FRA_PROTOCOL) else 0
        found.append(FwmarkRule(u32(FRA_PRIORITY, 0), u32(FRA_FWMARK, 0), u32(FRA_FWMASK, 0xFFFFFFFF),
                                u32(FRA_TABLE, table), protocol))
    return found


def add(rule: FwmarkRule) -> bool:
    """Add the rule; False if the very same rule was already there (it is never added twice)."""
    try:
        request(NETLINK_ROUTE, RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
                _rule_message(rule, rule.protocol))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise RuleError(f"cannot add ip rule '{rule}': {os.strerror(exc.errno)}") from None
    return True


def delete(rule: FwmarkRule) -> bool:
    """Delete the rule; False if it was not there.

    The kernel deletes the first rule matching every attribute given, and an attribute left out
    matches anything: `1024 fwmark 0x80/0x80 lookup main` would also match an earlier
    `1024 iif eth0 fwmark 0x80/0x80 lookup main`. Naming the rule's protocol (ours: boot) keeps such
    a rule of someone else's safe unless it also has that protocol."""
    try:
        request(NETLINK_ROUTE, RTM_DELRULE, NLM_F_ACK, _rule_message(rule, rule.protocol or None))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise RuleError(f"cannot delete ip rule '{rule}': {os.strerror(exc.errno)}") from None
    return True


# ---------------------------------------------------------------------------------------------


def _rule_message(rule: FwmarkRule, protocol: int | None) -> bytes:
    table = rule.table if rule.table < 256 else 0
    return (_FIB_RULE_HDR.pack(AF_INET, 0, 0, 0, table, 0, 0, FR_ACT_TO_TBL, 0)
            + attr(FRA_PRIORITY, struct.pack("=I", rule.priority))
            + attr(FRA_FWMARK, struct.pack("=I", rule.mark))
            + attr(FRA_FWMASK, struct.pack("=I", rule.mask))
            + attr(FRA_TABLE, struct.pack("=I", rule.table))
            + (attr(FRA_PROTOCOL, struct.pack("=B", protocol)) if protocol is not None else b""))
