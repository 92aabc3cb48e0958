"""The PyInstaller bundle: every program by name, links elsewhere, atomic installs, and the chain (issue 8)."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from support.labnode import LabNode, ROOT
from support.paths import BUNDLE

PROGRAMS = ["aws-eni-ipam", "aws-vpc-bridge", "aws-snat", "portmap-compat", "aws-vpc-cni-agent"]


def version(exe):
    proc = subprocess.run([exe], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, input=b"",
                          capture_output=True, timeout=60)
    return proc.returncode, proc.stdout


@pytest.mark.parametrize("program", PROGRAMS[:4])
def test_each_frozen_plugin_answers_version(frozen, program):
    rc, out = version(os.path.join(frozen, program))
    assert rc == 0 and json.loads(out)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@pytest.mark.parametrize("program", PROGRAMS[:4])
def test_a_frozen_plugin_error_exits_1_with_its_error_and_stderr_flushed(frozen, program):
    """The plugins leave without the interpreter's teardown (build/entry.py): exit code, the answer
    and buffered stderr must come out as with sys.exit."""
    proc = subprocess.run([os.path.join(frozen, program)], env={"CNI_COMMAND": "BOGUS", "PATH": "/usr/bin:/bin"},
                          input=b"", capture_output=True, timeout=60)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 4
    assert b"unknown CNI_COMMAND" in proc.stderr  # the log line, to stderr without a log file
    usage = subprocess.run([os.path.join(frozen, program)], env={"PATH": "/usr/bin:/bin"}, input=b"",
                           capture_output=True, timeout=60)
    assert usage.returncode == 0 and b"CNI protocol versions supported" in usage.stderr and not usage.stdout


def test_a_frozen_plugin_is_one_process_that_finds_its_libraries_in_the_bundle(frozen):
    """build/launcher.c: no re-exec (PyInstaller's bootloader execs itself again to set
    LD_LIBRARY_PATH), and every RUNPATH in the bundle points into it, so the bundled libssl, libffi,
    ... are found without LD_LIBRARY_PATH (which children such as iptables-save would inherit)."""
    check = subprocess.run([sys.executable, os.path.join(ROOT, "build", "elfpaths.py"), "--check",
                            BUNDLE], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    if shutil.which("strace") is None:
        pytest.skip("no strace to count the execs")
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=execve", os.path.join(frozen, "aws-eni-ipam")],
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}, input=b"", capture_output=True,
                          timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["cniVersion"]
    execs = [line for line in proc.stderr.decode().splitlines() if "execve(" in line and line.endswith("= 0")]
    assert len(execs) == 1, execs


def test_frozen_agent_renders_the_conflist(frozen):
    out = subprocess.run([os.path.join(frozen, "aws-vpc-cni-agent"), "render-conflist"], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    with open(os.path.join(ROOT, "conflists", "10-aws-vpc.conflist")) as f:
        assert json.loads(out) == json.load(f)


def test_the_frozen_agent_serves_its_metrics_and_introspection(frozen, fresh_lab, tmp_path):
    """prometheus_client and the agent's lazily imported endpoints are in the bundle."""
    from prometheus_client.parser import text_string_to_metric_families
    node = LabNode(fresh_lab, "node1", tmp_path, bin_dir=frozen)
    node.start_agent(metrics=None, introspection=None)
    try:
        metrics = node.http_get("http://127.0.0.1:61678/metrics")
        assert metrics.returncode == 0, metrics.stderr
        assert "awscni_total_ip_addresses" in {f.name for f in text_string_to_metric_families(metrics.stdout)}
        enis = node.http_get("http://127.0.0.1:61679/v1/enis")
        assert enis.returncode == 0 and json.loads(enis.stdout)["TotalIPs"] > 0, enis.stderr
    finally:
        node.stop_agents()


def test_the_frozen_agent_knows_its_version_and_the_max_pods_table(frozen):
    """The distribution's metadata and cnicore/instance_limits.json are in the bundle."""
    agent = os.path.join(frozen, "aws-vpc-cni-agent")
    proc = subprocess.run([agent, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("aws-vpc-cni-agent "), proc.stderr
    proc = subprocess.run([agent, "max-pods", "--instance-type", "m5.large", "--prefix-delegation"],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "110\n"), proc.stderr


def test_unknown_program_name_is_refused(frozen, tmp_path):
    link = tmp_path / "not-a-plugin"
    link.symlink_to(os.path.join(BUNDLE, "aws-vpc-cni"))
    proc = subprocess.run([str(link)], capture_output=True, text=True)
    assert proc.returncode == 2 and "aws-eni-ipam" in proc.stderr


def install(bundle, dest):
    subprocess.run(["bash", os.path.join(ROOT, "build", "install.sh")], check=True, capture_output=True,
                   env={**os.environ, "BUNDLE": str(bundle), "DESTDIR": str(dest), "CNI_BIN_DIR": "/opt/cni/bin"})
    return dest / "opt" / "cni" / "bin"


def test_install_puts_links_that_find_their_bundle_from_any_folder(frozen, tmp_path):
    bin_dir = install(BUNDLE, tmp_path / "root")
    for program in PROGRAMS[:4]:
        assert version(str(bin_dir / program))[0] == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "aws-eni-ipam").symlink_to(bin_dir / "aws-eni-ipam")  # a link to a link, in another folder
    assert version(str(elsewhere / "aws-eni-ipam"))[0] == 0


def test_install_adds_the_reference_loopback_only_where_the_node_has_none(frozen, tmp_path):
    bin_dir = install(BUNDLE, tmp_path / "bare")
    assert filecmp.cmp(bin_dir / "loopback", "/usr/lib/cni/loopback", shallow=False)
    own = tmp_path / "ami" / "opt" / "cni" / "bin"
    own.mkdir(parents=True)
    (own / "loopback").write_text("#!/bin/sh\n# the node's own\n")
    install(BUNDLE, tmp_path / "ami")
    assert (own / "loopback").read_text() == "#!/bin/sh\n# the node's own\n"


def test_upgrade_switches_atomically_keeps_the_previous_bundle_and_removes_older(frozen, tmp_path):
    bundles = []
    for n in range(3):
        copy = tmp_path / f"bundle{n}"
        shutil.copytree(BUNDLE, copy, symlinks=True)
        (copy / f"release-{n}").write_text(str(n))  # a different content hash per release
        bundles.append(copy)
    dest = tmp_path / "root"
    bin_dir = install(bundles[0], dest)
    failures, stop = [], threading.Event()

    def exec_loop():
        while not stop.is_set():
            rc, out = version(str(bin_dir / "aws-eni-ipam"))
            if rc != 0:
                failures.append(out)

    runner = threading.Thread(target=exec_loop)
    runner.start()
    try:
        for bundle in bundles[1:]:
            install(bundle, dest)
    finally:
        stop.set()
        runner.join()
    assert failures == []  # a pod starting during the upgrade always ran a whole bundle
    kept = sorted(p.name for p in bin_dir.iterdir() if p.name.startswith(".aws-vpc-cni-"))
    assert len(kept) == 2  # the current and the previous one
    current = os.readlink(bin_dir / "aws-eni-ipam").split("/")[0]
    assert current in kept and (bin_dir / current / "release-2").exists()
    assert all(os.readlink(bin_dir / p).split("/")[0] == current for p in PROGRAMS)


def test_frozen_chain_passes_the_source_tree_scenario(frozen, fresh_lab, tmp_path, make_netns):
    """ADD through cnitool on both nodes (a pod per node on a secondary ENI), ping across, SNAT to the
    internet host, a hostPort from the other node, CHECK, DEL leaving nothing."""
    pods = {}
    for name in ("node1", "node2"):
        node = LabNode(fresh_lab, name, tmp_path, bin_dir=frozen)
        node.write_conflist()
        for i in range(10):
            netns = make_netns(f"{name[-1]}f{i}")
            rc, out, err = node.cnitool("add", netns, f"p{i}")
            assert rc == 0, err + out
            pods[(name, i)] = (node, netns, json.loads(out))
    ip = {k: v[2]["ips"][0]["address"].split("/")[0] for k, v in pods.items()}
    node1 = pods[("node1", 0)][0]
    assert node1.probe(pods[("node1", 9)][1], "ping", ip[("node2", 9)])
    assert node1.probe(pods[("node2", 0)][1], "ping", ip[("node1", 9)])
    # SNAT (aws-snat): the internet host sees the node's primary IP for a primary- and a secondary-ENI pod
    status = fresh_lab.status()
    internet, node1_ip = status["internet"], status["nodes"][0]["primary_ip"]
    for i in (0, 9):
        seen = subprocess.run(["ip", "netns", "exec", pods[("node1", i)][1], sys.executable, "-m", "vpclab.probe",
                               "echo", "tcp", internet["address"], str(internet["echo_port"])],
                              capture_output=True, text=True, cwd=ROOT).stdout
        assert json.loads(seen)["answer"].split()[0] == node1_ip
    # hostPort (portmap-compat): node2 reaches a pod of node1 through node1's port 8080
    web = make_netns("1web")
    rc, out, err = node1.cnitool("add", web, "web", cap_args={"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    assert rc == 0, err + out
    pods[("node1", "web")] = (node1, web, json.loads(out))
    server = subprocess.Popen(["ip", "netns", "exec", web, sys.executable, "-c",
                               "import socket; s = socket.create_server(('0.0.0.0', 80)); c, _ = s.accept(); "
                               "c.sendall(b'pod answered')"])
    try:
        reply = ""
        for _ in range(20):  # until the server listens
            reply = fresh_lab.exec("node2", [sys.executable, "-c", "import socket; print(socket.create_connection("
                                             f"('{node1_ip}', 8080), timeout=2).recv(64).decode())"], check=False).stdout
            if reply:
                break
            time.sleep(0.2)
        assert reply.strip() == "pod answered"
    finally:
        server.kill()
        server.wait()
    for (name, i), (node, netns, _) in pods.items():
        rc, out, err = node.cnitool("check", netns, i if i == "web" else f"p{i}")
        assert rc == 0, err + out
    for (name, i), (node, netns, result) in pods.items():
        rc, out, err = node.cnitool("del", netns, i if i == "web" else f"p{i}")
        assert rc == 0, err + out
        assert result["interfaces"][0]["name"] not in fresh_lab.exec(name, ["ip", "-o", "link"]).stdout
    for name in ("node1", "node2"):
        priorities = {line.split(":")[0] for line in fresh_lab.exec(name, ["ip", "rule"]).stdout.splitlines()}
        assert not priorities & {"512", "1536"}


def test_frozen_bridge_runs_its_own_ipam_in_process_and_execs_any_other(frozen, fresh_lab, tmp_path, make_netns):
    """The bundle's aws-eni-ipam link is this very program: the bridge runs it in-process for ADD and
    DEL. Any other executable of that name (a wrapper that records its runs, then execs the bundle) is
    exec'd, as libcni would."""
    node = LabNode(fresh_lab, "node1", tmp_path, bin_dir=frozen)
    node.write_conflist(plugins=["aws-vpc-bridge"], **{"aws-vpc-bridge": {"pluginLogLevel": "DEBUG"}})
    wrapped, runs = tmp_path / "wrapped-bin", tmp_path / "ipam-runs"
    wrapped.mkdir()
    for program in PROGRAMS:
        if program != "aws-eni-ipam":
            os.symlink(os.path.join(frozen, program), wrapped / program)
    (wrapped / "aws-eni-ipam").write_text(f"#!/bin/sh\necho \"$CNI_COMMAND\" >>{runs}\n"
                                          f"exec {os.path.join(frozen, 'aws-eni-ipam')} \"$@\"\n")
    (wrapped / "aws-eni-ipam").chmod(0o755)
    for bin_dir, execs in ((frozen, []), (str(wrapped), ["ADD", "DEL"])):
        node.bin_dir = bin_dir
        open(node.log_file, "w").close()
        pod = make_netns("ipam")
        for command in ("add", "del"):
            rc, out, err = node.cnitool(command, pod, "web")
            assert rc == 0, err + out
        with open(node.log_file) as f:
            records = [json.loads(line) for line in f]
        in_process = [r["msg"] for r in records if r["plugin"] == "aws-vpc-bridge" and "in-process" in r["msg"]]
        assert in_process == ([] if execs else ["aws-eni-ipam ADD runs in-process", "aws-eni-ipam DEL runs in-process"])
        assert [r["command"] for r in records if r["plugin"] == "aws-eni-ipam" and r["msg"] == "done"] == ["ADD", "DEL"]
        assert (runs.read_text().split() if runs.exists() else []) == execs


def test_the_bridge_takes_the_eni_facts_from_its_in_process_ipam_without_reading_the_store(frozen, fresh_lab,
                                                                                          tmp_path, make_netns):
    """The in-process IPAM's ADD leaves what it handed out for the bridge (cnicore.pool), which then
    opens the state store file no second time: once per ADD, for the IPAM's own read."""
    node = LabNode(fresh_lab, "node1", tmp_path, bin_dir=frozen)
    assert node.ipam("ADD", cid="warm")[0] == 0  # the pool, grown from EC2
    trace = tmp_path / "trace"
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c2", "CNI_NETNS": f"/var/run/netns/{make_netns('hand')}",
           "CNI_IFNAME": "eth0", "CNI_PATH": frozen, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"}
    proc = fresh_lab.exec("node1", ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(trace),
                                    os.path.join(frozen, "aws-vpc-bridge")], env=env, input=json.dumps(node.ipam_conf()))
    try:
        assert json.loads(proc.stdout)["ips"][0]["address"].startswith("10.0.")
        store = os.path.join(node.data_dir, "aws-vpc.json")
        reads = [line for line in trace.read_text().splitlines() if f'"{store}"' in line and "O_RDONLY" in line]
        assert len(reads) == 1, reads
    finally:  # the pod's rules and host veth go with its DEL
        fresh_lab.exec("node1", [os.path.join(frozen, "aws-vpc-bridge")], env={**env, "CNI_COMMAND": "DEL"},
                       input=json.dumps(node.ipam_conf()))
    assert node.view().pod_leftovers() == []


def test_frozen_aws_snat_in_iptc_mode_writes_the_rules_on_a_legacy_host(frozen, tmp_path, make_netns):
    """netfilterMode iptc (python-iptables) needs its C helper, libxtwrapper, which is no module: the
    bundle must carry it, or the frozen plugin fails where the source tree works."""
    from cnicore.pool import new_document
    from cnicore.store import Store
    ns = make_netns("iptc")
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-ec",
                    "ip link add eth0 address 02:00:00:00:5a:01 type veth peer name p0; ip link set eth0 up; "
                    "iptables-legacy -t mangle -N KUBE-KUBELET-CANARY"], check=True)  # kubelet's mark: legacy
    data_dir = str(tmp_path / "data")
    with Store(data_dir, "aws-vpc").locked() as tx:
        tx.write(new_document({"primary_ip": "10.0.0.10", "primary_mac": "02:00:00:00:5a:01",
                               "vpc_cidrs": ["10.0.0.0/16"]}))
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.20/32"}]}
    conf = {"cniVersion": "1.0.0", "name": "aws-vpc", "type": "aws-snat", "dataDir": data_dir,
            "pluginLogFile": str(tmp_path / "plugin.log"), "netfilterMode": "iptc", "prevResult": prev}
    for command in ("ADD", "CHECK"):
        proc = subprocess.run(["ip", "netns", "exec", ns, os.path.join(frozen, "aws-snat")], input=json.dumps(conf),
                              env={"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": f"/var/run/netns/{ns}",
                                   "CNI_IFNAME": "eth0", "CNI_PATH": frozen, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save", "-t", "nat"], capture_output=True,
                           text=True, check=True).stdout
    assert '-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -m comment --comment "AWS SNAT CHAIN" -j RETURN' in saved and '--comment "AWS, SNAT"' in saved
