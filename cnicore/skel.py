"""The CNI skeleton every plugin runs on, after the reference plugins' pkg/skel.

A plugin writes its ADD/DEL/CHECK/GC/STATUS handlers and calls `plugin_main`. The skeleton reads and
validates the environment and stdin, negotiates the version, parses CNI_ARGS and `prevResult`,
converts the ADD result to the configuration's version, and turns every failure into exactly one
CNI error object on stdout. Nothing else can reach stdout: file descriptor 1 points at stderr while
a handler runs, so a stray print or a child process cannot corrupt the result.

CNI_ARGS, as the Go plugins treat it (ARCHITECTURE section 9 has what the runtimes send):
- The Go skel does not read CNI_ARGS; a plugin that needs it calls types.LoadArgs, the others (the
  reference portmap, bridge) never look at it. Ours alike: aws-vpc-bridge and aws-eni-ipam read the
  pod's namespace and name (`reads_cni_args`), aws-snat and portmap-compat read nothing from it.
- K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_INFRA_CONTAINER_ID and K8S_POD_UID are opaque strings
  (types.UnmarshallableString): any text, empty, either name without the other (podman sends
  K8S_POD_NAME alone, its container's name), or absent. They name nothing directly: the bridge hashes
  them into the host veth's name, logs escape them (JSON, ASCII), the store holds them as JSON strings.
- Truly unusable, as LoadArgs refuses it (parse_cni_args): a pair that is not exactly one key, '=' and
  a value (so a value cannot hold ';' or '=': runtimes join their pairs with them), an IgnoreUnknown
  other than 1, 0, true, false, and an unknown key without IgnoreUnknown true. That fails an ADD of a
  plugin that reads CNI_ARGS (code 4), as it fails the Go plugins that call LoadArgs. It never fails
  DEL, CHECK, GC or STATUS, nor any command of a plugin that does not read CNI_ARGS: those go on with
  the well-formed pairs and log what was wrong (a DEL must always succeed).
"""

from __future__ import annotations

import os
import sys
import time

from . import jsonio
from . import result as cniresult
from . import settings as cnisettings
from .errors import (CNIError, DECODING_FAILURE, INCOMPATIBLE_VERSION, INTERNAL, INVALID_CONFIG,
                     INVALID_ENVIRONMENT, IO_FAILURE, UNKNOWN_CONTAINER)
from .log import Logger, rotation

COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
# Which CNI_* variables each command requires (as the reference skel does; DEL needs no netns).
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": (),
    "STATUS": (),
    "VERSION": (),
}
MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}


class Pattern:
    """A name check with the interface of the compiled regular expression it stands for: `match`
    is truthy exactly when that pattern's match is (tests/unit/test_skel.py compares them on generated
    names). Not `re`, which no plugin start loads (README "Start-up cost")."""

    def __init__(self, pattern: str, check):
        self.pattern = pattern
        self._check = check

    def match(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"expected string, not {type(text).__name__}")
        return True if self._check(text) else None

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"


_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | frozenset("_.-")


def _is_name(text: str) -> bool:
    return text[:1] in _ALNUM and all(c in _NAME_CHARS for c in text)


# \Z, not $: "$" also matches before a trailing newline, which would let "c1\n" through.
CONTAINER_ID_RE = Pattern(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\Z", _is_name)
NETWORK_NAME_RE = Pattern(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\Z", _is_name)
MAX_IFNAME = 15  # IFNAMSIZ - 1

# The CNI_ARGS keys Kubernetes runtimes send; their values are opaque (see the module docstring).
K8S_ARGS = ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")


# The process the runtime started for this run, (pid, parent pid), when it is not this one: the plugin
# zygote (build/zygote.py) sets it in the child that stands in for the runtime's launcher.
STAND_IN: tuple[int, int] | None = None


def runtime_process() -> tuple[int, int]:
    """(pid, parent pid) of the process the runtime started for this plugin run, as the host sees it."""
    return STAND_IN or (os.getpid(), os.getppid())


class CmdArgs:
    """One invocation, validated.

    A plain class, not a dataclass: `dataclasses` imports inspect, ast, dis and tokenize, ~7 ms on
    every plugin exec."""

    _FIELDS = ("command", "container_id", "netns", "ifname", "path", "stdin", "conf", "version", "args",
               "prev_result", "log", "in_process")

    def __init__(self, command: str, container_id: str, netns: str, ifname: str, path: list[str], stdin: bytes,
                 conf: dict, version: str, args: dict[str, str] | None = None, prev_result: dict | None = None,
                 log: Logger | None = None, in_process: bool = False):
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.path = path
        self.stdin = stdin
        self.conf = conf
        self.version = version
        self.args = {} if args is None else args
        self.prev_result = prev_result
        self.log = log
        self.in_process = in_process  # run by another plugin in its own process (cnicore.invoke)

    def __repr__(self) -> str:
        return "CmdArgs(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS) + ")"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._FIELDS)

    __hash__ = None  # mutable, like the dataclass it replaces

    @property
    def network(self) -> str:
        return self.conf["name"]

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


# A handler: CmdArgs -> dict | None (annotations only, without `typing`: README "Start-up cost").
Handler = "Callable[[CmdArgs], dict | None]"


def validate_container_id(container_id: str) -> None:
    if not container_id:
        raise CNIError(UNKNOWN_CONTAINER, "missing containerID")
    if not CONTAINER_ID_RE.match(container_id):
        raise CNIError(INVALID_ENVIRONMENT, "invalid characters in containerID", container_id)


def validate_ifname(ifname: str) -> None:
    if not ifname:
        raise CNIError(INVALID_ENVIRONMENT, "interface name is empty")
    if len(os.fsencode(ifname)) > MAX_IFNAME:  # the kernel's bytes (undecodable ones arrive as surrogates)
        raise CNIError(INVALID_ENVIRONMENT, "interface name is too long",
                       f"interface name should be less than {MAX_IFNAME + 1} characters")
    if ifname in (".", ".."):
        raise CNIError(INVALID_ENVIRONMENT, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in ifname):
        raise CNIError(INVALID_ENVIRONMENT, "interface name contains / or : or whitespace characters")
    if not ifname.isprintable():  # control characters, or bytes that are not UTF-8 (it goes into JSON results)
        raise CNIError(INVALID_ENVIRONMENT, "interface name contains control characters or is not valid UTF-8",
                       repr(ifname))


def parse_cni_args(raw: str, known=K8S_ARGS) -> tuple[dict[str, str], list[str]]:
    """CNI_ARGS read as libcni's types.LoadArgs reads it into a struct of the `known` keys (opaque strings)
    and CommonArgs' IgnoreUnknown: (the values, what LoadArgs refuses).

    As LoadArgs: "" holds no pairs; pairs are split on ';' and each on '=' into exactly a key and a
    value; keys are case-sensitive; a later pair replaces an earlier one; IgnoreUnknown takes 1, 0,
    true or false in any case (the last one counts); an unknown key is refused unless IgnoreUnknown is
    true. The refusals are returned, not raised, beside the values of the well-formed pairs.
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    if not raw:
        return values, problems
    unknown: list[str] = []
    ignore_unknown = False
    for pair in raw.split(";"):
        kv = pair.split("=")
        if len(kv) != 2:
            problems.append(f"invalid pair {pair!r}")
            continue
        key, value = kv
        if key == "IgnoreUnknown":
            if value.lower() in ("1", "true", "0", "false"):
                ignore_unknown = value.lower() in ("1", "true")
            else:
                problems.append(f"IgnoreUnknown must be 1, 0, true or false, not {value!r}")
        elif key in known:
            values[key] = value
        else:
            unknown.append(pair)
    if unknown and not ignore_unknown:
        problems.append(f"unknown args {unknown} (IgnoreUnknown=1 lets them through)")
    return values, problems


# The non-ASCII letters that Go's case folding (bytes.EqualFold, unicode.SimpleFold) equates with ASCII ones.
_GO_FOLDS = {0x17F: "s", 0x212A: "k"}  # LATIN SMALL LETTER LONG S, KELVIN SIGN


def go_field(obj: dict, name: str):
    """The value Go's encoding/json decodes from the JSON object `obj` into a struct field whose JSON name
    is `name` (ASCII), or None when no key names it (or the last one is null).

    As encoding/json: a key names the field when it equals `name` case-insensitively (bytes.EqualFold:
    "HostPort", "HOSTPORT" and "hoſtPort" all name hostPort; an exact match is preferred only among
    several fields, and here each name is one field); keys that name no field are ignored; of several
    keys naming the field, the last one wins. (A key repeated exactly was already reduced to its last
    value by the JSON decoder, at the first one's place: only such a repeat interleaved with another
    spelling of the same key could be ordered differently than Go orders it.)
    """
    wanted = name.lower()
    found = None
    for key, value in obj.items():
        folded = key.translate(_GO_FOLDS)
        if folded.isascii() and folded.lower() == wanted:
            found = value
    return found


def valid_attachments(conf: dict) -> set[tuple[str, str]]:
    """GC's list of attachments to keep, as (containerID, ifname) pairs."""
    key = "cni.dev/valid-attachments" if "cni.dev/valid-attachments" in conf else "cni.dev/attachments"
    items = conf.get(key, [])
    if not isinstance(items, list):
        raise CNIError(DECODING_FAILURE, f"{key} must be a list")
    out = set()
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("containerID"), str)
                and isinstance(item.get("ifname"), str)):
            raise CNIError(DECODING_FAILURE, f"{key} entries need string containerID and ifname: {item!r}")
        out.add((item["containerID"], item["ifname"]))
    return out


class _Output:
    """Holds the real stdout aside and points fd 1 at stderr until the one answer is written."""

    def __init__(self):
        sys.stdout.flush()
        self.fd = os.dup(1)
        os.dup2(2, 1)

    def write(self, obj: dict) -> None:
        data = answer_bytes(obj)
        while data:
            data = data[os.write(self.fd, data):]


def answer_bytes(obj: dict) -> bytes:
    """What a plugin prints for its answer (a result or an error object)."""
    return (jsonio.dumps(obj, indent=4) + "\n").encode()


def _read_stdin() -> bytes:
    try:
        return sys.stdin.buffer.read()
    except (OSError, ValueError) as exc:
        raise CNIError(IO_FAILURE, f"error reading from stdin: {exc}") from None


def _strict_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def load_json(data: bytes):
    """Parse JSON as Go's encoding/json accepts it: no NaN or Infinity (they could not be written back
    as JSON); too deep a document is a decoding error, not a crash."""
    try:
        return jsonio.loads(data, parse_constant=_no_constant, parse_float=_strict_float)
    except RecursionError:
        raise ValueError("document is nested too deeply") from None


def _load_conf(stdin: bytes) -> dict:
    try:
        conf = load_json(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(DECODING_FAILURE, f"error unmarshalling network config: {exc}") from None
    if not isinstance(conf, dict):
        raise CNIError(DECODING_FAILURE, "network config must be a JSON object")
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise CNIError(INVALID_CONFIG, "missing network name")
    if not NETWORK_NAME_RE.match(name):
        raise CNIError(INVALID_CONFIG, "invalid characters found in network name", name)
    return conf


def _conf_version(conf: dict) -> str:
    version = conf.get("cniVersion", "0.1.0")  # no cniVersion means 0.1.0, as libcni reads it
    if not isinstance(version, str):
        raise CNIError(DECODING_FAILURE, f"cniVersion must be a string, not {version!r}")
    cniresult.version_tuple(version)
    return version


def _version_info(stdin: bytes) -> dict:
    version = cniresult.LATEST
    try:
        conf = load_json(stdin) if stdin.strip() else {}
        if isinstance(conf, dict) and conf.get("cniVersion") in cniresult.SUPPORTED_VERSIONS:
            version = conf["cniVersion"]
    except ValueError:
        pass
    return {"cniVersion": version, "supportedVersions": list(cniresult.SUPPORTED_VERSIONS)}


def _logger(plugin: str, conf: dict) -> Logger:
    """The plugin's log: file, level and rotation, validated like every setting (a bad one is code 7,
    logged to stderr)."""
    cfg = cnisettings.from_conf(conf, cnisettings.PLUGIN_LOG)
    return Logger(plugin, cfg.plugin_log_file, cfg.plugin_log_level, **rotation(cfg))


def run(plugin: str, handlers: dict[str, Handler], *, about: str = "", reads_cni_args: bool = True,
        environ=os.environ, stdin: bytes | None = None, out=None, in_process: bool = False) -> int:
    """Run one invocation; return the exit code. `handlers` maps ADD/DEL/CHECK/GC/STATUS to functions.
    `reads_cni_args`: the plugin uses the pod's namespace and name, so an ADD with CNI_ARGS that
    types.LoadArgs refuses is refused (see the module docstring).

    `stdin` and `out` (anything with `write(obj)`) replace the process's stdin and stdout when one
    plugin runs another in-process (cnicore.invoke), which says so with `in_process`.
    """
    started = time.monotonic()
    out = out or _Output()
    log = Logger(plugin, path=None)
    version = cniresult.LATEST
    command = environ.get("CNI_COMMAND", "")
    try:
        if not command:
            sys.stderr.write(f"{about or plugin}\nCNI protocol versions supported: "
                             f"{', '.join(cniresult.SUPPORTED_VERSIONS)}\n")
            return 0
        if command not in COMMANDS:
            raise CNIError(INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}")
        missing = [v for v in REQUIRED_ENV[command] if not environ.get(v)]
        if missing:
            raise CNIError(INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing")
        stdin = _read_stdin() if stdin is None else stdin
        if command == "VERSION":
            out.write(_version_info(stdin))
            return 0
        conf = _load_conf(stdin)
        if conf.get("cniVersion") in cniresult.SUPPORTED_VERSIONS:
            version = conf["cniVersion"]  # errors from here on answer in the config's version
        log = _logger(plugin, conf)
        conf_version = _conf_version(conf)
        args = CmdArgs(command=command, container_id=environ.get("CNI_CONTAINERID", ""),
                       netns=environ.get("CNI_NETNS", ""), ifname=environ.get("CNI_IFNAME", ""),
                       path=[p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p],
                       stdin=stdin, conf=conf, version=conf_version, log=log, in_process=in_process)
        log.context = {"command": command, "containerID": args.container_id, "ifname": args.ifname}
        if command in ("ADD", "CHECK", "DEL"):
            validate_container_id(args.container_id)
            validate_ifname(args.ifname)
        if command in MIN_VERSION and not cniresult.at_least(conf_version, MIN_VERSION[command]):
            raise CNIError(INCOMPATIBLE_VERSION, f"config version does not allow {command}",
                           f"{command} needs cniVersion {MIN_VERSION[command]} or later, config is {conf_version}")
        cniresult.require_supported(conf_version)
        args.args, problems = parse_cni_args(environ.get("CNI_ARGS", ""))
        if problems and command == "ADD" and reads_cni_args:
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS: {'; '.join(problems)}")
        if problems:
            log.warn("CNI_ARGS is not as types.LoadArgs reads it; going on with its well-formed pairs",
                     problems=problems)
        log.context.update((key, value) for key, value in (("podNamespace", args.pod_namespace),
                                                           ("podName", args.pod_name)) if value)
        if conf.get("prevResult") is not None:
            args.prev_result = cniresult.parse(conf["prevResult"], conf_version)
        answer = handlers[command](args)
        if command == "ADD":
            out.write(cniresult.convert(answer, conf_version))
        log.info("done", outcome="ok", duration_ms=round((time.monotonic() - started) * 1000, 1))
        return 0
    except CNIError as exc:
        log.error(exc.msg, outcome="error", code=exc.code, details=exc.details,
                  duration_ms=round((time.monotonic() - started) * 1000, 1))
        out.write(exc.to_dict(version))
        return 1
    except Exception as exc:  # the guard: never a traceback on stdout
        import traceback
        log.error(f"unexpected {type(exc).__name__}: {exc}", outcome="error", code=INTERNAL,
                  traceback=traceback.format_exc(),
                  duration_ms=round((time.monotonic() - started) * 1000, 1))
        out.write(CNIError(INTERNAL, f"{plugin} {command} failed unexpectedly: {type(exc).__name__}: {exc}",
                           "the traceback is in the plugin log file").to_dict(version))
        return 1


def plugin_main(plugin: str, handlers: dict[str, Handler], about: str = "", reads_cni_args: bool = True) -> None:
    sys.exit(run(plugin, handlers, about=about, reads_cni_args=reads_cni_args))
