#!/usr/bin/env bash
# make build: one PyInstaller --onedir bundle (dist/aws-vpc-cni) that runs each plugin and the agent
# by program name, plus dist/bin with a link per program. Built from the pinned dependencies in .venv.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
work="$top/build/work"
programs=(aws-eni-ipam aws-vpc-bridge aws-snat portmap-compat aws-vpc-cni-agent)

rm -rf "$work/src"
mkdir -p "$work"
# PyInstaller cannot follow the editable install's import hook: stage a plain copy of our packages.
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-compile --target "$work/src" . \
    > "$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; exit 1; }
hidden=()
for module in $(.venv/bin/python -c 'import sys; sys.path.insert(0, "build"); import entry; print(" ".join(entry.PROGRAMS.values()))'); do
    hidden+=(--hidden-import "$module")
done
PYTHONHASHSEED=0 SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0) \
.venv/bin/pyinstaller --noconfirm --clean --onedir --name aws-vpc-cni --log-level WARN \
    --distpath "$top/dist" --workpath "$work/pyinstaller" --specpath "$work" \
    --paths "$work/src" --collect-data cnicore "${hidden[@]}" build/entry.py
mkdir -p dist/bin
for p in "${programs[@]}"; do
    ln -sfn ../aws-vpc-cni/aws-vpc-cni "dist/bin/$p"
done
echo "built dist/aws-vpc-cni with links in dist/bin: ${programs[*]}"
