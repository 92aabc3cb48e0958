"""cnicore.ec2 against a real moto server in a namespace of this test run.

Between the client and moto sits a small EC2 front (a real HTTP hop, as the VPC lab's will be) that
records every request and, on demand, answers chosen actions with EC2 errors or hangs: moto has no
fault injection of its own. The client code runs on a thread inside the namespace (NetnsThread), so
its sockets live there; nothing is sent outside namespaces this run made.
"""

from __future__ import annotations

import http.client
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from conftest import RUN_PREFIX
from cnicore import instance_limits, poolmgr
from cnicore.ec2 import (EC2, ENI_DESCRIPTION_PREFIX, TAG_CLUSTER_NAME, TAG_CREATED_AT,
                         TAG_INSTANCE_ID, EC2Error, EC2LimitExceeded, EC2Throttled, EC2Unreachable,
                         ENINotFound, InsufficientAddresses, PrefixesUnsupported, RetryPolicy)
from cnicore.instance_limits import InstanceLimitsError
from vpclab import netns

MOTO_PORT, FRONT_PORT = 5000, 5001
FRONT_URL = f"http://127.0.0.1:{FRONT_PORT}"
REGION = "us-east-1"


# --- harness: a thread inside a namespace ------------------------------------------------------

class NetnsThread:
    """Runs callables on a worker thread switched into a namespace: the sockets they open, and the
    threads they start, live there."""

    def __init__(self, name: str):
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1)

    def __call__(self, fn, *args, **kwargs):
        return self._pool.submit(self._inside, fn, args, kwargs).result()

    def _inside(self, fn, args, kwargs):
        with netns.entered(self.name):
            return fn(*args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def wait_for_http(port: int, process: subprocess.Popen, path: str = "/", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {port} did not start (exit code {process.poll()})")
            time.sleep(0.1)


def start_server(server: ThreadingHTTPServer) -> ThreadingHTTPServer:
    """Serve on a daemon thread started from the calling (namespaced) thread."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- the EC2 front: records requests, injects faults -------------------------------------------

class EC2Front(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", FRONT_PORT), _FrontHandler)
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.faults = defaultdict(list)  # action -> [(status, code) | ("hang", seconds)]
            self.requests = []               # (action, params)

    def fail(self, action: str, code: str, status: int = 400, times: int = 1) -> None:
        with self.lock:
            self.faults[action] += [(status, code)] * times

    def hang(self, action: str, seconds: float, times: int = 1) -> None:
        with self.lock:
            self.faults[action] += [("hang", seconds)] * times

    def seen(self, action: str) -> int:
        return sum(1 for a, _ in self.requests if a == action)

    def params(self, action: str) -> list[dict]:
        return [p for a, p in self.requests if a == action]

    def take(self, action: str, params: dict):
        with self.lock:
            self.requests.append((action, params))
            queue = self.faults.get(action)
            return queue.pop(0) if queue else None


class _FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        params = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        fault = self.server.take(params.get("Action", ""), params)
        if fault and fault[0] == "hang":
            time.sleep(fault[1])
            self.close_connection = True
            return
        if fault:
            status, code = fault
            reply = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
                     f'<Message>injected {code}</Message></Error></Errors><RequestID>front</RequestID></Response>')
            self._reply(status, "text/xml", reply.encode())
            return
        upstream = http.client.HTTPConnection("127.0.0.1", MOTO_PORT, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request("POST", self.path, body, headers)
        answer = upstream.getresponse()
        self._reply(answer.status, answer.getheader("Content-Type", "text/xml"), answer.read())
        upstream.close()

    def _reply(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# --- fixtures --------------------------------------------------------------------------------

@dataclass
class EC2Lab:
    ns: str
    run: NetnsThread
    front: EC2Front
    admin: object  # boto3 EC2 client straight to moto (no front, no counting)
    image_id: str


@pytest.fixture(scope="session")
def ec2_lab(orphans_swept):
    """moto server + EC2 front in a namespace of this run, for the whole session."""
    ns = f"{RUN_PREFIX}-ec2"
    netns.create(ns)
    moto = run = front = None
    try:
        moto = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "moto.server",
                                 "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = NetnsThread(ns)
        run(wait_for_http, MOTO_PORT, moto, "/moto-api/")
        front = run(lambda: start_server(EC2Front()))
        import boto3
        admin = boto3.session.Session().client(
            "ec2", region_name=REGION, endpoint_url=f"http://127.0.0.1:{MOTO_PORT}",
            aws_access_key_id="testing", aws_secret_access_key="testing")
        image_id = run(admin.describe_images)["Images"][0]["ImageId"]  # slow in moto: once
        yield EC2Lab(ns, run, front, admin, image_id)
    finally:
        if front is not None:
            front.shutdown()
            front.server_close()
        if run is not None:
            run.close()
        if moto is not None:
            moto.kill()
            moto.wait()
        netns.delete(ns)


@dataclass
class VPC:
    lab: EC2Lab
    instance_id: str
    subnet_id: str
    sg_id: str
    primary_eni: str

    def run(self, fn, *args, **kwargs):
        return self.lab.run(fn, *args, **kwargs)

    def admin(self, method: str, **params):
        return self.lab.run(getattr(self.lab.admin, method), **params)

    def eni(self, eni_id: str) -> dict:
        return self.admin("describe_network_interfaces", NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]

    def our_enis(self) -> list[dict]:
        found = self.admin("describe_network_interfaces")["NetworkInterfaces"]
        return [e for e in found if e.get("Description", "").startswith(ENI_DESCRIPTION_PREFIX)]


def aws_env(monkeypatch, **extra):
    """Dummy credentials, the standard endpoint variable pointing at the front, no real AWS config."""
    for name in ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    env = dict(AWS_ENDPOINT_URL_EC2=FRONT_URL, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_REGION=REGION, AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture
def vpc(ec2_lab, monkeypatch):
    """A fresh moto state: a VPC, a /24 subnet, a security group, an m5.large instance."""
    aws_env(monkeypatch)
    ec2_lab.run(_moto_reset)
    ec2_lab.front.reset()
    admin = lambda method, **p: ec2_lab.run(getattr(ec2_lab.admin, method), **p)  # noqa: E731
    vpc_id = admin("create_vpc", CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = admin("create_subnet", VpcId=vpc_id, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")
    sg = admin("create_security_group", GroupName="nodes", Description="nodes", VpcId=vpc_id)["GroupId"]
    instance = admin("run_instances", ImageId=ec2_lab.image_id, MinCount=1, MaxCount=1, InstanceType="m5.large",
                     SubnetId=subnet["Subnet"]["SubnetId"], SecurityGroupIds=[sg])["Instances"][0]
    return VPC(ec2_lab, instance["InstanceId"], subnet["Subnet"]["SubnetId"], sg,
               instance["NetworkInterfaces"][0]["NetworkInterfaceId"])


_lab_names = (f"{netns.new_prefix('i')}{n}" for n in itertools.count())


@pytest.fixture
def vpc_lab(monkeypatch, request):
    """(lab, run): a one-node m5.large VPC lab of this run (another type if the test parametrizes
    vpc_lab indirectly with it), and a runner for client code inside node1 with node1's environment
    (the lab's EC2 front and IMDS)."""
    from vpclab.api import Lab

    lab = Lab.up(name=next(_lab_names), nodes=1, instance_type=getattr(request, "param", "m5.large"),
                 owner_pid=os.getpid())
    run = None
    try:
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            monkeypatch.delenv(name)
        for name, value in lab.node_env("node1").items():
            monkeypatch.setenv(name, value)
        run = NetnsThread(lab.netns("node1"))
        yield lab, run
    finally:
        if run is not None:
            run.close()
        lab.down()


def _moto_reset():
    conn = http.client.HTTPConnection("127.0.0.1", MOTO_PORT, timeout=10)
    conn.request("POST", "/moto-api/reset")
    assert conn.getresponse().status == 200
    conn.close()


def quick(**kw) -> tuple[dict, list]:
    """EC2 keyword arguments: recorded sleeps, a seeded jitter."""
    sleeps = []
    return dict(sleep=sleeps.append, rng=random.Random(4), **kw), sleeps


# --- tests -----------------------------------------------------------------------------------

def test_module_import_does_not_load_boto3():
    code = "import sys, cnicore.ec2; assert not {'boto3', 'botocore'} & set(sys.modules), sorted(sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_endpoint_and_region_come_from_the_standard_variables(vpc):
    ec2 = EC2(vpc.instance_id)
    enis = vpc.run(ec2.instance_enis)
    assert ec2.client.meta.endpoint_url == FRONT_URL and ec2.client.meta.region_name == REGION
    assert vpc.lab.front.seen("DescribeNetworkInterfaces") == 1  # it went through the front
    assert [(e.eni_id, e.device_index) for e in enis] == [(vpc.primary_eni, 0)]
    primary = enis[0]
    assert primary.primary_ip.startswith("10.0.1.") and primary.secondary_ips == ()
    assert primary.instance_id == vpc.instance_id and primary.subnet_id == vpc.subnet_id and primary.mac


@pytest.mark.parametrize("cluster", ["", "prod-1"])
def test_allocate_eni_creates_tags_and_attaches_at_lowest_free_index(vpc, cluster):
    ec2 = EC2(vpc.instance_id, cluster_name=cluster)
    before = time.time()
    first = vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    second = vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    assert (first.device_index, second.device_index) == (1, 2)

    seen = vpc.eni(first.eni_id)
    assert seen["Description"] == f"aws-K8S-{vpc.instance_id}"
    assert seen["SubnetId"] == vpc.subnet_id and [g["GroupId"] for g in seen["Groups"]] == [vpc.sg_id]
    assert seen["Attachment"]["InstanceId"] == vpc.instance_id and seen["Attachment"]["DeviceIndex"] == 1
    tags = {t["Key"]: t["Value"] for t in seen["TagSet"]}
    assert tags[TAG_INSTANCE_ID] == vpc.instance_id
    created = datetime.strptime(tags[TAG_CREATED_AT], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert before - 2 <= created.timestamp() <= time.time() + 1
    assert tags.get(TAG_CLUSTER_NAME) == (cluster or None)
    # DeleteOnTermination: moto does not keep it, so check what EC2 was asked
    modify = vpc.lab.front.params("ModifyNetworkInterfaceAttribute")
    assert [(p["NetworkInterfaceId"], p["Attachment.AttachmentId"], p["Attachment.DeleteOnTermination"])
            for p in modify] == [(first.eni_id, first.attachment_id, "true"),
                                 (second.eni_id, second.attachment_id, "true")]

    vpc.run(ec2.free_eni, first.eni_id)
    third = vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    assert third.device_index == 1  # the freed slot is reused
    assert ec2.calls["CreateNetworkInterface"] == 3 and ec2.calls["AttachNetworkInterface"] == 3


def test_failed_attach_deletes_the_new_eni(vpc):
    vpc.lab.front.fail("AttachNetworkInterface", "AttachmentLimitExceeded")
    ec2 = EC2(vpc.instance_id)
    with pytest.raises(EC2LimitExceeded, match="EC2 AttachNetworkInterface failed: AttachmentLimitExceeded"):
        vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    assert vpc.our_enis() == []
    assert ec2.calls["DeleteNetworkInterface"] == 1 and ec2.calls["ModifyNetworkInterfaceAttribute"] == 0


def test_failed_attach_is_reported_even_when_the_clean_up_fails(vpc):
    vpc.lab.front.fail("AttachNetworkInterface", "AttachmentLimitExceeded")
    vpc.lab.front.fail("DeleteNetworkInterface", "UnauthorizedOperation", status=403)
    ec2 = EC2(vpc.instance_id)
    with pytest.raises(EC2LimitExceeded, match="AttachNetworkInterface"):
        vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    assert [e["Status"] for e in vpc.our_enis()] == ["available"]  # left to the leaked-ENI sweep


def test_failed_delete_on_termination_frees_the_new_eni(vpc):
    vpc.lab.front.fail("ModifyNetworkInterfaceAttribute", "InvalidParameterValue")
    ec2 = EC2(vpc.instance_id)
    with pytest.raises(EC2Error, match="ModifyNetworkInterfaceAttribute failed: InvalidParameterValue"):
        vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    assert vpc.our_enis() == []
    assert ec2.calls["DetachNetworkInterface"] == 1 and ec2.calls["DeleteNetworkInterface"] == 1


def test_assign_and_unassign_secondary_ips(vpc):
    ec2 = EC2(vpc.instance_id)
    eni = vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    grown = vpc.run(ec2.assign_ips, eni.eni_id, 3)
    assert grown.primary_ip == eni.primary_ip and len(grown.secondary_ips) == 3
    assert eni.primary_ip not in grown.secondary_ips
    assert vpc.lab.front.params("AssignPrivateIpAddresses")[0]["SecondaryPrivateIpAddressCount"] == "3"
    vpc.run(ec2.unassign_ips, eni.eni_id, grown.secondary_ips[:2])
    left = [a["PrivateIpAddress"] for a in vpc.eni(eni.eni_id)["PrivateIpAddresses"]]
    assert left == [eni.primary_ip, grown.secondary_ips[2]]


def test_throttling_is_retried_with_jittered_backoff_and_every_request_counted(vpc):
    vpc.lab.front.fail("AssignPrivateIpAddresses", "RequestLimitExceeded", status=503, times=2)
    vpc.lab.front.fail("DescribeNetworkInterfaces", "InternalError", status=500, times=1)
    kw, sleeps = quick(retry=RetryPolicy(attempts=4, base_delay=0.2, max_delay=5))
    ec2 = EC2(vpc.instance_id, **kw)
    eni = vpc.run(ec2.assign_ips, vpc.primary_eni, 2)
    assert len(eni.secondary_ips) == 2
    # botocore's own retries are off: every attempt is one request, all counted
    assert ec2.calls == {"AssignPrivateIpAddresses": 3, "DescribeNetworkInterfaces": 2}
    assert vpc.lab.front.seen("AssignPrivateIpAddresses") == 3 and vpc.lab.front.seen("DescribeNetworkInterfaces") == 2
    assert ec2.errors == {("AssignPrivateIpAddresses", "RequestLimitExceeded"): 2,
                          ("DescribeNetworkInterfaces", "InternalError"): 1}
    assert len(sleeps) == 3 and 0 <= sleeps[0] <= 0.2 and 0 <= sleeps[1] <= 0.4 and 0 <= sleeps[2] <= 0.2
    assert len(set(sleeps)) == 3  # jittered


def test_backoff_is_bounded_then_throttling_is_reported(vpc):
    vpc.lab.front.fail("UnassignPrivateIpAddresses", "Throttling", status=400, times=5)
    kw, sleeps = quick(retry=RetryPolicy(attempts=5, base_delay=1.0, max_delay=2.5))
    ec2 = EC2(vpc.instance_id, **kw)
    with pytest.raises(EC2Throttled, match="EC2 UnassignPrivateIpAddresses failed: Throttling"):
        vpc.run(ec2.unassign_ips, vpc.primary_eni, ["10.0.1.200"])
    assert ec2.calls["UnassignPrivateIpAddresses"] == 5 and len(sleeps) == 4
    assert all(0 <= s <= 2.5 for s in sleeps) and sleeps[0] <= 1.0
    assert isinstance(ec2.last_error, EC2Throttled)


@pytest.mark.parametrize("faults,may_have_run", [
    ([(503, "RequestLimitExceeded")] * 3, False),               # refused on every attempt
    ([(500, "InternalError"), (503, "RequestLimitExceeded"), (503, "RequestLimitExceeded")], True),
    ([(503, "RequestLimitExceeded"), (500, "InternalError"), (400, "InvalidParameterValue")], True),
    ([(400, "InvalidParameterValue")], False),
], ids=["throttled", "5xx-then-throttled", "5xx-then-refused", "refused"])
def test_an_error_says_whether_any_attempt_may_have_run(vpc, faults, may_have_run):
    """The error raised is the last attempt's; a 5xx on an earlier one means EC2 may have run the
    request all the same (the agent then reads EC2's view before it acts again)."""
    for status, code in faults:
        vpc.lab.front.fail("AssignPrivateIpAddresses", code, status=status)
    kw, _ = quick(retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02))
    ec2 = EC2(vpc.instance_id, **kw)
    with pytest.raises(EC2Error, match=faults[-1][1]) as raised:
        vpc.run(ec2.assign_ips, vpc.primary_eni, 1)
    assert raised.value.may_have_run is may_have_run and ec2.calls["AssignPrivateIpAddresses"] == len(faults)


@pytest.mark.parametrize("action,code", [("AssignPrivateIpAddresses", "InsufficientFreeAddressesInSubnet"),
                                         ("CreateNetworkInterface", "InsufficientCidrBlocks")])
def test_subnet_out_of_addresses_is_its_own_error_and_not_retried(vpc, action, code):
    vpc.lab.front.fail(action, code)
    ec2 = EC2(vpc.instance_id)
    with pytest.raises(InsufficientAddresses, match=f"EC2 {action} failed: {code}"):
        if action == "CreateNetworkInterface":
            vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
        else:
            vpc.run(ec2.assign_ips, vpc.primary_eni, 1)
    assert ec2.calls[action] == 1 and vpc.our_enis() == []


def test_other_errors_fail_at_once_naming_the_action(vpc):
    ec2 = EC2(vpc.instance_id)
    with pytest.raises(EC2Error, match="EC2 CreateNetworkInterface failed: InvalidSubnetID.NotFound"):
        vpc.run(ec2.allocate_eni, "subnet-0000000000000000a", [vpc.sg_id])
    with pytest.raises(ENINotFound, match="DescribeNetworkInterfaces"):
        vpc.run(ec2.describe_eni, "eni-0000000000000000a")
    assert ec2.calls == {"CreateNetworkInterface": 1, "DescribeNetworkInterfaces": 1}


@pytest.mark.parametrize("call", [
    lambda ec2: ec2.assign_ips("eni-0123456789abcdef0", 0),
    lambda ec2: ec2.assign_ips("eni-0123456789abcdef0", True),
    lambda ec2: ec2.assign_ips("vol-0123456789abcdef0", 1),
    lambda ec2: ec2.unassign_ips("eni-0123456789abcdef0", []),
    lambda ec2: ec2.unassign_ips("eni-0123456789abcdef0", ["10.0.1.300"]),
    lambda ec2: ec2.create_eni("subnet-0123456789abcdef0", []),
    lambda ec2: ec2.create_eni("subnet-0123456789abcdef0", ["default"]),
    lambda ec2: ec2.allocate_eni("my-subnet", ["sg-0123456789abcdef0"]),
    lambda ec2: ec2.describe_eni(None),
])
def test_bad_input_is_refused_before_any_request(vpc, call):
    ec2 = EC2(vpc.instance_id)
    with pytest.raises(ValueError):
        vpc.run(call, ec2)
    assert ec2.calls == {} and vpc.lab.front.requests == []


@pytest.mark.parametrize("bad", ["", "i-xyz", "vol-0123456789abcdef0", None])
def test_bad_instance_id(bad):
    with pytest.raises(ValueError, match="not an EC2 instance ID"):
        EC2(bad)


def test_unreachable_endpoint(vpc, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:5999")  # nothing listens there
    kw, sleeps = quick(retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1))
    ec2 = EC2(vpc.instance_id, **kw)
    with pytest.raises(EC2Unreachable, match="EC2 DescribeNetworkInterfaces failed: EndpointConnectionError"):
        vpc.run(ec2.instance_enis)
    assert ec2.calls["DescribeNetworkInterfaces"] == 3 and len(sleeps) == 2


def test_a_hung_endpoint_times_out(vpc):
    hung = 15  # s: each request hangs this long; both attempts give up well before one of them ends
    vpc.lab.front.hang("DescribeInstanceTypes", hung, times=2)
    kw, sleeps = quick(retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01))
    ec2 = EC2(vpc.instance_id, timeout=0.5, **kw)
    started = time.monotonic()
    with pytest.raises(EC2Unreachable, match="ReadTimeoutError"):
        vpc.run(ec2.instance_type_limits, "m5.large")
    assert time.monotonic() - started < hung and ec2.calls["DescribeInstanceTypes"] == 2


def test_free_eni_detaches_and_deletes_and_refuses_the_primary(vpc):
    ec2 = EC2(vpc.instance_id)
    eni = vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    vpc.run(ec2.free_eni, eni.eni_id)
    assert vpc.our_enis() == []
    vpc.run(ec2.free_eni, eni.eni_id)  # already gone: fine
    with pytest.raises(ValueError, match="primary ENI"):
        vpc.run(ec2.free_eni, vpc.primary_eni)
    assert vpc.eni(vpc.primary_eni)["Status"] == "in-use"
    assert ec2.calls["DetachNetworkInterface"] == 1 and ec2.calls["DeleteNetworkInterface"] == 1


def test_free_eni_refuses_another_instances_eni(vpc):
    instance = vpc.admin("run_instances", ImageId=vpc.lab.image_id, MinCount=1, MaxCount=1,
                         InstanceType="m5.large", SubnetId=vpc.subnet_id)["Instances"][0]
    theirs = EC2(instance["InstanceId"])
    eni = vpc.run(theirs.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    with pytest.raises(ValueError, match="attached to"):
        vpc.run(EC2(vpc.instance_id).free_eni, eni.eni_id)
    assert vpc.eni(eni.eni_id)["Attachment"]["InstanceId"] == theirs.instance_id


def test_delete_waits_out_a_detach_in_progress(vpc):
    ec2 = EC2(vpc.instance_id, **quick()[0])
    eni = vpc.run(ec2.allocate_eni, vpc.subnet_id, [vpc.sg_id])
    vpc.lab.front.fail("DeleteNetworkInterface", "InvalidNetworkInterface.InUse", times=2)
    vpc.run(ec2.free_eni, eni.eni_id)
    assert ec2.calls["DeleteNetworkInterface"] == 3 and vpc.our_enis() == []


def test_instance_type_limits_from_describe_instance_types(vpc, monkeypatch):
    ec2 = EC2(vpc.instance_id)
    sample = ["m5.large", "t3.micro", "c5.18xlarge", "p4d.24xlarge", "r6i.32xlarge", "a1.medium"]
    for name in sample:  # the shipped table says what moto's DescribeInstanceTypes says
        assert vpc.run(ec2.instance_type_limits, name) == instance_limits.from_table(name)
    # a type the table lacks is looked up, once
    monkeypatch.setattr(instance_limits, "_table", lambda: {})
    calls = ec2.calls["DescribeInstanceTypes"]
    assert vpc.run(poolmgr.type_limits, "m5.large", ec2).max_pods == 29
    assert ec2.calls["DescribeInstanceTypes"] == calls + 1


def test_unknown_instance_type_with_describe_failing_is_a_clear_error(vpc):
    ec2 = EC2(vpc.instance_id)
    with pytest.raises(InstanceLimitsError,
                       match="'zz9.huge' is not in the shipped limits table and DescribeInstanceTypes failed: "
                             "EC2 DescribeInstanceTypes failed: InvalidInstanceType"):
        vpc.run(poolmgr.type_limits, "zz9.huge", ec2)


def test_through_the_lab_front_limits_and_faults_meet_the_client(vpc_lab):
    lab, run = vpc_lab
    instance_id = lab.status()["nodes"][0]["instance_id"]
    ec2 = EC2(instance_id, **quick()[0])
    primary = run(ec2.instance_enis)[0]
    subnet = primary.subnet_id
    described = lab.ec2("DescribeNetworkInterfaces", NetworkInterfaceIds=[primary.eni_id])["NetworkInterfaces"]
    groups = [g["GroupId"] for g in described[0]["Groups"]]
    lab.fault("AssignPrivateIpAddresses", error="RequestLimitExceeded", count=2)
    second = run(ec2.assign_ips, run(ec2.allocate_eni, subnet, groups).eni_id, 9)
    assert len(second.secondary_ips) == 9
    with pytest.raises(EC2LimitExceeded, match="PrivateIpAddressLimitExceeded"):
        run(ec2.assign_ips, second.eni_id, 1)  # an m5.large ENI holds 10 addresses
    run(ec2.allocate_eni, subnet, groups)
    with pytest.raises(EC2LimitExceeded, match="AttachmentLimitExceeded"):
        run(ec2.allocate_eni, subnet, groups)  # and the instance 3 ENIs
    left = lab.ec2("DescribeNetworkInterfaces")["NetworkInterfaces"]
    assert sorted(e["Attachment"]["DeviceIndex"] for e in left if e.get("Attachment")) == [0, 1, 2]
    assert [e for e in left if e["Status"] == "available"] == []  # the 4th was deleted again
    assert ec2.errors[("AssignPrivateIpAddresses", "RequestLimitExceeded")] == 2
    assert dict(ec2.calls) == lab.ec2_calls()  # our count is exactly what reached EC2


def test_prefixes_through_the_lab_front_assign_describe_unassign_and_instance_limit(vpc_lab):
    """Prefix delegation's calls: prefixes share the ENI's 10 slots with its primary address."""
    lab, run = vpc_lab
    ec2 = EC2(lab.status()["nodes"][0]["instance_id"], **quick()[0])
    primary = run(ec2.instance_enis)[0]
    run(ec2.assign_prefixes, primary.eni_id, 2)
    run(ec2.assign_prefixes, primary.eni_id, 7)
    held = run(ec2.describe_eni, primary.eni_id).prefixes
    assert len(held) == 9 and all(p.endswith("/28") for p in held)
    with pytest.raises(EC2LimitExceeded, match="PrivateIpAddressLimitExceeded"):
        run(ec2.assign_prefixes, primary.eni_id, 1)
    run(ec2.unassign_prefixes, primary.eni_id, held[:8])
    assert run(ec2.describe_eni, primary.eni_id).prefixes == held[8:]
    with pytest.raises(ValueError, match="not an IPv4 prefix"):
        ec2.unassign_prefixes(primary.eni_id, ["10.0.0.1/33"])


@pytest.mark.parametrize("vpc_lab", ["m4.large"], indirect=True)
def test_a_xen_instance_type_refusing_prefixes_is_its_own_error(vpc_lab):
    lab, run = vpc_lab
    ec2 = EC2(lab.status()["nodes"][0]["instance_id"], **quick()[0])
    primary = run(ec2.instance_enis)[0]
    with pytest.raises(PrefixesUnsupported, match="InvalidParameterValue.*m4.large"):
        run(ec2.assign_prefixes, primary.eni_id, 1)
    assert ec2.calls["AssignPrivateIpAddresses"] == 1  # not retried
