"""Fixtures for the VPC lab. They are thin over vpclab.api so they can move to tests/conftest.py as is.

- `lab`: one lab for the whole session (2 nodes of m5.large in 10.0.0.0/24, the internet host and one
  extra host 198.51.100.10); it removes itself if this process dies.
- `fresh_lab`: that lab, reset before and after the test (faults, counts, staleness, extra ENIs and
  addresses in EC2). Tests undo what they do inside the nodes' namespaces themselves.
- `make_lab(**settings)`: a dedicated lab for a test that needs other settings or breaks things.
"""

import itertools
import os

import pytest

from vpclab import api, netns
from vpclab.api import Lab

_names = (f"{netns.new_prefix('l')}{i}" for i in itertools.count())


@pytest.fixture(scope="session", autouse=True)
def _lab_orphans_swept():
    """Remove labs left behind by test runs that died (a lab whose owner ended removes itself, but a
    daemon killed with -9 cannot)."""
    api.sweep_orphans()


@pytest.fixture(scope="session")
def lab():
    lab = Lab.up(name=next(_names), nodes=2, extra_hosts=["198.51.100.0/24"], owner_pid=os.getpid())
    yield lab
    lab.down()


@pytest.fixture
def fresh_lab(lab):
    lab.reset()
    yield lab
    lab.reset()


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
