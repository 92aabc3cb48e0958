"""cnicore.imds against real IMDSv2 servers in namespaces of this test run.

- The VPC lab's IMDS (live from the lab's EC2): what a node reads, and that it follows EC2.
- A small IMDSv2 server of this file, for what the lab cannot be asked to do: 401 on a token,
  5xx answers, malformed values, a hung reply, a refused token. It also listens on
  169.254.169.254, inside its own namespace only, to check the default endpoint.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cnicore.ec2 import EC2
from cnicore.imds import IMDS, IMDSError, IMDSNotFound, IMDSUnauthorized, IMDSUnreachable
from lab.test_ec2 import NetnsThread, start_server, vpc_lab  # noqa: F401 (fixture)
from vpclab import netns

TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAC0, MAC1 = "02:00:00:aa:00:01", "02:00:00:aa:00:02"
NODE = {  # what IMDS serves under /latest/meta-data/ for a node with two ENIs
    "instance-id": "i-0123456789abcdef0",
    "instance-type": "m5.large",
    "placement/availability-zone": "eu-west-1b",
    "local-ipv4": "10.0.1.10",
    "mac": MAC0,
    "network/interfaces/macs/": f"{MAC0}/\n{MAC1}/",
    **{f"network/interfaces/macs/{mac}/{key}": value for mac, fields in {
        MAC0: {"device-number": "0", "interface-id": "eni-0000000000000000a",
               "local-ipv4s": "10.0.1.10\n10.0.1.11\n10.0.1.12"},
        MAC1: {"device-number": "1", "interface-id": "eni-0000000000000000b", "local-ipv4s": "10.0.1.50"},
    }.items() for key, value in {**fields, "subnet-id": "subnet-0000000000000000c",
                                 "subnet-ipv4-cidr-block": "10.0.1.0/24", "vpc-id": "vpc-0000000000000000d",
                                 "vpc-ipv4-cidr-blocks": "10.0.0.0/16\n100.64.0.0/16",
                                 "security-group-ids": "sg-0000000000000000e\nsg-0000000000000000f"}.items()},
}


# --- a small IMDSv2 server -----------------------------------------------------------------------

class IMDSv2(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tree: dict[str, str]):
        super().__init__(("0.0.0.0", 80), _IMDSHandler)
        self.tree = dict(tree)
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, str | None, str]] = []  # (method, path, token, host)
        self.answers: list[int] = []   # statuses to answer the next requests with, first to last
        self.put_status = 200          # what a token PUT gets
        self.accept_tokens = True      # False: every token is refused (401)
        self.delay = 0.0               # seconds before each answer

    def issued(self) -> int:
        return sum(1 for r in self.requests if r[0] == "PUT")


class _IMDSHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms stall each

    def log_message(self, *args):
        pass

    def do_PUT(self):
        srv = self.server
        srv.requests.append(("PUT", self.path, None, self.headers.get("Host", "")))
        if self._injected():
            return
        ttl = self.headers.get(TOKEN_TTL_HEADER, "")
        if self.path != "/latest/api/token" or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._answer(400, "bad token request")
        if srv.put_status != 200:
            return self._answer(srv.put_status, "no")
        token = secrets.token_urlsafe(32)
        srv.tokens.add(token)
        self._answer(200, token)

    def do_GET(self):
        srv = self.server
        token = self.headers.get(TOKEN_HEADER)
        srv.requests.append(("GET", self.path, token, self.headers.get("Host", "")))
        if self._injected():
            return
        if token not in srv.tokens or not srv.accept_tokens:
            return self._answer(401, "Unauthorized")
        value = srv.tree.get(self.path.removeprefix("/latest/meta-data/"))
        self._answer(200, value) if value is not None else self._answer(404, "Not Found")

    def _injected(self) -> bool:
        time.sleep(self.server.delay)
        if self.server.answers:
            self._answer(self.server.answers.pop(0), "injected")
            return True
        return False

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def imds(make_netns, monkeypatch):
    """(server, run): the small IMDSv2 server on 169.254.169.254:80 and 127.0.0.1:80 of a fresh
    namespace, and a runner that executes client code inside that namespace."""
    ns = make_netns("imds")
    netns.run(["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"], netns=ns)
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", raising=False)
    run = NetnsThread(ns)
    server = run(lambda: start_server(IMDSv2(NODE)))
    yield server, run
    server.shutdown()
    server.server_close()
    run.close()


def recorded():
    sleeps = []
    return sleeps, dict(sleep=sleeps.append)


# --- the client on its own -----------------------------------------------------------------------

def test_module_import_is_light():
    code = ("import sys, time; t = time.perf_counter(); import cnicore.imds; took = time.perf_counter() - t; "
            "assert not {'boto3', 'botocore', 'urllib3', 'requests'} & set(sys.modules), sorted(sys.modules); "
            "print(took)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 0.5


def test_identity_from_the_default_endpoint_with_one_token(imds):
    server, run = imds
    ident = run(lambda: IMDS().identity())
    assert (ident.instance_id, ident.instance_type, ident.availability_zone, ident.region) == (
        "i-0123456789abcdef0", "m5.large", "eu-west-1b", "eu-west-1")
    assert (ident.primary_mac, ident.local_ipv4) == (MAC0, "10.0.1.10")
    puts = [r for r in server.requests if r[0] == "PUT"]
    gets = [r for r in server.requests if r[0] == "GET"]
    assert len(puts) == 1 and len(gets) == 5 and {r[3] for r in server.requests} == {"169.254.169.254"}
    assert len({r[2] for r in gets}) == 1 and gets[0][2] in server.tokens


def test_endpoint_from_the_standard_variable(imds, monkeypatch):
    server, run = imds
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:80/")
    assert run(lambda: IMDS().get("instance-id")) == "i-0123456789abcdef0"
    assert {r[3] for r in server.requests} == {"127.0.0.1"}


def test_enis_by_mac(imds):
    _, run = imds
    enis = run(lambda: IMDS().enis())
    assert list(enis) == [MAC0, MAC1]
    primary, second = enis[MAC0], enis[MAC1]
    assert (primary.device_number, primary.interface_id) == (0, "eni-0000000000000000a")
    assert primary.local_ipv4s == ("10.0.1.10", "10.0.1.11", "10.0.1.12")
    assert primary.primary_ip == "10.0.1.10" and primary.secondary_ips == ("10.0.1.11", "10.0.1.12")
    assert (second.device_number, second.local_ipv4s, second.secondary_ips) == (1, ("10.0.1.50",), ())
    assert second.subnet_id == "subnet-0000000000000000c" and second.subnet_cidr == "10.0.1.0/24"
    assert second.gateway == "10.0.1.1" and second.vpc_id == "vpc-0000000000000000d"
    assert second.vpc_cidrs == ("10.0.0.0/16", "100.64.0.0/16")
    assert second.security_group_ids == ("sg-0000000000000000e", "sg-0000000000000000f")
    assert run(lambda: IMDS().eni(MAC1.upper())) == second


def test_a_rejected_token_is_renewed_once(imds):
    server, run = imds
    client = IMDS()
    assert run(client.get, "instance-id") == "i-0123456789abcdef0"
    server.tokens.clear()  # IMDS forgot it (e.g. a restart)
    assert run(client.get, "instance-type") == "m5.large"
    assert server.issued() == 2


def test_a_token_is_renewed_before_it_expires(imds):
    server, run = imds
    now = [1000.0]
    client = IMDS(clock=lambda: now[0])
    run(client.get, "instance-id")
    now[0] += 21600 - 59
    run(client.get, "instance-id")
    assert server.issued() == 2
    assert [r[0] for r in server.requests] == ["PUT", "GET", "PUT", "GET"]  # no 401 on the way


def test_tokens_always_refused_is_unauthorized_and_the_token_never_shows(imds):
    server, run = imds
    server.accept_tokens = False
    client = IMDS()
    with pytest.raises(IMDSUnauthorized, match="rejected a fresh session token") as err:
        run(client.get, "instance-id")
    given = {r[2] for r in server.requests if r[0] == "GET"}
    assert len(given) == 2 and all(t and t not in str(err.value) and t not in repr(client) for t in given)


def test_a_refused_token_request_is_a_clear_error(imds):
    server, run = imds
    server.put_status = 403
    with pytest.raises(IMDSError, match=r"refused a session token \(403\)"):
        run(lambda: IMDS().get("instance-id"))


def test_a_missing_path_is_not_found(imds):
    _, run = imds
    with pytest.raises(IMDSNotFound, match="no 'placement/region' \\(404\\)") as err:
        run(lambda: IMDS().get("placement/region"))
    assert err.value.path == "placement/region"
    with pytest.raises(IMDSNotFound, match="02:00:00:aa:00:99"):
        run(lambda: IMDS().eni("02:00:00:aa:00:99"))


def test_server_errors_are_retried(imds):
    server, run = imds
    server.answers = [500, 503, 429]
    sleeps, kw = recorded()
    assert run(lambda: IMDS(attempts=4, **kw).get("instance-id")) == "i-0123456789abcdef0"
    assert sleeps == [0.1, 0.2, 0.4]


def test_server_errors_past_the_retries(imds):
    server, run = imds
    server.answers = [503] * 3
    sleeps, kw = recorded()
    with pytest.raises(IMDSUnreachable, match="unreachable for a session token after 3 attempts: HTTP 503"):
        run(lambda: IMDS(**kw).get("instance-id"))
    assert len(sleeps) == 2


def test_nothing_listening(imds, monkeypatch):
    _, run = imds
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
    sleeps, kw = recorded()
    with pytest.raises(IMDSUnreachable, match="after 3 attempts: ConnectionRefusedError"):
        run(lambda: IMDS(**kw).identity())
    assert len(sleeps) == 2


def test_a_hung_server_times_out(imds):
    server, run = imds
    server.delay = 5.0  # s: both attempts give up well before one answer would come
    started = time.monotonic()
    with pytest.raises(IMDSUnreachable, match="after 2 attempts: TimeoutError"):
        run(lambda: IMDS(timeout=0.2, attempts=2, backoff=0).get("instance-id"))
    assert time.monotonic() - started < server.delay


@pytest.mark.parametrize("endpoint", ["https://169.254.169.254", "169.254.169.254", "http://imds/latest/"])
def test_a_bad_endpoint_is_refused(imds, monkeypatch, endpoint):
    server, run = imds
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
    with pytest.raises(IMDSError, match="bad IMDS endpoint"):
        run(IMDS)
    assert server.requests == []


@pytest.mark.parametrize("call", [lambda c: c.get("/latest/meta-data/mac"), lambda c: c.get("../user-data"),
                                  lambda c: c.get(""), lambda c: c.eni("eth1"), lambda c: c.eni(None)])
def test_bad_arguments_send_nothing(imds, call):
    server, run = imds
    with pytest.raises(ValueError):
        run(call, IMDS())
    assert server.requests == []


@pytest.mark.parametrize("path,value,message", [
    ("network/interfaces/macs/02:00:00:aa:00:02/device-number", "one", "malformed device number"),
    ("network/interfaces/macs/02:00:00:aa:00:02/local-ipv4s", "10.0.1.300", "malformed IPv4 address"),
    ("network/interfaces/macs/02:00:00:aa:00:02/local-ipv4s", "", "no address"),
    ("network/interfaces/macs/02:00:00:aa:00:02/subnet-ipv4-cidr-block", "10.0.1.0/33", "malformed IPv4 CIDR"),
    ("network/interfaces/macs/", "not-a-mac/", "malformed MAC"),
])
def test_malformed_values_are_clear_errors(imds, path, value, message):
    server, run = imds
    server.tree[path] = value
    with pytest.raises(IMDSError, match=message):
        run(lambda: IMDS().enis())


def test_a_malformed_zone_is_a_clear_error(imds):
    server, run = imds
    server.tree["placement/availability-zone"] = "moon"
    with pytest.raises(IMDSError, match="malformed availability zone 'moon'"):
        run(lambda: IMDS().identity())


# --- through the VPC lab: IMDS as EC2 sees the node --------------------------------------------

def test_lab_node_reads_itself_and_follows_ec2(vpc_lab):
    lab, run = vpc_lab
    client = IMDS()
    ident = run(client.identity)
    node = lab.status()["nodes"][0]
    assert (ident.instance_id, ident.instance_type, ident.local_ipv4) == (
        node["instance_id"], node["instance_type"], node["primary_ip"])
    described = lab.ec2("DescribeInstances", InstanceIds=[ident.instance_id])["Reservations"][0]["Instances"][0]
    assert ident.availability_zone == described["Placement"]["AvailabilityZone"]
    assert ident.region == lab.node_env("node1")["AWS_REGION"]
    primary = run(client.eni, ident.primary_mac)
    assert (primary.device_number, primary.primary_ip) == (0, ident.local_ipv4)
    assert primary.interface_id == described["NetworkInterfaces"][0]["NetworkInterfaceId"]

    ec2 = EC2(ident.instance_id)
    eni = run(ec2.allocate_eni, primary.subnet_id, primary.security_group_ids)
    eni = run(ec2.assign_ips, eni.eni_id, 3)
    deadline = time.monotonic() + 5
    while eni.mac not in (seen := run(client.enis)) or len(seen[eni.mac].local_ipv4s) < 4:
        assert time.monotonic() < deadline, "IMDS did not show the attached ENI"
        time.sleep(0.2)
    shown = seen[eni.mac]
    assert (shown.device_number, shown.interface_id, shown.primary_ip) == (1, eni.eni_id, eni.primary_ip)
    assert set(shown.secondary_ips) == set(eni.secondary_ips)
    assert (shown.subnet_cidr, shown.vpc_cidrs, shown.security_group_ids) == (
        primary.subnet_cidr, primary.vpc_cidrs, primary.security_group_ids)


def test_lab_region_for_ec2_comes_from_imds_when_unset(vpc_lab, monkeypatch):
    lab, run = vpc_lab
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    ident = run(IMDS().identity)
    ec2 = EC2(ident.instance_id)
    assert [e.device_index for e in run(ec2.instance_enis)] == [0]
    assert ec2.region == ident.region == lab.node_env("node1")["AWS_REGION"]


def test_lab_imds_down_is_unreachable(vpc_lab):
    lab, run = vpc_lab
    lab.fault("IMDS", error="down", count=3, node="node1")
    sleeps, kw = recorded()
    with pytest.raises(IMDSUnreachable, match="after 3 attempts"):
        run(lambda: IMDS(**kw).get("instance-id"))
    assert lab.imds_calls()["node1"] == 3
