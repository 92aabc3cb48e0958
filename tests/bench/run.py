"""`make bench`: our frozen chain against the Go reference chain, side by side, in one run (issue 9).

    .venv/bin/python -m tests.bench.run [--pods 40] [--burst 32] [--bursts 2] [--scale-pods 20]

What it does, in order (everything inside a VPC lab made for this run, removed at the end):
  1. installs the frozen bundle (dist/) with build/install.sh into a tmp /opt/cni/bin, so a
     `make build` run by someone else meanwhile cannot swap the binaries under the measurement;
  2. exec start-up: each program answering VERSION, against the Go `bridge`, alternating;
  3. boots a lab with two c5.18xlarge-sized nodes (15 ENIs x 50 IPs), runs the frozen node agent
     on each with MINIMUM_IP_TARGET=735 and waits until EC2 holds every IP (the warm pool is warm);
  4. node1: ADD then DEL of --pods pods per chain through the same cnitool, the reference chain
     (Go bridge + host-local + portmap, a cni0 bridge on 172.30.0.0/16) and ours alternating op by op;
  5. node1: --bursts rounds of --burst concurrent ADDs per chain (then concurrent DELs), alternating;
  6. node1 vs node2: ADD/DEL of one pod alternating between node1 (nothing else assigned) and node2,
     whose store has 700 IPs assigned (filled in-process with cnicore.pool.Pool under the store lock):
     first with the store filled alone (half the cycles), then with what 700 pods leave on the host
     too (their host veths with the attachment alias, /32 routes, rules 512/1536, ENI tables), which
     is the state `scale_ratio` is measured in;
  7. EC2 calls: the lab's count over steps 4-6 minus what the two agents report they sent;
  8. a fresh node, in a second lab of two FRESH_TYPE nodes: --fresh-pods pods added one after the
     other right after the frozen agent starts, in prefix mode on node1 (ENABLE_PREFIX_DELEGATION=true,
     WARM_PREFIX_TARGET=1) and in secondary-IP mode on node2 (default settings); an ADD the
     pool cannot serve yet (code 11) is retried as a runtime would. Wall time from the agent's start
     to the last pod's answer, and every EC2 call the node made (agent and plugins) meanwhile;
  9. through containerd's CRI (tests/support/cri_world.py's harness, containerd as kubelet drives it): two
     private containerds in node1, one on our conflist and one on the reference's, the same installed
     binaries in one bin dir; --cri-cycles pod cycles per side, alternating side by side, each timed
     from the bench as RunPodSandbox + PodSandboxStatus (as kubelet asks after it) + StopPodSandbox
     + RemovePodSandbox;
 10. through podman (tests/support/podman_world.py's private podman 4.3 with its CNI backend): two
     podmans in node1, each with one chain's conflist alone in its network dir, as a node has it (podman
     runs VERSION on every plugin of every conflist there, in `run` and again in the cleanup that runs
     DEL); --podman-cycles `podman run --rm --network <chain> IMAGE true` per side, alternating, each
     timed from the bench: create, netns, ADD, start, exit, DEL, remove. Reported, with no target of
     its own (issue 19 sets one for the CRI view).

Each timed operation is one cnitool exec started by a driver process that lives in the node's
namespace (tests/bench/driver.py): wall time from fork to reap, and CPU seconds as the
RUSAGE_CHILDREN delta (cnitool plus every plugin and helper it waited for).

Our plugins run as a node runs them: the frozen agent starts the plugins' resident helper
(build/zygote.py) and our chain's runs (cnitool, containerd, podman) find it through
AWS_VPC_CNI_ZYGOTE_SOCKET, since the bench's data folders are not the default one. The zygote's CPU,
its own and its children's (which run our plugins), is added to each operation's (the driver's
`helpers`). `--no-zygote` measures the plugins starting Python themselves.

Ratios are of medians taken in one run with the two sides alternating, so load from other work on
the machine falls on both; the burst ratio is the median of one ratio per round.
Writes bench-results.json at the repo root and prints a table with the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress

from cnicore import agentlink
from vpclab import api, netns

from .stats import percentile, ratio, summary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # step 9's harness, tests/support/cri_world.py, and what it imports
CNITOOL = os.path.join(ROOT, ".tools", "bin", "cnitool")
REF_PLUGINS = "/usr/lib/cni"
RESULTS = os.path.join(ROOT, "bench-results.json")
CONFLIST_FILE = "10-bench.conflist"  # each chain's, in its conf dir
CNI_CACHE = "/var/lib/cni/results"  # libcni's fixed cache dir (cnitool has no option for it)
INSTANCE_TYPE = "c5.18xlarge"
POOL_IPS = 735  # 15 ENIs x (50 - 1) secondary IPs
FILL = 700
COOLDOWN = 30
AGENT_INTERVAL = 5.0  # the DaemonSet's default
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAMS = ("aws-eni-ipam", "aws-vpc-bridge", "aws-snat", "portmap-compat")
TAG = "b"
FRESH_TYPE = "m5.4xlarge"  # 8 ENIs x 29 secondary IPs: 100 pods fit in both modes
# prefix mode first: secondary IPs land anywhere in the subnet, and once they have taken an address in
# most aligned /28 blocks, EC2 answers InsufficientCidrBlocks (the lab as EC2)
FRESH_MODES = {"prefix": ({"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "1"},
                          {"enablePrefixDelegation": True, "warmPrefixTarget": 1}),
               "secondary_ip": ({}, {})}

CRI_REFERENCE_PLUGINS = ("bridge", "host-local", "portmap", "loopback")  # containerd runs loopback for every pod

TARGETS = (  # key, limit, what (issue 19's targets)
    ("add_p50_ratio", 1.5, "ADD p50, ours / reference"),
    ("del_p50_ratio", 1.0, "DEL p50, ours / reference"),
    ("burst_ratio", 1.5, "32 concurrent ADDs, ours / reference"),
    ("cpu_add_ratio", 1.5, "CPU per ADD, ours / reference"),
    ("cpu_del_ratio", 1.5, "CPU per DEL, ours / reference"),
    ("scale_ratio", 1.1, "ADD p50, 700 assigned / 1 assigned"),
    ("ec2_calls_per_warm_op", 0.0, "EC2 calls per warm ADD/DEL"),
    ("cri_cycle_ratio", 1.1, "CRI pod cycle p50, ours / reference"),
)


class BenchError(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Machine facts


def source() -> dict:
    """The commit measured, and whether the working tree differed from it (the bundle is built from it)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or os.environ.get("BENCH_COMMIT", "unknown"), "dirty_files": git("status", "--porcelain", "--untracked-files=no").count("\n") + bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict:
    model = "?"
    with suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": [float(x) for x in load]}


# ---------------------------------------------------------------------------------------------
# Processes in the lab


class Driver:
    """tests/bench/driver.py running in one lab node's namespace."""

    def __init__(self, lab: api.Lab, node: str):
        self.node = node
        self.proc = subprocess.Popen(lab.exec_argv(node, [sys.executable, "-m", "tests.bench.driver"]), cwd=ROOT,
                                     env=lab.exec_env(node, {"PYTHONPATH": ROOT}), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def call(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the driver in {self.node} ended (exit status {self.proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchError(f"driver in {self.node}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            with suppress(OSError):
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Agent:
    """The frozen node agent in one node, settings from its environment as the DaemonSet passes them."""

    def __init__(self, lab: api.Lab, node: str, bin_dir: str, data_dir: str, network: str, log: str, **settings):
        self.data_dir = data_dir
        self.log = log
        env = lab.exec_env(node, {"AWS_VPC_CNI_DATA_DIR": data_dir, "AWS_VPC_K8S_CNI_LOG_FILE": log,
                                  **{k: str(v) for k, v in settings.items()}})
        self.stderr = open(log + ".stderr", "w")
        self.proc = subprocess.Popen(
            lab.exec_argv(node, [os.path.join(bin_dir, "aws-vpc-cni-agent"), "--network", network, "run",
                                 "--interval", str(AGENT_INTERVAL), "--metrics-address", ""]),
            env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def status(self) -> dict:
        return agentlink.read_status(self.data_dir)

    def log_tail(self, lines: int = 6) -> str:
        out = []
        for path in (self.log, self.log + ".stderr"):
            with suppress(OSError):
                with open(path, errors="replace") as f:
                    out += f.read().splitlines()[-lines:]
        return "\n".join(out)

    def ec2_total(self) -> int:
        return sum(self.status().get("ec2_calls", {}).values())

    def zygote(self, timeout: float = 30) -> tuple[dict, tuple[int, ...]]:
        """The environment that leads our plugins to this agent's zygote, and its pid, once it serves."""
        path = os.path.join(self.data_dir, agentlink.ZYGOTE)
        deadline = time.time() + timeout
        while True:
            with suppress(OSError):
                pid = self.status()["zygote"]["pid"]
                if pid and os.path.exists(path):
                    return {"AWS_VPC_CNI_ZYGOTE_SOCKET": path}, (pid,)
            if time.time() > deadline:
                raise BenchError(f"the agent's plugin zygote does not serve at {path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def wait_warm(agents: dict[str, Agent], target: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
        totals = {}
        for node, agent in agents.items():
            if agent.proc.poll() is not None:
                raise BenchError(f"the agent of {node} exited with status {agent.proc.returncode}:\n"
                                 f"{agent.log_tail()}")
            try:
                status = agent.status()
            except (OSError, ValueError):
                totals[node] = None
                continue
            figures = status.get("figures") or {}
            total = sum(e["total"] for e in status.get("enis", []))
            totals[node] = total if figures.get("short", 1) == 0 else None
        if all(t is not None and t >= target for t in totals.values()):
            return
        if time.time() > deadline:
            tails = "\n".join(f"{node}: {a.log_tail()}" for node, a in agents.items())
            raise BenchError(f"the warm pools did not reach {target} IPs in {timeout:.0f} s: {totals}\n{tails}")
        time.sleep(1)


# ---------------------------------------------------------------------------------------------
# The two chains


class Chain:
    """One conflist and how cnitool runs it: `job(command, pod)` -> a driver request."""

    def __init__(self, key: str, network: str, conf_dir: str, cni_path: str, base_env: dict, label: str,
                 helpers: tuple[int, ...] = ()):
        """`helpers`: pids of resident processes whose CPU the chain's operations use (the zygote)."""
        self.key, self.network, self.conf_dir, self.cni_path, self.label = key, network, conf_dir, cni_path, label
        self.base_env = base_env
        self.helpers = list(helpers)

    def job(self, command: str, pod: "Pod") -> dict:
        env = dict(self.base_env, PATH=PATH, NETCONFPATH=self.conf_dir, CNI_PATH=self.cni_path,
                   CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.name}")
        return {"argv": [CNITOOL, command, self.network, netns.path(pod.netns)], "env": env, "helpers": self.helpers}


def reference_conflist(network: str, data_dir: str) -> dict:
    """containerd's default CNI config (bridge + host-local + portmap) on a range outside the lab's VPC."""
    return {"cniVersion": "1.0.0", "name": network, "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "promiscMode": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "172.30.0.0/16"}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir}},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]}


def our_conflist(network: str, data_dir: str, log_file: str, with_snat: bool) -> dict:
    """conflists/10-aws-vpc.conflist with its paths in the bench's tmp dir (without aws-snat if it is
    not written yet)."""
    with open(os.path.join(ROOT, "conflists", "10-aws-vpc.conflist")) as f:
        conflist = json.load(f)
    conflist["name"] = network
    conflist["plugins"] = [p for p in conflist["plugins"] if with_snat or p["type"] != "aws-snat"]
    for plugin in conflist["plugins"]:
        plugin["pluginLogFile"] = log_file
        for section in (plugin, plugin.get("ipam", {})):
            if "dataDir" in section:
                section["dataDir"] = data_dir
            if "ipCooldownPeriod" in section:
                section["ipCooldownPeriod"] = COOLDOWN
    return conflist


def write_conf(conf_dir: str, conflist: dict) -> str:
    os.makedirs(conf_dir, exist_ok=True)
    with open(os.path.join(conf_dir, CONFLIST_FILE), "w") as f:
        json.dump(conflist, f, indent=2)
    return conf_dir


class Pod:
    def __init__(self, name: str, ns: str):
        self.name, self.netns = name, ns


# ---------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, opts):
        self.opts = opts
        self.prefix = netns.new_prefix(TAG)
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp")
        self.lab: api.Lab | None = None
        self.drivers: dict[str, Driver] = {}
        self.agents: dict[str, Agent] = {}
        self.containerds: dict = {}  # chain key -> cri_world.Containerd (step 9)
        self.podmans: dict = {}  # chain key -> podman_world.PodmanNode (step 10)
        self.pod_count = 0
        self.results: dict = {"machine": machine(), "source": source(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.ours_ops = 0

    # --- set-up -----------------------------------------------------------------------------
    def install(self) -> str:
        """build/install.sh into <tmp>/opt/cni/bin: the layout operators get."""
        if not os.access(os.path.join(ROOT, "dist", "aws-vpc-cni", "aws-vpc-cni"), os.X_OK):
            raise BenchError("no frozen bundle in dist/: run make build")
        dest = os.path.join(self.tmp, "root")
        subprocess.run(["bash", os.path.join(ROOT, "build", "install.sh")], check=True, capture_output=True,
                       env=dict(os.environ, DESTDIR=dest, CNI_BIN_DIR="/opt/cni/bin"))
        bin_dir = dest + "/opt/cni/bin"
        for program in PROGRAMS:
            proc = subprocess.run([os.path.join(bin_dir, program)], env={"CNI_COMMAND": "VERSION", "PATH": PATH},
                                  input=b"", capture_output=True, timeout=60)
            if proc.returncode != 0 or b"supportedVersions" not in proc.stdout:
                raise BenchError(f"frozen {program} does not answer VERSION: {proc.stderr.decode()[-800:]}")
        return bin_dir

    def new_pod(self, label: str) -> Pod:
        self.pod_count += 1
        name = f"bench-{label}-{self.pod_count}"
        ns = f"{self.prefix}-{label}{self.pod_count}"
        netns.create(ns)
        return Pod(name, ns)

    def setup(self) -> None:
        opts = self.opts
        self.with_snat = os.path.exists(os.path.join(ROOT, "plugins", "aws-snat", "main.py"))
        say(f"installing the frozen bundle into {self.tmp}/root/opt/cni/bin")
        self.bin_dir = self.install()
        self.results["startup"] = self.measure_startup(opts.startup_runs)

        say(f"starting lab {self.prefix}: 2 {INSTANCE_TYPE} nodes")
        t0 = time.time()
        self.lab = api.Lab.up(name=self.prefix, nodes=2, instance_type=INSTANCE_TYPE, subnet_prefix=20,
                              owner_pid=os.getpid())
        say(f"lab up in {time.time() - t0:.1f} s; starting the node agents (MINIMUM_IP_TARGET={POOL_IPS})")
        self.network = f"{self.prefix}-ours"
        self.ref_network = f"{self.prefix}-ref"
        self.data = {node: os.path.join(self.tmp, f"{node}-data") for node in ("node1", "node2")}
        self.log_file = {node: os.path.join(self.tmp, f"{node}-plugin.log") for node in ("node1", "node2")}
        for node in ("node1", "node2"):
            self.agents[node] = Agent(self.lab, node, self.bin_dir, self.data[node], self.network,
                                      os.path.join(self.tmp, f"{node}-agent.log"), MINIMUM_IP_TARGET=POOL_IPS,
                                      IP_COOLDOWN_PERIOD=COOLDOWN, **self.zygote_setting())
        t0 = time.time()
        wait_warm(self.agents, POOL_IPS)
        say(f"warm pools of {POOL_IPS} IPs on both nodes after {time.time() - t0:.1f} s")
        self.results["setup"] = {"warm_pool_seconds": round(time.time() - t0, 1)}

        for node in ("node1", "node2"):
            self.drivers[node] = Driver(self.lab, node)
        node_env = self.lab.node_env("node1")
        self.ref = Chain("ref", self.ref_network,
                         write_conf(os.path.join(self.tmp, "ref-net.d"),
                                    reference_conflist(self.ref_network, os.path.join(self.tmp, "host-local"))),
                         REF_PLUGINS, node_env, "Go bridge + host-local + portmap (/usr/lib/cni)")
        ours_plugins = "aws-vpc-bridge(aws-eni-ipam) + " + ("aws-snat + " if self.with_snat else "") + "portmap-compat"
        self.ours = {}
        for node in ("node1", "node2"):
            env, helpers = self.zygote_of(self.agents[node])
            self.ours[node] = Chain("ours", self.network,
                                    write_conf(os.path.join(self.tmp, f"{node}-net.d"),
                                               our_conflist(self.network, self.data[node], self.log_file[node],
                                                            self.with_snat)),
                                    self.bin_dir, {**self.lab.node_env(node), **env},
                                    f"frozen {ours_plugins}" + (", through the agent's zygote" if helpers else ""),
                                    helpers)
        self.results["chains"] = {"reference": self.ref.label, "ours": self.ours["node1"].label,
                                  "ours_includes_aws_snat": self.with_snat, "zygote": self.opts.zygote}

    def zygote_setting(self) -> dict:
        """The agent's setting for its plugin zygote in this run."""
        return {} if self.opts.zygote else {"AWS_VPC_CNI_PLUGIN_ZYGOTE": "false"}

    def zygote_of(self, agent: Agent) -> tuple[dict, tuple[int, ...]]:
        """The environment our chain runs with, and the helper pids whose CPU it uses."""
        return agent.zygote() if self.opts.zygote else ({"AWS_VPC_CNI_ZYGOTE_SOCKET": ""}, ())

    # --- one operation ------------------------------------------------------------------------
    def op(self, node: str, chain: Chain, command: str, pod: Pod) -> dict:
        answer = self.drivers[node].call({"op": "run", **chain.job(command, pod)})
        if answer["rc"] != 0:
            raise BenchError(f"{chain.key} {command} of {pod.name} on {node} failed ({answer['rc']}): "
                             f"{answer['out'][-1500:]} {answer['err'][-1500:]}")
        if chain.key == "ours":
            self.ours_ops += 1
        return answer

    def burst(self, node: str, chain: Chain, command: str, pods: list[Pod]) -> dict:
        answer = self.drivers[node].call({"op": "burst", "jobs": [chain.job(command, p) for p in pods]})
        failed = [(p.name, r) for p, r in zip(pods, answer["results"]) if r["rc"] != 0]
        if failed:
            name, r = failed[0]
            raise BenchError(f"{chain.key} burst {command}: {len(failed)} of {len(pods)} failed, e.g. {name}: "
                             f"{r['out'][-1500:]} {r['err'][-1500:]}")
        if chain.key == "ours":
            self.ours_ops += len(pods)
        return answer

    # --- the measurements ---------------------------------------------------------------------
    def measure_startup(self, runs: int) -> dict:
        """Exec start-up of each frozen program answering VERSION, against the Go bridge and bare Python."""
        candidates = {"go-bridge": [os.path.join(REF_PLUGINS, "bridge")],
                      "python-bare": [sys.executable, "-S", "-c", "pass"],
                      **{p: [os.path.join(self.bin_dir, p)] for p in PROGRAMS}}
        walls = {k: [] for k in candidates}
        cpus = {k: [] for k in candidates}
        env = {"CNI_COMMAND": "VERSION", "PATH": PATH, "AWS_VPC_CNI_ZYGOTE_SOCKET": ""}  # the exec itself
        keys = list(candidates)
        for n in range(runs):
            for key in (keys if n % 2 == 0 else keys[::-1]):
                ru0 = os.times()
                t0 = time.perf_counter()
                subprocess.run(candidates[key], env=env, input=b"", capture_output=True)
                walls[key].append(time.perf_counter() - t0)
                ru1 = os.times()
                cpus[key].append((ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system))
        out = {k: {"p50_ms": round(percentile([w * 1000 for w in walls[k]], 50), 1),
                   "p90_ms": round(percentile([w * 1000 for w in walls[k]], 90), 1),
                   "cpu_ms_mean": round(sum(cpus[k]) / len(cpus[k]) * 1000, 1)} for k in keys}
        say("exec start-up (VERSION), p50: " + ", ".join(f"{k} {v['p50_ms']:.0f} ms" for k, v in out.items()))
        return out

    def warm_up(self) -> None:
        """Untimed: one ADD/DEL per chain first (cni0 and the node rules appear, page cache is warm)."""
        for chain in (self.ref, self.ours["node1"]):
            pod = self.new_pod(f"w{chain.key[0]}")
            for _ in range(2):
                self.op("node1", chain, "add", pod)
                self.op("node1", chain, "del", pod)

    def sequential(self, n: int) -> dict:
        say(f"sequential: {n} ADDs then {n} DELs per chain, alternating op by op")
        chains = [self.ref, self.ours["node1"]]
        pods = {c.key: [self.new_pod(f"{c.key[0]}") for _ in range(n)] for c in chains}
        samples = {c.key: {"add": [], "del": []} for c in chains}
        for command in ("add", "del"):
            for i in range(n):
                for chain in (chains if i % 2 == 0 else chains[::-1]):
                    answer = self.op("node1", chain, command, pods[chain.key][i])
                    samples[chain.key][command].append((answer["wall"], answer["cpu"]))
        self.phase_pods = {"sequential": pods["ours"]}
        out = {}
        for key, by_command in samples.items():
            out[key] = {}
            for command, values in by_command.items():
                walls = [w for w, _ in values]
                cpus = [c for _, c in values]
                out[key][command] = {**{k: round(v, 1) for k, v in summary(walls).items()},
                                     "cpu_ms_mean": round(sum(cpus) / len(cpus) * 1000, 1),
                                     "cpu_ms_p50": round(percentile(cpus, 50) * 1000, 1)}
        for command in ("add", "del"):
            pairs = [o[0] / r[0] for o, r in zip(samples["ours"][command], samples["ref"][command])]
            out[f"{command}_pair_ratio"] = {"p10": round(percentile(pairs, 10), 2),
                                            "p50": round(percentile(pairs, 50), 2),
                                            "p90": round(percentile(pairs, 90), 2)}
        return out

    def bursts(self, size: int, rounds: int) -> dict:
        say(f"bursts: {rounds} x {size} concurrent ADDs (then DELs) per chain, alternating")
        chains = [self.ref, self.ours["node1"]]
        # pods of their own, so the in-handler figures of the sequential step stay apart
        self.burst_pods = {c.key: [self.new_pod(f"b{c.key[0]}") for _ in range(size)] for c in chains}
        walls = {c.key: {"add": [], "del": []} for c in chains}
        cpus = {c.key: [] for c in chains}
        for r in range(rounds):
            for chain in (chains if r % 2 == 0 else chains[::-1]):
                pods = self.burst_pods[chain.key][:size]
                add = self.burst("node1", chain, "add", pods)
                walls[chain.key]["add"].append(add["wall"])
                cpus[chain.key].append(add["cpu"])
                done = self.burst("node1", chain, "del", pods)
                walls[chain.key]["del"].append(done["wall"])
        out = {}
        for key in walls:
            out[key] = {"add_wall_ms": [round(w * 1000, 1) for w in walls[key]["add"]],
                        "del_wall_ms": [round(w * 1000, 1) for w in walls[key]["del"]],
                        "add_cpu_s": [round(c, 2) for c in cpus[key]]}
        # one ratio per round (the two bursts of a round ran back to back), then their median:
        # a load spike from outside hits one round, not the figure
        for command in ("add", "del"):
            per_round = [ratio(o, r) for o, r in zip(walls["ours"][command], walls["ref"][command])]
            out[f"{command}_round_ratios"] = [round(x, 2) for x in per_round]
            out[f"{command}_ratio"] = percentile(per_round, 50)
        return out

    def fill_store(self, node: str, count: int) -> list:
        """`count` assignments in node's store, made in-process under the store lock (no ADDs)."""
        from cnicore.pool import Pool
        from cnicore.store import Store

        with Store(self.data[node], self.network).locked() as tx:
            doc = tx.read()
            pool = Pool(doc, time.time(), COOLDOWN)
            got = [pool.assign(f"fill{n:04d}", "eth0", "default", f"fill-{n}") for n in range(count)]
            tx.write(doc)
        return got

    def fill_host(self, node: str, got: list) -> None:
        """What each filled pod would have left on the node: its host veth, named and aliased as ADD
        names it (the pod ends all go to one sink namespace), its /32 route, rules 512 and 1536, and
        the ENI tables (built by cnicore.podroutes itself, as the first ADD on each ENI builds them)."""
        from cnicore import podroutes, rtnl
        from cnicore.veths import Attachment, host_veth_name
        from cnicore.store import Store

        sink = f"{self.prefix}-sink"
        netns.create(sink)
        enis = {}
        batch = []
        for n, a in enumerate(got):
            veth = host_veth_name("eni", pod_namespace="default", pod_name=f"fill-{n}")
            alias = Attachment(self.network, f"fill{n:04d}", "eth0").alias
            batch += [f"link add {veth} type veth peer name p{n} netns {sink}", f"link set {veth} alias {alias} up",
                      f"route add {a.ip}/32 dev {veth} scope link",
                      f"rule add to {a.ip}/32 priority {podroutes.TO_POD_RULE_PRIORITY} table main"]
            if not a.primary_eni:
                batch.append(f"rule add from {a.ip}/32 priority {podroutes.FROM_POD_RULE_PRIORITY} "
                             f"table {a.device_number + 1}")
                enis[a.eni_id] = a
        self.lab.exec(node, ["ip", "-batch", "-"], input="\n".join(batch) + "\n", timeout=300)
        with Store(self.data[node], self.network).locked(shared=True) as tx:
            doc = tx.read()
        with netns.entered(self.lab.netns(node)), rtnl.Netns() as host:
            for eni_id, a in enis.items():
                eni = doc["enis"][eni_id]
                podroutes.ensure_eni_table(host, podroutes.SecondaryEni(mac=eni["mac"], device_number=a.device_number,
                                                                        subnet=a.subnet_cidr, mtu=9001,
                                                                        primary_ip=eni["primary_ip"]))

    def scale_round(self, k: int, label: str) -> dict:
        """k ADD/DEL cycles of one pod, alternating node1 (1 assigned) and node2 (filled)."""
        walls = {"node1": {"add": [], "del": []}, "node2": {"add": [], "del": []}}
        order = ["node1", "node2"]
        pods = {node: self.new_pod(f"s{label}{node[-1]}") for node in order}
        for node, pod in pods.items():
            self.phase_pods[f"scale_{label}_{node}"] = [pod]
        for i in range(k):
            for node in (order if i % 2 == 0 else order[::-1]):
                for command in ("add", "del"):
                    walls[node][command].append(self.op(node, self.ours[node], command, pods[node])["wall"])
        return {node: {c: round(percentile([w * 1000 for w in v], 50), 1) for c, v in by.items()}
                for node, by in walls.items()}

    def scale(self, k: int) -> dict:
        say(f"scale: ADD/DEL p50 with 1 assigned (node1) vs {FILL} assigned (node2), {k} cycles each")
        out = {}
        # store only first (the brief's method), then with the host state 700 pods leave
        got = self.fill_store("node2", FILL)
        for node in ("node1", "node2"):  # one untimed cycle each
            pod = self.new_pod(f"sw{node[-1]}")
            self.op(node, self.ours[node], "add", pod)
            self.op(node, self.ours[node], "del", pod)
        out["store_only"] = self.scale_round(max(k // 2, 5), "a")
        self.fill_host("node2", got)
        out["store_and_host"] = self.scale_round(k, "b")
        return out

    def fresh_nodes(self, pods: int) -> dict:
        """Step 8: `pods` pods on a fresh node per mode (see the module's docstring)."""
        say(f"fresh nodes: {pods} pods on a fresh {FRESH_TYPE} node, prefix mode then secondary-IP mode")
        lab = api.Lab.up(name=f"{self.prefix}f", nodes=2, instance_type=FRESH_TYPE, subnet_prefix=22,
                         owner_pid=os.getpid())
        network = f"{self.prefix}-fresh"
        out = {}
        for node, (mode, (env, ipam)) in zip(("node1", "node2"), FRESH_MODES.items()):
            data_dir = os.path.join(self.tmp, f"fresh-{node}-data")
            conflist = our_conflist(network, data_dir, os.path.join(self.tmp, f"fresh-{node}-plugin.log"),
                                    self.with_snat)
            conflist["plugins"][0]["ipam"].update(ipam)
            driver = self.drivers[f"fresh-{node}"] = Driver(lab, node)
            lab.ec2_calls(reset=True)
            t0 = time.time()
            agent = self.agents[f"fresh-{node}"] = Agent(lab, node, self.bin_dir, data_dir, network,
                                                         os.path.join(self.tmp, f"fresh-{node}-agent.log"),
                                                         **env, **self.zygote_setting())
            # until the zygote serves, the plugins start Python themselves (the launcher finds no socket)
            zygote_env = {"AWS_VPC_CNI_ZYGOTE_SOCKET": os.path.join(data_dir, agentlink.ZYGOTE) if self.opts.zygote else ""}
            chain = Chain("fresh", network, write_conf(os.path.join(self.tmp, f"fresh-{node}-net.d"), conflist),
                          self.bin_dir, {**lab.node_env(node), **zygote_env}, f"frozen, {mode}")
            retries = 0
            for _ in range(pods):
                pod = self.new_pod(f"f{node[-1]}")
                while True:
                    answer = driver.call({"op": "run", **chain.job("add", pod)})
                    if answer["rc"] == 0:
                        break
                    # cnitool prints the plugin's message (not its code) on stderr: ours for code 11 starts so
                    if "no free IP on this node" not in answer["err"] or time.time() - t0 > 300:
                        raise BenchError(f"fresh {mode} ADD of {pod.name} failed: {answer['out'][-800:]} "
                                         f"{answer['err'][-800:]}\n{agent.log_tail()}")
                    retries += 1
                    driver.call({"op": "run", **chain.job("del", pod)})  # a runtime DELs a failed ADD
                    time.sleep(0.1)
            seconds = time.time() - t0
            calls = lab.ec2_calls()
            status = agent.status()
            out[mode] = {"seconds": round(seconds, 1), "ec2_calls": sum(calls.values()), "ec2_by_action": calls,
                         "retried_adds": retries, "enis": len(status["enis"]),
                         "prefixes": sum(e.get("prefixes", 0) for e in status["enis"]),
                         "addresses": sum(e["total"] for e in status["enis"])}
            say(f"fresh node, {mode}: {pods} pods in {seconds:.1f} s, {out[mode]['ec2_calls']} EC2 calls "
                f"({retries} ADDs retried)")
        return out

    def cri_cycles(self, n: int) -> dict:
        """Step 9: pod cycles through containerd's CRI, ours and the reference alternating (see the
        module's docstring)."""
        say(f"CRI: {n} RunPodSandbox + StopPodSandbox + RemovePodSandbox cycles per chain through containerd")
        from support import cri_world  # the containerd harness of the tests (grpc and the CRI stubs): this step only
        bin_dir = os.path.join(self.tmp, "cri-bin")  # as a node has it: our programs and the reference's
        os.makedirs(bin_dir)
        for name in PROGRAMS:
            os.symlink(os.path.join(self.bin_dir, name), os.path.join(bin_dir, name))
        for name in CRI_REFERENCE_PLUGINS:
            os.symlink(os.path.join(REF_PLUGINS, name), os.path.join(bin_dir, name))
        sides = {}
        for chain in (self.ours["node1"], self.ref):
            containerd = self.containerds[chain.key] = cri_world.Containerd(
                self.lab, "node1", os.path.join(self.tmp, f"cri-{chain.key}"), bin_dir, chain.conf_dir,
                f"{self.prefix}-cri-{chain.key}", env=self.runtime_env(chain))
            containerd.start()
            sides[chain.key] = containerd
        walls = {key: [] for key in sides}
        order = list(sides)
        for i in range(n + 1):  # the first cycle of each side is untimed (image unpacked, caches warm)
            for key in (order if i % 2 == 0 else order[::-1]):
                containerd = sides[key]
                t0 = time.perf_counter()
                sandbox = containerd.run_pod(f"cri-{key}-{i}")
                containerd.stop_pod(sandbox)
                containerd.remove_pod(sandbox)
                if i:
                    walls[key].append(time.perf_counter() - t0)
        out = {key: {k: round(v, 1) for k, v in summary(w).items()} for key, w in walls.items()}
        out["ratio"] = ratio(out["ours"]["p50"], out["ref"]["p50"])
        say(f"CRI pod cycle p50: ours {out['ours']['p50']:.0f} ms, reference {out['ref']['p50']:.0f} ms")
        return out

    @staticmethod
    def runtime_env(chain: Chain) -> dict:
        """What a runtime running `chain` passes its plugins beyond its own environment: the zygote's socket."""
        return {k: v for k, v in chain.base_env.items() if k == "AWS_VPC_CNI_ZYGOTE_SOCKET"}

    def podman_cycles(self, n: int) -> dict:
        """Step 10: containers run and removed by podman, ours and the reference alternating (see the
        module's docstring)."""
        say(f"podman: {n} `podman run --rm` cycles per chain")
        from support.podman_world import IMAGE, PodmanNode  # this step only
        chains = (self.ours["node1"], self.ref)
        for chain in chains:
            with open(os.path.join(chain.conf_dir, CONFLIST_FILE)) as f:
                conflist = json.load(f)
            podman = self.podmans[chain.key] = PodmanNode(self.lab, "node1", pathlib.Path(self.tmp) / f"podman-{chain.key}",
                                                          bin_dir=self.bin_dir, conflist=conflist,
                                                          env=self.runtime_env(chain))
            podman.load_image()
        walls = {chain.key: [] for chain in chains}
        for i in range(n + 1):  # the first cycle of each side is untimed (container storage, caches warm)
            for chain in (chains if i % 2 == 0 else chains[::-1]):
                t0 = time.perf_counter()
                self.podmans[chain.key].podman("run", "--rm", "--network", chain.network, IMAGE, "true")
                if i:
                    walls[chain.key].append(time.perf_counter() - t0)
        out = {key: {k: round(v, 1) for k, v in summary(w).items()} for key, w in walls.items()}
        out["ratio"] = ratio(out["ours"]["p50"], out["ref"]["p50"])
        say(f"podman run --rm p50: ours {out['ours']['p50']:.0f} ms, reference {out['ref']['p50']:.0f} ms")
        return out

    # --- all of it ------------------------------------------------------------------------------
    def run(self) -> dict:
        opts = self.opts
        self.setup()
        self.warm_up()
        self.lab.ec2_calls(reset=True)
        self.lab.imds_calls(reset=True)
        agent_ec2 = {node: a.ec2_total() for node, a in self.agents.items()}
        ours_ops_before = self.ours_ops

        res = self.results
        res["sequential"] = self.sequential(opts.pods)
        res["burst"] = self.bursts(opts.burst, opts.bursts)
        res["scale"] = self.scale(opts.scale_pods)

        agent_calls = sum(a.ec2_total() - agent_ec2[node] for node, a in self.agents.items())
        lab_calls = self.lab.ec2_calls()
        imds = self.lab.imds_calls()
        warm_ops = self.ours_ops - ours_ops_before
        plugin_calls = max(sum(lab_calls.values()) - agent_calls, 0)
        res["ec2"] = {"lab_calls": lab_calls, "agent_calls": agent_calls, "plugin_calls": plugin_calls,
                      "warm_ops": warm_ops, "imds_requests": imds}
        res["plugin_handler_ms"] = {
            "sequential": handler_times(self.log_file["node1"], self.phase_pods["sequential"]),
            "scale_1_assigned": handler_times(self.log_file["node1"], self.phase_pods["scale_b_node1"]),
            "scale_700_assigned": handler_times(self.log_file["node2"], self.phase_pods["scale_b_node2"]),
        }
        res["cri"] = self.cri_cycles(opts.cri_cycles)
        res["podman"] = self.podman_cycles(opts.podman_cycles)
        res["fresh_node"] = self.fresh_nodes(opts.fresh_pods)
        for mode, figures in res["fresh_node"].items():
            res[f"fresh_{mode}_seconds"] = figures["seconds"]
            res[f"fresh_{mode}_ec2_calls"] = figures["ec2_calls"]
        res["machine"]["loadavg_end"] = machine()["loadavg"]

        seq = res["sequential"]
        scale = res["scale"]["store_and_host"]
        res.update({
            "ref_add_p50_ms": seq["ref"]["add"]["p50"], "ours_add_p50_ms": seq["ours"]["add"]["p50"],
            "ref_del_p50_ms": seq["ref"]["del"]["p50"], "ours_del_p50_ms": seq["ours"]["del"]["p50"],
            "add_p50_ratio": round(ratio(seq["ours"]["add"]["p50"], seq["ref"]["add"]["p50"]), 2),
            "del_p50_ratio": round(ratio(seq["ours"]["del"]["p50"], seq["ref"]["del"]["p50"]), 2),
            "ref_add_cpu_ms": seq["ref"]["add"]["cpu_ms_mean"], "ours_add_cpu_ms": seq["ours"]["add"]["cpu_ms_mean"],
            "ref_del_cpu_ms": seq["ref"]["del"]["cpu_ms_mean"], "ours_del_cpu_ms": seq["ours"]["del"]["cpu_ms_mean"],
            "add_cpu_ratio": round(ratio(seq["ours"]["add"]["cpu_ms_mean"], seq["ref"]["add"]["cpu_ms_mean"]), 2),
            "del_cpu_ratio": round(ratio(seq["ours"]["del"]["cpu_ms_mean"], seq["ref"]["del"]["cpu_ms_mean"]), 2),
            "burst_ratio": round(res["burst"]["add_ratio"], 2),
            "ref_burst_ms": round(sum(res["burst"]["ref"]["add_wall_ms"]) / len(res["burst"]["ref"]["add_wall_ms"]), 1),
            "ours_burst_ms": round(sum(res["burst"]["ours"]["add_wall_ms"]) / len(res["burst"]["ours"]["add_wall_ms"]), 1),
            "scale_add_p50_1_ms": scale["node1"]["add"], "scale_add_p50_700_ms": scale["node2"]["add"],
            "scale_ratio": round(ratio(scale["node2"]["add"], scale["node1"]["add"]), 2),
            "scale_ratio_store_only": round(ratio(res["scale"]["store_only"]["node2"]["add"],
                                                  res["scale"]["store_only"]["node1"]["add"]), 2),
            "scale_del_ratio": round(ratio(scale["node2"]["del"], scale["node1"]["del"]), 2),
            "ec2_calls_per_warm_op": round(plugin_calls / warm_ops, 4) if warm_ops else float("nan"),
            "ref_cri_cycle_p50_ms": res["cri"]["ref"]["p50"], "ours_cri_cycle_p50_ms": res["cri"]["ours"]["p50"],
            "cri_cycle_ratio": round(res["cri"]["ratio"], 2),
            "ref_podman_cycle_p50_ms": res["podman"]["ref"]["p50"],
            "ours_podman_cycle_p50_ms": res["podman"]["ours"]["p50"],
            "podman_cycle_ratio": round(res["podman"]["ratio"], 2),
        })
        # issue 19's names for the CPU ratios (the first round's add_cpu_ratio/del_cpu_ratio stay)
        res["cpu_add_ratio"], res["cpu_del_ratio"] = res["add_cpu_ratio"], res["del_cpu_ratio"]
        return res

    # --- clean-up -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        for containerd in self.containerds.values():  # before the lab: their sandboxes DEL through it
            with suppress(Exception):
                containerd.stop()
        for podman in self.podmans.values():  # the same: their containers DEL through the lab
            with suppress(Exception):
                podman.close()
        for driver in self.drivers.values():
            with suppress(Exception):
                driver.close()
        for agent in self.agents.values():
            with suppress(Exception):
                agent.stop()
        for name in (self.prefix, f"{self.prefix}f"):  # the labs (removing an absent one does nothing)
            with suppress(Exception):
                api.remove(name)
        netns.sweep(self.prefix)
        remove_cache_files(self.prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)


def container_id(pod: Pod) -> str:
    """The container ID cnitool derives from the pod's netns path."""
    from support.labnode import cnitool_container_id
    return cnitool_container_id(netns.path(pod.netns))


def handler_times(log_file: str, pods: list[Pod] | None = None) -> dict:
    """p50 of each plugin's in-process handler time (skel's duration_ms: after start-up and imports),
    of the given pods' operations only if `pods` is given."""
    wanted = {container_id(p) for p in pods} if pods is not None else None
    found: dict[str, list[float]] = {}
    with suppress(OSError):
        with open(log_file) as f:
            for line in f:
                with suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("msg") == "done" and "duration_ms" in rec and (
                            wanted is None or rec.get("containerID") in wanted):
                        found.setdefault(f"{rec['plugin']} {rec.get('command')}", []).append(rec["duration_ms"])
    return {k: round(percentile(v, 50), 1) for k, v in sorted(found.items())}


def remove_cache_files(prefix: str) -> None:
    """cnitool's result cache files of this run's networks (named '<prefix>-ours'/'<prefix>-ref')."""
    with suppress(FileNotFoundError):
        for name in os.listdir(CNI_CACHE):
            if name.startswith(prefix + "-"):
                with suppress(OSError):
                    os.unlink(os.path.join(CNI_CACHE, name))


def sweep_dead_runs() -> None:
    """Leftovers of bench runs killed with -9: containerd cgroup trees, labs (owner gone), namespaces,
    cache files."""
    from support import cri_world
    cri_world.sweep_orphans(TAG)
    api.sweep_orphans()
    netns.sweep_orphans(TAG)
    head = f"avc{TAG}"
    with suppress(FileNotFoundError):
        for name in os.listdir(CNI_CACHE):
            owner = name.split("-", 1)[0]
            if owner.startswith(head) and netns.PREFIX_RE.match(owner):
                with suppress(ValueError):
                    if not os.path.exists(f"/proc/{int(owner[len(head):], 36)}"):
                        with suppress(OSError):
                            os.unlink(os.path.join(CNI_CACHE, name))


# ---------------------------------------------------------------------------------------------
# Report


def table(res: dict) -> str:
    seq, burst = res["sequential"], res["burst"]
    lines = [f"source: {res['source']['commit'][:12]} ({res['source']['dirty_files']} files changed since)",
             f"machine: {res['machine']['nproc']} x {res['machine']['cpu_model']}, kernel {res['machine']['kernel']}, "
             f"load {res['machine']['loadavg']} -> {res['machine'].get('loadavg_end')}",
             f"reference: {res['chains']['reference']}",
             f"ours:      {res['chains']['ours']}", ""]
    lines.append(f"CPU per op, ours / reference: ADD {res['add_cpu_ratio']}, DEL {res['del_cpu_ratio']}")
    lines.append(f"{'':<12}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'min':>8}{'max':>8}{'CPU ms/op':>11}")
    for key in ("ref", "ours"):
        for command in ("add", "del"):
            s = seq[key][command]
            lines.append(f"{key + ' ' + command.upper():<12}{s['p50']:>9.1f}{s['p90']:>9.1f}{s['p99']:>9.1f}"
                         f"{s['min']:>8.1f}{s['max']:>8.1f}{s['cpu_ms_mean']:>11.1f}")
    lines.append(f"per-pair ratio ours/ref (p10/p50/p90): ADD {seq['add_pair_ratio']['p10']}/{seq['add_pair_ratio']['p50']}/"
                 f"{seq['add_pair_ratio']['p90']}, DEL {seq['del_pair_ratio']['p10']}/{seq['del_pair_ratio']['p50']}/"
                 f"{seq['del_pair_ratio']['p90']}")
    lines.append(f"burst of {res['opts']['burst']} concurrent ADDs, wall ms: "
                 f"ref {burst['ref']['add_wall_ms']}, ours {burst['ours']['add_wall_ms']} "
                 f"(ratio per round {burst['add_round_ratios']})")
    sc = res["scale"]
    lines.append(f"scale ADD p50 ms: 1 assigned {sc['store_and_host']['node1']['add']}, {FILL} assigned "
                 f"{sc['store_and_host']['node2']['add']} (store only: {sc['store_only']['node1']['add']} vs "
                 f"{sc['store_only']['node2']['add']})")
    ec2 = res["ec2"]
    cri = res["cri"]
    lines.append(f"CRI pod cycle (Run + Status + Stop + Remove) p50 ms: ours {cri['ours']['p50']}, reference "
                 f"{cri['ref']['p50']} (p90 {cri['ours']['p90']} vs {cri['ref']['p90']}, {cri['ours']['n']} each)")
    pm = res["podman"]
    lines.append(f"podman run --rm p50 ms: ours {pm['ours']['p50']}, reference {pm['ref']['p50']} "
                 f"(p90 {pm['ours']['p90']} vs {pm['ref']['p90']}, {pm['ours']['n']} each; ratio {res['podman_cycle_ratio']})")
    lines.append(f"EC2 calls during {ec2['warm_ops']} warm ops: lab {sum(ec2['lab_calls'].values())}, "
                 f"agents {ec2['agent_calls']}, plugins {ec2['plugin_calls']}")
    for mode, fresh in res["fresh_node"].items():
        lines.append(f"fresh {FRESH_TYPE} node, {res['opts']['fresh_pods']} pods, {mode}: {fresh['seconds']} s, "
                     f"{fresh['ec2_calls']} EC2 calls ({fresh['enis']} ENIs, {fresh['prefixes']} prefixes, "
                     f"{fresh['addresses']} addresses)")
    st = res["startup"]
    lines.append("exec start-up (VERSION) p50 ms: " + ", ".join(f"{k} {v['p50_ms']:.0f}" for k, v in st.items()))
    for phase, times in res["plugin_handler_ms"].items():
        lines.append(f"in-handler p50 ms, {phase}: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    lines.append("")
    lines.append(f"{'target':<40}{'measured':>10}{'limit':>8}  result")
    for key, limit, what in TARGETS:
        value = res[key]
        met = value <= limit
        lines.append(f"{what:<40}{value:>10.2f}{limit:>8.1f}  {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=40, help="pods per chain for ADD and for DEL (>= 30)")
    parser.add_argument("--burst", type=int, default=32, help="concurrent ADDs per burst")
    parser.add_argument("--bursts", type=int, default=2, help="bursts per chain")
    parser.add_argument("--scale-pods", type=int, default=20, help="ADD/DEL cycles per node in the scale step")
    parser.add_argument("--startup-runs", type=int, default=20, help="VERSION execs per program")
    parser.add_argument("--cri-cycles", type=int, default=20, help="CRI pod cycles per chain (step 9)")
    parser.add_argument("--podman-cycles", type=int, default=20, help="podman run --rm cycles per chain (step 10)")
    parser.add_argument("--fresh-pods", type=int, default=100, help="pods on a fresh node per mode (step 8)")
    parser.add_argument("--no-zygote", dest="zygote", action="store_false",
                        help="our plugins start Python themselves: the agents start no zygote")
    parser.add_argument("--output", default=RESULTS)
    opts = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (namespaces, lab)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sweep_dead_runs()
    started = time.time()
    bench = Bench(opts)
    try:
        res = bench.run()
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        say("cleaning up")
        bench.cleanup()
    res["opts"] = vars(opts)
    res["seconds"] = round(time.time() - started, 1)
    res["targets"] = {key: {"limit": limit, "value": res[key], "met": res[key] <= limit} for key, limit, _ in TARGETS}
    with open(opts.output, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
        f.write("\n")
    print()
    print(table(res))
    print(f"\nwrote {os.path.relpath(opts.output, ROOT)} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
