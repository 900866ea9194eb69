"""``python -m meshserve``: the same commands as the ``meshserve`` script."""

from meshserve.cli import main

if __name__ == "__main__":  # vLLM spawns processes: entry points need this guard (DESIGN §7)
    main()
