"""The API's routes: one method each, over one engine, tokenizer and chat template.

Design
------
A route only translates: it reads its body (`protocol.read_body`), turns it into engine
`Request`s (one per prompt and choice), submits them through the `Bridge`, and shapes the events
as OpenAI JSON or as server-sent events (`protocol`). `create_app` (api.py) registers the methods.

- POST /v1/completions: the prompt as a text, texts, token ids or lists of token ids; `echo`;
  legacy log-probs with a null first echoed log-prob; max_tokens 0 with echo scores the prompt
  (what lm-evaluation-harness `local-completions` sends). Choice i of prompt p is request
  p * n + i.
- POST /v1/chat/completions: the conversation through the chat template; chat log-probs.
- POST /v1/embeddings: strings or token ids -> the model's vectors (serve/embeddings.py: a bounded
  worker beside the engine; float or base64; `dimensions`; 400 for what cannot be embedded).
- POST /v1/search (with --index): the index's best chunks for a query, with their spans; the
  search runs on the embedding worker (serve/embeddings.py), so it gets the same 429 / 503 as
  a generation when the server is full or closing.
- POST /v1/classify: texts -> label, scores, confidence and routed flag from the classifier the
  server was started with (`lmforge serve clf/NAME`; understand/classify.py), run on the embedding
  worker's thread and queue (its backpressure: 429 beyond --max-queue), 404 on a plain model.
- GET /v1/models, POST /tokenize (a text or a conversation), POST /detokenize, GET
  /tokenizer_info, GET /health, GET /metrics (Prometheus).
- A stream is its chunks, then `data: [DONE]`; an error after the 200 went out (a timeout, an
  engine error) is sent as an error event before [DONE] and counted like the 504/500 it stands for.
- A non-streaming call whose client left answers 499 (nobody reads it).

Adapters (serve --adapter, serve/adapters.py): the `model` field picks one by name (the base's name
or no name: the base alone); a name the server does not have is a 404 listing the names it has,
and /v1/models lists the base and every adapter (`parent`: the base). A call's requests hold their
adapter's slot from before they are queued until each ends; when every slot is held, 429.

Trade-offs: one base model per server; without adapters the `model` field is not checked, so any
client's default name works; `n > 1` runs n independent requests (seeds seed, seed + 1, ..., wrapped within 64 bits);
presence/frequency penalties and logit_bias are refused rather than ignored.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request as HttpRequest

from ..errors import LmforgeError
from ..generate import nth_seed
from ..lora import AdapterSet, AdaptersBusy
from ..tokenizer import Tokenizer
from .bridge import Bridge
from .chat import ChatTemplate, special_token
from .embeddings import EmbedWorker, encode_vector, shorten
from .engine import Finished, Prompt, Request, Token
from .metrics import Metrics
from .protocol import (DEFAULT_COMPLETION_TOKENS, SSE_DONE, ApiError, ChatBody, ClassifyBody, CompletionBody,
                       DetokenizeBody, EmbeddingBody, GenerationBody, Scored, SearchBody, TokenizeBody, chat_logprobs,
                       error_body, legacy_logprobs,
                       prompt_scores, read_body, reply, sse, stop_strings, usage)

if TYPE_CHECKING:
    from ..understand.classify import Classifier
    from ..understand.index.search import Searcher


@dataclass
class Call:
    """One API call in flight: choice i is requests[i]; their events arrive on `queue`."""

    id: str
    requests: list[Request]
    queue: asyncio.Queue  # of (choice index, event)
    prompt_tokens: int
    model: str  # the name replies carry: the base's or the adapter's


@dataclass
class Choice:
    """A non-streaming choice, collected from its events."""

    text: str = ""
    scored: list[Scored] = field(default_factory=list)  # (prompt tokens when echoed, then) generated tokens
    reason: str = ""


class Routes:
    """The endpoints of one app; `max_tokens` is the server's limit per request (--max-tokens)."""

    def __init__(self, bridge: Bridge, tokenizer: Tokenizer, chat: ChatTemplate, metrics: Metrics, *,
                 model_name: str, context: int, max_tokens: int, max_body_bytes: int,
                 embed_worker: EmbedWorker | None = None, max_embed_inputs: int = 256,
                 searcher: Searcher | None = None, classifier: Classifier | None = None,
                 adapters: AdapterSet | None = None) -> None:
        self.bridge, self.tokenizer, self.chat, self.metrics = bridge, tokenizer, chat, metrics
        self.adapters = adapters
        self.searcher = searcher
        self.model_name, self.context, self.max_tokens, self.max_body_bytes = model_name, context, max_tokens, max_body_bytes
        self.embed_worker, self.max_embed_inputs = embed_worker, max_embed_inputs
        self.classifier = classifier
        self.created = int(time.time())
        self.end_ids = tokenizer.end_ids  # EOS, and an instruct model's recorded end of turn (<|im_end|>)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i]))

    # ---- /v1/completions -----------------------------------------------------------------------

    async def completions(self, http: HttpRequest) -> Response:
        body = await read_body(http, CompletionBody, self.max_body_bytes)
        n_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        self._check_common(body, n_tokens)
        if body.suffix:
            raise ApiError(400, "suffix: not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of: only best_of = n (or leaving it out) is supported", param="best_of")
        prompts = self._encode_prompts(body.prompt)
        stop = stop_strings(body.stop)
        requests = [r for _text, ids in prompts for r in self._requests(ids, body, n_tokens, stop, body.logprobs, body.echo)]
        call = await self._submit("cmpl", requests, body.stream, sum(len(ids) for _text, ids in prompts), body.model)
        prompt_of = [prompts[i // body.n] for i in range(len(requests))]  # choice index -> (text, ids)
        if body.stream:
            return self._stream(self._completion_chunks(call, body, prompt_of))
        choices, generated = await self._collect(call, http, "completions", [ids for _text, ids in prompt_of])
        if any(c.reason == "cancelled" for c in choices):  # the client left; nobody reads this
            return Response(status_code=499)
        out = [{"index": i, "text": (prompt_of[i][0] if body.echo else "") + c.text, "finish_reason": c.reason,
                "logprobs": legacy_logprobs(c.scored, 0, self.token_text) if body.logprobs is not None else None}
               for i, c in enumerate(choices)]
        return JSONResponse(reply(call.id, "text_completion", call.model, out, usage(call.prompt_tokens, generated)))

    async def _completion_chunks(self, call: Call, body: CompletionBody,
                                 prompt_of: list[tuple[str, list[int]]]) -> AsyncIterator[str]:
        def chunk(i: int, text: str, logprobs: dict | None, reason: str | None) -> str:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
            return sse(reply(call.id, "text_completion", call.model, [choice]))

        offsets, generated = [0] * len(call.requests), 0  # length of each choice's text so far (text_offset)
        if body.echo and body.logprobs is None:  # with log-probs, the echo comes with its Prompt event
            for i in range(len(call.requests)):
                yield chunk(i, prompt_of[i][0], None, None)
        async for i, event in self.bridge.events(call.queue, call.requests, None, "completions"):
            if isinstance(event, Prompt):
                text, ids = prompt_of[i]
                offsets[i] = len(text)
                yield chunk(i, text, legacy_logprobs(prompt_scores(ids, event), 0, self.token_text), None)
            elif isinstance(event, Token):
                generated += 1
                lp = None
                if body.logprobs is not None:
                    lp = legacy_logprobs([(event.id, event.logprob, event.top)], offsets[i], self.token_text)
                    offsets[i] += len(self.token_text(event.id))
                if event.text or lp is not None:
                    yield chunk(i, event.text, lp, None)
            else:
                yield chunk(i, event.text, None, event.reason)
        if body.include_usage:
            yield sse(reply(call.id, "text_completion", call.model, [], usage(call.prompt_tokens, generated)))

    def _encode_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str, list[int]]]:
        """Each prompt as (text, token ids), whichever of the two it came as."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if len(prompt) == 0:
            raise ApiError(400, "prompt: empty; send a string, a list of strings or token ids", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]  # one prompt given as token ids
        out, vocab = [], self.tokenizer.vocab_size
        for p in prompt:
            if isinstance(p, str):
                out.append((p, self.tokenizer.encode(p) or self._bos()))
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise ApiError(400, f"prompt: token ids must be within 0..{vocab - 1}", param="prompt")
                out.append((self.tokenizer.decode(p), list(p)))
        return out

    # ---- /v1/chat/completions ------------------------------------------------------------------

    async def chat_completions(self, http: HttpRequest) -> Response:
        body = await read_body(http, ChatBody, self.max_body_bytes)
        ids = self.chat.encode(body.messages)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        self._check_common(body, asked)
        n_tokens = asked if asked is not None else min(self.max_tokens, self.context - len(ids))
        if n_tokens < 0 or len(ids) >= self.context:
            raise ApiError(400, f"the conversation is {len(ids)} tokens, the model's context is {self.context}; "
                                "shorten the messages", param="messages")
        stop = stop_strings(body.stop) + self.chat.stop
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        call = await self._submit("chatcmpl", self._requests(ids, body, n_tokens, stop, logprobs, False), body.stream, len(ids),
                                  body.model)
        if body.stream:
            return self._stream(self._chat_chunks(call, body))
        choices, generated = await self._collect(call, http, "chat")
        if any(c.reason == "cancelled" for c in choices):
            return Response(status_code=499)
        out = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.reason,
                "logprobs": chat_logprobs(c.scored, self.token_text) if body.logprobs else None}
               for i, c in enumerate(choices)]
        return JSONResponse(reply(call.id, "chat.completion", call.model, out, usage(call.prompt_tokens, generated)))

    async def _chat_chunks(self, call: Call, body: ChatBody) -> AsyncIterator[str]:
        def chunk(i: int, delta: dict, reason: str | None, lp: dict | None = None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
            return sse(reply(call.id, "chat.completion.chunk", call.model, [choice]))

        generated = 0
        for i in range(len(call.requests)):
            yield chunk(i, {"role": "assistant", "content": ""}, None)
        async for i, event in self.bridge.events(call.queue, call.requests, None, "chat"):
            if isinstance(event, Token):
                generated += 1
                lp = chat_logprobs([(event.id, event.logprob, event.top)], self.token_text) if body.logprobs else None
                if event.text or lp is not None:
                    yield chunk(i, {"content": event.text}, None, lp)
            elif isinstance(event, Finished):
                if event.text:
                    yield chunk(i, {"content": event.text}, None)
                yield chunk(i, {}, event.reason)
        if body.include_usage:
            yield sse(reply(call.id, "chat.completion.chunk", call.model, [], usage(call.prompt_tokens, generated)))

    # ---- /v1/embeddings --------------------------------------------------------------------------

    async def embeddings(self, http: HttpRequest) -> Response:
        body = await read_body(http, EmbeddingBody, self.max_body_bytes)
        worker = self.embed_worker
        if worker is None:
            raise ApiError(404, "this server does not embed (started without an embedder)")
        if self.bridge.closing:
            raise ApiError(503, "the server is shutting down; send the request to another server or retry after "
                                "it restarts", kind="server_error")
        if self.adapters is not None and body.model in self.adapters.entries:
            raise ApiError(400, f"model: {body.model!r} is a LoRA adapter; embeddings come from the base model "
                                f"{self.model_name!r}", param="model")
        emb = worker.embedder
        if body.dimensions is not None and body.dimensions > emb.dim:
            raise ApiError(400, f"dimensions: {body.dimensions} is above this model's {emb.dim}", param="dimensions")
        ids = self._embedding_inputs(body, emb)
        start = time.monotonic()
        self.metrics.requests.labels("embeddings").inc()
        vectors = shorten(await worker.embed(ids), body.dimensions, emb.pooling.normalize)
        self.metrics.latency.labels("embeddings").observe(time.monotonic() - start)
        n = sum(len(r) for r in ids)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": self.model_name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _embedding_inputs(self, body: EmbeddingBody, emb: Any) -> list[list[int]]:
        """Each input as token ids (strings with the model's prefix for body.input_type); 400 for
        an input that cannot be embedded (see serve/embeddings.py)."""
        raw = body.input
        items: list[str | list[int]] = [raw] if isinstance(raw, str) else list(raw)
        if items and isinstance(items[0], int):
            items = [list(raw)]  # type: ignore[arg-type]  # one input given as token ids
        if not items:
            raise ApiError(400, "input: empty; send a string, a list of strings or token ids", param="input")
        if len(items) > self.max_embed_inputs:
            raise ApiError(400, f"input: {len(items)} inputs is above this server's limit of {self.max_embed_inputs} "
                                "per request (--max-embed-inputs); split the request", param="input")
        prefix, vocab, out = emb.pooling.prefix(body.input_type), self.tokenizer.vocab_size, []
        for i, item in enumerate(items):
            where = "input" if len(items) == 1 and not isinstance(raw, list) else f"input.{i}"
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, f"{where}: empty string; there is nothing to embed", param=where)
                ids = self.tokenizer.encode(prefix + item)
            else:
                if not item:
                    raise ApiError(400, f"{where}: empty list of token ids; there is nothing to embed", param=where)
                if any(not 0 <= t < vocab for t in item):
                    raise ApiError(400, f"{where}: token ids must be within 0..{vocab - 1}", param=where)
                ids = list(item)
            if len(ids) > emb.max_len:
                raise ApiError(400, f"{where}: {len(ids)} tokens is more than this model's {emb.max_len}; "
                                    "shorten or split it", param=where)
            out.append(ids)
        return out

    # ---- /v1/classify ----------------------------------------------------------------------------

    async def classify(self, http: HttpRequest) -> Response:
        body = await read_body(http, ClassifyBody, self.max_body_bytes)
        clf, worker = self.classifier, self.embed_worker
        if clf is None or worker is None:
            raise ApiError(404, "this server has no classifier; start it on a classifier directory: lmforge serve clf/NAME")
        if self.bridge.closing:
            raise ApiError(503, "the server is shutting down; send the request to another server or retry after "
                                "it restarts", kind="server_error")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ApiError(400, "input: empty; send a string or a list of strings", param="input")
        if len(texts) > self.max_embed_inputs:
            raise ApiError(400, f"input: {len(texts)} inputs is above this server's limit of {self.max_embed_inputs} "
                                "per request (--max-embed-inputs); split the request", param="input")
        for i, t in enumerate(texts):
            if not t.strip():
                where = "input" if isinstance(body.input, str) else f"input.{i}"
                raise ApiError(400, f"{where}: empty text; there is nothing to classify", param=where)
        start = time.monotonic()
        self.metrics.requests.labels("classify").inc()
        records = await worker.run(functools.partial(clf.predict, texts, min_confidence=body.min_confidence))
        self.metrics.latency.labels("classify").observe(time.monotonic() - start)
        n = sum(len(ids) for ids in self.tokenizer.encode_batch(texts))
        return JSONResponse({"object": "list", "model": self.model_name,
                             "data": [{"object": "classification", "index": i, **r} for i, r in enumerate(records)],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    # ---- /v1/search ----------------------------------------------------------------------------

    async def search(self, http: HttpRequest) -> dict[str, Any]:
        body = await read_body(http, SearchBody, self.max_body_bytes)
        assert self.searcher is not None and self.embed_worker is not None  # the route exists only with an index
        if self.bridge.closing:
            raise ApiError(503, "the server is shutting down; send the request to another server or retry after "
                                "it restarts", kind="server_error")
        start = time.monotonic()
        # on the embedding worker: searches and embeddings share its one thread beside the engine, its bounded
        # queue (429 beyond it) and its timeout (504)
        hits = await self.embed_worker.run(self.searcher.search, body.query, body.k, body.mode)
        self.metrics.requests.labels("search").inc()
        self.metrics.latency.labels("search").observe(time.monotonic() - start)
        return {"object": "list", "index": self.searcher.index.path.name, "query": body.query,
                "mode": body.mode or self.searcher.settings.mode,
                "data": [{"rank": i, "where": h.where(), **h.to_dict()} for i, h in enumerate(hits, 1)]}

    # ---- small routes --------------------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def models(self) -> dict[str, Any]:
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "max_model_len": self.context}
        adapters = [{"id": name, "object": "model", "created": self.created, "owned_by": "lmforge", "root": e.path,
                     "parent": self.model_name, "max_model_len": self.context, "lora_rank": e.cfg.rank}
                    for name, e in (self.adapters.entries.items() if self.adapters is not None else ())]
        return {"object": "list", "data": [base, *adapters]}

    async def tokenize(self, http: HttpRequest) -> dict[str, Any]:
        body = await read_body(http, TokenizeBody, self.max_body_bytes)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt (a text) or messages (a conversation)", param="prompt")
        ids = self.tokenizer.encode(body.prompt) if body.messages is None else self.chat.encode(body.messages)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    async def detokenize(self, http: HttpRequest) -> dict[str, Any]:
        body = await read_body(http, DetokenizeBody, self.max_body_bytes)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in body.tokens):
            raise ApiError(400, f"tokens: token ids must be within 0..{self.tokenizer.vocab_size - 1}", param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"tokenizer_class": "byte-level BPE (Hugging Face tokenizers)", "vocab_size": tok.vocab_size,
                "bos_token": special_token(tok, tok.bos_id), "eos_token": special_token(tok, tok.eos_id),
                "pad_token": special_token(tok, tok.pad_id), "bos_token_id": tok.bos_id,
                "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "model_max_length": self.context,
                "chat_template": self.chat.source, "sha256": tok.sha256}

    async def metrics_page(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # ---- shared steps --------------------------------------------------------------------------

    def _check_common(self, body: GenerationBody, n_tokens: int | None) -> None:
        for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
            if getattr(body, name):
                raise ApiError(400, f"{name}: not supported by this server (presence_penalty, frequency_penalty "
                                    "and logit_bias must be 0, empty or left out)", param=name)
        if n_tokens is not None and n_tokens > self.max_tokens:
            raise ApiError(400, f"max_tokens {n_tokens} is above this server's limit of {self.max_tokens} (--max-tokens)",
                           param="max_tokens")

    def _requests(self, ids: list[int], body: GenerationBody, n_tokens: int, stop: tuple[str, ...],
                  logprobs: int | None, echo: bool) -> list[Request]:
        """The engine requests for one prompt: n choices, seeds seed, seed + 1, ... (nth_seed)."""
        return [Request(ids, n_tokens, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                        seed=None if body.seed is None else nth_seed(body.seed, j),
                        stop_ids=() if body.ignore_eos else self.end_ids,
                        stop=stop, logprobs=logprobs, echo_logprobs=echo and logprobs is not None)
                for j in range(body.n)]

    async def _submit(self, prefix: str, requests: list[Request], stream: bool, prompt_tokens: int,
                      model: str | None) -> Call:
        """Queue a call's requests on the adapter `model` names (the base: none or its name)."""
        name, slot = await self._adapter(model, len(requests))
        if slot:
            for req in requests:
                req.adapter, req.on_end = slot, lambda: self.adapters.release(slot)  # type: ignore[union-attr]
        try:
            queue = self.bridge.submit(requests, stream=stream)
        except BaseException:
            for req in requests:  # never queued: nothing will end them
                req.on_end = None
            if slot:
                for _ in requests:
                    self.adapters.release(slot)  # type: ignore[union-attr]
            raise
        return Call(f"{prefix}-{uuid.uuid4().hex}", requests, queue, prompt_tokens, name)

    async def _adapter(self, model: str | None, count: int) -> tuple[str, int]:
        """(the name replies carry, the adapter slot) for a request's `model`, the slot pinned
        `count` times; without adapters any name means the one model."""
        if self.adapters is None or model is None or model == self.model_name:
            return self.model_name, 0
        if model not in self.adapters.entries:
            names = ", ".join([self.model_name, *self.adapters.entries])
            raise ApiError(404, f"model {model!r} not found; this server has: {names}", param="model")
        adapters = self.adapters
        acquiring = asyncio.ensure_future(asyncio.to_thread(adapters.acquire, model, count))  # may read its weights
        try:
            return model, await asyncio.shield(acquiring)
        except asyncio.CancelledError:  # the client left while the adapter loaded: its pins must not leak
            def undo(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    for _ in range(count):
                        adapters.release(done.result())

            acquiring.add_done_callback(undo)
            raise
        except AdaptersBusy as e:
            raise ApiError(429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except LmforgeError as e:  # its file changed or broke since startup
            raise ApiError(500, f"adapter {model!r} could not be loaded: {e}", kind="server_error") from None

    async def _collect(self, call: Call, http: HttpRequest, route: str,
                       prompt_ids: list[list[int]] | None = None) -> tuple[list[Choice], int]:
        """A non-streaming call's choices and its number of generated tokens."""
        choices, generated = [Choice() for _ in call.requests], 0
        async for i, event in self.bridge.events(call.queue, call.requests, http, route):
            c = choices[i]
            if isinstance(event, Prompt) and prompt_ids is not None:
                c.scored[:0] = prompt_scores(prompt_ids[i], event)
            elif isinstance(event, Token):
                generated += 1
                c.text += event.text
                c.scored.append((event.id, event.logprob, event.top))
            elif isinstance(event, Finished):
                c.text += event.text
                c.reason = event.reason
        return choices, generated

    def _stream(self, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def framed() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except ApiError as e:  # after the headers went out: report in the stream
                self.metrics.reject(e.status)  # as the handler does for a response that is all JSON
                yield sse(error_body(e.message, e.kind, e.status))
            yield SSE_DONE

        return StreamingResponse(framed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _bos(self) -> list[int]:
        """The prompt of an empty text: BOS where the tokenizer has one."""
        return [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []


__all__ = ["Routes"]
