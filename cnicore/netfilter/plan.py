"""Desired versus actual: what differs (drifts) and the iptables-restore lines that fix it (ops).

`compare` is pure. It takes a `canon` function mapping a caller's rule to iptables-save's wording of
it; the caller first tries the rules as written (steady state, when they are already canonical, costs
nothing more) and, when that finds differences, asks iptables itself for the canonical wording.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ..record import record
from .model import Drift, TableState, jump_target

# Order of the lines in one transaction: declare chains, unlink and drop chains, then add rules.
_PHASE = {":": 0, "-N": 0, "-D": 1, "-F": 2, "-X": 3, "-A": 4, "-I": 4}


class Op(record("Op", "verb chain spec", defaults=("",))):
    """One iptables-restore line: ':' (create or flush a user chain), -N, -A, -I (at the top), -D, -F, -X."""

    __slots__ = ()

    def line(self) -> str:
        if self.verb == ":":
            return f":{self.chain} - [0:0]"
        if self.verb == "-I":
            return f"-I {self.chain} 1 {self.spec}"
        return f"{self.verb} {self.chain} {self.spec}".rstrip()


def compare(state: TableState, actual: dict[str, list[str]],
            canon: Callable[[str], str]) -> tuple[list[Drift], list[Op]]:
    """The drifts of `actual` ({chain: [spec]}) from `state`, and the ops that remove them."""
    drifts: list[Drift] = []
    ops: list[Op] = []

    def drift(chain: str, problem: str, spec: str = "") -> None:
        drifts.append(Drift(state.table, chain, problem, spec))

    for chain, specs in state.chains.items():
        want = [canon(s) for s in specs]
        have = actual.get(chain)
        if have == want:
            continue
        if have is None:
            drift(chain, "chain missing")
        else:
            for spec in (Counter(want) - Counter(have)).elements():
                drift(chain, "rule missing", spec)
            for spec in (Counter(have) - Counter(want)).elements():
                drift(chain, "unexpected rule", spec)
            if Counter(have) == Counter(want):
                drift(chain, "rules out of order")
        ops.append(Op(":", chain))
        ops.extend(Op("-A", chain, spec) for spec in want)

    for chain in state.shared_chains:
        if chain not in actual:
            drift(chain, "chain missing")
            ops.append(Op("-N", chain))

    doomed = [chain for chain in state.absent_chains if chain in actual]
    for chain in doomed:
        drift(chain, "chain present")
        for other, specs in actual.items():
            if other not in doomed and other not in state.chains:
                ops.extend(Op("-D", other, spec) for spec in specs if jump_target(spec) == chain)
        ops += [Op("-F", chain), Op("-X", chain)]

    for rule in state.absent_rules:
        if rule.chain in doomed:
            continue
        spec = canon(rule.spec)
        copies = actual.get(rule.chain, []).count(spec)
        if copies:
            drift(rule.chain, "rule present", spec)
            ops.extend([Op("-D", rule.chain, spec)] * copies)

    inserts, appends = [], []
    for rule in state.rules:
        spec = canon(rule.spec)
        copies = actual.get(rule.chain, []).count(spec)
        if copies == 0:
            drift(rule.chain, "rule missing", spec)
            (inserts if rule.first else appends).append(Op("-I" if rule.first else "-A", rule.chain, spec))
        elif copies > 1:
            drift(rule.chain, "duplicate rule", spec)
            ops.extend([Op("-D", rule.chain, spec)] * (copies - 1))
    ops += reversed(inserts)  # each goes to the top, so the last inserted ends up first
    ops += appends
    return drifts, sorted(ops, key=lambda op: _PHASE[op.verb])


def script(table: str, ops: list[Op]) -> str:
    """An iptables-restore --noflush input applying `ops` to `table` in one transaction."""
    return "\n".join([f"*{table}", *(op.line() for op in ops), "COMMIT", ""])


def rules_to_word(state: TableState, actual: dict[str, list[str]]) -> tuple[list, list]:
    """(chain, spec) of the caller's rules whose canonical wording the comparison needs: the wanted
    ones, and the absent ones that could be present (their chain exists)."""
    wanted = [(chain, spec) for chain, specs in state.chains.items() for spec in specs]
    wanted += [(rule.chain, rule.spec) for rule in state.rules]
    return wanted, [(rule.chain, rule.spec) for rule in _absent_rules_in_reach(state, actual)]


def needs_canon(state: TableState, actual: dict[str, list[str]], drifts: list[Drift]) -> bool:
    """Whether a comparison of the rules as written cannot be trusted: it found a difference, or an
    absent rule might hide in an existing chain under another wording."""
    return bool(drifts) or bool(_absent_rules_in_reach(state, actual))


def _absent_rules_in_reach(state: TableState, actual: dict[str, list[str]]) -> list:
    return [rule for rule in state.absent_rules if rule.chain in actual and rule.chain not in state.absent_chains]
