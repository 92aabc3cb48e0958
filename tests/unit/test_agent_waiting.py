"""The agent's count of attachments waiting for an IP (issue 16): what the warm pool grows for beside
its targets. An attachment counts from its nudge until it holds an IP or stops trying."""

import time

from aws_vpc_cni_agent import loop
from aws_vpc_cni_agent.loop import Agent
from cnicore import settings
from cnicore.log import Logger
from cnicore.pool import Pool, new_document


def agent_on(tmp_path) -> Agent:
    cfg = settings.from_env({"AWS_VPC_CNI_DATA_DIR": str(tmp_path)})
    return Agent(cfg, "aws-vpc", Logger("test", str(tmp_path / "agent.log"), "DEBUG"), 1.0)


def test_waiting_attachments_count_until_they_hold_an_ip_or_stop_trying(tmp_path, monkeypatch):
    agent = agent_on(tmp_path)
    assert agent.pods_waiting() == 0  # nothing waits: not even a store read
    agent.wait_for_ip("c1", "eth0")
    agent.wait_for_ip("c2", "eth0")
    agent.wait_for_ip("c2", "eth0")  # a retry of the same attachment counts once
    assert agent.pods_waiting() == 2  # no document yet: nobody holds an IP
    with agent.store.locked() as tx:
        doc = new_document({})
        pool = Pool(doc, time.time())
        pool.put_eni("eni-1", mac="02:00:00:00:00:01", device_number=0, subnet_cidr="10.0.0.0/24",
                     primary_ip="10.0.0.10", primary=True, attached_at=0.0)
        pool.set_secondary_ips("eni-1", ["10.0.0.20"])
        pool.assign("c1", "eth0")
        tx.write(doc)
    assert agent.pods_waiting() == 1  # c1 got its IP
    stopped = time.time() + loop.WAITING_TTL + 1
    monkeypatch.setattr(loop.time, "time", lambda: stopped)
    assert agent.pods_waiting() == 0  # c2 has not tried again for WAITING_TTL
