"""OCI image-layout tars ("oci-archive"), which `podman load` and `ctr images import` take, the image
named by the index's annotations; run as a program, the aws-node image of build/image.sh.

That image has two uncompressed layers: the Debian root as mmdebstrap made it (the same bytes, so the
same digest, for as long as the cached root is reused: a registry stores it once across versions), and
the application (/app/dist/aws-vpc-cni, its program links in /app/dist/bin, /app/build/install.sh),
made with fixed owners and times so that equal inputs give an equal layer.

    oci.py --root ROOT.tar --top REPO --name NAME --version V --epoch SECONDS --root-recipe TEXT OUT.tar
"""

import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import tarfile

APP_FILES = ("dist/aws-vpc-cni", "dist/bin", "build/install.sh")  # repository paths, under /app
PATH = "/app/dist/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
CHUNK = 1 << 20


def app_layer(top: str, epoch: int) -> bytes:
    """The application's files under app/, owned by root, mtime `epoch`, in name order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _directory(tar, "app", epoch)
        _directory(tar, "app/dist", epoch)
        _directory(tar, "app/build", epoch)
        for relative in APP_FILES:
            for path in _walk(os.path.join(top, relative)):
                info = tar.gettarinfo(path, "app/" + os.path.relpath(path, top))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = epoch
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return out.getvalue()


def _walk(path: str):
    """`path` and, for a directory (not followed when a link), everything under it, sorted."""
    yield path
    if os.path.isdir(path) and not os.path.islink(path):
        for name in sorted(os.listdir(path)):
            yield from _walk(os.path.join(path, name))


def _directory(tar: tarfile.TarFile, name: str, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
    tar.addfile(info)


def write_archive(out: str, layers: list, image_config: dict, name: str, epoch: int = 0, history=()) -> str:
    """Write an OCI archive of one image called `name` to `out`: `layers` are uncompressed layer tars,
    each the bytes or the path of a file (streamed); `image_config` is the config's "config" part.
    Returns the manifest's digest."""
    blobs = [_layer_blob(layer) for layer in layers]
    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = _json({
        "created": created, "architecture": ARCH.get(platform.machine(), platform.machine()), "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [digest for digest, _, _ in blobs]},
        "history": [{"created": created, "created_by": step} for step in history],
    })
    manifest = _json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}
                   for digest, size, _ in blobs],
    })
    index = _json({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _digest(manifest),
                       "size": len(manifest),
                       "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name}}],
    })
    with tarfile.open(out, "w") as tar:
        _add(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}), epoch)
        for digest, size, layer in blobs:
            if isinstance(layer, bytes):
                _add(tar, _blob(digest), layer, epoch)
            else:
                info = tarfile.TarInfo(_blob(digest))
                info.size, info.mode, info.mtime = size, 0o644, epoch
                with open(layer, "rb") as f:
                    tar.addfile(info, f)
        for blob in (config, manifest):
            _add(tar, _blob(_digest(blob)), blob, epoch)
        _add(tar, "index.json", index, epoch)
    return _digest(manifest)


def _layer_blob(layer) -> tuple[str, int, bytes | str]:
    """(digest, size, layer) of a layer given as bytes or as a file's path."""
    if isinstance(layer, bytes):
        return _digest(layer), len(layer), layer
    sha = hashlib.sha256()
    with open(layer, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest(), os.path.getsize(layer), layer


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _add(tar: tarfile.TarFile, name: str, data: bytes, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, epoch
    tar.addfile(info, io.BytesIO(data))


def _json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the root tar mmdebstrap made")
    parser.add_argument("--top", required=True, help="the repository (dist/ built)")
    parser.add_argument("--name", required=True, help="full image name, e.g. localhost/aws-vpc-cni-py:0.1.0")
    parser.add_argument("--version", required=True)
    parser.add_argument("--epoch", type=int, required=True, help="the files' and the image's time")
    parser.add_argument("--root-recipe", required=True, help="how the root was made (the image's history)")
    parser.add_argument("out")
    args = parser.parse_args()
    tmp = args.out + ".tmp"
    image_config = {
        "Entrypoint": ["aws-vpc-cni-agent"], "Cmd": ["run"], "Env": [f"PATH={PATH}"], "WorkingDir": "/",
        "Labels": {"org.opencontainers.image.title": "aws-vpc-cni-py", "org.opencontainers.image.version": args.version,
                   "org.opencontainers.image.description": "CNI plugins and node agent for AWS VPC networking"},
    }
    history = (args.root_recipe, "build/image.sh: the frozen bundle, its program links and build/install.sh under /app")
    digest = write_archive(tmp, [args.root, app_layer(args.top, args.epoch)], image_config, args.name, args.epoch,
                           history)
    os.rename(tmp, args.out)
    print(digest)


if __name__ == "__main__":
    main()
