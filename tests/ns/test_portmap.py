"""portmap-compat against the Go reference portmap (Debian's 1.1.1), in real namespaces, both iptables
variants (CNI-CONFORMANCE items 22-23, 28, 30-31, 37-38).

Each plugin runs inside a namespace of its own with `ip netns exec`; the rules are read back with
iptables-save in that namespace. Nothing touches the root namespace's tables. The world test builds
a node, a pod (Go bridge + host-local, then portmap-compat, through the real cnitool with CAP_ARGS)
and a client host, and sends TCP and UDP through the mapped host ports.
"""

import json
import os
import subprocess

import pytest

from portmap_compat.main import dnat_chain, old_snat_chain
from support.portmap_world import (PLUGIN, REFERENCE, GO_PLUGINS, SYSTEM_PATH, pod_container_id, invoke, legacy_bin,
                           mark_mode, nat, rules, start_server, tcp_get, udp_ask, user_chains, veth)
from support.portmap_world import cnitool as run_cnitool
from support.runtime_input import CONTAINERD_CNI_ARGS, CONTAINERD_PORT_MAPPING
from vpclab import netns

VARIANTS = ("nft", "legacy")
NET = "podnet"
SHARED = {"CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ"}
MASQ_JUMP = '-m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ'
DNAT_JUMP = "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"

IFACES = [{"name": "veth0a1b2c3d", "mac": "02:00:00:00:00:01"},
          {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/var/run/netns/pod"}]
PREV_DUAL = {"interfaces": IFACES,
             "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 1},
                     {"address": "fd00:1::5/64", "gateway": "fd00:1::1", "interface": 1}],
             "dns": {}}
PREV_V4 = {"interfaces": IFACES, "ips": [{"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": 1}]}


def tcp(host_port, container_port=80, **extra):
    return {"hostPort": host_port, "containerPort": container_port, "protocol": "tcp", **extra}


def udp(host_port, container_port=80, **extra):
    return {"hostPort": host_port, "containerPort": container_port, "protocol": "udp", **extra}


MIXED = [tcp(8080), udp(8081, 81, hostIP="192.168.1.1"), {**tcp(8082, 82), "protocol": "sctp", "hostIP": "0.0.0.0"},
         tcp(8083, 83, hostIP="fd00::1"), tcp(8084, 84, hostIP="::")]
MANY = [tcp(20000 + n, 80 + n) for n in range(20)] + [udp(30000 + n, 80 + n) for n in range(17)]


def conf(mappings=None, *, version="1.0.0", prev=PREV_DUAL, name=NET, **extra):
    """One plugin entry as libcni hands it over; the same for both plugins (each ignores the other's keys)."""
    out = {"cniVersion": version, "name": name, "type": "portmap", **extra}
    if mappings is not None:
        out["runtimeConfig"] = {"portMappings": mappings}
    if prev is not None:
        out["prevResult"] = {"cniVersion": version, **prev}
    return out


@pytest.fixture
def log_file(tmp_path):
    return str(tmp_path / "plugin.log")


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture
def node(make_netns, variant):
    """A namespace that looks like a node of `variant` to cnicore.netfilter's detection."""
    def make(role="node"):
        ns = make_netns(role)
        mark_mode(ns, variant)
        return ns
    return make


def ours(ns, command, config, log_file, **kw):
    return invoke(ns, command, dict(config, pluginLogFile=log_file), **kw)


def reference(ns, command, config, variant, tmp_path, **kw):
    path = f"{legacy_bin(tmp_path)}:{SYSTEM_PATH}" if variant == "legacy" else SYSTEM_PATH
    return invoke(ns, command, config, plugin=REFERENCE, path=path, **kw)


def both_families(ns, variant):
    return nat(ns, variant), nat(ns, variant, ipv6=True)


def shape(table):
    """A nat table without its empty built-in chains: what is in it, not whether it exists."""
    return {chain: specs for chain, specs in table.items() if specs or chain in user_chains(table)}


def other(variant):
    return "legacy" if variant == "nft" else "nft"


# ---------------------------------------------------------------------------------------------
# Same rules as the reference, interchangeable DEL


COMPARED = {
    # tcp/udp/sctp, a v4 hostIP, 0.0.0.0 and :: (family filter only), a v6 hostIP; dual-stack pod
    "mixed": conf(MIXED),
    # 20 tcp + 17 udp ports: entry rules of 15 + 5 and 15 + 2 ports
    "many-ports": conf(MANY, prev=PREV_V4),
    "snat-false": conf(MIXED, snat=False),
    # another mark bit; conditions worded loosely (iptables-save moves them to the front)
    "markbit-conditions": conf(MIXED, markMasqBit=5, conditionsV4=["-s", "192.168.0.0/16"],
                               conditionsV6=["!", "-s", "fd00:9::/64"]),
    # kubelet's mark chain instead of ours: no SETMARK/MASQ chains
    "external-setmark": conf(MIXED, externalSetMarkChain="KUBE-MARK-MASQ"),
    # 0.4.0: the host-side address is skipped, an address without interface index is taken
    "0.4.0-interfaces": conf([tcp(8080), udp(8081)], version="0.4.0", prev={
        "interfaces": IFACES,
        "ips": [{"version": "4", "address": "10.1.1.1/24", "interface": 0},
                {"version": "4", "address": "10.0.0.7/32", "interface": 1},
                {"version": "4", "address": "10.0.0.8/32", "interface": 1},
                {"version": "6", "address": "fd00:2::7/128"}]}),
    # keys as Go's encoding/json matches them: containerd's capitalised go-cni PortMapping (HostIP ""), any
    # case, long s for s, an unknown key, two spellings of one key (the last wins), a capitalised RuntimeConfig
    "go-decoded-keys": conf([{"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""},
                             {"hostport": 8081, "CONTAINERPORT": 81, "PROTOCOL": "udp", "HostIp": "192.168.1.1",
                                 "podPort": 7},
                             {"hoſtPort": 9999, "HostPort": 8082, "containerPort": 82, "protocol": "sctp"}]),
    "go-decoded-runtime-config": dict(conf(prev=PREV_V4), RuntimeConfig={"PortMappings": [tcp(8080), udp(8081)]}),
    # a comment over iptables' 255 characters is cut to 253 + "..." (leaving an unbalanced quote to escape)
    "long-container-id": conf([tcp(8080), udp(8081)], prev=PREV_V4),
}
CONTAINER_IDS = {"long-container-id": "0123456789abcdef" * 15}


@pytest.mark.parametrize("case", COMPARED)
def test_add_writes_what_the_reference_writes_and_either_del_undoes_the_other(node, variant, tmp_path, log_file, case):
    config, cid = COMPARED[case], CONTAINER_IDS.get(case, "c1")
    theirs_ns, ours_ns = node("ref"), node("ours")
    if "externalSetMarkChain" in config:
        for ns in (theirs_ns, ours_ns):
            for tool in (f"iptables-{variant}", f"ip6tables-{variant}"):
                netns.run([tool, "-w", "-t", "nat", "-N", "KUBE-MARK-MASQ"], netns=ns)
                netns.run([tool, "-w", "-t", "nat", "-A", "KUBE-MARK-MASQ", "-j", "MARK", "--set-xmark",
                           "0x4000/0x4000"], netns=ns)

    rc, out, err = reference(theirs_ns, "ADD", config, variant, tmp_path, cid=cid)
    assert rc == 0, (out, err)
    rc, out, err = ours(ours_ns, "ADD", config, log_file, cid=cid)
    assert rc == 0, (out, err)
    assert out == config["prevResult"]  # passed through unchanged

    (theirs4, theirs6), (mine4, mine6) = both_families(theirs_ns, variant), both_families(ours_ns, variant)
    assert mine4 == theirs4
    lost = []
    if variant == "legacy":
        assert rules(theirs4)  # the reference did drive iptables-legacy through the linked PATH
        # ip6tables-legacy 1.8.9's -C ignores match and target data (test_ip6tables_legacy_check_is_blind_to_ports),
        # so the reference's add-unless-it-exists drops IPv6 rules that differ from an earlier one only there.
        lost = [(chain, spec) for chain, specs in mine6.items() for spec in specs
                if spec not in theirs6.get(chain, [])]
        assert all(chain.startswith("CNI-DN-") for chain, _ in lost)
    assert theirs6 == {chain: [spec for spec in specs if (chain, spec) not in lost] for chain, specs in mine6.items()}
    assert any(user_chains(t) for t in (mine4, mine6))
    assert not rules(nat(theirs_ns, other(variant))) and not rules(nat(ours_ns, other(variant)))
    assert ours(ours_ns, "CHECK", config, log_file, cid=cid)[0] == 0
    rc, out, _ = ours(theirs_ns, "CHECK", config, log_file, cid=cid)  # accepts the reference's rules, names losses
    assert rc == 0 if not lost else (out["code"] == 104 and all(spec in out["details"] for _, spec in lost))

    # The reference's DEL (it needs the mappings) removes ours; ours (without them) removes the reference's.
    rc, out, err = reference(ours_ns, "DEL", config, variant, tmp_path, cid=cid)
    assert rc == 0, (out, err)
    bare = conf(version=config["cniVersion"], prev=None)
    rc, out, err = ours(theirs_ns, "DEL", bare, log_file, cid=cid)
    assert rc == 0, (out, err)
    # (The reference's DEL also leaves an empty nat table behind in ip6tables where there was none.)
    after_theirs, after_mine = [[shape(t) for t in both_families(ns, variant)] for ns in (theirs_ns, ours_ns)]
    assert after_mine == after_theirs
    for table in after_mine:
        assert not [c for c in table if c.startswith("CNI-DN-")]
        assert table.get("CNI-HOSTPORT-DNAT", []) == []


def test_ip6tables_legacy_check_is_blind_to_ports(make_netns):
    """Why the reference portmap loses IPv6 mappings on a legacy host: `ip6tables-legacy -C` (1.8.9) finds a
    rule that differs from an existing one only in its port or DNAT destination. iptables-legacy (IPv4)
    and the nft variants do not; we never rely on -C (the netfilter layer compares iptables-save text)."""
    ns = make_netns("blind")
    rule = ["-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination"]
    for tool in ("iptables-legacy", "ip6tables-legacy", "ip6tables-nft"):
        dest = "[fd00::5]" if tool.startswith("ip6") else "10.0.0.5"
        netns.run([tool, "-w", "-t", "nat", "-N", "T"], netns=ns)
        netns.run([tool, "-w", "-t", "nat", "-A", "T", *rule, f"{dest}:80"], netns=ns)
        other_port = [w if w != "8080" else "8084" for w in rule] + [f"{dest}:84"]
        found = netns.run([tool, "-w", "-t", "nat", "-C", "T", *other_port], netns=ns, check=False).returncode == 0
        assert found == (tool == "ip6tables-legacy"), tool


def ports(first, count):
    return ",".join(str(first + n) for n in range(count))


def test_rules_in_detail(make_netns, log_file):
    """What the comparison above shows, spelt out: names, comments, order, splitting, hostIP, snat."""
    ns = make_netns("detail")
    assert ours(ns, "ADD", conf(MIXED + MANY[:16]), log_file)[0] == 0
    v4, v6 = nat(ns, "nft"), nat(ns, "nft", ipv6=True)
    chain = dnat_chain(NET, "c1")
    assert chain == "CNI-DN-" + __import__("hashlib").sha512(b"podnetc1").hexdigest()[:21]
    comment = r'-m comment --comment "dnat name: \"podnet\" id: \"c1\""'
    assert v4["CNI-HOSTPORT-DNAT"] == [
        f"-p sctp {comment} -m multiport --dports 8082 -j {chain}",
        f"-p tcp {comment} -m multiport --dports 8080,8083,8084,{ports(20000, 12)} -j {chain}",
        f"-p tcp {comment} -m multiport --dports 20012,20013,20014,20015 -j {chain}",
        f"-p udp {comment} -m multiport --dports 8081 -j {chain}",
    ]
    assert v4["POSTROUTING"] == [MASQ_JUMP]
    assert v4["PREROUTING"] == v4["OUTPUT"] == [DNAT_JUMP]
    assert v4["CNI-HOSTPORT-SETMARK"] == [
        '-m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark 0x2000/0x2000']
    assert v4["CNI-HOSTPORT-MASQ"] == ["-m mark --mark 0x2000/0x2000 -j MASQUERADE"]
    assert v4[chain][:6] == [
        "-s 10.0.0.0/24 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK",   # hairpin
        "-s 127.0.0.1/32 -p tcp -m tcp --dport 8080 -j CNI-HOSTPORT-SETMARK",  # from the node's 127.0.0.1
        "-p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.5:80",
        "-s 10.0.0.0/24 -d 192.168.1.1/32 -p udp -m udp --dport 8081 -j CNI-HOSTPORT-SETMARK",
        "-s 127.0.0.1/32 -d 192.168.1.1/32 -p udp -m udp --dport 8081 -j CNI-HOSTPORT-SETMARK",
        "-d 192.168.1.1/32 -p udp -m udp --dport 8081 -j DNAT --to-destination 10.0.0.5:81",
    ]
    assert not [r for r in v4[chain] if "--dport 8083 " in r]   # IPv6 hostIP: not in the IPv4 chain
    assert not [r for r in v6[chain] if "--dport 8082 " in r]   # 0.0.0.0: IPv4 only
    assert [r for r in v6[chain] if "--dport 8083 " in r] == [
        "-s fd00:1::/64 -d fd00::1/128 -p tcp -m tcp --dport 8083 -j CNI-HOSTPORT-SETMARK",
        "-d fd00::1/128 -p tcp -m tcp --dport 8083 -j DNAT --to-destination [fd00:1::5]:83"]
    assert not [r for r in v6[chain] if "127.0.0.1" in r]
    assert len(v4[chain]) == 3 * (3 + 16) and len(v6[chain]) == 2 * (3 + 16)  # 3 of MIXED per family

    # snat: false: no mark rules, no SETMARK/MASQ chains, no POSTROUTING jump
    ns = make_netns("nosnat")
    assert ours(ns, "ADD", conf(MIXED, snat=False), log_file)[0] == 0
    for table in both_families(ns, "nft"):
        assert user_chains(table) == {"CNI-HOSTPORT-DNAT", chain}
        assert table["POSTROUTING"] == []
        assert all("-j DNAT" in r for r in table[chain])


def test_steady_state_add_changes_nothing_and_is_idempotent(make_netns, log_file):
    ns = make_netns("again")
    config = conf(MIXED)
    for _ in range(3):
        assert ours(ns, "ADD", config, log_file)[0] == 0
    first = both_families(ns, "nft")
    # A second container on the same node shares the top-level chains and adds only its own.
    assert ours(ns, "ADD", config, log_file, cid="c2")[0] == 0
    v4 = nat(ns, "nft")
    assert v4["PREROUTING"] == v4["OUTPUT"] == [DNAT_JUMP] and v4["POSTROUTING"] == [MASQ_JUMP]
    assert len(v4["CNI-HOSTPORT-DNAT"]) == 2 * len(first[0]["CNI-HOSTPORT-DNAT"])
    assert v4[dnat_chain(NET, "c2")] == first[0][dnat_chain(NET, "c1")]


def test_add_and_del_take_the_netfilter_lock_in_the_data_dir_that_aws_snat_takes(make_netns, log_file, tmp_path):
    """Both plugins read, plan and rewrite the nat table: they share one lock, in the configured dataDir."""
    import fcntl
    import threading

    ns = make_netns("lock")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for command in ("ADD", "DEL"):
        with open(data_dir / "netfilter.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            outcome = []
            run = threading.Thread(target=lambda: outcome.append(
                ours(ns, command, conf([tcp(8080)], dataDir=str(data_dir)), log_file)))
            run.start()
            run.join(1.5)
            assert run.is_alive() and not outcome, f"{command} did not wait for the lock"
            fcntl.flock(lock, fcntl.LOCK_UN)
            run.join(60)
        assert outcome[0][0] == 0, outcome
    assert dnat_chain(NET, "c1") not in nat(ns, "nft")


# ---------------------------------------------------------------------------------------------
# Chained-plugin behaviour and malformed input


def test_without_prev_result_add_is_an_error_and_writes_nothing(make_netns, log_file):
    ns = make_netns("noprev")
    rc, out, _ = ours(ns, "ADD", conf([tcp(8080)], prev=None), log_file)
    assert rc != 0 and out["code"] == 7 and "chained" in out["msg"]
    assert not rules(nat(ns, "nft")) and not user_chains(nat(ns, "nft"))


@pytest.mark.parametrize("mappings", [None, []], ids=["absent", "empty"])
@pytest.mark.parametrize("version", ["0.3.1", "1.0.0", "1.1.0"])
def test_without_mappings_add_passes_prev_result_through_and_writes_nothing(make_netns, log_file, mappings, version):
    ns = make_netns("pass")
    prev = {"interfaces": IFACES, "ips": [{"address": "10.0.0.5/32", "interface": 1, "gateway": "10.0.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.0.0.2"]}}
    if version == "0.3.1":
        prev["ips"][0]["version"] = "4"
    config = conf(mappings, version=version, prev=prev)
    rc, out, err = ours(ns, "ADD", config, log_file)
    assert rc == 0, (out, err)
    assert out == config["prevResult"]
    for table in both_families(ns, "nft"):
        assert not rules(table) and not user_chains(table)


MALFORMED = {
    "host-port-0": [tcp(0)],
    "host-port-65536": [tcp(65536)],
    "container-port-0": [tcp(8080, 0)],
    "container-port-negative": [tcp(8080, -80)],
    "protocol-icmp": [{**tcp(8080), "protocol": "icmp"}],
    "protocol-missing": [{"hostPort": 8080, "containerPort": 80}],
    "host-ip-bad": [tcp(8080, hostIP="10.0.0.300")],
    "host-ip-name": [tcp(8080, hostIP="node.example")],
    "host-ip-number": [tcp(8080, hostIP=3232235777)],
    "host-ip-zone": [tcp(8080, hostIP="fe80::1%eth0")],
    "port-string": [tcp("8080")],
    "port-float": [tcp(8080.0)],
    "port-bool": [tcp(True)],
    "mapping-not-object": ["8080:80"],
    "good-then-bad": [tcp(8080), udp(8081), tcp(70000)],
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_mappings_are_code_7_and_touch_no_rule(make_netns, log_file, case):
    ns = make_netns("bad")
    rc, out, _ = ours(ns, "ADD", conf(MALFORMED[case]), log_file)
    assert rc != 0 and out["code"] == 7, out
    assert out["cniVersion"] == "1.0.0" and "portMappings" in out["msg"]
    for table in both_families(ns, "nft"):
        assert not rules(table) and not user_chains(table)


@pytest.mark.parametrize("extra, says", [
    ({"markMasqBit": 32}, "markMasqBit"),
    ({"markMasqBit": "13"}, "markMasqBit"),
    ({"markMasqBit": 13, "externalSetMarkChain": "KUBE-MARK-MASQ"},
     "Cannot specify externalSetMarkChain and markMasqBit"),
    ({"externalSetMarkChain": "bad chain"}, "externalSetMarkChain"),
    ({"snat": "yes"}, "snat"),
    ({"conditionsV4": "-s 10.0.0.0/8"}, "conditionsV4"),
    ({"runtimeConfig": {"portMappings": {"hostPort": 80}}}, "portMappings"),
    ({"netfilterMode": "ebtables"}, "netfilterMode"),
])
def test_bad_configuration_is_code_7_and_touches_no_rule(make_netns, log_file, extra, says):
    ns = make_netns("badconf")
    rc, out, _ = ours(ns, "ADD", dict(conf([tcp(8080)]), **extra), log_file)
    assert rc != 0 and out["code"] == 7 and says in out["msg"], out
    assert not rules(nat(ns, "nft")) and not user_chains(nat(ns, "nft"))


# ---------------------------------------------------------------------------------------------
# DEL, CHECK, GC, STATUS


def test_del_cleans_up_without_mappings_and_without_the_netns(make_netns, log_file):
    ns = make_netns("del")
    for cid in ("c1", "c2"):
        assert ours(ns, "ADD", conf(MIXED), log_file, cid=cid)[0] == 0
    before = both_families(ns, "nft")
    bare = {"cniVersion": "1.0.0", "name": NET, "type": "portmap"}  # no runtimeConfig, no prevResult
    rc, out, err = ours(ns, "DEL", bare, log_file, cid="c1", netns_path="/var/run/netns/long-gone")
    assert rc == 0, (out, err)
    assert out is None
    gone = dnat_chain(NET, "c1")
    for table, was in zip(both_families(ns, "nft"), before):
        assert gone not in table
        assert not [r for r in rules(table) if gone in r or 'id: \\"c1\\"' in r]
        assert table[dnat_chain(NET, "c2")] == was[dnat_chain(NET, "c2")]  # the other pod keeps its rules
        assert SHARED <= user_chains(table)
    assert ours(ns, "CHECK", conf(MIXED), log_file, cid="c2")[0] == 0
    # Again, with an empty CNI_NETNS, and for a container never added: still success.
    assert ours(ns, "DEL", bare, log_file, cid="c1", netns_path="")[0] == 0
    assert ours(ns, "DEL", dict(bare, cniVersion="0.3.0"), log_file, cid="never-added")[0] == 0
    # Malformed mappings on DEL do not stop the clean-up.
    assert ours(ns, "DEL", conf([tcp(0)]), log_file, cid="c2")[0] == 0
    assert not [c for t in both_families(ns, "nft") for c in t if c.startswith("CNI-DN-")]


@pytest.mark.parametrize("mode", ["auto", "nft", "legacy"])
def test_del_of_a_pod_without_host_ports_runs_no_iptables_and_changes_nothing(node, variant, log_file, mode):
    """The fast path: no CNI-DN chain in the variant(s) the mode drives, so nothing jumps to one."""
    ns = node()
    config = conf([tcp(8080), udp(8081)], netfilterMode=mode) if mode != "auto" else conf([tcp(8080), udp(8081)])
    assert ours(ns, "ADD", config, log_file, cid="other")[0] == 0  # another pod's mappings stay
    before = [both_families(ns, v) for v in VARIANTS]
    bare = {"cniVersion": "1.0.0", "name": NET, "type": "portmap", **({"netfilterMode": mode} if mode != "auto" else {})}
    for cid in ("c1", "never-added"):
        rc, out, err = ours(ns, "DEL", bare, log_file, cid=cid, path="/nonexistent")  # no iptables to run
        assert (rc, out) == (0, None), err
    assert [both_families(ns, v) for v in VARIANTS] == before


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_del_finds_the_chain_in_either_family_and_an_old_snat_chain(node, variant, log_file, family):
    ns = node()
    prev = PREV_V4 if family == "ipv4" else {"interfaces": IFACES, "ips": [
        {"address": "fd00:1::5/64", "gateway": "fd00:1::1", "interface": 1}]}
    assert ours(ns, "ADD", conf([tcp(8080)], prev=prev), log_file)[0] == 0
    chain = dnat_chain(NET, "c1")
    assert [chain in table for table in both_families(ns, variant)] == [family == "ipv4", family == "ipv6"]
    bare = {"cniVersion": "1.0.0", "name": NET, "type": "portmap"}
    assert ours(ns, "DEL", bare, log_file)[0] == 0
    assert not [c for t in both_families(ns, variant) for c in t if c.startswith("CNI-DN-")]
    # a chain an old reference version made (CNI-SN-), alone: found and removed too
    old = old_snat_chain(NET, "c2")
    netns.run([f"{'ip6' if family == 'ipv6' else 'ip'}tables-{variant}", "-w", "-t", "nat", "-N", old], netns=ns)
    assert ours(ns, "DEL", bare, log_file, cid="c2")[0] == 0
    assert not [c for t in both_families(ns, variant) for c in t if c.startswith("CNI-SN-")]


def test_our_del_removes_the_reference_chain_without_the_mappings(node, variant, tmp_path, log_file):
    ns = node()
    config = conf([tcp(8080), udp(8081)], prev=PREV_V4)
    rc, out, err = reference(ns, "ADD", config, variant, tmp_path)
    assert rc == 0, (out, err)
    assert dnat_chain(NET, "c1") in nat(ns, variant)
    rc, out, err = ours(ns, "DEL", {"cniVersion": "1.0.0", "name": NET, "type": "portmap"}, log_file)
    assert (rc, out) == (0, None), err
    for table in both_families(ns, variant):
        assert not [c for c in table if c.startswith("CNI-DN-")]
        assert table.get("CNI-HOSTPORT-DNAT", []) == []


def test_check_fails_when_a_rule_is_missing(make_netns, log_file):
    ns = make_netns("check")
    config = conf(MIXED)
    assert ours(ns, "ADD", config, log_file)[0] == 0
    assert ours(ns, "CHECK", config, log_file) == (0, None, "")
    chain = dnat_chain(NET, "c1")
    dnat6 = "-p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:1::5]:80"
    netns.run(["ip6tables-nft", "-w", "-t", "nat", "-D", chain, *dnat6.split()], netns=ns)
    rc, out, _ = ours(ns, "CHECK", config, log_file)
    assert rc != 0 and out["code"] == 104 and dnat6 in out["details"], out
    assert ours(ns, "ADD", config, log_file)[0] == 0  # ADD again repairs it
    assert ours(ns, "CHECK", config, log_file)[0] == 0
    netns.run(["iptables-nft", "-w", "-t", "nat", "-D", "OUTPUT", *DNAT_JUMP.split()], netns=ns)
    rc, out, _ = ours(ns, "CHECK", config, log_file)
    assert rc != 0 and out["code"] == 104 and "nat/OUTPUT: rule missing" in out["details"], out
    rc, out, _ = ours(ns, "CHECK", dict(config, prevResult=None), log_file)
    assert rc != 0 and "prevResult" in out["msg"]


def test_check_of_an_ipv4_only_pod_ignores_ipv6_rules(make_netns, log_file, tmp_path):
    """plugins#819: the Go portmap checks an IPv4 pod's rules in ip6tables too."""
    ns = make_netns("check4")
    config = conf([tcp(8080), udp(8081)], prev=PREV_V4)
    assert ours(ns, "ADD", config, log_file)[0] == 0
    assert not rules(nat(ns, "nft", ipv6=True))
    # A same-named IPv6 chain with other rules (e.g. left by an earlier dual-stack pod of that ID):
    chain = dnat_chain(NET, "c1")
    netns.run(["ip6tables-nft", "-w", "-t", "nat", "-N", chain], netns=ns)
    netns.run(["ip6tables-nft", "-w", "-t", "nat", "-A", chain, "-p", "tcp", "--dport", "1", "-j", "RETURN"], netns=ns)
    assert ours(ns, "CHECK", config, log_file)[0] == 0
    rc, out, _ = reference(ns, "CHECK", config, "nft", tmp_path)
    assert rc != 0 and "ipv6" in out["msg"], out  # the reference fails over the IPv6 table


def test_gc_removes_chains_of_containers_not_in_the_valid_attachments(make_netns, log_file):
    ns = make_netns("gc")
    for cid in ("c1", "c2", "c3"):
        assert ours(ns, "ADD", conf(MIXED, version="1.1.0"), log_file, cid=cid)[0] == 0
    assert ours(ns, "ADD", conf([tcp(9000)], version="1.1.0", name="othernet"), log_file, cid="c2")[0] == 0
    gc = {"cniVersion": "1.1.0", "name": NET, "type": "portmap",
          "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"},
                                        {"containerID": "c3", "ifname": "net1"}]}
    rc, out, err = ours(ns, "GC", gc, log_file, cid="", ifname="", netns_path="")
    assert (rc, out) == (0, None), err
    for table in both_families(ns, "nft"):
        assert dnat_chain(NET, "c2") not in table
        assert not [r for r in table["CNI-HOSTPORT-DNAT"] if dnat_chain(NET, "c2") in r]
        assert {dnat_chain(NET, "c1"), dnat_chain(NET, "c3")} <= set(table)
    assert dnat_chain("othernet", "c2") in nat(ns, "nft")  # another network's pod is not ours to collect
    rc, out, _ = ours(ns, "GC", dict(gc, **{"cni.dev/valid-attachments": []}), log_file, cid="", ifname="",
                      netns_path="")
    assert rc == 0
    assert [c for c in nat(ns, "nft") if c.startswith("CNI-DN-")] == [dnat_chain("othernet", "c2")]


def test_status_is_ok_when_iptables_works(make_netns, log_file):
    ns = make_netns("status")
    rc, out, err = ours(ns, "STATUS", {"cniVersion": "1.1.0", "name": NET, "type": "portmap"}, log_file,
                        cid="", ifname="", netns_path="")
    assert (rc, out) == (0, None), err


def test_without_usable_iptables_status_is_50_and_add_is_103(make_netns, log_file):
    ns = make_netns("noipt")
    status = {"cniVersion": "1.1.0", "name": NET, "type": "portmap"}
    rc, out, _ = ours(ns, "STATUS", status, log_file, cid="", ifname="", netns_path="", path="/nonexistent")
    assert rc != 0 and out["code"] == 50 and "iptables is not usable" in out["msg"], out
    rc, out, _ = ours(ns, "ADD", conf([tcp(8080)], snat=False), log_file, path="/nonexistent")
    assert rc != 0 and out["code"] == 103 and "not installed" in out["msg"], out


def test_concurrent_adds_and_dels_of_many_pods(make_netns, log_file):
    """Every pod's chain and entry rules, the shared rules exactly once; then all gone again."""
    ns = make_netns("race")
    cids = [f"pod{n}" for n in range(8)]

    def all_at_once(command, config):
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, "env", "-i", "PATH=" + SYSTEM_PATH,
                                   f"CNI_COMMAND={command}", f"CNI_CONTAINERID={cid}", "CNI_NETNS=/x",
                                   "CNI_IFNAME=eth0", f"CNI_PATH={GO_PLUGINS}", PLUGIN], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cid in cids]
        for proc, n in zip(procs, range(len(cids))):
            body = dict(config(n), pluginLogFile=log_file)
            out, err = proc.communicate(json.dumps(body), timeout=120)
            assert proc.returncode == 0, (out, err)

    all_at_once("ADD", lambda n: conf([tcp(8000 + n), udp(8000 + n)]))
    for table in both_families(ns, "nft"):
        assert {dnat_chain(NET, cid) for cid in cids} <= set(table)
        assert len(table["CNI-HOSTPORT-DNAT"]) == 2 * len(cids)
        assert table["PREROUTING"] == table["OUTPUT"] == [DNAT_JUMP] and table["POSTROUTING"] == [MASQ_JUMP]
        assert len(table["CNI-HOSTPORT-SETMARK"]) == len(table["CNI-HOSTPORT-MASQ"]) == 1
    all_at_once("DEL", lambda n: {"cniVersion": "1.0.0", "name": NET, "type": "portmap"})
    for table in both_families(ns, "nft"):
        assert not [c for c in table if c.startswith("CNI-DN-")] and table["CNI-HOSTPORT-DNAT"] == []


def test_explicit_netfilter_mode_wins_over_detection(make_netns, log_file):
    ns = make_netns("mode")  # unmarked: detection would say nft
    assert ours(ns, "ADD", conf([tcp(8080)], netfilterMode="legacy"), log_file)[0] == 0
    assert dnat_chain(NET, "c1") in nat(ns, "legacy") and not rules(nat(ns, "nft"))
    assert ours(ns, "DEL", conf(netfilterMode="legacy", prev=None), log_file)[0] == 0
    assert dnat_chain(NET, "c1") not in nat(ns, "legacy")


# ---------------------------------------------------------------------------------------------
# Traffic: node, pod (bridge + host-local + portmap-compat via cnitool and CAP_ARGS), client host


NODE_IP, NODE_IP2, CLIENT_IP = "192.168.77.1", "192.168.77.3", "192.168.77.2"
GATEWAY = "10.88.0.1"


@pytest.fixture
def servers():
    started = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.fixture
def cnitool_cache():
    """Pods whose libcni result cache (/var/lib/cni/results) to remove should the test stop before DEL."""
    pods = []
    yield pods
    for pod in pods:
        try:
            os.unlink(f"/var/lib/cni/results/{NET}-{pod_container_id(pod)}-eth0")
        except FileNotFoundError:
            pass


def wire_node_and_client(node_ns: str, client: str, tmp_path) -> dict:
    """The node's eth0 (NODE_IP, NODE_IP2) wired to the client host's (CLIENT_IP), and a conflist of the Go
    bridge + host-local and portmap-compat; cnitool's keyword arguments for that conflist."""
    veth(node_ns, "eth0", client, "eth0")
    netns.run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"], netns=node_ns)
    netns.run(["ip", "addr", "add", f"{NODE_IP2}/24", "dev", "eth0"], netns=node_ns)
    netns.run(["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"], netns=client)
    netconf = tmp_path / "net.d"
    netconf.mkdir()
    (netconf / "10-podnet.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": NET, "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "subnet": "10.88.0.0/24", "routes": [{"dst": "0.0.0.0/0"}],
                      "dataDir": str(tmp_path / "ipam")}},
            {"type": "portmap-compat", "capabilities": {"portMappings": True},
             "pluginLogFile": str(tmp_path / "plugin.log")}]}))
    return dict(netconf_dir=str(netconf), cni_path=f"{GO_PLUGINS}:{os.path.dirname(PLUGIN)}")


def test_host_ports_reach_the_pod_from_another_host_the_node_and_the_pod(node, variant, make_netns, cnitool,
                                                                        tmp_path, servers, cnitool_cache):
    node_ns, client, pod, pod2 = node("node"), make_netns("client"), make_netns("pod"), make_netns("podtwo")
    cnitool_cache += [pod, pod2]
    tool = wire_node_and_client(node_ns, client, tmp_path)
    mappings = [tcp(8080), udp(8081), tcp(9090, hostIP=NODE_IP)]

    result = run_cnitool(cnitool, node_ns, "add", NET, pod, cap_args={"portMappings": mappings}, **tool)
    pod_ip = result["ips"][0]["address"].split("/")[0]
    servers.append(start_server(pod, "pod"))
    cid = pod_container_id(pod)
    table = nat(node_ns, variant)
    assert f'-m comment --comment "dnat name: \\"{NET}\\" id: \\"{cid}\\""' in " ".join(table["CNI-HOSTPORT-DNAT"])
    assert not rules(nat(node_ns, other(variant)))
    route_localnet = netns.run(["cat", "/proc/sys/net/ipv4/conf/cni0/route_localnet"], netns=node_ns).stdout
    assert route_localnet.strip() == "1"

    # From another host: the client's own address reaches the pod (no masquerade).
    assert tcp_get(client, NODE_IP, 8080) == f"pod: tcp from {CLIENT_IP}"
    assert tcp_get(client, NODE_IP2, 8080) == f"pod: tcp from {CLIENT_IP}"
    assert udp_ask(client, NODE_IP, 8081, source_port=40000) == f"pod: udp ping from {CLIENT_IP}"
    # hostIP narrows the match: 9090 only on NODE_IP.
    assert tcp_get(client, NODE_IP, 9090) == f"pod: tcp from {CLIENT_IP}"
    with pytest.raises(ConnectionRefusedError):
        tcp_get(client, NODE_IP2, 9090)
    # From the node itself via 127.0.0.1: marked, masqueraded to the bridge address.
    assert tcp_get(node_ns, "127.0.0.1", 8080) == f"pod: tcp from {GATEWAY}"
    assert udp_ask(node_ns, "127.0.0.1", 8081) == f"pod: udp ping from {GATEWAY}"
    # From the pod to its own host port (hairpin): marked and masqueraded too, or the reply would be lost.
    assert tcp_get(pod, NODE_IP, 8080) == f"pod: tcp from {GATEWAY}"
    assert udp_ask(pod, NODE_IP, 8081) == f"pod: udp ping from {GATEWAY}"
    assert tcp_get(pod, pod_ip, 80) == f"pod: tcp from {pod_ip}"  # (the server itself, directly)

    run_cnitool(cnitool, node_ns, "check", NET, pod, cap_args={"portMappings": mappings}, **tool)
    run_cnitool(cnitool, node_ns, "del", NET, pod, cap_args={"portMappings": mappings}, **tool)
    table = nat(node_ns, variant)
    assert not [c for c in table if c.startswith("CNI-DN-")] and table["CNI-HOSTPORT-DNAT"] == []
    with pytest.raises(ConnectionRefusedError):
        tcp_get(client, NODE_IP, 8080)

    # The pod is replaced (new IP): the client's UDP flow from port 40000 still has a conntrack entry
    # DNATing it to the old pod; ADD deletes UDP entries to the mapped ports, so it reaches the new one.
    result = run_cnitool(cnitool, node_ns, "add", NET, pod2, cap_args={"portMappings": mappings}, **tool)
    assert result["ips"][0]["address"].split("/")[0] != pod_ip
    servers.append(start_server(pod2, "podtwo"))
    assert udp_ask(client, NODE_IP, 8081, source_port=40000) == f"podtwo: udp ping from {CLIENT_IP}"
    assert tcp_get(client, NODE_IP, 8080) == f"podtwo: tcp from {CLIENT_IP}"
    run_cnitool(cnitool, node_ns, "del", NET, pod2, **tool)  # no CAP_ARGS: our DEL needs no mappings
    assert not [c for c in nat(node_ns, variant) if c.startswith("CNI-DN-")]


def test_containerd_port_mappings_and_cni_args_reach_the_pod(make_netns, cnitool, tmp_path, servers, cnitool_cache):
    """What containerd's CRI sends (tests/support/runtime_input.py): go-cni's untagged PortMapping marshalled with
    capitalised keys and HostIP "", and its CNI_ARGS; cnitool's CAP_ARGS are injected as given, as
    containerd's are. The host port reaches the pod from another host; DEL removes the rules."""
    node_ns, client, pod = make_netns("node"), make_netns("client"), make_netns("pod")
    mark_mode(node_ns, "nft")
    cnitool_cache.append(pod)
    tool = wire_node_and_client(node_ns, client, tmp_path)
    mapping = dict(CONTAINERD_PORT_MAPPING, ContainerPort=80)
    result = run_cnitool(cnitool, node_ns, "add", NET, pod, cap_args={"portMappings": [mapping]},
                         cni_args=CONTAINERD_CNI_ARGS[0], **tool)
    pod_ip = result["ips"][0]["address"].split("/")[0]
    servers.append(start_server(pod, "pod"))
    assert f"--dport 18080 -j DNAT --to-destination {pod_ip}:80" in " ".join(rules(nat(node_ns, "nft")))
    assert tcp_get(client, NODE_IP, mapping["HostPort"]) == f"pod: tcp from {CLIENT_IP}"
    run_cnitool(cnitool, node_ns, "check", NET, pod, cap_args={"portMappings": [mapping]},
                cni_args=CONTAINERD_CNI_ARGS[1], **tool)
    run_cnitool(cnitool, node_ns, "del", NET, pod, cap_args={"portMappings": [mapping]},
                cni_args=CONTAINERD_CNI_ARGS[1], **tool)
    assert not [c for c in nat(node_ns, "nft") if c.startswith("CNI-DN-")]
    with pytest.raises(ConnectionRefusedError):
        tcp_get(client, NODE_IP, mapping["HostPort"])
