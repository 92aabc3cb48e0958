"""The nudge datagrams' wire format (cnicore.agentlink): each kind reads back only as itself."""

import pytest

from cnicore import agentlink


def test_messages_read_back_as_sent():
    assert agentlink.parse_release(agentlink.release_message("aws-cni", "c1", "eth0", "10.0.0.5")) == \
        ("aws-cni", "c1", "eth0", "10.0.0.5")
    assert agentlink.parse_waiting(agentlink.waiting_message("aws-cni", "c1", "eth0")) == ("aws-cni", "c1", "eth0")


@pytest.mark.parametrize("message", [
    b"grow",                                   # a plain nudge
    agentlink.waiting_message("n", "c", "eth0"),  # the other kind
    b"release\0n\0c\0eth0",                    # a field short
    b"release\0n\0\0eth0\0" + b"10.0.0.5",     # an empty field
    b"release\0n\0c\0eth0\x0010.0.0.5\0x",     # a field too many
    b"\xff\xfe",                               # not UTF-8
])
def test_anything_else_is_not_a_release(message):
    assert agentlink.parse_release(message) is None


@pytest.mark.parametrize("message", [b"grow", agentlink.release_message("n", "c", "eth0", "10.0.0.5"),
                                     b"waiting\0n\0c", b"waiting\0n\0\0eth0"])
def test_anything_else_is_not_a_waiting_attachment(message):
    assert agentlink.parse_waiting(message) is None
