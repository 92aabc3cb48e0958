"""Two tiny plugins on the real skeleton, store and pool, exec'd by the skeleton's conformance tests.

`test-ipam` hands out IPs of a pool seeded from its config (`seedIps`) in the store under `dataDir`;
`test-main` delegates to the IPAM plugin named in `ipam.type` and reports one interface. With
`"failAfterIpam": true` test-main fails after the IPAM ADD, to show the IPAM DEL clean-up.
"""

import os
import time

from cnicore import skel
from cnicore.errors import ATTACHMENT_EXISTS, CNIError, CHECK_FAILED, INVALID_CONFIG, PLUGIN_NOT_AVAILABLE
from cnicore.invoke import delegate
from cnicore.pool import Pool, PoolExhausted, new_document
from cnicore.store import Store


def _pool_store(args: skel.CmdArgs) -> Store:
    conf = args.conf.get("ipam", args.conf)
    if not isinstance(conf.get("dataDir"), str):
        raise CNIError(INVALID_CONFIG, "test-ipam needs dataDir")
    return Store(conf["dataDir"], args.network)


def _load(tx, args) -> Pool:
    doc = tx.read()
    if doc is None:
        doc = new_document({"instance_id": "i-test"})
        pool = Pool(doc, time.time(), cooldown=0)
        pool.put_eni("eni-test", mac="02:00:00:00:00:01", device_number=0, subnet_cidr="10.9.0.0/24",
                     primary_ip="10.9.0.10", primary=True, attached_at=0)
        pool.set_secondary_ips("eni-test", args.conf.get("ipam", {}).get("seedIps", []))
        return pool
    return Pool(doc, time.time(), cooldown=0)


def ipam_add(args):
    with _pool_store(args).locked() as tx:
        pool = _load(tx, args)
        if pool.find(args.container_id, args.ifname):
            raise CNIError(ATTACHMENT_EXISTS, f"{args.container_id}/{args.ifname} already has an IP")
        try:
            got = pool.assign(args.container_id, args.ifname, args.pod_namespace, args.pod_name)
        except PoolExhausted as exc:
            raise CNIError(11, str(exc)) from None
        tx.write(pool.doc)
    return {"ips": [{"address": f"{got.ip}/32", "gateway": got.gateway}], "dns": {}}


def ipam_del(args):
    with _pool_store(args).locked() as tx:
        pool = _load(tx, args)
        if pool.release(args.container_id, args.ifname):
            tx.write(pool.doc)


def ipam_check(args):
    with _pool_store(args).locked(shared=True) as tx:
        doc = tx.read()
        if doc is None or not Pool(doc, time.time()).find(args.container_id, args.ifname):
            raise CNIError(CHECK_FAILED, f"no IP reserved for {args.container_id}/{args.ifname}")


def ipam_gc(args):
    keep = skel.valid_attachments(args.conf)
    with _pool_store(args).locked() as tx:
        pool = _load(tx, args)
        for cid, ifname, _ in pool.attachments():
            if (cid, ifname) not in keep:
                pool.release(cid, ifname)
        tx.write(pool.doc)


def ipam_status(args):
    with _pool_store(args).locked(shared=True) as tx:
        doc = tx.read()
    if doc is not None and Pool(doc, time.time(), cooldown=0).free_count() == 0:
        raise CNIError(PLUGIN_NOT_AVAILABLE, "no IP addresses available")


def main_add(args):
    if os.environ.get("TEST_MAIN_PRINT_JUNK"):
        print("junk a careless library printed")
    ipam_type = args.conf["ipam"]["type"]
    res = delegate(args, ipam_type, "ADD")
    if args.conf.get("failAfterIpam"):
        delegate(args, ipam_type, "DEL")
        raise CNIError(999, "failing after IPAM ADD as configured")
    res["interfaces"] = [{"name": args.ifname, "mac": "02:00:00:00:00:aa", "sandbox": args.netns}]
    for ip in res["ips"]:
        ip["interface"] = 0
    return res


def main_other(args):
    delegate(args, args.conf["ipam"]["type"], args.command)


def ipam_main():
    skel.plugin_main("test-ipam", {"ADD": ipam_add, "DEL": ipam_del, "CHECK": ipam_check,
                                   "GC": ipam_gc, "STATUS": ipam_status}, about="test-ipam (tests only)")


def main_main():
    skel.plugin_main("test-main", {"ADD": main_add, "DEL": main_other, "CHECK": main_other,
                                   "GC": main_other, "STATUS": main_other}, about="test-main (tests only)")
