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
    assert f'memcpy(req.magic, "{zygote.MAGIC.decode()}", 4)' in LAUNCHER
    plugins = re.search(r"PLUGINS\[\] = \{([^}]+)\}", LAUNCHER).group(1)
    assert tuple(re.findall(r'"([^"]+)"', plugins)) == entry.PLUGINS
    assert agent_zygote.CANNOT_SERVE == zygote.CANNOT_SERVE


def process(**changes):
    """A zygote.Process as /proc would describe it, without reading /proc."""
    facts = dict(pid=10, parent=9, uid=0, capabilities=0b1111, umask=0o22, seccomp=0, no_new_privs=0,
                 exe=(1, 2, 3, 4), user_ns=(5, 6), pid_ns=(7, 8), net_ns=(4, 40), root=(0, 0), lsm_label=b"unconfined")
    facts.update(changes)
    found = zygote.Process.__new__(zygote.Process)
    found.__dict__.update(facts)
    return found


@pytest.fixture
def fds(tmp_path):
    """(root fd, netns fd) of this process, and its Process facts for them."""
    root = os.open("/", os.O_RDONLY)
    netns = os.open(str(tmp_path), os.O_RDONLY)  # any file: only its identity is compared
    identity = lambda fd: (os.fstat(fd).st_dev, os.fstat(fd).st_ino)  # noqa: E731
    yield root, netns, {"root": identity(root), "net_ns": identity(netns)}
    os.close(root)
    os.close(netns)


def test_the_zygote_stands_in_for_a_caller_that_could_do_all_it_does(fds):
    root, netns, own_fds = fds
    own = process()
    zygote.check(process(**own_fds), own, root, netns)
    zygote.check(process(capabilities=0b11111, **own_fds), own, root, netns)  # more than the zygote: fine


@pytest.mark.parametrize("changes, reason", [
    ({"uid": 1000}, "caller uid 1000 is not ours"),
    ({"exe": (1, 2, 3, 5)}, "another build of the bundle"),
    ({"exe": (1, 9, 3, 4)}, "another build of the bundle"),
    ({"user_ns": (5, 7)}, "another user namespace"),
    ({"pid_ns": (7, 9)}, "another pid namespace"),
    ({"capabilities": 0b0101}, "the caller lacks capabilities this zygote has (0xa)"),
    ({"capabilities": 0}, "the caller lacks capabilities this zygote has (0xf)"),
    ({"seccomp": 2}, "seccomp filter or no_new_privs"),
    ({"no_new_privs": 1}, "seccomp filter or no_new_privs"),
    ({"lsm_label": b"cri-containerd.apparmor.d (enforce)"}, "LSM label"),
    ({"root": (0, 1)}, "the root directory passed is not the caller's"),
    ({"net_ns": (0, 1)}, "the network namespace passed is not the caller's"),
])
def test_the_zygote_refuses_a_caller_it_cannot_stand_in_for(fds, changes, reason):
    root, netns, own_fds = fds
    with pytest.raises(zygote.Refused, match=re.escape(reason)):
        zygote.check(process(**{**own_fds, **changes}), process(), root, netns)


def test_the_zygote_reads_a_process_from_proc():
    me = zygote.Process("/proc/self")
    assert (me.pid, me.parent, me.uid) == (os.getpid(), os.getppid(), os.geteuid())
    assert me.umask == (lambda m: os.umask(m) or m)(os.umask(0))
    assert me.exe[:2] == (os.stat("/proc/self/exe").st_dev, os.stat("/proc/self/exe").st_ino)


@pytest.mark.parametrize("peer_pidfd", [True, False], ids=["SO_PEERPIDFD", "SO_PEERCRED and pidfd_open"])
def test_the_caller_is_the_process_the_kernel_names(monkeypatch, peer_pidfd):
    """The caller's facts come from the kernel, with SO_PEERPIDFD or, before Linux 6.5, the pid
    SO_PEERCRED names (here the peer of a socketpair is this very process)."""
    import socket
    if not peer_pidfd:
        monkeypatch.setattr(zygote, "SO_PEERPIDFD", 0x7fff)  # an option no kernel knows: ENOPROTOOPT
    ours, theirs = socket.socketpair()
    with ours, theirs:
        caller = zygote.caller_of(ours)
    assert (caller.pid, caller.parent, caller.exe) == (os.getpid(), os.getppid(), zygote.Process("/proc/self").exe)
