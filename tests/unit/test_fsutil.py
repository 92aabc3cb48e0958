"""cnicore.fsutil.write_atomic: whole or nothing, and no temp file of a killed writer outlives the
next write (the reliability suite's SIGKILLs left aws-snat's stamp temp behind), while the temp of a
live writer, whatever its pid namespace, is never touched (its flock tells, not its pid)."""

import fcntl
import os
import stat
import threading

import pytest

from cnicore import fsutil
from cnicore.fsutil import write_atomic


def test_replaces_the_file_with_the_mode_asked_whatever_the_umask(tmp_path):
    path = tmp_path / "stamp"
    path.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomic(str(path), b"new\n", mode=0o644, durable=True)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new\n" and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["stamp"]


def held_temp(path) -> int:
    """A temp file of a writer in flight: created and flocked (through its own open file description,
    as another process's would be). Returns the fd that holds the lock."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_killed_writers_temp_goes_at_the_next_write_a_live_writers_stays(tmp_path):
    path = tmp_path / "aws-snat.stamp"
    killed = tmp_path / ".aws-snat.stamp.tmp.1.0a1b2c3d"   # its writer died: nobody holds it
    legacy = tmp_path / "aws-snat.stamp.tmp.4242"          # a release before the lock left it
    live = tmp_path / ".aws-snat.stamp.tmp.1.deadbeef"     # pid 1 too: a writer in another pid namespace
    other = tmp_path / ".aws-cni.json.tmp.7.00000000"      # another file's: its own writes remove it
    for temp in (killed, legacy, other):
        temp.write_bytes(b"half")
    fd = held_temp(live)
    try:
        write_atomic(str(path), b"x")
        assert sorted(os.listdir(tmp_path)) == sorted(["aws-snat.stamp", live.name, other.name])
    finally:
        os.close(fd)
    write_atomic(str(path), b"y")  # its writer is gone now
    assert sorted(os.listdir(tmp_path)) == sorted(["aws-snat.stamp", other.name]) and path.read_bytes() == b"y"


def test_a_writer_whose_new_temp_a_cleaner_removed_before_its_lock_writes_another(tmp_path, monkeypatch):
    """Between a writer's create and its flock, another writer's clean-up may find the temp unlocked
    and remove it: the write must still land whole, through a temp of its own."""
    path = tmp_path / "aws-vpc.json"
    real_flock, raced = fcntl.flock, []

    def flock_after_a_cleaner(fd, op):
        if not raced:
            raced.append(True)
            fsutil._remove_dead_writers_temps(str(tmp_path), path.name)  # as another process would
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_cleaner)
    write_atomic(str(path), b"whole")
    assert raced and path.read_bytes() == b"whole" and os.listdir(tmp_path) == [path.name]


def test_concurrent_writers_never_lose_a_write_to_each_others_clean_up(tmp_path):
    path, errors = tmp_path / "aws-vpc.json", []

    def writer(n):
        try:
            for i in range(200):
                write_atomic(str(path), f"{n} {i}".encode())
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and os.listdir(tmp_path) == [path.name]
    assert path.read_bytes().split()[1] == b"199"


def test_a_failed_write_raises_and_leaves_neither_file_nor_temp(tmp_path):
    path = tmp_path / "file"
    os.mkdir(path)  # rename of a file over a directory fails
    with pytest.raises(OSError):
        write_atomic(str(path), b"x")
    assert sorted(os.listdir(tmp_path)) == ["file"] and os.listdir(path) == []


def test_an_interrupted_write_leaves_no_temp(tmp_path, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(tmp_path / "file"), b"x", durable=True)
    assert os.listdir(tmp_path) == []
