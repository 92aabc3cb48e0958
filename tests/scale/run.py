"""`make scale`: the cluster-scale simulation (tests/scale/sim.py) against one lab EC2 with EC2's
token buckets and latencies on, in compressed time; writes scale-results.json and prints the table.

    python -m tests.scale.run [--nodes 1000] [--cold-nodes 200] [--pods 30] [--hour 3600]
                              [--time-scale 4] [--cold-time-scale 0.5] [--churn 5]
                              [--churn-minutes 10] [--dying 5] [--death-window 3900]

The simulation runs inside the lab's node1 namespace: the lab's EC2 front, with its buckets, listens
there (its own listener in the ctl namespace spends no token and is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter

RESULTS = "scale-results.json"
TARGETS = {"ec2_calls_per_node_hour": 2.0, "cold_start_ratio": 1.5, "pod_errors": 0}
# What upstream's algorithm spends (aws/amazon-vpc-cni-k8s): pkg/ipamd/ipamd.go reconciles from
# IMDS every nodeIPPoolReconcileInterval (60 s) and calls DescribeNetworkInterfaces only when IMDS and
# its datastore disagree (eniIPPoolReconcile, needEC2Reconcile); pkg/awsutils/awsutils.go sweeps
# leaked ENIs hourly after a random start-up delay of up to eniCleanupStartupDelayMax (300 s), one
# DescribeNetworkInterfaces filtered by vpc-id: about 1 EC2 call per node-hour in steady state.
UPSTREAM_CALLS_PER_NODE_HOUR = 1.0


def simulate(lab, *, nodes: int, cold_nodes: int, pods: int, hour: float, scale: float, churn: int, churn_minutes: int, dying: int, death_window: float, workers: int = 256,
             cold_scale: float | None = None, warmup_limit: float = 3600.0, cold_limit: float = 3600.0) -> dict:
    from vpclab.latency import Latency

    from .sim import Cluster

    def progress(phase):
        print(f"[scale] {phase} (simulated {cluster.clock() - cluster.clock.epoch:.0f} s)", file=sys.stderr,
              flush=True)

    cluster = Cluster(lab, nodes, scale=scale, workers=workers)
    harness = {}
    cold_scale = cold_scale or scale
    try:
        progress(f"{nodes} nodes start")
        warmup = cluster.run(warmup_limit, until=cluster.all_warm)
        harness["warmup"] = cluster.measured()
        if not cluster.all_warm():
            raise SystemExit(f"the nodes' warm pools were not filled after {warmup:.0f} simulated s")
        progress("steady state")
        lab.ec2_calls(reset=True)
        lab.ec2_throttling(reset=True)
        rounds = cluster.rounds
        reads = cluster.reads()
        steady = cluster.run(hour)
        harness["steady"] = cluster.measured()
        steady_round_interval = steady * nodes / max(cluster.rounds - rounds, 1)
        calls = lab.ec2_calls(reset=True)
        steady_reads = cluster.reads() - reads
        steady_buckets = lab.ec2_throttling(reset=True)["buckets"]
        node_hours = nodes * steady / 3600
        per_api = {a: n / node_hours for a, n in sorted(calls.items())}

        # the cold start at its own time scale: its figure is a time, set by EC2's latencies and
        # buckets only if the host computes every node's steps when they are due
        if cold_scale != scale:
            cluster.set_scale(cold_scale)
        progress(f"cold start (time scale {cold_scale:g})")
        chosen = cluster.schedule_pods(min(cold_nodes, nodes), pods)
        before = cluster.node_calls()
        lat_before = cluster.node_latency()
        errors_before = [Counter({(a, c): n for a, c, n in node.pool.ec2_errors()}) for node in cluster.nodes]
        code11_before = cluster.code11
        cold_start_at = cluster.clock()
        cold = cluster.run(cold_limit, until=lambda: cluster.all_placed(chosen))
        harness["cold_start"] = cluster.measured()
        cold_buckets = lab.ec2_throttling(reset=True)["buckets"]
        lab.ec2_calls(reset=True)  # the churn's calls start here (they once included the cold start's)
        if cold_scale != scale:
            cluster.set_scale(scale)
        after = cluster.node_calls()
        lat = sum((cluster.node_latency()[c.index] - lat_before[c.index] for c in chosen), Counter())
        latency = Latency(enabled=True)
        # each action's time as the agent saw it (simulated s: wall x the scale) against the lab's model
        seen_latency = {a: {"model_s": latency.of(a), "seen_s": round(lat[a] / lat[a + "#"] / 1000 * cold_scale, 3),
                            "requests": lat[a + "#"]}
                        for a in sorted(k for k in lat if not k.endswith("#"))}
        failed = sum((Counter({(a, c): n for a, c, n in cluster.nodes[c.index].pool.ec2_errors()})
                      - errors_before[c.index] for c in chosen), Counter())
        done_at = sorted(c.placed_at - cold_start_at for c in chosen if c.placed_at)
        node_done = {q: round(done_at[min(len(done_at) - 1, int(q / 100 * len(done_at)))], 1)
                     for q in (10, 50, 90, 100)} if done_at else {}
        serial = max(sum(latency.of(a) * n for a, n in (after[c.index] - before[c.index]).items()) for c in chosen)
        bucket_floor = max([(b["spent"] - b["capacity"]) / b["refill_per_second"] for b in cold_buckets.values()]
                           + [0.0])
        floor = max(serial, bucket_floor)
        placed = cluster.all_placed(chosen)
        errors_before_churn, code11_before_churn = sum(cluster.errors.values()), cluster.code11
        cold_errors = errors_before_churn + (0 if placed else 1)

        progress("churn")
        churn_seconds = cluster.churn(chosen, churn, churn_minutes)
        harness["churn_settle"] = cluster.measured()
        churn_calls = lab.ec2_calls(reset=True)
        churn_buckets = lab.ec2_throttling(reset=True)["buckets"]
        churn_unplaced = sum(len(c.pending) for c in chosen)

        progress("dying nodes")
        # pods die with the first; the others were growing their pool (room for one more ENI)
        busy, idle = [c for c in chosen if not c.pending], cluster.nodes[len(chosen):]
        states = {"attached": busy[-dying:], "created": idle[-dying:], "attached-no-dot": idle[-2 * dying:-dying]}
        at_death = cluster.kill(states)
        cluster.run(death_window)
        harness["death_window"] = cluster.measured()
        death_buckets = lab.ec2_throttling(reset=True)["buckets"]
        lab.ec2_calls(reset=True)
        alive = set(lab.snapshot().enis)
        left = {state: [e for e in enis if e in alive] for state, enis in at_death.items()}
        progress("done")

        throttled = sum(sum(b["throttled"] for b in buckets.values())
                        for buckets in (steady_buckets, cold_buckets, churn_buckets, death_buckets))
        live_nodes = nodes - sum(len(v) for v in states.values())
        return {
            "nodes": nodes, "time_scale": scale, "cold_start_time_scale": cold_scale,
            "time_scale_pieces": cluster.clock.pieces, "workers": workers, "harness": harness,
            # the buckets the steady state used, at its end (the cold start's change of time scale
            # refills every bucket: these show it changes next to nothing; unused ones are full)
            "steady_end_buckets": {k: {"tokens": round(b["tokens"], 1), "capacity": b["capacity"]}
                                   for k, b in steady_buckets.items()}, "warmup_seconds": round(warmup, 1), "steady_seconds": round(steady, 1),
            "steady_round_interval_seconds": round(steady_round_interval, 2),
            "ec2_calls_per_node_hour": round(sum(per_api.values()), 3),
            "ec2_calls_per_node_hour_by_api": {a: round(v, 3) for a, v in per_api.items()},
            # why each steady DescribeNetworkInterfaces was sent (ec2budget's REASON_*, leak-sweep)
            "steady_ec2_reads_by_reason": dict(sorted(steady_reads.items())),
            "steady_describes": calls.get("DescribeNetworkInterfaces", 0),
            "steady_throttled": sum(b["throttled"] for b in steady_buckets.values()),
            "cold_nodes": len(chosen), "pods_per_node": pods, "cold_start_seconds": round(cold, 1),
            "cold_start_all_placed": placed, "cold_start_floor_seconds": round(floor, 1),
            "cold_start_floor_buckets": round(bucket_floor, 1), "cold_start_floor_serial": round(serial, 1),
            "cold_start_ratio": round(cold / floor, 3) if floor and placed else float("inf"),
            "cold_start_latency": seen_latency,
            "cold_start_failed_requests": {f"{a} {c}": n for (a, c), n in sorted(failed.items())}, "cold_start_node_done_percentiles": node_done,
            "cold_start_calls": dict(sum((after[c.index] - before[c.index] for c in chosen), Counter())),
            "cold_start_throttled": {k: b["throttled"] for k, b in cold_buckets.items() if b["throttled"]},
            "throttled_requests": throttled,
            "code11_retries": code11_before_churn - code11_before,
            "cold_start_pod_errors": cold_errors,
            "churn_pods_per_minute_per_node": churn, "churn_nodes": len(chosen),
            "churn_seconds": round(churn_seconds, 1),
            "churn_ec2_calls_per_node_hour": round(sum(churn_calls.values()) * 3600 / (nodes * churn_seconds), 3),
            "churn_ec2_calls_per_churning_node_hour": {
                a: round(n * 3600 / (len(chosen) * churn_seconds), 3) for a, n in sorted(churn_calls.items())},
            "churn_throttled": {k: b["throttled"] for k, b in churn_buckets.items() if b["throttled"]},
            "churn_code11_retries": cluster.code11 - code11_before_churn,
            "churn_pods_unplaced": churn_unplaced,
            "dead_nodes": {state: len(v) for state, v in states.items()},
            "death_window_seconds": death_window,
            "enis_left_at_death": {state: len(v) for state, v in at_death.items()},
            "enis_left_after_window": {state: len(v) for state, v in left.items()},
            "death_throttled": {k: b["throttled"] for k, b in death_buckets.items() if b["throttled"]},
            "live_nodes": live_nodes,
            "pod_errors": sum(cluster.errors.values()) + (0 if placed else 1) + churn_unplaced,
            "agent_errors": dict(cluster.errors),
        }
    finally:
        cluster.close()


def table(r: dict) -> str:
    rows = [("figure", "agent", "upstream", "target")]
    rows.append(("compression x (cold start)", f"{r['time_scale']:g} ({r['cold_start_time_scale']:g})", "", ""))
    rows.append(("EC2 calls per node-hour (steady)", f"{r['ec2_calls_per_node_hour']:.2f}",
                 f"~{UPSTREAM_CALLS_PER_NODE_HOUR:g}", "<= 2"))
    for api, rate in sorted(r["ec2_calls_per_node_hour_by_api"].items()):
        rows.append((f"  {api}", f"{rate:.2f}", "", ""))
    rows.append(("  describes by reason", ", ".join(f"{k} {v}" for k, v in r["steady_ec2_reads_by_reason"].items())
                 or "none", "", ""))
    rows.append(("cold start s (all pods placed)", str(r["cold_start_seconds"]), "", ""))
    rows.append(("cold start floor s", str(r["cold_start_floor_seconds"]), "", ""))
    rows.append(("cold start / floor", str(r["cold_start_ratio"]), "", "<= 1.5"))
    rows.append(("  agent saw, s (model)", ", ".join(f"{a.replace('NetworkInterface', 'NI')} {v['seen_s']:g} ({v['model_s']:g})"
                                                   for a, v in r["cold_start_latency"].items()), "", ""))
    rows.append(("  steps late, mean/max s", f"{r['harness']['cold_start']['late_mean_s']}/"
                                              f"{r['harness']['cold_start']['late_max_s']}", "", ""))
    rows.append(("requests throttled", str(r["throttled_requests"]), "", ""))
    rows.append(("code-11 retries (apart)", str(r["code11_retries"]), "", ""))
    rows.append(("errors that reached a pod", str(r["pod_errors"]), "", "0"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def inside(args) -> None:
    from vpclab.api import Lab

    lab = Lab.attach(args.lab)
    lab.reset()
    lab.set_ec2_timing(throttling=True, latency=True, time_scale=args.time_scale)
    print(json.dumps(simulate(lab, nodes=args.nodes, cold_nodes=args.cold_nodes, pods=args.pods, hour=args.hour,
                              scale=args.time_scale, churn=args.churn, churn_minutes=args.churn_minutes,
                              dying=args.dying, death_window=args.death_window, workers=args.workers,
                              cold_scale=args.cold_time_scale)))


def outside(args) -> dict:
    from vpclab import api, netns

    api.sweep_orphans()
    lab = api.Lab.up(name=netns.new_prefix("s"), nodes=1, instance_type="m5.xlarge", vpc_cidrs=["10.0.0.0/16"],
                     subnet_prefix=16, ec2_throttling=True, ec2_latency=True, owner_pid=os.getpid())
    try:
        argv = [sys.executable, "-m", "tests.scale.run", "--inside", "--lab", lab.name, "--nodes", str(args.nodes),
                "--cold-nodes", str(args.cold_nodes), "--pods", str(args.pods), "--hour", str(args.hour),
                "--time-scale", str(args.time_scale), "--churn", str(args.churn),
                "--churn-minutes", str(args.churn_minutes), "--dying", str(args.dying),
                "--death-window", str(args.death_window), "--workers", str(args.workers),
                "--cold-time-scale", str(args.cold_time_scale or args.time_scale)]
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        proc = subprocess.run(lab.exec_argv("node1", argv), env=lab.exec_env("node1"), cwd=root,
                              stdout=subprocess.PIPE, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise SystemExit("the simulation failed (its error is above)")
        return json.loads(proc.stdout.splitlines()[-1])
    finally:
        lab.down()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--cold-nodes", type=int, default=200)
    p.add_argument("--pods", type=int, default=30)
    p.add_argument("--hour", type=float, default=3600.0, help="simulated seconds of steady state")
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--churn", type=int, default=5, help="pods replaced per minute on each cold-start node")
    p.add_argument("--churn-minutes", type=int, default=10)
    p.add_argument("--dying", type=int, default=5, help="nodes that die in each state (attached, created, "
                                                         "attached-no-dot)")
    p.add_argument("--death-window", type=float, default=3900.0,
                   help="simulated seconds the cluster runs after the deaths (the sweep takes ENIs older "
                        "than an hour)")
    p.add_argument("--cold-time-scale", type=float, default=0.5,
                   help="the cold start's own time scale (its figure is a duration: the host must keep up)")
    p.add_argument("--workers", type=int, default=256, help="threads running node rounds (EC2's latency is "
                                                           "spent asleep: many rounds wait side by side)")
    p.add_argument("--timeout", type=float, default=6 * 3600)
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lab", help=argparse.SUPPRESS)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.inside:
        return inside(args)
    result = outside(args)
    with open(args.out, "w") as f:
        json.dump({"nodes": result["nodes"],
                   "ec2_calls_per_node_hour": result["ec2_calls_per_node_hour"],
                   "cold_start_ratio": result["cold_start_ratio"],
                   "throttled_requests": result["throttled_requests"],
                   "pod_errors": result["pod_errors"],
                   "run": result}, f, indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
