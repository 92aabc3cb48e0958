"""Logging: JSON lines appended to the configured file (rotated by size), never to a plugin's stdout.

A plugin process writes a handful of lines, so this is deliberately tiny (the `logging` package
costs import time on every pod start). If the file cannot be opened the lines go to stderr, which
the runtime keeps; the plugin itself never fails because of its log.

Rotation follows upstream's lumberjack logger (pkg/utils/logger/zaplogger.go): a write that would
take the file past its maximum size first renames it to `<name>-<UTC time>.<ext>`, then backups
beyond the count or older than the age are removed. Many short-lived plugin processes append to one
file at once, so every write happens under an flock on `<file>.lock`: under it a writer checks that
its descriptor is still the file at the path (another process may have rotated it), rotates if the
line would not fit, and appends the whole line with one write(2). No line lands in a renamed file,
none is torn, and the file never passes its size; the lock costs two syscalls a line.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

from . import jsonio
from .fsutil import make_dirs

LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40, "FATAL": 50}
DEFAULT_FILE = "/var/log/aws-routed-eni/plugin.log"
MEGABYTE = 1024 * 1024
_STREAMS = {"stderr": 2, "stdout": 1}
_BACKUP_TIME = "%Y-%m-%dT%H-%M-%S"  # lumberjack's backupTimeFormat, plus .mmm


class Logger:
    """Writes one JSON object per line with the invocation's context on every line.

    `path` is a file, "stderr", "stdout" (the agent only: a plugin's settings never give it) or
    None (stderr). Sizes are lumberjack's: `max_size_mb` 0 means 100, `max_backups` 0 keeps every
    backup, `max_age_days` 0 keeps backups of any age."""

    def __init__(self, plugin: str, path: str | None = None, level: str = "DEBUG", max_size_mb: int = 100,
                 max_backups: int = 5, max_age_days: int = 30, mutex=None):
        self.plugin = plugin
        self.path = path
        self.threshold = LEVELS.get(level.upper(), 10)
        self.max_bytes = (max_size_mb or 100) * MEGABYTE
        self.max_backups = max_backups
        self.max_age_days = max_age_days
        self.context: dict = {}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._mutex = mutex  # threads of one process share the flock, so they need this too

    def _open(self) -> int:
        if self._fd is None:
            if not self.path or self.path in _STREAMS:
                self._fd = _STREAMS.get(self.path or "stderr")
            else:
                try:
                    make_dirs(os.path.dirname(self.path))
                    self._fd = self._open_file()
                    if self._lock_fd is None:
                        self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    sys.stderr.write(f"{self.plugin}: cannot open log file {self.path}: {exc}\n")
                    if self._fd is None:
                        self._fd = 2
        return self._fd

    def _open_file(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def log(self, level: str, msg: str, **fields) -> None:
        if LEVELS[level] < self.threshold:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        record = {"time": stamp,
                  "level": level, "plugin": self.plugin, **self.context, "msg": msg, **fields}
        line = (jsonio.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        if self._mutex is not None:
            with self._mutex:
                self._write(line)
        else:
            self._write(line)

    def _write(self, line: bytes) -> None:
        try:
            fd = self._open()
            if self._lock_fd is None:
                os.write(fd, line)
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                os.write(self._current_fd(len(line)), line)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except OSError:
            pass

    def _current_fd(self, incoming: int) -> int:
        """Under the lock: the descriptor of the file now at the path, rotated first if `incoming`
        more bytes would take it past its maximum size."""
        st = os.fstat(self._fd)
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            at_path = None
        if at_path is None or (at_path.st_ino, at_path.st_dev) != (st.st_ino, st.st_dev):
            self._reopen()  # another process rotated it (or it was removed)
            st = os.fstat(self._fd)
        if st.st_size and st.st_size + incoming > self.max_bytes:
            rotate(self.path, self.max_backups, self.max_age_days)
            self._reopen()
        return self._fd

    def _reopen(self) -> None:
        os.close(self._fd)
        self._fd = None
        self._fd = self._open_file()

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None and fd > 2:
                os.close(fd)
        self._fd = self._lock_fd = None

    def debug(self, msg: str, **fields) -> None:
        self.log("DEBUG", msg, **fields)

    def info(self, msg: str, **fields) -> None:
        self.log("INFO", msg, **fields)

    def warn(self, msg: str, **fields) -> None:
        self.log("WARN", msg, **fields)

    def error(self, msg: str, **fields) -> None:
        self.log("ERROR", msg, **fields)


def rotate(path: str, max_backups: int, max_age_days: int, now: float | None = None) -> str:
    """Rename `path` to its backup name (lumberjack's `<name>-<UTC time>.<ext>`) and remove the
    backups beyond `max_backups` or older than `max_age_days` (0: no limit). The caller holds the
    lock. Returns the backup's path."""
    now = time.time() if now is None else now
    while True:
        backup = backup_path(path, now)
        if not os.path.exists(backup):
            break
        now += 0.001  # two rotations within one millisecond
    os.rename(path, backup)
    for old in expired_backups(path, max_backups, max_age_days, now):
        try:
            os.unlink(old)
        except FileNotFoundError:
            pass
    return backup


def backup_path(path: str, when: float) -> str:
    directory, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    stamp = time.strftime(_BACKUP_TIME, time.gmtime(when)) + f".{int(when % 1 * 1000):03d}"
    return os.path.join(directory, f"{stem}-{stamp}{ext}")


def backups(path: str) -> list[tuple[float, str]]:
    """(time, path) of the file's backups, newest first; upstream's compressed ones (.gz) count too."""
    import calendar
    directory, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    found = []
    for entry in os.listdir(directory or "."):
        rest = entry.removesuffix(".gz")
        if not (rest.startswith(stem + "-") and rest.endswith(ext)):
            continue
        stamp = rest[len(stem) + 1:len(rest) - len(ext)]  # 2006-01-02T15-04-05.000
        if len(stamp) != 23 or stamp[19] != "." or not stamp[20:].isdigit():
            continue
        try:
            seconds = calendar.timegm(time.strptime(stamp[:19], _BACKUP_TIME))
        except ValueError:
            continue
        found.append((seconds + int(stamp[20:]) / 1000, os.path.join(directory, entry)))
    return sorted(found, reverse=True)


def expired_backups(path: str, max_backups: int, max_age_days: int, now: float) -> list[str]:
    found = backups(path)
    expired = [p for _, p in found[max_backups:]] if max_backups else []
    if max_age_days:
        cutoff = now - max_age_days * 86400
        expired += [p for t, p in found if t < cutoff and p not in expired]
    return expired


def agent_logger(cfg, name: str = "aws-vpc-cni-agent") -> Logger:
    """The node agent's log as upstream's ipamd writes it: JSON lines to AWS_VPC_K8S_CNI_LOG_FILE
    (a file, stdout or stderr) at AWS_VPC_K8S_CNI_LOGLEVEL, rotated like the plugins' log. `cfg` is
    the agent's settings record (`settings.from_env`)."""
    import threading
    return Logger(name, cfg.agent_log_file, cfg.agent_log_level,
                  **rotation(cfg), mutex=threading.Lock())


def rotation(cfg) -> dict:
    """Logger's rotation arguments from a settings record holding them (the agent's or PLUGIN_LOG)."""
    return {"max_size_mb": cfg.log_max_size, "max_backups": cfg.log_max_backups,
            "max_age_days": cfg.log_max_age}
