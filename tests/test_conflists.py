"""The shipped conflists: what the agent renders, and chaining with the reference plugins (issue 8)."""

import json
import os
import subprocess

import pytest

from aws_vpc_cni_agent.main import render_conflist
from cnicore import settings
from labnode import BIN, LabNode, REFERENCE_PLUGINS, ROOT

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
        assert settings.from_conf(plugin, env) == {name: cfg[name] for name in env}, plugin["type"]


def test_the_ipam_gets_the_prefix_delegation_settings_of_the_environment():
    env = {"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "3"}
    cfg = settings.from_env(env)
    ipam = render_conflist(cfg)["plugins"][0]["ipam"]
    assert settings.from_conf(ipam, env) == {name: cfg[name] for name in env} == \
        {"ENABLE_PREFIX_DELEGATION": True, "WARM_PREFIX_TARGET": 3}


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(CONFLISTS) if n.endswith(".conflist")))
def test_every_plugin_of_every_conflist_exists(name):
    for plugin in load(name)["plugins"]:
        for kind in (plugin["type"], plugin.get("ipam", {}).get("type")):
            if kind:
                assert any(os.access(os.path.join(d, kind), os.X_OK) for d in (BIN, REFERENCE_PLUGINS)), kind


def test_chain_with_reference_tuning_and_bandwidth_after_ours(fresh_lab, tmp_path, make_netns):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist(source="20-aws-vpc-bandwidth-tuning.conflist")
    pod = make_netns("pod")
    rc, out, err = node.cnitool("add", pod, "shaped")
    assert rc == 0, err + out
    result = json.loads(out)
    host_veth = result["interfaces"][0]["name"]
    somaxconn = subprocess.run(["ip", "netns", "exec", pod, "sysctl", "-n", "net.core.somaxconn"],
                               capture_output=True, text=True).stdout.strip()
    assert somaxconn == "1024"  # tuning ran after us, in the pod
    qdiscs = fresh_lab.exec("node1", ["tc", "qdisc", "show", "dev", host_veth]).stdout
    assert "tbf" in qdiscs  # bandwidth shaped our host veth (from our prevResult)
    assert "bwp" in fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout  # its ifb for egress
    rc, out, err = node.cnitool("check", pod, "shaped")
    assert rc == 0, err + out
    rc, out, err = node.cnitool("del", pod, "shaped")
    assert rc == 0, err + out
    links = fresh_lab.exec("node1", ["ip", "-o", "link"]).stdout
    assert host_veth not in links and "bwp" not in links


def test_external_snat_conflist_writes_no_snat_rules(fresh_lab, tmp_path, make_netns):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.write_conflist(source="10-aws-vpc-external-snat.conflist")
    pod = make_netns("pod")
    rc, out, err = node.cnitool("add", pod, "ext")
    assert rc == 0, err + out
    try:
        nat = fresh_lab.exec("node1", ["iptables-save", "-t", "nat"]).stdout
        assert "AWS-SNAT-CHAIN-0" not in nat
    finally:
        assert node.cnitool("del", pod, "ext")[0] == 0
