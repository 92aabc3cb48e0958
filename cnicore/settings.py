"""Every user setting, parsed and validated in this one place (ARCHITECTURE §2).

Plugins are exec'd with only CNI_* variables, so the conflist carries the settings: the agent reads
the upstream environment variable names (`from_env`) and renders them as conflist keys (`to_conf`);
a plugin reads the keys back (`from_conf`). Both paths run the same parser, so a value is accepted or
refused the same way at install time and in the plugin (CNI code 7, naming the setting), except that
a conflist holds values as the agent renders them: what the agent reads with a warning (a default
used, a value clamped, a list entry skipped) a plugin refuses, since only a hand-edited conflist has it.

Each upstream setting is read as upstream's code reads it (aws/amazon-vpc-cni-k8s: pkg/ipamd/ipamd.go,
pkg/networkutils/network.go, pkg/utils/logger, cmd/aws-vpc-cni/main.go; tests/unit/test_settings_upstream.py
cites file and line for each rule): Go's strconv spellings, a value upstream falls back from is the
default here too (with a warning naming the setting), a bad entry of a list is skipped with a warning
naming it, and only what upstream refuses or what cannot work at all is an error. An empty variable
means unset (README's settings table lists the one exception, the plugin log file).
"""

from __future__ import annotations

# Every plugin imports this module on every exec, so it imports nothing costly at the top (README
# "Start-up cost"): no dataclasses, no typing (the annotations below are never evaluated), ipaddress
# only where a CIDR list holds an entry not written as it writes one.
import sys

from .errors import CNIError, INVALID_CONFIG
from .record import record


class SettingError(CNIError):
    def __init__(self, msg: str):
        super().__init__(INVALID_CONFIG, msg)


class _Default(Exception):
    """Raised by a parser for a value upstream reads as "use the default"; a non-empty message is
    the warning to give (upstream logs one too)."""


_DIGITS = frozenset("0123456789")
_INT64_MAX = (1 << 63) - 1
_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def go_atoi(text: str) -> int:
    """Go's strconv.Atoi: an optional sign and ASCII decimal digits, nothing else (no spaces, no
    underscores, no 0x), within int64. ValueError otherwise."""
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or not all(c in _DIGITS for c in digits):
        raise ValueError("is not a whole number")
    if len(digits.lstrip("0")) > 19:
        raise ValueError("is out of range")
    value = int(text)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise ValueError("is out of range")
    return value


def go_parse_int(text: str) -> int:
    """Go's strconv.ParseInt(text, 0, 64): sign, then 0x/0o/0b or a leading 0 (octal) prefix, and
    underscores between digits. ValueError otherwise."""
    negative = text[:1] == "-"
    body = text[1:] if text[:1] in ("+", "-") else text
    if not body:
        raise ValueError("is not a number")
    base, digits = 10, body
    if body[0] == "0" and len(body) > 1:
        kind = body[1].lower()
        if len(body) >= 3 and kind in "box":
            base, digits = {"b": 2, "o": 8, "x": 16}[kind], body[2:]
        else:
            base, digits = 8, body[1:]
    value = 0
    for c in digits:
        if c == "_":
            continue
        d = "0123456789abcdef".find(c.lower()) if c.isascii() else -1
        if d < 0 or d >= base:
            raise ValueError("is not a number")
        value = value * base + d
    if "_" in body and not _underscores_ok(body):
        raise ValueError("is not a number")
    if value > _INT64_MAX + negative:
        raise ValueError("is out of range")
    return -value if negative else value


def _underscores_ok(body: str) -> bool:
    """Go's underscoreOK: an underscore only between digits, or between a base prefix and a digit."""
    saw, i = "^", 0
    hexadecimal = False
    if len(body) >= 2 and body[0] == "0" and body[1].lower() in "box":
        saw, i, hexadecimal = "0", 2, body[1].lower() == "x"
    for c in body[i:]:
        if c in _DIGITS or (hexadecimal and c.lower() in "abcdef"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def _text_of(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be {what}")
    if value == "":
        raise _Default("")
    return value


def _int_value(value) -> int:
    """A conflist number as it is, an environment string as Go's Atoi reads it."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a whole number")
    if isinstance(value, int):
        return value
    if value == "":
        raise _Default("")
    try:
        return go_atoi(value)
    except ValueError as exc:
        raise _Default(f"{exc}") from None


def _target(value, warn) -> int | None:
    """WARM_IP_TARGET, MINIMUM_IP_TARGET: 0 (upstream's "no target"), negative or not a number all
    mean unset upstream."""
    number = _int_value(value)
    if number < 0:
        raise _Default("is negative, which upstream reads as unset")
    return number or None


def _warm_prefix_target(value, warn) -> int:
    """Upstream's getWarmPrefixTarget: Atoi, 0 or more; negative or not a number -> the default. The
    default is 1, the value upstream's manifests set (ipamd's own fallback is 0, which upstream's docs
    call unsupported in prefix mode: every prefix given back is asked for again)."""
    number = _int_value(value)
    if number < 0:
        raise _Default("is negative")
    return number


def _warm_eni_target(value, warn) -> int:
    number = _int_value(value)
    if number < 0:
        raise _Default("is negative")
    return number


def _max_eni(value, warn) -> int | None:
    """0 (the usual way to say "the instance type's limit") or negative: unset, as upstream."""
    number = _int_value(value)
    if number < 0:
        raise _Default("is negative, which upstream reads as unset")
    return number or None


_MAX_COOLDOWN = _INT64_MAX // 1_000_000_000  # seconds a Go time.Duration holds


def _whole(value, *, unit: str = "", high: int = _INT64_MAX) -> int:
    """A whole number (of `unit`) from 0 to `high`, or ValueError saying so."""
    of_unit = f" of {unit}" if unit else ""
    try:
        number = _int_value(value)
    except _Default as exc:
        if str(exc):
            raise ValueError(f"must be a whole number{of_unit}, 0 or more") from None
        raise
    if number < 0:
        raise ValueError(f"must be a whole number{of_unit}, 0 or more")
    if number > high:
        raise ValueError(f"must be between 0 and {high} {unit}".rstrip())
    return number


def _cooldown(value, warn) -> int:
    """Upstream's init refuses a bad or negative IP_COOLDOWN_PERIOD (it is the one it validates)."""
    return _whole(value, unit="seconds", high=_MAX_COOLDOWN)


def _log_rotation(value, warn) -> int:
    """Ours (upstream hard-codes lumberjack's figures): a whole number, 0 or more."""
    return _whole(value)


def _go_bool(value, warn) -> bool:
    if isinstance(value, bool):
        return value
    text = _text_of(value, "true or false")
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise _Default("is not a boolean as Go's strconv.ParseBool reads it (1, t, T, TRUE, true, True, 0, f, F, "
                   "FALSE, false, False)")


def _exclude_cidrs(value, warn) -> tuple[str, ...]:
    """A comma-separated list (a JSON list in a conflist); each entry trimmed and parsed like Go's
    net.ParseCIDR (host bits allowed, masked off). An entry that is not an IPv4 CIDR (IPv6 included,
    as upstream's parseCIDRString) is skipped with a warning."""
    if isinstance(value, str):
        items = value.split(",") if value else []
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError("must be a comma-separated list of IPv4 CIDRs")
    from .ipv4 import plain_network
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not an IPv4 CIDR")
        if plain_network(item.strip()):  # as ipaddress writes it: taken as is, without importing it
            out.append(item.strip())
            continue
        import ipaddress
        address, _, bits = item.strip().partition("/")
        try:
            if not bits or not bits.isascii() or not bits.isdigit() or not address.isascii():
                raise ValueError
            net = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(address)}/{int(bits)}", strict=False)
        except ValueError:
            warn(f"ignoring {item!r}: not an IPv4 CIDR")
            continue
        if str(net) != item.strip():
            warn(f"{item!r} read as {str(net)!r}")  # host bits masked off, as net.ParseCIDR does
        out.append(str(net))
    return tuple(out)


def _randomize_snat(value, warn) -> str:
    text = _text_of(value, "prng, hashrandom or none")
    if text not in ("prng", "hashrandom", "none"):  # case-sensitive, as upstream's switch
        raise _Default("is not prng, hashrandom or none")
    return text


def _connmark(value, warn) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a number")
    if isinstance(value, str):
        if value == "":
            raise _Default("")
        try:
            value = go_parse_int(value)
        except ValueError as exc:
            raise _Default(f"{exc}") from None
    if not 0 < value <= 0xFFFFFFFF:
        raise _Default("is out of range (1 to 0xFFFFFFFF)")
    return value


MIN_MTU, MAX_MTU = 576, 9001


def _eni_mtu(value, warn) -> int:
    """Upstream clamps AWS_VPC_ENI_MTU into 576..9001 and uses 9001 for a value that is not a number."""
    number = _int_value(value)
    if number < MIN_MTU or number > MAX_MTU:
        warn(f"{number} is outside {MIN_MTU}..{MAX_MTU} (read as {min(max(number, MIN_MTU), MAX_MTU)})")
    return min(max(number, MIN_MTU), MAX_MTU)


def _pod_mtu(value, warn) -> int:
    """Upstream's GetPodMTU: a value that is not a number or is outside 576..9001 means 9001."""
    number = _int_value(value)
    if not MIN_MTU <= number <= MAX_MTU:
        raise _Default(f"is outside {MIN_MTU}..{MAX_MTU}")
    return number


# Characters a veth name may hold here: the kernel refuses '/', ':' and whitespace, expands '%',
# and iptables reads '+' as a wildcard; upstream checks only the length and the reserved names.
_IFNAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _veth_prefix(value, warn) -> str:
    if not isinstance(value, str):
        raise ValueError("must be text")
    if value == "":
        raise _Default("is empty: an empty prefix would match every veth on the node")
    if len(value.encode()) > 4:
        raise ValueError("cannot be longer than 4 characters")
    if value in ("eth", "lo", "vlan"):
        raise ValueError("cannot be set to reserved values 'eth', 'vlan', or 'lo'")
    if not all(c in _IFNAME_CHARS for c in value):
        raise ValueError("must be letters, digits, '_' or '-' (it starts interface names)")
    return value


def _log_level(value, warn) -> str:
    """Upstream's getZapLevel: debug, info, warn, error or fatal in any case; anything else is debug."""
    text = _text_of(value, "a log level").lower()
    if text not in ("debug", "info", "warn", "error", "fatal"):
        raise _Default("is not debug, info, warn, error or fatal")
    return text.upper()


def _path(value) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or "/../" in value + "/":
        raise ValueError("must be an absolute path, stderr or stdout")
    return value


def _plugin_log_file(value, warn) -> str:
    """A path, or stderr; empty is stderr too (upstream's getPluginLogFilePath). stdout carries a
    plugin's CNI result, so a log asked there goes to stderr (upstream's init refuses stdout)."""
    if not isinstance(value, str):
        raise ValueError("must be an absolute path, stderr or stdout")
    if value.lower() in ("", "stderr"):
        return "stderr"
    if value.lower() == "stdout":
        warn("a plugin's stdout carries its CNI result; logging to stderr instead")
        return "stderr"
    return _path(value)


def _agent_log_file(value, warn) -> str:
    text = _text_of(value, "an absolute path, stderr or stdout")
    if text.lower() in ("stderr", "stdout"):
        return text.lower()
    return _path(text)


def _choice(*choices: str) -> Callable[[Any, Callable], str]:
    def parse(value, warn) -> str:
        if value == "":
            raise _Default("")
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value.strip().lower()
    return parse


def _data_dir(value, warn) -> str:
    return _path(_text_of(value, "an absolute path"))


def _cluster_name(value, warn) -> str:
    """Tagged on the ENIs: EC2 takes a tag value of at most 256 characters."""
    if not isinstance(value, str) or len(value) > 256 or not value.isprintable():
        raise ValueError("must be printable text of at most 256 characters")
    return value


# One setting: its variable name, conflist key, attribute in a settings record, default (None:
# unset) and parser.
Setting = record("Setting", "env key attr default parse")


DEFAULT_PLUGIN_LOG = "/var/log/aws-routed-eni/plugin.log"
DEFAULT_AGENT_LOG = "/var/log/aws-routed-eni/ipamd.log"

SETTINGS = {s.env: s for s in (
    Setting("WARM_IP_TARGET", "warmIPTarget", "warm_ip_target", None, _target),
    Setting("MINIMUM_IP_TARGET", "minimumIPTarget", "minimum_ip_target", None, _target),
    Setting("WARM_ENI_TARGET", "warmENITarget", "warm_eni_target", 1, _warm_eni_target),
    Setting("MAX_ENI", "maxENI", "max_eni", None, _max_eni),
    Setting("ENABLE_PREFIX_DELEGATION", "enablePrefixDelegation", "prefix_delegation", False, _go_bool),
    Setting("WARM_PREFIX_TARGET", "warmPrefixTarget", "warm_prefix_target", 1, _warm_prefix_target),
    Setting("IP_COOLDOWN_PERIOD", "ipCooldownPeriod", "ip_cooldown_period", 30, _cooldown),
    Setting("AWS_VPC_K8S_CNI_EXTERNALSNAT", "externalSNAT", "external_snat", False, _go_bool),
    Setting("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "excludeSNATCIDRs", "exclude_snat_cidrs", (), _exclude_cidrs),
    Setting("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "randomizeSNAT", "randomize_snat", "prng", _randomize_snat),
    Setting("AWS_VPC_CNI_NODE_PORT_SUPPORT", "nodePortSupport", "node_port_support", True, _go_bool),
    Setting("AWS_VPC_K8S_CNI_CONNMARK", "connmark", "connmark", 0x80, _connmark),
    Setting("AWS_VPC_K8S_CNI_VETHPREFIX", "vethPrefix", "veth_prefix", "eni", _veth_prefix),
    Setting("AWS_VPC_ENI_MTU", "eniMTU", "eni_mtu", MAX_MTU, _eni_mtu),
    Setting("POD_MTU", "mtu", "pod_mtu", MAX_MTU, _pod_mtu),
    Setting("AWS_VPC_K8S_PLUGIN_LOG_FILE", "pluginLogFile", "plugin_log_file", DEFAULT_PLUGIN_LOG, _plugin_log_file),
    Setting("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "pluginLogLevel", "plugin_log_level", "DEBUG", _log_level),
    Setting("AWS_VPC_K8S_CNI_LOG_FILE", "agentLogFile", "agent_log_file", DEFAULT_AGENT_LOG, _agent_log_file),
    Setting("AWS_VPC_K8S_CNI_LOGLEVEL", "agentLogLevel", "agent_log_level", "DEBUG", _log_level),
    Setting("CLUSTER_NAME", "clusterName", "cluster_name", "", _cluster_name),
    # Ours, beyond upstream. The log rotation defaults are lumberjack's figures in upstream's logger
    # (MaxSize 100 MB, MaxBackups 5, MaxAge 30 days); 0 means as in lumberjack: 100 MB, keep every
    # backup, keep backups of any age.
    Setting("AWS_VPC_CNI_LOG_MAX_SIZE", "logMaxSize", "log_max_size", 100, _log_rotation),
    Setting("AWS_VPC_CNI_LOG_MAX_BACKUPS", "logMaxBackups", "log_max_backups", 5, _log_rotation),
    Setting("AWS_VPC_CNI_LOG_MAX_AGE", "logMaxAge", "log_max_age", 30, _log_rotation),
    Setting("AWS_VPC_CNI_DATA_DIR", "dataDir", "data_dir", "/var/run/aws-vpc-cni", _data_dir),
    Setting("AWS_VPC_CNI_NETFILTER_MODE", "netfilterMode", "netfilter_mode", "auto", _choice("auto", "nft", "legacy", "iptc")),
    Setting("AWS_VPC_CNI_PLUGIN_ZYGOTE", "pluginZygote", "plugin_zygote", True, _go_bool),  # the agent only
)}


def kind(typename: str, names) -> type:
    """A settings record type: the settings `names` (upstream names), read as attributes (`attr`),
    with the type's `settings` (the Setting of each field, in order) for the parsers and renderer."""
    chosen = tuple(SETTINGS[name] for name in names)
    cls = record(typename, " ".join(s.attr for s in chosen))
    cls.settings = chosen
    return cls


# What each plugin reads from its conflist entry: the one list per plugin type, used by the plugin
# (from_conf) and by the agent's conflist renderer (to_conf), so the two cannot disagree.
PLUGIN_LOG = kind("PluginLogSettings", (  # every plugin, read by the skeleton
    "AWS_VPC_K8S_PLUGIN_LOG_FILE", "AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "AWS_VPC_CNI_LOG_MAX_SIZE",
    "AWS_VPC_CNI_LOG_MAX_BACKUPS", "AWS_VPC_CNI_LOG_MAX_AGE"))
IPAM = kind("IPAMSettings", (  # aws-eni-ipam
    "AWS_VPC_CNI_DATA_DIR", "WARM_IP_TARGET", "MINIMUM_IP_TARGET", "WARM_ENI_TARGET", "MAX_ENI",
    "IP_COOLDOWN_PERIOD", "CLUSTER_NAME", "ENABLE_PREFIX_DELEGATION", "WARM_PREFIX_TARGET"))
BRIDGE = kind("BridgeSettings", ("AWS_VPC_K8S_CNI_VETHPREFIX", "POD_MTU", "AWS_VPC_ENI_MTU"))  # aws-vpc-bridge
SNAT = kind("SNATSettings", (  # aws-snat
    "AWS_VPC_K8S_CNI_EXTERNALSNAT", "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
    "AWS_VPC_CNI_NODE_PORT_SUPPORT", "AWS_VPC_K8S_CNI_CONNMARK", "AWS_VPC_K8S_CNI_VETHPREFIX",
    "AWS_VPC_CNI_DATA_DIR", "AWS_VPC_CNI_NETFILTER_MODE"))
IPAM_STORE = kind("IPAMStoreSettings", ("AWS_VPC_CNI_DATA_DIR",))  # aws-vpc-bridge, from its "ipam" entry
PORTMAP = kind("PortmapSettings", ("AWS_VPC_CNI_DATA_DIR", "AWS_VPC_CNI_NETFILTER_MODE"))  # portmap-compat
AGENT = kind("AgentSettings", tuple(SETTINGS))  # the node agent: every setting, from its environment


def warn_to_stderr(msg: str) -> None:
    sys.stderr.write(f"aws-vpc-cni: warning: {msg}\n")


def _parse(setting: Setting, value: Any, source: str, warn) -> Any:
    """`warn` None: strict (a conflist), where every warning is an error instead."""
    def note(msg: str) -> None:
        if warn is None:
            raise SettingError(f"invalid {source}: {msg}")
        warn(f"{source}: {msg}")

    try:
        return setting.parse(value, note)
    except _Default as exc:
        if str(exc):
            note(f"{value!r} {exc}; using the default {setting.default!r}" if warn else f"{value!r} {exc}")
        return setting.default
    except (ValueError, TypeError) as exc:
        raise SettingError(f"invalid {source}: {value!r} {exc}") from None


def from_env(environ, of: type = AGENT, warn=warn_to_stderr):
    """The settings of `of` (a settings record type, every setting by default) from environment
    variables. `warn` gets one message for each value read as upstream reads it but not as written
    (a default used, a list entry skipped)."""
    values = []
    for setting in of.settings:
        name = setting.env
        if name == "POD_MTU" and name not in environ:
            # Upstream renders POD_MTU, when unset, from AWS_VPC_ENI_MTU as written (cmd/aws-vpc-cni).
            raw = environ.get("AWS_VPC_ENI_MTU", str(MAX_MTU))
            values.append(_parse(setting, raw, "POD_MTU (from AWS_VPC_ENI_MTU)", warn))
        else:
            values.append(_parse(setting, environ[name], name, warn) if name in environ else setting.default)
    return of(*values)


def from_conf(conf: dict, of: type):
    """The settings of `of` (a settings record type) from a plugin's conflist entry; absent means the
    default. Strict: a value the agent would have rendered differently is refused (see the module's
    docstring)."""
    values = []
    for setting in of.settings:
        raw = conf.get(setting.key)
        values.append(setting.default if raw is None else _parse(setting, raw, f"{setting.key} ({setting.env})", None))
    return of(*values)


def to_conf(values, of: type | None = None) -> dict[str, Any]:
    """Conflist keys for the settings of `of` (by default, all of `values`' type), leaving out the
    unset ones; `values` is any settings record holding them."""
    out = {}
    for setting in (of or type(values)).settings:
        value = getattr(values, setting.attr)
        if value is not None:
            out[setting.key] = list(value) if isinstance(value, tuple) else value
    return out


def by_name(values) -> dict[str, Any]:
    """A settings record's values by upstream name (the status API and the logs name them so)."""
    return {setting.env: value for setting, value in zip(type(values).settings, values)}
