"""The shipped instance-type limits table and its lookups (the DescribeInstanceTypes fallback is
tested against moto in test_ec2.py)."""

import os
import subprocess
import sys

import pytest

from cnicore import instance_limits
from cnicore.instance_limits import InstanceLimits, InstanceLimitsError, limits_from_network_info, lookup
from support.paths import ROOT



def test_table_is_generated_from_the_installed_moto():
    check = subprocess.run([sys.executable, os.path.join(ROOT, "build", "gen_instance_limits.py"), "--check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("instance_type,max_enis,ipv4,ips,max_pods", [
    # max-pods figures as in upstream's misc/eni-max-pods.txt
    ("m5.large", 3, 10, 9, 29),
    ("t3.micro", 2, 2, 1, 4),
    ("c5.18xlarge", 15, 50, 49, 737),
    ("p4d.24xlarge", 15, 50, 49, 737),  # 4 network cards; ENIs go on the default card only
])
def test_lookup_from_the_table(instance_type, max_enis, ipv4, ips, max_pods):
    limits = lookup(instance_type)
    assert (limits.max_enis, limits.ipv4_per_eni) == (max_enis, ipv4)
    assert limits.ips_per_eni == ips and limits.max_pods == max_pods


def test_network_info_of_several_cards_counts_the_default_card():
    info = {"MaximumNetworkInterfaces": 30, "Ipv4AddressesPerInterface": 50, "DefaultNetworkCardIndex": 1,
            "NetworkCards": [{"NetworkCardIndex": 0, "MaximumNetworkInterfaces": 20},
                             {"NetworkCardIndex": 1, "MaximumNetworkInterfaces": 10}]}
    assert limits_from_network_info("x9.big", info) == InstanceLimits("x9.big", 10, 50)


@pytest.mark.parametrize("info", [{}, {"MaximumNetworkInterfaces": 3},
                                  {"MaximumNetworkInterfaces": 0, "Ipv4AddressesPerInterface": 10}])
def test_incomplete_network_info_is_a_clear_error(info):
    with pytest.raises(InstanceLimitsError, match="x9.big"):
        limits_from_network_info("x9.big", info)


@pytest.mark.parametrize("bad", ["", "m5", "M5.LARGE", "m5.large; rm", None, 5])
def test_malformed_instance_type(bad):
    with pytest.raises(InstanceLimitsError, match="malformed instance type"):
        lookup(bad)


def test_unknown_type_without_ec2_access():
    with pytest.raises(InstanceLimitsError, match="'zz9.huge' is not in the shipped limits table and no EC2"):
        lookup("zz9.huge")


def test_table_loads_fast_and_without_boto3():
    code = ("import sys, time; t = time.perf_counter(); from cnicore.instance_limits import lookup; "
            "lookup('m5.large'); print(time.perf_counter() - t); assert 'botocore' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 0.5
    assert os.path.getsize(instance_limits.DATA_FILE) < 64 * 1024
