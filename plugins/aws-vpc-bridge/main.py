"""aws-vpc-bridge: puts a pod on the VPC with its own secondary IP, no overlay (ARCHITECTURE §4).

ADD: the IPAM plugin named in `ipam` hands out an IP; the state store says which ENI holds it; the
data path (`datapath.py`, beside this file) builds the veth pair, the pod's /32 address and routes
via 169.254.1.1, the node's /32 route and rule 512, and for an IP of a secondary ENI rule 1536 into
that ENI's table. Anything
failing after the IPAM ADD is undone and the IP released (IPAM DEL) before the error is returned.
DEL tears down from the node's side (so it works after the pod's netns is gone), then releases the IP.
"""

from __future__ import annotations

import time

from cnicore import settings, skel
from cnicore.errors import CHECK_FAILED, CNIError, INVALID_CONFIG, INVALID_ENVIRONMENT
from cnicore.invoke import delegate
from cnicore.podroutes import SecondaryEni, list_pod_rule_ips
from cnicore.pool import Document, Pool, take_handed_out
from cnicore.rtnl import NetnsError, check_netns
from cnicore.store import Store, StoreError
from cnicore.veths import Attachment, host_veth_name, list_host_veths, remove_unfinished_veth

from aws_vpc_bridge import datapath


def _config(args: skel.CmdArgs) -> tuple[settings.BRIDGE, str, Store]:
    """(settings, IPAM plugin type, the IPAM's state store) from the plugin's config."""
    cfg = settings.from_conf(args.conf, settings.BRIDGE)
    ipam = args.conf.get("ipam")
    if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) or not ipam["type"]:
        raise CNIError(INVALID_CONFIG, "aws-vpc-bridge needs an \"ipam\" object with a \"type\"")
    store_dir = settings.from_conf(ipam, settings.IPAM_STORE).data_dir
    return cfg, ipam["type"], Store(store_dir, args.network)


def _host_veth(args: skel.CmdArgs, cfg: settings.BRIDGE) -> str:
    """The host veth's name: upstream's hash of "<namespace>.<pod name>" when the runtime sent both
    (kubelet's CRI runtimes do), else the hash of the container ID and ifname (podman sends the pod
    name alone, cnitool neither). The names are opaque text; one that is not UTF-8 (no Kubernetes or
    podman name is) takes the second form too, as the hash is of the UTF-8 text."""
    namespace, name = args.pod_namespace, args.pod_name
    if not (namespace and name and _is_utf8(namespace) and _is_utf8(name)):
        namespace = name = ""
    return host_veth_name(cfg.veth_prefix, pod_namespace=namespace, pod_name=name,
                          container_id=args.container_id, ifname=args.ifname)


def _is_utf8(text: str) -> bool:
    """False for text with bytes that were not UTF-8 (the environment decodes them to lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _attachment(args: skel.CmdArgs) -> Attachment:
    try:
        return Attachment(args.network, args.container_id, args.ifname)
    except ValueError as exc:
        raise CNIError(INVALID_CONFIG, f"cannot record the attachment on its host veth: {exc}") from None


def _held_eni(store: Store, args: skel.CmdArgs, cfg: settings.BRIDGE) -> tuple[str | None, SecondaryEni | None]:
    """The attachment's IP and, if it lives on a secondary ENI, that ENI (found later by its MAC): as
    the IPAM run in this process left them, else from the store."""
    handed = take_handed_out(args.network, args.container_id, args.ifname)
    if handed is None:
        with store.locked(shared=True) as tx:
            doc = tx.read()
        held = Pool(doc, time.time()).find(args.container_id, args.ifname) if doc else None
        if held is None:
            return None, None
        handed = held, Document(doc).enis[held.eni_id]
    held, eni = handed
    if held.primary_eni:
        return held.ip, None
    return held.ip, SecondaryEni(mac=eni.mac, device_number=held.device_number, subnet=held.subnet_cidr,
                                 mtu=cfg.eni_mtu, primary_ip=eni.primary_ip)


def _pod_network(args: skel.CmdArgs, cfg: settings.BRIDGE, pod_ip: str, eni) -> datapath.PodNetwork:
    try:
        return datapath.PodNetwork(attachment=_attachment(args), netns=args.netns, host_veth=_host_veth(args, cfg),
                                   pod_ip=pod_ip, mtu=cfg.pod_mtu, eni=eni)
    except ValueError as exc:
        raise CNIError(INVALID_CONFIG, str(exc)) from None


def cmd_add(args: skel.CmdArgs) -> dict:
    cfg, ipam_type, store = _config(args)
    _attachment(args)  # refuse what the veth's alias cannot record, and a bad netns, before any IP is taken
    try:
        check_netns(args.netns)
    except NetnsError as exc:
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_NETNS: {exc}") from None
    ipam_result = delegate(args, ipam_type, "ADD")
    try:
        ips = [ip for ip in ipam_result["ips"] if ":" not in ip["address"]]
        if len(ips) != 1:
            raise CNIError(INVALID_CONFIG, f"{ipam_type} returned {len(ips)} IPv4 addresses; aws-vpc-bridge needs one")
        pod_ip = ips[0]["address"].split("/")[0]
        held_ip, eni = _held_eni(store, args, cfg)
        if held_ip not in (None, pod_ip):
            raise CNIError(INVALID_CONFIG, f"{ipam_type} returned {pod_ip} but the store holds {held_ip}")
        pair = datapath.setup_pod(_pod_network(args, cfg, pod_ip, eni))
    except BaseException:
        delegate(args, ipam_type, "DEL")
        raise
    args.log.info("pod attached", ip=pod_ip, host_veth=pair.host_name,
                  eni_device=eni.device_number if eni else 0)
    return {
        "interfaces": [{"name": pair.host_name, "mac": pair.host_mac},
                       {"name": pair.pod_name, "mac": pair.pod_mac, "sandbox": args.netns}],
        "ips": [{"address": f"{pod_ip}/32", "gateway": datapath.POD_GATEWAY, "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": datapath.POD_GATEWAY}],
        "dns": args.conf.get("dns") or ipam_result.get("dns", {}),
    }


def cmd_del(args: skel.CmdArgs) -> None:
    cfg, ipam_type, store = _config(args)
    pod_ip = next((ip["address"].split("/")[0] for ip in (args.prev_result or {}).get("ips", [])
                   if ":" not in ip["address"]), None)
    try:
        pod_ip = pod_ip or _held_eni(store, args, cfg)[0]
    except StoreError as exc:
        args.log.error(f"DEL cannot read the store; tearing down by the veth's name: {exc}")
    try:
        attachment = _attachment(args)
    except CNIError:  # a name no ADD could have used: nothing of ours on the host, only the IPAM to ask
        attachment = None
    if attachment is not None:
        datapath.teardown_pod(attachment, host_veth=_host_veth(args, cfg), pod_ip=pod_ip, netns=args.netns or None)
    delegate(args, ipam_type, "DEL")


def cmd_check(args: skel.CmdArgs) -> None:
    cfg, ipam_type, store = _config(args)
    if args.prev_result is None:
        raise CNIError(INVALID_CONFIG, "CHECK needs prevResult")
    delegate(args, ipam_type, "CHECK")
    interfaces = args.prev_result.get("interfaces", [])
    ours = {i for i, iface in enumerate(interfaces) if iface.get("name") == args.ifname
            and iface.get("sandbox") == args.netns}
    pod_ips = [ip["address"].split("/")[0] for ip in args.prev_result.get("ips", [])
               if ":" not in ip["address"] and ip.get("interface") in ours]
    if len(pod_ips) != 1:
        raise CNIError(CHECK_FAILED, f"prevResult has no single IPv4 address on {args.ifname} in {args.netns}")
    held_ip, eni = _held_eni(store, args, cfg)
    net = _pod_network(args, cfg, pod_ips[0], eni)
    macs = {i["name"]: i.get("mac") for i in interfaces}
    problems = datapath.check_pod(net, pod_mac=macs.get(args.ifname), host_mac=macs.get(net.host_veth))
    if problems:
        raise CNIError(CHECK_FAILED, "; ".join(problems))


def cmd_gc(args: skel.CmdArgs) -> None:
    """Remove host veths, routes and rules of this network's attachments that are not valid."""
    cfg, ipam_type, store = _config(args)
    keep = skel.valid_attachments(args.conf)
    errors = []
    routed = set()
    for veth in list_host_veths(cfg.veth_prefix):
        att = veth.attachment
        if veth.unfinished:  # an ADD killed right after creating the pair, before it marked the host end
            try:
                if remove_unfinished_veth(veth.name):
                    args.log.info("GC removed an unfinished host veth", host_veth=veth.name)
            except CNIError as exc:
                errors.append(str(exc))
            continue
        if att is None or att.network != args.network or (att.container_id, att.ifname) in keep:
            routed.update(veth.pod_ips)
            continue
        try:
            datapath.teardown_pod(att, host_veth=veth.name, pod_ip=veth.pod_ips[0] if veth.pod_ips else None)
            args.log.info("GC removed a stale attachment", container=att.container_id, host_veth=veth.name)
        except CNIError as exc:
            errors.append(str(exc))
    delegate(args, ipam_type, "GC")  # releases the stale reservations
    with store.locked(shared=True) as tx:
        doc = tx.read()
    held = {ip for _, _, ip in Pool(doc, time.time()).attachments()} if doc else set()
    for ip in list_pod_rule_ips() - routed - held:  # rules whose veth and reservation are gone
        try:
            datapath.teardown_pod(Attachment(args.network, "gc", "gc"), pod_ip=ip)
        except CNIError as exc:
            errors.append(str(exc))
    if errors:
        args.log.error("GC could not remove everything", errors=errors)


def cmd_status(args: skel.CmdArgs) -> None:
    _, ipam_type, _ = _config(args)
    delegate(args, ipam_type, "STATUS")


def main() -> None:
    skel.plugin_main("aws-vpc-bridge", {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check,
                                        "GC": cmd_gc, "STATUS": cmd_status},
                     about="aws-vpc-bridge: pods on secondary IPs of the node's ENIs, no overlay")


if __name__ == "__main__":
    main()
