"""Backpressure for work that runs beside the engine (a search: embed the query, scan the index).

Design: a `Gate` runs a blocking function on a worker thread (`asyncio.to_thread`), at most
`running` at once; up to `waiting` more calls wait their turn, and a call beyond that is refused
at once with a 429 and Retry-After, as the engine's full queue is (bridge.py). A call arriving
while the server shuts down gets the same 503 as a generation. The engine thread and these
threads share the CPU; one running call (the default) keeps a search from taking cores the
running batch needs.

Trade-off: a call already running on its thread cannot be interrupted (torch and numpy do not
stop halfway), so --request-timeout bounds only the wait for a turn: a call that waited that long
is refused with a 504 instead of starting late.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from .protocol import ApiError

T = TypeVar("T")


class Gate:
    """At most `running` calls at once and `waiting` more queued; 429 beyond, 503 when closing."""

    def __init__(self, running: int, waiting: int, timeout: float, closing: Callable[[], bool]) -> None:
        self.running, self.waiting, self.timeout, self.closing = running, waiting, timeout, closing
        self.pending = 0  # running + waiting; only touched on the event loop
        self._slots: asyncio.Semaphore | None = None  # made on the loop that first uses it

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.closing():
            raise ApiError(503, "the server is shutting down; send the request to another server or retry after "
                                "it restarts", kind="server_error")
        if self.pending >= self.running + self.waiting:
            raise ApiError(429, f"server busy: {self.pending - self.running} requests are waiting (max_queue "
                                f"{self.waiting}); retry later", kind="rate_limit_error", headers={"Retry-After": "1"})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.running)
        self.pending += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout=self.timeout)
            except asyncio.TimeoutError:
                raise ApiError(504, f"request waited longer than this server's limit of {self.timeout:g} s "
                                    "(--request-timeout)", kind="timeout_error") from None
            try:
                if self.closing():
                    raise ApiError(503, "the server is shutting down; retry after it restarts", kind="server_error")
                return await asyncio.to_thread(fn, *args)
            finally:
                self._slots.release()
        finally:
            self.pending -= 1


__all__ = ["Gate"]
