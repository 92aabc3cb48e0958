"""aws-vpc-cni-zygote: the plugins' resident helper, an interpreter with every plugin already loaded.

Starting Python costs each plugin exec ~8 ms of CPU before any of our code runs, three times per pod
ADD and DEL. The node agent (frozen) starts this program beside it; build/launcher.c, before it
starts Python, asks it over a unix socket to run the plugin instead, and this process forks a child
that runs exactly what build/entry.py would have run, in the caller's place:

- the caller's stdin, stdout and stderr (passed as file descriptors), environment and umask;
- the caller's network namespace (an fd of its /proc/self/ns/net, entered with setns) and its view of
  the file system (an fd of its root directory, chrooted into), so paths, CNI_NETNS and the store
  resolve as they would for the caller, whatever namespaces this process was started in;
- sys.executable is the caller's path of the program, as cnicore.invoke compares it.

It serves only a caller that could have run the plugin itself exactly as this process can: the same
user (SO_PEERCRED), the same user and pid namespaces (a plugin records its pid in the store, which the
agent reads as the host's), the same executable file (device, inode, size and mtime: an upgraded
bundle is never served by the old one's code), and no capability this process lacks. Anything else is refused before the child runs, and the launcher then starts Python itself:
each plugin still works alone when no zygote is there, is refused, or dies before it said yes.

The exchange (native byte order; HEADER below), on one SOCK_STREAM connection:
    launcher -> zygote   HEADER + payload, with SCM_RIGHTS fds [stdin, stdout, stderr, root, netns]
                         payload: program NUL exe-path NUL then each environment entry NUL-terminated
    zygote -> launcher   b"A" (a child waits) or b"R" (refused; the launcher runs the plugin itself)
    launcher -> child    b"G": from here the child runs the plugin; before it, the launcher may
                         still give up (closing), and the child then exits having done nothing
    child -> launcher    the exit code, int32
If the launcher's end closes before the child reports (the runtime killed the plugin), the zygote
kills the child, as the runtime's kill would have. The zygote exits when the fd given by
--parent-fd (a pipe from the agent) reports end-of-file, i.e. when the agent is gone.
"""

import fcntl
import os
import select
import signal
import socket
import struct
import sys

MAGIC = b"AVZ1"
# magic, exe (dev, ino, size, mtime ns), user namespace (dev, ino), pid namespace (dev, ino), effective
# capabilities, umask, payload length; build/launcher.c's struct zygote_request is the same layout
HEADER = struct.Struct("=4sQQqqQQQQQII")
MAX_PAYLOAD = 1 << 20
FDS = 5  # stdin, stdout, stderr, root directory, network namespace
REQUEST_TIMEOUT = 2.0  # seconds a caller has to send its request; the zygote serves one at a time
# What a child needs to take a runtime-started plugin's place: enter the caller's root (chroot) and
# network namespace (setns), and the pod's (the bridge). Without them the zygote does not start.
NEEDED_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21}
CANNOT_SERVE = 3  # exit status: this process could serve no runtime; the agent does not restart it
EXIT_GRACE_MS = 50  # how long a child whose caller hung up may take to exit before it is killed


# What the plugins' handlers import only when they work (kept off their start-up: README "Start-up
# cost"), loaded here once so that no child loads them: aws-snat's node rules, portmap-compat's
# netfilter backends, conntrack and port-mapping parser, the digests the netfilter stamp uses. tests/lab/test_zygote.py
# has the chain's children say what they still loaded.
HANDLER_MODULES = ("aws_snat.noderules", "cnicore.netfilter.stamp", "cnicore.netfilter.xtables", "cnicore.nftables",
                   "cnicore.netfilter.detect", "cnicore.netfilter.lock", "cnicore.netfilter.plan",
                   "cnicore.netfilter.restore", "portmap_compat.conntrack", "cnicore.libc", "subprocess",
                   "ipaddress", "_blake2", "_sha256", "_sha512")


class Refused(Exception):
    """A request this zygote will not serve; the launcher runs the plugin itself."""


def effective_capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def own_identity() -> tuple:
    """(executable, user namespace, pid namespace) as the launcher reports its own."""
    st = os.stat("/proc/self/exe")
    user_ns, pid_ns = os.stat("/proc/self/ns/user"), os.stat("/proc/self/ns/pid")
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), (user_ns.st_dev, user_ns.st_ino), \
        (pid_ns.st_dev, pid_ns.st_ino)


def read_request(conn: socket.socket) -> tuple[tuple, list[int], dict]:
    """The caller's header fields, its fds and its payload; Refused for anything malformed."""
    data, fds = b"", []
    while len(data) < HEADER.size:
        chunk, got, flags, _ = socket.recv_fds(conn, HEADER.size - len(data), FDS)
        fds += got
        if not chunk or flags & socket.MSG_CTRUNC:
            _close(fds)
            raise Refused("short request" if not chunk else "file descriptors truncated")
        data += chunk
    fields = HEADER.unpack(data)
    if fields[0] != MAGIC or len(fds) != FDS:
        _close(fds)
        raise Refused("not a zygote request")
    length = fields[-1]
    if length > MAX_PAYLOAD:
        _close(fds)
        raise Refused("payload too large")
    payload = b""
    while len(payload) < length:
        chunk = conn.recv(length - len(payload))
        if not chunk:
            _close(fds)
            raise Refused("short payload")
        payload += chunk
    parts = payload.split(b"\0")
    if len(parts) < 3 or parts[-1] != b"":
        _close(fds)
        raise Refused("malformed payload")
    program, exe = os.fsdecode(parts[0]), os.fsdecode(parts[1])
    env = {}
    for entry in parts[2:-1]:
        key, eq, value = entry.partition(b"=")
        if eq and key:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return fields, fds, {"program": program, "exe": exe, "env": env}


def check(fields: tuple, peer_uid: int, identity: tuple, capabilities: int) -> None:
    _, exe_dev, exe_ino, exe_size, exe_mtime, userns_dev, userns_ino, pidns_dev, pidns_ino, caps, _, _ = fields
    exe, user_ns, pid_ns = identity
    if peer_uid != os.geteuid():
        raise Refused(f"caller uid {peer_uid} is not ours")
    if (exe_dev, exe_ino, exe_size, exe_mtime) != exe:
        raise Refused("the caller runs another build of the bundle")
    if (userns_dev, userns_ino) != user_ns:
        raise Refused("the caller is in another user namespace")
    if (pidns_dev, pidns_ino) != pid_ns:
        raise Refused("the caller is in another pid namespace")
    if caps & ~capabilities:
        raise Refused(f"the caller has capabilities this zygote lacks ({caps & ~capabilities:#x})")


def run_child(conn: socket.socket, fds: list[int], request: dict, umask: int, module, trace_fd: int | None) -> None:
    """In the forked child: wait for the go, take the caller's place, run the plugin, report, exit.
    `trace_fd`: where to say which modules the plugin still had to load (--trace)."""
    code = 1
    loaded = set(sys.modules)
    try:
        if conn.recv(1) != b"G":
            os._exit(0)  # the launcher gave up before the go: it runs the plugin itself
        stdin, stdout, stderr, root, netns = fds = [_above_stdio(fd) for fd in fds]
        if not _same_file(netns, "/proc/self/ns/net"):
            from cnicore.rtnl import setns
            setns(netns)
        os.fchdir(root)
        os.chroot(".")
        os.chdir("/")
        for target, fd in enumerate((stdin, stdout, stderr)):
            os.dup2(fd, target)
        _close(fds)
        os.umask(umask)
        _take_environment(request["env"])
        _take_bundle_path(request["exe"])
        sys.argv = [request["program"]]
        try:
            code = module.main()
        except SystemExit as exc:
            code = exc.code
        if code is not None and not isinstance(code, int):
            sys.stderr.write(f"{code}\n")
            code = 1
        code = code or 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            if trace_fd is not None:
                new = sorted(set(sys.modules) - loaded)
                os.write(trace_fd, f"aws-vpc-cni-zygote: child {os.getpid()} loaded {len(new)} modules: "
                                   f"{' '.join(new)}\n".encode())
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(struct.pack("=i", code))
        except BaseException:
            pass
        finally:
            os._exit(code & 0xFF)


def _above_stdio(fd: int) -> int:
    """`fd` moved above 0-2 if it is one of them: the caller's fds are put there one by one."""
    if fd > 2:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def _same_file(fd: int, path: str) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _take_environment(env: dict) -> None:
    """os.environ (and with it the C environment subprocesses inherit) becomes exactly `env`,
    changing only what differs."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _take_bundle_path(exe: str) -> None:
    """sys.executable, sys._MEIPASS and sys.path as the caller's path of the bundle: after the chroot,
    a module imported late (a netfilter backend, subprocess) is found where the caller sees it."""
    old, new = sys._MEIPASS, os.path.join(os.path.dirname(exe), "_internal")
    sys.path = [new + p[len(old):] if p == old or p.startswith(old + "/") else p for p in sys.path]
    sys._MEIPASS = new
    sys.executable = exe


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Zygote:
    def __init__(self, path: str, parent_fd: int | None, modules: dict, trace: bool):
        self.path = path
        self.parent_fd = parent_fd
        self.modules = modules
        self.trace = trace
        self.identity = own_identity()
        self.capabilities = effective_capabilities()
        self.listener = _listen(path)
        self.bound = os.stat(path).st_ino  # the socket file: removed at exit unless another replaced it
        self.poller = select.poll()
        self.poller.register(self.listener, select.POLLIN)
        if parent_fd is not None:
            self.poller.register(parent_fd, select.POLLIN)
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
        self.callers: dict[int, int] = {}  # connection fd -> the pidfd of its child
        self.refusals: dict[str, int] = {}  # reason -> how many

    def say(self, message: str) -> None:
        sys.stderr.write(f"aws-vpc-cni-zygote: {message}\n")
        sys.stderr.flush()

    def serve(self) -> int:
        self.say(f"serving {', '.join(self.modules)} on {self.path} (pid {os.getpid()})")
        while True:
            for fd, events in self.poller.poll():
                if fd == self.listener.fileno():
                    self.accept()
                elif fd == self.parent_fd:
                    self.say("the agent is gone; exiting")
                    return 0
                elif fd in self.children:
                    self.reap(fd)
                elif fd in self.callers:
                    self.caller_gone(fd)

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds = []
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            fields, fds, request = read_request(conn)
            uid = struct.unpack("=iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            check(fields, uid, self.identity, self.capabilities)
            module = self.modules.get(request["program"])
            if module is None:
                raise Refused(f"no program {request['program']!r}")
            conn.settimeout(None)
            conn.sendall(b"A")
        except (Refused, OSError, ValueError) as exc:
            self.refused(str(exc))
            _close(fds)
            try:
                conn.sendall(b"R")
            except OSError:
                pass
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            _close([fd for fd in (self.parent_fd,) if fd is not None] + list(self.children) + list(self.callers))
            trace_fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3) if self.trace else None  # not onto 0-2
            run_child(conn, fds, request, fields[-2], module, trace_fd)
        _close(fds)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (pid, conn)
        self.callers[conn.fileno()] = pidfd
        self.poller.register(pidfd, select.POLLIN)
        self.poller.register(conn, select.POLLRDHUP)
        if self.trace:
            self.say(f"{request['program']} {request['env'].get('CNI_COMMAND', '')} runs in child {pid}")

    def refused(self, reason: str) -> None:
        """Said the first time and every 1000th: a caller this zygote cannot serve (another build of
        the bundle, say) asks on every plugin start."""
        count = self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if count % 1000 == 1:
            self.say(f"refused a request ({count} so far): {reason}; that plugin started Python itself")

    def reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        _, status = os.waitpid(pid, 0)
        if self.trace and os.WIFSIGNALED(status):
            self.say(f"child {pid} was killed by signal {os.WTERMSIG(status)}")
        self.poller.unregister(pidfd)
        os.close(pidfd)
        if self.callers.pop(conn.fileno(), None) is not None:
            self.poller.unregister(conn)
        conn.close()

    def caller_gone(self, fd: int) -> None:
        """The launcher's end closed: if its child still runs, the runtime killed the plugin. A child
        that reported is exiting as the launcher reads it: it has EXIT_GRACE to be gone."""
        pidfd = self.callers.pop(fd)
        pid, conn = self.children[pidfd]
        self.poller.unregister(fd)
        exited = select.poll()
        exited.register(pidfd, select.POLLIN)
        if exited.poll(EXIT_GRACE_MS):
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            if self.trace:
                self.say(f"the caller of child {pid} is gone; killed it")
        except ProcessLookupError:
            pass

    def close(self) -> None:
        try:
            if os.stat(self.path).st_ino == self.bound:
                os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()


def _listen(path: str) -> socket.socket:
    """A root-only listening socket at `path`; refuses to replace a zygote that still answers."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        raise SystemExit(f"aws-vpc-cni-zygote: another zygote serves {path}")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def main(argv: list[str], programs: dict[str, str]) -> int:
    """`aws-vpc-cni-zygote --socket PATH [--parent-fd N] [--trace]`; `programs`: name -> module."""
    import argparse
    import gc
    parser = argparse.ArgumentParser(prog="aws-vpc-cni-zygote")
    parser.add_argument("--socket", required=True, help="the unix socket to serve on")
    parser.add_argument("--parent-fd", type=int, help="exit when this fd reports end-of-file (the agent's pipe)")
    parser.add_argument("--trace", action="store_true", help="a line on stderr per request")
    args = parser.parse_args(argv)
    if not getattr(sys, "frozen", False):
        parser.error("serves the frozen bundle's launcher only: run it from the bundle")
    capabilities = effective_capabilities()
    missing = [name for name, bit in NEEDED_CAPABILITIES.items() if not capabilities >> bit & 1]
    if missing:
        sys.stderr.write(f"aws-vpc-cni-zygote: not started: without {', '.join(missing)} it cannot take a "
                         f"plugin's place (the agent's container must be privileged)\n")
        return CANNOT_SERVE
    gc.disable()  # as build/entry.py loads a plugin: the modules live until exit
    modules = {name: __import__(module, fromlist=["main"]) for name, module in programs.items()}
    for name in HANDLER_MODULES:
        __import__(name)
    from cnicore.libc import ctypes_lite
    ctypes_lite().function("setns")  # loaded once here, not in every child that enters a netns
    gc.freeze()
    gc.enable()
    zygote = Zygote(args.socket, args.parent_fd, modules, args.trace)
    try:
        return zygote.serve()
    finally:
        zygote.close()
