"""Creating the directories our files live in."""

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
