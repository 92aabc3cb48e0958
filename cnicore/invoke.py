"""Delegating to another plugin (the IPAM plugin named in `ipam.type`), as libcni's invoke does.

The delegate is found in CNI_PATH and run with the same stdin and environment except CNI_COMMAND;
its error code and message are passed through unchanged.
"""

from __future__ import annotations

import os
import subprocess

from . import result as cniresult
from .errors import CNIError, DECODING_FAILURE, INTERNAL, INVALID_CONFIG, INVALID_ENVIRONMENT
from .skel import CmdArgs, load_json


def find_in_path(plugin_type: str, path: list[str]) -> str:
    if not plugin_type or "/" in plugin_type or plugin_type in (".", ".."):
        raise CNIError(INVALID_CONFIG, f"invalid plugin type {plugin_type!r}")
    if not path:
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_PATH is empty: cannot find plugin {plugin_type!r}")
    for directory in path:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(INVALID_CONFIG, f"failed to find plugin {plugin_type!r} in path {path}")


def delegate(args: CmdArgs, plugin_type: str, command: str, stdin: bytes | None = None) -> dict | None:
    """Run `plugin_type` for `command`; return its result (internal shape) for ADD, else None."""
    exe = find_in_path(plugin_type, args.path)
    env = dict(os.environ, CNI_COMMAND=command)
    proc = subprocess.run([exe], input=args.stdin if stdin is None else stdin, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if args.log and proc.stderr:
        args.log.debug(f"{plugin_type} {command} stderr", stderr=proc.stderr.decode(errors="replace")[-2000:])
    if proc.returncode != 0:
        raise _delegate_error(plugin_type, command, proc)
    if command != "ADD":
        return None
    try:
        answer = load_json(proc.stdout)  # no NaN/Infinity, and too deep is an error, not a crash
    except ValueError as exc:
        raise CNIError(DECODING_FAILURE, f"{plugin_type} ADD printed no valid result: {exc}") from None
    return cniresult.parse(answer, answer.get("cniVersion", args.version) if isinstance(answer, dict) else args.version)


def _delegate_error(plugin_type: str, command: str, proc: subprocess.CompletedProcess) -> CNIError:
    try:
        err = load_json(proc.stdout)
        if isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("msg"), str):
            return CNIError(err["code"], err["msg"], str(err.get("details", "")))
    except ValueError:
        pass
    tail = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-500:]
    return CNIError(INTERNAL, f"{plugin_type} {command} failed with exit status {proc.returncode}", tail)
