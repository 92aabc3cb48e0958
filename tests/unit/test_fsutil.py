"""cnicore.fsutil.write_atomic: whole or nothing, and no temp file of a killed writer outlives the
next write (the reliability suite's SIGKILLs left aws-snat's stamp temp behind)."""

import os
import stat
import subprocess
import sys

import pytest

from cnicore.fsutil import write_atomic


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


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


def test_a_killed_writers_temp_goes_at_the_next_write_a_live_writers_stays(tmp_path):
    path = tmp_path / "aws-snat.stamp"
    dead = tmp_path / f".aws-snat.stamp.tmp.{dead_pid()}"
    live = tmp_path / f".aws-snat.stamp.tmp.{os.getppid()}"  # a writer still running
    other = tmp_path / f".aws-cni.json.tmp.{dead_pid()}"  # another file's: its own writes remove it
    for temp in (dead, live, other):
        temp.write_bytes(b"half")
    write_atomic(str(path), b"x")
    assert sorted(os.listdir(tmp_path)) == sorted(["aws-snat.stamp", live.name, other.name])


def test_a_failed_write_raises_and_leaves_neither_file_nor_temp(tmp_path):
    path = tmp_path / "file"
    os.mkdir(path)  # rename of a file over a directory fails
    with pytest.raises(OSError):
        write_atomic(str(path), b"x")
    assert sorted(os.listdir(tmp_path)) == ["file"] and os.listdir(path) == []
