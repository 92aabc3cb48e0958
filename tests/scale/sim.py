"""N simulated nodes running the real agent code against ONE lab EC2 with EC2's token buckets on.

What is real: cnicore.poolmgr.NodePool (the agent's tick and start-up reconcile), cnicore.warmpool's
decisions, cnicore.ec2.EC2 (its retries and error classes; one shared boto3 client, thread-safe, as
a thousand clients would take gigabytes), cnicore.imds.IMDS (over HTTP, to tests.scale.imds), a
cnicore.store.Store per node (files), and the lab's EC2 front: faults, buckets, latency, moto.
What is simulated: the kubelet (a pod ADD is a claim in the node's store, retried each simulated
second while the pool answers "no free IP", the CNI's code 11, and nudging the agent as the plugin
does), the node's namespace (none), and the agent's loop (a scheduler over worker threads).

Compressed time: the lab runs its buckets and latencies `time_scale` times faster than the wall
clock (Lab.set_ec2_timing(time_scale=S)); every node's clock is SimClock (S simulated seconds per
wall second, from the same start), injected into NodePool, EC2 (retry sleeps) and the scheduler. So
the buckets refill at AWS's documented rates in simulated time, and every figure here is simulated.
Wall-clock cost (moto, Python) is multiplied by S in simulated time: S must stay low enough that a
tick's own compute is small against the 5 s tick interval.

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
    def __init__(self, scale: float):
        self.scale = scale
        self._wall0 = time.monotonic()
        self.epoch = time.time()

    def __call__(self) -> float:
        return self.epoch + (time.monotonic() - self._wall0) * self.scale

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

    def add_pod(self, name: str, now: float) -> bool:
        """One pod ADD: True if it got an IP; False is the CNI's code 11 (no free IP, try again)."""
        with self.store.locked() as tx:
            doc = tx.read()
            try:
                Pool(doc, now, self.pool.cfg["IP_COOLDOWN_PERIOD"]).assign(name, "eth0")
            except PoolExhausted:
                return False
            tx.write(doc)
        return True

    def delete_pod(self, name: str, now: float) -> None:
        """One pod DEL: its IP cools down in the store, as the plugin leaves it."""
        with self.store.locked() as tx:
            doc = tx.read()
            Pool(doc, now, self.pool.cfg["IP_COOLDOWN_PERIOD"]).release(name, "eth0")
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

    def close(self):
        self.imds.close()
        shutil.rmtree(self.data, ignore_errors=True)

    # --- running --------------------------------------------------------------------------------
    def run(self, seconds: float, until=None) -> float:
        """Run every node's loop for `seconds` simulated seconds (or until `until()` is true);
        return the simulated seconds it took."""
        start = self.clock()
        end = start + seconds
        heap = [(max(n.next_tick, start) if n.started else start, n.index) for n in self.nodes if not n.dead]
        heapq.heapify(heap)
        done = threading.Event()

        def worker():
            while not done.is_set():
                with self._lock:
                    if not heap:
                        return
                    at, index = heapq.heappop(heap)
                wait = (at - self.clock()) / self.scale
                if wait > 0:
                    time.sleep(wait)
                node = self.nodes[index]
                self._step(node)
                self.rounds += 1
                with self._lock:
                    heapq.heappush(heap, (self._next(node), index))
                if self.clock() >= end or (until is not None and until()):
                    done.set()

        threads = [threading.Thread(target=worker) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.clock() - start

    def _next(self, node: Node) -> float:
        return min(node.next_tick, self.clock() + POD_RETRY) if node.pending else node.next_tick

    def _step(self, node: Node) -> None:
        now = self.clock()
        try:
            if not node.started:
                node.pool.reconcile(node.store)
                node.started = True
                node.next_tick = now + TICK * random.random()  # nodes do not start in step
                return
            nudge = False
            for pod in list(node.pending):
                if node.add_pod(pod, self.clock()):
                    node.pending.remove(pod)
                    node.placed.add(pod)
                else:
                    self.code11 += 1
                    nudge = True
            if nudge or now >= node.next_tick:
                # the pods still pending found no IP: their nudges name them, as the plugin's do
                node.warm = not node.pool.tick(node.store, waiting=len(node.pending)).grow
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
        node.pending += [f"pod-{node.index}-{node.created + k}" for k in range(pods)]
        node.created += pods

    def all_warm(self) -> bool:
        """Every live node has started and its last round found nothing to grow."""
        return all(n.warm for n in self.nodes if not n.dead)

    def all_placed(self, nodes) -> bool:
        return all(not n.pending for n in nodes)

    def node_calls(self) -> list[Counter]:
        return [Counter(n.pool.ec2_calls()) for n in self.nodes]
