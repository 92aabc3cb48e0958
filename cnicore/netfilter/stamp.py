"""Skip re-verifying node-wide rules that cannot have changed since they were last verified.

A plugin that converges the same node-wide rules on every pod ADD (aws-snat) can instead ask:
"is the ruleset exactly as it was when I last found my rules all in place?" `fingerprint(mode)`
answers with a value that changes whenever anything the verification (and, in 'auto', the variant
detection) read could have changed:

    nft     a digest of the nf_tables chains the verification reads (cnicore.nftables.chains_digest:
            whether each exists, its rules in order, counters left out): rules elsewhere (kube-proxy
            rewrites its chains all the time) do not move it; in the built-in chains the caller
            shares with others (`shared`), only its own rules count (those with one of `comments`,
            and any whose comment cannot be read): the verification judges no other rule there,
            and the reference bridge adds and removes one in nat POSTROUTING per pod
    legacy  a digest of the legacy tables those chains are in (counters left out): x_tables can
            only be read a table at a time
    auto    (and iptc) which step of the variant detection decides, and what it rests on: with
            kubelet's hint in nf_tables, or no legacy table at all, the nft chains' digest; with the
            hint in legacy mangle, the legacy tables' digest (mangle included, IPv4 and IPv6); else
            (the rules are counted) the nf_tables generation (cnicore.nftables.genid, bumped by
            every nf_tables transaction) and a digest of every legacy table

A `Stamp` file in the data dir records "rules described by KEY were verified in place at
fingerprint F, in network namespace N". It is written only when a verification found nothing to
change and the fingerprint read before it equals the one read after it (nothing changed meanwhile),
and it is trusted only for the same key (the desired rules, settings and mode), the same namespace
(cookie and boot id: a generation restarts with the namespace) and the same fingerprint. Any
change (a rule deleted by hand, another iptables user, a new setting) gives another fingerprint or
key, and the next caller verifies in full. A stamp that is missing, unreadable, corrupt or foreign
counts as absent; failing to write one only costs the next caller a full verification.

Limits: a digest is of content: a change and its exact undoing between the two fingerprint reads
of one verification (a few ms) would go unnoticed for that verification; anything later is seen.
The nf_tables generation only grows (a u32: 4 billion transactions to come back). Without SO_NETNS_COOKIE (kernels before 5.14) the namespace is told by its inode, which a
namespace made after this one was deleted can reuse; the root namespace, where plugins run on a
node, lives as long as the boot.
"""

from __future__ import annotations

import os

from .. import nftables
from ..fsutil import make_dirs, write_atomic
from .. import hashes  # each digest loads when first used (a shared library each)
from . import xtables

FORMAT = "netfilter-stamp-v1"


def fingerprint(mode: str, chains, shared=None, comments=frozenset()) -> str | None:
    """What verifying the rules of `chains` ({table: [chain, ...]}, IPv4) in `mode` depends on, now;
    None when it cannot be read (then nothing may be skipped). `shared` ({table: [chain, ...]}, among
    `chains`) and `comments`: see the module's docstring (nft only: legacy tables are read whole)."""
    nft = (chains, shared or {}, frozenset(comments))
    try:
        if mode == "nft":
            return f"nft {_nft_chains(*nft)}"
        if mode == "legacy":
            return f"legacy {xtables.fingerprint(sorted(chains), ipv6=False)}"
        return _detected(mode, nft)
    except OSError:
        return None


def _nft_chains(chains, shared, comments) -> str:
    with nftables.open_nfnetlink() as sock:
        return " ".join(nftables.chains_digest(nftables.NFPROTO_IPV4, table, names, sock,
                                               shared=shared.get(table, ()), comments=comments)
                        for table, names in sorted(chains.items()))


def _detected(mode: str, nft) -> str:
    """'auto' (and 'iptc'): what the detection's answer rests on, plus the rules in the variant it
    picks. Which of the detection's steps decides is part of the value, and each step reads only
    what decides it, so that a legacy node with kubelet's hint does not digest its whole filter
    table, and an nft node's fingerprint does not move with rules elsewhere (kube-proxy's)."""
    from .detect import KUBELET_CHAINS, nft_hint
    chains = nft[0]
    if nft_hint():  # nft, whatever else either variant holds
        return f"{mode} nft-hint {_nft_chains(*nft)}"
    names = {ipv6: xtables.table_names(ipv6) for ipv6 in (False, True)}
    if not any(names.values()):  # nft: legacy holds no rule at all
        return f"{mode} no-legacy {_nft_chains(*nft)}"
    if any(chain in KUBELET_CHAINS for ipv6 in (False, True) if "mangle" in names[ipv6]
           for chain in xtables.user_chains("mangle", ipv6)):  # legacy; the hint is in a mangle table
        return (f"{mode} legacy-hint {xtables.fingerprint(sorted({*chains, 'mangle'}), ipv6=False)} "
                f"{xtables.fingerprint(['mangle'], ipv6=True)}")
    # the rules of both variants are counted: any nf_tables change may matter
    try:
        generation = str(nftables.genid())
    except OSError:
        generation = "-"  # no nf_tables here: nothing in it to count or change
    return f"{mode} counted {generation} {xtables.fingerprint(None, ipv6=False)} {xtables.fingerprint(None, ipv6=True)}"


class Stamp:
    def __init__(self, path: str, mode: str, key: str, chains, shared=None, comments=frozenset()):
        """`chains`: {table: [chain, ...]}, every chain the verification reads (IPv4); `shared`
        ({table: [chain, ...]}) the built-in ones among them where only rules with one of `comments`
        (or without a readable comment) are judged (see the module's docstring)."""
        self.path = path
        self.mode = mode
        self.chains = {table: tuple(names) for table, names in chains.items()}
        self.shared = {table: tuple(names) for table, names in (shared or {}).items()}
        self.comments = frozenset(comments)
        self.key = hashes.sha256(f"{FORMAT}\n{mode}\n{nftables.netns_id()}\n{key}".encode()).hexdigest()

    def fingerprint(self) -> str | None:
        return fingerprint(self.mode, self.chains, self.shared, self.comments)

    def holds(self, current: str | None) -> bool:
        """Whether the stamp says our rules were verified at exactly this fingerprint."""
        if current is None:
            return False
        try:
            with open(self.path, "rb") as f:
                recorded = f.read(4096)
        except (OSError, ValueError):
            return False
        return recorded == self._content(current)

    def record(self, current: str | None) -> bool:
        """Write the stamp (atomically); False when it could not be written."""
        if current is None:
            return False
        try:
            make_dirs(os.path.dirname(self.path))
            write_atomic(self.path, self._content(current))
            return True
        except OSError:
            return False

    def forget(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _content(self, current: str) -> bytes:
        return f"{FORMAT} {self.key} {current}\n".encode()
