"""Run one of our plugins so that it SIGKILLs itself just before its N-th step (tests only).

A *step* is anything with an effect outside the process: a netlink request that changes something
(add/set/del/replace), a child process that changes something (the delegated IPAM plugin,
iptables-restore; not iptables-save or `ip route get`), the rename that commits a write of one of our
files (cnicore.fsutil.write_atomic: the state store, aws-snat's stamp and primary-interface cache),
and the answer on stdout. Killing the process before step N, for
N = 1, 2, ... until a run finishes without reaching N, visits every point at which a runtime's
SIGKILL can leave the node, one after the other: windows far too narrow for a randomly timed kill.

    RELIABILITY_CRASH="aws-vpc-bridge:ADD:5"   kill aws-vpc-bridge ADD before its 5th step
    RELIABILITY_CRASH_LOG=/path               one line per kill: "<plugin> <command> <n> <step>"

`write_wrappers(dir)` puts an executable per plugin into `dir`; put `dir` first in CNI_PATH (the
environment reaches every plugin of the chain through cnitool and through delegation).

The node agent (`dir/aws-vpc-cni-agent`) is killed around one EC2 action instead:
    RELIABILITY_CRASH="aws-vpc-cni-agent:before:CreateNetworkInterface"   before its first such request
    RELIABILITY_CRASH="aws-vpc-cni-agent:after:AttachNetworkInterface"    as soon as the first one succeeded
"""

from __future__ import annotations

import os
import signal
import sys

PLUGINS = {"aws-vpc-bridge": "aws_vpc_bridge.main", "aws-eni-ipam": "aws_eni_ipam.main",
           "aws-snat": "aws_snat.main", "portmap-compat": "portmap_compat.main"}
HERE = os.path.dirname(os.path.abspath(__file__))


AGENT = "aws-vpc-cni-agent"


def write_wrappers(directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    for plugin in (*PLUGINS, AGENT):
        path = os.path.join(directory, plugin)
        with open(path, "w") as f:
            f.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {HERE!r})\n"
                    f"import reliability_crashpoint\nreliability_crashpoint.run({plugin!r})\n")
        os.chmod(path, 0o755)
    return directory


class _Steps:
    def __init__(self, plugin: str, command: str, target: int, log: str | None):
        self.plugin, self.command, self.target, self.log = plugin, command, target, log
        self.count = 0

    def __call__(self, what: str) -> None:
        self.count += 1
        if self.count == self.target:
            if self.log:
                fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.write(fd, f"{self.plugin} {self.command} {self.count} {what}\n".encode())
                os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


def _install(step: _Steps) -> None:
    import subprocess

    from cnicore import rtnl, skel

    change = rtnl.Netns.change

    def netlink_change(self, what, *args, **kwargs):
        step(f"netlink {what}")
        return change(self, what, *args, **kwargs)

    rtnl.Netns.change = netlink_change

    execute_child = subprocess.Popen._execute_child

    def _execute_child(self, args, *rest, **kw):
        name = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args))
        if name in PLUGINS or "restore" in name:  # not the read-only ones (iptables-save, ip route get, ...)
            step(f"exec {name}")
        return execute_child(self, args, *rest, **kw)

    subprocess.Popen._execute_child = _execute_child

    rename = os.rename

    def _rename(src, dst, *a, **kw):
        step(f"rename {os.path.basename(str(dst))}")
        return rename(src, dst, *a, **kw)

    os.rename = _rename

    write = skel._Output.write

    def _write(self, obj):
        step("answer")
        return write(self, obj)

    skel._Output.write = _write


def _install_agent(when: str, action: str, log: str | None) -> None:
    from cnicore import ec2

    call = ec2.EC2._call

    def die(what: str) -> None:
        if log:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, f"{AGENT} {what}\n".encode())
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def _call(self, name, **params):
        if name == action and when == "before":
            die(f"before {name}")
        answer = call(self, name, **params)
        if name == action and when == "after":
            die(f"after {name}")
        return answer

    ec2.EC2._call = _call


def run(plugin: str) -> None:
    spec = os.environ.get("RELIABILITY_CRASH", "")
    parts = spec.split(":")
    if plugin == AGENT:
        if len(parts) == 3 and parts[0] == AGENT:
            _install_agent(parts[1], parts[2], os.environ.get("RELIABILITY_CRASH_LOG"))
        from aws_vpc_cni_agent.main import main
        sys.exit(main())
    if len(parts) == 3 and parts[0] == plugin and parts[1] == os.environ.get("CNI_COMMAND"):
        _install(_Steps(plugin, parts[1], int(parts[2]), os.environ.get("RELIABILITY_CRASH_LOG")))
    module = __import__(PLUGINS[plugin], fromlist=["main"])
    module.main()
