"""podman (Debian's 4.3) with its CNI backend, running containers on our frozen chain in a lab node.

A PodmanNode is a private podman for one lab node: storage, containers.conf, locks, events and tmp
dir all live in the test's tmp dir, so it shares nothing with any other podman on the machine. Its
CNI plugin dir holds links to the frozen bundle (dist/bin) and to the reference `loopback` (podman
brings up the container's lo with it); its network config dir holds the conflist the agent renders
(`aws-vpc-cni-agent write-conflist`) for the node's own data dir, since lab nodes share one
filesystem. podman runs inside the node's network namespace, entered with nsenter (`ip netns exec`
remounts /sys and hides the cgroup mounts runc needs), with the node's EC2 and IMDS endpoints in its
environment, which podman hands on to the plugins (the IPAM grows the pool from EC2 itself).

What podman does around CNI: it makes the container's netns itself (/run/netns/netns-<uuid>), runs
ADD before the container starts and DEL when the container stops, exits or is removed (conmon's exit
command `podman container cleanup`), and libcni caches each result in /var/lib/cni/results/
<network>-<container ID>-<ifname> until that DEL.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

from support.images import busybox_archive
from support.labnode import NETWORK, REFERENCE_PLUGINS, ROOT, LabNode
from support.paths import DIST_BIN

from vpclab import netns

PLUGINS = ("aws-vpc-bridge", "aws-eni-ipam", "aws-snat", "portmap-compat")
# Debian's Go plugins beside ours: podman brings up the container's lo with `loopback`; the others make
# the reference chain (bridge, host-local, portmap), which a PodmanNode's conflist may name.
GO_PLUGINS = ("loopback", "bridge", "host-local", "portmap")
IMAGE = "localhost/avc-busybox:1"
CNI_RESULTS = "/var/lib/cni/results"  # libcni's cache (podman 4.3 passes no cache dir of its own)
RUNC_STATE = "/run/runc"  # runc's default root, which podman uses

# containers.conf: only this file is read when CONTAINERS_CONF names it.
CONTAINERS_CONF = """\
[containers]
# As root, podman writes RLIMIT_NOFILE=1048576 and RLIMIT_NPROC (its built-in default_ulimits) into
# the OCI spec. Raising a limit above the hard limit podman itself runs with needs CAP_SYS_RESOURCE,
# which this machine does not grant, and runc fails ("error setting rlimit type 7: operation not
# permitted"). With an empty list podman 4.3 writes no rlimits: containers keep the ones they inherit.
default_ulimits = []

[network]
network_backend = "cni"
cni_plugin_dirs = [{plugin_dir}]
network_config_dir = {conf_dir}

[engine]
runtime = "runc"             # crun fails on this machine's hybrid cgroups
cgroup_manager = "cgroupfs"  # no systemd
events_logger = "file"
events_logfile_path = {events}
tmp_dir = {tmp_dir}          # the default, /run/libpod, is every root podman's
lock_type = "file"           # in tmp_dir; the default shm locks (/dev/shm/libpod_lock) are shared too
"""

STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = {graphroot}
runroot = {runroot}
"""


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


class PodmanNode(LabNode):
    """A private podman on one lab node; close() removes every container and checks nothing is left."""

    def __init__(self, lab, node, tmp_path, bin_dir=DIST_BIN, conflist: dict | None = None, env: dict | None = None):
        """`conflist`: the one network this podman knows (default: our default chain as the agent
        renders it for this node). podman runs VERSION on every plugin of every conflist in its
        network dir at each start, so a node's cost depends on what the dir holds. `env`: more
        environment for podman, which its plugins inherit."""
        super().__init__(lab, node, tmp_path, bin_dir=bin_dir)
        self.env = env or {}
        assert os.access(os.path.join(bin_dir, "aws-vpc-bridge"), os.X_OK), \
            "the frozen bundle is missing: `make build` (make test builds it first)"
        self.root = str(tmp_path / f"{node}-podman")
        self.plugin_dir = os.path.join(self.root, "cni-bin")
        self.conf_dir = os.path.join(self.root, "net.d")
        self.netns_path = netns.path(lab.netns(node))
        os.makedirs(self.plugin_dir)
        for name in PLUGINS:
            os.symlink(os.path.join(bin_dir, name), os.path.join(self.plugin_dir, name))
        for name in GO_PLUGINS:
            os.symlink(os.path.join(REFERENCE_PLUGINS, name), os.path.join(self.plugin_dir, name))
        if conflist is None:
            subprocess.run([os.path.join(bin_dir, "aws-vpc-cni-agent"), "write-conflist", self.conf_dir], check=True,
                           capture_output=True, env={"AWS_VPC_CNI_DATA_DIR": self.data_dir, "IP_COOLDOWN_PERIOD": "0",
                                                     "AWS_VPC_K8S_PLUGIN_LOG_FILE": self.log_file})
        else:
            os.makedirs(self.conf_dir)
            with open(os.path.join(self.conf_dir, f"{conflist['name']}.conflist"), "w") as f:
                json.dump(conflist, f)
        self.containers_conf = os.path.join(self.root, "containers.conf")
        self.storage_conf = os.path.join(self.root, "storage.conf")
        with open(self.containers_conf, "w") as f:
            f.write(CONTAINERS_CONF.format(plugin_dir=_toml(self.plugin_dir), conf_dir=_toml(self.conf_dir),
                                           events=_toml(os.path.join(self.root, "events.log")),
                                           tmp_dir=_toml(os.path.join(self.root, "tmp"))))
        with open(self.storage_conf, "w") as f:
            f.write(STORAGE_CONF.format(graphroot=_toml(os.path.join(self.root, "storage")),
                                        runroot=_toml(os.path.join(self.root, "run"))))
        self.known = {}  # container ID -> (netns path, pid) as last seen running, for the checks and close()

    # --- podman -----------------------------------------------------------------------------------
    def podman(self, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
        """`podman ARGS` in the node's network namespace."""
        env = self.lab.exec_env(self.node, {**self.env, "CONTAINERS_CONF": self.containers_conf,
                                            "CONTAINERS_STORAGE_CONF": self.storage_conf})
        proc = subprocess.run(["nsenter", f"--net={self.netns_path}", "podman", *args], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def load_image(self) -> None:
        """The static busybox image (tests/support/images.py), without an entrypoint: `run IMAGE CMD` runs CMD."""
        archive = os.path.join(self.root, "busybox.tar")
        busybox_archive(archive, IMAGE, entrypoint=())
        self.podman("load", "-q", "-i", archive)

    def run(self, command, *options) -> str:
        """`podman run -d --network aws-vpc OPTIONS IMAGE COMMAND`; the container ID."""
        cid = self.podman("run", "-d", "--network", NETWORK, *options, IMAGE, *command).stdout.strip()
        self.inspect(cid)  # remembers its netns and pid
        return cid

    def inspect(self, name: str) -> dict:
        found = json.loads(self.podman("inspect", name).stdout)[0]
        sandbox, pid = found["NetworkSettings"]["SandboxKey"], found["State"]["Pid"]
        known_sandbox, known_pid = self.known.get(found["Id"], ("", 0))
        self.known[found["Id"]] = (sandbox or known_sandbox, pid or known_pid)  # kept once stopped
        return found

    def address(self, name: str) -> str:
        """The container's address on our network, as podman has it from the ADD result."""
        return self.inspect(name)["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]

    def exec(self, name: str, *argv) -> str:
        return self.podman("exec", name, *argv).stdout

    @staticmethod
    def cache_entries(cid: str) -> list[str]:
        """libcni's cached results of the container on our network."""
        return glob.glob(os.path.join(CNI_RESULTS, f"{NETWORK}-{cid}-*"))

    def processes(self, cid: str = "") -> list[tuple[int, str]]:
        """Live processes of this podman (conmon, `podman container cleanup`), of one container if
        given: their command lines name its root (and the container ID)."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if self.root in cmdline and cid in cmdline and state not in "ZX":
                found.append((int(pid), cmdline))
        return found

    def wait_exited(self, cid: str = "", timeout: float = 60) -> None:
        """Wait for this podman's processes (of one container) to exit: conmon and the cleanup it
        starts may outlive the command that stopped the container."""
        self.wait_for(lambda: not self.processes(cid), timeout, f"conmon and podman cleanup {cid[:12]} to exit")

    def container_processes(self, cid: str) -> list[int]:
        """The container's init process if it still runs (its cgroup names the container ID)."""
        pid = self.known.get(cid, (None, 0))[1]
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                return [pid] if pid and cid in f.read() else []
        except OSError:
            return []

    def mounts(self) -> list[str]:
        """Mount points under this podman's root (storage), deepest first."""
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return sorted((p for p in points if p == self.root or p.startswith(self.root + "/")), key=len, reverse=True)

    def traces_of(self, cid: str) -> list[str]:
        """What of one container is still on the machine once podman removed it: its process, netns,
        runc state, libcni cache entry."""
        sandbox = self.known[cid][0]
        found = [f"container {cid[:12]} process {pid}" for pid in self.container_processes(cid)]
        found += [f"netns {sandbox}"] if os.path.exists(sandbox) else []
        found += [f"runc state {RUNC_STATE}/{cid}"] if os.path.exists(os.path.join(RUNC_STATE, cid)) else []
        return found + [f"libcni cache {path}" for path in self.cache_entries(cid)]

    def leftovers(self) -> list[str]:
        """Whatever of this podman is still on the machine, outside its tmp dir."""
        found = [f"process {pid}: {cmdline[:200]}" for pid, cmdline in self.processes()]
        found += [f"mount {point}" for point in self.mounts()]
        return found + [trace for cid in self.known for trace in self.traces_of(cid)]

    # --- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every container (their DELs run), then whatever podman failed to remove, also when
        podman itself fails; raise if podman left anything behind."""
        problems = []
        try:
            for cid in self.podman("ps", "-aq", "--no-trunc", check=False, timeout=60).stdout.split():
                with contextlib.suppress(AssertionError):  # gone meanwhile
                    self.inspect(cid)
            removed = self.podman("rm", "-af", "-t", "0", check=False)
            if removed.returncode != 0:
                problems.append(f"podman rm -af: {removed.stderr}")
            with contextlib.suppress(AssertionError):  # what still runs is listed below
                self.wait_exited()
            problems += self.leftovers()
        finally:
            self._force_clean()
        assert not problems, f"podman left behind: {problems}"

    def _force_clean(self) -> None:
        for pid, _ in self.processes():
            _kill(pid)
        for cid, (sandbox, _) in self.known.items():
            for pid in self.container_processes(cid):
                _kill(pid)
            if os.path.exists(sandbox):
                netns.delete(os.path.basename(sandbox))
            if os.path.exists(os.path.join(RUNC_STATE, cid)):
                subprocess.run(["runc", "delete", "--force", cid], check=False, capture_output=True)
            for path in self.cache_entries(cid):
                os.unlink(path)
        for point in self.mounts():
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def http_get(lab, host: str, address: str, port: int, timeout: float = 60) -> str:
    """The body of GET / from ADDRESS:PORT, asked from lab host `host`; retried until the server
    answers (a container's httpd starts after `podman run` returns) or `timeout` s pass."""
    script = ("import http.client, sys\n"
              "c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=5)\n"
              "c.request('GET', '/')\n"
              "r = c.getresponse()\n"
              "sys.stdout.write(r.read().decode() if r.status == 200 else '')\n")
    deadline = time.monotonic() + timeout
    while True:
        proc = lab.exec(host, [sys.executable, "-c", script, address, str(port)], check=False, timeout=30)
        if proc.returncode == 0 and proc.stdout:
            return proc.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"GET http://{address}:{port}/ from {host} failed for {timeout} s: {proc.stderr}")
        time.sleep(0.3)
