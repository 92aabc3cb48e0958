"""Result conversion between CNI versions (pure logic beside the exec'd conformance tests)."""

import pytest

from cnicore import result
from cnicore.errors import CNIError

INTERNAL = {"interfaces": [{"name": "eni1", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 9001},
                           {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "10.0.0.5/32", "gateway": "10.0.0.1", "interface": 1},
                    {"address": "fd00::5/128", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1500}], "dns": {}}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_results_carry_ip_versions_and_parse_back(version):
    out = result.convert(INTERNAL, version)
    assert out["cniVersion"] == version
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert "mtu" not in out["interfaces"][0] and "mtu" not in out["routes"][0]
    back = result.parse(out, version)
    assert all("version" not in ip for ip in back["ips"])


def test_1_1_keeps_new_fields_and_1_0_drops_them():
    assert result.convert(INTERNAL, "1.1.0")["routes"][0]["mtu"] == 1500
    assert "mtu" not in result.convert(INTERNAL, "1.0.0")["routes"][0]
    assert all("version" not in ip for ip in result.convert(INTERNAL, "1.0.0")["ips"])


@pytest.mark.parametrize("bad", [
    {"ips": [{"address": "nonsense"}]},
    {"ips": [{"address": "10.0.0.5/32", "version": "6"}]},
    {"ips": [{"address": "10.0.0.5/32", "interface": 3}], "interfaces": []},
    {"interfaces": [{"mac": "x"}]},
    [],
])
def test_malformed_prev_results_are_decode_errors(bad):
    with pytest.raises(CNIError) as exc:
        result.parse(bad, "1.0.0")
    assert exc.value.code == 6


def test_legacy_prev_result_needs_ip_version():
    with pytest.raises(CNIError):
        result.parse({"ips": [{"address": "10.0.0.5/32"}]}, "0.4.0")


@pytest.mark.parametrize("version,ok", [("1.0.0", True), ("0.2.0", False), ("2.0.0", False)])
def test_supported_versions(version, ok):
    if ok:
        result.require_supported(version)
    else:
        with pytest.raises(CNIError) as exc:
            result.require_supported(version)
        assert exc.value.code == 1
