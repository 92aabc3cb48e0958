"""Two questions to nf_tables over raw nfnetlink, with the standard library only: the ruleset
generation of this network namespace, and whether a chain exists.

    genid()                                      -> int, bumped by every nf_tables transaction here
    chain_exists(NFPROTO_IPV4, "nat", "CNI-DN-x") -> bool

Why: `iptables-nft-save` costs 5-50 ms per run (an exec, and the whole table); these cost
~0.05 ms each. iptables-nft keeps its rules in nf_tables tables named like the iptables tables
("nat", "mangle") of family ip / ip6, so a chain `iptables-nft -t nat -N X` made is the nf_tables
chain X of table ip nat.

The generation (NFT_MSG_GETGEN, answered with NFT_MSG_NEWGEN carrying NFTA_GEN_ID, a big-endian u32)
is the kernel's per-namespace `base_seq`: 1 in a new namespace, incremented by each committed
nf_tables batch (every iptables-nft, ip6tables-nft, iptables-nft-restore or nft change, in any
family or table), never by a read or by a batch that fails. iptables-legacy changes do not touch it.
It is per network namespace and restarts with it (and on boot): compare it only with a value read
in the same namespace (`netns_id`).
"""

from __future__ import annotations

import os
import struct
from _socket import AF_INET, SOL_SOCKET

from cnicore import hashes  # each digest loads when first used (a shared library each)
from cnicore.rawnetlink import NLM_F_ACK, NLM_F_DUMP, Socket, attr, attributes, control_socket, open_socket, transact

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN = 4, 3
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
# Rule attributes that say where a rule sits or how it was made, not what it does.
_RULE_PLACE = {3, 6, 8, 9, 10}  # HANDLE, POSITION, ID, POSITION_ID, CHAIN_ID
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_MATCH_NAME, NFTA_MATCH_INFO = 1, 3
NFTNL_UDATA_RULE_COMMENT = 0  # a comment kept in the rule's user data (nft's own `comment`)
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFPROTO_UNSPEC, NFPROTO_IPV4, NFPROTO_IPV6 = 0, 2, 10
SO_NETNS_COOKIE = 71  # Linux 5.14+

_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id


class NftError(OSError):
    """nf_tables did not answer as expected (not available, no permission, a malformed answer)."""


def genid() -> int:
    """The nf_tables ruleset generation of this network namespace."""
    try:
        with open_socket(NETLINK_NETFILTER) as sock:
            answers = transact(sock, _kind(NFT_MSG_GETGEN), 0, _NFGEN.pack(NFPROTO_UNSPEC, 0, 0))
    except OSError as exc:
        raise NftError(exc.errno, f"cannot read the nf_tables generation: {exc.strerror or exc}") from None
    for kind, body in answers:
        if kind == _kind(NFT_MSG_NEWGEN):
            value = attributes(body[_NFGEN.size:]).get(NFTA_GEN_ID)
            if value is not None and len(value) == 4:
                return struct.unpack("!I", value)[0]
    raise NftError("nf_tables answered GETGEN without a generation id")


def chain_exists(family: int, table: str, chain: str, sock: Socket | None = None) -> bool:
    """Whether nf_tables table `table` of `family` (NFPROTO_IPV4/IPV6) has chain `chain`.
    A missing table is a missing chain. Raises NftError on any other failure."""
    payload = (_NFGEN.pack(family, 0, 0) + attr(NFTA_CHAIN_TABLE, table.encode() + b"\0")
               + attr(NFTA_CHAIN_NAME, chain.encode() + b"\0"))
    try:
        if sock is not None:
            answers = transact(sock, _kind(NFT_MSG_GETCHAIN), NLM_F_ACK, payload, _next_seq())
        else:
            with open_socket(NETLINK_NETFILTER) as own:
                answers = transact(own, _kind(NFT_MSG_GETCHAIN), NLM_F_ACK, payload)
    except FileNotFoundError:  # ENOENT: no such table or chain
        return False
    except OSError as exc:
        raise NftError(exc.errno, f"cannot look up nf_tables chain {table}/{chain}: {exc.strerror or exc}") from None
    return any(kind == _kind(NFT_MSG_NEWCHAIN) for kind, _ in answers)


def chains_digest(family: int, table: str, chains, sock: Socket | None = None, *, shared=(),
                  comments=frozenset()) -> str:
    """A digest of what `chains` of nf_tables table `table` hold: whether each exists, and its rules
    in order, without their handles and positions and without counter values (they move with
    traffic). Equal digests, the same rules in these chains. Other chains and tables do not count.
    (A rule whose expressions keep other state that moves, e.g. quota or last, makes every digest
    differ: never a false "unchanged".)

    In the chains of `shared` (built-in chains other programs write to as well: the reference
    bridge adds a rule to nat POSTROUTING per pod), a rule whose comment can be read and is not one
    of `comments` is left out: a caller whose rules all carry one of `comments` sees its own rules,
    in order, and rules without a readable comment; another program's commented rules coming and
    going do not move the digest."""
    digest = hashes.blake2b(digest_size=16)
    own = sock is None
    sock = open_nfnetlink() if own else sock
    try:
        for chain in chains:
            if not chain_exists(family, table, chain, sock):
                digest.update(f"-{table}/{chain}\n".encode())
                continue
            digest.update(f"+{table}/{chain}\n".encode())
            payload = (_NFGEN.pack(family, 0, 0) + attr(NFTA_RULE_TABLE, table.encode() + b"\0")
                       + attr(NFTA_RULE_CHAIN, chain.encode() + b"\0"))
            try:
                answers = transact(sock, _kind(NFT_MSG_GETRULE), NLM_F_DUMP, payload, _next_seq())
            except OSError as exc:
                raise NftError(exc.errno, f"cannot list nf_tables chain {table}/{chain}: {exc.strerror or exc}") from None
            for kind, body in answers:
                if kind != _kind(NFT_MSG_NEWRULE):
                    continue
                rule = _attribute_list(body[_NFGEN.size:])
                if chain in shared:
                    found = _comments(rule)
                    if found and not found & comments:
                        continue  # another program's rule
                for key, value in rule:
                    if key in _RULE_PLACE:
                        continue
                    if key == NFTA_RULE_EXPRESSIONS:
                        value = _without_counter_values(value)
                    digest.update(struct.pack("=HI", key, len(value)) + value)
                digest.update(b"\n")
    finally:
        if own:
            sock.close()
    return digest.hexdigest()


def _attribute_list(data) -> list[tuple[int, bytes]]:
    """Attributes in order (a rule's expression list repeats NFTA_LIST_ELEM)."""
    found, offset = [], 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found.append((kind & 0x3FFF, bytes(data[offset + 4:offset + length])))
        offset += (length + 3) & ~3
    return found


def _comments(rule: list[tuple[int, bytes]]) -> set[str]:
    """The comments of a rule (its attributes): iptables-nft's `-m comment` (an xt match whose info
    is the comment, NUL-padded) and nft's user-data comment. Empty when none can be read."""
    found = set()
    for key, value in rule:
        if key == NFTA_RULE_EXPRESSIONS:
            for elem_key, element in _attribute_list(value):
                expression = dict(_attribute_list(element)) if elem_key == NFTA_LIST_ELEM else {}
                if expression.get(NFTA_EXPR_NAME) == b"match\0":
                    match = dict(_attribute_list(expression.get(NFTA_EXPR_DATA, b"")))
                    if match.get(NFTA_MATCH_NAME) == b"comment\0" and NFTA_MATCH_INFO in match:
                        found.add(match[NFTA_MATCH_INFO].split(b"\0", 1)[0].decode(errors="replace"))
        elif key == NFTA_RULE_USERDATA:
            offset = 0
            while offset + 2 <= len(value):
                kind, length = value[offset], value[offset + 1]
                if kind == NFTNL_UDATA_RULE_COMMENT:
                    found.add(value[offset + 2:offset + 2 + length].split(b"\0", 1)[0].decode(errors="replace"))
                offset += 2 + length
    return found


def _without_counter_values(expressions: bytes) -> bytes:
    out = []
    for key, element in _attribute_list(expressions):
        if key == NFTA_LIST_ELEM and dict(_attribute_list(element)).get(NFTA_EXPR_NAME) == b"counter\0":
            element = attr(NFTA_EXPR_NAME, b"counter\0")  # the expression stays, its packet and byte counts go
        out.append(attr(key, element))
    return b"".join(out)


def open_nfnetlink() -> Socket:
    """A NETLINK_NETFILTER socket to pass to several `chain_exists` calls."""
    try:
        return open_socket(NETLINK_NETFILTER)
    except OSError as exc:
        raise NftError(exc.errno, f"cannot open a netfilter netlink socket: {exc.strerror or exc}") from None


def netns_id() -> str:
    """This network namespace's identity for the life of this boot: its cookie (never reused while
    the system runs; Linux 5.14+), else its nsfs inode (can be reused once the namespace is gone),
    prefixed with the boot id (the root namespace's inode and cookie are the same on every boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        with control_socket(AF_INET) as sock:
            cookie = struct.unpack("=Q", sock.getsockopt(SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        return f"{boot}/cookie:{cookie}"
    except OSError:
        return f"{boot}/inode:{os.stat('/proc/self/ns/net').st_ino}"


_seq = [1]


def _next_seq() -> int:
    _seq[0] += 1
    return _seq[0]


def _kind(msg: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | msg
