"""The EC2 rules the lab's front enforces in front of moto, as pure logic on snapshots."""

import ipaddress
import random

import pytest

from vpclab.ec2rules import Rejection, error_xml, vet

from .samples import PRIMARY, SUBNET, eni, snapshot


def rejected(action, params, snap, default_type="m5.large") -> Rejection:
    with pytest.raises(Rejection) as e:
        vet(action, params, snap, default_type)
    return e.value


def test_assign_count_becomes_free_addresses_of_the_subnet():
    snap = snapshot(PRIMARY, eni("eni-o", ["10.0.0.4"]))
    plan = vet("AssignPrivateIpAddresses", [("Action", "AssignPrivateIpAddresses"), ("NetworkInterfaceId", "eni-p"),
                                             ("SecondaryPrivateIpAddressCount", "9")], snap, "m5.large")
    assert "SecondaryPrivateIpAddressCount" not in dict(plan.params)
    picked = [v for k, v in plan.params if k.startswith("PrivateIpAddress.")]
    # a /28 keeps .0-.3 and .15 back; .4 and .10 are held: the 9 left are the ones picked
    assert sorted(picked, key=ipaddress.ip_address) == [f"10.0.0.{n}" for n in (5, 6, 7, 8, 9, 11, 12, 13, 14)]


def test_assign_beyond_the_per_eni_limit():
    snap = snapshot(eni("eni-p", ["10.0.0.10"] + [f"10.0.0.{n}" for n in range(4, 9)], "i-1", 0))
    params = [("NetworkInterfaceId", "eni-p"), ("SecondaryPrivateIpAddressCount", "5")]  # 6 + 5 > 10
    r = rejected("AssignPrivateIpAddresses", params, snap)
    assert (r.code, r.status, r.message) == ("PrivateIpAddressLimitExceeded", 400,
                                             "Number of private addresses will exceed limit.")


def test_assign_in_a_full_subnet():
    snap = snapshot(PRIMARY, eni("eni-o", [f"10.0.0.{n}" for n in range(4, 14)]), instance_type="m5.4xlarge")
    params = [("NetworkInterfaceId", "eni-p"), ("SecondaryPrivateIpAddressCount", "2")]  # only .14 is free
    assert rejected("AssignPrivateIpAddresses", params, snap).code == "InsufficientFreeAddressesInSubnet"
    params = [("NetworkInterfaceId", "eni-p"), ("SecondaryPrivateIpAddressCount", "1")]
    assert [v for k, v in vet("AssignPrivateIpAddresses", params, snap, "m5.large").params
            if k == "PrivateIpAddress.1"] == ["10.0.0.14"]


@pytest.mark.parametrize("address, code, message", [
    ("10.0.1.5", "InvalidParameterValue", "Address does not fall within the subnet's address range"),
    ("10.0.0.1", "InvalidParameterValue", "Address 10.0.0.1 is in subnet's reserved address range"),
    ("10.0.0.15", "InvalidParameterValue", "Address 10.0.0.15 is in subnet's reserved address range"),
    ("10.0.0.300", "InvalidParameterValue", "Invalid value '10.0.0.300' for IP address"),
    ("10.0.0.4", "InvalidIPAddress.InUse", "The specified address is already in use."),
])
def test_assign_explicit_addresses(address, code, message):
    snap = snapshot(PRIMARY, eni("eni-o", ["10.0.0.4"]))
    r = rejected("AssignPrivateIpAddresses", [("NetworkInterfaceId", "eni-p"), ("PrivateIpAddress.1", address)], snap)
    assert (r.code, r.message) == (code, message)


def test_assign_with_reassignment_takes_the_address_from_its_holder_first():
    snap = snapshot(PRIMARY, eni("eni-o", ["10.0.0.4", "10.0.0.5"]))
    params = [("NetworkInterfaceId", "eni-p"), ("PrivateIpAddress.1", "10.0.0.5"), ("AllowReassignment", "true")]
    plan = vet("AssignPrivateIpAddresses", params, snap, "m5.large")
    assert plan.params == params
    assert plan.before == [("UnassignPrivateIpAddresses", [("NetworkInterfaceId", "eni-o"),
                                                           ("PrivateIpAddress.1", "10.0.0.5")])]
    params[1] = ("PrivateIpAddress.1", "10.0.0.4")  # a primary address never moves
    assert rejected("AssignPrivateIpAddresses", params, snap).code == "InvalidIPAddress.InUse"


def test_assign_needs_exactly_one_way_to_say_which():
    snap = snapshot(PRIMARY)
    both = [("NetworkInterfaceId", "eni-p"), ("PrivateIpAddress.1", "10.0.0.6"),
            ("SecondaryPrivateIpAddressCount", "1")]
    assert rejected("AssignPrivateIpAddresses", both, snap).code == "InvalidParameterCombination"
    assert rejected("AssignPrivateIpAddresses", [("NetworkInterfaceId", "eni-p")], snap).code == "MissingParameter"
    zero = [("NetworkInterfaceId", "eni-p"), ("SecondaryPrivateIpAddressCount", "0")]
    assert rejected("AssignPrivateIpAddresses", zero, snap).code == "InvalidParameterValue"


def unassign(address):
    return [("NetworkInterfaceId", "eni-p"), ("PrivateIpAddress.1", address)]


def test_unassign_checks_the_addresses():
    snap = snapshot(eni("eni-p", ["10.0.0.10", "10.0.0.6"], "i-1", 0))
    r = rejected("UnassignPrivateIpAddresses", unassign("10.0.0.7"), snap)
    assert (r.code, r.message) == ("InvalidParameterValue",
                                   "Some of the specified addresses are not assigned to interface eni-p")
    r = rejected("UnassignPrivateIpAddresses", unassign("10.0.0.10"), snap)
    assert r.code == "InvalidParameterValue" and "primary" in r.message
    assert vet("UnassignPrivateIpAddresses", unassign("10.0.0.6"), snap, "m5.large").params == unassign("10.0.0.6")


def test_create_picks_the_primary_and_secondaries():
    snap = snapshot(PRIMARY)
    params = [("Action", "CreateNetworkInterface"), ("SubnetId", "subnet-1"), ("SecondaryPrivateIpAddressCount", "2"),
              ("SecurityGroupId.1", "sg-1")]
    out = dict(vet("CreateNetworkInterface", params, snap, "m5.large", random.Random(1)).params)
    listed = [out[f"PrivateIpAddresses.{i}.PrivateIpAddress"] for i in (1, 2, 3)]
    assert [out[f"PrivateIpAddresses.{i}.Primary"] for i in (1, 2, 3)] == ["true", "false", "false"]
    assert out["PrivateIpAddress"] == listed[0]
    assert len(set(listed)) == 3 and "10.0.0.10" not in listed
    assert all(not SUBNET.reserved(ip) and SUBNET.contains(ip) for ip in listed)
    assert out["SecurityGroupId.1"] == "sg-1" and "SecondaryPrivateIpAddressCount" not in out


def test_create_with_a_given_primary_and_the_limits():
    snap = snapshot(PRIMARY)
    out = dict(vet("CreateNetworkInterface", [("SubnetId", "subnet-1"), ("PrivateIpAddress", "10.0.0.7")],
                   snap, "m5.large").params)
    assert (out["PrivateIpAddress"], out["PrivateIpAddresses.1.PrivateIpAddress"]) == ("10.0.0.7", "10.0.0.7")
    taken = [("SubnetId", "subnet-1"), ("PrivateIpAddress", "10.0.0.10")]
    assert rejected("CreateNetworkInterface", taken, snap).code == "InvalidIPAddress.InUse"
    too_many = [("SubnetId", "subnet-1"), ("SecondaryPrivateIpAddressCount", "10")]  # 11 > 10 on m5.large
    assert rejected("CreateNetworkInterface", too_many, snap).code == "PrivateIpAddressLimitExceeded"
    full = snapshot(PRIMARY, eni("eni-o", [f"10.0.0.{n}" for n in (4, 5, 6, 7, 8, 9, 11, 12, 13, 14)]))
    r = rejected("CreateNetworkInterface", [("SubnetId", "subnet-1")], full)
    assert r.code == "InsufficientFreeAddressesInSubnet"


def attach(eni_id, instance="i-1", device="1"):
    return [("NetworkInterfaceId", eni_id), ("InstanceId", instance), ("DeviceIndex", device)]


def test_attach_rules():
    free = eni("eni-f", ["10.0.0.6"])
    second = eni("eni-s", ["10.0.0.7"], "i-1", 1)
    snap = snapshot(PRIMARY, second, free)
    ok = attach("eni-f", device="2")
    assert vet("AttachNetworkInterface", ok, snap, "m5.large").params == ok
    r = rejected("AttachNetworkInterface", attach("eni-s", device="2"), snap)
    assert (r.code, r.message) == ("InvalidNetworkInterface.InUse", "Interface: [eni-s] in use.")
    r = rejected("AttachNetworkInterface", attach("eni-f", device="1"), snap)
    assert (r.code, r.message) == ("InvalidParameterValue",
                                   "Instance 'i-1' already has an interface attached at device index '1'.")
    assert rejected("AttachNetworkInterface", attach("eni-f", device="3"), snap).code == "AttachmentLimitExceeded"
    r = rejected("AttachNetworkInterface", attach("eni-f", instance="i-2"), snap)  # another AZ
    assert r.code == "InvalidParameterCombination"
    full = snapshot(PRIMARY, second, eni("eni-t", ["10.0.0.8"], "i-1", 2), free)
    r = rejected("AttachNetworkInterface", attach("eni-f", device="3"), full)
    assert (r.code, r.message) == ("AttachmentLimitExceeded", "Interface count 4 exceeds the limit for m5.large")
    big = snapshot(PRIMARY, eni("eni-b", [f"10.0.0.{n}" for n in range(4, 10)] + ["10.0.0.11", "10.0.0.12",
                                                                            "10.0.0.13", "10.0.0.14", "10.0.0.3"]))
    assert rejected("AttachNetworkInterface", attach("eni-b"), big).code == "PrivateIpAddressLimitExceeded"


def test_detach_and_delete_rules():
    snap = snapshot(PRIMARY, eni("eni-s", ["10.0.0.7"], "i-1", 1))
    r = rejected("DetachNetworkInterface", [("AttachmentId", "attach-eni-p")], snap)
    assert r.code == "OperationNotPermitted"
    assert vet("DetachNetworkInterface", [("AttachmentId", "attach-eni-s")], snap, "m5.large").before == []
    r = rejected("DeleteNetworkInterface", [("NetworkInterfaceId", "eni-s")], snap)
    assert (r.code, r.message) == ("InvalidNetworkInterface.InUse",
                                   "The network interface 'eni-s' is currently in use.")


def test_unknown_resources_and_other_actions_go_to_moto_unchanged():
    snap = snapshot(PRIMARY)
    for action, params in [("AssignPrivateIpAddresses", [("NetworkInterfaceId", "eni-none")]),
                           ("CreateNetworkInterface", [("SubnetId", "subnet-none")]),
                           ("AttachNetworkInterface", attach("eni-none")),
                           ("CreateTags", [("ResourceId.1", "eni-p")])]:
        assert vet(action, params, snap, "m5.large").params == params


def test_error_body_is_what_botocore_parses_as_an_ec2_error():
    from botocore import parsers

    parsed = parsers.create_parser("ec2").parse(
        {"status_code": 503, "headers": {}, "body": error_xml("RequestLimitExceeded", "Request limit exceeded.")}, None)
    assert parsed["Error"] == {"Code": "RequestLimitExceeded", "Message": "Request limit exceeded."}
    assert parsed["ResponseMetadata"]["RequestId"]


def test_assign_answers_with_only_the_new_addresses():
    from botocore import parsers
    import botocore.session

    snap = snapshot(eni("eni-p", ["10.0.0.10", "10.0.0.6"], "i-1", 0))
    plan = vet("AssignPrivateIpAddresses", [("NetworkInterfaceId", "eni-p"), ("SecondaryPrivateIpAddressCount", "2")],
               snap, "m5.large")
    model = botocore.session.get_session().get_service_model("ec2")
    shape = model.operation_model("AssignPrivateIpAddresses").output_shape
    parsed = parsers.create_parser("ec2").parse({"status_code": 200, "headers": {}, "body": plan.reply}, shape)
    picked = [v for k, v in plan.params if k.startswith("PrivateIpAddress.")]
    assert parsed["NetworkInterfaceId"] == "eni-p"
    assert [a["PrivateIpAddress"] for a in parsed["AssignedPrivateIpAddresses"]] == picked
