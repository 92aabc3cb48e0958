"""Shared fixtures: every namespace a test makes carries this run's prefix and is removed afterwards.

Every test lives in one tier, by its directory, and gets that tier's marker (`pytest -m unit` etc.):
- tests/unit: pure code, and the node logic with fake EC2, IMDS and clock; no root, no namespaces
  (`make test-unit` runs it with every capability dropped, so a test that needs one fails there);
- tests/ns: network namespaces of its own, links, routes, rules, netfilter; no VPC lab;
- tests/lab: the VPC lab (tests/lab/test_lab_* test the lab itself).
A test outside these directories, or one asking for a fixture above its tier, stops the collection.
Helpers the tiers share live in tests/support.
"""

import itertools
import os
import shutil

import pytest

from vpclab import netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PREFIX = netns.new_prefix("t")


TIERS = ("unit", "ns", "lab")
NAMESPACE_FIXTURES = {"make_netns", "orphans_swept"}  # the lab's fixtures exist only in tests/lab
FORBIDDEN_FIXTURES = {"unit": NAMESPACE_FIXTURES, "ns": set(), "lab": set()}


def pytest_collection_modifyitems(config, items):
    tests_dir = os.path.join(ROOT, "tests")
    for item in items:
        where = os.path.relpath(str(item.path), tests_dir)
        tier = where.split(os.sep)[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"tests/{where}: every test lives in a tier: tests/unit, tests/ns or tests/lab")
        above = FORBIDDEN_FIXTURES[tier] & set(item.fixturenames)
        if above:
            raise pytest.UsageError(f"{item.nodeid}: a tests/{tier} test cannot use {', '.join(sorted(above))}: "
                                    "move it to the tier that provides it")
        item.add_marker(getattr(pytest.mark, tier))


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


@pytest.fixture(scope="session")
def orphans_swept():
    """Namespaces left by test runs that died are removed before this run makes any (only when a test
    needs namespaces: the unit tier runs without the privilege to)."""
    netns.sweep_orphans("t")


@pytest.fixture
def make_netns(orphans_swept):
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
