"""Netfilter rules as desired state, converged on this network namespace's iptables (ARCHITECTURE §5).

A caller describes, per table, the chains it owns (their whole rule list), the chains it shares with
others, the rules it needs in chains it does not own, and what must be gone (`TableState`).
`Netfilter.converge` makes the table so in one transaction, touching nothing else; `check` reports
each difference (`Drift`) without changing anything; `remove` deletes chains and rules.

    nf = Netfilter(mode, lock_dir=data_dir)   # mode 'auto' | 'nft' | 'legacy' | 'iptc'
    nf.converge(TableState("nat",
        chains={"AWS-SNAT-CHAIN-0": ["-d 10.0.0.0/16 -j RETURN", "... -j SNAT --to-source 10.0.0.5"]},
        rules=[Rule("POSTROUTING", '-m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0')]))

Rules are compared as iptables-save prints them. Rules written that way cost one iptables-save when
nothing changed; others are translated once per call by iptables itself in a throwaway namespace.
Our read-plan-write cycles are serialised by a lock file, so concurrent plugin processes never add
a rule twice; iptables-restore -w keeps us consistent with other iptables users.

Importing this package loads only the model: detection, planning and the iptables backends (with re
and collections.Counter, ~4 ms per plugin exec) load when a Netfilter is made, which a
plugin's steady state (aws-snat's stamp holding, portmap-compat without host ports) never does.
"""

from __future__ import annotations

import os

from .model import Drift, NetfilterError, Rule, TableState, jump_target, quote, user_chains, validate

__all__ = ["MODES", "Drift", "Netfilter", "NetfilterError", "Rule", "TableState", "any_chain_exists", "quote"]

MODES = ("auto", "nft", "legacy", "iptc")


class Netfilter:
    """The iptables of the current network namespace, in one mode.

    mode:  'auto' detects the variant that holds the rules (as kube-proxy's iptables-wrapper does);
           'nft' / 'legacy' force one; 'iptc' writes through python-iptables and is refused unless
           the host is detected as legacy (rules iptc writes are invisible to iptables-nft).
    lock_dir:  the data dir: the lock file there serialises the read-plan-write cycles of aws-snat
           and portmap-compat.
    ipv6:  drive ip6tables instead of iptables.
    wait:  seconds to wait for the xtables lock and for our own lock.
    """

    def __init__(self, mode: str, *, lock_dir: str, ipv6: bool = False, wait: float = 30):
        if mode not in MODES:
            raise NetfilterError(f"unknown netfilter mode {mode!r}: use one of {', '.join(MODES)}")
        from .detect import detect_variant
        from .restore import RestoreBackend
        self.mode = mode
        self.variant = mode if mode in ("nft", "legacy") else detect_variant()
        if mode == "iptc" and self.variant != "legacy":
            raise NetfilterError(
                "netfilter mode 'iptc' refused: this host's iptables is nf_tables (its rules are in the "
                "nft variant), and rules written by python-iptables go to the legacy tables, invisible to "
                "iptables, kube-proxy and operators; use mode 'auto' or 'nft'")
        if mode == "iptc":
            from .iptc_backend import IptcBackend
            backend = IptcBackend
        else:
            backend = RestoreBackend
        self._backend = backend(self.variant, ipv6=ipv6, wait=wait, lock_dir=lock_dir)
        self._lock_path = os.path.join(lock_dir, "netfilter.lock")
        self._wait = wait

    @property
    def backend(self) -> str:
        """'nft', 'legacy' or 'iptc': what writes the rules."""
        return self._backend.name

    def converge(self, *states: TableState) -> list[Drift]:
        """Make each table match its state, one transaction per table; return what was fixed
        (empty when nothing had to change)."""
        fixed = []
        for state in _validated(states):
            fixed += self._reconcile(state, write=True)
        return fixed

    def check(self, *states: TableState) -> list[Drift]:
        """Every difference between the tables and the states; changes nothing."""
        found = []
        for state in _validated(states):
            found += self._reconcile(state, write=False)
        return found

    def remove(self, table: str, *, chains=(), rules=()) -> list[Drift]:
        """Delete `chains` (with every rule jumping to them) and every copy of `rules`, in one
        transaction; what is already gone is fine. Returns what was removed."""
        return self.converge(TableState(table, absent_chains=tuple(chains), absent_rules=tuple(rules)))

    def chains(self, table: str) -> dict[str, list[str]]:
        """The table's chains and their rules, as iptables-save prints them."""
        validate(TableState(table))
        return self._backend.save(table)

    def _reconcile(self, state: TableState, write: bool) -> list[Drift]:
        if not write:
            return self._plan_and_apply(state, write=False)
        from .lock import held
        with held(self._lock_path, self._wait), self._backend.locked():
            return self._plan_and_apply(state, write=True)

    def _plan_and_apply(self, state: TableState, write: bool) -> list[Drift]:
        from .plan import compare, needs_canon
        for attempt in (1, 2):
            actual = self._backend.save(state.table)
            drifts, ops = compare(state, actual, str)
            if needs_canon(state, actual, drifts):
                drifts, ops = compare(state, actual, self._canonical(state, actual))
            if not write or not ops:
                return drifts
            try:
                self._backend.apply(state.table, ops)
                return drifts
            except NetfilterError:
                if attempt == 2:
                    raise  # the first failure may be a race with another iptables user: plan again

    def _canonical(self, state: TableState, actual: dict[str, list[str]]):
        """A function from a caller's rule to iptables-save's wording of it."""
        from .plan import rules_to_word
        from .restore import RuleRefused
        wanted, absent = rules_to_word(state, actual)
        # The scratch namespace needs the user chains these rules are in or jump to, empty.
        needed = {chain for chain, _ in wanted + absent} | {jump_target(spec) for _, spec in wanted + absent}
        known = dict.fromkeys([*user_chains(state.table, actual), *state.chains, *state.shared_chains])
        declared = [chain for chain in known if chain in needed]
        while True:
            try:
                wording = self._backend.canonicalize(state.table, declared, wanted + absent)
                break
            except RuleRefused as exc:
                target = jump_target((wanted + absent)[exc.index][1])
                # An absent rule refused because it jumps to a chain that does not exist cannot be present.
                if exc.index < len(wanted) or not target or target in actual or target not in exc.output:
                    raise
                del absent[exc.index - len(wanted)]
        mapping = {spec: canonical for (_, spec), canonical in zip(wanted + absent, wording)}
        return lambda spec: mapping.get(spec, spec)


def any_chain_exists(mode: str, table: str, chains, *, ipv6=(False, True)) -> bool:
    """Whether one of `chains` exists in `table`, IPv4 and/or IPv6, in the variant `mode` drives
    ('auto': in either variant, so no detection is needed). Costs a few netlink requests and
    getsockopt calls, no exec. True also when it cannot be told: the caller then looks properly."""
    from .. import nftables
    from . import xtables
    if mode not in MODES:
        return True  # the caller's Netfilter says what is wrong
    try:
        if mode in ("auto", "nft"):
            with nftables.open_nfnetlink() as sock:
                for v6 in ipv6:
                    family = nftables.NFPROTO_IPV6 if v6 else nftables.NFPROTO_IPV4
                    if any(nftables.chain_exists(family, table, chain, sock) for chain in chains):
                        return True
        if mode in ("auto", "legacy", "iptc"):
            for v6 in ipv6:
                present = set(xtables.user_chains(table, v6))
                if present.intersection(chains):
                    return True
    except OSError:
        return True
    return False


def _validated(states) -> list[TableState]:
    tables = set()
    for state in states:
        if not isinstance(state, TableState):
            raise NetfilterError(f"expected a TableState, got {state!r}")
        validate(state)
        if state.table in tables:
            raise NetfilterError(f"table {state.table} is given twice; give one state per table and call")
        tables.add(state.table)
    return list(states)
