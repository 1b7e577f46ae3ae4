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
import signal
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


def test_engine_packs_a_prepared_fp32_model_and_keeps_greedy_tokens(checkpoint: Path, monkeypatch) -> None:
    """serve's model (`load_for_decoding`: fp32 in the decoding layout) gets the layers whose
    prepacked product measures faster prepacked for the batched decode (lmforge/quant.py
    `pack_measured`; here every layer, as a made-up timer says); greedy tokens stay those of
    `generate`."""
    from lmforge import quant
    from lmforge.generate import load_for_decoding
    from lmforge.quant import PackedLinear, _onednn

    monkeypatch.setattr(quant, "_best_seconds", lambda form, shape, rows, call: 1.0 if form == "plain" else 0.5)
    loaded = load_for_decoding(checkpoint)
    model, tok = loaded.model, loaded.tokenizer
    ids = prompts(tok, 16)
    lengths = [5 + 3 * i for i in range(16)]
    expected = [generate(model, p, max_tokens=n, stop_ids=[tok.eos_id]) for p, n in zip(ids, lengths)]
    engine = Engine(model, tok, max_batch=16, max_queue=16).start()
    try:
        results = run_requests(engine, [Request(p, n, stop_ids=(tok.eos_id,)) for p, n in zip(ids, lengths)])
    finally:
        engine.stop()
    packs = _onednn() and model.lm_head.weight.device.type == "cpu"
    assert isinstance(model.lm_head, PackedLinear) is packs
    assert all(isinstance(getattr(parent, attr), PackedLinear) is packs for parent, attr in quant.projections(model))
    assert sorted(engine.packed) == (sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj", "lm_head"]) if packs else [])
    assert [r.tokens for r in results] == expected


def test_a_compiled_engine_warms_up_before_serving_and_keeps_greedy_tokens(checkpoint: Path) -> None:
    """`serve --compile`: the engine compiles its decode step before the first request (a batch of
    one row ahead of time, one of several rows per block: reused for every later step), then serves the tokens
    of eager `generate`, with whichever layers measured faster prepacked (`quant.pack_measured`)."""
    import torch._dynamo

    from lmforge.generate import compile_decode, load_for_decoding
    from lmforge.model import eager_blocks

    loaded = load_for_decoding(checkpoint, compile=True)
    model, tok = loaded.model, loaded.tokenizer
    ids = prompts(tok, 6)
    lengths = [4 + 3 * i for i in range(6)]
    eager_blocks(model)
    expected = [generate(model, p, max_tokens=n, stop_ids=[tok.eos_id]) for p, n in zip(ids, lengths)]
    compile_decode(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = Engine(model, tok, max_batch=4, max_queue=16)
    with torch.inference_mode():
        engine._warm_up()  # what start() does first on the engine thread
    warm = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # a batch of one row: the step compiled ahead of time (lmforge/aot.py; its export is one graph);
    # several rows: the blocks and the final norm + head (each maybe once more where a length was specialised)
    assert model.aot_decode.runner is not None
    assert 3 <= warm <= 5
    engine.start()
    try:
        results = run_requests(engine, [Request(p, n, stop_ids=(tok.eos_id,)) for p, n in zip(ids, lengths)])
    finally:
        engine.stop()
    assert [r.tokens for r in results] == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == warm  # no step compiled again


def test_prefill_groups_split_sorted_prompts_where_padding_costs_more_than_a_forward() -> None:
    from lmforge.serve.engine import prefill_groups

    lengths = [21, 21, 23, 28, 29, 33, 34, 40, 43, 47, 48, 51, 51, 53, 54, 56]  # benchmarks/decode.py's 16 prompts
    assert prefill_groups(lengths, 32) == [(0, 3), (3, 7), (7, 16)]  # 709 positions computed instead of 896
    assert prefill_groups(lengths, 10**6) == [(0, 16)]  # a forward dearer than any padding: one
    assert prefill_groups([5, 5, 9], 0) == [(0, 2), (2, 3)]  # no cost: no padding at all
    assert prefill_groups([7], 32) == [(0, 1)] and prefill_groups([], 32) == []
    for cost in (0, 4, 32, 500):
        runs = prefill_groups(lengths, cost)
        assert [a for a, _ in runs] == [0] + [b for _, b in runs[:-1]] and runs[-1][1] == len(lengths)  # a partition


def test_engine_prefills_prompts_of_unlike_lengths_in_separate_forwards(loaded, monkeypatch) -> None:
    """Prompts are sorted by length and prefilled in runs (`prefill_groups`); with no cost per forward
    every length gets its own. The greedy tokens stay those of `generate`, and a run whose forward
    fails is retried row by row without touching the other runs."""
    import lmforge.serve.engine as engine_module

    model, tok = loaded
    ids = prompts(tok, 8)
    ids[5] = ids[5][:1]  # one very short prompt among longer ones
    ids[6] = ids[7][:-1] + ids[6][:1]  # two prompts of one length: a run of two rows
    expected = [generate(model, p, max_tokens=12, stop_ids=[tok.eos_id]) for p in ids]
    monkeypatch.setattr(engine_module, "PREFILL_FORWARD_COST", 0)
    engine = Engine(model, tok, max_batch=8, max_queue=8)
    spans: list[tuple[int, int]] = []
    real = engine._prefill_forward

    def prefill_forward(a: int, b: int):
        spans.append((a, b))
        if b - a > 1 and spans.count((a, b)) == 1:  # the run's forward breaks; each row's own goes on
            raise RuntimeError("one run's forward broke")
        return real(a, b)

    engine._prefill_forward = prefill_forward
    engine.start()
    try:
        results = run_requests(engine, [Request(p, 12, stop_ids=(tok.eos_id,)) for p in ids])
    finally:
        engine.stop()
    assert [r.tokens for r in results] == expected
    lengths = sorted(map(len, ids))
    runs = engine_module.prefill_groups(lengths, 0)
    assert len(runs) == len(set(lengths)) > 2 and spans[0] == runs[0]
    assert all(lengths[a] == lengths[b - 1] for a, b in runs)  # each forward pads nothing
    two = next((a, b) for a, b in runs if b - a == 2)
    assert spans[spans.index(two) + 1 : spans.index(two) + 3] == [(two[0], two[0] + 1), (two[0] + 1, two[1])]  # alone


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


def run_collecting(engine: Engine, requests: list[Request], broken_sink: dict[int, int] | None = None,
                   timeout: float = 120) -> list[tuple[list[int], str]]:
    """Submit requests to a started engine; each one's (tokens, finish reason). broken_sink maps
    a request's index to the Token after which its sink raises."""
    results: dict[int, tuple[list[int], str]] = {}
    done = threading.Semaphore(0)

    def sink_for(i: int):
        tokens: list[int] = []

        def sink(event) -> None:
            if isinstance(event, Token):
                tokens.append(event.id)
                if (broken_sink or {}).get(i) == len(tokens):
                    raise RuntimeError("this client's sink broke")
            elif isinstance(event, Finished):
                results[i] = (tokens, event.reason)
                done.release()

        return sink

    for i, req in enumerate(requests):
        req.sink = sink_for(i)
    engine.submit(requests)
    for _ in requests:
        assert done.acquire(timeout=timeout), "a request never finished"
    return [results[i] for i in range(len(requests))]


def test_a_failing_request_fails_alone_and_the_batch_goes_on(loaded, monkeypatch) -> None:
    """One request carrying `"seed": 2**64` used to fail every request in flight with a 500: the
    engine failed all its slots when a step raised. Now a failure while sampling, in a sink, or in
    a forward fails only its own row; every other request gets exactly the tokens it gets alone."""
    import lmforge.serve.engine as engine_module

    model, tok = loaded
    good = prompts(tok, 6)
    n = 24
    expected = [generate(model, p, max_tokens=n, stop_ids=[tok.eos_id]) for p in good]
    # A token the forward refuses to see (a prompt with it fails in prefill), and one the decode of
    # `late_bad`'s greedy continuation feeds (it fails mid-decode): neither occurs anywhere else.
    late_bad = tok.encode("Lucio, the duke")
    late_tokens = generate(model, late_bad, max_tokens=n, stop_ids=[tok.eos_id])
    used = {t for p, e in zip(good, expected) for t in p + e} | set(late_bad)
    late_poison = next(t for t in late_tokens[2:-1] if t not in used)
    used |= set(late_tokens)
    prefill_poison = next(t for t in range(3, tok.vocab_size) if t not in used)

    def poisoned(run):  # a forward (prefill) or decode step that cannot take these tokens
        def call(idx, *args, **kwargs):
            if bool(((idx == prefill_poison) | (idx == late_poison)).any()):
                raise RuntimeError("a forward that cannot take this token")
            return run(idx, *args, **kwargs)
        return call

    real_pick = engine_module.pick_token

    def pick_token(logits, **kwargs):
        if kwargs["top_k"] == 13:  # the one sampled request marked to fail
            raise RuntimeError("sampling broke")
        return real_pick(logits, **kwargs)

    monkeypatch.setattr(engine_module, "pick_token", pick_token)
    monkeypatch.setattr(model, "forward", poisoned(model.forward))  # instance attributes, undone after the test
    monkeypatch.setattr(model, "decode", poisoned(model.decode))
    for max_batch in (8, 3):  # all at once; and bad ones joining (prefill) while good ones decode
        engine = Engine(model, tok, max_batch=max_batch, max_queue=16)
        engine.start()
        try:
            requests = [Request(p, n, stop_ids=(tok.eos_id,)) for p in good]
            requests[1:1] = [Request(good[0], n, temperature=1.0, top_k=13, seed=1)]  # fails when sampling
            requests[3:3] = [Request([prefill_poison, *good[2]], n)]  # fails in prefill
            requests.insert(5, Request(late_bad, n, stop_ids=(tok.eos_id,)))  # fails in a decode step
            requests.append(Request(good[1], n, stop_ids=(tok.eos_id,)))  # its sink raises at token 2
            results = run_collecting(engine, requests, broken_sink={len(requests) - 1: 2})
            bad = {1, 3, 5, len(requests) - 1}
            assert [reason for i, (_t, reason) in enumerate(results) if i in bad] == ["error"] * 4
            assert results[5][0] == late_tokens[: late_tokens.index(late_poison) + 1]  # failed feeding the poison
            assert [r for i, r in enumerate(results) if i not in bad] == [
                (e, "stop" if len(e) < n else "length") for e in expected], f"max_batch={max_batch}"
            (r,) = run_requests(engine, [Request(good[3], n, stop_ids=(tok.eos_id,))])  # still serving
            assert r.tokens == expected[3]
        finally:
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


USER = b'{"role": "user", "content": "Hi"}'


@pytest.mark.parametrize("route,body,param,words", [
    # each of these used to be a 500 (a plain-text one, or an engine error that failed every request in flight)
    ("/v1/completions", b'{"prompt": "a", "seed": 18446744073709551616}', "seed", "less than or equal to 9223372036854775807"),
    ("/v1/completions", b'{"prompt": "a", "seed": -9223372036854775809}', "seed", "greater than or equal to"),
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}', "temperature", "NaN is not a JSON number"),
    ("/v1/completions", b'{"prompt": "a", "top_p": Infinity}', "top_p", "Infinity is not a JSON number"),
    ("/v1/chat/completions", b'{"messages": [' + USER + b'], "temperature": -Infinity}', "temperature", "-Infinity"),
    ("/v1/completions", b'{"prompt": "a", "temperature": 1e999}', "temperature", "beyond a 64-bit float's range"),
    ("/v1/completions", b'{"prompt": "a", "frequency_penalty": -1e999}', "frequency_penalty", "beyond"),
    ("/v1/completions", b'{"prompt": "a", "logit_bias": {"5": NaN}}', "logit_bias.5", "NaN"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt", "lone surrogate (\\ud800 at character 0)"),
    ("/v1/completions", b'{"prompt": ["ok", "x\\udfff"]}', "prompt.1", "lone surrogate (\\udfff at character 1)"),
    ("/v1/completions", b'{"prompt": "a", "stop": ["\\ud800"]}', "stop.0", "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content", "surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages.0.content.0.text", "surrogate"),
    ("/v1/chat/completions", b'{"messages": [' + USER + b'], "stop": "\\ud800"}', "stop", "surrogate"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt", "surrogate"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', "messages.0.content", "surrogate"),
    ("/v1/completions", b'{"prompt": "a", "user\\ud800": 1}', "user\\ud800", "the key holds a lone surrogate"),
    ("/v1/completions", b'{"prompt": "a", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "x" + ".0" * 31, "deeper than 32 levels"),
    ("/v1/completions", b"[" * 2000 + b"]" * 2000, None, "nests deeper than 32 levels"),  # the parser's recursion
    ("/v1/completions", b'{"prompt": "a", "logit_bias": {"5": 1}}', "logit_bias", "not supported"),
    ("/v1/completions", b'{"prompt": "a", "presence_penalty": 0.5}', "presence_penalty", "not supported"),
    ("/v1/completions", b'{"prompt": "a", "suffix": "x"}', "suffix", "not supported"),
    ("/v1/completions", b'{"prompt": "a", "best_of": 3}', "best_of", "best_of = n"),
    ("/v1/completions", b'{"prompt": [1.5]}', "prompt", "prompt"),
    ("/v1/completions", b'{"prompt": [[1, -1]]}', "prompt", "within 0..511"),
    ("/v1/completions", b'{"prompt": [99999999999999999999999]}', "prompt", "within 0..511"),
    ("/detokenize", b'{"tokens": [1e400]}', "tokens.0", "beyond"),
    ("/detokenize", b'{"tokens": [1, 99999999999999999999999]}', "tokens", "within 0..511"),
    ("/detokenize", b'{"tokens": [2.0]}', "tokens.0", "valid integer"),
])
def test_values_no_model_input_can_mean_are_400s_naming_the_field(client, route: str, body: bytes, param: str | None,
                                                                  words: str) -> None:
    r = client.post(route, headers=AUTH, content=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["message"].startswith(param + ": ") if param else True
    assert client.post("/v1/completions", headers=AUTH, json={"prompt": "O", "max_tokens": 2}).status_code == 200


def test_any_temperature_top_p_and_seed_in_range_works(client, loaded) -> None:
    """temperature 1e-300 and top_p 1e-300 were engine errors (a NaN softmax); near 0 both are greedy."""
    model, tok = loaded
    expected = tok.decode(generate(model, tok.encode("ROMEO:"), max_tokens=10, stop_ids=[tok.eos_id]))
    for sampling in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-39, "top_k": 5},
                     {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e308, "top_p": 5e-324}):
        r = client.post("/v1/completions", headers=AUTH, json={"prompt": "ROMEO:", "max_tokens": 10, "seed": 3, **sampling})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected, (sampling, r.text)
    for seed in (-2**63, -1, 2**63 - 1):  # n choices use seed, seed + 1, ... wrapped within 64 bits
        r = client.post("/v1/completions", headers=AUTH, json={"prompt": "O", "max_tokens": 3, "seed": seed, "n": 3})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
    r = client.post("/v1/completions", headers=AUTH, json={"prompt": "O", "max_tokens": 3, "temperature": 1e308})
    assert r.status_code == 200, r.text


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


def sse_events(text: str) -> list:
    """A stream's events as JSON, and "[DONE]" as itself."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_shutdown_lets_calls_finish_within_the_grace_and_ends_the_rest_properly(loaded, monkeypatch) -> None:
    """Bridge.close (what SIGTERM / Ctrl-C run before uvicorn closes connections): new calls get a
    503; calls in flight may finish for the grace period; the rest end as a 503, in a stream as an
    error event followed by [DONE] (a stream used to be cut without [DONE])."""
    model, tok = loaded
    app = create_app(model, tok, max_batch=4, max_tokens=480)
    engine, bridge = app.state.engine, app.state.bridge

    def slow(run):  # about 20 ms a step: the short calls take under a second, the long ones 8 s
        def call(*args, **kwargs):
            time.sleep(0.02)
            return run(*args, **kwargs)
        return call

    monkeypatch.setattr(model, "forward", slow(model.forward))  # instance attributes, undone after the test
    monkeypatch.setattr(model, "decode", slow(model.decode))
    short = {"prompt": "ROMEO:", "max_tokens": 20, "ignore_eos": True, "temperature": 0}
    long = dict(short, max_tokens=400)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            calls = [asyncio.create_task(c.post("/v1/completions", json=dict(body, stream=stream)))
                     for body, stream in ((short, True), (long, True), (short, False), (long, False))]
            while len(bridge.live) < 4:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await bridge.close(2.5)
            closed = time.monotonic() - started
            late = await c.post("/v1/completions", json=short)
            return await asyncio.gather(*calls), late, closed

    engine.start()
    try:
        (short_stream, long_stream, short_call, long_call), late, closed = asyncio.run(scenario())
    finally:
        engine.stop()
        monkeypatch.undo()  # the reference below at full speed
    expected = tok.decode(generate(model, tok.encode("ROMEO:"), max_tokens=400))
    events = sse_events(short_stream.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == tok.decode(generate(model, tok.encode("ROMEO:"), max_tokens=20))
    assert short_call.status_code == 200 and short_call.json()["choices"][0]["finish_reason"] == "length"
    events = sse_events(long_stream.text)
    assert long_stream.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "503" and "shutting down" in events[-2]["error"]["message"]
    assert expected.startswith("".join(e["choices"][0]["text"] for e in events[:-2]))
    assert long_call.status_code == 503 and "shutting down" in long_call.json()["error"]["message"]
    assert late.status_code == 503 and late.json()["error"]["code"] == "503"
    assert 2.5 <= closed < 10 and not engine.busy


@pytest.mark.parametrize("sig,grace", [(signal.SIGTERM, "0"), (signal.SIGINT, "60")], ids=["SIGTERM-cut", "SIGINT-drain"])
def test_a_signal_ends_every_call_in_flight_properly_and_exits_0(checkpoint: Path, sig: int, grace: str) -> None:
    """SIGTERM during a stream ended it without [DONE], logged a CancelledError traceback, and the
    process died of the re-raised signal. Now: with --shutdown-grace 0 the calls in flight are cut
    at once (an error event + [DONE], a 503); with a long grace they finish; either way exit 0."""
    proc = subprocess.Popen(lmforge_cmd("serve", str(checkpoint), "--port", "0", "--max-batch", "1", "--threads", "1",
                                        "--shutdown-grace", grace),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        watchdog = threading.Timer(300, proc.kill)  # whatever hangs below, the test ends
        watchdog.start()
        line = ""
        while not line.startswith("serving "):
            line = proc.stdout.readline()
            assert line, "lmforge serve exited before it served"
        base = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
        # Choice 0 must still run when the waiting call queues behind it (with 120 tokens it could finish first
        # on an idle machine, and the queue never reached 4); the drain then finishes 5 x 480 tokens in seconds.
        n = 480
        body = {"prompt": "ROMEO:", "max_tokens": n, "ignore_eos": True, "temperature": 0}
        waiting: dict[str, httpx.Response] = {}
        call = threading.Thread(target=lambda: waiting.setdefault("r", httpx.post(base + "/v1/completions", json=body,
                                                                                    timeout=120)))
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=dict(body, n=4, stream=True), timeout=120) as r:
            for event in r.iter_lines():  # 5 x n tokens one at a time (--max-batch 1): seconds of work
                lines.append(event)
                if len(lines) == 1:  # choice 0 runs; the other 3 and then the call below wait for the slot
                    call.start()
                    deadline = time.monotonic() + 60
                    while metric(base, "lmforge_queue_depth") < 4:
                        assert time.monotonic() < deadline, "the other choices and the call never queued behind choice 0"
                        time.sleep(0.02)
                    proc.send_signal(sig)
                    signalled = time.monotonic()
        call.join()
        rc = proc.wait(timeout=120)
        took = time.monotonic() - signalled
        output = proc.stdout.read()
        watchdog.cancel()
    finally:
        proc.kill()
        proc.wait()
    events = sse_events("\n".join(lines))
    assert rc == 0, output
    assert "Traceback" not in output and "CancelledError" not in output and "graceful shutdown exceeded" not in output, output
    assert events[-1] == "[DONE]"
    if grace == "0":
        assert events[-2]["error"]["code"] == "503" and "shutting down" in events[-2]["error"]["message"]
        assert waiting["r"].status_code == 503 and waiting["r"].json()["error"]["code"] == "503"
        assert took < 30
    else:
        assert sorted(e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]) == [0, 1, 2, 3]
        assert {e["choices"][0]["finish_reason"] for e in events[:-1]} == {None, "length"}
        assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == n


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


# ---- /v1/embeddings ------------------------------------------------------------------------

EMBED_TEXTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "O", "To be, or not to be"]


def our_vectors(loaded, texts: list[str]):
    from lmforge.understand.embed import Embedder

    model, tok = loaded
    from lmforge.config import Config

    return Embedder.from_model(model, tok, Config(model=model.cfg)).embed(texts)


def test_embeddings_in_every_input_form_and_encoding(client, loaded) -> None:
    import base64

    import numpy as np

    model, tok = loaded
    want = our_vectors(loaded, EMBED_TEXTS)
    r = client.post("/v1/embeddings", json={"input": EMBED_TEXTS, "model": "anything"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and {d["object"] for d in body["data"]} == {"embedding"}
    n_tokens = sum(len(tok.encode(t)) for t in EMBED_TEXTS)
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert np.array_equal(got, want)  # the same batch through the same Embedder: bit for bit
    b64 = client.post("/v1/embeddings", json={"input": EMBED_TEXTS, "encoding_format": "base64"}, headers=AUTH).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    assert np.array_equal(decoded, want)
    one = client.post("/v1/embeddings", json={"input": EMBED_TEXTS[1]}, headers=AUTH).json()["data"]
    ids = client.post("/v1/embeddings", json={"input": tok.encode(EMBED_TEXTS[1])}, headers=AUTH).json()["data"]
    lists = client.post("/v1/embeddings", json={"input": [tok.encode(t) for t in EMBED_TEXTS[:2]]}, headers=AUTH).json()["data"]
    assert len(one) == len(ids) == 1 and len(lists) == 2
    assert np.allclose(one[0]["embedding"], want[1], atol=1e-5) and one[0]["embedding"] == ids[0]["embedding"]
    assert np.allclose(lists[1]["embedding"], want[1], atol=1e-5)
    short = client.post("/v1/embeddings", json={"input": EMBED_TEXTS, "dimensions": 16}, headers=AUTH).json()["data"]
    cut = want[:, :16] / np.linalg.norm(want[:, :16], axis=1, keepdims=True)
    assert np.allclose(np.array([d["embedding"] for d in short]), cut, atol=1e-6)


@pytest.mark.parametrize("body, param, words", [
    ({"input": []}, "input", "empty"),
    ({"input": ""}, "input", "empty string"),
    ({"input": ["a", ""]}, "input.1", "empty string"),
    ({"input": [[1, 2], []]}, "input.1", "empty list of token ids"),
    ({"input": [5, 9999]}, "input.0", "within 0..511"),
    ({"input": ["a"] * 9}, "input", "above this server's limit of 8 per request (--max-embed-inputs)"),
    ({"input": [1] * (CONTEXT + 1)}, "input.0", f"{CONTEXT + 1} tokens is more than this model's {CONTEXT}"),
    ({"input": "a", "dimensions": 10**6}, "dimensions", "above this model's"),
    ({"input": "a", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": ["a", 1]}, "input", ""),
    ({"input": "a", "input_type": "passage"}, "input_type", "document"),
])
def test_embeddings_refuse_what_cannot_be_embedded_with_a_400(loaded, body, param, words) -> None:
    model, tok = loaded
    app = create_app(model, tok, max_tokens=64, max_embed_inputs=8)
    with TestClient(app) as c:
        r = c.post("/v1/embeddings", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err


def test_embeddings_have_backpressure_429_when_the_worker_is_full(loaded, monkeypatch) -> None:
    model, tok = loaded
    app = create_app(model, tok, max_tokens=64, max_queue=1)
    worker = app.state.embed_worker
    gate = threading.Event()
    real = worker.embedder.embed_ids
    monkeypatch.setattr(worker.embedder, "embed_ids", lambda ids: (gate.wait(30), real(ids))[1])

    async def two() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            first = asyncio.create_task(c.post("/v1/embeddings", json={"input": "ROMEO:"}))
            while worker.admitted == 0:
                await asyncio.sleep(0.01)
            second = await c.post("/v1/embeddings", json={"input": "O"})
            gate.set()
            return [await first, second]

    first, second = asyncio.run(two())
    assert first.status_code == 200 and second.status_code == 429
    assert second.headers["retry-after"] == "1" and "busy" in second.json()["error"]["message"]
    worker.close()


def test_openai_client_embeddings_with_its_defaults_equal_ours(openai_client, loaded) -> None:
    import numpy as np

    want = our_vectors(loaded, EMBED_TEXTS)
    got = openai_client.embeddings.create(model="tiny", input=EMBED_TEXTS)  # the client's default: base64
    assert [d.index for d in got.data] == [0, 1, 2, 3] and got.usage.prompt_tokens > 0
    assert np.abs(np.array([d.embedding for d in got.data]) - want).max() < 1e-6
    floats = openai_client.embeddings.create(model="tiny", input="ROMEO:", encoding_format="float", dimensions=8)
    cut = want[0, :8] / np.linalg.norm(want[0, :8])
    assert np.allclose(floats.data[0].embedding, cut, atol=1e-6)
