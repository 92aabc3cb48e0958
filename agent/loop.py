"""The agent's loop: it reconciles the store with IMDS and EC2 first (rebuilding it, with the bad
file kept aside, if it is corrupt), then, every `interval` seconds or at once when a plugin nudges,
heals the node (`Agent.heal`), runs one `NodePool.tick` and writes the conflist once the pool can
serve. Its status feeds the status socket (`sockets.py`), the metrics (`metrics.py`) and the CLI.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import struct
import threading
import time

from aws_vpc_cni_agent.conflist import CONFLIST_NAME, DEFAULT_CNI_VERSION, render_conflist, write_conflist
from cnicore.log import Logger
from cnicore.pool import ASSIGNED, Document, Pool
from cnicore.rawnetlink import control_socket
from cnicore.rtnl import DataPathError
from cnicore.store import Store, StoreError

SIOCGIFMTU, SIOCSIFMTU = 0x8921, 0x8922
IFREQ_MTU = struct.Struct("16si20x")  # struct ifreq: the name, then ifr_mtu in the 24-byte union
ADD_GRACE = 120.0  # s a reservation may exist without its host veth when no live process owns it
WAITING_TTL = 120.0  # s an attachment that found no free IP counts as waiting after its last try


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
    """The node agent: its state, its loop (`run`) and each round's healing (`heal`)."""

    def __init__(self, cfg, network: str, log: Logger, interval: float, conf_dir: str | None = None,
                 cni_version: str = DEFAULT_CNI_VERSION):
        from cnicore.poolmgr import NodePool
        self.cfg = cfg
        self.conf_dir = conf_dir  # where the conflist goes once the pool can serve (None: not written)
        self.cni_version = cni_version
        self.ready = False
        self.log = log
        self.interval = interval
        self.data_dir = cfg.data_dir
        self.store = Store(self.data_dir, network)
        self.pool = NodePool(cfg, log)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.last_decision = None
        self.ticks = 0
        self.startup_error: str | None = None
        self.releases: set[tuple[str, str, str, float]] = set()  # handed over by DELs: (cid, ifname, ip, when)
        self.releases_lock = threading.Lock()
        self.waiting: dict[tuple[str, str], float] = {}  # (cid, ifname) -> when its ADD last found no IP
        self.waiting_lock = threading.Lock()
        self.unclaimable: set[tuple[str, str, str]] = set()  # reported once each
        self.in_progress: collections.Counter[str] = collections.Counter()  # action -> running now (metrics)
        self.errors: collections.Counter[str] = collections.Counter()  # action -> failures (metrics)
        self.zygote_pid: int | None = None  # the plugins' resident helper (aws_vpc_cni_agent.zygote)
        self.zygote_starts = 0

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
        from cnicore import veths
        with self.store.locked(shared=True) as tx:
            before = tx.read()
        if before is None:
            return
        seen = {ip: entry for eni in Document(before).enis.values() for ip, entry in eni.ips.items()}
        # judged before the host is listed: an ADD that ends during the listing made its veth after
        # the listing looked, and its owner is gone by the time the listing is applied
        now = time.time()
        in_flight = {ip for ip, entry in seen.items() if entry.state == ASSIGNED and (
            process_alive(entry.owner) or (not entry.owner and now - entry.since <= ADD_GRACE))}
        on_host = {}
        for veth in veths.list_host_veths(self.cfg.veth_prefix):
            att = veth.attachment
            if att is not None and att.network == self.store.network:
                on_host[(att.container_id, att.ifname)] = veth.pod_ips
        with self.releases_lock:
            handed = set(self.releases)
        with self.store.locked() as tx:
            doc = tx.read()
            now = time.time()
            pool = Pool(doc, now, self.cfg.ip_cooldown_period)
            changed = False
            for (cid, ifname), ips in on_host.items():
                for ip in ips:
                    entry = pool.entry(ip)
                    if entry is not None and (entry != seen.get(ip) or (entry.state == ASSIGNED and (
                            entry.container_id, entry.ifname) == (cid, ifname))):
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
                if any(h[:3] == (cid, ifname, ip) and h[3] >= entry.since for h in handed):
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
        from cnicore import podroutes, veths
        with self.store.locked(shared=True) as tx:
            doc = tx.read()
        if doc is None:
            return
        pods = []
        held = {ip: (eni, entry) for eni in Document(doc).enis.values() for ip, entry in eni.ips.items()
                if entry.state == ASSIGNED}
        for veth in veths.list_host_veths(self.cfg.veth_prefix):
            att = veth.attachment
            for ip in veth.pod_ips if att is not None and att.network == self.store.network else ():
                eni, entry = held.get(ip, (None, None))
                if entry is None or (entry.container_id, entry.ifname) != (att.container_id, att.ifname):
                    continue  # not this pod's in the store: not ours to route
                pods.append((ip, None if eni.primary else podroutes.SecondaryEni(
                    mac=eni.mac, device_number=eni.device_number, subnet=eni.subnet_cidr,
                    mtu=self.cfg.eni_mtu, primary_ip=eni.primary_ip)))
        repaired = podroutes.repair_node(pods)
        if repaired:
            self.log.info("repaired the data path of running pods", repaired=repaired)

    def _converge_node_rules(self) -> None:
        """aws-snat's node-wide rules, by aws-snat's own code and stamp (no iptables call while they
        are as it left them), for the settings this agent renders into the conflist."""
        from aws_snat import noderules as snat
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
        except (OSError, DataPathError) as exc:  # pods still work at the old MTU; said once, as upstream logs it
            self.log.error(f"cannot set the primary ENI's MTU: {exc}")
        while not self.stopping.is_set():
            try:
                with self.action("nodeHeal"):
                    self.heal()
            except Exception as exc:  # the tick still runs; the next round heals again
                self.log.error(f"healing the node failed: {type(exc).__name__}: {exc}")
            try:
                with self.action("nodeIPPoolTick"):
                    self.last_decision = self.pool.tick(self.store, self.pods_waiting())
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
        from aws_snat.noderules import primary_interface
        doc = self.read_doc()
        mac = Document(doc).node.primary_mac if doc else None
        name = primary_interface(mac, self.data_dir) if mac else None
        if name is None:
            raise OSError(f"no interface has the primary ENI's MAC {mac}")
        mtu = self.cfg.eni_mtu
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
        pool = Pool(doc, time.time(), self.cfg.ip_cooldown_period)
        figures = self.last_decision.figures.__dict__ if self.last_decision else None
        blocked, error = Document(doc).agent.blocked, Document(doc).agent.last_error
        calls = self.pool.ec2_calls()
        return {"node": Document(doc).node.as_dict(), "enis": pool.eni_stats(), "figures": figures,
                "blocked": None if blocked is None else blocked.as_dict(),
                "last_error": None if error is None else error.as_dict(),
                "ec2_calls": calls, "ec2_reads": dict(self.pool.ec2_reads), "ec2_errors": self.pool.ec2_errors(),
                "ec2_latency": self.pool.ec2_latency(),
                "ticks": self.ticks, "startup_error": self.startup_error,
                "in_progress": dict(self.in_progress), "errors": dict(self.errors), "ready": self.ready,
                "zygote": {"pid": self.zygote_pid, "starts": self.zygote_starts}}

    def read_doc(self) -> dict | None:
        with self.store.locked(shared=True) as tx:
            return tx.read()

    def wait_for_ip(self, container_id: str, ifname: str) -> None:
        """An ADD found no free IP (the nudge socket): the attachment is demand until it has an IP or
        its runtime stops trying (WAITING_TTL after its last try)."""
        with self.waiting_lock:
            self.waiting[(container_id, ifname)] = time.time()

    def pods_waiting(self) -> int:
        """How many attachments wait for an IP now; those that got one or stopped trying are forgotten."""
        with self.waiting_lock:
            if not self.waiting:
                return 0
        pool = Pool(self.read_doc() or {}, time.time())  # the store read outside the lock: nudges go on
        now = time.time()
        with self.waiting_lock:
            for key, since in list(self.waiting.items()):
                if now - since > WAITING_TTL or pool.find(*key) is not None:
                    del self.waiting[key]
            return len(self.waiting)

    def hand_over(self, container_id: str, ifname: str, ip: str) -> None:
        """A DEL could not write its release and handed it over (the nudge socket): written next round."""
        with self.releases_lock:
            self.releases.add((container_id, ifname, ip, time.time()))
        self.log.info("a DEL handed over its release", container=container_id, ifname=ifname, ip=ip)
