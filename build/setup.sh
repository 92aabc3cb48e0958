#!/usr/bin/env bash
# One-command set-up for a fresh Debian machine (run as root): the Debian packages the tests and the
# lab need, the real cnitool built from Debian's source package, and a .venv with the project.
# Every step checks first and does nothing when its work is already done, so a second run is quick.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
tools="$top/.tools"
venv="$top/.venv"
# One set-up at a time (make test and make demo started together both run it); the second waits, then
# finds the work done. The lock file lives in .tools, which is git-ignored.
mkdir -p "$tools"
exec 8>"$tools/.setup.lock"
flock 8

say() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages -----------------------------------------------------------------------------
# Every command the plugins, the lab, the demo and the tests run comes from one of these (or from
# Debian's required base); tests/unit/test_setup.py checks that against the code.
# gcc and libc6-dev: build.sh compiles the bundle's launcher (build/launcher.c); it also needs the
# Python headers, which a Debian Python gets from python3-dev. nftables: the nft command the netfilter
# tests write other tables with. containerd, runc, podman, busybox-static: the real-runtime tests (the
# container images are made from busybox). strace: tests count a frozen plugin's execs. mmdebstrap:
# make image (and its test) makes the image's Debian root.
debs=(iptables nftables iproute2 procps golang-go golang-github-appc-cni-dev containernetworking-plugins dpkg-dev
      python3-venv gcc libc6-dev git strace containerd runc podman busybox-static mmdebstrap)
if [ "$("${PYTHON:-python3}" -c 'import sys; print(sys.prefix)' 2>/dev/null)" = /usr ]; then
    debs+=(python3-dev)
fi
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -q >/dev/null
    apt_updated=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Debian source packages ----------------------------------------------------------------------
# deb-src for the configured Debian suites, so `apt-get source` works; enabled once, on first need.
apt_source() {  # apt_source PACKAGE DIR [apt-get source options]: PACKAGE's source into DIR
    local src_list=/etc/apt/sources.list.d/aws-vpc-cni-deb-src.sources
    if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "enabling deb-src for the configured Debian suites ($src_list)"
        : >"$src_list.tmp"
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -e "$f" ] || continue
            # deb822 stanzas of type deb, re-typed as deb-src
            awk 'BEGIN{RS=""; ORS="\n\n"} /(^|\n)Types:[^\n]*deb/ && /debian/ {
                     sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f" >>"$src_list.tmp"
        done
        if [ -f /etc/apt/sources.list ]; then
            sed -n 's/^deb \(.*debian.*\)$/deb-src \1/p' /etc/apt/sources.list >"${src_list%.sources}.list"
        fi
        mv "$src_list.tmp" "$src_list"
        apt_updated=
    fi
    [ -n "$apt_updated" ] || { apt-get update -q >/dev/null; apt_updated=1; }
    (cd "$2" && apt-get source -q "${@:3}" "$1" >/dev/null 2>&1) || { say "apt-get source $1 failed"; exit 1; }
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- cnitool from Debian's source package golang-github-appc-cni ---------------------------------
cnitool="$tools/bin/cnitool"
if [ ! -x "$cnitool" ]; then
    say "building cnitool from Debian's golang-github-appc-cni source"
    apt_source golang-github-appc-cni "$work"
    srcdir=$(find "$work" -maxdepth 1 -type d -name 'golang-github-appc-cni-*' | head -1)
    [ -n "$srcdir" ] || { say "apt-get source golang-github-appc-cni unpacked nothing"; exit 1; }
    mkdir -p "$work/gopath/src/github.com/containernetworking" "$tools/bin"
    ln -s "$srcdir" "$work/gopath/src/github.com/containernetworking/cni"
    (cd "$work/gopath/src/github.com/containernetworking/cni" &&
        GO111MODULE=off GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/gocache" \
            go build -o "$cnitool.tmp" ./cnitool)
    mv "$cnitool.tmp" "$cnitool"
fi

# --- Python virtual environment ------------------------------------------------------------------
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { say "Python 3.11 or newer is needed ($python is $("$python" -V 2>&1))"; exit 1; }
stamp="$venv/.installed"
want=$(cat pyproject.toml build/constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing the project into $venv"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    if ! "$venv/bin/pip" install -q --disable-pip-version-check -c build/constraints.txt -e '.[test]' \
            >"$venv/pip-install.log" 2>&1; then
        grep -v 'is ignored: it is neither' "$venv/pip-install.log" >&2
        say "pip install failed (log: $venv/pip-install.log)"
        exit 1
    fi
    echo "$want" >"$stamp"
fi

# --- CRI client stubs ----------------------------------------------------------------------------
# tests/support/cri_world.py speaks kubelet's CRI (runtime.v1) to containerd: Python gRPC stubs generated
# from the api.proto vendored in Debian's containerd source package, the version the installed
# containerd serves. Its gogoproto options only steer Go code generation, and protoc would need
# gogo.proto for them: those lines are dropped.
cri="$tools/cri"
if [ ! -f "$cri/cri_api_pb2_grpc.py" ]; then
    say "generating the CRI client stubs from Debian's containerd source"
    mkdir -p "$work/containerd" "$work/proto"
    apt_source containerd "$work/containerd" --download-only
    tar -xf "$(find "$work/containerd" -maxdepth 1 -name 'containerd_*.orig.tar.*' | head -1)" -C "$work/containerd" \
        --wildcards '*/vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto'
    proto=$(find "$work/containerd" -path '*/vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto' | head -1)
    [ -n "$proto" ] || { say "no runtime/v1/api.proto in Debian's containerd source"; exit 1; }
    grep -v gogoproto "$proto" >"$work/proto/cri_api.proto"
    rm -rf "$cri.tmp" && mkdir -p "$cri.tmp"
    "$venv/bin/python" -m grpc_tools.protoc -I"$work/proto" --python_out="$cri.tmp" --grpc_python_out="$cri.tmp" \
        "$work/proto/cri_api.proto"
    rm -rf "$cri" && mv "$cri.tmp" "$cri"
fi
say "ready: $venv, $cnitool, $cri"
