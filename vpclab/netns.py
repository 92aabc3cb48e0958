"""Named network namespaces for the lab, the tests and the demo.

Everything the project creates on the machine lives in a namespace whose name starts with a prefix
owned by one lab or one test run, so it can be found and removed again, also after a crash.
Names are `<prefix>-<role>`; a prefix embeds the creating process's pid so that a sweep can tell
a live owner from a dead one.
"""

from __future__ import annotations

import os
import re
import subprocess

from cnicore import rtnl

NETNS_DIR = "/run/netns"
PREFIX_RE = re.compile(r"^avc[a-z0-9]{1,12}$")


def run(args: list[str], *, netns: str | None = None, check: bool = True,
        input: str | bytes | None = None, env: dict | None = None,
        timeout: float | None = 60) -> subprocess.CompletedProcess:
    """Run a command, inside `netns` when given, capturing text output."""
    if netns is not None:
        args = ["ip", "netns", "exec", netns, *args]
    text = not isinstance(input, bytes)
    proc = subprocess.run(args, input=input, capture_output=True, text=text, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, args, proc.stdout, proc.stderr)
    return proc


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def create(name: str) -> str:
    """Create a namespace with loopback up; return its path."""
    run(["ip", "netns", "add", name])
    run(["ip", "link", "set", "lo", "up"], netns=name)
    return path(name)


def delete(name: str) -> None:
    """Delete a namespace and kill what still runs in it; missing is fine."""
    if not exists(name):
        return
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "delete", name], check=False)


def entered(name: str) -> rtnl.entered:
    """Move the calling thread into namespace `name` for a `with` block, then back (cnicore.rtnl.entered).

    Only this thread moves; sockets created inside stay in `name` for their whole life, which is
    how one process serves several namespaces. Threads started inside inherit `name`.
    """
    return rtnl.entered(path(name))


def listed(prefix: str) -> list[str]:
    """Namespaces whose name starts with `prefix-`."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix + "-"))


def new_prefix(tag: str = "t") -> str:
    """A prefix unique to this process: 'avc' + tag + pid in base 36."""
    pid = _base36(os.getpid())
    prefix = f"avc{tag}{pid}"
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"bad namespace prefix {prefix!r}")
    return prefix


def sweep(prefix: str) -> list[str]:
    """Delete every namespace of `prefix`; return their names."""
    gone = listed(prefix)
    for name in gone:
        delete(name)
    return gone


def sweep_orphans(tag: str = "t") -> list[str]:
    """Delete namespaces left by dead processes that used `new_prefix(tag)`."""
    gone = []
    for name in listed_all():
        if owner_gone(name.split("-", 1)[0], tag):
            delete(name)
            gone.append(name)
    return gone


def owner_gone(prefix: str, tag: str = "t") -> bool:
    """`prefix` is one `new_prefix(tag)` made for a process that has ended."""
    head = f"avc{tag}"
    if not prefix.startswith(head) or not PREFIX_RE.match(prefix):
        return False
    try:
        pid = int(prefix[len(head):], 36)
    except ValueError:
        return False
    return pid != os.getpid() and not os.path.exists(f"/proc/{pid}")


def listed_all() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out
