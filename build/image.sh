#!/usr/bin/env bash
# make image: the aws-node image, built offline from Debian's packages and the frozen bundle, loaded into
# podman as localhost/aws-vpc-cni-py:<version of pyproject.toml> (deploy/'s manifests name this tag).
#
#   1. the root: Debian bookworm's Essential set plus build/image/packages, made by mmdebstrap, without
#      documentation, manuals and locales (copyright files kept). This is the slow part (~20-60 s), so
#      the tar is cached in build/work/image/ under the hash of the package list and of the recipe
#      below, and made again only when either changes (`rm -r build/work/image` to refresh it with
#      Debian's latest updates);
#   2. the image: that tar as its first layer, the bundle (dist/aws-vpc-cni), its program links
#      (dist/bin) and build/install.sh under /app as its second, PATH starting with /app/dist/bin, entry
#      point `aws-vpc-cni-agent run`: an OCI archive, build/work/image/aws-vpc-cni-py-<version>.oci.tar
#      (build/image/oci.py);
#   3. `podman load` of that archive into the storage podman's environment names (by default the
#      machine's; CONTAINERS_STORAGE_CONF / CONTAINERS_CONF select another); the image the tag named
#      before is removed when nothing else uses it.
# Run after `make build`. Installs mmdebstrap (Debian's package) when missing. tests/lab/test_image.py builds
# the image with this script into a private podman and runs the DaemonSet's pod from it on a lab node.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
work="$top/build/work/image"
say() { printf '[image] %s\n' "$*" >&2; }

version=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
name="localhost/aws-vpc-cni-py:$version"
[ -x dist/aws-vpc-cni/aws-vpc-cni ] || { say "no frozen bundle in dist/: run make build"; exit 1; }

if ! dpkg-query -W -f='${Status}' mmdebstrap 2>/dev/null | grep -q 'install ok installed'; then
    say "installing Debian's mmdebstrap"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null
fi

mkdir -p "$work"
# One image build at a time (they share the cached root and the archive).
exec 8>"$work/.lock"
flock 8

# --- 1. the root ---------------------------------------------------------------------------------
packages=$(sed 's/#.*//' build/image/packages | xargs | tr ' ' ',')
# merged /usr as Debian 12 has it (the hook installs usr-is-merged), without usrmerge and its Perl.
# Only the loopback plugin of containernetworking-plugins is unpacked.
DPKG_FILTER=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
             --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
             --dpkgopt='path-exclude=/usr/share/locale/*'
             --dpkgopt='path-exclude=/usr/lib/cni/*' --dpkgopt='path-include=/usr/lib/cni/loopback')
recipe=(mmdebstrap --variant=essential --format=tar --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
        "${DPKG_FILTER[@]}" --include="$packages" bookworm)
key=$(printf '%s\n' "${recipe[@]}" | sha256sum | cut -c1-16)
root="$work/root-$key.tar"
if [ ! -f "$root" ]; then
    say "making the Debian root: ${recipe[*]}"
    rm -f "$work"/root-*.tar
    "${recipe[@]}" "$root.tmp" 2> "$work/mmdebstrap.log" || { cat "$work/mmdebstrap.log" >&2; exit 1; }
    mv "$root.tmp" "$root"
fi

# --- 2. the image --------------------------------------------------------------------------------
archive="$work/aws-vpc-cni-py-$version.oci.tar"
# dist/ read under build.sh's lock, shared: a build running meanwhile is waited for, not half read.
exec 9>"$top/build/work/.lock"
flock -s 9
.venv/bin/python build/image/oci.py --root "$root" --top "$top" --name "$name" --version "$version" \
    --epoch "$(git log -1 --format=%ct 2>/dev/null || echo 0)" --root-recipe "${recipe[*]}" "$archive" >/dev/null
flock -u 9

# --- 3. into podman ------------------------------------------------------------------------------
previous=$(podman image inspect --format '{{.Id}}' "$name" 2>/dev/null || true)
podman load -q -i "$archive" >/dev/null
current=$(podman image inspect --format '{{.Id}}' "$name")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true  # kept while a container or another tag uses it
fi
say "loaded $name (image ${current:0:12}; archive $archive)"
echo "$name"
