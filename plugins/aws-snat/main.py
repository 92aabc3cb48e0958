"""aws-snat: the node's SNAT and connmark rules (ARCHITECTURE §5), a chained plugin.

The rules are node-wide, shared by every pod: each ADD converges them (desired versus actual, never
appended twice, a rule removed by hand is put back) and passes `prevResult` through unchanged; DEL
leaves them alone; CHECK reports each difference; GC converges again.

    nat     AWS-SNAT-CHAIN-0      -d <VPC CIDR> "AWS SNAT CHAIN" -j RETURN ...,
                                  -d <excluded CIDR> "AWS SNAT CHAIN EXCLUSION" -j RETURN ...,
                                  "AWS, SNAT": not to a local address -> SNAT to the primary IP
            POSTROUTING           "AWS SNAT CHAIN" -> AWS-SNAT-CHAIN-0
            AWS-CONNMARK-CHAIN-0  -d <VPC CIDR> "AWS CONNMARK CHAIN, VPC CIDR" -j RETURN ...,
                                  -d <excluded CIDR> "AWS CONNMARK CHAIN, EXCLUDED CIDR" -j RETURN ...,
                                  "AWS, CONNMARK": set the mark
            PREROUTING            -i <vethPrefix>+ "AWS, outbound connections" -> AWS-CONNMARK-CHAIN-0,
                                  then "AWS, CONNMARK": restore the mark (first packets)
    mangle  PREROUTING            "AWS, primary ENI": -i <primary> to a local address: set the mark
                                  (NodePort), -i <vethPrefix>+: restore the mark (every later packet)
    ip rule 1024                  from all fwmark <mark>/<mark> lookup main
    sysctl                        rp_filter=2 (loose) on the primary interface

Why each piece: a pod whose IP is on a secondary ENI has its traffic routed out of that ENI (rule
1536). Traffic that the node SNATs to its primary IP, and replies to NodePort traffic (un-DNATed to
the primary IP), must leave by the primary ENI instead, or the VPC drops it (source/dest check). The
connection mark steers those packets to the main table (rule 1024); the replies coming back on the
primary ENI are addressed to a pod whose reverse route is the secondary ENI, hence loose rp_filter.
Beyond upstream 1.1 (which ties them to NodePort support): the mangle restore rule, rule 1024 and
rp_filter are there for "SNAT or NodePort", as SNAT of secondary-ENI pods needs all three too. With
external SNAT both nat chains go (marking pod traffic to the primary ENI would make the VPC drop it:
the pod IP is not the primary ENI's).

Cost: in the steady state, no iptables at all: a stamp in the data dir (cnicore.netfilter.stamp)
records the fingerprint (a digest of our nf_tables chains and of our rules in the built-in ones, or
of the legacy tables) at which a verification last found every rule in place for exactly these
desired rules, settings and mode; if the fingerprint is unchanged, nothing that verification judges
can have changed, and only rule 1024 (one
rtnetlink dump) and rp_filter (a sysctl read) are looked at. Otherwise one iptables-save per table
(the rules are written exactly as iptables-save prints them, so they compare as text) verifies, and a
table that differs gets one iptables-restore transaction (two when a rule must move, see `plan`).

Our rules in built-in chains are found by their comments ("AWS, ..."), so rules of ours left by an
earlier setting (another mark, prefix, or external SNAT switched on) or by upstream aws-node are
removed; nothing else in those chains is touched, and ours are appended after the others' (kube-proxy's
service DNAT must come before the connmark jump).

Node facts (primary IP and MAC, VPC CIDRs) come from the state store that aws-eni-ipam and the agent
keep (no IMDS call on ADD); without one, from IMDS. The primary interface is found by its MAC (the
name found last time is kept in the data dir and used while it still has that MAC).
"""

from __future__ import annotations

import os

from cnicore import ipv4, jsonio, settings, skel
from cnicore.errors import (AWS_FAILURE, CHECK_FAILED, INVALID_CONFIG, NETLINK_FAILURE, PLUGIN_NOT_AVAILABLE,
                            STORE_FAILURE, CNIError)
from cnicore.netfilter import Netfilter, NetfilterError, Rule, TableState, quote
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
# The handlers


def cmd_add(args: skel.CmdArgs) -> dict:
    if args.prev_result is None:
        raise CNIError(INVALID_CONFIG, "must be called as chained plugin",
                       "aws-snat needs the prevResult of the plugins before it in the conflist")
    cfg = _settings(args)
    want = node_desired(cfg, args.network)
    fixed = converge(cfg, want, stamp(cfg, want))
    if fixed:
        args.log.info("node rules converged", fixed=fixed)
    return args.prev_result


def cmd_del(args: skel.CmdArgs) -> None:
    # The rules are the node's, shared by every pod: one pod going away changes none of them.
    return None


def cmd_check(args: skel.CmdArgs) -> None:
    if args.prev_result is None:
        raise CNIError(INVALID_CONFIG, "required prevResult missing")
    cfg = _settings(args)
    want = node_desired(cfg, args.network)
    found = differences(cfg, want, stamp(cfg, want))
    if found:
        raise CNIError(CHECK_FAILED, f"node SNAT rules are not as ADD leaves them: {'; '.join(found)}")


def cmd_gc(args: skel.CmdArgs) -> None:
    cfg = _settings(args)  # a bad setting is an error; anything else is logged and GC carries on
    try:
        want = node_desired(cfg, args.network)
        fixed = converge(cfg, want, stamp(cfg, want), trust_stamp=False)  # GC verifies in full
    except CNIError as exc:
        args.log.error(f"GC could not converge the node rules: {exc}")
        return
    if fixed:
        args.log.info("node rules converged", fixed=fixed)


def cmd_status(args: skel.CmdArgs) -> None:
    cfg = _settings(args)
    try:
        nf = _netfilter(cfg)
        for table in SWEPT_CHAINS:
            nf.chains(table)
    except NetfilterError as exc:
        raise CNIError(PLUGIN_NOT_AVAILABLE, f"netfilter is not usable: {exc.msg}") from None


# ---------------------------------------------------------------------------------------------
# Settings and node facts


def _settings(args: skel.CmdArgs) -> settings.SNAT:
    return settings.from_conf(args.conf, settings.SNAT)


def _netfilter(cfg: settings.SNAT) -> Netfilter:
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
        doc = tx.read()
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
    # facts written as the store and IMDS write them are read without ipaddress (~2 ms to import)
    plain = (ipv4.plain(ip) is not None and isinstance(cidrs, (list, tuple))
             and all(ipv4.plain_network(c) for c in cidrs))
    try:
        if not plain:
            import ipaddress
            ip = str(ipaddress.IPv4Address(ip))
        if not is_mac(mac):
            raise ValueError(f"bad MAC {mac!r}")
        if not isinstance(cidrs, (list, tuple)) or not cidrs:
            raise ValueError(f"bad VPC CIDR list {cidrs!r}")
        cidrs = tuple(cidrs if plain else (str(ipaddress.IPv4Network(c)) for c in cidrs))
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
        temp = f"{path}.tmp.{os.getpid()}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, f"{mac} {name}\n".encode())
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass
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


def converge(cfg: settings.SNAT, want: Desired, stamped: Stamp | None = None, trust_stamp: bool = True) -> list[str]:
    """Make the node so; return what was fixed (empty in the steady state).

    With a stamp: the nat and mangle tables are left unread when the stamp holds (nothing changed
    since they were last verified in place); after a verification that changed nothing, with the
    same fingerprint before and after it, the stamp is written."""
    before = stamped.fingerprint() if stamped else None
    fixed = []
    if not (trust_stamp and stamped and stamped.holds(before)):
        nf = _netfilter(cfg)
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
    fixed += _converge_fwmark(cfg.connmark, want.fwmark)
    if want.loose_rp_filter:
        fixed += _converge_rp_filter(want.loose_rp_filter)
    return fixed


def differences(cfg: settings.SNAT, want: Desired, stamped: Stamp | None = None) -> list[str]:
    """Every way the node differs from `want`; the nat and mangle tables as in `converge`."""
    before = stamped.fingerprint() if stamped else None
    found = []
    if not (stamped and stamped.holds(before)):
        nf = _netfilter(cfg)
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


def _fwmark_plan(host: Netns, mark: int, wanted: bool) -> tuple[list, IpRule | None]:
    """(rules at our priority to delete: another mark, a duplicate, or ours when unwanted; ours if missing).

    Only rules `<priority>: from all fwmark M/M lookup main` count: whoever made them, and none with
    any other selector (an `iif eth0 fwmark ...` rule is someone else's). Ours are made with protocol
    boot, and deleted naming it, which spares such rules of others at our priority."""
    ours = IpRule(RULE_PRIORITY, MAIN_TABLE, mark=mark, mask=mark, protocol=RTPROT_BOOT)
    present = [rule for rule in host.rules(marked=True) if not (rule.src or rule.dst or rule.other)
               and rule.priority == RULE_PRIORITY and rule.table == MAIN_TABLE and rule.mark == rule.mask]
    same = [rule for rule in present if rule.key == ours.key]
    wrong = [rule for rule in present if rule.key != ours.key or not wanted]
    if wanted:
        wrong += same[1:]  # one copy stays; duplicates go
    return wrong, (ours if wanted and not same else None)


def _converge_fwmark(mark: int, wanted: bool) -> list[str]:
    done = []
    with Netns() as host:
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


def main() -> None:
    skel.plugin_main("aws-snat", {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check,
                                  "GC": cmd_gc, "STATUS": cmd_status},
                     about="aws-snat: node SNAT and connmark rules for pods on VPC addresses", reads_cni_args=False)


if __name__ == "__main__":
    main()
