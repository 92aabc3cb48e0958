"""cnicore.nftables and cnicore.netfilter.xtables: the raw nf_tables and x_tables questions the fast
paths of aws-snat and portmap-compat rest on, checked against real iptables in this run's namespaces.

What must hold for the fast paths to be safe:
- the nf_tables generation changes with every iptables-nft / ip6tables-nft write (any table), and
  not with reads; it does not see iptables-legacy (hence the legacy digest);
- the legacy digest changes with every rule change and not with traffic (counters), and reading
  never creates a table;
- a chain look-up says exactly whether iptables would show the chain;
- a namespace's identity differs from any other namespace's, also one made after it.
Nothing touches the root namespace.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vpclab import netns
from support.paths import ROOT


DRIVER = textwrap.dedent("""
    import json, sys
    from cnicore import nftables
    from cnicore.netfilter import any_chain_exists, stamp, xtables
    from cnicore.netfilter.detect import detect
    out = {}
    for name, expr in json.load(sys.stdin).items():
        try:
            out[name] = eval(expr)
        except OSError as exc:
            out[name] = f"error {exc.errno}"
    print(json.dumps(out))
""")


def ask(ns: str, **exprs):
    """Evaluate Python expressions (cnicore.nftables as nftables, ...) in a process inside `ns`."""
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", DRIVER], input=json.dumps(exprs),
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sh(ns: str, script: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec", script], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def genid(ns: str) -> int:
    return ask(ns, g="nftables.genid()")["g"]


def test_generation_moves_with_every_nft_write_and_only_then(make_netns):
    ns = make_netns("gen")
    seen = [genid(ns)]
    for write in ("iptables-nft -w -t nat -N AWS-SNAT-CHAIN-0",
                  "iptables-nft -w -t nat -A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -j RETURN",
                  "iptables-nft -w -t nat -D AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -j RETURN",
                  "ip6tables-nft -w -t mangle -N X",
                  "iptables-nft -w -t filter -A INPUT -j ACCEPT",     # another table
                  "printf '*nat\\n-A AWS-SNAT-CHAIN-0 -j RETURN\\nCOMMIT\\n' | iptables-nft-restore --noflush",
                  "nft add table inet other"):                       # not iptables at all
        sh(ns, write)
        seen.append(genid(ns))
        assert seen[-1] != seen[-2], write
    for read_or_other in ("iptables-nft-save", "ip6tables-nft-save -t mangle", "iptables-nft -t nat -L -n",
                          "iptables-nft -t nat -S AWS-SNAT-CHAIN-0", "iptables-legacy -w -t nat -N LEGACY",
                          "iptables-nft -w -t nat -D AWS-SNAT-CHAIN-0 -d 192.0.2.0/24 -j RETURN || true"):  # a failed write
        sh(ns, read_or_other)
        assert genid(ns) == seen[-1], read_or_other


def test_generation_is_per_namespace_and_the_identity_tells_namespaces_apart(make_netns):
    first = make_netns("gen")
    sh(first, "iptables-nft -w -t nat -N A; iptables-nft -w -t nat -N B")
    second = make_netns("gen")
    a, b = ask(first, g="nftables.genid()", n="nftables.netns_id()"), ask(second, g="nftables.genid()",
                                                                           n="nftables.netns_id()")
    assert a["g"] > b["g"]
    assert a["n"] != b["n"] and ask(first, n="nftables.netns_id()")["n"] == a["n"]
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert a["n"].startswith(boot + "/")


def test_chain_look_up_agrees_with_iptables_nft(make_netns):
    ns = make_netns("chain")
    sh(ns, "iptables-nft -w -t nat -N CNI-DN-v4only; ip6tables-nft -w -t nat -N CNI-DN-v6only; "
           "iptables-nft -w -t mangle -N KUBE-IPTABLES-HINT")
    answers = ask(ns, v4="nftables.chain_exists(2, 'nat', 'CNI-DN-v4only')",
                  v4in6="nftables.chain_exists(10, 'nat', 'CNI-DN-v4only')",
                  v6="nftables.chain_exists(10, 'nat', 'CNI-DN-v6only')",
                  none="nftables.chain_exists(2, 'nat', 'CNI-DN-nothing')",
                  no_table="nftables.chain_exists(2, 'raw', 'X')",
                  hint="nftables.chain_exists(2, 'mangle', 'KUBE-IPTABLES-HINT')")
    assert answers == {"v4": True, "v4in6": False, "v6": True, "none": False, "no_table": False,
                       "hint": True}


def test_legacy_digest_follows_the_rules_not_the_counters_and_creates_no_table(make_netns):
    ns = make_netns("xt")
    sh(ns, "ip link set lo up")
    fp = "xtables.fingerprint(['nat', 'mangle'])"
    empty = ask(ns, fp=fp, names="xtables.table_names()", names6="xtables.table_names(True)")
    assert empty["names"] == [] and empty["names6"] == []  # reading made no table
    sh(ns, "iptables-legacy -w -t mangle -A OUTPUT -o lo -j MARK --set-xmark 0x1/0x1; "
           "iptables-legacy -w -t nat -N AWS-SNAT-CHAIN-0")
    one = ask(ns, fp=fp, chains="xtables.user_chains('nat')", names="xtables.table_names()")["fp"]
    assert one != empty["fp"]
    sh(ns, f"{sys.executable} -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           "[s.sendto(b'x', ('127.0.0.1', 9)) for _ in range(3)]\"")  # counters of the mangle rule move
    assert int(sh(ns, "iptables-legacy -t mangle -L OUTPUT -v -x -n | awk 'NR==3 {print $1}'")) >= 3
    assert ask(ns, fp=fp)["fp"] == one
    sh(ns, "iptables-legacy -w -t nat -A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -j RETURN")
    two = ask(ns, fp=fp)["fp"]
    assert two != one
    sh(ns, "iptables-legacy -w -t nat -R AWS-SNAT-CHAIN-0 1 -d 10.0.0.0/24 -j RETURN")  # same size, other rule
    assert ask(ns, fp=fp)["fp"] not in (one, two)
    sh(ns, "iptables-legacy -w -t nat -D AWS-SNAT-CHAIN-0 1")
    assert ask(ns, fp=fp)["fp"] == one  # the same rules, the same digest
    assert sorted(sh(ns, "cat /proc/net/ip_tables_names").split()) == ["mangle", "nat"]  # no filter made
    sh(ns, "ip6tables-legacy -w -t nat -N CNI-DN-v6")
    assert ask(ns, c4="xtables.user_chains('nat')", c6="xtables.user_chains('nat', True)",
               none="xtables.user_chains('filter')") == {"c4": ["AWS-SNAT-CHAIN-0"], "c6": ["CNI-DN-v6"], "none": []}


@pytest.mark.parametrize("setup, variant, basis", [
    ("", "nft", "no-legacy"),
    ("iptables-nft -t mangle -N KUBE-IPTABLES-HINT; iptables-legacy -A INPUT -j ACCEPT", "nft", "nft-hint"),
    ("ip6tables-nft -t mangle -N KUBE-KUBELET-CANARY; iptables-legacy -A INPUT -j ACCEPT", "nft", "nft-hint"),
    ("iptables-legacy -t mangle -N KUBE-KUBELET-CANARY; iptables-nft -A INPUT -j ACCEPT", "legacy", "legacy-hint"),
    ("ip6tables-legacy -t nat -N KUBE-IPTABLES-HINT", "legacy", "legacy-hint"),  # the wrapper reads all tables
    ("iptables-legacy -A INPUT -j ACCEPT", "legacy", "counted"),
    ("iptables-legacy -t nat -N EMPTY; iptables-nft -A INPUT -j ACCEPT", "nft", "counted"),
], ids=["empty", "nft-hint", "nft-ip6-canary", "legacy-canary", "legacy-ip6-nat-hint", "legacy-rules", "more-nft"])
def test_detection_answers_as_the_wrapper_and_says_why(make_netns, setup, variant, basis):
    ns = make_netns("det")
    if setup:
        sh(ns, setup)
    tables = sh(ns, "cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null || true")
    assert ask(ns, d="list(detect())") == {"d": [variant, basis]}
    assert sh(ns, "cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null || true") == tables


@pytest.mark.parametrize("mode", ["auto", "nft", "legacy"])
def test_any_chain_exists_looks_in_the_variants_the_mode_drives(make_netns, mode):
    ns = make_netns("any")
    q = "any_chain_exists({mode!r}, 'nat', ['CNI-DN-x', 'CNI-SN-x'], ipv6={v6})"
    assert ask(ns, a=q.format(mode=mode, v6=(False, True))) == {"a": False}
    sh(ns, "ip6tables-nft -w -t nat -N CNI-SN-x")
    assert ask(ns, a=q.format(mode=mode, v6=(False, True)), v4=q.format(mode=mode, v6=(False,))) == \
        {"a": mode != "legacy", "v4": False}
    sh(ns, "ip6tables-nft -w -t nat -X CNI-SN-x; iptables-legacy -w -t nat -N CNI-DN-x")
    assert ask(ns, a=q.format(mode=mode, v6=(False, True))) == {"a": mode != "nft"}
    assert ask(ns, a=q.format(mode="iptc", v6=(False, True))) == {"a": True}


CHAINS = "{'nat': ['PREROUTING', 'POSTROUTING', 'AWS-SNAT-CHAIN-0'], 'mangle': ['PREROUTING']}"


def fingerprints(ns):
    return ask(ns, **{mode: f"stamp.fingerprint({mode!r}, {CHAINS})" for mode in ("nft", "legacy", "auto")})


def test_nft_chain_digest_follows_those_chains_only_and_not_the_counters(make_netns):
    ns = make_netns("digest")
    sh(ns, "ip link set lo up; iptables-nft -w -t nat -N AWS-SNAT-CHAIN-0; "
           "iptables-nft -w -t nat -A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -j RETURN; "
           "iptables-nft -w -t mangle -A PREROUTING -i lo -j MARK --set-xmark 0x1/0x1; "
           "iptables-nft -w -t nat -A POSTROUTING -o lo -j AWS-SNAT-CHAIN-0")
    one = fingerprints(ns)["nft"]
    sh(ns, f"{sys.executable} -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           "[s.sendto(b'x', ('127.0.0.1', 9)) for _ in range(3)]\"")  # counters of the mangle rule move
    assert int(sh(ns, "iptables-nft -t mangle -L PREROUTING -v -x -n | awk 'NR==3 {print $1}'")) >= 3
    assert fingerprints(ns)["nft"] == one
    for elsewhere in ("iptables-nft -w -t filter -A INPUT -j ACCEPT", "iptables-nft -w -t nat -N KUBE-SERVICES",
                      "iptables-nft -w -t nat -A KUBE-SERVICES -j RETURN", "iptables-nft -w -t nat -A OUTPUT -j RETURN",
                      "ip6tables-nft -w -t nat -A POSTROUTING -j RETURN", "nft add table inet other",
                      "iptables-legacy -w -t nat -A POSTROUTING -j RETURN"):
        sh(ns, elsewhere)
        assert fingerprints(ns)["nft"] == one, elsewhere
    for change in ("iptables-nft -w -t nat -R AWS-SNAT-CHAIN-0 1 -d 10.1.0.0/16 -j RETURN",  # same size, another rule
                   "iptables-nft -w -t nat -I POSTROUTING 1 -j RETURN",
                   "iptables-nft -w -t nat -D POSTROUTING 1",                                # back: the same again
                   "iptables-nft -w -t mangle -D PREROUTING 1",
                   "iptables-nft -w -t nat -F AWS-SNAT-CHAIN-0",
                   "iptables-nft -w -t nat -D POSTROUTING 1; iptables-nft -w -t nat -X AWS-SNAT-CHAIN-0",
                   "iptables-nft -w -t nat -N AWS-SNAT-CHAIN-0"):                            # empty is not absent
        sh(ns, change)
        now = fingerprints(ns)["nft"]
        if change == "iptables-nft -w -t nat -D POSTROUTING 1":
            assert now == last_but_one, change
        else:
            assert now != one, change
        last_but_one, one = one, now


def test_fingerprint_per_mode(make_netns):
    ns = make_netns("fp")
    before = fingerprints(ns)
    sh(ns, "iptables-legacy -w -t filter -A INPUT -j ACCEPT")  # a legacy table auto reads (rules counted)
    after = fingerprints(ns)
    assert after["nft"] == before["nft"] and after["legacy"] == before["legacy"] and after["auto"] != before["auto"]
    sh(ns, "iptables-nft -w -t filter -A INPUT -j ACCEPT")  # counted: any nf_tables change counts
    last = fingerprints(ns)
    assert last["nft"] == after["nft"] and last["legacy"] == after["legacy"] and last["auto"] != after["auto"]
    sh(ns, "iptables-legacy -w -t nat -A POSTROUTING -j RETURN")
    assert fingerprints(ns)["legacy"] != last["legacy"]


def test_auto_fingerprint_reads_what_detection_rests_on(make_netns):
    """With kubelet's hint in legacy mangle, the auto fingerprint covers nat and mangle, not the (large,
    kube-proxy's) filter table nor nf_tables; with the hint in nf_tables, only our nf_tables chains;
    without any hint it covers every legacy table and the generation."""
    ns = make_netns("fp")
    auto = f"stamp.fingerprint('auto', {CHAINS})"
    sh(ns, "iptables-legacy -w -t mangle -N KUBE-KUBELET-CANARY")
    one = ask(ns, fp=auto)["fp"]
    assert one.split()[1] == "legacy-hint"
    for elsewhere in ("iptables-legacy -w -t filter -A INPUT -j ACCEPT", "iptables-nft -w -N Z"):
        sh(ns, elsewhere)
        assert ask(ns, fp=auto)["fp"] == one, elsewhere
    for change in ("iptables-legacy -w -t nat -N X", "ip6tables-legacy -w -t mangle -N Y",
                   "iptables-nft -w -t mangle -N KUBE-IPTABLES-HINT"):  # the last: nft's hint wins now
        sh(ns, change)
        assert ask(ns, fp=auto)["fp"] != one, change
        one = ask(ns, fp=auto)["fp"]
    assert one.split()[1] == "nft-hint"
    sh(ns, "iptables-nft -w -X Z; iptables-legacy -w -t filter -A INPUT -j DROP")
    assert ask(ns, fp=auto)["fp"] == one
    sh(ns, "iptables-nft -w -t mangle -X KUBE-IPTABLES-HINT; iptables-legacy -w -t mangle -X KUBE-KUBELET-CANARY")
    counted = ask(ns, fp=auto)["fp"]
    assert counted.split()[1] == "counted"
    sh(ns, "iptables-legacy -w -t filter -A INPUT -j DROP")
    assert ask(ns, fp=auto)["fp"] != counted


def test_legacy_tables_are_read_with_the_ctypes_package_too(make_netns):
    """xtables calls getsockopt through the bare _ctypes extension (cnicore.libc); should that fail,
    through ctypes."""
    ns = make_netns("xt")
    sh(ns, "iptables-legacy -w -t nat -N CNI-DN-x")
    script = ("import _ctypes\n"
              "def refuse(*args): raise OSError('no')\n"
              "_ctypes.dlsym = refuse\n"
              "from cnicore import libc\n"
              "from cnicore.netfilter import xtables\n"
              "print(xtables.user_chains('nat'), type(libc.ctypes_lite().function('getsockopt')).__name__)\n")
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True).stdout
    assert out == "['CNI-DN-x'] _FuncPtr\n"
    assert ask(ns, c="xtables.user_chains('nat')") == {"c": ["CNI-DN-x"]}
