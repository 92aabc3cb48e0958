"""The plugins' resident helper (build/zygote.py), run beside the agent and restarted if it dies.

It serves on `<dataDir>/zygote.sock`, where build/launcher.c finds it for the default data folder
(else through AWS_VPC_CNI_ZYGOTE_SOCKET in the runtime's environment). Only the frozen agent starts
it, from its own bundle, since the zygote serves only launchers of the very same executable file. It
holds the read end of a pipe whose write end only the agent has, and exits when that closes, so a
killed agent leaves no zygote behind.
"""

from __future__ import annotations

import os
import subprocess
import sys

from cnicore import agentlink

RESTART_DELAY = 10.0  # seconds after the zygote ended before the next start
CANNOT_SERVE = 3  # the zygote's exit status when it could serve no runtime here (build/zygote.py)


def supervise(agent) -> None:
    """Start the zygote, and again after it ends, until the agent stops. Runs in a daemon thread."""
    path = os.path.join(agent.data_dir, agentlink.ZYGOTE)
    while not agent.stopping.is_set():
        read_end, write_end = os.pipe()  # both not inheritable; read_end is passed on by pass_fds
        try:
            proc = subprocess.Popen([sys.executable, "aws-vpc-cni-zygote", "--socket", path,
                                     "--parent-fd", str(read_end)],
                                    pass_fds=(read_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as exc:
            agent.log.error(f"cannot start the plugin zygote: {exc}")
            os.close(write_end)
            proc = None
        finally:
            os.close(read_end)
        if proc is not None:
            agent.zygote_pid = proc.pid
            agent.zygote_starts += 1
            agent.log.info("plugin zygote started", pid=proc.pid, socket=path)
            code = proc.wait()
            agent.zygote_pid = None
            os.close(write_end)
            if code == CANNOT_SERVE:
                agent.log.warn("the plugin zygote cannot serve on this node (its reason is on the agent's "
                               "stderr); plugins start Python themselves")
                return
            if not agent.stopping.is_set():
                agent.log.error(f"the plugin zygote ended (exit status {code}); plugins start Python "
                                f"themselves until it is back in {RESTART_DELAY:.0f} s")
        agent.stopping.wait(RESTART_DELAY)
