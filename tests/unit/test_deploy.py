"""deploy/: the manifests validate offline against the Kubernetes schemas (strict: unknown fields fail),
the DaemonSet has the properties issue 8 asks for, the IAM policy lists exactly the EC2 actions the
code calls, and the example ConfigMap names only known settings, each at its default."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cnicore import ec2, settings
from support import paths

ROOT = Path(paths.ROOT)
DEPLOY = ROOT / "deploy"
# The oldest Kubernetes release we claim to run on, and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
EXPECTED_HOST_PATHS = {"/opt/cni/bin", "/etc/cni/net.d", "/var/run/aws-vpc-cni", "/var/log/aws-routed-eni",
                       "/run/xtables.lock"}
CONFIGMAP = ("kube-system", "aws-vpc-cni")


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        with open(path) as f:
            docs.extend((path.name, d) for d in yaml.safe_load_all(f) if d is not None)
    return docs


DOCS = _documents()


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def daemonset() -> dict:
    ds = _one("DaemonSet", "aws-node")
    assert ds["metadata"]["namespace"] == "kube-system"
    return ds


@pytest.fixture(scope="module")
def pod(daemonset) -> dict:
    return daemonset["spec"]["template"]["spec"]


def _container(pod: dict, name: str, init: bool = False) -> dict:
    found = [c for c in pod["initContainers" if init else "containers"] if c["name"] == name]
    assert len(found) == 1, f"no {'init ' if init else ''}container {name}"
    return found[0]


def _mount_for(pod: dict, container: dict, host_path: str) -> str:
    """Where `container` sees the host folder `host_path`."""
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    paths = [m["mountPath"] for m in container.get("volumeMounts", []) if volumes.get(m["name"]) == host_path]
    assert len(paths) == 1, f"{container['name']} must mount the host's {host_path} once"
    return paths[0]


# --- schemas ------------------------------------------------------------------------------------

def test_deploy_holds_the_expected_objects():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in DOCS)
    assert kinds == sorted([("ServiceAccount", "aws-node"), ("ClusterRole", "aws-node"),
                            ("ClusterRoleBinding", "aws-node"), ("DaemonSet", "aws-node"),
                            ("ConfigMap", "aws-vpc-cni")])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_manifest_validates_strictly(doc, version):
    problem = None
    try:
        kubernetes_validate.validate(doc[1], version, strict=True)
    except kubernetes_validate.ValidationError as e:  # its str() prints the whole schema: say less
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        problem = f"{doc[0]}: {doc[1]['kind']} at {where}: {e.message} (Kubernetes {version})"
    if problem:
        pytest.fail(problem, pytrace=False)


def test_strict_validation_rejects_an_unknown_field(daemonset):
    # Proof that the check above can fail: a misspelt field is refused, not ignored.
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# --- the DaemonSet ------------------------------------------------------------------------------

def test_runs_on_every_node_first(daemonset, pod):
    assert {"operator": "Exists"} in pod["tolerations"], "must tolerate every taint (operator: Exists, no key)"
    assert pod["hostNetwork"] is True
    # Cluster DNS runs in pods that need this agent first: resolving through it would deadlock a new node.
    assert pod.get("dnsPolicy", "ClusterFirst") in ("ClusterFirst", "Default")
    assert pod["priorityClassName"] == "system-node-critical"
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    unavailable = str(strategy["rollingUpdate"]["maxUnavailable"])
    assert unavailable not in ("0", "0%", "100%"), "maxUnavailable must let a rollout progress, gradually"


def test_least_privilege(pod):
    main = _container(pod, "aws-node")
    for c in pod["initContainers"] + pod["containers"]:
        sc = c.get("securityContext", {})
        assert not sc.get("privileged"), f"{c['name']} must not be privileged"
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{c['name']} must drop all capabilities"
        assert set(sc["capabilities"].get("add", [])) <= {"NET_ADMIN", "NET_RAW"}, c["name"]
        assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, f"{c['name']} needs resource requests"
    assert set(main["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    volumes = pod["volumes"]
    assert all(set(v) == {"name", "hostPath"} for v in volumes), "only the hostPath volumes it needs"
    assert {v["hostPath"]["path"] for v in volumes} == EXPECTED_HOST_PATHS


def test_settings_come_from_the_configmap(pod):
    cm = _one("ConfigMap", CONFIGMAP[1])
    assert cm["metadata"]["namespace"] == CONFIGMAP[0]
    for c in pod["initContainers"] + pod["containers"]:
        assert {"configMapRef": {"name": CONFIGMAP[1], "optional": True}} in c.get("envFrom", []), c["name"]
        # Explicit env would override the ConfigMap; only the installer's target folder may be set.
        assert {e["name"] for e in c.get("env", [])} <= {"CNI_BIN_DIR"}, c["name"]


def test_init_step_installs_only_the_bundle(pod):
    (init,) = pod["initContainers"]
    env = {e["name"]: e.get("value") for e in init.get("env", [])}
    assert env["CNI_BIN_DIR"] == _mount_for(pod, init, "/opt/cni/bin")
    assert init["command"] + init.get("args", []) == ["/app/build/install.sh"]
    assert init["image"] == _container(pod, "aws-node")["image"]
    # the conflist is the agent's to write, once its pool can serve: the init step cannot even see the folder
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert "/etc/cni/net.d" not in {volumes.get(m["name"]) for m in init.get("volumeMounts", [])}


def test_agent_runs_writes_the_conflist_once_ready_and_is_probed(pod):
    main = _container(pod, "aws-node")
    assert main["command"] == ["aws-vpc-cni-agent", "run", "--conf-dir", _mount_for(pod, main, "/etc/cni/net.d")]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["exec"]["command"][:2] == ["aws-vpc-cni-agent", "status"], probe
    assert main["readinessProbe"]["exec"]["command"] == ["aws-vpc-cni-agent", "status", "--ready"]
    assert {"containerPort": 61678, "name": "metrics"} in main["ports"]  # as upstream's master manifest
    # The plugins find the agent and the store at the data folder the conflist names: the container
    # must see it at the same path as the host.
    data_dir = settings.SETTINGS["AWS_VPC_CNI_DATA_DIR"].default
    assert _mount_for(pod, main, data_dir) == data_dir
    assert _mount_for(pod, main, "/run/xtables.lock") == "/run/xtables.lock"


# --- RBAC ---------------------------------------------------------------------------------------

def test_rbac_is_minimal(pod):
    sa = _one("ServiceAccount", "aws-node")
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    binding = _one("ClusterRoleBinding", "aws-node")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "aws-node"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "aws-node", "namespace": "kube-system"}]
    # The agent reads nothing from the API server today; any rule added later must stay read-only,
    # named, and away from secrets.
    for rule in _one("ClusterRole", "aws-node")["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert "*" not in rule.get("resources", []) + rule.get("apiGroups", []), rule
        assert "secrets" not in rule.get("resources", []), rule


# --- IAM ----------------------------------------------------------------------------------------

def _ec2_actions_called() -> set[str]:
    """The first argument of every `_call(...)` in cnicore (which must be a string literal), and
    CreateTags where a call tags what it creates (TagSpecifications: EC2 authorises the tagging
    as ec2:CreateTags with ec2:CreateAction set)."""
    actions = set()
    for source in sorted((ROOT / "cnicore").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name != "_call":
                continue
            first = node.args[0] if node.args else None
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"{source.relative_to(ROOT)}:{node.lineno}: _call's action must be a string literal, "
                "so this test can list it in deploy/iam-policy.json")
            actions.add(first.value)
            if any(keyword.arg == "TagSpecifications" for keyword in node.keywords):
                actions.add("CreateTags")
    return actions


def _policy() -> dict:
    return json.loads((DEPLOY / "iam-policy.json").read_text())


def test_iam_policy_lists_exactly_the_ec2_actions_the_code_calls():
    called = _ec2_actions_called()
    assert len(called) >= 5, "the scan found too few _call()s: has cnicore/ec2.py changed shape?"
    policy = _policy()
    assert policy["Version"] == "2012-10-17"
    granted = set()
    for stmt in policy["Statement"]:
        assert stmt["Effect"] == "Allow" and "NotAction" not in stmt and "NotResource" not in stmt, stmt
        actions = [stmt["Action"]] if isinstance(stmt["Action"], str) else stmt["Action"]
        for action in actions:
            assert re.fullmatch(r"ec2:[A-Za-z]+", action), f"only plain ec2 actions, no wildcards: {action}"
            granted.add(action.removeprefix("ec2:"))
    assert granted - called == set(), "the policy grants actions the code never calls"
    assert called - granted == set(), "the code calls EC2 actions deploy/iam-policy.json does not grant"


def test_iam_policy_tag_conditions_use_our_tags():
    ours = {ec2.TAG_INSTANCE_ID, ec2.TAG_CREATED_AT, ec2.TAG_CLUSTER_NAME}
    used = set()
    for stmt in _policy()["Statement"]:
        for operator, conditions in stmt.get("Condition", {}).items():
            for key, value in conditions.items():
                if key == "aws:TagKeys":
                    used.update([value] if isinstance(value, str) else value)
                elif key.startswith(("aws:RequestTag/", "aws:ResourceTag/")):
                    used.add(key.split("/", 1)[1])
        if stmt["Action"] in ("ec2:CreateTags", ["ec2:CreateTags"]):
            assert stmt["Resource"] == "arn:aws:ec2:*:*:network-interface/*", "tags only on ENIs"
            assert "aws:TagKeys" in stmt["Condition"]["ForAllValues:StringEquals"], "only our tag keys"
        if "ec2:DeleteNetworkInterface" in stmt["Action"]:
            assert stmt["Condition"]["Null"] == {f"aws:ResourceTag/{ec2.TAG_INSTANCE_ID}": "false"}, \
                "delete only the ENIs this CNI created"
    assert used == ours, "the policy's tag conditions must name exactly the tags cnicore/ec2.py writes"


# --- the example ConfigMap ----------------------------------------------------------------------

def test_configmap_names_known_settings_at_their_defaults():
    data = _one("ConfigMap", CONFIGMAP[1])["data"]
    unknown = set(data) - set(settings.SETTINGS)
    assert not unknown, f"not settings known to cnicore/settings.py: {sorted(unknown)}"
    assert all(isinstance(v, str) for v in data.values())
    # Every setting is shown, set or commented out, except the data folder, which the DaemonSet's
    # hostPath mount fixes.
    text = (DEPLOY / "aws-vpc-cni-config.yaml").read_text()
    commented = set(re.findall(r"^\s*#\s*([A-Z][A-Z0-9_]+):", text, re.M))
    assert commented <= set(settings.SETTINGS) and not commented & set(data)
    missing = set(settings.SETTINGS) - set(data) - commented - {"AWS_VPC_CNI_DATA_DIR"}
    assert not missing, f"document these settings in deploy/aws-vpc-cni-config.yaml: {sorted(missing)}"
    assert "AWS_VPC_CNI_DATA_DIR" not in data
    # As shipped the example changes nothing: every value reads as the default, without a warning.
    warnings = []
    assert settings.from_env(data, warn=warnings.append) == settings.from_env({}) and not warnings


# --- upstream's manifests (issue 15: applying ours over an upstream aws-node works in place) ------

UPSTREAM = {  # tests/data/upstream/: each file's header names the commit it was taken from
    "release-1.1": Path(paths.DATA) / "upstream" / "aws-k8s-cni-release-1.1.yaml",
    "master": Path(paths.DATA) / "upstream" / "aws-k8s-cni-master.yaml",
}
# Upstream variables for features this project does not have (the agent ignores them; they are
# listed so that a new upstream variable, or one we start reading, fails the diff below).
NOT_HERE = {
    "ADDITIONAL_ENI_TAGS": "extra ENI tags",
    "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "custom networking (ENIConfig)",
    "DISABLE_INTROSPECTION": "introspection endpoint switch",
    "DISABLE_METRICS": "metrics switch",
    "DISABLE_NETWORK_RESOURCE_PROVISIONING": "IMDS-only mode",
    "DISABLE_TCP_EARLY_DEMUX": "init container sysctl for pod ENIs",
    "ENABLE_IPv4": "IPv6 clusters", "ENABLE_IPv6": "IPv6 clusters",
    "ENABLE_POD_ENI": "security groups for pods",
    "MY_NODE_NAME": "the Kubernetes API (the agent reads nothing from it)",
    "MY_POD_NAME": "the Kubernetes API (the agent reads nothing from it)",
}
VERSION_LABEL = "app.kubernetes.io/version"


def _upstream(which: str) -> list[dict]:
    with open(UPSTREAM[which]) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _upstream_env(which: str) -> dict[str, str | None]:
    (ds,) = [d for d in _upstream(which) if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    return {e["name"]: e.get("value") for c in pod.get("initContainers", []) + pod["containers"] for e in c.get("env", [])}


@pytest.mark.parametrize("which", UPSTREAM)
def test_daemonset_selector_names_and_labels_are_upstreams(which, daemonset, pod):
    objects = {(d["kind"], d["metadata"]["name"]): d for d in _upstream(which)}
    theirs = objects[("DaemonSet", "aws-node")]
    assert daemonset["metadata"]["namespace"] == theirs["metadata"]["namespace"] == "kube-system"
    assert daemonset["spec"]["selector"] == theirs["spec"]["selector"] == {"matchLabels": {"k8s-app": "aws-node"}}
    ours_pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert theirs["spec"]["template"]["metadata"]["labels"].items() <= ours_pod_labels.items()
    assert pod["serviceAccountName"] == theirs["spec"]["template"]["spec"]["serviceAccountName"] == "aws-node"
    assert "aws-node" in [c["name"] for c in pod["containers"]]  # upstream's container name (kubectl logs -c)
    for (kind, name), obj in objects.items():
        if kind == "ConfigMap":
            continue  # upstream's amazon-vpc-cni holds chart switches; ours is the seed's aws-vpc-cni
        mine = _one(kind, name)
        assert mine["metadata"].get("namespace") == obj["metadata"].get("namespace"), (kind, name)
        labels = obj["metadata"].get("labels", {})
        assert set(labels) <= set(mine["metadata"]["labels"]), (kind, name)
        assert {k: v for k, v in labels.items() if k != VERSION_LABEL}.items() <= mine["metadata"]["labels"].items()
    sa = objects[("ServiceAccount", "aws-node")]["metadata"]
    assert (sa["name"], sa["namespace"]) == ("aws-node", "kube-system")
    binding = objects[("ClusterRoleBinding", "aws-node")]
    assert _one("ClusterRoleBinding", "aws-node")["subjects"] == binding["subjects"]
    assert _one("ClusterRoleBinding", "aws-node")["roleRef"] == binding["roleRef"]


@pytest.mark.parametrize("which", UPSTREAM)
def test_env_names_are_upstreams(which, pod):
    theirs = _upstream_env(which)
    unknown = set(theirs) - set(settings.SETTINGS) - set(NOT_HERE)
    assert not unknown, f"upstream variables neither read here nor listed in NOT_HERE: {sorted(unknown)}"
    # Every name the manifests give the agent is a setting it reads, spelt as upstream spells it.
    data = _one("ConfigMap", CONFIGMAP[1])["data"]
    ours = set(data) | {e["name"] for c in pod["initContainers"] + pod["containers"] for e in c.get("env", [])}
    assert ours - {"CNI_BIN_DIR"} <= set(settings.SETTINGS)
    assert set(theirs) & set(settings.SETTINGS) <= set(data), "upstream's settings are all in our ConfigMap"


def test_not_here_lists_only_upstream_variables_we_do_not_read():
    everywhere = set(_upstream_env("release-1.1")) | set(_upstream_env("master"))
    assert set(NOT_HERE) <= everywhere and not set(NOT_HERE) & set(settings.SETTINGS)


@pytest.mark.parametrize("which", UPSTREAM)
def test_upstreams_manifest_values_mean_our_defaults(which):
    """Upstream's DaemonSet env, moved into our ConfigMap as a user would, changes nothing but the
    agent's log path (upstream writes it through the container's /host mount of the same host file)."""
    theirs = {k: v for k, v in _upstream_env(which).items() if k in settings.SETTINGS and v is not None}
    warnings = []
    read = settings.by_name(settings.from_env(theirs, warn=warnings.append))
    default = settings.by_name(settings.from_env({}))
    assert not warnings
    assert {k: v for k, v in read.items() if read[k] != default[k]} == (
        {"AWS_VPC_K8S_CNI_LOG_FILE": "/host/var/log/aws-routed-eni/ipamd.log"} if "AWS_VPC_K8S_CNI_LOG_FILE" in theirs else {})
