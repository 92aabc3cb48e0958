"""N simulated nodes running the real agent code against ONE lab EC2 with EC2's token buckets on.

What is real: cnicore.poolmgr.NodePool (the agent's tick and start-up reconcile), cnicore.warmpool's
decisions, cnicore.ec2.EC2 (its retries and error classes; one shared boto3 client, thread-safe, as
a thousand clients would take gigabytes), cnicore.imds.IMDS (over HTTP, to tests.scale.imds), a
cnicore.store.Store per node (files), and the lab's EC2 front: faults, buckets, latency, moto.
What is simulated: the kubelet (a pod ADD is a claim in the node's store, retried each simulated
second while the pool answers "no free IP", the CNI's code 11, and nudging the agent as the plugin
does), the node's namespace (none), and the agent's loop (a scheduler over worker threads). As in
agent/loop.py, a node runs a round when its interval comes or when a nudge woke it: the nudges of
the pod retries made while a round ran coalesce into one wake (threading.Event), so a node with
pods waiting runs its rounds back to back, one per retry at most, never two at once.

Compressed time: the lab runs its buckets and latencies `time_scale` times faster than the wall
clock (Lab.set_ec2_timing(time_scale=S)); every node's clock is SimClock (S simulated seconds per
wall second, from the same start), injected into NodePool, EC2 (retry sleeps) and the scheduler. So
the buckets refill at AWS's documented rates in simulated time, and every figure here is simulated.
Wall-clock cost (moto, Python) is multiplied by S in simulated time: S must stay low enough that a
tick's own compute is small against the 5 s tick interval, and that the lab's EC2 (moto, one process
that makes one change at a time) answers in less than the modelled latency. The scale is piecewise
(Cluster.set_scale changes it in the lab and in every clock at once; SimClock.pieces records it):
the cold start, whose figure is a duration, runs slower than the rest. `Cluster.measured` says per
run what the host kept up with: how late steps started, CPU per wall second, CPU in pod retries and
in rounds; run.py adds each EC2 action's time as the agents saw it against the lab's model.

Each node runs NodePool as the agent does: its EC2 budget (cnicore.ec2budget: IMDS compared with the
store every round, EC2 read at start, after an action, on a lasting disagreement or a long jittered
interval) and its leak sweep (cnicore.leaksweep), seeded by the node's instance ID.
"""

from __future__ import annotations

import heapq
import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter

from cnicore import settings as user_settings
from cnicore.ec2 import EC2, EC2Error
from cnicore.imds import IMDS, IMDSError
from cnicore.pool import Pool, PoolExhausted
from cnicore.poolmgr import NodePool
from cnicore.store import Store

from .imds import SimIMDS

TICK = 5.0         # s: the agent's --interval
POD_RETRY = 1.0    # s: a pod's ADD retried after code 11
IMDS_LAG = 2.0     # s: how far a node's IMDS may trail EC2 (EC2's own IMDS trails by seconds)
NETWORK = "aws-cni"
CLUSTER = "scale"


class SimClock:
    """Simulated time: `scale` simulated seconds per wall second, piecewise (set_scale starts a new
    piece where the last one is, so simulated time never jumps); `pieces` lists (simulated time,
    scale) from the start."""

    def __init__(self, scale: float):
        self.epoch = time.time()
        self._lock = threading.Lock()
        self._base = (time.monotonic(), self.epoch, float(scale))
        self.pieces = [(0.0, float(scale))]

    @property
    def scale(self) -> float:
        return self._base[2]

    def __call__(self) -> float:
        wall0, sim0, scale = self._base
        return sim0 + (time.monotonic() - wall0) * scale

    def set_scale(self, scale: float) -> None:
        with self._lock:
            now = time.monotonic()
            wall0, sim0, old = self._base
            sim = sim0 + (now - wall0) * old
            self._base = (now, sim, float(scale))
            self.pieces.append((round(sim - self.epoch, 1), float(scale)))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.scale)


class Quiet:
    """The agent's logger, keeping only counts (a thousand nodes' lines are no use here)."""

    def __init__(self):
        self.counts = Counter()

    def _count(self, level):
        def log(msg, **fields):
            self.counts[level] += 1
        return log

    def __getattr__(self, level):
        return self._count(level)


def shared_ec2(client):
    """An EC2 class whose instances use `client` (one boto3 client for the simulation)."""
    class SharedClientEC2(EC2):
        @property
        def client(self):
            return client
    return SharedClientEC2


class Node:
    def __init__(self, index, instance_id, pool, store, ec2):
        self.index, self.instance_id, self.pool, self.store, self.ec2 = index, instance_id, pool, store, ec2
        self.pending: list[str] = []     # pods waiting for an IP
        self.placed: set[str] = set()
        self.created = 0                 # pods ever scheduled here (names stay unique)
        self.next_tick = 0.0
        self.started = False
        self.warm = False                # its last round had nothing to grow
        self.dead = False                # its instance is terminated: no more rounds
        self.placed_at = 0.0             # when its pending pods last all had an IP (0: not since scheduled)

    def add_pod(self, name: str, now: float) -> bool:
        """One pod ADD: True if it got an IP; False is the CNI's code 11 (no free IP, try again)."""
        with self.store.locked() as tx:
            doc = tx.read()
            try:
                Pool(doc, now, self.pool.cfg.ip_cooldown_period).assign(name, "eth0")
            except PoolExhausted:
                return False
            tx.write(doc)
        return True

    def delete_pod(self, name: str, now: float) -> None:
        """One pod DEL: its IP cools down in the store, as the plugin leaves it."""
        with self.store.locked() as tx:
            doc = tx.read()
            Pool(doc, now, self.pool.cfg.ip_cooldown_period).release(name, "eth0")
            tx.write(doc)
        self.placed.discard(name)


class Cluster:
    """The simulated nodes, their scheduler and their counts."""

    def __init__(self, lab, nodes: int, *, scale: float, workers: int = 8, seed: int = 1,
                 instance_type: str = "m5.xlarge"):
        import boto3
        from botocore.config import Config

        self.lab, self.scale = lab, scale
        self.rng = random.Random(seed)
        self.clock = SimClock(scale)
        self.errors = Counter()   # pod-facing errors other than code 11
        self.code11 = 0
        self.rounds = 0           # node rounds run (a lagging scheduler runs fewer than one per TICK)
        status = lab.status()
        self.subnet, self.security_group = subnet, sg = status["subnets"][0]["id"], status["security_group_id"]
        reply = lab.ec2("RunInstances", ImageId="ami-12c6146b", MinCount=nodes, MaxCount=nodes,
                        InstanceType=instance_type, SubnetId=subnet, SecurityGroupIds=[sg])
        instances = [i["InstanceId"] for i in reply["Instances"]]
        self.imds = SimIMDS(lab, instances, status["region"], refresh=min(1.0, IMDS_LAG / scale))
        client = boto3.session.Session().client(
            "ec2", region_name=status["region"],
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=workers * 2))
        self.client = client
        ec2_class = shared_ec2(client)
        self.data = tempfile.mkdtemp(prefix="avc-scale-")
        rng = random.Random(seed)
        cfg = user_settings.from_env({"CLUSTER_NAME": CLUSTER})
        self.nodes = []
        for i, iid in enumerate(instances):
            ec2 = ec2_class(iid, region=status["region"], cluster_name=CLUSTER, sleep=self.clock.sleep,
                            clock=self.clock, rng=random.Random(rng.random()))
            imds = IMDS(self.imds.endpoint(i), timeout=5.0)
            pool = NodePool(cfg, Quiet(), imds=imds, ec2=ec2, clock=self.clock)
            store = Store(os.path.join(self.data, f"n{i}"), NETWORK)
            self.nodes.append(Node(i, iid, pool, store, ec2))
        self.workers = workers
        self._lock = threading.Lock()
        self.harness = Counter()

    def close(self):
        self.imds.close()
        shutil.rmtree(self.data, ignore_errors=True)

    def set_scale(self, scale: float) -> dict:
        """Change the time scale from now on, in the lab (buckets and latencies) and in every node's
        clock at once. The lab's change refills its buckets and restarts their counts: returns the
        buckets as they were just before (tokens left), so a caller can show they were full anyway."""
        before = self.lab.ec2_throttling()["buckets"]
        self.lab.set_ec2_timing(time_scale=scale)
        self.clock.set_scale(scale)
        self.scale = scale
        self.imds.refresh = min(1.0, IMDS_LAG / scale)
        return before

    # --- running --------------------------------------------------------------------------------
    def run(self, seconds: float, until=None) -> float:
        """Run every node's loop for `seconds` simulated seconds (or until `until()` is true);
        return the simulated seconds it took. What the host could keep up with is kept in
        `self.harness` (see `_measure`)."""
        start = self.clock()
        end = start + seconds
        heap = [(max(n.next_tick, start) if n.started else start, n.index) for n in self.nodes if not n.dead]
        heapq.heapify(heap)
        done = threading.Event()
        m = self.harness = Counter()
        wall0, cpu0 = time.monotonic(), time.process_time()

        def worker():
            while not done.is_set():
                with self._lock:
                    if not heap:
                        return
                    at, index = heapq.heappop(heap)
                wait = (at - self.clock()) / self.clock.scale
                if wait > 0:
                    time.sleep(wait)
                node = self.nodes[index]
                late = self.clock() - at
                self._step(node, m)
                with self._lock:
                    self.rounds += 1
                    m["steps"] += 1
                    m["late_sum"] += late
                    m["late_max"] = max(m["late_max"], late)
                    heapq.heappush(heap, (self._next(node), index))
                if self.clock() >= end or (until is not None and until()):
                    done.set()

        threads = [threading.Thread(target=worker) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m["wall"], m["cpu"] = time.monotonic() - wall0, time.process_time() - cpu0
        return self.clock() - start

    def measured(self) -> dict:
        """What the host managed in the last run: steps (a node's pod retries and, when they failed
        or its interval came, its round), how late a step started against its simulated time (mean,
        max: the harness running behind), this process's CPU over wall time (1.0 = one core busy;
        the GIL holds it near 1), and the CPU seconds spent in the pods' ADD retries and in the
        agent's rounds (NodePool.tick: its IMDS compare, decision, EC2 client and store)."""
        m = self.harness
        steps = max(m["steps"], 1)
        return {"steps": m["steps"], "late_mean_s": round(m["late_sum"] / steps, 2),
                "late_max_s": round(m["late_max"], 1), "wall_s": round(m["wall"], 1),
                "cpu_per_wall": round(m["cpu"] / max(m["wall"], 1e-9), 2),
                "cpu_s_pod_adds": round(m["cpu_adds"], 1), "cpu_s_rounds": round(m["cpu_rounds"], 1),
                "rounds": m["ticks"], "time_scale": self.scale}

    def _next(self, node: Node) -> float:
        return min(node.next_tick, self.clock() + POD_RETRY) if node.pending else node.next_tick

    def _step(self, node: Node, m: Counter) -> None:
        now = self.clock()
        try:
            if not node.started:
                node.pool.reconcile(node.store)
                node.started = True
                node.next_tick = now + TICK * random.random()  # nodes do not start in step
                return
            nudge = False
            cpu = time.thread_time()
            for i, pod in enumerate(list(node.pending)):
                if node.add_pod(pod, self.clock()):
                    node.pending.remove(pod)
                    node.placed.add(pod)
                else:
                    # no free IP: every later ADD of this retry finds the same store (only this
                    # node's round, not running now, and its pods change it), so each is a code 11
                    # too; counted without rereading the store 30 times
                    self.code11 += len(node.pending) - i
                    nudge = True
                    break
            m["cpu_adds"] += time.thread_time() - cpu
            if not node.pending and not node.placed_at:
                node.placed_at = self.clock()
            if nudge or now >= node.next_tick:
                # the pods still pending found no IP: their nudges name them, as the plugin's do
                cpu = time.thread_time()
                node.warm = not node.pool.tick(node.store, waiting=len(node.pending)).grow
                m["cpu_rounds"] += time.thread_time() - cpu
                m["ticks"] += 1
                node.next_tick = self.clock() + TICK
        except (EC2Error, IMDSError) as exc:  # the agent logs and retries next round
            self.errors[f"agent:{type(exc).__name__}"] += 1
            node.next_tick = self.clock() + TICK

    # --- scenarios ------------------------------------------------------------------------------
    def schedule_pods(self, nodes: int, pods: int) -> list[Node]:
        chosen = self.nodes[:nodes]
        for node in chosen:
            self.schedule_pods_on(node, pods)
        return chosen

    def churn(self, nodes, per_minute: int, minutes: int) -> float:
        """Every simulated minute, each of `nodes` deletes `per_minute` of its pods (at random) and
        gets as many new ones; then runs until they are placed. Returns the simulated seconds."""
        start = self.clock()
        for _ in range(minutes):
            for node in nodes:
                for pod in self.rng.sample(sorted(node.placed), min(per_minute, len(node.placed))):
                    node.delete_pod(pod, self.clock())
                self.schedule_pods_on(node, per_minute)
            self.run(60.0)
        self.run(600.0, until=lambda: self.all_placed(nodes))
        return self.clock() - start

    def kill(self, nodes_by_state: dict[str, list[Node]]) -> dict[str, list[str]]:
        """Nodes die (their instances terminated) in one of three states; returns the ENIs each state
        leaves behind at death (secondary ENIs only), as EC2 then lists them.
        - "attached": its ENIs attached with DeleteOnTermination set, as the agent leaves them;
        - "created": the agent died between CreateNetworkInterface and AttachNetworkInterface
          (an ENI made by the agent's own EC2 code, tagged as ours, never attached);
        - "attached-no-dot": it died between AttachNetworkInterface and setting DeleteOnTermination."""
        snap = self.lab.snapshot()
        made = {}
        for state, nodes in nodes_by_state.items():
            for node in nodes:
                if state == "attached":
                    continue
                eni = node.ec2.create_eni(self.subnet, [self.security_group])
                if state == "attached-no-dot":
                    self.client.attach_network_interface(NetworkInterfaceId=eni.eni_id, InstanceId=node.instance_id,
                                                         DeviceIndex=len(snap.enis_of(node.instance_id)))
                made[node.instance_id] = eni.eni_id
        owned = {node.instance_id: state for state, nodes in nodes_by_state.items() for node in nodes}
        before = {iid: {e.id for e in snap.enis_of(iid) if e.device_index} | ({made[iid]} if iid in made else set())
                  for iid in owned}
        for node in (n for nodes in nodes_by_state.values() for n in nodes):
            node.dead = True
        self.lab.ec2("TerminateInstances", InstanceIds=sorted(owned))
        self.imds.reread()
        left = set(self.lab.snapshot().enis)
        return {state: sorted(e for n in nodes for e in before[n.instance_id] if e in left)
                for state, nodes in nodes_by_state.items()}

    def schedule_pods_on(self, node: Node, pods: int) -> None:
        node.placed_at = 0.0
        node.pending += [f"pod-{node.index}-{node.created + k}" for k in range(pods)]
        node.created += pods

    def all_warm(self) -> bool:
        """Every live node has started and its last round found nothing to grow."""
        return all(n.warm for n in self.nodes if not n.dead)

    def all_placed(self, nodes) -> bool:
        return all(not n.pending for n in nodes)

    def node_calls(self) -> list[Counter]:
        return [Counter(n.pool.ec2_calls()) for n in self.nodes]

    def reads(self) -> Counter:
        """The nodes' reads of EC2's view and leak sweeps so far, per reason (NodePool.ec2_reads)."""
        return sum((n.pool.ec2_reads for n in self.nodes), Counter())

    def node_latency(self) -> list[Counter]:
        """Per node: wall milliseconds spent in EC2 requests, and requests, per action (cnicore.ec2's
        own latency counts: wall time, so simulated time is that times the time scale)."""
        out = []
        for n in self.nodes:
            c = Counter()
            for action, _failed, _status, requests, ms in n.pool.ec2_latency():
                c[action] += ms
                c[action + "#"] += requests
            out.append(c)
        return out
