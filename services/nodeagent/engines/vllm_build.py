"""Building vLLM's `AsyncLLM` so that a cancelled load neither leaks an engine nor holds the agent.

``AsyncLLM.from_engine_args`` blocks for seconds to minutes: it spawns the engine-core process,
which imports vLLM, loads the weights, profiles memory and warms up, and waits for its handshake.
It cannot be interrupted from outside. Run through ``asyncio.to_thread`` it had two faults when
the agent stopped (SIGTERM) during a load:

- the load's task was cancelled but the thread went on, and ``asyncio.run`` joins the default
  executor's threads on the way out: the agent outlived its stop budget by the rest of the
  build (20 s on an idle machine, over 30 s on a loaded one, where the launcher gave up);
- the engine's private KV-events directory was removed under the starting engine core, which
  then died binding its socket (``ZMQError``), and an engine built after the cancellation was
  never shut down.

Here the build runs in a daemon thread of its own (never joined at exit), and a cancellation
kills the engine-core processes this build spawned, which makes vLLM's handshake fail at once;
it waits a bounded time for the thread to end and shuts down an engine that was built anyway,
so nothing outlives the load. "Spawned by this build" is the `multiprocessing` children that
appeared since it began: the agent serializes loads, so they are no other build's (several
agents in one process, `meshserve.nodeagent.fleet`, for simulated engines, would break that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil  # a dependency of vLLM's (vllm.utils.system_utils uses it too)

log = logging.getLogger(__name__)
T = TypeVar("T")
ABANDON_WAIT_S = 3.0  # how long a cancelled build may take to end once its processes are killed
KILL_POLL_S = 0.1


async def build_cancellably(build: Callable[[], T], close: Callable[[T], None]) -> T:
    """``build()`` in a daemon thread; on cancellation, kills the processes it spawned, waits up
    to `ABANDON_WAIT_S` for it to end, and ``close``-s what it built (now, or when it ends)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    before = {p.pid for p in multiprocessing.active_children() if p.pid is not None}

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():  # nobody will take it: close it, off the event loop (it blocks)
            if error is None:
                threading.Thread(
                    target=_close_quietly, args=(close, result), name="vllm-close", daemon=True
                ).start()
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = build()
        except BaseException as e:  # delivered to the awaiting task
            error = e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed (the agent is exiting): nobody will take it
            if error is None:
                _close_quietly(close, result)

    threading.Thread(target=run, name="vllm-build", daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        await _abandon(done, before, close)
        raise


async def _abandon(done: asyncio.Future[T], before: set[int], close: Callable[[T], None]) -> None:
    try:
        await _kill_and_wait(done, before, close)
    finally:
        if not done.done():  # cancelled again meanwhile, or the wait ran out: settle() closes
            done.cancel()


async def _kill_and_wait(
    done: asyncio.Future[T], before: set[int], close: Callable[[T], None]
) -> None:
    # Until the thread ends: what it spawned so far, and what it spawns next (a build cancelled
    # before its engine core started goes on to start one), is killed as soon as it shows.
    deadline = time.monotonic() + ABANDON_WAIT_S
    while not done.done() and time.monotonic() < deadline:
        for p in multiprocessing.active_children():
            if p.pid is not None and p.pid not in before:
                before.add(p.pid)
                log.info("load cancelled: killing %s (pid %s) and its workers", p.name, p.pid)
                kill_tree(p.pid)
        await asyncio.wait([done], timeout=KILL_POLL_S)
    if not done.done():
        log.warning("a cancelled vLLM build is still running after %.0f s; left to end alone",
                    ABANDON_WAIT_S)  # fmt: skip
        return
    if done.exception() is None:
        await asyncio.to_thread(_close_quietly, close, done.result())


def _close_quietly(close: Callable[[Any], None], built: Any) -> None:
    try:
        close(built)
    except Exception:
        log.exception("closing an engine built for a cancelled load failed")


def kill_tree(pid: int) -> None:
    """SIGKILLs ``pid`` and its descendants (an engine core and its workers). Stopped first, so
    it spawns nothing between the listing and the kill; its workers, orphaned, would otherwise
    run on (seconds of a core's CPU) until they notice their parent's death."""
    with contextlib.suppress(psutil.Error):
        top = psutil.Process(pid)
        top.suspend()
        for proc in [*top.children(recursive=True), top]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
