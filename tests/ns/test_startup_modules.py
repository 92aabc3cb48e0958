"""What each frozen program loads when it starts: the one guard of start-up cost (issue 18 item 3).

Every pod ADD and DEL execs three or four of our programs, and every module one of them loads is
paid on every exec. Each frozen program of the bundle (dist/bin, as `make build` makes it) runs here
under strace: VERSION, and for the plugins a representative pod ADD and DEL through the default
chain in a scratch node namespace (tests/support/hostile_world.py's World, with the frozen programs:
aws-vpc-bridge with aws-eni-ipam in-process, aws-snat, portmap-compat with a host port), plus
aws-eni-ipam on its own as another main plugin would delegate to it, and the agent's `--version`.
A module is loaded when its file in the bundle is opened (modules are plain .pyc files there;
extension modules .so files). The set of each run must equal its entry in
tests/data/startup-modules.json: a module that appears is new start-up cost to justify (or to keep
off the path), one that is gone must leave the allowlist. The figures of what each module costs are
in BENCHMARKS.md, not here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from support.hostile_world import CHAIN, World, strict_json
from support.paths import DATA, ROOT

DIST = os.path.join(ROOT, "dist")
DIST_BIN = os.path.join(DIST, "bin")
INTERNAL = os.path.join(DIST, "aws-vpc-cni", "_internal")
ALLOWLIST = os.path.join(DATA, "startup-modules.json")
_OPENED = re.compile(r'^\d+ +openat\(AT_FDCWD, "([^"]+)", [^)]*\) = \d+$')
_EXTENSION = re.compile(r"\.cpython-[^/]*\.so$")


def modules_opened(trace: str) -> list[str]:
    """The modules whose file in the bundle a strace -f -e openat log shows opened successfully."""
    found = set()
    for line in trace.splitlines():
        match = _OPENED.match(line)
        if not match or not match.group(1).startswith(INTERNAL + "/"):
            continue
        path = match.group(1)[len(INTERNAL) + 1:]
        if path.endswith(".pyc"):
            name = path[:-len(".pyc")].removesuffix("/__init__").replace("/", ".")
        elif _EXTENSION.search(path):
            name = _EXTENSION.sub("", path.rsplit("/", 1)[-1])
        else:
            continue
        found.add(name)
    return sorted(found)


def test_modules_opened_reads_pyc_and_extension_files_of_the_bundle_only():
    log = "\n".join([
        f'7 openat(AT_FDCWD, "{INTERNAL}/cnicore/__init__.pyc", O_RDONLY|O_CLOEXEC) = 3',
        f'7 openat(AT_FDCWD, "{INTERNAL}/cnicore/skel.pyc", O_RDONLY|O_CLOEXEC) = 3',
        f'7 openat(AT_FDCWD, "{INTERNAL}/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so", O_RDONLY) = 3',
        f'7 openat(AT_FDCWD, "{INTERNAL}/cnicore", O_RDONLY|O_DIRECTORY) = 3',
        f'7 openat(AT_FDCWD, "{INTERNAL}/cnicore/gone.pyc", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)',
        '7 openat(AT_FDCWD, "/usr/lib/python3/re.pyc", O_RDONLY|O_CLOEXEC) = 3',
    ])
    assert modules_opened(log) == ["_json", "cnicore", "cnicore.skel"]


@pytest.fixture(scope="module")
def allowlist() -> dict:
    with open(ALLOWLIST) as f:
        return json.load(f)


class Tracer:
    """Runs our frozen programs under strace and collects each run's module set by name."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.seen: dict[str, list[str]] = {}

    def wrapper(self, key: str) -> tuple:
        log = self.tmp / f"{key.replace(' ', '-')}.strace"
        self.seen[key] = []
        return ("strace", "-f", "-qq", "-e", "trace=openat", "-e", "signal=none", "-o", str(log))

    def collect(self, key: str) -> None:
        self.seen[key] = modules_opened((self.tmp / f"{key.replace(' ', '-')}.strace").read_text())


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> dict[str, list[str]]:
    """{"<program> <what>": modules} for every run the module docstring lists."""
    assert os.access(os.path.join(DIST_BIN, "aws-vpc-bridge"), os.X_OK), "the frozen bundle is missing: run make build"
    tmp = tmp_path_factory.mktemp("startup")
    tracer = Tracer(tmp)
    for program in ("aws-eni-ipam", "aws-vpc-bridge", "aws-snat", "portmap-compat"):
        key = f"{program} VERSION"
        proc = subprocess.run([*tracer.wrapper(key), os.path.join(DIST_BIN, program)], input=b"{}",
                              env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        tracer.collect(key)
    key = "aws-vpc-cni-agent --version"
    proc = subprocess.run([*tracer.wrapper(key), os.path.join(DIST_BIN, "aws-vpc-cni-agent"), "--version"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tracer.collect(key)
    return tracer, tmp


def test_every_frozen_program_starts_with_exactly_its_allowlisted_modules(traced, allowlist, make_netns):
    tracer, tmp = traced
    world = World(make_netns, tmp / "world", bin_dir=DIST_BIN)
    mappings = [{"hostPort": 8081, "containerPort": 80, "protocol": "tcp"}]
    first, _ = world.chain_add(world.env("ADD", CNI_CONTAINERID="c1"), mappings)  # the node's steady state:
    assert first is not None                                                       # a pod runs already
    env = world.env("ADD", CNI_CONTAINERID="c2", CNI_NETNS=f"/var/run/netns/{make_netns('pod')}")
    prev = None
    for plugin in CHAIN:  # the conflist's ADD, as libcni runs it
        key = f"{plugin} ADD"
        outcome = world.run(plugin, {**env, "CNI_COMMAND": "ADD"}, world.chain_conf(plugin, prev, mappings),
                            wrapper=tracer.wrapper(key))
        assert outcome.rc == 0, outcome
        tracer.collect(key)
        prev = strict_json(outcome.stdout)
    for plugin in reversed(CHAIN):
        key = f"{plugin} DEL"
        outcome = world.run(plugin, {**env, "CNI_COMMAND": "DEL"}, world.chain_conf(plugin, prev, mappings),
                            wrapper=tracer.wrapper(key))
        assert outcome.rc == 0, outcome
        tracer.collect(key)
    for command in ("ADD", "DEL"):  # delegated to by another main plugin: its own exec
        key = f"aws-eni-ipam {command}"
        outcome = world.run("aws-eni-ipam", {**env, "CNI_COMMAND": command, "CNI_CONTAINERID": "c3"},
                            world.stdin("aws-eni-ipam"), wrapper=tracer.wrapper(key))
        assert outcome.rc == 0, outcome
        tracer.collect(key)

    measured = json.dumps(tracer.seen, indent=1)
    assert sorted(tracer.seen) == sorted(allowlist), f"every run has an allowlist entry and every entry a run:\n{measured}"
    problems = []
    for key, modules in sorted(tracer.seen.items()):
        new, gone = sorted(set(modules) - set(allowlist[key])), sorted(set(allowlist[key]) - set(modules))
        said = ([f"loads {new} beyond its allowlist"] if new else []) + ([f"no longer loads {gone}"] if gone else [])
        if said:
            problems.append(f"{key}: {'; '.join(said)}")
    assert not problems, f"start-up module sets changed (tests/data/startup-modules.json); measured:\n{measured}\n" + \
        "\n".join(problems)
