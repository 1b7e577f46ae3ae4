"""Serving: the engine against `generate` (greedy and seeded, alone and in a batch), prompt
log-probs against a full forward, the API in-process (shapes, errors, auth on every route,
overload), and a real `lmforge serve` process driven by the official `openai` client.

The model is a random-initialised tiny Llama saved as a real checkpoint. A large init_std and an
untied head make its greedy output depend on the whole context (see tests/test_generate.py), so
a wrong position, cache row or mask changes the tokens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import TINY_CONFIG, lmforge_cmd, subprocess_env
from lmforge.config import load_config
from lmforge.generate import generate
from lmforge.model import Transformer
from lmforge.serve.api import create_app
from lmforge.errors import LmforgeError
from lmforge.serve.engine import Engine, Finished, QueueFull, Request, Token, run_requests
from lmforge.artifacts import load_model
from lmforge.train.checkpoint import save_checkpoint

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 512


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared CPU more threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset: Path, tmp_path_factory) -> Path:
    cfg = load_config(TINY_CONFIG, [f"data.path={tiny_dataset}", "model.vocab_size=512", f"model.max_seq_len={CONTEXT}",
                                    "model.n_head=4", "model.n_kv_head=2", "model.tie_embeddings=false",
                                    "model.init_std=0.5", "serve.max_tokens=480"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    run = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(run, 0, model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg,
                    trainer_state={}, tokenizer_path=tiny_dataset / "tokenizer.json")
    return run


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    loaded = load_model(checkpoint)
    return loaded.model, loaded.tokenizer


def prompts(tokenizer, n: int) -> list[list[int]]:
    lines = ["ROMEO:", "First Citizen:\nBefore we proceed", "To be, or not", "KING HENRY", "O", "My lord, the",
             "Enter GLOUCESTER and", "Thou art a"]
    return [tokenizer.encode(lines[i % len(lines)] + " x" * (i // len(lines))) for i in range(n)]


# ---- engine --------------------------------------------------------------------------------


def test_engine_greedy_equals_generate_alone_and_in_a_batch(loaded) -> None:
    model, tok = loaded
    ids = prompts(tok, 16)
    lengths = [5 + 3 * i for i in range(16)]  # rows finish at different steps; waiting ones join
    expected = [generate(model, p, max_tokens=n, stop_ids=[tok.eos_id]) for p, n in zip(ids, lengths)]
    assert len({tuple(e) for e in expected}) > 8  # the model's output depends on the prompt
    for max_batch in (16, 3, 1):
        engine = Engine(model, tok, max_batch=max_batch, max_queue=16).start()
        try:
            results = run_requests(engine, [Request(p, n, stop_ids=(tok.eos_id,)) for p, n in zip(ids, lengths)])
        finally:
            engine.stop()
        assert [r.tokens for r in results] == expected, f"max_batch={max_batch}"
        assert [r.text for r in results] == [tok.decode(e) for e in expected]


def test_engine_seeded_sampling_equals_generate(loaded) -> None:
    model, tok = loaded
    ids = prompts(tok, 4)
    engine = Engine(model, tok, max_batch=4).start()
    try:
        results = run_requests(engine, [Request(p, 20, temperature=0.8, top_k=50, top_p=0.9, seed=7 + i)
                                        for i, p in enumerate(ids)])
    finally:
        engine.stop()
    for i, (p, r) in enumerate(zip(ids, results)):
        assert r.tokens == generate(model, p, max_tokens=20, temperature=0.8, top_k=50, top_p=0.9, seed=7 + i)


def test_engine_prompt_logprobs_match_a_full_forward(loaded) -> None:
    model, tok = loaded
    p = prompts(tok, 2)[1]
    engine = Engine(model, tok, max_batch=2).start()
    try:
        (r,) = run_requests(engine, [Request(p, 0, logprobs=3, echo_logprobs=True)])
    finally:
        engine.stop()
    with torch.no_grad():
        lp = model(torch.tensor([p], device=next(model.parameters()).device))[0].log_softmax(-1)  # (T, V); the model is on the GPU when there is one
    assert r.tokens == [] and r.finish_reason == "length"
    assert r.prompt.logprobs[0] is None and r.prompt.top[0] is None
    reference = [float(lp[t - 1, p[t]]) for t in range(1, len(p))]
    assert r.prompt.logprobs[1:] == pytest.approx(reference, abs=1e-4)
    for t in range(1, len(p)):
        best = torch.topk(lp[t - 1], 3)
        assert [i for i, _ in r.prompt.top[t]] == best.indices.tolist()


def test_engine_stop_strings_cut_the_text_and_hold_back_partial_matches(loaded) -> None:
    model, tok = loaded
    p = prompts(tok, 1)[0]
    free = generate(model, p, max_tokens=40)
    text = tok.decode(free)
    stop = text[12:15]  # a string the greedy continuation is known to produce
    engine = Engine(model, tok, max_batch=2).start()
    try:
        (r,) = run_requests(engine, [Request(p, 40, stop=(stop,))])
    finally:
        engine.stop()
    assert r.finish_reason == "stop"
    assert r.text == text[: text.find(stop)]
    assert r.tokens == free[: len(r.tokens)] and len(r.tokens) < 40


def test_engine_cancel_and_timeout_free_the_slot(loaded) -> None:
    model, tok = loaded
    p = prompts(tok, 1)[0]
    engine = Engine(model, tok, max_batch=1, max_queue=4).start()
    events: list = []
    done = threading.Event()
    req = Request(p, 400)

    def sink(event) -> None:
        events.append(event)
        if isinstance(event, Token) and len(events) == 3:
            engine.cancel(req)
        if isinstance(event, Finished):
            done.set()

    req.sink = sink
    try:
        engine.submit([req])
        assert done.wait(60)
        assert events[-1].reason == "cancelled" and 3 <= len(events) - 1 < 400
        late = Request(p, 5, deadline=time.monotonic() - 1)  # already past its deadline
        (r,) = run_requests(engine, [late])
        assert r.finish_reason == "timeout" and r.tokens == []
        (r,) = run_requests(engine, [Request(p, 5)])  # the single slot is free again
        assert len(r.tokens) == 5
    finally:
        engine.stop()


def test_engine_starts_one_thread_and_stops_it(loaded) -> None:
    """A second start (an app's lifespan after a manual start) must not add a second decode
    thread; stop() must end the thread it started (it used to wake only one of two and wait out
    its 30 s join timeout)."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=1).start()
    first = engine.thread
    try:
        assert engine.start().thread is first
        assert sum(t.name == "lmforge-engine" and t.is_alive() for t in threading.enumerate()) == 1
        (r,) = run_requests(engine, [Request(prompts(tok, 1)[0], 3)])
        assert len(r.tokens) == 3
    finally:
        engine.stop()
    assert not first.is_alive()
    assert engine.start().thread is not first  # a stopped engine starts again
    engine.stop()


def test_queue_full_counts_what_max_queue_limits(loaded) -> None:
    """max_queue bounds the requests waiting for a slot; `waiting` also holds requests about to
    take free slots, which the 429 message used to count ("7 requests are waiting (max_queue 4)")."""
    model, tok = loaded
    p = prompts(tok, 1)[0]
    engine = Engine(model, tok, max_batch=4, max_queue=4)  # not started: step() by hand
    try:
        engine.submit([Request(p, 40) for _ in range(8)])  # 4 for the free slots, 4 queued
        with pytest.raises(QueueFull, match=r"^4 requests are waiting for a slot \(max_queue 4\)$"):
            engine.submit([Request(p, 40)])
        with torch.inference_mode():
            engine.step()  # admits 4: the same 4 still wait for a slot
        assert engine.active_slots == 4 and engine.queue_depth == 4
        with pytest.raises(QueueFull, match=r"^4 requests are waiting for a slot \(max_queue 4\)$"):
            engine.submit([Request(p, 40)])
    finally:
        engine.stop()
    engine = Engine(model, tok, max_batch=4, max_queue=4)
    engine.submit([Request(p, 40) for _ in range(6)])
    with pytest.raises(QueueFull, match=r"2 requests are waiting for a slot \(max_queue 4\); room for 2 more, these are 3"):
        engine.submit([Request(p, 40) for _ in range(3)])  # n=3 choices: all or none
    with pytest.raises(LmforgeError, match="more than this server's max_batch 4 \\+ max_queue 4 can hold; lower n"):
        engine.submit([Request(p, 40) for _ in range(9)])  # never fits: a 400, not a 429 to retry
    engine.stop()


# ---- API in-process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(loaded):
    model, tok = loaded
    app = create_app(model, tok, model_name="tiny", max_batch=4, max_queue=8, max_tokens=64, api_key=KEY,
                     max_body_bytes=4096)
    with TestClient(app) as c:
        yield c


def test_echo_logprobs_have_the_lm_eval_shape(client, loaded) -> None:
    model, tok = loaded
    p = prompts(tok, 2)[1]
    with torch.no_grad():
        lp = model(torch.tensor([p], device=next(model.parameters()).device))[0].log_softmax(-1)  # (T, V); the model is on the GPU when there is one
    for max_tokens, logprobs in ((0, 1), (1, 1), (0, 10), (1, 10)):
        r = client.post("/v1/completions", headers=AUTH,
                        json={"model": "tiny", "prompt": [p, p], "max_tokens": max_tokens, "echo": True,
                              "logprobs": logprobs, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1]
        for choice in body["choices"]:
            lps = choice["logprobs"]
            n = len(p) + max_tokens
            assert len(lps["tokens"]) == len(lps["token_logprobs"]) == len(lps["top_logprobs"]) == len(lps["text_offset"]) == n
            assert lps["tokens"][: len(p)] == [tok.decode([t]) for t in p]
            assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
            assert lps["token_logprobs"][1 : len(p)] == pytest.approx([float(lp[t - 1, p[t]]) for t in range(1, len(p))], abs=1e-4)
            for t in range(1, n):
                top = lps["top_logprobs"][t]
                assert 1 <= len(top) <= logprobs + 1  # fewer when tokens print alike (partial UTF-8)
                # lm-eval's is_greedy: the token's log-prob equals the best one exactly when greedy
                greedy = t >= len(p) or int(lp[t - 1].argmax()) == p[t]
                assert (lps["token_logprobs"][t] == max(top.values())) == greedy
            assert lps["text_offset"][:2] == [0, len(lps["tokens"][0])]
            assert choice["text"].startswith(tok.decode(p))
        assert body["usage"] == {"prompt_tokens": 2 * len(p), "completion_tokens": 2 * max_tokens,
                                 "total_tokens": 2 * (len(p) + max_tokens)}


def test_prompt_forms_and_streaming_agree(client, loaded) -> None:
    model, tok = loaded
    text = "ROMEO:"
    ids = tok.encode(text)
    expected = tok.decode(generate(model, ids, max_tokens=12, stop_ids=[tok.eos_id]))
    for prompt in (text, [text], ids, [ids]):
        r = client.post("/v1/completions", headers=AUTH, json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        assert r.json()["object"] == "text_completion"
    with client.stream("POST", "/v1/completions", headers=AUTH,
                       json={"prompt": text, "max_tokens": 12, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_default_template(client, loaded) -> None:
    model, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = client.post("/v1/chat/completions", headers=AUTH, json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tok.encode("System: Be brief.\nUser: Hi\nAssistant:")
    assert body["usage"]["prompt_tokens"] == len(ids)
    full = tok.decode(generate(model, ids, max_tokens=8, stop_ids=[tok.eos_id]))
    content = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["message"]["role"] == "assistant" and full.startswith(content)


def test_small_routes(client, loaded) -> None:
    _model, tok = loaded
    r = client.post("/tokenize", headers=AUTH, json={"prompt": "To be, or not"})
    assert r.json()["tokens"] == tok.encode("To be, or not") and r.json()["max_model_len"] == CONTEXT
    assert client.post("/detokenize", headers=AUTH, json={"tokens": r.json()["tokens"]}).json() == {"prompt": "To be, or not"}
    info = client.get("/tokenizer_info", headers=AUTH).json()
    assert info["vocab_size"] == tok.vocab_size and info["eos_token_id"] == tok.eos_id
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    metrics = client.get("/metrics", headers=AUTH).text
    for name in ("lmforge_queue_depth", "lmforge_active_slots", "lmforge_tokens_per_second",
                 "lmforge_request_latency_seconds_bucket", "lmforge_rejected_requests_total"):
        assert name in metrics


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "a", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "a", "max_tokens": 65}).encode(), 400, "limit of 64"),
    (json.dumps({"prompt": [1] * 500, "max_tokens": 64}).encode(), 400, f"context of {CONTEXT}"),
    (json.dumps({"prompt": [9999]}).encode(), 400, "within 0..511"),
    (json.dumps({"prompt": "a", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "a", "logprobs": 50}).encode(), 400, "logprobs"),
    (json.dumps({"prompt": []}).encode(), 400, "empty"),
    (json.dumps({"prompt": "a" * 5000}).encode(), 413, "4096 bytes"),
    (json.dumps({"prompt": "a", "max_tokens": True}).encode(), 400, "max_tokens: Input should be a valid integer, got a boolean"),
    (json.dumps({"prompt": "a", "max_tokens": "5"}).encode(), 400, "max_tokens"),
])
def test_bad_requests_are_4xx_with_a_message(client, body: bytes, status: int, words: str) -> None:
    r = client.post("/v1/completions", headers=AUTH, content=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("route,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Hi"}, {"role": "user"}]}, "messages.1.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": True},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "a", "n": True}, "n"),
    ("/v1/completions", {"prompt": "a", "logprobs": False}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "seed": True}, "seed"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 4.0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "a", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/detokenize", {"tokens": [True]}, "tokens.0"),
])
def test_invalid_fields_are_400s_naming_the_field(client, route: str, body: dict, param: str) -> None:
    """Roles are OpenAI's, only an assistant message may have null content, and no bool passes as
    a number (`"max_tokens": true` used to run as 1)."""
    r = client.post(route, headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param + ": ") and error["code"] == "400"


def test_every_openai_role_renders_and_assistant_content_may_be_null(client) -> None:
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Really."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
                {"role": "tool", "content": "42"}, {"role": "user", "content": [{"type": "text", "text": "And?"}]}]
    r = client.post("/v1/chat/completions", headers=AUTH, json={"messages": messages, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "a", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text  # an int is still a valid float


def test_error_code_is_a_string_like_openais(client) -> None:
    """OpenAI's error.code is a string or null; it was the HTTP status as an int."""
    for method, path, headers, status in (("GET", "/v1/models", {}, 401), ("GET", "/no/such/route", AUTH, 404),
                                          ("POST", "/v1/completions", AUTH, 400)):
        r = client.request(method, path, headers=headers, content=b"{}")
        assert r.status_code == status and r.json()["error"]["code"] == str(status), r.text


def test_timed_out_streams_count_in_metrics(loaded) -> None:
    """A stream that times out sends an error event after its 200; it is rejected for the same
    reason as a 504 and counts the same (it was not counted at all)."""
    model, tok = loaded
    app = create_app(model, tok, max_tokens=64, request_timeout=1e-6)  # every request is late
    with TestClient(app) as c:
        for stream in (False, True, False, True):
            with c.stream("POST", "/v1/completions", json={"prompt": "O", "max_tokens": 8, "stream": stream}) as r:
                r.read()
        assert 'lmforge_rejected_requests_total{reason="timeout"} 4.0' in c.get("/metrics").text


def test_auth_on_every_route(client) -> None:
    routes = [(m, route.path) for route in client.app.routes for m in sorted(getattr(route, "methods", ()))]
    assert {p for _m, p in routes} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                                       "/detokenize", "/tokenizer_info", "/health", "/metrics"}
    for method, path in routes + [("GET", "/no/such/route")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = client.request(method, path, headers=headers)
            assert (r.status_code == 401) == (path != "/health"), (method, path, headers, r.status_code)
        r = client.request(method, path, headers=AUTH)
        assert r.status_code != 401 and r.status_code < 500


def test_overload_gives_429_with_retry_after_and_keeps_serving(loaded) -> None:
    model, tok = loaded
    app = create_app(model, tok, max_batch=1, max_queue=2, max_tokens=64)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 40, "ignore_eos": True})
                                          for _ in range(12)])

    app.state.engine.start()  # ASGITransport does not run the lifespan
    try:
        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 3  # 1 running + 2 queued, at least
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
            else:
                assert r.json()["usage"]["completion_tokens"] == 40
        with TestClient(app) as c:  # still healthy, still serving
            assert c.post("/v1/completions", json={"prompt": "O", "max_tokens": 3}).status_code == 200
            assert 'lmforge_rejected_requests_total{reason="queue_full"}' in c.get("/metrics").text
    finally:
        app.state.engine.stop()


# ---- a real server process and the official openai client ---------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key.txt"
    key_file.write_text(KEY + "\n")
    proc = subprocess.Popen(lmforge_cmd("serve", str(checkpoint), "--port", "0", "--api-key-file", str(key_file),
                            "--max-batch", "8", "--max-queue", "64", "--threads", "1"),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # whatever fails below, the server process goes too
        # --port 0: the server picks a free port and must announce the real one, once it listens.
        watchdog = threading.Timer(120, proc.kill)  # a hung start ends the readline below
        watchdog.start()
        try:
            output = []
            while not (output and output[-1].startswith("serving ")):
                line = proc.stdout.readline()
                if not line:
                    pytest.fail(f"lmforge serve exited: {''.join(output)}")
                output.append(line)
        finally:
            watchdog.cancel()
        base = output[-1].split(" at ", 1)[1].split()[0].removesuffix("/v1")
        port = int(base.rsplit(":", 1)[1])
        assert port != 0, output[-1]
        socket.create_connection(("127.0.0.1", port), timeout=10).close()  # listening when announced
        for _ in range(600):  # up to ~60 s for imports on a loaded machine
            if proc.poll() is not None:
                pytest.fail(f"lmforge serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def openai_client(server: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client_completions_chat_streaming_and_logprobs(openai_client, loaded) -> None:
    model, tok = loaded
    expected = tok.decode(generate(model, tok.encode("ROMEO:"), max_tokens=16, stop_ids=[tok.eos_id]))
    c = openai_client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=16, temperature=0)
    assert c.choices[0].text == expected and c.usage.completion_tokens == 16
    streamed = "".join(ch.choices[0].text for ch in openai_client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=16, temperature=0, stream=True) if ch.choices)
    assert streamed == expected
    e = openai_client.completions.create(model="tiny", prompt="To be, or not", max_tokens=0, echo=True, logprobs=1,
                                         temperature=0)
    lps = e.choices[0].logprobs
    assert e.choices[0].text == "To be, or not" and lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert len(lps.tokens) == len(tok.encode("To be, or not")) and all(x < 0 for x in lps.token_logprobs[1:])
    chat = openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].logprobs.content) >= 1
    pieces = [ch.choices[0].delta.content or "" for ch in openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == chat.choices[0].message.content
    assert [m.id for m in openai_client.models.list().data] == ["tiny"]
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=openai_client.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context of 512"):
        openai_client.completions.create(model="tiny", prompt=[1] * 600, max_tokens=1)


def test_server_greedy_equals_lmforge_sample(server: str, checkpoint: Path) -> None:
    prompt = "First Citizen:\nBefore we proceed"
    out = subprocess.run(lmforge_cmd("sample", str(checkpoint), "--prompt", prompt, "--max-tokens", "40",
                                     "--temperature", "0"), capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    sampled = out.stdout.split("\n", 1)[1]  # after the "# path (step N)" header
    r = httpx.post(server + "/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": prompt, "max_tokens": 40, "temperature": 0})
    assert sampled == prompt + r.json()["choices"][0]["text"] + "\n"


def test_16_concurrent_greedy_requests_equal_their_sequential_results(openai_client, loaded) -> None:
    _model, tok = loaded
    texts = [tok.decode(p) for p in prompts(tok, 16)]
    lengths = [8 + 4 * i for i in range(16)]

    def one(i: int) -> str:
        return openai_client.completions.create(model="tiny", prompt=texts[i], max_tokens=lengths[i],
                                                 temperature=0).choices[0].text

    sequential = [one(i) for i in range(16)]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, one(i))) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [results[i] for i in range(16)] == sequential


def metric(server: str, name: str) -> float:
    for line in httpx.get(server + "/metrics", headers=AUTH, timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_disconnected_stream_frees_its_slot(server: str) -> None:
    body = {"prompt": "ROMEO:", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    before = metric(server, "lmforge_generation_tokens_total")
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server + "/v1/completions", headers=AUTH, json=dict(body, stream=True)) as r:
            next(r.iter_lines())  # the first token arrived; now hang up
    for _ in range(600):  # wait until the engine has dropped it (bounded; the test asserts no time)
        if metric(server, "lmforge_active_slots") == 0 and metric(server, "lmforge_queue_depth") == 0:
            break
        time.sleep(0.05)
    cancelled_tokens = metric(server, "lmforge_generation_tokens_total") - before
    full = httpx.post(server + "/v1/completions", headers=AUTH, json=body, timeout=120).json()
    assert full["usage"]["completion_tokens"] == 480  # left alone, the request runs to 480 tokens
    assert cancelled_tokens < 480


def test_refuses_a_public_host_without_a_key(checkpoint: Path) -> None:
    env = subprocess_env()
    env.pop("LMFORGE_API_KEY", None)
    out = subprocess.run(lmforge_cmd("serve", str(checkpoint), "--host", "0.0.0.0", "--port", str(free_port())),
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "refusing to serve on 0.0.0.0 without an API key" in out.stderr


def test_serve_checks_the_port_before_loading_anything(tmp_path: Path) -> None:
    from lmforge.serve.api import serve_command

    for port in (99999, -1):  # 99999 was uvicorn's OverflowError traceback after the model had loaded
        with pytest.raises(LmforgeError, match="--port .*65535"):
            serve_command(str(tmp_path / "no-such-run"), host=None, port=port, api_key=None, api_key_file=None,
                          insecure=False, max_batch=None, max_queue=None, max_tokens=None, model_name=None,
                          chat_template=None, request_timeout=600.0, max_body_bytes=1 << 20, threads=0)


def test_listen_says_which_port_is_taken() -> None:
    from lmforge.serve.api import listen

    sock = listen("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port != 0
        with pytest.raises(LmforgeError, match=f"cannot listen on 127.0.0.1:{port} .*; pick another --port"):
            listen("127.0.0.1", port)
    finally:
        sock.close()


def test_serve_on_a_port_in_use_is_one_clear_error(checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(lmforge_cmd("serve", str(checkpoint), "--port", str(port)),
                             capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "pick another --port" in out.stderr
    assert "serving" not in out.stdout + out.stderr and "Traceback" not in out.stderr and "Errno" not in out.stderr


def test_api_key_sources_and_loopback(tmp_path: Path, monkeypatch) -> None:
    from lmforge.errors import LmforgeError
    from lmforge.serve.api import is_loopback, resolve_api_key

    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    key_file = tmp_path / "key.txt"
    key_file.write_text("from-file\n")
    assert resolve_api_key("from-flag", str(key_file)) == "from-flag"
    assert resolve_api_key(None, str(key_file)) == "from-file"
    assert resolve_api_key(None, None) == "from-env"
    monkeypatch.delenv("LMFORGE_API_KEY")
    assert resolve_api_key(None, None) is None
    key_file.write_text("  \n")
    with pytest.raises(LmforgeError, match="is empty"):
        resolve_api_key(None, str(key_file))
    with pytest.raises(LmforgeError, match="cannot read the API key file"):
        resolve_api_key(None, str(tmp_path / "missing"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.com")


def test_request_timeout_is_a_504_and_an_error_event_in_a_stream(loaded) -> None:
    model, tok = loaded
    app = create_app(model, tok, max_tokens=64, request_timeout=1e-6)  # every request is late
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "O", "max_tokens": 8})
        assert r.status_code == 504 and "--request-timeout" in r.json()["error"]["message"]
        with c.stream("POST", "/v1/completions", json={"prompt": "O", "max_tokens": 8, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert json.loads(lines[0][len("data: "):])["error"]["code"] == "504" and lines[-1] == "data: [DONE]"
        assert c.get("/health").status_code == 200
