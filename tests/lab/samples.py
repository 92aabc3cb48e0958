"""Sample EC2 snapshots for the pure-logic tests of the lab."""

import hashlib

from vpclab.ec2model import Eni, Instance, Snapshot, Subnet, Vpc

SUBNET = Subnet("subnet-1", "vpc-1", "10.0.0.0/28", "us-west-2a")


# a /24 in the first AZ, where /28 prefixes fit (SUBNET, a /28, holds none)
WIDE = Subnet("subnet-w", "vpc-1", "10.0.1.0/24", "us-west-2a")


def eni(eni_id, ips, instance=None, device=None, subnet=SUBNET, prefixes=()):
    status = "in-use" if instance else "available"
    mac = "02:00:00:" + ":".join(f"{b:02x}" for b in hashlib.sha1(eni_id.encode()).digest()[:3])
    return Eni(eni_id, mac, subnet.id, "vpc-1", subnet.az, "123456789012",
               tuple(ips), (("sg-1", "nodes"),), status, instance, device, f"attach-{eni_id}" if instance else None,
               tuple(prefixes))


def snapshot(*enis, instance_type="m5.large", subnets=(SUBNET,)):
    return Snapshot(0.0, {"vpc-1": Vpc("vpc-1", ("10.0.0.0/16",))}, {s.id: s for s in subnets},
                    {"i-1": Instance("i-1", instance_type, "us-west-2a", "subnet-1", "vpc-1", "10.0.0.10", "ami-1"),
                     "i-2": Instance("i-2", instance_type, "us-west-2b", "subnet-2", "vpc-1", "10.0.1.10", "ami-1")},
                    {e.id: e for e in enis})


PRIMARY = eni("eni-p", ["10.0.0.10"], "i-1", 0)
