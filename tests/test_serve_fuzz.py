"""A seeded fuzz of the server: bad requests must get a 4xx and must not harm anyone else.

A plain seeded generator (`random.Random(LMFORGE_FUZZ_SEED)`) builds request bodies over every
route: valid ones with extreme but legal settings (temperature 5e-324, top_p 1e-300, seeds at
both ends of int64, n choices, echo + log-probs, streams), and invalid ones (wrong types, numbers
beyond any range, NaN / Infinity as JSON tokens, lone surrogates in values and keys, nesting 33
to 100,000 levels deep, arrays of 150,000 ids, unknown fields, token ids out of range, malformed
or truncated JSON, oversized bodies, unknown routes and methods, bad or missing API keys). They
are sent in-process (httpx's ASGI transport against `create_app` on a tiny model with a head
classifier over it, so /v1/embeddings and /v1/classify are fuzzed beside generation: loopback
only, nothing listens) by several concurrent senders, while "witness" calls (greedy and seeded
streams, a chat stream, a non-streaming call with log-probs) run over and over beside them.

It fails on any 5xx (a response or an error event inside a stream), on a valid request that is
not answered 200, on a 4xx that is not OpenAI-shaped, on a stream without `[DONE]`, and on any
witness run whose text or finish reason differs from the same call made alone (one bad request
used to end every stream in flight with a 500).

Bounded: LMFORGE_FUZZ_REQUESTS requests (300 here, a few seconds); the figures in docs/serve.md
come from `LMFORGE_FUZZ_REQUESTS=2400 python -m pytest -q -s tests/test_serve_fuzz.py`, which
prints one summary line.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from conftest import shakespeare_path
from lmforge.config import Config, ModelConfig
from lmforge.generate import SEED_MAX, SEED_MIN
from lmforge.model import Transformer
from lmforge.serve.api import create_app
from lmforge.tokenizer import Tokenizer
from lmforge.understand.classify import Classifier, Spec
from lmforge.understand.embed import Embedder
from lmforge.understand.head import Head

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUESTS = int(os.environ.get("LMFORGE_FUZZ_REQUESTS", "300"))
SEED = int(os.environ.get("LMFORGE_FUZZ_SEED", "0"))
SENDERS = 6  # fuzz requests in flight at once
CONTEXT, MAX_TOKENS = 256, 48


@pytest.fixture(scope="module")
def app():
    torch.set_num_threads(1)
    tok = Tokenizer.train([shakespeare_path().read_text(encoding="utf-8")[:60_000]], 320)
    torch.manual_seed(0)  # a large init and an untied head: the greedy output depends on the whole context
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=CONTEXT,
                                    tie_embeddings=False, init_std=0.5)).eval()
    return create_app(model, tok, model_name="tiny", max_batch=8, max_queue=64, max_tokens=MAX_TOKENS, api_key=KEY,
                      classifier=classifier(model, tok))


def classifier(model: Transformer, tok: Tokenizer) -> Classifier:
    """A head classifier over the served model in memory, so /v1/classify is fuzzed too (its numbers do not matter)."""
    rng = np.random.default_rng(0)
    dim = model.cfg.d_model
    head = Head(rng.standard_normal((3, dim)).astype(np.float32), np.zeros(3, np.float32), np.zeros(dim, np.float32),
                np.ones(dim, np.float32))
    spec = Spec(method="head", multi_label=False, labels=["a", "b", "c"], embedding={"fingerprint": {}}, threshold=0.5)
    return Classifier(Path("fuzz-clf"), spec, head, Embedder.from_model(model, tok, Config(model=model.cfg)))


# ---- what is sent ------------------------------------------------------------------------------


@dataclass
class Raw:
    """JSON text put into a body as is: what json.dumps cannot write (1e999, 100,000 levels)."""

    text: str


def dumps(body: Any) -> bytes:
    """A body as JSON bytes; NaN / Infinity become JSON-like tokens, lone surrogates \\ud800 escapes."""
    raws: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(body))
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000raw{i}\\u0000"', raw, 1)
    return text.encode()


@dataclass
class Call:
    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))
    expect: str = "any"  # "ok": must be 200; "any": must be < 500; "401"/"404"/"405"/"413": that status

    def describe(self) -> str:
        return f"{self.method} {self.path} {(self.content or b'')[:300]!r}"


TEXTS = ["ROMEO:", "To be, or not", "First Citizen:\nBefore we proceed", "O", "", "héllo wörld ✓", "日本語のテキスト",
         "🙂 and 🙃", "<|eos|> in the text", "a\u0000b", "tab\tand\r\nnewlines", "x" * 40]


def ids(rng: random.Random, vocab: int, n: int | None = None) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randint(1, 20) if n is None else n)]


def sampling(rng: random.Random) -> dict[str, Any]:
    """Legal but extreme sampling settings: every one of them must work."""
    out: dict[str, Any] = {}
    if rng.random() < 0.8:
        out["temperature"] = rng.choice([0, 0.0, 5e-324, 1e-300, 1e-39, 0.3, 1, 1.7, 1e308])
    if rng.random() < 0.5:
        out["top_p"] = rng.choice([1, 0.95, 0.5, 1e-300, 5e-324])
    if rng.random() < 0.3:
        out["top_k"] = rng.choice([0, -1, 1, 7, 10**30])
    if rng.random() < 0.5:
        out["seed"] = rng.choice([None, 0, 42, -1, SEED_MAX, SEED_MIN])
    if rng.random() < 0.3:
        out["n"] = rng.randint(1, 3)
    if rng.random() < 0.4:
        out["stream"] = True
        if rng.random() < 0.5:
            out["stream_options"] = {"include_usage": rng.random() < 0.5}
    if rng.random() < 0.3:
        out["stop"] = rng.choice(["\n", ["the", "e"], "ROMEO", [], None])
    if rng.random() < 0.2:
        out["ignore_eos"] = True
    if rng.random() < 0.2:
        out.update({"model": "anything", "user": "u-1", "presence_penalty": 0, "logit_bias": {}})
    return out


def valid_body(rng: random.Random, route: str, vocab: int) -> dict[str, Any]:
    messages = [{"role": rng.choice(["system", "developer", "user", "tool"]), "content": rng.choice(TEXTS)}
                for _ in range(rng.randint(0, 2))]
    messages.append(rng.choice([{"role": "user", "content": rng.choice(TEXTS)},
                                {"role": "user", "content": [{"type": "text", "text": rng.choice(TEXTS)}]}]))
    if rng.random() < 0.2:
        messages.insert(0, {"role": "assistant", "content": None})
    if route == "/v1/completions":
        prompt = rng.choice([rng.choice(TEXTS[:4]), [rng.choice(TEXTS[:4]), rng.choice(TEXTS[:4])], ids(rng, vocab),
                             [ids(rng, vocab), ids(rng, vocab)]])
        body = {"prompt": prompt, "max_tokens": rng.randint(0, 12), **sampling(rng)}
        if rng.random() < 0.4:
            body["logprobs"] = rng.choice([0, 1, 5, 20])
        if rng.random() < 0.3:
            body["echo"] = True
        return body
    if route == "/v1/chat/completions":
        body = {"messages": messages, **sampling(rng)}
        body[rng.choice(["max_tokens", "max_completion_tokens"])] = rng.randint(0, 12)
        if rng.random() < 0.3:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        return body
    if route == "/tokenize":
        return rng.choice([{"prompt": rng.choice(TEXTS)}, {"messages": messages}])
    texts = [t for t in TEXTS if t.strip()]  # an empty text is refused by both routes below
    if route == "/v1/embeddings":
        body = {"input": rng.choice([rng.choice(texts), rng.sample(texts, rng.randint(1, 4)), ids(rng, vocab),
                                     [ids(rng, vocab), ids(rng, vocab)]])}
        if rng.random() < 0.3:
            body["encoding_format"] = rng.choice(["float", "base64"])
        if rng.random() < 0.3:
            body["dimensions"] = rng.randint(1, 32)
        if rng.random() < 0.3:
            body["input_type"] = rng.choice(["document", "query"])
        return body
    if route == "/v1/classify":
        body = {"input": rng.choice([rng.choice(texts), rng.sample(texts, rng.randint(1, 4))])}
        if rng.random() < 0.3:
            body["min_confidence"] = rng.choice([0, 0.0, 0.5, 1, 1.0, 5e-324])
        return body
    return {"tokens": ids(rng, vocab)}  # /detokenize


def evil_value(rng: random.Random) -> Any:
    """A value of the wrong type, beyond any range, not JSON, not text, or too big."""
    value = rng.choice([
        None, True, False, "", "x", "\ud800", "a\udfffb", "\udc00" * 3, [], {}, [1, "a"], {"a": 1}, {"\ud800": 1},
        0, -1, 1, 2**31, 2**63, 2**64, 2**64 + 1, SEED_MIN - 1, 10**30, 0.5, -0.0, 1e-320, 5e-324, 1e308, -1e308,
        float("nan"), float("inf"), float("-inf"), Raw("1e999"), Raw("-1e999"), [[1, 2], [3, [4]]], [None],
        ["\ud800"], [1.5], [True], "big number", "deep array", "deep object", "long array", "long string",
    ])
    depth = rng.choice([33, 200, 1000, 5000, 100_000])
    return {"big number": lambda: Raw("1" + "0" * 5000), "deep array": lambda: Raw("[" * depth + "]" * depth),
            "deep object": lambda: Raw('{"a":' * depth + "1" + "}" * depth), "long array": lambda: list(range(100_000)),
            "long string": lambda: "x" * 100_000}.get(value, lambda: value)() if isinstance(value, str) else value


FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stream",
          "stream_options", "stop", "seed", "echo", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
          "frequency_penalty", "best_of", "suffix", "ignore_eos", "model", "tokens", "user", "input", "encoding_format",
          "dimensions", "input_type", "min_confidence"]


def mutate(rng: random.Random, body: dict[str, Any], vocab: int) -> dict[str, Any]:
    """1-3 changes that make a body (likely) invalid."""
    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.45:
            body[rng.choice(FIELDS)] = evil_value(rng)
        elif kind < 0.55:
            body.pop(rng.choice(list(body) or ["prompt"]), None)
        elif kind < 0.65:
            body[rng.choice(["unknown", "x\ud800", "", "a" * 1000])] = evil_value(rng)
        elif kind < 0.8:  # the long ones are built only when picked; "input" for embeddings and classify
            body["input" if "input" in body else "prompt"] = rng.choice([lambda: [vocab], lambda: [-1], lambda: [2**63], lambda: [10**30], lambda: [1.5],
                                         lambda: [[1], "a"], lambda: [[]], lambda: [[2**70]], lambda: [True],
                                         lambda: [ids(rng, vocab, 300)], lambda: ids(rng, vocab, CONTEXT),
                                         lambda: "\ud800", lambda: ["ok", "\udfff"], lambda: ids(rng, vocab, 150_000)])()
        elif kind < 0.9:
            body["messages"] = rng.choice([[], "Hi", [{}], [{"role": "wizard", "content": "x"}], [{"role": "user"}],
                                           [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                                           [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                                           [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": 7}],
                                           [{"role": "\ud800", "content": "x"}]])
        else:
            body["tokens"] = rng.choice([lambda: [vocab], lambda: [-1], lambda: [2**64], lambda: [1.5], lambda: ["a"],
                                         lambda: [[1]], lambda: None, lambda: list(range(vocab)),
                                         lambda: ids(rng, vocab, 150_000)])()
    return body


def corrupt(rng: random.Random, good: bytes) -> bytes:
    cut = rng.randrange(max(len(good), 1))
    return rng.choice([
        lambda: b"", lambda: b"{", lambda: b"[1, 2]", lambda: b"null", lambda: b'"text"', lambda: b"NaN",
        lambda: b"\xff\xfe\x00", lambda: b"\xef\xbb\xbf" + good, lambda: good[:cut], lambda: good + b"}",
        lambda: good.replace(b'"', b"'"), lambda: rng.randbytes(64), lambda: b'{"prompt": "a", "prompt": 5}',
        lambda: b"[" * 100_000 + b"]" * 100_000, lambda: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        lambda: b'{"prompt": "' + b"a" * ((1 << 20) + 10) + b'"}',
    ])()


ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/embeddings", "/v1/classify"]


def fuzz_calls(rng: random.Random, n: int, vocab: int) -> Iterator[Call]:
    """n calls, built one at a time as the senders take them (a body may be 1 MiB)."""
    for _ in range(n):
        route, kind = rng.choice(ROUTES), rng.random()
        good = valid_body(rng, route, vocab)
        if kind < 0.25:  # valid, with extreme but legal settings
            yield Call("POST", route, dumps(good), expect="ok")
        elif kind < 0.75:
            yield Call("POST", route, dumps(mutate(rng, good, vocab)))
        elif kind < 0.85:
            content = corrupt(rng, dumps(good))
            yield Call("POST", route, content, expect="413" if len(content) > 1 << 20 else "any")
        elif kind < 0.92:  # bad or missing keys, on every route
            path = rng.choice(ROUTES + ["/v1/models", "/metrics", "/tokenizer_info", "/nowhere"])
            headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                  {"Authorization": "Basic " + KEY}, {"Authorization": f"Bearer {KEY}x"},
                                  {"Authorization": "Bearer"}])
            yield Call(rng.choice(["GET", "POST"]), path, dumps(good), headers, expect="401")
        else:  # the other routes, unknown routes, wrong methods
            method, path, expect = rng.choice([
                ("GET", "/v1/models", "ok"), ("GET", "/health", "ok"), ("GET", "/metrics", "ok"),
                ("GET", "/tokenizer_info", "ok"), ("GET", "/v1/completions", "405"), ("DELETE", "/tokenize", "405"),
                ("POST", "/health", "405"), ("GET", "/v1/nope", "404"), ("POST", "/v1/completions/x", "404"),
                ("PUT", "/v1/models", "405")])
            yield Call(method, path, dumps(good) if method != "GET" else None, expect=expect)


# ---- what comes back ---------------------------------------------------------------------------


def sse_events(text: str) -> list[Any]:
    return [e if e == "[DONE]" else json.loads(e)
            for e in (line[len("data: "):] for line in text.splitlines() if line.startswith("data: "))]


def problems(call: Call, r: httpx.Response) -> list[str]:
    """What is wrong with a response: "5xx" first when it is (or carries) a server error."""
    out = []
    if r.status_code >= 500:
        out.append("5xx")
    if call.expect == "ok" and r.status_code != 200:
        out.append("valid request refused")
    if call.expect.isdigit() and r.status_code != int(call.expect):
        out.append(f"expected {call.expect}")
    if 400 <= r.status_code < 600 and r.status_code != 499:
        try:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["code"] == str(r.status_code)
        except Exception:
            out.append("error not OpenAI-shaped")
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        events = sse_events(r.text)
        if not events or events[-1] != "[DONE]":
            out.append("stream without [DONE]")
        if any(isinstance(e, dict) and "error" in e and e["error"]["code"].startswith("5") for e in events):
            out.insert(0, "5xx")
    return out


@dataclass
class Witness:
    """A valid call run over and over beside the fuzz; each run must equal the same call alone."""

    path: str
    body: dict[str, Any]
    alone: tuple[str, list[str]] | None = None
    runs: int = 0
    harmed: list[str] = field(default_factory=list)

    async def once(self, client: httpx.AsyncClient) -> tuple[str, list[str]]:
        """(text, finish reasons) of one run; AssertionError when it did not end properly."""
        r = await client.post(self.path, json=self.body, headers=AUTH)
        assert r.status_code == 200, f"{r.status_code} {r.text[:300]}"
        chat = self.path.endswith("chat/completions")
        if not self.body.get("stream"):
            choices = r.json()["choices"]
            return "".join(c["message"]["content"] if chat else c["text"] for c in choices), [c["finish_reason"] for c in choices]
        events = sse_events(r.text)
        assert events and events[-1] == "[DONE]", f"stream without [DONE]: {r.text[-300:]}"
        assert not any("error" in e for e in events[:-1]), f"error event: {r.text[-300:]}"
        choices = [c for e in events[:-1] for c in e["choices"]]
        text = "".join(c["delta"].get("content") or "" if chat else c["text"] for c in choices)
        return text, [c["finish_reason"] for c in choices if c["finish_reason"]]

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.runs += 1
            try:
                got = await self.once(client)
            except AssertionError as e:
                self.harmed.append(f"{self.path} {self.body}: {e}")
                continue
            if got != self.alone:
                self.harmed.append(f"{self.path} {self.body}: {got!r} != alone {self.alone!r}")


WITNESSES = [
    ("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}),
    ("/v1/completions", {"prompt": "To be, or not", "max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 11,
                         "ignore_eos": True, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 32,
                              "temperature": 0, "stream": True}),
    ("/v1/completions", {"prompt": "First Citizen:", "max_tokens": 36, "temperature": 0, "logprobs": 3, "n": 2,
                         "ignore_eos": True}),
]


def test_fuzzed_requests_get_4xx_and_harm_no_valid_request(app) -> None:
    vocab = app.state.engine.vocab_size
    calls = fuzz_calls(random.Random(SEED), REQUESTS, vocab)
    witnesses = [Witness(path, body) for path, body in WITNESSES]
    failures: list[str] = []
    counts = {"sent": 0, "5xx": 0, "valid": 0, "valid refused": 0}

    async def scenario() -> float:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # an app error is a 500, not a raise
        async with httpx.AsyncClient(transport=transport, base_url="http://fuzz", timeout=120) as client:
            for w in witnesses:  # each alone first: what every run beside the fuzz must give
                w.alone = await w.once(client)
            stop = asyncio.Event()

            async def sender() -> None:
                for call in calls:  # one generator shared by the senders: the same calls for a seed
                    counts["sent"] += 1
                    counts["valid"] += call.expect == "ok"
                    r = await client.request(call.method, call.path, content=call.content, headers=call.headers)
                    found = problems(call, r)
                    counts["5xx"] += "5xx" in found
                    counts["valid refused"] += "valid request refused" in found
                    if found:
                        failures.append(f"{found} {r.status_code} {r.text[:300]!r} <- {call.describe()}")

            started = time.monotonic()
            watching = [asyncio.create_task(w.run(client, stop)) for w in witnesses]
            await asyncio.gather(*[sender() for _ in range(SENDERS)])
            stop.set()
            await asyncio.gather(*watching)
            return time.monotonic() - started

    app.state.engine.start()  # the ASGI transport does not run the lifespan
    try:
        seconds = asyncio.run(scenario())
    finally:
        app.state.engine.stop()
    runs, harmed = sum(w.runs for w in witnesses), [h for w in witnesses for h in w.harmed]
    print(f"\nserver fuzz (seed {SEED}): {counts['sent']} requests sent ({counts['valid']} valid, "
          f"{counts['sent'] - counts['valid']} invalid or unauthorized) over {len(ROUTES) + 4} routes with {SENDERS} in "
          f"flight, beside {runs} witness calls; 5xx: {counts['5xx']}; valid requests harmed: "
          f"{len(harmed) + counts['valid refused']} ({len(harmed)} witness runs, {counts['valid refused']} valid fuzz "
          f"requests refused); {seconds:.1f} s")
    assert not failures, f"{len(failures)} bad responses, e.g.:\n" + "\n".join(failures[:10])
    assert not harmed, f"{len(harmed)} of {runs} witness runs harmed, e.g.:\n" + "\n".join(harmed[:5])
    assert counts["sent"] == REQUESTS and runs >= len(witnesses) * 2  # all sent; the witnesses ran beside them
