"""Settings: one parser for the agent's environment and the plugins' conflist keys."""

import pytest

from cnicore import settings
from cnicore.settings import SettingError


def test_defaults_match_upstream():
    values = settings.from_env({})
    assert values["WARM_IP_TARGET"] is None and values["MINIMUM_IP_TARGET"] is None
    assert values["WARM_ENI_TARGET"] == 1 and values["IP_COOLDOWN_PERIOD"] == 30
    assert values["AWS_VPC_K8S_CNI_EXTERNALSNAT"] is False
    assert values["AWS_VPC_K8S_CNI_RANDOMIZESNAT"] == "prng"
    assert values["AWS_VPC_CNI_NODE_PORT_SUPPORT"] is True
    assert values["AWS_VPC_K8S_CNI_CONNMARK"] == 0x80
    assert values["AWS_VPC_K8S_CNI_VETHPREFIX"] == "eni"
    assert values["AWS_VPC_ENI_MTU"] == values["POD_MTU"] == 9001


def test_env_renders_to_conf_and_reads_back_identically():
    env = {"WARM_IP_TARGET": "2", "MINIMUM_IP_TARGET": "2", "AWS_VPC_K8S_CNI_EXTERNALSNAT": "true",
           "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": "192.168.0.0/16, 172.16.0.0/12",
           "AWS_VPC_K8S_CNI_CONNMARK": "0x40", "AWS_VPC_ENI_MTU": "1500", "AWS_VPC_K8S_PLUGIN_LOG_LEVEL": "info"}
    values = settings.from_env(env)
    assert values["POD_MTU"] == 1500  # follows the ENI MTU unless set
    conf = settings.to_conf(values)
    assert "warmIPTarget" in conf and conf["excludeSNATCIDRs"] == ["192.168.0.0/16", "172.16.0.0/12"]
    assert "maxENI" not in conf  # unset stays unset
    assert settings.from_conf(conf, list(values)) == values


@pytest.mark.parametrize("name,value", [
    ("WARM_IP_TARGET", "-1"), ("WARM_IP_TARGET", "two"), ("MINIMUM_IP_TARGET", "1.5"), ("MAX_ENI", "0"),
    ("WARM_ENI_TARGET", "-3"), ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "maybe"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.1/8"), ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "fd00::/8"),
    ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/8;rm -rf /"), ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "always"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "eth"), ("AWS_VPC_K8S_CNI_VETHPREFIX", "toolong"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "a-b"), ("AWS_VPC_ENI_MTU", "575"), ("POD_MTU", "9002"),
    ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "relative.log"), ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/var/../etc/x"),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "TRACE"), ("AWS_VPC_K8S_CNI_CONNMARK", "0"),
    ("AWS_VPC_CNI_NETFILTER_MODE", "ebpf"), ("CLUSTER_NAME", "a\nb"),
    ("WARM_IP_TARGET", "1_000"), ("WARM_IP_TARGET", "\u0661\u0662"), ("AWS_VPC_K8S_CNI_CONNMARK", "0x"),
    ("AWS_VPC_K8S_CNI_CONNMARK", "0x8_0"), ("MAX_ENI", "+"), ("MAX_ENI", "- 3"),
])
def test_bad_values_name_the_setting(name, value):
    with pytest.raises(SettingError) as exc:
        settings.from_env({name: value})
    assert exc.value.code == 7 and name in exc.value.msg


@pytest.mark.parametrize("key,value", [("warmIPTarget", True), ("mtu", "big"), ("excludeSNATCIDRs", 5),
                                       ("externalSNAT", 1.0)])
def test_bad_conf_values_name_the_key_and_variable(key, value):
    with pytest.raises(SettingError) as exc:
        settings.from_conf({key: value}, list(settings.SETTINGS))
    assert key in exc.value.msg
