"""Reliability (issue 10, items 1-3): crashes, load and faults lose nothing and leak nothing.

All of it runs in the VPC lab through the real cnitool and the real chain (conflists/10-aws-vpc.conflist:
aws-vpc-bridge with aws-eni-ipam, aws-snat, portmap-compat), the way a runtime drives it; GC as libcni
1.2 runs it (every plugin, the valid attachments). The invariants and the pod model (UP / DOWN /
DIRTY) are in tests/support/reliability_world.py; random choices print their seed (RELIABILITY_SEED replays).

1. Crash safety
   - every step: each plugin SIGKILLs itself before its 1st, 2nd, ... step of ADD and DEL
     (tests/support/reliability_crashpoint.py), until a run completes: no kill point is left to chance.
   - random instants: >= 200 cnitool runs on both nodes at once, most SIGKILLed at a random
     instant (the whole process group, or one plugin while its children live on).
   - the agent SIGKILLed mid-reconcile and mid-tick while it grows and while it shrinks.
2. Concurrency and load: 1,000 mixed ADD/DEL through cnitool (bridge + IPAM), 16 at once over two
   nodes with their agents, then a smaller run through the full chain.
3. Faults from the lab: EC2 throttling, 5xx, 5 s latency, IMDS down, IMDS stale after an attach.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import threading
import time

import pytest

from support.reliability_crashpoint import write_wrappers
from support.reliability_world import (BRIDGE_ONLY, DIRTY, DOWN, FULL_CHAIN, UP, AgentProcess, ChainNode, Pod,
                               assert_clean, check_node, check_store_agrees_with_ec2, check_store_within_ec2,
                               ec2_enis_full, held, leaked_enis, seeded_rng, store_vs_ec2)
from vpclab import netns as labnetns


def _ip(outcome) -> str:
    return outcome.result()["ips"][0]["address"].split("/")[0]


def _in_threads(*targets):
    """Run the callables in threads; re-raise the first failure."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# ==================================================================================================
# 1. Crash safety: a kill before every step


# (chain, [(plugin, command)]): the bridge and the IPAM plugin are killed in a bridge-only chain (the
# chain stops at the first failure either way; fewer plugins make each run cheaper)
CRASH_TARGETS = [(BRIDGE_ONLY, [("aws-vpc-bridge", "ADD"), ("aws-eni-ipam", "ADD"),
                                ("aws-vpc-bridge", "DEL"), ("aws-eni-ipam", "DEL")]),
                 (FULL_CHAIN, [("aws-snat", "ADD"), ("portmap-compat", "ADD"), ("portmap-compat", "DEL")])]


def test_a_kill_before_any_step_of_add_or_del_is_reclaimed_by_del_or_gc(fresh_lab, tmp_path, make_netns):
    """The pod under test holds an IP of a secondary ENI (rule 1536, ENI table) and a hostPort. After
    each kill: the invariants; then the runtime's answer to a failed ADD/DEL, alternately a DEL and
    a GC that does not list the pod; then nothing of it may remain, on the node or in its netns,
    and the two bystander pods are untouched."""
    crash_log = str(tmp_path / "crash.log")
    node = ChainNode(fresh_lab, "node1", tmp_path, cni_path_first=write_wrappers(str(tmp_path / "crashbin")))
    # ENI 0 full of IPAM-only holders, ENI 1 grown by a 10th that leaves again: the pods land on ENI 1
    fillers = tuple(f"filler{i}" for i in range(10))
    for cid in fillers:
        assert node.ipam("ADD", cid=cid)[0] == 0
    assert node.ipam("DEL", cid=fillers[-1])[0] == 0
    fillers = fillers[:-1]
    bystanders = [Pod(f"by{i}", make_netns("by"), port=30080 + i) for i in range(2)]
    pod = Pod("victim", make_netns("victim"), port=30090)
    everyone = bystanders + [pod]
    for p in bystanders:
        outcome = node.run("add", p)
        assert outcome.ok, outcome.out + outcome.err
        p.state, p.ip = UP, _ip(outcome)
    visited = []
    try:
        for chain, plugin, command in [(c, p, cmd) for c, targets in CRASH_TARGETS for p, cmd in targets]:
            if node.conflist["plugins"][-1]["type"] != chain[-1]:
                node.write_conflist(plugins=chain)
                pod.port = 30090 if "portmap-compat" in chain else None
            for step in itertools.count(1):
                if command == "DEL":
                    outcome = node.run("add", pod)
                    assert outcome.ok, outcome.out + outcome.err
                    pod.state, pod.ip = UP, _ip(outcome)
                    assert not node.store() is None and pod.ip not in {b.ip for b in bystanders}
                before = _read(crash_log)
                outcome = node.run(command.lower(), pod, env={"RELIABILITY_CRASH": f"{plugin}:{command}:{step}",
                                                              "RELIABILITY_CRASH_LOG": crash_log})
                fired = _read(crash_log)[len(before):].strip()
                if not fired:  # the run got past its last step
                    assert outcome.ok, f"{plugin} {command} without a kill: {outcome.out} {outcome.err}"
                    if command == "ADD":
                        pod.state, pod.ip = UP, _ip(outcome)
                        check_node(node, everyone, ipam_only=fillers)
                        assert node.run("del", pod).ok
                    pod.state, pod.ip = DOWN, None
                    check_node(node, everyone, pod_side=[pod], ipam_only=fillers)
                    break
                visited.append(fired)
                assert outcome.rc != 0, f"{fired}: cnitool reported success"
                pod.state = DIRTY
                check_node(node, everyone, ipam_only=fillers)
                if step % 2:
                    recovery = node.run("del", pod)
                    assert recovery.ok, f"DEL after '{fired}': {recovery.out} {recovery.err}"
                else:
                    node.gc(bystanders, also=fillers)
                pod.state, pod.ip = DOWN, None
                try:
                    # after a DEL the pod's netns is clean too; a GC cannot reach netns (what an ADD
                    # killed before moving the host end out left there dies with the sandbox's netns)
                    check_node(node, everyone, pod_side=[pod] if step % 2 else [], ipam_only=fillers)
                except AssertionError as exc:
                    raise AssertionError(f"after '{fired}' and a {'DEL' if step % 2 else 'GC'}: {exc}") from None
                if not step % 2:  # the runtime forgot that sandbox: the next one is a new netns
                    labnetns.delete(pod.netns)
                    pod.netns = make_netns("victim")
        print("kill points visited:\n  " + "\n  ".join(visited))
        assert len(visited) >= 20
    finally:
        node.write_conflist(plugins=FULL_CHAIN)
        for p in everyone:
            node.run("del", p)
    node.gc([], also=fillers)
    for p in everyone:
        p.state = DOWN
    check_node(node, everyone, pod_side=everyone, ipam_only=fillers)
    for cid in fillers:
        assert node.ipam("DEL", cid=cid)[0] == 0
    assert_clean(node)
    check_store_within_ec2(node)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


# ==================================================================================================
# 1. Crash safety: SIGKILL at random instants


KILL_RUNS_PER_NODE = 100       # two nodes at once: 200 runs
KILL_PODS_PER_NODE = 10        # more than ENI 0 holds (9): pods also land on ENI 1
KILL_GC_EVERY = 20
KILL_SHARE = 0.85              # of the runs killed; the rest run to the end
# A kill lands only if the run lasts past its instant (a run faster than the typical one escapes it):
# the runs go on past KILL_RUNS_PER_NODE, up to three times as many, until this many kills landed.
KILL_LANDED_MIN = int(KILL_RUNS_PER_NODE * KILL_SHARE * 0.7)


def _kill_runs(node: ChainNode, pods: list[Pod], runs: int, rng, make_netns, tally: dict) -> None:
    """Random ADD/DEL over the pods (DEL for an UP or DIRTY pod, else ADD), most of them SIGKILLed:
    75% the whole process group at a uniform instant of the run's usual duration, 25% one plugin a
    uniform 0-150 ms after it starts (its children, e.g. the IPAM plugin, finish on their own).
    The invariants after every run; every KILL_GC_EVERY runs a GC listing only the UP pods, after which
    the DIRTY ones are DOWN and come back as new sandboxes (new netns, new container ID). At least
    `runs` runs, more until KILL_LANDED_MIN kills landed (at most 3 * `runs`)."""
    duration = {"add": [], "del": []}
    for p in pods:  # uninterrupted first ADDs: they measure a run and grow the pool
        outcome = node.run("add", p)
        assert outcome.ok, outcome.out + outcome.err
        p.state, p.ip = UP, _ip(outcome)
        duration["add"].append(outcome.seconds)
    check_node(node, pods)
    run = 0
    while run < runs or (_kills(tally) < KILL_LANDED_MIN and run < 3 * runs):
        run += 1
        pod = rng.choice(pods)
        command = "add" if pod.state == DOWN else "del"
        kill = None
        if rng.random() < KILL_SHARE:
            typical = sorted(duration[command] or duration["add"])[len(duration[command] or duration["add"]) // 2]
            if rng.random() < 0.75 or not duration[command]:
                kill = ("group", rng.uniform(0, typical * 1.1))
            else:  # within one plugin's share of a whole operation (four programs run per ADD)
                kill = ("plugin", rng.choice(FULL_CHAIN + ("aws-eni-ipam",)), rng.uniform(0, typical / 3))
        outcome = node.run(command, pod, kill=kill)
        pod.history.append((command, kill, outcome.rc, outcome.killed))
        if outcome.killed:
            pod.state = DIRTY
            tally[f"{command} killed ({outcome.killed if outcome.killed == 'group' else 'one plugin'})"] += 1
        else:
            assert outcome.rc == 0, f"{command} {pod.name} ({kill}) failed: {outcome.out} {outcome.err}"
            duration[command].append(outcome.seconds)
            pod.state, pod.ip = (UP, _ip(outcome)) if command == "add" else (DOWN, None)
            tally[f"{command} completed"] += 1
        try:
            check_node(node, pods, pod_side=[pod] if pod.state == DOWN else [])
        except AssertionError as exc:
            raise AssertionError(f"{node.node} run {run}, {command} {pod.name} {kill}: {exc}\n"
                                 f"history: {pod.history}") from None
        if run % KILL_GC_EVERY == 0:
            node.gc([p for p in pods if p.state == UP])
            forgotten = [p for p in pods if p.state == DIRTY]
            for p in forgotten:
                p.state, p.ip = DOWN, None
            check_node(node, pods)
            for p in forgotten:
                labnetns.delete(p.netns)
                p.netns = make_netns(f"k{node.node[-1]}")
            tally["reclaimed by GC"] += len(forgotten)


def test_sigkill_at_random_instants_over_the_chain_loses_and_leaks_nothing(fresh_lab, tmp_path, make_netns):
    rng = seeded_rng("random kills")
    nodes = [ChainNode(fresh_lab, name, tmp_path) for name in ("node1", "node2")]
    pods = {n.node: [Pod(f"k{i}", make_netns(f"k{n.node[-1]}"), port=31000 + i) for i in range(KILL_PODS_PER_NODE)]
            for n in nodes}
    tallies = {n.node: collections.Counter() for n in nodes}
    seeds = {n.node: rng.randrange(1 << 32) for n in nodes}
    try:
        _in_threads(*[lambda n=n: _kill_runs(n, pods[n.node], KILL_RUNS_PER_NODE, random.Random(seeds[n.node]),
                                             make_netns, tallies[n.node]) for n in nodes])
    finally:
        for n in nodes:
            for p in pods[n.node]:
                n.run("del", p)
            n.gc([])
    for n in nodes:
        print(n.node, dict(tallies[n.node]))
        for p in pods[n.node]:
            p.state, p.ip = DOWN, None
        check_node(n, pods[n.node], pod_side=pods[n.node])
        assert_clean(n)
        check_store_within_ec2(n)
        assert _kills(tallies[n.node]) >= KILL_LANDED_MIN


def _kills(tally: dict) -> int:
    return sum(v for k, v in tally.items() if "killed" in k)


# ==================================================================================================
# 1. Crash safety: the agent


def _backdate(node: ChainNode) -> None:
    """With the agent down, make the store look as if time had passed: every ENI old enough to be
    freed (warmpool.ENI_MIN_AGE) and the last give-back long ago (warmpool.IP_RELEASE_INTERVAL)."""
    path = os.path.join(node.data_dir, "aws-vpc.json")
    with open(path) as f:
        doc = json.load(f)
    for eni in doc["enis"].values():
        eni["attached_at"] = min(eni["attached_at"], time.time() - 600)
    doc["agent"]["last_release_at"] = None
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.rename(path + ".tmp", path)


GROW = {"WARM_IP_TARGET": 2, "MINIMUM_IP_TARGET": 27}      # m5.large: 3 ENIs x 9 IPs
SHRINK = {"WARM_IP_TARGET": 2}                              # 5 holders + 2 warm: ENI 0 alone
# (settings, when, EC2 action): the agent is SIGKILLed before or right after its first such request
AGENT_KILLS = ([(GROW, w, a) for a in ("DescribeNetworkInterfaces", "CreateNetworkInterface", "AttachNetworkInterface")
                for w in ("before", "after")] + [(GROW, "before", "ModifyNetworkInterfaceAttribute"), (GROW, None, None)]
               + [(SHRINK, w, a) for a in ("UnassignPrivateIpAddresses", "DetachNetworkInterface") for w in ("before", "after")]
               + [(SHRINK, "before", "DeleteNetworkInterface"), (SHRINK, None, None)]
               + [(GROW, "after", "ModifyNetworkInterfaceAttribute"), (GROW, "before", "AssignPrivateIpAddresses"),
                  (GROW, "after", "AssignPrivateIpAddresses"), (GROW, None, None)])


def _settled(node: ChainNode, total: int) -> bool:
    store, ec2 = store_vs_ec2(node)
    return sum(len(ips) for ips in store.values()) == total and store == ec2


def test_agent_killed_around_each_ec2_action_converges_and_agrees_with_ec2(fresh_lab, tmp_path, make_netns):
    """The agent SIGKILLed mid-reconcile and mid-tick, before and after each EC2 action of growing
    (5 pods -> 27 IPs on 3 ENIs) and shrinking (-> 7 IPs on ENI 0), restarted each time: the store never
    lists what EC2 does not hold, the pods keep their IPs, and each uninterrupted run converges to
    exactly EC2's view. ENIs a kill left created-but-unattached or detached-but-not-deleted are
    deleted by the agent's leaked-ENI sweep once old enough (run directly: it is due about hourly);
    an ENI attached before a kill carries DeleteOnTermination."""
    import sys
    crashbin = write_wrappers(str(tmp_path / "crashbin"))
    crash_log = str(tmp_path / "crash.log")
    node = ChainNode(fresh_lab, "node1", tmp_path, plugins=BRIDGE_ONLY)
    pods = [Pod(f"h{i}", make_netns("h")) for i in range(5)]
    for p in pods:  # no agent yet: the IPAM plugin grows ENI 0 itself
        outcome = node.run("add", p)
        assert outcome.ok, outcome.out + outcome.err
        p.state, p.ip = UP, _ip(outcome)
    holders = {p.cid: p.ip for p in pods}
    try:
        fresh_lab.fault("*", latency=0.05)  # EC2 a little slow, as it is
        fired = []
        for settings, when, action in AGENT_KILLS:
            if settings is SHRINK:
                _backdate(node)
            env = dict(settings)
            if when:
                env.update(RELIABILITY_CRASH=f"aws-vpc-cni-agent:{when}:{action}", RELIABILITY_CRASH_LOG=crash_log)
            agent = AgentProcess(node, exe=os.path.join(crashbin, "aws-vpc-cni-agent"), **env)
            try:
                total = 27 if settings is GROW else 7
                deadline, settled_at = time.monotonic() + 60, None
                while agent.alive() and time.monotonic() < deadline:
                    if _settled(node, total):  # settled: give a pending kill point 2 s more to come
                        settled_at = settled_at or time.monotonic()
                        if time.monotonic() - settled_at > 2:
                            break
                    time.sleep(0.1)
                if when and not agent.alive():
                    fired.append(f"{when} {action}")
                elif when:
                    raise AssertionError(f"the agent converged without reaching the kill point {when} {action}")
                else:
                    assert _settled(node, total), f"the agent did not converge to {total} IPs: {store_vs_ec2(node)}"
            finally:
                agent.kill()
            check_store_agrees_with_ec2(node, exact=not when)
            assert {c: ips[0][0] for (c, _), ips in held(node.store()).items()} == holders
        print("agent kill points:", fired)
        leaked = leaked_enis(fresh_lab, node.instance_id)
        assert leaked, "the kills after CreateNetworkInterface and DetachNetworkInterface left no unattached ENI"
        for eni in leaked:  # as if the sweep's hour (cnicore.leaksweep.MIN_AGE) had passed, in a named cluster
            fresh_lab.ec2("CreateTags", Resources=[eni["NetworkInterfaceId"]],
                          Tags=[{"Key": "node.k8s.amazonaws.com/createdAt", "Value": "2020-01-01T00:00:00Z"},
                                {"Key": "cluster.k8s.amazonaws.com/name", "Value": "reliability"}])
        # the agent's sweep (NodePool._sweep_leaked: LeakSweep.maybe_run, due at a random point of the
        # first hour), run now, from the node, as the agent builds it
        sweep = ("import json, sys\nfrom cnicore.ec2 import EC2\nfrom cnicore.leaksweep import LeakSweep\n"
                 "class Log:\n    def info(self, msg, **kw): pass\n    warn = info\n"
                 "print(json.dumps(LeakSweep(EC2(sys.argv[1], cluster_name='reliability'), sys.argv[2], "
                 "'reliability', Log()).run()))")
        proc = fresh_lab.exec(node.node, [sys.executable, "-c", sweep, node.instance_id, fresh_lab.status()["vpc_id"]],
                              check=False, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert sorted(json.loads(proc.stdout.splitlines()[-1])) == sorted(e["NetworkInterfaceId"] for e in leaked)
        assert not leaked_enis(fresh_lab, node.instance_id)
        agent = AgentProcess(node, **GROW)
        try:
            node.wait_for(lambda: _settled(node, 27), timeout=30, what="the agent to settle at 27 IPs")
        finally:
            agent.kill()
        check_store_agrees_with_ec2(node, exact=True)
        for eni in ec2_enis_full(fresh_lab, node.instance_id):
            if eni["Attachment"]["DeviceIndex"] != 0:
                assert eni["Attachment"]["DeleteOnTermination"], f"{eni['NetworkInterfaceId']} lacks DeleteOnTermination"
        check_node(node, pods)  # the pods went through it all attached as they were
        for p in pods:
            assert node.run("del", p).ok
            p.state, p.ip = DOWN, None
    finally:
        for p in pods:
            node.run("del", p)
    assert_clean(node)


# ==================================================================================================
# 2. Concurrency and load


LOAD_PARALLEL = 16
LOAD_PODS_PER_NODE = 20         # with the warm IPs more than 2 ENIs hold: the pool grows to 3 ENIs
LOAD_CYCLES = [(BRIDGE_ONLY, 250)] * 4 + [(FULL_CHAIN, 40)] * 2  # 1,000 + 80 operations


class Load:
    """Mixed ADD/DEL over the pods of both nodes, LOAD_PARALLEL at once, never two on one pod (as a
    runtime serialises a sandbox's own operations). An IP handed out while another UP pod (ADD
    done, DEL not begun) holds it is a duplicate."""

    def __init__(self, nodes, pods, rng):
        self.nodes, self.pods, self.rng = nodes, pods, rng
        self.lock = threading.Lock()
        self.busy: set[str] = set()
        self.live: dict[str, str] = {}     # ip -> pod name, UP pods only
        self.count = collections.Counter()
        self.errors: list[str] = []
        self.latency = {"add": [], "del": []}

    def one(self, pod: Pod, node: ChainNode) -> None:
        command = "add" if pod.state == DOWN else "del"
        if command == "del":
            with self.lock:
                self.live.pop(pod.ip, None)
        outcome = node.run(command, pod)
        with self.lock:
            self.count[command] += 1
            self.latency[command].append(outcome.seconds)
            if command == "del":
                if outcome.rc != 0:
                    self.errors.append(f"DEL {pod.name}@{node.node}: {outcome.out} {outcome.err}")
                pod.state, pod.ip = DOWN, None
            elif outcome.rc == 0:
                ip = _ip(outcome)
                if ip in self.live:
                    self.errors.append(f"{ip} handed to {pod.name}@{node.node} while {self.live[ip]} holds it")
                self.live[ip] = f"{pod.name}@{node.node}"
                pod.state, pod.ip = UP, ip
            elif "no free IP on this node" in outcome.out + outcome.err:  # code 11 (cnitool prints only the text)
                self.count["add: try again later (11)"] += 1
            else:
                self.errors.append(f"ADD {pod.name}@{node.node}: {outcome.out} {outcome.err}")
            self.busy.discard(f"{node.node}/{pod.name}")

    def pick(self):
        with self.lock:
            free = [(n, p) for n in self.nodes for p in self.pods[n.node] if f"{n.node}/{p.name}" not in self.busy]
            if not free:
                return None
            node, pod = self.rng.choice(free)
            self.busy.add(f"{node.node}/{pod.name}")
            return node, pod

    def run(self, operations: int) -> None:
        """Until the operations done plus the DELs the drain will need reach `operations` (a sum no
        completion lowers: an ADD adds 2, a DEL 0)."""
        start = sum(self.count[c] for c in ("add", "del"))
        up = lambda: sum(p.state == UP for n in self.nodes for p in self.pods[n.node])  # noqa: E731
        done = lambda: sum(self.count[c] for c in ("add", "del")) - start  # noqa: E731

        def worker():
            while done() + up() < operations:
                chosen = self.pick()
                if chosen is None:
                    time.sleep(0.01)
                    continue
                self.one(chosen[1], chosen[0])

        _in_threads(*[worker] * LOAD_PARALLEL)

    def drain(self) -> None:
        """DEL every UP pod, LOAD_PARALLEL at once."""
        todo = [(n, p) for n in self.nodes for p in self.pods[n.node] if p.state == UP]
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    if not todo:
                        return
                    node, pod = todo.pop()
                self.one(pod, node)

        _in_threads(*[worker] * LOAD_PARALLEL)


def _skeleton_bytes(doc: dict) -> int:
    """The document's size without its per-IP entries: what must not grow with the operations."""
    return len(json.dumps({**doc, "enis": {e: {**v, "ips": {}} for e, v in doc["enis"].items()}}))


def test_1000_concurrent_adds_and_dels_on_two_nodes_lose_nothing_and_grow_nothing(fresh_lab, tmp_path, make_netns):
    rng = seeded_rng("load")
    nodes = [ChainNode(fresh_lab, name, tmp_path, plugins=BRIDGE_ONLY) for name in ("node1", "node2")]
    pods = {n.node: [Pod(f"l{i}", make_netns(f"l{n.node[-1]}")) for i in range(LOAD_PODS_PER_NODE)] for n in nodes}
    agents = {n.node: AgentProcess(n) for n in nodes}
    load = Load(nodes, pods, rng)
    rows = []
    started = time.monotonic()
    try:
        for agent in agents.values():
            agent.wait_ticks(1)
        for cycle, (chain, operations) in enumerate(LOAD_CYCLES, 1):
            if chain[-1] != nodes[0].conflist["plugins"][-1]["type"]:
                for n in nodes:
                    n.write_conflist(plugins=chain)
                    for p in pods[n.node]:  # hostPorts: portmap-compat's per-pod chains
                        p.port = 32000 + int(p.name[1:]) if chain == FULL_CHAIN else None
            before = sum(load.count.values())
            load.run(operations)
            for n in nodes:  # quiescent: every UP pod holds its IP and is routed to its veth
                view = check_node(n, [p for p in pods[n.node]])
                up = [p for p in pods[n.node] if p.state == UP]
                secondary = [p for p in up if not next(e for e in n.store()["enis"].values() if p.ip in e["ips"])["primary"]]
                assert len(view.rules_to) == len(up) and len(view.rules_from) == len(secondary)
            load.drain()
            assert not load.errors, "\n".join(load.errors[:20])
            for n in nodes:
                view = assert_clean(n)
                check_store_within_ec2(n)
                doc = n.store()
                rows.append({"cycle": cycle, "node": n.node, "ops": sum(load.count.values()) - before,
                             "store_bytes": n.store_bytes(), "skeleton_bytes": _skeleton_bytes(doc),
                             "ips": sum(len(e["ips"]) for e in doc["enis"].values()),
                             "agent_fds": agents[n.node].fds(), "ip_rules": view.rule_count,
                             "iptables_rules": view.rule_lines, "links": view.links,
                             "seconds": round(time.monotonic() - started)})
    finally:
        for n in nodes:
            for p in pods[n.node]:
                if p.state != DOWN:
                    n.run("del", p)
        for agent in agents.values():
            agent.kill()
    for row in rows:
        print(row)
    print(dict(load.count), {k: f"median {sorted(v)[len(v) // 2]:.2f} s, max {max(v):.2f} s"
                             for k, v in load.latency.items() if v})
    assert sum(load.count[c] for c in ("add", "del")) >= sum(ops for _, ops in LOAD_CYCLES)
    for n in nodes:
        mine = [r for r in rows if r["node"] == n.node]
        first = mine[0]
        for row in mine[1:]:
            assert row["skeleton_bytes"] <= first["skeleton_bytes"] + 64, (first, row)
            assert row["store_bytes"] <= row["skeleton_bytes"] + 80 * row["ips"], row
            # the agent's EC2 client keeps a few pooled connections: allow for them, not for a leak
            assert row["agent_fds"] <= first["agent_fds"] + 3, (first, row)
            assert row["links"] <= first["links"], (first, row)
        for chain in (BRIDGE_ONLY, FULL_CHAIN):  # per chain (aws-snat adds node-wide rules once): the
            rows_of = [r for r in mine if LOAD_CYCLES[r["cycle"] - 1][0] == chain]  # same after each cycle
            for key in ("ip_rules", "iptables_rules"):
                assert max(r[key] for r in rows_of) == rows_of[0][key], (chain, key, [r[key] for r in rows_of])


# ==================================================================================================
# 3. Faults from the lab


# How long the agent may take, on a loaded machine, to back off to its cap under a fault that lasts
# until it has (the throttled and 5xx tests end their fault on that event, not after a fixed time).
FAULT_DEADLINE = 240


def _warm_node(lab, tmp_path, plugins=BRIDGE_ONLY, **agent_env):
    node = ChainNode(lab, "node1", tmp_path, plugins=plugins)
    agent = AgentProcess(node, **agent_env)
    try:
        agent.wait_ticks(1)
        node.wait_for(lambda: (agent.status()["figures"] or {}).get("short") == 0, what="a warm pool")
    except BaseException:
        agent.kill()
        raise
    return node, agent


def _free(node: ChainNode) -> int:
    import cnicore.pool as cpool
    return cpool.Pool(node.store(), time.time(), 0).free_count()


def _agent_section(node: ChainNode) -> dict:
    return (node.store() or {}).get("agent", {})


@pytest.mark.parametrize("error", ["RequestLimitExceeded", "InternalError"], ids=["throttled", "5xx"])
def test_ec2_throttled_or_failing_warm_add_and_every_del_go_on_and_the_pool_recovers(
        fresh_lab, tmp_path, make_netns, error):
    """EC2 answers every call with `error` until the agent's backoff has reached its cap (an event of
    the agent's clock, however fast the machine): ADDs keep getting warm IPs and every DEL works; once
    the pool is dry an ADD answers 11 saying EC2 throttles, as the agent's status does; the agent backs
    off (its EC2 requests stay few) and the pool refills within one backoff cap after the fault ends."""
    from cnicore.ec2budget import BACKOFF_MAX
    node, agent = _warm_node(fresh_lab, tmp_path)
    pods = [Pod(f"t{i}", make_netns("t")) for i in range(6)]
    fillers = [f"fill{i}" for i in range(_free(node) - 2)]
    try:
        fresh_lab.ec2_calls(reset=True)
        fresh_lab.fault("*", error=error)
        t0 = time.monotonic()
        for cid in fillers:  # quickly down to 2 free IPs: the agent must grow, and cannot
            assert node.ipam("ADD", cid=cid)[0] == 0
        tried_again, delays, ops = [], set(), 0
        while BACKOFF_MAX not in delays or not tried_again or ops < 6:
            assert time.monotonic() - t0 < FAULT_DEADLINE, \
                f"in {FAULT_DEADLINE} s of {error}: backoff delays {delays}, {len(tried_again)} ADDs answered 11"
            up = [p for p in pods if p.state == UP]
            down = [p for p in pods if p.state == DOWN]
            if tried_again and ops % 3 == 0 and up:  # once the pool is dry: a DEL, then two ADDs (warm, then 11)
                outcome = node.run("del", up[0])
                assert outcome.ok, f"DEL during {error}: {outcome.out} {outcome.err}"
                up[0].state, up[0].ip = DOWN, None
            else:
                free_before = _free(node)
                outcome = node.run("add", down[0])
                if outcome.ok:
                    down[0].state, down[0].ip = UP, _ip(outcome)
                else:
                    assert free_before == 0, f"ADD failed with {free_before} free IPs: {outcome.out} {outcome.err}"
                    said = outcome.out + outcome.err
                    assert "no free IP on this node" in said, said
                    tried_again.append(said)
            ops += 1
            delays.add((_agent_section(node).get("backoff") or {}).get("delay"))
        status = agent.status()
        assert status["blocked"]["reason"].startswith(f"EC2 is throttling or failing this node's requests ({error} on")
        assert status["last_error"]["code"] == error
        assert tried_again, "the pool never ran dry during the fault"
        # before the agent's first throttled round ends an ADD hears "the pool is being grown"; then why not
        assert f"no free IP on this node: EC2 is throttling or failing this node's requests ({error} on" in \
            tried_again[-1], tried_again[-1]
        during = sum(fresh_lab.ec2_calls().values())
        fresh_lab.clear_faults()
        ended = time.monotonic()
        seconds = ended - t0
        node.wait_for(lambda: _free(node) >= 9, timeout=BACKOFF_MAX + 30, what="the pool to refill after the fault")
        for cid in fillers:
            assert node.ipam("DEL", cid=cid)[0] == 0
        recovered = time.monotonic() - ended
        outcome = node.run("add", next(p for p in pods if p.state == DOWN))
        assert outcome.ok, outcome.out + outcome.err
        print(f"{error} for {seconds:.0f} s: {ops} pod operations, {len(tried_again)} answered 11, "
              f"{during} EC2 requests during the fault, backoff delays {sorted(d for d in delays if d)}, "
              f"pool refilled {recovered:.1f} s after")
        assert during <= 5 * (seconds / (BACKOFF_MAX / 2) + 6), f"{during} EC2 requests in {seconds} s"
    finally:
        fresh_lab.clear_faults()
        for p in pods:
            node.run("del", p)
        agent.kill()


def test_ec2_5s_latency_never_reaches_a_warm_add_or_a_del_with_or_without_the_agent(fresh_lab, tmp_path, make_netns):
    """Every EC2 request takes 5 s more, for a minute. node1 has its agent: it grows the pool meanwhile
    (a new ENI takes 6 requests, half a minute) while warm ADDs and DELs take their usual time.
    node2 has none: an ADD on an empty pool grows the pool itself, for as long; DELs of other pods
    meanwhile do not wait for it (the store lock is not held during EC2 calls), and a second ADD waits
    for that grow and takes an IP it made. Both pools are full again when the fault ends."""
    with_agent, agent = _warm_node(fresh_lab, tmp_path)
    bare = ChainNode(fresh_lab, "node2", tmp_path, plugins=BRIDGE_ONLY)
    pods = {"node1": [Pod(f"s{i}", make_netns("s")) for i in range(9)],
            "node2": [Pod(f"b{i}", make_netns("b")) for i in range(5)]}
    fillers = []
    for i in range(9):  # node2's pool (grown by its first ADD), all but nothing free
        fillers.append(f"fill{i}")
        assert bare.ipam("ADD", cid=fillers[-1])[0] == 0
    for p in pods["node2"][:3]:
        assert bare.ipam("DEL", cid=fillers.pop())[0] == 0
        outcome = bare.run("add", p)
        assert outcome.ok, outcome.out + outcome.err
        p.state, p.ip = UP, _ip(outcome)
    assert _free(bare) == 0

    def node1():
        ipam_times = []
        for p in pods["node1"]:  # drains the warm pool: the agent starts a 30-s grow
            t = time.monotonic()
            rc, result = with_agent.ipam("ADD", cid=p.cid)
            ipam_times.append(time.monotonic() - t)
            assert rc == 0, result
            assert with_agent.ipam("DEL", cid=p.cid)[0] == 0
            outcome = with_agent.run("add", p)
            assert outcome.ok, outcome.out + outcome.err
            p.state, p.ip = UP, _ip(outcome)
        assert max(ipam_times) < 2.5, ipam_times
        outcome = with_agent.run("del", pods["node1"][0])  # a DEL while the agent waits for EC2
        assert outcome.ok and outcome.seconds < 4.5, outcome
        pods["node1"][0].state, pods["node1"][0].ip = DOWN, None
        with_agent.wait_for(lambda: _free(with_agent) >= 9, timeout=90, what="the agent's slow grow")

    def node2():
        grower, second = pods["node2"][3:5]
        slow = threading.Thread(target=lambda: setattr(grower, "outcome", bare.run("add", grower)))
        slow.start()
        time.sleep(2)  # the grow is under way, waiting for EC2
        waiting = threading.Thread(target=lambda: setattr(second, "outcome", bare.run("add", second)))
        waiting.start()
        for p in pods["node2"][:3]:  # DELs go on meanwhile
            outcome = bare.run("del", p)
            assert outcome.ok and outcome.seconds < 4.5, f"a DEL waited {outcome.seconds:.1f} s for the grow"
            p.state, p.ip = DOWN, None
        assert slow.is_alive(), "the grow was quicker than EC2's latency allows"
        slow.join(120)
        waiting.join(120)
        for p in (grower, second):
            assert p.outcome.ok, p.outcome.out + p.outcome.err
            p.state, p.ip = UP, _ip(p.outcome)
        print(f"slow-path ADD {grower.outcome.seconds:.1f} s, the ADD behind it {second.outcome.seconds:.1f} s")

    try:
        fresh_lab.fault("*", latency=5, duration=60)
        _in_threads(node1, node2)
        for cid in fillers:
            assert bare.ipam("DEL", cid=cid)[0] == 0
        check_node(with_agent, pods["node1"])
        check_node(bare, pods["node2"])
    finally:
        fresh_lab.clear_faults()
        agent.kill()
        for n in (with_agent, bare):
            for p in pods[n.node]:
                n.run("del", p)
    assert_clean(with_agent)
    assert_clean(bare)


def test_imds_down_warm_add_del_and_growth_go_on_and_errors_say_why(fresh_lab, tmp_path, make_netns):
    """node1's IMDS stops answering. The chain's ADD and DEL do not need it, nor does the agent once
    it has its store: it grows the pool from EC2 alone, and a restarted agent reconciles from its
    store and EC2. Only a node with no state yet needs IMDS: its agent says so in its status and an
    ADD says so in its code-11 message; with no agent an ADD answers 101 naming IMDS. All of it
    recovers when IMDS is back."""
    node, agent = _warm_node(fresh_lab, tmp_path, plugins=FULL_CHAIN)
    pods = [Pod(f"i{i}", make_netns("i"), port=33000 + i) for i in range(11)]
    fresh = ChainNode(fresh_lab, "node1", tmp_path / "fresh", plugins=BRIDGE_ONLY)
    bare = ChainNode(fresh_lab, "node1", tmp_path / "bare", plugins=BRIDGE_ONLY)
    fresh_agent = None
    try:
        fresh_lab.fault("IMDS", node="node1")
        for p in pods:  # the 10th and 11th pods need the agent to grow the pool: from EC2 alone
            outcome = node.wait_for(lambda: (lambda o: o if o.ok else None)(node.run("add", p)), timeout=60,
                                    what=f"ADD {p.name} with IMDS down")
            p.state, p.ip = UP, _ip(outcome)
        check_node(node, pods)
        for p in pods[:3]:
            outcome = node.run("del", p)
            assert outcome.ok, outcome.out + outcome.err
            p.state, p.ip = DOWN, None
        agent.kill()
        agent = AgentProcess(node)  # a restart with IMDS down: the store and EC2 suffice
        agent.wait_ticks(2)
        assert agent.status()["startup_error"] is None
        for p in pods:
            node.run("del", p)
            p.state, p.ip = DOWN, None
        agent.kill()
        # a node with no state yet: the agent cannot start, and says why; so does an ADD
        fresh_agent = AgentProcess(fresh)
        status = node.wait_for(lambda: (lambda s: s if s and s.get("startup_error") else None)(fresh_agent.status()),
                               timeout=60, what="the agent to report why it cannot start")
        assert "IMDS" in status["startup_error"], status
        rc, err = fresh.ipam("ADD", cid="early")
        assert rc == 1 and err["code"] == 11, err
        assert "not built the pool yet" in err["msg"] and "IMDS" in err["msg"], err
        rc, err = bare.ipam("ADD", cid="bare")  # no agent: the plugin itself needs IMDS
        assert rc == 1 and err["code"] == 101 and "IMDS" in err["msg"], err
        print("agent:", status["startup_error"], "| ADD:", err["msg"])
        fresh_lab.clear_faults()
        fresh_agent.wait_ticks(1, timeout=60)
        rc, result = fresh.wait_for(lambda: (lambda r: r if r[0] == 0 else None)(fresh.ipam("ADD", cid="early")),
                                    timeout=60, what="an ADD once IMDS is back")
        assert fresh.ipam("DEL", cid="early")[0] == 0
    finally:
        fresh_lab.clear_faults()
        agent.kill()
        if fresh_agent:
            fresh_agent.kill()
        for p in pods:
            node.run("del", p)
    assert_clean(node)


def test_imds_stale_after_an_attach_does_not_delay_pods_on_the_new_eni(fresh_lab, tmp_path, make_netns):
    """IMDS answers as of 30 s ago, so for half a minute it does not know the ENI the agent just
    attached. Nothing on our path asks IMDS about it (ENIs come from EC2, interfaces are found by
    MAC): the pods given its IPs at once get their rule 1536 and reach the other node through it
    (the lab's VPC drops a packet leaving an ENI that does not hold its source)."""
    fresh_lab.set_imds_staleness(30)
    node, agent = _warm_node(fresh_lab, tmp_path)
    peer = ChainNode(fresh_lab, "node2", tmp_path, plugins=BRIDGE_ONLY)
    pods = [Pod(f"m{i}", make_netns("m")) for i in range(11)]
    target = Pod("peer", make_netns("m"))
    try:
        attached_before = set(node.ec2_enis())
        for p in pods:
            outcome = node.wait_for(lambda: (lambda o: o if o.ok else None)(node.run("add", p)), timeout=60,
                                    what=f"ADD {p.name}")
            p.state, p.ip = UP, _ip(outcome)
        enis = node.store()["enis"]
        new = set(enis) - attached_before  # (EC2 may list one more the agent is attaching right now)
        assert new, "no ENI was attached"
        on_new = [p for p in pods if any(p.ip in enis[e]["ips"] for e in new)]
        assert on_new, "no pod got an IP of the new ENI"
        outcome = peer.run("add", target)
        assert outcome.ok, outcome.out + outcome.err
        target.state, target.ip = UP, _ip(outcome)
        check_node(node, pods)
        for p in on_new[:2]:
            assert node.probe(p.netns, "ping", target.ip), f"{p.name} ({p.ip}, new ENI) cannot reach {target.ip}"
    finally:
        fresh_lab.set_imds_staleness(0)
        agent.kill()
        for p in pods:
            node.run("del", p)
        peer.run("del", target)
    assert_clean(node)
    assert_clean(peer)


def test_an_agent_restart_while_ec2_is_slow_does_not_hold_up_pods(fresh_lab, tmp_path):
    node, agent = _warm_node(fresh_lab, tmp_path)
    agent.kill()
    fresh_lab.fault("*", latency=5, duration=15)
    try:
        agent = AgentProcess(node)
        worst, t0 = 0.0, time.monotonic()
        while time.monotonic() - t0 < 10:  # the agent starts (~1-2 s) and reconciles (5 s per EC2 call)
            t = time.monotonic()
            assert node.ipam("ADD", cid="probe")[0] == 0
            assert node.ipam("DEL", cid="probe")[0] == 0
            worst = max(worst, time.monotonic() - t)
        assert worst < 5, f"a warm ADD + DEL took {worst:.1f} s, as long as one EC2 call, while the agent started"
    finally:
        fresh_lab.clear_faults()
        agent.kill()
