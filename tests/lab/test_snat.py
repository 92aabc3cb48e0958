"""aws-snat (issue 6 item 2): the node's SNAT and connmark rules.

Three levels: the rule rendering for each setting combination (pure); the plugin binary in namespaces
of this run (both netfilter variants: the mode is per namespace, forced with `netfilterMode`); and the
plugin in the VPC lab's nodes, alone and in the real chain through cnitool, with traffic to the
internet host, an excluded CIDR, the other node and its pods, and NodePort-style DNAT.
Nothing here touches the root namespace's netfilter or rules.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from aws_snat import noderules as snat
from cnicore import settings
from cnicore.netfilter import Rule, TableState
from cnicore.netfilter.model import split_spec
from cnicore.pool import new_document
from cnicore.store import Store
from support.paths import ROOT

BIN = os.path.join(sys.prefix, "bin")
PLUGIN = os.path.join(BIN, "aws-snat")
NETWORK = "aws-vpc"
VARIANTS = ("nft", "legacy")
MAC = "02:00:00:00:5a:01"
PRIMARY_IP = "10.0.0.10"
VPC = "10.0.0.0/16"
PREV = {"cniVersion": "1.0.0",
        "interfaces": [{"name": "eni0123456789a", "mac": "aa:bb:cc:dd:ee:01"},
                       {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/pod"}],
        "ips": [{"address": "10.0.0.20/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}], "dns": {}}

# The node rules of ARCHITECTURE §5 for PRIMARY_IP / VPC / MAC on eth0 with default settings,
# as iptables-save prints them.
SNAT_JUMP = '-m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0'
CONNMARK_JUMP = '-i eni+ -m comment --comment "AWS, outbound connections" -j AWS-CONNMARK-CHAIN-0'
CONNMARK_RESTORE = '-m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80'
SNAT_RULE = ('-m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL '
             '-j SNAT --to-source 10.0.0.10 --random-fully')
CONNMARK_SET = '-m comment --comment "AWS, CONNMARK" -j CONNMARK --set-xmark 0x80/0x80'
NODEPORT_MARK = ('-i eth0 -m comment --comment "AWS, primary ENI" -m addrtype --dst-type LOCAL --limit-iface-in '
                 '-j CONNMARK --set-xmark 0x80/0x80')
VETH_RESTORE = '-i eni+ -m comment --comment "AWS, primary ENI" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80'
# RETURN rules with upstream's comments (pkg/networkutils/network.go, SetupHostNetwork)
SNAT_VPC = '-m comment --comment "AWS SNAT CHAIN" -j RETURN'
SNAT_EXCLUDED = '-m comment --comment "AWS SNAT CHAIN EXCLUSION" -j RETURN'
CONNMARK_VPC = '-m comment --comment "AWS CONNMARK CHAIN, VPC CIDR" -j RETURN'
CONNMARK_EXCLUDED = '-m comment --comment "AWS CONNMARK CHAIN, EXCLUDED CIDR" -j RETURN'
DEFAULT_NAT = {
    "PREROUTING": [CONNMARK_JUMP, CONNMARK_RESTORE],
    "POSTROUTING": [SNAT_JUMP],
    "AWS-CONNMARK-CHAIN-0": [f"-d 10.0.0.0/16 {CONNMARK_VPC}", CONNMARK_SET],
    "AWS-SNAT-CHAIN-0": [f"-d 10.0.0.0/16 {SNAT_VPC}", SNAT_RULE],
}
DEFAULT_MANGLE = {"PREROUTING": [NODEPORT_MARK, VETH_RESTORE]}
FWMARK_RULE = "1024:\tfrom all fwmark 0x80/0x80 lookup main proto boot"
IP = shutil.which("ip")


def cfg(**overrides) -> settings.SNAT:
    """Settings as the plugin parses them, from conflist keys."""
    return settings.from_conf(overrides, settings.SNAT)


NODE = snat.Node(PRIMARY_IP, MAC, (VPC,), "test")


# ---------------------------------------------------------------------------------------------
# Rendering (pure): every setting combination


def test_default_settings_render_the_rules_of_section_5():
    want = snat.desired(cfg(), NODE, "eth0")
    assert want.nat == TableState("nat", chains={
        "AWS-SNAT-CHAIN-0": [f"-d 10.0.0.0/16 {SNAT_VPC}", SNAT_RULE],
        "AWS-CONNMARK-CHAIN-0": [f"-d 10.0.0.0/16 {CONNMARK_VPC}", CONNMARK_SET],
    }, rules=[Rule("POSTROUTING", SNAT_JUMP), Rule("PREROUTING", CONNMARK_JUMP), Rule("PREROUTING", CONNMARK_RESTORE)])
    assert want.mangle == TableState("mangle", rules=[Rule("PREROUTING", NODEPORT_MARK),
                                                      Rule("PREROUTING", VETH_RESTORE)])
    assert want.fwmark is True and want.loose_rp_filter == "eth0"


@pytest.mark.parametrize("randomize,tail", [("prng", " --random-fully"), ("hashrandom", " --random"), ("none", "")])
def test_randomize_snat_picks_the_snat_flag(randomize, tail):
    chain = snat.desired(cfg(randomizeSNAT=randomize), NODE, "eth0").nat.chains["AWS-SNAT-CHAIN-0"]
    assert chain[-1] == ('-m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL '
                         f'-j SNAT --to-source 10.0.0.10{tail}')


def test_every_vpc_and_excluded_cidr_returns_once_in_order_before_the_snat_and_the_mark():
    node = NODE._replace(vpc_cidrs=("10.0.0.0/16", "100.64.0.0/16"))
    want = snat.desired(cfg(excludeSNATCIDRs="198.51.100.0/24, 10.0.0.0/16,192.0.2.0/25,0.0.0.0/0"), node, "eth0")
    # an excluded CIDR that is the VPC's returns once, as the VPC's; iptables-save omits a match-all destination
    vpc, excluded = ["-d 10.0.0.0/16 ", "-d 100.64.0.0/16 "], ["-d 198.51.100.0/24 ", "-d 192.0.2.0/25 ", ""]
    assert want.nat.chains["AWS-SNAT-CHAIN-0"] == [*(d + SNAT_VPC for d in vpc), *(d + SNAT_EXCLUDED for d in excluded),
                                                   SNAT_RULE]
    assert want.nat.chains["AWS-CONNMARK-CHAIN-0"] == [*(d + CONNMARK_VPC for d in vpc),
                                                       *(d + CONNMARK_EXCLUDED for d in excluded), CONNMARK_SET]


def test_external_snat_removes_both_nat_chains_and_keeps_node_port_marking():
    want = snat.desired(cfg(externalSNAT=True), NODE, "eth0")
    assert want.nat == TableState("nat", absent_chains=["AWS-SNAT-CHAIN-0", "AWS-CONNMARK-CHAIN-0"])
    assert want.mangle.rules == [Rule("PREROUTING", NODEPORT_MARK), Rule("PREROUTING", VETH_RESTORE)]
    assert want.fwmark is True and want.loose_rp_filter == "eth0"


def test_without_node_port_support_snat_still_restores_the_mark_on_every_packet():
    # SNAT'd connections of secondary-ENI pods need the mark on every packet, not only the first one
    # the nat table sees; their replies arrive on the primary ENI for a pod routed by another ENI.
    want = snat.desired(cfg(nodePortSupport=False), NODE, "eth0")
    assert set(want.nat.chains) == {"AWS-SNAT-CHAIN-0", "AWS-CONNMARK-CHAIN-0"}
    assert want.mangle.rules == [Rule("PREROUTING", VETH_RESTORE)]
    assert want.fwmark is True and want.loose_rp_filter == "eth0"


def test_external_snat_without_node_port_support_marks_nothing():
    want = snat.desired(cfg(externalSNAT="true", nodePortSupport="false"), NODE, None)
    assert want == snat.Desired(TableState("nat", absent_chains=["AWS-SNAT-CHAIN-0", "AWS-CONNMARK-CHAIN-0"]),
                                TableState("mangle", rules=[]), False, None)


def test_mark_and_veth_prefix_are_used_everywhere():
    want = snat.desired(cfg(connmark="0x4000", vethPrefix="veth"), NODE, "ens5")
    text = json.dumps([want.nat.chains, want.nat.rules, want.mangle.rules])
    assert "0x80" not in text and "eni+" not in text and "eth0" not in text
    assert Rule("PREROUTING", '-i veth+ -m comment --comment "AWS, outbound connections" '
                              '-j AWS-CONNMARK-CHAIN-0') in want.nat.rules
    assert want.nat.chains["AWS-CONNMARK-CHAIN-0"][-1].endswith("--set-xmark 0x4000/0x4000")
    assert want.mangle.rules[0].spec.startswith("-i ens5 ")
    assert want.mangle.rules[1].spec.endswith("--restore-mark --nfmask 0x4000 --ctmask 0x4000")


BAD_SETTINGS = [
    ({"excludeSNATCIDRs": ["10.0.0.1/16"]}, "excludeSNATCIDRs"),   # host bits set
    ({"excludeSNATCIDRs": "banana"}, "excludeSNATCIDRs"),
    ({"excludeSNATCIDRs": ["2001:db8::/32"]}, "excludeSNATCIDRs"),
    ({"connmark": 0}, "connmark"),
    ({"connmark": "0x1ffffffff"}, "connmark"),
    ({"connmark": "mark"}, "connmark"),
    ({"randomizeSNAT": "yes"}, "randomizeSNAT"),
    ({"externalSNAT": "maybe"}, "externalSNAT"),
    ({"vethPrefix": "eth"}, "vethPrefix"),
    ({"netfilterMode": "iptables"}, "netfilterMode"),
]


@pytest.mark.parametrize("bad,key", BAD_SETTINGS)
def test_bad_settings_are_config_errors_naming_the_setting(bad, key):
    with pytest.raises(settings.SettingError) as err:
        cfg(**bad)
    assert err.value.code == 7 and key in err.value.msg


# ---------------------------------------------------------------------------------------------
# The plugin binary in a namespace of this run


class NodeNs:
    """A namespace standing in for a node: eth0 (a veth) with the primary ENI's MAC and IP, strict
    rp_filter as on an EKS node, and a state store document with the node facts."""

    def __init__(self, make_netns, tmp_path, doc=True):
        self.ns = make_netns("snat")
        self.data_dir = str(tmp_path / "data")
        self.log_file = str(tmp_path / "plugin.log")
        self.sh(f"ip link add eth0 address {MAC} type veth peer name peer0 && ip link set lo up && "
                f"ip link set eth0 up && ip link set peer0 up && ip addr add {PRIMARY_IP}/24 dev eth0 && "
                "sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.eth0.rp_filter=1")
        if doc:
            with Store(self.data_dir, NETWORK).locked() as tx:
                tx.write(new_document({"primary_ip": PRIMARY_IP, "primary_mac": MAC, "vpc_cidrs": [VPC]}))

    def sh(self, script: str, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, "sh", "-ec", script], capture_output=True, text=True,
                              check=check, timeout=60)

    def conf(self, prev=PREV, version="1.0.0", **keys) -> dict:
        conf = {"cniVersion": version, "name": NETWORK, "type": "aws-snat", "dataDir": self.data_dir,
                "pluginLogFile": self.log_file, **keys}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def run(self, command, conf, netns=None, wait=True, path=None):
        """Run the plugin in the namespace; `path`: its PATH (e.g. one without iptables)."""
        env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID="c1", CNI_IFNAME="eth0", CNI_PATH=BIN,
                   CNI_NETNS=netns if netns is not None else f"/var/run/netns/{self.ns}")
        if path is not None:
            env["PATH"] = path
        proc = subprocess.Popen([IP, "netns", "exec", self.ns, PLUGIN], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if not wait:
            proc.stdin.write(json.dumps(conf))
            proc.stdin.close()
            return proc
        out, _ = proc.communicate(json.dumps(conf), timeout=120)
        return proc.returncode, (json.loads(out) if out.strip() else None)

    def add(self, **keys):
        rc, out = self.run("ADD", self.conf(**keys))
        assert rc == 0, out
        return out

    def tables(self, variant) -> dict:
        return saved_tables(self.sh(f"iptables-{variant}-save").stdout)

    def ip_rules(self) -> list[str]:
        return [line for line in self.sh("ip -4 rule show").stdout.splitlines() if line.startswith("1024:")]

    def rp_filter(self) -> str:
        return self.sh("cat /proc/sys/net/ipv4/conf/eth0/rp_filter").stdout.strip()

    def converged_lines(self) -> list:
        """What the plugin logged as fixed, per invocation that fixed something."""
        if not os.path.exists(self.log_file):
            return []
        with open(self.log_file) as f:
            return [rec["fixed"] for rec in map(json.loads, f) if rec.get("msg") == "node rules converged"]


def saved_tables(text: str) -> dict:
    """iptables-save output as {table: {chain: [rule specs]}}: user chains, and built-in ones with rules."""
    tables, table = {}, None
    for line in text.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":") and table is not None:
            name, policy = line[1:].split()[:2]
            if policy == "-":  # a user chain
                table.setdefault(name, [])
        elif line.startswith("-A ") and table is not None:
            _, chain, spec = line.split(" ", 2)
            table.setdefault(chain, []).append(spec)
    return {name: chains for name, chains in tables.items() if chains}


def ours(tables: dict) -> dict:
    return {t: tables[t] for t in ("nat", "mangle") if t in tables}


def expected_tables(keys, facts):
    """The nat and mangle rules `desired` renders, shaped as `ours(saved_tables(...))` reads them."""
    want = snat.desired(cfg(**keys), facts, "eth0")
    tables = {"nat": {}, "mangle": {}}
    for state in (want.nat, want.mangle):
        for rule in state.rules:
            tables[state.table].setdefault(rule.chain, []).append(rule.spec)
        tables[state.table].update(state.chains)
    return {t: c for t, c in tables.items() if c}


@pytest.fixture
def node(make_netns, tmp_path):
    return NodeNs(make_netns, tmp_path)


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


COMBOS = [
    {},
    {"externalSNAT": True},
    {"nodePortSupport": False},
    {"externalSNAT": True, "nodePortSupport": False},
    {"randomizeSNAT": "hashrandom", "excludeSNATCIDRs": ["198.51.100.0/24", "0.0.0.0/0"]},
    {"randomizeSNAT": "none", "connmark": "0x4000", "vethPrefix": "veth"},
]


@pytest.mark.parametrize("keys", COMBOS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults")
def test_add_writes_the_rendered_rules_word_for_word_and_only_in_its_variant(node, variant, keys):
    out = node.add(netfilterMode=variant, **keys)
    assert out == PREV
    want = snat.desired(cfg(**keys), NODE, "eth0")
    # the rules as rendered are exactly what iptables-save prints: steady state costs one save per table
    assert ours(node.tables(variant)) == expected_tables(keys, NODE)
    assert node.tables({"nft": "legacy", "legacy": "nft"}[variant]) == {}
    mark = cfg(**keys).connmark
    assert node.ip_rules() == ([f"1024:\tfrom all fwmark {mark:#x}/{mark:#x} lookup main proto boot"]
                               if want.fwmark else [])
    assert node.rp_filter() == ("2" if want.loose_rp_filter else "1")
    assert len(node.converged_lines()) == (1 if want.fwmark else 0)  # nothing to do for the last combination
    node.add(netfilterMode=variant, **keys)
    assert len(node.converged_lines()) == (1 if want.fwmark else 0), "a second ADD changed something"
    assert node.run("CHECK", node.conf(netfilterMode=variant, **keys)) == (0, None)


def test_auto_mode_writes_into_the_variant_that_holds_the_rules(node):
    node.sh("iptables-legacy -t filter -A INPUT -s 192.0.2.1 -j DROP")
    node.add()
    assert ours(node.tables("legacy")) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
    assert node.tables("nft") == {}


def test_concurrent_adds_write_every_rule_and_the_ip_rule_once(node, variant):
    procs = [node.run("ADD", node.conf(netfilterMode=variant), wait=False) for _ in range(12)]
    for proc in procs:
        out = proc.stdout.read()
        assert proc.wait(120) == 0, out
        proc.stdout.close()
        proc.stderr.close()
    assert ours(node.tables(variant)) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
    assert node.ip_rules() == [FWMARK_RULE]


def test_rules_of_others_are_never_touched(node, variant):
    ipt = f"iptables-{variant} -w"
    node.sh(f"""
        {ipt} -t nat -N KUBE-SERVICES
        {ipt} -t nat -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
        {ipt} -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
        {ipt} -t mangle -A PREROUTING -i eth0 -j MARK --set-xmark 0x4000/0x4000
        ip rule add pref 1024 iif eth0 fwmark 0x80/0x80 lookup main
        ip rule add pref 1000 fwmark 0x100 lookup 100
    """)
    before = node.tables(variant)
    foreign_rules = node.ip_rules()
    node.add(netfilterMode=variant)
    after = node.tables(variant)
    assert after["nat"]["PREROUTING"][0] == before["nat"]["PREROUTING"][0]  # ours are appended
    assert after["nat"]["POSTROUTING"][0] == before["nat"]["POSTROUTING"][0]
    assert after["nat"]["KUBE-SERVICES"] == []
    assert after["mangle"]["PREROUTING"][0] == before["mangle"]["PREROUTING"][0]
    node.add(netfilterMode=variant, externalSNAT=True, nodePortSupport=False)
    assert node.tables(variant) == before
    assert node.ip_rules() == foreign_rules
    assert "1000:\tfrom all fwmark 0x100 lookup 100" in node.sh("ip rule").stdout


def test_rules_left_by_earlier_settings_or_upstream_are_replaced(node, variant):
    ipt = f"iptables-{variant} -w"
    # upstream 1.1 wrote its SNAT rule straight into POSTROUTING
    node.sh(f"""{ipt} -t nat -A POSTROUTING ! -d 10.0.0.0/16 -m comment --comment "AWS, SNAT" \
                  -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10""")
    node.add(netfilterMode=variant, connmark="0x4000", vethPrefix="veth")
    node.add(netfilterMode=variant)
    assert ours(node.tables(variant)) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
    assert node.ip_rules() == [FWMARK_RULE]
    assert node.run("CHECK", node.conf(netfilterMode=variant)) == (0, None)


@pytest.mark.parametrize("bad,key", BAD_SETTINGS)
def test_a_bad_setting_is_code_7_and_touches_no_rule(node, bad, key):
    for command in ("ADD", "CHECK", "GC", "STATUS"):
        rc, err = node.run(command, node.conf(version="1.1.0", **bad))
        assert rc == 1 and err["code"] == 7 and key in err["msg"], (command, err)
    assert node.tables("nft") == {} and node.tables("legacy") == {}
    assert node.ip_rules() == [] and node.rp_filter() == "1"


def test_without_prev_result_add_and_check_are_errors_and_change_nothing(node):
    rc, err = node.run("ADD", node.conf(prev=None))
    assert rc == 1 and err["code"] == 7 and err["msg"] == "must be called as chained plugin"
    rc, err = node.run("CHECK", node.conf(prev=None))
    assert rc == 1 and err["code"] == 7 and err["msg"] == "required prevResult missing"
    assert node.tables("nft") == {} and node.ip_rules() == []


PREV_BY_VERSION = {
    "0.3.1": {"cniVersion": "0.3.1", "interfaces": PREV["interfaces"],
              "ips": [{"version": "4", "address": "10.0.0.20/32", "gateway": "169.254.1.1", "interface": 1}],
              "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}], "dns": {"nameservers": ["10.0.0.2"]}},
    "0.4.0": {"cniVersion": "0.4.0", "interfaces": PREV["interfaces"],
              "ips": [{"version": "4", "address": "10.0.0.20/32", "interface": 1}], "dns": {}},
    "1.0.0": PREV,
    "1.1.0": {**PREV, "cniVersion": "1.1.0", "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1500}]},
}


@pytest.mark.parametrize("version", PREV_BY_VERSION)
def test_prev_result_passes_through_unchanged(node, version):
    prev = PREV_BY_VERSION[version]
    assert node.add(prev=prev, version=version) == prev


def test_del_always_succeeds_and_leaves_the_node_rules_to_the_other_pods(node):
    node.add()
    before = node.tables("nft")
    for conf, netns in ((node.conf(), None), (node.conf(prev=None), ""), (node.conf(connmark="bad"), ""),
                        (node.conf(netfilterMode="iptc"), None)):
        assert node.run("DEL", conf, netns=netns) == (0, None)
    assert node.tables("nft") == before and node.ip_rules() == [FWMARK_RULE]


def test_gc_converges_again_and_carries_on_past_errors(node):
    node.add()
    node.sh(f'iptables-nft -t nat -D AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 {SNAT_VPC}; ip rule del pref 1024')
    assert node.run("GC", node.conf(prev=None, version="1.1.0", **{"cni.dev/valid-attachments": []})) == (0, None)
    assert ours(node.tables("nft")) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
    assert node.ip_rules() == [FWMARK_RULE]
    # iptc refused on this nf_tables namespace: logged, GC still exits 0
    assert node.run("GC", node.conf(prev=None, version="1.1.0", netfilterMode="iptc")) == (0, None)


def test_an_add_that_finds_our_ip_rule_leaves_others_at_its_priority_to_gc_and_the_agent(node):
    """A pod's ADD makes sure of rule 1024 with one request, without listing the node's rules (two per
    pod); an ADD that had to add ours, like GC and the agent's rounds, also removes another mark's
    rule at that priority."""
    stale = "1024:\tfrom all fwmark 0x4000/0x4000 lookup main proto boot"
    node.add()
    node.sh("ip rule add pref 1024 fwmark 0x4000/0x4000 lookup main proto boot")
    node.add()
    assert sorted(node.ip_rules()) == sorted([FWMARK_RULE, stale])
    assert node.run("GC", node.conf(prev=None, version="1.1.0", **{"cni.dev/valid-attachments": []})) == (0, None)
    assert node.ip_rules() == [FWMARK_RULE]
    node.sh("ip rule del pref 1024; ip rule add pref 1024 fwmark 0x4000/0x4000 lookup main proto boot")
    node.add()
    assert node.ip_rules() == [FWMARK_RULE]


def test_status_is_ok_when_netfilter_works_and_unavailable_when_it_does_not(node):
    assert node.run("STATUS", node.conf(prev=None, version="1.1.0")) == (0, None)
    rc, err = node.run("STATUS", node.conf(prev=None, version="1.1.0", netfilterMode="iptc"))
    assert rc == 1 and err["code"] == 50 and "iptc" in err["msg"]


def test_check_names_each_difference_and_add_repairs_them_in_order(node, variant):
    node.add(netfilterMode=variant)
    ipt = f"iptables-{variant} -w"
    node.sh(f"""
        {ipt} -t nat -D PREROUTING {CONNMARK_JUMP}
        {ipt} -t nat -A AWS-SNAT-CHAIN-0 -d 192.0.2.0/24 -j RETURN
        {ipt} -t mangle -D PREROUTING {VETH_RESTORE}
        ip rule del pref 1024
        sysctl -qw net.ipv4.conf.eth0.rp_filter=1
    """)
    rc, err = node.run("CHECK", node.conf(netfilterMode=variant))
    assert rc == 1 and err["code"] == 104
    for missing in (f"nat/PREROUTING: rule missing: {CONNMARK_JUMP}",
                    "nat/AWS-SNAT-CHAIN-0: unexpected rule: -d 192.0.2.0/24 -j RETURN",
                    f"mangle/PREROUTING: rule missing: {VETH_RESTORE}",
                    "ip rule missing: 1024: from all fwmark 0x80/0x80 lookup main",
                    "rp_filter of eth0 is 1, not 2 (loose)"):
        assert missing in err["msg"]
    node.add(netfilterMode=variant)
    # the jump to the connmark chain is back before the restore rule, as a first packet needs
    assert ours(node.tables(variant)) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
    assert node.run("CHECK", node.conf(netfilterMode=variant)) == (0, None)
    assert node.ip_rules() == [FWMARK_RULE] and node.rp_filter() == "2"


def test_without_the_primary_mac_on_the_node_add_fails_before_any_rule(make_netns, tmp_path):
    node = NodeNs(make_netns, tmp_path, doc=False)
    with Store(node.data_dir, NETWORK).locked() as tx:
        tx.write(new_document({"primary_ip": PRIMARY_IP, "primary_mac": "02:00:00:00:00:99", "vpc_cidrs": [VPC]}))
    rc, err = node.run("ADD", node.conf())
    assert rc == 1 and err["code"] == 102 and "02:00:00:00:00:99" in err["msg"]
    assert node.tables("nft") == {}


def test_node_desired_is_the_state_add_converges_to_from_the_store_and_the_primary_interface(node):
    """The agent converges the node every round through `node_desired`, from its settings alone."""
    keys = {"randomizeSNAT": "hashrandom", "excludeSNATCIDRs": ["198.51.100.0/24"], "dataDir": node.data_dir}
    script = ("import json, sys; from aws_snat import noderules as snat; from cnicore import settings; "
              "cfg = settings.from_conf(json.loads(sys.argv[1]), settings.SNAT); "
              "print(json.dumps(snat.node_desired(cfg, sys.argv[2]), default=repr))")
    out = subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-c", script, json.dumps(keys), NETWORK],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out) == json.loads(json.dumps(snat.desired(cfg(**keys), NODE, "eth0"), default=repr))


# ---------------------------------------------------------------------------------------------
# The steady-state fast path (the stamp): taken only when nothing can have changed


# (netfilterMode, the variant the namespace uses): forced, and detected in each variant
MODES = [("nft", "nft"), ("legacy", "legacy"), ("auto", "nft"), ("auto", "legacy")]
NFT_RULES = "for i in $(seq 20); do iptables-nft -w -A INPUT -j ACCEPT; done"
NO_IPTABLES = "/nonexistent"  # a PATH without iptables: only an ADD or CHECK that runs none can succeed


@pytest.fixture(params=MODES, ids=lambda m: f"{m[0]}-{m[1]}")
def mode(request):
    return request.param


def stamped(node, mode, **keys):
    """The node after two ADDs: the first writes the rules, the second finds them in place and stamps."""
    netfilter_mode, variant = mode
    if netfilter_mode == "auto" and variant == "legacy":
        node.sh("iptables-legacy -w -t mangle -N KUBE-KUBELET-CANARY 2>/dev/null || true")  # kubelet's mark: legacy
    node.add(netfilterMode=netfilter_mode, **keys)
    node.add(netfilterMode=netfilter_mode, **keys)
    assert os.path.exists(stamp_path(node))
    return node.conf(netfilterMode=netfilter_mode, **keys)


def stamp_path(node):
    return os.path.join(node.data_dir, snat.STAMP_FILE)


def mine(node, variant) -> dict:
    """Our tables without the kubelet chain `stamped` made."""
    return {table: {chain: specs for chain, specs in chains.items() if not chain.startswith("KUBE-")}
            for table, chains in ours(node.tables(variant)).items()}


def test_a_stamped_add_and_check_run_no_iptables_and_still_mind_rule_1024_and_rp_filter(node, mode):
    conf = stamped(node, mode)
    before = node.tables(mode[1])
    for _ in range(3):
        assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)
        assert node.run("CHECK", conf, path=NO_IPTABLES) == (0, None)
    assert node.tables(mode[1]) == before
    # rule 1024 and rp_filter are not netfilter: looked at on every ADD and CHECK, stamp or not
    node.sh("ip rule del pref 1024; sysctl -qw net.ipv4.conf.eth0.rp_filter=1")
    rc, err = node.run("CHECK", conf, path=NO_IPTABLES)
    assert rc == 1 and err["code"] == 104
    assert "ip rule missing" in err["msg"] and "rp_filter of eth0 is 1" in err["msg"] and "nat/" not in err["msg"]
    assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)
    assert node.ip_rules() == [FWMARK_RULE] and node.rp_filter() == "2"
    # without the stamp the same ADD needs iptables
    os.unlink(stamp_path(node))
    rc, err = node.run("ADD", conf, path=NO_IPTABLES)
    assert rc == 1 and err["code"] == 103 and "not installed" in err["msg"]


@pytest.mark.parametrize("change", [
    "-t nat -D POSTROUTING " + SNAT_JUMP,
    "-t nat -D AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 " + SNAT_VPC,
    "-t nat -R AWS-SNAT-CHAIN-0 1 -d 10.1.0.0/16 " + SNAT_VPC,    # same size, another rule
    "-t nat -R AWS-SNAT-CHAIN-0 1 -d 10.0.0.0/16 -j RETURN",    # upstream 1.1's rule, without the comment
    "-t mangle -D PREROUTING " + VETH_RESTORE,
    "-t nat -F AWS-CONNMARK-CHAIN-0",
    "-t nat -I PREROUTING 1 " + CONNMARK_RESTORE,               # a duplicate, in the wrong place
], ids=["jump", "return", "replaced", "uncommented", "mangle", "flushed", "duplicate"])
def test_a_rule_changed_by_hand_after_a_stamped_add_is_repaired_by_the_next_add(node, mode, change):
    conf = stamped(node, mode)
    node.sh(f"iptables-{mode[1]} -w {change}")
    rc, err = node.run("CHECK", conf)
    assert rc == 1 and err["code"] == 104, err
    assert node.run("ADD", conf) == (0, PREV)
    assert mine(node, mode[1]) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
    assert node.run("CHECK", conf) == (0, None)
    assert node.converged_lines()[-1], "the repairing ADD logged nothing"


def test_a_setting_or_node_fact_changed_after_a_stamped_add_converges_again(node, mode):
    stamped(node, mode)
    variant = mode[1]
    keys = {"excludeSNATCIDRs": ["198.51.100.0/24"], "randomizeSNAT": "none"}
    node.add(netfilterMode=mode[0], **keys)
    assert mine(node, variant) == expected_tables(keys, NODE)
    stamped(node, mode)  # back to the defaults, stamped again
    assert mine(node, variant) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
    with Store(node.data_dir, NETWORK).locked() as tx:  # the node's primary IP as the store knows it
        doc = tx.read()
        doc["node"]["primary_ip"] = "10.0.0.11"
        tx.write(doc)
    node.add(netfilterMode=mode[0])
    assert mine(node, variant) == expected_tables({}, NODE._replace(primary_ip="10.0.0.11"))
    # external SNAT switched on: the nat chains go
    node.add(netfilterMode=mode[0], externalSNAT=True)
    assert "AWS-SNAT-CHAIN-0" not in node.tables(variant).get("nat", {})


def test_switching_the_mode_after_a_stamped_add_writes_into_the_new_variant(node):
    stamped(node, ("nft", "nft"))
    node.add(netfilterMode="legacy")
    assert ours(node.tables("legacy")) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff\xfe\x00" * 100, b"netfilter-stamp-v1 x y\n" * 1000,
                                     "directory", "symlink"])
def test_a_corrupt_stamp_counts_as_absent_and_is_never_an_error(node, variant, content, tmp_path):
    node.add(netfilterMode=variant)
    path = stamp_path(node)
    target = tmp_path / "elsewhere"
    if content == "directory":
        os.mkdir(path)
    elif content == "symlink":
        target.write_bytes(b"not ours")
        os.symlink(target, path)
    else:
        with open(path, "wb") as f:
            f.write(content)
    node.sh(f"iptables-{variant} -w -t nat -D POSTROUTING {SNAT_JUMP}")
    for _ in range(2):
        assert node.run("ADD", node.conf(netfilterMode=variant)) == (0, PREV)
        assert mine(node, variant) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}
        assert node.run("CHECK", node.conf(netfilterMode=variant)) == (0, None)
    if content == "directory":
        assert os.path.isdir(path)
    if content == "symlink":
        assert target.read_bytes() == b"not ours"  # never written through


def genid(node) -> int:
    return int(node.sh(f"{sys.executable} -c 'from cnicore import nftables; print(nftables.genid())'").stdout)


@pytest.mark.parametrize("netfilter_mode", ["nft", "auto"])
def test_a_stamp_of_another_namespace_is_not_trusted(make_netns, tmp_path, netfilter_mode):
    """A stamp copied from a namespace with our rules into one without them, with the very same desired
    rules, must not make the ADD skip its work; in auto mode without kubelet's hint, where the
    fingerprint is the nf_tables generation (the rules of both variants are counted), not even at the
    same generation and the same legacy tables: the generation is per namespace."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    node_a, node_b = NodeNs(make_netns, tmp_path / "a"), NodeNs(make_netns, tmp_path / "b")
    for node in (node_a, node_b):  # no hint, a legacy table: the variant is counted (nft has more rules)
        node.sh(f"iptables-legacy -w -A INPUT -j ACCEPT; {NFT_RULES}")
    stamped(node_a, (netfilter_mode, "nft"))
    with open(stamp_path(node_a), "rb") as f:
        stamp = f.read()
    if netfilter_mode == "auto":
        assert stamp.split()[3] == b"counted"
        generation = int(stamp.split()[4])
        for n in range(generation):  # bring b to the same generation without our rules
            if genid(node_b) >= generation:
                break
            node_b.sh(f"iptables-nft -w -t filter -N FILLER{n}")
        assert genid(node_b) == generation
    os.makedirs(node_b.data_dir, exist_ok=True)
    with open(stamp_path(node_b), "wb") as f:
        f.write(stamp)
    assert node_b.run("ADD", node_b.conf(netfilterMode=netfilter_mode)) == (0, PREV)
    assert ours(node_b.tables("nft")) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}


def test_a_stamped_add_stays_fast_while_others_rewrite_their_rules(node, mode):
    """kube-proxy rewrites its chains all the time: only the chains our verification reads count."""
    conf = stamped(node, mode)
    ipt = f"iptables-{mode[1]} -w"
    node.sh(f"{ipt} -t nat -N KUBE-SERVICES; {ipt} -t nat -A KUBE-SERVICES -d 10.96.0.1/32 -j RETURN; "
            f"{ipt} -t filter -A INPUT -j ACCEPT")
    if mode[1] == "legacy":  # a legacy table is read whole: the nat change costs one verification
        assert node.run("ADD", conf) == (0, PREV)
    for n in range(3):
        assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)
        node.sh(f"{ipt} -t filter -A INPUT -s 192.0.2.{n} -j ACCEPT")  # churn elsewhere, in the filter table
        if mode[1] == "nft":
            node.sh(f"{ipt} -t nat -A KUBE-SERVICES -d 10.96.0.{n + 2}/32 -j RETURN")  # and in nat


@pytest.mark.parametrize("nft_mode", [("nft", "nft"), ("auto", "nft")], ids=lambda m: f"{m[0]}-{m[1]}")
def test_others_commented_rules_in_the_built_in_chains_leave_the_stamp_holding(node, nft_mode):
    """The reference bridge (ipMasq) adds and removes a commented rule in nat POSTROUTING per pod, and
    kube-proxy has its commented jumps in PREROUTING: in nf_tables only our own rules there count (and
    any without a comment, which could be ours reworded), so the stamp holds through the others'."""
    conf = stamped(node, nft_mode)
    ipt = "iptables-nft -w -t nat"
    for n in range(3):
        node.sh(f"{ipt} -A POSTROUTING -s 172.30.0.{n}/32 -m comment --comment 'name: \"cbr0\" id: \"c{n}\"' "
                f"-j MASQUERADE")
        node.sh(f"{ipt} -I PREROUTING 1 -m comment --comment 'kube rule {n}' -j RETURN")
        assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)
        node.sh(f"{ipt} -D POSTROUTING -s 172.30.0.{n}/32 -m comment --comment 'name: \"cbr0\" id: \"c{n}\"' "
                f"-j MASQUERADE")
        assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)
    node.sh(f"{ipt} -D POSTROUTING {SNAT_JUMP}")  # ours, amid the others': the stamp no longer holds
    rc, err = node.run("ADD", conf, path=NO_IPTABLES)
    assert rc == 1 and err["code"] == 103, err
    assert node.run("ADD", conf) == (0, PREV)  # repairs
    assert mine(node, "nft")["nat"]["POSTROUTING"] == DEFAULT_NAT["POSTROUTING"]
    assert node.run("ADD", conf) == (0, PREV)  # finds it all in place: stamps
    assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)
    node.sh(f"{ipt} -A POSTROUTING -s 172.30.9.9/32 -j MASQUERADE")  # no comment: judged like ours
    rc, err = node.run("ADD", conf, path=NO_IPTABLES)
    assert rc == 1 and err["code"] == 103, err


def test_the_stamp_holds_while_the_reference_chain_adds_and_deletes_pods_on_the_node(node, make_netns, tmp_path):
    """The Go reference chain (bridge with ipMasq, host-local, portmap: containerd's default conflist)
    run by cnitool on the same node between our ADDs: its per-pod masquerade rule comes and goes in
    nat POSTROUTING, and our ADDs still run no iptables (`make bench` alternates the two chains so)."""
    conf = stamped(node, ("auto", "nft"))
    ref_dir = tmp_path / "ref-net.d"
    ref_dir.mkdir()
    (ref_dir / "10-ref.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "ref", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "172.30.0.0/16"}]], "dataDir": str(tmp_path / "hl")}},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}))
    env = dict(os.environ, NETCONFPATH=str(ref_dir), CNI_PATH="/usr/lib/cni", CNI_CACHE_DIR=str(tmp_path / "cache"))

    def cnitool(command, pod):
        subprocess.run(["ip", "netns", "exec", node.ns, os.path.join(ROOT, ".tools", "bin", "cnitool"), command,
                        "ref", f"/var/run/netns/{pod}"], env=env, check=True, capture_output=True, timeout=60)

    pods = [make_netns(f"refpod{n}") for n in range(2)]
    for pod in pods:
        cnitool("add", pod)
        assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)
    for pod in pods:
        cnitool("del", pod)
        assert node.run("ADD", conf, path=NO_IPTABLES) == (0, PREV)


@pytest.mark.parametrize("cache", ["kept", "corrupt", "foreign"])
def test_the_primary_interface_is_found_again_when_the_mac_moves(node, cache):
    """The interface found by MAC is remembered in the data dir and used while it still has that MAC."""
    conf = stamped(node, ("nft", "nft"))
    path = os.path.join(node.data_dir, snat.IFACE_FILE)
    with open(path) as f:
        assert f.read() == f"{MAC} eth0\n"
    if cache == "corrupt":
        with open(path, "wb") as f:
            f.write(b"\xff" * 100)
    elif cache == "foreign":  # another node's or namespace's: a name that has another MAC here
        with open(path, "w") as f:
            f.write(f"{MAC} lo\n")
    node.sh(f"ip link set eth0 address 02:00:00:00:5a:99 && ip link set peer0 address {MAC}")
    assert node.run("ADD", conf) == (0, PREV)
    mangle = ours(node.tables("nft"))["mangle"]["PREROUTING"]
    assert sorted(mangle) == sorted([NODEPORT_MARK.replace("-i eth0 ", "-i peer0 "), VETH_RESTORE])  # eth0's replaced
    with open(path) as f:
        assert f.read() == f"{MAC} peer0\n"
    node.sh("ip link set peer0 address 02:00:00:00:5a:98")  # the MAC is nowhere: an error, as without a cache
    rc, err = node.run("ADD", conf)
    assert rc == 1 and err["code"] == 102 and MAC in err["msg"]


@pytest.mark.parametrize("before, change, after", [
    ("", "iptables-legacy -w -t mangle -N KUBE-KUBELET-CANARY", "legacy"),
    ("iptables-legacy -w -t mangle -N KUBE-KUBELET-CANARY", "iptables-nft -w -t mangle -N KUBE-IPTABLES-HINT", "nft"),
    # only legacy changes (the nf_tables generation stays): the hint goes, nft now holds more rules
    (f"iptables-legacy -w -t mangle -N KUBE-KUBELET-CANARY; {NFT_RULES}",
     "iptables-legacy -w -t mangle -X KUBE-KUBELET-CANARY", "nft"),
    ("iptables-legacy -w -t filter -N KUBE-KUBELET-CANARY", "iptables-legacy -w -t filter -X KUBE-KUBELET-CANARY; "
                                                             + NFT_RULES, "nft"),
], ids=["legacy-appears", "nft-hint-appears", "legacy-hint-goes", "hint-outside-mangle-goes"])
def test_when_detection_would_answer_otherwise_a_stamped_add_follows_it(node, before, change, after):
    if before:
        node.sh(before)
    node.add()
    node.add()
    assert os.path.exists(stamp_path(node))
    node.sh(change)
    node.add()
    assert mine(node, after) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}


def test_gc_verifies_in_full_whatever_the_stamp_says(node, variant):
    conf = stamped(node, (variant, variant))
    node.sh(f"iptables-{variant} -w -t nat -D POSTROUTING {SNAT_JUMP}")
    with open(stamp_path(node), "rb") as f:
        recorded = f.read()
    node.run("ADD", conf)  # repairs, so that only a forged stamp can be "fresh" below
    node.sh(f"iptables-{variant} -w -t nat -D POSTROUTING {SNAT_JUMP}")
    assert recorded  # (a stamp cannot be forged to the new fingerprint from outside; GC never reads it)
    gc = node.conf(prev=None, version="1.1.0", netfilterMode=variant, **{"cni.dev/valid-attachments": []})
    assert node.run("GC", gc, path=NO_IPTABLES) == (0, None)  # logged, not an error
    assert node.run("GC", gc) == (0, None)
    assert mine(node, variant) == {"nat": DEFAULT_NAT, "mangle": DEFAULT_MANGLE}


# ---------------------------------------------------------------------------------------------
# In the VPC lab's nodes

LAB_VPC = "10.0.0.0/16"
INTERNET = "203.0.113.10"
EXCLUDED_HOST, EXCLUDED_CIDR = "198.51.100.10", "198.51.100.0/24"
ECHO_PORT = 7007
NODE_PORT = 30080
def lab_node_facts(lab, name):
    info = next(n for n in lab.status()["nodes"] if n["name"] == name)
    return snat.Node(info["primary_ip"], info["mac"], (LAB_VPC,), "lab")


def lab_tables(lab, name, variant):
    return ours(saved_tables(lab.exec(name, [f"iptables-{variant}-save"]).stdout))


def lab_ip_rules(lab, name):
    return [line for line in lab.exec(name, ["ip", "-4", "rule"]).stdout.splitlines() if line.startswith("1024:")]


def test_a_vpc_cidr_block_associated_later_is_exempted_after_the_agents_refresh(fresh_lab, tmp_path, make_netns):
    """Clusters add CIDR blocks to their VPC (EKS custom networking); traffic to those must not be
    SNATed either. The agent's periodic refresh reads the VPC's blocks from IMDS into the store, and
    the next ADD's aws-snat exempts the new block."""
    from support.labnode import LabNode
    lab = fresh_lab
    node = LabNode(lab, "node1", tmp_path)
    node.write_conflist()
    store = Store(node.data_dir, NETWORK)
    added, association, pods = "10.99.0.0/16", None, []

    def add_pod():
        pods.append(make_netns("cidr"))
        rc, out, err = node.cnitool("add", pods[-1], f"web-{len(pods)}")
        assert rc == 0, err + out

    def exempted():
        return [spec for spec in lab_tables(lab, "node1", "nft")["nat"][snat.SNAT_CHAIN] if spec.endswith("-j RETURN")]

    def refreshed():
        with store.locked() as tx:  # make the agent's next round a refresh (every 60 s otherwise)
            doc = tx.read()
            if added in doc["node"]["vpc_cidrs"]:
                return True
            doc["agent"]["last_refresh"] = 0
            tx.write(doc)
        return False

    node.start_agent()
    try:
        add_pod()
        assert exempted() == [f"-d {LAB_VPC} {SNAT_VPC}"]
        association = lab.ec2("AssociateVpcCidrBlock", VpcId=lab.status()["vpc_id"],
                              CidrBlock=added)["CidrBlockAssociation"]["AssociationId"]
        node.wait_for(refreshed, timeout=30, what="the agent to read the VPC's new CIDR block")
        with store.locked(shared=True) as tx:
            assert tx.read()["node"]["vpc_cidrs"] == [LAB_VPC, added]
        add_pod()
        assert exempted() == [f"-d {LAB_VPC} {SNAT_VPC}", f"-d {added} {SNAT_VPC}"]
    finally:
        node.stop_agents()
        for i, netns in enumerate(pods):
            node.cnitool("del", netns, f"web-{i + 1}")
        if association:
            lab.ec2("DisassociateVpcCidrBlock", AssociationId=association)


def test_in_a_lab_node_rules_converge_from_imds_or_the_store_and_repair_themselves(fresh_lab, tmp_path, variant):
    from support.labnode import LabNode
    lab = fresh_lab
    node = LabNode(lab, "node1", tmp_path)
    facts = lab_node_facts(lab, "node1")
    conf = {"cniVersion": "1.0.0", "name": NETWORK, "type": "aws-snat", "dataDir": node.data_dir,
            "pluginLogFile": node.log_file, "netfilterMode": variant, "excludeSNATCIDRs": [EXCLUDED_CIDR]}
    keys = {"excludeSNATCIDRs": [EXCLUDED_CIDR]}

    def add(**extra):
        rc, out = node.plugin("aws-snat", "ADD", {**conf, **extra, "prevResult": PREV})
        assert rc == 0, out
        assert out == PREV
        return out

    def check(**extra):
        return node.plugin("aws-snat", "CHECK", {**conf, **extra, "prevResult": PREV})

    # No state store yet (aws-snat without our IPAM): the facts come from IMDS, the interface by MAC.
    lab.imds_calls(reset=True)
    add()
    assert lab.imds_calls()["node1"] > 0
    assert lab_tables(lab, "node1", variant) == expected_tables(keys, facts)
    assert lab_ip_rules(lab, "node1") == [FWMARK_RULE]
    assert lab.exec("node1", ["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]).stdout.strip() == "2"
    # With the store aws-eni-ipam keeps: no IMDS call at all, the same rules.
    assert node.ipam("ADD", cid="filler")[0] == 0
    lab.imds_calls(reset=True)
    add()
    assert not any(lab.imds_calls().values())
    assert check() == (0, None)
    # 50 more ADDs leave exactly the rules one left.
    one = lab_tables(lab, "node1", variant)
    for _ in range(50):
        add()
    assert lab_tables(lab, "node1", variant) == one
    assert sum(map(len, one["nat"].values())) + sum(map(len, one["mangle"].values())) == 11
    assert lab_ip_rules(lab, "node1") == [FWMARK_RULE]
    # A rule deleted by hand: CHECK fails naming it, the next ADD puts it back.
    ipt = [f"iptables-{variant}", "-w", "-t", "nat"]
    lab.exec("node1", [*ipt, "-D", "POSTROUTING", "-m", "comment", "--comment", "AWS SNAT CHAIN",
                       "-j", "AWS-SNAT-CHAIN-0"])
    lab.exec("node1", [*ipt, "-D", "AWS-SNAT-CHAIN-0", "-d", EXCLUDED_CIDR, "-m", "comment", "--comment",
                       "AWS SNAT CHAIN EXCLUSION", "-j", "RETURN"])
    rc, err = check()
    assert rc == 1 and err["code"] == 104
    assert f"nat/POSTROUTING: rule missing: {SNAT_JUMP}" in err["msg"]
    assert f"nat/AWS-SNAT-CHAIN-0: rule missing: -d 198.51.100.0/24 {SNAT_EXCLUDED}" in err["msg"]
    add()
    assert lab_tables(lab, "node1", variant) == one
    assert check() == (0, None)
    # External SNAT on: our SNAT and connmark chains and their jumps go, the NodePort marking stays.
    add(externalSNAT=True)
    assert lab_tables(lab, "node1", variant) == {"mangle": one["mangle"]}
    assert check(externalSNAT=True) == (0, None)
    rc, err = check()
    assert rc == 1 and "nat/AWS-SNAT-CHAIN-0: chain missing" in err["msg"]
    add()
    assert lab_tables(lab, "node1", variant) == one


# --- traffic through the real chain (aws-vpc-bridge + aws-eni-ipam -> aws-snat -> portmap-compat) ---

ECHO_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(64)
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        conn.settimeout(2)
        try:
            conn.recv(100)
            conn.sendall(("%s %d\n" % peer).encode())
        except OSError:
            pass
"""


class Chain:
    """One lab node running the default conflist, rendered by the agent from upstream settings."""

    def __init__(self, lab, name, tmp_path, make_netns, variant):
        from support.labnode import LabNode
        self.lab, self.name, self.variant, self.make_netns = lab, name, variant, make_netns
        self.node = LabNode(lab, name, tmp_path)
        self.pods = {}  # pod name -> (netns, ip)
        self.render()

    def render(self, **env):
        """Write the conflist the agent renders for these settings (paths under the test's tmp dir)."""
        from aws_vpc_cni_agent.conflist import render_conflist, write_conflist
        environ = {"AWS_VPC_CNI_DATA_DIR": self.node.data_dir, "AWS_VPC_K8S_PLUGIN_LOG_FILE": self.node.log_file,
                   "IP_COOLDOWN_PERIOD": "0", "AWS_VPC_CNI_NETFILTER_MODE": self.variant,
                   "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": EXCLUDED_CIDR, **env}
        self.conflist = render_conflist(settings.from_env(environ))
        self.node.conf_dir = self.node.data_dir + "-net.d"
        write_conflist(self.conflist, self.node.conf_dir)

    def apply(self, **env):
        """New settings, applied as the next pod's ADD would: aws-snat ADD with its conflist entry."""
        self.render(**env)
        entry = next(p for p in self.conflist["plugins"] if p["type"] == "aws-snat")
        conf = dict(entry, cniVersion=self.conflist["cniVersion"], name=NETWORK, prevResult=PREV)
        rc, out = self.node.plugin("aws-snat", "ADD", conf)
        assert rc == 0, out

    def add_pod(self, name):
        netns = self.make_netns(name)
        rc, out, err = self.node.cnitool("add", netns, name)
        assert rc == 0, err + out
        self.pods[name] = (netns, json.loads(out)["ips"][0]["address"].split("/")[0])
        return self.pods[name]

    def device_of(self, ip):
        with Store(self.node.data_dir, NETWORK).locked(shared=True) as tx:
            doc = tx.read()
        return next(eni["device_number"] for eni in doc["enis"].values() if ip in eni["ips"])

    def fill_primary_eni(self):
        """Hold every free IP of the primary ENI with bare IPAM reservations, so the next pod lands
        on a secondary ENI (the pool hands out the lowest device first)."""
        for i in range(20):
            rc, result = self.node.ipam("ADD", cid=f"fill{i}")
            assert rc == 0, result
            if self.device_of(result["ips"][0]["address"].split("/")[0]) > 0:
                assert self.node.ipam("DEL", cid=f"fill{i}")[0] == 0  # no cool-down here: free again
                return
        raise AssertionError("the pool never reached a secondary ENI")

    def delete_pods(self):
        for name, (netns, _) in self.pods.items():
            self.node.cnitool("del", netns, name)


def echo_seen(netns, addr, port=ECHO_PORT, proto="tcp", timeout=2):
    """The source address the echo server at addr:port saw, or None if no answer came back."""
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "vpclab.probe", "echo", proto, addr,
                           str(port), "--timeout", str(timeout)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    answer = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return answer["answer"].split()[0] if answer.get("ok") else None


@pytest.fixture
def servers():
    """Start TCP echo servers in namespaces; stopped (by pid) when the test ends."""
    started = []

    def start(netns):
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        line = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(15)
        assert line and line[0].strip() == "ready", f"echo server in {netns} did not start: {proc.stderr.read()}"

    yield start
    for proc in started:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_pod_traffic_is_translated_only_when_it_leaves_the_vpc(fresh_lab, tmp_path, make_netns, servers, variant):
    lab = fresh_lab
    node1_ip, node2_ip = (lab_node_facts(lab, n).primary_ip for n in ("node1", "node2"))
    chain1 = Chain(lab, "node1", tmp_path, make_netns, variant)
    chain2 = Chain(lab, "node2", tmp_path, make_netns, variant)
    try:
        prim_ns, prim_ip = chain1.add_pod("on-primary")
        assert chain1.device_of(prim_ip) == 0
        chain1.fill_primary_eni()
        sec_ns, sec_ip = chain1.add_pod("on-secondary")
        assert chain1.device_of(sec_ip) > 0
        remote_ns, remote_ip = chain2.add_pod("remote")
        for netns in (sec_ns, remote_ns, lab.netns("node2")):
            servers(netns)
        assert lab_tables(lab, "node1", variant) == expected_tables(
            {"excludeSNATCIDRs": [EXCLUDED_CIDR]}, lab_node_facts(lab, "node1"))
        # NodePort-style: node1's primary IP, port 30080, DNAT to the pod on the secondary ENI
        lab.exec("node1", [f"iptables-{variant}", "-w", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p", "tcp",
                           "--dport", str(NODE_PORT), "-j", "DNAT", "--to-destination", f"{sec_ip}:{ECHO_PORT}"])
        node2_ns = lab.netns("node2")

        # Default settings: the internet host sees the node's primary IP, from either ENI's pods.
        assert echo_seen(prim_ns, INTERNET) == node1_ip
        assert echo_seen(sec_ns, INTERNET) == node1_ip
        assert echo_seen(sec_ns, INTERNET, proto="udp") == node1_ip
        # The excluded CIDR's host sees the pod IPs.
        assert echo_seen(sec_ns, EXCLUDED_HOST) == sec_ip
        assert echo_seen(prim_ns, EXCLUDED_HOST) == prim_ip
        # Inside the VPC nothing is translated: the other node's pod and the other node see pod IPs.
        assert echo_seen(sec_ns, remote_ip) == sec_ip
        assert echo_seen(prim_ns, remote_ip) == prim_ip
        assert echo_seen(sec_ns, node2_ip) == sec_ip
        assert echo_seen(remote_ns, sec_ip) == remote_ip
        # The NodePort reply leaves by the primary ENI (else the VPC drops it): the client gets it.
        assert echo_seen(node2_ns, node1_ip, port=NODE_PORT) == node2_ip

        # Without NodePort support, SNAT of the secondary-ENI pod still works (its mark is restored on
        # every packet) but the NodePort replies leave by the pod's ENI and are lost: the rules matter.
        chain1.apply(AWS_VPC_CNI_NODE_PORT_SUPPORT="false")
        assert echo_seen(sec_ns, INTERNET) == node1_ip
        assert echo_seen(node2_ns, node1_ip, port=NODE_PORT, timeout=1) is None
        # ... and that needs both pieces upstream 1.1 ties to NodePort support: without the mangle
        # restore only the first packet leaves by eth0; with strict rp_filter the replies are dropped.
        lab.exec("node1", [f"iptables-{variant}", "-w", "-t", "mangle", "-D", "PREROUTING", *split_spec(VETH_RESTORE)])
        assert echo_seen(sec_ns, INTERNET, timeout=1) is None
        chain1.apply(AWS_VPC_CNI_NODE_PORT_SUPPORT="false")
        lab.exec("node1", ["sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=1"])
        assert echo_seen(sec_ns, INTERNET, timeout=1) is None
        chain1.apply(AWS_VPC_CNI_NODE_PORT_SUPPORT="false")
        assert echo_seen(sec_ns, INTERNET) == node1_ip

        # External SNAT: the internet host sees the pod IPs; NodePort works again.
        chain1.apply(AWS_VPC_K8S_CNI_EXTERNALSNAT="true")
        assert "AWS-SNAT-CHAIN-0" not in lab_tables(lab, "node1", variant).get("nat", {})
        assert echo_seen(sec_ns, INTERNET) == sec_ip
        assert echo_seen(prim_ns, INTERNET) == prim_ip
        assert echo_seen(sec_ns, EXCLUDED_HOST) == sec_ip
        assert echo_seen(sec_ns, remote_ip) == sec_ip
        assert echo_seen(node2_ns, node1_ip, port=NODE_PORT) == node2_ip

        # And back: the node translates again.
        chain1.apply()
        assert echo_seen(sec_ns, INTERNET) == node1_ip
        for pod in ("on-primary", "on-secondary"):
            rc, out, err = chain1.node.cnitool("check", chain1.pods[pod][0], pod)
            assert rc == 0, err + out
    finally:
        chain1.delete_pods()
        chain2.delete_pods()
