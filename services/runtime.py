"""Process plumbing shared by the three service entry points: event loop, logging, signals,
ready file."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any


def run(main: Coroutine[Any, Any, None]) -> None:
    """Runs ``main`` on uvloop where available (+15-40 % on streaming, DESIGN §8)."""
    logging.basicConfig(
        level=os.environ.get("MESHSERVE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:
        asyncio.run(main)


async def wait_for_signal() -> None:
    """Returns on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def write_ready_file(path: str, **info: Any) -> None:
    """Atomically writes ``info`` as JSON: launchers wait for this file instead of sleeping."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(target)
