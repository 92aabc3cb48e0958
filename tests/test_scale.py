"""The short scale run (`make scale` is the long one): 3 simulated nodes running the real agent code
against one lab EC2 with EC2's buckets and latencies on, 10x compressed time, 5 simulated minutes of
steady state, then 2 nodes get 30 pods each. Counts the algorithms must produce, not speed."""

import argparse

import pytest

from scale import run  # tests/ is on sys.path (rootdir conftest), as for labnode


@pytest.fixture(scope="module")
def results():
    args = argparse.Namespace(nodes=3, cold_nodes=2, pods=30, hour=300.0, time_scale=10.0, policy="both",
                              timeout=900)
    return {r["policy"]: r for r in run.outside(args)}


def test_todays_agent_reads_ec2_twice_a_minute_per_node_in_steady_state(results):
    today = results["today"]
    # REFRESH_INTERVAL (60 s) DescribeNetworkInterfaces of the instance + the 60 s leak sweep's
    assert set(today["ec2_calls_per_node_hour_by_api"]) == {"DescribeNetworkInterfaces"}
    assert 100 <= today["ec2_calls_per_node_hour"] <= 130


def test_the_budget_policy_costs_ec2_nothing_in_steady_state(results):
    assert results["budget"]["ec2_calls_per_node_hour"] <= 2


@pytest.mark.parametrize("policy", ["today", "budget"])
def test_every_pod_gets_an_ip_with_no_error_beyond_code_11(results, policy):
    r = results[policy]
    assert r["cold_start_all_placed"] and r["pod_errors"] == 0 and r["agent_errors"] == {}
    assert r["throttled_requests"] == 0  # 3 nodes stay far below every bucket
    # 60 pods on m5.xlarge (15 IPs per ENI): new ENIs created, attached, given IPs, each once
    calls = r["cold_start_calls"]
    assert calls["CreateNetworkInterface"] == calls["AttachNetworkInterface"] == calls[
        "ModifyNetworkInterfaceAttribute"] >= 4
    assert r["cold_start_floor_seconds"] > 0 and r["cold_start_ratio"] >= 1
