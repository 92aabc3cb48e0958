"""aws-eni-ipam: hands out secondary private IPs of the node's ENIs.

Hot path (the pool has a free IP): lock the store, take an IP, write, answer. No EC2, no IMDS, no
boto3 import. Slow path (the pool is empty): with the node agent running, answer "try again later"
(code 11) saying why and nudge the agent; with no agent (e.g. cnitool on a bare node), grow the pool
from EC2, then allocate. The slow path never holds the store lock during an EC2 or IMDS call
(cnicore.poolmgr.grow_for_add), so DELs and warm ADDs of other pods go on while it waits for EC2.
"""

from __future__ import annotations

import time

from cnicore import agentlink, settings, skel
from cnicore.errors import ATTACHMENT_EXISTS, CHECK_FAILED, CNIError, INVALID_CONFIG, PLUGIN_NOT_AVAILABLE, TRY_AGAIN_LATER
from cnicore.pool import Pool, PoolExhausted
from cnicore.store import Store, StoreError

POOL_SETTINGS = ("WARM_IP_TARGET", "MINIMUM_IP_TARGET", "WARM_ENI_TARGET", "MAX_ENI", "IP_COOLDOWN_PERIOD",
                 "CLUSTER_NAME", "AWS_VPC_CNI_DATA_DIR")


def _ipam_conf(args: skel.CmdArgs) -> dict:
    ipam = args.conf.get("ipam", args.conf)
    if not isinstance(ipam, dict):
        raise CNIError(INVALID_CONFIG, "ipam must be an object")
    return ipam


def _settings(args: skel.CmdArgs) -> dict:
    return settings.from_conf(_ipam_conf(args), POOL_SETTINGS)


def _store(args: skel.CmdArgs, cfg: dict) -> Store:
    return Store(cfg["AWS_VPC_CNI_DATA_DIR"], args.network)


def _result(ip: str, gateway: str) -> dict:
    return {"ips": [{"address": f"{ip}/32", "gateway": gateway}], "dns": {}}


def cmd_add(args: skel.CmdArgs) -> dict:
    cfg = _settings(args)
    store = _store(args, cfg)
    got, doc, exhausted = _assign(store, args, cfg)
    if got is None and agentlink.agent_running(cfg["AWS_VPC_CNI_DATA_DIR"]):
        agentlink.nudge(cfg["AWS_VPC_CNI_DATA_DIR"])
        if doc is None:  # the agent has not built the pool yet: ask it why
            raise CNIError(TRY_AGAIN_LATER, _not_started_message(cfg["AWS_VPC_CNI_DATA_DIR"]),
                           "the node agent was asked to grow the pool")
        raise CNIError(TRY_AGAIN_LATER, _empty_pool_message(doc, exhausted),
                       "the node agent was asked to grow the pool")
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
            raise CNIError(TRY_AGAIN_LATER, _empty_pool_message(doc, exhausted))
        args.log.info("assigned after growing the pool", ip=got.ip, eni=got.eni_id)
    else:
        args.log.debug("assigned from the warm pool", ip=got.ip, eni=got.eni_id)
        if _below_warm_floor(doc) and agentlink.agent_running(cfg["AWS_VPC_CNI_DATA_DIR"]):
            agentlink.nudge(cfg["AWS_VPC_CNI_DATA_DIR"])  # grow now, not at the agent's next tick
    return _result(got.ip, got.gateway)


def _below_warm_floor(doc: dict) -> bool:
    """This assignment left the pool short of its warm target (the floor the agent records)."""
    floor = (doc.get("agent") or {}).get("warm_floor")
    if not floor:
        return False
    return sum(s["total"] - s["assigned"] for s in Pool(doc, time.time()).eni_stats()) < floor


def _assign(store: Store, args: skel.CmdArgs, cfg: dict):
    """(assignment or None, the document, PoolExhausted or None), under the store lock."""
    with store.locked() as tx:
        doc = tx.read()
        if doc is None:
            return None, None, None
        pool = Pool(doc, time.time(), cfg["IP_COOLDOWN_PERIOD"])
        held = pool.find(args.container_id, args.ifname)
        if held:
            raise CNIError(ATTACHMENT_EXISTS, f"container {args.container_id} interface {args.ifname} "
                                              f"already holds {held.ip}; DEL it first")
        try:
            got = pool.assign(args.container_id, args.ifname, args.pod_namespace, args.pod_name)
        except PoolExhausted as exc:
            return None, doc, exc
        tx.write(doc)
        return got, doc, None


def _not_started_message(data_dir: str) -> str:
    """Why a running agent has no pool yet, from its status socket (it reports why its start-up
    reconcile fails, e.g. IMDS down)."""
    try:
        reason = agentlink.read_status(data_dir, timeout=1.0).get("startup_error")
    except (OSError, ValueError, AttributeError):
        reason = None
    why = f"it cannot start: {reason}" if reason else "it is starting"
    return f"no free IP on this node: the node agent has not built the pool yet ({why})"


def _empty_pool_message(doc: dict | None, exhausted: PoolExhausted | None) -> str:
    blocked = (doc or {}).get("agent", {}).get("blocked")
    why = blocked["reason"] if blocked else "the pool is being grown"
    cooling = f"; {exhausted.cooling} released IPs are still cooling down" if exhausted and exhausted.cooling else ""
    return f"no free IP on this node: {why}{cooling}"


def cmd_del(args: skel.CmdArgs) -> None:
    cfg = _settings(args)
    try:
        with _store(args, cfg).locked() as tx:
            doc = tx.read()
            if doc is None:
                return
            ip = Pool(doc, time.time(), cfg["IP_COOLDOWN_PERIOD"]).release(args.container_id, args.ifname)
            if ip:
                tx.write(doc)
                args.log.debug("released", ip=ip)
    except StoreError as exc:
        # DEL must succeed: the agent's rebuild reclaims the IP from what is left on the host.
        args.log.error(f"DEL could not update the state store: {exc}")


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
        pool = Pool(doc, time.time(), cfg["IP_COOLDOWN_PERIOD"])
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
    if Pool(doc, time.time(), cfg["IP_COOLDOWN_PERIOD"]).free_count() == 0:
        raise CNIError(PLUGIN_NOT_AVAILABLE, _empty_pool_message(doc, None))


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}


def main() -> None:
    skel.plugin_main("aws-eni-ipam", HANDLERS, about="aws-eni-ipam: secondary IPs of the node's ENIs for pods")


if __name__ == "__main__":
    main()
