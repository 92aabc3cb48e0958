"""The agent's introspection endpoint, with upstream's paths and JSON shapes (aws/amazon-vpc-cni-k8s
pkg/ipamd/introspect.go and pkg/ipamd/datastore/data_store.go of release-1.1) where the concept
exists here:

    /v1/enis                        {"TotalIPs", "AssignedIPs", "ENIIPPools": {eni: {"IsPrimary",
                                     "DeviceNumber", "AssignedIPv4Addresses", "IPv4Addresses":
                                     {ip: {"Assigned"}}}}}
    /v1/pods                        {"<name>_<namespace>_<container id>": {"IP", "DeviceNumber"}}
    /v1/networkutils-env-settings   the data path settings by variable name, as read
    /v1/ipamd-env-settings          the pool settings by variable name, as read
    anything else                   {"AvailableCommands": [the paths above]}
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cnicore import settings
from cnicore.pool import ASSIGNED, Document

NETWORK_SETTINGS = ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
                    "AWS_VPC_CNI_NODE_PORT_SUPPORT", "AWS_VPC_K8S_CNI_CONNMARK", "AWS_VPC_ENI_MTU", "POD_MTU",
                    "AWS_VPC_K8S_CNI_VETHPREFIX")
IPAMD_SETTINGS = ("WARM_ENI_TARGET", "WARM_IP_TARGET", "MINIMUM_IP_TARGET", "MAX_ENI", "IP_COOLDOWN_PERIOD",
                  "CLUSTER_NAME")
# upstream's value for a setting that is unset (its getters' defaults: noWarmIPTarget, defaultMaxENI, ...)
UNSET = {"WARM_IP_TARGET": 0, "MINIMUM_IP_TARGET": 0, "MAX_ENI": -1}


def enis(doc: dict) -> dict:
    pools, total, assigned = {}, 0, 0
    for eni_id, eni in Document(doc).enis.items():
        addresses = {ip: {"Assigned": entry.state == ASSIGNED} for ip, entry in eni.ips.items()}
        held = sum(a["Assigned"] for a in addresses.values())
        pools[eni_id] = {"IsPrimary": eni.primary, "DeviceNumber": eni.device_number,
                         "AssignedIPv4Addresses": held, "IPv4Addresses": addresses}
        total += len(addresses)
        assigned += held
    return {"TotalIPs": total, "AssignedIPs": assigned, "ENIIPPools": pools}


def pods(doc: dict) -> dict:
    out = {}
    for eni in Document(doc).enis.values():
        for ip, entry in eni.ips.items():
            if entry.state == ASSIGNED:
                key = f"{entry.pod_name or ''}_{entry.pod_namespace or ''}_{entry.container_id}"
                out[key] = {"IP": ip, "DeviceNumber": eni.device_number}
    return out


def env_settings(cfg, names) -> dict:
    """The settings `names` of `cfg` (the agent's settings record) by variable name, as upstream shows them."""
    named = settings.by_name(cfg)
    values = {name: UNSET.get(name) if named[name] is None else named[name] for name in names}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


def serve(cfg, read_doc, host: str, port: int, log) -> ThreadingHTTPServer:
    """Serve on host:port in a daemon thread; `read_doc()` gives the store document; returns the server."""
    import threading
    routes = {"/v1/enis": lambda: enis(read_doc() or {}),
              "/v1/pods": lambda: pods(read_doc() or {}),
              "/v1/networkutils-env-settings": lambda: env_settings(cfg, NETWORK_SETTINGS),
              "/v1/ipamd-env-settings": lambda: env_settings(cfg, IPAMD_SETTINGS)}
    commands = {"AvailableCommands": sorted(routes)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            log.debug("Handling http request", method="GET", remote=self.client_address[0], uri=self.path)
            try:
                route = routes.get(self.path.split("?")[0])
                body = json.dumps(route() if route else commands).encode()
            except Exception as exc:  # the store unreadable now: upstream answers 500 too
                log.error(f"introspection failed: {type(exc).__name__}: {exc}")
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
