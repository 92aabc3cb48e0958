"""Hostile input (issue 10 item 4), file modes and secrets in logs.

1. Property-based fuzzing (hypothesis, derandomized) of stdin, the CNI_* variables and CNI_ARGS for
   every plugin, exec'd from the source tree's console scripts inside a scratch node namespace
   (tests/support/hostile_world.py). A refused invocation answers exactly one valid CNI error object on
   stdout with a non-zero exit, never code 999 and never a traceback, and changes nothing: the
   store, the links, addresses, rules, routes and iptables (nft and legacy) of the node and the pod
   namespace are as before. An accepted one must be a valid answer (and is undone).
2. Names from outside (container ID, ifname, hostIP, CIDRs, network name, the delegated `ipam.type`,
   dataDir, log file) with shell, path and iptables metacharacters, newlines, NULs, 300-character
   strings and unicode look-alikes: refused with a clear error, nothing run, nothing created. The
   pod's namespace and name are opaque (issue 14): accepted, and still nothing run or created.
3. What plugins and the agent write is 0600 in 0700 directories, even under umask 0.
4. In the VPC lab, the IPAM slow path and the agent at DEBUG level log neither the AWS secret key nor
   an IMDS token nor the token header.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import time
import uuid

import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st

from cnicore import settings as cnisettings
from cnicore import skel
from support.hostile_world import (BIN, CNI_ARGS, NETWORK, PLUGINS, POD_IP, World, check_error, strict_json,
                           writes_outside)
from support.paths import ROOT

COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS")
READS_CNI_ARGS = {"aws-eni-ipam", "aws-vpc-bridge"}  # the others never look at CNI_ARGS, as the reference portmap


def fuzz(examples: int):
    """Modest, repeatable runs: each example execs a plugin (~0.1 s) and snapshots two namespaces."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture
def world(make_netns, tmp_path):
    w = World(make_netns, tmp_path)
    yield w
    print(f"outcomes: {w.stats}")


# ---------------------------------------------------------------------------------------------------
# Strategies

HOSTILE = [
    "", " ", "../../etc", "../../../../../../../etc/passwd", "/etc/passwd", "a;rm -rf /", "$(id)", "`id`", "a|id",
    "a && id", "a\nb", "a\r\nb", "eth0\n", "x\t", '"', "'", "\\", 'a"b', "a\x00b", "a" * 300, "9" * 300,
    "ｅｔｈ０", "еth0", "\u202eabc", "\ud800", "\udcff", "-j ACCEPT", "--comment", "*", "/", ".", "..", "%",
    "%s%n", "{{.}}", "\x1b[31m", "IgnoreUnknown=1", "K8S_POD_NAME=x;K8S_POD_NAMESPACE=y", "=", ";", "0x80", "-1",
    "1e999", "NaN", "null", "true", "aws-vpc\n", "1.2.3.4 -j ACCEPT", "10.0.0.0/8\n-A INPUT -j DROP",
]
KEYS = ["cniVersion", "name", "type", "ipam", "dataDir", "pluginLogFile", "pluginLogLevel", "prevResult",
        "runtimeConfig", "portMappings", "hostIP", "hostPort", "ips", "interfaces", "address", "vethPrefix",
        "excludeSNATCIDRs", "netfilterMode", "cni.dev/valid-attachments", "containerID", "ifname"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30), st.sampled_from(HOSTILE))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), children, max_size=5)), max_leaves=20)

_no_nul_text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
env_values = st.one_of(
    st.sampled_from([h for h in HOSTILE if "\x00" not in h and not any(0xD800 <= ord(c) <= 0xDFFF for c in h)]),
    _no_nul_text,
    st.binary(max_size=40).filter(lambda b: b"\x00" not in b),
    st.integers(16, 400).map(lambda n: "a" * n),
    st.lists(st.sampled_from(["..", ".", "etc", "passwd", "x", "", "tmp", "bin", "sh"]), max_size=8).map("/".join),
)
arg_keys = st.one_of(st.sampled_from(["IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME",
                                      "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "FOO", ""]),
                     _no_nul_text.filter(lambda s: len(s) < 12))
cni_args = st.one_of(
    st.lists(st.tuples(arg_keys, env_values.map(lambda v: v.decode(errors="replace") if isinstance(v, bytes) else v)),
             max_size=5).map(lambda pairs: ";".join(f"{k}={v}" for k, v in pairs)),
    st.lists(st.tuples(arg_keys, env_values.map(lambda v: v.decode(errors="replace") if isinstance(v, bytes) else v)),
             max_size=4).map(lambda pairs: "IgnoreUnknown=1;" + ";".join(f"{k}={v}" for k, v in pairs)),
    env_values,
)


def could_run(plugin: str, conf, world) -> bool:
    """False for configs the fuzzer must not run: they would use a data dir or log file outside the
    test's tmp dir (the node's defaults), which a valid-looking config could write to."""
    if isinstance(conf, dict) and isinstance(conf.get("name"), str) and skel.NETWORK_NAME_RE.match(conf["name"]):
        return not writes_outside(plugin, conf, world.tmp)
    return True


def paths_of(doc, prefix=()):
    """Every key path of a JSON document (the root left out)."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield prefix + (key,)
            yield from paths_of(value, prefix + (key,))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield prefix + (index,)
            yield from paths_of(value, prefix + (index,))


def mutate(doc, path, op, value, new_key):
    doc = copy.deepcopy(doc)
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent[last], dict):
        parent[last][new_key] = value
    else:
        parent[last] = value
    return doc


def netns_is_harmless(value, cwd: str) -> bool:
    """A fuzzed CNI_NETNS must not name a real namespace (a plugin might enter it)."""
    text = os.fsdecode(value) if isinstance(value, bytes) else value
    real = os.path.realpath(os.path.join(cwd, text))
    return not (os.path.exists(real) and (real.startswith(("/proc", "/run/netns")) or "/ns/" in real))


# ---------------------------------------------------------------------------------------------------
# 1. Fuzzing, per plugin


@pytest.mark.parametrize("plugin", PLUGINS)
@fuzz(30)
@given(data=st.data())
def test_fuzz_arbitrary_json_stdin(world, plugin, data):
    doc = data.draw(json_values, "stdin document")
    command = data.draw(st.sampled_from(COMMANDS + ("VERSION",)), "command")
    assume(could_run(plugin, doc, world))
    outcome = world.exercise(plugin, world.env(command), json.dumps(doc).encode(), allow_success=command == "VERSION")
    event(f"{command}: {outcome}")


@pytest.mark.parametrize("plugin", PLUGINS)
@fuzz(30)
@given(data=st.data())
def test_fuzz_bytes_of_a_valid_config(world, plugin, data):
    """The valid stdin with bytes replaced or inserted (non-UTF-8, control characters, NULs), cut
    short, or re-encoded."""
    base = world.stdin(plugin)
    command = data.draw(st.sampled_from(COMMANDS), "command")
    how = data.draw(st.sampled_from(["replace", "insert", "truncate", "latin-1", "utf-16", "random"]), "how")
    at = data.draw(st.integers(0, len(base) - 1), "at")
    junk = data.draw(st.binary(min_size=1, max_size=4), "bytes")
    stdin = {"replace": base[:at] + junk + base[at + len(junk):], "insert": base[:at] + junk + base[at:],
             "truncate": base[:at], "latin-1": base.decode().replace("aws-vpc", "aws-vpç").encode("latin-1"),
             "utf-16": base.decode().replace(POD_IP, "10.0.1.\u0661\u0661").encode("utf-16"),
             "random": junk * at}[how]
    try:
        conf = json.loads(stdin)
    except (ValueError, UnicodeDecodeError, RecursionError):
        conf = None
    assume(could_run(plugin, conf, world))
    outcome = world.exercise(plugin, world.env(command), stdin)
    event(f"{how}: {outcome}")


@pytest.mark.parametrize("plugin", PLUGINS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_valid_config_with_one_field_mutated(world, plugin, data):
    base = world.conf(plugin)
    path = data.draw(st.sampled_from(sorted(paths_of(base), key=repr)), "path")
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), "op")
    value = data.draw(json_values, "value")
    new_key = data.draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), "new key")
    command = data.draw(st.sampled_from(COMMANDS), "command")
    conf = mutate(base, path, op, value, new_key)
    assume(could_run(plugin, conf, world))
    if plugin == "aws-vpc-bridge":  # test_bridge_long_names_are_refused_before_taking_an_ip_and_del_does_not_crash
        assume(not (isinstance(conf.get("name"), str) and len(conf["name"]) > 200))
    outcome = world.exercise(plugin, world.env(command), json.dumps(conf).encode())
    event(f"{command}: {outcome}")


@pytest.mark.parametrize("plugin", PLUGINS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_cni_variables(world, plugin, data):
    var = data.draw(st.sampled_from(["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_PATH"]), "var")
    command = data.draw(st.sampled_from(COMMANDS), "command")
    value = data.draw(st.one_of(st.none(), env_values), "value")
    if var == "CNI_NETNS":
        # aws-vpc-bridge ADD takes an IP before it opens the netns: test_bridge_add_refuses_a_bad_netns_before_taking_an_ip
        assume(not (plugin == "aws-vpc-bridge" and command == "ADD"))
        assume(value is None or netns_is_harmless(value, world.cwd))
    if var == "CNI_CONTAINERID" and plugin == "aws-vpc-bridge":
        # a container ID too long for the veth alias: test_bridge_long_names_are_refused_before_taking_an_ip_and_...
        assume(value is None or len(value) < 200)
    outcome = world.exercise(plugin, world.env(command, **{var: value}), world.stdin(plugin))
    event(f"{var}: {outcome}")


@pytest.mark.parametrize("plugin", PLUGINS)
@fuzz(30)
@given(data=st.data())
def test_fuzz_cni_args(world, plugin, data):
    """Any CNI_ARGS: an answer or one clean error, and never an error for DEL, GC or STATUS (nor for an
    ADD of a plugin that does not read CNI_ARGS): only an ADD can be refused for its CNI_ARGS."""
    command = data.draw(st.sampled_from(COMMANDS), "command")
    value = data.draw(cni_args, "CNI_ARGS")
    outcome = world.exercise(plugin, world.env(command, CNI_ARGS=value), world.stdin(plugin))
    if command in ("DEL", "GC", "STATUS") or (command == "ADD" and plugin not in READS_CNI_ARGS):
        assert outcome == "ok", f"{plugin} {command} failed on CNI_ARGS={value!r}"
    event(outcome)


# ---------------------------------------------------------------------------------------------------
# 2. Odd documents and names from outside: targeted values, every plugin. Each test runs its cases in
#    one world and reports every case that was not refused cleanly.


def attempt(world: World, plugin: str, env: dict, stdin: bytes, codes=(), may_succeed=False) -> list[str]:
    """Run one case; the problems with it (none: refused with one of `codes`, nothing changed; or,
    with `may_succeed`, accepted with a valid answer and undone)."""
    try:
        outcome = world.run(plugin, env, stdin)
        if outcome.rc == 0:
            world.restore_after_success(plugin, env, stdin, outcome)
            return [] if may_succeed else [f"accepted, should have been refused: {outcome!r}"]
        err = check_error(outcome)
        world.assert_unchanged(outcome)
    except AssertionError as exc:
        world.restore()
        return [str(exc)]
    if codes and err["code"] not in codes:
        return [f"refused with code {err['code']}, expected {codes}: {err['msg']!r}\n{outcome!r}"]
    return []


def assert_no_problems(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} case(s) not refused cleanly:\n\n" + "\n\n".join(p[:3000] for p in problems)


def created_anywhere(tag: str, world: World) -> list[str]:
    """Files or directories whose name holds `tag`: in the test's tmp dir (recursively), the repo, and
    the places a traversal or an injected command would reach."""
    found = []
    for top in (world.tmp, ROOT):
        for directory, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", ".tools", "__pycache__")]
            found += [os.path.join(directory, n) for n in dirs + files if tag in n]
    for place in ("/", "/etc", "/tmp", "/var/log", "/var/log/aws-routed-eni", "/var/run/aws-vpc-cni", "/run",
                  os.path.dirname(world.tmp), os.path.dirname(os.path.dirname(world.tmp))):
        found += [p for p in glob.glob(os.path.join(glob.escape(place), "*")) if tag in os.path.basename(p)]
    return sorted(set(found))


def with_conf(world: World, plugin: str, section: str | None = None, **keys) -> bytes:
    """The plugin's valid stdin with `keys` set (in the `ipam` section when `section` is 'ipam')."""
    conf = world.conf(plugin)
    target = conf[section] if section else conf
    target.update(keys)
    return json.dumps(conf).encode()


LEAD = PLUGINS[0]  # checks that the shared skeleton makes run every value on this plugin, a sample on the others


def sample(values: list, k: int) -> list:
    """An even sample of k values."""
    if len(values) <= k:
        return values
    return [values[int(i * len(values) / k)] for i in range(k)]


def spread(plugin: str, values: list, k: int = 4) -> list:
    """All `values` for the lead plugin; for the others a sample (the skeleton's checks are shared)."""
    return values if plugin == LEAD else sample(values, k)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_odd_documents(world, plugin):
    """Deep, huge, concatenated, non-UTF-8 and NaN documents: a decoding error (code 6), or for the
    valid-but-unusual ones (BOM, UTF-16, 20 MB of extra key) an answer; never a crash."""
    valid = world.stdin(plugin)
    conf = world.conf(plugin)
    deep_in_valid = json.dumps({**conf, "x-deep": "DEEP"}).encode().replace(b'"DEEP"', b"[" * 100_000 + b"]" * 100_000)
    must_refuse = {
        "empty": b"", "whitespace": b" \n\t ", "deep array": b"[" * 100_000 + b"]" * 100_000,
        "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "deep value in a valid config": deep_in_valid,
        "two objects": valid + valid, "trailing garbage": valid + b"\x00x", "non-UTF-8": valid.replace(b"aws-vpc", b"aws-\xff\xfe"),
        "NaN": valid[:-1] + b', "x-extra": NaN}', "Infinity": valid[:-1] + b', "x-extra": -Infinity}',
        "1e400": valid[:-1] + b', "x-extra": 1e400}', "lone surrogate name": valid.replace(b'"aws-vpc"', b'"\\ud800"'),
        "array": b"[" + valid + b"]", "string": json.dumps(valid.decode()).encode(), "null": b"null",
    }
    may_succeed = {"UTF-8 BOM": b"\xef\xbb\xbf" + valid, "UTF-16": valid.decode().encode("utf-16"),
                   "20 MB extra key": valid[:-1] + b', "x-junk": "' + b"a" * 20_000_000 + b'"}',
                   "unknown keys everywhere": json.dumps({**conf, "cni.dev/x": {"a": [1, 2]}, "args": {"k": "v"}}).encode()}
    problems = []
    for command in ("ADD", "DEL"):
        for name, stdin in must_refuse.items():
            problems += [f"[{command} {name}] {p}" for p in attempt(world, plugin, world.env(command), stdin, codes=(6, 7))]
    for name, stdin in may_succeed.items():
        problems += [f"[ADD {name}] {p}" for p in attempt(world, plugin, world.env("ADD"), stdin, may_succeed=True)]
    assert_no_problems(problems)


def test_ipam_type_cannot_be_a_path_or_a_command(world):
    """`ipam.type` names a plugin in CNI_PATH, nothing else: a path, a traversal or shell syntax is
    refused (code 7) and runs nothing, even with an executable planted where the traversal leads."""
    tag = uuid.uuid4().hex[:12]
    canary = f"/tmp/hz-{tag}-ran"
    evil_dir = os.path.join(world.tmp, "evil")
    os.makedirs(evil_dir)
    for name in ("sh", "aws-eni-ipam"):
        with open(os.path.join(evil_dir, name), "w") as f:
            f.write(f"#!/bin/sh\ntouch {canary}\n")
        os.chmod(os.path.join(evil_dir, name), 0o755)
    values = ["../../bin/sh", "/bin/sh", "../evil/sh", f"{evil_dir}/sh", "../evil/aws-eni-ipam", "evil/../sh",
              f"sh;touch {canary}", f"$(touch {canary})", f"`touch {canary}`", "..", ".", "", " ", "aws-eni-ipam/",
              "aws-eni-ipam\n", "aws-eni-ipam\x00", "aws-eni-ipam ", "ａｗｓ-ｅｎｉ-ｉｐａｍ", "a" * 300, 5, None, ["aws-eni-ipam"]]
    problems = []
    for command in COMMANDS:
        for value in values if command == "ADD" else sample(values, 3):
            stdin = with_conf(world, "aws-vpc-bridge", "ipam", type=value)
            problems += [f"[{command} {value!r}] {p}" for p in
                         attempt(world, "aws-vpc-bridge", world.env(command), stdin, codes=(7,))]
    problems += [f"ran: {path}" for path in created_anywhere(tag, world)]
    assert_no_problems(problems)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_log_file_and_level_are_validated(world, plugin):
    """pluginLogFile must be an absolute path without '..' (code 7, logged to stderr, no file made)."""
    tag = uuid.uuid4().hex[:12]
    files = [f"../../hz-{tag}.log", f"hz-{tag}.log", f"./hz-{tag}.log", f"/tmp/../tmp/hz-{tag}.log",
             f"{world.tmp}/x/../hz-{tag}.log", f"/tmp/hz-{tag}\x00.log", 5, ["/tmp/x"], {"path": "/tmp/x"},
             True, f"$(touch /tmp/hz-{tag})", f"~/hz-{tag}.log"]  # "" is stderr, as upstream reads it
    levels = ["TRACE", "DEBUG;rm -rf /", 5, ["DEBUG"], "ｄｅｂｕｇ"]  # "" is DEBUG, as upstream reads it
    problems = []
    for value in spread(plugin, files):
        problems += [f"[pluginLogFile {value!r}] {p}" for p in
                     attempt(world, plugin, world.env("ADD"), with_conf(world, plugin, pluginLogFile=value), codes=(7,))]
    for value in spread(plugin, levels, 2):
        problems += [f"[pluginLogLevel {value!r}] {p}" for p in
                     attempt(world, plugin, world.env("ADD"), with_conf(world, plugin, pluginLogLevel=value), codes=(7,))]
    problems += [f"created: {path}" for path in created_anywhere(tag, world)]
    assert_no_problems(problems)


@pytest.mark.parametrize("plugin", [p for p in PLUGINS if p != "portmap-compat"])
def test_data_dir_is_validated(world, plugin):
    """dataDir (of the plugin, or of its ipam section) must be an absolute path without '..'."""
    tag = uuid.uuid4().hex[:12]
    section = "ipam" if plugin in ("aws-eni-ipam", "aws-vpc-bridge") else None
    values = [f"../../hz-{tag}", f"hz-{tag}", f"/tmp/../tmp/hz-{tag}", f"{world.tmp}/data/../hz-{tag}",
              f"/tmp/hz-{tag}\x00", f"/tmp/hz-{tag}/..", 5, [], {}, True, f"$(mkdir /tmp/hz-{tag})"]  # "": the default
    problems = []
    for command in ("ADD", "DEL", "STATUS"):
        if plugin == "aws-snat" and command == "DEL":
            continue  # aws-snat's DEL reads nothing and changes nothing (the rules are the node's)
        for value in values if command == "ADD" else sample(values, 3):
            stdin = with_conf(world, plugin, section, dataDir=value)
            problems += [f"[{command} dataDir {value!r}] {p}" for p in
                         attempt(world, plugin, world.env(command), stdin, codes=(7,))]
    problems += [f"created: {path}" for path in created_anywhere(tag, world)]
    assert_no_problems(problems)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_network_name_is_validated(world, plugin):
    """The network name becomes a file name in the data dir and part of iptables comments and chain
    names: only [A-Za-z0-9][A-Za-z0-9_.-]* (code 7); a long one is an error or works, never a crash."""
    tag = uuid.uuid4().hex[:12]
    values = [f"../../hz-{tag}", "a;rm -rf /", "$(id)", "`id`", "aws-vpc\n", "aws-vpc\r", "aws-vpc/x", "aws-vpc\\x",
              'aws"vpc', "aws'vpc", "ａｗｓ-ｖｐｃ", "аws-vpc", "aws vpc", "-aws", ".aws", "..", "aws-vpc\x00",
              "aws-vpc\t", "", 5, None, ["aws-vpc"], f"{tag}*"]
    problems = []
    for command in ("ADD", "DEL", "CHECK", "GC"):
        for value in spread(plugin, values, 5) if command == "ADD" else sample(values, 2):
            stdin = with_conf(world, plugin, name=value)
            problems += [f"[{command} name {value!r}] {p}" for p in attempt(world, plugin, world.env(command), stdin, codes=(7,))]
    for value in ("n" * 300,):
        for command in ("ADD", "DEL") if plugin != "aws-vpc-bridge" else ():  # see test_bridge_long_names_*
            problems += [f"[{command} name of {len(value)}] {p}" for p in
                         attempt(world, plugin, world.env(command), with_conf(world, plugin, name=value), may_succeed=True)]
    problems += [f"created: {path}" for path in created_anywhere(tag, world)]
    assert_no_problems(problems)


BAD_CONTAINER_IDS = ["../../etc", "a;rm -rf /", "$(id)", "`id`", "c1\n", "c1\r", "c 1", 'c"1', "c'1", "ｃ１",
                     "c1\x1b[0m", "-rf", "c1/..", "c1\t", ".c1", "_c1", b"c1\xff", "c1\u200b", "c1;IgnoreUnknown=1"]
BAD_IFNAMES = ["eth0\n", "../x", "a/b", "a:b", "a b", ".", "..", "x" * 16, "ｅｔｈ０ｘｙ", b"\xff", b"e\x80", b"\x80" * 16,
               "\t", "eth0\u00a0", "eth0\u2028", "eth\x1b0", "eth\x7f"]


@pytest.mark.parametrize("plugin", PLUGINS)
def test_container_id_and_ifname_are_validated(world, plugin):
    """As the reference skel: container ID ^[A-Za-z0-9][A-Za-z0-9_.-]*$ (no trailing newline either),
    ifname at most 15 bytes, not . or .., no /, : or whitespace (and, beyond the reference, printable
    UTF-8, as it goes into JSON results): code 4 for ADD, CHECK and DEL. Nothing named after them appears."""
    tag = uuid.uuid4().hex[:12]
    container_ids = BAD_CONTAINER_IDS + [f"../../hz-{tag}", f"$(touch /tmp/hz-{tag})", f"c1;touch /tmp/hz-{tag}"]
    problems = []
    for command in ("ADD", "CHECK", "DEL"):
        for value in spread(plugin, container_ids, 4) if command == "ADD" else sample(container_ids, 2):
            problems += [f"[{command} CNI_CONTAINERID={value!r}] {p}" for p in
                         attempt(world, plugin, world.env(command, CNI_CONTAINERID=value), world.stdin(plugin), codes=(4,))]
        for value in spread(plugin, BAD_IFNAMES, 4) if command == "ADD" else sample(BAD_IFNAMES, 3):
            problems += [f"[{command} CNI_IFNAME={value!r}] {p}" for p in
                         attempt(world, plugin, world.env(command, CNI_IFNAME=value), world.stdin(plugin), codes=(4,))]
    # Allowed by the reference rules, so accepted or refused cleanly, and if accepted undone by DEL:
    long_id = [{"CNI_CONTAINERID": "c" * 300}] if plugin != "aws-vpc-bridge" else []  # see test_bridge_long_names_*
    for env in long_id + [{"CNI_IFNAME": "еth0"}, {"CNI_IFNAME": "é" * 7}]:
        problems += [f"[ADD {env!r}] {p}" for p in
                     attempt(world, plugin, world.env("ADD", **env), world.stdin(plugin), may_succeed=True)]
    problems += [f"created: {path}" for path in created_anywhere(tag, world)]
    assert_no_problems(problems)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_pod_namespace_and_name_are_opaque_and_reach_no_file(world, plugin):
    """CNI_ARGS values the runtime passes from the pod are opaque text (podman sends its container's
    name, eager_hamilton, alone): ADD succeeds and DEL undoes it, and nothing named after them appears
    anywhere (that none reaches an iptables rule or an interface name raw either, through the whole
    chain: tests/ns/test_runtime_input.py). What types.LoadArgs refuses is code 4 for an ADD of a plugin
    that reads CNI_ARGS, and accepted by the others; DEL succeeds with it, whatever the plugin."""
    tag = uuid.uuid4().hex[:12]
    cases = {
        "K8S_POD_NAMESPACE": [f"../../hz-{tag}", f"a&&rm -rf /tmp/hz-{tag}|id", f"$(touch /tmp/hz-{tag})", "default\n",
                              "Default", "a" * 300, "a b", 'a"b', "ｄｅｆａｕｌｔ", "-default", "kube.system", "", "\xff\xfe"],
        "K8S_POD_NAME": [f"../../etc/hz-{tag}", f"`touch /tmp/hz-{tag}`", "eager_hamilton", "web-1\n", "Web", "web/1",
                         "wеb", 'web"1', ".web", "eth0", "", "\x1b[31m"],
        "K8S_POD_INFRA_CONTAINER_ID": [f"$(touch /tmp/hz-{tag})", "c1\n", "../c1", "c 1"],
        "K8S_POD_UID": ["../x", "u\n", "a" * 65, "u id"],
    }
    problems = []
    for key, values in cases.items():
        for value in spread(plugin, values, 3):
            args = CNI_ARGS.replace(f"{key}=", "X_=") + f";{key}={value}"
            env = world.env("ADD", CNI_ARGS=args)
            outcome = world.run(plugin, env, world.stdin(plugin))
            if outcome.rc != 0:
                problems.append(f"[{key}={value!r}] refused: {outcome!r}")
                world.restore()
                continue
            try:
                world.restore_after_success(plugin, env, world.stdin(plugin), outcome)  # DEL with the same args
            except AssertionError as exc:
                problems.append(f"[{key}={value!r}] {exc}")
    for args in spread(plugin, ["K8S_POD_NAMESPACE=default;FOO=1", "IgnoreUnknown=yes;FOO=1", "IgnoreUnknown=1;K8S_POD_NAME",
                                "=", "IgnoreUnknown=1;;", "IgnoreUnknown=1;K8S_POD_NAME=a=b", f"FOO=$(touch /tmp/hz-{tag})"], 3):
        reads = plugin in READS_CNI_ARGS
        problems += [f"[ADD CNI_ARGS={args!r}] {p}" for p in
                     attempt(world, plugin, world.env("ADD", CNI_ARGS=args), world.stdin(plugin), codes=(4,),
                             may_succeed=not reads)]
        outcome = world.run(plugin, world.env("DEL", CNI_ARGS=args), world.stdin(plugin))
        if outcome.rc != 0:
            problems.append(f"[DEL CNI_ARGS={args!r}] DEL failed: {outcome!r}")
        world.restore()
    problems += [f"created: {path}" for path in created_anywhere(tag, world)]
    assert_no_problems(problems)


@pytest.mark.skipif("portmap-compat" not in PLUGINS, reason="portmap-compat not built")
def test_port_mappings_from_the_pod_spec_are_validated(world):
    """hostIP, ports and protocol come from the pod spec: nothing but an address, a port number and
    tcp/udp/sctp reaches an iptables rule (code 7, no rule touched)."""
    good = {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    bad = [("hostIP", v) for v in ["1.2.3.4 -j ACCEPT", "1.2.3.4\n-A INPUT -j DROP", "$(id)", "::1%eth0", "fe80::1%eth0",
                                   "10.0.0.1/32", "010.0.0.1", "10.0.0.256", " 10.0.0.1", "10.0.0.1 ", 167772161,
                                   ["10.0.0.1"], "ｌｏｃａｌｈｏｓｔ", "localhost", "1.2.3.4\x00", "1.2.3.4;id", True]]
    bad += [("hostPort", v) for v in [0, 65536, -1, "80", 80.5, True, None, "80 -j ACCEPT", [80], 2 ** 64]]
    bad += [("containerPort", v) for v in [0, 65536, "80", 1e3, "80\n"]]
    bad += [("protocol", v) for v in ["tcp -j ACCEPT", "tcp\n", "icmp", "", "all", 6, None, "t c p", "ｔｃｐ"]]
    problems = []
    for n, (key, value) in enumerate(bad):
        runtime = {"portMappings": [{**good, key: value}]}
        for command in ("ADD", "CHECK") if n % 4 == 0 else ("ADD",):
            stdin = with_conf(world, "portmap-compat", runtimeConfig=runtime)
            problems += [f"[{command} {key}={value!r}] {p}" for p in
                         attempt(world, "portmap-compat", world.env(command), stdin, codes=(7,))]
    for key, value in [("conditionsV4", ["-j", "ACCEPT\n-A INPUT -j DROP"]), ("conditionsV4", "-s 1.2.3.4"),
                       ("conditionsV6", [5]), ("conditionsV4", [""]), ("externalSetMarkChain", "X;id"),
                       ("externalSetMarkChain", "A" * 29), ("externalSetMarkChain", "X\n"), ("markMasqBit", 32),
                       ("markMasqBit", "13"), ("snat", "false"), ("runtimeConfig", "x"),
                       ("runtimeConfig", {"portMappings": {"hostPort": 1}})]:
        problems += [f"[ADD {key}={value!r}] {p}" for p in
                     attempt(world, "portmap-compat", world.env("ADD"), with_conf(world, "portmap-compat", **{key: value}),
                             codes=(7,))]
    # Refused by the netfilter layer's own check ("a rule must be one line", code 103) before any rule
    # is touched; portmap-compat's _conditions only looks for "\n" (a code-7 check would be clearer).
    for value in (["-s 1.2.3.4\r"], ["-s", "1.2.3.4\x00"]):
        problems += [f"[ADD conditionsV4={value!r}] {p}" for p in
                     attempt(world, "portmap-compat", world.env("ADD"),
                             with_conf(world, "portmap-compat", conditionsV4=value), codes=(7, 103))]
    assert_no_problems(problems)


@pytest.mark.skipif("aws-snat" not in PLUGINS, reason="aws-snat not built")
def test_snat_cidrs_and_names_are_validated(world):
    """excludeSNATCIDRs, vethPrefix, connmark and the other aws-snat settings reach iptables rules:
    anything but their exact form is a config error (code 7) before a rule is touched."""
    cases = [("excludeSNATCIDRs", v) for v in [["10.0.0.0/8 -j ACCEPT"], ["10.0.0.0/8\n-A INPUT -j DROP"], ["$(id)"],
                                               ["10.0.0.1/8"], ["fd00::/8"], ["10.0.0.0/33"], "10.0.0.0/8;rm -rf /",
                                               ["１０.0.0.0/8"], 5, [5], ["10.0.0.0/8", None], {"a": 1},
                                               ["10.0.0.0/8\x00"], ["10.0.0.0 /8"]]]
    cases += [("vethPrefix", v) for v in ["eth", "lo", "a b", "a+", "a;b", "ｅｎｉ", "toolong", "", 5, "e\n"]]  # "e-1": a valid name (upstream checks only length and reserved names)
    cases += [("connmark", v) for v in [0, -1, 2 ** 32, "0x80;id", True, 1.5]]
    cases += [("randomizeSNAT", v) for v in ["always", "prng --to-source 1.2.3.4", 1]]
    cases += [("externalSNAT", v) for v in ["maybe", 2, "yes;id"]]
    cases += [("netfilterMode", v) for v in ["nft;id", "../legacy", "ebpf", 1]]
    problems = []
    for n, (key, value) in enumerate(cases):
        for command in ("ADD", "CHECK", "GC") if n % 5 == 0 else ("ADD",):
            stdin = with_conf(world, "aws-snat", **{key: value})
            problems += [f"[{command} {key}={value!r}] {p}" for p in
                         attempt(world, "aws-snat", world.env(command), stdin, codes=(7,))]
    assert_no_problems(problems)


@pytest.mark.skipif("aws-vpc-bridge" not in PLUGINS, reason="aws-vpc-bridge not built")
def test_bridge_settings_are_validated(world):
    """vethPrefix makes host interface names, mtu goes to netlink: refused (code 7) before IPAM runs."""
    cases = [("vethPrefix", v) for v in ["eth", "lo", "a b", "a/", "a:", "a;b", "ｅｎｉ", "toolong", "", 5, "e\n", "..", "."]]
    cases += [("mtu", v) for v in [0, 575, 9002, -1, "9001;id", 1e9, True, [9001]]]
    cases += [("eniMTU", v) for v in [0, "x"]]
    problems = []
    for n, (key, value) in enumerate(cases):
        for command in ("ADD", "DEL", "CHECK") if n % 4 == 0 else ("ADD",):
            stdin = with_conf(world, "aws-vpc-bridge", **{key: value})
            problems += [f"[{command} {key}={value!r}] {p}" for p in
                         attempt(world, "aws-vpc-bridge", world.env(command), stdin, codes=(7,))]
    assert_no_problems(problems)


@pytest.mark.parametrize("plugin", [p for p in PLUGINS if p != "aws-eni-ipam"])
def test_prev_result_addresses_are_validated(world, plugin):
    """prevResult addresses feed iptables rules and routes: a number, an IPv6 zone, junk after the
    prefix or a bad interface index is a decoding error (code 6)."""
    problems = []
    for address in ["10.0.1.11/32 -j ACCEPT", "10.0.1.11/32\n-A INPUT -j DROP", 167772171, "fe80::1%eth0/64",
                    "fe80::1%x\n-A INPUT -j DROP/64", "10.0.1.11/33", "$(id)", None, ["10.0.1.11/32"], "", "10.0.1.11/32\x00"]:
        for command in ("ADD", "CHECK", "DEL") if address in (167772171, "fe80::1%eth0/64") else ("ADD",):
            conf = world.conf(plugin)
            prev = conf.get("prevResult") or json.loads(json.dumps(hostile_prev(world)))
            prev["ips"][0]["address"] = address
            conf["prevResult"] = prev
            problems += [f"[{command} address {address!r}] {p}" for p in
                         attempt(world, plugin, world.env(command), json.dumps(conf).encode(), codes=(6,))]
    for field, value in [("interface", True), ("interface", 7), ("interface", "1"), ("interface", -1)]:
        conf = world.conf(plugin)
        prev = conf.get("prevResult") or hostile_prev(world)
        prev["ips"][0][field] = value
        conf["prevResult"] = prev
        problems += [f"[ADD {field}={value!r}] {p}" for p in
                     attempt(world, plugin, world.env("ADD"), json.dumps(conf).encode(), codes=(6,))]
    for ips in (5, "10.0.1.11/32", {"address": "10.0.1.11/32"}, [5]):
        conf = world.conf(plugin)
        conf["prevResult"] = {**(conf.get("prevResult") or hostile_prev(world)), "ips": ips}
        problems += [f"[ADD ips={ips!r}] {p}" for p in
                     attempt(world, plugin, world.env("ADD"), json.dumps(conf).encode(), codes=(6,))]
    assert_no_problems(problems)


def hostile_prev(world):
    from support.hostile_world import prev_result
    return prev_result(world.pod_netns)


# ---------------------------------------------------------------------------------------------------
# Found here in files this test did not own, fixed since.


@pytest.mark.skipif("aws-vpc-bridge" not in PLUGINS, reason="aws-vpc-bridge not built")
def test_bridge_add_refuses_a_bad_netns_before_taking_an_ip(world):
    not_a_netns = os.path.join(world.tmp, "not-a-netns")
    with open(not_a_netns, "w") as f:
        f.write("x")
    problems = []
    for netns in ("/nonexistent/netns", "/dev/null", not_a_netns, world.tmp, "relative/netns"):
        problems += [f"[CNI_NETNS={netns!r}] {p}" for p in
                     attempt(world, "aws-vpc-bridge", world.env("ADD", CNI_NETNS=netns), world.stdin("aws-vpc-bridge"))]
    assert_no_problems(problems)


@pytest.mark.skipif("aws-vpc-bridge" not in PLUGINS, reason="aws-vpc-bridge not built")
def test_bridge_long_names_are_refused_before_taking_an_ip_and_del_does_not_crash(world):
    problems = []
    for command in ("ADD", "DEL", "CHECK"):
        problems += [f"[{command} container ID of 300] {p}" for p in
                     attempt(world, "aws-vpc-bridge", world.env(command, CNI_CONTAINERID="c" * 300),
                             world.stdin("aws-vpc-bridge"), may_succeed=command == "DEL")]
        problems += [f"[{command} network name of 300] {p}" for p in
                     attempt(world, "aws-vpc-bridge", world.env(command),
                             with_conf(world, "aws-vpc-bridge", name="n" * 300), may_succeed=command == "DEL")]
    assert_no_problems(problems)


# ---------------------------------------------------------------------------------------------------
# The agent's settings: the same parser, from its environment


SETTING_NAMES = sorted(cnisettings.SETTINGS)
setting_values = st.one_of(
    st.sampled_from(HOSTILE + ["0", "1", "3601", "0x80", "0xFFFFFFFF", "0x100000000", " 5 ", "١٢", "1_000", "true",
                               "False", "nft", "LEGACY", "/var/log/x.log", "/a/../b", "10.0.0.0/8,192.168.0.0/16",
                               "10.0.0.0/8,,", "eni", "debug", "Info", "9001", "576", "1" * 5000]),
    st.text(max_size=30).filter(lambda t: "\x00" not in t),
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(SETTING_NAMES), value=setting_values)
def test_settings_from_env_refuse_or_round_trip(name, value):
    """Every setting, any string: refused naming the variable (code 7), or a value that renders into
    the conflist as JSON and is read back by the plugins as the same value."""
    try:
        parsed = cnisettings.from_env({name: value}, cnisettings.kind("One", [name]))
    except cnisettings.SettingError as exc:
        assert exc.code == 7 and name in exc.msg
        return
    conf = json.loads(json.dumps(cnisettings.to_conf(parsed), allow_nan=False))
    assert cnisettings.from_conf(conf, type(parsed)) == parsed


def agent(*argv, env=None, umask=None, cwd=None):
    full = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run([os.path.join(BIN, "aws-vpc-cni-agent"), *argv], env=full, capture_output=True, timeout=60,
                          cwd=cwd, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


@fuzz(30)
@given(name=st.sampled_from(SETTING_NAMES), value=st.one_of(setting_values.filter(lambda v: not any(
    0xD800 <= ord(c) <= 0xDFFF for c in v)), st.binary(max_size=20).filter(lambda b: b"\x00" not in b)))
def test_agent_render_conflist_refuses_bad_settings(name, value):
    """`aws-vpc-cni-agent render-conflist`: exit 2 with a message naming the variable and nothing on
    stdout, or a conflist every plugin accepts; never a traceback."""
    proc = agent("render-conflist", env={name: value})
    assert b"Traceback" not in proc.stdout + proc.stderr, proc
    if proc.returncode == 2:
        assert proc.stdout == b"" and name.encode() in proc.stderr, proc
        return
    assert proc.returncode == 0, proc
    conflist = strict_json(proc.stdout)
    for plugin in conflist["plugins"]:
        for section in (plugin, plugin.get("ipam", {})):
            known = [n for n in SETTING_NAMES if cnisettings.SETTINGS[n].key in section]
            cnisettings.from_conf(section, cnisettings.kind("Known", known))


def test_agent_write_conflist_with_a_bad_setting_writes_nothing(tmp_path):
    for name, value in (("AWS_VPC_K8S_PLUGIN_LOG_FILE", "../../etc/x"), ("AWS_VPC_K8S_CNI_VETHPREFIX", "a;b"),
                        ("AWS_VPC_CNI_DATA_DIR", "relative"), ("CLUSTER_NAME", "a\x1bb")):
        conf_dir = tmp_path / name
        proc = agent("write-conflist", str(conf_dir), env={name: value})
        assert proc.returncode == 2 and name.encode() in proc.stderr and b"Traceback" not in proc.stderr, proc
        assert not conf_dir.exists()


def test_agent_write_conflist_skips_an_excluded_cidr_that_smuggles_a_rule(tmp_path):
    """Upstream skips a bad entry of the list (with a warning naming it) and keeps the rest: the
    smuggled rule text reaches neither the conflist nor any netfilter rule."""
    name, value = "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/8\n-A INPUT -j DROP,192.168.0.0/16"
    proc = agent("write-conflist", str(tmp_path), env={name: value})
    assert proc.returncode == 0 and name.encode() in proc.stderr and b"Traceback" not in proc.stderr, proc
    conflist = json.loads((tmp_path / "10-aws-vpc.conflist").read_text())
    snat = next(p for p in conflist["plugins"] if p["type"] == "aws-snat")
    assert snat["excludeSNATCIDRs"] == ["192.168.0.0/16"], snat
    assert "DROP" not in (tmp_path / "10-aws-vpc.conflist").read_text()


# ---------------------------------------------------------------------------------------------------
# 3. File modes: what the plugins and the agent write is 0600, their directories 0700, under umask 0


def modes_under(root: str) -> dict[str, str]:
    """{relative path: 'd700' | 'f600' | 's600'} of everything under root (root included)."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in [""] + dirs + files:
            path = os.path.join(directory, name) if name else directory
            st_ = os.lstat(path)
            kind = "d" if stat.S_ISDIR(st_.st_mode) else "s" if stat.S_ISSOCK(st_.st_mode) else "f"
            out[os.path.relpath(path, root)] = f"{kind}{stat.S_IMODE(st_.st_mode):o}"
    return out


def not_private(modes: dict[str, str]) -> dict[str, str]:
    return {path: mode for path, mode in modes.items() if mode not in ("d700", "f600", "s600")}


def test_plugin_log_file_and_dirs_are_private_under_umask_0(world):
    """The log file the skeleton opens is 0600 and every directory it creates for it 0700, whatever
    the runtime's umask (the Logger creates missing parents one by one)."""
    root = os.path.join(world.tmp, "logs")
    for plugin in PLUGINS:
        log_file = os.path.join(root, plugin, "deeper", "plugin.log")
        outcome = world.run(plugin, world.env("STATUS"), with_conf(world, plugin, pluginLogFile=log_file), umask=0)
        assert outcome.rc == 0, outcome
        assert os.path.getsize(log_file) > 0
    assert not_private(modes_under(root)) == {}


def test_store_and_lock_files_are_private_under_umask_0(world):
    """State store, its temp file and lock, the netfilter locks: 0600 in a 0700 data dir that the
    plugin creates itself (its parent exists)."""
    data_dir = os.path.join(world.tmp, "fresh-data")
    for plugin, command in (("aws-eni-ipam", "STATUS"), ("aws-snat", "STATUS")):
        if plugin in PLUGINS:
            section = "ipam" if plugin == "aws-eni-ipam" else None
            outcome = world.run(plugin, world.env(command), with_conf(world, plugin, section, dataDir=data_dir), umask=0)
            assert outcome.rc == 0, outcome
    # a document written by the plugin (temp file + rename): take a warm IP, then give it back
    with open(os.path.join(world.pristine, f"{NETWORK}.json"), "rb") as src, \
            open(os.path.join(data_dir, f"{NETWORK}.json"), "wb") as dst:
        dst.write(src.read())
    os.chmod(os.path.join(data_dir, f"{NETWORK}.json"), 0o644)  # the plugin's rewrite must not keep this
    for command in ("ADD", "DEL"):
        outcome = world.run("aws-eni-ipam", world.env(command),
                            with_conf(world, "aws-eni-ipam", "ipam", dataDir=data_dir), umask=0)
        assert outcome.rc == 0, outcome
    if "aws-snat" in PLUGINS:  # converging from scratch: netfilter lock and the scratch-namespace xtables lock
        conf = json.loads(with_conf(world, "aws-snat", dataDir=data_dir, connmark=64))
        outcome = world.run("aws-snat", world.env("ADD"), json.dumps(conf).encode(), umask=0)
        assert outcome.rc == 0, outcome
    modes = modes_under(data_dir)
    assert f"{NETWORK}.json" in modes and f"{NETWORK}.lock" in modes, modes
    assert not_private(modes) == {}, modes


def test_data_dir_parents_the_plugin_creates_are_private_under_umask_0(world):
    root = os.path.join(world.tmp, "nested")
    data_dir = os.path.join(root, "a", "b", "data")
    outcome = world.run("aws-eni-ipam", world.env("STATUS"),
                        with_conf(world, "aws-eni-ipam", "ipam", dataDir=data_dir), umask=0)
    assert outcome.rc == 0, outcome
    assert not_private(modes_under(root)) == {}


def test_agent_conflist_is_not_writable_by_others_under_umask_0(tmp_path):
    conf_dir = tmp_path / "etc" / "cni" / "net.d"
    proc = agent("write-conflist", str(conf_dir), umask=0)
    assert proc.returncode == 0, proc
    modes = modes_under(str(tmp_path / "etc"))
    assert {p: m for p, m in modes.items() if int(m[1:], 8) & 0o022} == {}, modes


# ---------------------------------------------------------------------------------------------------
# 4. No credential and no IMDS token in any log (VPC lab)

# The lab's IMDS hands out secrets.token_urlsafe(40) tokens (vpclab/imds.py): 54 URL-safe characters.
TOKEN_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{54}(?![A-Za-z0-9_-])")
IMDS_PUT = ("import http.client\n"
            "c = http.client.HTTPConnection('169.254.169.254', 80, timeout=5)\n"
            "c.request('PUT', '/latest/api/token', headers={'X-aws-ec2-metadata-token-ttl-seconds': '60'})\n"
            "print(c.getresponse().read().decode())\n")


def test_no_credential_or_imds_token_is_logged(fresh_lab, tmp_path):
    """The IPAM slow path (EC2 and IMDS from an empty store, then an EC2 failure) and the agent
    (reconcile, ticks, throttling) at DEBUG level, with unique credentials in their environment: no
    log line, stdout or stderr holds the secret key, the session token, the access key ID, an IMDS
    token or the token header. The agent's files are 0600 in a 0700 dir under umask 0."""
    from support.labnode import LabNode
    creds = {"AWS_ACCESS_KEY_ID": "AKIAHZ" + secrets.token_hex(7).upper(),
             "AWS_SECRET_ACCESS_KEY": "hzSecret/" + secrets.token_urlsafe(30),
             "AWS_SESSION_TOKEN": "hzSession" + secrets.token_hex(24)}
    sample_token = fresh_lab.exec("node1", [sys.executable, "-c", IMDS_PUT]).stdout.strip()
    assert TOKEN_SHAPE.fullmatch(sample_token), f"the lab's IMDS tokens changed shape: {sample_token!r}"
    node = LabNode(fresh_lab, "node1", tmp_path)
    cni_env = {"CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/none", "CNI_IFNAME": "eth0", "CNI_PATH": BIN,
               "CNI_ARGS": CNI_ARGS, **creds}
    seen = []

    def ipam(command, conf):
        proc = fresh_lab.exec("node1", [os.path.join(BIN, "aws-eni-ipam")], input=json.dumps(conf),
                              env={**cni_env, "CNI_COMMAND": command}, check=False)
        seen.extend([proc.stdout, proc.stderr])
        return proc

    conf = {**node.ipam_conf(), "pluginLogLevel": "DEBUG"}
    for _ in range(10):  # grows the pool from EC2 and IMDS; 11 (try again) while IMDS lags behind EC2
        proc = ipam("ADD", conf)
        if proc.returncode == 0 or strict_json(proc.stdout)["code"] != 11:
            break
        time.sleep(1)
    assert proc.returncode == 0, proc
    assert ipam("DEL", conf).returncode == 0
    fresh_lab.fault("*", error="UnauthorizedOperation")
    try:
        failed = ipam("ADD", {**conf, "ipam": {**conf["ipam"], "dataDir": str(tmp_path / "node1-data2")}})
    finally:
        fresh_lab.clear_faults()
    assert failed.returncode != 0 and strict_json(failed.stdout)["code"] == 101, failed

    agent_dir, agent_log = str(tmp_path / "agent-data"), str(tmp_path / "agent" / "agent.log")
    env = fresh_lab.exec_env("node2", {"AWS_VPC_CNI_DATA_DIR": agent_dir, "AWS_VPC_K8S_CNI_LOG_FILE": agent_log,
                                       "AWS_VPC_K8S_PLUGIN_LOG_LEVEL": "DEBUG", "IP_COOLDOWN_PERIOD": "0", **creds})
    proc = subprocess.Popen(fresh_lab.exec_argv("node2", [os.path.join(BIN, "aws-vpc-cni-agent"), "run", "--interval",
                                                          "0.3", "--metrics-address", ""]),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0))
    try:
        def ticks():
            status = fresh_lab.exec("node2", [os.path.join(BIN, "aws-vpc-cni-agent"), "status", "--json"],
                                    env={"AWS_VPC_CNI_DATA_DIR": agent_dir}, check=False)
            return json.loads(status.stdout)["ticks"] if status.returncode == 0 else 0
        deadline = time.time() + 60
        while ticks() < 2:
            assert proc.poll() is None and time.time() < deadline, "the agent did not tick"
            time.sleep(0.3)
        fresh_lab.fault("*", error="RequestLimitExceeded", duration=1.5)
        time.sleep(2)
        fresh_lab.clear_faults()
        reached = ticks() + 2
        while ticks() < reached:
            assert proc.poll() is None and time.time() < deadline, "the agent stopped ticking"
            time.sleep(0.3)
    finally:
        fresh_lab.clear_faults()
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    seen.extend([out.decode(errors="replace"), err.decode(errors="replace")])

    texts = {"plugin log": open(node.log_file).read(), "agent log": open(agent_log).read(),
             "stdout/stderr": "\n".join(s if isinstance(s, str) else s.decode(errors="replace") for s in seen)}
    assert "assigned after growing the pool" in texts["plugin log"] and '"level":"DEBUG"' in texts["plugin log"]
    assert "UnauthorizedOperation" in texts["plugin log"]  # the error path was logged too
    assert "agent started" in texts["agent log"]
    for where, text in texts.items():
        for name, value in creds.items():
            assert value not in text, f"{name} appears in the {where}"
        assert "x-aws-ec2-metadata-token" not in text.lower(), f"the IMDS token header appears in the {where}"
        assert sample_token not in text
        assert not TOKEN_SHAPE.findall(text), f"IMDS-token-shaped strings in the {where}: {TOKEN_SHAPE.findall(text)}"
    assert not_private(modes_under(agent_dir)) == {}, modes_under(agent_dir)
    assert not_private(modes_under(os.path.dirname(agent_log))) == {}
