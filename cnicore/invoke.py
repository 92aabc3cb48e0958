"""Delegating to another plugin (the IPAM plugin named in `ipam.type`), as libcni's invoke does.

The delegate is found in CNI_PATH and run with the same stdin and environment except CNI_COMMAND;
its error code and message are passed through unchanged.

When what CNI_PATH holds under that name is this very program (a link to the frozen bundle we are
running from) and the plugin is one of ours, it runs in this process, through the same skeleton with
the same environment and stdin, and its answer is read from the same bytes it would have printed:
the same code on the same input, without a second interpreter start (measured: ~50 ms of CPU per pod
ADD and DEL). An IPAM binary from anywhere else, another version of ours included, is exec'd.
"""

from __future__ import annotations

import os
import sys

from . import result as cniresult
from .errors import CNIError, DECODING_FAILURE, INTERNAL, INVALID_CONFIG, INVALID_ENVIRONMENT
from .skel import CmdArgs, answer_bytes, load_json

IN_PROCESS = {"aws-eni-ipam": "aws_eni_ipam.main"}  # plugin type -> module with HANDLERS


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
    stdin = args.stdin if stdin is None else stdin
    if plugin_type in IN_PROCESS and is_this_program(exe):
        if args.log:
            args.log.debug(f"{plugin_type} {command} runs in-process", executable=exe)
        returncode, stdout, stderr = _run_in_process(plugin_type, env, stdin)
    else:
        returncode, stdout, stderr = _run_executable(exe, env, stdin)
    if args.log and stderr:
        args.log.debug(f"{plugin_type} {command} stderr", stderr=stderr.decode(errors="replace")[-2000:])
    if returncode != 0:
        raise _delegate_error(plugin_type, command, returncode, stdout, stderr)
    if command != "ADD":
        return None
    try:
        answer = load_json(stdout)  # no NaN/Infinity, and too deep is an error, not a crash
    except ValueError as exc:
        raise CNIError(DECODING_FAILURE, f"{plugin_type} ADD printed no valid result: {exc}") from None
    return cniresult.parse(answer, answer.get("cniVersion", args.version) if isinstance(answer, dict) else args.version)


def is_this_program(exe: str) -> bool:
    """`exe` is the frozen program this process runs (a link to it, however indirect)."""
    return bool(getattr(sys, "frozen", False)) and os.path.realpath(exe) == os.path.realpath(sys.executable)


def _run_executable(exe: str, env: dict, stdin: bytes) -> tuple[int, bytes, bytes]:
    import subprocess  # not on the in-process path (README "Start-up cost")

    proc = subprocess.run([exe], input=stdin, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc.returncode, proc.stdout, proc.stderr


class _Printed:
    """Stands in for the delegate's stdout: the bytes its skeleton would have printed."""

    def __init__(self):
        self.data = b""

    def write(self, obj: dict) -> None:
        self.data += answer_bytes(obj)


def _run_in_process(plugin_type: str, env: dict, stdin: bytes) -> tuple[int, bytes, bytes]:
    from . import skel

    module = __import__(IN_PROCESS[plugin_type], fromlist=["HANDLERS"])
    printed = _Printed()
    returncode = skel.run(plugin_type, module.HANDLERS, environ=env, stdin=stdin, out=printed, in_process=True)
    return returncode, printed.data, b""


def _delegate_error(plugin_type: str, command: str, returncode: int, stdout: bytes, stderr: bytes) -> CNIError:
    try:
        err = load_json(stdout)
        if isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("msg"), str):
            return CNIError(err["code"], err["msg"], str(err.get("details", "")))
    except ValueError:
        pass
    tail = (stderr or stdout).decode(errors="replace").strip()[-500:]
    return CNIError(INTERNAL, f"{plugin_type} {command} failed with exit status {returncode}", tail)
