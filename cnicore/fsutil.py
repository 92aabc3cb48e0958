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

    The data goes to a temp file beside it, `.<name>.tmp.<pid>`, renamed over `path`. A writer
    SIGKILLed in between leaves its temp file behind: each write first removes those whose writer
    (the pid in the name) is gone, so none outlives the next write. `mode` is the file's whatever the
    umask; `durable` fsyncs the file and the directory (the data survives a crash of the host).
    Raises OSError (the temp file removed)."""
    directory, name = os.path.split(path)
    prefix = f".{name}.tmp."
    _remove_dead_writers_temps(directory or ".", prefix)
    temp = os.path.join(directory, f"{prefix}{os.getpid()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
    except OSError:
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


def _remove_dead_writers_temps(directory: str, prefix: str) -> None:
    try:
        names = [name for name in os.listdir(directory) if name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
