"""aws-eni-ipam on its hot path: a seeded store, the real plugin exec'd, no AWS in sight."""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cnicore import agentlink

from cnicore.pool import Pool, new_document
from cnicore.store import Store

NETWORK = "aws-vpc"


@pytest.fixture
def node(tmp_path):
    data_dir = tmp_path / "data"
    store = Store(str(data_dir), NETWORK)
    with store.locked() as tx:
        pool = Pool(new_document({"instance_id": "i-0123456789abcdef0"}), time.time())
        pool.put_eni("eni-00000000000000001", mac="02:00:00:00:00:01", device_number=0,
                     subnet_cidr="10.0.1.0/24", primary_ip="10.0.1.10", primary=True, attached_at=0)
        pool.put_eni("eni-00000000000000002", mac="02:00:00:00:00:02", device_number=1,
                     subnet_cidr="10.0.1.0/24", primary_ip="10.0.1.50", primary=False, attached_at=0)
        pool.set_secondary_ips("eni-00000000000000001", ["10.0.1.11", "10.0.1.12"])
        pool.set_secondary_ips("eni-00000000000000002", ["10.0.1.51"])
        tx.write(pool.doc)
    return Node(tmp_path, str(data_dir), store)


class Node:
    def __init__(self, tmp, data_dir, store):
        self.tmp, self.data_dir, self.store = tmp, data_dir, store

    def conf(self, version="1.1.0", **ipam):
        return {"cniVersion": version, "name": NETWORK, "type": "aws-vpc-bridge",
                "pluginLogFile": str(self.tmp / "plugin.log"),
                "ipam": {"type": "aws-eni-ipam", "dataDir": self.data_dir, "ipCooldownPeriod": 0, **ipam}}

    def run(self, command, cid="c1", conf=None, importtime=False, **env):
        exe = os.path.join(sys.prefix, "bin", "aws-eni-ipam")
        argv = [os.sys.executable, "-X", "importtime", exe] if importtime else [exe]
        environ = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
                   "CNI_NETNS": "/var/run/netns/pod", "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent",
                   "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1",
                   # an AWS environment that would fail loudly if anything tried to reach it
                   "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://203.0.113.254:1",
                   "AWS_ENDPOINT_URL_EC2": "http://203.0.113.254:1", **env}
        proc = subprocess.run(argv, input=json.dumps(conf or self.conf()).encode(), env=environ,
                              capture_output=True, timeout=60)
        out = proc.stdout.decode()
        return proc.returncode, (json.loads(out) if out.strip() else None), proc.stderr.decode()

    def doc(self):
        with self.store.locked(shared=True) as tx:
            return tx.read()


def test_warm_add_and_del_import_no_aws_code(node):
    rc, result, err = node.run("ADD", importtime=True)
    assert rc == 0, result
    assert result["ips"] == [{"address": "10.0.1.11/32", "gateway": "10.0.1.1"}]
    assert "interfaces" not in result
    imported = {line.split("|")[-1].strip().split(".")[0] for line in err.splitlines() if "import time" in line}
    assert not imported & {"boto3", "botocore", "urllib3", "http", "pyroute2"}, imported & {"boto3", "botocore"}
    assert "cnicore" in imported
    rc, _, err = node.run("DEL", importtime=True)
    assert rc == 0
    assert "boto3" not in err and "botocore" not in err


def test_add_records_the_pod_and_del_cools_the_ip(node):
    assert node.run("ADD", conf=node.conf(ipCooldownPeriod=30))[0] == 0
    entry = node.doc()["enis"]["eni-00000000000000001"]["ips"]["10.0.1.11"]
    assert (entry["state"], entry["container_id"], entry["ifname"], entry["pod_namespace"], entry["pod_name"]) == \
        ("assigned", "c1", "eth0", "default", "web-1")
    assert node.run("DEL", conf=node.conf(ipCooldownPeriod=30))[0] == 0
    assert node.doc()["enis"]["eni-00000000000000001"]["ips"]["10.0.1.11"]["state"] == "cooling"
    rc, result, _ = node.run("ADD", cid="c2", conf=node.conf(ipCooldownPeriod=30))
    assert result["ips"][0]["address"] == "10.0.1.12/32"  # not the cooling one


def test_ips_spread_over_enis_and_never_the_eni_primary(node):
    got = [node.run("ADD", cid=f"c{i}")[1]["ips"][0]["address"] for i in range(3)]
    assert got == ["10.0.1.11/32", "10.0.1.12/32", "10.0.1.51/32"]
    assert not {"10.0.1.10/32", "10.0.1.50/32"} & set(got)


def test_second_add_for_same_attachment_is_an_error(node):
    assert node.run("ADD")[0] == 0
    rc, err, _ = node.run("ADD")
    assert rc != 0 and err["code"] == 105 and "10.0.1.11" in err["msg"]


def test_check_and_gc(node):
    rc, result, _ = node.run("ADD")
    conf = node.conf()
    assert node.run("CHECK", conf=dict(conf, prevResult=result))[0] == 0
    wrong = json.loads(json.dumps(result))
    wrong["ips"][0]["address"] = "10.0.1.12/32"
    rc, err, _ = node.run("CHECK", conf=dict(conf, prevResult=wrong))
    assert rc != 0 and err["code"] == 104
    assert node.run("ADD", cid="c2")[0] == 0
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}]})
    assert node.run("GC", conf=gc)[0] == 0
    held = Pool(node.doc(), time.time()).attachments()
    assert [(cid, ip) for cid, _, ip in held] == [("c2", "10.0.1.12")]
    rc, err, _ = node.run("CHECK", conf=dict(conf, prevResult=result))
    assert rc != 0 and err["code"] == 104


def test_empty_pool_with_agent_running_is_try_again_later_and_nudges(node):
    for i in range(3):
        assert node.run("ADD", cid=f"c{i}")[0] == 0
    lock = os.open(os.path.join(node.data_dir, "agent.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    nudges = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nudges.bind(os.path.join(node.data_dir, "agent.nudge"))
    nudges.settimeout(5)
    with node.store.locked() as tx:
        doc = tx.read()
        doc["agent"]["blocked"] = {"reason": "the ENI limit of m5.large (3 ENIs) reached", "since": 0}
        tx.write(doc)
    try:
        rc, err, _ = node.run("ADD", cid="c9")
        assert rc != 0 and err["code"] == 11
        assert "ENI limit of m5.large" in err["msg"]
        # the nudge names the attachment that waits, so the agent grows for it (issue 16)
        assert agentlink.parse_waiting(nudges.recv(4096)) == (NETWORK, "c9", "eth0")
        rc, err, _ = node.run("STATUS")
        assert rc != 0 and err["code"] == 50 and "ENI limit" in err["msg"]
    finally:
        nudges.close()
        os.close(lock)
    assert len(Pool(node.doc(), time.time()).attachments()) == 3


def test_del_succeeds_on_a_corrupt_store_and_add_refuses(node):
    with open(node.store.path, "w") as f:
        f.write("{broken")
    assert node.run("DEL")[0] == 0
    rc, err, _ = node.run("ADD")
    assert rc != 0 and err["code"] == 100 and "corrupt" in err["msg"]
    with open(node.store.path) as f:
        assert f.read() == "{broken"


@pytest.mark.parametrize("ipam,word", [({"warmIPTarget": -1}, "warmIPTarget"), ({"dataDir": "relative"}, "dataDir"),
                                       ({"ipCooldownPeriod": "soon"}, "ipCooldownPeriod")])
def test_bad_settings_are_code_7_and_change_nothing(node, ipam, word):
    before = node.doc()
    rc, err, _ = node.run("ADD", conf=node.conf(**ipam))
    assert rc != 0 and err["code"] == 7 and word in err["msg"]
    assert node.doc() == before
