"""The conflist the agent writes (`run` once the pool can serve, `render-conflist`, `write-conflist`):
plugins are exec'd with only `CNI_*` variables, so the settings travel in it."""

from __future__ import annotations

import contextlib
import json
import os

from cnicore import settings
from cnicore.fsutil import make_dirs

DEFAULT_NETWORK = "aws-vpc"
# The highest version the runtimes we test against take: containerd 1.6 and podman 4.3 (their libcni
# 1.1) fail every ADD of a 1.1.0 conflist with 'unsupported CNI result version "1.1.0"' (measured:
# tests/lab/test_containerd.py and tests/lab/test_podman.py with 1.1.0). All our plugins speak 1.1.0 too.
DEFAULT_CNI_VERSION = "1.0.0"
CONFLIST_NAME = "10-aws-vpc.conflist"  # sorts before the usual 10-aws.conflist, 10-calico..., 20-...


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
