"""From the engine thread to the event loop: submit requests, receive their events.

Design
------
The engine calls each request's sink on its own thread; the server lives on an asyncio loop.
`Bridge.submit` gives a call's requests (one per choice) a shared deadline and sinks that post
`(choice index, event)` to one asyncio queue, and `Bridge.events` reads that queue until every
request has finished:

- A `Mailbox` per loop hands the events of a whole engine step over in one loop callback, so a
  decode step of 16 rows wakes the loop once instead of 16 times (each wake-up also contends for
  the GIL).
- A stream's events are posted as they happen; a non-streaming request's are held on the engine
  thread and posted when it finishes (nobody reads them earlier).
- A consumer that goes away cancels what is left (a stream's consumer is cancelled by the server;
  a waiting non-streaming request is watched for its client's disconnect), which frees the slots
  before the next engine step.
- The engine's refusals at submit become `ApiError`s: an impossible request a 400, a full queue
  a 429 with Retry-After; a request that ran past its deadline (--request-timeout) or failed in
  the engine ends its call as a 504 or 500 (in a stream: an error event, see routes.py).
- `close(grace)` is the server's shutdown (SIGTERM, Ctrl-C): new calls get a 503, calls in
  flight get up to `grace` seconds to finish, and what is still running then is cancelled with
  reason "shutdown": a 503 for a waiting call, an error event and `[DONE]` in a stream. So every
  response ends properly before uvicorn closes the connections.

Trade-off: a call's requests are all submitted or none (the engine's rule), so `n` choices never
run partly; and a disconnect is noticed by polling once a second for a non-streaming request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request as HttpRequest

from ..errors import LmforgeError
from .engine import Engine, Event, Finished, QueueFull, Request, Token
from .metrics import Metrics
from .protocol import ApiError


class Mailbox:
    """Carries engine events (posted on the engine thread) to asyncio queues on one loop, in one
    loop callback for all the events posted before it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def post(self, queue: asyncio.Queue, index: int, event: Event) -> None:
        with self.lock:
            self.items.append((queue, (index, event)))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def _held(mailbox: Mailbox, queue: asyncio.Queue, index: int) -> Callable[[Event], None]:
    """A sink that keeps a request's events on the engine thread and posts them when it finishes."""
    held: list[Event] = []

    def sink(event: Event) -> None:
        held.append(event)
        if isinstance(event, Finished):
            for e in held:
                mailbox.post(queue, index, e)

    return sink


class Bridge:
    """The engine as the event loop sees it."""

    def __init__(self, engine: Engine, metrics: Metrics, request_timeout: float) -> None:
        self.engine, self.metrics, self.request_timeout = engine, metrics, request_timeout
        self.mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}
        self.closing = False  # set by close(): new calls are refused
        self.live: weakref.WeakSet[Request] = weakref.WeakSet()  # submitted; the engine holds the running ones

    def submit(self, requests: list[Request], *, stream: bool) -> asyncio.Queue:
        """Queue requests; their events arrive on the returned asyncio queue as (index, event):
        as they happen for a stream, all at once when a request finishes otherwise."""
        if self.closing:
            raise ApiError(503, "the server is shutting down; send the request to another server or retry after "
                                "it restarts", kind="server_error")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        mailbox = self.mailboxes.setdefault(loop, Mailbox(loop))
        deadline = time.monotonic() + self.request_timeout
        for i, req in enumerate(requests):
            req.deadline = deadline
            req.sink = functools.partial(mailbox.post, queue, i) if stream else _held(mailbox, queue, i)
        try:
            self.engine.submit(requests)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except LmforgeError as e:
            raise ApiError(400, str(e)) from None
        self.live.update(requests)
        return queue

    async def close(self, grace: float, hurry: Callable[[], bool] = lambda: False) -> None:
        """Refuse new calls, let the running ones finish for up to `grace` seconds (or until
        `hurry()`), then end the rest as "shutdown" and wait (briefly) until the engine is idle."""
        self.closing = True
        deadline = time.monotonic() + grace
        while self.engine.busy and time.monotonic() < deadline and not hurry():
            await asyncio.sleep(0.05)
        for req in list(self.live):
            self.engine.cancel(req, "shutdown")
        deadline = time.monotonic() + 5.0  # the engine drops them at its next step
        while self.engine.busy and time.monotonic() < deadline and not hurry():
            await asyncio.sleep(0.02)

    async def events(self, queue: asyncio.Queue, requests: list[Request], http: HttpRequest | None,
                     route: str) -> AsyncIterator[tuple[int, Event]]:
        """Events until every request finished; cancels what is left if the consumer goes away.
        `http` is the client of a non-streaming call (watched for a disconnect); None for a stream."""
        start, first, remaining = time.monotonic(), True, len(requests)
        self.metrics.requests.labels(route).inc()
        watcher = asyncio.create_task(self._watch(http, requests)) if http is not None else None
        try:
            while remaining:
                i, event = await queue.get()
                if isinstance(event, Token) and first and http is None:  # streams only
                    self.metrics.first_token.labels(route).observe(time.monotonic() - start)
                    first = False
                if isinstance(event, Finished):
                    remaining -= 1
                    if event.reason == "timeout":
                        raise ApiError(504, f"request took longer than this server's limit of {self.request_timeout:g} s "
                                            "(--request-timeout)", kind="timeout_error")
                    if event.reason == "error":
                        raise ApiError(500, event.message, kind="server_error")
                    if event.reason == "shutdown":
                        raise ApiError(503, "the server is shutting down; this reply was cut short, retry it",
                                       kind="server_error")
                yield i, event
            self.metrics.latency.labels(route).observe(time.monotonic() - start)
        finally:
            if watcher is not None:
                watcher.cancel()
            for req in requests:
                if not req.cancelled:
                    self.engine.cancel(req)

    async def _watch(self, http: HttpRequest, requests: list[Request]) -> None:
        """Cancel the requests when the client of a non-streaming call disconnects."""
        while not await http.is_disconnected():
            await asyncio.sleep(1.0)
        for req in requests:
            self.engine.cancel(req)


__all__ = ["Bridge", "Mailbox"]
