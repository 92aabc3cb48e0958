"""Which iptables variant this network namespace uses, decided as Kubernetes' iptables-wrapper does.

The heuristic of kubernetes-sigs/iptables-wrappers (iptables-wrapper-installer.sh):
1. kubelet (1.17+) creates KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY in the mangle table; if
   iptables-nft-save (IPv4 or IPv6) shows one there, the host uses nft;
2. else if iptables-legacy-save shows one, legacy (read all tables: `-t mangle` would make
   iptables-legacy create that table);
3. else whichever variant holds more rules (lines starting with '-'), nft on a tie.
Errors (a variant not installed, a module not loaded) count as "no rules", as in the wrapper.

Steps 1 and 2, and step 3 when no legacy table exists at all (legacy then holds no rule, so nft
wins or ties), are answered without an exec: four nf_tables chain look-ups, the legacy table
names, and the legacy tables' chain names (`xtables`). Only step 3 with legacy tables present runs
the four iptables-save of the wrapper. `detect` says which step decided (`Detected.basis`).
aws-snat's stamp asks steps 1 and 2 on every ADD in mode 'auto': this module imports nothing for
step 3 (re, the iptables programs) until it runs.
"""

from __future__ import annotations

from ..record import record

KUBELET_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


Detected = record("Detected", "variant basis")
Detected.__doc__ = "variant: 'nft' or 'legacy'; basis: 'nft-hint', 'legacy-hint', 'no-legacy' or 'counted'."


def detect_variant() -> str:
    """'nft' or 'legacy': the variant whose tables this network namespace's rules live in."""
    return detect().variant


def detect() -> Detected:
    if nft_hint():
        return Detected("nft", "nft-hint")
    from . import xtables
    try:
        legacy_tables = {ipv6: xtables.table_names(ipv6) for ipv6 in (False, True)}
        if not any(legacy_tables.values()):
            return Detected("nft", "no-legacy")
        # kubelet's chains are in mangle (and nat, filter): look there first, the others may be large
        places = sorted(((ipv6, table) for ipv6, tables in legacy_tables.items() for table in tables),
                        key=lambda place: place[1] != "mangle")
        if any(chain in KUBELET_CHAINS for ipv6, table in places for chain in xtables.user_chains(table, ipv6)):
            return Detected("legacy", "legacy-hint")
    except OSError:
        pass  # as the wrapper: count the rules
    legacy = _saved("legacy", False) + _saved("legacy", True)
    nft = _saved("nft", False) + _saved("nft", True)
    variant = "legacy" if _rule_lines(legacy) > _rule_lines(nft) else "nft"
    return Detected(variant, "counted")


def nft_hint() -> bool:
    """Step 1: a kubelet chain in nf_tables' ip or ip6 mangle table (what iptables-nft-save shows)."""
    from .. import nftables
    try:
        with nftables.open_nfnetlink() as sock:
            return any(nftables.chain_exists(family, "mangle", chain, sock)
                       for family in (nftables.NFPROTO_IPV4, nftables.NFPROTO_IPV6) for chain in KUBELET_CHAINS)
    except OSError:
        return False  # nf_tables not usable: as iptables-nft-save failing, "no rules"


def _rule_lines(saved: str) -> int:
    """The wrapper's count: lines of iptables-save output that start with '-'."""
    return sum(line.startswith("-") for line in saved.split("\n"))


def _saved(variant: str, ipv6: bool, *args: str) -> str:
    import subprocess  # only when a variant must be read by its save program (~3-6 ms to import)

    from .restore import tool

    try:
        proc = subprocess.run([tool(variant, ipv6, "save"), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""
