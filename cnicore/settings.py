"""Every user setting, parsed and validated in this one place (ARCHITECTURE §2).

Plugins are exec'd with only CNI_* variables, so the conflist carries the settings: the agent reads
the upstream environment variable names (`from_env`) and renders them as conflist keys (`to_conf`);
a plugin reads the keys back (`from_conf`). Both paths run the same parser, so a value is accepted or
refused the same way at install time and in the plugin (CNI code 7, naming the setting).
"""

from __future__ import annotations

# Every plugin imports this module on every exec, so it imports nothing costly at the top: no
# dataclasses (it pulls in inspect, ast, dis and tokenize, ~7 ms per exec), no typing (~3 ms; the
# annotations below are never evaluated), ipaddress only where a CIDR list is parsed.
from .errors import CNIError, INVALID_CONFIG


class SettingError(CNIError):
    def __init__(self, msg: str):
        super().__init__(INVALID_CONFIG, msg)


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, str):
            value = _whole_number(value.strip())
        if not isinstance(value, int):
            raise ValueError("must be a whole number")
        if lo is not None and value < lo:
            raise ValueError(f"must be at least {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"must be at most {hi}")
        return value
    return parse


def _whole_number(text: str) -> int:
    """Decimal with an optional sign, or 0x and hex digits; ASCII only, as Go's strconv reads them
    (Python's int() would also take "1_000" and other scripts' digits)."""
    digits = text[1:] if text[:1] in ("+", "-") else text
    if text[:2].lower() == "0x" and text[2:] and all(c in "0123456789abcdefABCDEF" for c in text[2:]):
        return int(text, 16)
    if digits and all(c in "0123456789" for c in digits):
        return int(text)
    raise ValueError("must be a whole number")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError("must be true or false")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value.strip().lower()
    return parse


def _cidrs(value: Any) -> tuple[str, ...]:
    import ipaddress
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError("must be a comma-separated list of IPv4 CIDRs")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not an IPv4 CIDR")
        item = item.strip()
        if not item:
            continue
        try:
            net = ipaddress.IPv4Network(item, strict=True)
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IPv4 CIDR ({exc})") from None
        out.append(str(net))
    return tuple(out)


def _veth_prefix(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 4 or not value.isascii() or not value.isalnum():
        raise ValueError("must be 1 to 4 letters or digits")
    if value in ("eth", "lo", "vlan"):
        raise ValueError(f"{value!r} is reserved")
    return value


def _log_level(value: Any) -> str:
    return _choice("debug", "info", "warn", "error")(value).upper()


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or "/../" in value + "/":
        raise ValueError("must be an absolute path")
    return value


def _text(max_len: int) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_len or not value.isprintable():
            raise ValueError(f"must be printable text of at most {max_len} characters")
        return value
    return parse


class Setting:
    """One setting: its upstream variable name, conflist key, default (None: unset) and parser."""

    __slots__ = ("env", "key", "default", "parse")

    def __init__(self, env: str, key: str, default: Any, parse: Callable[[Any], Any]):
        object.__setattr__(self, "env", env)
        object.__setattr__(self, "key", key)  # conflist key
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "parse", parse)

    def __setattr__(self, name, value):
        raise AttributeError(f"Setting is read-only: cannot set {name}")

    def __repr__(self) -> str:
        return f"Setting({self.env!r}, {self.key!r}, {self.default!r}, {self.parse!r})"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.env, self.key, self.default, self.parse) == (other.env, other.key, other.default, other.parse)

    def __hash__(self) -> int:
        return hash((self.env, self.key, self.default, self.parse))


SETTINGS = {s.env: s for s in (
    Setting("WARM_IP_TARGET", "warmIPTarget", None, _int(0)),
    Setting("MINIMUM_IP_TARGET", "minimumIPTarget", None, _int(0)),
    Setting("WARM_ENI_TARGET", "warmENITarget", 1, _int(0)),
    Setting("MAX_ENI", "maxENI", None, _int(1)),
    Setting("IP_COOLDOWN_PERIOD", "ipCooldownPeriod", 30, _int(0, 3600)),
    Setting("AWS_VPC_K8S_CNI_EXTERNALSNAT", "externalSNAT", False, _bool),
    Setting("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "excludeSNATCIDRs", (), _cidrs),
    Setting("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "randomizeSNAT", "prng", _choice("prng", "hashrandom", "none")),
    Setting("AWS_VPC_CNI_NODE_PORT_SUPPORT", "nodePortSupport", True, _bool),
    Setting("AWS_VPC_K8S_CNI_CONNMARK", "connmark", 0x80, _int(1, 0xFFFFFFFF)),
    Setting("AWS_VPC_K8S_CNI_VETHPREFIX", "vethPrefix", "eni", _veth_prefix),
    Setting("AWS_VPC_ENI_MTU", "eniMTU", 9001, _int(576, 9001)),
    Setting("POD_MTU", "mtu", 9001, _int(576, 9001)),
    Setting("AWS_VPC_K8S_PLUGIN_LOG_FILE", "pluginLogFile", "/var/log/aws-routed-eni/plugin.log", _path),
    Setting("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "pluginLogLevel", "DEBUG", _log_level),
    Setting("CLUSTER_NAME", "clusterName", "", _text(128)),
    # Ours, beyond upstream:
    Setting("AWS_VPC_CNI_DATA_DIR", "dataDir", "/var/run/aws-vpc-cni", _path),
    Setting("AWS_VPC_CNI_NETFILTER_MODE", "netfilterMode", "auto", _choice("auto", "nft", "legacy", "iptc")),
)}


def _parse(setting: Setting, value: Any, source: str) -> Any:
    try:
        return setting.parse(value)
    except (ValueError, TypeError) as exc:
        raise SettingError(f"invalid {source}: {value!r} {exc}") from None


def from_env(environ, names=None) -> dict[str, Any]:
    """Settings (by upstream name) from environment variables; unset or empty means the default."""
    out = {}
    for name in names or SETTINGS:
        setting = SETTINGS[name]
        raw = environ.get(name, "")
        out[name] = setting.default if raw == "" else _parse(setting, raw, name)
    if "POD_MTU" in out and "AWS_VPC_ENI_MTU" in out and environ.get("POD_MTU", "") == "":
        out["POD_MTU"] = out["AWS_VPC_ENI_MTU"]  # the pod MTU follows the ENI MTU unless set
    return out


def from_conf(conf: dict, names) -> dict[str, Any]:
    """Settings (by upstream name) from a plugin's conflist entry; absent means the default."""
    out = {}
    for name in names:
        setting = SETTINGS[name]
        raw = conf.get(setting.key)
        out[name] = setting.default if raw is None else _parse(setting, raw, f"{setting.key} ({name})")
    return out


def to_conf(values: dict[str, Any]) -> dict[str, Any]:
    """Conflist keys for the given settings, leaving out the unset ones."""
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        out[SETTINGS[name].key] = list(value) if isinstance(value, tuple) else value
    return out
