"""The serving engine: continuous batching over per-slot KV caches, stepped by its own thread.

Design
------
The engine owns a `SlotCache`: per layer, K and V of shape (max_batch, kv_heads, max_seq_len,
head_dim), allocated once. Each running request holds one slot (a row of that cache) and its own
length. The engine thread loops over one *step*:

1. drop requests that were cancelled (client gone) or passed their deadline; their slots free up;
2. admit waiting requests into free slots (shortest prompt first) and prefill them in runs of
   similar length, one forward per run over its prompts right-padded to the run's longest
   (padding sits after each prompt, so the causal mask already keeps real tokens from seeing it;
   what padding writes into the cache lies beyond the row's length and is overwritten before it
   is ever attended to). `prefill_groups` picks the runs: one forward over 16 prompts of 21-56
   tokens computed 896 positions for 632 real ones; three runs compute 709 and took 25 % less;
3. one decode forward for every running row: row b feeds its last token at its own position
   `length_b` (RoPE by `positions`), writes its K/V there, and attends to keys 0..length_b
   through a (B, 1, L) mask. This is `Transformer.decode` (through `generate.decode_step`, the
   decode step of `lmforge sample` too), on the running rows' slice of the slot cache; compiled
   with `serve --compile`.

New requests therefore join the batch between decode steps, and a finished row leaves at once.
Running rows stay packed in slots 0..n-1: when a row finishes, the last row's cache is copied
into its slot (one row, up to its length), so every forward works on a contiguous slice of the
cache and never gathers it.

Sampling is per request (temperature, top_k, top_p, seed through its own `torch.Generator`, the
same `pick_token` as `lmforge sample`). A request's prompt must fit the context with its
max_tokens (prompt + max_tokens <= max_seq_len): the server never slides the window the way
`lmforge sample` does, so a result never depends on that policy, and within the window greedy
serving gives the tokens of `lmforge.generate.generate`.

Many adapters, one base (lmforge/lora.py `AdapterSet`): a request names an adapter slot
(`Request.adapter`, 0 = the base alone), and every forward runs with each row's own slot selected,
so requests for different adapters prefill and decode in the same batched forward; nothing is
grouped or run one adapter at a time. A request holds its slot until it ends (`on_end` releases it).

Results flow back through `Request.sink`, called on the engine thread with `Prompt` (echoed
prompt log-probs), `Token` (id, stable text delta, log-probs) and finally `Finished` events. Text
is decoded incrementally by each slot's `StreamDecoder` (lmforge/tokenizer.py), which holds back a
byte-level token that ends inside a UTF-8 character; on top of its settled text the engine holds
back a tail that could be the start of a stop string, and cuts the text before a stop string.

Failures stay in their row. Everything a step does for one request (seeding its generator,
sampling, log-probs, decoding text, calling its sink) is guarded per row: an exception fails that
request alone (`Finished("error")`, logged) and the step goes on with the others. A batched
forward that raises is run again one row at a time (prefill: one forward per new prompt; decode:
one per running row), so the row whose forward fails is failed and every other row continues
with logits of its own; rows that fail are packed out like finished ones. Requests are checked
at `submit` (`check`), so this is the second line: a bad request should never get this far.

Trade-offs
----------
- Rows in one forward are padded to a common length: prefill to the longest prompt of its run,
  decode attention to the longest running row. Simple and dense; paged attention would waste less at
  very mixed lengths, but needs kernels we do not have on CPU.
- Batched and single-sequence forwards run the same arithmetic in a different shape, so logits
  may differ in the last float bits (GEMM blocking depends on the batch size). Greedy tokens
  match unless two logits tie within that rounding; tests check token equality on a trained
  model.
- The engine is a plain thread: PyTorch releases the GIL inside its kernels, so the asyncio HTTP
  server stays responsive while a step runs. OpenMP keeps the thread count per thread, so the
  engine thread applies its creator's `torch.get_num_threads()` (without it, it ran with all
  cores and, on a busy 2-core machine, at half the speed).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from .. import kernels
from ..errors import LmforgeError
from ..generate import check_sampling, decode_compiled, decode_step, pick_token
from ..lora import AdapterSet
from ..model import Transformer, check_memory, eager_blocks
from ..quant import pack_measured
from ..threads import Governor
from ..tokenizer import StreamDecoder, Tokenizer

# What one more prefill forward costs beyond the positions it computes, in positions (`prefill_groups`).
PREFILL_FORWARD_COST = 32
MAX_LOGPROBS = 20  # the most alternatives per position a request may ask for (OpenAI allows 5..20)
log = logging.getLogger("lmforge.serve")


class QueueFull(Exception):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


# ---- requests and events -----------------------------------------------------------------


@dataclass
class Prompt:
    """Log-probs of the prompt tokens (echo): logprobs[0] and top[0] are None (nothing precedes)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Token:
    id: int
    text: str  # newly settled text (may be "" while a character or stop string is incomplete)
    logprob: float | None = None  # log-prob of this token under the model (no temperature)
    top: list[tuple[int, float]] | None = None  # the request's `logprobs` best (id, log-prob)


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "timeout" | "error" | "shutdown" (see Engine.cancel)
    text: str = ""  # text settled at the end (held-back bytes, the part before a stop string)
    message: str = ""  # for "error"


Event = Prompt | Token | Finished


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # ends the request, not emitted (the tokenizer's EOS)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    logprobs: int | None = None  # None: none; n: each token's log-prob and the n best
    echo_logprobs: bool = False  # also the prompt tokens' log-probs (a `Prompt` event)
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    sink: Callable[[Event], None] = lambda event: None  # called on the engine thread
    adapter: int = 0  # the AdapterSet slot its rows use (0: the base model alone)
    on_end: Callable[[], None] | None = None  # called once after its Finished event (releases its adapter slot)
    cancelled: str = field(default="", init=False)  # why it was dropped (Engine.cancel's reason), "" while it runs


@dataclass(eq=False)
class _Slot:
    """A running request: its cache row is its index in Engine.active."""

    req: Request
    length: int  # positions filled in the cache
    decoder: StreamDecoder  # the generated tokens' settled text
    last: int = -1  # the token to feed at position `length` in the next decode step
    generated: int = 0  # tokens generated (stop ids not counted)
    held: str = ""  # settled text not emitted yet: it may be the start of a stop string
    generator: torch.Generator | None = None
    done: bool = False


# ---- the per-slot cache ------------------------------------------------------------------


class SlotCache:
    """K/V for max_batch independent sequences: per layer (S, kv_heads, max_len, head_dim)."""

    def __init__(self, model: Transformer, slots: int) -> None:
        cfg, p = model.cfg, model.model.embed_tokens.weight  # fp32 also when the projections are int8
        shape = (slots, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions into slot dst (packing the running rows)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


class SlotView:
    """What a prefill forward sees of the SlotCache: rows lo..hi-1, in the model's cache protocol;
    each row writes its T tokens at positions 0..T-1 (`pos` is 0). Decode steps take the rows'
    cache tensors directly (`generate.decode_step`)."""

    def __init__(self, cache: SlotCache, lo: int, hi: int):
        self.cache, self.lo, self.hi = cache, lo, hi
        self.pos = 0  # read by Transformer.forward for the shared-position path

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, V = self.cache.k[layer][self.lo : self.hi], self.cache.v[layer][self.lo : self.hi]  # views
        T = k.shape[2]
        K[:, :, :T], V[:, :, :T] = k, v
        return K[:, :, :T], V[:, :, :T]

    def advance(self, n: int) -> None:
        pass  # the engine keeps each slot's length


# ---- the engine --------------------------------------------------------------------------


class Engine:
    """Continuous batching over `max_batch` slots with a bounded waiting queue."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 adapters: AdapterSet | None = None, max_threads: int | None = None) -> None:
        """max_threads: the most torch threads the engine's governor may use while cores are free
        (None: the count of the thread that calls start())."""
        if max_batch < 1 or max_queue < 0:
            raise LmforgeError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        # Every decode step multiplies each weight by one row per running request: fp32 weights whose
        # oneDNN-prepacked copy multiplies such rows faster on this machine are held so, as measured
        # here per shape (lmforge/quant.py `pack_measured`; adapters installed before this keep their
        # layers unpacked). {layer name: most rows} of those packed.
        self.packed = pack_measured(model)
        self.adapters = adapters  # installed in the model's layers: forwards select each row's slot
        self.max_batch, self.max_queue, self.max_threads = max_batch, max_queue, max_threads
        self.max_seq_len, self.vocab_size = model.cfg.max_seq_len, model.cfg.vocab_size
        p = model.model.embed_tokens.weight  # fp32 whatever the projections hold (lmforge/quant.py)
        self.device = p.device
        check_memory(model.cfg, p.device, kv_batch=max_batch, kv_bytes=p.element_size(), fix="--max-batch (serve.max_batch)")
        self.cache = SlotCache(model, max_batch)
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[_Slot] = []  # index = cache row
        self.admitting = 0  # taken off `waiting` by step() and not yet in `active` (counted by submit)
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        # counters for /metrics (read from other threads; ints and a deque are safe to read)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    # ---- the public side (any thread) --------------------------------------------------------

    def check(self, req: Request) -> None:
        """Raise LmforgeError (HTTP 400) when a request cannot run; the message names the limit."""
        n = len(req.prompt_ids)
        if n == 0:
            raise LmforgeError("the prompt is empty; pass at least one token")
        if any(not 0 <= t < self.vocab_size for t in req.prompt_ids):
            raise LmforgeError(f"prompt token ids must be within 0..{self.vocab_size - 1}")
        if req.max_tokens < 0:
            raise LmforgeError(f"max_tokens must be >= 0, got {req.max_tokens}")
        if n + req.max_tokens > self.max_seq_len:
            raise LmforgeError(
                f"the prompt ({n} tokens) plus max_tokens ({req.max_tokens}) is {n + req.max_tokens} tokens, "
                f"more than the model's context of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )
        check_sampling(req.temperature, req.top_k, req.top_p, req.seed)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise LmforgeError(f"logprobs must be within 0..{MAX_LOGPROBS}, got {req.logprobs}")
        if req.adapter and (self.adapters is None or not 0 < req.adapter <= self.adapters.capacity):
            raise LmforgeError(f"adapter slot {req.adapter} does not exist on this engine")

    def submit(self, requests: list[Request]) -> None:
        """Queue requests (all or none): LmforgeError if one is invalid, QueueFull if no room."""
        for req in requests:
            self.check(req)
        if len(requests) > self.max_batch + self.max_queue:  # would never fit: retrying cannot help
            raise LmforgeError(f"{len(requests)} requests (n) at once are more than this server's max_batch "
                               f"{self.max_batch} + max_queue {self.max_queue} can hold; lower n")
        with self.wake:
            # `waiting` also holds requests that are about to take free slots (admitted at the next
            # step); max_queue bounds only those beyond the free slots, so that is what is counted.
            free = max(self.max_batch - len(self.active) - self.admitting, 0)
            queued = max(len(self.waiting) - free, 0)  # waiting for a slot to free up
            room = self.max_queue + free - len(self.waiting)
            if len(requests) > room:
                more = "" if len(requests) == 1 else f"; room for {max(room, 0)} more, these are {len(requests)} (n)"
                raise QueueFull(f"{queued} requests are waiting for a slot (max_queue {self.max_queue}){more}")
            self.waiting.extend(requests)
            self.wake.notify()

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """Drop a request (its client left: "cancelled"; the server stops: "shutdown"); it ends with
        Finished(reason) and its slot is freed before the next forward. A no-op once it ended."""
        req.cancelled = req.cancelled or reason
        with self.wake:
            self.wake.notify()

    @property
    def busy(self) -> bool:
        """Whether any request is waiting, being admitted or running."""
        with self.wake:
            return bool(self.waiting or self.admitting or self.active)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active_slots(self) -> int:
        return len(self.active)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.monotonic()
        return sum(n for t, n in list(self.recent) if t >= now - window) / window

    def start(self) -> "Engine":
        """Start the engine thread; a second call while it runs is a no-op (one thread only: two
        would decode the same batch concurrently, and stop() would wait for the one it missed)."""
        if self.thread is not None and self.thread.is_alive():
            return self
        self.running = True
        threads = torch.get_num_threads()  # the caller's setting; OpenMP keeps it per thread
        self.thread = threading.Thread(target=self._run, args=(threads,), name="lmforge-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
        for req in self.waiting:
            _deliver(req, Finished("cancelled"))
        for slot in self.active:
            self._finish(slot, Finished("cancelled"))
        self.waiting.clear()
        self.active.clear()

    # ---- the engine thread -------------------------------------------------------------------

    def _run(self, threads: int) -> None:
        # Made here: OpenMP's thread count is per thread, so the governor must set it on this one.
        governor = Governor(self.max_threads or threads, start=threads)
        with torch.inference_mode():
            self._warm_up()
            while True:
                with self.wake:
                    while self.running and not self.waiting and not self.active:
                        self.wake.wait()
                    if not self.running:
                        return
                try:
                    start = time.perf_counter()
                    tokens = self.step()
                    governor.step(time.perf_counter() - start, work=tokens)
                except Exception as e:  # a bug outside the per-row guards must not hang every client
                    log.exception("engine step failed; failing the %d running requests", len(self.active))
                    for slot in self.active:
                        self._finish(slot, Finished("error", message=f"engine error: {e!r}"))
                    self.active.clear()

    def _warm_up(self) -> None:
        """A compiled decode step (`serve --compile`) builds its kernels here, before the first
        request rather than during it: steps of one row (the step compiled ahead of time,
        lmforge/aot.py, or without it torch.compile's graph specialised to a batch of 1) and of
        two rows (from 2 rows on, one graph serves every count), each at two
        attended lengths (should the first length have been specialised to a constant, the
        second compiles the general graph now rather than at a client's step), and, with LoRA
        adapters, each once more with an adapter selected (slot 0, the zero adapter: another
        graph). They write slots 0-1, which nothing has used yet. A compiler failure falls back to
        eager with one warning (`decode_step`); anything else here is logged, and the engine
        serves eagerly rather than not at all.

        First, with room for several rows, lmforge's decode-attention kernel is built (once per
        machine) or loaded (lmforge/kernels.py), so that no client's step waits for it."""
        if self.max_batch > 1 and self.device.type == "cpu" and self.cache.k[0].dtype == torch.float32:
            kernels.ready()  # the only steps it serves (kernels.applies)
        if not decode_compiled(self.model):
            return
        start = time.perf_counter()
        log.info("compiling the decode step (serve --compile)")
        selection = self.adapters.selection if self.adapters is not None else None
        try:
            for rows in range(1, min(2, self.max_batch) + 1):
                for first in (1, 2):
                    if first + rows > self.max_seq_len:  # positions first .. first+rows-1 must fit the context
                        continue
                    tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
                    positions = torch.arange(first, first + rows, device=self.device).view(rows, 1)
                    for adapters in (False, True) if selection is not None else (False,):
                        if adapters:
                            selection.rows = torch.zeros(rows, dtype=torch.long, device=self.device)
                        try:
                            decode_step(self.model, tokens, positions, [k[:rows] for k in self.cache.k],
                                        [v[:rows] for v in self.cache.v])
                        finally:
                            if adapters:
                                selection.rows = None
        except Exception:
            log.exception("warming up the compiled decode step failed; serving without --compile")
            eager_blocks(self.model, "decode")
            return
        log.info("decode step compiled in %.1f s", time.perf_counter() - start)

    def step(self) -> int:
        """Drop, admit + prefill, decode: one turn of the scheduling loop. Returns the tokens it ran
        through the model (prompt tokens prefilled + rows decoded)."""
        now = time.monotonic()
        new: list[Request] = []
        with self.wake:
            keep: collections.deque[Request] = collections.deque()
            for req in self.waiting:
                reason = _dropped(req, now)
                if reason:
                    _deliver(req, Finished(reason))
                else:
                    keep.append(req)
            self.waiting = keep
            while self.waiting and len(self.active) + len(new) < self.max_batch:
                new.append(self.waiting.popleft())
            self.admitting = len(new)
        for slot in self.active:
            reason = _dropped(slot.req, now)
            if reason:
                self._finish(slot, Finished(reason))
        self._pack()
        tokens = 0
        if new:
            try:
                self._prefill(new)
            finally:
                self.admitting = 0  # also when the prefill failed before they joined `active`
            tokens += sum(len(r.prompt_ids) for r in new)
            self._pack()
        if self.active:
            tokens += len(self.active)
            self._decode()
            self._pack()
        return tokens

    def _prefill(self, requests: list[Request]) -> None:
        lo = len(self.active)
        # Shortest first, so prompts of similar length sit in neighbouring slots and share a forward.
        slots = [_Slot(req, length=len(req.prompt_ids), decoder=StreamDecoder(self.tokenizer))
                 for req in sorted(requests, key=lambda r: len(r.prompt_ids))]
        with self.wake:  # one change for submit(), which counts free slots
            self.active.extend(slots)  # first: whatever fails below, these requests get their Finished
            self.admitting = 0
        rows: list[torch.Tensor | None] = []
        for a, b in prefill_groups([s.length for s in slots]):
            try:
                rows += self._prefill_forward(lo + a, lo + b)
            except Exception as e:
                rows += self._alone(lo + a, lo + b, self._prefill_forward, e)
        self.prompt_tokens += sum(s.length for s in slots)
        for slot, row in zip(slots, rows):
            if row is not None:
                self._guarded(slot, self._start, row)

    def _prefill_forward(self, a: int, b: int) -> list[torch.Tensor]:
        """One forward over the prompts of rows a..b-1, right-padded to the longest. Per row, the
        logits it reads: (n, V) over its n prompt positions when it echoes log-probs, else (1, V) at
        its last one (the vocabulary projection is a fifth of a 135M model's prefill work, and
        every other position's would be thrown away)."""
        rows = self.active[a:b]
        idx = torch.zeros((len(rows), max(s.length for s in rows)), dtype=torch.long)  # padded with token 0
        for i, s in enumerate(rows):
            idx[i, : s.length] = torch.tensor(s.req.prompt_ids)
        with self._selected(rows):
            hidden = self.model(idx.to(self.device), cache=SlotView(self.cache, a, b), hidden=True)  # (B, T, C)
            last = torch.tensor([s.length - 1 for s in rows], device=self.device)
            logits = self.model.lm_head(hidden[torch.arange(len(rows), device=self.device), last])  # (B, V)
            return [self.model.lm_head(hidden[i, : s.length]) if s.req.echo_logprobs else logits[i : i + 1]
                    for i, s in enumerate(rows)]

    def _selected(self, rows: list[_Slot]) -> contextlib.AbstractContextManager:
        """Each row's adapter for the forward over `rows` (the base alone without adapters)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.selected([s.req.adapter for s in rows])

    def _start(self, slot: _Slot, logits: torch.Tensor) -> None:
        """A prefilled request's first steps, from its prompt's logits (n, V), or (1, V) at its last
        position when it echoes no log-probs (`_prefill_forward`)."""
        req = slot.req
        if req.temperature > 0:
            slot.generator = torch.Generator(device=self.device)
            if req.seed is None:
                slot.generator.seed()
            else:
                slot.generator.manual_seed(req.seed)
        if req.echo_logprobs:
            req.sink(self._prompt_logprobs(req, logits[:-1]))
        if req.max_tokens == 0:
            self._finish(slot, Finished("length"))
        else:
            row = logits[-1]  # (V,) predicts the first new token
            self._accept(slot, row, int(torch.argmax(row)) if req.temperature == 0 else None)

    def _decode(self) -> None:
        n = len(self.active)
        try:
            logits = self._decode_forward(0, n)  # (B, V)
            rows: list[torch.Tensor | None] = list(logits)
            greedy = logits.argmax(dim=-1).tolist()  # one op for every greedy row
        except Exception as e:
            rows = self._alone(0, n, self._decode_forward, e)
            greedy = [-1 if row is None else int(torch.argmax(row)) for row in rows]
        for slot, row, best in zip(list(self.active), rows, greedy):
            if row is not None:
                slot.length += 1
                self._guarded(slot, self._accept, row, best if slot.req.temperature == 0 else None)
        now = time.monotonic()
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - 60:
            self.recent.popleft()

    def _decode_forward(self, a: int, b: int) -> torch.Tensor:
        """One decode forward for rows a..b-1, each at its own position: (b-a, V)."""
        rows = self.active[a:b]
        tokens = torch.tensor([[s.last] for s in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[s.length] for s in rows], device=self.device)  # (B, 1)
        with self._selected(rows):  # rows a..b-1 of the slot cache: contiguous views
            return decode_step(self.model, tokens, positions, [k[a:b] for k in self.cache.k], [v[a:b] for v in self.cache.v])

    def _alone(self, lo: int, hi: int, forward: Callable[[int, int], torch.Tensor | list[torch.Tensor]],
               error: Exception) -> list[torch.Tensor | None]:
        """After `forward(lo, hi)` over several rows raised `error`: each of those rows' own forward
        (`forward(i, i + 1)[0]`; it rewrites the row's cache positions the batched one may have half
        written). A row whose own forward fails too is failed: None in its place."""
        slots = self.active[lo:hi]
        if len(slots) == 1:
            self._fail(slots[0], error)
            return [None]
        log.warning("a forward over %d rows failed (%r); running them one at a time", len(slots), error)
        rows: list[torch.Tensor | None] = []
        for i, slot in enumerate(slots, start=lo):
            try:
                rows.append(forward(i, i + 1)[0])
            except Exception as e:
                self._fail(slot, e)
                rows.append(None)
        return rows

    def _guarded(self, slot: _Slot, work: Callable[..., None], *args: object) -> None:
        """work(slot, *args); an exception fails this request only."""
        try:
            work(slot, *args)
        except Exception as e:
            self._fail(slot, e)

    def _fail(self, slot: _Slot, error: Exception) -> None:
        log.error("a request failed in the engine (the others go on): %r", error, exc_info=error)
        self._finish(slot, Finished("error", message=f"engine error: {error!r}"))

    def _accept(self, slot: _Slot, logits: torch.Tensor, token: int | None) -> None:
        """Pick the next token from logits (V,), emit it, and decide whether the slot is done."""
        req = slot.req
        if token is None:
            token = pick_token(logits, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                               generator=slot.generator)
        if token in req.stop_ids:
            self._finish(slot, Finished("stop", self._settle(slot, slot.decoder.flush(), final=True)[0]))
            return
        self.generated_tokens += 1
        slot.generated += 1
        slot.last = token
        logprob, top = None, None
        if req.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)  # (V,)
            logprob, top = float(lp[token]), _top(lp, req.logprobs)
        final = slot.generated == req.max_tokens
        text, stopped = self._settle(slot, slot.decoder.push(token) + (slot.decoder.flush() if final else ""), final=final)
        req.sink(Token(token, text, logprob, top))
        if stopped:
            self._finish(slot, Finished("stop"))
        elif final:
            self._finish(slot, Finished("length"))

    def _settle(self, slot: _Slot, settled: str, *, final: bool) -> tuple[str, bool]:
        """(new text safe to show, whether a stop string was reached), given the decoder's newly
        settled text. Unless final, a tail that may grow into a stop string is held back; so a stop
        string always begins in the held text, never in text already shown."""
        text = slot.held + settled
        stops = [i for i in (text.find(s) for s in slot.req.stop) if i >= 0]
        if stops:
            slot.held = ""
            return text[: min(stops)], True
        end = len(text)
        if not final:
            for s in slot.req.stop:  # hold back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        slot.held = text[end:]
        return text[:end], False

    def _prompt_logprobs(self, req: Request, logits: torch.Tensor) -> Prompt:
        """logits (n-1, V) at prompt positions 0..n-2 score prompt tokens 1..n-1."""
        lp = torch.log_softmax(logits.float(), dim=-1)  # (n-1, V)
        targets = torch.tensor(req.prompt_ids[1:], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        n = req.logprobs or 0
        top = [_top(row, n) for row in lp] if n else [[] for _ in chosen]
        return Prompt([None, *chosen], [None, *top])

    def _finish(self, slot: _Slot, event: Finished) -> None:
        if not slot.done:
            slot.done = True
            _deliver(slot.req, event)

    def _pack(self) -> None:
        """Remove finished rows, moving the last running row into each freed slot."""
        for i in range(len(self.active) - 1, -1, -1):
            if self.active[i].done:
                last = self.active.pop()  # the row in slot len(self.active), never done (rows above i went first)
                if i < len(self.active):  # the freed slot is not the last one: fill it with the last row
                    self.cache.move(len(self.active), i, last.length)
                    self.active[i] = last


def prefill_groups(lengths: list[int], cost: int | None = None) -> list[tuple[int, int]]:
    """Prompts of ascending `lengths` split into runs [a, b) that are prefilled one forward each.

    A forward over a run pads every prompt to the run's longest, so it computes
    (b - a) * lengths[b - 1] positions. The split minimises that sum plus `cost` positions per
    forward (what a forward costs beyond its positions: per-op overhead, products of fewer rows;
    PREFILL_FORWARD_COST), by dynamic programming over the cut points (O(n^2), n <= max_batch).
    """
    cost = PREFILL_FORWARD_COST if cost is None else cost
    n = len(lengths)
    best = [0] + [0] * n  # best[j]: the cheapest split of the first j prompts
    cut = [0] * (n + 1)  # where the last run of that split starts
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + (j - i) * lengths[j - 1] + cost, i) for i in range(j))
    runs = []
    while n:
        runs.append((cut[n], n))
        n = cut[n]
    return runs[::-1]


def _top(lp: torch.Tensor, n: int) -> list[tuple[int, float]]:
    values, ids = torch.topk(lp, n)
    return list(zip(ids.tolist(), values.tolist()))


def _deliver(req: Request, event: Finished) -> None:
    """A request's last event. First `on_end`: the request computes in no forward any more, so its
    adapter slot is free before its client hears the end (and sends its next request, which may need
    that slot). A hook or sink that fails is logged, not raised: it must not stop the engine's other
    requests, and nothing more can reach this one's client."""
    end, req.on_end = req.on_end, None
    if end is not None:
        try:
            end()
        except Exception as e:
            log.error("a request's end hook failed (%s): %r", event.reason, e)
    try:
        req.sink(event)
    except Exception as e:
        log.error("a request's sink failed on its end (%s): %r", event.reason, e)


def _dropped(req: Request, now: float) -> str:
    if req.cancelled:
        return req.cancelled
    if req.deadline is not None and now > req.deadline:
        return "timeout"
    return ""


# ---- synchronous use (benchmarks, tests, scripts) ----------------------------------------


@dataclass
class Result:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt: Prompt | None = None
    logprobs: list[float | None] = field(default_factory=list)


def run_requests(engine: Engine, requests: list[Request], timeout: float = 600.0) -> list[Result]:
    """Submit requests to a started engine and wait for all of them."""
    results = [Result([], "", "") for _ in requests]
    done = threading.Semaphore(0)

    def sink_for(r: Result) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            if isinstance(event, Prompt):
                r.prompt = event
            elif isinstance(event, Token):
                r.tokens.append(event.id)
                r.text += event.text
                r.logprobs.append(event.logprob)
            else:
                r.text += event.text
                r.finish_reason = event.reason
                done.release()

        return sink

    for req, r in zip(requests, results):
        req.sink = sink_for(r)
    engine.submit(requests)
    for _ in requests:
        if not done.acquire(timeout=timeout):
            raise LmforgeError(f"requests did not finish within {timeout} s")
    return results


__all__ = ["Engine", "Request", "Prompt", "Token", "Finished", "QueueFull", "SlotCache", "SlotView",
           "Result", "run_requests", "MAX_LOGPROBS"]
