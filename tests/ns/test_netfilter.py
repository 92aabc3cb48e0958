"""cnicore.netfilter: pure logic, then real iptables (nf_tables and legacy) inside this run's namespaces.

The code under test runs in a child Python process started with `ip netns exec <ns>` (DRIVER below),
as a plugin would; iptables is inspected and edited by hand only inside the same namespace.
Nothing touches the root namespace's tables.
"""

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from cnicore.netfilter import Drift, Netfilter, NetfilterError, Rule, TableState, quote
from cnicore.netfilter.model import parse_save, split_spec, validate
from cnicore.netfilter.plan import Op, compare
from vpclab import netns
from support.paths import ROOT

VARIANTS = ("nft", "legacy")

SNAT_JUMP = '-m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0'
SNAT_RULE = ('-m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL '
             '-j SNAT --to-source 10.0.0.10 --random-fully')
CONNMARK_RESTORE = '-m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80'
# The node rules of ARCHITECTURE §5 in iptables-save's own words.
NAT = {
    "table": "nat",
    "chains": {"AWS-SNAT-CHAIN-0": ["-d 10.0.0.0/16 -j RETURN", "-d 192.168.0.0/24 -j RETURN", SNAT_RULE]},
    "rules": [["POSTROUTING", SNAT_JUMP, True], ["PREROUTING", CONNMARK_RESTORE, False]],
}
NAT_LINES = [
    f"-A PREROUTING {CONNMARK_RESTORE}",
    f"-A POSTROUTING {SNAT_JUMP}",
    "-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -j RETURN",
    "-A AWS-SNAT-CHAIN-0 -d 192.168.0.0/24 -j RETURN",
    f"-A AWS-SNAT-CHAIN-0 {SNAT_RULE}",
]
# The same, worded loosely: host bits in the CIDR, extra spaces, implicit -m tcp, --to, --mask.
NAT_LOOSE = {
    "table": "nat",
    "chains": {"AWS-SNAT-CHAIN-0": ["-d 10.0.7.7/16   -j RETURN", "-p tcp --dport 80 -j RETURN",
                                    "-m addrtype ! --dst-type LOCAL -m comment --comment AWS -j SNAT --to 10.0.0.10"]},
    "rules": [["POSTROUTING", '-m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0', True],
              ["PREROUTING", '-m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --mask 0x80', False]],
}
NAT_LOOSE_LINES = [
    f"-A PREROUTING {CONNMARK_RESTORE}",
    f"-A POSTROUTING {SNAT_JUMP}",
    "-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -j RETURN",
    "-A AWS-SNAT-CHAIN-0 -p tcp -m tcp --dport 80 -j RETURN",
    "-A AWS-SNAT-CHAIN-0 -m addrtype ! --dst-type LOCAL -m comment --comment AWS -j SNAT --to-source 10.0.0.10",
]

DRIVER = textwrap.dedent("""
    import json, sys, time
    from cnicore.netfilter import Netfilter, NetfilterError, Rule, TableState

    def state(d):
        return TableState(d["table"], chains=d.get("chains", {}), shared_chains=d.get("shared_chains", ()),
                          rules=[Rule(*r) for r in d.get("rules", ())], absent_chains=d.get("absent_chains", ()),
                          absent_rules=[Rule(*r) for r in d.get("absent_rules", ())])

    req = json.load(sys.stdin)
    if req.get("no_scratch"):  # as in a container where neither `unshare --net` nor a user namespace works
        import cnicore.netfilter.restore
        cnicore.netfilter.restore._SCRATCH = ()
    while time.time() < req.get("start_at", 0):
        time.sleep(0.001)
    try:
        nf = Netfilter(req["mode"], lock_dir=req["lock_dir"], ipv6=req.get("ipv6", False), wait=req.get("wait", 30))
        out = {"variant": nf.variant, "backend": nf.backend, "runs": []}
        for _ in range(req.get("repeat", 1)):
            if req["op"] == "remove":
                found = nf.remove(req["table"], chains=req.get("chains", ()),
                                  rules=[Rule(*r) for r in req.get("rules", ())])
            else:
                found = getattr(nf, req["op"])(*map(state, req["states"]))
            out["runs"].append([list(d) for d in found])
    except NetfilterError as exc:
        out = {"error": str(exc), "table": exc.table, "rule": exc.rule}
    print(json.dumps(out))
""")


# ---------------------------------------------------------------------------------------------
# Helpers: the driver, and iptables by hand, both inside a namespace


@pytest.fixture
def lock_dir(tmp_path):
    return str(tmp_path / "locks")


def driver_cmd(ns, wrapper=()):
    return ["ip", "netns", "exec", ns, *wrapper, sys.executable, "-c", DRIVER]


def drive(ns, lock_dir, mode, op, *states, env=None, wrapper=(), **extra):
    """Run one Netfilter operation in `ns` (under `wrapper`, e.g. setpriv); the driver's JSON answer."""
    request = dict(mode=mode, op=op, states=list(states), lock_dir=lock_dir, **extra)
    proc = subprocess.run(driver_cmd(ns, wrapper), input=json.dumps(request), capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def drifts(answer, run=-1):
    assert "error" not in answer, answer["error"]
    return [Drift(*d) for d in answer["runs"][run]]


def ipt(ns, variant, *args, ipv6=False):
    netns.run([f"{'ip6' if ipv6 else 'ip'}tables-{variant}", "-w", *args], netns=ns)


def _saved_lines(ns, variant, table, ipv6, kind):
    # All tables: `iptables-legacy-save -t` would create a missing table.
    out = netns.run([f"{'ip6' if ipv6 else 'ip'}tables-{variant}-save"], netns=ns).stdout
    current, lines = None, []
    for line in out.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith(kind):
            lines.append(line)
    return lines


def rules_of(ns, variant, table="nat", ipv6=False):
    """The table's rule lines ('-A ...'), as the variant's iptables-save prints them in `ns`."""
    return _saved_lines(ns, variant, table, ipv6, "-A ")


def chains_of(ns, variant, table="nat"):
    return [line[1:].split()[0] for line in _saved_lines(ns, variant, table, False, ":")]


# ---------------------------------------------------------------------------------------------
# Pure logic


@pytest.mark.parametrize("value, saved", [
    ("plain", "plain"),
    ("AWS-SNAT_0", "AWS-SNAT_0"),
    ("AWS, SNAT", '"AWS, SNAT"'),
    ('dnat name: "net" id: "abc"', r'"dnat name: \"net\" id: \"abc\""'),
    ("back\\slash", r'"back\\slash"'),
    ("it's", r'"it\'s"'),
    ("", '""'),
])
def test_quote_words_values_as_iptables_save_does(value, saved):
    assert quote(value) == saved
    assert split_spec(f"--comment {quote(value)}") == (["--comment", value] if value else ["--comment"])


@pytest.mark.parametrize("spec, words", [
    ('-m comment --comment "a b"  -j X', ["-m", "comment", "--comment", "a b", "-j", "X"]),
    (r'--comment "say \"hi\"" -j X', ["--comment", 'say "hi"', "-j", "X"]),
    ('--comment ab"c d"e', ["--comment", "abc de"]),
    ("-d 10.0.0.0/16\t-j RETURN", ["-d", "10.0.0.0/16", "-j", "RETURN"]),
    ("--comment 'single'", ["--comment", "'single'"]),  # iptables-restore has no single quotes
])
def test_split_spec_follows_iptables_restore(spec, words):
    assert split_spec(spec) == words


def test_parse_save_reads_tables_chains_and_rules_in_order():
    text = textwrap.dedent("""\
        # Warning: iptables-legacy tables present, use iptables-legacy-save to see them
        # Generated by iptables-nft-save v1.8.9 (nf_tables)
        *nat
        :PREROUTING ACCEPT [0:0]
        :POSTROUTING ACCEPT [12:720]
        :KUBE-X - [0:0]
        -A POSTROUTING -m comment --comment "a b" -j KUBE-X
        -A KUBE-X -j RETURN
        -A KUBE-X
        COMMIT
        *mangle
        :PREROUTING ACCEPT [0:0]
        COMMIT
        """)
    assert parse_save(text) == {
        "nat": {"PREROUTING": [], "POSTROUTING": ['-m comment --comment "a b" -j KUBE-X'],
                "KUBE-X": ["-j RETURN", ""]},
        "mangle": {"PREROUTING": []},
    }
    with pytest.raises(NetfilterError, match="incompatible"):
        parse_save("*nat\n# Table `nat' is incompatible, use 'nft' tool.\n")
    with pytest.raises(NetfilterError, match="unexpected line"):
        parse_save("*nat\n-I POSTROUTING 1 -j X\n")


def test_compare_plans_only_what_differs():
    state = TableState("nat", chains={"OURS": ["-j RETURN", "-d 10.0.0.0/16 -j RETURN"]},
                       shared_chains=["SHARED", "NEWSHARED"],
                       rules=[Rule("POSTROUTING", "-j OURS", first=True), Rule("POSTROUTING", "-j A2", first=True),
                              Rule("SHARED", "-p tcp -j OURS"), Rule("OUTPUT", "-j OURS")],
                       absent_chains=["OLD", "NEVER"], absent_rules=[Rule("PREROUTING", "-j OLDRULE")])
    actual = {"PREROUTING": ["-j OLDRULE", "-j KEEP", "-j OLDRULE"], "OUTPUT": ["-j OURS", "-j OURS", "-j OURS"],
              "POSTROUTING": ["-j KUBE", "-j OLD"], "OURS": ["-d 10.0.0.0/16 -j RETURN", "-j RETURN"],
              "SHARED": ["-j KUBE", "-g OLD"], "OLD": ["-j RETURN"], "KUBE": []}
    found, ops = compare(state, actual, str)
    assert [str(d) for d in found] == [
        "nat/OURS: rules out of order",
        "nat/NEWSHARED: chain missing",
        "nat/OLD: chain present",
        "nat/PREROUTING: rule present: -j OLDRULE",
        "nat/POSTROUTING: rule missing: -j OURS",
        "nat/POSTROUTING: rule missing: -j A2",
        "nat/SHARED: rule missing: -p tcp -j OURS",
        "nat/OUTPUT: duplicate rule: -j OURS",
    ]
    assert [op.line() for op in ops] == [
        ":OURS - [0:0]", "-N NEWSHARED",
        "-D POSTROUTING -j OLD", "-D SHARED -g OLD", "-D PREROUTING -j OLDRULE", "-D PREROUTING -j OLDRULE",
        "-D OUTPUT -j OURS", "-D OUTPUT -j OURS",
        "-F OLD", "-X OLD",
        "-A OURS -j RETURN", "-A OURS -d 10.0.0.0/16 -j RETURN",
        "-I POSTROUTING 1 -j A2", "-I POSTROUTING 1 -j OURS", "-A SHARED -p tcp -j OURS",
    ]
    assert compare(state._replace(absent_rules=()), {**actual, "PREROUTING": []}, str)[0] != []
    settled = {"OURS": ["-j RETURN", "-d 10.0.0.0/16 -j RETURN"], "SHARED": ["-p tcp -j OURS"], "NEWSHARED": [],
               "POSTROUTING": ["-j A2", "-j OURS"], "OUTPUT": ["-j OURS"], "PREROUTING": ["-j KEEP"]}
    assert compare(state, settled, str) == ([], [])


def test_op_lines():
    assert Op(":", "C").line() == ":C - [0:0]"
    assert Op("-I", "C", "-j X").line() == "-I C 1 -j X"
    assert Op("-X", "C").line() == "-X C"


@pytest.mark.parametrize("state, message", [
    (TableState("nats"), "unknown table 'nats'"),
    (TableState("nat", chains={"POSTROUTING": ["-j RETURN"]}), "POSTROUTING is built in"),
    (TableState("nat", chains={"A" * 29: []}), "invalid owned chain name"),
    (TableState("nat", chains={"-X": []}), "invalid owned chain name"),
    (TableState("nat", chains={"A B": []}), "invalid owned chain name"),
    (TableState("nat", chains={"C": "-j RETURN"}), "must be a list"),
    (TableState("nat", chains={"C": ["-j RETURN"]}, absent_chains=["C"]), "listed as owned chain and as absent"),
    (TableState("nat", chains={"C": ['-m comment --comment "x -j RETURN']}), "unterminated double quote"),
    (TableState("nat", chains={"C": ["-j RETURN\n-A POSTROUTING -j DROP"]}), "must be one line"),
    (TableState("nat", chains={"C": [""]}), "non-empty"),
    (TableState("nat", chains={"C": ["-A C -j RETURN"]}), "without -A"),
    (TableState("nat", chains={"C": ["-s 10.0.0.1,10.0.0.2 -j RETURN"]}), "one address per rule"),
    (TableState("nat", chains={"C": ["-j OLD"]}, absent_chains=["OLD"]), "jumps to OLD, which is listed as absent"),
    (TableState("nat", rules=[Rule("C", "-j RETURN")], chains={"C": []}), "belongs in its rule list"),
    (TableState("nat", rules=[Rule("OLD", "-j RETURN")], absent_chains=["OLD"]), "cannot hold"),
    (TableState("nat", rules=[Rule("POSTROUTING", "-j X"), Rule("POSTROUTING", "-j X")]), "listed twice"),
    (TableState("nat", rules=[Rule("POSTROUTING", "-j X")], absent_rules=[Rule("POSTROUTING", "-j X")]),
     "wanted and as absent"),
    (TableState("nat", rules=[("POSTROUTING", "-j X")]), "is not a Rule"),
    (TableState("nat", rules=[Rule("bad chain", "-j X")]), "invalid chain"),
    (TableState("nat", shared_chains=["OUTPUT"]), "OUTPUT is built in"),
])
def test_validate_refuses_bad_states(state, message):
    with pytest.raises(NetfilterError, match=message.replace("(", r"\(")):
        validate(state)


def test_unknown_mode_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(NetfilterError, match="unknown netfilter mode 'nftables': use one of auto, nft, legacy, iptc"):
        Netfilter("nftables", lock_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Mode detection, as kube-proxy's iptables-wrapper decides


def _nft_rules(ns):
    for chain in ("INPUT", "OUTPUT", "FORWARD"):
        ipt(ns, "nft", "-A", chain, "-j", "ACCEPT")


def _legacy_rules(ns):
    for chain in ("INPUT", "OUTPUT"):
        ipt(ns, "legacy", "-A", chain, "-j", "ACCEPT")


@pytest.mark.parametrize("setup, expected", [
    ([], "nft"),                                        # nothing anywhere: nft, as the wrapper defaults
    ([_legacy_rules], "legacy"),                        # only legacy holds rules
    ([_nft_rules], "nft"),
    ([_nft_rules, _legacy_rules], "nft"),               # more rules in nft
    ([lambda ns: ipt(ns, "legacy", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"), _nft_rules], "legacy"),
    ([lambda ns: ipt(ns, "nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"), _legacy_rules], "nft"),
    ([lambda ns: ipt(ns, "legacy", "-N", "KUBE-IPTABLES-HINT", ipv6=True), _nft_rules], "legacy"),
], ids=["empty", "legacy-rules", "nft-rules", "more-nft", "legacy-kubelet-canary", "nft-kube-hint",
        "legacy-ip6-hint"])
def test_auto_mode_picks_the_variant_holding_the_rules(make_netns, lock_dir, setup, expected):
    ns = make_netns("det")
    for step in setup:
        step(ns)
    answer = drive(ns, lock_dir, "auto", "converge", NAT)
    assert (answer["variant"], answer["backend"]) == (expected, expected)
    other = "legacy" if expected == "nft" else "nft"
    assert rules_of(ns, expected) == NAT_LINES
    assert rules_of(ns, other) == []


def test_explicit_mode_overrides_detection(make_netns, lock_dir):
    ns = make_netns("det")
    _nft_rules(ns)
    answer = drive(ns, lock_dir, "legacy", "converge", NAT)
    assert (answer["variant"], answer["backend"]) == ("legacy", "legacy")
    assert rules_of(ns, "legacy") == NAT_LINES
    assert rules_of(ns, "nft", "filter") == ["-A INPUT -j ACCEPT", "-A FORWARD -j ACCEPT", "-A OUTPUT -j ACCEPT"]
    assert rules_of(ns, "nft") == []


# ---------------------------------------------------------------------------------------------
# Converge, check and remove on real iptables, in both variants


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


def test_converge_writes_exactly_the_state_and_50_more_change_nothing(make_netns, lock_dir, variant):
    ns = make_netns("conv")
    first = drive(ns, lock_dir, variant, "converge", NAT)
    assert {str(d) for d in drifts(first)} == {
        "nat/AWS-SNAT-CHAIN-0: chain missing", f"nat/POSTROUTING: rule missing: {SNAT_JUMP}",
        f"nat/PREROUTING: rule missing: {CONNMARK_RESTORE}"}
    assert rules_of(ns, variant) == NAT_LINES
    again = drive(ns, lock_dir, variant, "converge", NAT, repeat=50)
    assert again["runs"] == [[]] * 50
    assert rules_of(ns, variant) == NAT_LINES
    assert drifts(drive(ns, lock_dir, variant, "check", NAT)) == []


def test_rules_in_any_wording_are_compared_as_iptables_prints_them(make_netns, lock_dir, variant):
    ns = make_netns("word")
    drive(ns, lock_dir, variant, "converge", NAT_LOOSE)
    assert rules_of(ns, variant) == NAT_LOOSE_LINES
    assert drive(ns, lock_dir, variant, "converge", NAT_LOOSE, repeat=5)["runs"] == [[]] * 5
    assert drifts(drive(ns, lock_dir, variant, "check", NAT_LOOSE)) == []
    assert rules_of(ns, variant) == NAT_LOOSE_LINES


def test_check_reports_exactly_what_was_changed_by_hand_and_converge_restores_it(make_netns, lock_dir, variant):
    ns = make_netns("hand")
    drive(ns, lock_dir, variant, "converge", NAT)
    ipt(ns, variant, "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "AWS SNAT CHAIN",
        "-j", "AWS-SNAT-CHAIN-0")
    ipt(ns, variant, "-t", "nat", "-D", "AWS-SNAT-CHAIN-0", "-d", "192.168.0.0/24", "-j", "RETURN")
    ipt(ns, variant, "-t", "nat", "-A", "AWS-SNAT-CHAIN-0", "-d", "172.16.0.0/12", "-j", "RETURN")
    ipt(ns, variant, "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "AWS, CONNMARK",
        "-j", "CONNMARK", "--restore-mark", "--mask", "0x80")
    expected = [
        Drift("nat", "AWS-SNAT-CHAIN-0", "rule missing", "-d 192.168.0.0/24 -j RETURN"),
        Drift("nat", "AWS-SNAT-CHAIN-0", "unexpected rule", "-d 172.16.0.0/12 -j RETURN"),
        Drift("nat", "POSTROUTING", "rule missing", SNAT_JUMP),
        Drift("nat", "PREROUTING", "duplicate rule", CONNMARK_RESTORE),
    ]
    assert drifts(drive(ns, lock_dir, variant, "check", NAT)) == expected
    assert drifts(drive(ns, lock_dir, variant, "converge", NAT)) == expected
    assert rules_of(ns, variant) == NAT_LINES
    assert drifts(drive(ns, lock_dir, variant, "check", NAT)) == []


def test_without_cap_sys_admin_the_wording_is_learnt_in_a_user_namespace(make_netns, lock_dir, variant):
    """Like the aws-node container (NET_ADMIN, no SYS_ADMIN), where a plain `unshare --net` is refused."""
    ns = make_netns("caps")
    no_sys_admin = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"]
    refused = subprocess.run(["ip", "netns", "exec", ns, *no_sys_admin, "unshare", "--net", "true"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    answer = drive(ns, lock_dir, variant, "converge", NAT_LOOSE, repeat=3, wrapper=no_sys_admin)
    assert [len(run) for run in answer["runs"]] == [3, 0, 0]
    assert rules_of(ns, variant) == NAT_LOOSE_LINES


def test_without_any_scratch_namespace_the_wording_is_learnt_in_chains_nothing_jumps_to(make_netns, lock_dir,
                                                                                     variant):
    """Like the aws-node container under podman, where user namespaces are refused too: the wording is
    learnt in stand-in chains of the table itself, which go at once; foreign rules are untouched, and
    stand-ins a killed process left are removed."""
    ns = make_netns("inplace")
    ipt(ns, variant, "-t", "nat", "-A", "POSTROUTING", "-d", "192.0.2.0/24", "-j", "RETURN")
    ipt(ns, variant, "-t", "nat", "-N", "AWSW-7fffffff-0")  # a dead process's (pid 0x7fffffff never runs)
    answer = drive(ns, lock_dir, variant, "converge", NAT_LOOSE, repeat=3, no_scratch=True)
    assert [len(run) for run in answer["runs"]] == [3, 0, 0], answer
    assert [line for line in rules_of(ns, variant) if "192.0.2.0" not in line] == NAT_LOOSE_LINES
    assert "-A POSTROUTING -d 192.0.2.0/24 -j RETURN" in rules_of(ns, variant)
    assert not [chain for chain in chains_of(ns, variant) if chain.startswith("AWSW-")]
    # a rule iptables refuses is named as in a scratch namespace
    bad = {"table": "nat", "chains": {"AWS-SNAT-CHAIN-0": ["-m nosuchmatch -j RETURN"]}}
    answer = drive(ns, lock_dir, variant, "converge", bad, no_scratch=True)
    assert "nosuchmatch" in answer.get("error", ""), answer
    assert not [chain for chain in chains_of(ns, variant) if chain.startswith("AWSW-")]


def test_foreign_rules_and_chains_are_left_alone(make_netns, lock_dir, variant):
    ns = make_netns("foreign")
    ipt(ns, variant, "-t", "nat", "-N", "KUBE-POSTROUTING")
    ipt(ns, variant, "-t", "nat", "-A", "KUBE-POSTROUTING", "-j", "MASQUERADE", "--random-fully")
    ipt(ns, variant, "-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING")
    ipt(ns, variant, "-t", "nat", "-A", "PREROUTING", "-d", "10.0.0.0/16", "-j", "RETURN")
    ipt(ns, variant, "-t", "filter", "-A", "FORWARD", "-j", "ACCEPT")
    before = rules_of(ns, variant, "nat") + rules_of(ns, variant, "filter")
    drive(ns, lock_dir, variant, "converge", NAT)
    after = rules_of(ns, variant, "nat") + rules_of(ns, variant, "filter")
    assert [line for line in after if line not in NAT_LINES] == before
    # Our jump went to the top of POSTROUTING, the connmark rule to the end of PREROUTING.
    assert rules_of(ns, variant, "nat")[:4] == [
        "-A PREROUTING -d 10.0.0.0/16 -j RETURN", f"-A PREROUTING {CONNMARK_RESTORE}",
        f"-A POSTROUTING {SNAT_JUMP}", "-A POSTROUTING -j KUBE-POSTROUTING"]
    drive(ns, lock_dir, variant, "remove", table="nat", chains=["AWS-SNAT-CHAIN-0"],
          rules=[["PREROUTING", CONNMARK_RESTORE]])
    assert rules_of(ns, variant, "nat") + rules_of(ns, variant, "filter") == before
    assert "KUBE-POSTROUTING" in chains_of(ns, variant)


def test_shared_chain_keeps_the_rules_of_others(make_netns, lock_dir, variant):
    """portmap-compat's pattern: CNI-HOSTPORT-DNAT is shared, each container adds and removes its own
    entry rule and owns its CNI-DN-* chain."""
    ns = make_netns("shared")
    ipt(ns, variant, "-t", "nat", "-N", "CNI-HOSTPORT-DNAT")
    ipt(ns, variant, "-t", "nat", "-A", "CNI-HOSTPORT-DNAT", "-p", "udp", "-j", "RETURN")  # someone else's

    def container(n):
        chain = f"CNI-DN-{n:021x}"
        return {"table": "nat", "shared_chains": ["CNI-HOSTPORT-DNAT"],
                "chains": {chain: [f"-p tcp -m tcp --dport {8000 + n} -j DNAT --to-destination 10.0.1.{n}:80"]},
                "rules": [["CNI-HOSTPORT-DNAT",
                           f'-p tcp -m comment --comment "dnat name: \\"net\\" id: \\"c{n}\\"" '
                           f"-m multiport --dports {8000 + n} -j {chain}"],
                          ["PREROUTING", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"],
                          ["OUTPUT", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"]]}

    for n in (1, 2):
        drive(ns, lock_dir, variant, "converge", container(n))
    dnat = [line for line in rules_of(ns, variant) if line.startswith("-A CNI-HOSTPORT-DNAT")]
    assert dnat == ["-A CNI-HOSTPORT-DNAT -p udp -j RETURN",
                    f'-A CNI-HOSTPORT-DNAT {container(1)["rules"][0][1]}',
                    f'-A CNI-HOSTPORT-DNAT {container(2)["rules"][0][1]}']
    assert sum(line.endswith("-j CNI-HOSTPORT-DNAT") for line in rules_of(ns, variant)) == 2
    # DEL of container 1 without its mappings: drop its chain, which takes its entry rule along.
    removed = drifts(drive(ns, lock_dir, variant, "remove", table="nat", chains=[f"CNI-DN-{1:021x}"]))
    assert removed == [Drift("nat", f"CNI-DN-{1:021x}", "chain present")]
    dnat = [line for line in rules_of(ns, variant) if line.startswith("-A CNI-HOSTPORT-DNAT")]
    assert dnat == ["-A CNI-HOSTPORT-DNAT -p udp -j RETURN", f'-A CNI-HOSTPORT-DNAT {container(2)["rules"][0][1]}']
    assert drifts(drive(ns, lock_dir, variant, "check", container(2))) == []
    # Removing what is already gone is fine, also a rule whose target chain no longer exists.
    again = drive(ns, lock_dir, variant, "remove", table="nat", chains=[f"CNI-DN-{1:021x}", "NEVER-WAS"],
                  rules=[["CNI-HOSTPORT-DNAT", container(1)["rules"][0][1]], ["NO-SUCH-CHAIN", "-j RETURN"]])
    assert drifts(again) == []


def test_first_rules_stay_in_the_given_order_above_others(make_netns, lock_dir, variant):
    ns = make_netns("first")
    ipt(ns, variant, "-t", "mangle", "-A", "PREROUTING", "-j", "RETURN")
    state = {"table": "mangle", "rules": [
        ["PREROUTING", "-i eth0 -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80",
         True],
        ["PREROUTING", "-i eni+ -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80", True]]}
    drive(ns, lock_dir, variant, "converge", state)
    assert rules_of(ns, variant, "mangle") == [f"-A PREROUTING {r[1]}" for r in state["rules"]] + \
        ["-A PREROUTING -j RETURN"]


def test_ipv6_tables(make_netns, lock_dir, variant):
    ns = make_netns("six")
    state = {"table": "nat", "chains": {"CNI-HOSTPORT-MASQ": ["-m mark --mark 0x2000/0x2000 -j MASQUERADE"]},
             "rules": [["POSTROUTING", '-m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ',
                        True], ["OUTPUT", "-d fd00::1/128 -j RETURN"]]}
    drive(ns, lock_dir, variant, "converge", state, ipv6=True)
    assert drive(ns, lock_dir, variant, "converge", state, ipv6=True)["runs"] == [[]]
    assert rules_of(ns, variant, ipv6=True) == [
        "-A OUTPUT -d fd00::1/128 -j RETURN", f"-A POSTROUTING {state['rules'][0][1]}",
        "-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE"]
    assert rules_of(ns, variant) == []


# ---------------------------------------------------------------------------------------------
# Errors: clear, specific, and nothing changed


@pytest.mark.parametrize("bad, says", [
    ("-j NO-SUCH-CHAIN", "NO-SUCH-CHAIN"),
    ("-m bogus --x 1 -j RETURN", "bogus"),
    ("-d 10.0.0.300/16 -j RETURN", "10.0.0.300"),
])
def test_a_rule_iptables_refuses_is_named_and_nothing_changes(make_netns, lock_dir, variant, bad, says):
    ns = make_netns("bad")
    state = {"table": "nat", "chains": {"GOOD": ["-j RETURN"], "ALSO": ["-d 10.0.0.0/8 -j RETURN", bad]},
             "rules": [["POSTROUTING", "-j GOOD"]]}
    answer = drive(ns, lock_dir, variant, "converge", state)
    assert answer["table"] == "nat"
    assert answer["rule"] == f"-A ALSO {bad}"
    assert f"refuses rule '-A ALSO {bad}' in table nat" in answer["error"]
    assert says in answer["error"].split("in table nat: ", 1)[1]  # iptables' own message
    assert rules_of(ns, variant) == []
    assert "GOOD" not in chains_of(ns, variant)


def test_a_table_holding_a_base_chain_iptables_cannot_read_is_refused_by_name(make_netns, lock_dir):
    """A base chain made with nft under a name iptables does not know (on PREROUTING's hook) stays
    unreadable however often iptables-nft-save is asked: the answer names the table, nothing changes."""
    ns = make_netns("taint")
    netns.run(["nft", "add", "table", "ip", "nat"], netns=ns)
    netns.run(["nft", "add", "chain", "ip", "nat", "foreign_pre",
               "{ type nat hook prerouting priority -100; policy accept; }"], netns=ns)
    before = netns.run(["nft", "list", "ruleset"], netns=ns).stdout
    answer = drive(ns, lock_dir, "nft", "converge", {"table": "nat", "chains": {"GOOD": ["-j RETURN"]},
                                                    "rules": [["POSTROUTING", "-j GOOD"]]})
    assert "contains incompatible base-chains" in answer["error"] and answer["table"] == "nat", answer
    assert netns.run(["nft", "list", "ruleset"], netns=ns).stdout == before


def test_waiting_too_long_for_our_lock_is_an_error(make_netns, lock_dir):
    ns = make_netns("lock")
    os.makedirs(lock_dir)
    with open(os.path.join(lock_dir, "netfilter.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        answer = drive(ns, lock_dir, "nft", "converge", NAT, wait=0.3)
    assert "held" in answer["error"] and "more than 0.3 s" in answer["error"]
    assert rules_of(ns, "nft") == []


@pytest.mark.parametrize("mode, says", [("legacy", "holding the xtables lock"), ("iptc", "for more than 1 s")])
def test_legacy_writers_honour_the_xtables_lock(make_netns, lock_dir, tmp_path, mode, says):
    """Another iptables-legacy user holding the xtables lock: we wait, then fail clearly, untouched."""
    ns = make_netns("xlock")
    _legacy_rules(ns)
    xtables_lock = str(tmp_path / "xtables.lock")
    with open(xtables_lock, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        answer = drive(ns, lock_dir, mode, "converge", NAT, wait=1, env=dict(os.environ, XTABLES_LOCKFILE=xtables_lock))
    assert says in answer["error"]
    assert rules_of(ns, "legacy") == []
    assert drifts(drive(ns, lock_dir, mode, "converge", NAT, env=dict(os.environ, XTABLES_LOCKFILE=xtables_lock)))
    assert rules_of(ns, "legacy") == NAT_LINES


# ---------------------------------------------------------------------------------------------
# python-iptables backend


def test_iptc_is_refused_on_an_nf_tables_host(make_netns, lock_dir):
    ns = make_netns("iptc")
    _nft_rules(ns)
    answer = drive(ns, lock_dir, "iptc", "converge", NAT)
    assert "netfilter mode 'iptc' refused" in answer["error"] and "nf_tables" in answer["error"]
    assert rules_of(ns, "legacy") == [] and len(rules_of(ns, "nft", "filter")) == 3


def test_iptc_backend_on_a_legacy_host(make_netns, lock_dir):
    ns = make_netns("iptc")
    _legacy_rules(ns)
    answer = drive(ns, lock_dir, "iptc", "converge", NAT)
    assert (answer["variant"], answer["backend"]) == ("legacy", "iptc")
    assert rules_of(ns, "legacy", "nat") == NAT_LINES
    assert rules_of(ns, "nft") == []  # written to the legacy tables only
    assert drifts(drive(ns, lock_dir, "legacy", "check", NAT)) == []  # same words as iptables-legacy's
    assert drive(ns, lock_dir, "iptc", "converge", NAT, repeat=3)["runs"] == [[]] * 3
    ipt(ns, "legacy", "-t", "nat", "-A", "POSTROUTING", *split_spec(SNAT_JUMP))
    ipt(ns, "legacy", "-t", "nat", "-D", "PREROUTING", *split_spec(CONNMARK_RESTORE))
    assert [(d.chain, d.problem) for d in drifts(drive(ns, lock_dir, "iptc", "converge", NAT_LOOSE))] == [
        ("AWS-SNAT-CHAIN-0", "rule missing"), ("AWS-SNAT-CHAIN-0", "rule missing"),
        ("AWS-SNAT-CHAIN-0", "unexpected rule"), ("AWS-SNAT-CHAIN-0", "unexpected rule"),
        ("POSTROUTING", "duplicate rule"), ("PREROUTING", "rule missing")]
    assert rules_of(ns, "legacy", "nat") == NAT_LOOSE_LINES
    drive(ns, lock_dir, "iptc", "remove", table="nat", chains=["AWS-SNAT-CHAIN-0"],
          rules=[["PREROUTING", CONNMARK_RESTORE]])
    assert rules_of(ns, "legacy", "nat") == []
    negated = {"table": "mangle", "rules": [
        ["PREROUTING", "! -s 10.0.0.0/8 -i eni+ -p udp -m udp ! --dport 53 -j CONNMARK --set-xmark 0x80/0x80"]]}
    drive(ns, lock_dir, "iptc", "converge", negated)
    assert rules_of(ns, "legacy", "mangle") == [f"-A PREROUTING {negated['rules'][0][1]}"]
    assert drifts(drive(ns, lock_dir, "legacy", "check", negated)) == []
    assert rules_of(ns, "legacy", "filter") == ["-A INPUT -j ACCEPT", "-A OUTPUT -j ACCEPT"]


# ---------------------------------------------------------------------------------------------
# Concurrency: many plugin processes at once


def _all_at_once(ns, lock_dir, mode, requests):
    start_at = time.time() + 1.5
    procs = [subprocess.Popen(driver_cmd(ns), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in requests]
    try:
        for proc, request in zip(procs, requests):
            proc.stdin.write(json.dumps(dict(mode=mode, lock_dir=lock_dir, start_at=start_at, **request)))
            proc.stdin.close()
        answers = []
        for proc in procs:
            proc.wait(timeout=120)
            answers.append(json.loads(proc.stdout.read()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for answer in answers:
        assert "error" not in answer, answer["error"]
    return answers


def test_concurrent_converges_leave_exactly_one_copy(make_netns, lock_dir, variant):
    ns = make_netns("race")
    n = 8
    # The same node rules from every process (worded loosely, so each needs iptables' wording first).
    answers = _all_at_once(ns, lock_dir, variant, [{"op": "converge", "states": [NAT_LOOSE]}] * n)
    assert sorted(len(drifts(answer)) for answer in answers) == [0] * (n - 1) + [3]  # one did the work
    assert rules_of(ns, variant) == NAT_LOOSE_LINES
    # portmap-compat's pattern: each process adds one container's chain and entry rule to a shared chain.
    states = [{"table": "nat", "shared_chains": ["CNI-HOSTPORT-DNAT"],
               "chains": {f"CNI-DN-{i}": [f"-p tcp --dport {9000 + i} -j DNAT --to-destination 10.0.1.{i}:80"]},
               "rules": [["CNI-HOSTPORT-DNAT", f"-p tcp --dport {9000 + i} -j CNI-DN-{i}"],
                         ["OUTPUT", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"]]}
              for i in range(n)]
    _all_at_once(ns, lock_dir, variant, [{"op": "converge", "states": [state]} for state in states])
    lines = rules_of(ns, variant)
    assert [line for line in lines if not line.startswith(("-A CNI-", "-A OUTPUT"))] == NAT_LOOSE_LINES
    assert lines.count("-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT") == 1
    assert sorted(line for line in lines if line.startswith("-A CNI-HOSTPORT-DNAT")) == sorted(
        f"-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport {9000 + i} -j CNI-DN-{i}" for i in range(n))
    _all_at_once(ns, lock_dir, variant, [
        {"op": "remove", "table": "nat", "chains": [f"CNI-DN-{i}"]} for i in range(n)])
    lines = rules_of(ns, variant)
    assert not [line for line in lines if line.startswith("-A CNI-")]
    assert "CNI-HOSTPORT-DNAT" in chains_of(ns, variant)
