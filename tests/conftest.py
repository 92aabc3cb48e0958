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
