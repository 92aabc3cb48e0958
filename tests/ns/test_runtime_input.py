"""Input as the real runtimes send it (issue 14), through the whole chain of real plugins in a scratch
node namespace (tests/support/hostile_world.py): aws-vpc-bridge (with aws-eni-ipam), aws-snat, portmap-compat.

1. containerd's and podman's exact CNI_ARGS (tests/support/runtime_input.py) and containerd's capitalised
   portMappings: ADD gives the pod its IP and host port rules; containerd's two DELs (StopPodSandbox
   with the netns and prevResult, RemovePodSandbox with neither) and podman's one leave nothing.
2. Any K8S_* values (hypothesis): any text or bytes but CNI_ARGS' own separators, either name without
   the other, empty, absent, repeated, in any order. ADD succeeds, with the host veth named by the hash
   upstream uses; CNI_ARGS that types.LoadArgs refuses is one CNI error (code 4). Either way every DEL
   exits 0 and leaves nothing: store reservation, links, addresses, routes, rules, iptables.
3. Pod names made of path, shell, iptables and interface-name syntax reach none of them raw.
"""

from __future__ import annotations

import glob
import hashlib
import os
import uuid

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from support.hostile_world import CHAIN, PLUGINS, World, check_error
from support.runtime_input import CONTAINERD_CNI_ARGS, CONTAINERD_PORT_MAPPING, PODMAN_CNI_ARGS

pytestmark = pytest.mark.skipif(not set(CHAIN) <= set(PLUGINS), reason="the plugins are not installed in the venv")

CID = "ctr1"
K8S_KEYS = ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")


@pytest.fixture
def world(make_netns, tmp_path):
    return World(make_netns, tmp_path)


def expected_host_veth(args: bytes, container_id: str = CID, ifname: str = "eth0") -> str:
    """Upstream's name, sha1("<namespace>.<pod name>"), when both were sent non-empty as UTF-8 text;
    else the hash of "<containerID>/<ifname>". The last of repeated pairs counts."""
    sent = dict(pair.split(b"=") for pair in args.split(b";") if pair)
    namespace, name = sent.get(b"K8S_POD_NAMESPACE", b""), sent.get(b"K8S_POD_NAME", b"")
    try:
        key = f"{namespace.decode()}.{name.decode()}" if namespace and name else f"{container_id}/{ifname}"
    except UnicodeDecodeError:
        key = f"{container_id}/{ifname}"
    return "eni" + hashlib.sha1(key.encode()).hexdigest()[:11]


class Pod:
    """One pod's life on the world's node: ADD through the chain, then the runtime's DELs."""

    def __init__(self, world: World, cni_args, port_mappings: list | None):
        self.world, self.port_mappings = world, port_mappings
        self.env = world.env("ADD", CNI_CONTAINERID=CID, CNI_ARGS=cni_args)
        self.before = world.snapshot(data_dir=False)
        self.result, self.failed = world.chain_add(self.env, port_mappings)

    def delete_as_containerd(self) -> None:
        """StopPodSandbox (netns and prevResult), then RemovePodSandbox (neither): each DEL exits 0."""
        for env, prev in ((self.env, self.result), ({**self.env, "CNI_NETNS": ""}, None)):
            for outcome in self.world.chain_del(env, prev, self.port_mappings):
                assert outcome.rc == 0 and outcome.stdout.strip() == b"", f"DEL must succeed: {outcome!r}"

    def assert_gone(self) -> None:
        assert self.world.held_ips() == {}, "the reservation outlived DEL"
        self.world.assert_unchanged(before=self.before, data_dir=False)  # links, addresses, rules, routes, iptables of both namespaces


def assert_log_is_ascii_json(world: World) -> None:
    import json
    with open(world.log_file, "rb") as f:
        raw = f.read()
    assert raw.isascii(), "a log line carries raw bytes of an outside value"
    for line in raw.decode().splitlines():
        json.loads(line)


# ---------------------------------------------------------------------------------------------------
# 1. The runtimes' exact input


@pytest.mark.parametrize("cni_args", CONTAINERD_CNI_ARGS + PODMAN_CNI_ARGS)
def test_runtime_cni_args_and_containerd_port_mappings_through_the_chain(world, cni_args):
    pod = Pod(world, cni_args, [CONTAINERD_PORT_MAPPING])
    assert pod.failed is None, f"ADD failed: {pod.failed!r}"
    host_veth = pod.result["interfaces"][0]["name"]
    assert host_veth == expected_host_veth(cni_args.encode())
    assert [ip["address"] for ip in pod.result["ips"]] == ["10.0.1.11/32"]
    node = world.sh(world.ns, "ip -o link show; iptables-nft-save -t nat")
    assert f" {host_veth}@" in node
    assert "--dport 18080 -j DNAT --to-destination 10.0.1.11:8080" in node  # containerd's HostPort/ContainerPort
    assert world.held_ips() == {(CID, "eth0"): "10.0.1.11"}
    pod.delete_as_containerd()
    pod.assert_gone()


def test_podman_and_containerd_pod_names_do_not_collide(world):
    """podman's pod name alone is hashed with the container ID (two containers may share a name over
    time, never an ID); containerd's namespace and name as upstream hashes them."""
    podman, containerd = PODMAN_CNI_ARGS[0].encode(), CONTAINERD_CNI_ARGS[0].encode()
    assert expected_host_veth(podman) == "eni" + hashlib.sha1(f"{CID}/eth0".encode()).hexdigest()[:11]
    assert expected_host_veth(containerd) == "eni" + hashlib.sha1(b"default.web-7d4b9c8f5-x2x7q").hexdigest()[:11]
    for cni_args in (podman, containerd):
        pod = Pod(world, cni_args, None)
        assert pod.failed is None and pod.result["interfaces"][0]["name"] == expected_host_veth(cni_args), pod.failed
        pod.delete_as_containerd()
        pod.assert_gone()


# ---------------------------------------------------------------------------------------------------
# 2. Any K8S_* values

SEPARATORS = b";=\x00"  # what CNI_ARGS cannot carry in a value (and an environment variable cannot hold NUL)
k8s_values = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters=";=\x00", blacklist_categories=("Cs",)), max_size=40)
    .map(str.encode),
    st.binary(max_size=40).filter(lambda b: not any(c in SEPARATORS for c in b)),
    st.sampled_from([b"", b"default", b"kube-system", b"eager_hamilton", b"web-1", b"../../etc", b"$(id)",
                     b'"', b"-j ACCEPT", b"eth0", b"a" * 300, b"\xff\xfe", b"\x1b[31m", b" ", b"\n"]),
)
pairs = st.lists(st.tuples(st.sampled_from(K8S_KEYS).map(str.encode), k8s_values), max_size=6)
runtime_pairs = st.lists(st.sampled_from([b"MAC=02:42:ac:11:00:02", b"IP=10.88.0.5", b"K8S_ANNOT=x"]), max_size=2)
# What types.LoadArgs refuses: a value with '=', an empty pair, a bad IgnoreUnknown, an unknown key without it.
broken = st.sampled_from([b"K8S_POD_NAME=a=b", b"", b"IgnoreUnknown=maybe", b"K8S_POD_NAME"])


@st.composite
def cni_args(draw):
    """(CNI_ARGS as bytes, whether LoadArgs accepts it)."""
    items = [k + b"=" + v for k, v in draw(pairs, "K8S pairs")]
    unknown = draw(runtime_pairs, "other pairs")
    ignore_unknown = bool(unknown) or draw(st.booleans(), "IgnoreUnknown=1")
    items += unknown
    if ignore_unknown:
        items.insert(draw(st.integers(0, len(items)), "IgnoreUnknown at"), b"IgnoreUnknown=1")
    bad = draw(st.one_of(st.none(), broken), "broken pair")
    if bad is not None:
        items.insert(draw(st.integers(0, len(items)), "broken at"), bad)
    return b";".join(items), bad is None


@settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_any_k8s_values_add_succeeds_or_is_one_error_and_del_leaves_nothing(world, data):
    args, loadable = data.draw(cni_args(), "CNI_ARGS")
    mappings = data.draw(st.sampled_from([None, [CONTAINERD_PORT_MAPPING]]), "portMappings")
    pod = Pod(world, args, mappings)
    if loadable:
        assert pod.failed is None, f"ADD of opaque K8S_* values failed: {pod.failed!r}"
        assert pod.result["interfaces"][0]["name"] == expected_host_veth(args)
        assert world.held_ips() == {(CID, "eth0"): "10.0.1.11"}
    else:
        assert pod.failed is not None, f"CNI_ARGS that LoadArgs refuses was accepted: {args!r}"
        err = check_error(pod.failed)
        assert err["code"] == 4 and err["msg"].startswith("CNI_ARGS: "), pod.failed
        world.assert_unchanged(pod.failed, before=pod.before, data_dir=False)
    event("ADD ok" if pod.failed is None else "ADD refused")
    pod.delete_as_containerd()
    pod.assert_gone()
    assert_log_is_ascii_json(world)


# ---------------------------------------------------------------------------------------------------
# 3. Nothing from outside reaches a path, a shell, an iptables comment or an interface name raw


def test_hostile_pod_names_reach_no_path_shell_comment_or_interface_name(world):
    tag = uuid.uuid4().hex[:12]
    canary = f"/tmp/hz-{tag}-ran"
    values = [f"../../hz-{tag}", f"/tmp/hz-{tag}", f"$(touch {canary})", f"`touch {canary}`", f"a|touch {canary}",
              f'hz-{tag}" -j ACCEPT -m comment --comment "x', f"hz-{tag}\n-A INPUT -j DROP", f"eth0-{tag}",
              f"hz-{tag}\x1b[31m", f"hz-{tag}%s%n{{{{.}}}}"]
    problems = []
    for n, value in enumerate(values):
        key = K8S_KEYS[n % len(K8S_KEYS)]
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=hz-{tag};{key}={value}"
        pod = Pod(world, args, [CONTAINERD_PORT_MAPPING])
        if pod.failed is not None:
            problems.append(f"[{key}={value!r}] ADD failed: {pod.failed!r}")
            continue
        state = world.snapshot()  # links, iptables (comments too), rules, routes, data dir file names
        if tag in state:
            problems.append(f"[{key}={value!r}] reached the node raw:\n" +
                            "\n".join(line for line in state.splitlines() if tag in line))
        pod.delete_as_containerd()
        pod.assert_gone()
    found = [p for place in ("/", "/tmp", "/etc", "/var/run", world.tmp, os.path.dirname(world.tmp))
             for p in glob.glob(os.path.join(glob.escape(place), "*")) if tag in os.path.basename(p)]
    found += [os.path.join(d, f) for d, dirs, files in os.walk(world.tmp) for f in dirs + files if tag in f]
    assert not problems and not found, "\n\n".join(problems + [f"created: {p}" for p in found])
    assert_log_is_ascii_json(world)
