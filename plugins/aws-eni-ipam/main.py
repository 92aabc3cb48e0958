"""aws-eni-ipam: hands out secondary private IPs of the node's ENIs, or with prefix delegation
(enablePrefixDelegation) addresses of the ENIs' /28 IPv4 prefixes, each as a /32.

Hot path (the pool has a free IP): lock the store, take an IP, write, answer. No EC2, no IMDS, no
boto3 import. Slow path (the pool is empty): with the node agent running, answer "try again later"
(code 11) saying why and nudge the agent; with no agent (e.g. cnitool on a bare node), grow the pool
from EC2, then allocate. The slow path never holds the store lock during an EC2 or IMDS call
(cnicore.poolmgr.grow_for_add), so DELs and warm ADDs of other pods go on while it waits for EC2.
"""

from __future__ import annotations

import os
import time

from cnicore import agentlink, settings, skel
from cnicore.errors import ATTACHMENT_EXISTS, CHECK_FAILED, CNIError, INVALID_CONFIG, PLUGIN_NOT_AVAILABLE, TRY_AGAIN_LATER
from cnicore.pool import Document, Pool, PoolExhausted, leave_handed_out
from cnicore.store import Store, StoreError

GROWING = "the node agent was asked to grow the pool"


def _ipam_conf(args: skel.CmdArgs) -> dict:
    ipam = args.conf.get("ipam", args.conf)
    if not isinstance(ipam, dict):
        raise CNIError(INVALID_CONFIG, "ipam must be an object")
    return ipam


def _settings(args: skel.CmdArgs) -> settings.IPAM:
    return settings.from_conf(_ipam_conf(args), settings.IPAM)


def _store(args: skel.CmdArgs, cfg: settings.IPAM) -> Store:
    return Store(cfg.data_dir, args.network)


def _result(ip: str, gateway: str) -> dict:
    return {"ips": [{"address": f"{ip}/32", "gateway": gateway}], "dns": {}}


def cmd_add(args: skel.CmdArgs) -> dict:
    cfg = _settings(args)
    store = _store(args, cfg)
    got, doc, exhausted = _assign(store, args, cfg)
    if got is None and agentlink.agent_running(cfg.data_dir):
        # the agent grows for this attachment too, not only for its targets
        waiting = agentlink.waiting_message(args.network, args.container_id, args.ifname)
        agentlink.nudge(cfg.data_dir, waiting if len(waiting) <= agentlink.MAX_MESSAGE else b"grow")
        if doc is None:  # the agent has not built the pool yet: ask it why
            raise CNIError(TRY_AGAIN_LATER, _not_started_message(cfg.data_dir), GROWING)
        raise CNIError(TRY_AGAIN_LATER, *_empty_pool_message(doc, exhausted))
    if got is None:
        # No agent: grow now. EC2 is called without the store lock, so DELs and warm ADDs go on
        # meanwhile; one ADD grows at a time, and the next finds what it grew.
        from cnicore import poolmgr  # slow path only: EC2 and IMDS access
        with poolmgr.grow_lock(store):
            got, doc, exhausted = _assign(store, args, cfg)
            if got is None:
                poolmgr.grow_for_add(store, cfg, args.network, args.log, locked=True)
                got, doc, exhausted = _assign(store, args, cfg)
        if got is None:
            raise CNIError(TRY_AGAIN_LATER, _empty_pool_message(doc, exhausted)[0])
        args.log.info("assigned after growing the pool", ip=got.ip, eni=got.eni_id)
    else:
        args.log.debug("assigned from the warm pool", ip=got.ip, eni=got.eni_id)
        if _below_warm_floor(doc) and agentlink.agent_running(cfg.data_dir):
            agentlink.nudge(cfg.data_dir)  # grow now, not at the agent's next tick
    leave_handed_out(args.network, args.container_id, args.ifname, got, Document(doc).enis[got.eni_id])
    return _result(got.ip, got.gateway)


def _below_warm_floor(doc: dict) -> bool:
    """This assignment left the pool short of its warm target (the floor the agent records)."""
    floor = Document(doc).agent.warm_floor
    if not floor:
        return False
    return sum(s["total"] - s["assigned"] for s in Pool(doc, time.time()).eni_stats()) < floor


def _assign(store: Store, args: skel.CmdArgs, cfg: settings.IPAM):
    """(assignment or None, the document, PoolExhausted or None), under the store lock."""
    with store.locked() as tx:
        doc = tx.read()
        if doc is None:
            return None, None, None
        pool = Pool(doc, time.time(), cfg.ip_cooldown_period)
        held = pool.find(args.container_id, args.ifname)
        if held:
            raise CNIError(ATTACHMENT_EXISTS, f"container {args.container_id} interface {args.ifname} "
                                              f"already holds {held.ip}; DEL it first")
        try:
            got = pool.assign(args.container_id, args.ifname, args.pod_namespace, args.pod_name, _owner(args),
                              prefixes=cfg.prefix_delegation)
        except PoolExhausted as exc:
            return None, doc, exc
        tx.write(doc)
        return got, doc, None


def _owner(args: skel.CmdArgs) -> list[int] | None:
    """The process that builds the attachment around the IP (see cnicore.pool): the main plugin, which
    runs this one in its own process or execs it; [pid, start time], None if /proc does not say."""
    pid, parent = skel.runtime_process()
    pid = pid if args.in_process else parent
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return [pid, int(f.read().rsplit(b")", 1)[1].split()[19])]
    except (OSError, IndexError, ValueError):
        return None


def _not_started_message(data_dir: str) -> str:
    """Why a running agent has no pool yet, from its status socket (it reports why its start-up
    reconcile fails, e.g. IMDS down)."""
    try:
        reason = agentlink.read_status(data_dir, timeout=1.0).get("startup_error")
    except (OSError, ValueError, AttributeError):
        reason = None
    why = f"it cannot start: {reason}" if reason else "it is starting"
    return f"no free IP on this node: the node agent has not built the pool yet ({why})"


def _empty_pool_message(doc: dict | None, exhausted: PoolExhausted | None) -> tuple[str, str]:
    """(message, details) of an empty pool, saying which of these it is: the instance's limit is
    reached (nothing can grow it: only a pod leaving frees an IP), EC2 refuses or fails (the agent
    retries), released IPs only cool down (the pool is not short: nothing grows it), or it is
    being grown."""
    blocked = Document(doc).agent.blocked if doc else None
    cooling = exhausted.cooling if exhausted else 0
    cooling_text = (f"{cooling} released IP{'s are' if cooling > 1 else ' is'} cooling down "
                    f"(the first is free again in {exhausted.free_in:.0f} s)") if cooling else ""
    if blocked and blocked.limit:
        why = f"{blocked.reason}; the pool cannot grow"
        details = "an IP comes free when a pod on this node is deleted"
    elif blocked:
        why, details = blocked.reason, GROWING
    elif cooling and not _below_warm_floor(doc):
        why, details = "no IP is free to hand out", "the pool holds enough IPs; it is not grown for IPs cooling down"
    else:
        why, details = "the pool is being grown", GROWING
    return f"no free IP on this node: {why}" + (f"; {cooling_text}" if cooling_text else ""), details


def cmd_del(args: skel.CmdArgs) -> None:
    cfg = _settings(args)
    ip = None
    try:
        with _store(args, cfg).locked() as tx:
            doc = tx.read()
            if doc is None:
                return
            ip = Pool(doc, time.time(), cfg.ip_cooldown_period).release(args.container_id, args.ifname)
            if ip:
                tx.write(doc)
                args.log.debug("released", ip=ip)
    except StoreError as exc:
        # DEL must succeed. A release that could not be written (the store full or read-only) is
        # handed to the agent, which retries it until it lands; without an agent, or if the store
        # could not even be read, the agent's comparison of reservations with the host's attachments
        # releases it (the veth is gone).
        handed = ip is not None and _hand_release_to_agent(cfg.data_dir, args, ip)
        args.log.error(f"DEL could not update the state store: {exc}",
                       release="handed to the node agent" if handed else "left to the node agent's comparison")


def _hand_release_to_agent(data_dir: str, args: skel.CmdArgs, ip: str) -> bool:
    message = agentlink.release_message(args.network, args.container_id, args.ifname, ip)
    return len(message) <= agentlink.MAX_MESSAGE and agentlink.nudge(data_dir, message)


def cmd_check(args: skel.CmdArgs) -> None:
    cfg = _settings(args)
    with _store(args, cfg).locked(shared=True) as tx:
        doc = tx.read()
    held = Pool(doc, time.time()).find(args.container_id, args.ifname) if doc else None
    if held is None:
        raise CNIError(CHECK_FAILED, f"no IP is reserved for container {args.container_id} interface {args.ifname}")
    expected = {ip["address"].split("/")[0] for ip in (args.prev_result or {}).get("ips", [])}
    if expected and held.ip not in expected:
        raise CNIError(CHECK_FAILED, f"the reserved IP {held.ip} is not the one in prevResult {sorted(expected)}")


def cmd_gc(args: skel.CmdArgs) -> None:
    keep = skel.valid_attachments(args.conf)
    cfg = _settings(args)
    with _store(args, cfg).locked() as tx:
        doc = tx.read()
        if doc is None:
            return
        pool = Pool(doc, time.time(), cfg.ip_cooldown_period)
        gone = [(cid, ifname, ip) for cid, ifname, ip in pool.attachments() if (cid, ifname) not in keep]
        for cid, ifname, _ in gone:
            pool.release(cid, ifname)
        if gone:
            tx.write(doc)
            args.log.info("GC released stale reservations", released=[ip for _, _, ip in gone])


def cmd_status(args: skel.CmdArgs) -> None:
    cfg = _settings(args)
    with _store(args, cfg).locked(shared=True) as tx:
        doc = tx.read()
    if doc is None:
        return  # nothing allocated yet: the first ADD grows the pool
    if Pool(doc, time.time(), cfg.ip_cooldown_period).free_count() == 0:
        raise CNIError(PLUGIN_NOT_AVAILABLE, _empty_pool_message(doc, None)[0])


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def main() -> None:
    skel.plugin_main("aws-eni-ipam", HANDLERS, about="aws-eni-ipam: secondary IPs of the node's ENIs for pods")


if __name__ == "__main__":
    main()
