"""The plugin and agent logs are rotated by size, as upstream's lumberjack logger does, and stay safe
with many short-lived plugin processes appending to one file at once (issue 21, point 5).

The writers are real processes running cnicore.log as a plugin exec does: one Logger per plugin
invocation, four invocations per pod lifecycle (bridge with its in-process IPAM, snat, portmap, each
ADD or DEL), about 5.7 kB of lines per lifecycle as measured in issue 21."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cnicore import log, settings
from support.paths import ROOT

LIFECYCLES = 1000
WORKERS = 8
# One lifecycle: ADD and DEL through the three plugins, ~5.7 kB in all (issue 21's figure).
WORKER = r"""
import sys
sys.path.insert(0, {root!r})
from cnicore.log import Logger
path, worker, lifecycles, size, backups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
filler = "x" * 180
for n in range(lifecycles):
    for command in ("ADD", "DEL"):
        for plugin in ("aws-vpc-bridge", "aws-snat", "portmap-compat"):
            logger = Logger(plugin, path, "DEBUG", size, backups, 30)
            logger.context = {{"command": command, "containerID": f"w{{worker}}-c{{n}}", "ifname": "eth0"}}
            for step in range(4):
                logger.debug("step", worker=worker, lifecycle=n, plugin_step=step, filler=filler)
            logger.info("done", outcome="ok", duration_ms=12.5)
            logger.close()
"""


def _run_writers(path: str, max_size_mb: int, max_backups: int) -> None:
    code = WORKER.format(root=ROOT)
    per_worker = LIFECYCLES // WORKERS
    procs = [subprocess.Popen([sys.executable, "-c", code, path, str(w), str(per_worker), str(max_size_mb),
                               str(max_backups)]) for w in range(WORKERS)]
    try:
        for proc in procs:
            assert proc.wait(timeout=600) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _records(paths) -> list[dict]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        assert data.endswith(b"\n") or not data, f"{p} ends in a torn line"
        out += [json.loads(line) for line in data.splitlines()]  # a torn or interleaved line fails here
    return out


def test_a_thousand_pod_lifecycles_keep_the_log_under_its_size_with_backups_capped(tmp_path):
    path = str(tmp_path / "log" / "plugin.log")
    _run_writers(path, max_size_mb=1, max_backups=2)
    found = log.backups(path)
    sizes = {p: os.path.getsize(p) for p in [path, *(b for _, b in found)]}
    assert len(found) == 2, f"backups must be capped at 2: {sorted(sizes)}"
    assert all(size <= log.MEGABYTE for size in sizes.values()), sizes
    # ~5.7 MB were written: what is left is at most three files' worth, all of it whole lines.
    assert len(_records(sizes)) < LIFECYCLES * 2 * 3 * 5 / 1.5


def test_concurrent_rotation_loses_and_tears_no_line(tmp_path):
    path = str(tmp_path / "plugin.log")
    _run_writers(path, max_size_mb=1, max_backups=0)  # 0: keep every backup, so every line can be counted
    found = log.backups(path)
    assert len(found) >= 4, "5.7 MB through a 1 MB file rotates at least 4 times"
    files = [path, *(b for _, b in found)]
    assert all(os.path.getsize(p) <= log.MEGABYTE for p in files)
    records = _records(files)
    done = {(r["containerID"], r["command"], r["plugin"]) for r in records if r["msg"] == "done"}
    assert len(records) == LIFECYCLES * 2 * 3 * 5
    assert len(done) == LIFECYCLES * 2 * 3
    # Backups are time-ordered: each one's lines are older than the next one's.
    newest_first = [max(r["time"] for r in _records([p])) for p in files[1:]]
    assert newest_first == sorted(newest_first, reverse=True)


def test_old_and_surplus_backups_go_upstream_compressed_ones_included(tmp_path):
    path = str(tmp_path / "ipamd.log")
    now = time.time()
    old = log.backup_path(path, now - 31 * 86400)
    upstream_gz = log.backup_path(path, now - 3600) + ".gz"  # lumberjack's Compress: true leaves these
    recent = log.backup_path(path, now - 60)
    unrelated = str(tmp_path / "ipamd-notes.log")
    for p in (old, upstream_gz, recent, unrelated, path):
        with open(p, "w") as f:
            f.write("x\n")
    made = log.rotate(path, max_backups=2, max_age_days=30, now=now)
    assert not os.path.exists(path) and os.path.exists(made)
    assert not os.path.exists(old), "older than MaxAge"
    assert [p for _, p in log.backups(path)] == [made, recent], "MaxBackups keeps the newest two"
    assert os.path.exists(unrelated), "a file that is not a backup is never touched"


def test_the_defaults_are_upstreams_lumberjack_figures():
    # pkg/utils/logger/zaplogger.go getLogWriter: MaxSize 100, MaxBackups 5, MaxAge 30.
    cfg = settings.from_env({})
    assert log.rotation(cfg) == {"max_size_mb": 100, "max_backups": 5, "max_age_days": 30}
    logger = log.Logger("aws-snat", "/nonexistent/x.log")
    assert (logger.max_bytes, logger.max_backups, logger.max_age_days) == (100 * log.MEGABYTE, 5, 30)
    assert log.Logger("aws-snat", None, max_size_mb=0).max_bytes == 100 * log.MEGABYTE  # lumberjack: 0 is 100


def test_agent_log_as_upstream_json_lines_to_its_file_at_its_level(tmp_path):
    path = str(tmp_path / "aws-routed-eni" / "ipamd.log")
    cfg = settings.from_env({"AWS_VPC_K8S_CNI_LOG_FILE": path, "AWS_VPC_K8S_CNI_LOGLEVEL": "info"})
    logger = log.agent_logger(cfg)
    logger.debug("not written at info")
    logger.info("agent started", pid=1)
    logger.close()
    (record,) = _records([path])
    assert record["msg"] == "agent started" and record["level"] == "INFO" and record["plugin"] == "aws-vpc-cni-agent"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("value,fd", [("stdout", 1), ("STDERR", 2), ("", None)])
def test_agent_log_streams(value, fd):
    cfg = settings.from_env({"AWS_VPC_K8S_CNI_LOG_FILE": value})
    logger = log.agent_logger(cfg)
    if fd is None:
        assert logger.path == "/var/log/aws-routed-eni/ipamd.log"  # empty: upstream's GetLogLocation default
    else:
        assert logger._open() == fd and logger._lock_fd is None


def test_agent_log_rotates_safely_across_threads(tmp_path):
    import threading
    path = str(tmp_path / "ipamd.log")
    cfg = settings.from_env({"AWS_VPC_K8S_CNI_LOG_FILE": path, "AWS_VPC_CNI_LOG_MAX_SIZE": "1",
                             "AWS_VPC_CNI_LOG_MAX_BACKUPS": "0"})
    logger = log.agent_logger(cfg)

    def write(t):
        for i in range(3000):
            logger.info("tick", thread=t, n=i, filler="y" * 300)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logger.close()
    files = [path, *(b for _, b in log.backups(path))]
    assert len(files) >= 4 and all(os.path.getsize(p) <= log.MEGABYTE for p in files)
    assert len(_records(files)) == 4 * 3000
