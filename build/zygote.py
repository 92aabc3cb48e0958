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

It serves only a caller that could have run the plugin itself exactly as this process can, as the
kernel tells it (the peer's pidfd, SO_PEERPIDFD, and the caller's /proc entries; nothing the caller
says about itself): the same effective uid, user and pid namespaces (a plugin records its pid in the
store, which the agent reads as the host's), the same executable file (device, inode, size and
mtime: an upgraded bundle is never served by the old one's code), at least every capability this
process has, no seccomp filter or no_new_privs this process has not, the same LSM label, and the
root directory and network namespace it passes are its own. Anything else is refused before the
child runs, and the launcher then starts Python itself: each plugin still works alone when no zygote
is there, it refuses, or it is gone before it said yes.

The exchange (native byte order; HEADER below), on one SOCK_STREAM connection:
    launcher -> zygote   HEADER + payload, with SCM_RIGHTS fds [stdin, stdout, stderr, root, netns]
                         payload: program NUL exe-path NUL then each environment entry NUL-terminated
    zygote -> launcher   b"A" (a forked child waits) or b"R" (refused; the launcher runs the plugin itself)
    launcher -> child    b"G": from here the child runs the plugin; before it, the launcher may
                         still give up (closing), and the child then exits having done nothing
    child -> launcher    the exit code, int32
If the launcher's end closes before the child has exited (the runtime killed the plugin), the zygote
kills the child after EXIT_GRACE_MS, as the runtime's kill would have. The zygote exits when the fd
given by --parent-fd (a pipe from the agent) reports end-of-file, i.e. when the agent is gone.
"""

import fcntl
import os
import select
import signal
import socket
import struct
import sys
import time

MAGIC = b"AVZ2"
HEADER = struct.Struct("=4sI")  # magic, payload length; build/launcher.c's struct zygote_request
MAX_PAYLOAD = 1 << 20
FDS = 5  # stdin, stdout, stderr, root directory, network namespace
REQUEST_TIMEOUT = 2.0  # seconds a caller has for its whole request; the zygote serves one at a time
SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the peer as it connected
# What a child needs to take a runtime-started plugin's place: enter the caller's root (chroot) and
# network namespace (setns), and the pod's (the bridge). Without them the zygote does not start.
NEEDED_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21}
CANNOT_SERVE = 3  # exit status: this process could serve no runtime; the agent does not restart it
EXIT_GRACE_MS = 50  # how long a child whose caller hung up may take to exit before it is killed


# What the plugins' handlers import only when they work (kept off their start-up: README "Start-up
# cost"), loaded here once so that no child loads them: aws-snat's node rules, portmap-compat's
# netfilter backends, conntrack and port-mapping parser, the digests the netfilter stamp uses.
# tests/lab/test_zygote.py has the chain's children say what they still loaded.
HANDLER_MODULES = ("aws_snat.noderules", "cnicore.netfilter.stamp", "cnicore.netfilter.xtables", "cnicore.nftables",
                   "cnicore.netfilter.detect", "cnicore.netfilter.lock", "cnicore.netfilter.plan",
                   "cnicore.netfilter.restore", "portmap_compat.conntrack", "cnicore.libc", "subprocess",
                   "ipaddress", "_blake2", "_sha256", "_sha512")


class Refused(Exception):
    """A request this zygote will not serve; the launcher runs the plugin itself."""


class Process:
    """What the kernel says of a process (`/proc/<pid>`), as far as standing in for it goes."""

    def __init__(self, proc: str):
        status = {}
        with open(f"{proc}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.split()
        self.pid, self.parent = int(status["Pid"][0]), int(status["PPid"][0])
        self.uid = int(status["Uid"][1])  # effective
        self.capabilities = int(status["CapEff"][0], 16)
        self.umask = int(status["Umask"][0], 8)
        self.seccomp = int(status["Seccomp"][0])
        self.no_new_privs = int(status["NoNewPrivs"][0])
        exe = os.stat(f"{proc}/exe")
        self.exe = (exe.st_dev, exe.st_ino, exe.st_size, exe.st_mtime_ns)
        self.user_ns, self.pid_ns, self.net_ns, self.root = (
            _identity(os.stat(f"{proc}/{entry}")) for entry in ("ns/user", "ns/pid", "ns/net", "root"))
        try:
            with open(f"{proc}/attr/current", "rb") as f:
                self.lsm_label = f.read().rstrip(b"\0\n")
        except OSError:
            self.lsm_label = None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def caller_of(conn: socket.socket) -> Process:
    """The process at the other end of `conn`, read while its pidfd shows it alive (so its pid has
    not been reused meanwhile)."""
    pidfd = _peer_pidfd(conn)
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
        if pid <= 0:
            raise Refused("the caller is not in this pid namespace, or has ended")
        try:
            caller = Process(f"/proc/{pid}")
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise Refused(f"cannot read the caller's /proc entries: {exc}") from None
        if _exited(pidfd, 0):
            raise Refused("the caller ended")
        return caller
    finally:
        os.close(pidfd)


def _peer_pidfd(conn: socket.socket) -> int:
    """A pidfd of the peer as it connected (SO_PEERPIDFD, Linux 6.5); on older kernels (EKS's AL2 and
    AL2023 ones) one opened for the pid SO_PEERCRED names. The peer is blocked waiting for the answer,
    so that pid is still its own unless it was killed and the pid reused at once; a process that then
    passed `check` would hold every capability this one has, so standing in for it lends it nothing."""
    try:
        return conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass
    pid = struct.unpack("=iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        raise Refused(f"no pidfd for the caller {pid}: {exc.strerror}") from None


def check(caller: Process, own: Process, root_fd: int, netns_fd: int) -> None:
    """Refused unless this process may stand in for `caller`: the child does nothing it could not."""
    if caller.uid != own.uid:
        raise Refused(f"caller uid {caller.uid} is not ours")
    if caller.exe != own.exe:
        raise Refused("the caller runs another build of the bundle")
    if caller.user_ns != own.user_ns:
        raise Refused("the caller is in another user namespace")
    if caller.pid_ns != own.pid_ns:
        raise Refused("the caller is in another pid namespace")
    if own.capabilities & ~caller.capabilities:
        raise Refused(f"the caller lacks capabilities this zygote has ({own.capabilities & ~caller.capabilities:#x})")
    if caller.seccomp > own.seccomp or caller.no_new_privs > own.no_new_privs:
        raise Refused("the caller runs under a seccomp filter or no_new_privs this zygote has not")
    if caller.lsm_label != own.lsm_label:
        raise Refused(f"the caller's LSM label {caller.lsm_label!r} is not ours")
    if _identity(os.fstat(root_fd)) != caller.root:
        raise Refused("the root directory passed is not the caller's")
    if _identity(os.fstat(netns_fd)) != caller.net_ns:
        raise Refused("the network namespace passed is not the caller's")


def read_request(conn: socket.socket) -> tuple[list[int], dict]:
    """The caller's fds and its payload, within REQUEST_TIMEOUT in all; Refused for anything malformed."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data, fds = b"", []
    try:
        while len(data) < HEADER.size:
            conn.settimeout(_left(deadline))
            chunk, got, flags, _ = socket.recv_fds(conn, HEADER.size - len(data), FDS)
            fds += got
            if not chunk or flags & socket.MSG_CTRUNC:
                raise Refused("short request" if not chunk else "file descriptors truncated")
            data += chunk
        magic, length = HEADER.unpack(data)
        if magic != MAGIC or len(fds) != FDS:
            raise Refused("not a zygote request of this version")
        if length > MAX_PAYLOAD:
            raise Refused("payload too large")
        payload = b""
        while len(payload) < length:
            conn.settimeout(_left(deadline))
            chunk = conn.recv(length - len(payload))
            if not chunk:
                raise Refused("short payload")
            payload += chunk
    except BaseException:
        _close(fds)
        raise
    parts = payload.split(b"\0")
    if len(parts) < 3 or parts[-1] != b"":
        _close(fds)
        raise Refused("malformed payload")
    program, exe = os.fsdecode(parts[0]), os.fsdecode(parts[1])
    env = {}
    for entry in parts[2:-1]:
        key, eq, value = entry.partition(b"=")
        if eq and key:
            env.setdefault(os.fsdecode(key), os.fsdecode(value))  # the first of a name, as getenv
    return fds, {"program": program, "exe": exe, "env": env}


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Refused("the request took too long")
    return left


def _exited(pidfd: int, timeout_ms: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_ms))


def run_child(conn: socket.socket, fds: list[int], request: dict, caller: Process, enter_netns: bool, module,
              trace_fd: int | None) -> None:
    """In the forked child: wait for the go, take the caller's place, run the plugin, report, exit.
    `enter_netns`: the caller's network namespace is not this process's. `trace_fd`: where to say
    which modules the plugin still had to load (--trace)."""
    code = 1
    loaded = set(sys.modules)
    try:
        if conn.recv(1) != b"G":
            os._exit(0)  # the launcher gave up before the go: it runs the plugin itself
        stdin, stdout, stderr, root, netns = fds = [_above_stdio(fd) for fd in fds]
        if enter_netns:
            from cnicore.rtnl import setns
            setns(netns)
        os.fchdir(root)
        os.chroot(".")
        os.chdir("/")
        for target, fd in enumerate((stdin, stdout, stderr)):
            os.dup2(fd, target)
        _close(fds)
        os.umask(caller.umask)
        _take_environment(request["env"])
        _take_bundle_path(request["exe"])
        sys.argv = [request["program"]]
        from cnicore import skel
        skel.STAND_IN = (caller.pid, caller.parent)
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
        for last in (_flush_stdio, lambda: conn.sendall(struct.pack("=i", code)),
                     lambda: trace_fd is not None and _trace_modules(trace_fd, loaded)):
            try:
                last()
            except BaseException:
                pass
        os._exit(code & 0xFF)


def _flush_stdio() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


def _trace_modules(fd: int, loaded: set) -> None:
    new = sorted(set(sys.modules) - loaded)
    os.write(fd, f"aws-vpc-cni-zygote: child {os.getpid()} loaded {len(new)} modules: {' '.join(new)}\n".encode())


def _above_stdio(fd: int) -> int:
    """`fd` moved above 0-2 if it is one of them: the caller's fds are put there one by one."""
    if fd > 2:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


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
        self.own = Process("/proc/self")
        self.listener = _listen(path)
        self.bound = os.stat(path).st_ino  # the socket file: removed at exit unless another replaced it
        self.poller = select.poll()
        self.poller.register(self.listener, select.POLLIN)
        if parent_fd is not None:
            self.poller.register(parent_fd, select.POLLIN)
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
        self.callers: dict[int, int] = {}  # connection fd -> the pidfd of its child, while it is open
        self.kill_at: dict[int, float] = {}  # pidfd -> when to kill the child, its caller gone
        self.closed_now: set[int] = set()
        self.refusals: dict[str, int] = {}  # reason -> how many

    def say(self, message: str) -> None:
        sys.stderr.write(f"aws-vpc-cni-zygote: {message}\n")
        sys.stderr.flush()

    def serve(self) -> int:
        self.say(f"serving {', '.join(self.modules)} on {self.path} (pid {os.getpid()})")
        while True:
            timeout = None
            if self.kill_at:
                timeout = max(0, int((min(self.kill_at.values()) - time.monotonic()) * 1000) + 1)
            self.closed_now = set()  # fds closed while this batch of events is handled: a reused
            for fd, events in self.poller.poll(timeout):  # number must not take an old event
                if fd in self.closed_now:
                    continue
                if fd == self.listener.fileno():
                    self.accept()
                elif fd == self.parent_fd:
                    self.say("the agent is gone; exiting")
                    return 0
                elif fd in self.children:
                    self.reap(fd)
                elif fd in self.callers:
                    self.caller_gone(fd)
            self.kill_overdue()

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds = []
        pid = None
        try:
            fds, request = read_request(conn)
            caller = caller_of(conn)
            check(caller, self.own, fds[3], fds[4])
            module = self.modules.get(request["program"])
            if module is None:
                raise Refused(f"no program {request['program']!r}")
            conn.settimeout(None)
            pid = os.fork()
            if pid == 0:
                self.listener.close()
                _close([fd for fd in (self.parent_fd,) if fd is not None] + list(self.children)
                       + [c.fileno() for _, c in self.children.values()])
                trace_fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 3) if self.trace else None  # not onto 0-2
                run_child(conn, fds, request, caller, caller.net_ns != self.own.net_ns, module, trace_fd)
            pidfd = os.pidfd_open(pid)
            conn.sendall(b"A")  # only now: a child waits for the go
        except (Refused, OSError, ValueError) as exc:
            self.refused(str(exc))
            _close(fds)
            if pid:  # forked, but no pidfd or no "A": the child has not started the plugin
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            try:
                conn.sendall(b"R")
            except OSError:
                pass
            conn.close()
            return
        _close(fds)
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
        self.kill_at.pop(pidfd, None)
        os.close(pidfd)
        if self.callers.pop(conn.fileno(), None) is not None:
            self.poller.unregister(conn)
        self.closed_now.update((pidfd, conn.fileno()))
        conn.close()

    def caller_gone(self, fd: int) -> None:
        """The launcher's end closed. A child that reported is exiting as the launcher reads it; one
        still running after EXIT_GRACE_MS was killed with its caller, by the runtime."""
        pidfd = self.callers.pop(fd)
        self.poller.unregister(fd)
        self.kill_at[pidfd] = time.monotonic() + EXIT_GRACE_MS / 1000

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for pidfd in [p for p, when in self.kill_at.items() if when <= now]:
            del self.kill_at[pidfd]
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                if self.trace:
                    self.say(f"the caller of child {self.children[pidfd][0]} is gone; killed it")
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
    capabilities = Process("/proc/self").capabilities
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
