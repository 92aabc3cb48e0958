"""The lab daemon: one process, living in the lab's ctl namespace, that runs moto, the EC2 front, every
node's IMDS, the echo servers and the data-plane loop, and answers the control socket.

Nodes reach their IMDS (169.254.169.254:80) and the EC2 front (169.254.169.200:80) on their own lo:
the daemon opens those listening sockets from inside each node's namespace, so no link or route joins
a node to the ctl namespace, and nothing joins the lab to the machine's own network.

Started by `Lab.up` as `python -m vpclab.daemon STATE_DIR READY_FD`; it writes "ok" or "error: ..." to
READY_FD once, and stops (removing every namespace and its state directory) on the control
operation `shutdown`, on SIGTERM/SIGINT, or when the owner process given in the config ends.
"""

from __future__ import annotations

import concurrent.futures
import functools
import ipaddress
import json
import logging
import os
import select
import shutil
import signal
import sys
import threading

from . import config as cfg
from . import dataplane, echo, netns
from .config import LabConfig
from .control import ControlServer
from .counting import CallCounter
from .ec2front import Ec2Front, FrontHandler
from .errors import Ec2Error, LabError
from .faults import ANY_ACTION, IMDS, Fault, FaultBook
from .imds import ImdsHandler, ImdsService
from .instance_types import limits
from .latency import Latency
from .servers import HttpServer, serve_in
from .state import StateCache, fetch
from .throttling import Throttling

log = logging.getLogger("vpclab.daemon")

MOTO_PORT = 5000
INTERNAL_FRONT_PORT = 8080  # the lab's own EC2 calls (Lab.ec2): not counted, no faults
RESYNC_PERIOD = 2.0
AMI = "ami-12c6146b"
DUMMY_KEY = "testing"


class LabDaemon:
    def __init__(self, config: LabConfig):
        self.config = config
        self.faults = FaultBook()
        self.imds_calls = CallCounter()
        self._stop = threading.Event()
        self._kicked = threading.Event()
        self._status: dict = {}
        self._owner_fd: int | None = None

    # --- life cycle ------------------------------------------------------------------------------

    def run(self, ready) -> None:
        """Start, report readiness, serve until told to stop, then remove everything."""
        try:
            if self.config.owner_pid is not None:
                self._owner_fd = os.pidfd_open(self.config.owner_pid)
            netns.create(self.config.ctl_netns)
            with netns.entered(self.config.ctl_netns):
                self._start()
                ready("ok")
                self._wait()
        except BaseException as e:
            log.exception("lab daemon stops on error")
            ready(f"error: {e}")
        finally:
            netns.sweep(self.config.name)
            shutil.rmtree(self.config.state_dir, ignore_errors=True)
            log.info("lab %s removed", self.config.name)

    def _start(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        MotoBackend.read_tags_by_id()
        ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False).start()
        self._moto = _client(f"http://127.0.0.1:{MOTO_PORT}")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            built = pool.submit(self._build_ec2)  # moto's first calls take a second: overlap them
            for name in self._namespaces():
                netns.create(name)
            dataplane.build(self.config)
            built = built.result()
        instances = built["instances"]
        self._cache = StateCache(functools.partial(fetch, self._moto), self.config.imds_staleness)
        self.front = Ec2Front(("127.0.0.1", MOTO_PORT), self._cache, self.faults, self.config.instance_type,
                              self._kicked.set, MotoBackend(), Throttling(self.config.ec2_throttling),
                              Latency(self.config.ec2_latency))
        self._serve(instances)
        nodes = {instances[n.name]: n for n in self.config.node_plans()}
        self._wiring = dataplane.Wiring(self.config.router_netns, nodes)
        snap = self._cache.refresh()
        self._wiring.apply(snap)
        threading.Thread(target=self._sync_loop, name="sync", daemon=True).start()
        self._status = self._describe(snap, built)
        log.info("lab %s is up", self.config.name)

    def _namespaces(self) -> list[str]:
        """All but ctl, which exists before the rest."""
        c = self.config
        return [c.router_netns] + [h.netns for h in c.host_plans()] + [n.netns for n in c.node_plans()]

    def _build_ec2(self) -> dict:
        """VPC, subnets, security group, one instance per node; returns their ids."""
        c = self._moto
        vpc = c.create_vpc(CidrBlock=self.config.vpc_cidrs[0])["Vpc"]["VpcId"]
        for cidr in self.config.vpc_cidrs[1:]:
            c.associate_vpc_cidr_block(VpcId=vpc, CidrBlock=cidr)
        subnets = {s.cidr: c.create_subnet(VpcId=vpc, CidrBlock=s.cidr, AvailabilityZone=s.az)["Subnet"]["SubnetId"]
                   for s in self.config.subnets()}
        group = c.create_security_group(GroupName=f"{self.config.name}-nodes", Description="vpclab nodes",
                                        VpcId=vpc)["GroupId"]
        instances = {}
        for node in self.config.node_plans():
            tags = [{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": f"{self.config.name}-{node.name}"}]}]
            reply = c.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType=self.config.instance_type,
                                    SubnetId=subnets[node.subnet.cidr], PrivateIpAddress=node.primary_ip,
                                    SecurityGroupIds=[group], TagSpecifications=tags)
            instances[node.name] = reply["Instances"][0]["InstanceId"]
        return {"vpc_id": vpc, "subnets": subnets, "group_id": group, "instances": instances}

    def _serve(self, instances: dict[str, str]) -> None:
        for node in self.config.node_plans():
            service = ImdsService(node.name, instances[node.name], cfg.REGION, self._cache, self.faults,
                                  self.imds_calls)
            serve_in(node.netns, functools.partial(_http, (cfg.IMDS_ADDRESS, 80), ImdsHandler, imds=service))
            serve_in(node.netns, functools.partial(_http, (cfg.EC2_ADDRESS, cfg.EC2_PORT), FrontHandler,
                                                   front=self.front, counted=True))
        serve_in(None, functools.partial(_http, ("127.0.0.1", INTERNAL_FRONT_PORT), FrontHandler,
                                         front=self.front, counted=False))
        for host in self.config.host_plans():
            echo.start(host.netns, cfg.ECHO_PORT)
        serve_in(None, functools.partial(ControlServer, os.path.join(self.config.state_dir, "ctl.sock"),
                                         self._handlers()))

    def _sync_loop(self) -> None:
        """Follow EC2: at once after each change, and every RESYNC_PERIOD. Every change to moto is
        made through the front or a control operation, each marking the cache dirty, so the live
        snapshot is EC2's state (a full read here would only slow moto down: seconds with a thousand
        instances)."""
        while not self._stop.is_set():
            self._kicked.wait(RESYNC_PERIOD)
            self._kicked.clear()
            try:
                self._wiring.apply(self._cache.live())
            except Exception:
                log.exception("data plane sync failed; retrying")

    def _wait(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.wait(0.5):
            if self._owner_fd is not None and select.select([self._owner_fd], [], [], 0)[0]:
                log.info("owner process %s ended", self.config.owner_pid)
                return

    # --- control operations ----------------------------------------------------------------------

    def _handlers(self) -> dict:
        return {
            "status": self._op_status,
            "fault": self._op_fault,
            "clear_faults": self.faults.clear,
            "ec2_calls": lambda reset=False: self.front.calls.read(reset),
            "imds_calls": lambda reset=False: self.imds_calls.read(reset),
            "ec2": self._op_ec2,
            "snapshot": self._op_snapshot,
            "ec2_timing": self._op_ec2_timing,
            "ec2_throttling": lambda reset=False: self.front.throttling.report(reset),
            "fragment_subnet": self._op_fragment_subnet,
            "imds_staleness": self._op_staleness,
            "reset": self._op_reset,
            "shutdown": self._stop.set,
        }

    def _op_status(self) -> dict:
        return {**self._status, "pid": os.getpid(), "imds_staleness": self._cache.staleness,
                "faults": self.faults.listed(), "ec2_timing": self._timing()}

    def _timing(self) -> dict:
        latency = self.front.latency.describe()
        return {"throttling": self.front.throttling.enabled, "latency": latency["enabled"],
                "time_scale": latency["time_scale"], "throttling_figures": self.front.throttling.figures,
                "latency_seconds": latency["seconds"]}

    def _op_ec2_timing(self, throttling: bool | None = None, latency: bool | None = None,
                       figures: dict | None = None, seconds: dict | None = None,
                       time_scale: float | None = None) -> dict:
        """Turn EC2's throttling and latency models on or off, or change their figures; what is not
        given stays. Changing anything of the throttling model starts it over with full buckets."""
        throttle, delay = self.front.throttling, self.front.latency
        for name, value in (("throttling", throttling), ("latency", latency)):
            if value is not None and not isinstance(value, bool):
                raise LabError(f"{name}: {value!r} must be true or false")
        scale = delay.time_scale if time_scale is None else time_scale
        if (throttling, figures, time_scale) != (None, None, None):
            throttle.configure(throttle.enabled if throttling is None else throttling,
                               throttle.figures if figures is None else figures, scale)
        delay.configure(delay.enabled if latency is None else latency, delay.seconds if seconds is None else seconds,
                        scale)
        return self._timing()

    def _op_fragment_subnet(self, subnet_id: str | None = None, keep: int = 0) -> dict:
        """Take one address in every aligned /28 of a subnet that EC2 could still delegate as a prefix,
        but for the lowest `keep` of them, with ENIs created through EC2's rules as another user of
        the subnet would: prefixes then fail with InsufficientCidrBlocks while single addresses are
        left. The ENIs are detached and untagged; `reset` removes them."""
        snap = self._cache.live()
        subnet_id = subnet_id or self._status["subnets"][0]["id"]
        if subnet_id not in snap.subnets:
            raise LabError(f"fragment_subnet: no subnet {subnet_id!r}; the lab's are "
                           f"{', '.join(s['id'] for s in self._status['subnets'])}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise LabError(f"fragment_subnet keep: {keep!r} must be a whole number >= 0")
        blocks = snap.free_prefixes(subnet_id)[keep:]
        free = set(snap.free_ips(subnet_id))
        taken = [next(str(a) for a in ipaddress.ip_network(b) if str(a) in free) for b in blocks]
        per_eni = limits(self.config.instance_type).ipv4_per_eni
        enis = []
        for i in range(0, len(taken), per_eni):
            group = taken[i:i + per_eni]
            addresses = [{"PrivateIpAddress": ip, "Primary": n == 0} for n, ip in enumerate(group)]
            reply = self._op_ec2("CreateNetworkInterface", {"SubnetId": subnet_id, "PrivateIpAddresses": addresses,
                                                            "Description": "vpclab: fragments the subnet"})
            enis.append(reply["NetworkInterface"]["NetworkInterfaceId"])
        return {"subnet_id": subnet_id, "addresses": taken, "enis": enis}

    def _op_fault(self, action: str, error: str | None = None, count: int | None = None,
                  duration: float | None = None, latency: float = 0.0, node: str | None = None) -> None:
        fault = Fault.make(action, error, count, duration, latency, node)
        if action == IMDS:
            names = [n.name for n in self.config.node_plans()]
            if node is not None and node not in names:
                raise LabError(f"fault node {node!r}: the lab's nodes are {', '.join(names)}")
        elif action != ANY_ACTION and action not in self._moto.meta.service_model.operation_names:
            raise LabError(f"fault action {action!r} is not an EC2 API action")
        self.faults.add(fault)

    def _op_snapshot(self, since: float | None = None) -> dict | None:
        """The live snapshot, or None if it is still the one taken at `since`."""
        snap = self._cache.live()
        return None if snap.taken_at == since else snap.to_dict()

    def _op_ec2(self, action: str, params: dict | None = None) -> dict:
        from botocore import xform_name
        from botocore.exceptions import ClientError, ParamValidationError

        if action not in self._moto.meta.service_model.operation_names:
            raise LabError(f"{action!r} is not an EC2 API action")
        call = getattr(self._internal_client(), xform_name(action))
        try:
            reply = call(**(params or {}))
        except ClientError as e:
            err = e.response["Error"]
            raise Ec2Error(err.get("Code", "?"), err.get("Message", ""),
                           e.response["ResponseMetadata"]["HTTPStatusCode"]) from None
        except ParamValidationError as e:
            raise LabError(f"{action}: {e}") from None
        reply.pop("ResponseMetadata", None)
        return json.loads(json.dumps(reply, default=str))

    @functools.cache
    def _internal_client(self):
        return _client(f"http://127.0.0.1:{INTERNAL_FRONT_PORT}")

    def _op_reset(self) -> None:
        """Back to the state after start: no faults, zero counts, the configured IMDS staleness and EC2
        timing models (full buckets), and in EC2 only the nodes' primary ENIs holding only their
        primary addresses (no prefixes); the data plane follows before this returns."""
        self.faults.clear()
        self.front.calls.read(reset=True)
        self.imds_calls.read(reset=True)
        self.front.throttling.configure(self.config.ec2_throttling)
        self.front.latency.configure(self.config.ec2_latency)
        self._cache.staleness = self.config.imds_staleness
        c = self._moto
        with self.front.mutating:
            for eni in self._cache.refresh().enis.values():
                if eni.device_index == 0:
                    if len(eni.ips) > 1:
                        c.unassign_private_ip_addresses(NetworkInterfaceId=eni.id, PrivateIpAddresses=list(eni.ips[1:]))
                    if eni.prefixes:
                        self.front.backend.set_prefixes(eni.id, ())
                    continue
                if eni.attachment_id:
                    c.detach_network_interface(AttachmentId=eni.attachment_id, Force=True)
                c.delete_network_interface(NetworkInterfaceId=eni.id)
            self._cache.mark_dirty()
        self._wiring.apply(self._cache.live())

    def _op_staleness(self, seconds: float) -> None:
        cfg.check_staleness(seconds)
        self._cache.staleness = float(seconds)

    # --- status ----------------------------------------------------------------------------------

    def _describe(self, snap, built: dict) -> dict:
        c = self.config
        lim = limits(c.instance_type)
        instances = built["instances"]
        nodes = []
        for n in c.node_plans():
            eni = snap.enis_of(instances[n.name])[0]
            nodes.append({"name": n.name, "netns": n.netns, "instance_id": instances[n.name],
                          "instance_type": c.instance_type, "primary_ip": n.primary_ip, "mac": eni.mac,
                          "eni_id": eni.id, "subnet_id": eni.subnet_id, "az": n.subnet.az})
        hosts = [{"name": h.name, "netns": h.netns, "cidr": h.cidr, "address": h.address, "echo_port": cfg.ECHO_PORT}
                 for h in c.host_plans()]
        return {
            "name": c.name, "region": cfg.REGION, "vpc_id": built["vpc_id"], "vpc_cidrs": list(c.vpc_cidrs),
            "subnets": [{"id": built["subnets"][s.cidr], "cidr": s.cidr, "az": s.az, "gateway": s.gateway}
                        for s in c.subnets()],
            "security_group_id": built["group_id"],
            "limits": {"instance_type": lim.instance_type, "max_enis": lim.max_enis, "ipv4_per_eni": lim.ipv4_per_eni,
                       "hypervisor": lim.hypervisor, "prefixes_supported": lim.prefixes_supported},
            "nodes": nodes, "internet": hosts[0], "extra_hosts": hosts[1:],
            "endpoints": {"imds": f"http://{cfg.IMDS_ADDRESS}", "ec2": f"http://{cfg.EC2_ADDRESS}:{cfg.EC2_PORT}"},
            "router": {"netns": c.router_netns}, "ctl": {"netns": c.ctl_netns, "moto": f"http://127.0.0.1:{MOTO_PORT}"},
        }


class MotoBackend:
    """moto's EC2 backend, in this process (ec2front.Backend): what moto 5.2.5 accepts and ignores.
    A prefix list set here is an attribute of moto's ENI, so every answer that shows the ENI
    (DescribeNetworkInterfaces, DescribeInstances) carries its ipv4PrefixSet, and it goes with the ENI."""

    def complete(self, action: str, params: dict[str, str]) -> None:
        """ModifyNetworkInterfaceAttribute's Attachment.DeleteOnTermination (the ENI pool sets it after
        each attach), and what terminating an instance does to its ENIs."""
        if action == "TerminateInstances":
            self._terminated([v for k, v in params.items() if k.startswith("InstanceId.")])
        if action != "ModifyNetworkInterfaceAttribute" or "Attachment.DeleteOnTermination" not in params:
            return
        eni = self._eni(params["NetworkInterfaceId"])
        eni.delete_on_termination = params["Attachment.DeleteOnTermination"].lower() == "true"

    @staticmethod
    def read_tags_by_id() -> None:
        """moto 5.2.5 reads one resource's tags by scanning every tag of the region (get_tags through
        describe_tags), for each resource a tag filter looks at: a filtered DescribeNetworkInterfaces
        over a thousand nodes' ENIs spent most of the lab's CPU there. Same answer, read by id."""
        from moto.ec2.models.core import TaggedEC2Resource
        from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

        def get_tags(self) -> list[dict[str, str]]:
            if not self.id:
                return []
            kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
            return [{"resource_id": self.id, "key": k, "value": v, "resource_type": kind}
                    for k, v in self.ec2_backend.tags.get(self.id, {}).copy().items()]

        TaggedEC2Resource.get_tags = get_tags

    @staticmethod
    def _terminated(instance_ids: list[str]) -> None:
        """moto deletes a terminated instance's ENIs that have DeleteOnTermination and leaves the rest
        attached. EC2 detaches the rest (they stay, "available") and deletes the primary ENI made at
        launch (DeleteOnTermination is true by default there; moto makes it false)."""
        backend = MotoBackend._backend()
        for instance_id in instance_ids:
            instance = backend.get_instance(instance_id)
            for nic in list(instance.nics.values()):
                if nic.id not in backend.enis:  # deleted by moto
                    continue
                if nic.device_index == 0:
                    nic.delete()  # kept in instance.nics: moto describes the instance from it
                else:
                    instance.detach_eni(nic)

    def set_prefixes(self, eni_id: str, prefixes: tuple[str, ...]) -> None:
        self._eni(eni_id).ipv4_prefixes = [{"Ipv4Prefix": p} for p in prefixes]

    @staticmethod
    def _eni(eni_id: str):
        return MotoBackend._backend().get_network_interface(eni_id)

    @staticmethod
    def _backend():
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        return ec2_backends[DEFAULT_ACCOUNT_ID][cfg.REGION]


def _http(address, handler, **attributes) -> HttpServer:
    server = HttpServer(address, handler)
    vars(server).update(attributes)
    return server


def _client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("ec2", endpoint_url=endpoint, region_name=cfg.REGION, aws_access_key_id=DUMMY_KEY,
                        aws_secret_access_key=DUMMY_KEY, config=Config(retries={"max_attempts": 1}))


def main(argv: list[str]) -> None:
    state_dir, ready_fd = argv[0], int(argv[1])
    with open(os.path.join(state_dir, "config.json")) as f:
        config = LabConfig.from_json(f.read())
    logging.basicConfig(filename=os.path.join(state_dir, "daemon.log"), level=logging.INFO,
                        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
    ready_file = os.fdopen(ready_fd, "w")

    def ready(message: str) -> None:
        if not ready_file.closed:
            ready_file.write(message + "\n")
            ready_file.close()

    LabDaemon(config).run(ready)
    logging.shutdown()
    os._exit(0)  # moto's server thread would keep the interpreter waiting


if __name__ == "__main__":
    main(sys.argv[1:])
