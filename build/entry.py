"""The frozen bundle's one entry point: dispatch on the program name, busybox style.

/opt/cni/bin/aws-eni-ipam -> aws-vpc-cni/aws-vpc-cni runs aws-eni-ipam. Each program imports only
its own module, so a plugin pays for nothing it does not use. `aws-vpc-cni NAME ARGS...` works too.
"""

import os
import sys

PROGRAMS = {
    "aws-eni-ipam": "aws_eni_ipam.main",
    "aws-vpc-bridge": "aws_vpc_bridge.main",
    "aws-snat": "aws_snat.main",
    "portmap-compat": "portmap_compat.main",
    "aws-vpc-cni-agent": "aws_vpc_cni_agent.main",
}
# The CNI plugins: short-lived, one per exec, no threads of their own (see _exit_without_teardown).
PLUGINS = ("aws-eni-ipam", "aws-vpc-bridge", "aws-snat", "portmap-compat")
# The plugins' resident helper (build/zygote.py, _internal/zygote.pyc), which the agent starts.
ZYGOTE = "aws-vpc-cni-zygote"


def _frozen_stdlib_files() -> None:
    """What PyInstaller's bootstrap does for Python 3.11's frozen stdlib modules (os, codecs, io, ...),
    which build/launcher.c runs us without: sys._stdlib_dir and their __file__ point into the
    bundle, as for every other module. Here rather than in the launcher, so it is compiled once."""
    import _imp
    if not sys._stdlib_dir:
        sys._stdlib_dir = sys._MEIPASS
    for name, module in list(sys.modules.items()):
        if not _imp.is_frozen(name):
            continue
        state = module.__spec__.loader_state
        origname = state.origname + (".__init__" if _imp.is_frozen_package(name) else "")
        filename = "/".join([sys._MEIPASS, *origname.split(".")]) + ".pyc"
        if not hasattr(module, "__file__"):
            try:
                module.__file__ = filename
            except AttributeError:
                pass
        if state.filename is None and origname != "importlib._bootstrap":
            state.filename = filename


def _exit_without_teardown(code) -> None:
    """Exit as sys.exit(code) would, without the interpreter's teardown.

    Py_Finalize's garbage collections and module teardown cost a plugin ~2-2.5 ms of CPU per exec
    (VERSION 17.6/19.6 -> 15.1/16.1 ms, min/median), and a plugin has nothing left for them to do: it
    writes its answer and its log with os.write and opens no file it leaves open. What the teardown
    would do that anyone can see is done here: atexit handlers, flushing sys.stdout and sys.stderr.
    Anything unusual (another thread still running, a non-integer code, a flush that fails) takes the
    ordinary sys.exit, so the interpreter handles it as always.
    """
    import atexit
    threading = sys.modules.get("threading")
    if threading is not None and any(t.is_alive() and not t.daemon and t is not threading.main_thread()
                                     for t in threading.enumerate()):
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        sys.exit(code)
    os._exit(code or 0)


def main() -> None:
    if hasattr(sys, "_MEIPASS"):
        _frozen_stdlib_files()
    name = os.path.basename(sys.argv[0])
    if name not in PROGRAMS and len(sys.argv) > 1 and (sys.argv[1] in PROGRAMS or sys.argv[1] == ZYGOTE):
        name = sys.argv.pop(1)
        sys.argv[0] = name
    if name == ZYGOTE:
        import zygote
        sys.exit(zygote.main(sys.argv[1:], {p: PROGRAMS[p] for p in PLUGINS}))
    if name not in PROGRAMS:
        sys.stderr.write(f"aws-vpc-cni bundle: run me as one of {', '.join(PROGRAMS)} "
                         f"(a link with that name, or 'aws-vpc-cni NAME ...')\n")
        sys.exit(2)
    if name not in PLUGINS:
        module = __import__(PROGRAMS[name], fromlist=["main"])
        sys.exit(module.main())
    # No garbage collection while the plugin's modules load: their objects (functions, classes,
    # dicts) live until exit, so the generational collections their allocations trigger find nothing
    # to free (~0.5-1.5 ms per exec for aws-snat and portmap-compat). Frozen afterwards, so the
    # collections the handler's own work triggers do not walk them either.
    import gc
    gc.disable()
    module = __import__(PROGRAMS[name], fromlist=["main"])
    gc.freeze()
    gc.enable()
    try:
        code = module.main()
    except SystemExit as exc:
        code = exc.code
    _exit_without_teardown(code)


if __name__ == "__main__":
    main()
