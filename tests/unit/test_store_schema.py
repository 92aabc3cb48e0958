"""The state store's document is indexed by cnicore/pool.py alone (issue 18, "a typed store schema"):
every other module under cnicore/, agent/ and plugins/ reads and writes it through pool's views.

The key names are those pool.py declares (every `_Key` of its views), so the list cannot drift from
the schema. Each module is parsed with ast and every `x["key"]`, `x.get("key", ...)`,
`x.setdefault("key", ...)` and `x.pop("key", ...)` with one of those names is a finding, unless the
module reads another JSON shape that uses the same word (FOREIGN: module -> the keys and what they
are). cnicore/store.py keeps the envelope's keys ("schema", "network"), which are not pool's."""

from __future__ import annotations

import ast
import os

from cnicore import pool
from support.paths import ROOT

FOLDERS = ("cnicore", "agent", "plugins")
OWNER = "cnicore/pool.py"

# module -> (keys, the shape they index there); each entry must still be needed (no stale exemption)
FOREIGN = {
    "agent/main.py": ({"node", "enis", "blocked", "last_error", "instance_id", "instance_type", "primary_ip",
                       "primary", "device_number", "reason", "action", "code", "message"},
                      "the status socket's JSON (Agent.status: copies of the document's node facts, blocked "
                      "and last_error entries; Pool.eni_stats rows)"),
    "agent/metrics.py": ({"enis", "blocked", "prefixes", "max_enis"},
                         "the status socket's JSON, its Pool.eni_stats rows and warmpool figures"),
    "cnicore/warmpool.py": ({"device_number", "attached_at", "ours", "prefixes"}, "Pool.eni_stats rows"),
    "cnicore/imds.py": ({"mac"}, "an IMDS path"),
    "cnicore/invoke.py": ({"code"}, "a CNI error"),
    "cnicore/result.py": ({"ips"}, "a CNI result"),
    "cnicore/skel.py": ({"ifname"}, "cni.dev/valid-attachments"),
    "plugins/aws-eni-ipam/main.py": ({"ips"}, "prevResult"),
    "plugins/aws-vpc-bridge/main.py": ({"ips", "mac"}, "the IPAM result and prevResult"),
    "plugins/portmap-compat/main.py": ({"ips"}, "prevResult"),
    "plugins/aws-snat/noderules.py": ({"mac"}, "an IMDS path"),
}


def schema_keys() -> set[str]:
    """Every key name of the document, as pool.py's views declare them."""
    return {attr.name for view in vars(pool).values() if isinstance(view, type) and issubclass(view, pool._View)
            for attr in vars(view).values() if isinstance(attr, pool._Key)}


def indexed_keys(path: str) -> list[tuple[int, str]]:
    """(line, key) of each string-constant subscript, get, setdefault and pop in the module."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            key = node.slice
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "setdefault", "pop") and node.args):
            key = node.args[0]
        else:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.append((node.lineno, key.value))
    return sorted(found)


def our_sources() -> list[str]:
    """Paths (relative to the repository) of the modules under FOLDERS."""
    out = []
    for folder in FOLDERS:
        for root, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.relpath(os.path.join(root, name), ROOT).replace(os.sep, "/")
                    for name in files if name.endswith(".py")]
    return sorted(out)


def test_the_schema_keys_come_from_pools_views():
    keys = schema_keys()
    assert {"node", "enis", "agent", "instance_id", "mac", "ips", "state", "container_id", "warm_floor",
            "backoff", "reason", "code"} <= keys
    assert "schema" not in keys and "network" not in keys  # the store's envelope


def test_nothing_but_pool_indexes_the_document():
    keys = schema_keys()
    findings, exempted = [], set()
    for rel in our_sources():
        if rel == OWNER:
            continue
        allowed = FOREIGN.get(rel, (set(), ""))[0]
        for line, key in indexed_keys(os.path.join(ROOT, rel)):
            if key not in keys:
                continue
            if key in allowed:
                exempted.add((rel, key))
            else:
                findings.append(f"{rel}:{line}: [{key!r}]")
    assert not findings, ("the store document indexed outside cnicore/pool.py (use its views: Document, "
                          "NodeFacts, ENI, IPEntry, AgentState, Blocked, LastError):\n" + "\n".join(findings))
    stale = sorted((rel, key) for rel, (allowed, _) in FOREIGN.items() for key in allowed if (rel, key) not in exempted)
    assert not stale, f"FOREIGN exempts keys these modules no longer index: {stale}"
