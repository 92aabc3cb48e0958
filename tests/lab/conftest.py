"""Fixtures for the VPC lab. They are thin over vpclab.api so they can move to tests/conftest.py as is.

- `lab` and `fresh_lab` come from tests/conftest.py (one session lab for the whole suite).
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
