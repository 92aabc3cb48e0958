"""portmap-compat: hostPort mappings for pods, a drop-in for the reference `portmap` plugin (1.1.1).

A chained plugin: it reads the pod's addresses from `prevResult` and `runtimeConfig.portMappings`,
writes the same nat chains, rules, comments and order as the reference plugin, and passes the
previous result through unchanged. Per address family, one transaction converges:

    PREROUTING, OUTPUT:    -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT          (shared)
    POSTROUTING (first):   -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ
    CNI-HOSTPORT-MASQ:     -m mark --mark 0x2000/0x2000 -j MASQUERADE                  (shared)
    CNI-HOSTPORT-SETMARK:  -m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark 0x2000/0x2000
    CNI-HOSTPORT-DNAT:     -p tcp -m comment --comment "dnat name: \"<net>\" id: \"<cid>\"" -m multiport
                           --dports 80,443 -j CNI-DN-<hash>     (one rule per protocol and 15 ports)
    CNI-DN-<hash>:         per mapping: hairpin mark, 127.0.0.1 mark (IPv4), DNAT      (owned by the container)

DEL drops the container's CNI-DN chain with every rule jumping to it, in both families, and needs
neither `portMappings` nor the netns. A rule cannot jump to a chain that does not exist, so DEL
first asks whether the chain (or an old CNI-SN one) exists at all, in the variant the mode drives
(both for 'auto'), over nfnetlink and getsockopt: for a pod without host ports, most pods, that is
the whole DEL, with no iptables exec and no variant detection. GC finds other containers' chains of this network through the
`id: "<cid>"` in the entry rules' comments. `runtimeConfig`, `portMappings` and the mappings' keys are
read as the reference's Go decoding reads them (skel.go_field: any case, so containerd's "HostPort" of
go-cni's untagged PortMapping struct too; unknown keys ignored; the last of two spellings wins).
CNI_ARGS is not read (nor refused), as by the reference. Beyond the reference: malformed mappings are refused
(code 7) before any rule is touched, CHECK looks only at the families the pod has (plugins#819), and
ADD replaces the container's chain instead of adding to whatever an earlier ADD left in it.
"""

from __future__ import annotations

from cnicore import hashes, settings, skel
from cnicore.errors import CHECK_FAILED, CNIError, INVALID_CONFIG, PLUGIN_NOT_AVAILABLE
from cnicore.netfilter import Netfilter, NetfilterError, Rule, TableState, any_chain_exists, quote
from cnicore.netfilter.model import CHAIN_MAX, is_chain_name, jump_target, split_spec
from cnicore.record import record

# The reference plugin's names: other portmap instances on the node share them, never change them.
TOP_DNAT_CHAIN = "CNI-HOSTPORT-DNAT"
SETMARK_CHAIN = "CNI-HOSTPORT-SETMARK"
MASQ_CHAIN = "CNI-HOSTPORT-MASQ"
DNAT_JUMP = f"-m addrtype --dst-type LOCAL -j {TOP_DNAT_CHAIN}"
MASQ_JUMP = f'-m comment --comment "CNI portfwd requiring masquerade" -j {MASQ_CHAIN}'
DEFAULT_MARK_BIT = 13           # Kubernetes uses 14 and 15, Calico 20-31
PROTOCOLS = ("tcp", "udp", "sctp")
MULTIPORT_MAX = 15              # ports per `-m multiport --dports`
COMMENT_MAX = 255               # iptables' comment limit, as the reference trims
_ENTRY_COMMENT = r'^dnat name: "(?P<name>[^"]*)" id: "(?P<id>[^"]*)"$'
# `re` and `ipaddress` are imported where mappings are handled (~6 ms per exec otherwise): most pods
# have none.


# (cnicore.record, not dataclasses or namedtuple: they import inspect, ast, ... or collections, 3-7 ms per exec)
Mapping = record("Mapping", "host_port container_port protocol host_ip")
Mapping.__doc__ = "One hostPort mapping; `host_ip` an ipaddress address, or None for every address."
Conf = record("Conf", "network container_id snat mark_bit external_setmark_chain conditions mappings mode "
                     "data_dir")
Conf.__doc__ = """The plugin's configuration: `conditions` maps the IP version to extra words for the entry
rules, `mode` is the netfilter mode (auto, nft, legacy, iptc), `data_dir` holds the netfilter lock."""


# ---------------------------------------------------------------------------------------------
# ADD


def cmd_add(args: skel.CmdArgs) -> dict:
    conf = parse_conf(args)  # malformed configuration or mappings: code 7, nothing touched yet
    if args.prev_result is None:
        raise CNIError(INVALID_CONFIG, "must be called as chained plugin",
                       "portmap-compat needs the prevResult of the plugins before it in the conflist")
    if not conf.mappings:
        return args.prev_result
    netfilter = Netfilters(conf.mode, conf.data_dir)
    for address in container_addresses(args.prev_result, args.ifname):
        if conf.snat and address.version == 4:
            enable_localnet_routing(address.ip)  # so 127.0.0.1 -> pod, masqueraded, is not martian
        netfilter.family(address.version).converge(nat_state(conf, address))
        args.log.debug("host ports mapped", address=str(address), chain=dnat_chain(conf.network, conf.container_id))
        delete_stale_udp_flows(conf.mappings, address.version, args.log)
    return args.prev_result


def nat_state(conf: Conf, address) -> TableState:
    """The nat table as this container's mappings need it, for the family of `address`."""
    v6 = address.version == 6
    chain = dnat_chain(conf.network, conf.container_id)
    shared, rules = [], []
    if conf.snat and conf.external_setmark_chain is None:
        mark = f"{1 << conf.mark_bit:#x}/{1 << conf.mark_bit:#x}"
        shared += [SETMARK_CHAIN, MASQ_CHAIN]
        rules += [Rule(SETMARK_CHAIN, f'-m comment --comment "CNI portfwd masquerade mark" -j MARK --set-xmark {mark}'),
                  Rule(MASQ_CHAIN, f"-m mark --mark {mark} -j MASQUERADE"),
                  Rule("POSTROUTING", MASQ_JUMP, first=True)]
    shared.append(TOP_DNAT_CHAIN)
    rules += [Rule("PREROUTING", DNAT_JUMP), Rule("OUTPUT", DNAT_JUMP)]
    rules += [Rule(TOP_DNAT_CHAIN, spec) for spec in entry_rules(conf, v6, chain)]
    return TableState("nat", chains={chain: dnat_rules(conf, address)}, shared_chains=shared,
                      rules=_unique(rules))


def entry_rules(conf: Conf, v6: bool, chain: str) -> list[str]:
    """CNI-HOSTPORT-DNAT -> CNI-DN-*: per protocol (sorted), host ports in groups of 15, every mapping's
    port (also those whose hostIP is of the other family), with conditionsV4/V6 appended."""
    comment = f'dnat name: "{conf.network}" id: "{conf.container_id}"'
    if len(comment.encode()) > COMMENT_MAX:
        comment = comment.encode()[:COMMENT_MAX - 2].decode(errors="ignore") + "..."
    ports: dict[str, list[str]] = {}
    for mapping in conf.mappings:
        ports.setdefault(mapping.protocol, []).append(str(mapping.host_port))
    conditions = " ".join(_word(w) for w in conf.conditions[6 if v6 else 4])
    specs = []
    for protocol in sorted(ports):
        for at in range(0, len(ports[protocol]), MULTIPORT_MAX):
            group = ",".join(ports[protocol][at:at + MULTIPORT_MAX])
            spec = f"-p {protocol} -m comment --comment {quote(comment)} -m multiport --dports {group}"
            specs.append(f"{spec} {conditions} -j {chain}" if conditions else f"{spec} -j {chain}")
    return _unique(specs)


def dnat_rules(conf: Conf, address) -> list[str]:
    """The container's chain: per mapping, in the given order, the hairpin mark (source = the pod's
    network as prevResult gives it), the 127.0.0.1 mark (IPv4 only), then the DNAT itself. A hostIP
    of the other family skips the mapping; an unspecified hostIP matches every local address."""
    v6 = address.version == 6
    setmark = conf.external_setmark_chain or SETMARK_CHAIN
    rules = []
    for mapping in conf.mappings:
        dst = ""
        if mapping.host_ip is not None:
            if (mapping.host_ip.version == 6) != v6:
                continue
            if not mapping.host_ip.is_unspecified:
                dst = f"-d {mapping.host_ip}/{mapping.host_ip.max_prefixlen} "
        match = f"{dst}-p {mapping.protocol} -m {mapping.protocol} --dport {mapping.host_port}"
        if conf.snat:
            rules.append(f"-s {address.network} {match} -j {setmark}")
            if not v6:
                rules.append(f"-s 127.0.0.1/32 {match} -j {setmark}")
        target = f"[{address.ip}]:{mapping.container_port}" if v6 else f"{address.ip}:{mapping.container_port}"
        rules.append(f"{match} -j DNAT --to-destination {target}")
    return _unique(rules)  # the reference adds each rule only if it is not there yet


def enable_localnet_routing(pod_ip) -> None:
    """route_localnet=1 on the host interface that routes to the pod, as the reference does."""
    from cnicore.rtnl import IPV4_DEVCONF_ROUTE_LOCALNET, Netns  # only for pods with port mappings

    with Netns() as host:
        route = host.route_get(str(pod_ip))
        link = host.link_at(route.oif) if route is not None and route.oif is not None else None
        if link is None:
            return  # no route to the pod: nothing to enable (the reference skips it too)
        host.set_ipv4_conf(f"unable to enable route_localnet on {link.name}", link.index,
                           IPV4_DEVCONF_ROUTE_LOCALNET, 1)


def delete_stale_udp_flows(mappings: list[Mapping], version: int, log) -> None:
    """Drop UDP conntrack entries to the mapped host ports, so flows that started before the mapping
    are NATed from their next datagram on. Failures are only logged, as in the reference."""
    ports = {m.host_port for m in mappings if m.protocol == "udp"}
    if not ports:
        return
    from portmap_compat import conntrack
    try:
        deleted = conntrack.delete_by_dst_port(ports, version)
        if deleted:
            log.debug("deleted stale UDP conntrack entries", count=deleted, ports=sorted(ports))
    except OSError as exc:
        log.warn(f"failed to delete stale UDP conntrack entries: {exc}", ports=sorted(ports))


# ---------------------------------------------------------------------------------------------
# DEL, CHECK, GC, STATUS


def cmd_del(args: skel.CmdArgs) -> None:
    """Remove the container's chain and every rule jumping to it, in both families, whatever the
    mappings were (they need not be sent again) and whether or not the netns still exists. A family
    whose iptables is not usable is skipped, as in the reference; both unusable is an error."""
    mode, data_dir = netfilter_settings(args.conf)
    doomed = [dnat_chain(args.network, args.container_id), old_snat_chain(args.network, args.container_id)]
    if not any_chain_exists(mode, "nat", doomed):
        return None  # the pod had no host ports (or they are gone): no chain, so no rule jumping to one
    netfilter = Netfilters(mode, data_dir)
    unusable = []
    for version in (4, 6):
        try:
            nf = netfilter.family(version)
            present = nf.chains("nat")
        except NetfilterError as exc:
            unusable.append(exc)
            continue
        if any(chain in present for chain in doomed):
            removed = nf.remove("nat", chains=doomed)
            args.log.debug("host ports unmapped", family=f"IPv{version}", removed=[str(d) for d in removed])
    if len(unusable) == 2:
        raise unusable[0]


def cmd_check(args: skel.CmdArgs) -> None:
    conf = parse_conf(args)
    if args.prev_result is None:
        raise CNIError(INVALID_CONFIG, "required prevResult missing")
    if not conf.mappings:
        return
    netfilter = Netfilters(conf.mode, conf.data_dir)
    problems = []
    for address in container_addresses(args.prev_result, args.ifname):  # only the pod's own families
        problems += netfilter.family(address.version).check(nat_state(conf, address))
    if problems:
        raise CNIError(CHECK_FAILED, f"host port rules of container {conf.container_id} are not as ADD left them",
                       "; ".join(str(p) for p in problems))


def cmd_gc(args: skel.CmdArgs) -> None:
    """Remove the chains of this network's containers that are not in the valid attachments. Our
    chains are named by a hash, so the container IDs come from the entry rules' comments."""
    keep = {container_id for container_id, _ in skel.valid_attachments(args.conf)}
    netfilter = Netfilters(*netfilter_settings(args.conf))
    for version in (4, 6):
        try:
            nf = netfilter.family(version)
            present = nf.chains("nat")
            stale = sorted({chain for container_id, chain in attached_chains(present, args.network)
                            if container_id not in keep and chain in present})
            if stale:
                nf.remove("nat", chains=stale)
                args.log.info("GC removed host port chains", family=f"IPv{version}", chains=stale)
        except NetfilterError as exc:  # carry on: GC reports nothing, the next GC tries again
            args.log.error(f"GC could not clean IPv{version} host port chains: {exc}")


def attached_chains(present: dict[str, list[str]], network: str):
    """(containerID, CNI-DN chain) of every entry rule of `network` in CNI-HOSTPORT-DNAT."""
    import re
    entry_comment = re.compile(_ENTRY_COMMENT)
    for spec in present.get(TOP_DNAT_CHAIN, []):
        try:
            words = split_spec(spec)
        except ValueError:
            continue
        comments = [value for option, value in zip(words, words[1:]) if option == "--comment"]
        found = entry_comment.match(comments[0]) if comments else None
        if found and found["name"] == network and jump_target(spec) == dnat_chain(network, found["id"]):
            yield found["id"], jump_target(spec)


def cmd_status(args: skel.CmdArgs) -> None:
    try:
        Netfilters(*netfilter_settings(args.conf)).family(4).chains("nat")
    except NetfilterError as exc:
        raise CNIError(PLUGIN_NOT_AVAILABLE, f"iptables is not usable: {exc.msg}") from None


# ---------------------------------------------------------------------------------------------
# Configuration and prevResult


def parse_conf(args: skel.CmdArgs) -> Conf:
    """The reference's configuration keys, validated; anything malformed is code 7."""
    raw = args.conf
    snat = raw.get("snat")
    if snat is None:
        snat = True
    elif not isinstance(snat, bool):
        raise _bad("snat must be true or false", snat)
    mark_bit, external = raw.get("markMasqBit"), raw.get("externalSetMarkChain")
    if mark_bit is not None and external is not None:
        raise CNIError(INVALID_CONFIG, "Cannot specify externalSetMarkChain and markMasqBit")
    if mark_bit is None:
        mark_bit = DEFAULT_MARK_BIT
    if not _is_int(mark_bit) or not 0 <= mark_bit <= 31:
        raise _bad("markMasqBit must be between 0 and 31", mark_bit)
    if external is not None and not is_chain_name(external):
        raise _bad("externalSetMarkChain must be a chain name of at most 28 letters, digits or _.:+-", external)
    conditions = {4: _conditions(raw, "conditionsV4"), 6: _conditions(raw, "conditionsV6")}
    runtime = skel.go_field(raw, "runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise _bad("runtimeConfig must be an object", runtime)
    entries = skel.go_field(runtime, "portMappings") or []
    if not isinstance(entries, list):
        raise _bad("runtimeConfig.portMappings must be a list", entries)
    mappings = [_mapping(entry, n) for n, entry in enumerate(entries)]
    mode, data_dir = netfilter_settings(raw)
    return Conf(network=args.network, container_id=args.container_id, snat=snat, mark_bit=mark_bit,
                external_setmark_chain=external, conditions=conditions, mappings=mappings,
                mode=mode, data_dir=data_dir)


def _mapping(entry, n: int) -> Mapping:
    where = f"runtimeConfig.portMappings[{n}]"
    if not isinstance(entry, dict):
        raise _bad(f"{where} must be an object", entry)
    host_port, container_port, protocol, host_ip = (skel.go_field(entry, key) for key in
                                                    ("hostPort", "containerPort", "protocol", "hostIP"))
    for key, port in (("hostPort", host_port), ("containerPort", container_port)):
        if not _is_int(port) or not 1 <= port <= 65535:
            raise _bad(f"{where}.{key} must be a port number from 1 to 65535", port)
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        raise _bad(f"{where}.protocol must be one of {', '.join(PROTOCOLS)}", protocol)
    address = None
    if host_ip not in (None, ""):
        import ipaddress
        try:
            if not isinstance(host_ip, str) or "%" in host_ip:
                raise ValueError  # a number or a zone would pass ipaddress, not Go's net.ParseIP
            address = ipaddress.ip_address(host_ip)
        except ValueError:
            raise _bad(f"{where}.hostIP must be an IPv4 or IPv6 address", host_ip) from None
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped  # as Go's net.IP.To4 reads it
    return Mapping(host_port, container_port, protocol.lower(), address)


def _conditions(raw: dict, key: str) -> list[str]:
    words = raw.get(key) or []
    if not isinstance(words, list) or not all(isinstance(w, str) and w and "\n" not in w for w in words):
        raise _bad(f"{key} must be a list of non-empty iptables arguments", words)
    return words


def netfilter_settings(raw: dict) -> tuple[str, str]:
    """The netfilter mode, and the data dir whose lock aws-snat takes too (both rewrite the nat table)."""
    cfg = settings.from_conf(raw, settings.PORTMAP)
    return cfg.netfilter_mode, cfg.data_dir


def container_addresses(prev_result: dict, ifname: str) -> list:
    """The pod's first IPv4 and first IPv6 address, skipping those of other known interfaces and of
    host-side ones, as the reference picks them (an address with no interface index counts)."""
    import ipaddress
    interfaces = prev_result.get("interfaces", [])
    found = {}
    for ip in prev_result.get("ips", []):
        address = ipaddress.ip_interface(ip["address"])
        if address.version in found:
            continue
        index = ip.get("interface")
        if index is not None and 0 <= index < len(interfaces) and (
                interfaces[index].get("name") != ifname or not interfaces[index].get("sandbox")):
            continue
        found[address.version] = address
    return [found[v] for v in (4, 6) if v in found]


# ---------------------------------------------------------------------------------------------
# Names and helpers


def dnat_chain(network: str, container_id: str) -> str:
    """The reference's utils.MustFormatChainNameWithPrefix(name, id, "DN-")."""
    return _chain_name("DN-", network, container_id)


def old_snat_chain(network: str, container_id: str) -> str:
    """A per-container chain old reference versions made; DEL removes it too."""
    return _chain_name("SN-", network, container_id)


def _chain_name(prefix: str, network: str, container_id: str) -> str:
    return ("CNI-" + prefix + hashes.sha512((network + container_id).encode()).hexdigest())[:CHAIN_MAX]


class Netfilters:
    """Netfilter per family, created on first use; 'auto' detects the variant once for both."""

    def __init__(self, mode: str, lock_dir: str):
        self.mode = mode
        self.lock_dir = lock_dir
        self._made: dict[int, Netfilter] = {}

    def family(self, version: int) -> Netfilter:
        if version not in self._made:
            mode = self.mode
            if mode == "auto" and self._made:
                mode = next(iter(self._made.values())).variant
            self._made[version] = Netfilter(mode, ipv6=version == 6, lock_dir=self.lock_dir)
        return self._made[version]


def _word(word: str) -> str:
    """One argument of conditionsV4/V6 as a rule word: quoted only when it must be."""
    import re
    return word if re.fullmatch(r"[^\s\"'\\]+", word) else quote(word)


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(msg: str, value) -> CNIError:
    return CNIError(INVALID_CONFIG, msg, f"got {value!r}")


def main() -> None:
    skel.plugin_main("portmap-compat", {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check,
                                        "GC": cmd_gc, "STATUS": cmd_status},
                     about="portmap-compat: hostPort mappings for pods, a drop-in for the reference portmap",
                     reads_cni_args=False)


if __name__ == "__main__":
    main()
