"""EC2's throttling and latency models: token buckets per API with the documented figures, driven by an
injected clock; RequestLimitExceeded through boto3 when a bucket of the lab is empty; the figures
`vpclab calls` and the API report; latency per action."""

import json
import subprocess
import sys

import pytest

from vpclab.errors import LabError
from vpclab.latency import Latency
from vpclab.throttling import Throttling, TokenBucket, bucket_figures, bucket_key

from .labtools import python_in


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- pure: buckets, categories, the model ----------------------------------------------------------

def test_a_bucket_drains_then_refills_at_its_rate_up_to_its_capacity():
    clock = Clock()
    bucket = TokenBucket(100, 20, clock)
    assert all(bucket.take() for _ in range(100))
    assert not bucket.take() and bucket.tokens() == 0
    clock.now += 0.5
    assert bucket.tokens() == pytest.approx(10)
    assert all(bucket.take() for _ in range(10)) and not bucket.take()
    clock.now += 0.03125  # 0.625 of a token: not enough
    assert not bucket.take()
    clock.now += 0.03125
    assert bucket.take() and bucket.tokens() == pytest.approx(0.25)
    clock.now += 3600
    assert bucket.tokens() == 100  # a full bucket discards the refill


@pytest.mark.parametrize("action, params, key, figures", [
    # non-mutating: 100 / 20
    ("DescribeSubnets", {}, "DescribeSubnets", (100, 20)),
    ("DescribeNetworkInterfaces", {"Filter.1.Name": "vpc-id"}, "DescribeNetworkInterfaces", (100, 20)),
    ("DescribeNetworkInterfaces", {"MaxResults": "5"}, "DescribeNetworkInterfaces", (100, 20)),
    # unfiltered and unpaginated: their own bucket of 50 / 10 (ids are not a filter)
    ("DescribeNetworkInterfaces", {}, "DescribeNetworkInterfaces (unfiltered)", (50, 10)),
    ("DescribeNetworkInterfaces", {"NetworkInterfaceId.1": "eni-1"}, "DescribeNetworkInterfaces (unfiltered)",
     (50, 10)),
    ("DescribeInstances", {}, "DescribeInstances (unfiltered)", (50, 10)),
    ("DescribeVpcs", {}, "DescribeVpcs", (100, 20)),
    # mutating: 50 / 5; resource-intensive: 50 / 5
    ("AttachNetworkInterface", {}, "AttachNetworkInterface", (50, 5)),
    ("DetachNetworkInterface", {}, "DetachNetworkInterface", (50, 5)),
    ("AuthorizeSecurityGroupIngress", {}, "AuthorizeSecurityGroupIngress", (50, 5)),
    # uncategorized, with their own figures
    ("AssignPrivateIpAddresses", {}, "AssignPrivateIpAddresses", (100, 5)),
    ("UnassignPrivateIpAddresses", {}, "UnassignPrivateIpAddresses", (100, 5)),
    ("CreateNetworkInterface", {}, "CreateNetworkInterface", (100, 5)),
    ("DeleteNetworkInterface", {}, "DeleteNetworkInterface", (100, 5)),
    ("ModifyNetworkInterfaceAttribute", {}, "ModifyNetworkInterfaceAttribute", (100, 5)),
    ("CreateTags", {}, "CreateTags", (100, 10)),
    ("RunInstances", {}, "RunInstances", (5, 2)),
])
def test_each_api_draws_from_its_own_bucket_with_the_documented_figures(action, params, key, figures):
    assert bucket_key(action, params) == key
    assert bucket_figures(key) == figures


def test_the_model_throttles_per_api_counts_and_refills_on_its_clock():
    clock = Clock()
    model = Throttling(enabled=True, clock=clock)
    assert [model.admit("AttachNetworkInterface", {}) for _ in range(52)] == [True] * 50 + [False] * 2
    assert model.admit("AssignPrivateIpAddresses", {})  # another API's bucket is untouched
    clock.now += 1.0  # 5 tokens back
    assert [model.admit("AttachNetworkInterface", {}) for _ in range(6)] == [True] * 5 + [False]
    report = model.report(reset=True)
    assert report["buckets"]["AttachNetworkInterface"] == {"spent": 55, "throttled": 3, "tokens": 0.0,
                                                         "capacity": 50, "refill_per_second": 5}
    assert report["buckets"]["AssignPrivateIpAddresses"]["spent"] == 1
    assert model.report()["buckets"] == {}  # counts reset; the buckets keep their tokens
    assert not model.admit("AttachNetworkInterface", {})


def test_time_scale_and_figures_are_settable_and_off_means_off():
    clock = Clock()
    model = Throttling(enabled=True, clock=clock)
    model.configure(True, {"DescribeSubnets": [2, 1]}, time_scale=64)
    assert [model.admit("DescribeSubnets", {}) for _ in range(3)] == [True, True, False]
    clock.now += 1 / 64  # one simulated second
    assert model.admit("DescribeSubnets", {}) and not model.admit("DescribeSubnets", {})
    model.configure(False)
    assert all(model.admit("DescribeSubnets", {}) for _ in range(500))
    assert model.report() == {"enabled": False, "time_scale": 1.0, "figures": {}, "buckets": {}}
    for bad in ({"DescribeSubnets": [0, 1]}, {"DescribeSubnets": [5, 0]}, {"DescribeSubnets": 5}, ["x"]):
        with pytest.raises(LabError, match="throttling figures"):
            model.configure(True, bad)
    with pytest.raises(LabError, match="time_scale 0"):
        model.configure(True, time_scale=0)


def test_latency_per_action():
    latency = Latency()
    assert latency.delay("AttachNetworkInterface") == 0.0  # off by default
    latency.configure(True)
    assert latency.delay("AttachNetworkInterface") == 2.0  # an attach takes seconds
    assert latency.delay("AssignPrivateIpAddresses") == 0.5
    assert latency.delay("DescribeNetworkInterfaces") == 0.15
    latency.configure(True, {"AttachNetworkInterface": 4.0}, time_scale=8)
    assert latency.delay("AttachNetworkInterface") == 0.5 and latency.of("AttachNetworkInterface") == 4.0
    with pytest.raises(LabError, match="latency for 'AttachNetworkInterface': -1"):
        latency.configure(True, {"AttachNetworkInterface": -1})


# --- through the lab -------------------------------------------------------------------------------

CALLS_SCRIPT = r'''
import json, boto3
from botocore.exceptions import ClientError
ec2 = boto3.client("ec2")
out = []
for call in ["describe_subnets"] * 6 + ["describe_vpcs"]:
    try:
        getattr(ec2, call)()
        out.append("ok")
    except ClientError as e:
        out.append([e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"],
                    e.response["Error"]["Message"]])
print(json.dumps(out))
'''


def test_an_empty_bucket_answers_request_limit_exceeded_to_every_node(fresh_lab):
    # a bucket of 4 that takes 1000 s to earn a token back: nothing refills during the test
    settings = fresh_lab.set_ec2_timing(throttling=True, figures={"DescribeSubnets": [4, 0.001]})
    assert settings["throttling"] and not settings["latency"]
    env = {"AWS_MAX_ATTEMPTS": "1"}
    out = python_in(fresh_lab, "node1", CALLS_SCRIPT, env=env)
    throttled = ["RequestLimitExceeded", 503, "Request limit exceeded."]
    assert out == ["ok"] * 4 + [throttled] * 2 + ["ok"]  # DescribeVpcs has a bucket of its own
    assert python_in(fresh_lab, "node2", CALLS_SCRIPT, env=env) == [throttled] * 6 + ["ok"]  # shared
    report = fresh_lab.ec2_throttling()
    assert report["buckets"]["DescribeSubnets"]["spent"] == 4
    assert report["buckets"]["DescribeSubnets"]["throttled"] == 8
    vpcs = report["buckets"]["DescribeVpcs"]
    assert (vpcs["spent"], vpcs["throttled"], vpcs["capacity"], vpcs["refill_per_second"]) == (2, 0, 100, 20)
    assert fresh_lab.ec2_calls() == {"DescribeSubnets": 12, "DescribeVpcs": 2}

    vpclab = [sys.executable, "-m", "vpclab.cli"]
    table = subprocess.run(vpclab + ["calls", "--name", fresh_lab.name], capture_output=True, text=True,
                           check=True, timeout=60).stdout.splitlines()
    assert "EC2 throttling on" in table[0]
    assert table[1].split() == ["12", "4", "8", "0.0", "DescribeSubnets"]
    as_json = subprocess.run(vpclab + ["calls", "--name", fresh_lab.name, "--json", "--throttling", "--reset"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(as_json)["buckets"]["DescribeSubnets"]["throttled"] == 8
    assert fresh_lab.ec2_throttling()["buckets"] == {}

    fresh_lab.reset()  # back to the lab's settings: throttling off, full buckets
    assert python_in(fresh_lab, "node1", CALLS_SCRIPT, env=env) == ["ok"] * 7
    assert fresh_lab.status()["ec2_timing"]["throttling"] is False


def test_cli_sets_the_models_and_fragments_a_subnet(fresh_lab):
    vpclab = [sys.executable, "-m", "vpclab.cli"]

    def run(*args):
        return subprocess.run(vpclab + list(args) + ["--name", fresh_lab.name], capture_output=True, text=True,
                              check=True, timeout=60).stdout

    settings = json.loads(run("timing", "--latency", "on", "--time-scale", "10"))
    assert (settings["throttling"], settings["latency"], settings["time_scale"]) == (False, True, 10.0)
    assert json.loads(run("timing"))["latency"] is True  # nothing given: shown, unchanged
    assert "took 14 address(es), one per free /28" in run("fragment")
    assert fresh_lab.fragment_subnet()["addresses"] == []  # nothing left to fragment


def test_latency_holds_each_call_as_long_as_set(fresh_lab):
    script = ("import json, time, boto3\nec2 = boto3.client('ec2')\nstart = time.monotonic()\n"
              "ec2.describe_vpcs()\nprint(json.dumps(time.monotonic() - start))")
    fresh_lab.set_ec2_timing(latency=True, seconds={"DescribeVpcs": 2.0}, time_scale=4)
    assert python_in(fresh_lab, "node1", script) >= 0.5  # 2 simulated seconds at 4 per second
    with pytest.raises(LabError, match="time_scale -1"):
        fresh_lab.set_ec2_timing(time_scale=-1)
    with pytest.raises(LabError, match="throttling: 'yes' must be true or false"):
        fresh_lab.set_ec2_timing(throttling="yes")


def test_a_lab_can_start_with_both_models_on(make_lab):
    lab = make_lab(nodes=1, ec2_throttling=True, ec2_latency=True)
    timing = lab.status()["ec2_timing"]
    assert timing["throttling"] and timing["latency"]
    assert timing["latency_seconds"]["AttachNetworkInterface"] == 2.0
    python_in(lab, "node1", "import json, boto3\nboto3.client('ec2').describe_subnets()\nprint(json.dumps(1))")
    assert lab.ec2_throttling()["buckets"]["DescribeSubnets"]["spent"] == 1
