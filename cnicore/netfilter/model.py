"""The text model: desired state, differences, and rules in iptables-save's own words.

A rule is its `spec`, the part of an `iptables-save` line after `-A <chain> `. Rules are compared in
the canonical form iptables-save prints (`RestoreBackend.canonicalize` learns it from iptables).
"""

from __future__ import annotations

from ..errors import NETFILTER_FAILURE, CNIError
from ..record import record

BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
VERDICTS = ("ACCEPT", "DROP", "RETURN", "QUEUE")
CHAIN_MAX = 28  # XT_EXTENSION_MAXNAMELEN - 1
# Checked by hand, not with `re`: importing it (with enum and functools) is ~3 ms of every plugin exec.
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_CHAIN_CHARS = _ALNUM | frozenset("_.:+-")
_BARE_VALUE_CHARS = _ALNUM | frozenset("_-")
_ADDRESS_OPTIONS = ("-s", "--source", "-d", "--destination")
_JUMP_OPTIONS = ("-j", "--jump", "-g", "--goto")


class NetfilterError(CNIError):
    """iptables refused or failed; the message names the table, the rule and iptables' own words."""

    def __init__(self, msg: str, *, table: str = "", rule: str = "", output: str = ""):
        super().__init__(NETFILTER_FAILURE, msg)
        self.table = table
        self.rule = rule
        self.output = output


# (cnicore.record, not typing.NamedTuple or collections.namedtuple: each costs 2.5-3 ms per plugin exec)
Rule = record("Rule", "chain spec first", defaults=(False,))
Rule.__doc__ = """A rule we need in (or must keep out of) a chain we do not own; `first`: when missing,
insert it at the top of the chain instead of appending."""


TableState = record("TableState", "table chains shared_chains rules absent_chains absent_rules",
                    defaults=({}, (), (), (), ()))
TableState.__doc__ = """What one table must look like, as far as we are concerned; everything else is left alone.

    chains:         {chain: [spec]}, chains we own: created if missing, their rules replaced to be exactly these.
    shared_chains:  chains that must exist but whose rules are not all ours (created empty if missing).
    rules:          Rules that must be present exactly once in chains we do not own.
    absent_chains:  chains that must not exist (deleted with every rule that jumps to them).
    absent_rules:   Rules that must not be present (every copy is deleted).
    """


class Drift(record("Drift", "table chain problem spec", defaults=("",))):
    """One way the actual table differs from the desired state; `problem` e.g. "chain missing", "rule
    missing", "unexpected rule", "duplicate rule", "rule present"."""

    __slots__ = ()

    def __str__(self) -> str:
        where = f"{self.table}/{self.chain}: {self.problem}"
        return f"{where}: {self.spec}" if self.spec else where


def is_chain_name(name) -> bool:
    """A user chain name we write: 1 to 28 letters, digits or _.:+-, starting with a letter or digit."""
    return (isinstance(name, str) and 0 < len(name) <= CHAIN_MAX and name[0] in _ALNUM
            and all(c in _CHAIN_CHARS for c in name))


def quote(value: str) -> str:
    """`value` as iptables-save prints an option value (xtables_save_string), e.g. a comment."""
    if value and all(c in _BARE_VALUE_CHARS for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'") + '"'


def split_spec(spec: str) -> list[str]:
    """Split a rule as iptables-restore does: whitespace separates, double quotes group, and inside
    quotes a backslash escapes the next character. Raises ValueError on an unterminated quote."""
    words, word, quoted, escaped = [], [], False, False
    for ch in spec:
        if quoted:
            if escaped:
                word.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                word.append(ch)
        elif ch == '"':
            quoted = True
        elif ch in " \t":
            if word:
                words.append("".join(word))
            word = []
        else:
            word.append(ch)
    if quoted:
        raise ValueError("unterminated double quote")
    if word:
        words.append("".join(word))
    return words


def jump_target(spec: str) -> str | None:
    """The chain or target a rule jumps to (-j/-g), if any."""
    words = split_spec(spec)
    for option, value in zip(words, words[1:]):
        if option in _JUMP_OPTIONS:
            return value
    return None


def parse_save(text: str) -> dict[str, dict[str, list[str]]]:
    """iptables-save output as {table: {chain: [spec, ...]}}, chains in the order printed."""
    tables: dict[str, dict[str, list[str]]] = {}
    chains: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("# Table") and "incompatible" in line:
            raise NetfilterError(f"iptables cannot read this table: {line[2:]}", output=text,
                                 table=line.split("`", 1)[-1].split("'", 1)[0])
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif chains is not None and line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif chains is not None and line.startswith("-A "):
            _, chain, *spec = line.split(" ", 2)
            chains.setdefault(chain, []).append(spec[0] if spec else "")
        else:
            raise NetfilterError(f"unexpected line in iptables-save output: {line!r}", output=text)
    return tables


def validate(state: TableState) -> None:
    """Raise NetfilterError unless `state` is well-formed and consistent with itself."""
    table = state.table
    if table not in BUILTIN_CHAINS:
        raise NetfilterError(f"unknown table {table!r}: use one of {', '.join(BUILTIN_CHAINS)}")
    _check_chain_names(state)
    absent = set(state.absent_chains)
    for chain, specs in state.chains.items():
        if isinstance(specs, str):
            raise NetfilterError(f"{table}/{chain}: the rules must be a list of specs, not one string", table=table)
        for spec in specs:
            _check_spec(table, chain, spec, absent)
    _check_rules(state, "rule", state.rules, absent)
    _check_rules(state, "absent rule", state.absent_rules, set())
    both = {(r.chain, r.spec) for r in state.rules} & {(r.chain, r.spec) for r in state.absent_rules}
    if both:
        chain, spec = sorted(both)[0]
        raise NetfilterError(f"{table}/{chain}: {spec!r} is listed as wanted and as absent", table=table)


def _check_chain_names(state: TableState) -> None:
    table, builtin = state.table, BUILTIN_CHAINS[state.table]
    named = {}
    for role, names in (("owned chain", state.chains), ("shared chain", state.shared_chains),
                        ("absent chain", state.absent_chains)):
        for name in names:
            if not is_chain_name(name):
                raise NetfilterError(f"{table}: invalid {role} name {name!r}: 1 to 28 letters, digits or _.:+-, "
                                     "starting with a letter or digit", table=table)
            if name in builtin or name in VERDICTS:
                raise NetfilterError(f"{table}: {name} is built in and cannot be one of our {role}s", table=table)
            if name in named:
                raise NetfilterError(f"{table}: chain {name} is listed as {named[name]} and as {role}", table=table)
            named[name] = role


def _check_rules(state: TableState, role: str, rules, absent_chains: set[str]) -> None:
    table, seen = state.table, set()
    for rule in rules:
        if not isinstance(rule, Rule):
            raise NetfilterError(f"{table}: {role} {rule!r} is not a Rule(chain, spec)", table=table)
        if not isinstance(rule.chain, str) or not (rule.chain in BUILTIN_CHAINS[table] or is_chain_name(rule.chain)):
            raise NetfilterError(f"{table}: invalid chain {rule.chain!r} for {role} {rule.spec!r}", table=table)
        if rule.chain in state.chains:
            raise NetfilterError(f"{table}/{rule.chain}: chain is owned, so {rule.spec!r} belongs in its rule "
                                 f"list, not in {role}s", table=table)
        if rule.chain in absent_chains:
            raise NetfilterError(f"{table}/{rule.chain}: chain is listed as absent, so it cannot hold "
                                 f"{rule.spec!r}", table=table)
        _check_spec(table, rule.chain, rule.spec, absent_chains)
        if (rule.chain, rule.spec) in seen:
            raise NetfilterError(f"{table}/{rule.chain}: {role} {rule.spec!r} is listed twice", table=table)
        seen.add((rule.chain, rule.spec))


def _check_spec(table: str, chain: str, spec: str, absent_chains: set[str]) -> None:
    def bad(why: str) -> NetfilterError:
        return NetfilterError(f"{table}/{chain}: invalid rule {spec!r}: {why}", table=table, rule=str(spec))

    if not isinstance(spec, str) or not spec.strip():
        raise bad("a rule must be a non-empty string")
    if any(ch in spec for ch in "\n\r\0"):
        raise bad("a rule must be one line")
    try:
        words = split_spec(spec)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if words[0] in ("-A", "--append", "-I", "--insert", "-D", "--delete", "-t", "--table"):
        raise bad(f"give only the rule, without {words[0]} or a chain name")
    for option, value in zip(words, words[1:]):
        if option in _ADDRESS_OPTIONS and "," in value:
            raise bad(f"{option} {value} would expand to several rules; give one address per rule")
        if option in _JUMP_OPTIONS and value in absent_chains:
            raise bad(f"it jumps to {value}, which is listed as absent")


def user_chains(table: str, actual: dict[str, list[str]]) -> list[str]:
    """The chains of `actual` that are not built into `table`."""
    return [chain for chain in actual if chain not in BUILTIN_CHAINS[table]]
