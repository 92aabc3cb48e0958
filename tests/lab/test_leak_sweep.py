"""cnicore.leaksweep against the lab's EC2: only detached ENIs of ours, in this VPC, of this cluster,
created more than an hour ago go; ENIs in another VPC, of another cluster, untagged, recent, attached
or described as someone else's stay. The sweep runs inside a lab node, through the node's EC2."""

import json
import random
import sys
import time

import pytest

from cnicore.ec2 import ENI_DESCRIPTION_PREFIX, TAG_CLUSTER_NAME, TAG_CREATED_AT, TAG_INSTANCE_ID, _rfc3339
from cnicore.leaksweep import LeakSweep

CLUSTER = "scale-a"
HOUR = 3600

SWEEP = """
import json, sys
from cnicore.ec2 import EC2
from cnicore.leaksweep import LeakSweep

class Lines:
    def __init__(self): self.lines = []
    def info(self, msg, **kw): self.lines.append(msg)
    def warn(self, msg, **kw): self.lines.append(msg)

instance, vpc, cluster = sys.argv[1:4]
ec2 = EC2(instance, cluster_name=cluster)
log = Lines()
deleted = LeakSweep(ec2, vpc, cluster, log).run()
print(json.dumps({"deleted": deleted, "log": log.lines, "calls": dict(ec2.calls)}))
"""


def _eni(lab, subnet, sg, *, description, tags):
    reply = lab.ec2("CreateNetworkInterface", SubnetId=subnet, Groups=[sg], Description=description,
                    TagSpecifications=[{"ResourceType": "network-interface",
                                        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    return reply["NetworkInterface"]["NetworkInterfaceId"]


def _sweep(lab, instance, vpc, cluster):
    proc = lab.exec("node1", [sys.executable, "-c", SWEEP, instance, vpc, cluster], check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def world(fresh_lab):
    """The session lab with a second VPC (removed afterwards; fresh_lab removes the ENIs)."""
    lab = fresh_lab
    status = lab.status()
    node1, node2 = status["nodes"][:2]
    other_vpc = lab.ec2("CreateVpc", CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    other_subnet = lab.ec2("CreateSubnet", VpcId=other_vpc, CidrBlock="10.77.1.0/24",
                           AvailabilityZone=node1["az"])["Subnet"]["SubnetId"]
    other_sg = lab.ec2("CreateSecurityGroup", GroupName="leak-sweep-other", Description="another VPC's",
                       VpcId=other_vpc)["GroupId"]
    yield lab, status, node1, node2, (other_vpc, other_subnet, other_sg)
    for eni in lab.ec2("DescribeNetworkInterfaces", Filters=[{"Name": "vpc-id", "Values": [other_vpc]}])[
            "NetworkInterfaces"]:
        lab.ec2("DeleteNetworkInterface", NetworkInterfaceId=eni["NetworkInterfaceId"])
    lab.ec2("DeleteSecurityGroup", GroupId=other_sg)
    lab.ec2("DeleteSubnet", SubnetId=other_subnet)
    lab.ec2("DeleteVpc", VpcId=other_vpc)


def test_only_detached_old_enis_of_ours_in_this_vpc_and_cluster_are_deleted(world):
    lab, status, node1, node2, (other_vpc, other_subnet, other_sg) = world
    subnet, sg, vpc = node1["subnet_id"], status["security_group_id"], status["vpc_id"]
    gone_node = "i-0123456789abcdef0"  # the node that leaked them is long gone
    old, recent = _rfc3339(time.time() - 2 * HOUR), _rfc3339(time.time() - 10 * 60)
    ours = {TAG_INSTANCE_ID: gone_node, TAG_CREATED_AT: old, TAG_CLUSTER_NAME: CLUSTER}
    described = ENI_DESCRIPTION_PREFIX + gone_node

    leaked = [_eni(lab, subnet, sg, description=described, tags=ours) for _ in range(2)]
    kept = {
        "another VPC": _eni(lab, other_subnet, other_sg, description=described, tags=ours),
        "another cluster": _eni(lab, subnet, sg, description=described, tags={**ours, TAG_CLUSTER_NAME: "scale-b"}),
        "untagged": _eni(lab, subnet, sg, description=described, tags={}),
        "no cluster tag": _eni(lab, subnet, sg, description=described,
                               tags={TAG_INSTANCE_ID: gone_node, TAG_CREATED_AT: old}),
        "recent": _eni(lab, subnet, sg, description=described, tags={**ours, TAG_CREATED_AT: recent}),
        "no creation time": _eni(lab, subnet, sg, description=described,
                                 tags={TAG_INSTANCE_ID: gone_node, TAG_CLUSTER_NAME: CLUSTER}),
        "someone else's description": _eni(lab, subnet, sg, description="created by a user", tags=ours),
        "attached": _eni(lab, subnet, sg, description=described, tags=ours),
    }
    lab.ec2("AttachNetworkInterface", NetworkInterfaceId=kept["attached"], InstanceId=node2["instance_id"],
            DeviceIndex=1)

    answer = _sweep(lab, node1["instance_id"], vpc, CLUSTER)
    assert sorted(answer["deleted"]) == sorted(leaked)
    assert answer["calls"] == {"DescribeNetworkInterfaces": 1, "DeleteNetworkInterface": 2}
    left = {e["NetworkInterfaceId"] for e in lab.ec2("DescribeNetworkInterfaces")["NetworkInterfaces"]}
    assert not set(leaked) & left
    assert {why: eni in left for why, eni in kept.items()} == {why: True for why in kept}


def test_no_cluster_name_means_no_sweep_and_says_so(world):
    lab, status, node1, _, _ = world
    gone_node = "i-0123456789abcdef0"
    eni = _eni(lab, node1["subnet_id"], status["security_group_id"], description=ENI_DESCRIPTION_PREFIX + gone_node,
               tags={TAG_INSTANCE_ID: gone_node, TAG_CREATED_AT: _rfc3339(time.time() - 2 * HOUR)})
    answer = _sweep(lab, node1["instance_id"], status["vpc_id"], "")
    assert answer["deleted"] == [] and answer["calls"] == {}
    assert any("CLUSTER_NAME is not set" in line for line in answer["log"])
    assert eni in {e["NetworkInterfaceId"] for e in lab.ec2("DescribeNetworkInterfaces")["NetworkInterfaces"]}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_node_sweeps_at_most_once_per_interval_with_jitter():
    """Schedule only (no EC2 call: the sweep is not due, or CLUSTER_NAME is empty)."""
    firsts = []
    for seed in range(30):
        clock = Clock()
        sweep = LeakSweep(ec2=None, vpc_id="vpc-0123abcd", cluster_name="", log=_Quiet(), clock=clock,
                          rng=random.Random(seed))
        while not sweep.due():
            clock.now += 1
        firsts.append(clock.now)
        assert sweep.maybe_run() == [] and not sweep.due()
        start = clock.now
        while not sweep.due():
            clock.now += 1
        assert 0.8 * 3600 <= clock.now - start <= 1.2 * 3600 + 1
    assert max(firsts) <= 3600 and len(set(firsts)) > 20  # spread over the first hour


class _Quiet:
    def warn(self, msg, **kw):
        pass

    info = warn
