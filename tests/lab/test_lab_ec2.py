"""EC2 through the lab's front, driven by boto3 inside a node as the plugins will: limits, faults and
call counts come back as real EC2 errors (ClientError code and HTTP status)."""

import ipaddress
import time

import pytest

from .labtools import python_in


# Runs in a node: performs the steps, records each outcome as [code, HTTP status] or "ok".
LIMITS_SCRIPT = r'''
import json, boto3
from botocore.exceptions import ClientError
ec2 = boto3.client("ec2")
node1, node2, subnet, primary_attachment = %r
out = {}
def step(name, call, **kw):
    try:
        reply = getattr(ec2, call)(**kw)
        out[name] = "ok"
        return reply
    except ClientError as e:
        out[name] = [e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]]
a = step("create_a", "create_network_interface", SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
b = step("create_b", "create_network_interface", SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
c = step("create_c", "create_network_interface", SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
step("attach_a", "attach_network_interface", NetworkInterfaceId=a, InstanceId=node1, DeviceIndex=1)
step("attach_a_again", "attach_network_interface", NetworkInterfaceId=a, InstanceId=node2, DeviceIndex=1)
step("attach_b_taken_index", "attach_network_interface", NetworkInterfaceId=b, InstanceId=node1, DeviceIndex=1)
step("attach_b", "attach_network_interface", NetworkInterfaceId=b, InstanceId=node1, DeviceIndex=2)
step("attach_c_over_limit", "attach_network_interface", NetworkInterfaceId=c, InstanceId=node1, DeviceIndex=3)
step("assign_9", "assign_private_ip_addresses", NetworkInterfaceId=a, SecondaryPrivateIpAddressCount=9)
step("assign_10th", "assign_private_ip_addresses", NetworkInterfaceId=a, SecondaryPrivateIpAddressCount=1)
step("assign_outside", "assign_private_ip_addresses", NetworkInterfaceId=b, PrivateIpAddresses=["10.9.0.5"])
step("assign_reserved", "assign_private_ip_addresses", NetworkInterfaceId=b, PrivateIpAddresses=["10.0.0.3"])
held = ec2.describe_network_interfaces(NetworkInterfaceIds=[a])["NetworkInterfaces"][0]["PrivateIpAddresses"]
step("assign_held", "assign_private_ip_addresses", NetworkInterfaceId=b,
     PrivateIpAddresses=[held[1]["PrivateIpAddress"]])
step("detach_primary", "detach_network_interface", AttachmentId=primary_attachment)
step("delete_attached", "delete_network_interface", NetworkInterfaceId=a)
out["ips_of_a"] = [x["PrivateIpAddress"] for x in held]
print(json.dumps(out))
'''


def test_limits_return_ec2_error_codes_through_boto3(fresh_lab):
    status = fresh_lab.status()
    node1, node2 = status["nodes"]
    primary = fresh_lab.ec2("DescribeNetworkInterfaces", NetworkInterfaceIds=[node1["eni_id"]])
    attachment = primary["NetworkInterfaces"][0]["Attachment"]["AttachmentId"]
    args = (node1["instance_id"], node2["instance_id"], node1["subnet_id"], attachment)
    out = python_in(fresh_lab, "node1", LIMITS_SCRIPT % (args,))
    ips = out.pop("ips_of_a")
    assert out == {
        "create_a": "ok", "create_b": "ok", "create_c": "ok", "attach_a": "ok",
        "attach_a_again": ["InvalidNetworkInterface.InUse", 400],
        "attach_b_taken_index": ["InvalidParameterValue", 400],
        "attach_b": "ok",
        "attach_c_over_limit": ["AttachmentLimitExceeded", 400],  # m5.large: 3 ENIs
        "assign_9": "ok",
        "assign_10th": ["PrivateIpAddressLimitExceeded", 400],     # m5.large: 10 IPv4 per ENI
        "assign_outside": ["InvalidParameterValue", 400],
        "assign_reserved": ["InvalidParameterValue", 400],
        "assign_held": ["InvalidIPAddress.InUse", 400],
        "detach_primary": ["OperationNotPermitted", 400],
        "delete_attached": ["InvalidNetworkInterface.InUse", 400],
    }
    subnet = ipaddress.ip_network(status["subnets"][0]["cidr"])
    assert len(set(ips)) == 10 and all(ipaddress.ip_address(ip) in subnet for ip in ips)
    assert fresh_lab.ec2_calls() == {"CreateNetworkInterface": 3, "AttachNetworkInterface": 5,
                                     "AssignPrivateIpAddresses": 5, "DescribeNetworkInterfaces": 1,
                                     "DetachNetworkInterface": 1, "DeleteNetworkInterface": 1}


def test_subnet_exhaustion_is_answered_not_hung(make_lab):
    """A /28 has 11 usable addresses; two nodes hold 2. moto alone would loop forever on the 10th."""
    lab = make_lab(nodes=2, subnet_prefix=28)
    node1, node2 = lab.status()["nodes"]
    script = r'''
import json, boto3
from botocore.exceptions import ClientError
ec2 = boto3.client("ec2")
out = {}
ec2.assign_private_ip_addresses(NetworkInterfaceId=%r, SecondaryPrivateIpAddressCount=9)
assign = lambda: ec2.assign_private_ip_addresses(NetworkInterfaceId=%r, SecondaryPrivateIpAddressCount=1)
create = lambda: ec2.create_network_interface(SubnetId=%r)
for name, call in [("assign", assign), ("create", create)]:
    try:
        call()
        out[name] = "ok"
    except ClientError as e:
        out[name] = [e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]]
print(json.dumps(out))
''' % (node1["eni_id"], node2["eni_id"], node1["subnet_id"])
    out = python_in(lab, "node1", script, env={"AWS_MAX_ATTEMPTS": "1"})
    assert out == {"assign": ["InsufficientFreeAddressesInSubnet", 400],
                   "create": ["InsufficientFreeAddressesInSubnet", 400]}
    held = [a["PrivateIpAddress"] for e in lab.ec2("DescribeNetworkInterfaces")["NetworkInterfaces"]
            for a in e["PrivateIpAddresses"]]
    # every usable address handed out once: none of .0-.3 or .15 (EC2 keeps them), no duplicates
    assert sorted(held, key=ipaddress.ip_address) == [f"10.0.0.{n}" for n in range(4, 15)]


FAULT_SCRIPT = r'''
import json, time, boto3
from botocore.exceptions import ClientError
ec2 = boto3.client("ec2")
start = time.monotonic()
try:
    ec2.%s()
    out = {"result": "ok"}
except ClientError as e:
    out = {"result": [e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]]}
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
'''


@pytest.mark.parametrize("error, status", [("RequestLimitExceeded", 503), ("InternalError", 500),
                                           ("InsufficientFreeAddressesInSubnet", 400)])
def test_injected_errors_reach_boto3_with_their_code_and_status(fresh_lab, error, status):
    fresh_lab.fault("DescribeSubnets", error=error, count=1)
    out = python_in(fresh_lab, "node1", FAULT_SCRIPT % "describe_subnets", env={"AWS_MAX_ATTEMPTS": "1"})
    assert out["result"] == [error, status]
    assert fresh_lab.ec2_calls() == {"DescribeSubnets": 1}
    assert python_in(fresh_lab, "node1", FAULT_SCRIPT % "describe_subnets")["result"] == "ok"  # count used up


def test_botocore_retries_throttling_and_every_attempt_is_counted(fresh_lab):
    """botocore's default (standard) retry mode makes 3 attempts and retries RequestLimitExceeded."""
    fresh_lab.fault("DescribeNetworkInterfaces", error="RequestLimitExceeded", count=2)
    out = python_in(fresh_lab, "node1", FAULT_SCRIPT % "describe_network_interfaces")
    assert out["result"] == "ok"
    assert fresh_lab.ec2_calls(reset=True) == {"DescribeNetworkInterfaces": 3}
    assert fresh_lab.ec2_calls() == {}


def test_latency_and_time_limited_faults(fresh_lab):
    fresh_lab.fault("*", latency=0.5, duration=30)
    out = python_in(fresh_lab, "node1", FAULT_SCRIPT % "describe_vpcs")
    assert out["result"] == "ok" and out["seconds"] >= 0.5
    fresh_lab.clear_faults()
    fresh_lab.fault("DescribeVpcs", error="InternalError", duration=0.3)
    time.sleep(0.4)
    assert python_in(fresh_lab, "node1", FAULT_SCRIPT % "describe_vpcs")["result"] == "ok"


def test_bad_fault_requests_are_refused(fresh_lab):
    from vpclab.errors import LabError

    with pytest.raises(LabError, match="'DescribeEverything' is not an EC2 API action"):
        fresh_lab.fault("DescribeEverything", error="InternalError")
    with pytest.raises(LabError, match="fault node 'node9'"):
        fresh_lab.fault("IMDS", node="node9")
    assert fresh_lab.status()["faults"] == []


def test_delete_on_termination_is_kept(fresh_lab):
    """moto 5.2.5 ignores Attachment.DeleteOnTermination; the lab applies it, as EC2 does."""
    node = fresh_lab.status()["nodes"][0]
    eni = fresh_lab.ec2("CreateNetworkInterface", SubnetId=node["subnet_id"])["NetworkInterface"]["NetworkInterfaceId"]
    attachment = fresh_lab.ec2("AttachNetworkInterface", NetworkInterfaceId=eni, InstanceId=node["instance_id"],
                               DeviceIndex=1)["AttachmentId"]
    script = r'''
import json, boto3
from botocore.exceptions import ClientError
ec2 = boto3.client("ec2")
eni, attachment = %r
out = {}
try:
    ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, Attachment={"AttachmentId": "eni-attach-0",
                                                                               "DeleteOnTermination": True})
except ClientError as e:
    out["wrong_attachment"] = e.response["Error"]["Code"]
ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, Attachment={"AttachmentId": attachment,
                                                                           "DeleteOnTermination": True})
reply = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])
out["flag"] = reply["NetworkInterfaces"][0]["Attachment"]["DeleteOnTermination"]
print(json.dumps(out))
''' % ((eni, attachment),)
    assert python_in(fresh_lab, "node1", script) == {"wrong_attachment": "InvalidAttachmentID.NotFound", "flag": True}


def test_terminating_an_instance_deletes_its_primary_and_delete_on_termination_enis_and_detaches_the_rest(fresh_lab):
    """moto 5.2.5 leaves every ENI without DeleteOnTermination attached to the terminated instance,
    the primary one too; EC2 deletes the primary (made at launch) and detaches the others."""
    status = fresh_lab.status()
    subnet = status["subnets"][0]["id"]
    instance = fresh_lab.ec2("RunInstances", ImageId="ami-12c6146b", MinCount=1, MaxCount=1,
                             InstanceType="m5.large", SubnetId=subnet)["Instances"][0]["InstanceId"]
    kept, dropped = (fresh_lab.ec2("CreateNetworkInterface", SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
                     for _ in range(2))
    for index, eni in ((1, kept), (2, dropped)):
        attachment = fresh_lab.ec2("AttachNetworkInterface", NetworkInterfaceId=eni, InstanceId=instance,
                                   DeviceIndex=index)["AttachmentId"]
    fresh_lab.ec2("ModifyNetworkInterfaceAttribute", NetworkInterfaceId=dropped,
                  Attachment={"AttachmentId": attachment, "DeleteOnTermination": True})
    primary = [e.id for e in fresh_lab.snapshot().enis_of(instance) if e.device_index == 0]
    assert len(primary) == 1

    fresh_lab.ec2("TerminateInstances", InstanceIds=[instance])
    enis = {e["NetworkInterfaceId"]: e for e in fresh_lab.ec2("DescribeNetworkInterfaces")["NetworkInterfaces"]}
    assert primary[0] not in enis and dropped not in enis
    assert enis[kept]["Status"] == "available" and "Attachment" not in enis[kept]
    snap = fresh_lab.snapshot()  # the lab's own view (IMDS, data plane) follows
    assert snap.enis_of(instance) == [] and snap.enis[kept].status == "available"
    assert {primary[0], dropped}.isdisjoint(snap.enis)
