"""ENI limits and hypervisor per instance type, read from the DescribeInstanceTypes data moto ships.

The lab takes its limits from moto's own data, not from the plugins' table, so the plugins' table is
checked against an independent source. The file is read directly (not through `import moto`, which
takes about a second).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache

from .errors import LabError


@dataclass(frozen=True)
class Limits:
    instance_type: str
    max_enis: int
    ipv4_per_eni: int        # IPv4 slots per ENI: each holds one address or one /28 prefix
    hypervisor: str = "nitro"  # DescribeInstanceTypes' Hypervisor: "nitro" or "xen"; "" for bare metal
    bare_metal: bool = False

    @property
    def prefixes_supported(self) -> bool:
        """EC2 assigns IPv4 prefixes to ENIs of Nitro instances only (bare metal included, as upstream's
        IsPrefixDelegationSupported counts it)."""
        return self.hypervisor == "nitro" or self.bare_metal


def limits(instance_type: str) -> Limits:
    info = _table().get(instance_type)
    if info is None:
        raise LabError(f"unknown instance type {instance_type!r} (not in moto's DescribeInstanceTypes data)")
    net = info["NetworkInfo"]
    return Limits(instance_type, int(net["MaximumNetworkInterfaces"]), int(net["Ipv4AddressesPerInterface"]),
                  info.get("Hypervisor", ""), bool(info.get("BareMetal", False)))


@lru_cache(maxsize=1)
def _table() -> dict:
    spec = importlib.util.find_spec("moto")
    if spec is None or not spec.submodule_search_locations:
        raise LabError("moto is not installed (pip install 'moto[server]')")
    path = os.path.join(spec.submodule_search_locations[0], "ec2", "resources", "instance_types.json.gz")
    with gzip.open(path, "rt") as f:
        return json.load(f)
