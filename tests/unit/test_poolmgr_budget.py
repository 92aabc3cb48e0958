"""NodePool with its EC2 budget and leak sweep (issue #16): when the agent's rounds call EC2, on one
node's fake EC2 and IMDS (pure logic: a hand-moved clock, a store in a temporary directory, no root).

The fake EC2 keeps the instance's ENIs and counts every request as the real client does; the fake
IMDS shows them as IMDS does, lagging: it shows EC2's state as of its last `sync()`."""

import itertools

import pytest

from cnicore import settings
from cnicore.ec2 import ENI, ENI_DESCRIPTION_PREFIX, THROTTLING_CODES, EC2Throttled
from cnicore.ec2budget import (BACKOFF_MAX, EC2_READ_INTERVAL, IMDS_GRACE, INTERVAL_JITTER, REASON_ACTION,
                               REASON_INTERVAL, REASON_START)
from cnicore.imds import ENIMetadata, IMDSUnreachable, InstanceIdentity
from cnicore.leaksweep import SWEEP_INTERVAL, SWEEP_JITTER
from cnicore.pool import Pool
from cnicore.poolmgr import NO_MANAGE_TAG, READ_LEAK_SWEEP, NodePool
from cnicore.store import Store

TICK = 5.0
SUBNET, SUBNET_CIDR, VPC = "subnet-0a1b2c3d", "10.0.0.0/16", "vpc-0a1b2c3d"
DESCRIBE = "DescribeNetworkInterfaces"


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


class FakeEC2:
    """The instance's ENIs as EC2 holds them; `calls` counts requests per action (with the
    sweep's filtered describes among them), `sweeps` the filters of the sweep's describes."""

    def __init__(self, instance_id, clock):
        self.instance_id, self.clock = instance_id, clock
        self.calls, self.errors, self.latency = {}, {}, {}
        self.sweeps = []
        self.throttling = False
        self.throttle_first_assign_to_new_eni = False
        self.throttled_actions = set()  # these throttle (as `throttling` throttles every action)
        self.throttle_code = "RequestLimitExceeded"  # or a 5xx's: "InternalError"
        self._ips = (f"10.0.{n // 250}.{n % 250 + 2}" for n in itertools.count(10))
        self._ids = itertools.count(1)
        primary = self._eni(0)
        self.enis = {primary["id"]: primary}

    def _eni(self, device):
        return {"id": f"eni-{next(self._ids):08x}", "device": device, "primary": next(self._ips),
                "ips": [], "prefixes": [], "mac": f"02:00:00:00:00:{device:02x}"}

    def _count(self, action):
        self.calls[action] = self.calls.get(action, 0) + 1
        if self.throttling or action in self.throttled_actions:
            error = EC2Throttled(action, self.throttle_code, "Request limit exceeded.")
            error.may_have_run = self.throttle_code not in THROTTLING_CODES  # a 5xx: as cnicore.ec2 says
            raise error

    def behind_our_back_attach(self, tags=None):
        eni = self._eni(len(self.enis))
        eni["ips"], eni["tags"] = [next(self._ips) for _ in range(3)], tags or {}
        self.enis[eni["id"]] = eni
        return eni["id"]

    def behind_our_back_assign(self, eni_id, n):
        self.enis[eni_id]["ips"] += [next(self._ips) for _ in range(n)]

    # --- what NodePool and LeakSweep call ---
    def instance_enis(self):
        self._count(DESCRIBE)
        return [ENI(e["id"], e["mac"], SUBNET, "in-use", f"{ENI_DESCRIPTION_PREFIX}{self.instance_id}", e["primary"],
                    tuple(e["ips"]), e["device"], f"attach-{e['id'][4:]}", self.instance_id, e.get("tags", {}),
                    tuple(e["prefixes"]))
                for e in sorted(self.enis.values(), key=lambda e: e["device"])]

    def assign_ips(self, eni_id, count):
        if self.throttle_first_assign_to_new_eni and self.enis[eni_id]["device"] and not self.enis[eni_id]["ips"]:
            self.throttle_first_assign_to_new_eni = False
            self.calls["AssignPrivateIpAddresses"] = self.calls.get("AssignPrivateIpAddresses", 0) + 1
            raise EC2Throttled("AssignPrivateIpAddresses", "RequestLimitExceeded", "Request limit exceeded.")
        self._count("AssignPrivateIpAddresses")
        self.behind_our_back_assign(eni_id, count)

    def unassign_ips(self, eni_id, ips):
        self._count("UnassignPrivateIpAddresses")
        self.enis[eni_id]["ips"] = [ip for ip in self.enis[eni_id]["ips"] if ip not in ips]

    def allocate_eni(self, subnet_id, groups):
        for action in ("CreateNetworkInterface", "AttachNetworkInterface", "ModifyNetworkInterfaceAttribute"):
            self._count(action)
        eni = self._eni(len(self.enis))
        self.enis[eni["id"]] = eni
        return ENI(eni["id"], eni["mac"], SUBNET, "in-use", "", eni["primary"], (), eni["device"])

    def delete_on_termination(self, eni_id, attachment_id):
        self._count("ModifyNetworkInterfaceAttribute")

    def free_eni(self, eni_id):
        self._count("DetachNetworkInterface")
        del self.enis[eni_id]

    def _call(self, action, **params):
        self._count(action)
        self.sweeps.append(params["Filters"])
        return {"NetworkInterfaces": []}


class FakeIMDS:
    def __init__(self, ec2):
        self.ec2, self.failing = ec2, False
        self.sync()

    def sync(self):
        """IMDS catches up with EC2."""
        self.view = {e["mac"]: (e["primary"], tuple(e["ips"]), tuple(e["prefixes"])) for e in self.ec2.enis.values()}

    def _check(self):
        if self.failing:
            raise IMDSUnreachable("IMDS at http://169.254.169.254 unreachable: timed out")

    def identity(self):
        return InstanceIdentity(self.ec2.instance_id, "m5.xlarge", "us-west-2a", "us-west-2", "02:00:00:00:00:00",
                                self.view["02:00:00:00:00:00"][0])

    def eni(self, mac):
        primary, ips, _ = self.view[mac]
        eni_id = next(e["id"] for e in self.ec2.enis.values() if e["mac"] == mac)
        return ENIMetadata(mac, 0, eni_id, (primary, *ips), SUBNET, SUBNET_CIDR, VPC, (SUBNET_CIDR,), ("sg-1",))

    def macs(self):
        self._check()
        return list(self.view)

    def local_ipv4s(self, mac):
        self._check()
        return (self.view[mac][0], *self.view[mac][1])

    def ipv4_prefixes(self, mac):
        return self.view[mac][2]

    def vpc_id(self, mac):
        return VPC

    def vpc_cidrs(self, mac):
        self._check()
        return (SUBNET_CIDR,)


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda msg, **kw: self.lines.append((level, msg))


class Node:
    def __init__(self, tmp_path, instance_id="i-0123456789abcdef0", cluster=""):
        self.clock = Clock()
        self.ec2 = FakeEC2(instance_id, self.clock)
        self.imds = FakeIMDS(self.ec2)
        self.log = Log()
        cfg = settings.from_env({"CLUSTER_NAME": cluster, "WARM_IP_TARGET": "3", "MINIMUM_IP_TARGET": "3"})
        self.pool = NodePool(cfg, self.log, imds=self.imds, ec2=self.ec2, clock=self.clock)
        self.store = Store(str(tmp_path / instance_id), "aws-cni")

    def describes(self):
        return self.ec2.calls.get(DESCRIBE, 0) - len(self.ec2.sweeps)

    def tick(self, sync=True, step=TICK):
        self.clock.now += step
        decision = self.pool.tick(self.store)
        if sync:
            self.imds.sync()
        return decision

    def settle(self):
        """Start, then tick until the warm pool is reached and EC2's view read after the last action."""
        self.pool.reconcile(self.store)
        for _ in range(10):
            self.tick()
        assert self.doc()["agent"]["blocked"] is None and self.free() == 3

    def doc(self):
        with self.store.locked(shared=True) as tx:
            return tx.read()

    def free(self):
        return Pool(self.doc(), self.clock(), 30).free_count()

    def take(self, n):
        with self.store.locked() as tx:
            doc = tx.read()
            for i in range(n):
                Pool(doc, self.clock(), 30).assign(f"pod-{self.clock()}-{i}", "eth0")
            tx.write(doc)


def test_a_steady_node_reads_ec2_only_on_its_jittered_interval(tmp_path):
    node = Node(tmp_path)
    node.settle()
    before, calls_before = node.describes(), sum(node.ec2.calls.values())
    reads_before = dict(node.pool.ec2_reads)
    assert reads_before[REASON_START] == 1 and set(reads_before) <= {REASON_START, REASON_ACTION}
    reads_at = []
    for _ in range(int(3600 / TICK)):  # an hour of rounds
        node.tick()
        if node.describes() > before + len(reads_at):
            reads_at.append(node.clock.now)
    start = node.clock.now - 3600
    # nothing before the earliest end of the jittered interval, at most that one read in the hour
    assert len(reads_at) <= 1 and all(t - start >= EC2_READ_INTERVAL * (1 - INTERVAL_JITTER) - 60 for t in reads_at)
    assert sum(node.ec2.calls.values()) - calls_before == len(reads_at)  # no other EC2 call at all
    assert node.pool.ec2_reads == {**reads_before, **({REASON_INTERVAL: 1} if reads_at else {})}
    assert node.free() == 3


def test_a_disagreement_younger_than_the_imds_grace_costs_no_read_an_older_one_costs_one(tmp_path):
    node = Node(tmp_path)
    node.settle()
    primary = node.doc()["node"]["primary_eni"]
    before = node.describes()
    node.ec2.behind_our_back_assign(primary, 1)  # someone else assigned an IP: IMDS shows it, the store not
    node.imds.sync()
    seen = node.clock.now + TICK  # the next round sees it first
    reads = []
    while not reads:
        node.tick()
        if node.describes() > before:
            reads.append(node.clock.now)
    assert reads[0] - seen >= IMDS_GRACE and reads[0] - seen < IMDS_GRACE + TICK
    assert node.describes() == before + 1
    assert node.free() == 4  # EC2's view merged: the extra IP is in the pool (given back next round)
    for _ in range(20):
        node.tick()
    assert node.ec2.calls["UnassignPrivateIpAddresses"] == 1
    assert node.describes() == before + 2  # the give-back is an action of ours: read once after it
    assert node.free() == 3


def test_a_disagreement_that_heals_within_the_grace_costs_nothing(tmp_path):
    node = Node(tmp_path)
    node.settle()
    before = node.describes()
    lagging = dict(node.imds.view)
    mac = next(iter(lagging))
    primary, ips, prefixes = lagging[mac]
    node.imds.view[mac] = (primary, ips[:-1], prefixes)  # IMDS lags (e.g. after our own assign)
    for _ in range(3):
        node.tick(sync=False)
    node.imds.sync()
    for _ in range(20):
        node.tick()
    assert node.describes() == before


@pytest.mark.parametrize("tags", [{}, {NO_MANAGE_TAG: "true"}], ids=["managed", "no_manage"])
def test_an_eni_imds_lists_and_the_store_does_not_costs_one_read_after_the_grace(tmp_path, tags):
    """Attached by someone else (or by an agent killed before it read back): IMDS shows its MAC, which
    the store lacks. One read after the grace takes it in; an ENI the pool must not manage
    (NO_MANAGE_TAG) stays out of the store, and its MAC does not cost a read every grace."""
    node = Node(tmp_path)
    node.settle()
    before = node.describes()
    eni_id = node.ec2.behind_our_back_attach(tags)
    calls, attached_at = dict(node.ec2.calls), node.clock.now
    node.imds.sync()
    while node.describes() == before and node.clock.now < attached_at + 2 * IMDS_GRACE:
        node.tick()
    # a fresh disagreement is IMDS catching up, not chased; a lasting one costs one read
    assert node.describes() == before + 1 and IMDS_GRACE <= node.clock.now - attached_at <= IMDS_GRACE + 2 * TICK
    if tags:  # left out of the store, and nothing more
        assert eni_id not in node.doc()["enis"] and node.ec2.calls == {**calls, DESCRIBE: calls[DESCRIBE] + 1}
    else:  # taken in: its 3 IPs are a surplus that the pool gives back, and then the ENI
        assert eni_id in node.doc()["enis"]
    for _ in range(int(1200 / TICK)):
        node.tick()
    settled = dict(node.ec2.calls)
    for _ in range(int(1200 / TICK)):  # then quiet: nothing disagrees any more
        node.tick()
    assert node.ec2.calls == settled and node.free() == 3


def test_an_action_of_ours_is_followed_by_exactly_one_read(tmp_path):
    node = Node(tmp_path)
    node.settle()
    before = dict(node.ec2.calls)
    node.take(2)  # 1 free: the pool grows by 2
    node.tick()
    grown = {a: n - before.get(a, 0) for a, n in node.ec2.calls.items() if n != before.get(a, 0)}
    assert grown == {"AssignPrivateIpAddresses": 1, DESCRIBE: 1}
    assert node.free() == 3
    for _ in range(30):
        node.tick()
    assert node.ec2.calls == {**before, "AssignPrivateIpAddresses": before["AssignPrivateIpAddresses"] + 1,
                              DESCRIBE: before[DESCRIBE] + 1}


def test_throttling_backs_off_reads_and_actions_with_a_doubling_pause_recorded_for_the_plugins(tmp_path):
    node = Node(tmp_path)
    node.settle()
    node.take(3)  # 0 free: the pool must grow, and EC2 throttles
    node.ec2.throttling = True
    delays, attempts = [], []
    while len(delays) < 7:
        calls = sum(node.ec2.calls.values())
        node.clock.now += 0.5  # rounds as often as plugins nudge
        node.pool.tick(node.store)
        if sum(node.ec2.calls.values()) > calls:
            attempts.append(node.clock.now)
            backoff = node.doc()["agent"]["backoff"]
            delays.append(backoff["delay"])
            assert backoff["until"] > node.clock.now
    assert delays == [1, 2, 4, 8, 16, 16, 16] and max(delays) == BACKOFF_MAX
    for gap, delay in zip((b - a for a, b in zip(attempts, attempts[1:])), delays):
        assert delay / 2 <= gap <= delay + 0.5  # no EC2 call at all during a pause
    blocked = node.doc()["agent"]["blocked"]["reason"]
    assert blocked.startswith("EC2 is throttling or failing this node's requests (RequestLimitExceeded on")
    node.ec2.throttling = False
    node.clock.now += BACKOFF_MAX
    node.tick()
    doc = node.doc()
    assert doc["agent"]["backoff"] is None and node.free() == 3
    assert node.ec2.calls[DESCRIBE] >= 1


def test_an_eni_attached_in_a_throttled_round_is_read_before_the_next_grow(tmp_path):
    """A round attaches an ENI and is throttled on its first AssignPrivateIpAddresses, so it reads
    nothing back: the next round must learn that ENI from EC2 before it grows, not attach another
    (at 1,000 nodes, `make scale` saw such rounds end in AttachmentLimitExceeded)."""
    node = Node(tmp_path)
    node.settle()
    node.ec2.throttle_first_assign_to_new_eni = True
    for _ in range(20):  # pods take every free IP until a round attaches an ENI
        node.take(node.free())
        node.tick()
        if "CreateNetworkInterface" in node.ec2.calls:
            break
    assert node.ec2.calls["CreateNetworkInterface"] == 1 and len(node.ec2.enis) == 2
    assert len(node.doc()["enis"]) == 1  # the throttled round read nothing back
    after_action = node.pool.ec2_reads[REASON_ACTION]
    for _ in range(10):
        node.tick(step=BACKOFF_MAX)
    assert node.pool.ec2_reads[REASON_ACTION] > after_action  # read back as an action's, not a start's
    assert node.ec2.calls["CreateNetworkInterface"] == 1 and len(node.ec2.enis) == 2
    assert len(node.doc()["enis"]) == 2 and node.free() == 3


@pytest.mark.parametrize("code", ["RequestLimitExceeded", "InternalError"])
def test_grows_ec2_refused_cost_no_read_those_that_may_have_run_one_each(tmp_path, code):
    """A request EC2 refused (throttled) changed nothing: a cold start's throttled grows must not each
    cost a DescribeNetworkInterfaces (make scale: 17,809 throttled describes at 200 cold nodes when
    they did). A 5xx may have run the request: the next round reads before it grows again."""
    node = Node(tmp_path)
    node.settle()
    before = node.describes()
    node.ec2.throttled_actions, node.ec2.throttle_code = {"AssignPrivateIpAddresses"}, code
    node.take(3)  # 0 free: the pool must grow
    for _ in range(12):
        node.tick(step=BACKOFF_MAX)
    tries = node.ec2.calls["AssignPrivateIpAddresses"] - 1  # settle's one assign succeeded
    assert tries > 1 and node.describes() == before + (0 if code == "RequestLimitExceeded" else tries - 1)
    node.ec2.throttled_actions = set()
    for _ in range(3):
        node.tick(step=BACKOFF_MAX)
    assert node.free() == 3 and node.describes() == before + (1 if code == "RequestLimitExceeded" else tries + 1)


def test_a_restarted_agent_keeps_the_backoff_the_store_records(tmp_path):
    node = Node(tmp_path)
    node.settle()
    node.take(3)
    node.ec2.throttling = True
    node.tick()
    until = node.doc()["agent"]["backoff"]["until"]
    node.ec2.throttling = False
    restarted = NodePool(node.pool.cfg, node.log, imds=node.imds, ec2=node.ec2, clock=node.clock)
    calls = sum(node.ec2.calls.values())
    restarted.tick(node.store)
    assert node.clock.now < until and sum(node.ec2.calls.values()) == calls


def test_an_imds_failure_skips_the_comparison_and_not_the_round(tmp_path):
    node = Node(tmp_path)
    node.settle()
    node.take(2)
    node.imds.failing = True
    node.tick(sync=False)
    assert node.free() == 3  # the pool grew all the same
    assert any(level == "warn" and "IMDS not compared" in msg for level, msg in node.log.lines)


def test_the_sweep_runs_hourly_with_jitter_filtered_by_the_nodes_vpc_and_cluster(tmp_path):
    firsts, step = set(), 30.0  # coarse rounds: hours of them
    for n in range(3):
        node = Node(tmp_path, instance_id=f"i-0123456789abcde{n:02x}", cluster="prod")
        node.settle()
        sweeps_at = []
        while node.clock.now < 1_800_000_000 + 3.5 * 3600:
            node.tick(step=step)
            if len(node.ec2.sweeps) > len(sweeps_at):
                sweeps_at.append(node.clock.now)
        first = sweeps_at[0] - 1_800_000_000
        firsts.add(round(first))
        assert first <= SWEEP_INTERVAL + 20 * TICK
        for a, b in zip(sweeps_at, sweeps_at[1:]):
            assert SWEEP_INTERVAL * (1 - SWEEP_JITTER) <= b - a <= SWEEP_INTERVAL * (1 + SWEEP_JITTER) + step
        assert len(sweeps_at) >= 3
        for filters in node.ec2.sweeps:
            assert {"Name": "vpc-id", "Values": [VPC]} in filters
            assert {"Name": "tag:cluster.k8s.amazonaws.com/name", "Values": ["prod"]} in filters
        assert node.pool.ec2_reads[READ_LEAK_SWEEP] == len(sweeps_at)
    assert len(firsts) == 3  # nodes started together sweep at different times


def test_no_cluster_name_no_sweep_call(tmp_path):
    node = Node(tmp_path)
    node.settle()
    for _ in range(int(2 * 3600 / TICK)):
        node.tick()
    assert node.ec2.sweeps == []
    assert READ_LEAK_SWEEP not in node.pool.ec2_reads
    assert sum("CLUSTER_NAME is not set" in msg for _, msg in node.log.lines) == 1


@pytest.mark.parametrize("seed_a, seed_b", [("i-0123456789abcdef0", "i-0123456789abcdef1")])
def test_nodes_read_on_different_jittered_intervals(tmp_path, seed_a, seed_b):
    ends = []
    for iid in (seed_a, seed_b):
        node = Node(tmp_path, instance_id=iid)
        node.settle()
        before = node.describes()
        while node.describes() == before:
            node.tick()
        ends.append(node.clock.now)
    assert ends[0] != ends[1]
