"""Which iptables variant this network namespace uses, decided as Kubernetes' iptables-wrapper does.

The heuristic of kubernetes-sigs/iptables-wrappers (iptables-wrapper-installer.sh):
1. kubelet (1.17+) creates KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY in the mangle table; if
   iptables-nft-save (IPv4 or IPv6) shows one there, the host uses nft;
2. else if iptables-legacy-save shows one, legacy (read all tables: `-t mangle` would make
   iptables-legacy create that table);
3. else whichever variant holds more rules (lines starting with '-'), nft on a tie.
Errors (a variant not installed, a module not loaded) count as "no rules", as in the wrapper.
"""

from __future__ import annotations

import re
import subprocess

from .restore import tool

_KUBELET_CHAINS = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)", re.MULTILINE)
_RULE_LINE = re.compile(r"^-", re.MULTILINE)


def detect_variant() -> str:
    """'nft' or 'legacy': the variant whose tables this network namespace's rules live in."""
    if any(_KUBELET_CHAINS.search(_saved("nft", ipv6, "-t", "mangle")) for ipv6 in (False, True)):
        return "nft"
    legacy = _saved("legacy", False) + _saved("legacy", True)
    if _KUBELET_CHAINS.search(legacy):
        return "legacy"
    nft = _saved("nft", False) + _saved("nft", True)
    return "legacy" if len(_RULE_LINE.findall(legacy)) > len(_RULE_LINE.findall(nft)) else "nft"


def _saved(variant: str, ipv6: bool, *args: str) -> str:
    try:
        proc = subprocess.run([tool(variant, ipv6, "save"), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""
