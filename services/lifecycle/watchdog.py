"""A watchdog for the event loop: when the loop has not run for ``threshold_s`` (something
blocked it: a long computation or a blocking call on the loop's thread), log where the loop's
thread is, once per stall. A blocked loop stops lease keepalives, health checks and every
stream at once, so the one log line with the stack is what an operator needs to find it.

A daemon thread reads a timestamp the loop refreshes every ``tick_s``; nothing runs per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback

log = logging.getLogger(__name__)


class StallWatch:
    def __init__(self, threshold_s: float = 2.0, tick_s: float = 0.25) -> None:
        self.threshold_s = threshold_s
        self.tick_s = tick_s
        self.stalls = 0  # stalls seen (one per blocked stretch)
        self._beat = time.monotonic()
        self._cpu = time.process_time()  # the process's CPU seconds at the last beat
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None

    async def _heartbeat(self) -> None:
        while True:
            self._beat, self._cpu = time.monotonic(), time.process_time()
            await asyncio.sleep(self.tick_s)

    def start(self) -> None:
        """Call on the loop's thread, from a coroutine."""
        self._loop_thread = threading.get_ident()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())
        threading.Thread(target=self._watch, name="stall-watch", daemon=True).start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _watch(self) -> None:
        reported = 0.0  # the beat of the stall already reported
        while not self._stop.wait(self.tick_s):
            beat = self._beat
            blocked = time.monotonic() - beat
            if blocked > self.threshold_s and beat != reported:
                reported = beat
                self.stalls += 1
                cpu = time.process_time() - self._cpu
                frame = sys._current_frames().get(self._loop_thread)
                where = "".join(traceback.format_stack(frame)[-12:]) if frame else "?"
                # Little CPU meanwhile: the process was starved (a busy host) or waited in C,
                # not computing in Python; the stack then ends in the loop's own run call.
                log.warning(
                    "the event loop has been blocked for %.1f s (the process used %.1f s of CPU "
                    "meanwhile), in:\n%s",
                    blocked,
                    cpu,
                    where,
                )
