"""Process plumbing below the service lifecycle (service.py): event loop and logging, and the
ready file launchers wait for."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any


def run_loop(main: Coroutine[Any, Any, None]) -> None:
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


def write_ready_file(path: str, **info: Any) -> None:
    """Atomically writes ``info`` as JSON: launchers wait for this file instead of sleeping."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(target)
