"""The short scale run (`make scale` is the long one): 6 simulated nodes running the real agent code
(NodePool with its EC2 budget and leak sweep) against one lab EC2 with EC2's buckets and latencies on,
20x compressed time: 5 simulated minutes of steady state, 3 nodes get 30 pods each, 2 minutes of churn
(5 pods per minute per node), then 3 nodes die, one in each state (a busy one with its ENIs attached;
an idle one with an ENI created, not attached; one with an ENI attached without DeleteOnTermination),
and the rest run on for 7 minutes. Counts the algorithms must produce, not speed."""

import argparse

import pytest

from scale import run  # tests/ is on sys.path (rootdir conftest), as for labnode


@pytest.fixture(scope="module")
def result():
    args = argparse.Namespace(nodes=6, cold_nodes=3, pods=30, hour=300.0, time_scale=20.0, churn=5,
                              churn_minutes=2, dying=1, death_window=420.0, workers=8, timeout=900,
                              cold_time_scale=20.0)
    return run.outside(args)


def test_a_steady_node_costs_ec2_nothing(result):
    # IMDS agrees with the store every round, so the agent reads EC2's view for no reason of its
    # budget (the jittered interval is at least 48 minutes after the warm-up's last read). The only
    # calls are leak sweeps: each node's first falls at a uniform instant of its first hour, so these
    # 5 minutes of 6 nodes catch any number from 0 to 6 of them (1 in 12 per node), never two of one
    # node (the next is 48-72 minutes later). `make scale` holds the hour's rate to <= 2 per node.
    reads = result["steady_ec2_reads_by_reason"]
    assert set(reads) <= {"leak-sweep"}, reads
    assert reads.get("leak-sweep", 0) <= 6
    assert set(result["ec2_calls_per_node_hour_by_api"]) <= {"DescribeNetworkInterfaces"}
    assert result["steady_describes"] == sum(reads.values())  # every call is accounted for


def test_every_pod_gets_an_ip_with_no_error_beyond_code_11(result):
    r = result
    assert r["cold_start_all_placed"] and r["pod_errors"] == 0 and r["agent_errors"] == {}
    assert r["throttled_requests"] == 0  # 6 nodes stay far below every bucket
    # 90 pods on m5.xlarge (15 IPs per ENI): new ENIs created, attached, given IPs, each once
    calls = r["cold_start_calls"]
    assert calls["CreateNetworkInterface"] == calls["AttachNetworkInterface"] == calls[
        "ModifyNetworkInterfaceAttribute"] >= 6
    assert r["cold_start_floor_seconds"] > 0 and r["cold_start_ratio"] >= 1


def test_churn_places_every_new_pod(result):
    assert result["churn_nodes"] == 3 and result["churn_pods_unplaced"] == 0 and result["churn_throttled"] == {}


def test_a_node_dying_with_its_enis_attached_leaves_none_the_half_made_ones_stay_behind(result):
    assert result["dead_nodes"] == {"attached": 1, "created": 1, "attached-no-dot": 1}
    # DeleteOnTermination (set by the agent after each attach) takes the attached ENIs with the instance
    assert result["enis_left_at_death"] == {"attached": 0, "created": 1, "attached-no-dot": 1}


def test_the_sweep_leaves_enis_younger_than_an_hour(result):
    assert result["enis_left_after_window"] == {"attached": 0, "created": 1, "attached-no-dot": 1}
