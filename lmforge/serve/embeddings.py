"""POST /v1/embeddings: a bounded worker beside the generation engine, and the response shapes.

Design
------
An embedding call is one batched forward pass without a KV cache (understand/embed.py's
`Embedder`), so it does not go through the continuous-batching engine: `EmbedWorker` runs calls
one at a time on its own thread (PyTorch releases the GIL in its kernels, so the event loop and
the engine thread keep running) and admits at most `max_queue` calls waiting or running; one
more is a 429 with Retry-After, as the engine's queue gives. A call that outlives the request
timeout is a 504; its forward, already running, finishes and frees its place.

The route (routes.py) checks everything before a call is queued, so a bad input is a 400 and never
a 500: no inputs, more than `max_inputs`, an empty string or an empty token list, a token id
outside the vocabulary, an input longer than the model's context (the server refuses rather than
cut it, as OpenAI does; `lmforge embed` cuts and says so), `dimensions` above the model's.

- `input`: a string, a list of strings, a list of token ids, or a list of such lists. Strings get
  the model's document prefix, or its query prefix with the extension field `input_type: "query"`
  (OpenAI's API has no such notion); token ids are used as given.
- `dimensions`: the first `dimensions` components, renormalised to length 1 when the model
  normalises (OpenAI's shortened embeddings), else only cut.
- `encoding_format`: "float" (JSON numbers) or "base64" (the little-endian float32 bytes of each
  vector, base64-encoded: what the official `openai` client asks for by default and decodes).
- `usage`: the tokens embedded (prompt_tokens = total_tokens).

Trade-off: one call at a time keeps a CPU's cores for one forward instead of splitting them over
several; a burst of small calls therefore queues (a bounded queue, 429 beyond it).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from ..understand.embed import Embedder
from .protocol import ApiError

T = TypeVar("T")


class EmbedWorker:
    """Runs embedding calls one at a time on its own thread; at most `max_queue` admitted."""

    def __init__(self, embedder: Embedder, max_queue: int, timeout: float) -> None:
        self.embedder, self.max_queue, self.timeout = embedder, max_queue, timeout
        threads = torch.get_num_threads()  # OpenMP keeps thread counts per thread: use the creator's (engine.py)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmforge-embed",
                                                          initializer=torch.set_num_threads, initargs=(threads,))
        self.lock = threading.Lock()
        self.admitted = 0  # calls waiting or running

    async def embed(self, ids: list[list[int]]) -> np.ndarray:
        return await self.run(self.embedder.embed_ids, ids)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the worker's thread under its admission limit and timeout: an embedding, a
        search of the server's index (POST /v1/search embeds its query the same way), or a
        classification (POST /v1/classify: embedding plus a small head). One queue, one thread."""
        with self.lock:
            if self.admitted >= self.max_queue:
                raise ApiError(429, f"server busy: {self.admitted} embedding, search or classify calls are waiting or running (the limit, "
                                    "--max-queue); retry later", kind="rate_limit_error", headers={"Retry-After": "1"})
            self.admitted += 1
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"request took longer than this server's limit of {self.timeout:g} s (--request-timeout)",
                           kind="timeout_error") from None

    def _release(self, _future: concurrent.futures.Future) -> None:
        with self.lock:
            self.admitted -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def shorten(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """The first `dimensions` components of each row, renormalised when the model normalises."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    if not normalize:
        return cut
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.maximum(norms, 1e-12)).astype(np.float32)


def encode_vector(v: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as JSON numbers, or as base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
    return v.astype(np.float32).tolist()


__all__ = ["EmbedWorker", "shorten", "encode_vector"]
