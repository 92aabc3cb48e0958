"""cnicore/ipv4.py reads IPv4 text as ipaddress does: the same values, and ipaddress's refusals."""

import ipaddress

import pytest
from hypothesis import given, strategies as st

from cnicore import ipv4

TEXTS = ["10.0.1.5", "0.0.0.0", "255.255.255.255", "010.0.0.1", "10.0.0", "10.0.0.256", "1.2.3.4 ", "١.2.3.4",
         "10.0.0.0/16", "10.0.1.0/24", "10.0.1.5/24", "10.0.0.0/33", "10.0.0.0/016", "0.0.0.0/0", "10.0.1.5",
         "", "x", None, 167772161]


def _ipaddress(parse, text):
    try:
        return parse(text)
    except (ValueError, TypeError):
        return "refused"


@pytest.mark.parametrize("text", TEXTS)
def test_address_and_network_agree_with_ipaddress(text):
    want = _ipaddress(lambda t: int(ipaddress.IPv4Address(t)), text)
    assert _ipaddress(ipv4.address, text) == want
    net = _ipaddress(ipaddress.IPv4Network, text)
    got = _ipaddress(ipv4.network, text)
    assert got == ("refused" if net == "refused" else (int(net.network_address), net.prefixlen))


@given(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 2**32 - 1))
def test_contains_and_text_agree_with_ipaddress(base, prefixlen, other):
    net = ipaddress.IPv4Network((base, prefixlen), strict=False)
    value = (int(net.network_address), prefixlen)
    assert ipv4.network(str(net)) == value
    assert ipv4.contains(value, other) == (ipaddress.IPv4Address(other) in net)
    assert ipv4.text(other) == str(ipaddress.IPv4Address(other))
