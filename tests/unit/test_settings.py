"""Settings: one parser for the agent's environment and the plugins' conflist keys."""

import pytest

from cnicore import settings
from cnicore.settings import SettingError


def test_defaults_match_upstream():
    values = settings.from_env({})
    assert values.warm_ip_target is None and values.minimum_ip_target is None
    assert values.warm_eni_target == 1 and values.ip_cooldown_period == 30
    assert values.external_snat is False
    assert values.randomize_snat == "prng"
    assert values.node_port_support is True
    assert values.connmark == 0x80
    assert values.veth_prefix == "eni"
    assert values.eni_mtu == values.pod_mtu == 9001


def test_env_renders_to_conf_and_reads_back_identically():
    env = {"WARM_IP_TARGET": "2", "MINIMUM_IP_TARGET": "2", "AWS_VPC_K8S_CNI_EXTERNALSNAT": "true",
           "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": "192.168.0.0/16, 172.16.0.0/12",
           "AWS_VPC_K8S_CNI_CONNMARK": "0x40", "AWS_VPC_ENI_MTU": "1500", "AWS_VPC_K8S_PLUGIN_LOG_LEVEL": "info"}
    values = settings.from_env(env)
    assert values.pod_mtu == 1500  # follows the ENI MTU unless set
    conf = settings.to_conf(values)
    assert "warmIPTarget" in conf and conf["excludeSNATCIDRs"] == ["192.168.0.0/16", "172.16.0.0/12"]
    assert "maxENI" not in conf  # unset stays unset
    assert settings.from_conf(conf, settings.AGENT) == values


# What stays refused: what upstream refuses too, and what cannot work at all (each upstream spelling
# and fallback is in tests/unit/test_settings_upstream.py).
@pytest.mark.parametrize("name,value", [
    ("IP_COOLDOWN_PERIOD", "-1"), ("IP_COOLDOWN_PERIOD", "soon"), ("IP_COOLDOWN_PERIOD", str(2 ** 63)),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "eth"), ("AWS_VPC_K8S_CNI_VETHPREFIX", "toolong"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "a b"), ("AWS_VPC_K8S_CNI_VETHPREFIX", "a+"), ("AWS_VPC_K8S_CNI_VETHPREFIX", ".."),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "relative.log"), ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/var/../etc/x"),
    ("AWS_VPC_K8S_CNI_LOG_FILE", "ipamd.log"), ("AWS_VPC_CNI_LOG_MAX_SIZE", "-1"), ("AWS_VPC_CNI_LOG_MAX_BACKUPS", "five"),
    ("AWS_VPC_CNI_LOG_MAX_AGE", "1.5"), ("AWS_VPC_CNI_NETFILTER_MODE", "ebpf"), ("CLUSTER_NAME", "a\nb"),
    ("CLUSTER_NAME", "x" * 257), ("AWS_VPC_CNI_DATA_DIR", "relative"),
])
def test_bad_values_name_the_setting(name, value):
    with pytest.raises(SettingError) as exc:
        settings.from_env({name: value})
    assert exc.value.code == 7 and name in exc.value.msg


@pytest.mark.parametrize("key,value", [("warmIPTarget", True), ("mtu", [1500]), ("excludeSNATCIDRs", 5),
                                       ("externalSNAT", 1.0),
                                       # what the agent would only read with a warning, a plugin refuses
                                       ("mtu", "big"), ("warmIPTarget", -1), ("connmark", 0), ("eniMTU", 100),
                                       ("excludeSNATCIDRs", ["10.0.0.0/8", "bad"]), ("randomizeSNAT", "NONE"),
                                       ("pluginLogFile", "stdout"), ("pluginLogLevel", "TRACE")])
def test_bad_conf_values_name_the_key_and_variable(key, value):
    with pytest.raises(SettingError) as exc:
        settings.from_conf({key: value}, settings.AGENT)
    assert key in exc.value.msg


def test_go_strconv_readers():
    assert [settings.go_atoi(t) for t in ("7", "+7", "-7", "007")] == [7, 7, -7, 7]
    for text in ("", "+", " 7", "7 ", "1_0", "0x7", "\u0661", str(2 ** 63)):
        with pytest.raises(ValueError):
            settings.go_atoi(text)
    assert [settings.go_parse_int(t) for t in ("0x80", "0X80", "0o17", "017", "0b11", "1_000", "0x_80", "-0x80", "0")] == \
        [128, 128, 15, 15, 3, 1000, 128, -128, 0]
    for text in ("", "0x", "08", "1__0", "_1", "1_", "0x8g", "\u0661"):
        with pytest.raises(ValueError):
            settings.go_parse_int(text)
