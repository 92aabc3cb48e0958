"""Drive one iptables variant (nft or legacy) through its own iptables-save / iptables-restore binaries.

Every change to a table is one `iptables-restore --noflush -w` transaction. Canonical wording is
learnt in a scratch network namespace that lives only as long as one `unshare` child: the
rules are restored there into empty chains and read back with iptables-save, which changes nothing
the host can see and also tells exactly which rule iptables refuses. Where no scratch namespace can
be made (the aws-node container: NET_ADMIN only, user namespaces refused), the wording is learnt in
the table itself, in chains of our own that nothing jumps to, removed at once (`_learn_in_place`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import Counter

from ..fsutil import make_dirs
from .model import NetfilterError, parse_save
from .plan import Op, script

_LINE_RE = re.compile(r"\bline:? (\d+)")
# A scratch network namespace: plain (needs CAP_SYS_ADMIN, as a plugin run by the runtime has), else
# inside a new user namespace (enough for a container with only NET_ADMIN, where the kernel allows it).
_SCRATCH = (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"])
_NOISE = ("Try `", "Error occurred at line")
SAVE_TRIES = 3  # iptables-save runs before a table's "incompatible base-chains" is believed (see save)
_TAINTED = "contains incompatible base-chains"
_STAND_IN = "AWSW-"  # + pid in hex + "-" + n: the chains _learn_in_place learns wording in
_JUMP_RE = re.compile(r"((?:^|\s)(?:-j|-g|--jump|--goto)\s+)(\S+)")


class RuleRefused(NetfilterError):
    """iptables refused the rule at `index` of the list given to `canonicalize`."""

    def __init__(self, msg: str, *, table: str, rule: str, output: str, index: int):
        super().__init__(msg, table=table, rule=rule, output=output)
        self.index = index


def tool(variant: str, ipv6: bool, name: str) -> str:
    """The binary of one variant, e.g. iptables-nft-restore or ip6tables-legacy-save."""
    return f"{'ip6' if ipv6 else 'ip'}tables-{variant}-{name}"


def _run(args: list[str], *, input: str | None = None, timeout: float, env: dict | None = None):
    import subprocess  # imported when iptables runs, not on a plugin's steady-state path (~3-6 ms)

    try:
        return subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise NetfilterError(f"{args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetfilterError(f"{' '.join(args[:2])} did not finish within {timeout:.0f} s") from None


def iptables_message(stderr: str) -> str:
    """iptables' own error text without its usage hints."""
    lines = [line.strip() for line in stderr.splitlines()]
    text = "; ".join(line for line in lines if line and not line.startswith(_NOISE))
    return text.replace(":; ", ": ") or "no error message"


def failed_line(stderr: str) -> int | None:
    """The input line iptables-restore reports as failing, if it names one."""
    match = _LINE_RE.search(stderr)
    return int(match.group(1)) if match else None


class RestoreBackend:
    """iptables-save / iptables-restore of `variant` ('nft' or 'legacy') for IPv4 or IPv6."""

    def __init__(self, variant: str, *, ipv6: bool, wait: float, lock_dir: str):
        self.name = self.variant = variant
        self.ipv6 = ipv6
        self.wait = wait
        self.wait_arg = str(max(1, math.ceil(wait)))  # iptables -w takes whole seconds (0 or 0.3: forever)
        self.lock_dir = lock_dir
        self.save_tool = tool(variant, ipv6, "save")
        self.restore_tool = tool(variant, ipv6, "restore")

    def locked(self):
        """Held around a read-plan-write cycle; iptables-restore -w takes the xtables lock itself."""
        return contextlib.nullcontext()

    def save(self, table: str) -> dict[str, list[str]]:
        """The table's chains and rules as iptables-save prints them ({chain: [spec]}).

        iptables-nft 1.8.9 can say a table "contains incompatible base-chains" when it is not: a
        chain dump that raced another writer listed a base chain twice, and the flag stays set
        after iptables re-reads the table at the new generation (nft-cache.c: flush_cache does not
        reset `tainted`). Seen once in a 16-way ADD/DEL load. A table that says so SAVE_TRIES times
        in a row is taken at its word."""
        # iptables-legacy-save -t creates a missing table in the kernel, so read all of them instead.
        args = [self.save_tool, "-t", table] if self.variant == "nft" else [self.save_tool]
        for attempt in range(1, SAVE_TRIES + 1):
            proc = _run(args, timeout=self.wait + 30)
            if proc.returncode != 0:
                raise NetfilterError(f"{self.save_tool} failed: {iptables_message(proc.stderr)}", table=table,
                                     output=proc.stderr)
            if attempt < SAVE_TRIES and _TAINTED in proc.stdout:
                continue
            return parse_save(proc.stdout).get(table, {})

    def apply(self, table: str, ops: list[Op]) -> None:
        """Apply `ops` to `table` in one transaction."""
        proc = _run([self.restore_tool, "--noflush", "-w", self.wait_arg], input=script(table, ops),
                    timeout=self.wait + 30)
        if proc.returncode == 0:
            return
        line = failed_line(proc.stderr)
        rule = ops[line - 2].line() if line is not None and 2 <= line <= len(ops) + 1 else ""
        where = f" at '{rule}'" if rule else ""
        raise NetfilterError(f"{self.restore_tool} failed on table {table}{where}: {iptables_message(proc.stderr)}",
                             table=table, rule=rule, output=proc.stderr)

    def canonicalize(self, table: str, chains: list[str], placed: list[tuple[str, str]]) -> list[str]:
        """iptables-save's wording of each (chain, spec) in `placed`, learnt in a scratch namespace
        where `chains` exist (empty). Raises RuleRefused naming the first rule iptables refuses."""
        if not placed:
            return []
        lines = [f"*{table}", *(f":{chain} - [0:0]" for chain in chains), "COMMIT"]
        owner = {}  # input line number -> index in placed
        for index, (chain, spec) in enumerate(placed):
            lines += [f"*{table}", f"-A {chain} {spec}", "COMMIT"]  # one commit each: errors name the rule
            owner[len(lines) - 1] = owner[len(lines)] = index
        make_dirs(self.lock_dir)
        env = dict(os.environ, XTABLES_LOCKFILE=os.path.join(self.lock_dir, "xtables-scratch.lock"))
        shell = f"{self.restore_tool} --noflush -w {self.wait_arg} && exec {self.save_tool} -t {table}"
        for unshare in _SCRATCH:
            proc = _run([*unshare, "--", "sh", "-c", shell], input="\n".join(lines) + "\n",
                        timeout=self.wait + 30, env=env)
            if not proc.stderr.startswith("unshare:"):
                break
        else:
            return self._learn_in_place(table, chains, placed)
        self._refused(table, placed, owner, proc)
        return _in_order(table, parse_save(proc.stdout).get(table, {}), placed)

    def _learn_in_place(self, table: str, chains: list[str], placed: list[tuple[str, str]]) -> list[str]:
        """canonicalize in the table itself: every chain named (built-in ones too) stands in as an
        empty chain of ours, `AWSW-<pid hex>-<n>`, that no rule jumps to, so the rules match no
        packet; read back, renamed, and removed in a second transaction (also those a killed process
        left). Needs only NET_ADMIN."""
        stand_in = {chain: f"{_STAND_IN}{os.getpid():x}-{n}"
                    for n, chain in enumerate(dict.fromkeys([*chains, *(chain for chain, _ in placed)]))}
        original = {name: chain for chain, name in stand_in.items()}

        def renamed(spec: str, names: dict[str, str]) -> str:
            return _JUMP_RE.sub(lambda m: f"{m.group(1)}{names.get(m.group(2), m.group(2))}", spec)

        lines = [f"*{table}", *(f":{name} - [0:0]" for name in stand_in.values()), "COMMIT"]
        owner = {}
        for index, (chain, spec) in enumerate(placed):
            lines += [f"*{table}", f"-A {stand_in[chain]} {renamed(spec, stand_in)}", "COMMIT"]
            owner[len(lines) - 1] = owner[len(lines)] = index
        try:
            proc = _run([self.restore_tool, "--noflush", "-w", self.wait_arg], input="\n".join(lines) + "\n",
                        timeout=self.wait + 30)
            self._refused(table, placed, owner, proc)
            saved = self.save(table)
        finally:
            self._remove_stand_ins(table, stand_in.values())
        mine = {stand_in[chain]: [renamed(spec, original) for spec in saved.get(stand_in[chain], [])]
                for chain in stand_in}
        return _in_order(table, mine, [(stand_in[chain], spec) for chain, spec in placed])

    def _remove_stand_ins(self, table: str, names) -> None:
        """Flush and delete our stand-in chains `names` and those of processes that are gone."""
        gone = [name for name in self.save(table) if name in names or _stand_in_of_the_dead(name)]
        if gone:
            script_ = "\n".join([f"*{table}", *(f"-F {n}" for n in gone), *(f"-X {n}" for n in gone), "COMMIT", ""])
            proc = _run([self.restore_tool, "--noflush", "-w", self.wait_arg], input=script_, timeout=self.wait + 30)
            if proc.returncode != 0:
                raise NetfilterError(f"{self.restore_tool} could not remove the stand-in chains {gone} of table "
                                     f"{table}: {iptables_message(proc.stderr)}", table=table, output=proc.stderr)

    def _refused(self, table: str, placed: list[tuple[str, str]], owner: dict[int, int], proc) -> None:
        """Raise what iptables-restore's failure `proc` says: RuleRefused naming the placed rule its
        failing line came from, else a NetfilterError."""
        if proc.returncode == 0:
            return
        index = owner.get(failed_line(proc.stderr))
        if index is None:
            raise NetfilterError(f"{self.restore_tool} failed on table {table}: {iptables_message(proc.stderr)}",
                                 table=table, output=proc.stderr)
        chain, spec = placed[index]
        raise RuleRefused(f"{self.restore_tool} refuses rule '-A {chain} {spec}' in table {table}: "
                          f"{iptables_message(proc.stderr)}", table=table, rule=f"-A {chain} {spec}",
                          output=proc.stderr, index=index)


def _stand_in_of_the_dead(chain: str) -> bool:
    """`chain` is a stand-in of _learn_in_place whose process is gone."""
    parts = chain.split("-")
    if not chain.startswith(_STAND_IN) or len(parts) != 3 or not parts[2].isdigit():
        return False
    try:
        return not os.path.exists(f"/proc/{int(parts[1], 16)}")
    except ValueError:
        return False


def _in_order(table: str, saved: dict[str, list[str]], placed: list[tuple[str, str]]) -> list[str]:
    """Pair each placed rule with what iptables-save printed at its position in its chain."""
    wanted = Counter(chain for chain, _ in placed)
    for chain, n in wanted.items():
        made = len(saved.get(chain, []))
        if made != n:
            raise NetfilterError(f"{table}/{chain}: iptables made {made} rules of the {n} given; a rule that lists "
                                 "several addresses expands to one rule each, give them one per rule", table=table)
    cursors = {chain: iter(saved[chain]) for chain in wanted}
    return [next(cursors[chain]) for chain, _ in placed]
