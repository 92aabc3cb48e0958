"""Fixtures of the lab tier, thin over vpclab.api.

- `lab`: one lab for the whole session (2 m5.large nodes, the internet host, an extra host
  198.51.100.10); `fresh_lab`: that lab reset around the test (`reset_lab`).
- `make_lab(**settings)`: a dedicated lab for a test that needs other settings or breaks things.
- `frozen`: the frozen bundle's program links (dist/bin), built first if missing.
Labs left behind by test runs that died are removed first (a lab whose owner ended removes itself,
but a daemon killed with -9 cannot).
"""

import itertools
import os
import subprocess

import pytest

from support.paths import BUNDLE, DIST_BIN, ROOT
from vpclab import api, netns
from vpclab.api import Lab

_names = (f"{netns.new_prefix('l')}{i}" for i in itertools.count())


@pytest.fixture(scope="session", autouse=True)
def _lab_orphans_swept(orphans_swept):
    api.sweep_orphans()


@pytest.fixture(scope="session")
def lab():
    """It removes itself if this process dies."""
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


@pytest.fixture(scope="session")
def frozen():
    """The bundle's program links (`make test` builds it first; built here if a bare pytest run finds none)."""
    if not os.access(os.path.join(BUNDLE, "aws-vpc-cni"), os.X_OK):
        subprocess.run(["bash", os.path.join(ROOT, "build", "build.sh")], check=True, cwd=ROOT)
    return DIST_BIN


@pytest.fixture
def make_lab():
    made = []

    def make(**settings) -> Lab:
        lab = Lab.up(name=next(_names), owner_pid=os.getpid(), **settings)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.down()
