#!/usr/bin/env bash
# make install [DESTDIR=...] [CNI_BIN_DIR=/opt/cni/bin]: put the bundle and the program links in place
# atomically. The bundle goes into a new folder named by its content hash; each link is switched with
# one rename(2), so a pod starting during an upgrade runs either the old or the new bundle, never a
# half-copied one. The previous bundle is kept (a running plugin may still load files from it); older
# ones are removed. BUNDLE=DIR installs another bundle folder than dist/aws-vpc-cni.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bin_dir="${DESTDIR:-}${CNI_BIN_DIR:-/opt/cni/bin}"
bundle="${BUNDLE:-$top/dist/aws-vpc-cni}"
[ -x "$bundle/aws-vpc-cni" ] || { echo "no bundle at $bundle: run make build" >&2; exit 1; }
programs=(aws-eni-ipam aws-vpc-bridge aws-snat portmap-compat aws-vpc-cni-agent)

hash=$(cd "$bundle" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
target=".aws-vpc-cni-$hash"
mkdir -p "$bin_dir"
if [ ! -d "$bin_dir/$target" ]; then
    rm -rf "$bin_dir/$target.tmp"
    cp -a "$bundle" "$bin_dir/$target.tmp"
    sync -f "$bin_dir/$target.tmp" 2>/dev/null || sync
    mv -T "$bin_dir/$target.tmp" "$bin_dir/$target"
fi
previous=$(readlink "$bin_dir/aws-eni-ipam" 2>/dev/null | cut -d/ -f1 || true)
for p in "${programs[@]}"; do
    ln -sfn "$target/aws-vpc-cni" "$bin_dir/.$p.new"
    mv -T "$bin_dir/.$p.new" "$bin_dir/$p"
done
for old in "$bin_dir"/.aws-vpc-cni-*; do
    name=$(basename "$old")
    [ "$name" = "$target" ] || [ "$name" = "$previous" ] || rm -rf "$old"
done
# The reference loopback plugin: containerd and podman bring up every pod's lo with it. Installed only
# where the node has none (an EKS AMI ships its own), from Debian's containernetworking-plugins (which
# the image carries), as upstream's installer does.
loopback="${LOOPBACK:-/usr/lib/cni/loopback}"
if [ ! -e "$bin_dir/loopback" ] && [ -x "$loopback" ]; then
    cp "$loopback" "$bin_dir/.loopback.new"
    mv -T "$bin_dir/.loopback.new" "$bin_dir/loopback"
    programs+=(loopback)
fi
echo "installed $target into $bin_dir: ${programs[*]}"
