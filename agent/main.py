"""aws-vpc-cni-agent: the DaemonSet's long-running process on every node.

    aws-vpc-cni-agent run [--conf-dir DIR]  keep the warm pool at target (the DaemonSet's main process);
                                       write DIR/10-aws-vpc.conflist once the pool can serve
    aws-vpc-cni-agent status [--json] [--ready]  the pool per ENI, from the running agent; --ready:
                                       exit 1 until the pool can serve (the readiness probe)
    aws-vpc-cni-agent render-conflist  print the conflist for the settings in the environment
    aws-vpc-cni-agent write-conflist DIR  write it to DIR/10-aws-vpc.conflist (atomically)
    aws-vpc-cni-agent max-pods [--instance-type T] [--prefix-delegation]  kubelet's --max-pods
    aws-vpc-cni-agent --version

`run` reconciles the store with IMDS and EC2 first (rebuilding it, with the bad file kept aside, if
it is corrupt), then loops: every `--interval` seconds, or at once when a plugin nudges, it heals the
node (`Agent.heal`) and runs one `NodePool.tick`. It serves a read-only status on
`<dataDir>/agent.sock`, Prometheus metrics on `--metrics-address` (default 0.0.0.0:61678, as
upstream; `metrics.py`) and upstream's introspection paths on `--introspection-address` (default
127.0.0.1:61679; `introspect.py`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

from cnicore import agentlink, settings
from cnicore import result as cniresult
from cnicore.fsutil import make_dirs
from cnicore.log import Logger, agent_logger
from cnicore.pool import ASSIGNED, Pool
from cnicore.rawnetlink import control_socket
from cnicore.store import Store, StoreError

DEFAULT_NETWORK = "aws-vpc"
SIOCGIFMTU, SIOCSIFMTU = 0x8921, 0x8922
IFREQ_MTU = struct.Struct("16si20x")  # struct ifreq: the name, then ifr_mtu in the 24-byte union
# The highest version the runtimes we test against take: containerd 1.6 and podman 4.3 (their libcni
# 1.1) fail every ADD of a 1.1.0 conflist with 'unsupported CNI result version "1.1.0"' (measured:
# tests/test_containerd.py and tests/test_podman.py with 1.1.0). All our plugins speak 1.1.0 too.
DEFAULT_CNI_VERSION = "1.0.0"
CONFLIST_NAME = "10-aws-vpc.conflist"  # sorts before the usual 10-aws.conflist, 10-calico..., 20-...
METRICS_ADDRESS = "0.0.0.0:61678"  # upstream's metrics port, on all addresses as upstream
INTROSPECTION_ADDRESS = "127.0.0.1:61679"  # upstream's INTROSPECTION_BIND_ADDRESS default
ADD_GRACE = 120.0  # s a reservation may exist without its host veth when no live process owns it


def process_alive(owner) -> bool:
    """Whether the process `owner` ([pid, start time], see cnicore.pool) still runs (a zombie has
    ended: only its parent has not reaped it yet)."""
    try:
        pid, started = owner
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19]) == started and fields[0] not in (b"Z", b"X")
    except (OSError, IndexError, TypeError, ValueError):
        return False


class Agent:
    def __init__(self, cfg: dict, network: str, log: Logger, interval: float, conf_dir: str | None = None,
                 cni_version: str = DEFAULT_CNI_VERSION):
        from cnicore.poolmgr import NodePool
        self.cfg = cfg
        self.conf_dir = conf_dir  # where the conflist goes once the pool can serve (None: not written)
        self.cni_version = cni_version
        self.ready = False
        self.log = log
        self.interval = interval
        self.data_dir = cfg["AWS_VPC_CNI_DATA_DIR"]
        self.store = Store(self.data_dir, network)
        self.pool = NodePool(cfg, log)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.last_decision = None
        self.ticks = 0
        self.startup_error: str | None = None
        self.releases: set[tuple[str, str, str, float]] = set()  # handed over by DELs: (cid, ifname, ip, when)
        self.releases_lock = threading.Lock()
        self.unclaimable: set[tuple[str, str, str]] = set()  # reported once each
        self.in_progress: collections.Counter[str] = collections.Counter()  # action -> running now (metrics)
        self.errors: collections.Counter[str] = collections.Counter()  # action -> failures (metrics)

    @contextlib.contextmanager
    def action(self, name: str):
        """Count `name` as in progress while it runs, and as an error if it raises (for the metrics)."""
        self.in_progress[name] += 1
        try:
            yield
        except Exception:
            self.errors[name] += 1
            raise
        finally:
            self.in_progress[name] -= 1

    # --- the store against EC2 and the host -----------------------------------------------------
    def reconcile(self) -> None:
        """Bring the store in line with EC2 and with the attachments that exist on the host (at
        start-up, and when the store has become unusable).

        An unusable store is rebuilt (the bad file kept aside): ENIs and IPs from EC2, assignments
        from the host veths, which carry their attachment in their alias (`converge_attachments`)."""
        self.pool.reconcile(self.store)  # EC2 and IMDS without the store lock; a corrupt store rebuilt
        self.converge_attachments()

    def converge_attachments(self) -> None:
        """Reservations against the attachments alive on the host: a pod on the host is recorded as
        holding its IP; a reservation whose pod is gone is released, unless its ADD was in flight when
        the host was listed (its owner process lived, or, with no owner known, it was younger than
        ADD_GRACE); a release
        a DEL could not write is written now.

        The host is listed without the store lock, between two reads of the store; an entry that a
        DEL or ADD changed meanwhile is left to the next round, so the listing is never applied to
        an IP it did not see (a DEL's released IP re-claimed for its gone pod, say)."""
        from cnicore import netlink
        with self.store.locked(shared=True) as tx:
            before = tx.read()
        if before is None:
            return
        seen = {ip: dict(entry) for eni in before["enis"].values() for ip, entry in eni["ips"].items()}
        # judged before the host is listed: an ADD that ends during the listing made its veth after
        # the listing looked, and its owner is gone by the time the listing is applied
        now = time.time()
        in_flight = {ip for ip, entry in seen.items() if entry["state"] == ASSIGNED and (
            process_alive(entry.get("owner")) or (not entry.get("owner") and now - entry["since"] <= ADD_GRACE))}
        on_host = {}
        for veth in netlink.list_host_veths(self.cfg["AWS_VPC_K8S_CNI_VETHPREFIX"]):
            att = veth.attachment
            if att is not None and att.network == self.store.network:
                on_host[(att.container_id, att.ifname)] = veth.pod_ips
        with self.releases_lock:
            handed = set(self.releases)
        with self.store.locked() as tx:
            doc = tx.read()
            now = time.time()
            pool = Pool(doc, now, self.cfg["IP_COOLDOWN_PERIOD"])
            changed = False
            for (cid, ifname), ips in on_host.items():
                for ip in ips:
                    entry = pool.entry(ip)
                    if entry is not None and (entry != seen.get(ip) or (entry["state"] == ASSIGNED and (
                            entry["container_id"], entry["ifname"]) == (cid, ifname))):
                        continue  # recorded, or changed since the host was listed (judged next round)
                    if pool.claim(ip, cid, ifname):
                        changed = True
                        self.log.info("recorded a pod found on the host", container=cid, ip=ip)
                    elif (cid, ifname, ip) not in self.unclaimable:
                        self.unclaimable.add((cid, ifname, ip))
                        self.log.error("a pod on the host uses an IP the pool cannot give it",
                                       container=cid, ifname=ifname, ip=ip)
            for cid, ifname, ip in pool.attachments():
                entry = pool.entry(ip)
                if (cid, ifname) in on_host or entry != seen.get(ip):
                    continue  # alive, or assigned after the host was listed (an ADD in flight)
                if any(h[:3] == (cid, ifname, ip) and h[3] >= entry["since"] for h in handed):
                    why = "a DEL could not write it"
                elif ip in in_flight:
                    continue
                else:
                    why = "its pod is gone"
                pool.release(cid, ifname, ip)
                changed = True
                self.log.info(f"released a reservation: {why}", container=cid, ifname=ifname, ip=ip)
            if changed:
                tx.write(doc)
        with self.releases_lock:  # written, or no longer held by that attachment
            self.releases -= handed

    def heal(self) -> None:
        """One round of keeping the node as it must be: a store that became unusable rebuilt (no
        restart), reservations against live attachments, the data path of live pods (ENI tables,
        rules 512/1536) and the node's netfilter rules verified and repaired."""
        try:
            with self.store.locked(shared=True) as tx:
                tx.read()
        except StoreError as exc:
            self.log.error(f"the state store is unusable; rebuilding it: {exc}")
            self.reconcile()
            return
        self.converge_attachments()
        self._repair_data_path()
        self._converge_node_rules()

    def _repair_data_path(self) -> None:
        from cnicore import netlink
        with self.store.locked(shared=True) as tx:
            doc = tx.read()
        if doc is None:
            return
        pods = []
        held = {ip: (eni, entry) for eni in doc["enis"].values() for ip, entry in eni["ips"].items()
                if entry["state"] == ASSIGNED}
        for veth in netlink.list_host_veths(self.cfg["AWS_VPC_K8S_CNI_VETHPREFIX"]):
            att = veth.attachment
            for ip in veth.pod_ips if att is not None and att.network == self.store.network else ():
                eni, entry = held.get(ip, (None, None))
                if entry is None or (entry["container_id"], entry["ifname"]) != (att.container_id, att.ifname):
                    continue  # not this pod's in the store: not ours to route
                pods.append((ip, None if eni["primary"] else netlink.SecondaryEni(
                    mac=eni["mac"], device_number=eni["device_number"], subnet=eni["subnet_cidr"],
                    mtu=self.cfg["AWS_VPC_ENI_MTU"], primary_ip=eni["primary_ip"])))
        repaired = netlink.repair_node(pods)
        if repaired:
            self.log.info("repaired the data path of running pods", repaired=repaired)

    def _converge_node_rules(self) -> None:
        """aws-snat's node-wide rules, by aws-snat's own code and stamp (no iptables call while they
        are as it left them), for the settings this agent renders into the conflist."""
        from aws_snat import main as snat
        want = snat.node_desired(self.cfg, self.store.network)
        fixed = snat.converge(self.cfg, want, snat.stamp(self.cfg, want))
        if fixed:
            self.log.info("node rules converged", fixed=fixed)

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():  # until IMDS and EC2 answer; the status says why not
            try:
                with self.action("nodeInit"):
                    self.reconcile()
                break
            except Exception as exc:
                self.startup_error = f"{type(exc).__name__}: {exc}"
                self.log.error(f"cannot reconcile the pool yet: {self.startup_error}")
                self.wake.wait(self.interval)
                self.wake.clear()
        self.startup_error = None
        try:
            self.apply_primary_mtu()
        except OSError as exc:  # pods still work at the old MTU; said once, as upstream logs it
            self.log.error(f"cannot set the primary ENI's MTU: {exc}")
        while not self.stopping.is_set():
            try:
                with self.action("nodeHeal"):
                    self.heal()
            except Exception as exc:  # the tick still runs; the next round heals again
                self.log.error(f"healing the node failed: {type(exc).__name__}: {exc}")
            try:
                with self.action("nodeIPPoolTick"):
                    self.last_decision = self.pool.tick(self.store)
                self.ticks += 1
            except Exception as exc:  # keep serving; the status shows the error
                self.log.error(f"tick failed: {type(exc).__name__}: {exc}")
            try:
                self.publish()
            except OSError as exc:
                self.log.error(f"cannot write the conflist: {exc}")
            self.wake.wait(self.interval)
            self.wake.clear()

    def apply_primary_mtu(self) -> None:
        """AWS_VPC_ENI_MTU on the primary ENI's interface, as upstream's ipamd sets it at start
        (networkutils SetupHostNetwork); secondary ENIs get it when the bridge plugin sets them up."""
        from aws_snat.main import primary_interface
        mac = (self.read_doc() or {}).get("node", {}).get("primary_mac")
        name = primary_interface(mac, self.data_dir) if mac else None
        if name is None:
            raise OSError(f"no interface has the primary ENI's MAC {mac}")
        mtu = self.cfg["AWS_VPC_ENI_MTU"]
        with control_socket() as sock:
            current = IFREQ_MTU.unpack(fcntl.ioctl(sock, SIOCGIFMTU, IFREQ_MTU.pack(name.encode(), 0)))[1]
            if current != mtu:
                fcntl.ioctl(sock, SIOCSIFMTU, IFREQ_MTU.pack(name.encode(), mtu))
                self.log.info("set the primary ENI's MTU", interface=name, old=current, mtu=mtu)

    def publish(self) -> None:
        """Once the pool can serve (it has a free IP, or pods already), write the conflist into
        conf_dir and keep it as rendered. Until then there is none of ours: kubelet keeps the node
        NotReady (or the runtime keeps using the chain whose conflist is there, which is left alone)."""
        figures = self.last_decision.figures if self.last_decision else None
        if not self.ready and figures is not None and (figures.free or figures.assigned):
            self.ready = True
            self.log.info("the pool can serve", free=figures.free, assigned=figures.assigned)
        if not (self.ready and self.conf_dir):
            return
        conflist = render_conflist(self.cfg, self.store.network, self.cni_version)
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(self.conf_dir, CONFLIST_NAME)) as f:
                if json.load(f) == conflist:
                    return
        self.log.info("wrote the conflist", path=write_conflist(conflist, self.conf_dir))

    def status(self) -> dict:
        doc = self.read_doc() or {}
        pool = Pool(doc, time.time(), self.cfg["IP_COOLDOWN_PERIOD"])
        figures = self.last_decision.figures.__dict__ if self.last_decision else None
        agent = doc.get("agent", {})
        calls = self.pool.ec2_calls()
        return {"node": doc.get("node", {}), "enis": pool.eni_stats() if doc else [], "figures": figures,
                "blocked": agent.get("blocked"), "last_error": agent.get("last_error"),
                "ec2_calls": calls, "ec2_errors": self.pool.ec2_errors(), "ec2_latency": self.pool.ec2_latency(),
                "ticks": self.ticks, "startup_error": self.startup_error,
                "in_progress": dict(self.in_progress), "errors": dict(self.errors), "ready": self.ready}

    def read_doc(self) -> dict | None:
        with self.store.locked(shared=True) as tx:
            return tx.read()

    # --- local servers --------------------------------------------------------------------------
    def serve_nudges(self) -> None:
        path = os.path.join(self.data_dir, agentlink.NUDGE)
        sock = _bind_unix(path, socket.SOCK_DGRAM)
        while not self.stopping.is_set():
            release = agentlink.parse_release(sock.recv(agentlink.MAX_MESSAGE))
            if release is not None and release[0] == self.store.network:
                with self.releases_lock:
                    self.releases.add((*release[1:], time.time()))
                self.log.info("a DEL handed over its release", container=release[1], ifname=release[2], ip=release[3])
            self.wake.set()

    def serve_status(self) -> None:
        sock = _bind_unix(os.path.join(self.data_dir, agentlink.STATUS), socket.SOCK_STREAM)
        sock.listen(8)
        while not self.stopping.is_set():
            conn, _ = sock.accept()
            with conn:
                try:
                    conn.sendall(json.dumps(self.status(), default=str).encode())
                except Exception as exc:
                    self.log.error(f"status request failed: {exc}")


def status_table(status: dict) -> str:
    node = status.get("node", {})
    rows = [f"node {node.get('instance_id', '?')} ({node.get('instance_type', '?')}), primary IP {node.get('primary_ip', '?')}",
            f"{'ENI':<24}{'device':>7}{'total':>7}{'assigned':>10}{'cooling':>9}{'free':>6}"]
    for e in status["enis"]:
        name = e["eni_id"] + (" (primary)" if e["primary"] else "")
        rows.append(f"{name:<24}{e['device_number']:>7}{e['total']:>7}{e['assigned']:>10}{e['cooling']:>9}{e['free']:>6}")
    totals = {k: sum(e[k] for e in status["enis"]) for k in ("total", "assigned", "cooling", "free")}
    rows.append(f"{'all':<24}{'':>7}{totals['total']:>7}{totals['assigned']:>10}{totals['cooling']:>9}{totals['free']:>6}")
    if not status.get("ready"):
        rows.append("not ready: the pool has no IP to hand out yet (no conflist written)")
    if status.get("startup_error"):
        rows.append(f"not started yet: {status['startup_error']}")
    if status.get("blocked"):
        rows.append(f"blocked: {status['blocked']['reason']}")
    if status.get("last_error"):
        err = status["last_error"]
        rows.append(f"last EC2 error: {err['action']}: {err['code']}: {err['message']}")
    return "\n".join(rows)


def _bind_unix(path: str, kind: int) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    return sock


def render_conflist(cfg: dict, network: str = DEFAULT_NETWORK, cni_version: str = DEFAULT_CNI_VERSION) -> dict:
    """The default chain (ARCHITECTURE §1) with the settings rendered into each plugin's entry."""
    pick = lambda *names: settings.to_conf({n: cfg[n] for n in names})  # noqa: E731
    logging = pick("AWS_VPC_K8S_PLUGIN_LOG_FILE", "AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "AWS_VPC_CNI_LOG_MAX_SIZE",
                   "AWS_VPC_CNI_LOG_MAX_BACKUPS", "AWS_VPC_CNI_LOG_MAX_AGE")
    ipam = {"type": "aws-eni-ipam", **pick("AWS_VPC_CNI_DATA_DIR", "WARM_IP_TARGET", "MINIMUM_IP_TARGET",
                                            "WARM_ENI_TARGET", "MAX_ENI", "IP_COOLDOWN_PERIOD", "CLUSTER_NAME",
                                            "ENABLE_PREFIX_DELEGATION", "WARM_PREFIX_TARGET")}
    bridge = {"type": "aws-vpc-bridge", **pick("AWS_VPC_K8S_CNI_VETHPREFIX", "POD_MTU", "AWS_VPC_ENI_MTU"),
              **logging, "ipam": ipam}
    snat = {"type": "aws-snat", **pick("AWS_VPC_K8S_CNI_EXTERNALSNAT", "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                                       "AWS_VPC_K8S_CNI_RANDOMIZESNAT", "AWS_VPC_CNI_NODE_PORT_SUPPORT",
                                       "AWS_VPC_K8S_CNI_CONNMARK", "AWS_VPC_K8S_CNI_VETHPREFIX",
                                       "AWS_VPC_CNI_DATA_DIR", "AWS_VPC_CNI_NETFILTER_MODE"), **logging}
    portmap = {"type": "portmap-compat", "capabilities": {"portMappings": True}, "snat": True,
               **pick("AWS_VPC_CNI_DATA_DIR", "AWS_VPC_CNI_NETFILTER_MODE"), **logging}
    return {"cniVersion": cni_version, "name": network, "plugins": [bridge, snat, portmap]}


def write_conflist(conflist: dict, conf_dir: str, filename: str = CONFLIST_NAME) -> str:
    """Write atomically, so a runtime never reads half a file."""
    make_dirs(conf_dir, 0o755)
    path = os.path.join(conf_dir, filename)
    tmp = os.path.join(conf_dir, f".{filename}.tmp.{os.getpid()}")
    # 0644 whatever the umask: the runtime reads it, nobody but root may change which binaries it runs
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), "w") as f:
        os.fchmod(f.fileno(), 0o644)
        json.dump(conflist, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return path


def version() -> str:
    from importlib.metadata import version as dist_version
    return dist_version("aws-vpc-cni-py")


def max_pods(args) -> int:
    """Print the max-pods figure (the `max-pods` command)."""
    from cnicore.instance_limits import InstanceLimitsError, lookup
    instance_type = args.instance_type
    try:
        if instance_type is None:
            from cnicore.imds import IMDS, IMDSError
            try:
                with IMDS() as imds:
                    instance_type = imds.get("instance-type").strip()
            except IMDSError as exc:
                print(f"aws-vpc-cni-agent: no --instance-type, and IMDS failed: {exc}", file=sys.stderr)
                return 1
        limits = lookup(instance_type)
        figure = (limits.max_pods_allowed if args.show_max_allowed else limits.recommended_max_pods)(
            args.prefix_delegation, args.max_eni)
    except InstanceLimitsError as exc:
        print(f"aws-vpc-cni-agent: {exc}", file=sys.stderr)
        return 1
    print(figure)
    return 0


def host_port(address: str) -> tuple[str, int]:
    """'HOST:PORT' ('[v6]:PORT' too) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {address!r}")
    return host.strip("[]"), int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aws-vpc-cni-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--network", default=DEFAULT_NETWORK, help="CNI network name (the conflist's name)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--cni-version", default=DEFAULT_CNI_VERSION, choices=cniresult.SUPPORTED_VERSIONS,
                        help=f"the conflist's cniVersion (default {DEFAULT_CNI_VERSION}; 1.1.0, with GC and STATUS, "
                             "for runtimes whose libcni reads 1.1.0 results)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="keep the warm pool at target")
    run.add_argument("--interval", type=float, default=5.0, help="seconds between pool checks")
    run.add_argument("--conf-dir", help="write the conflist here once the pool can serve (e.g. /etc/cni/net.d)")
    run.add_argument("--metrics-address", default=METRICS_ADDRESS, help="HOST:PORT for /metrics ('' = off)")
    run.add_argument("--introspection-address", default=INTROSPECTION_ADDRESS,
                     help="HOST:PORT for /v1/enis, /v1/pods, /v1/*-env-settings ('' = off)")
    status = sub.add_parser("status", help="show the pool per ENI")
    status.add_argument("--json", action="store_true")
    status.add_argument("--ready", action="store_true",
                        help="exit 0 only once the pool can serve and the conflist is written (a readiness probe)")
    sub.add_parser("render-conflist", help="print the conflist for the settings in the environment")
    write = sub.add_parser("write-conflist", help="write the conflist into a CNI config directory")
    write.add_argument("conf_dir", help="e.g. /etc/cni/net.d")
    pods = sub.add_parser("max-pods", help="kubelet's --max-pods for an instance type, as upstream's "
                                           "max-pods-calculator.sh computes it")
    pods.add_argument("--instance-type", help="e.g. m5.large (default: this node's, from IMDS)")
    pods.add_argument("--prefix-delegation", action="store_true", help="a /28 prefix per address slot (Nitro types)")
    pods.add_argument("--max-eni", type=int, help="ENIs used for pods (MAX_ENI; default: the instance type's limit)")
    pods.add_argument("--show-max-allowed", action="store_true",
                      help="the figure before the recommended ceiling (110 pods; 250 above 30 vCPUs)")
    args = parser.parse_args(argv)
    if args.command == "max-pods":
        return max_pods(args)

    warnings = []
    try:
        cfg = settings.from_env(os.environ, warn=warnings.append)
    except settings.SettingError as exc:
        print(f"aws-vpc-cni-agent: {exc.msg}", file=sys.stderr)
        return 2
    if args.command in ("render-conflist", "write-conflist"):
        for warning in warnings:
            print(f"aws-vpc-cni-agent: warning: {warning}", file=sys.stderr)
    if args.command == "render-conflist":
        print(json.dumps(render_conflist(cfg, args.network, args.cni_version), indent=2))
        return 0
    if args.command == "write-conflist":
        path = write_conflist(render_conflist(cfg, args.network, args.cni_version), args.conf_dir)
        print(f"wrote {path}")
        return 0
    if args.command == "status":
        try:
            status = agentlink.read_status(cfg["AWS_VPC_CNI_DATA_DIR"])
        except OSError as exc:
            print(f"aws-vpc-cni-agent: no agent answers on {cfg['AWS_VPC_CNI_DATA_DIR']}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(status, indent=2, default=str) if args.json else status_table(status))
        return 0 if status.get("ready") or not args.ready else 1

    log = agent_logger(cfg)
    for warning in warnings:
        log.warn(warning)
    try:
        agentlink.hold_agent_lock(cfg["AWS_VPC_CNI_DATA_DIR"], on_wait=lambda: log.info(
            "the agent lock is held shared (plugins probing for an agent); waiting for it"))
    except RuntimeError as exc:
        print(f"aws-vpc-cni-agent: {exc}", file=sys.stderr)
        return 1
    agent = Agent(cfg, args.network, log, args.interval, args.conf_dir, args.cni_version)
    for serve in (agent.serve_nudges, agent.serve_status):
        threading.Thread(target=serve, daemon=True).start()
    try:
        if args.metrics_address:
            from aws_vpc_cni_agent import metrics
            metrics.serve(agent.status, *host_port(args.metrics_address))
        if args.introspection_address:
            from aws_vpc_cni_agent import introspect
            introspect.serve(cfg, agent.read_doc, *host_port(args.introspection_address), log)
    except (OSError, ValueError) as exc:
        print(f"aws-vpc-cni-agent: cannot serve metrics or introspection: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (agent.stopping.set(), agent.wake.set()))
    log.info("agent started", pid=os.getpid(), network=args.network)
    agent.run()
    log.info("agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
