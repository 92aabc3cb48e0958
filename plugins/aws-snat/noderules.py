"""aws-snat's node rules: the node facts, the desired netfilter state, rule 1024 and rp_filter, and
converging to them or comparing with them (what the table in main.py's docstring describes).

Used by aws-snat's ADD, CHECK, GC and STATUS and by the node agent every round; pure where it can be
(`desired`), the rest reads and writes the host's netfilter, rules and sysctls.
"""

from __future__ import annotations

import os

from cnicore import ipv4, jsonio, settings
from cnicore.fsutil import write_atomic
from cnicore.errors import AWS_FAILURE, NETLINK_FAILURE, STORE_FAILURE, CNIError
from cnicore.netfilter import Netfilter, Rule, TableState, quote
from cnicore.netfilter.model import jump_target, split_spec
from cnicore.netfilter.stamp import Stamp
from cnicore.record import record
from cnicore.rtnl import IPV4_DEVCONF_RP_FILTER, MAIN_TABLE, RTPROT_BOOT, Netns, check_ifname, is_mac
from cnicore.rtnl import Rule as IpRule
from cnicore.pool import Document
from cnicore.store import Store


SNAT_CHAIN = "AWS-SNAT-CHAIN-0"
CONNMARK_CHAIN = "AWS-CONNMARK-CHAIN-0"
RULE_PRIORITY = 1024
SNAT_JUMP_COMMENT = "AWS SNAT CHAIN"
SNAT_VPC_COMMENT = "AWS SNAT CHAIN"  # upstream's comments on the RETURN rules
SNAT_EXCLUDED_COMMENT = "AWS SNAT CHAIN EXCLUSION"
CONNMARK_VPC_COMMENT = "AWS CONNMARK CHAIN, VPC CIDR"
CONNMARK_EXCLUDED_COMMENT = "AWS CONNMARK CHAIN, EXCLUDED CIDR"
SNAT_COMMENT = "AWS, SNAT"
CONNMARK_JUMP_COMMENT = "AWS, outbound connections"
CONNMARK_COMMENT = "AWS, CONNMARK"
NODEPORT_COMMENT = "AWS, primary ENI"
# Built-in chains we put rules in; a rule there with one of these comments is ours.
SWEPT_CHAINS = {"nat": ("PREROUTING", "POSTROUTING"), "mangle": ("PREROUTING",)}
OUR_COMMENTS = {SNAT_JUMP_COMMENT, SNAT_COMMENT, CONNMARK_JUMP_COMMENT, CONNMARK_COMMENT, NODEPORT_COMMENT}
RANDOM_FLAG = {"prng": " --random-fully", "hashrandom": " --random", "none": ""}
STAMP_FILE = "aws-snat.stamp"  # in the data dir
STAMP_VERSION = 2  # 2: the built-in chains' digest counts only our rules (see stamp)
IFACE_FILE = "aws-snat.primary-interface"  # in the data dir: "<MAC> <interface name>"


Node = record("Node", "primary_ip primary_mac vpc_cidrs source")
Node.__doc__ = "The node's primary IP and MAC, the VPC's CIDRs, and where these facts came from."
Desired = record("Desired", "nat mangle fwmark loose_rp_filter")
Desired.__doc__ = """The nat and mangle TableStates, whether rule 1024 is wanted (else ours must be absent),
and the interface that needs rp_filter 0 or 2 (or None)."""


# ---------------------------------------------------------------------------------------------
# Node facts


def netfilter(cfg: settings.SNAT) -> Netfilter:
    return Netfilter(cfg.netfilter_mode, lock_dir=cfg.data_dir)


def node_desired(cfg: settings.SNAT, network: str) -> Desired:
    """The node's desired netfilter state for these settings and the node facts of `network` (what
    ADD and GC converge to, and the agent every round)."""
    return desired(cfg, *_node(network, cfg))


def _node(network: str, cfg: settings.SNAT) -> tuple[Node, str | None]:
    """(node facts, primary interface name or None when no rule needs it)."""
    node = node_facts(network, cfg.data_dir)
    needs_interface = cfg.node_port_support or not cfg.external_snat
    if not needs_interface:
        return node, None
    name = primary_interface(node.primary_mac, cfg.data_dir)
    if name is None:
        raise CNIError(NETLINK_FAILURE, f"no interface of this node has the primary ENI's MAC {node.primary_mac} "
                                        f"(from {node.source})")
    return node, name


def node_facts(network: str, data_dir: str) -> Node:
    """Primary IP and MAC and the VPC CIDRs: from the state store, else (no document) from IMDS."""
    with Store(data_dir, network).locked(shared=True) as tx:
        doc = tx.read_head()  # the node facts, without parsing the ENIs
    facts = Document(doc).node if doc is not None else None
    if facts:
        return _checked(facts.primary_ip, facts.primary_mac, facts.vpc_cidrs, f"the state store {tx.store.path}")
    from cnicore.imds import IMDS, IMDSError  # the slow path only: aws-snat used without aws-eni-ipam
    try:
        with IMDS() as imds:
            eni = imds.eni(imds.get("mac").strip().lower())
    except (IMDSError, ValueError) as exc:
        raise CNIError(AWS_FAILURE, f"no state store document for network {network} in {data_dir}, "
                                    f"and IMDS failed: {exc}") from None
    return _checked(eni.primary_ip, eni.mac, eni.vpc_cidrs, "IMDS")


def _checked(ip, mac, cidrs, source: str) -> Node:
    # cnicore.ipv4: facts written as the store and IMDS write them are read without ipaddress
    try:
        ip = ipv4.text(ipv4.address(ip))
        if not is_mac(mac):
            raise ValueError(f"bad MAC {mac!r}")
        if not isinstance(cidrs, (list, tuple)) or not cidrs:
            raise ValueError(f"bad VPC CIDR list {cidrs!r}")
        cidrs = tuple(f"{ipv4.text(base)}/{length}" for base, length in map(ipv4.network, cidrs))
    except (ValueError, TypeError) as exc:
        raise CNIError(STORE_FAILURE if source != "IMDS" else AWS_FAILURE,
                       f"node facts from {source} are unusable: {exc}") from None
    return Node(ip, mac, cidrs, source)


def primary_interface(mac: str, data_dir: str) -> str | None:
    """The interface with the primary ENI's MAC: the one found last time (kept in the data dir) if it
    still has that MAC (one request), else the first of the links with that MAC (a dump of every
    link: 700 veths on a full node)."""
    path = os.path.join(data_dir, IFACE_FILE)
    with Netns() as host:
        try:
            with open(path) as f:
                cached_mac, name = f.read(64).split()
            check_ifname("cached primary interface", name)
            link = host.link(name) if cached_mac == mac else None
            if link is not None and link.mac == mac:
                return name
        except (OSError, ValueError):
            pass  # no cache, a corrupt one, or that interface is gone
        name = next((link.name for link in host.links_with_mac(mac)), None)
    if name is not None:
        try:
            write_atomic(path, f"{mac} {name}\n".encode())
        except OSError:
            pass  # looked up again next time
    return name


# ---------------------------------------------------------------------------------------------
# What the node must look like (pure), written as iptables-save prints it


def desired(cfg: settings.SNAT, node: Node, primary_if: str | None) -> Desired:
    snat = not cfg.external_snat
    node_port = cfg.node_port_support
    mark = f"{cfg.connmark:#x}"
    veths = cfg.veth_prefix + "+"
    # RETURN for VPC and excluded CIDRs, with upstream's comments (pkg/networkutils/network.go)
    excluded = [c for c in dict.fromkeys(cfg.exclude_snat_cidrs) if c not in node.vpc_cidrs]
    cidrs = [(cidr, False) for cidr in dict.fromkeys(node.vpc_cidrs)] + [(cidr, True) for cidr in excluded]
    snat_returns = [_return(cidr, SNAT_EXCLUDED_COMMENT if ex else SNAT_VPC_COMMENT) for cidr, ex in cidrs]
    connmark_returns = [_return(cidr, CONNMARK_EXCLUDED_COMMENT if ex else CONNMARK_VPC_COMMENT) for cidr, ex in cidrs]
    restore = f"-j CONNMARK --restore-mark --nfmask {mark} --ctmask {mark}"
    random = RANDOM_FLAG[cfg.randomize_snat]
    if snat:
        nat = TableState("nat", chains={
            SNAT_CHAIN: [*snat_returns, f"-m comment --comment {quote(SNAT_COMMENT)} -m addrtype ! --dst-type LOCAL "
                                   f"-j SNAT --to-source {node.primary_ip}{random}"],
            CONNMARK_CHAIN: [*connmark_returns, f"-m comment --comment {quote(CONNMARK_COMMENT)} "
                                       f"-j CONNMARK --set-xmark {mark}/{mark}"],
        }, rules=[
            Rule("POSTROUTING", f"-m comment --comment {quote(SNAT_JUMP_COMMENT)} -j {SNAT_CHAIN}"),
            # the jump before the restore: a first packet gets its mark set, then copied
            Rule("PREROUTING", f"-i {veths} -m comment --comment {quote(CONNMARK_JUMP_COMMENT)} -j {CONNMARK_CHAIN}"),
            Rule("PREROUTING", f"-m comment --comment {quote(CONNMARK_COMMENT)} {restore}"),
        ])
    else:
        nat = TableState("nat", absent_chains=[SNAT_CHAIN, CONNMARK_CHAIN])
    mangle = []
    if node_port:
        mangle.append(Rule("PREROUTING", f"-i {primary_if} -m comment --comment {quote(NODEPORT_COMMENT)} "
                                         f"-m addrtype --dst-type LOCAL --limit-iface-in "
                                         f"-j CONNMARK --set-xmark {mark}/{mark}"))
    if node_port or snat:
        mangle.append(Rule("PREROUTING", f"-i {veths} -m comment --comment {quote(NODEPORT_COMMENT)} {restore}"))
    marking = node_port or snat
    return Desired(nat, TableState("mangle", rules=mangle), marking, primary_if if marking else None)


def _return(cidr: str, comment: str) -> str:
    to = "" if cidr == "0.0.0.0/0" else f"-d {cidr} "  # iptables-save leaves out a match-all destination
    return f"{to}-m comment --comment {quote(comment)} -j RETURN"


# ---------------------------------------------------------------------------------------------
# Converge and compare


TablePlan = record("TablePlan", "drifts stale reorder")
TablePlan.__doc__ = """What differs (for CHECK and the log), rules of ours in built-in chains that are no longer
wanted, and wanted rules present in the wrong order (removed, then added again)."""


def plan(nf: Netfilter, state: TableState) -> TablePlan:
    """Compare one table with `state` after one iptables-save (our rules are written canonically)."""
    from cnicore.netfilter.plan import compare  # only when iptables is read, never in the steady state
    actual = nf.chains(state.table)
    drifts = [str(d) for d in compare(state, actual, str)[0]]
    wanted = {(rule.chain, rule.spec) for rule in state.rules}
    stale = [Rule(chain, spec) for chain in SWEPT_CHAINS[state.table]
             for spec in dict.fromkeys(actual.get(chain, []))
             if (chain, spec) not in wanted and _comment(spec) in OUR_COMMENTS
             and jump_target(spec) not in state.absent_chains]  # those go with their chain
    drifts += [f"{state.table}/{rule.chain}: unexpected rule: {rule.spec}" for rule in stale]
    reorder = []
    chain_rules = [rule for rule in state.rules if rule.chain == "PREROUTING"]
    if state.table == "nat" and len(chain_rules) == 2:
        jump, restore = chain_rules
        have = actual.get("PREROUTING", [])
        # A missing jump would be appended after the restore: take the restore out and add both.
        if restore.spec in have and (jump.spec not in have or have.index(restore.spec) < have.index(jump.spec)):
            reorder.append(restore)
            if jump.spec in have:
                drifts.append(f"nat/PREROUTING: rule before the jump to {CONNMARK_CHAIN}: {restore.spec}")
    return TablePlan(drifts, stale, reorder)


def stamp(cfg: settings.SNAT, want: Desired) -> Stamp:
    """The stamp for these desired nat and mangle rules in this mode (see cnicore.netfilter.stamp)."""
    # what the verification looks for: the rules, and which rules of ours it sweeps (a new plugin
    # version that verifies otherwise bumps STAMP_VERSION)
    key = jsonio.dumps([STAMP_VERSION, want.nat, want.mangle, SWEPT_CHAINS, sorted(OUR_COMMENTS)], sort_keys=True,
                     default=list)
    chains = {}  # every chain `plan` reads: the swept built-in ones, ours, the ones our rules are in
    for state in (want.nat, want.mangle):
        names = [*SWEPT_CHAINS[state.table], *state.chains, *state.absent_chains,
                 *(rule.chain for rule in (*state.rules, *state.absent_rules))]
        chains[state.table] = list(dict.fromkeys(names))
    # in the built-in chains `plan` judges only rules with our comments: others' rules there (the
    # reference bridge's per-pod masquerade rule in POSTROUTING) do not void the stamp
    return Stamp(os.path.join(cfg.data_dir, STAMP_FILE), cfg.netfilter_mode, key,
                 chains, shared=SWEPT_CHAINS, comments=OUR_COMMENTS)


def converge(cfg: settings.SNAT, want: Desired, stamped: Stamp | None = None, trust_stamp: bool = True,
             pod_add: bool = False) -> list[str]:
    """Make the node so; return what was fixed (empty in the steady state).

    With a stamp: the nat and mangle tables are left unread when the stamp holds (nothing changed
    since they were last verified in place); after a verification that changed nothing, with the
    same fingerprint before and after it, the stamp is written.

    `pod_add` (a pod's ADD): when our fwmark rule is wanted and already there, the node's rules are
    not listed to look for others at our priority (a stale mark, a duplicate): the list has two rules
    per pod, and the agent's rounds and GC, which list them, remove those."""
    before = stamped.fingerprint() if stamped else None
    fixed = []
    if not (trust_stamp and stamped and stamped.holds(before)):
        nf = netfilter(cfg)
        for state in (want.nat, want.mangle):
            found = plan(nf, state)
            if not (found.drifts or found.stale or found.reorder):
                continue
            if found.reorder:
                nf.remove(state.table, rules=found.reorder)
            nf.converge(state._replace(absent_rules=[*state.absent_rules, *found.stale]))
            fixed += found.drifts
        if stamped and not fixed and before is not None and stamped.fingerprint() == before:
            stamped.record(before)
    fixed += _converge_fwmark(cfg.connmark, want.fwmark, pod_add)
    if want.loose_rp_filter:
        fixed += _converge_rp_filter(want.loose_rp_filter)
    return fixed


def differences(cfg: settings.SNAT, want: Desired, stamped: Stamp | None = None) -> list[str]:
    """Every way the node differs from `want`; the nat and mangle tables as in `converge`."""
    before = stamped.fingerprint() if stamped else None
    found = []
    if not (stamped and stamped.holds(before)):
        nf = netfilter(cfg)
        found = [drift for state in (want.nat, want.mangle) for drift in plan(nf, state).drifts]
        if stamped and not found and before is not None and stamped.fingerprint() == before:
            stamped.record(before)
    with Netns() as host:
        wrong, missing = _fwmark_plan(host, cfg.connmark, want.fwmark)
    found += [f"unexpected ip rule {rule}" for rule in wrong]
    found += [f"ip rule missing: {missing}"] if missing else []
    if want.loose_rp_filter:
        value = _rp_filter(want.loose_rp_filter)
        if value not in ("0", "2"):
            found.append(f"rp_filter of {want.loose_rp_filter} is {value}, not 2 (loose)")
    return found


def _comment(spec: str) -> str | None:
    words = split_spec(spec)
    for option, value in zip(words, words[1:]):
        if option == "--comment":
            return value
    return None


def _fwmark_rule(mark: int) -> IpRule:
    return IpRule(RULE_PRIORITY, MAIN_TABLE, mark=mark, mask=mark, protocol=RTPROT_BOOT)


def _fwmark_plan(host: Netns, mark: int, wanted: bool) -> tuple[list, IpRule | None]:
    """(rules at our priority to delete: another mark, a duplicate, or ours when unwanted; ours if missing).

    Only rules `<priority>: from all fwmark M/M lookup main` count: whoever made them, and none with
    any other selector (an `iif eth0 fwmark ...` rule is someone else's). Ours are made with protocol
    boot, and deleted naming it, which spares such rules of others at our priority."""
    ours = _fwmark_rule(mark)
    present = [rule for rule in host.rules(marked=True) if not (rule.src or rule.dst or rule.other)
               and rule.priority == RULE_PRIORITY and rule.table == MAIN_TABLE and rule.mark == rule.mask]
    same = [rule for rule in present if rule.key == ours.key]
    wrong = [rule for rule in present if rule.key != ours.key or not wanted]
    if wanted:
        wrong += same[1:]  # one copy stays; duplicates go
    return wrong, (ours if wanted and not same else None)


def _converge_fwmark(mark: int, wanted: bool, pod_add: bool = False) -> list[str]:
    done = []
    with Netns() as host:
        if pod_add and wanted:
            ours = _fwmark_rule(mark)
            if not host.add_rule(ours):  # False: it was there (the kernel refuses a second copy)
                return done
            done.append(f"added ip rule {ours}")  # new: a changed mark may have left the old one
        wrong, missing = _fwmark_plan(host, mark, wanted)
        for rule in wrong:
            if host.delete_rule(rule):  # False: a concurrent process deleted it first
                done.append(f"removed ip rule {rule}")
        if missing and host.add_rule(missing):  # False: a concurrent ADD added it first (never twice)
            done.append(f"added ip rule {missing}")
    return done


def _rp_filter(ifname: str) -> str:
    try:
        with open(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter") as f:
            return f.read().strip()
    except OSError as exc:
        raise CNIError(NETLINK_FAILURE, f"cannot read rp_filter of {ifname}: {exc.strerror}") from None


def _converge_rp_filter(ifname: str) -> list[str]:
    value = _rp_filter(ifname)
    if value in ("0", "2"):  # off or loose already
        return []
    with Netns() as host:
        host.set_ipv4_conf(f"set rp_filter of {ifname} to 2", ifname, IPV4_DEVCONF_RP_FILTER, 2)
    return [f"rp_filter of {ifname}: {value} -> 2"]
