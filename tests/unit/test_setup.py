"""build/setup.sh installs every command the project runs.

A command that only a developer's machine has (installed by hand long ago) passes every run there and
fails on a fresh machine: `nft` did, for two netfilter tests. This test reads the commands out of the
code (the first word of every command line in the Python and shell sources: argument lists, shell
strings, scripts) and finds the Debian package of each through dpkg. Every one must come from a
package setup.sh installs or from Debian's required base, which every Debian machine has.
"""

import ast
import os
import re
import shutil
import subprocess
from support.paths import ROOT

SOURCES = ("cnicore", "plugins", "agent", "vpclab", "tests", "build", "Makefile", ".ci/run")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where a new command line starts in a shell text.
_SEPARATORS = re.compile(r"(?:^|\n|;|&&|\|\||\||\$\(|`|\bthen\b|\bdo\b|\belse\b|\bexec\b|\bsudo\b|\btimeout\s+\S+)\s*")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")
# Words that start strings of ours without being commands there (prose, not a command line).
PROSE = {"file", "node", "write"}
# Commands that run the command named after their options.
WRAPPERS = {"nsenter", "unshare", "timeout", "env", "setsid", "chroot", "strace"}
# What runs setup.sh itself: the README's `make test`.
PREREQUISITES = {"make"}


def setup_packages() -> set[str]:
    """The Debian packages named in setup.sh's debs=(...) and debs+=(...) arrays."""
    with open(os.path.join(ROOT, "build", "setup.sh")) as f:
        text = f.read()
    found = set()
    for body in re.findall(r"^\s*debs\+?=\(([^)]*)\)", text, re.M):
        found.update(re.sub(r"#[^\n]*", "", body).split())
    return found


def with_dependencies(packages: set[str]) -> set[str]:
    """`packages` and every installed package they depend on, directly or not."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Depends}, ${Pre-Depends}\n"],
                         capture_output=True, text=True, check=True).stdout
    depends = {}
    for line in out.splitlines():
        name, _, deps = line.partition("\t")
        depends[name] = {re.split(r"[\s(:]", alt.strip())[0] for alt in re.split(r"[,|]", deps) if alt.strip()}
    found, todo = set(), list(packages)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(depends.get(name, ()))
    return found


def base_packages() -> set[str]:
    """Packages every Debian system has: Essential ones and those of priority required."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Essential} ${Priority}\n"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines()
            if len(line.split()) == 3 and (line.split()[1] == "yes" or line.split()[2] == "required")}


def _command_words(text: str) -> set[str]:
    words = set()
    for match in _SEPARATORS.finditer(text):
        word = _WORD.match(text, match.end())
        if word:
            words.add(word.group())
    return words


_EXEC_CALLS = re.compile(r"run|exec|Popen|call|check_output|spawn|sh$|shell", re.I)


def _is_argv(node: ast.AST, parent: ast.AST | None) -> bool:
    """A list/tuple literal that is a command's argv: handed to a call that runs things, or holding
    an option ("-x") after its first word."""
    if not (isinstance(node, (ast.List, ast.Tuple)) and node.elts and isinstance(node.elts[0], ast.Constant)
            and isinstance(node.elts[0].value, str)):
        return False
    if isinstance(parent, ast.Call):
        func = parent.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if _EXEC_CALLS.search(name):
            return True
    return any(isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value.startswith("-")
               for e in node.elts[1:])


def _python_words(source: str) -> set[str]:
    """Command words of a Python source: argv literals' first words, and the command lines of every
    multi-word string that is not a docstring or part of an f-string."""
    tree = ast.parse(source)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.add(id(node.value))  # docstrings
        elif isinstance(node, ast.JoinedStr):
            skip.update(id(part) for part in node.values)
    words = set()
    for parent in ast.walk(tree):
        for node in ast.iter_child_nodes(parent):
            if _is_argv(node, parent):
                words.update(_command_words(node.elts[0].value))  # ["ip", "-n", ...]
                if node.elts[0].value in WRAPPERS:                # ["nsenter", "--net=...", "podman", ...]
                    words.update(e.value for e in node.elts[1:] if isinstance(e, ast.Constant)
                                 and isinstance(e.value, str) and _WORD.fullmatch(e.value))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                    and " " in node.value.strip():
                words.update(_command_words(node.value))         # "iptables -w -t nat -F; ..."
    return words


def commands_in_sources() -> dict[str, set[str]]:
    """Command word -> the files it appears in."""
    found: dict[str, set[str]] = {}
    tracked = subprocess.run(["git", "ls-files", "--", *SOURCES], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for relative in tracked:
        name = os.path.join(ROOT, relative)
        if relative.endswith((".py", ".sh")) or relative in SOURCES:
            with open(name, errors="replace") as f:
                text = f.read()
            words = _python_words(text) if name.endswith(".py") else _command_words(text)
            for word in words - PROSE - PREREQUISITES:
                found.setdefault(word, set()).add(relative)
    return found


def owners(paths: list[str]) -> dict[str, str]:
    """Path -> Debian package, for the paths dpkg knows (also through /usr-merge and symlinks)."""
    owner = {}
    for path in paths:
        for candidate in dict.fromkeys((path, "/usr" + path if not path.startswith("/usr/") else path,
                                        os.path.realpath(path))):
            out = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True)
            if out.returncode == 0:
                owner[path] = out.stdout.split(":", 1)[0].split(",")[0].strip()
                break
    return owner


def test_setup_lists_the_packages_of_every_command_the_project_runs():
    installed = with_dependencies(setup_packages()) | base_packages()
    used = commands_in_sources()
    paths = {word: shutil.which(word, path=SYSTEM_PATH) for word in used}
    owner = owners([p for p in paths.values() if p])
    missing = {f"{word} ({owner[path]}; used in {', '.join(sorted(used[word])[:3])})"
               for word, path in paths.items() if path in owner and owner[path] not in installed}
    assert not missing, f"build/setup.sh does not install: {sorted(missing)}"
    # the check sees the commands it is about
    assert {"ip", "iptables-nft", "nft", "strace", "git", "containerd", "ctr", "podman"} <= set(paths), \
        sorted(set(paths))


def test_the_check_finds_a_command_in_each_kind_of_source():
    assert _python_words('run(["nft", "list", "ruleset"])') >= {"nft"}
    assert _python_words('run(["nsenter", "--net=/run/netns/x", "podman", "ps"])') >= {"nsenter", "podman"}
    assert _python_words('sh(ns, "iptables-nft -w -t nat -N A; nft add table inet x")') >= {"iptables-nft", "nft"}
    assert _command_words("set -e\nfor v in a b; do conntrack -F; done\nx=$(git rev-parse HEAD)") >= \
        {"set", "conntrack", "git"}
    assert "git" in setup_packages() and "nftables" in setup_packages()
