"""Each node's IMDS: the IMDSv2 token flow, every path the plugins read, live from EC2 (or as stale as
asked), and an IMDS that stops answering on request."""

import time

from .labtools import probe, python_in, wait_for

MD = "/latest/meta-data/"

TOKEN_SCRIPT = r'''
import http.client, json
def req(method, path, headers):
    c = http.client.HTTPConnection("169.254.169.254", 80, timeout=3)
    c.request(method, path, headers=headers)
    r = c.getresponse()
    return r.status, r.read().decode()
ttl = "X-aws-ec2-metadata-token-ttl-seconds"
status, token = req("PUT", "/latest/api/token", {ttl: "1"})
out = {
    "no_token": req("GET", "/latest/meta-data/instance-id", {})[0],
    "bad_token": req("GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "forged"})[0],
    "ttl_0": req("PUT", "/latest/api/token", {ttl: "0"})[0],
    "ttl_too_long": req("PUT", "/latest/api/token", {ttl: "21601"})[0],
    "no_ttl": req("PUT", "/latest/api/token", {})[0],
    "forwarded": req("PUT", "/latest/api/token", {ttl: "60", "X-Forwarded-For": "10.0.0.99"})[0],
    "good": req("GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": token}),
}
import time; time.sleep(1.1)
out["expired"] = req("GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": token})[0]
print(json.dumps(out))
'''


def test_imdsv2_token_flow(fresh_lab):
    out = python_in(fresh_lab, "node1", TOKEN_SCRIPT)
    instance_id = fresh_lab.status()["nodes"][0]["instance_id"]
    assert out == {"no_token": 401, "bad_token": 401, "ttl_0": 400, "ttl_too_long": 400, "no_ttl": 400,
                   "forwarded": 403, "good": [200, instance_id], "expired": 401}


def test_every_path_the_plugins_read(fresh_lab):
    status = fresh_lab.status()
    node = status["nodes"][1]
    mac = node["mac"]
    eni = fresh_lab.ec2("AssignPrivateIpAddresses", NetworkInterfaceId=node["eni_id"],
                        SecondaryPrivateIpAddressCount=2)
    secondaries = [a["PrivateIpAddress"] for a in eni["AssignedPrivateIpAddresses"]]
    per_mac = f"{MD}network/interfaces/macs/{mac}/"
    expected = {
        MD + "instance-id": node["instance_id"],
        MD + "instance-type": "m5.large",
        MD + "local-ipv4": node["primary_ip"],
        MD + "mac": mac,
        MD + "placement/availability-zone": node["az"],
        MD + "network/interfaces/macs/": f"{mac}/",
        per_mac + "device-number": "0",
        per_mac + "interface-id": node["eni_id"],
        per_mac + "local-ipv4s": "\n".join([node["primary_ip"], *secondaries]),
        per_mac + "subnet-id": node["subnet_id"],
        per_mac + "subnet-ipv4-cidr-block": status["subnets"][0]["cidr"],
        per_mac + "vpc-id": status["vpc_id"],
        per_mac + "vpc-ipv4-cidr-blocks": "\n".join(status["vpc_cidrs"]),
        per_mac + "security-group-ids": status["security_group_id"],
    }
    out = probe(fresh_lab, "node2", "imds", *expected)
    assert out["token_status"] == 200
    assert out["answers"] == {path: [200, value] for path, value in expected.items()}
    assert probe(fresh_lab, "node2", "imds", MD + "no-such-thing")["answers"][MD + "no-such-thing"][0] == 404
    assert fresh_lab.imds_calls() == {"node2": (1 + len(expected)) + (1 + 1)}  # a token, then each path


def attach_new_eni(lab, node) -> dict:
    eni = lab.ec2("CreateNetworkInterface", SubnetId=node["subnet_id"], SecondaryPrivateIpAddressCount=1)
    eni = eni["NetworkInterface"]
    lab.ec2("AttachNetworkInterface", NetworkInterfaceId=eni["NetworkInterfaceId"], InstanceId=node["instance_id"],
            DeviceIndex=1)
    return eni


def macs_seen(lab, host):
    return probe(lab, host, "imds", MD + "network/interfaces/macs/")["answers"][MD + "network/interfaces/macs/"][1]


def test_imds_follows_an_attach_at_once(fresh_lab):
    node = fresh_lab.status()["nodes"][0]
    eni = attach_new_eni(fresh_lab, node)
    mac = eni["MacAddress"]
    per_mac = f"{MD}network/interfaces/macs/{mac}/"
    out = probe(fresh_lab, "node1", "imds", MD + "network/interfaces/macs/", per_mac + "device-number",
                per_mac + "local-ipv4s", per_mac + "interface-id")["answers"]
    ips = [a["PrivateIpAddress"] for a in sorted(eni["PrivateIpAddresses"], key=lambda a: not a["Primary"])]
    assert out == {MD + "network/interfaces/macs/": [200, f"{node['mac']}/\n{mac}/"],
                   per_mac + "device-number": [200, "1"],
                   per_mac + "local-ipv4s": [200, "\n".join(ips)],
                   per_mac + "interface-id": [200, eni["NetworkInterfaceId"]]}


def test_stale_imds_lags_ec2_by_the_staleness(fresh_lab):
    fresh_lab.set_imds_staleness(1.5)
    node = fresh_lab.status()["nodes"][0]
    attached_at = time.monotonic()
    mac = attach_new_eni(fresh_lab, node)["MacAddress"]
    assert mac not in macs_seen(fresh_lab, "node1")
    assert wait_for(lambda: mac in macs_seen(fresh_lab, "node1"), timeout=5, interval=0.1)
    lag = time.monotonic() - attached_at
    assert 1.5 <= lag < 3.0, lag


def test_imds_down_on_one_node(fresh_lab):
    fresh_lab.fault("IMDS", node="node1", count=1)
    down = probe(fresh_lab, "node1", "imds", MD + "instance-id")
    assert "error" in down and "token_status" not in down  # the token request went unanswered
    assert probe(fresh_lab, "node2", "imds", MD + "instance-id")["token_status"] == 200
    assert probe(fresh_lab, "node1", "imds", MD + "instance-id")["token_status"] == 200


def test_botocore_imds_client_works_against_it(fresh_lab):
    """botocore's own IMDSv2 client (token, then GET) finds the region from the node's IMDS."""
    code = ("import json\nfrom botocore.utils import InstanceMetadataRegionFetcher\n"
            "print(json.dumps(InstanceMetadataRegionFetcher().retrieve_region()))")
    assert python_in(fresh_lab, "node1", code) == "us-west-2"
    assert fresh_lab.imds_calls() == {"node1": 2}
