"""`aws-vpc-cni-agent max-pods` against upstream: rows of misc/eni-max-pods.txt (checked in under
tests/data/upstream with their source), and max-pods-calculator.sh's arithmetic for secondary-IP and
prefix-delegation mode (the calculator as upstream documents it: ENIs x (IPv4 per ENI - 1) [x 16 with
prefix delegation on Nitro types] + 2, then at most 110 pods, 250 above 30 vCPUs, unless
--show-max-allowed). Also `--version`. The node's own type from IMDS: tests/lab/test_max_pods_lab.py."""

import os
import subprocess
import tomllib

import pytest

from cnicore.instance_limits import from_table
from support.labnode import BIN, ROOT

AGENT = os.path.join(BIN, "aws-vpc-cni-agent")
SAMPLE = os.path.join(ROOT, "tests", "data", "upstream", "eni-max-pods-sample.txt")


def upstream_rows():
    with open(SAMPLE) as f:
        return [tuple(line.split()) for line in f if line.strip() and not line.startswith("#")]


def max_pods(*argv):
    proc = subprocess.run([AGENT, "max-pods", *argv], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.strip(), proc.stderr


def test_the_sample_covers_many_types():
    assert len(upstream_rows()) >= 50


@pytest.mark.parametrize("instance_type,figure", upstream_rows())
def test_max_allowed_is_upstreams_eni_max_pods(instance_type, figure):
    assert max_pods("--instance-type", instance_type, "--show-max-allowed") == (0, figure, "")


@pytest.mark.parametrize("instance_type,secondary_ip,prefix", [
    ("m5.large", "29", "110"),       # upstream's documented example: 110 with prefix delegation, 29 without
    ("m5.2xlarge", "58", "110"),     # the same, documented for m5.2xlarge
    ("t4g.small", "11", "110"),      # 3 x ((4 - 1) x 16) + 2 = 146, 2 vCPUs: 110
    ("t3.micro", "4", "34"),         # 2 x ((2 - 1) x 16) + 2 = 34, under the ceiling
    ("m5.8xlarge", "234", "250"),    # 32 vCPUs (> 30): 8 x 29 + 2 = 234 is under the 250 ceiling; x 16 is not
    ("m5.24xlarge", "250", "250"),   # 96 vCPUs: the 250 ceiling in both modes
    ("m5.metal", "250", "250"),      # not Nitro-hypervised (bare metal): no prefix multiplier, 737 capped
])
def test_recommended_figure_as_the_calculator(instance_type, secondary_ip, prefix):
    assert max_pods("--instance-type", instance_type) == (0, secondary_ip, "")
    assert max_pods("--instance-type", instance_type, "--prefix-delegation") == (0, prefix, "")


def test_prefix_delegation_multiplies_only_on_nitro_and_max_eni_caps_the_enis():
    nitro, metal = from_table("m5.24xlarge"), from_table("m5.metal")
    assert nitro.nitro and not metal.nitro and nitro.vcpus == metal.vcpus == 96
    assert max_pods("--instance-type", "m5.24xlarge", "--prefix-delegation", "--show-max-allowed") == (
        0, str(15 * 49 * 16 + 2), "")
    assert max_pods("--instance-type", "m5.metal", "--prefix-delegation", "--show-max-allowed") == (0, "737", "")
    assert max_pods("--instance-type", "m5.large", "--max-eni", "2", "--show-max-allowed") == (0, "20", "")


def test_an_unknown_type_is_one_clear_error():
    rc, out, err = max_pods("--instance-type", "zz9.huge")
    assert rc == 1 and out == "" and "zz9.huge" in err and "Traceback" not in err


def test_version_is_the_projects():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project_version = tomllib.load(f)["project"]["version"]
    proc = subprocess.run([AGENT, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"aws-vpc-cni-agent {project_version}"
