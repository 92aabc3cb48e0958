"""The python-iptables (iptc) backend: writes through libiptc, so it drives only the legacy tables.

Reads, canonical wording and the scratch checks are those of the legacy restore backend; writes
are one libiptc commit per table. libiptc replaces the whole table on commit and takes no lock, so
the whole read-plan-write cycle holds the xtables lock that `iptables-legacy -w` users honour.
Rule specs are translated word by word; an option value that starts with '-' is not supported.
`import iptc` costs 300-400 ms, so it happens only when a transaction needs it.
"""

from __future__ import annotations

import os

from .lock import held
from .model import NetfilterError, split_spec
from .plan import Op
from .restore import RestoreBackend

_RULE_FIELDS = {"-s": "src", "--source": "src", "-d": "dst", "--destination": "dst",
                "-i": "in_interface", "--in-interface": "in_interface",
                "-o": "out_interface", "--out-interface": "out_interface",
                "-p": "protocol", "--protocol": "protocol"}


class IptcBackend(RestoreBackend):
    def __init__(self, variant: str, *, ipv6: bool, wait: float, lock_dir: str):
        super().__init__(variant, ipv6=ipv6, wait=wait, lock_dir=lock_dir)
        self.name = "iptc"

    def locked(self):
        return held(os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock"), self.wait)

    def apply(self, table: str, ops: list[Op]) -> None:
        iptc = _import_iptc()
        errors = (ValueError, IndexError, iptc.IPTCError, iptc.XTablesError)
        try:
            handle = (iptc.Table6 if self.ipv6 else iptc.Table)(table, autocommit=False)
            handle.refresh()  # the table object is cached per process: start from the kernel's table
        except errors as exc:
            raise NetfilterError(f"python-iptables cannot open table {table}: {exc}", table=table) from None
        for op in ops:
            try:
                _apply(iptc, handle, op, self.ipv6)
            except errors as exc:
                handle.refresh()  # drop what this transaction did so far
                raise NetfilterError(f"python-iptables failed on table {table} at '{op.line()}': {exc}",
                                     table=table, rule=op.line()) from None
        try:
            handle.commit()
        except errors as exc:
            handle.refresh()
            raise NetfilterError(f"python-iptables could not commit table {table}: {exc}", table=table) from None


def _import_iptc():
    try:
        import iptc
    except ImportError as exc:
        raise NetfilterError(f"netfilter mode 'iptc' needs python-iptables, which cannot be imported: {exc}") from None
    return iptc


def _apply(iptc, handle, op: Op, ipv6: bool) -> None:
    chain = iptc.Chain(handle, op.chain)
    if op.verb == ":":
        if handle.is_chain(op.chain):
            chain.flush()
        else:
            handle.create_chain(op.chain)
    elif op.verb == "-N":
        handle.create_chain(op.chain)
    elif op.verb == "-F":
        chain.flush()
    elif op.verb == "-X":
        handle.delete_chain(op.chain)
    elif op.verb == "-A":
        chain.append_rule(_rule(iptc, op.spec, ipv6))
    elif op.verb == "-I":
        chain.insert_rule(_rule(iptc, op.spec, ipv6), 0)
    elif op.verb == "-D":
        chain.delete_rule(_rule(iptc, op.spec, ipv6))
    else:
        raise ValueError(f"unknown operation {op.verb}")


def _rule(iptc, spec: str, ipv6: bool):
    """A python-iptables Rule from a spec in iptables-save's words."""
    rule = (iptc.Rule6 if ipv6 else iptc.Rule)()
    words = split_spec(spec)
    module = None  # the match or target that the following --options belong to
    negate = False
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "!":
            negate = True
            continue
        if word in _RULE_FIELDS:
            setattr(rule, _RULE_FIELDS[word], ("!" if negate else "") + words[i])
            i += 1
        elif word in ("-m", "--match"):
            module = rule.create_match(words[i])
            i += 1
        elif word in ("-j", "--jump", "-g", "--goto"):
            module = rule.create_target(words[i], goto=word in ("-g", "--goto"))
            i += 1
        elif word.startswith("--") and module is not None:
            values = []
            while i < len(words) and words[i] != "!" and not words[i].startswith("-"):
                values.append(words[i])
                i += 1
            module.parse(word[2:], ["!", *values] if negate else values)
        else:
            raise ValueError(f"the iptc backend cannot express {word!r}")
        negate = False
    return rule
