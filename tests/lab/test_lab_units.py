"""Pure parts of the lab: faults, the IMDS tree, data-plane planning, the snapshot cache."""

import json
import time

import pytest

from vpclab.dataplane import Port, desired_ports, plan_commands
from vpclab.config import LabConfig
from vpclab.ec2model import Snapshot
from vpclab.errors import LabError
from vpclab.faults import Fault, FaultBook
from vpclab.imds import lookup, metadata_tree
from vpclab.state import StateCache

from .samples import PRIMARY, eni, snapshot


# --- faults --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"action": "assign"}, "fault action 'assign'"),
    ({"action": "AssignPrivateIpAddresses", "error": "Nope"}, "fault error 'Nope': known EC2 errors are"),
    ({"action": "AssignPrivateIpAddresses"}, "give an error, a latency, or both"),
    ({"action": "*", "error": "InternalError", "count": 0}, "fault count 0"),
    ({"action": "*", "error": "InternalError", "duration": -1}, "fault duration -1"),
    ({"action": "*", "latency": 61}, "fault latency 61"),
    ({"action": "*", "error": "InternalError", "node": "node1"}, "only IMDS faults are per node"),
    ({"action": "IMDS", "error": "InternalError"}, "the IMDS fault is 'down'"),
])
def test_bad_faults_are_refused(kwargs, message):
    with pytest.raises(LabError) as e:
        Fault.make(**kwargs)
    assert message in str(e.value)


def test_faults_match_by_action_and_run_out():
    book = FaultBook()
    book.add(Fault.make("AssignPrivateIpAddresses", "RequestLimitExceeded", count=2))
    book.add(Fault.make("*", latency=0.5))
    assert book.take("AssignPrivateIpAddresses").error == "RequestLimitExceeded"
    assert book.take("DescribeSubnets").latency == 0.5
    assert book.take("AssignPrivateIpAddresses").error == "RequestLimitExceeded"
    assert book.take("AssignPrivateIpAddresses").error is None  # the count ran out; "*" remains
    assert book.take("IMDS", "node1") is None
    book.clear()
    assert book.take("DescribeSubnets") is None


def test_faults_expire_and_imds_faults_pick_nodes():
    book = FaultBook()
    book.add(Fault.make("IMDS", node="node2", duration=0.2))
    assert book.take("IMDS", "node1") is None
    assert book.take("IMDS", "node2").error == "down"
    assert book.take("DescribeSubnets") is None
    time.sleep(0.25)
    assert book.take("IMDS", "node2") is None and book.listed() == []


# --- IMDS ----------------------------------------------------------------------------------------

def test_metadata_tree_and_listings():
    second = eni("eni-s", ["10.0.0.7", "10.0.0.8"], "i-1", 1)
    tree = metadata_tree(snapshot(PRIMARY, second), "i-1", "us-west-2")
    assert lookup(tree, "meta-data/instance-id") == "i-1"
    assert lookup(tree, "meta-data/placement/availability-zone") == "us-west-2a"
    assert lookup(tree, "meta-data/mac") == PRIMARY.mac
    assert lookup(tree, "meta-data/network/interfaces/macs/") == f"{PRIMARY.mac}/\n{second.mac}/"
    mac = f"meta-data/network/interfaces/macs/{second.mac}/"
    assert lookup(tree, mac + "device-number") == "1"
    assert lookup(tree, mac + "local-ipv4s") == "10.0.0.7\n10.0.0.8"
    assert lookup(tree, mac + "subnet-ipv4-cidr-block") == "10.0.0.0/28"
    assert lookup(tree, mac + "vpc-ipv4-cidr-blocks") == "10.0.0.0/16"
    assert lookup(tree, mac + "security-group-ids") == "sg-1"
    assert "network/" in lookup(tree, "meta-data").split("\n")
    assert lookup(tree, "meta-data/nothing") is None and lookup(tree, "meta-data/mac/x") is None
    assert json.loads(lookup(tree, "dynamic/instance-identity/document"))["region"] == "us-west-2"
    assert metadata_tree(snapshot(), "i-1", "us-west-2") is None


# --- data plane ----------------------------------------------------------------------------------

def ports_of(*enis):
    config = LabConfig(name="avcx1", nodes=1)
    return desired_ports(snapshot(*enis), {"i-1": config.node_plans()[0]})


def test_first_sync_wires_the_primary_eni():
    want = ports_of(PRIMARY)
    assert want == {"n1d0": Port("n1d0", "eni-p", PRIMARY.mac, "avcx1-node1", 0, ("10.0.0.10",), "10.0.0.0/28")}
    router, nodes = plan_commands(want, {}, {}, {})
    assert router[0] == f"link add n1d0 mtu 9001 type veth peer name eth0 netns avcx1-node1 address {PRIMARY.mac}"
    assert "route replace 10.0.0.10/32 dev n1d0 proto static scope link" in router
    assert f"neigh replace 10.0.0.10 lladdr {PRIMARY.mac} dev n1d0 nud permanent" in router
    assert nodes == {"avcx1-node1": ["link set eth0 mtu 9001 up", "addr add 10.0.0.10/28 dev eth0",
                                     "route add default via 10.0.0.1 dev eth0"]}


def test_sync_follows_moves_and_detaches():
    second = eni("eni-s", ["10.0.0.7"], "i-1", 1)
    links = {"n1d0": PRIMARY.id + "/" + PRIMARY.mac, "n1d1": second.id + "/" + second.mac}
    routes = {"10.0.0.10": "n1d0", "10.0.0.7": "n1d1", "10.0.0.8": "n1d0"}
    neighbours = {("10.0.0.10", "n1d0"): PRIMARY.mac, ("10.0.0.7", "n1d1"): second.mac,
                  ("10.0.0.8", "n1d0"): PRIMARY.mac}
    # in sync: nothing to do
    assert plan_commands(ports_of(eni("eni-p", ["10.0.0.10", "10.0.0.8"], "i-1", 0), second),
                         links, routes, neighbours) == ([], {})
    # .8 moved to the second ENI
    router, _ = plan_commands(ports_of(PRIMARY, eni("eni-s", ["10.0.0.7", "10.0.0.8"], "i-1", 1)),
                              links, routes, neighbours)
    assert router == ["route del 10.0.0.8/32 dev n1d0", "neigh del 10.0.0.8 dev n1d0",
                      "route replace 10.0.0.8/32 dev n1d1 proto static scope link",
                      f"neigh replace 10.0.0.8 lladdr {second.mac} dev n1d1 nud permanent"]
    # the second ENI detached, .8 unassigned
    router, nodes = plan_commands(ports_of(PRIMARY), links, routes, neighbours)
    assert router == ["link del n1d1", "route del 10.0.0.8/32 dev n1d0", "neigh del 10.0.0.8 dev n1d0"]
    assert nodes == {}


# --- snapshot cache ------------------------------------------------------------------------------

class Reads:
    """Snapshots numbered by read, taken 'now'; `asked` records what each read was asked for."""

    def __init__(self):
        self.count = 0
        self.asked = []

    def __call__(self, previous, enis):
        self.count += 1
        self.asked.append(enis)
        return Snapshot(time.time(), {"n": self.count})


def test_live_reads_again_only_after_a_change():
    reads = Reads()
    cache = StateCache(reads)
    first = cache.live()
    assert cache.live() is first and reads.count == 1
    cache.mark_dirty()
    assert cache.live().vpcs == {"n": 2}


def test_a_change_naming_its_enis_reads_only_those_on_top_of_the_last_snapshot():
    reads = Reads()
    cache = StateCache(reads)
    cache.mark_dirty({"eni-a"})       # nothing read yet: the first read is a whole one
    cache.live()
    cache.mark_dirty({"eni-a"})
    cache.mark_dirty({"eni-b"})
    cache.live()
    cache.mark_dirty(set())           # tags: nothing of the snapshot changed, but it is read again
    cache.live()
    cache.mark_dirty({"eni-c"})
    cache.mark_dirty()                # anything may have changed
    cache.live()
    cache.refresh()
    assert reads.asked == [None, frozenset({"eni-a", "eni-b"}), frozenset(), None, None]


def test_a_failed_read_leaves_its_enis_to_be_read():
    asked = []

    def read(previous, enis):
        asked.append(enis)
        if len(asked) == 2:
            raise OSError("moto is gone")
        return Snapshot(time.time(), {"n": len(asked)})

    cache = StateCache(read)
    cache.live()
    cache.mark_dirty({"eni-a"})
    with pytest.raises(OSError):
        cache.live()
    cache.mark_dirty({"eni-b"})
    cache.live()
    assert asked == [None, frozenset({"eni-a"}), frozenset({"eni-a", "eni-b"})]


def test_stale_imds_sees_the_state_of_staleness_ago():
    reads = Reads()
    cache = StateCache(reads, staleness=0.3)
    cache.refresh()
    time.sleep(0.35)
    cache.mark_dirty()
    assert cache.live().vpcs == {"n": 2}
    assert cache.for_imds().vpcs == {"n": 1}
    time.sleep(0.35)
    assert cache.for_imds().vpcs == {"n": 2}
    cache.staleness = 0
    cache.mark_dirty()
    assert cache.for_imds().vpcs == {"n": 3}


# --- IPv4 prefixes in IMDS and the data plane ------------------------------------------------------

def test_metadata_tree_lists_prefixes_one_per_line_and_only_when_there_are_some():
    delegated = eni("eni-s", ["10.0.0.7"], "i-1", 1, prefixes=["10.0.1.32/28", "10.0.1.64/28"])
    tree = metadata_tree(snapshot(PRIMARY, delegated), "i-1", "us-west-2")
    macs = "meta-data/network/interfaces/macs/"
    assert lookup(tree, f"{macs}{delegated.mac}/ipv4-prefix") == "10.0.1.32/28\n10.0.1.64/28"
    assert "ipv4-prefix" in lookup(tree, f"{macs}{delegated.mac}/").split("\n")
    assert lookup(tree, f"{macs}{PRIMARY.mac}/ipv4-prefix") is None
    assert "ipv4-prefix" not in lookup(tree, f"{macs}{PRIMARY.mac}/").split("\n")


def test_a_prefix_is_wired_as_its_sixteen_addresses():
    delegated = eni("eni-p", ["10.0.0.10"], "i-1", 0, prefixes=["10.0.1.32/28"])
    (port,) = ports_of(delegated).values()
    assert port.ips == ("10.0.0.10",) + tuple(f"10.0.1.{n}" for n in range(32, 48))
    router, _ = plan_commands({"n1d0": port}, {}, {}, {})
    assert "route replace 10.0.1.47/32 dev n1d0 proto static scope link" in router
