"""`aws-vpc-cni-agent max-pods` without a type on a lab node: the type comes from IMDS."""

import os

from support.labnode import BIN

AGENT = os.path.join(BIN, "aws-vpc-cni-agent")


def test_without_a_type_the_node_asks_imds(fresh_lab):
    assert {n["instance_type"] for n in fresh_lab.status()["nodes"]} == {"m5.large"}
    proc = fresh_lab.exec("node1", [AGENT, "max-pods"], check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, "29"), proc.stderr
    proc = fresh_lab.exec("node1", [AGENT, "max-pods", "--prefix-delegation"], check=False)
    assert (proc.returncode, proc.stdout.strip()) == (0, "110"), proc.stderr
