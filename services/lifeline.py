"""Children that die with their parent: ``python -m meshserve.lifeline PARENT_PID -- CMD ARGS``.

`meshserve up` and the test meshes start every service (etcd included) through this shim. It
asks Linux to send SIGTERM to this process when its parent dies (``PR_SET_PDEATHSIG``, which
survives ``execve``), gives up if the parent is already gone, restores default dispositions for
the signals a service must obey (a background job of a non-interactive shell starts with SIGINT
ignored, and an ignored signal stays ignored across ``exec``), then becomes CMD. So a launcher
killed by SIGKILL, the OOM killer or a crash leaves no etcd, router or agent behind holding its
ports, and each service still gets a SIGTERM it handles gracefully.

The shim runs in a fresh single-threaded interpreter, so nothing here runs between ``fork`` and
``exec`` of a threaded parent (``preexec_fn`` is unsafe there). Outside Linux the shim only
resets the signals and execs: the launcher's own cleanup is then all there is.

Processes a service starts through `multiprocessing` (vLLM's engine core and its workers, for
the agent) cannot go through the shim; `watch_parent` ties them instead: a daemon thread that
polls ``getppid`` and, once the parent is gone, kills what the process spawned and the process.
Not ``PR_SET_PDEATHSIG``: Linux sends that when the parent *thread* ends, and the agent builds
engines in a thread that ends as soon as they are up (engines/vllm_build.py). The agent asks for
it through `WATCH_ENV` in the engine's environment, and `watch_if_asked` runs when a spawned
process re-imports the agent's main module, first thing (`meshserve.cli`): before vLLM even
loads, so an engine core whose agent died mid-start (it would wait for its handshake forever)
goes too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
OBEYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def tied_to_parent(argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` as a child of this process that dies with it."""
    return [sys.executable, "-m", "meshserve.lifeline", str(os.getpid()), "--", *argv]


def _die_with_parent(parent: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died between our fork and the prctl: then no signal will come.
    if os.getppid() != parent:
        sys.exit(f"lifeline: parent {parent} is gone; not starting {sys.argv[3:]}")


WATCH_ENV = "MESHSERVE_DIE_WITH_PARENT"
WATCH_S = 1.0  # how often a watched process looks for its parent
_watching = False


def watch_parent(parent: int) -> bool:
    """Once ``parent`` is gone (this process was reparented), SIGKILLs this process's children
    and then this process. Idempotent; True once watching."""
    global _watching
    if not _watching:
        _watching = True
        watcher = threading.Thread(target=_watch, args=(parent,), name="parent", daemon=True)
        watcher.start()
    return True


def watch_if_asked() -> bool:
    """`watch_parent` of the parent, in a process whose environment asks for it (`WATCH_ENV`)."""
    return os.environ.get(WATCH_ENV) == "1" and watch_parent(os.getppid())


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    print(f"process {os.getpid()}: parent {parent} is gone; exiting with its children",
          file=sys.stderr, flush=True)  # fmt: skip
    with contextlib.suppress(Exception):
        import psutil  # vLLM's dependency (and the dev environment's)

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def main(args: list[str]) -> None:
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        sys.exit("usage: python -m meshserve.lifeline PARENT_PID -- CMD [ARGS...]")
    for sig in OBEYED:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    _die_with_parent(int(args[0]))
    command = args[2:]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
