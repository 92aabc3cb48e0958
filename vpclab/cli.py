"""The `vpclab` command: up, status, exec, fault, calls, timing, fragment, down (see `vpclab --help`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import DEFAULT_NAME
from .errors import LabError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except LabError as e:
        print(f"vpclab: error: {e}", file=sys.stderr)
        return 1


def _up(a) -> None:
    from .api import Lab

    lab = Lab.up(a.name, a.nodes, a.instance_type, a.vpc_cidr or ["10.0.0.0/16"], a.subnet_prefix, a.azs,
                 a.imds_staleness, a.extra_host or [], ec2_throttling=a.ec2_throttling, ec2_latency=a.ec2_latency)
    _print_status(lab.status())


def _status(a) -> None:
    status = _lab(a).status()
    if a.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)


def _exec(a) -> None:
    lab = _lab(a)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    argv = lab.exec_argv(a.node, command)
    os.execvpe(argv[0], argv, lab.exec_env(a.node))


def _fault(a) -> None:
    lab = _lab(a)
    if a.clear:
        lab.clear_faults()
    elif a.action is None:
        print(json.dumps(lab.status()["faults"], indent=2))
    else:
        lab.fault(a.action, a.error, a.count, a.duration, a.latency, a.node)


def _calls(a) -> None:
    lab = _lab(a)
    if a.imds:
        counts = lab.imds_calls(a.reset)
    elif a.json:
        counts = lab.ec2_throttling(a.reset) if a.throttling else lab.ec2_calls(a.reset)
    else:
        _print_calls(lab.ec2_calls(a.reset), lab.ec2_throttling(a.reset))
        return
    if a.json:
        print(json.dumps(counts, indent=2, sort_keys=True))
    else:
        for key, n in sorted(counts.items()):
            print(f"{n:6d}  {key}")


def _print_calls(calls: dict[str, int], throttling: dict) -> None:
    """One row per action and per bucket: calls, tokens spent, requests throttled, tokens left."""
    buckets = throttling["buckets"]
    state = "on" if throttling["enabled"] else "off"
    print(f"{'calls':>6} {'spent':>6} {'throttled':>9} {'tokens':>8}  action (EC2 throttling {state})")
    for key in sorted(set(calls) | set(buckets)):
        b = buckets.get(key)
        figures = (f"{b['spent']:6d} {b['throttled']:9d} {b['tokens']:8.1f}" if b else f"{'-':>6} {'-':>9} {'-':>8}")
        print(f"{calls[key] if key in calls else '':>6} {figures}  {key}")


def _timing(a) -> None:
    lab = _lab(a)
    settings = lab.set_ec2_timing(_on_off(a.throttling), _on_off(a.latency), time_scale=a.time_scale)
    print(json.dumps(settings, indent=2, sort_keys=True))


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _fragment(a) -> None:
    out = _lab(a).fragment_subnet(a.subnet, a.keep)
    print(f"subnet {out['subnet_id']}: took {len(out['addresses'])} address(es), one per free /28, "
          f"with {len(out['enis'])} ENI(s): {' '.join(out['enis'])}")


def _down(a) -> None:
    from .api import remove

    remove(a.name)


def _lab(a):
    from .api import Lab

    return Lab.attach(a.name)


def _print_status(s: dict) -> None:
    print(f"lab {s['name']} (daemon pid {s['pid']}), VPC {s['vpc_id']} {' '.join(s['vpc_cidrs'])}, "
          f"{s['limits']['instance_type']}: {s['limits']['max_enis']} ENIs x {s['limits']['ipv4_per_eni']} IPv4")
    for n in s["nodes"]:
        print(f"  {n['name']:8} {n['netns']:24} {n['instance_id']:21} {n['primary_ip']:15} {n['mac']} {n['az']}")
    for h in [s["internet"], *s["extra_hosts"]]:
        print(f"  {h['name']:8} {h['netns']:24} {h['address']:15} echo tcp/udp {h['echo_port']}")
    print(f"  endpoints in each node: EC2 {s['endpoints']['ec2']}, IMDS {s['endpoints']['imds']}")
    for f in s["faults"]:
        print(f"  fault: {f}")


def _parser() -> argparse.ArgumentParser:
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=os.environ.get("VPCLAB_NAME", DEFAULT_NAME),
                       help="lab name: 'avc' + up to 12 of [a-z0-9] (default: $VPCLAB_NAME or %(default)s)")
    parser = argparse.ArgumentParser(prog="vpclab", description="An isolated stand-in for EC2, IMDS and the VPC "
                                     "data plane, in network namespaces.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", parents=[named], help="start a lab")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--instance-type", default="m5.large")
    p.add_argument("--vpc-cidr", action="append", help="VPC CIDR (repeat for more; default 10.0.0.0/16)")
    p.add_argument("--subnet-prefix", type=int, default=24)
    p.add_argument("--azs", type=int, default=1, help="subnets (one per AZ), nodes spread over them")
    p.add_argument("--imds-staleness", type=float, default=0.0, help="IMDS answers lag EC2 by this many seconds")
    p.add_argument("--extra-host", action="append", help="CIDR of one more external host with an echo (repeat)")
    p.add_argument("--ec2-throttling", action="store_true", help="EC2's per-API token buckets from the start")
    p.add_argument("--ec2-latency", action="store_true", help="EC2's per-action latency from the start")
    p.set_defaults(run=_up)

    p = sub.add_parser("status", parents=[named], help="show a lab")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_status)

    p = sub.add_parser("exec", parents=[named], help="run a command in a node (or internet, x1, router, ctl)")
    p.add_argument("node")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(run=_exec)

    p = sub.add_parser("fault", parents=[named], help="inject a fault (no ACTION: list active faults)")
    p.add_argument("action", nargs="?", help="EC2 action, '*' for all, or IMDS")
    p.add_argument("--error", help="e.g. RequestLimitExceeded, InternalError, InsufficientFreeAddressesInSubnet")
    p.add_argument("--count", type=int, help="affect this many requests")
    p.add_argument("--duration", type=float, help="affect requests for this many seconds")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to each affected request")
    p.add_argument("--node", help="IMDS faults: only this node's IMDS")
    p.add_argument("--clear", action="store_true", help="remove every fault")
    p.set_defaults(run=_fault)

    p = sub.add_parser("calls", parents=[named], help="EC2 calls per action that reached the front, tokens "
                       "spent and requests throttled per API")
    p.add_argument("--json", action="store_true", help="calls per action as JSON (with --throttling: the buckets)")
    p.add_argument("--throttling", action="store_true", help="with --json: tokens spent, throttled, left per bucket")
    p.add_argument("--reset", action="store_true", help="set the counts back to zero (after printing them)")
    p.add_argument("--imds", action="store_true", help="IMDS requests per node instead")
    p.set_defaults(run=_calls)

    p = sub.add_parser("timing", parents=[named], help="EC2's throttling and latency models: show or set")
    p.add_argument("--throttling", choices=["on", "off"])
    p.add_argument("--latency", choices=["on", "off"])
    p.add_argument("--time-scale", type=float, help="simulated seconds per second (compressed time)")
    p.set_defaults(run=_timing)

    p = sub.add_parser("fragment", parents=[named], help="take one address in every free /28 of a subnet")
    p.add_argument("--subnet", help="subnet id (default: the lab's first)")
    p.add_argument("--keep", type=int, default=0, help="leave the lowest KEEP free /28s untouched")
    p.set_defaults(run=_fragment)

    p = sub.add_parser("down", parents=[named], help="stop a lab and remove everything it made")
    p.set_defaults(run=_down)
    return parser


if __name__ == "__main__":
    sys.exit(main())
