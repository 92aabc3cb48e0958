"""The conflist the agent writes (`run` once the pool can serve, `render-conflist`, `write-conflist`):
plugins are exec'd with only `CNI_*` variables, so the settings travel in it."""

from __future__ import annotations

import json
import os

from cnicore import settings
from cnicore.fsutil import make_dirs, write_atomic

DEFAULT_NETWORK = "aws-vpc"
# The highest version the runtimes we test against take: containerd 1.6 and podman 4.3 (their libcni
# 1.1) fail every ADD of a 1.1.0 conflist with 'unsupported CNI result version "1.1.0"' (measured:
# tests/lab/test_containerd.py and tests/lab/test_podman.py with 1.1.0). All our plugins speak 1.1.0 too.
DEFAULT_CNI_VERSION = "1.0.0"
CONFLIST_NAME = "10-aws-vpc.conflist"  # sorts before the usual 10-aws.conflist, 10-calico..., 20-...


def render_conflist(cfg, network: str = DEFAULT_NETWORK, cni_version: str = DEFAULT_CNI_VERSION) -> dict:
    """The default chain (ARCHITECTURE §1) with the settings (the agent's record) rendered into each
    plugin's entry."""
    pick = lambda kind: settings.to_conf(cfg, kind)  # noqa: E731
    logging = pick(settings.PLUGIN_LOG)
    ipam = {"type": "aws-eni-ipam", **pick(settings.IPAM)}
    bridge = {"type": "aws-vpc-bridge", **pick(settings.BRIDGE), **logging, "ipam": ipam}
    snat = {"type": "aws-snat", **pick(settings.SNAT), **logging}
    portmap = {"type": "portmap-compat", "capabilities": {"portMappings": True}, "snat": True,
               **pick(settings.PORTMAP), **logging}
    return {"cniVersion": cni_version, "name": network, "plugins": [bridge, snat, portmap]}


def write_conflist(conflist: dict, conf_dir: str, filename: str = CONFLIST_NAME) -> str:
    """Write atomically, so a runtime never reads half a file."""
    make_dirs(conf_dir, 0o755)
    path = os.path.join(conf_dir, filename)
    # 0644 whatever the umask: the runtime reads it, nobody but root may change which binaries it runs
    write_atomic(path, (json.dumps(conflist, indent=2) + "\n").encode(), mode=0o644, durable=True)
    return path
