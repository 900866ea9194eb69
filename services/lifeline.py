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
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

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
