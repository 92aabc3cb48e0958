"""What build/launcher.c, build/zygote.py, build/entry.py and the agent must agree on (issue 19),
and the zygote's refusals, as pure code."""

import os
import re

import pytest

from aws_vpc_cni_agent import zygote as agent_zygote
from cnicore import agentlink, settings
from support.bundle_sources import load
from support.paths import ROOT

zygote = load("zygote")
entry = load("entry")

with open(os.path.join(ROOT, "build", "launcher.c")) as f:
    LAUNCHER = f.read()


def test_the_launcher_asks_where_the_agent_serves_by_default():
    default = re.search(r'#define ZYGOTE_SOCKET_DEFAULT "([^"]+)"', LAUNCHER).group(1)
    data_dir = settings.SETTINGS["AWS_VPC_CNI_DATA_DIR"].default
    assert default == os.path.join(data_dir, agentlink.ZYGOTE)


def test_the_launcher_sends_the_zygotes_header_for_the_plugins_entry_runs():
    assert re.search(r"build/zygote.py's HEADER \(\"([^\"]+)\"\)", LAUNCHER).group(1) == zygote.HEADER.format
    fields = re.search(r"struct __attribute__\(\(packed\)\) zygote_request \{(.*?)\};", LAUNCHER, re.S).group(1)
    sizes = {"char": 1, "uint64_t": 8, "int64_t": 8, "uint32_t": 4}
    size = 0
    for kind, names in re.findall(r"(\w+) ([^;]+);", fields):
        for name in names.split(","):
            count = re.search(r"\[(\d+)\]", name)
            size += sizes[kind] * (int(count.group(1)) if count else 1)
    assert size == zygote.HEADER.size
    plugins = re.search(r"PLUGINS\[\] = \{([^}]+)\}", LAUNCHER).group(1)
    assert tuple(re.findall(r'"([^"]+)"', plugins)) == entry.PLUGINS
    assert agent_zygote.CANNOT_SERVE == zygote.CANNOT_SERVE


IDENTITY = ((1, 2, 3, 4), (5, 6), (7, 8))  # exe (dev, ino, size, mtime), user ns, pid ns
CAPABILITIES = 0b1111


def request(**changes):
    fields = dict(magic=b"AVZ1", exe=IDENTITY[0], userns=IDENTITY[1], pidns=IDENTITY[2], caps=0b0101, umask=0o22,
                  length=10)
    fields.update(changes)
    return (fields["magic"], *fields["exe"], *fields["userns"], *fields["pidns"], fields["caps"], fields["umask"],
            fields["length"])


def test_the_zygote_serves_a_caller_it_can_stand_in_for():
    zygote.check(request(), 0, IDENTITY, CAPABILITIES)
    zygote.check(request(caps=CAPABILITIES), 0, IDENTITY, CAPABILITIES)


@pytest.mark.parametrize("changes, uid, reason", [
    ({}, 1000, "caller uid 1000 is not ours"),
    ({"exe": (1, 2, 3, 5)}, 0, "another build of the bundle"),
    ({"exe": (1, 9, 3, 4)}, 0, "another build of the bundle"),
    ({"userns": (5, 7)}, 0, "another user namespace"),
    ({"pidns": (7, 9)}, 0, "another pid namespace"),
    ({"caps": 0b10001}, 0, "capabilities this zygote lacks (0x10)"),
])
def test_the_zygote_refuses_a_caller_it_cannot_stand_in_for(changes, uid, reason):
    with pytest.raises(zygote.Refused, match=re.escape(reason)):
        zygote.check(request(**changes), uid, IDENTITY, CAPABILITIES)
