"""Starting and removing labs: bad requests change nothing; `down`, and the end of the owner process,
leave no namespace, interface, process or file behind; the `vpclab` command drives it all."""

import json
import os
import signal
import subprocess
import sys

import pytest

from .labtools import wait_for
from vpclab import api, netns
from vpclab.api import Lab
from vpclab.config import state_dir
from vpclab.errors import LabError


VPCLAB = [sys.executable, "-m", "vpclab.cli"]


def traces(name: str) -> dict:
    """Everything of lab `name` that could be left on the machine."""
    processes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if name.encode() in f.read():
                    processes.append(int(pid))
        except OSError:
            pass
    root_links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
    return {"netns": netns.listed(name), "state_dir": os.path.exists(state_dir(name)), "processes": processes,
            "root_links": [link["ifname"] for link in root_links if link.get("ifalias", "").startswith("eni-")
                           or link["ifname"].startswith("to-")]}


NOTHING = {"netns": [], "state_dir": False, "processes": [], "root_links": []}


@pytest.mark.parametrize("settings, message", [
    ({"nodes": 0}, "nodes: 0"),
    ({"vpc_cidrs": ["10.0.0.0/8"]}, "must be between /16 and /28"),
    ({"instance_type": "m5.nope"}, "unknown instance type"),
    ({"extra_hosts": ["10.0.1.0/24"]}, "overlaps 10.0.0.0/16"),
])
def test_a_bad_request_is_refused_before_anything_exists(settings, message):
    name = netns.new_prefix("l") + "bad"
    with pytest.raises(LabError, match=message):
        Lab.up(name=name, owner_pid=os.getpid(), **settings)
    assert traces(name) == NOTHING


def test_names_are_checked_and_a_running_lab_cannot_be_started_twice(lab):
    with pytest.raises(LabError, match="lab name 'lab' must be 'avc'"):
        Lab.attach("lab")
    with pytest.raises(LabError, match=f"lab '{lab.name}' is up"):
        Lab.up(name=lab.name)
    with pytest.raises(LabError, match="no lab called 'avcnosuchlab' is up"):
        Lab.attach("avcnosuchlab")
    assert Lab.attach(lab.name).status()["nodes"] == lab.status()["nodes"]


def test_the_lab_removes_itself_when_its_owner_ends():
    owner = subprocess.Popen(["sleep", "60"])
    lab = Lab.up(name=netns.new_prefix("l") + "own", nodes=1, owner_pid=owner.pid)
    try:
        before = traces(lab.name)
        assert len(before["netns"]) == 4 and before["processes"]  # ctl, rtr, inet, node1; the daemon
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert wait_for(lambda: traces(lab.name) == NOTHING, timeout=5), traces(lab.name)
    finally:
        owner.kill()
        lab.down()


def test_cli_up_exec_fault_calls_down_leaves_nothing():
    name = netns.new_prefix("l") + "cli"
    env = {**os.environ, "VPCLAB_NAME": name}

    def vpclab(*args, check=True):
        return subprocess.run(VPCLAB + list(args), capture_output=True, text=True, env=env, check=check, timeout=120)

    try:
        up = vpclab("up", "--nodes", "1", "--extra-host", "198.51.100.0/24")
        assert name in up.stdout and "node1" in up.stdout and "198.51.100.10" in up.stdout
        status = json.loads(vpclab("status", "--json").stdout)
        assert status["nodes"][0]["primary_ip"] == "10.0.0.10" and status["internet"]["echo_port"] == 7007

        link = json.loads(vpclab("exec", "node1", "--", "ip", "-j", "link", "show", "eth0").stdout)
        assert link[0]["address"] == status["nodes"][0]["mac"]
        env_seen = vpclab("exec", "node1", "--", "env").stdout
        assert "AWS_ENDPOINT_URL_EC2=http://169.254.169.200:80" in env_seen
        # a process left running in a node goes with the lab
        sleeper = subprocess.Popen(VPCLAB + ["exec", "node1", "--", "sleep", "300"], env=env)

        vpclab("fault", "DescribeSubnets", "--error", "InternalError", "--count", "1")
        assert "InternalError" in vpclab("fault").stdout
        boto = ("import boto3,botocore\ntry:\n boto3.client('ec2').describe_subnets()\n"
                "except botocore.exceptions.ClientError as e:\n print(e.response['Error']['Code'])")
        # (the lab drops the caller's AWS_* settings: the node's own are given inside the command)
        out = vpclab("exec", "node1", "--", "env", "AWS_MAX_ATTEMPTS=1", sys.executable, "-c", boto).stdout
        assert out.strip() == "InternalError"
        assert json.loads(vpclab("calls", "--json", "--reset").stdout) == {"DescribeSubnets": 1}
        assert json.loads(vpclab("calls", "--json").stdout) == {}

        bad = vpclab("exec", "node7", "--", "true", check=False)
        assert bad.returncode == 1 and f"lab '{name}' has no host 'node7'" in bad.stderr
        bad = vpclab("fault", "IMDS", "--error", "InternalError", check=False)
        assert bad.returncode == 1 and "the IMDS fault is 'down'" in bad.stderr

        vpclab("down")
        assert sleeper.wait(timeout=10) != 0
        assert wait_for(lambda: traces(name) == NOTHING, timeout=3), traces(name)
        assert "no lab called" in vpclab("status", check=False).stderr
    finally:
        api.remove(name)
