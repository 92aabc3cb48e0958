"""Every setting read exactly as upstream (aws/amazon-vpc-cni-k8s) reads it (issue 15, point 1).

Each row cites where upstream's behaviour was taken from: the file at the commit read (with the
line, or the function where the file is too long to number from the stored copy), in release-1.1
where the setting existed then and in master. Each row runs through the agent's reading of the
environment and its rendering of the conflist (agent/main.py `render_conflist`, and the
`aws-vpc-cni-agent render-conflist` command itself for the rows issue 15 names), then through a
plugin's parsing of the rendered entry: the plugin must read back what the agent read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aws_vpc_cni_agent.conflist import render_conflist
from cnicore import settings
from cnicore.settings import SettingError
from support.paths import ROOT


# Upstream sources (aws/amazon-vpc-cni-k8s), as read for this table.
IPAMD = "pkg/ipamd/ipamd.go@00892598 (master)"
IPAMD_11 = "ipamd/ipamd.go@33e0e91e (release-1.0/1.1 layout)"
NET = "pkg/networkutils/network.go@00892598 (master)"
NET_CLAMP = "pkg/networkutils/network.go GetEthernetMTU (v1.x, before the MTU check moved to init)"
INIT = "cmd/aws-vpc-cni/main.go@0129baff"
UTILS = "utils/utils.go"
DATASTORE = "pkg/ipamd/datastore/data_store.go getCooldownPeriod"
ZAP = "pkg/utils/logger/zaplogger.go@1b3f34a1"
LOGCFG = "pkg/utils/logger/config.go@2fe0da44"
OURS = "ours (no upstream behaviour for this input; README's settings table says why)"
ERROR = SettingError  # the row's expected outcome: refused, naming the setting

UNSET = object()  # the row leaves the variable unset

ROWS = [
    # name, value, expected, warns, where upstream does this
    ("WARM_IP_TARGET", UNSET, None, False, f"{IPAMD} getWarmIPTarget: not found -> noWarmIPTarget (0)"),
    ("WARM_IP_TARGET", "2", 2, False, f"{IPAMD} getWarmIPTarget: strconv.Atoi, input >= 0"),
    ("WARM_IP_TARGET", "+3", 3, False, f"{IPAMD} getWarmIPTarget: strconv.Atoi takes a sign"),
    ("WARM_IP_TARGET", "0", None, False, f"{IPAMD} warmIPTargetsDefined: warmIPTarget != noWarmIPTarget (0)"),
    ("WARM_IP_TARGET", "-1", None, True, f"{IPAMD} getWarmIPTarget: input < 0 -> noWarmIPTarget"),
    ("WARM_IP_TARGET", "two", None, True, f"{IPAMD} getWarmIPTarget: Atoi error -> noWarmIPTarget"),
    ("WARM_IP_TARGET", " 3", None, True, f"{IPAMD} getWarmIPTarget: Atoi takes no spaces"),
    ("WARM_IP_TARGET", "1_000", None, True, f"{IPAMD} getWarmIPTarget: Atoi (base 10) takes no underscores"),
    ("WARM_IP_TARGET", "0x10", None, True, f"{IPAMD} getWarmIPTarget: Atoi (base 10) takes no 0x"),
    ("WARM_IP_TARGET", "", None, False, f"{IPAMD} getWarmIPTarget: Atoi(\"\") error -> noWarmIPTarget"),
    ("MINIMUM_IP_TARGET", "2", 2, False, f"{IPAMD} getMinimumIPTarget"),
    ("MINIMUM_IP_TARGET", "0", None, False, f"{IPAMD} warmIPTargetsDefined: minimumIPTarget != noMinimumIPTarget (0)"),
    ("MINIMUM_IP_TARGET", "-5", None, True, f"{IPAMD} getMinimumIPTarget: input < 0 -> noMinimumIPTarget"),
    ("MINIMUM_IP_TARGET", "1.5", None, True, f"{IPAMD} getMinimumIPTarget: Atoi error"),
    ("WARM_ENI_TARGET", UNSET, 1, False, f"{IPAMD_11} getWarmENITarget: not found -> defaultWarmENITarget (1); same in {IPAMD}"),
    ("WARM_ENI_TARGET", "0", 0, False, f"{IPAMD_11} getWarmENITarget: input >= 0 used"),
    ("WARM_ENI_TARGET", "3", 3, False, f"{IPAMD} getWarmENITarget"),
    ("WARM_ENI_TARGET", "-3", 1, True, f"{IPAMD_11} getWarmENITarget: input < 0 -> default"),
    ("WARM_ENI_TARGET", "x", 1, True, f"{IPAMD} getWarmENITarget: Atoi error -> default"),
    ("MAX_ENI", "2", 2, False, f"{IPAMD} getMaxENI: Atoi, input >= 1"),
    ("MAX_ENI", "0", None, False, f"{IPAMD} getMaxENI: 'If the value ... is 0 or less, it is ignored'"),
    ("MAX_ENI", "-1", None, True, f"{IPAMD} getMaxENI: envMax stays defaultMaxENI (-1)"),
    ("MAX_ENI", "many", None, True, f"{IPAMD} getMaxENI: Atoi error ignored"),
    ("IP_COOLDOWN_PERIOD", UNSET, 30, False, f"{DATASTORE}: GetIntFromStringEnvVar(envIPCooldownPeriod, 30)"),
    ("IP_COOLDOWN_PERIOD", "0", 0, False, f"{INIT} validateEnvVars: only err != nil || < 0 refused"),
    ("IP_COOLDOWN_PERIOD", "120", 120, False, f"{DATASTORE}: seconds"),
    ("IP_COOLDOWN_PERIOD", "-1", ERROR, False, f"{INIT} validateEnvVars: 'IP_COOLDOWN_PERIOD MUST be a valid positive integer'"),
    ("IP_COOLDOWN_PERIOD", "soon", ERROR, False, f"{INIT} validateEnvVars: GetIntFromStringEnvVar error"),
    ("AWS_VPC_K8S_CNI_EXTERNALSNAT", UNSET, False, False, f"{NET} useExternalSNAT: getBoolEnvVar(envExternalSNAT, false)"),
    *[("AWS_VPC_K8S_CNI_EXTERNALSNAT", v, True, False, f"{NET} getBoolEnvVar: strconv.ParseBool")
      for v in ("1", "t", "T", "TRUE", "true", "True")],
    *[("AWS_VPC_K8S_CNI_EXTERNALSNAT", v, False, False, f"{NET} getBoolEnvVar: strconv.ParseBool")
      for v in ("0", "f", "F", "FALSE", "false", "False")],
    ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "yes", False, True, f"{NET} getBoolEnvVar: ParseBool error -> default"),
    ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "tRUE", False, True, f"{NET} getBoolEnvVar: ParseBool is not case-insensitive"),
    ("AWS_VPC_CNI_NODE_PORT_SUPPORT", UNSET, True, False, f"{NET} nodePortSupportEnabled: getBoolEnvVar(envNodePortSupport, true)"),
    ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "0", False, False, f"{NET} getBoolEnvVar"),
    ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "no", True, True, f"{NET} getBoolEnvVar: ParseBool error -> default true"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", UNSET, (), False, f"{NET} parseCIDRString: empty -> nil"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/8,192.168.0.0/16", ("10.0.0.0/8", "192.168.0.0/16"), False,
     f"{NET} parseCIDRString: strings.Split on ','"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/8, 192.168.0.0/16", ("10.0.0.0/8", "192.168.0.0/16"), False,
     f"{NET} parseCIDRString: net.ParseCIDR(strings.TrimSpace(cidr))"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.1.2.3/16", ("10.1.0.0/16",), True,
     f"{NET} parseCIDRString: parseCIDR.String() is the masked network"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/8,not-a-cidr", ("10.0.0.0/8",), True,
     f"{NET} parseCIDRString: 'is not a valid CIDR' logged, entry skipped"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "fd00::/8,10.0.0.0/8", ("10.0.0.0/8",), True,
     f"{NET} parseCIDRString: 'Skip IPV6 CIDRs'"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/255.0.0.0", (), True, f"{NET} parseCIDRString: net.ParseCIDR takes a prefix length only"),
    ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", UNSET, "prng", False, f"{NET} typeOfSNAT: case \"\" -> randomPRNGSNAT"),
    ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "hashrandom", "hashrandom", False, f"{NET} typeOfSNAT"),
    ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "none", "none", False, f"{NET} typeOfSNAT"),
    ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "NONE", "prng", True, f"{NET} typeOfSNAT: switch is case-sensitive, default -> prng"),
    ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "always", "prng", True, f"{NET} typeOfSNAT: 'Failed to parse ...; using default: prng'"),
    ("AWS_VPC_K8S_CNI_CONNMARK", UNSET, 0x80, False, f"{NET} getConnmark: defaultConnmark = 0x80"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0x40", 0x40, False, f"{NET} getConnmark: strconv.ParseInt(connmark, 0, 64)"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "64", 64, False, f"{NET} getConnmark: ParseInt base 0, decimal"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "010", 8, False, f"{NET} getConnmark: ParseInt base 0, a leading 0 is octal"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0b1000_0000", 128, False, f"{NET} getConnmark: ParseInt base 0, 0b and underscores"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0", 0x80, True, f"{NET} getConnmark: mark <= 0 -> 'out of range; will use' default"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "4294967296", 0x80, True, f"{NET} getConnmark: mark > math.MaxUint32 -> default"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0x", 0x80, True, f"{NET} getConnmark: ParseInt error -> default"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0x_80", 0x80, False, f"{NET} getConnmark: ParseInt base 0 takes '_' after a prefix"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0x8__0", 0x80, True, f"{NET} getConnmark: ParseInt refuses '__' (default used)"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", UNSET, "eni", False, f"{NET} getVethPrefixName: envVethPrefixDefault"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "pod", "pod", False, f"{INIT} validateEnvVars: len <= 4"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "e-1", "e-1", False, f"{INIT} validateEnvVars: no character check upstream"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "toolong", ERROR, False, f"{INIT} validateEnvVars: 'cannot be longer than 4 characters'"),
    *[("AWS_VPC_K8S_CNI_VETHPREFIX", v, ERROR, False, f"{INIT} validateEnvVars: reserved values 'eth', 'vlan', or 'lo'")
      for v in ("eth", "lo", "vlan")],
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "a/b", ERROR, False, f"{OURS}: the kernel refuses '/' in an interface name"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "", "eni", True, f"{OURS}: upstream would use '' ({INIT} utils.GetEnv); it would match every veth"),
    ("AWS_VPC_ENI_MTU", UNSET, 9001, False, f"{NET} defaultMTU = 9001"),
    ("AWS_VPC_ENI_MTU", "1500", 1500, False, f"{NET_CLAMP}: Atoi"),
    ("AWS_VPC_ENI_MTU", "100", 576, True, f"{NET_CLAMP}: 'is too low ... Will use' minimumMTU (576)"),
    ("AWS_VPC_ENI_MTU", "9002", 9001, True, f"{NET_CLAMP}: 'is too high ... Will use' maximumMTU (9001)"),
    ("AWS_VPC_ENI_MTU", "jumbo", 9001, True, f"{NET_CLAMP}: Atoi error -> maximumMTU"),
    ("POD_MTU", "1280", 1280, False, f"{NET} GetPodMTU: Atoi, 576..9001"),
    ("POD_MTU", "575", 9001, True, f"{NET} GetPodMTU: outside minMTUv4..defaultMTU -> defaultMTU"),
    ("POD_MTU", "big", 9001, True, f"{NET} GetPodMTU: Atoi error -> defaultMTU"),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", UNSET, "/var/log/aws-routed-eni/plugin.log", False, f"{INIT} defaultPluginLogFile"),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "stderr", "stderr", False, f"{ZAP} L134: strings.ToLower(path) == \"stderr\""),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "STDERR", "stderr", False, f"{ZAP} L134: compared lower-cased"),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "", "stderr", False, f"{ZAP} L133-134: 'When path is explicitly empty, write to stderr'"),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "stdout", "stderr", True,
     f"{INIT} validateEnvVars refuses stdout ({ZAP} L136 would write a plugin's log into its result); ours: stderr"),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/var/log/cni.log", "/var/log/cni.log", False, f"{ZAP} L139: a path -> lumberjack"),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "cni.log", ERROR, False, f"{OURS}: relative to whatever the runtime's working folder is"),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", UNSET, "DEBUG", False, f"{INIT} defaultPluginLogLevel = \"Debug\""),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "FATAL", "FATAL", False, f"{ZAP} L43: case \"fatal\" (lower-cased at L32)"),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "info", "INFO", False, f"{ZAP} L37"),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "Warn", "WARN", False, f"{ZAP} L39, lower-cased at L32"),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "TRACE", "DEBUG", True, f"{ZAP} L45-46: default -> zapcore.DebugLevel"),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "", "DEBUG", False, f"{ZAP} L45-46"),
    ("AWS_VPC_K8S_CNI_LOGLEVEL", UNSET, "DEBUG", False, f"{LOGCFG} L22: defaultLogLevel = \"Debug\""),
    ("AWS_VPC_K8S_CNI_LOGLEVEL", "INFO", "INFO", False, f"{LOGCFG} GetLogLevel, then {ZAP} L32-37"),
    ("AWS_VPC_K8S_CNI_LOGLEVEL", "verbose", "DEBUG", True, f"{ZAP} L45-46"),
    ("AWS_VPC_K8S_CNI_LOG_FILE", UNSET, "/var/log/aws-routed-eni/ipamd.log", False,
     f"{LOGCFG} L21 (/host/var/log/aws-routed-eni/ipamd.log: the container's mount of this host file)"),
    ("AWS_VPC_K8S_CNI_LOG_FILE", "", "/var/log/aws-routed-eni/ipamd.log", False, f"{LOGCFG} L44-45: == \"\" -> default"),
    ("AWS_VPC_K8S_CNI_LOG_FILE", "stdout", "stdout", False, f"{ZAP} L136"),
    ("AWS_VPC_K8S_CNI_LOG_FILE", "Stderr", "stderr", False, f"{ZAP} L134"),
    ("CLUSTER_NAME", "prod-1", "prod-1", False, f"{IPAMD}: tagged as-is (cluster.k8s.amazonaws.com/name)"),
]

AGENT_ONLY = {"AWS_VPC_K8S_CNI_LOGLEVEL", "AWS_VPC_K8S_CNI_LOG_FILE"}  # the agent's own log: never in a conflist


def _id(row) -> str:
    return f"{row[0]}={'<unset>' if row[1] is UNSET else repr(row[1])}"


def _env(row) -> dict:
    return {} if row[1] is UNSET else {row[0]: row[1]}


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_the_agent_reads_each_setting_as_upstream(row):
    name, _, expected, warns, _where = row
    warnings = []
    if expected is ERROR:
        with pytest.raises(SettingError) as exc:
            settings.from_env(_env(row), warn=warnings.append)
        assert exc.value.code == 7 and name in exc.value.msg
        return
    assert settings.by_name(settings.from_env(_env(row), warn=warnings.append))[name] == expected
    assert bool(warnings) == warns, warnings
    assert all(name in w for w in warnings), warnings  # each warning names the setting


def _entries(conflist: dict) -> list[dict]:
    out = []
    for plugin in conflist["plugins"]:
        out.append(plugin)
        if isinstance(plugin.get("ipam"), dict):
            out.append(plugin["ipam"])
    return out


RENDERED = [r for r in ROWS if r[2] is not ERROR and r[0] not in AGENT_ONLY]


@pytest.mark.parametrize("row", RENDERED, ids=[_id(r) for r in RENDERED])
def test_the_rendered_conflist_gives_the_plugins_the_same_value(row):
    name, _, expected, _, _ = row
    conflist = json.loads(json.dumps(render_conflist(settings.from_env(_env(row), warn=lambda _: None))))
    key = settings.SETTINGS[name].key
    carrying = [entry for entry in _entries(conflist) if key in entry]
    if expected is None:
        assert not carrying, f"unset {name} must stay out of the conflist"
    else:
        assert carrying, f"the agent does not render {name} ({key})"
    for entry in carrying:  # a plugin's parse is strict: the rendered value must need no warning
        assert settings.by_name(settings.from_conf(entry, settings.kind("One", [name])))[name] == expected


def test_pod_mtu_follows_the_eni_mtu_as_written():
    # cmd/aws-vpc-cni/main.go@0129baff generateJSON: podMTU := utils.GetEnv(envPodMTU, eniMTU), then the
    # plugin's GetPodMTU (pkg/networkutils/network.go@00892598) reads it.
    assert settings.from_env({"AWS_VPC_ENI_MTU": "1500"}).pod_mtu == 1500
    assert settings.from_env({"AWS_VPC_ENI_MTU": "1500", "POD_MTU": "1400"}).pod_mtu == 1400
    # 100 is clamped to 576 for the ENI, but the pod MTU reads "100" and falls back to 9001 (upstream's quirk).
    values = settings.from_env({"AWS_VPC_ENI_MTU": "100"}, warn=lambda _: None)
    assert (values.eni_mtu, values.pod_mtu) == (576, 9001)


def test_an_upstream_conflist_entry_parses():
    # Upstream's conflist (cmd/aws-vpc-cni/main.go@0129baff NetConf: MTU is a string) as its init renders
    # it with the defaults of config/master/aws-k8s-cni.yaml.
    entry = {"type": "aws-cni", "vethPrefix": "eni", "mtu": "9001", "pluginLogFile": "/var/log/aws-routed-eni/plugin.log",
             "pluginLogLevel": "DEBUG"}
    bridge, log = settings.from_conf(entry, settings.BRIDGE), settings.from_conf(entry, settings.PLUGIN_LOG)
    assert (bridge.veth_prefix, bridge.pod_mtu) == ("eni", 9001)
    assert (log.plugin_log_file, log.plugin_log_level) == (DEFAULT_PLUGIN_LOG, "DEBUG")


DEFAULT_PLUGIN_LOG = settings.DEFAULT_PLUGIN_LOG


def _render(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in settings.SETTINGS}
    return subprocess.run([sys.executable, "-c", "import sys; from aws_vpc_cni_agent.main import main; sys.exit(main(['render-conflist']))"],
                          cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_the_agent_command_takes_what_issue_15_found_refused():
    env = {"AWS_VPC_K8S_PLUGIN_LOG_FILE": "stderr", "AWS_VPC_K8S_PLUGIN_LOG_LEVEL": "FATAL", "WARM_IP_TARGET": "-1",
           "MAX_ENI": "0", "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": "10.0.0.0/8,10.0.0.300/8,172.16.0.0/12",
           "AWS_VPC_K8S_CNI_EXTERNALSNAT": "T"}
    done = _render(env)
    assert done.returncode == 0, done.stderr
    conflist = json.loads(done.stdout)
    snat = next(p for p in conflist["plugins"] if p["type"] == "aws-snat")
    assert snat["excludeSNATCIDRs"] == ["10.0.0.0/8", "172.16.0.0/12"] and snat["externalSNAT"] is True
    assert snat["pluginLogFile"] == "stderr" and snat["pluginLogLevel"] == "FATAL"
    ipam = conflist["plugins"][0]["ipam"]
    assert "warmIPTarget" not in ipam and "maxENI" not in ipam
    # The skipped entry is named on stderr (the init container's log), with the variable.
    assert "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS" in done.stderr and "10.0.0.300/8" in done.stderr


def test_the_agent_command_refuses_what_upstream_refuses_naming_it():
    done = _render({"AWS_VPC_K8S_CNI_VETHPREFIX": "vlan"})
    assert done.returncode != 0 and not done.stdout
    assert "AWS_VPC_K8S_CNI_VETHPREFIX" in done.stderr


# Prefix delegation (issue 17). Read by the agent here and by aws-eni-ipam from its conflist entry; they
# join ROWS (and so the render test) once agent/main.py's render_conflist puts them into the ipam entry.
PREFIX_ROWS = [
    ("ENABLE_PREFIX_DELEGATION", UNSET, False, False, f"{IPAMD} usePrefixDelegation: getEnvBoolWithDefault(.., false)"),
    ("ENABLE_PREFIX_DELEGATION", "true", True, False, f"{IPAMD} usePrefixDelegation: strconv.ParseBool"),
    ("ENABLE_PREFIX_DELEGATION", "T", True, False, f"{IPAMD} usePrefixDelegation: strconv.ParseBool"),
    ("ENABLE_PREFIX_DELEGATION", "0", False, False, f"{IPAMD} usePrefixDelegation: strconv.ParseBool"),
    ("ENABLE_PREFIX_DELEGATION", "yes", False, True, f"{IPAMD} getEnvBoolWithDefault: ParseBool error -> default"),
    ("WARM_PREFIX_TARGET", UNSET, 1, False, "config/master/aws-k8s-cni.yaml sets 1; " + OURS),
    ("WARM_PREFIX_TARGET", "0", 0, False, f"{IPAMD} getWarmPrefixTarget: Atoi, input >= 0"),
    ("WARM_PREFIX_TARGET", "3", 3, False, f"{IPAMD} getWarmPrefixTarget: Atoi, input >= 0"),
    ("WARM_PREFIX_TARGET", "-1", 1, True, f"{IPAMD} getWarmPrefixTarget: input < 0 -> the default"),
    ("WARM_PREFIX_TARGET", "one", 1, True, f"{IPAMD} getWarmPrefixTarget: Atoi error -> the default"),
]


@pytest.mark.parametrize("row", PREFIX_ROWS, ids=[_id(r) for r in PREFIX_ROWS])
def test_prefix_settings_are_read_as_upstream_by_the_agent_and_the_ipam(row):
    test_the_agent_reads_each_setting_as_upstream(row)
    name, _, expected, _, _ = row
    one = settings.kind("One", [name])
    entry = settings.to_conf(one(expected))  # what the agent renders, read back strictly by the plugin
    assert settings.from_conf(entry, settings.IPAM) == settings.from_conf({}, settings.IPAM)._replace(
        **{settings.SETTINGS[name].attr: expected})
