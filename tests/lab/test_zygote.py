"""The plugin zygote (build/zygote.py, build/launcher.c; issue 19): a plugin runs in a fork of the
resident process when one serves it, exactly as it would have run alone, and starts Python itself
when none is there, the zygote refuses, or the zygote is gone before the plugin started."""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from cnicore.store import Store
from support.bundle_sources import load
from support.labnode import NETWORK, LabNode
from support.paths import BUNDLE

ZYGOTE_SOCKET = "AWS_VPC_CNI_ZYGOTE_SOCKET"
HEADER = load("zygote").HEADER  # what the launcher sends
VERSION_STDIN = '{"cniVersion": "1.0.0"}'


class Zygote:
    """aws-vpc-cni-zygote with --trace, started in a lab node as the agent starts it: its stdin is
    the pipe whose end tells it the agent is gone."""

    def __init__(self, lab, node: str, path: str, exe: str = os.path.join(BUNDLE, "aws-vpc-cni"), wrap=()):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(lab.exec_argv(node, [*wrap, exe, "aws-vpc-cni-zygote", "--socket", path,
                                                          "--parent-fd", "0", "--trace"]),
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """The first line that holds `text`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found or time.monotonic() > deadline:
                    break
                if self.proc.poll() is not None and not self.lines[-1:]:
                    break
                self.changed.wait(0.2)
        assert found, f"no zygote line with {text!r}: {self.lines}"
        return found

    def served(self) -> list[str]:
        """'<program> <command>' of each request a child ran."""
        return [line.split(": ", 1)[1].rsplit(" runs in child", 1)[0] for line in self.lines if " runs in child " in line]

    def loaded(self, children: int, timeout: float = 10) -> list[str]:
        """What `children` children said they still had to load, once each has said it."""
        deadline = time.monotonic() + timeout
        while True:
            said = [line.split(" modules: ", 1)[1] for line in self.lines if " modules: " in line]
            if len(said) >= children or time.monotonic() > deadline:
                return said
            time.sleep(0.05)

    def close(self) -> int:
        self.proc.stdin.close()  # the agent's end: the zygote exits
        return self.proc.wait(10)


@pytest.fixture
def zygotes():
    made = []

    def make(*args, **kwargs) -> Zygote:
        zygote = Zygote(*args, **kwargs)
        made.append(zygote)
        return zygote

    yield make
    for zygote in made:
        if zygote.proc.poll() is None:
            zygote.proc.kill()
            zygote.proc.wait()


def version(lab, exe: str, socket_path: str, wrap=()) -> subprocess.CompletedProcess:
    return lab.exec("node1", [*wrap, exe], env={"CNI_COMMAND": "VERSION", ZYGOTE_SOCKET: socket_path},
                    input=VERSION_STDIN, check=False)


def test_the_chain_runs_in_the_zygote_as_it_runs_alone(frozen, fresh_lab, tmp_path, make_netns, zygotes):
    """ADD, CHECK and DEL of two pods (one with a hostPort) through cnitool, each plugin in a child of
    the zygote, which takes the caller's netns, root, fds and environment: the pods get VPC addresses
    and reach each other, and DEL leaves nothing; then the same without the zygote. No child loads a
    module: the zygote has them all (build/zygote.py's HANDLER_MODULES)."""
    node = LabNode(fresh_lab, "node1", tmp_path, bin_dir=frozen)
    node.write_conflist()
    assert node.ipam("ADD", cid="warm")[0] == 0  # a warm pool: no ADD below needs EC2 (and boto3)
    path = str(tmp_path / "zygote.sock")
    zygote = zygotes(fresh_lab, "node1", path)
    zygote.wait_for("serving")
    results = {}
    for mode, env in (("zygote", {ZYGOTE_SOCKET: path}), ("alone", {ZYGOTE_SOCKET: ""})):
        pods = [make_netns(f"z{mode[0]}{i}") for i in range(2)]
        ports = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
        for i, pod in enumerate(pods):
            rc, out, err = node.cnitool("add", pod, f"{mode}-{i}", env=env, cap_args=ports if i else None)
            assert rc == 0, err + out
            results[(mode, i)] = json.loads(out)
        ips = [results[(mode, i)]["ips"][0]["address"].split("/")[0] for i in range(2)]
        assert all(ip.startswith("10.0.") for ip in ips), ips
        assert node.probe(pods[0], "ping", ips[1])
        assert len(node.view().dnat_entries) == 1
        for i, pod in enumerate(pods):
            rc, out, err = node.cnitool("check", pod, f"{mode}-{i}", env=env, cap_args=ports if i else None)
            assert rc == 0, err + out
            rc, out, err = node.cnitool("del", pod, f"{mode}-{i}", env=env, cap_args=ports if i else None)
            assert rc == 0, err + out
        assert node.view().pod_leftovers() == []
    # every plugin of the chain ran in a child while the zygote was asked, and never otherwise
    chain = ("aws-vpc-bridge", "aws-snat", "portmap-compat")
    assert sorted(zygote.served()) == sorted(f"{p} {c}" for p in chain for c in ("ADD", "CHECK", "DEL") for _ in range(2))
    assert zygote.loaded(18) == [""] * 18, "; ".join(zygote.loaded(18))
    assert not any("killed" in line for line in zygote.lines), zygote.lines
    # the results have one shape: the pod's veth in the pod netns, the host's named by the prefix
    for mode in ("zygote", "alone"):
        interfaces = results[(mode, 0)]["interfaces"]
        assert interfaces[0]["name"].startswith("eni") and interfaces[1]["sandbox"].startswith("/var/run/netns/")
    assert zygote.close() == 0
    assert not os.path.exists(path), "the zygote removes its socket when it exits"


def test_a_plugin_starts_python_itself_when_no_zygote_serves_it(frozen, lab, tmp_path):
    """No socket, a dead socket, a zygote that says no, one that hangs up, one that never answers
    (the launcher waits 2 s): each time the plugin answers VERSION itself. A zygote that said yes and
    vanished after the go is an error, and the plugin does not run a second time."""
    exe = os.path.join(frozen, "aws-eni-ipam")
    requests = []

    def serve(path: str, behaviour: str) -> threading.Thread:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def run():
            conn, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(conn, HEADER.size, 8, socket.MSG_WAITALL)
            fields = HEADER.unpack(data)
            payload = b""
            while len(payload) < fields[-1]:
                payload += conn.recv(fields[-1] - len(payload))
            requests.append((fields, len(fds), payload.split(b"\0")[0]))
            for fd in fds:
                os.close(fd)
            if behaviour == "refuse":
                conn.sendall(b"R")
            elif behaviour == "silent":
                time.sleep(3)
            elif behaviour == "vanish":
                conn.sendall(b"A")
                assert conn.recv(1) == b"G"
            conn.close()
            listener.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    dead = str(tmp_path / "dead.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(dead)
    stale.close()
    for path in (str(tmp_path / "none.sock"), dead):
        proc = version(lab, exe, path)
        assert proc.returncode == 0 and "supportedVersions" in proc.stdout, proc.stderr
    for behaviour in ("refuse", "hang-up", "silent"):
        path = str(tmp_path / f"{behaviour}.sock")
        thread = serve(path, behaviour)
        started = time.monotonic()
        proc = version(lab, exe, path)
        assert proc.returncode == 0 and "supportedVersions" in proc.stdout, (behaviour, proc.stderr)
        assert (time.monotonic() - started > 1.5) == (behaviour == "silent")
        thread.join(5)
    path = str(tmp_path / "vanish.sock")
    thread = serve(path, "vanish")
    proc = version(lab, exe, path)
    thread.join(5)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert "ended without an exit status" in proc.stderr
    # each request was well formed: the magic, stdin, stdout, stderr, the root and the netns, the program
    assert [(fields[0], fds, program) for fields, fds, program in requests] == [(b"AVZ2", 5, b"aws-eni-ipam")] * 4


def test_a_killed_plugin_dies_in_the_zygote_too_and_leaves_nothing(frozen, fresh_lab, tmp_path, zygotes):
    """The runtime kills a plugin whose child runs in the zygote (here: waiting for the store lock the
    test holds): the zygote kills the child at once, and the ADD never happens. A served ADD records
    as its owner the process that started the plugin, as an unserved one does."""
    node = LabNode(fresh_lab, "node1", tmp_path, bin_dir=frozen)
    assert node.ipam("ADD", cid="first")[0] == 0  # the IPAM grows the pool from EC2 (no agent)
    path = str(tmp_path / "zygote.sock")
    zygote = zygotes(fresh_lab, "node1", path)
    zygote.wait_for("serving")
    conf = node.ipam_conf()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "killed", "CNI_NETNS": "/var/run/netns/none", "CNI_IFNAME": "eth0",
           "CNI_PATH": frozen, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
           ZYGOTE_SOCKET: path}
    with Store(node.data_dir, NETWORK).locked():
        plugin = subprocess.Popen(fresh_lab.exec_argv("node1", [os.path.join(frozen, "aws-eni-ipam")]),
                                  env=fresh_lab.exec_env("node1", env), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        plugin.stdin.write(json.dumps(conf).encode())
        plugin.stdin.close()
        child = int(zygote.wait_for("aws-eni-ipam ADD runs in child").rsplit(" ", 1)[1])
        time.sleep(0.3)  # the child is blocked on the lock
        assert os.path.exists(f"/proc/{child}")
        plugin.send_signal(signal.SIGKILL)
        plugin.wait(10)
        zygote.wait_for(f"the caller of child {child} is gone; killed it")
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{child}"), "the zygote reaps the child it killed"
    plugin.stdout.close()
    plugin.stderr.close()
    time.sleep(0.3)
    assigned = [e for eni in node.store()["enis"].values() for e in eni["ips"].values() if e["state"] == "assigned"]
    assert [e["container_id"] for e in assigned] == ["first"]
    # served by the zygote, the IPAM records the runtime's view: the process that exec'd it (here this
    # test, through ip netns exec) owns the attachment, not the zygote's short-lived child
    assert node.plugin("aws-eni-ipam", "ADD", conf, cid="owned", env={ZYGOTE_SOCKET: path})[0] == 0
    zygote.wait_for("aws-eni-ipam ADD runs in child")
    owned = [e for eni in node.store()["enis"].values() for e in eni["ips"].values() if e.get("container_id") == "owned"]
    assert [e["owner"][0] for e in owned] == [os.getpid()]


def test_the_zygote_serves_only_callers_it_can_stand_in_for(frozen, lab, tmp_path, zygotes):
    """Refused, and the plugin answers itself: another build of the bundle (a copy), another pid
    namespace, a caller without a capability the zygote has (what the kernel says of the caller, not
    what it says of itself). A zygote that could serve no runtime (no CAP_SYS_ADMIN) does not start."""
    exe = os.path.join(frozen, "aws-eni-ipam")
    path = str(tmp_path / "zygote.sock")
    zygote = zygotes(lab, "node1", path)
    zygote.wait_for("serving")
    copy = tmp_path / "copy"
    shutil.copytree(BUNDLE, copy, symlinks=True)
    os.symlink(copy / "aws-vpc-cni", tmp_path / "aws-eni-ipam")
    for wrap, exe_used, reason in (((), str(tmp_path / "aws-eni-ipam"), "another build of the bundle"),
                                   (("unshare", "--pid", "--fork"), exe, "another pid namespace"),
                                   (("setpriv", "--bounding-set=-sys_module", "--"), exe,
                                    "the caller lacks capabilities this zygote has (0x10000)")):
        proc = version(lab, exe_used, path, wrap)
        assert proc.returncode == 0 and "supportedVersions" in proc.stdout, proc.stderr
        zygote.wait_for(reason)
    proc = version(lab, exe, path)
    assert proc.returncode == 0 and zygote.served() == ["aws-eni-ipam VERSION"]

    unable = zygotes(lab, "node1", str(tmp_path / "unable.sock"), wrap=("setpriv", "--bounding-set=-sys_admin", "--"))
    assert unable.proc.wait(30) == 3
    unable.wait_for("not started: without CAP_SYS_ADMIN")
    assert not os.path.exists(tmp_path / "unable.sock")


def test_the_agent_runs_the_zygote_and_takes_it_along_when_it_dies(frozen, fresh_lab, tmp_path):
    """The frozen agent starts the zygote on <dataDir>/zygote.sock (its pid in the status), which
    serves the chain; killed with SIGKILL, the agent leaves no zygote behind, and plugins go on
    alone. AWS_VPC_CNI_PLUGIN_ZYGOTE=false starts none."""
    node = LabNode(fresh_lab, "node1", tmp_path, bin_dir=frozen)
    agent = node.start_agent()
    pid = node.wait_for(lambda: node.agent_status()["zygote"]["pid"], what="the zygote's pid in the status")
    path = os.path.join(node.data_dir, "zygote.sock")
    node.wait_for(lambda: os.path.exists(path), what="the zygote's socket")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[1:4] == [b"aws-vpc-cni-zygote", b"--socket", path.encode()]
    assert not _reaped_children(pid)
    assert version(fresh_lab, os.path.join(frozen, "aws-snat"), path).returncode == 0
    node.wait_for(lambda: _reaped_children(pid), what="a child of the zygote, reaped")
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    node.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="the zygote to exit with the agent")
    assert not os.path.exists(path), "the zygote removes its socket when it exits"
    assert version(fresh_lab, os.path.join(frozen, "aws-snat"), path).returncode == 0
    node.stop_agents()
    node.start_agent(AWS_VPC_CNI_PLUGIN_ZYGOTE="false")
    time.sleep(1)
    assert node.agent_status()["zygote"] == {"pid": None, "starts": 0}
    assert not os.path.exists(path)
    node.stop_agents()


def _reaped_children(pid: int) -> bool:
    """Whether the kernel counted a child of `pid` as waited for (minor faults of children > 0)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[8]) > 0  # cminflt: faults of waited-for children


def test_containerd_runs_pods_through_the_zygote(frozen, fresh_lab, tmp_path, zygotes):
    """containerd's CRI as kubelet drives it, on our chain with the zygote serving: containerd runs in a
    mount namespace of its own, where alone its pods' netns mounts and its /var/lib/cni exist, so the
    children see them only through the root they take from the launcher. Two pods get VPC addresses
    and go again with Stop and Remove, every plugin run in a child, and nothing is left."""
    from conftest import RUN_PREFIX
    from support import cri_world
    node = LabNode(fresh_lab, "node1", tmp_path, bin_dir=frozen)
    assert node.ipam("ADD", cid="warm")[0] == 0  # a warm pool
    bin_dir = cri_world.chain_bin_dir(str(tmp_path / "bin"))
    conf_dir = str(tmp_path / "net.d")
    cri_world.write_agent_conflist(conf_dir, node.data_dir, node.log_file)
    path = str(tmp_path / "zygote.sock")
    zygote = zygotes(fresh_lab, "node1", path)
    zygote.wait_for("serving")
    containerd = cri_world.Containerd(fresh_lab, "node1", str(tmp_path / "containerd"), bin_dir, conf_dir,
                                      f"{RUN_PREFIX}-zcri", env={ZYGOTE_SOCKET: path})
    containerd.start()
    try:
        for i in range(2):
            pod = containerd.run_pod(f"zygote-{i}")
            assert pod.ip.startswith("10.0."), pod
            # the path containerd gave the plugins names the pod's netns only in containerd's mounts
            assert os.stat(pod.netns_path).st_ino != os.stat(f"/proc/{pod.pid}/ns/net").st_ino
            containerd.stop_pod(pod)
            containerd.remove_pod(pod)
    finally:
        containerd.stop()
    served = zygote.served()
    for plugin in ("aws-vpc-bridge", "aws-snat", "portmap-compat"):
        assert served.count(f"{plugin} ADD") == 2 and served.count(f"{plugin} DEL") >= 2, served
    assert node.view().pod_leftovers() == []
