"""The lab's Python API, used by the tests, the demo and the `vpclab` command.

    lab = Lab.up(nodes=2)                 # or Lab.attach(name) for a running one
    lab.exec("node1", ["ip", "-br", "addr"])
    lab.fault("AssignPrivateIpAddresses", error="RequestLimitExceeded", count=2)
    lab.ec2_calls(reset=True)             # {"AssignPrivateIpAddresses": 3, ...}
    lab.set_ec2_timing(throttling=True, latency=True)   # EC2's token buckets and action latencies
    lab.ec2_throttling()                  # {"buckets": {"AssignPrivateIpAddresses": {"spent": 3, ...}}, ...}
    lab.fragment_subnet()                 # one address taken in every free /28: prefixes run out
    lab.down()

EC2 as the lab serves it (beyond moto): ENI and address limits per instance type, subnet exhaustion,
IPv4 prefixes (/28, Nitro types only, InsufficientCidrBlocks in a fragmented subnet: vpclab.ec2rules),
request throttling (vpclab.throttling) and latency (vpclab.latency), both off unless asked for.

This module stays light (no moto, no boto3): the daemon (vpclab.daemon) does the heavy work, and
this side talks to it over its control socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from . import control, netns
from .config import DEFAULT_NAME, EC2_ADDRESS, EC2_PORT, IMDS_ADDRESS, REGION, STATE_ROOT, LabConfig, state_dir
from .ec2model import Snapshot
from .errors import LabError

UP_TIMEOUT = 90.0
DOWN_TIMEOUT = 15.0
DUMMY_KEY = "testing"
# dropped from the caller's environment before a node's is added: they would point boto3 elsewhere
FOREIGN_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
               "NO_PROXY")


class Lab:
    """A running lab, found by name; see `up` and `attach`."""

    def __init__(self, config: LabConfig):
        self.config = config
        self.name = config.name
        self._socket = os.path.join(config.state_dir, "ctl.sock")

    # --- life cycle ------------------------------------------------------------------------------

    @classmethod
    def up(cls, name: str | None = None, nodes: int = 2, instance_type: str = "m5.large",
           vpc_cidrs: list[str] | tuple[str, ...] = ("10.0.0.0/16",), subnet_prefix: int = 24, azs: int = 1,
           imds_staleness: float = 0.0, extra_hosts: list[str] | tuple[str, ...] = (),
           owner_pid: int | None = None, ec2_throttling: bool = False, ec2_latency: bool = False) -> "Lab":
        """Start a lab and return when it is ready. With `owner_pid`, the lab removes itself when that
        process ends (tests pass their own pid, so a killed test run leaves nothing behind).
        `ec2_throttling` and `ec2_latency` turn EC2's models on from the start (and after each reset)."""
        config = LabConfig(name or DEFAULT_NAME, nodes, instance_type, vpc_cidrs, subnet_prefix, azs,
                           imds_staleness, extra_hosts, owner_pid, ec2_throttling, ec2_latency).validate()
        _refuse_if_present(config.name)
        try:
            os.makedirs(config.state_dir, mode=0o700)
        except FileExistsError:
            raise LabError(f"lab {config.name!r} is being created by another process") from None
        try:
            with open(os.path.join(config.state_dir, "config.json"), "w") as f:
                f.write(config.to_json())
            _start_daemon(config)
        except BaseException:
            Lab(config).down()
            raise
        return cls(config)

    @classmethod
    def attach(cls, name: str | None = None) -> "Lab":
        """The running lab called `name` (default: the default lab)."""
        name = name or DEFAULT_NAME
        _check_name(name)
        try:
            with open(os.path.join(state_dir(name), "config.json")) as f:
                lab = cls(LabConfig.from_json(f.read()))
        except FileNotFoundError:
            raise LabError(f"no lab called {name!r} is up (no {state_dir(name)})") from None
        if _daemon_pid(name) is None:
            raise LabError(f"lab {name!r} is not running (its daemon is gone); "
                           f"remove it with `vpclab down --name {name}`")
        return lab

    def down(self) -> None:
        """Stop the lab and remove every namespace, interface, process and file it made. Idempotent."""
        remove(self.name)

    # --- what is in it ---------------------------------------------------------------------------

    def status(self) -> dict:
        """Nodes, the internet host, extra hosts, VPC, subnets, limits, endpoints, active faults."""
        return self._call("status")

    def netns(self, host: str) -> str:
        """Namespace of a node ("node1"), "internet", an extra host ("x1"), "router" or "ctl"."""
        named = {n.name: n.netns for n in self.config.node_plans()}
        named.update({h.name: h.netns for h in self.config.host_plans()})
        named.update(router=self.config.router_netns, ctl=self.config.ctl_netns)
        if host not in named:
            raise LabError(f"lab {self.name!r} has no host {host!r}; it has {', '.join(named)}")
        return named[host]

    def node_env(self, node: str) -> dict[str, str]:
        """What a process on the node needs to reach EC2 and IMDS as the plugins and agent do."""
        self._node(node)
        return {
            "AWS_ENDPOINT_URL_EC2": f"http://{EC2_ADDRESS}:{EC2_PORT}",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{IMDS_ADDRESS}/",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv4",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        """The command line that runs `argv` inside a lab host's namespace."""
        if not argv:
            raise LabError("exec: no command given")
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def exec_env(self, host: str, env: dict[str, str] | None = None) -> dict[str, str]:
        """The caller's environment without AWS and proxy settings, plus the node's (for a node), plus `env`."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in FOREIGN_ENV}
        if host in self._node_names():
            base.update(self.node_env(host))
        base.update(env or {})
        return base

    def exec(self, host: str, argv: list[str], env: dict[str, str] | None = None, input: str | bytes | None = None,
             check: bool = True, timeout: float | None = 60) -> subprocess.CompletedProcess:
        """Run `argv` in a node (or other lab host) with the node's environment; output is captured."""
        return netns.run(self.exec_argv(host, argv), input=input, env=self.exec_env(host, env), check=check,
                         timeout=timeout)

    def reset(self) -> None:
        """Back to the state `up` left: no faults, zero counts, the configured IMDS staleness and EC2
        throttling and latency (full buckets), and only the nodes' primary ENIs with only their primary
        addresses and no prefixes (the data plane follows before this returns). What tests did inside
        the nodes' namespaces is theirs to undo."""
        self._call("reset")

    # --- faults and counts -----------------------------------------------------------------------

    def fault(self, action: str, error: str | None = None, count: int | None = None, duration: float | None = None,
              latency: float = 0.0, node: str | None = None) -> None:
        """Inject a fault into EC2 calls of `action` ("*": all), or into the IMDS (action "IMDS", of
        `node` or of all nodes: it stops answering). It lasts `count` requests, `duration` seconds, or
        until clear_faults(); `latency` seconds are added to each matching request."""
        self._call("fault", action=action, error=error, count=count, duration=duration, latency=latency, node=node)

    def clear_faults(self) -> None:
        self._call("clear_faults")

    def ec2_calls(self, reset: bool = False) -> dict[str, int]:
        """EC2 calls that reached the front since the last reset, per action (retries count each)."""
        return self._call("ec2_calls", reset=reset)

    def imds_calls(self, reset: bool = False) -> dict[str, int]:
        """IMDS requests per node since the last reset."""
        return self._call("imds_calls", reset=reset)

    def set_imds_staleness(self, seconds: float) -> None:
        """IMDS answers reflect EC2 as of `seconds` ago from now on."""
        self._call("imds_staleness", seconds=seconds)

    def set_ec2_timing(self, throttling: bool | None = None, latency: bool | None = None,
                       figures: dict[str, list[float]] | None = None, seconds: dict[str, float] | None = None,
                       time_scale: float | None = None) -> dict:
        """Turn EC2's request throttling (per-API token buckets shared by all nodes, RequestLimitExceeded
        when empty) and per-action latency on or off; `figures` replaces bucket figures per action
        ({"AttachNetworkInterface": [capacity, refill per second]}, "DescribeNetworkInterfaces
        (unfiltered)" for the small bucket), `seconds` latencies per action; `time_scale` runs both
        that many times faster than the wall clock (compressed time). What is not given stays; a
        change to the throttling model refills every bucket. Returns the settings now."""
        return self._call("ec2_timing", throttling=throttling, latency=latency, figures=figures, seconds=seconds,
                          time_scale=time_scale)

    def ec2_throttling(self, reset: bool = False) -> dict:
        """Per bucket (an action, or an action's unfiltered bucket) since the last reset: tokens
        spent, requests throttled, tokens left, its capacity and refill per second; and the settings."""
        return self._call("ec2_throttling", reset=reset)

    def fragment_subnet(self, subnet_id: str | None = None, keep: int = 0) -> dict:
        """Take one address in each aligned /28 of a subnet (default: the first) that could still be
        delegated as a prefix, but for the lowest `keep`, with detached ENIs made through EC2's rules.
        Returns {"subnet_id", "addresses", "enis"}; `reset` removes those ENIs."""
        return self._call("fragment_subnet", subnet_id=subnet_id, keep=keep)

    def ec2(self, action: str, **params) -> dict[str, Any]:
        """Make an EC2 call as the lab (through the front's rules, not counted, no faults), e.g.
        lab.ec2("AssignPrivateIpAddresses", NetworkInterfaceId=..., SecondaryPrivateIpAddressCount=1).
        Raises Ec2Error with EC2's code when EC2 refuses."""
        return self._call("ec2", action=action, params=params)

    def snapshot(self, since: Snapshot | None = None) -> Snapshot:
        """EC2's state as the lab holds it now (what its IMDS and data plane follow), read without
        an EC2 call: cheap, as the lab reads moto again only after a change. With `since`, an
        earlier answer, that one comes back if EC2 has not changed (and nothing crosses the socket)."""
        found = self._call("snapshot", since=None if since is None else since.taken_at)
        return since if found is None else Snapshot.from_dict(found)

    # --- helpers ---------------------------------------------------------------------------------

    def _node_names(self) -> list[str]:
        return [n.name for n in self.config.node_plans()]

    def _node(self, node: str) -> None:
        names = self._node_names()
        if node not in names:
            raise LabError(f"lab {self.name!r} has no node {node!r}; its nodes are {', '.join(names)}")

    def _call(self, op: str, **args):
        return control.call(self._socket, op, **args)


def remove(name: str) -> None:
    """Stop lab `name` if its daemon runs, then remove what is left: namespaces, state directory."""
    _check_name(name)
    pid = _daemon_pid(name)
    if pid is not None:
        try:
            control.call(os.path.join(state_dir(name), "ctl.sock"), "shutdown", timeout=5)
        except LabError:
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, DOWN_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
    netns.sweep(name)
    shutil.rmtree(state_dir(name), ignore_errors=True)


def labs() -> list[str]:
    """Names of the labs that have a state directory on this machine (running or not)."""
    try:
        return sorted(os.listdir(STATE_ROOT))
    except FileNotFoundError:
        return []


def sweep_orphans() -> list[str]:
    """Remove labs whose daemon is gone (and that are not just starting) or whose owner process ended;
    return their names."""
    gone = []
    for name in labs():
        try:
            with open(os.path.join(state_dir(name), "config.json")) as f:
                owner = LabConfig.from_json(f.read()).owner_pid
        except (OSError, ValueError, TypeError, LabError):
            continue  # being created right now, or not a lab's directory
        if (_daemon_pid(name) is None and _age(name) > UP_TIMEOUT) or (owner is not None and not _alive(owner)):
            remove(name)
            gone.append(name)
    return gone


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not netns.PREFIX_RE.match(name):
        raise LabError(f"lab name {name!r} must be 'avc' followed by 1 to 12 of [a-z0-9]")


def _refuse_if_present(name: str) -> None:
    if os.path.exists(state_dir(name)):
        state = "is up" if _daemon_pid(name) else "has leftovers"
        raise LabError(f"lab {name!r} {state} ({state_dir(name)}); use another name or `vpclab down --name {name}`")
    leftovers = netns.listed(name)
    if leftovers:
        raise LabError(f"namespaces of a lab {name!r} exist ({', '.join(leftovers)}); "
                       f"remove them with `vpclab down --name {name}`")


def _start_daemon(config: LabConfig) -> None:
    """Spawn the daemon in its own session and wait until it reports ready or fails."""
    read_fd, write_fd = os.pipe()
    with open(os.path.join(config.state_dir, "daemon.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vpclab.daemon", config.state_dir, str(write_fd)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,),
                                start_new_session=True, cwd="/")
    os.close(write_fd)
    with open(os.path.join(config.state_dir, "daemon.pid"), "w") as f:
        f.write(str(proc.pid))
    with os.fdopen(read_fd) as ready:
        import select

        if not select.select([ready], [], [], UP_TIMEOUT)[0]:
            raise LabError(f"lab {config.name!r} did not come up within {UP_TIMEOUT:g} s "
                           f"(see {config.state_dir}/daemon.log)")
        answer = ready.readline().strip()
    if answer != "ok":
        proc.wait(DOWN_TIMEOUT)
        reason = answer.removeprefix("error: ") or "its daemon died: " + _log_tail(config)
        raise LabError(f"lab {config.name!r} failed to start: {reason}")


def _log_tail(config: LabConfig, lines: int = 5) -> str:
    try:
        with open(os.path.join(config.state_dir, "daemon.log"), errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _daemon_pid(name: str) -> int | None:
    """The daemon's pid if it is alive and really is this lab's daemon."""
    try:
        with open(os.path.join(state_dir(name), "daemon.pid")) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"vpclab.daemon" in cmdline and state_dir(name).encode() in cmdline else None


def _age(name: str) -> float:
    """Seconds since the lab's state directory was made (a lab younger than UP_TIMEOUT may be starting)."""
    try:
        return time.time() - os.stat(state_dir(name)).st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False
