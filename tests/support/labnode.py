"""Running our plugins and the agent inside a lab node, as a runtime and the DaemonSet would."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from support.paths import ROOT

BIN = os.path.join(sys.prefix, "bin")
NETWORK = "aws-vpc"
CNITOOL = os.path.join(ROOT, ".tools", "bin", "cnitool")


def cnitool_container_id(netns_path: str) -> str:
    """The container ID cnitool derives from a netns path: 'cnitool-' and the first 10 bytes of its
    SHA-512, in hex."""
    import hashlib
    return "cnitool-" + hashlib.sha512(netns_path.encode()).hexdigest()[:20]
REFERENCE_PLUGINS = "/usr/lib/cni"
PREFIX = "eni"  # the host veths' name prefix the tests' conflists use


class LabNode:
    """One lab node with its own data dir and log file (under the test's tmp_path)."""

    def __init__(self, lab, node, tmp_path, bin_dir=BIN, **ipam_settings):
        self.lab, self.node = lab, node
        self.bin_dir = bin_dir  # our programs: the venv's console scripts, or the frozen bundle's links
        self.data_dir = str(tmp_path / f"{node}-data")
        self.log_file = str(tmp_path / f"{node}-plugin.log")
        self.ipam_settings = {"ipCooldownPeriod": 0, **ipam_settings}
        self.agents = []

    def store(self) -> dict | None:
        try:
            with open(os.path.join(self.data_dir, f"{NETWORK}.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def view(self) -> "NodeView":
        # whole saves: `iptables-legacy-save -t nat` would create the legacy nat table in the node
        script = ("ip -j -d link show; echo @@; ip -j -4 route show table all; echo @@; ip -j -4 rule show; "
                  "echo @@; iptables-nft-save 2>/dev/null; echo @@; iptables-legacy-save 2>/dev/null; true")
        return NodeView.parse(self.lab.exec(self.node, ["sh", "-c", script]).stdout)

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

    def cnitool(self, command, pod_netns, pod_name, cap_args=None, check=False, env=None):
        """`cnitool <command> aws-vpc /var/run/netns/<pod_netns>` run in the node; (rc, stdout, stderr).
        `env`: more environment for cnitool, which the plugins inherit."""
        env = {**(env or {}), "NETCONFPATH": self.conf_dir, "CNI_PATH": f"{self.bin_dir}:{REFERENCE_PLUGINS}",
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

    def start_agent(self, interval=0.3, metrics="", introspection="", conf_dir=None, **env):
        """The agent in the node, settings from its environment as the DaemonSet passes them.
        `metrics`, `introspection`: HOST:PORT, '' for off, None for the agent's default; `conf_dir`:
        where it writes the conflist once its pool can serve (None: nowhere)."""
        environ = self.lab.exec_env(self.node, {"AWS_VPC_CNI_DATA_DIR": self.data_dir, "IP_COOLDOWN_PERIOD": "0",
                                                "AWS_VPC_K8S_CNI_LOG_FILE": self.log_file + ".agent", **env})
        options = [arg for flag, value in (("--metrics-address", metrics), ("--introspection-address", introspection),
                                           ("--conf-dir", conf_dir))
                   if value is not None for arg in (flag, value)]
        proc = subprocess.Popen(self.lab.exec_argv(self.node, [os.path.join(self.bin_dir, "aws-vpc-cni-agent"), "run",
                                                               "--interval", str(interval), *options]),
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

    def http_get(self, url):
        """GET `url` from inside the node's network namespace (the completed process; its stdout the body)."""
        return self.lab.exec(self.node, [sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                                         f"urllib.request.urlopen({url!r}, timeout=5).read().decode())"], check=False)

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


@dataclass
class NodeView:
    veths: dict[str, str | None]           # our-prefix veth name -> alias
    links: int
    routes: dict[str, str]                  # pod IP -> dev, /32 routes in main through our veths
    route_count: int
    rules_to: set[str]                      # rule 512 to <ip>
    rules_from: dict[str, str]              # rule 1536 from <ip> -> table
    rule_count: int
    dnat_chains: set[str]                   # CNI-DN-* chains
    dnat_entries: dict[str, str]            # container ID -> chain, from the entry rules' comments
    nat_rules: list[str]
    rule_lines: int                         # '-A' lines in every table, nft + legacy

    @classmethod
    def parse(cls, text: str) -> "NodeView":
        links, routes, rules, nft, legacy = (text.split("@@\n") + [""] * 5)[:5]
        links, routes, rules = json.loads(links), json.loads(routes), json.loads(rules)
        veths = {link["ifname"]: link.get("ifalias") for link in links
                 if link["ifname"].startswith(PREFIX) and link.get("linkinfo", {}).get("info_kind") == "veth"}
        pod_routes = {r["dst"]: r["dev"] for r in routes
                      if r.get("table", "main") == "main" and r.get("dev", "").startswith(PREFIX)
                      and "/" not in r["dst"] and r["dst"] != "default"}
        rules_to = {r["dst"] for r in rules if r["priority"] == 512 and "dst" in r}
        rules_from = {r["src"]: str(r["table"]) for r in rules if r["priority"] == 1536 and r.get("src") != "all"}
        nat_text = _table(nft, "nat") + _table(legacy, "nat")
        nat = [line for line in nat_text if line.startswith("-A ")]
        chains = {line.split()[0][1:] for line in nat_text if line.startswith(":CNI-DN-")}
        entries = {}
        for line in nat:
            if line.startswith("-A CNI-HOSTPORT-DNAT ") and f'dnat name: \\"{NETWORK}\\" id: \\"' in line:
                cid = line.split('id: \\"')[1].split('\\"')[0]
                entries[cid] = line.split(" -j ")[-1].strip()
        lines = sum(1 for line in (nft + legacy).splitlines() if line.startswith("-A "))
        return cls(veths, len(links), pod_routes, len(routes), rules_to, rules_from, len(rules), chains, entries,
                   nat, lines)

    def pod_leftovers(self) -> list[str]:
        """Everything per pod that is on the node."""
        found = [f"veth {name} (alias {alias!r})" for name, alias in self.veths.items()]
        found += [f"route {ip} dev {dev}" for ip, dev in self.routes.items()]
        found += [f"rule 512 to {ip}" for ip in self.rules_to]
        found += [f"rule 1536 from {ip} table {t}" for ip, t in self.rules_from.items()]
        found += [f"chain {c}" for c in self.dnat_chains]
        found += [f"DNAT entry for {cid}" for cid in self.dnat_entries]
        return found


def _table(saved: str, table: str) -> list[str]:
    """The lines of one table in iptables-save output."""
    out, inside = [], False
    for line in saved.splitlines():
        if line.startswith("*"):
            inside = line[1:] == table
        elif inside and line != "COMMIT":
            out.append(line)
    return out
