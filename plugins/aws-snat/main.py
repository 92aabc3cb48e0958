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
table that differs gets one iptables-restore transaction (two when a rule must move, see `noderules.plan`).

Our rules in built-in chains are found by their comments ("AWS, ..."), so rules of ours left by an
earlier setting (another mark, prefix, or external SNAT switched on) or by upstream aws-node are
removed; nothing else in those chains is touched, and ours are appended after the others' (kube-proxy's
service DNAT must come before the connmark jump).

Node facts (primary IP and MAC, VPC CIDRs) come from the state store that aws-eni-ipam and the agent
keep (no IMDS call on ADD); without one, from IMDS. The primary interface is found by its MAC (the
name found last time is kept in the data dir and used while it still has that MAC).

The rules' code (node facts, the desired state, converge and compare) is in `noderules.py`, beside
this file, and the node agent runs it too. The handlers that converge or compare load it; DEL, which
has nothing to do, and VERSION start without netfilter, rtnetlink or the store (~2.4 ms of CPU per
exec, BENCHMARKS.md).
"""

from __future__ import annotations

from cnicore import settings, skel
from cnicore.errors import CHECK_FAILED, INVALID_CONFIG, PLUGIN_NOT_AVAILABLE, CNIError


def cmd_add(args: skel.CmdArgs) -> dict:
    from aws_snat import noderules
    if args.prev_result is None:
        raise CNIError(INVALID_CONFIG, "must be called as chained plugin",
                       "aws-snat needs the prevResult of the plugins before it in the conflist")
    cfg = _settings(args)
    want = noderules.node_desired(cfg, args.network)
    fixed = noderules.converge(cfg, want, noderules.stamp(cfg, want), pod_add=True)
    if fixed:
        args.log.info("node rules converged", fixed=fixed)
    return args.prev_result


def cmd_del(args: skel.CmdArgs) -> None:
    # The rules are the node's, shared by every pod: one pod going away changes none of them.
    return None


def cmd_check(args: skel.CmdArgs) -> None:
    from aws_snat import noderules
    if args.prev_result is None:
        raise CNIError(INVALID_CONFIG, "required prevResult missing")
    cfg = _settings(args)
    want = noderules.node_desired(cfg, args.network)
    found = noderules.differences(cfg, want, noderules.stamp(cfg, want))
    if found:
        raise CNIError(CHECK_FAILED, f"node SNAT rules are not as ADD leaves them: {'; '.join(found)}")


def cmd_gc(args: skel.CmdArgs) -> None:
    from aws_snat import noderules
    cfg = _settings(args)  # a bad setting is an error; anything else is logged and GC carries on
    try:
        want = noderules.node_desired(cfg, args.network)
        fixed = noderules.converge(cfg, want, noderules.stamp(cfg, want), trust_stamp=False)  # GC verifies in full
    except CNIError as exc:
        args.log.error(f"GC could not converge the node rules: {exc}")
        return
    if fixed:
        args.log.info("node rules converged", fixed=fixed)


def cmd_status(args: skel.CmdArgs) -> None:
    from aws_snat import noderules
    from cnicore.netfilter import NetfilterError
    cfg = _settings(args)
    try:
        nf = noderules.netfilter(cfg)
        for table in noderules.SWEPT_CHAINS:
            nf.chains(table)
    except NetfilterError as exc:
        raise CNIError(PLUGIN_NOT_AVAILABLE, f"netfilter is not usable: {exc.msg}") from None


def _settings(args: skel.CmdArgs) -> settings.SNAT:
    return settings.from_conf(args.conf, settings.SNAT)


def main() -> None:
    skel.plugin_main("aws-snat", {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check,
                                  "GC": cmd_gc, "STATUS": cmd_status},
                     about="aws-snat: node SNAT and connmark rules for pods on VPC addresses", reads_cni_args=False)


if __name__ == "__main__":
    main()
