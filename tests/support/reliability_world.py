"""What tests/lab/test_reliability.py builds on: the whole chain run through cnitool in a lab node, killed
on request; a snapshot of what the node holds; the invariants that must hold after any kill; GC as
libcni runs it; the agent as a process that can be SIGKILLed at any instant; EC2's view against the
store.

Pod model (what a runtime knows of a sandbox):
    UP     its last ADD succeeded: it must be attached as the result said
    DOWN   its last DEL (or a GC that did not list it) succeeded: nothing of it may remain
    DIRTY  its last ADD or DEL was killed: anything of it may remain, to be reclaimed by the next
           DEL of that attachment or by a GC that does not list it
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from support.labnode import BIN, CNITOOL, NETWORK, PREFIX, REFERENCE_PLUGINS, LabNode, NodeView, cnitool_container_id

from cnicore.veths import Attachment, host_veth_name

UP, DOWN, DIRTY = "up", "down", "dirty"
FULL_CHAIN = ("aws-vpc-bridge", "aws-snat", "portmap-compat")
LIBCNI_DIR = "/var/lib/cni"  # libcni's cache dir (cnitool sets none of its own)
BRIDGE_ONLY = ("aws-vpc-bridge",)


@dataclass
class Pod:
    name: str           # K8S_POD_NAME (namespace "default")
    netns: str          # namespace name
    port: int | None = None  # a hostPort mapped to it (portmap-compat), if any
    state: str = DOWN
    ip: str | None = None
    history: list = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def cid(self) -> str:
        return cnitool_container_id(self.path)

    @property
    def veth(self) -> str:
        return host_veth_name(PREFIX, pod_namespace="default", pod_name=self.name)

    @property
    def cap_args(self):
        if self.port is None:
            return None
        return {"portMappings": [{"hostPort": self.port, "containerPort": 80, "protocol": "tcp"}]}


@dataclass
class Outcome:
    rc: int | None
    out: str
    err: str
    killed: str | None   # None, "group" or the plugin killed
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.killed

    def result(self) -> dict:
        return json.loads(self.out)

    def error(self) -> dict | None:
        try:
            return json.loads(self.out)
        except ValueError:
            return None


# --------------------------------------------------------------------------------------------------
# Processes


def group_members(pgid: int) -> list[tuple[int, list[str]]]:
    """Live processes of a process group, with their command lines."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] in "ZX":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue
        found.append((int(entry), argv))
    return found


def wait_group_gone(pgid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of group {pgid} still run after {timeout} s: {group_members(pgid)}")
        time.sleep(0.01)


def _is_plugin(argv: list[str], plugin: str) -> bool:
    return any(a == plugin or a.endswith("/" + plugin) for a in argv[:2])


# --------------------------------------------------------------------------------------------------
# A node driven through cnitool


class ChainNode(LabNode):
    """A LabNode whose cnitool runs can be SIGKILLed (the whole process group, or one plugin)."""

    def __init__(self, lab, node, tmp_path, plugins=FULL_CHAIN, cni_path_first=None, **ipam_settings):
        super().__init__(lab, node, tmp_path, **ipam_settings)
        self.write_conflist(plugins=plugins)
        self.cni_path = ":".join(p for p in (cni_path_first, BIN, REFERENCE_PLUGINS) if p)
        # libcni's cache (/var/lib/cni) of this node's cnitool runs: the test's own dir, bound over
        # /var/lib/cni in a mount namespace of each run, so no run touches the machine's cache
        self.cni_cache = str(tmp_path / f"{node}-cni-cache")
        os.makedirs(self.cni_cache, exist_ok=True)
        os.makedirs(LIBCNI_DIR, exist_ok=True)

    def env(self, pod: Pod, extra: dict | None = None) -> dict:
        env = {"NETCONFPATH": self.conf_dir, "CNI_PATH": self.cni_path,
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.name}"}
        if pod.cap_args is not None:
            env["CAP_ARGS"] = json.dumps(pod.cap_args)
        env.update(extra or {})
        return self.lab.exec_env(self.node, env)

    def run(self, command: str, pod: Pod, kill=None, env: dict | None = None, timeout: float = 120) -> Outcome:
        """cnitool COMMAND for the pod. `kill`: None, ("group", delay) or ("plugin", name, delay):
        SIGKILL every process of the run after `delay` s, or only the named plugin's process `delay`
        s after it starts (its children, e.g. the IPAM plugin, live on)."""
        if command.upper() == "DEL":
            self._drop_torn_cache(pod)
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind "$0" {LIBCNI_DIR} && exec "$@"', self.cni_cache,
                *self.lab.exec_argv(self.node, [CNITOOL, command, NETWORK, pod.path])]
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=self.env(pod, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        killed = None
        try:
            if kill is not None and kill[0] == "group":
                try:
                    proc.wait(timeout=kill[1])
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = "group"
            elif kill is not None:
                killed = self._kill_plugin(proc, kill[1], kill[2])
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        wait_group_gone(proc.pid)
        return Outcome(proc.returncode, out, err, killed, time.monotonic() - started)

    def cached_result_path(self, pod: Pod) -> str:
        """libcni's cached ADD result of the pod's attachment."""
        return os.path.join(self.cni_cache, "results", f"{NETWORK}-{pod.cid}-eth0")

    def _drop_torn_cache(self, pod: Pod) -> None:
        """libcni writes its cached result in place (os.WriteFile), so a cnitool killed while writing
        it leaves a torn file, and every later DEL of that attachment fails to decode it ("unexpected
        end of JSON input") before any plugin runs. A runtime in that state has lost its cache; remove
        the torn entry as it would. Only a killed run (the pod is DIRTY) may leave one."""
        path = self.cached_result_path(pod)
        try:
            with open(path) as f:
                json.load(f)
        except FileNotFoundError:
            return
        except ValueError:
            assert pod.state == DIRTY, f"libcni's cached result of {pod.name} is torn, but no run of it was killed"
            os.unlink(path)

    @staticmethod
    def _kill_plugin(proc: subprocess.Popen, plugin: str, delay: float) -> str | None:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            target = next((pid for pid, argv in group_members(proc.pid) if _is_plugin(argv, plugin)), None)
            if target is not None:
                time.sleep(delay)
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    return None
                return plugin
            time.sleep(0.002)
        return None

    def gc(self, valid: list[Pod], also: tuple[str, ...] = ()) -> None:
        """GC over the chain as libcni runs it: every plugin, cniVersion 1.1.0, the valid attachments
        (the pods' and the container IDs in `also`, interface eth0)."""
        attachments = [{"containerID": cid, "ifname": "eth0"} for cid in [p.cid for p in valid] + list(also)]
        for plugin in self.conflist["plugins"]:
            conf = dict(plugin, name=NETWORK, cniVersion="1.1.0", **{"cni.dev/valid-attachments": attachments})
            rc, answer = self.plugin(plugin["type"], "GC", conf, cid="", netns="", ifname="",
                                     env={"CNI_PATH": self.cni_path})
            assert rc == 0 and answer is None, f"{plugin['type']} GC: {answer}"

    # --- what the node holds ------------------------------------------------------------------
    def store_bytes(self) -> int:
        return os.path.getsize(os.path.join(self.data_dir, f"{NETWORK}.json"))

    def pod_links(self, pod: Pod) -> list[str]:
        """Interface names in the pod's netns ([] if the netns is gone)."""
        proc = subprocess.run(["ip", "-n", pod.netns, "-j", "link", "show"], capture_output=True, text=True)
        if proc.returncode != 0:
            return []
        return [link["ifname"] for link in json.loads(proc.stdout or "[]") if link["ifname"] != "lo"]


def _suppress():
    import contextlib
    return contextlib.suppress(ProcessLookupError, PermissionError)


# --------------------------------------------------------------------------------------------------
# The node's state


def dnat_chain(cid: str) -> str:
    return "CNI-DN-" + hashlib.sha512((NETWORK + cid).encode()).hexdigest()[:21]


def held(doc: dict | None) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(container ID, ifname) -> [(ip, eni_id)] of every assigned IP; asserts no IP is under two ENIs."""
    out: dict = {}
    seen: dict[str, str] = {}
    for eni_id, eni in (doc or {}).get("enis", {}).items():
        for ip, entry in eni["ips"].items():
            assert ip not in seen, f"{ip} is listed under {seen[ip]} and {eni_id}"
            seen[ip] = eni_id
            if entry["state"] == "assigned":
                out.setdefault((entry["container_id"], entry["ifname"]), []).append((ip, eni_id))
    return out


def check_node(node: ChainNode, pods: list[Pod], *, pod_side: list[Pod] = (), ipam_only: tuple[str, ...] = ()) -> NodeView:
    """The invariants that hold after any kill (see the module doc); returns the view checked.
    `ipam_only`: container IDs that hold an IP through the IPAM plugin alone (no data path)."""
    doc = node.store()
    view = node.view()
    holders = held(doc)
    by_cid = {p.cid: p for p in pods}
    problems = []
    ip_holder = {}
    for att, ips in holders.items():
        if len(ips) != 1:
            problems.append(f"{att} holds {len(ips)} IPs: {ips}")
        pod = by_cid.get(att[0])
        if att[0] in ipam_only:
            pass
        elif pod is None:
            problems.append(f"{att} holds {ips} but is no pod of the test")
        elif pod.state == DOWN:
            problems.append(f"{pod.name} ({pod.state}) still holds {ips}")
        for ip, eni in ips:
            ip_holder[ip] = (att, eni)
    names = {p.veth: p for p in pods}
    for name, alias in view.veths.items():
        att = Attachment.from_alias(alias)
        pod = by_cid.get(att.container_id) if att else names.get(name)
        if pod is None:
            problems.append(f"veth {name} (alias {alias!r}) belongs to no pod of the test")
        elif pod.state == DOWN:
            problems.append(f"veth {name} (alias {alias!r}) of {pod.name}, which is {pod.state}")
        elif att is None and pod.state == UP:
            problems.append(f"veth {name} of {pod.name} ({pod.state}) has no alias")
    for ip, dev in view.routes.items():
        att = Attachment.from_alias(view.veths.get(dev))
        holder = ip_holder.get(ip)
        if att is None or holder is None or holder[0] != (att.container_id, att.ifname):
            problems.append(f"route {ip} dev {dev} ({att}) but the store has {ip} held by {holder}")
    for ip in view.rules_to | set(view.rules_from):
        if ip not in ip_holder:
            problems.append(f"a rule for {ip}, which no attachment holds")
    for cid, chain in view.dnat_entries.items():
        pod = by_cid.get(cid)
        if pod is None or pod.state == DOWN:
            problems.append(f"DNAT entry for {cid} ({pod.name if pod else 'unknown'}, {pod.state if pod else '-'})")
    for chain in view.dnat_chains:
        owners = [p for p in pods if dnat_chain(p.cid) == chain]
        if not owners or owners[0].state == DOWN:
            problems.append(f"chain {chain} of {owners[0].name + ' (down)' if owners else 'no pod'}")
    enis = (doc or {}).get("enis", {})
    for pod in pods:
        if pod.state == UP:
            ips = holders.get((pod.cid, "eth0"), [])
            if [ip for ip, _ in ips] != [pod.ip]:
                problems.append(f"{pod.name} (up, {pod.ip}): the store holds {ips} for it")
                continue
            eni = enis[ips[0][1]]
            if Attachment.from_alias(view.veths.get(pod.veth)) != Attachment(NETWORK, pod.cid, "eth0"):
                problems.append(f"{pod.name} (up): veth {pod.veth} is {view.veths.get(pod.veth, 'missing')!r}")
            if view.routes.get(pod.ip) != pod.veth:
                problems.append(f"{pod.name} (up): route {pod.ip} dev {view.routes.get(pod.ip)}")
            if pod.ip not in view.rules_to:
                problems.append(f"{pod.name} (up): no rule 512 to {pod.ip}")
            want_table = None if eni["primary"] else str(eni["device_number"] + 1)
            if view.rules_from.get(pod.ip) != want_table:
                problems.append(f"{pod.name} (up): rule 1536 table {view.rules_from.get(pod.ip)}, want {want_table}")
            if pod.port is not None and view.dnat_entries.get(pod.cid) != dnat_chain(pod.cid):
                problems.append(f"{pod.name} (up): no DNAT entry for its hostPort {pod.port}")
        elif pod.state == DOWN:
            if pod.veth in view.veths:
                problems.append(f"{pod.name} (down): veth {pod.veth} remains")
    for pod in pod_side:
        if pod.state == DOWN and pod.ip is None:
            left = node.pod_links(pod)
            if left:
                problems.append(f"{pod.name} (down): {left} remain in its netns")
    assert not problems, "\n".join(problems)
    return view


def check_store_within_ec2(node: ChainNode) -> None:
    """Every IP the store lists (free, cooling or assigned) is held by that ENI in EC2."""
    doc = node.store() or {"enis": {}}
    ec2 = node.ec2_enis()
    for eni_id, eni in doc["enis"].items():
        assert eni_id in ec2, f"the store lists {eni_id}, which EC2 does not attach to {node.node}"
        extra = set(eni["ips"]) - set(ec2[eni_id][1])
        assert not extra, f"the store lists {sorted(extra)} on {eni_id}; EC2 does not"


# --------------------------------------------------------------------------------------------------
# The agent as a process


class AgentProcess:
    """aws-vpc-cni-agent run in a node, started without waiting, SIGKILLable at any instant."""

    def __init__(self, node: LabNode, interval: float = 0.3, exe: str | None = None, **env):
        environ = node.lab.exec_env(node.node, {"AWS_VPC_CNI_DATA_DIR": node.data_dir, "IP_COOLDOWN_PERIOD": "0",
                                                "AWS_VPC_K8S_CNI_LOG_FILE": node.log_file + ".agent",
                                                **{k: str(v) for k, v in env.items()}})
        argv = node.lab.exec_argv(node.node, [exe or os.path.join(BIN, "aws-vpc-cni-agent"), "run", "--interval",
                                              str(interval), "--metrics-address", ""])
        self.node = node
        self.proc = subprocess.Popen(argv, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def status(self) -> dict | None:
        try:
            return self.node.agent_status()
        except (subprocess.CalledProcessError, ValueError):
            return None

    def wait_ticks(self, ticks: int = 1, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the agent exited"
            status = self.status()
            if status and status["ticks"] >= ticks:
                return status
            time.sleep(0.1)
        raise AssertionError(f"the agent did not complete {ticks} ticks in {timeout} s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with _suppress():
                os.killpg(self.pid, sig)
        self.proc.wait(30)
        wait_group_gone(self.pid)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def seeded_rng(name: str) -> random.Random:
    """A generator whose seed is printed, so a failing run can be replayed (RELIABILITY_SEED=...)."""
    seed = int(os.environ.get("RELIABILITY_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"{name}: RELIABILITY_SEED={seed}", file=sys.stderr)
    return random.Random(seed)


def _flocked(path: str) -> bool:
    """Whether a process holds an flock on the file (gone counts as held: its writer renamed it)."""
    import fcntl
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def assert_clean(node: ChainNode) -> NodeView:
    """Nothing of any pod is left on the node, the store holds no IP for anyone, and no node-wide
    rule is there twice."""
    view = node.view()
    assert view.pod_leftovers() == [], f"left on {node.node}: {view.pod_leftovers()}"
    assert held(node.store()) == {}, f"the store of {node.node} still holds {held(node.store())}"
    duplicates = sorted({line for line in view.nat_rules if view.nat_rules.count(line) > 1})
    assert not duplicates, f"nat rules present twice on {node.node}: {duplicates}"
    # a temp file its writer holds (flocked: cnicore.fsutil) is a write in flight (the agent's)
    temps = [name for name in os.listdir(node.data_dir) if ".tmp." in name
             and not _flocked(os.path.join(node.data_dir, name))]
    assert not temps, f"temporary files of killed writers remain in {node.data_dir}: {temps}"
    return view


def ec2_enis_full(lab, instance_id: str | None = None) -> list[dict]:
    """DescribeNetworkInterfaces as EC2 answers it (all, or those attached to one instance)."""
    params = {}
    if instance_id:
        params["Filters"] = [{"Name": "attachment.instance-id", "Values": [instance_id]}]
    return lab.ec2("DescribeNetworkInterfaces", **params)["NetworkInterfaces"]


def leaked_enis(lab, instance_id: str) -> list[dict]:
    """ENIs this node's CNI created that are attached to nothing."""
    return [e for e in ec2_enis_full(lab) if e.get("Status") == "available"
            and any(t["Key"] == "node.k8s.amazonaws.com/instance_id" and t["Value"] == instance_id
                    for t in e.get("TagSet") or [])]


def store_vs_ec2(node: LabNode) -> tuple[dict, dict]:
    """({eni: set(ips)} of the store, {eni: set(ips)} of EC2) for the node's attached ENIs."""
    with open(os.path.join(node.data_dir, f"{NETWORK}.json")) as f:
        doc = json.load(f)
    store = {eni_id: set(eni["ips"]) for eni_id, eni in doc["enis"].items()}
    ec2 = {eni_id: set(ips) for eni_id, (_, ips) in node.ec2_enis().items()}
    return store, ec2


def check_store_agrees_with_ec2(node: LabNode, exact: bool) -> None:
    """The store never lists an ENI or an IP that EC2 does not attach to the node (else a pod could get
    an address the VPC does not deliver to it). EC2 may list more while the agent is between an EC2
    call and the store write that records it (a grow in flight, or IPs taken out of the pool to be
    given back, see cnicore/poolmgr.py); once the agent has converged the two are `exact`ly equal."""
    store, ec2 = store_vs_ec2(node)
    for eni_id, ips in store.items():
        assert eni_id in ec2, f"the store lists {eni_id}, which EC2 does not attach to {node.node}"
        assert ips <= ec2[eni_id], f"the store lists {sorted(ips - ec2[eni_id])} on {eni_id}; EC2 does not"
    if exact:
        assert store == ec2, f"store {store} != EC2 {ec2}"
