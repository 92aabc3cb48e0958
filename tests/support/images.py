"""Container images for the real-runtime tests, made offline from Debian's busybox-static.

No image can be pulled here, so the tests make their own: one uncompressed layer holding the static
busybox and its applet links, in an OCI image-layout tar ("oci-archive"), which containerd imports
(`ctr -n k8s.io images import`) and podman loads (`podman load -i`). Both take the image's full name
from the index's annotations. The same busybox serves as the sandbox (pause) image and as the
containers' tools (sh, sleep, ping, nc, httpd, wget, ip).
"""

import hashlib
import io
import json
import os
import platform
import tarfile

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "sleep", "ping", "nc", "httpd", "wget", "ip", "cat", "echo", "hostname", "ls", "true")
PAUSE_ENTRYPOINT = ("/bin/sleep", "2147483647")  # a sandbox only holds the netns; containerd SIGKILLs it
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def busybox_archive(path: str, name: str, entrypoint=PAUSE_ENTRYPOINT) -> str:
    """Write an OCI archive of one busybox image called `name` (a full reference such as
    'registry.k8s.io/pause:3.6') to `path`; return `name`."""
    if not os.access(BUSYBOX, os.X_OK):
        raise FileNotFoundError(f"{BUSYBOX} is missing: Debian's busybox-static (build/setup.sh installs it)")
    layer = _busybox_layer()
    layer_digest = _digest(layer)
    config = _json({
        "architecture": _ARCH.get(platform.machine(), platform.machine()), "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    })
    manifest = _json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": len(layer)}],
    })
    index = _json({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": _digest(manifest), "size": len(manifest),
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name}}],
    })
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        for blob in (layer, config, manifest):
            _add(tar, "blobs/sha256/" + _digest(blob).split(":", 1)[1], blob)
        _add(tar, "index.json", index)
    return name


def _busybox_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "tmp", "proc", "sys", "dev", "etc", "www"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        with open(BUSYBOX, "rb") as f:
            _add(tar, "bin/busybox", f.read(), mode=0o755)
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        _add(tar, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        _add(tar, "etc/group", b"root:x:0:\n")
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()
