"""The legacy (x_tables) tables of this network namespace, read as iptables-legacy-save reads them
(getsockopt IPT_SO_GET_INFO / IPT_SO_GET_ENTRIES), without an exec and without printing them.

    table_names(ipv6)             -> the tables that exist (/proc/net/ip{,6}_tables_names)
    user_chains(table, ipv6)      -> the user chains of one table
    fingerprint(tables, ipv6)     -> a digest of the tables' rules, counters left out

Why: `iptables-legacy-save` costs an exec and text formatting per call; aws-snat only needs to know
whether anything changed since it last looked, and portmap-compat whether a chain exists. Only
tables that already exist are read: asking for a missing table would make the kernel create it
(which is also why iptables-legacy-save without -t reads /proc/net/ip_tables_names first).

The entries come as the kernel keeps them: struct ipt_entry / ip6t_entry, each followed by its
matches and target, linked by next_offset. Per entry the kernel adds the packet and byte counters
(they change with traffic) and `comefrom` (derived from the rules); both are zeroed before hashing.
Match and target data are copied up to the extension's user size, the rest zeroed, so kernel
pointers and private state never reach the digest. A user chain starts with an ERROR target whose
data is the chain's name.
"""

from __future__ import annotations

import errno
import os
import struct
from _socket import AF_INET, AF_INET6

from .. import hashes  # each digest loads when first used (a shared library each)
from ..libc import ctypes_lite
from ..rawnetlink import Socket, control_socket

SOL_IP, SOL_IPV6 = 0, 41
SO_GET_INFO, SO_GET_ENTRIES = 64, 65  # IPT_SO_GET_* and IP6T_SO_GET_* (both bases are 64)
TABLE_MAXNAMELEN = 32
_INFO = struct.Struct("=32sI5I5III")   # name, valid_hooks, hook_entry[5], underflow[5], num_entries, size
_ENTRIES_HEADER = 40                   # struct ipt_get_entries: name[32], size, padding to 8
# (offset of target_offset/next_offset, offset of comefrom + counters, their length) per family
_ENTRY = {False: (88, 92, 20), True: (140, 144, 24)}
_TARGET_HEADER = 32                    # struct xt_entry_target: u16 size, name[29], u8 revision
_NAMES = {False: "/proc/net/ip_tables_names", True: "/proc/net/ip6_tables_names"}

class XtablesError(OSError):
    """The kernel refused to show a legacy table."""


def table_names(ipv6: bool = False) -> list[str]:
    """The legacy tables that exist in this network namespace (none when ip_tables is not loaded)."""
    try:
        with open(_NAMES[ipv6]) as f:
            return sorted(line.strip() for line in f if line.strip())
    except FileNotFoundError:
        return []


def entries(table: str, ipv6: bool = False) -> memoryview:
    """The raw entries of an existing legacy table. Raises XtablesError (ENOENT: no such table)."""
    family, level = (AF_INET6, SOL_IPV6) if ipv6 else (AF_INET, SOL_IP)
    name = table.encode()
    if len(name) >= TABLE_MAXNAMELEN:
        raise XtablesError(errno.EINVAL, f"bad table name {table!r}")
    with control_socket(family) as sock:
        for _ in range(10):  # the table can change between the two calls: the kernel says EAGAIN
            info = _getsockopt(sock, level, SO_GET_INFO, name.ljust(_INFO.size, b"\0"))
            size = _INFO.unpack(info)[-1]
            try:
                data = _getsockopt(sock, level, SO_GET_ENTRIES,
                                   struct.pack("=32sI", name, size).ljust(_ENTRIES_HEADER + size, b"\0"))
            except XtablesError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                raise
            return memoryview(data)[_ENTRIES_HEADER:]
    raise XtablesError(errno.EAGAIN, f"legacy table {table} kept changing while being read")


def fingerprint(tables=None, ipv6: bool = False) -> str:
    """A digest of the rules of the given legacy tables (default: all that exist), counters left
    out; a table given but missing counts as absent. Equal digests, equal rules."""
    present = table_names(ipv6)
    digest = hashes.blake2b(digest_size=16)
    for table in sorted(present if tables is None else tables):
        if table not in present:
            digest.update(f"-{table}\n".encode())
            continue
        try:
            data = entries(table, ipv6)
        except XtablesError as exc:
            if exc.errno != errno.ENOENT:
                raise
            digest.update(f"-{table}\n".encode())
            continue
        digest.update(f"+{table} {len(data)}\n".encode())
        digest.update(_without_counters(data, ipv6))
    return digest.hexdigest()


def user_chains(table: str, ipv6: bool = False) -> list[str]:
    """The user chains of an existing legacy table, in order ([] when the table does not exist)."""
    if table not in table_names(ipv6):
        return []
    try:
        data = entries(table, ipv6)
    except XtablesError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
    found = []
    offsets, _, _ = _ENTRY[ipv6]
    for start, end in _walk(data, ipv6):
        target_offset = struct.unpack_from("=H", data, start + offsets)[0]
        target = start + target_offset
        if data[target + 2:target + 8] == b"ERROR\0":  # (memoryview == bytes compares the contents)
            chain = bytes(data[target + _TARGET_HEADER:end]).split(b"\0", 1)[0].decode(errors="replace")
            if chain != "ERROR":  # the table's last entry
                found.append(chain)
    return found


def _walk(data: bytes, ipv6: bool):
    offsets, _, _ = _ENTRY[ipv6]
    start = 0
    while start + offsets + 4 <= len(data):
        next_offset = struct.unpack_from("=H", data, start + offsets + 2)[0]
        if next_offset == 0:
            raise XtablesError(errno.EINVAL, "malformed legacy table entry")
        yield start, start + next_offset
        start += next_offset


def _without_counters(data: bytes, ipv6: bool) -> bytes:
    _, skip, length = _ENTRY[ipv6]
    zero = bytes(length)
    parts = []
    for start, end in _walk(data, ipv6):
        parts += (data[start:start + skip], zero, data[start + skip + length:end])
    return b"".join(parts)


def _getsockopt(sock: Socket, level: int, option: int, buffer: bytes) -> bytearray:
    """getsockopt with an input buffer (a socket's getsockopt cannot pass one)."""
    c = ctypes_lite()
    data = bytearray(buffer)  # filled in place: a table can be megabytes, copy it once
    size = c.c_uint32(len(data))
    if c.function("getsockopt")(sock.fileno(), level, option, c.char_array(len(data)).from_buffer(data), c.byref(size)) != 0:
        code = c.get_errno()
        raise XtablesError(code, f"cannot read a legacy iptables table: {os.strerror(code)}")
    del data[size.value:]
    return data
