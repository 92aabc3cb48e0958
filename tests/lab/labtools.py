"""Helpers for tests that drive processes inside lab nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def probe(lab, host: str, *args: str) -> dict:
    """Run `python -m vpclab.probe ARGS` inside a lab host; its JSON answer."""
    proc = lab.exec(host, [sys.executable, "-m", "vpclab.probe", *args], check=False)
    assert proc.stdout.strip(), f"probe {args} printed nothing: {proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


def python_in(lab, node: str, code: str, env: dict | None = None) -> dict:
    """Run Python `code` inside a node with the node's environment; it must print one JSON line."""
    proc = lab.exec(node, [sys.executable, "-c", code], env=env, check=False, timeout=120)
    assert proc.returncode == 0, f"script failed:\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


def start_udp_listener(lab, host: str, addr: str, port: int, seconds: float) -> subprocess.Popen:
    """A UDP listener in `host` for `seconds`; returns once it is bound. `.communicate()` gives its JSON."""
    argv = lab.exec_argv(host, [sys.executable, "-m", "vpclab.probe", "listen-udp", addr, str(port),
                                "--timeout", str(seconds)])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline()) == {"ready": True}
    return proc


def wait_for(condition, timeout: float, interval: float = 0.05):
    """Poll `condition()` until truthy; its value, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
