"""The EC2 calls the warm pool makes, on boto3.

boto3 is imported on the first call, never at module import (it costs ~250 ms, a client ~450 ms):
a plugin that has a free IP never pays for it. The endpoint is whatever boto3 resolves, so the
standard AWS_ENDPOINT_URL_EC2 (or AWS_ENDPOINT_URL) points it at the lab; the region is the
caller's, else AWS_REGION / AWS_DEFAULT_REGION, else the one IMDS reports.

Retries are ours alone: botocore's are switched off (total_max_attempts=1), so every attempt is one
HTTP request and `calls` counts exactly what reached EC2. Throttling (RequestLimitExceeded,
Throttling, ...), HTTP 5xx and connection failures are retried with exponential backoff and full
jitter, bounded by a RetryPolicy; everything else fails at once with an error naming the action.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from cnicore.instance_limits import InstanceLimits, limits_from_network_info

ENI_DESCRIPTION_PREFIX = "aws-K8S-"
TAG_INSTANCE_ID = "node.k8s.amazonaws.com/instance_id"
TAG_CREATED_AT = "node.k8s.amazonaws.com/createdAt"
TAG_CLUSTER_NAME = "cluster.k8s.amazonaws.com/name"
DESCRIBE_PAGE_SIZE = 1000

THROTTLING_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException",
                              "RequestThrottled", "RequestThrottledException", "TooManyRequestsException"})
INSUFFICIENT_ADDRESS_CODES = frozenset({"InsufficientFreeAddressesInSubnet", "InsufficientCidrBlocks"})
LIMIT_CODES = frozenset({"PrivateIpAddressLimitExceeded", "AttachmentLimitExceeded",
                         "NetworkInterfaceLimitExceeded"})
ENI_NOT_FOUND = "InvalidNetworkInterfaceID.NotFound"
ENI_BUSY_CODES = frozenset({"InvalidNetworkInterface.InUse", "IncorrectState"})  # detach still running

INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{8,17}$")
RESOURCE_ID_RE = {prefix: re.compile(rf"^{prefix}-[0-9a-f]{{8,17}}$") for prefix in ("eni", "subnet", "sg")}


class EC2Error(Exception):
    """An EC2 action failed; `code` is EC2's error code (or the client-side failure's name).
    `may_have_run`: an attempt of it got a 5xx or no answer, so EC2 may have done it anyway."""

    def __init__(self, action: str, code: str, message: str):
        super().__init__(f"EC2 {action} failed: {code}: {message}")
        self.action, self.code, self.message = action, code, message
        self.may_have_run = False


class EC2Throttled(EC2Error):
    """Still throttled (or answering 5xx) after every retry."""


class EC2Unreachable(EC2Error):
    """No answer from the EC2 endpoint after every retry."""


class InsufficientAddresses(EC2Error):
    """The subnet has no free address: the pool pauses growth (warmpool.GROWTH_PAUSE)."""


class EC2LimitExceeded(EC2Error):
    """An ENI or IP-per-ENI limit of the instance type was hit."""


class ENINotFound(EC2Error):
    pass


class PrefixesUnsupported(EC2Error):
    """EC2 refused IPv4 prefixes (InvalidParameterValue): the instance type is not a Nitro one."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: before retry n (1-based), sleep a uniform time in
    [0, min(max_delay, base_delay * 2**(n-1))]."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self):
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError(f"bad RetryPolicy {self}: need attempts >= 1, 0 <= base_delay <= max_delay")

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


@dataclass(frozen=True)
class ENI:
    eni_id: str
    mac: str
    subnet_id: str
    status: str  # available | attaching | in-use | detaching
    description: str
    primary_ip: str
    secondary_ips: tuple[str, ...]
    device_index: int | None = None
    attachment_id: str | None = None
    instance_id: str | None = None
    tags: dict = field(default_factory=dict)
    prefixes: tuple[str, ...] = ()  # IPv4 /28 prefixes delegated to the ENI


class EC2:
    """EC2 access for one instance. Not thread-safe; use one per thread."""

    def __init__(self, instance_id: str, *, region: str | None = None, cluster_name: str = "",
                 retry: RetryPolicy = RetryPolicy(), timeout: float = 10.0,
                 sleep=time.sleep, clock=time.time, rng: random.Random | None = None):
        if not isinstance(instance_id, str) or not INSTANCE_ID_RE.match(instance_id):
            raise ValueError(f"not an EC2 instance ID: {instance_id!r}")
        self.instance_id = instance_id
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.cluster_name = cluster_name
        self.retry, self.timeout = retry, timeout
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()
        self._client = None
        self.calls: Counter[str] = Counter()           # HTTP requests sent, per action
        self.errors: Counter[tuple[str, str]] = Counter()  # (action, error code) per failed request
        # (action, "true"/"false" for failed, HTTP status) -> [requests, milliseconds], as upstream's
        # awscni_aws_api_latency_ms labels them (status "0": no HTTP answer)
        self.latency: dict[tuple[str, str, str], list] = {}
        self.last_error: EC2Error | None = None

    # --- the instance's ENIs ----------------------------------------------------------------

    def instance_enis(self) -> list[ENI]:
        """ENIs attached to this instance, by device index."""
        found = self._describe_enis(Filters=[{"Name": "attachment.instance-id", "Values": [self.instance_id]}])
        return sorted(found, key=lambda e: e.device_index if e.device_index is not None else -1)

    def describe_eni(self, eni_id: str) -> ENI:
        _check_id("eni", eni_id)
        found = self._describe_enis(NetworkInterfaceIds=[eni_id])
        if not found:
            raise ENINotFound("DescribeNetworkInterfaces", ENI_NOT_FOUND, f"{eni_id} not found")
        return found[0]

    def assign_ips(self, eni_id: str, count: int) -> ENI:
        """Assign `count` new secondary IPs; return the ENI as EC2 now sees it (the pool merges
        what is new: moto's answer, unlike EC2's, also lists the primary address)."""
        _check_id("eni", eni_id)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"number of IPs to assign must be a positive integer, got {count!r}")
        self._call("AssignPrivateIpAddresses", NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=count)
        return self.describe_eni(eni_id)

    def assign_prefixes(self, eni_id: str, count: int) -> None:
        """Assign `count` new IPv4 /28 prefixes (AssignPrivateIpAddresses with Ipv4PrefixCount).
        EC2's InvalidParameterValue (a type that is not Nitro) is raised as PrefixesUnsupported."""
        _check_id("eni", eni_id)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"number of prefixes to assign must be a positive integer, got {count!r}")
        try:
            self._call("AssignPrivateIpAddresses", NetworkInterfaceId=eni_id, Ipv4PrefixCount=count)
        except EC2Error as exc:
            if exc.code == "InvalidParameterValue":
                raise PrefixesUnsupported(exc.action, exc.code, exc.message) from None
            raise

    def unassign_prefixes(self, eni_id: str, prefixes) -> None:
        _check_id("eni", eni_id)
        prefixes = _checked_list(prefixes, ipaddress.IPv4Network, "prefixes", "an IPv4 prefix")
        self._call("UnassignPrivateIpAddresses", NetworkInterfaceId=eni_id, Ipv4Prefixes=prefixes)

    def unassign_ips(self, eni_id: str, ips) -> None:
        _check_id("eni", eni_id)
        ips = _checked_list(ips, ipaddress.IPv4Address, "IPs", "an IPv4 address")
        self._call("UnassignPrivateIpAddresses", NetworkInterfaceId=eni_id, PrivateIpAddresses=ips)

    # --- growing and shrinking by whole ENIs ------------------------------------------------

    def allocate_eni(self, subnet_id: str, security_group_ids) -> ENI:
        """Create a tagged ENI, attach it at the lowest free device index and set
        DeleteOnTermination. If attaching fails the ENI is deleted; if the attribute cannot be
        set it is detached and deleted. Either way the original error is raised (should the
        clean-up fail too, the leaked-ENI sweep deletes the ENI later)."""
        eni = self.create_eni(subnet_id, security_group_ids)
        try:
            attached = self._attach(eni)
        except EC2Error:
            with contextlib.suppress(EC2Error):
                self._delete(eni.eni_id)
            raise
        try:
            self.delete_on_termination(eni.eni_id, attached.attachment_id)
        except EC2Error:
            with contextlib.suppress(EC2Error):
                self.free_eni(eni.eni_id)
            raise
        return attached

    def delete_on_termination(self, eni_id: str, attachment_id: str) -> None:
        """Have EC2 delete the ENI when the instance terminates (set on every ENI of ours)."""
        _check_id("eni", eni_id)
        self._call("ModifyNetworkInterfaceAttribute", NetworkInterfaceId=eni_id,
                   Attachment={"AttachmentId": attachment_id, "DeleteOnTermination": True})

    def create_eni(self, subnet_id: str, security_group_ids) -> ENI:
        _check_id("subnet", subnet_id)
        groups = [security_group_ids] if isinstance(security_group_ids, str) else list(security_group_ids)
        if not groups:
            raise ValueError("an ENI needs at least one security group")
        for sg in groups:
            _check_id("sg", sg)
        tags = {TAG_INSTANCE_ID: self.instance_id, TAG_CREATED_AT: _rfc3339(self._clock())}
        if self.cluster_name:
            tags[TAG_CLUSTER_NAME] = self.cluster_name
        answer = self._call(
            "CreateNetworkInterface", SubnetId=subnet_id, Groups=groups,
            Description=ENI_DESCRIPTION_PREFIX + self.instance_id,
            ClientToken=os.urandom(16).hex(),  # retries of this one create stay one ENI
            TagSpecifications=[{"ResourceType": "network-interface",
                                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
        return _eni_from(answer["NetworkInterface"])

    def free_eni(self, eni_id: str) -> None:
        """Detach (if attached here) and delete an ENI; gone already is fine. Never the primary
        ENI, never one attached to another instance."""
        try:
            eni = self.describe_eni(eni_id)
        except ENINotFound:
            return
        if eni.attachment_id and eni.status != "detaching":
            if eni.instance_id != self.instance_id:
                raise ValueError(f"{eni_id} is attached to {eni.instance_id}, not to {self.instance_id}")
            if eni.device_index == 0:
                raise ValueError(f"refusing to detach {eni_id}: it is the instance's primary ENI")
            self._call("DetachNetworkInterface", AttachmentId=eni.attachment_id)
        self._delete(eni_id)

    def instance_type_limits(self, instance_type: str) -> InstanceLimits:
        """DescribeInstanceTypes: the limits of a type the shipped table lacks (`poolmgr.type_limits`)."""
        answer = self._call("DescribeInstanceTypes", InstanceTypes=[instance_type])
        found = answer.get("InstanceTypes") or []
        if not found:
            raise EC2Error("DescribeInstanceTypes", "InvalidInstanceType", f"{instance_type!r} not described")
        return limits_from_network_info(instance_type, found[0].get("NetworkInfo") or {})

    # --- internals --------------------------------------------------------------------------

    def _attach(self, eni: ENI) -> ENI:
        used = {e.device_index for e in self.instance_enis()}
        index = next(i for i in range(len(used) + 1) if i not in used)
        answer = self._call("AttachNetworkInterface", NetworkInterfaceId=eni.eni_id,
                            InstanceId=self.instance_id, DeviceIndex=index)
        return replace(eni, status="in-use", device_index=index, attachment_id=answer["AttachmentId"],
                       instance_id=self.instance_id)

    def _delete(self, eni_id: str) -> None:
        """DeleteNetworkInterface, waiting out a detach still in progress; gone already is fine."""
        for retry in range(self.retry.attempts):
            if retry:
                self._sleep(self.retry.delay(retry, self._rng))
            try:
                self._call("DeleteNetworkInterface", NetworkInterfaceId=eni_id)
                return
            except ENINotFound:
                return
            except EC2Error as e:
                if e.code not in ENI_BUSY_CODES:
                    raise
        raise self.last_error

    def _describe_enis(self, **params) -> list[ENI]:
        """DescribeNetworkInterfaces, page by page when filtering (EC2 may refuse a large
        unpaginated answer; it refuses MaxResults together with ENI IDs)."""
        if "Filters" in params:
            params["MaxResults"] = DESCRIBE_PAGE_SIZE
        enis = []
        while True:
            answer = self._call("DescribeNetworkInterfaces", **params)
            enis.extend(_eni_from(d) for d in answer.get("NetworkInterfaces", []))
            params["NextToken"] = answer.get("NextToken")
            if not params["NextToken"]:
                return enis

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            if not self.region:
                from cnicore.imds import IMDS, IMDSError
                try:
                    self.region = IMDS().region()
                except IMDSError as e:
                    raise EC2Error("(setup)", "NoRegion",
                                   f"no AWS region: not given, AWS_REGION unset, and IMDS failed: {e}") from e
            self._client = boto3.session.Session().client(
                "ec2", region_name=self.region,
                config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                              connect_timeout=min(self.timeout, 5.0), read_timeout=self.timeout))
        return self._client

    def _call(self, action: str, **params) -> dict:
        """One EC2 action with our retries; raises the classified EC2Error."""
        from botocore import xform_name
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client
        method = getattr(client, xform_name(action))
        may_have_run = False  # an earlier attempt got a 5xx or no answer
        for attempt in range(self.retry.attempts):
            if attempt:
                self._sleep(self.retry.delay(attempt, self._rng))
            self.calls[action] += 1
            started = time.monotonic()
            try:
                answer = method(**params)
            except ClientError as e:
                error = _classify(action, e.response)
                self._timed(action, started, e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            except BotoCoreError as e:
                error = _classify_client_side(action, e)
                self._timed(action, started, 0)
            else:
                self._timed(action, started, answer.get("ResponseMetadata", {}).get("HTTPStatusCode", 200), ok=True)
                return answer
            self.errors[(action, error.code)] += 1
            may_have_run = error.may_have_run = may_have_run or _unanswered(error)
            self.last_error = error
            if not isinstance(error, (EC2Throttled, EC2Unreachable)):
                raise error
        raise self.last_error


    def _timed(self, action: str, started: float, status: int, ok: bool = False) -> None:
        entry = self.latency.setdefault((action, "false" if ok else "true", str(status)), [0, 0.0])
        entry[0] += 1
        entry[1] += (time.monotonic() - started) * 1000


def _checked_list(values, parse, plural: str, singular: str) -> list[str]:
    """`values` (one string or several) as a list, each accepted by `parse`; ValueError otherwise."""
    values = [values] if isinstance(values, str) else list(values)
    if not values:
        raise ValueError(f"no {plural} given to unassign")
    for value in values:
        try:
            parse(value)
        except ValueError:
            raise ValueError(f"not {singular}: {value!r}") from None
    return values


def _classify(action: str, response: dict) -> EC2Error:
    err = response.get("Error", {})
    code, message = err.get("Code", "Unknown"), err.get("Message", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in THROTTLING_CODES or status >= 500:
        return EC2Throttled(action, code, message or f"HTTP {status}")
    if code in INSUFFICIENT_ADDRESS_CODES:
        return InsufficientAddresses(action, code, message)
    if code in LIMIT_CODES:
        return EC2LimitExceeded(action, code, message)
    if code == ENI_NOT_FOUND:
        return ENINotFound(action, code, message)
    return EC2Error(action, code, message)


def _unanswered(error: EC2Error) -> bool:
    """A 5xx or no answer: unlike a refusal (throttled, a limit, a bad parameter), the request may
    have run."""
    return isinstance(error, EC2Unreachable) or (isinstance(error, EC2Throttled) and error.code not in THROTTLING_CODES)


def _classify_client_side(action: str, e: Exception) -> EC2Error:
    from botocore.exceptions import ConnectionError, HTTPClientError

    if isinstance(e, (ConnectionError, HTTPClientError)):  # refused, timed out, cut off
        return EC2Unreachable(action, type(e).__name__, str(e))
    return EC2Error(action, type(e).__name__, str(e))


def _eni_from(d: dict) -> ENI:
    attachment = d.get("Attachment") or {}
    addresses = d.get("PrivateIpAddresses") or []
    primary = next((a["PrivateIpAddress"] for a in addresses if a.get("Primary")), d.get("PrivateIpAddress", ""))
    return ENI(
        eni_id=d["NetworkInterfaceId"],
        mac=d.get("MacAddress", "").lower(),
        subnet_id=d.get("SubnetId", ""),
        status=d.get("Status", ""),
        description=d.get("Description", ""),
        primary_ip=primary,
        secondary_ips=tuple(a["PrivateIpAddress"] for a in addresses if not a.get("Primary")),
        device_index=attachment.get("DeviceIndex"),
        attachment_id=attachment.get("AttachmentId"),
        instance_id=attachment.get("InstanceId"),
        tags={t["Key"]: t.get("Value", "") for t in d.get("TagSet") or []},
        prefixes=tuple(p["Ipv4Prefix"] for p in d.get("Ipv4Prefixes") or [] if p.get("Ipv4Prefix")),
    )


def _check_id(kind: str, value) -> None:
    if not isinstance(value, str) or not RESOURCE_ID_RE[kind].match(value):
        raise ValueError(f"not an EC2 {kind} ID: {value!r}")


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(text: str) -> float | None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
