"""CNI skeleton conformance (CNI-CONFORMANCE items 1-15, 18-21, 24, 26, 34-36), exec'ing real plugin
processes built on the skeleton (tests/support/cniplugins.py) and reading what they print and store."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from cnicore import skel
from cnicore.errors import CNIError
from support.runtime_input import CONTAINERD_CNI_ARGS, PODMAN_CNI_ARGS
from support.paths import SUPPORT

SEED = [f"10.9.0.{i}" for i in range(20, 24)]


@pytest.fixture
def cni(tmp_path):
    """A CNI_PATH with the test plugins, a data dir, a log file, and a runner."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, func in (("test-ipam", "ipam_main"), ("test-main", "main_main")):
        exe = bindir / name
        exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {SUPPORT!r})\n"
                       f"from cniplugins import {func}\n{func}()\n")
        exe.chmod(0o755)
    return Runner(tmp_path, str(bindir))


class Runner:
    def __init__(self, tmp, bindir):
        self.tmp = tmp
        self.bindir = bindir
        self.data_dir = str(tmp / "data")
        self.log_file = str(tmp / "log" / "plugin.log")

    def conf(self, version="1.1.0", **extra):
        conf = {"cniVersion": version, "name": "testnet", "type": "test-main",
                "pluginLogFile": self.log_file,
                "ipam": {"type": "test-ipam", "dataDir": self.data_dir, "seedIps": SEED}}
        conf.update(extra)
        return conf

    def env(self, command, **overrides):
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": "c1",
               "CNI_NETNS": "/var/run/netns/nothing", "CNI_IFNAME": "eth0", "CNI_PATH": self.bindir,
               "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1"}
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, command, conf=None, plugin="test-main", stdin=None, **env):
        if stdin is None:
            stdin = json.dumps(self.conf() if conf is None else conf).encode()
        proc = subprocess.run([os.path.join(self.bindir, plugin)], input=stdin if isinstance(stdin, bytes) else None,
                              stdin=None if isinstance(stdin, bytes) else stdin,
                              env=self.env(command, **env), capture_output=True, timeout=60)
        out = proc.stdout.decode()
        parsed = json.loads(out) if out.strip() else None
        return proc.returncode, parsed, out, proc.stderr.decode()

    def state(self):
        path = os.path.join(self.data_dir, "testnet.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def assigned(self):
        doc = self.state() or {"enis": {}}
        return {ip: e for eni in doc["enis"].values() for ip, e in eni["ips"].items() if e["state"] == "assigned"}


def assert_error(rc, parsed, out, code, version="1.1.0"):
    assert rc != 0
    assert out.count("\n{") == 0 and json.loads(out) == parsed, "exactly one JSON object on stdout"
    assert set(parsed) <= {"cniVersion", "code", "msg", "details"}
    assert parsed["cniVersion"] == version and parsed["code"] == code and parsed["msg"], parsed
    assert "Traceback" not in out


# --- invocation ------------------------------------------------------------------------------------
def test_no_command_prints_about_and_changes_nothing(cni):
    rc, parsed, out, err = cni.run("", CNI_COMMAND=None)
    assert rc == 0 and out == ""
    assert "test-main" in err and "1.1.0" in err
    assert not os.path.exists(cni.data_dir)


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
@pytest.mark.parametrize("var", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
def test_missing_environment_is_code_4_naming_it(cni, command, var):
    rc, parsed, out, _ = cni.run(command, **{var: None})
    assert_error(rc, parsed, out, 4)
    assert var in parsed["msg"]
    assert cni.state() is None


def test_del_without_netns_succeeds_and_releases(cni):
    assert cni.run("ADD")[0] == 0
    assert len(cni.assigned()) == 1
    rc, parsed, out, _ = cni.run("DEL", CNI_NETNS="")
    assert (rc, out) == (0, "")
    assert cni.assigned() == {}
    assert cni.run("DEL", CNI_NETNS=None)[0] == 0


@pytest.mark.parametrize("cid", ["-abc", "a b", "a/b", "a;b", "ä", ".x"])
def test_bad_container_id_is_code_4(cni, cid):
    rc, parsed, out, _ = cni.run("ADD", CNI_CONTAINERID=cid)
    assert_error(rc, parsed, out, 4)
    assert cni.state() is None


def test_a_huge_bad_value_is_quoted_only_in_part(cni):
    """An error may quote the input, and the input may be huge (an argument can be 128 KiB, stdin
    megabytes): the runtime gets a short answer that says how much was left out."""
    rc, parsed, out, _ = cni.run("ADD", CNI_CONTAINERID="a;" + "b" * 100_000)
    assert_error(rc, parsed, out, 4)
    assert len(out) < 8_000 and parsed["details"].endswith("... (95906 more characters)")
    rc, parsed, out, _ = cni.run("ADD", conf=cni.conf(name="n;" + "x" * 2_000_000))
    assert_error(rc, parsed, out, 7)
    assert len(out) < 8_000 and "more characters)" in out
    assert cni.state() is None


def test_empty_container_id_is_code_3_when_validated():
    with pytest.raises(CNIError) as exc:
        skel.validate_container_id("")
    assert exc.value.code == 3


@pytest.mark.parametrize("ifname", ["a" * 16, ".", "..", "a/b", "a:b", "a b", "a\tb"])
def test_bad_ifname_is_code_4(cni, ifname):
    rc, parsed, out, _ = cni.run("ADD", CNI_IFNAME=ifname)
    assert_error(rc, parsed, out, 4)
    assert cni.state() is None


def test_ifname_of_15_bytes_is_accepted(cni):
    assert cni.run("ADD", CNI_IFNAME="a" * 15)[0] == 0


@pytest.mark.parametrize("conf,code", [
    ({"cniVersion": "1.1.0", "type": "test-main"}, 7),
    ({"cniVersion": "1.1.0", "name": "", "type": "test-main"}, 7),
    ({"cniVersion": "1.1.0", "name": "bad/name", "type": "test-main"}, 7),
    ({"cniVersion": "1.1.0", "name": 5, "type": "test-main"}, 7),
])
def test_bad_network_name_is_code_7(cni, conf, code):
    rc, parsed, out, _ = cni.run("ADD", conf=conf)
    assert_error(rc, parsed, out, code)


@pytest.mark.parametrize("stdin", [b"", b"{", b"not json", b"[1, 2]", b"\xff\xfe"])
def test_unparseable_stdin_is_code_6(cni, stdin):
    rc, parsed, out, _ = cni.run("ADD", stdin=stdin)
    assert_error(rc, parsed, out, 6)
    assert cni.state() is None


def test_unreadable_stdin_is_code_5(cni, tmp_path):
    fd = os.open(str(tmp_path / "write-only"), os.O_WRONLY | os.O_CREAT)  # read() fails with EBADF
    try:
        rc, parsed, out, _ = cni.run("ADD", stdin=fd)
    finally:
        os.close(fd)
    assert_error(rc, parsed, out, 5)


@pytest.mark.parametrize("command", ["FOO", "add", "Version"])
def test_unknown_command_exact_text(cni, command):
    rc, parsed, out, _ = cni.run(command)
    assert_error(rc, parsed, out, 4)
    assert parsed["msg"] == f"unknown CNI_COMMAND: {command}"


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_accept_empty_container_variables(cni, command):
    rc, parsed, out, _ = cni.run(command, conf=cni.conf(**{"cni.dev/valid-attachments": []}),
                                 CNI_CONTAINERID="", CNI_NETNS="", CNI_IFNAME="", CNI_ARGS="")
    assert (rc, out) == (0, "")


# --- versions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stdin,expect", [(b"", "1.1.0"), (b'{"cniVersion": "0.4.0"}', "0.4.0")])
def test_version_prints_supported_versions(cni, stdin, expect):
    rc, parsed, out, _ = cni.run("VERSION", stdin=stdin, CNI_CONTAINERID=None, CNI_NETNS=None,
                                 CNI_IFNAME=None, CNI_PATH=None)
    assert rc == 0
    assert parsed == {"cniVersion": expect, "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_config_without_version_is_0_1_0_and_refused(cni):
    conf = cni.conf()
    del conf["cniVersion"]
    rc, parsed, out, _ = cni.run("ADD", conf=conf)
    assert_error(rc, parsed, out, 1)
    assert "0.1.0" in parsed["details"]
    assert cni.state() is None


@pytest.mark.parametrize("version", ["0.2.0", "0.1.0", "1.2.0", "9.9.9"])
def test_unsupported_version_is_code_1_without_side_effects(cni, version):
    rc, parsed, out, _ = cni.run("ADD", conf=cni.conf(version))
    assert_error(rc, parsed, out, 1)
    assert cni.state() is None


@pytest.mark.parametrize("version", ["1", "x.y.z", "1.0"])
def test_malformed_version_is_a_decode_error(cni, version):
    rc, parsed, out, _ = cni.run("ADD", conf=cni.conf(version))
    assert_error(rc, parsed, out, 6)


@pytest.mark.parametrize("command,version", [("CHECK", "0.3.1"), ("CHECK", "0.3.0"), ("GC", "1.0.0"),
                                             ("STATUS", "0.4.0")])
def test_command_below_its_version_is_code_1(cni, command, version):
    rc, parsed, out, _ = cni.run(command, conf=cni.conf(version))
    assert_error(rc, parsed, out, 1, version=version)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_result_is_in_the_config_version(cni, version):
    rc, parsed, out, _ = cni.run("ADD", conf=cni.conf(version))
    assert rc == 0, out
    assert parsed["cniVersion"] == version
    ip = parsed["ips"][0]
    assert ip["address"] == "10.9.0.20/32" and ip["gateway"] == "10.9.0.1" and ip["interface"] == 0
    if version.startswith("0."):
        assert ip["version"] == "4"
    else:
        assert "version" not in ip
    assert parsed["interfaces"] == [{"name": "eth0", "mac": "02:00:00:00:00:aa",
                                     "sandbox": "/var/run/netns/nothing"}]


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_reads_prev_result_in_config_version(cni, version):
    rc, result, out, _ = cni.run("ADD", conf=cni.conf(version))
    assert rc == 0
    rc, parsed, out, _ = cni.run("CHECK", conf=cni.conf(version, prevResult=result))
    assert (rc, out) == (0, "")


def test_prev_result_without_ip_version_in_0_4_0_is_a_decode_error(cni):
    rc, result, out, _ = cni.run("ADD", conf=cni.conf("0.4.0"))
    del result["ips"][0]["version"]
    rc, parsed, out, _ = cni.run("CHECK", conf=cni.conf("0.4.0", prevResult=result))
    assert_error(rc, parsed, out, 6, version="0.4.0")


# --- ADD -----------------------------------------------------------------------------------------------
def test_stray_prints_never_reach_stdout(cni):
    rc, parsed, out, err = cni.run("ADD", TEST_MAIN_PRINT_JUNK="1")
    assert rc == 0 and json.loads(out) == parsed and "junk" not in out
    assert "junk a careless library printed" in err


def test_ipam_error_is_passed_through(cni):
    for i in range(len(SEED)):
        assert cni.run("ADD", CNI_CONTAINERID=f"c{i}")[0] == 0
    rc, parsed, out, _ = cni.run("ADD", CNI_CONTAINERID="one-too-many")
    assert_error(rc, parsed, out, 11)
    assert parsed["msg"] == "no free IP in the pool"


def test_missing_ipam_plugin_is_a_clear_error(cni):
    conf = cni.conf()
    conf["ipam"]["type"] = "no-such-ipam"
    rc, parsed, out, _ = cni.run("ADD", conf=conf)
    assert_error(rc, parsed, out, 7)
    assert "no-such-ipam" in parsed["msg"]


def test_ipam_result_is_abbreviated(cni):
    rc, parsed, out, _ = cni.run("ADD", plugin="test-ipam")
    assert rc == 0
    assert "interfaces" not in parsed and all("interface" not in ip for ip in parsed["ips"])


def test_failure_after_ipam_add_releases_the_ip(cni):
    rc, parsed, out, _ = cni.run("ADD", conf=cni.conf(failAfterIpam=True))
    assert_error(rc, parsed, out, 999)
    assert cni.state() is not None and cni.assigned() == {}


def test_second_add_without_del_is_an_error_and_works_after_del(cni):
    assert cni.run("ADD")[0] == 0
    rc, parsed, out, _ = cni.run("ADD")
    assert_error(rc, parsed, out, 105)
    assert len(cni.assigned()) == 1
    assert cni.run("DEL")[0] == 0
    assert cni.run("ADD")[0] == 0


def test_extra_stdin_keys_are_tolerated(cni):
    conf = cni.conf(capabilities={"portMappings": True}, args={"cni": {"x": 1}},
                    runtimeConfig={"portMappings": []}, **{"cni.dev/something": 1})
    rc, result, out, _ = cni.run("ADD", conf=conf)
    assert rc == 0, out
    assert cni.run("CHECK", conf=dict(conf, prevResult=result))[0] == 0
    assert cni.run("DEL", conf=dict(conf, prevResult=result))[0] == 0


# --- DEL -----------------------------------------------------------------------------------------------
def test_del_of_unknown_attachment_and_repeated_del_succeed(cni):
    assert cni.run("DEL", CNI_CONTAINERID="never-added")[:3] == (0, None, "")
    assert cni.run("ADD")[0] == 0
    for _ in range(2):
        assert cni.run("DEL")[:3] == (0, None, "")
    assert cni.assigned() == {}


# --- GC and STATUS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_releases_what_is_not_valid(cni, key):
    for cid in ("keep", "drop"):
        assert cni.run("ADD", CNI_CONTAINERID=cid)[0] == 0
    conf = cni.conf(**{key: [{"containerID": "keep", "ifname": "eth0"}]})
    assert cni.run("GC", conf=conf)[:3] == (0, None, "")
    assert [e["container_id"] for e in cni.assigned().values()] == ["keep"]


def test_status_reports_50_when_no_ip_can_be_had(cni):
    assert cni.run("STATUS")[0] == 0
    for i in range(len(SEED)):
        assert cni.run("ADD", CNI_CONTAINERID=f"c{i}")[0] == 0
    rc, parsed, out, _ = cni.run("STATUS")
    assert_error(rc, parsed, out, 50)


# --- errors --------------------------------------------------------------------------------------------
def test_unexpected_exception_is_code_999_with_traceback_only_in_the_log(cni):
    conf = cni.conf()
    conf["ipam"]["seedIps"] = ["not-an-ip"]
    rc, parsed, out, _ = cni.run("ADD", conf=conf)
    assert_error(rc, parsed, out, 999)
    assert "ValueError" in parsed["msg"]
    with open(cni.log_file) as f:
        lines = [json.loads(line) for line in f]
    assert any("Traceback" in line.get("traceback", "") for line in lines)


def test_log_lines_carry_the_invocation(cni):
    assert cni.run("ADD")[0] == 0
    with open(cni.log_file) as f:
        last = json.loads(f.readlines()[-1])
    assert {"time", "plugin", "command", "containerID", "ifname", "outcome", "duration_ms"} <= set(last)
    assert (last["plugin"], last["command"], last["containerID"], last["outcome"]) == ("test-main", "ADD", "c1", "ok")
    assert oct(os.stat(cni.log_file).st_mode & 0o777) == "0o600"


# --- CNI_ARGS ------------------------------------------------------------------------------------------
# What the runtimes send, exactly: tests/support/runtime_input.py (with the source files that make it).


@pytest.mark.parametrize("args", CONTAINERD_CNI_ARGS + PODMAN_CNI_ARGS + [
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc123",
    "K8S_POD_NAMESPACE=default",
    "IgnoreUnknown=1;SOMETHING_NEW=x;K8S_POD_NAMESPACE=default",
    "IgnoreUnknown=TRUE;FOO=1", "FOO=1;IgnoreUnknown=1",
    # opaque values: what the old DNS-label checks refused, and what no check should look at
    "K8S_POD_NAMESPACE=../etc;K8S_POD_NAME=Web_1", "K8S_POD_INFRA_CONTAINER_ID=-x;K8S_POD_UID=$(id)",
    "K8S_POD_NAMESPACE=;K8S_POD_NAME=", "K8S_POD_NAME=a b\tc\nd\x1b[31m`id`|&",
    "",
])
def test_runtime_cni_args_are_accepted_and_recorded_as_sent(cni, args):
    rc, _, out, _ = cni.run("ADD", CNI_ARGS=args)
    assert rc == 0, out
    sent = dict(pair.split("=") for pair in args.split(";") if pair)
    [entry] = cni.assigned().values()
    assert (entry["pod_namespace"], entry["pod_name"]) == (sent.get("K8S_POD_NAMESPACE", ""), sent.get("K8S_POD_NAME", ""))
    assert cni.run("DEL", CNI_ARGS=args)[:3] == (0, None, "")
    assert cni.assigned() == {}


@pytest.mark.parametrize("args", [
    "SOMETHING_NEW=x", "IgnoreUnknown=0;X=y", "IgnoreUnknown=1;IgnoreUnknown=0;X=y", "K8S_POD_NAMESPACE",
    "K8S_POD_NAME=a=b", "K8S_POD_NAMESPACE=default;", ";", "=", "IgnoreUnknown=maybe", "IgnoreUnknown=1;;",
    "k8s_pod_name=web-1",  # keys are case-sensitive, as Go's FieldByName
])
def test_cni_args_that_load_args_refuses_fail_add_with_code_4_and_change_nothing(cni, args):
    rc, parsed, out, _ = cni.run("ADD", CNI_ARGS=args)
    assert_error(rc, parsed, out, 4)
    assert parsed["msg"].startswith("CNI_ARGS: ")
    assert cni.state() is None


@pytest.mark.parametrize("args", ["K8S_POD_NAME=a=b", "SOMETHING_NEW=x", "IgnoreUnknown=maybe;;"])
def test_cni_args_that_load_args_refuses_never_fail_del_check_or_gc(cni, args):
    rc, result, out, _ = cni.run("ADD")
    assert rc == 0, out
    assert cni.run("CHECK", conf=cni.conf(prevResult=result), CNI_ARGS=args)[:3] == (0, None, "")
    assert cni.run("GC", conf=cni.conf(**{"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}),
                   CNI_ARGS=args)[:3] == (0, None, "")
    assert len(cni.assigned()) == 1
    assert cni.run("DEL", CNI_ARGS=args)[:3] == (0, None, "")
    assert cni.assigned() == {}
    with open(cni.log_file) as f:
        warned = [json.loads(line) for line in f if "types.LoadArgs" in line]
    assert {line["command"] for line in warned} == {"CHECK", "GC", "DEL"} and all(line["problems"] for line in warned)


def test_later_pairs_replace_earlier_ones_as_in_load_args():
    assert skel.parse_cni_args("K8S_POD_NAME=a;K8S_POD_NAME=b;IgnoreUnknown=1;IgnoreUnknown=0") == (
        {"K8S_POD_NAME": "b"}, [])
    values, problems = skel.parse_cni_args("IgnoreUnknown=1;X=1;IgnoreUnknown=false")
    assert values == {} and problems == ["unknown args ['X=1'] (IgnoreUnknown=1 lets them through)"]


def test_pod_names_reach_the_log_escaped_and_the_store_as_sent(cni):
    """Control characters, a line break, quotes and bytes that are not UTF-8 in the pod's name: each log
    line stays one line of ASCII JSON, and reads back as what the runtime sent."""
    name = b'web\n{"level":"ERROR"}\x1b[31m\xff\xfe\xe9t\xc3\xa9'
    args = b"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns\r\x00x;K8S_POD_NAME=" + name
    args = args.replace(b"\x00", b"")  # an environment variable cannot hold NUL
    rc, _, out, _ = cni.run("ADD", CNI_ARGS=args)
    assert rc == 0, out
    with open(cni.log_file, "rb") as f:
        raw = f.read()
    assert raw.isascii() and raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert lines and all(line["podName"] == os.fsdecode(name) and line["podNamespace"] == "ns\rx" for line in lines)
    assert not any(line.get("level") == "ERROR" for line in lines)
    [entry] = cni.assigned().values()
    assert entry["pod_name"] == os.fsdecode(name)
    assert cni.run("DEL", CNI_ARGS=args)[0] == 0 and cni.assigned() == {}


# The name checks are written without `re` (start-up cost); they must answer as the patterns they stand for.
_NAME_ALPHABET = "aZz09-_.\n\t /:AéİK١²\x00"
_names = st.text(alphabet=_NAME_ALPHABET, max_size=70) | st.sampled_from(
    ["", "a", "-a", "a-", "a" * 63, "a" * 64, "c1\n", "1" * 65, "web-1", "kube-system", "0", "a..b", ".a", "a."])


@settings(max_examples=3000, deadline=None)
@given(_names)
def test_name_checks_answer_as_their_regular_expressions(text):
    import re
    for check in (skel.CONTAINER_ID_RE, skel.NETWORK_NAME_RE):
        assert bool(check.match(text)) == bool(re.match(check.pattern, text)), (check, text)


# --- capability arguments as Go decodes them ------------------------------------------------------------
@pytest.mark.parametrize("obj, value", [
    ({"hostPort": 1}, 1), ({"HostPort": 1}, 1), ({"HOSTPORT": 1}, 1), ({"hostport": 1}, 1),
    ({"hoſtPort": 1}, 1), ({"hostPort": 1, "HostPort": 2}, 2), ({"HostPort": 2, "hostPort": 1}, 1),
    ({"hostPort": 1, "other": 2}, 1), ({"host_port": 1}, None), ({"hostPort ": 1}, None), ({}, None),
    ({"hostPorté": 1}, None), ({"hostPort": 1, "HostPort": None}, None),
])
def test_go_field_matches_keys_as_encoding_json_does(obj, value):
    assert skel.go_field(obj, "hostPort") == value


def test_go_field_folds_kelvin_sign_and_long_s_only():
    assert skel.go_field({"\u212aey": 1}, "key") == 1  # KELVIN SIGN folds to k in Go (unicode.SimpleFold)
    assert skel.go_field({"ıd": 1}, "id") is None  # dotless i does not fold to i in Go
    assert skel.go_field({"İD": 1}, "id") is None
