"""Plugin logging: JSON lines appended to the configured file, never to stdout.

A plugin process writes a handful of lines, so this is deliberately tiny (the `logging` package
costs import time on every pod start). If the file cannot be opened the lines go to stderr, which
the runtime keeps; the plugin itself never fails because of its log.
"""

from __future__ import annotations

import os
import sys
import time

from . import jsonio
from .fsutil import make_dirs

LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "WARNING": 30, "ERROR": 40}
DEFAULT_FILE = "/var/log/aws-routed-eni/plugin.log"


class Logger:
    """Writes one JSON object per line with the invocation's context on every line."""

    def __init__(self, plugin: str, path: str | None = None, level: str = "DEBUG"):
        self.plugin = plugin
        self.path = path
        self.threshold = LEVELS.get(level.upper(), 10)
        self.context: dict = {}
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            if not self.path or self.path == "stderr":
                self._fd = 2
            else:
                try:
                    make_dirs(os.path.dirname(self.path))
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError as exc:
                    sys.stderr.write(f"{self.plugin}: cannot open log file {self.path}: {exc}\n")
                    self._fd = 2
        return self._fd

    def log(self, level: str, msg: str, **fields) -> None:
        if LEVELS[level] < self.threshold:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        record = {"time": stamp,
                  "level": level, "plugin": self.plugin, **self.context, "msg": msg, **fields}
        line = jsonio.dumps(record, default=str, separators=(",", ":")) + "\n"
        try:
            os.write(self._open(), line.encode())
        except OSError:
            pass

    def debug(self, msg: str, **fields) -> None:
        self.log("DEBUG", msg, **fields)

    def info(self, msg: str, **fields) -> None:
        self.log("INFO", msg, **fields)

    def warn(self, msg: str, **fields) -> None:
        self.log("WARN", msg, **fields)

    def error(self, msg: str, **fields) -> None:
        self.log("ERROR", msg, **fields)
