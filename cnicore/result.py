"""CNI versions and results.

Results are handled internally in the 1.1.0 shape (no `ips[].version`) and converted on the way out
to the configuration's version; a `prevResult` is read in the configuration's version.
"""

from __future__ import annotations

from . import ipv4
from .errors import CNIError, DECODING_FAILURE, INCOMPATIBLE_VERSION

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]

# Fields that 1.1.0 added; a result for an older version does not carry them.
_NEW_IN_1_1 = {"routes": ("mtu", "advmss", "priority", "table", "scope"),
               "interfaces": ("mtu", "socketPath", "pciID")}


def version_tuple(version: str) -> tuple[int, int, int]:
    """'1.0.0' -> (1, 0, 0); raise CNIError(decode) on anything else."""
    parts = version.split(".") if isinstance(version, str) else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CNIError(DECODING_FAILURE, f"invalid cniVersion {version!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def at_least(version: str, minimum: str) -> bool:
    return version_tuple(version) >= version_tuple(minimum)


def require_supported(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")


def parse(obj, version: str) -> dict:
    """Validate a result (e.g. prevResult) written in `version`; return it in the internal shape."""
    if not isinstance(obj, dict):
        raise CNIError(DECODING_FAILURE, "prevResult is not a JSON object")
    legacy = not at_least(version, "1.0.0")
    out = {k: v for k, v in obj.items() if k != "cniVersion"}
    interfaces = out.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                   for i in interfaces):
        raise CNIError(DECODING_FAILURE, "prevResult.interfaces must be a list of objects with a name")
    ips = []
    listed = out.get("ips", []) or []
    if not isinstance(listed, list):
        raise CNIError(DECODING_FAILURE, "prevResult.ips must be a list of objects")
    for ip in listed:
        if not isinstance(ip, dict):
            raise CNIError(DECODING_FAILURE, "prevResult.ips must be a list of objects")
        ip = dict(ip)
        try:
            # a string in CIDR form, as Go's net.ParseCIDR reads it: not a number, no IPv6 zone
            if not isinstance(ip.get("address"), str) or "%" in ip["address"]:
                raise ValueError
            addr_version = ip_version(ip["address"])
        except (KeyError, TypeError, ValueError):
            raise CNIError(DECODING_FAILURE, f"prevResult has an invalid address: {ip.get('address')!r}") from None
        family = ip.pop("version", None)
        if legacy and family not in ("4", "6"):
            raise CNIError(DECODING_FAILURE, f"prevResult ip {ip['address']} needs version \"4\" or \"6\" "
                                             f"in a {version} result")
        if family is not None and family != str(addr_version):
            raise CNIError(DECODING_FAILURE, f"prevResult ip {ip['address']} is not IPv{family}")
        index = ip.get("interface")
        if index is not None and (type(index) is not int or not 0 <= index < len(interfaces)):
            raise CNIError(DECODING_FAILURE, f"prevResult ip {ip['address']} names interface {index!r}, "
                                             f"which is not in interfaces")
        ips.append(ip)
    out["ips"] = ips
    out["interfaces"] = interfaces
    return out


def convert(result: dict, version: str) -> dict:
    """Render an internal-shape result for `version`, with `cniVersion` first."""
    out = {"cniVersion": version}
    legacy = not at_least(version, "1.0.0")
    before_1_1 = not at_least(version, "1.1.0")
    for key, value in result.items():
        if key == "cniVersion":
            continue
        if key == "ips":
            value = [_ip_for(ip, legacy) for ip in value]
        elif before_1_1 and key in _NEW_IN_1_1:
            drop = _NEW_IN_1_1[key]
            value = [{k: v for k, v in item.items() if k not in drop} for item in value]
        if key in ("interfaces", "ips", "routes") and not value:
            continue
        out[key] = value
    return out


def _ip_for(ip: dict, legacy: bool) -> dict:
    ip = {k: v for k, v in ip.items() if k != "version"}
    if legacy:
        ip = {"version": str(ip_version(ip["address"])), **ip}
    return ip


def ip_version(address: str) -> int:
    """4 or 6: the family of an address in CIDR form, as ipaddress.ip_interface reads it (ValueError
    if it does not). Every chained plugin reads a prevResult, on DEL too: the usual "a.b.c.d/n" is
    read without importing ipaddress (cnicore.ipv4)."""
    if ipv4.plain_cidr(address) is not None:
        return 4
    import ipaddress
    return ipaddress.ip_interface(address).version
