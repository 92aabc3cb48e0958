"""No import circle among our own modules (issue 18): every module under cnicore/, agent/ and
plugins/ is parsed with ast, its imports (function-local ones too) resolved to our modules, and the
graph searched for cycles."""

from __future__ import annotations

import ast
import os

from support.paths import ROOT

# source folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"cnicore": "cnicore", "agent": "aws_vpc_cni_agent", "plugins/aws-eni-ipam": "aws_eni_ipam",
            "plugins/aws-vpc-bridge": "aws_vpc_bridge", "plugins/aws-snat": "aws_snat",
            "plugins/portmap-compat": "portmap_compat"}


def our_modules() -> dict[str, str]:
    """Module name -> source file, for every module of our packages."""
    modules = {}
    for folder, package in PACKAGES.items():
        top = os.path.join(ROOT, folder)
        for root, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            prefix = package + "".join("." + part for part in os.path.relpath(root, top).split(os.sep) if part != ".")
            for name in files:
                if name.endswith(".py"):
                    modules[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(root, name)
    return modules


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """Our modules that `name` (at `path`) imports anywhere in its body."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path_through(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle within `component`, from its first module back to it."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_a_circle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_our_modules_import_one_another_without_a_circle():
    modules = our_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # relative, absolute and function-local imports are all seen
    assert graph["cnicore.poolmgr"] >= {"cnicore.ec2", "cnicore.instance_limits", "cnicore.leaksweep"}
    assert "cnicore.poolmgr" in graph["aws_vpc_cni_agent.loop"]
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


# What may import what (README "Architecture"): the core imports only the core; a plugin the core and
# its own package; the agent the core, its own package, and aws-snat's noderules, whose node rules and
# primary-interface lookup it runs as aws-snat does (so the rules have one author).
ALLOWED_LAYERS = {
    "cnicore": ("cnicore",),
    "aws_eni_ipam": ("cnicore", "aws_eni_ipam"),
    "aws_vpc_bridge": ("cnicore", "aws_vpc_bridge"),
    "aws_snat": ("cnicore", "aws_snat"),
    "portmap_compat": ("cnicore", "portmap_compat"),
    "aws_vpc_cni_agent": ("cnicore", "aws_vpc_cni_agent", "aws_snat.noderules"),
}


def test_each_layer_imports_only_what_it_may():
    modules = our_modules()
    wrong = []
    for name, path in sorted(modules.items()):
        allowed = ALLOWED_LAYERS[name.split(".")[0]]
        for target in sorted(imports_of(name, path, modules)):
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports across layers: " + "; ".join(wrong)
