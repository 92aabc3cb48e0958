"""The node agent heals the node while it runs (issue 21) and its reconcile races (issue 16 point 5).

Each test drives the real chain through cnitool (or the real IPAM plugin) in a lab node, with the real
agent process (`aws-vpc-cni-agent run`), injects the fault, and waits for agent ticks (events), never
for a wall-clock window. Ticks count only rounds that completed (heal, then the pool's tick).
"""

import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest

from support.labnode import BIN, CNITOOL, NETWORK, ROOT
from support.reliability_world import DOWN, UP, AgentProcess, ChainNode, Pod, assert_clean, check_node, held, wait_until

TICK = 0.3


def ticks_from_now(agent: AgentProcess, rounds: int = 2, timeout: float = 90) -> dict:
    """Wait until the agent has completed `rounds` more rounds than it had now."""
    start = agent.wait_ticks(1)["ticks"]
    return agent.wait_ticks(start + rounds, timeout)


def add(node: ChainNode, pod: Pod) -> None:
    out = node.run("add", pod)
    assert out.ok, out.err + out.out
    pod.state, pod.ip = UP, out.result()["ips"][0]["address"].split("/")[0]


def delete(node: ChainNode, pod: Pod) -> None:
    out = node.run("del", pod)
    assert out.ok, out.err + out.out
    pod.state, pod.ip = DOWN, None


def age_reservations(node: ChainNode, seconds: float) -> None:
    """Make every reservation look `seconds` older (pods that have run for a while)."""
    from cnicore.store import Store
    with Store(node.data_dir, NETWORK).locked() as tx:
        doc = tx.read()
        for eni in doc["enis"].values():
            for entry in eni["ips"].values():
                if entry["state"] == "assigned":
                    entry["since"] -= seconds
        tx.write(doc)


def reachable(node: ChainNode, ip: str, from_host: str = "node2") -> bool:
    return node.probe(node.lab.netns(from_host), "ping", ip, "--timeout", "2")


def agent_log(node: ChainNode) -> str:
    try:
        with open(node.log_file + ".agent") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def cleanup(node: ChainNode, pods, agent: AgentProcess | None) -> None:
    for pod in pods:
        if pod.state != DOWN:
            node.run("del", pod)
            pod.state = DOWN
    if agent is not None:
        agent.kill(signal.SIGTERM)


# --- 1. liveness by the alias, not by the name prefix --------------------------------------------

def test_a_veth_prefix_change_releases_no_running_pod_and_old_pods_still_go_by_del_and_gc(
        fresh_lab, tmp_path, make_netns):
    node = ChainNode(fresh_lab, "node1", tmp_path)
    old = [Pod(f"old{i}", make_netns("old")) for i in range(4)]
    new = [Pod(f"new{i}", make_netns("new")) for i in range(4)]
    agent = None
    try:
        for pod in old:
            add(node, pod)
        age_reservations(node, 1000)  # running for a while: well past any grace for ADDs in flight
        # the DaemonSet rolls with AWS_VPC_K8S_CNI_VETHPREFIX=pod: the agent restarts, the conflist is re-rendered
        node.write_conflist(plugins=("aws-vpc-bridge", "aws-snat", "portmap-compat"),
                            **{"aws-vpc-bridge": {"vethPrefix": "pod"}, "aws-snat": {"vethPrefix": "pod"}})
        agent = AgentProcess(node, TICK, AWS_VPC_K8S_CNI_VETHPREFIX="pod")
        ticks_from_now(agent, 2)
        holders = held(node.store())
        assert {ips[0][0] for ips in holders.values()} == {p.ip for p in old}, holders
        for pod in new:
            add(node, pod)
        assert not {p.ip for p in new} & {p.ip for p in old}
        for pod in old + new:
            assert reachable(node, pod.ip), f"{pod.name} ({pod.ip}) is not reachable from node2"
        ticks_from_now(agent, 2)
        assert len(held(node.store())) == 8
        # DEL of an old-prefix pod under the new conflist; GC of another that the runtime forgot
        delete(node, old[0])
        node.gc(valid=old[2:] + new)
        old[1].state, old[1].ip = DOWN, None
        view = node.view()
        assert old[0].veth not in view.veths and old[1].veth not in view.veths
        assert old[2].veth in view.veths and old[3].veth in view.veths
        assert {ips[0][0] for ips in held(node.store()).values()} == {p.ip for p in old[2:] + new}
    finally:
        cleanup(node, old + new, agent)
    assert_clean(node)


# --- 2. a release a failed DEL could not write ----------------------------------------------------

def test_a_del_that_cannot_write_the_store_is_released_once_space_returns(fresh_lab, tmp_path, make_netns):
    node = ChainNode(fresh_lab, "node1", tmp_path)
    os.makedirs(node.data_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", node.data_dir], check=True)
    pods = [Pod(f"full{i}", make_netns("full")) for i in range(2)]
    agent = None
    filler = os.path.join(node.data_dir, "filler")
    try:
        agent = AgentProcess(node, TICK)
        agent.wait_ticks(1)
        for pod in pods:
            add(node, pod)
        with open(filler, "wb") as f:  # the data dir full
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for pod in pods:
            out = node.run("del", pod)
            assert out.ok, out.err + out.out  # DEL succeeds
            pod.state = DOWN
        assert len(held(node.store())) == 2  # ...yet could not write its release
        os.unlink(filler)
        ticks_from_now(agent, 2)
        assert held(node.store()) == {}
        cleanup(node, pods, agent)
        agent = None
        assert_clean(node)
    finally:
        if os.path.exists(filler):
            os.unlink(filler)
        cleanup(node, pods, agent)
        subprocess.run(["umount", node.data_dir], check=False)


# --- 3. the data path of live pods and the node's rules repaired ----------------------------------

def secondary_pods(node: ChainNode, agent: AgentProcess, pods) -> None:
    """Put `pods` on the node's second ENI: bare reservations fill the primary ENI first."""
    def device_of(ip):
        return next(e["device_number"] for e in node.store()["enis"].values() if ip in e["ips"])
    fills = 0
    while True:
        rc, result = wait_until(lambda: (lambda r: r if r[0] == 0 or r[1]["code"] != 11 else None)(
            node.ipam("ADD", cid=f"fill{fills}")), 60, "the agent to grow the pool")  # 11: growing
        assert rc == 0, result
        fills += 1
        if device_of(result["ips"][0]["address"].split("/")[0]) > 0:
            assert node.ipam("DEL", cid=f"fill{fills - 1}")[0] == 0
            break
    for pod in pods:
        add(node, pod)
        assert device_of(pod.ip) == 1
    for i in range(fills - 1):
        assert node.ipam("DEL", cid=f"fill{i}")[0] == 0


def test_a_flapped_eni_and_rules_deleted_by_hand_are_repaired_within_two_ticks(fresh_lab, tmp_path, make_netns):
    node = ChainNode(fresh_lab, "node1", tmp_path)
    pods = [Pod(f"flap{i}", make_netns("flap")) for i in range(2)]
    agent = None
    try:
        agent = AgentProcess(node, TICK)
        agent.wait_ticks(1)
        secondary_pods(node, agent, pods)
        for pod in pods:
            assert reachable(node, pod.ip)
        table = lambda: fresh_lab.exec("node1", ["ip", "-4", "route", "show", "table", "2"]).stdout  # noqa: E731
        assert "default via" in table()
        fresh_lab.exec("node1", ["sh", "-c", "ip link set eth1 down; ip link set eth1 up"])
        ticks_from_now(agent, 2)
        assert "default via" in table(), table()
        for pod in pods:
            assert reachable(node, pod.ip), f"{pod.name} ({pod.ip}) on eth1 is not reachable after the flap"
        # a pod's rules and the node's SNAT jump, deleted by hand
        fresh_lab.exec("node1", ["ip", "rule", "del", "priority", "512", "to", f"{pods[0].ip}/32"])
        fresh_lab.exec("node1", ["ip", "rule", "del", "priority", "1536", "from", f"{pods[1].ip}/32"])
        variant = "nft" if "AWS SNAT CHAIN" in fresh_lab.exec("node1", ["iptables-nft-save", "-t", "nat"]).stdout \
            else "legacy"
        fresh_lab.exec("node1", [f"iptables-{variant}", "-w", "-t", "nat", "-D", "POSTROUTING", "-m", "comment",
                                 "--comment", "AWS SNAT CHAIN", "-j", "AWS-SNAT-CHAIN-0"])
        ticks_from_now(agent, 2)
        view = node.view()
        assert pods[0].ip in view.rules_to and view.rules_from.get(pods[1].ip) == "2"
        assert "AWS SNAT CHAIN" in fresh_lab.exec("node1", [f"iptables-{variant}-save", "-t", "nat"]).stdout
        for pod in pods:
            assert reachable(node, pod.ip)
    finally:
        cleanup(node, pods, agent)
    assert_clean(node)


# --- 4. a corrupt store rebuilt by the running agent ----------------------------------------------

def test_a_store_corrupted_while_the_agent_runs_is_rebuilt_without_a_restart(fresh_lab, tmp_path, make_netns):
    node = ChainNode(fresh_lab, "node1", tmp_path)
    pods = [Pod(f"torn{i}", make_netns("torn")) for i in range(3)]
    agent = None
    try:
        agent = AgentProcess(node, TICK)
        agent.wait_ticks(1)
        for pod in pods[:2]:
            add(node, pod)
        path = os.path.join(node.data_dir, f"{NETWORK}.json")
        with open(path, "r+") as f:
            f.truncate(os.path.getsize(path) // 2)  # torn
        ticks_from_now(agent, 2)
        assert agent.alive()
        add(node, pods[2])
        assert pods[2].ip not in {pods[0].ip, pods[1].ip}
        holders = held(node.store())
        assert sorted(ips[0][0] for ips in holders.values()) == sorted(p.ip for p in pods)
        assert len([n for n in os.listdir(node.data_dir) if ".corrupt-" in n]) == 1
    finally:
        cleanup(node, pods, agent)
    assert_clean(node)


# --- 5. code 11 says which of limit reached, growing, cooling it is -------------------------------

def test_code_11_says_limit_reached_growing_or_cooling(fresh_lab, tmp_path):
    node = ChainNode(fresh_lab, "node1", tmp_path, plugins=("aws-vpc-bridge",), ipCooldownPeriod=600, maxENI=1)
    agent = AgentProcess(node, TICK, MAX_ENI=1, IP_COOLDOWN_PERIOD=600)
    try:
        agent.wait_ticks(1)
        for i in range(9):  # an m5.large ENI: 9 secondary IPs
            assert node.ipam("ADD", cid=f"lim{i}")[0] == 0
        wait_until(lambda: (agent.status() or {}).get("blocked"), 60, "the agent to see the limit")
        rc, err = node.ipam("ADD", cid="over")
        assert rc != 0 and err["code"] == 11, err
        assert "MAX_ENI=1 reached" in err["msg"] and "cannot grow" in err["msg"], err
        assert "grow the pool" not in err.get("details", "") and "cooling" not in err["msg"], err
        assert node.ipam("DEL", cid="lim0")[0] == 0
        rc, err = node.ipam("ADD", cid="over")
        assert err["code"] == 11 and "cannot grow" in err["msg"], err
        assert "1 released IP is cooling down (the first is free again in" in err["msg"], err
    finally:
        agent.kill(signal.SIGTERM)
        for i in range(9):
            node.ipam("DEL", cid=f"lim{i}")
    # the pool is short and EC2 slow to attach an ENI: growing
    node = ChainNode(fresh_lab, "node2", tmp_path, plugins=("aws-vpc-bridge",))
    fresh_lab.fault("AttachNetworkInterface", latency=8.0)
    agent = AgentProcess(node, TICK)
    try:
        agent.wait_ticks(1)
        errors = []
        for i in range(12):
            rc, answer = node.ipam("ADD", cid=f"grow{i}")
            if rc != 0:
                errors.append(answer)
                break
        assert errors and errors[0]["code"] == 11, errors
        assert "being grown" in errors[0]["msg"] and errors[0]["details"] == "the node agent was asked to grow the pool"
    finally:
        agent.kill(signal.SIGTERM)
        fresh_lab.clear_faults()
        for i in range(12):
            node.ipam("DEL", cid=f"grow{i}")


# --- 6. issue 16 point 5: the reconcile races and the agent lock -----------------------------------

RACE_SCRIPT = r"""
import json, os, subprocess, sys
from cnicore import settings, veths
from cnicore.log import Logger
from aws_vpc_cni_agent.loop import Agent

listing = veths.list_host_veths

def list_then_del(prefix):
    found = listing(prefix)  # the pod is alive in this listing...
    subprocess.run(json.loads(os.environ["DEL_ARGV"]), check=True, env=json.loads(os.environ["DEL_ENV"]))
    return found  # ...and its DEL has completed before the agent applies it

veths.list_host_veths = list_then_del
cfg = settings.from_env(os.environ)
agent = Agent(cfg, "aws-vpc", Logger("race", os.environ["LOG"], "DEBUG"), 1.0)
getattr(agent, os.environ["STEP"])()
"""


@pytest.mark.parametrize("step", ["reconcile", "_repair_data_path"])
def test_a_del_completing_while_the_agent_reconciles_is_not_undone(fresh_lab, tmp_path, make_netns, step):
    """The agent lists the host, then a DEL completes, then the agent applies the listing: the IP
    the DEL released must not be re-reserved for the gone pod (reconcile), and the rules the DEL
    removed must not be put back for it (the data-path repair)."""
    node = ChainNode(fresh_lab, "node1", tmp_path)
    pods = [Pod(f"race{i}", make_netns("race")) for i in range(2)]
    try:
        for pod in pods:
            add(node, pod)
        argv = fresh_lab.exec_argv("node1", [CNITOOL, "del", NETWORK, pods[0].path])
        env = {"DEL_ARGV": json.dumps(argv), "DEL_ENV": json.dumps(node.env(pods[0])), "LOG": node.log_file + ".race",
               "STEP": step, "AWS_VPC_CNI_DATA_DIR": node.data_dir, "IP_COOLDOWN_PERIOD": "0",
               "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)}
        proc = fresh_lab.exec("node1", [sys.executable, "-c", RACE_SCRIPT], env=env, check=False, timeout=120)
        assert proc.returncode == 0, proc.stderr
        pods[0].state, pods[0].ip = DOWN, None
        holders = held(node.store())
        assert {ips[0][0] for ips in holders.values()} == {pods[1].ip}, holders
        check_node(node, pods)  # no rule for the gone pod's IP
    finally:
        cleanup(node, pods, None)
    assert_clean(node)


# An IPAM plugin whose ADD holds its answer until told to go on: its caller (the main plugin of the
# ADD) is then stopped right after the IP was reserved and before the pod's veth exists.
HELD_IPAM = """#!/bin/sh
[ "$CNI_COMMAND" = ADD ] || exec {ipam}
answer=$({ipam}); rc=$?
: > {dir}/reserved
read go < {dir}/go
printf '%s' "$answer"
exit $rc
"""

ADD_RACE_SCRIPT = r"""
import os, time
from cnicore import settings, veths
from cnicore.log import Logger
from aws_vpc_cni_agent.loop import Agent

listing = veths.list_host_veths

def ended(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True

def list_then_finish_the_add(prefix):
    found = listing(prefix)  # the ADD's veth does not exist yet in this listing...
    with open(os.environ["GO"], "w") as go:
        go.write("go\n")
    while not ended(int(os.environ["ADD_PID"])):
        time.sleep(0.01)
    return found  # ...and the ADD has completed (veth made, its processes gone) before it is applied

veths.list_host_veths = list_then_finish_the_add
cfg = settings.from_env(os.environ)
agent = Agent(cfg, "aws-vpc", Logger("race", os.environ["LOG"], "DEBUG"), 1.0)
agent.converge_attachments()
"""


def test_an_add_completing_while_the_agent_lists_the_host_keeps_its_ip(fresh_lab, tmp_path, make_netns):
    """The agent reads the store (the IP reserved), lists the host before the ADD made the veth, and
    the ADD completes before the agent applies the listing: its IP must stay the pod's (released,
    it would be handed to the next pod while this one uses it)."""
    held_dir = tmp_path / "held"
    held_dir.mkdir()
    os.mkfifo(held_dir / "go")
    (held_dir / "aws-eni-ipam").write_text(HELD_IPAM.format(ipam=os.path.join(BIN, "aws-eni-ipam"), dir=held_dir))
    (held_dir / "aws-eni-ipam").chmod(0o755)
    node = ChainNode(fresh_lab, "node1", tmp_path, plugins=("aws-vpc-bridge",), cni_path_first=str(held_dir))
    pod = Pod("addrace", make_netns("race"))
    argv = fresh_lab.exec_argv("node1", [CNITOOL, "add", NETWORK, pod.path])
    proc = subprocess.Popen(argv, env=node.env(pod), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: (held_dir / "reserved").exists() or proc.poll() is not None, 60, "the IP reserved")
        assert proc.poll() is None, proc.communicate()
        env = {"GO": str(held_dir / "go"), "ADD_PID": str(proc.pid), "LOG": node.log_file + ".race",
               "AWS_VPC_CNI_DATA_DIR": node.data_dir, "PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)}
        race = fresh_lab.exec("node1", [sys.executable, "-c", ADD_RACE_SCRIPT], env=env, check=False, timeout=120)
        assert race.returncode == 0, race.stderr
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        pod.state, pod.ip = UP, json.loads(out)["ips"][0]["address"].split("/")[0]
        holders = held(node.store())
        assert list(holders) == [(pod.cid, "eth0")] and holders[(pod.cid, "eth0")][0][0] == pod.ip, holders
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        cleanup(node, [pod], None)
    assert_clean(node)


def test_an_add_in_flight_longer_than_the_grace_keeps_its_ip(fresh_lab, tmp_path):
    """A reservation without its veth whose ADD's main plugin still runs (here: stopped in a shell that
    sleeps after its IPAM call) is an ADD in flight, however old; once that process is gone, it goes."""
    node = ChainNode(fresh_lab, "node1", tmp_path)
    conf = tmp_path / "ipam.json"
    conf.write_text(json.dumps(node.ipam_conf()))
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "inflight", "CNI_NETNS": "/var/run/netns/none",
               "CNI_IFNAME": "eth0", "CNI_PATH": BIN, "CNI_ARGS": "IgnoreUnknown=1"}
    main_plugin = subprocess.Popen(fresh_lab.exec_argv("node1", [
        "sh", "-c", f"{os.path.join(BIN, 'aws-eni-ipam')} < {conf} > {tmp_path / 'ipam.out'}; echo done; exec sleep 600"]),
        env=fresh_lab.exec_env("node1", environ), stdout=subprocess.PIPE, text=True, start_new_session=True)
    agent = None
    try:
        assert main_plugin.stdout.readline().strip() == "done"
        assert json.loads((tmp_path / "ipam.out").read_text())["ips"]
        age_reservations(node, 1000)  # in flight far longer than ADD_GRACE
        agent = AgentProcess(node, TICK)
        ticks_from_now(agent, 2)
        assert list(held(node.store())) == [("inflight", "eth0")]
        os.killpg(main_plugin.pid, signal.SIGKILL)
        main_plugin.wait(30)
        ticks_from_now(agent, 2)
        assert held(node.store()) == {}
    finally:
        if main_plugin.poll() is None:
            os.killpg(main_plugin.pid, signal.SIGKILL)
            main_plugin.wait(30)
        main_plugin.stdout.close()
        if agent is not None:
            agent.kill(signal.SIGTERM)
        node.ipam("DEL", cid="inflight")


def test_a_plugin_probing_the_agent_lock_does_not_stop_an_agent_from_starting(fresh_lab, tmp_path):
    node = ChainNode(fresh_lab, "node1", tmp_path)
    os.makedirs(node.data_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(node.data_dir, "agent.lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    agent = second = None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a plugin's agent_running() probe, caught mid-way
        agent = AgentProcess(node, TICK)
        wait_until(lambda: not agent.alive() or "held shared" in agent_log(node), 60, "the agent to meet the probe")
        assert agent.alive(), "the agent gave up: it took a plugin's probe for another agent"
        fcntl.flock(fd, fcntl.LOCK_UN)
        agent.wait_ticks(1)
        second = subprocess.run(fresh_lab.exec_argv("node1", [os.path.join(BIN, "aws-vpc-cni-agent"), "run",
                                                              "--metrics-address", ""]),
                                env=fresh_lab.exec_env("node1", {"AWS_VPC_CNI_DATA_DIR": node.data_dir}),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "another node agent is running" in second.stderr
    finally:
        os.close(fd)
        if agent is not None:
            agent.kill(signal.SIGTERM)
