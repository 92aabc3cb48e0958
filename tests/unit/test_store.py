"""The state store under real concurrency and real crashes (ARCHITECTURE §6)."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings, strategies as st

from cnicore.pool import Pool, PoolExhausted, new_document
from cnicore.store import Store, StoreError
from support.paths import ROOT



def seed(data_dir, n_ips, network="net"):
    store = Store(str(data_dir), network)
    with store.locked() as tx:
        pool = Pool(new_document({"instance_id": "i-1"}), time.time(), cooldown=0)
        pool.put_eni("eni-a", mac="02:00:00:00:00:01", device_number=0, subnet_cidr="10.1.0.0/16",
                     primary_ip="10.1.0.10", primary=True, attached_at=0)
        pool.set_secondary_ips("eni-a", [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(n_ips)])
        tx.write(pool.doc)
    return store


# One worker process: a burst of allocate/hold/release cycles, each hold recorded as a time interval
# measured inside the moment the IP was really held (after the assign committed, before the release).
WORKER = textwrap.dedent("""
    import json, sys, time
    from cnicore.pool import Pool
    from cnicore.store import Store
    data_dir, cid, cycles, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    store = Store(data_dir, "net")
    while time.time() < start_at:
        time.sleep(0.001)
    held = []
    for i in range(cycles):
        with store.locked() as tx:
            pool = Pool(tx.read(), time.time(), cooldown=0)
            got = pool.assign(cid, "eth0")
            tx.write(pool.doc)
        t0 = time.monotonic()
        time.sleep(0.001)
        t1 = time.monotonic()
        with store.locked() as tx:
            pool = Pool(tx.read(), time.time(), cooldown=0)
            assert pool.release(cid, "eth0") == got.ip
            tx.write(pool.doc)
        held.append((got.ip, t0, t1))
    print(json.dumps(held))
""")


def test_many_processes_never_share_an_ip(tmp_path):
    workers, cycles = 120, 5
    store = seed(tmp_path, 130)  # fewer IPs than holders over time, so IPs are reused between processes
    start_at = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), f"c{i}", str(cycles), str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(workers)]
    intervals = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        intervals += [(ip, t0, t1, i) for ip, t0, t1 in json.loads(out)]
    assert len(intervals) == workers * cycles
    by_ip = {}
    for ip, t0, t1, owner in intervals:
        by_ip.setdefault(ip, []).append((t0, t1, owner))
    for ip, spans in by_ip.items():
        spans.sort()
        for (a0, a1, oa), (b0, b1, ob) in zip(spans, spans[1:]):
            assert b0 >= a1, f"{ip} held by worker {oa} and worker {ob} at the same time"
    with store.locked() as tx:
        assert Pool(tx.read(), time.time()).attachments() == []


def test_concurrent_holders_get_distinct_ips(tmp_path):
    """All workers hold their IP at the same moment: 110 distinct IPs out of 110."""
    store = seed(tmp_path, 110)
    start_at = time.time() + 2.0
    script = textwrap.dedent("""
        import sys, time
        from cnicore.pool import Pool
        from cnicore.store import Store
        store = Store(sys.argv[1], "net")
        while time.time() < float(sys.argv[3]):
            time.sleep(0.001)
        with store.locked() as tx:
            pool = Pool(tx.read(), time.time())
            got = pool.assign(sys.argv[2], "eth0")
            tx.write(pool.doc)
        print(got.ip)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"c{i}", str(start_at)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT) for i in range(110)]
    ips = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(ips)) == 110
    with store.locked() as tx:
        held = {ip: cid for cid, _, ip in Pool(tx.read(), time.time()).attachments()}
    assert sorted(held) == sorted(ips) and len(set(held.values())) == 110


WRITER = textwrap.dedent("""
    import sys
    from cnicore.store import Store
    store = Store(sys.argv[1], "net")
    n = 0
    while True:
        n += 1
        with store.locked() as tx:
            tx.write({"counter": n, "padding": ["x" * 64] * (n % 400)})
        print(n, flush=True)
""")


def test_sigkill_at_any_point_leaves_old_or_new_state(tmp_path):
    """Kill a busy writer at random moments; the file always parses and holds a committed counter."""
    rng = random.Random(1234)
    store = Store(str(tmp_path), "net")
    last_seen = 0
    for _ in range(40):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
        proc.stdout.readline()  # it is writing now
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        printed = [int(line) for line in proc.stdout.read().split()]
        proc.wait()
        proc.stdout.close()
        with store.locked() as tx:
            doc = tx.read()
        committed = printed[-1] if printed else None
        # the writer prints after each commit: the file holds that one or the next (killed after rename)
        assert doc["counter"] >= 1
        if committed is not None:
            assert doc["counter"] in (committed, committed + 1)
        assert len(doc["padding"]) == doc["counter"] % 400
        last_seen = doc["counter"]
        with store.locked() as tx:
            tx.write({"counter": 0, "padding": []})  # also clears the dead writer's temp file
    assert last_seen > 0
    assert [n for n in os.listdir(tmp_path) if ".tmp." in n] == []


def test_corrupt_file_is_an_error_and_is_left_alone(tmp_path):
    store = seed(tmp_path, 3)
    with open(store.path, "w") as f:
        f.write('{"schema": 1, "network": "net", "enis": {')
    with pytest.raises(StoreError) as exc:
        with store.locked() as tx:
            tx.read()
    assert exc.value.code == 100 and store.path in exc.value.msg and "corrupt" in exc.value.msg
    with open(store.path) as f:
        assert f.read().endswith('"enis": {')


def test_a_schema_1_document_is_read_and_written_back_as_schema_2_with_prefixes(tmp_path):
    """A node upgraded from a bundle before prefix delegation keeps its pool and its pods."""
    store = Store(str(tmp_path), "net")
    old = {"schema": 1, "network": "net", "node": {}, "agent": {}, "enis": {"eni-a": {
        "mac": "02:00:00:00:00:01", "device_number": 0, "subnet_cidr": "10.0.0.0/24", "primary_ip": "10.0.0.10",
        "primary": True, "attached_at": 0, "ips": {"10.0.0.20": {"state": "assigned", "container_id": "c1",
                                                                  "ifname": "eth0", "pod_namespace": "",
                                                                  "pod_name": "", "since": 0}}}}}
    with open(store.path, "w") as f:
        json.dump(old, f)
    with store.locked() as tx:
        doc = tx.read()
        pool = Pool(doc, time.time(), 0)
        assert pool.find("c1", "eth0").ip == "10.0.0.20"
        pool.set_secondary_ips("eni-a", ["10.0.0.20"], ["10.0.0.32/28"])
        assert pool.assign("c2", "eth0", prefixes=True).ip == "10.0.0.32"
        tx.write(doc)
    with open(store.path) as f:
        written = json.load(f)
    assert written["schema"] == 2 and written["enis"]["eni-a"]["prefixes"] == ["10.0.0.32/28"]
    assert len(written["enis"]["eni-a"]["ips"]) == 17


def test_the_node_facts_are_written_first_and_read_without_the_enis(tmp_path):
    """read_head parses the envelope and the node facts, which the store writes first; a document of
    an earlier release (keys sorted: the ENIs before the node) is read whole, with the same answer."""
    store = seed(tmp_path, 700)
    with store.locked(shared=True) as tx:
        full, head = tx.read(), tx.read_head()
    with open(store.path) as f:
        assert f.read().startswith('{"network":"net","node":{"instance_id":"i-1"},"schema":2,')
    assert head == {"network": "net", "node": {"instance_id": "i-1"}, "schema": 2} and full["node"] == head["node"]
    with open(store.path, "w") as f:
        json.dump(full, f, sort_keys=True)  # as the release before wrote it
    with store.locked(shared=True) as tx:
        assert tx.read_head() == head
    with open(store.path, "w") as f:
        f.write('{"schema": 2, "network": "other", "node": {}}')
    with pytest.raises(StoreError, match="network 'net'"):
        with store.locked(shared=True) as tx:
            tx.read_head()
    os.unlink(store.path)
    with store.locked(shared=True) as tx:
        assert tx.read_head() is None


@pytest.mark.parametrize("content", ['[]', '{"schema": 99, "network": "net"}', '{"schema": 3, "network": "net"}',
                                     '{"schema": 1, "network": "other"}'])
def test_wrong_schema_or_network_is_an_error(tmp_path, content):
    store = Store(str(tmp_path), "net")
    os.makedirs(tmp_path, exist_ok=True)
    with open(store.path, "w") as f:
        f.write(content)
    with pytest.raises(StoreError):
        with store.locked() as tx:
            tx.read()


def test_set_aside_keeps_the_bad_file(tmp_path):
    store = seed(tmp_path, 3)
    with open(store.path, "w") as f:
        f.write("garbage")
    with store.locked() as tx:
        aside = store.set_aside()
        assert tx.read() is None
    with open(aside) as f:
        assert f.read() == "garbage"


def test_files_are_private(tmp_path):
    data_dir = tmp_path / "state"
    store = seed(data_dir, 3)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.lock_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700


@pytest.mark.parametrize("network", ["", "../x", "a/b", ".hidden", "x y"])
def test_network_names_cannot_escape_the_data_dir(tmp_path, network):
    with pytest.raises(StoreError):
        Store(str(tmp_path), network)


def test_read_only_transaction_cannot_write(tmp_path):
    store = seed(tmp_path, 1)
    with store.locked(shared=True) as tx:
        with pytest.raises(StoreError):
            tx.write({})


# --- pool logic ----------------------------------------------------------------------------------
def make_pool(now=1000.0, cooldown=30.0):
    pool = Pool(new_document({}), now, cooldown=cooldown)
    pool.put_eni("eni-b", mac="02:00:00:00:00:02", device_number=1, subnet_cidr="10.0.2.0/24",
                 primary_ip="10.0.2.5", primary=False, attached_at=0)
    pool.put_eni("eni-a", mac="02:00:00:00:00:01", device_number=0, subnet_cidr="10.0.1.0/24",
                 primary_ip="10.0.1.5", primary=True, attached_at=0)
    pool.set_secondary_ips("eni-a", ["10.0.1.20", "10.0.1.9"])
    pool.set_secondary_ips("eni-b", ["10.0.2.7"])
    return pool


def test_assign_takes_lowest_device_then_lowest_address():
    pool = make_pool()
    got = [pool.assign(f"c{i}", "eth0") for i in range(3)]
    assert [(g.ip, g.device_number) for g in got] == [("10.0.1.9", 0), ("10.0.1.20", 0), ("10.0.2.7", 1)]
    assert got[2].gateway == "10.0.2.1" and not got[2].primary_eni
    with pytest.raises(PoolExhausted):
        pool.assign("c9", "eth0")


def test_released_ip_cools_down_before_reuse():
    pool = make_pool()
    pool.set_secondary_ips("eni-b", [])
    pool.assign("c1", "eth0")
    pool.assign("c2", "eth0")
    assert pool.release("c1", "eth0") == "10.0.1.9"
    assert pool.release("c1", "eth0") is None
    with pytest.raises(PoolExhausted) as exc:
        pool.assign("c3", "eth0")
    assert exc.value.cooling == 1
    assert [s["cooling"] for s in pool.eni_stats()] == [1, 0]
    pool.now += 30
    assert pool.assign("c3", "eth0").ip == "10.0.1.9"


def test_ips_ec2_no_longer_reports_are_dropped_unless_assigned():
    pool = make_pool()
    pool.assign("c1", "eth0")  # 10.0.1.9
    lost = pool.set_secondary_ips("eni-a", ["10.0.1.30"])
    assert lost == ["10.0.1.9"]
    assert sorted(pool.enis["eni-a"]["ips"]) == ["10.0.1.30", "10.0.1.9"]
    assert pool.find("c1", "eth0").ip == "10.0.1.9"


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="aZ09-_.\n\t /éİ١\x00", max_size=20))
def test_network_name_check_answers_as_its_regular_expression(name):
    import re
    from cnicore import store
    assert store._valid_name(name) == bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name)), name


@pytest.mark.parametrize("name", ["aws-vpc\n", "aws-vpc\n\n", "\n"])
def test_a_network_name_with_a_trailing_newline_is_refused(tmp_path, name):
    """The agent's --network reaches the store without skel's check: "aws-vpc\n" would name a file
    with a newline in it (re.match's "$" matches before a final newline)."""
    with pytest.raises(StoreError):
        Store(str(tmp_path), name)
    assert os.listdir(tmp_path) == []
