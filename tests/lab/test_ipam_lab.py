"""aws-eni-ipam and the node agent in the VPC lab, checked against EC2's own view (issue 4)."""

import signal

import pytest

from support.labnode import LabNode


def test_m5_large_serves_27_pods_on_3_enis_and_refuses_the_28th(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path)
    ips = []
    for i in range(27):
        rc, result = node.ipam("ADD", cid=f"pod{i}")
        assert rc == 0, result
        ips.append(result["ips"][0]["address"].split("/")[0])
    assert len(set(ips)) == 27
    enis = node.ec2_enis()
    assert sorted(d for d, _ in enis.values()) == [0, 1, 2]
    assert all(len(secondary) == 9 for _, secondary in enis.values())
    assert sorted(ips) == sorted(ip for _, secondary in enis.values() for ip in secondary)
    rc, err = node.ipam("ADD", cid="pod27")
    assert rc != 0 and err["code"] == 11
    assert "m5.large" in err["msg"] and "3 ENIs" in err["msg"] and "27 pod IPs" in err["msg"]


def test_warm_add_and_del_make_no_ec2_or_imds_call(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path)
    assert node.ipam("ADD", cid="first")[0] == 0  # grows the pool (slow path)
    fresh_lab.ec2_calls(reset=True)
    fresh_lab.imds_calls(reset=True)
    for i in range(4):
        assert node.ipam("ADD", cid=f"warm{i}")[0] == 0
        assert node.ipam("DEL", cid=f"warm{i}")[0] == 0
    assert fresh_lab.ec2_calls() == {}
    assert not any(fresh_lab.imds_calls().values())


def test_throttled_ec2_does_not_stop_a_warm_add(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.start_agent()
    try:
        node.wait_for(lambda: node.agent_status()["figures"]["short"] == 0, what="a warm pool")
        free = sum(e["free"] for e in node.agent_status()["enis"])
        fresh_lab.fault("*", error="RequestLimitExceeded")
        for i in range(free):  # drains the pool below target: the agent must grow, and is throttled
            rc, result = node.ipam("ADD", cid=f"pod{i}")
            assert rc == 0, result
        status = node.wait_for(lambda: (lambda s: s if (s.get("blocked") or {}).get("reason", "").startswith(
            "EC2 is throttling") else None)(node.agent_status()), what="the agent to report the throttling")
        assert status["last_error"]["code"] == "RequestLimitExceeded"
        rc, err = node.ipam("ADD", cid="one-more")
        assert rc != 0 and err["code"] == 11 and "throttling" in err["msg"]
        fresh_lab.clear_faults()
        node.wait_for(lambda: node.agent_status()["figures"]["short"] == 0, what="the pool to recover")
        assert node.ipam("ADD", cid="one-more")[0] == 0
    finally:
        fresh_lab.clear_faults()
        node.stop_agents()


# (settings, pods assigned before the agent starts) -> (ENIs, secondary IPs) in EC2 once converged.
# m5.large: 3 ENIs x 9 secondary IPs.
CONVERGE = [
    ({}, 0, 1, 9),                                                   # WARM_ENI_TARGET=1: one ENI's worth free
    ({"WARM_ENI_TARGET": "2"}, 0, 2, 18),
    ({"WARM_ENI_TARGET": "1"}, 12, 3, 27),                           # 15 free < 9? no: 27-12=15 >= 9, 3rd ENI for 12 pods+9
    ({"WARM_IP_TARGET": "2"}, 0, 1, 2),
    ({"WARM_IP_TARGET": "5"}, 3, 1, 8),
    ({"WARM_IP_TARGET": "2", "MINIMUM_IP_TARGET": "10"}, 0, 2, 10),
    ({"WARM_ENI_TARGET": "2", "MAX_ENI": "1"}, 0, 1, 9),
    ({"MINIMUM_IP_TARGET": "20", "MAX_ENI": "2"}, 0, 2, 18),
]


@pytest.mark.parametrize("env,pods,enis,ips", CONVERGE)
def test_agent_converges_to_each_setting(fresh_lab, tmp_path, env, pods, enis, ips):
    ipam_keys = {"WARM_IP_TARGET": "warmIPTarget", "MINIMUM_IP_TARGET": "minimumIPTarget",
                 "WARM_ENI_TARGET": "warmENITarget", "MAX_ENI": "maxENI"}
    node = LabNode(fresh_lab, "node1", tmp_path, **{ipam_keys[k]: int(v) for k, v in env.items()})
    for i in range(pods):
        rc, result = node.ipam("ADD", cid=f"pod{i}")
        assert rc == 0, result
    node.start_agent(**env)
    try:
        def converged():
            view = node.ec2_enis()
            status = node.agent_status()
            figures = status["figures"] or {}
            return (len(view) == enis and sum(len(s) for _, s in view.values()) == ips
                    and figures.get("short") == 0 or bool(status.get("blocked"))) and view
        view = node.wait_for(converged, what=f"{enis} ENIs with {ips} IPs")
        assert (len(view), sum(len(s) for _, s in view.values())) == (enis, ips)
        status = node.agent_status()
        assert sum(e["total"] for e in status["enis"]) == ips  # the store agrees with EC2
        assert sum(e["assigned"] for e in status["enis"]) == pods
    finally:
        node.stop_agents()


def test_agent_gives_back_surplus_ips(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path, warmIPTarget=2)
    for i in range(6):
        assert node.ipam("ADD", cid=f"pod{i}")[0] == 0
    node.start_agent(WARM_IP_TARGET="2")
    try:
        node.wait_for(lambda: sum(len(s) for _, s in node.ec2_enis().values()) == 8, what="6 pods + 2 warm")
        for i in range(6):
            assert node.ipam("DEL", cid=f"pod{i}")[0] == 0
        node.wait_for(lambda: sum(len(s) for _, s in node.ec2_enis().values()) == 2, timeout=60,
                      what="surplus IPs returned to EC2")
    finally:
        node.stop_agents()


def test_agent_restart_loses_no_allocation(fresh_lab, tmp_path):
    node = LabNode(fresh_lab, "node1", tmp_path)
    node.start_agent()
    held = {}
    try:
        node.wait_for(lambda: node.agent_status()["figures"]["short"] == 0, what="a warm pool")
        for i in range(5):
            rc, result = node.ipam("ADD", cid=f"pod{i}")
            assert rc == 0, result
            held[f"pod{i}"] = result["ips"][0]["address"]
    finally:
        node.stop_agents(signal.SIGKILL)
    node.start_agent()
    try:
        status = node.agent_status()
        assert sum(e["assigned"] for e in status["enis"]) == 5
        rc, result = node.ipam("ADD", cid="pod5")
        assert rc == 0 and result["ips"][0]["address"] not in held.values()
        secondary = {ip for _, s in node.ec2_enis().values() for ip in s}
        assert {a.split("/")[0] for a in held.values()} <= secondary
    finally:
        node.stop_agents()
