"""IMDSv2 client on the standard library only: plugins reach it on their slow path, where
importing boto3 (~250 ms) would cost more than the lookups themselves.

The endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT, the variable the AWS SDKs honour
(default http://169.254.169.254). Every GET carries a session token from `PUT /latest/api/token`;
the token is never logged and never part of an error message.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
METADATA_PREFIX = "/latest/meta-data/"
TOKEN_TTL = 21600
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
REGION_FROM_AZ_RE = re.compile(r"^([a-z]{2}(-[a-z]+)+-\d+)")


class IMDSError(Exception):
    """IMDS answered something unusable, or refused."""


class IMDSUnreachable(IMDSError):
    """No answer (connection refused, timeout, server errors) after the retries."""


class IMDSUnauthorized(IMDSError):
    """IMDS rejected the session token (401), even a fresh one."""


class IMDSNotFound(IMDSError):
    """The metadata path does not exist (404), e.g. an ENI that is gone."""

    def __init__(self, path: str):
        super().__init__(f"IMDS has no {path!r} (404)")
        self.path = path


@dataclass(frozen=True)
class InstanceIdentity:
    instance_id: str
    instance_type: str
    availability_zone: str
    region: str
    primary_mac: str
    local_ipv4: str


@dataclass(frozen=True)
class ENIMetadata:
    mac: str
    device_number: int
    interface_id: str
    local_ipv4s: tuple[str, ...]  # the ENI's primary address first
    subnet_id: str
    subnet_cidr: str
    vpc_id: str
    vpc_cidrs: tuple[str, ...]
    security_group_ids: tuple[str, ...]

    @property
    def primary_ip(self) -> str:
        return self.local_ipv4s[0]

    @property
    def secondary_ips(self) -> tuple[str, ...]:
        return self.local_ipv4s[1:]

    @property
    def gateway(self) -> str:
        """The VPC router's address in the ENI's subnet: subnet base + 1."""
        return str(ipaddress.ip_network(self.subnet_cidr).network_address + 1)


class IMDS:
    """One client keeps one connection and one token; not thread-safe."""

    def __init__(self, endpoint: str | None = None, *, timeout: float = 1.0, attempts: int = 3,
                 backoff: float = 0.1, sleep=time.sleep, clock=time.monotonic):
        self.endpoint = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        url = urlsplit(self.endpoint)
        if url.scheme != "http" or not url.hostname or url.path not in ("", "/"):
            raise IMDSError(f"bad IMDS endpoint {self.endpoint!r} (from {ENDPOINT_ENV} or the caller): "
                            "expected http://HOST[:PORT]")
        if attempts < 1 or timeout <= 0:
            raise ValueError("IMDS client needs attempts >= 1 and timeout > 0")
        self._host, self._port = url.hostname, url.port or 80
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self._sleep, self._clock = sleep, clock
        self._conn: http.client.HTTPConnection | None = None
        self._token: str | None = None
        self._token_expires = 0.0

    def __repr__(self) -> str:
        return f"IMDS({self.endpoint!r})"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- typed data -------------------------------------------------------------------------

    def identity(self) -> InstanceIdentity:
        az = self.get("placement/availability-zone")
        return InstanceIdentity(
            instance_id=self.get("instance-id"),
            instance_type=self.get("instance-type"),
            availability_zone=az,
            region=_region_of(az),
            primary_mac=_mac(self.get("mac"), "mac"),
            local_ipv4=_ipv4(self.get("local-ipv4"), "local-ipv4"),
        )

    def region(self) -> str:
        """The region, derived from the availability zone (e.g. us-west-2b -> us-west-2)."""
        return _region_of(self.get("placement/availability-zone"))

    def macs(self) -> list[str]:
        """MACs of the attached ENIs, as IMDS lists them."""
        listing = self.get("network/interfaces/macs/")
        return [_mac(line.strip().rstrip("/"), "network/interfaces/macs/")
                for line in listing.splitlines() if line.strip()]

    def eni(self, mac: str) -> ENIMetadata:
        if not isinstance(mac, str) or not MAC_RE.match(mac.lower()):
            raise ValueError(f"not a MAC address: {mac!r}")
        mac = mac.lower()
        base = f"network/interfaces/macs/{mac}/"

        def field(name: str) -> str:
            return self.get(base + name)

        def lines(name: str) -> tuple[str, ...]:
            return tuple(v.strip() for v in field(name).splitlines() if v.strip())

        device = field("device-number")
        if not device.isdigit():
            raise IMDSError(f"IMDS returned a malformed device number {device!r} at {base}device-number")
        ipv4s = self.local_ipv4s(mac)
        return ENIMetadata(
            mac=mac,
            device_number=int(device),
            interface_id=field("interface-id"),
            local_ipv4s=ipv4s,
            subnet_id=field("subnet-id"),
            subnet_cidr=_cidr(field("subnet-ipv4-cidr-block"), base + "subnet-ipv4-cidr-block"),
            vpc_id=self.vpc_id(mac),
            vpc_cidrs=self.vpc_cidrs(mac),
            security_group_ids=lines("security-group-ids"),
        )

    def local_ipv4s(self, mac: str) -> tuple[str, ...]:
        """The ENI's IPv4 addresses, its primary first (not those of its /28 prefixes)."""
        path = f"network/interfaces/macs/{mac.lower()}/local-ipv4s"
        ipv4s = tuple(_ipv4(ip, path) for ip in self.get(path).splitlines() if ip.strip())
        if not ipv4s:
            raise IMDSError(f"IMDS lists no address at {path}")
        return ipv4s

    def ipv4_prefixes(self, mac: str) -> tuple[str, ...]:
        """The ENI's delegated /28 prefixes; none when IMDS has no ipv4-prefix (EC2 leaves it out then)."""
        path = f"network/interfaces/macs/{mac.lower()}/ipv4-prefix"
        try:
            text = self.get(path)
        except IMDSNotFound:
            return ()
        return tuple(_cidr(c.strip(), path) for c in text.splitlines() if c.strip())

    def vpc_id(self, mac: str) -> str:
        """The VPC of the ENI `mac`."""
        path = f"network/interfaces/macs/{mac.lower()}/vpc-id"
        vpc = self.get(path).strip()
        if not vpc.startswith("vpc-"):
            raise IMDSError(f"IMDS returned a malformed VPC ID {vpc!r} at {path}")
        return vpc

    def vpc_cidrs(self, mac: str) -> tuple[str, ...]:
        """The IPv4 CIDR blocks of the VPC of the ENI `mac` (a block associated later shows up here)."""
        path = f"network/interfaces/macs/{mac.lower()}/vpc-ipv4-cidr-blocks"
        return tuple(_cidr(c.strip(), path) for c in self.get(path).splitlines() if c.strip())

    def enis(self) -> dict[str, ENIMetadata]:
        """Every attached ENI, by MAC."""
        return {mac: self.eni(mac) for mac in self.macs()}

    # --- transport --------------------------------------------------------------------------

    def get(self, path: str) -> str:
        """Text at `/latest/meta-data/<path>`."""
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path:
            raise ValueError(f"bad IMDS metadata path {path!r}")
        for fresh_token in (False, True):
            if fresh_token or not self._token or self._clock() >= self._token_expires:
                self._refresh_token()
            status, body = self._request("GET", METADATA_PREFIX + path,
                                         {"X-aws-ec2-metadata-token": self._token})
            if status == 200:
                return body
            if status == 404:
                raise IMDSNotFound(path)
            if status != 401:
                raise IMDSError(f"IMDS answered HTTP {status} for {path!r}")
        raise IMDSUnauthorized(f"IMDS at {self.endpoint} rejected a fresh session token (401) for {path!r}")

    def _refresh_token(self) -> None:
        self._token = None
        status, body = self._request("PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
        if status == 403:
            raise IMDSError(f"IMDS at {self.endpoint} refused a session token (403): IMDS disabled for this instance?")
        if status != 200 or not body.strip():
            raise IMDSError(f"IMDS at {self.endpoint} gave no session token (HTTP {status}); IMDSv2 is required")
        self._token = body.strip()
        self._token_expires = self._clock() + TOKEN_TTL - 60

    def _request(self, method: str, url: str, headers: dict) -> tuple[int, str]:
        """(status, body); retries connection failures, 429 and 5xx, then raises IMDSUnreachable."""
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
                self._conn.request(method, url, headers=headers)
                response = self._conn.getresponse()
                body = response.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as e:
                self.close()
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if response.status == 429 or response.status >= 500:
                problem = f"HTTP {response.status}"
                continue
            return response.status, body
        what = "a session token" if url == TOKEN_PATH else repr(url[len(METADATA_PREFIX):])
        raise IMDSUnreachable(f"IMDS at {self.endpoint} unreachable for {what} after "
                              f"{self.attempts} attempts: {problem}")


def _region_of(az: str) -> str:
    match = REGION_FROM_AZ_RE.match(az)
    if match is None:
        raise IMDSError(f"IMDS returned a malformed availability zone {az!r}")
    return match.group(1)


def _ipv4(value: str, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise IMDSError(f"IMDS returned a malformed IPv4 address {value!r} at {where}") from None


def _cidr(value: str, where: str) -> str:
    try:
        return str(ipaddress.IPv4Network(value.strip()))
    except ValueError:
        raise IMDSError(f"IMDS returned a malformed IPv4 CIDR {value!r} at {where}") from None


def _mac(value: str, where: str) -> str:
    mac = value.strip().lower()
    if not MAC_RE.match(mac):
        raise IMDSError(f"IMDS returned a malformed MAC {value!r} at {where}")
    return mac
