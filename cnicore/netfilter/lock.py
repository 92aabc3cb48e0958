"""An flock with a deadline, so that a stuck holder turns into a clear error instead of a hang."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from ..fsutil import make_dirs
from .model import NetfilterError


@contextlib.contextmanager
def held(path: str, wait: float):
    """Hold an exclusive flock on `path` (created if missing), waiting at most `wait` seconds."""
    try:
        make_dirs(os.path.dirname(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise NetfilterError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise NetfilterError(f"another process held {path} for more than {wait:g} s") from None
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # closing releases the flock
