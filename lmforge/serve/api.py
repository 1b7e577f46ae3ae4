"""The OpenAI-compatible HTTP server: `create_app` over a loaded model, and `lmforge serve`.

Design
------
`create_app(model, tokenizer, ...)` returns a FastAPI app that owns an `Engine` (started and
stopped with the app's lifespan), so tests run the whole API in-process and `lmforge serve` runs
the same app under uvicorn. The app is assembled from pieces that each do one job:

    engine.py    continuous batching on its own thread
    bridge.py    engine thread <-> event loop: submit, events, deadlines, cancel on disconnect
    routes.py    one method per route: body -> engine requests -> events -> JSON or SSE
    embeddings.py  POST /v1/embeddings: a bounded worker beside the engine, vector encodings
                 (POST /v1/classify runs on the same worker: `lmforge serve clf/NAME`)
    adapters.py  --adapter: many LoRA adapters on the one base, picked by the request's `model`
    protocol.py  the wire format: strict request bodies, errors, log-probs, response shapes
    chat.py      chat templates (Jinja sandbox; control tokens only from the template)
    metrics.py   the Prometheus registry behind GET /metrics

Here: the route table, the error handlers (an `ApiError` becomes an OpenAI-shaped error with its
status and is counted as refused; unknown routes and methods get the same shape), and auth.

- Auth is a pure ASGI middleware in front of every route except /health: `Authorization: Bearer
  KEY`, compared with `hmac.compare_digest`.
- `lmforge serve` binds and listens itself before it announces the URL (the real port, also for
  --port 0), so a taken port is one clear error, and hands the socket to uvicorn. It refuses a
  non-loopback host without an API key unless told --insecure.
- Shutdown (SIGTERM or Ctrl-C): before uvicorn closes connections, `Bridge.close` refuses new
  calls (503), gives the calls in flight --shutdown-grace seconds to finish and cuts the rest
  short (a 503, or an error event and `[DONE]` in a stream), so uvicorn never has to cancel a
  response half-sent. SIGTERM is handled like Ctrl-C (uvicorn re-raises the signal it stopped
  for; SIGTERM's default action would kill the process), and both exit 0.
- Log-probs are the model's own (log-softmax of the raw logits; temperature and top-k/top-p do
  not reshape them), so scoring does not depend on sampling settings.

Trade-offs: one base model per server (with any number of LoRA adapters on it); the engine is created with the app, so its cache is allocated
even when the app never starts (tests create apps freely; `lmforge serve` binds the port first).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from ..config import Config, EmbedConfig
from ..errors import ConfigError, LmforgeError
from ..lora import AdapterSet
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..util import read_text_file
from ..understand.embed import Embedder
from .bridge import Bridge
from .chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from .embeddings import EmbedWorker
from .engine import Engine
from .metrics import Metrics
from .protocol import ApiError, error_body
from .routes import Routes

if TYPE_CHECKING:
    from ..artifacts import Loaded
    from ..understand.classify import Classifier
    from ..understand.index.search import Searcher


class ApiKeyAuth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <key>`."""

    def __init__(self, app: Any, key: str, metrics: Metrics) -> None:
        self.app, self.key, self.metrics = app, key.encode(), metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                self.metrics.reject(401)
                response = JSONResponse(
                    error_body("missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error", 401),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _http_error(_request: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
    """An unknown route (404) or method (405), in OpenAI's error shape."""
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", e.status_code), status_code=e.status_code)


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
    max_threads: int | None = None,
    embed: EmbedConfig | None = None,
    max_embed_inputs: int = 256,
    searcher: Searcher | None = None,
    classifier: Classifier | None = None,
    adapters: AdapterSet | None = None,
) -> FastAPI:
    """The API over a loaded model (eval mode). The engine thread runs while the app does.
    `embed`: how /v1/embeddings pools (the model's config `embed:` section; default: its defaults).
    searcher: an index opened for this model (`open_index`); adds POST /v1/search.
    classifier: a classifier over this same model (`load_classifier`), for POST /v1/classify.
    adapters: LoRA adapters installed in `model` (serve/adapters.py `open_adapters`), picked by name."""
    if max_tokens < 1 or not (math.isfinite(request_timeout) and request_timeout > 0) or max_body_bytes < 1:
        raise LmforgeError(f"--max-tokens, --request-timeout and --max-body-bytes must be positive, got "
                           f"{max_tokens}, {request_timeout} and {max_body_bytes}")
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, adapters=adapters, max_threads=max_threads)
    chat = ChatTemplate(tokenizer, chat_template)
    metrics = Metrics(engine)
    bridge = Bridge(engine, metrics, request_timeout)
    if max_embed_inputs < 1:
        raise LmforgeError(f"--max-embed-inputs must be >= 1, got {max_embed_inputs}")
    embedder = Embedder.from_model(model, tokenizer, Config(model=model.cfg, embed=embed or EmbedConfig()))
    embed_worker = EmbedWorker(embedder, max_queue, request_timeout)
    routes = Routes(bridge, tokenizer, chat, metrics, model_name=model_name,
                    context=model.cfg.max_seq_len, max_tokens=max_tokens, max_body_bytes=max_body_bytes,
                    embed_worker=embed_worker, max_embed_inputs=max_embed_inputs, searcher=searcher,
                    classifier=classifier, adapters=adapters)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            await asyncio.to_thread(embed_worker.close)

    async def api_error(_request: HttpRequest, e: ApiError) -> JSONResponse:
        metrics.reject(e.status)
        return JSONResponse(error_body(e.message, e.kind, e.status, e.param), status_code=e.status, headers=e.headers)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.bridge = engine, bridge  # bridge.close(grace): the server's shutdown
    app.state.embed_worker = embed_worker
    if api_key:
        app.add_middleware(ApiKeyAuth, key=api_key, metrics=metrics)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for method, path, endpoint in (
        ("POST", "/v1/completions", routes.completions),
        ("POST", "/v1/chat/completions", routes.chat_completions),
        ("POST", "/v1/embeddings", routes.embeddings),
        ("POST", "/v1/classify", routes.classify),
        ("GET", "/health", routes.health),
        ("GET", "/v1/models", routes.models),
        ("POST", "/tokenize", routes.tokenize),
        ("POST", "/detokenize", routes.detokenize),
        ("GET", "/tokenizer_info", routes.tokenizer_info),
        ("GET", "/metrics", routes.metrics_page),
    ):
        app.add_api_route(path, endpoint, methods=[method])
    if searcher is not None:
        app.add_api_route("/v1/search", routes.search, methods=["POST"])
    return app


def open_index(path: str | os.PathLike, loaded: Loaded) -> Searcher:
    """The index `lmforge serve --index` searches, verified, with the served weights as its
    embedder (its recorded pooling); refused when the index was built by another model."""
    from ..understand.embed import Embedder, Pooling
    from ..understand.index.search import Searcher
    from ..understand.index.store import Index

    index = Index.open(path)
    embedder = Embedder(loaded, Pooling.from_dict(index.fields["pooling"]))
    return Searcher(index, embedder).warm()  # check_embedder refuses another model, naming both checksums


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
        key = read_text_file(api_key_file, "the API key file", max_bytes=64 << 10).strip()
        source = f"the API key file {api_key_file}"
    elif os.environ.get("LMFORGE_API_KEY") is not None:
        key, source = os.environ["LMFORGE_API_KEY"].strip(), "LMFORGE_API_KEY"
    else:
        return None
    if not key:
        raise LmforgeError(f"{source} is empty; put a non-empty key there (e.g. `openssl rand -hex 32`)")
    if not key.isascii() or not key.isprintable():  # it is compared with an HTTP header's bytes
        raise LmforgeError(f"{source} holds characters an HTTP header cannot carry; use printable ASCII "
                           "(e.g. `openssl rand -hex 32`)")
    return key


def read_chat_template(path: str | None) -> str | None:
    """The text of --chat-template's file (None: not given)."""
    if path is None:
        return None
    return read_text_file(path, "the chat template", max_bytes=1 << 20)


def check_exposure(host: str, key: str | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without an API key, unless told --insecure."""
    if not is_loopback(host) and key is None and not insecure:
        raise LmforgeError(
            f"refusing to serve on {host} without an API key: anyone who can reach that address could use the "
            "model. Pass --api-key-file FILE (or set LMFORGE_API_KEY), or --insecure on a trusted network"
        )


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
    max_embed_inputs: int | None = None,
    chat_template: str | None,
    request_timeout: float,
    max_body_bytes: int,
    threads: int | None,
    shutdown_grace: float = 5.0,
    quantize: str | None = None,
    index: str | None = None,
    adapters: list[str] | None = None,
    max_adapters: int | None = None,
    compile: bool = False,
) -> int:
    """Load a run or checkpoint and serve it until interrupted. Unset limits come from the
    checkpoint's `serve:` config section. `adapters`: --adapter NAME=PATH or DIR values (LoRA
    adapters on this base, picked by a request's `model`)."""
    from ..generate import compile_decode, load_for_decoding
    from ..quant import check_weights
    from ..threads import choose, cores
    from ..util import check_port, console

    if port is not None:
        check_port(port)  # before loading anything (serve.port from the config is checked there)
    if not (math.isfinite(shutdown_grace) and shutdown_grace >= 0):
        raise LmforgeError(f"--shutdown-grace must be a number of seconds >= 0, got {shutdown_grace}")
    key = resolve_api_key(api_key, api_key_file)
    template = read_chat_template(chat_template)
    if quantize is not None:
        check_weights(quantize)
    choose(threads)  # the engine thread starts with this count and adapts it (lmforge/threads.py) ...
    # The engine thread and the event loop share the GIL; a shorter switch interval keeps the
    # engine from waiting up to 5 ms for it each time the loop handles a token (docs/serve.md).
    sys.setswitchinterval(0.0005)
    classifier = load_classifier(path)
    if classifier is not None and quantize not in (None, "fp32"):
        raise ConfigError(f"--quantize {quantize}: {path} is a classifier, whose head was fitted to its model's fp32 "
                          "vectors; serve it without --quantize")
    if adapters and quantize not in (None, "fp32"):
        raise ConfigError(f"--quantize {quantize} with --adapter: LoRA adapters are served on fp32 base weights; "
                          "leave out --quantize, or export each adapter merged (export --merge) and serve that")
    loaded = classifier.embedder.loaded if classifier is not None else load_for_decoding(path, quantize, compile=compile)
    if compile and classifier is not None:  # a classifier's embedding model decodes too (chat completions)
        compile_decode(loaded.model)
    searcher = open_index(index, loaded) if index is not None else None  # before the port: a wrong index fails at once
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config
    template = template or tokenizer.chat_template  # a model directory's (or a fine-tune's origin's) recorded one
    host = host or cfg.serve.host
    check_exposure(host, key, insecure)
    port = port if port is not None else cfg.serve.port
    name = model_name or Path(path).resolve().name
    adapter_set = None
    if adapters:  # every adapter checked against this base before the port opens
        from .adapters import open_adapters

        adapter_set = open_adapters(loaded, name, adapters, cfg.serve.max_adapters if max_adapters is None else max_adapters)
    sock = listen(host, port)  # before create_app allocates the cache: a taken port fails at once
    try:
        app = create_app(model, tokenizer, model_name=name,
                         max_batch=cfg.serve.max_batch if max_batch is None else max_batch,
                         max_queue=cfg.serve.max_queue if max_queue is None else max_queue,
                         max_tokens=cfg.serve.max_tokens if max_tokens is None else max_tokens, api_key=key,
                         chat_template=template, request_timeout=request_timeout, max_body_bytes=max_body_bytes,
                         embed=cfg.embed,
                         max_embed_inputs=cfg.serve.max_embed_inputs if max_embed_inputs is None else max_embed_inputs,
                         searcher=searcher, classifier=classifier, adapters=adapter_set,
                         max_threads=threads or cores())  # ... up to --threads (or all cores) while they are free
        auth = "API key required" if key else "no API key"
        where = f"[{host}]" if ":" in host else host
        # Listening already (connections wait in the backlog until uvicorn accepts them), so the
        # URL works as soon as it is printed; its port is the real one, also for --port 0.
        what = f"classifier {path} on {loaded.origin.path}, " if classifier is not None else ""
        searching = f", searching {index}" if index is not None else ""
        if adapter_set is not None:
            searching += (f", {len(adapter_set.entries)} LoRA adapter(s): {', '.join(list(adapter_set.entries)[:8])}"
                          f"{' ...' if len(adapter_set.entries) > 8 else ''} (up to {adapter_set.capacity} in memory)")
        if compile:
            searching += ", compiling its decode step first (--compile: up to ~1 min for a model shape new to this machine; requests wait for it)"
        console.print(f"serving {name} ({what}{loaded.origin.describe()}{searching}) at "
                      f"http://{where}:{sock.getsockname()[1]}/v1 ({auth}); Ctrl-C stops", markup=False)
        server = _server(app, shutdown_grace)
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends like Ctrl-C, exit 0
        try:
            with contextlib.suppress(KeyboardInterrupt):
                server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    if not server.started:  # uvicorn logged why (the lifespan failed)
        raise LmforgeError("the server did not start; see the error above")
    return 0


def load_classifier(path: str) -> Classifier | None:
    """The classifier of a classifier directory (clf/NAME), with its embedding model; None for any
    other path. One whose scores need the evaluation scorer (zero-shot with --zero-shot-scorer lm)
    is refused: the server does not import evaluate/."""
    from ..understand.classify import Classifier, is_classifier_dir

    if not is_classifier_dir(path):
        return None
    clf = Classifier.load(path)
    if clf.spec.scorer == "lm":
        raise LmforgeError(f"{path} is a zero-shot classifier with the lm scorer, which the server does not run; "
                           "classify with `lmforge classify predict`, or train one with --zero-shot-scorer embedding")
    return clf


def _server(app: FastAPI, shutdown_grace: float) -> Any:
    """A uvicorn server that ends the app's calls in flight (`Bridge.close`) before its own
    shutdown closes the connections; uvicorn's own grace period is only a backstop then."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await app.state.bridge.close(shutdown_grace, hurry=lambda: self.force_exit)  # a second Ctrl-C hurries
            await super().shutdown(sockets=sockets)

    return Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10))


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


__all__ = ["create_app", "open_index", "serve_command", "resolve_api_key", "is_loopback", "listen", "DEFAULT_CHAT_TEMPLATE"]
