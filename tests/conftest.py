"""Shared fixtures: every namespace a test makes carries this run's prefix and is removed afterwards."""

import itertools
import os
import shutil

import pytest

from vpclab import netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PREFIX = netns.new_prefix("t")


def pytest_sessionstart(session):
    netns.sweep_orphans("t")


def pytest_sessionfinish(session, exitstatus):
    netns.sweep(RUN_PREFIX)
    remove_cni_cache_entries(str(session.config._tmp_path_factory.getbasetemp()))


CNI_CACHE = "/var/lib/cni/results"  # libcni's result cache, where cnitool writes each ADD's result


def remove_cni_cache_entries(marker: str) -> list[str]:
    """Remove libcni's cache entries of our networks whose network configuration names `marker` (this
    run's temporary folder: only conflists this run wrote do): what an ADD left that no DEL took
    back (a cnitool killed on purpose, pods a test leaves to the lab's reset)."""
    import base64
    import json
    gone = []
    for name in os.listdir(CNI_CACHE) if os.path.isdir(CNI_CACHE) else ():
        if not name.startswith("aws-vpc"):
            continue
        path = os.path.join(CNI_CACHE, name)
        try:
            with open(path) as f:
                config = base64.b64decode(json.load(f).get("config", "")).decode(errors="replace")
        except (OSError, ValueError, AttributeError):
            continue
        if marker in config:
            os.unlink(path)
            gone.append(name)
    return gone


@pytest.fixture
def make_netns():
    """Factory: make_netns('role') -> namespace name, deleted when the test ends (pass or fail)."""
    made = []
    counter = itertools.count()

    def make(role: str = "ns") -> str:
        name = f"{RUN_PREFIX}-{role}{next(counter)}"
        netns.create(name)
        made.append(name)
        return name

    yield make
    for name in reversed(made):
        netns.delete(name)


@pytest.fixture(scope="session")
def cnitool():
    path = os.path.join(ROOT, ".tools", "bin", "cnitool")
    if not os.access(path, os.X_OK):
        path = shutil.which("cnitool")
    assert path, "cnitool is missing: run build/setup.sh"
    return path


# --- the VPC lab ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lab():
    """One lab for the session: 2 m5.large nodes, the internet host and an extra host 198.51.100.10.
    It removes itself if this process dies."""
    from vpclab import api
    api.sweep_orphans()
    lab = api.Lab.up(name=netns.new_prefix("l"), nodes=2, extra_hosts=["198.51.100.0/24"], owner_pid=os.getpid())
    yield lab
    lab.down()


# What the plugins leave in a lab node besides links, routes and pod rules (which their DELs remove):
# nat and mangle rules in both iptables variants, rule 1024, eth0's rp_filter.
CLEAN_NODE = """
for v in nft legacy; do for t in nat mangle; do iptables-$v -w -t $t -F; iptables-$v -w -t $t -X; done; done
while ip rule del priority 1024 2>/dev/null; do :; done
sysctl -qw net.ipv4.conf.eth0.rp_filter=1
"""


@pytest.fixture
def fresh_lab(lab):
    """The session lab back to its initial state around the test: EC2 (no extra ENIs or IPs, no faults)
    and the nodes (CLEAN_NODE), so no test sees another's SNAT or hostPort rules."""
    reset_lab(lab)
    yield lab
    reset_lab(lab)


def reset_lab(lab) -> None:
    lab.reset()
    for node in lab.status()["nodes"]:
        lab.exec(node["name"], ["sh", "-c", CLEAN_NODE])
