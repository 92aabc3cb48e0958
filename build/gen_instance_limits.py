#!/usr/bin/env python3
"""Generate cnicore/instance_limits.json from the EC2 instance-type data that moto ships.

    python build/gen_instance_limits.py           # rewrite the table
    python build/gen_instance_limits.py --check   # exit 1 if the committed table is stale

One line per instance type, `"type": [max ENIs, IPv4 addresses per ENI, default vCPUs, Nitro (1/0)]`,
sorted, so a moto upgrade shows up as a readable diff. The last two are what upstream's
max-pods-calculator.sh reads besides the limits (its 110/250 ceiling, and prefix delegation on Nitro).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOP)

from cnicore.instance_limits import DATA_FILE, limits_from_instance_type  # noqa: E402


def render() -> str:
    import moto
    from moto.ec2.models.instance_types import INSTANCE_TYPES

    rows = []
    for name in sorted(INSTANCE_TYPES):
        limits = limits_from_instance_type({"InstanceType": name, **INSTANCE_TYPES[name]})
        rows.append(f"  {json.dumps(name)}: [{limits.max_enis}, {limits.ipv4_per_eni}, {limits.vcpus}, "
                    f"{int(limits.nitro)}]")
    header = {
        "generated_by": "build/gen_instance_limits.py; do not edit",
        "source": f"moto {moto.__version__} moto/ec2/resources/instance_types.json.gz (DescribeInstanceTypes)",
        "columns": ["max_enis (default network card)", "ipv4_addresses_per_eni", "default_vcpus", "nitro"],
    }
    head = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in header.items())
    return "{" + head + ',\n"limits": {\n' + ",\n".join(rows) + "\n}}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed table")
    args = parser.parse_args()
    text = render()
    if args.check:
        with open(DATA_FILE, encoding="ascii") as f:
            if f.read() != text:
                print(f"{DATA_FILE} is stale: run build/gen_instance_limits.py", file=sys.stderr)
                return 1
        return 0
    tmp = DATA_FILE + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, DATA_FILE)
    print(f"wrote {DATA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
