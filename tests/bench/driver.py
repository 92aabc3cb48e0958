"""The bench's timer, run inside a lab node's namespace (`ip netns exec <node> python -m tests.bench.driver`).

It reads one JSON request per line on stdin and answers one JSON line on stdout. Living in the node
for the whole run, it execs cnitool directly: no `ip netns exec` (a fork, a mount namespace and a
/sys remount, ~5 ms) inside the timed window, and the same for both chains.

    {"op": "run", "argv": [...], "env": {...}, "stdin": null}
        -> {"rc", "wall", "cpu", "out", "err"}          one process, waited for
    {"op": "burst", "jobs": [{"argv", "env"}, ...]}
        -> {"wall", "cpu", "results": [{"rc", "wall", "out", "err"}]}   all started at once
    {"op": "quit"}

`wall` is seconds from just before the fork to the reap; `cpu` is the RUSAGE_CHILDREN (user + system)
delta around the run, which counts cnitool and every plugin and helper it waited for. A request may
name `helpers`: pids of resident processes that work for the run (the plugin zygote, whose forked
children run our plugins outside cnitool's process tree); their own CPU and that of the children they
reaped is added, once each has reaped every child (waited for after the wall time is taken). Standard
library only, so the driver adds nothing to the measured processes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


_TICK = os.sysconf("SC_CLK_TCK")


def _helper_cpu(pids: list[int]) -> float:
    """utime + stime + cutime + cstime of each helper, after waiting (up to 2 s) until none has a
    child left: a child that is still exiting has not yet been added to its parent's cutime."""
    deadline = time.monotonic() + 2.0
    total = 0.0
    for pid in pids:
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                if not f.read().strip():
                    break
            time.sleep(0.0005)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15]) / _TICK
    return total


def _start(job: dict) -> subprocess.Popen:
    return subprocess.Popen(job["argv"], env=job["env"], stdin=subprocess.PIPE if job.get("stdin") else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)


def run(job: dict) -> dict:
    helpers = job.get("helpers", [])
    helper0 = _helper_cpu(helpers)
    cpu0 = _cpu()
    t0 = time.perf_counter()
    proc = _start(job)
    out, err = proc.communicate(job["stdin"].encode() if job.get("stdin") else None)
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0 + _helper_cpu(helpers) - helper0
    return {"rc": proc.returncode, "wall": wall, "cpu": cpu, "out": out.decode(errors="replace"),
            "err": err.decode(errors="replace")[-4000:]}


def burst(jobs: list[dict]) -> dict:
    """Start every job, then reap them in the order they end (os.wait), timing each."""
    helpers = sorted({pid for job in jobs for pid in job.get("helpers", [])})
    helper0 = _helper_cpu(helpers)
    cpu0 = _cpu()
    t0 = time.perf_counter()
    procs = {}
    for n, job in enumerate(jobs):
        procs[n] = _start(job)
    # read the pipes in threads so no child blocks on a full pipe
    import threading

    outputs: dict[int, tuple[bytes, bytes]] = {}
    ended: dict[int, float] = {}

    def drain(n: int, proc: subprocess.Popen) -> None:
        out, err = proc.communicate()
        ended[n] = time.perf_counter() - t0
        outputs[n] = (out, err)

    threads = [threading.Thread(target=drain, args=(n, p)) for n, p in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0 + _helper_cpu(helpers) - helper0
    results = [{"rc": procs[n].returncode, "wall": ended[n], "out": outputs[n][0].decode(errors="replace"),
                "err": outputs[n][1].decode(errors="replace")[-4000:]} for n in sorted(procs)]
    return {"wall": wall, "cpu": cpu, "results": results}


def main() -> int:
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            break
        try:
            if op == "run":
                answer = run(request)
            elif op == "burst":
                answer = burst(request["jobs"])
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # report, keep serving
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
