"""aws-vpc-cni-agent: the DaemonSet's long-running process on every node.

This module is its command line (the program's entry point):

    aws-vpc-cni-agent run [--conf-dir DIR]  keep the warm pool at target (the DaemonSet's main process);
                                       write DIR/10-aws-vpc.conflist once the pool can serve
    aws-vpc-cni-agent status [--json] [--ready]  the pool per ENI, from the running agent; --ready:
                                       exit 1 until the pool can serve (the readiness probe)
    aws-vpc-cni-agent render-conflist  print the conflist for the settings in the environment
    aws-vpc-cni-agent write-conflist DIR  write it to DIR/10-aws-vpc.conflist (atomically)
    aws-vpc-cni-agent max-pods [--instance-type T] [--prefix-delegation]  kubelet's --max-pods
    aws-vpc-cni-agent --version

`run` starts the loop (`loop.py`), the status and nudge sockets on `<dataDir>` (`sockets.py`),
Prometheus metrics on `--metrics-address` (default 0.0.0.0:61678, as upstream; `metrics.py`) and
upstream's introspection paths on `--introspection-address` (default 127.0.0.1:61679;
`introspect.py`); the other commands import none of them. The conflist: `conflist.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from aws_vpc_cni_agent.conflist import DEFAULT_CNI_VERSION, DEFAULT_NETWORK, render_conflist, write_conflist
from cnicore import agentlink, settings
from cnicore import result as cniresult

METRICS_ADDRESS = "0.0.0.0:61678"  # upstream's metrics port, on all addresses as upstream
INTROSPECTION_ADDRESS = "127.0.0.1:61679"  # upstream's INTROSPECTION_BIND_ADDRESS default


def status_table(status: dict) -> str:
    """The `status` command's table: the pool per ENI, then why it is not ready or blocked."""
    node = status.get("node", {})
    rows = [f"node {node.get('instance_id', '?')} ({node.get('instance_type', '?')}), primary IP {node.get('primary_ip', '?')}",
            f"{'ENI':<24}{'device':>7}{'total':>7}{'assigned':>10}{'cooling':>9}{'free':>6}"]
    for e in status["enis"]:
        name = e["eni_id"] + (" (primary)" if e["primary"] else "")
        rows.append(f"{name:<24}{e['device_number']:>7}{e['total']:>7}{e['assigned']:>10}{e['cooling']:>9}{e['free']:>6}")
    totals = {k: sum(e[k] for e in status["enis"]) for k in ("total", "assigned", "cooling", "free")}
    rows.append(f"{'all':<24}{'':>7}{totals['total']:>7}{totals['assigned']:>10}{totals['cooling']:>9}{totals['free']:>6}")
    if not status.get("ready"):
        rows.append("not ready: the pool has no IP to hand out yet (no conflist written)")
    if status.get("startup_error"):
        rows.append(f"not started yet: {status['startup_error']}")
    if status.get("blocked"):
        rows.append(f"blocked: {status['blocked']['reason']}")
    if status.get("last_error"):
        err = status["last_error"]
        rows.append(f"last EC2 error: {err['action']}: {err['code']}: {err['message']}")
    return "\n".join(rows)


def version() -> str:
    from importlib.metadata import version as dist_version
    return dist_version("aws-vpc-cni-py")


def max_pods(args) -> int:
    """Print the max-pods figure (the `max-pods` command)."""
    from cnicore.instance_limits import InstanceLimitsError, lookup
    instance_type = args.instance_type
    try:
        if instance_type is None:
            from cnicore.imds import IMDS, IMDSError
            try:
                with IMDS() as imds:
                    instance_type = imds.get("instance-type").strip()
            except IMDSError as exc:
                print(f"aws-vpc-cni-agent: no --instance-type, and IMDS failed: {exc}", file=sys.stderr)
                return 1
        limits = lookup(instance_type)
        figure = (limits.max_pods_allowed if args.show_max_allowed else limits.recommended_max_pods)(
            args.prefix_delegation, args.max_eni)
    except InstanceLimitsError as exc:
        print(f"aws-vpc-cni-agent: {exc}", file=sys.stderr)
        return 1
    print(figure)
    return 0


def host_port(address: str) -> tuple[str, int]:
    """'HOST:PORT' ('[v6]:PORT' too) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {address!r}")
    return host.strip("[]"), int(port)


def run_agent(args, cfg, warnings: list[str]) -> int:
    """The `run` command: the loop in this thread, its servers in daemon threads, until SIGTERM."""
    import signal
    import threading

    from aws_vpc_cni_agent import sockets
    from aws_vpc_cni_agent.loop import Agent
    from cnicore.log import agent_logger

    log = agent_logger(cfg)
    for warning in warnings:
        log.warn(warning)
    try:
        agentlink.hold_agent_lock(cfg.data_dir, on_wait=lambda: log.info(
            "the agent lock is held shared (plugins probing for an agent); waiting for it"))
    except RuntimeError as exc:
        print(f"aws-vpc-cni-agent: {exc}", file=sys.stderr)
        return 1
    agent = Agent(cfg, args.network, log, args.interval, args.conf_dir, args.cni_version)
    for serve in (sockets.serve_nudges, sockets.serve_status):
        threading.Thread(target=serve, args=(agent,), daemon=True).start()
    if cfg.plugin_zygote and getattr(sys, "frozen", False):
        from aws_vpc_cni_agent import zygote
        threading.Thread(target=zygote.supervise, args=(agent,), daemon=True).start()
    try:
        if args.metrics_address:
            from aws_vpc_cni_agent import metrics
            metrics.serve(agent.status, *host_port(args.metrics_address))
        if args.introspection_address:
            from aws_vpc_cni_agent import introspect
            introspect.serve(cfg, agent.read_doc, *host_port(args.introspection_address), log)
    except (OSError, ValueError) as exc:
        print(f"aws-vpc-cni-agent: cannot serve metrics or introspection: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (agent.stopping.set(), agent.wake.set()))
    log.info("agent started", pid=os.getpid(), network=args.network)
    agent.run()
    log.info("agent stopped")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aws-vpc-cni-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--network", default=DEFAULT_NETWORK, help="CNI network name (the conflist's name)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--cni-version", default=DEFAULT_CNI_VERSION, choices=cniresult.SUPPORTED_VERSIONS,
                        help=f"the conflist's cniVersion (default {DEFAULT_CNI_VERSION}; 1.1.0, with GC and STATUS, "
                             "for runtimes whose libcni reads 1.1.0 results)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="keep the warm pool at target")
    run.add_argument("--interval", type=float, default=5.0, help="seconds between pool checks")
    run.add_argument("--conf-dir", help="write the conflist here once the pool can serve (e.g. /etc/cni/net.d)")
    run.add_argument("--metrics-address", default=METRICS_ADDRESS, help="HOST:PORT for /metrics ('' = off)")
    run.add_argument("--introspection-address", default=INTROSPECTION_ADDRESS,
                     help="HOST:PORT for /v1/enis, /v1/pods, /v1/*-env-settings ('' = off)")
    status = sub.add_parser("status", help="show the pool per ENI")
    status.add_argument("--json", action="store_true")
    status.add_argument("--ready", action="store_true",
                        help="exit 0 only once the pool can serve and the conflist is written (a readiness probe)")
    sub.add_parser("render-conflist", help="print the conflist for the settings in the environment")
    write = sub.add_parser("write-conflist", help="write the conflist into a CNI config directory")
    write.add_argument("conf_dir", help="e.g. /etc/cni/net.d")
    pods = sub.add_parser("max-pods", help="kubelet's --max-pods for an instance type, as upstream's "
                                           "max-pods-calculator.sh computes it")
    pods.add_argument("--instance-type", help="e.g. m5.large (default: this node's, from IMDS)")
    pods.add_argument("--prefix-delegation", action="store_true", help="a /28 prefix per address slot (Nitro types)")
    pods.add_argument("--max-eni", type=int, help="ENIs used for pods (MAX_ENI; default: the instance type's limit)")
    pods.add_argument("--show-max-allowed", action="store_true",
                      help="the figure before the recommended ceiling (110 pods; 250 above 30 vCPUs)")
    args = parser.parse_args(argv)
    if args.command == "max-pods":
        return max_pods(args)

    warnings = []
    try:
        cfg = settings.from_env(os.environ, warn=warnings.append)
    except settings.SettingError as exc:
        print(f"aws-vpc-cni-agent: {exc.msg}", file=sys.stderr)
        return 2
    if args.command in ("render-conflist", "write-conflist"):
        for warning in warnings:
            print(f"aws-vpc-cni-agent: warning: {warning}", file=sys.stderr)
    if args.command == "render-conflist":
        print(json.dumps(render_conflist(cfg, args.network, args.cni_version), indent=2))
        return 0
    if args.command == "write-conflist":
        path = write_conflist(render_conflist(cfg, args.network, args.cni_version), args.conf_dir)
        print(f"wrote {path}")
        return 0
    if args.command == "status":
        try:
            status = agentlink.read_status(cfg.data_dir)
        except OSError as exc:
            print(f"aws-vpc-cni-agent: no agent answers on {cfg.data_dir}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(status, indent=2, default=str) if args.json else status_table(status))
        return 0 if status.get("ready") or not args.ready else 1

    return run_agent(args, cfg, warnings)


if __name__ == "__main__":
    sys.exit(main())
