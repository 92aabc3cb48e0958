"""Running our plugins and the agent inside a lab node, as a runtime and the DaemonSet would."""

import json
import os
import signal
import subprocess
import sys
import time

BIN = os.path.join(sys.prefix, "bin")
NETWORK = "aws-vpc"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNITOOL = os.path.join(ROOT, ".tools", "bin", "cnitool")
REFERENCE_PLUGINS = "/usr/lib/cni"


class LabNode:
    """One lab node with its own data dir and log file (under the test's tmp_path)."""

    def __init__(self, lab, node, tmp_path, bin_dir=BIN, **ipam_settings):
        self.lab, self.node = lab, node
        self.bin_dir = bin_dir  # our programs: the venv's console scripts, or the frozen bundle's links
        self.data_dir = str(tmp_path / f"{node}-data")
        self.log_file = str(tmp_path / f"{node}-plugin.log")
        self.ipam_settings = {"ipCooldownPeriod": 0, **ipam_settings}
        self.agents = []

    def write_conflist(self, plugins=None, version="1.0.0", source="10-aws-vpc.conflist", **overrides) -> str:
        """A conflist of conflists/ (default: the default chain) with its paths moved into this test's
        tmp dir, keeping the plugins named (default: all, in the file's order); `overrides` are extra
        keys per plugin type."""
        with open(os.path.join(ROOT, "conflists", source)) as f:
            conflist = json.load(f)
        conflist["cniVersion"] = version
        conflist["plugins"] = [p for p in conflist["plugins"] if plugins is None or p["type"] in plugins]
        for plugin in conflist["plugins"]:
            plugin["pluginLogFile"] = self.log_file
            for section in (plugin, plugin.get("ipam", {})):
                if "dataDir" in section:
                    section["dataDir"] = self.data_dir
            if "ipam" in plugin:
                plugin["ipam"].update(self.ipam_settings)
            plugin.update(overrides.get(plugin["type"], {}))
        conf_dir = self.data_dir + "-net.d"
        os.makedirs(conf_dir, exist_ok=True)
        with open(os.path.join(conf_dir, "10-aws-vpc.conflist"), "w") as f:
            json.dump(conflist, f)
        self.conf_dir = conf_dir
        self.conflist = conflist
        return conf_dir

    def cnitool(self, command, pod_netns, pod_name, cap_args=None, check=False):
        """`cnitool <command> aws-vpc /var/run/netns/<pod_netns>` run in the node; (rc, stdout, stderr)."""
        env = {"NETCONFPATH": self.conf_dir, "CNI_PATH": f"{self.bin_dir}:{REFERENCE_PLUGINS}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_name}"}
        if cap_args is not None:
            env["CAP_ARGS"] = json.dumps(cap_args)
        proc = self.lab.exec(self.node, [CNITOOL, command, NETWORK, f"/var/run/netns/{pod_netns}"], env=env,
                             check=check)
        return proc.returncode, proc.stdout, proc.stderr

    def probe(self, host_netns, *argv):
        """`python -m vpclab.probe ARGV` in a namespace (a pod's, or a lab host's); True if it succeeded."""
        proc = subprocess.run(["ip", "netns", "exec", host_netns, sys.executable, "-m", "vpclab.probe", *argv],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        return proc.returncode == 0

    @property
    def instance_id(self):
        return next(n["instance_id"] for n in self.lab.status()["nodes"] if n["name"] == self.node)

    def ipam_conf(self, version="1.0.0", **extra):
        return {"cniVersion": version, "name": NETWORK, "type": "aws-vpc-bridge", "pluginLogFile": self.log_file,
                "ipam": {"type": "aws-eni-ipam", "dataDir": self.data_dir, **self.ipam_settings, **extra}}

    def plugin(self, name, command, conf, cid="c1", ifname="eth0", netns="/var/run/netns/none",
               args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web", env=None):
        environ = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
                   "CNI_PATH": self.bin_dir, "CNI_ARGS": args, **(env or {})}
        proc = self.lab.exec(self.node, [os.path.join(self.bin_dir, name)], input=json.dumps(conf), env=environ,
                             check=False)
        out = proc.stdout.strip()
        return proc.returncode, (json.loads(out) if out else None)

    def ipam(self, command, cid="c1", **conf_extra):
        return self.plugin("aws-eni-ipam", command, self.ipam_conf(**conf_extra), cid=cid)

    def start_agent(self, interval=0.3, metrics="", **env):
        """The agent in the node, settings from its environment as the DaemonSet passes them."""
        environ = self.lab.exec_env(self.node, {"AWS_VPC_CNI_DATA_DIR": self.data_dir, "IP_COOLDOWN_PERIOD": "0",
                                                "AWS_VPC_CNI_AGENT_LOG_FILE": self.log_file + ".agent", **env})
        proc = subprocess.Popen(self.lab.exec_argv(self.node, [os.path.join(self.bin_dir, "aws-vpc-cni-agent"), "run",
                                                               "--interval", str(interval), "--metrics-address", metrics]),
                                env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.agents.append(proc)
        deadline = time.time() + 30
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited: {proc.stderr.read()}")
            try:
                if self.agent_status()["ticks"] > 0:
                    return proc
            except (subprocess.CalledProcessError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError("agent did not complete a tick in 30 s")

    def agent_status(self):
        proc = self.lab.exec(self.node, [os.path.join(self.bin_dir, "aws-vpc-cni-agent"), "status", "--json"],
                             env={"AWS_VPC_CNI_DATA_DIR": self.data_dir})
        return json.loads(proc.stdout)

    def stop_agents(self, sig=signal.SIGTERM):
        for proc in self.agents:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stderr.close()
        self.agents = []

    def ec2_enis(self):
        """EC2's own view: {eni_id: (device_index, [secondary IPs])} of this node's instance."""
        found = self.lab.ec2("DescribeNetworkInterfaces",
                             Filters=[{"Name": "attachment.instance-id", "Values": [self.instance_id]}])
        return {e["NetworkInterfaceId"]: (e["Attachment"]["DeviceIndex"],
                                          sorted(a["PrivateIpAddress"] for a in e["PrivateIpAddresses"] if not a["Primary"]))
                for e in found["NetworkInterfaces"]}

    def wait_for(self, predicate, timeout=30, what="condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
