"""`make demo`: the whole product on the VPC lab, in a few minutes, saying what it does as it goes.

Boots a two-node lab (m5.large), installs the frozen bundle's program links and the conflist on each
node as the DaemonSet's init step would, starts the node agent on each node, runs pods with the real
cnitool (enough for a node's second ENI to be attached and used), then shows:
  - the pool per node (the agent's status table),
  - a ping matrix between pods on both nodes, on primary and secondary ENIs, and their nodes,
  - what the internet host sees as the source of a pod's traffic, with SNAT and with external SNAT,
  - a hostPort reaching a pod from the other node,
and removes everything it made. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import netns
from .api import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_BIN = os.path.join(ROOT, "dist", "bin")
CNITOOL = os.path.join(ROOT, ".tools", "bin", "cnitool")
REFERENCE = "/usr/lib/cni"
PODS_PER_NODE = 10  # on an m5.large the 10th pod's IP sits on the node's second ENI
NETWORK = "aws-vpc"
POOL_GROWING = "the node agent was asked to grow the pool"  # aws-eni-ipam's code 11 when the pool is empty
ADD_RETRIES = 20


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


class DemoNode:
    """One lab node set up as the DaemonSet would: conflist written by the agent, agent running."""

    def __init__(self, lab: Lab, name: str, work: str):
        self.lab, self.name = lab, name
        self.data_dir = os.path.join(work, name, "data")
        self.conf_dir = os.path.join(work, name, "net.d")
        self.log = os.path.join(work, name, "plugin.log")
        self.agent = None
        self.pods: dict[str, tuple[str, str]] = {}  # pod name -> (netns, IP)

    def settings(self, **extra) -> dict:
        return {"AWS_VPC_CNI_DATA_DIR": self.data_dir, "AWS_VPC_K8S_PLUGIN_LOG_FILE": self.log, **extra}

    def program(self, name: str) -> str:
        return os.path.join(BUNDLE_BIN, name)

    def write_conflist(self, **extra) -> None:
        self.lab.exec(self.name, [self.program("aws-vpc-cni-agent"), "write-conflist", self.conf_dir],
                      env=self.settings(**extra))

    def start_agent(self, **extra) -> None:
        env = self.lab.exec_env(self.name, self.settings(AWS_VPC_K8S_CNI_LOG_FILE=self.log + ".agent", **extra))
        self.agent = subprocess.Popen(self.lab.exec_argv(self.name, [self.program("aws-vpc-cni-agent"), "run",
                                                                     "--interval", "1", "--metrics-address", ""]),
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            status = self.status(quiet=True)
            if status and (status.get("figures") or {}).get("short") == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"the agent on {self.name} did not fill its warm pool")

    def restart_agent(self, **extra) -> None:
        """As the DaemonSet's roll does after a ConfigMap change: the agent converges the node's rules
        from its own environment every round."""
        self.stop_agent()
        self.start_agent(**extra)

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.terminate()
            self.agent.wait(10)
            self.agent = None

    def status(self, table: bool = False, quiet: bool = False):
        argv = [self.program("aws-vpc-cni-agent"), "status"] + ([] if table else ["--json"])
        proc = self.lab.exec(self.name, argv, env=self.settings(), check=not quiet)
        if proc.returncode != 0:
            return None
        return proc.stdout if table else json.loads(proc.stdout)

    def cnitool(self, command: str, pod: str, pod_netns: str, cap_args: dict | None = None) -> dict | None:
        env = {"NETCONFPATH": self.conf_dir, "CNI_PATH": f"{BUNDLE_BIN}:{REFERENCE}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={pod}"}
        if cap_args:
            env["CAP_ARGS"] = json.dumps(cap_args)
        for attempt in range(ADD_RETRIES + 1):
            proc = self.lab.exec(self.name, [CNITOOL, command, NETWORK, netns.path(pod_netns)], env=env, check=False)
            if proc.returncode == 0:
                return json.loads(proc.stdout) if command == "add" else None
            error = proc.stderr.strip() or proc.stdout
            if command != "add" or POOL_GROWING not in error or attempt == ADD_RETRIES:
                break
            # The warm pool ran dry faster than the agent's tick: the plugin answered "try again
            # later" (code 11) and nudged the agent; a runtime retries the sandbox, so do we.
            print(f"    {pod}: the warm pool is empty while the agent grows it; retrying as the kubelet would")
            time.sleep(1)
        raise RuntimeError(f"cnitool {command} {pod} on {self.name} failed: {error}")

    def add_pod(self, pod: str, pod_netns: str, cap_args: dict | None = None) -> str:
        netns.create(pod_netns)
        result = self.cnitool("add", pod, pod_netns, cap_args)
        ip = result["ips"][0]["address"].split("/")[0]
        self.pods[pod] = (pod_netns, ip)
        return ip

    def del_pod(self, pod: str) -> None:
        pod_netns, _ = self.pods.pop(pod)
        self.cnitool("del", pod, pod_netns)
        netns.delete(pod_netns)

    def stop(self) -> None:
        for pod in list(self.pods):
            try:
                self.del_pod(pod)
            except RuntimeError as exc:
                print(f"    (cleanup) {exc}")
        self.stop_agent()


def probe(host_netns: str, *argv: str) -> dict:
    proc = subprocess.run(["ip", "netns", "exec", host_netns, sys.executable, "-m", "vpclab.probe", *argv],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": proc.stderr.strip()}


def ping_matrix(targets: dict[str, tuple[str, str]]) -> bool:
    """targets: label -> (netns, IP). Prints who reaches whom; True if all do."""
    labels = list(targets)
    width = max(len(label) for label in labels) + 2
    print(" " * width + "".join(f"{label:>{width}}" for label in labels))
    all_ok = True
    for src in labels:
        row = f"{src:<{width}}"
        for dst in labels:
            if src == dst:
                row += f"{'-':>{width}}"
                continue
            ok = probe(targets[src][0], "ping", targets[dst][1]).get("ok", False)
            all_ok &= ok
            row += f"{'ok' if ok else 'FAIL':>{width}}"
        print(row)
    return all_ok


def seen_source(pod_netns: str, internet: dict) -> str:
    answer = probe(pod_netns, "echo", "tcp", internet["address"], str(internet["echo_port"]))
    return answer["answer"].split()[0] if answer.get("ok") else f"no answer ({answer.get('error')})"


def main() -> int:
    if not os.access(os.path.join(BUNDLE_BIN, "aws-vpc-bridge"), os.X_OK):
        print("the frozen bundle is missing: run `make demo` (it builds first) or `make build`", file=sys.stderr)
        return 2
    prefix = netns.new_prefix("d")
    work = tempfile.mkdtemp(prefix="aws-vpc-cni-demo-")
    checks: dict[str, bool] = {}
    nodes: dict[str, DemoNode] = {}
    say("booting the VPC lab: 2 m5.large nodes (3 ENIs x 9 pod IPs each), a VPC router, an internet host")
    started = time.monotonic()
    lab = Lab.up(name=prefix, nodes=2, owner_pid=os.getpid())
    try:
        status = lab.status()
        for node in status["nodes"]:
            print(f"    {node['name']}: {node['instance_id']} ({node['instance_type']}), primary IP {node['primary_ip']}")
        for name in ("node1", "node2"):
            nodes[name] = DemoNode(lab, name, work)
            say(f"{name}: agent writes the conflist and keeps the warm pool (WARM_ENI_TARGET=1)")
            nodes[name].write_conflist()
            nodes[name].start_agent()

        say(f"adding {PODS_PER_NODE} pods per node with cnitool (the 10th lands on the node's second ENI)")
        for name, node in nodes.items():
            for i in range(PODS_PER_NODE):
                node.add_pod(f"{name}-pod{i}", f"{prefix}-{name[-1]}p{i}")
            print(f"    {name}: " + ", ".join(ip for _, ip in node.pods.values()))
        time.sleep(1.5)  # let the agents top the pools up again
        for name, node in nodes.items():
            say(f"{name}: pool per ENI (aws-vpc-cni-agent status)")
            print("    " + node.status(table=True).strip().replace("\n", "\n    "))

        say("ping matrix: pods on primary (p0) and secondary (p9) ENIs of both nodes, and the nodes")
        targets = {}
        for name, node in nodes.items():
            targets[f"{name[-1]}:pod0"] = node.pods[f"{name}-pod0"]
            targets[f"{name[-1]}:pod9"] = node.pods[f"{name}-pod9"]
            targets[name] = (lab.netns(name), next(n["primary_ip"] for n in status["nodes"] if n["name"] == name))
        checks["ping matrix"] = ping_matrix(targets)

        internet = status["internet"]
        node1 = nodes["node1"]
        node1_ip = targets["node1"][1]
        say(f"SNAT on (default): what the internet host {internet['address']} sees as source")
        for pod in ("node1-pod0", "node1-pod9"):
            source = seen_source(node1.pods[pod][0], internet)
            print(f"    {pod} ({node1.pods[pod][1]}) -> seen as {source}")
            checks[f"SNAT {pod}"] = source == node1_ip
        say("external SNAT (AWS_VPC_K8S_CNI_EXTERNALSNAT=true): the conflist is re-rendered and the agent restarted "
            "with it (the DaemonSet's roll); the agent and the next pod converge the rules")
        node1.write_conflist(AWS_VPC_K8S_CNI_EXTERNALSNAT="true")
        node1.restart_agent(AWS_VPC_K8S_CNI_EXTERNALSNAT="true")
        ip = node1.add_pod("node1-ext", f"{prefix}-1ext")
        source = seen_source(node1.pods["node1-ext"][0], internet)
        print(f"    node1-ext ({ip}) -> seen as {source} (the pod's own VPC IP; a NAT gateway would translate it)")
        checks["external SNAT"] = source == ip
        node1.write_conflist()
        node1.restart_agent()

        say("hostPort: pod on node1 maps host port 8080 -> container port 80; node2 connects to node1:8080")
        ip = node1.add_pod("node1-web", f"{prefix}-1web",
                           cap_args={"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        server = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-1web", sys.executable, "-c",
                                   "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
                                   "s.bind(('0.0.0.0', 80)); s.listen(); c, a = s.accept(); c.sendall(('hello from the pod, you are %s' % a[0]).encode())"])
        time.sleep(0.5)
        reply = subprocess.run(["ip", "netns", "exec", lab.netns("node2"), sys.executable, "-c",
                                f"import socket; s=socket.create_connection(('{node1_ip}', 8080), timeout=5); print(s.recv(200).decode())"],
                               capture_output=True, text=True, timeout=30)
        server.kill()
        print(f"    node2 -> {node1_ip}:8080 -> pod {ip}:80 answered: {reply.stdout.strip() or reply.stderr.strip()[-200:]}")
        checks["hostPort"] = reply.stdout.startswith("hello from the pod")
    finally:
        say("cleaning up: DEL every pod, stop the agents, remove the lab")
        for node in nodes.values():
            node.stop()
        lab.down()
        if os.environ.get("DEMO_KEEP"):
            print(f"    kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f} s")
    for name, ok in checks.items():
        print(f"    {'PASS' if ok else 'FAIL'}  {name}")
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
