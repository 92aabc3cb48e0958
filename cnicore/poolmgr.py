"""Keeps a node's pool in the store in step with EC2.

This is the one place that turns warm-pool decisions (`warmpool`) into EC2 calls (`ec2`) and store
updates (`pool`). The node agent runs `tick()` in its loop, holding the store lock only to read and
write the document, never during an EC2 call, so pods keep starting from the warm pool meanwhile.
aws-eni-ipam's no-agent slow path runs `grow_for_add()` the same way: it holds the store lock only
to read and to merge, and a lock of its own (`<network>.grow.lock`) so that one ADD grows at a time;
a DEL or a warm ADD never waits for EC2 (with 5 s of EC2 latency a grow takes half a minute).

When the pool calls EC2 is `cnicore.ec2budget`'s (issue #16: every node of a cluster draws from the
same per-account token buckets): each round of the agent compares IMDS (free, per node) with the
store and reads EC2's view (DescribeNetworkInterfaces) only at start, after an EC2 action of its
own, when IMDS has disagreed with the store for longer than IMDS_GRACE, or on a long jittered
interval. When EC2 throttles (or answers 5xx, or not at all) after the per-request retries of
`cnicore.ec2`, the pool backs off: no EC2 call, from the agent's ticks (however often plugins nudge)
or from the slow path, before `agent.backoff.until`; the delay doubles (ec2budget.BACKOFF_BASE to
BACKOFF_MAX, equal jitter) while the errors last and is dropped at the first EC2 round that
succeeds. A pool short of IPs meanwhile says so (`blocked`: what EC2 answered, when the next attempt is).

What the agent last did lives in the document's `agent` section, so a plugin can say why the pool
is empty and a restarted agent keeps its pauses:
    {"blocked": {"reason", "since", "limit"} | null, "insufficient_addresses_at", "insufficient_reason",
     "prefixes_refused_at", "last_release_at",
     "last_error": {"action", "code", "message", "kind", "at"} | null, "last_refresh", "last_tick",
     "adopted": {eni_id: attachment_id}, "backoff": {"delay", "until"} | null}

Crash safety (the agent may be SIGKILLed between any two lines): the store never lists an ENI or an
IP that EC2 does not attach to the node, so no pod is ever handed an address the VPC would not
deliver. EC2 may list more than the store, for a while:
- a grow in flight: EC2 has assigned IPs or attached an ENI that the store learns from EC2's view
  at the end of the tick, or after a kill, from the restart's reconcile;
- IPs being given back: they leave the store (under the lock, so no pod gets them) before
  UnassignPrivateIpAddresses, and an ENI being freed leaves it before its detach. Should the agent
  die in between, EC2 still lists them; the restart's reconcile takes them back as free (an ENI
  with them) and the pool gives back its surplus again. They are never lost, nor handed out while
  EC2 may be taking them away.
An ENI a kill left created but never attached, or detached but not deleted, is deleted by the
leaked-ENI sweep (`cnicore.leaksweep`: detached ENIs of this VPC and cluster, created by us more than
an hour ago) that `tick` runs about hourly; an ENI of ours that the store adopts from EC2's view
without this process having attached it (a kill between AttachNetworkInterface and
ModifyNetworkInterfaceAttribute) gets DeleteOnTermination on the next tick (`adopted`).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import random
import time

from . import instance_limits, warmpool
from .ec2 import ENI_DESCRIPTION_PREFIX  # cnicore.ec2 imports boto3 only when it calls EC2
from .ec2budget import REASON_ACTION, REASON_START, EC2Budget, disagreements
from .errors import AWS_FAILURE, CNIError
from .pool import Blocked, Document, LastError, NodeFacts, Pool, new_document, prefix_addresses
from .store import Store

NO_MANAGE_TAG = "node.k8s.amazonaws.com/no_manage"  # upstream: an ENI so tagged is not the CNI's
READ_LEAK_SWEEP = "leak-sweep"  # an `ec2_reads` reason beside ec2budget's: the hourly leaked-ENI sweep


class GrowError(CNIError):
    """aws-eni-ipam's slow path could not learn from IMDS or EC2 what the node has (code 101)."""

    def __init__(self, msg: str):
        super().__init__(AWS_FAILURE, msg)


class NodePool:
    """One node's pool: facts from IMDS, ENIs and IPs from EC2, decisions from warmpool."""

    def __init__(self, cfg, log, *, imds=None, ec2=None, clock=time.time):
        self.cfg = cfg
        self.log = log
        self.clock = clock
        self.settings = warmpool.PoolSettings.from_settings(cfg)
        self._imds = imds
        self._ec2 = ec2
        self._allocated: set[str] = set()  # ENIs this process attached (and set DeleteOnTermination on)
        self._unmanaged: set[str] = set()  # MACs of attached ENIs EC2's last view showed as not the pool's
        self._throttled = False  # EC2 throttled, failed with 5xx or did not answer in this round
        self._rng: random.Random | None = None  # seeded by the instance ID (see `budget`)
        self._budget: EC2Budget | None = None
        self._sweep = None  # cnicore.leaksweep.LeakSweep, once the node's VPC is known
        # why this process listed ENIs in EC2 (DescribeNetworkInterfaces): an ec2budget REASON_* or
        # READ_LEAK_SWEEP, the count of each: where a node's steady EC2 cost comes from
        self.ec2_reads: collections.Counter[str] = collections.Counter()

    # --- AWS access (created on first use: boto3 is imported only then) -------------------------
    @property
    def imds(self):
        if self._imds is None:
            from .imds import IMDS
            self._imds = IMDS()
        return self._imds

    def ec2(self, doc: dict):
        if self._ec2 is None:
            from .ec2 import EC2
            node = Document(doc).node
            self._ec2 = EC2(node.instance_id, region=node.region, cluster_name=self.cfg.cluster_name)
        return self._ec2

    def budget(self, doc: dict) -> EC2Budget:
        """The node's EC2 budget; its RNG is seeded by the instance ID, so that a cluster's nodes,
        started together, spread their reads, backoffs and sweeps out. Its backoff is the document's
        (`agent.backoff`), which the plugins' slow path and a restarted agent share."""
        if self._budget is None:
            self._rng = random.Random(Document(doc).node.instance_id)
            self._budget = EC2Budget(self.clock, self._rng)
        self._budget.restore_backoff(Document(doc).agent.backoff)
        return self._budget

    def ec2_calls(self) -> dict[str, int]:
        """EC2 requests this process has sent, per action."""
        return dict(self._ec2.calls) if self._ec2 is not None else {}

    def ec2_errors(self) -> list[list]:
        """EC2 requests of this process that failed: [action, error code, count] rows."""
        return sorted([*key, count] for key, count in self._ec2.errors.items()) if self._ec2 is not None else []

    def ec2_latency(self) -> list[list]:
        """Time spent in this process's EC2 requests: [action, failed "true"/"false", HTTP status,
        requests, milliseconds] rows."""
        return sorted([*key, *value] for key, value in self._ec2.latency.items()) if self._ec2 is not None else []

    # --- the document -------------------------------------------------------------------------
    def new_document(self) -> dict:
        """A fresh document: node facts from IMDS, limits from the shipped table (or EC2)."""
        ident = self.imds.identity()
        primary = self.imds.eni(ident.primary_mac)
        doc = new_document(NodeFacts.new(
            instance_id=ident.instance_id, instance_type=ident.instance_type, region=ident.region,
            availability_zone=ident.availability_zone, primary_mac=primary.mac, primary_eni=primary.interface_id,
            primary_ip=primary.primary_ip, subnet_id=primary.subnet_id, subnet_cidr=primary.subnet_cidr,
            security_groups=list(primary.security_group_ids), vpc_id=primary.vpc_id,
            vpc_cidrs=list(primary.vpc_cidrs)).as_dict())
        limits = type_limits(ident.instance_type, self.ec2(doc))
        node = Document(doc).node
        node.max_enis, node.ipv4_per_eni = limits.max_enis, limits.ipv4_per_eni
        return doc

    def limits(self, doc: dict) -> instance_limits.InstanceLimits:
        node = Document(doc).node
        return instance_limits.InstanceLimits(node.instance_type, node.max_enis, node.ipv4_per_eni)

    def ec2_view(self, doc: dict, enis) -> tuple[list, dict[str, str]]:
        """EC2's ENIs with the subnet CIDR of each, from the document or IMDS: called without the
        store lock (IMDS may be slow), so that `apply_ec2_view` under the lock makes no call. An ENI
        whose subnet IMDS cannot tell (yet) is left out of this view, and the rest merged."""
        from .imds import IMDSError
        node, known = Document(doc).node, Document(doc).enis
        subnets = {}
        for eni in enis:
            if eni.subnet_id == node.subnet_id:
                subnets[eni.eni_id] = node.subnet_cidr
            elif eni.eni_id in known and known[eni.eni_id].subnet_cidr:
                subnets[eni.eni_id] = known[eni.eni_id].subnet_cidr
            elif eni.device_index is not None:
                try:
                    subnets[eni.eni_id] = self.imds.eni(eni.mac).subnet_cidr
                except IMDSError as exc:
                    self.log.warn(f"ENI left out of this round: IMDS does not tell its subnet: {exc}", eni=eni.eni_id)
        return enis, subnets

    def apply_ec2_view(self, doc: dict, view) -> None:
        """Make the document's ENIs and secondary IPs those EC2 reports attached to the instance
        (`view`: from `ec2_view`). Assignments are kept; an ENI that vanished while holding pods is
        kept and reported."""
        enis, subnets = view
        pool = Pool(doc, self.clock())
        stored = Document(doc).enis
        seen = set()
        self._unmanaged = {eni.mac for eni in enis if eni.tags.get(NO_MANAGE_TAG, "").lower() == "true"}
        for eni in enis:
            if eni.device_index is None or eni.mac in self._unmanaged:
                continue
            seen.add(eni.eni_id)
            known = stored.get(eni.eni_id)
            subnet_cidr = (known and known.subnet_cidr) or subnets.get(eni.eni_id)
            if subnet_cidr is None:
                continue  # IMDS could not tell its subnet: next round (kept if the store has it)
            if (not known and eni.device_index != 0 and eni.attachment_id and eni.eni_id not in self._allocated
                    and eni.description.startswith(ENI_DESCRIPTION_PREFIX)):
                Document(doc).agent.adopt(eni.eni_id, eni.attachment_id)
            put = pool.put_eni(eni.eni_id, mac=eni.mac, device_number=eni.device_index, subnet_cidr=subnet_cidr,
                               primary_ip=eni.primary_ip, primary=eni.device_index == 0,
                               attached_at=known.attached_at if known else self.clock())
            put.ours = eni.description.startswith(ENI_DESCRIPTION_PREFIX)
            lost = pool.set_secondary_ips(eni.eni_id, list(eni.secondary_ips), list(eni.prefixes))
            if lost:
                self.log.error("EC2 no longer lists IPs that pods hold", eni=eni.eni_id, ips=lost)
        for eni_id, eni in stored.items():
            if eni_id in seen:
                continue
            if eni.holds_pods:
                self.log.error("an ENI holding pods is no longer attached", eni=eni_id)
            else:
                pool.remove_eni(eni_id)

    def decide(self, doc: dict, waiting: int = 0) -> warmpool.Decision:
        """The warm pool's decision on `doc`, with `waiting` pods waiting for an IP."""
        agent = Document(doc).agent
        return warmpool.decide(self.eni_states(doc), self.settings, self.limits(doc), self.clock(),
                               last_release_at=agent.last_release_at,
                               insufficient_addresses_at=agent.insufficient_addresses_at,
                               insufficient_reason=agent.insufficient_reason,
                               prefixes_refused_at=agent.prefixes_refused_at, waiting=waiting)

    def eni_states(self, doc: dict) -> list[warmpool.ENIState]:
        return [warmpool.ENIState.from_stats(row)
                for row in Pool(doc, self.clock(), self.cfg.ip_cooldown_period).eni_stats()]

    # --- acting -------------------------------------------------------------------------------
    def grow(self, doc: dict, steps) -> None:
        """Run grow steps against EC2 (existing ENIs first, then new ones). Errors are recorded in
        the document and stop the remaining steps; the caller applies EC2's view afterwards."""
        from .ec2 import EC2Error, InsufficientAddresses, PrefixesUnsupported
        ec2 = self.ec2(doc)
        node, agent = Document(doc).node, Document(doc).agent
        budget = self.budget(doc)
        try:
            for step in steps:
                if isinstance(step, warmpool.AssignIPs):
                    ec2.assign_ips(step.eni_id, step.count)
                elif isinstance(step, warmpool.AssignPrefixes):
                    ec2.assign_prefixes(step.eni_id, step.count)
                else:
                    eni = ec2.allocate_eni(node.subnet_id, node.security_groups)
                    self._allocated.add(eni.eni_id)
                    budget.acted()  # attached, whatever becomes of the assign
                    self.log.info("attached a new ENI", eni=eni.eni_id, device=eni.device_index)
                    (ec2.assign_prefixes if step.prefixes else ec2.assign_ips)(eni.eni_id, step.count)
                budget.acted()
        except EC2Error as exc:
            if _may_have_changed_the_node(exc):
                budget.acted()
            if isinstance(exc, InsufficientAddresses):
                agent.insufficient_addresses_at = self.clock()
                agent.insufficient_reason = _insufficient_reason(exc.code, node)
            elif isinstance(exc, PrefixesUnsupported):
                agent.prefixes_refused_at = self.clock()
            self._record_error(doc, exc)

    def _record_error(self, doc: dict, exc) -> None:
        from .ec2 import EC2Throttled, EC2Unreachable, InsufficientAddresses, PrefixesUnsupported
        kind = ("throttled" if isinstance(exc, EC2Throttled) else "unreachable" if isinstance(exc, EC2Unreachable)
                else "insufficient-addresses" if isinstance(exc, InsufficientAddresses)
                else "prefixes-unsupported" if isinstance(exc, PrefixesUnsupported) else "error")
        Document(doc).agent.last_error = LastError.new(action=exc.action, code=exc.code, message=exc.message,
                                                       kind=kind, at=self.clock())
        if kind in ("throttled", "unreachable"):
            self._throttled = True
        self.log.error(str(exc))

    # --- backing off from a throttling EC2 -----------------------------------------------------
    def backoff_left(self, doc: dict) -> float:
        """Seconds before the pool may call EC2 again (0: now)."""
        return self.budget(doc).backoff_left()

    def _after_ec2_round(self, doc: dict, calls_before: int) -> None:
        """Lengthen the pause after a throttled round; drop it after a round whose calls succeeded."""
        budget = self.budget(doc)
        if self._throttled:
            budget.throttled()
        elif sum(self.ec2_calls().values()) > calls_before:
            budget.succeeded()
        Document(doc).agent.backoff = budget.backoff_state()

    def blocked_reason(self, doc: dict, decision: warmpool.Decision) -> str | None:
        """Why the pool is short and cannot grow now, in words an operator acts on."""
        if decision.blocked:
            return decision.blocked
        error = Document(doc).agent.last_error
        if error and self.clock() - error.at < 60:
            left = self.backoff_left(doc)
            retry = f"; next attempt in {left:.0f} s" if left else ""
            if error.kind == "throttled":
                return f"EC2 is throttling or failing this node's requests ({error.code} on {error.action}){retry}"
            if error.kind == "unreachable":
                return f"EC2 does not answer ({error.action}: {error.message}){retry}"
            return f"EC2 {error.action} failed: {error.code}: {error.message}"
        return None

    def refresh(self, doc: dict) -> None:
        self.ec2_reads[REASON_START] += 1
        self.apply_ec2_view(doc, self.ec2_view(doc, self.ec2(doc).instance_enis()))

    # --- the users ----------------------------------------------------------------------------
    def reconcile(self, store: Store) -> dict:
        """The agent's start-up: the store in line with EC2 (a new document from IMDS if there is
        none; an unusable one is set aside and rebuilt), without holding the store lock during an
        IMDS or EC2 call, so pods keep starting and stopping from the warm pool while EC2 is slow,
        throttling or down. Raises what IMDS or EC2 raise (the agent retries)."""
        from .store import StoreError
        with store.locked() as tx:
            try:
                doc = tx.read()
            except StoreError as exc:
                aside = store.set_aside()
                self.log.error("state store unusable; rebuilding from EC2", error=str(exc), kept_at=aside)
                doc = None
        if doc is None:
            doc = self.new_document()
        self.ec2_reads[REASON_START] += 1
        enis = self.ec2_view(doc, self.ec2(doc).instance_enis())
        node = self._node_view(doc)
        with store.locked() as tx:
            fresh = tx.read() or doc
            _update_node(fresh, node)
            self.apply_ec2_view(fresh, enis)
            Document(fresh).agent.last_refresh = self.clock()
            tx.write(fresh)
        self.budget(fresh).read()
        return fresh

    def _load(self, store: Store) -> None:
        """Make sure the store has a document, building it (IMDS, EC2) without the lock."""
        with store.locked(shared=True) as tx:
            if tx.read() is not None:
                return
        doc = self.new_document()
        self.refresh(doc)
        with store.locked() as tx:
            if tx.read() is None:
                tx.write(doc)

    def grow_for_add(self, store: Store) -> None:
        """No agent on the node: bring the pool to target now, at least one free IP. EC2 and IMDS
        are called without the store lock (the caller holds the grow lock); EC2's view is merged
        into the document as it is then."""
        releasing, releasing_prefixes = {}, {}
        with store.locked() as tx:
            doc = tx.read()
            if doc is not None and not self.backoff_left(doc):
                # after a switch of mode, the other kind's free addresses go back first (their slots)
                decision = self.decide(doc)
                drain = warmpool.Decision(decision.figures, release=warmpool.drain_steps(decision))
                releasing, releasing_prefixes = self._take_releases(doc, drain), self._take_releases(doc, drain, prefixes=True)
                if releasing or releasing_prefixes:
                    tx.write(doc)
        if doc is None:  # the node's first ADD: facts from IMDS, ENIs from EC2
            doc = self.new_document()
            self.refresh(doc)
            with store.locked() as tx:
                current = tx.read()
                if current is None:
                    tx.write(doc)
                else:
                    doc = current
        if self.backoff_left(doc):
            return
        self._throttled = False
        calls = sum(self.ec2_calls().values())
        self._release(doc, releasing)
        self._release(doc, releasing_prefixes, prefixes=True)
        pool = Pool(doc, self.clock(), self.cfg.ip_cooldown_period)
        decision = self.decide(doc)
        steps = decision.grow
        if not steps and pool.free_count() == 0 and not decision.blocked:
            if self.settings.prefix_delegation:
                steps = warmpool.prefix_grow_plan(self.eni_states(doc), 1, self.limits(doc).ips_per_eni,
                                                  decision.figures.max_enis)[0]
            else:
                steps = warmpool.grow_plan(self.eni_states(doc), 1, decision.figures.ips_per_eni,
                                           decision.figures.max_enis, whole_enis=False)[0]
        enis = None
        if steps:
            self.grow(doc, steps)
            if not self._throttled:
                enis = self._ec2_view(doc, REASON_ACTION)
        self._after_ec2_round(doc, calls)
        self._merge(store, doc, enis)

    def _merge(self, store: Store, doc: dict, enis, waiting: int = 0) -> warmpool.Decision:
        """Under the lock: the agent section of `doc` and EC2's view (if read) into the stored
        document, which pods changed meanwhile; return the decision on the result."""
        with store.locked() as tx:
            fresh = tx.read() or doc
            agent = Document(doc).agent
            Document(fresh).agent = agent
            if enis is not None:
                self.apply_ec2_view(fresh, enis)
                agent.last_refresh = self.clock()
            decision = self.decide(fresh, waiting)
            agent.blocked = self._blocked_entry(fresh, decision)
            agent.warm_floor = warmpool.warm_floor(self.settings, self.limits(fresh))
            tx.write(fresh)
        return decision

    def tick(self, store: Store, waiting: int = 0) -> warmpool.Decision:
        """One round of the agent's loop: compare IMDS with the store, decide (`waiting` pods wait for
        an IP: see warmpool), act on EC2 without the lock, and read and merge EC2's view when the
        budget says so."""
        self._throttled = False
        self._load(store)
        with store.locked(shared=True) as tx:
            doc = tx.read()
        node = self._node_view(doc)  # IMDS: free, every round
        agrees = self._imds_agrees(doc)
        budget = self.budget(doc)
        if agrees is not None:
            budget.compared(agrees)
        if budget.read_due() == REASON_ACTION:
            # an earlier round acted and could not read back what it did (EC2 throttled it): grown
            # on the store alone, this round would attach a second ENI for the one attached then
            calls = sum(self.ec2_calls().values())
            enis = self._ec2_view(doc, REASON_ACTION)
            self._after_ec2_round(doc, calls)
            Document(doc).agent.last_tick = self.clock()
            decision = self._merge(store, doc, enis, waiting)
            if enis is None:
                return decision
            budget.read()
        with store.locked() as tx:
            doc = tx.read()
            _update_node(doc, node)
            decision = self.decide(doc, waiting)
            agent = Document(doc).agent
            if self.backoff_left(doc):  # EC2 throttled us: no call before the pause is over
                agent.blocked = self._blocked_entry(doc, decision)
                agent.last_tick = self.clock()
                tx.write(doc)
                return decision
            releasing = self._take_releases(doc, decision)
            releasing_prefixes = self._take_releases(doc, decision, prefixes=True)
            freeing = self._take_free_eni(doc, decision)
            tx.write(doc)
        calls = sum(self.ec2_calls().values())
        self._release(doc, releasing)  # first: a switch of mode frees slots the grow may use
        self._release(doc, releasing_prefixes, prefixes=True)
        self.grow(doc, decision.grow)
        self._free_eni(doc, freeing)
        if not self._throttled:
            self._repair_adopted(doc)
            self._sweep_leaked(doc)
        reason = None if self._throttled else budget.read_due()
        enis = self._ec2_view(doc, reason) if reason else None
        self._after_ec2_round(doc, calls)
        agent.last_tick = self.clock()
        decision = self._merge(store, doc, enis, waiting)
        if enis is not None:
            budget.read()
        return decision

    def _imds_agrees(self, doc: dict) -> bool | None:
        """Whether IMDS lists the store's ENIs with the store's secondary IPs and /28 prefixes (the
        primary IP and a prefix's addresses apart), and no other ENI but those EC2's last view showed
        as not the pool's (NO_MANAGE_TAG); None (no comparison) when IMDS fails."""
        from .imds import IMDSError
        store, imds = {}, {}
        try:
            attached = set(self.imds.macs())
            for eni in Document(doc).enis.values():
                in_prefixes = {ip for prefix in eni.prefixes for ip in prefix_addresses(prefix)}
                store[eni.mac] = {ip for ip in eni.ips if ip not in in_prefixes} | set(eni.prefixes)
                if eni.mac in attached:
                    imds[eni.mac] = set(self.imds.local_ipv4s(eni.mac)[1:]) | set(self.imds.ipv4_prefixes(eni.mac))
            for mac in attached - store.keys() - self._unmanaged:
                imds[mac] = set()  # attached, and the store does not know it: EC2's view will tell
        except IMDSError as exc:
            self.log.warn(f"IMDS not compared with the store this round: {exc}")
            return None
        return not disagreements(store, imds)

    def _blocked_entry(self, doc: dict, decision: warmpool.Decision) -> Blocked | None:
        reason = self.blocked_reason(doc, decision) if decision.figures.short or decision.blocked else None
        if reason is None:
            return None
        previous = Document(doc).agent.blocked
        # `limit`: the instance (or MAX_ENI) allows no more IPs: a plugin must not say it is growing
        return Blocked.new(reason=reason, since=previous.since if previous else self.clock(), limit=decision.limited)

    def _node_view(self, doc: dict) -> tuple[list[str], str | None] | None:
        """The node facts that change while the node runs: the VPC's CIDR blocks (one associated
        later must not be SNATed; aws-snat reads them from the store), and the VPC's ID for a document
        written before it was kept (else None); for `_update_node`. None when IMDS does not say."""
        from .imds import IMDSError
        node = Document(doc).node
        try:
            cidrs = self.imds.vpc_cidrs(node.primary_mac)
            if not cidrs:
                raise IMDSError("IMDS lists no VPC CIDR block for the primary ENI")
            return list(cidrs), None if node.vpc_id else self.imds.vpc_id(node.primary_mac)
        except IMDSError as exc:
            self.log.warn(f"node facts not refreshed: {exc}")
            return None

    def _ec2_view(self, doc: dict, reason: str):
        """The instance's ENIs as EC2 lists them (see `ec2_view`), or None (error recorded) if EC2
        does not say. `reason`: why it is read (counted in `ec2_reads`)."""
        from .ec2 import EC2Error
        self.ec2_reads[reason] += 1
        try:
            return self.ec2_view(doc, self.ec2(doc).instance_enis())
        except EC2Error as exc:
            self._record_error(doc, exc)
            return None

    def _take_releases(self, doc: dict, decision, prefixes: bool = False) -> dict[str, list[str]]:
        """Take the free IPs (or prefixes, with their addresses) to give back out of the pool, under
        the lock, so no pod gets them; the highest go back."""
        pool = Pool(doc, self.clock(), self.cfg.ip_cooldown_period)
        kind = warmpool.ReleasePrefixes if prefixes else warmpool.ReleaseIPs
        taken: dict[str, list[str]] = {}
        for step in decision.release:
            if not isinstance(step, kind):
                continue
            free = pool.free_prefixes(step.eni_id) if prefixes else pool.free_ips(step.eni_id)
            free = free[len(free) - min(step.count, len(free)):]
            for item in free:
                (pool.remove_prefix if prefixes else pool.remove_ip)(step.eni_id, item)
            if free:
                taken[step.eni_id] = free
        return taken

    def _take_free_eni(self, doc: dict, decision) -> str | None:
        eni_id = decision.free_eni
        if eni_id is None or not Document(doc).enis[eni_id].ours:
            return None  # never detach an ENI someone else attached
        pool = Pool(doc, self.clock(), self.cfg.ip_cooldown_period)
        stats = next(row for row in pool.eni_stats() if row["eni_id"] == eni_id)
        if stats["assigned"] or stats["cooling"]:
            return None
        pool.remove_eni(eni_id)
        return eni_id

    def _release(self, doc: dict, releasing: dict[str, list[str]], prefixes: bool = False) -> None:
        from .ec2 import EC2Error
        for eni_id, ips in releasing.items():
            # read EC2's view next whatever the outcome: the store dropped these before the call, so
            # a refused one is put back (as free) only by that read (unlike a grow's refusal)
            self.budget(doc).acted()
            try:
                if prefixes:
                    self.ec2(doc).unassign_prefixes(eni_id, ips)
                else:
                    self.ec2(doc).unassign_ips(eni_id, ips)
                Document(doc).agent.last_release_at = self.clock()
                self.log.info(f"gave back surplus {'prefixes' if prefixes else 'IPs'}", eni=eni_id, released=ips)
            except EC2Error as exc:
                self._record_error(doc, exc)

    def _repair_adopted(self, doc: dict) -> None:
        """DeleteOnTermination on ENIs of ours attached by a process that died before setting it."""
        from .ec2 import EC2Error
        agent = Document(doc).agent
        for eni_id, attachment_id in list((agent.adopted or {}).items()):
            try:
                self.ec2(doc).delete_on_termination(eni_id, attachment_id)
                self.log.info("set DeleteOnTermination on an adopted ENI", eni=eni_id)
            except EC2Error as exc:
                if exc.code not in ("InvalidNetworkInterfaceID.NotFound", "InvalidAttachmentID.NotFound"):
                    self._record_error(doc, exc)
                    continue
            agent.forget_adopted(eni_id)

    def _sweep_leaked(self, doc: dict) -> None:
        """Delete ENIs of ours attached to nothing (left by a kill mid-allocate or mid-free) when the
        node's sweep is due (`cnicore.leaksweep`: about hourly, jittered; this VPC and cluster only)."""
        from .ec2 import EC2Error
        from .leaksweep import LeakSweep
        vpc_id = Document(doc).node.vpc_id
        if not vpc_id:
            return  # IMDS has not told the VPC yet: the sweep waits (it must filter by VPC)
        if self._sweep is None:
            self._sweep = LeakSweep(self.ec2(doc), vpc_id, self.cfg.cluster_name, self.log, clock=self.clock,
                                    rng=self._rng)
        if self._sweep.due() and self._sweep.enabled:
            self.ec2_reads[READ_LEAK_SWEEP] += 1
        try:
            self._sweep.maybe_run()
        except EC2Error as exc:
            self._record_error(doc, exc)

    def _free_eni(self, doc: dict, eni_id: str | None) -> None:
        from .ec2 import EC2Error
        if eni_id is None:
            return
        self.budget(doc).acted()  # as for a release: the store dropped the ENI before the call
        try:
            self.ec2(doc).free_eni(eni_id)
            self.log.info("freed an idle ENI", eni=eni_id)
        except EC2Error as exc:
            self._record_error(doc, exc)


def _update_node(doc: dict, seen: tuple[list[str], str | None] | None) -> None:
    """The node facts `_node_view` read (if it did) into the document."""
    if seen is not None:
        node = Document(doc).node
        node.vpc_cidrs = seen[0]
        if seen[1] is not None:
            node.vpc_id = seen[1]


def _may_have_changed_the_node(exc) -> bool:
    """Whether a request of ours that failed may still have changed the node's ENIs or addresses,
    so that EC2's view must be read before the next round acts. A request EC2 refused on every
    attempt (throttled, a limit, a bad parameter) did nothing: reading after each would cost a cold
    start one DescribeNetworkInterfaces per throttled grow. One that got a 5xx or no answer on any
    attempt may have run; a failed ModifyNetworkInterfaceAttribute follows an attach whose undoing
    may have failed too."""
    return exc.action == "ModifyNetworkInterfaceAttribute" or exc.may_have_run


def _insufficient_reason(code: str, node) -> str:
    """What EC2's InsufficientCidrBlocks or InsufficientFreeAddressesInSubnet means, naming the subnet."""
    subnet = f"subnet {node.subnet_id} ({node.subnet_cidr})"
    if code == "InsufficientCidrBlocks":
        return (f"EC2 answered InsufficientCidrBlocks for {subnet}: no aligned /28 block is free for an IPv4 "
                f"prefix (the subnet is fragmented or full; AWS recommends a subnet CIDR reservation "
                f"for prefixes)")
    return f"EC2 answered {code} for {subnet}: the subnet is out of addresses"


def type_limits(instance_type: str, ec2) -> instance_limits.InstanceLimits:
    """An instance type's limits: the shipped table's, else DescribeInstanceTypes' through `ec2` (a
    type newer than the table). Raises InstanceLimitsError when neither tells them."""
    from .ec2 import EC2Error
    limits = instance_limits.from_table(instance_type)
    if limits is not None:
        return limits
    try:
        return ec2.instance_type_limits(instance_type)
    except EC2Error as exc:
        raise instance_limits.InstanceLimitsError(
            f"instance type {instance_type!r} is not in the shipped limits table and "
            f"DescribeInstanceTypes failed: {exc}") from exc


def grow_for_add(store: Store, cfg, network: str, log, locked: bool = False) -> None:
    """aws-eni-ipam's slow path (no agent running): grow the pool, one ADD at a time (the grow lock;
    `locked`: the caller holds it), without holding the store lock during EC2 and IMDS calls. Raises
    GrowError if IMDS or EC2 cannot tell what the node has; a grow EC2 refused is recorded in the
    document instead (and the ADD answers 11 saying so)."""
    from .ec2 import EC2Error
    from .imds import IMDSError
    try:
        with contextlib.nullcontext() if locked else grow_lock(store):
            NodePool(cfg, log).grow_for_add(store)
    except (EC2Error, IMDSError, instance_limits.InstanceLimitsError) as exc:
        raise GrowError(f"cannot grow the pool of network {network}: {exc}") from None


@contextlib.contextmanager
def grow_lock(store: Store):
    """Serialises the plugins' slow-path grows of one network (never held with the store lock
    waited for first: take this, then the store lock, never the other way round)."""
    path = os.path.join(store.data_dir, f"{store.network}.grow.lock")
    os.makedirs(store.data_dir, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
