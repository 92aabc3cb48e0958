"""cnicore/pool.py's typed views of the store document (issue 18): they read and write the stored
dicts themselves, so the JSON on disk is what it was."""

import json

import pytest

from cnicore.pool import (ASSIGNED, AgentState, Blocked, Document, ENI, IPEntry, LastError, NodeFacts, Pool,
                          new_document)
from cnicore.store import Store

# a schema-2 document as the store wrote it before the views existed
STORED = {
    "schema": 2, "network": "net",
    "node": {"instance_id": "i-1", "instance_type": "m5.large", "region": "eu-west-1",
             "availability_zone": "eu-west-1a", "primary_mac": "02:00:00:00:00:01", "primary_eni": "eni-a",
             "primary_ip": "10.0.0.10", "subnet_id": "subnet-1", "subnet_cidr": "10.0.0.0/24",
             "security_groups": ["sg-1"], "vpc_id": "vpc-1", "vpc_cidrs": ["10.0.0.0/16"], "max_enis": 3,
             "ipv4_per_eni": 10},
    "enis": {
        "eni-a": {"mac": "02:00:00:00:00:01", "device_number": 0, "subnet_cidr": "10.0.0.0/24",
                  "primary_ip": "10.0.0.10", "primary": True, "attached_at": 5.0,
                  "ips": {"10.0.0.11": {"state": "free"}, "10.0.0.12": {"state": "cooling", "since": 7.0}}},
        "eni-b": {"mac": "02:00:00:00:00:02", "device_number": 1, "subnet_cidr": "10.0.0.0/24",
                  "primary_ip": "10.0.0.20", "primary": False, "attached_at": 6.0, "ours": True,
                  "prefixes": ["10.0.0.32/28"],
                  "ips": {"10.0.0.21": {"state": "assigned", "container_id": "c1", "ifname": "eth0",
                                        "pod_namespace": "ns", "pod_name": "p", "since": 8.0, "owner": [42, 99]}}}},
    "agent": {"blocked": {"reason": "the ENI limit", "since": 3.0, "limit": True},
              "last_error": {"action": "AssignPrivateIpAddresses", "code": "RequestLimitExceeded",
                             "message": "slow down", "kind": "throttled", "at": 4.0},
              "backoff": {"delay": 2.0, "until": 9.0}, "adopted": {"eni-b": "attach-1"}, "last_tick": 10.0,
              "warm_floor": 5},
}


def stored():
    return json.loads(json.dumps(STORED))


def test_a_stored_document_reads_through_the_views():
    view = Document(stored())
    node = view.node
    assert isinstance(node, NodeFacts)
    assert (node.instance_id, node.region, node.primary_mac, node.vpc_cidrs, node.max_enis) == (
        "i-1", "eu-west-1", "02:00:00:00:00:01", ["10.0.0.0/16"], 3)
    a, b = view.enis["eni-a"], view.enis["eni-b"]
    assert isinstance(a, ENI) and sorted(view.enis) == ["eni-a", "eni-b"]
    assert (a.mac, a.device_number, a.primary, a.attached_at, a.ours, a.prefixes) == (
        "02:00:00:00:00:01", 0, True, 5.0, False, ())  # an ENI without `ours` or `prefixes` (schema 1)
    assert (b.ours, b.prefixes, b.primary_ip) == (True, ["10.0.0.32/28"], "10.0.0.20")
    entry = b.ips["10.0.0.21"]
    assert isinstance(entry, IPEntry)
    assert (entry.state, entry.container_id, entry.ifname, entry.pod_namespace, entry.pod_name, entry.since,
            entry.owner) == (ASSIGNED, "c1", "eth0", "ns", "p", 8.0, [42, 99])
    free = a.ips["10.0.0.11"]
    assert (free.state, free.container_id, free.since, free.owner) == ("free", None, None, None)
    assert b.holds_pods and not a.holds_pods
    agent = view.agent
    assert (agent.blocked.reason, agent.blocked.since, agent.blocked.limit) == ("the ENI limit", 3.0, True)
    error = agent.last_error
    assert (error.action, error.code, error.message, error.kind, error.at) == (
        "AssignPrivateIpAddresses", "RequestLimitExceeded", "slow down", "throttled", 4.0)
    assert (agent.backoff, agent.adopted, agent.last_tick, agent.warm_floor) == (
        {"delay": 2.0, "until": 9.0}, {"eni-b": "attach-1"}, 10.0, 5)
    assert agent.last_release_at is None and agent.insufficient_reason is None  # never written yet


def test_writes_through_the_views_land_in_the_document_as_before(tmp_path):
    doc = stored()
    view = Document(doc)
    view.node.vpc_cidrs = ["10.0.0.0/16", "10.1.0.0/16"]
    view.enis["eni-a"].ours = False
    agent = view.agent
    agent.blocked = Blocked.new(reason="short", since=1.0, limit=False)
    agent.last_error = None
    agent.last_tick = 11.0
    assert doc["node"]["vpc_cidrs"] == ["10.0.0.0/16", "10.1.0.0/16"] and doc["enis"]["eni-a"]["ours"] is False
    assert doc["agent"]["blocked"] == {"reason": "short", "since": 1.0, "limit": False}
    assert doc["agent"]["last_error"] is None and doc["agent"]["last_tick"] == 11.0
    # and the store writes exactly the JSON it wrote for such a document
    store = Store(str(tmp_path), "net")
    with store.locked() as tx:
        tx.write(doc)
    with open(store.path, "rb") as f:
        assert json.loads(f.read()) == doc


def test_an_untouched_document_round_trips_unchanged(tmp_path):
    store = Store(str(tmp_path), "net")
    with open(store.path, "w") as f:
        json.dump(STORED, f)
    with store.locked() as tx:
        doc = tx.read()
        view = Document(doc)  # reads only
        assert view.node.instance_id == "i-1" and view.agent.blocked.limit and view.enis["eni-b"].ips
        tx.write(doc)
    with open(store.path) as f:
        assert json.load(f) == STORED


def test_required_keys_raise_and_optional_ones_default():
    node = NodeFacts({})
    with pytest.raises(KeyError):
        node.instance_id
    assert (node.primary_mac, node.primary_ip, node.vpc_id, node.vpc_cidrs) == (None, None, None, None)
    assert not node and NodeFacts({"region": "x"})  # an empty dict's view is false
    with pytest.raises(KeyError):
        ENI({}).mac


def test_sections_missing_from_a_document_are_created_on_use():
    doc = {"node": {"instance_id": "i-1"}}
    view = Document(doc)
    assert view.enis == {} and doc["enis"] == {}
    view.agent.last_refresh = 3.0
    assert doc["agent"] == {"last_refresh": 3.0}


def test_a_section_is_replaced_by_another_documents():
    ours, theirs = new_document({"instance_id": "i-1"}), new_document({"instance_id": "i-1"})
    Document(ours).agent.warm_floor = 4
    Document(theirs).agent = Document(ours).agent
    assert theirs["agent"] is ours["agent"]


def test_new_makes_a_dict_of_known_names_only():
    facts = NodeFacts.new(instance_id="i-1", vpc_cidrs=["10.0.0.0/16"])
    assert facts.as_dict() == {"instance_id": "i-1", "vpc_cidrs": ["10.0.0.0/16"]}
    assert new_document(facts.as_dict())["node"] == {"instance_id": "i-1", "vpc_cidrs": ["10.0.0.0/16"]}
    with pytest.raises(AttributeError):
        NodeFacts.new(instance="i-1")
    with pytest.raises(AttributeError):
        LastError.new(action="x", status=500)


def test_as_dict_is_a_copy():
    facts = NodeFacts({"instance_id": "i-1"})
    copy = facts.as_dict()
    copy["instance_id"] = "i-2"
    assert facts.instance_id == "i-1"


def test_views_compare_by_their_dicts_and_are_not_hashable():
    assert IPEntry({"state": "free"}) == IPEntry({"state": "free"})
    assert IPEntry({"state": "free"}) != IPEntry({"state": "cooling", "since": 1.0})
    assert IPEntry({"state": "free"}) != {"state": "free"} and IPEntry({"state": "free"}) != ENI({"state": "free"})
    with pytest.raises(TypeError):
        hash(IPEntry({"state": "free"}))


def test_adopted_enis_are_added_and_forgotten_one_by_one():
    doc = new_document({})
    agent = AgentState(doc["agent"])
    agent.forget_adopted("eni-x")
    assert "adopted" not in doc["agent"]  # nothing written until an ENI is adopted
    agent.adopt("eni-a", "attach-a")
    agent.adopt("eni-b", "attach-b")
    assert doc["agent"]["adopted"] == {"eni-a": "attach-a", "eni-b": "attach-b"}
    agent.forget_adopted("eni-a")
    assert doc["agent"]["adopted"] == {"eni-b": "attach-b"}


def test_pool_hands_out_views():
    pool = Pool(stored(), now=100.0, cooldown=30)
    eni = pool.put_eni("eni-c", mac="02:00:00:00:00:0C", device_number=2, subnet_cidr="10.0.0.0/24",
                       primary_ip="10.0.0.40", primary=False, attached_at=50.0)
    eni.ours = True
    assert isinstance(eni, ENI) and pool.doc["enis"]["eni-c"]["ours"] is True and eni.mac == "02:00:00:00:00:0c"
    assert pool.entry("10.0.0.21") == IPEntry(pool.doc["enis"]["eni-b"]["ips"]["10.0.0.21"])
    assert pool.entry("10.9.9.9") is None
    pool.remove_ip("eni-a", "10.0.0.11")
    assert pool.entry("10.0.0.11") is None and "10.0.0.11" not in Document(pool.doc).enis["eni-a"].ips
