"""The OpenAI-compatible HTTP API: an app factory over a loaded model, and `lmforge serve`.

Design
------
`create_app(model, tokenizer, ...)` returns a FastAPI app that owns an `Engine` (started and
stopped with the app's lifespan), so tests run the whole API in-process and `lmforge serve` runs
the same app under uvicorn. Handlers only translate: JSON in -> engine `Request`s -> events ->
OpenAI-shaped JSON or server-sent events out.

- Routes: POST /v1/completions (prompt as text, texts, token ids or lists of token ids; echo;
  legacy logprobs with a null first echoed log-prob; max_tokens 0 + echo scores the prompt, which
  is what lm-evaluation-harness `local-completions` sends), POST /v1/chat/completions, GET
  /v1/models, POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics
  (Prometheus).
- Bodies are read by hand (size-limited, then `json.loads`, then strict pydantic models: JSON's
  types, no bool as a number), so malformed JSON, wrong types, an unknown chat role, an oversized
  body or an impossible request is a 4xx with an OpenAI-shaped error naming the problem (`code`
  is the status as a string), never a 500. A full queue is a 429 with Retry-After.
- `lmforge serve` binds and listens itself before it announces the URL (the real port, also for
  --port 0), so a taken port is one clear error, and hands the socket to uvicorn.
- Auth is a pure ASGI middleware in front of every route except /health: `Authorization: Bearer
  KEY`, compared with `hmac.compare_digest`.
- A client that disconnects (a closed stream, or a waiting non-streaming request) cancels its
  engine requests, which frees their slots before the next decode step.
- Log-probs are the model's own (log-softmax of the raw logits; temperature and top-k/top-p do
  not reshape them), so scoring does not depend on sampling settings.

Trade-offs: one model per server (the `model` field of a request is not checked, so any client's
default name works); `n > 1` runs n independent requests (seed, seed + 1, ...); the chat template
is rendered with Jinja in a sandbox and its text encoded as plain text (special-token strings in
it are not turned into control tokens, as `Tokenizer.encode` never does).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from ..errors import LmforgeError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .engine import MAX_LOGPROBS, Engine, Event, Finished, Prompt, QueueFull, Request, Token

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = ("\nUser:", "\nSystem:")  # the default template's next turn
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 16
MAX_N = 16

M = TypeVar("M", bound=BaseModel)


# ---- request bodies ----------------------------------------------------------------------


# Every request model is strict: JSON's types, no coercion. A bool is not an int (`"max_tokens": true`
# is not 1), a string is not a number (`"5"`), 5.0 is not an int; an int is still a float. OpenAI
# refuses these too. `extra="ignore"`: clients send fields we do not use (user, ...).
STRICT = ConfigDict(extra="ignore", strict=True)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's; the template gets them as is


class _Body(BaseModel):
    model_config = STRICT

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # an extension (vLLM's); 0 or -1 = off
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # an extension (vLLM's): run to max_tokens (benchmarks)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: str | list[ContentPart] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_required(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")  # absent when the role itself was invalid
        if content is None and role is not None and role != "assistant":
            raise ValueError(f"a {role} message needs content (a string or a list of text parts); "
                             "only an assistant message may leave it out or null")
        return content


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeBody(BaseModel):
    model_config = STRICT
    prompt: str | None = None  # a text, or
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # a conversation, as chat renders it
    model: str | None = None


class DetokenizeBody(BaseModel):
    model_config = STRICT
    tokens: list[int]
    model: str | None = None


# ---- errors ------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape. `code` is a string or null there (the openai client reads it as one):
    here always the HTTP status as a string, so an error event inside a stream (sent after a 200)
    still says what it was."""
    return {"error": {"message": message, "type": kind, "param": param, "code": str(status)}}


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _describe(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = [p for p in first["loc"] if not isinstance(p, str) or p not in {"str", "list[str]", "list[int]", "list[list[int]]"}]
    where = ".".join(str(p) for p in loc)
    message = first["msg"].removeprefix("Value error, ")  # our own validators' messages
    if first["type"].endswith("_type") and len(loc) == len(first["loc"]):  # a wrong type, not one branch of a union:
        # say which JSON type came (`true` is not an integer)
        message += f", got {_json_type(first['input'])}"
    return f"{where or 'body'}: {message}" + (f" ({len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""), where or None


async def read_body(request: HttpRequest, model: type[M], limit: int) -> M:
    """The request's JSON body as `model`: 413 past `limit` bytes, 400 for bad JSON or types."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over this server's limit of {limit} bytes (--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over this server's limit of {limit} bytes (--max-body-bytes)")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _describe(e)
        raise ApiError(400, message, param=param) from None


# ---- auth --------------------------------------------------------------------------------


class ApiKeyAuth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <key>`."""

    def __init__(self, app: Any, key: str, rejected: Counter) -> None:
        self.app, self.key, self.rejected = app, key.encode(), rejected

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                self.rejected.labels("unauthorized").inc()
                response = JSONResponse(
                    error_body("missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error", 401),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- metrics -----------------------------------------------------------------------------


class EngineCollector:
    """Prometheus collector that reads the engine's state at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        e = self.engine
        yield GaugeMetricFamily("lmforge_queue_depth", "Requests waiting for a slot", value=e.queue_depth)
        yield GaugeMetricFamily("lmforge_active_slots", "Requests in the running batch", value=e.active_slots)
        yield GaugeMetricFamily("lmforge_max_batch", "Slots in the running batch", value=e.max_batch)
        yield GaugeMetricFamily("lmforge_tokens_per_second", "Generated tokens per second over the last 10 s",
                                value=e.tokens_per_second())
        yield CounterMetricFamily("lmforge_prompt_tokens", "Prompt tokens prefilled", value=e.prompt_tokens)
        yield CounterMetricFamily("lmforge_generation_tokens", "Tokens generated", value=e.generated_tokens)


# ---- the app -----------------------------------------------------------------------------


class Mailbox:
    """Carries engine events (posted on the engine thread) to asyncio queues on the loop.

    Events are collected and handed over in one loop callback per batch, so a decode step of 16
    rows wakes the loop once instead of 16 times (each wake-up also contends for the GIL).
    """

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



def create_app(
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    model_name: str = "lmforge",
    max_batch: int = 16,
    max_queue: int = 64,
    max_tokens: int = 256,
    api_key: str | None = None,
    chat_template: str | None = None,
    request_timeout: float = 600.0,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """The API over a loaded model (eval mode). The engine thread runs while the app does."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if max_tokens < 1 or request_timeout <= 0 or max_body_bytes < 1:
        raise LmforgeError(f"--max-tokens, --request-timeout and --max-body-bytes must be positive, got "
                           f"{max_tokens}, {request_timeout} and {max_body_bytes}")
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    context = model.cfg.max_seq_len
    created = int(time.time())
    eos = tokenizer.end_ids  # EOS, and an instruct model's recorded end of turn (<|im_end|>)
    template_source = chat_template or DEFAULT_CHAT_TEMPLATE
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    jinja.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(TemplateError(message))
    try:
        template = jinja.from_string(template_source)
    except TemplateError as e:
        raise LmforgeError(f"the chat template does not parse: {e}") from None
    chat_stop = DEFAULT_CHAT_STOP if chat_template is None else ()

    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    latency = Histogram("lmforge_request_latency_seconds", "Time from request to last token", ["route"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
    first_token = Histogram("lmforge_time_to_first_token_seconds", "Time from request to first token (streams)", ["route"],
                            registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    rejected = Counter("lmforge_rejected_requests", "Requests refused, by reason", ["reason"], registry=registry)
    requests_total = Counter("lmforge_requests", "Requests accepted, by route", ["route"], registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    if api_key:
        app.add_middleware(ApiKeyAuth, key=api_key, rejected=rejected)

    def count_rejected(e: ApiError) -> None:
        rejected.labels({429: "queue_full", 413: "too_large", 504: "timeout", 500: "engine_error"}.get(e.status, "invalid")).inc()

    @app.exception_handler(ApiError)
    async def api_error(_request: HttpRequest, e: ApiError) -> JSONResponse:
        count_rejected(e)
        return JSONResponse(error_body(e.message, e.kind, e.status, e.param), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", e.status_code), status_code=e.status_code)

    token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i]))

    # ---- engine plumbing ---------------------------------------------------------------------

    mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}

    def submit(requests: list[Request], *, stream: bool) -> asyncio.Queue:
        """Queue requests; their events arrive on the returned asyncio queue as (index, event):
        as they happen for a stream, all at once when a request finishes otherwise (nobody reads
        them earlier, and every hand-over to the loop costs the engine thread GIL time)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        mailbox = mailboxes.setdefault(loop, Mailbox(loop))
        deadline = time.monotonic() + request_timeout
        for i, req in enumerate(requests):
            req.deadline = deadline
            req.sink = functools.partial(mailbox.post, queue, i) if stream else _held(mailbox, queue, i)
        try:
            engine.submit(requests)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except LmforgeError as e:
            raise ApiError(400, str(e)) from None
        return queue

    async def watch(http: HttpRequest, requests: list[Request]) -> None:
        """Cancel the requests when the client of a non-streaming call disconnects."""
        while not await http.is_disconnected():
            await asyncio.sleep(1.0)
        for req in requests:
            engine.cancel(req)

    async def events(queue: asyncio.Queue, requests: list[Request], http: HttpRequest | None,
                     route: str) -> AsyncIterator[tuple[int, Event]]:
        """Events until every request finished; cancels what is left if the consumer goes away
        (a stream's consumer is cancelled by the server; a non-streaming one is watched)."""
        start, first, remaining = time.monotonic(), True, len(requests)
        requests_total.labels(route).inc()
        watcher = asyncio.create_task(watch(http, requests)) if http is not None else None
        try:
            while remaining:
                i, event = await queue.get()
                if isinstance(event, Token) and first and http is None:  # streams only
                    first_token.labels(route).observe(time.monotonic() - start)
                    first = False
                if isinstance(event, Finished):
                    remaining -= 1
                    if event.reason == "timeout":
                        raise ApiError(504, f"request took longer than this server's limit of {request_timeout:g} s "
                                            "(--request-timeout)", kind="timeout_error")
                    if event.reason == "error":
                        raise ApiError(500, event.message, kind="server_error")
                yield i, event
            latency.labels(route).observe(time.monotonic() - start)
        finally:
            if watcher is not None:
                watcher.cancel()
            for req in requests:
                if not req.cancelled:
                    engine.cancel(req)

    def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ApiError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return tuple(stops)

    def check_common(body: _Body, n_tokens: int | None) -> None:
        if body.presence_penalty or body.frequency_penalty or body.logit_bias:
            raise ApiError(400, "presence_penalty, frequency_penalty and logit_bias are not supported")
        if n_tokens is not None and n_tokens > max_tokens:
            raise ApiError(400, f"max_tokens {n_tokens} is above this server's limit of {max_tokens} (--max-tokens)",
                           param="max_tokens")

    def engine_requests(ids: list[int], body: _Body, n_tokens: int, stop: tuple[str, ...],
                        logprobs: int | None, echo: bool) -> list[Request]:
        return [Request(ids, n_tokens, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                        seed=None if body.seed is None else body.seed + j, stop_ids=() if body.ignore_eos else eos, stop=stop,
                        logprobs=logprobs, echo_logprobs=echo and logprobs is not None)
                for j in range(body.n)]

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def stream_response(chunks: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except ApiError as e:  # after the headers went out: report in the stream
                count_rejected(e)  # as the handler does for a response that is all JSON
                yield sse(error_body(e.message, e.kind, e.status))
            yield "data: [DONE]\n\n"

        return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- /v1/completions -----------------------------------------------------------------------

    def legacy_logprobs(pairs: list[tuple[int, float | None, list[tuple[int, float]] | None]],
                        offset: int) -> dict[str, Any]:
        """OpenAI legacy format from (token id, log-prob, top) triples; top None -> null entry."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in pairs:
            s = token_text(token)
            out["tokens"].append(s)
            out["token_logprobs"].append(logprob)
            if top is None:
                out["top_logprobs"].append(None)
            else:
                best: dict[str, float] = {}
                for t, lp in top:  # best first; tokens that print alike keep the higher log-prob
                    best.setdefault(token_text(t), lp)
                best.setdefault(s, logprob)  # the chosen token is always listed
                out["top_logprobs"].append(best)
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def prompt_pairs(ids: list[int], p: Prompt) -> list[tuple[int, float | None, list | None]]:
        return [(t, lp, top) for t, lp, top in zip(ids, p.logprobs, p.top)]

    def encode_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str, list[int]]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if len(prompt) == 0:
            raise ApiError(400, "prompt is empty; send a string, a list of strings or token ids", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]  # one prompt given as token ids
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = tokenizer.encode(p) or ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])
                out.append((p, ids))
            else:
                if any(not 0 <= t < tokenizer.vocab_size for t in p):
                    raise ApiError(400, f"prompt token ids must be within 0..{tokenizer.vocab_size - 1}", param="prompt")
                out.append((tokenizer.decode(p), list(p)))
        return out

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        body = await read_body(http, CompletionBody, max_body_bytes)
        n_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        check_common(body, n_tokens)
        if body.suffix or (body.best_of is not None and body.best_of != body.n):
            raise ApiError(400, "suffix and best_of are not supported")
        prompts = encode_prompts(body.prompt)
        stop = stop_strings(body.stop)
        requests = [r for _text, ids in prompts for r in engine_requests(ids, body, n_tokens, stop, body.logprobs, body.echo)]
        queue = submit(requests, stream=body.stream)
        rid, n = f"cmpl-{uuid.uuid4().hex}", body.n
        prompt_of = [prompts[i // n] for i in range(len(requests))]  # choice index -> (text, ids)

        def chunk(i: int, text: str, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

        def usage(generated: int) -> dict[str, int]:
            prompt_tokens = sum(len(ids) for _t, ids in prompts)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}

        if body.stream:
            async def chunks() -> AsyncIterator[str]:
                offsets, generated = [0] * len(requests), 0
                if body.echo and body.logprobs is None:
                    for i in range(len(requests)):
                        yield sse(chunk(i, prompt_of[i][0], None, None))
                async for i, event in events(queue, requests, None, "completions"):
                    if isinstance(event, Prompt):
                        lp = legacy_logprobs(prompt_pairs(prompt_of[i][1], event), 0)
                        offsets[i] = len(prompt_of[i][0])
                        yield sse(chunk(i, prompt_of[i][0], lp, None))
                    elif isinstance(event, Token):
                        generated += 1
                        lp = None
                        if body.logprobs is not None:
                            lp = legacy_logprobs([(event.id, event.logprob, event.top)], offsets[i])
                            offsets[i] += len(token_text(event.id))
                        if event.text or lp is not None:
                            yield sse(chunk(i, event.text, lp, None))
                    else:
                        yield sse(chunk(i, event.text, None, event.reason))
                if (body.stream_options or {}).get("include_usage"):
                    yield sse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                               "choices": [], "usage": usage(generated)})

            return stream_response(chunks())

        texts = [prompt_of[i][0] if body.echo else "" for i in range(len(requests))]
        pairs: list[list] = [[] for _ in requests]
        reasons: list[str] = [""] * len(requests)
        generated = 0
        async for i, event in events(queue, requests, http, "completions"):
            if isinstance(event, Prompt):
                pairs[i] = prompt_pairs(prompt_of[i][1], event) + pairs[i]
            elif isinstance(event, Token):
                generated += 1
                texts[i] += event.text
                pairs[i].append((event.id, event.logprob, event.top))
            else:
                texts[i] += event.text
                reasons[i] = event.reason
        if "cancelled" in reasons:  # the client left; nobody reads this
            return Response(status_code=499)
        choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i],
                    "logprobs": legacy_logprobs(pairs[i], 0) if body.logprobs is not None else None}
                   for i in range(len(requests))]
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                             "choices": choices, "usage": usage(generated)})

    # ---- /v1/chat/completions ------------------------------------------------------------------

    def render_chat(messages: list[ChatMessage]) -> list[int]:
        plain = []
        for m in messages:
            if isinstance(m.content, list):
                if any(part.type != "text" for part in m.content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                content = "".join(part.text or "" for part in m.content)
            else:
                content = m.content or ""
            plain.append({"role": m.role, "content": content})
        try:
            ids = tokenizer.encode_template(template_parts(plain))
        except TemplateError as e:
            raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        return ids or ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])

    def template_parts(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, written_by_the_template) parts.

        The template is rendered twice: with the messages, and with a marker in place of each
        message's content, which shows where the template's own text ends and a message begins.
        Only the template's own text may hold control tokens (`Tokenizer.encode_template`). A
        template that changes the content (`| trim`) cannot be split this way; then the whole
        text counts as the template's if no message holds a special-token string, else none of
        it does (a message must never become a control token)."""
        def render(msgs: list[dict[str, str]]) -> str:
            return template.render(messages=msgs, add_generation_prompt=True,
                                   bos_token=_special(tokenizer.bos_id), eos_token=_special(tokenizer.eos_id))

        text = render(messages)
        marked = render([dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)])
        pieces = re.split("\ue000(\\d+)\ue001", marked)  # template, index, template, index, ..., template
        parts = [(piece, True) if k % 2 == 0 else (messages[int(piece)]["content"], False) for k, piece in enumerate(pieces)]
        if "".join(t for t, _ in parts) == text:
            return parts
        specials = [t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special]
        clean = not any(sp in m["content"] for m in messages for sp in specials)
        return [(text, clean)]

    def chat_logprobs(items: list[tuple[int, float | None, list[tuple[int, float]] | None]]) -> dict[str, Any]:
        def entry(t: int, lp: float | None) -> dict[str, Any]:
            s = token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, b) for a, b in (top or [])])
                            for t, lp, top in items]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Response:
        body = await read_body(http, ChatBody, max_body_bytes)
        ids = render_chat(body.messages)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_common(body, asked)
        n_tokens = asked if asked is not None else min(max_tokens, context - len(ids))
        if n_tokens < 0 or len(ids) >= context:
            raise ApiError(400, f"the conversation is {len(ids)} tokens, the model's context is {context}; "
                                "shorten the messages", param="messages")
        stop = stop_strings(body.stop) + chat_stop
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = engine_requests(ids, body, n_tokens, stop, logprobs, False)
        queue = submit(requests, stream=body.stream)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def usage(generated: int) -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated}

        if body.stream:
            def chunk(i: int, delta: dict, reason: str | None, lp: dict | None = None) -> dict[str, Any]:
                return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                        "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

            async def chunks() -> AsyncIterator[str]:
                generated = 0
                for i in range(len(requests)):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}, None))
                async for i, event in events(queue, requests, None, "chat"):
                    if isinstance(event, Token):
                        generated += 1
                        lp = chat_logprobs([(event.id, event.logprob, event.top)]) if logprobs is not None else None
                        if event.text or lp is not None:
                            yield sse(chunk(i, {"content": event.text}, None, lp))
                    elif isinstance(event, Finished):
                        if event.text:
                            yield sse(chunk(i, {"content": event.text}, None))
                        yield sse(chunk(i, {}, event.reason))
                if (body.stream_options or {}).get("include_usage"):
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": model_name, "choices": [], "usage": usage(generated)})

            return stream_response(chunks())

        texts, items = [""] * len(requests), [[] for _ in requests]
        reasons, generated = [""] * len(requests), 0
        async for i, event in events(queue, requests, http, "chat"):
            if isinstance(event, Token):
                generated += 1
                texts[i] += event.text
                items[i].append((event.id, event.logprob, event.top))
            elif isinstance(event, Finished):
                texts[i] += event.text
                reasons[i] = event.reason
        if "cancelled" in reasons:
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "finish_reason": reasons[i],
                    "logprobs": chat_logprobs(items[i]) if logprobs is not None else None}
                   for i in range(len(requests))]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                             "choices": choices, "usage": usage(generated)})

    # ---- small routes ----------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lmforge", "max_model_len": context}]}

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest) -> dict[str, Any]:
        body = await read_body(http, TokenizeBody, max_body_bytes)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt (a text) or messages (a conversation)", param="prompt")
        ids = tokenizer.encode(body.prompt) if body.messages is None else render_chat(body.messages)
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest) -> dict[str, Any]:
        body = await read_body(http, DetokenizeBody, max_body_bytes)
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise ApiError(400, f"token ids must be within 0..{tokenizer.vocab_size - 1}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"tokenizer_class": "byte-level BPE (Hugging Face tokenizers)", "vocab_size": tokenizer.vocab_size,
                "bos_token": _special(tokenizer.bos_id), "eos_token": _special(tokenizer.eos_id),
                "pad_token": _special(tokenizer.pad_id), "bos_token_id": tokenizer.bos_id,
                "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "model_max_length": context,
                "chat_template": template_source, "sha256": tokenizer.sha256}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def _special(i: int | None) -> str | None:
        return None if i is None else tokenizer.hf.id_to_token(i)

    return app


# ---- `lmforge serve` ---------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it reaches beyond this machine


def resolve_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """--api-key, else --api-key-file, else $LMFORGE_API_KEY, else None."""
    if api_key is not None:
        key = api_key.strip()
        source = "--api-key"
    elif api_key_file is not None:
        try:
            key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise LmforgeError(f"cannot read the API key file {api_key_file}: {e.strerror}") from None
        source = f"the API key file {api_key_file}"
    elif os.environ.get("LMFORGE_API_KEY") is not None:
        key, source = os.environ["LMFORGE_API_KEY"].strip(), "LMFORGE_API_KEY"
    else:
        return None
    if not key:
        raise LmforgeError(f"{source} is empty; put a non-empty key there (e.g. `openssl rand -hex 32`)")
    return key


def serve_command(
    path: str,
    *,
    host: str | None,
    port: int | None,
    api_key: str | None,
    api_key_file: str | None,
    insecure: bool,
    max_batch: int | None,
    max_queue: int | None,
    max_tokens: int | None,
    model_name: str | None,
    chat_template: str | None,
    request_timeout: float,
    max_body_bytes: int,
    threads: int,
) -> int:
    """Load a run or checkpoint and serve it until interrupted. Unset limits come from the
    checkpoint's `serve:` config section."""
    import torch
    import uvicorn

    from ..artifacts import load_model
    from ..util import check_port, console

    if port is not None:
        check_port(port)  # before loading anything (serve.port from the config is checked there)
    key = resolve_api_key(api_key, api_key_file)
    template = None
    if chat_template is not None:
        try:
            template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise LmforgeError(f"cannot read the chat template {chat_template}: {e.strerror}") from None
    if threads > 0:
        torch.set_num_threads(threads)
    # The engine thread and the event loop share the GIL; a shorter switch interval keeps the
    # engine from waiting up to 5 ms for it each time the loop handles a token (docs/serve.md).
    sys.setswitchinterval(0.0005)
    loaded = load_model(path)
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config
    template = template or tokenizer.chat_template  # a model directory's (or a fine-tune's origin's) recorded one
    host = host or cfg.serve.host
    if not is_loopback(host) and key is None and not insecure:
        raise LmforgeError(
            f"refusing to serve on {host} without an API key: anyone who can reach that address could use the "
            "model. Pass --api-key-file FILE (or set LMFORGE_API_KEY), or --insecure on a trusted network"
        )
    port = port if port is not None else cfg.serve.port
    sock = listen(host, port)  # before create_app allocates the cache: a taken port fails at once
    name = model_name or Path(path).resolve().name
    try:
        app = create_app(model, tokenizer, model_name=name,
                         max_batch=cfg.serve.max_batch if max_batch is None else max_batch,
                         max_queue=cfg.serve.max_queue if max_queue is None else max_queue,
                         max_tokens=cfg.serve.max_tokens if max_tokens is None else max_tokens, api_key=key,
                         chat_template=template, request_timeout=request_timeout, max_body_bytes=max_body_bytes)
        auth = "API key required" if key else "no API key"
        where = f"[{host}]" if ":" in host else host
        # Listening already (connections wait in the backlog until uvicorn accepts them), so the
        # URL works as soon as it is printed; its port is the real one, also for --port 0.
        console.print(f"serving {name} ({loaded.origin.describe()}) at http://{where}:{sock.getsockname()[1]}/v1 ({auth}); "
                      "Ctrl-C stops", markup=False)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # uvicorn logged why (the lifespan failed)
        raise LmforgeError("the server did not start; see the error above")
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), bound as uvicorn would bind it,
    or an LmforgeError that says what to change (uvicorn itself would log a raw errno after we had
    announced the URL, and exit 3)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop (TIME_WAIT)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:
        sock.close()
        hint = "pick another --port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else "check --host"
        raise LmforgeError(f"cannot listen on {host}:{port} ({e.strerror or e}); {hint}") from None
    sock.set_inheritable(True)
    return sock


__all__ = ["create_app", "serve_command", "resolve_api_key", "is_loopback", "listen", "DEFAULT_CHAT_TEMPLATE"]
