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
