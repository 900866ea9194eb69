"""``python -m meshserve``: the same commands as the ``meshserve`` script."""

import sys

from meshserve.cli import main

if __name__ == "__main__":  # vLLM spawns processes: entry points need this guard (DESIGN §7)
    # A process spawned through multiprocessing (vLLM's engine core and its workers) first
    # re-runs its parent's main module — except a package's __main__ found by name, which
    # CPython skips. By path it runs (as __mp_main__), and its import of meshserve.cli starts
    # the parent watch (meshserve.lifeline) before vLLM loads, as the console script's does.
    sys.modules["__main__"].__spec__ = None
    main()
