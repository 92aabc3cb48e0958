"""Our files on disk: creating the directories they live in, and writing them whole or not at all."""

import os


def make_dirs(path: str, mode: int = 0o700) -> None:
    """os.makedirs, except that every directory it creates gets `mode` (os.makedirs gives the
    intermediate ones the umask's mode: 0777 under umask 0)."""
    if not path or os.path.isdir(path):
        return
    make_dirs(os.path.dirname(path), mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)  # whatever the umask took away


def write_atomic(path: str, data: bytes, mode: int = 0o600, durable: bool = False) -> None:
    """Replace `path` with `data`, so that a reader sees the old file or the new one, never a part.

    The data goes to a new temp file beside it, `.<name>.tmp.<pid>.<random>`, which its writer holds
    an flock on until it is renamed over `path`. A writer SIGKILLed in between leaves its temp file
    behind, unlocked: each write first removes the unlocked temps of `path`, so none outlives the next
    write. The lock, not the pid, tells a live writer: the agent and the plugins run in different pid
    namespaces. `mode` is the file's whatever the umask; `durable` fsyncs the file and the directory
    (the data survives a crash of the host). Raises OSError (the temp file removed)."""
    directory, name = os.path.split(path)
    _remove_dead_writers_temps(directory or ".", name)
    fd, temp = _locked_temp(directory, name, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
            os.rename(temp, path)
        finally:
            os.close(fd)  # the lock goes with it
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory or ".")


def fsync_dir(directory: str) -> None:
    """Make the directory's entries (a rename, a new file) survive a crash of the host."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _locked_temp(directory: str, name: str, mode: int) -> tuple[int, str]:
    """A new temp file for `name`, flocked by us: (fd, path). A cleaner that took the lock between
    our create and our flock has removed it (the path no longer names our file): then another."""
    import fcntl
    while True:
        temp = os.path.join(directory, f".{name}.tmp.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(temp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd, temp
        except FileNotFoundError:
            pass
        os.close(fd)


def _remove_dead_writers_temps(directory: str, name: str) -> None:
    """Remove the temp files of `name` no writer holds (its writer was killed). Also those of the
    releases before the lock (`<name>.tmp.<pid>`, no leading dot, never locked)."""
    import fcntl
    prefixes = (f".{name}.tmp.", f"{name}.tmp.")
    try:
        names = [entry for entry in os.listdir(directory) if entry.startswith(prefixes)]
    except OSError:
        return
    for entry in names:
        temp = os.path.join(directory, entry)
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(temp)  # under the lock: a writer that opened it and waits for it finds it gone
        except OSError:
            pass  # held: a write in flight
        finally:
            os.close(fd)
