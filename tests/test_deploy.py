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

ROOT = Path(__file__).resolve().parent.parent
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


def test_init_step_installs_the_bundle_then_the_conflist(pod):
    (init,) = pod["initContainers"]
    env = {e["name"]: e.get("value") for e in init.get("env", [])}
    assert env["CNI_BIN_DIR"] == _mount_for(pod, init, "/opt/cni/bin")
    script = " ".join(init["command"] + init.get("args", []))
    install = script.find("/app/build/install.sh")
    conflist = script.find(f"aws-vpc-cni-agent write-conflist {_mount_for(pod, init, '/etc/cni/net.d')}")
    assert install >= 0 and conflist >= 0, script
    assert install < conflist, "binaries must be in place before the runtime can see the conflist"
    assert init["image"] == _container(pod, "aws-node")["image"]


def test_agent_runs_and_is_probed(pod):
    main = _container(pod, "aws-node")
    assert main["command"] == ["aws-vpc-cni-agent", "run"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["exec"]["command"][:2] == ["aws-vpc-cni-agent", "status"], probe
    # The plugins find the agent and the store at the data folder the conflist names: the container
    # must see it at the same path as the host.
    data_dir = settings.SETTINGS["AWS_VPC_CNI_DATA_DIR"].default
    assert _mount_for(pod, main, data_dir) == data_dir
    assert _mount_for(pod, main, "/run/xtables.lock") == "/run/xtables.lock"


def test_image_layout_matches_the_dockerfile(pod):
    text = (DEPLOY / "Dockerfile").read_text()
    copies = dict(re.findall(r"^COPY\s+(\S+)\s+(\S+)\s*$", text, re.M))
    assert copies["dist/aws-vpc-cni/"].rstrip("/") == "/app/dist/aws-vpc-cni"
    assert copies["build/install.sh"] == "/app/build/install.sh"
    assert re.search(r'^ENTRYPOINT \["aws-vpc-cni-agent"\]$', text, re.M)
    assert re.search(r"^FROM debian:bookworm", text, re.M)


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
    """The first argument of every `_call(...)` in cnicore/ec2.py, which must be a string literal."""
    tree = ast.parse((ROOT / "cnicore" / "ec2.py").read_text())
    actions = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name != "_call":
                continue
            first = node.args[0] if node.args else None
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"cnicore/ec2.py:{node.lineno}: _call's action must be a string literal, "
                "so this test can list it in deploy/iam-policy.json")
            actions.add(first.value)
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
    # Every setting is shown, except the data folder, which the DaemonSet's hostPath mount fixes.
    missing = set(settings.SETTINGS) - set(data) - {"AWS_VPC_CNI_DATA_DIR"}
    assert not missing, f"document these settings in deploy/aws-vpc-cni-config.yaml: {sorted(missing)}"
    assert "AWS_VPC_CNI_DATA_DIR" not in data
    # As shipped the example changes nothing: every value parses to the default.
    assert settings.from_env(data) == settings.from_env({})
