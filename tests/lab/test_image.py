"""The aws-node image `make image` builds (build/image.sh), run with podman as the DaemonSet runs it.

The image is built once per run by build/image.sh itself, into a private podman (tests/support/podman_world.py:
storage, containers.conf and locks in the test's tmp dir; the Debian root comes from the script's cache,
so only a first run or a changed package list pays for mmdebstrap). The DaemonSet's pod is run from
deploy/'s manifests as they stand: its init containers, then its main container, with their commands,
environment (envFrom the shipped ConfigMap), mounts (each hostPath a folder of the test's),
capabilities, read-only root and host network (the lab node's namespace), and its readiness probe
asked with `podman exec` until it passes. Nothing runs in the root network namespace; containers,
mounts and the image are removed at the end.
"""

import json
import os
import shutil
import subprocess
import tomllib

import pytest
import yaml
from support.labnode import ROOT
from support.podman_world import PodmanNode


DEPLOY = os.path.join(ROOT, "deploy")
PROGRAMS = ("aws-eni-ipam", "aws-vpc-bridge", "aws-snat", "portmap-compat", "aws-vpc-cni-agent")
CONFLIST = "10-aws-vpc.conflist"


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["version"]


@pytest.fixture(scope="module")
def image(lab, tmp_path_factory):
    """(private podman on node1, the image's name) once build/image.sh built and loaded it there."""
    podman = PodmanNode(lab, "node1", tmp_path_factory.mktemp("image"))
    try:
        env = dict(os.environ, CONTAINERS_CONF=podman.containers_conf, CONTAINERS_STORAGE_CONF=podman.storage_conf)
        built = subprocess.run(["bash", os.path.join(ROOT, "build", "image.sh")], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=1200)
        assert built.returncode == 0, f"build/image.sh exited {built.returncode}: {built.stderr}"
        yield podman, built.stdout.split()[-1]
    finally:
        try:
            podman.podman("rmi", "-af", check=False)
            podman.close()
        finally:
            shutil.rmtree(podman.root, ignore_errors=True)


def run(podman: PodmanNode, name: str, *argv, options=()) -> subprocess.CompletedProcess:
    """`podman run --rm --network none OPTIONS IMAGE ARGV` (the entry point is the agent)."""
    return podman.podman("run", "--rm", "--network", "none", *options, name, *argv)


def test_image_is_named_by_the_project_version_and_is_debian_with_both_iptables_and_loopback(image):
    podman, name = image
    assert name == f"localhost/aws-vpc-cni-py:{project_version()}"
    inspected = json.loads(podman.podman("image", "inspect", name).stdout)[0]
    assert inspected["Config"]["Labels"]["org.opencontainers.image.version"] == project_version()
    assert inspected["Config"]["Entrypoint"] == ["aws-vpc-cni-agent"] and inspected["Config"]["Cmd"] == ["run"]
    assert len(inspected["RootFS"]["Layers"]) == 2  # the cached Debian root, then /app
    shell = ["--entrypoint", "sh"]
    assert run(podman, name, "-c", "cat /etc/debian_version", options=shell).stdout.startswith("12.")
    versions = run(podman, name, "-c", "iptables-nft --version; iptables-legacy --version; "
                   "iptables-nft-restore --version; iptables-legacy-save --version", options=shell).stdout
    assert [line.split("(")[-1] for line in versions.splitlines()] == \
        ["nf_tables)", "legacy)", "nf_tables)", "legacy)"], versions
    loopback = run(podman, name, options=["--entrypoint", "/usr/lib/cni/loopback", "-e", "CNI_COMMAND=VERSION"])
    assert "0.3.1" in json.loads(loopback.stdout)["supportedVersions"]
    # the program links of dist/bin, on PATH, each into the one bundle
    links = run(podman, name, "-c", "for p in " + " ".join(PROGRAMS) + "; do readlink -f $(command -v $p); done",
                options=shell).stdout.split()
    assert links == ["/app/dist/aws-vpc-cni/aws-vpc-cni"] * len(PROGRAMS)
    assert run(podman, name, "--version").stdout.strip().endswith(project_version())


def test_the_agent_in_the_image_renders_and_writes_the_conflist(image, tmp_path):
    podman, name = image
    external_snat = ["-e", "AWS_VPC_K8S_CNI_EXTERNALSNAT=true"]
    rendered = json.loads(run(podman, name, "render-conflist", options=external_snat).stdout)
    assert [p["type"] for p in rendered["plugins"]] == ["aws-vpc-bridge", "aws-snat", "portmap-compat"]
    assert rendered["plugins"][1]["externalSNAT"] is True  # the container's environment is read
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    run(podman, name, "write-conflist", "/host/etc/cni/net.d",
        options=[*external_snat, "-v", f"{conf_dir}:/host/etc/cni/net.d"])
    assert json.loads((conf_dir / CONFLIST).read_text()) == rendered
    assert (conf_dir / CONFLIST).stat().st_mode & 0o777 == 0o644
    assert os.listdir(conf_dir) == [CONFLIST]  # no temporary file left


# --- the DaemonSet's pod ----------------------------------------------------------------------------
def test_the_manifests_run_the_image_make_image_builds(image):
    _, name = image
    daemonset, _ = manifests()
    pod = daemonset["spec"]["template"]["spec"]
    assert {c["image"] for c in pod.get("initContainers", []) + pod["containers"]} == {name}


def manifests() -> tuple[dict, dict]:
    """The aws-node DaemonSet and the settings ConfigMap's data, as deploy/ has them."""
    with open(os.path.join(DEPLOY, "aws-vpc-cni.yaml")) as f:
        daemonset = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "DaemonSet")
    with open(os.path.join(DEPLOY, "aws-vpc-cni-config.yaml")) as f:
        config = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "ConfigMap")
    return daemonset, config["data"]


def podman_options(container: dict, pod: dict, host_root: str, settings: dict, netns: str, node_env: dict) -> list[str]:
    """podman run options for one container of the pod spec, as a kubelet would set it up: hostPath
    volumes under `host_root`, envFrom the ConfigMap, securityContext, the host network."""
    options = ["--network", f"ns:{netns}" if pod.get("hostNetwork") else "none"]
    environ = dict(node_env)  # what the node gives: here the lab's EC2 and IMDS endpoints
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "aws-vpc-cni", source
        environ.update(settings)
    environ.update({e["name"]: e["value"] for e in container.get("env", [])})
    for key, value in environ.items():
        options += ["-e", f"{key}={value}"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container.get("volumeMounts", []):
        host_path = volumes[mount["name"]]["hostPath"]
        source = host_root + host_path["path"]
        if host_path.get("type") == "FileOrCreate":
            os.makedirs(os.path.dirname(source), exist_ok=True)
            open(source, "a").close()
        else:
            os.makedirs(source, exist_ok=True)
        options += ["-v", f"{source}:{mount['mountPath']}" + (":ro" if mount.get("readOnly") else "")]
    security = container.get("securityContext", {})
    capabilities = security.get("capabilities", {})
    options += [f"--cap-drop={c}" for c in capabilities.get("drop", [])]
    options += [f"--cap-add={c}" for c in capabilities.get("add", [])]
    if security.get("privileged"):
        options.append("--privileged")
    if security.get("readOnlyRootFilesystem"):
        options += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes mounts no tmpfs either
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    if "command" in container:
        options += ["--entrypoint", json.dumps(container["command"])]
    return options


def test_the_daemonset_pod_installs_the_plugins_and_keeps_a_warm_pool_on_a_lab_node(image, fresh_lab, tmp_path):
    podman, name = image
    daemonset, settings = manifests()
    pod = daemonset["spec"]["template"]["spec"]
    host_root = str(tmp_path / "host")
    netns = podman.netns_path
    node_env = fresh_lab.node_env("node1")
    for init in pod.get("initContainers", []):
        podman.podman("run", "--rm", *podman_options(init, pod, host_root, settings, netns, node_env), name,
                      *init.get("args", []), timeout=300)

    # the plugins are in the host's CNI bin dir and run there (a bundle of their own, not the image's)
    bin_dir = host_root + "/opt/cni/bin"
    for program in PROGRAMS:
        target = os.path.realpath(os.path.join(bin_dir, program))
        assert target.startswith(bin_dir + "/") and os.access(target, os.X_OK), (program, target)
    version = fresh_lab.exec("node1", [os.path.join(bin_dir, "aws-vpc-bridge")], env={"CNI_COMMAND": "VERSION"},
                             input='{"cniVersion": "1.0.0"}')
    assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]

    main = pod["containers"][0]
    probe = main["readinessProbe"]["exec"]["command"]
    cid = podman.podman("run", "-d", *podman_options(main, pod, host_root, settings, netns, node_env), name,
                        *main.get("args", [])).stdout.strip()
    podman.inspect(cid)  # remembered for the leftover checks of close()
    try:
        try:
            podman.wait_for(lambda: podman.podman("exec", cid, *probe, check=False).returncode == 0, timeout=120,
                            what=f"the readiness probe {probe}")
        except AssertionError as exc:
            logs = podman.podman("logs", "--tail", "30", cid, check=False)
            raise AssertionError(f"{exc}; the agent's last words: {logs.stdout}{logs.stderr}") from None
        status = podman.wait_for(lambda: (lambda s: s if s["figures"] and s["figures"]["short"] == 0 else None)(
            json.loads(podman.exec(cid, "aws-vpc-cni-agent", "status", "--json"))), timeout=120, what="a warm pool")
        # the pool the agent reports is what EC2 has for the node
        ec2 = podman.ec2_enis()
        assert {e["eni_id"]: e["total"] for e in status["enis"]} == {eni: len(ips) for eni, (_, ips) in ec2.items()}
        assert sum(e["free"] for e in status["enis"]) > 0
        # the conflist is on the host (from the init step or from the agent once its pool serves),
        # naming only plugins installed there
        conflist_path = host_root + "/etc/cni/net.d/" + CONFLIST
        conflist = json.loads(podman.wait_for(lambda: os.path.exists(conflist_path) and open(conflist_path).read(),
                                              timeout=60, what=conflist_path))
        types = [t for p in conflist["plugins"] for t in (p["type"], p.get("ipam", {}).get("type")) if t]
        assert all(os.access(os.path.join(bin_dir, t), os.X_OK) for t in types), types
        # the agent's log went to the mounted log folder, as JSON lines; with only the manifest's
        # capabilities nothing it does fails (its node healing included)
        with open(host_root + "/var/log/aws-routed-eni/ipamd.log") as f:
            lines = f.read().splitlines()
        records = [json.loads(line) for line in lines]
        assert records and all(r["msg"] for r in records), lines[:5]
        assert [r["msg"] for r in records if r["level"] in ("ERROR", "FATAL")] == []
        assert not any(status["errors"].values()) and status["last_error"] is None, status
    finally:
        stopped = podman.podman("stop", "-t", "20", cid, check=False)
    assert stopped.returncode == 0, stopped.stderr
    assert podman.inspect(cid)["State"]["ExitCode"] == 0  # SIGTERM: the agent stops cleanly
    podman.podman("rm", cid)
