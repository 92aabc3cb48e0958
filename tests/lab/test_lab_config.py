"""Lab settings: every bad one is refused with a message naming it; the layout derived from good ones."""

import pytest

from vpclab.config import LabConfig
from vpclab.errors import LabError


@pytest.mark.parametrize("settings, message", [
    ({"name": "lab1"}, "name: 'lab1' must be 'avc'"),
    ({"name": "avcUPPER"}, "name: 'avcUPPER'"),
    ({"name": "avc" + "x" * 13}, "must be 'avc' followed by 1 to 12"),
    ({"nodes": 0}, "nodes: 0 must be an integer in [1, 16]"),
    ({"nodes": True}, "nodes: True"),
    ({"nodes": 17}, "nodes: 17"),
    ({"instance_type": "m5.nope"}, "unknown instance type 'm5.nope'"),
    ({"azs": 4}, "azs: 4"),
    ({"imds_staleness": -1}, "imds_staleness: -1"),
    ({"imds_staleness": "1"}, "imds_staleness: '1'"),
    ({"vpc_cidrs": "10.0.0.0/16"}, "vpc_cidrs: '10.0.0.0/16' must be a list"),
    ({"vpc_cidrs": []}, "vpc_cidrs: give 1 to 5 CIDRs, not 0"),
    ({"vpc_cidrs": ["10.0.0.1/16"]}, "vpc_cidrs: '10.0.0.1/16' is not an IPv4 CIDR"),
    ({"vpc_cidrs": ["10.0.0.0"]}, "vpc_cidrs: '10.0.0.0' has no prefix length"),
    ({"vpc_cidrs": ["10.0.0.0/8"]}, "vpc_cidrs: 10.0.0.0/8 must be between /16 and /28"),
    ({"vpc_cidrs": ["10.0.0.0/16", "10.0.128.0/17"]}, "vpc_cidrs: 10.0.128.0/17 overlaps 10.0.0.0/16"),
    ({"vpc_cidrs": ["203.0.0.0/16"]}, "vpc_cidrs: 203.0.0.0/16 overlaps 203.0.113.0/24"),
    ({"vpc_cidrs": ["169.254.0.0/16"]}, "overlaps the reserved range 169.254.0.0/16"),
    ({"subnet_prefix": 29}, "subnet_prefix: 29 must be an integer in [16, 28]"),
    ({"subnet_prefix": 15}, "subnet_prefix: 15"),
    ({"vpc_cidrs": ["10.0.0.0/28"], "subnet_prefix": 28, "azs": 2}, "holds 1 /28 subnet(s), 2 AZs need one each"),
    ({"subnet_prefix": 28, "nodes": 6}, "a /28 subnet has room for 5 node(s)"),
    ({"extra_hosts": ["198.51.100.0/29"]}, "extra_hosts: 198.51.100.0/29 is smaller than /28"),
    ({"extra_hosts": ["10.0.5.0/24"]}, "extra_hosts: 10.0.5.0/24 overlaps 10.0.0.0/16"),
    ({"extra_hosts": ["203.0.113.0/25"]}, "extra_hosts: 203.0.113.0/25 overlaps 203.0.113.0/24"),
    ({"extra_hosts": ["198.51.100.0/24", "198.51.100.0/25"]}, "198.51.100.0/25 overlaps 198.51.100.0/24"),
    ({"extra_hosts": ["nonsense"]}, "extra_hosts: 'nonsense' is not an IPv4 CIDR"),
    ({"owner_pid": 0}, "owner_pid: 0"),
    ({"ec2_throttling": "on"}, "ec2_throttling: 'on' must be true or false"),
    ({"ec2_latency": 1}, "ec2_latency: 1 must be true or false"),
])
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(LabError) as e:
        LabConfig(**settings).validate()
    assert message in str(e.value)


def test_default_layout():
    c = LabConfig(name="avcx1").validate()
    assert [(s.cidr, s.az, s.gateway) for s in c.subnets()] == [("10.0.0.0/24", "us-west-2a", "10.0.0.1")]
    assert [(n.name, n.netns, n.primary_ip) for n in c.node_plans()] == [
        ("node1", "avcx1-node1", "10.0.0.10"), ("node2", "avcx1-node2", "10.0.0.11")]
    (internet,) = c.host_plans()
    assert (internet.name, internet.netns, internet.address, internet.router_address, internet.router_if) == (
        "internet", "avcx1-inet", "203.0.113.10", "203.0.113.1", "to-inet")


def test_nodes_spread_over_azs_and_extra_hosts():
    c = LabConfig(name="avcx1", nodes=3, azs=2, vpc_cidrs=["10.1.0.0/16", "100.64.0.0/16"],
                  extra_hosts=["198.51.100.0/24"]).validate()
    assert [(n.primary_ip, n.subnet.az) for n in c.node_plans()] == [
        ("10.1.0.10", "us-west-2a"), ("10.1.1.10", "us-west-2b"), ("10.1.0.11", "us-west-2a")]
    assert [(h.name, h.netns, h.address, h.router_if) for h in c.host_plans()][1] == (
        "x1", "avcx1-x1", "198.51.100.10", "to-x1")


def test_settings_survive_json():
    c = LabConfig(name="avcx1", vpc_cidrs=["10.1.0.0/16"], extra_hosts=["198.51.100.0/24"], owner_pid=42)
    assert LabConfig.from_json(c.to_json()) == c
