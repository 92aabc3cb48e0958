"""The shipped conflists: what the agent renders (issue 8). Chaining them with the reference plugins in
a lab node: tests/lab/test_conflists_lab.py."""

import json
import os
import subprocess

import pytest

from aws_vpc_cni_agent.conflist import render_conflist
from cnicore import settings
from support.labnode import BIN, REFERENCE_PLUGINS, ROOT

CONFLISTS = os.path.join(ROOT, "conflists")


def load(name):
    with open(os.path.join(CONFLISTS, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("name,env", [("10-aws-vpc.conflist", {}),
                                      ("10-aws-vpc-external-snat.conflist", {"AWS_VPC_K8S_CNI_EXTERNALSNAT": "true"})])
def test_shipped_conflists_are_what_the_agent_renders(name, env):
    assert load(name) == render_conflist(settings.from_env(env))


def test_the_agent_renders_1_0_0_unless_told_1_1_0_which_all_our_plugins_speak():
    """1.0.0 by default: containerd 1.6 and podman 4.3 refuse 1.1.0 results (agent/main.py's DEFAULT_CNI_VERSION)."""
    supported = [json.loads(subprocess.run([os.path.join(BIN, p)], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                                           input="", capture_output=True, text=True, timeout=60).stdout)["supportedVersions"]
                 for p in ("aws-vpc-bridge", "aws-eni-ipam", "aws-snat", "portmap-compat")]
    assert "1.1.0" in set.intersection(*map(set, supported))
    assert render_conflist(settings.from_env({}))["cniVersion"] == "1.0.0"
    agent = os.path.join(BIN, "aws-vpc-cni-agent")
    told = subprocess.run([agent, "--cni-version", "1.1.0", "render-conflist"], capture_output=True, text=True, timeout=60)
    assert told.returncode == 0 and json.loads(told.stdout)["cniVersion"] == "1.1.0"
    unknown = subprocess.run([agent, "--cni-version", "2.0.0", "render-conflist"], capture_output=True, text=True,
                             timeout=60)
    assert unknown.returncode == 2 and "--cni-version" in unknown.stderr and unknown.stdout == ""


def test_the_bandwidth_tuning_variant_starts_with_the_default_chain():
    default = render_conflist(settings.from_env({}))
    variant = load("20-aws-vpc-bandwidth-tuning.conflist")
    assert variant["cniVersion"] == default["cniVersion"]
    assert variant["plugins"][:len(default["plugins"])] == default["plugins"]


def test_plugins_get_the_log_settings_of_the_environment():
    env = {"AWS_VPC_K8S_PLUGIN_LOG_FILE": "stderr", "AWS_VPC_K8S_PLUGIN_LOG_LEVEL": "warn",
           "AWS_VPC_CNI_LOG_MAX_SIZE": "7", "AWS_VPC_CNI_LOG_MAX_BACKUPS": "2", "AWS_VPC_CNI_LOG_MAX_AGE": "3"}
    cfg = settings.from_env(env)
    for plugin in render_conflist(cfg)["plugins"]:
        log = settings.from_conf(plugin, settings.PLUGIN_LOG)
        assert log == ("stderr", "WARN", 7, 2, 3) and settings.to_conf(log) == settings.to_conf(cfg, settings.PLUGIN_LOG), \
            plugin["type"]


def test_the_ipam_gets_the_prefix_delegation_settings_of_the_environment():
    env = {"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "3"}
    cfg = settings.from_env(env)
    ipam = settings.from_conf(render_conflist(cfg)["plugins"][0]["ipam"], settings.IPAM)
    assert (ipam.prefix_delegation, ipam.warm_prefix_target) == (cfg.prefix_delegation, cfg.warm_prefix_target) == (True, 3)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(CONFLISTS) if n.endswith(".conflist")))
def test_every_plugin_of_every_conflist_exists(name):
    for plugin in load(name)["plugins"]:
        for kind in (plugin["type"], plugin.get("ipam", {}).get("type")):
            if kind:
                assert any(os.access(os.path.join(d, kind), os.X_OK) for d in (BIN, REFERENCE_PLUGINS)), kind
