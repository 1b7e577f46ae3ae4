"""Decoding: the KV cache reproduces the full forward, greedy and sampled generation against
full-forward reference loops, the context-window policy, stop ids, and `lmforge sample`'s printing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge import generate as generate_module
from lmforge.artifacts import Loaded, Origin
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.generate import SEED_MAX, SEED_MIN, KVCache, generate, nth_seed, pick_token, sample_command, stream
from lmforge.model import Transformer, compile_blocks

# A large init_std and an untied head make the random model's greedy output depend on its whole
# context (a small tied init mostly echoes the last token), so a wrong window or cache shows up.
TINY = ModelConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, max_seq_len=24, tie_embeddings=False, init_std=0.5)


def build(cfg: ModelConfig = TINY, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def prompt(n: int, seed: int = 1, vocab: int = TINY.vocab_size) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head,tie", [(0, True), (2, False), (1, True)])
def test_cached_decoding_matches_full_forward_at_every_position(n_kv_head: int, tie: bool) -> None:
    cfg = replace(TINY, n_kv_head=n_kv_head, tie_embeddings=tie, init_std=0.02)  # logits O(1)
    model = build(cfg)
    idx = torch.tensor([prompt(cfg.max_seq_len, seed=2), prompt(cfg.max_seq_len, seed=3)])  # (2, T)
    with torch.no_grad():
        full = model(idx)  # (2, T, V)
        cache = KVCache(cfg, batch_size=2)
        # a prefill of 5, a chunk of 4, then one token at a time up to a full cache
        pieces = [model(idx[:, :5], cache=cache), model(idx[:, 5:9], cache=cache)]
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(9, cfg.max_seq_len)]
    assert cache.pos == cfg.max_seq_len
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_is_preallocated_and_overflow_is_an_error() -> None:
    cfg = replace(TINY, n_kv_head=2)
    cache = KVCache(cfg, batch_size=3)
    assert len(cache.k) == len(cache.v) == cfg.n_layer
    assert cache.k[0].shape == (3, 2, cfg.max_seq_len, cfg.head_dim)
    model = build(cfg)
    with torch.no_grad():
        model(torch.zeros(3, cfg.max_seq_len - 1, dtype=torch.long), cache=cache)
        with pytest.raises(LmforgeError, match="max_seq_len"):
            model(torch.zeros(3, 2, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_decode_step_rows_at_their_own_positions_match_each_rows_full_forward(n_kv_head: int) -> None:
    """`Transformer.decode` (the decode step of sample and serve): rows of one batched step sit at
    different positions of one cache; each row's logits are its own full forward's, two steps on
    (the first step's K/V were written where the second reads them), and other rows' slots and
    each row's positions beyond its own are never touched."""
    cfg = replace(TINY, n_kv_head=n_kv_head, init_std=0.02)
    model = build(cfg)
    prompts = [prompt(n, seed=10 + n) for n in (3, 9, 5)]
    S = 16
    k = [torch.zeros(3, cfg.kv_heads, S, cfg.head_dim) for _ in range(cfg.n_layer)]
    v = [torch.zeros(3, cfg.kv_heads, S, cfg.head_dim) for _ in range(cfg.n_layer)]
    with torch.no_grad():
        for b, ids in enumerate(prompts):  # each row prefilled alone, then copied into its row of the batch cache
            alone = KVCache(cfg, max_len=S)
            model(torch.tensor([ids]), cache=alone)
            for layer in range(cfg.n_layer):
                k[layer][b], v[layer][b] = alone.k[layer][0], alone.v[layer][0]
        beyond = [(k[0][b, :, len(ids) + 2 :].clone()) for b, ids in enumerate(prompts)]
        contexts = [list(ids) for ids in prompts]
        for step in range(2):
            new = [prompt(1, seed=20 + 3 * step + b)[0] for b in range(3)]
            positions = torch.tensor([[len(c)] for c in contexts])
            got = model.decode(torch.tensor([[t] for t in new]), positions, k, v)  # (3, V)
            for b, c in enumerate(contexts):
                c.append(new[b])
                torch.testing.assert_close(got[b], model(torch.tensor([c]))[0, -1], rtol=1e-5, atol=1e-5)
    for b, ids in enumerate(prompts):
        assert torch.equal(k[0][b, :, len(ids) + 2 :], beyond[b])  # nothing written past a row's own positions


def test_decode_step_beyond_the_cache_is_an_error() -> None:
    model = build()
    cache = KVCache(TINY, max_len=4)
    with torch.no_grad(), pytest.raises(LmforgeError, match="beyond the KV cache"):
        model.decode(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4]]), cache.k, cache.v)


def test_compiled_decode_gives_the_eager_tokens_and_logits() -> None:
    """`sample/serve --compile`: the blocks' decode step through torch.compile (one graph for
    every block) decodes the same greedy tokens, with logits equal up to float rounding."""
    import torch._dynamo

    model = build(replace(TINY, n_kv_head=2))
    ids = prompt(6)
    eager = generate(model, ids, max_tokens=12)
    cache = KVCache.for_model(model, max_len=8)
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache)
        step = (torch.tensor([[3]]), torch.tensor([[6]]), cache.k, cache.v)
        want = model.decode(*step)
        generate_module.compile_decode(model)
        model.aot_decode = None  # the per-block step alone (one row's step compiled ahead of time: tests/test_aot.py)
        compile_blocks(model, "decode")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert all("decode" in vars(block) for block in model.model.layers) and "logits" in vars(model)
        # a user's mistake in the first compiled step is an error, not a compiler failure to fall back from
        with pytest.raises(LmforgeError, match="beyond the KV cache"):
            generate_module.decode_step(model, step[0], torch.tensor([[8]]), cache.k, cache.v)
        assert all("decode" in vars(block) for block in model.model.layers)
        torch.testing.assert_close(generate_module.decode_step(model, *step), want, rtol=1e-5, atol=1e-5)
    assert generate(model, ids, max_tokens=12) == eager
    # two graphs, each for every step: one for both blocks, one for the final norm and head
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_a_failed_decode_compile_warns_once_and_decodes_eagerly(monkeypatch, capsys, tmp_path) -> None:
    """A machine without a C++ compiler: the step compiled ahead of time fails to build (one
    warning), the per-block graphs then fail at their first call (one warning), and every step
    decodes eagerly, with the eager tokens."""
    def broken(fn, **kwargs):  # what a machine without a C++ compiler gives at the first compiled call
        def call(*args, **kw):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\ng++: not found")
        return call

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\ng++: not found")

    import torch._inductor

    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    model = build()
    ids = prompt(5)
    eager = generate(model, ids, max_tokens=10)
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    generate_module.compile_decode(model)
    assert generate(model, ids, max_tokens=10) == eager
    assert generate(model, ids, max_tokens=10) == eager
    err = capsys.readouterr().err
    assert err.count("could not compile the decode step ahead of time") == 1
    assert err.count("torch.compile could not build") == 1 and "decoding without --compile" in err
    assert all("decode" not in vars(block) for block in model.model.layers) and "logits" not in vars(model)


# ---- generation against full-forward references ---------------------------------------------


def reference_greedy(model: Transformer, ids: list[int], max_tokens: int) -> list[int]:
    """Argmax of a full forward over the context at every step, with the documented window
    policy: the prompt keeps its last L tokens; a full window slides to its last L // 2 tokens."""
    L = model.cfg.max_seq_len
    context, out = list(ids)[-L:], []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([context]))[0, -1].argmax())
            out.append(token)
            if len(context) == L:  # the cache would be full: slide
                context = context[-(L // 2 - 1) :]
            context.append(token)
    return out


@pytest.mark.parametrize("n_prompt,max_tokens", [(5, 12), (1, 60), (40, 10)])
def test_greedy_equals_argmax_loop_of_full_forwards(n_prompt: int, max_tokens: int) -> None:
    # (1, 60) slides the window twice; (40, 10) starts from a prompt longer than max_seq_len
    model = build()
    ids = prompt(n_prompt)
    got = generate(model, ids, max_tokens=max_tokens)
    assert got == reference_greedy(model, ids, max_tokens)
    assert len(got) == max_tokens


def test_window_slides_to_half_its_length_when_the_cache_is_full() -> None:
    model = build()
    calls: list[tuple[int, int]] = []  # (position of the call's first token, tokens in the call)
    model.register_forward_pre_hook(  # a prefill
        lambda mod, args, kwargs: calls.append((kwargs["cache"].pos, args[0].shape[1])), with_kwargs=True
    )
    decode = model.decode  # a decode step

    def recorded(idx: torch.Tensor, positions: torch.Tensor, k, v) -> torch.Tensor:
        calls.append((int(positions[0, 0]), idx.shape[1]))
        return decode(idx, positions, k, v)

    model.decode = recorded
    L = TINY.max_seq_len
    generate(model, prompt(30), max_tokens=L)
    # the prompt's last L tokens fill the cache; the first new token slides to L // 2 tokens,
    # then single tokens until the cache is full again, then another slide
    assert calls[:3] == [(0, L), (0, L // 2), (L // 2, 1)]
    assert calls[2 : L // 2 + 2] == [(pos, 1) for pos in range(L // 2, L)]
    assert calls[L // 2 + 2] == (0, L // 2)
    assert len(calls) == L  # no forward after the last token


def test_long_prompt_keeps_its_last_tokens() -> None:
    model = build()
    ids = prompt(50)
    assert generate(model, ids, max_tokens=8) == generate(model, ids[-TINY.max_seq_len :], max_tokens=8)


def test_seeded_sampling_is_reproducible_and_uses_no_global_rng() -> None:
    model = build()
    ids = prompt(4)
    state = torch.get_rng_state()
    a = generate(model, ids, max_tokens=20, temperature=1.0, seed=7)
    torch.manual_seed(123)  # the global RNG has no say
    b = generate(model, ids, max_tokens=20, temperature=1.0, seed=7)
    c = generate(model, ids, max_tokens=20, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    torch.set_rng_state(state)
    generate(model, ids, max_tokens=5, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)


def test_top_k_1_equals_greedy() -> None:
    model = build()
    ids = prompt(6)
    greedy = generate(model, ids, max_tokens=15)
    assert generate(model, ids, max_tokens=15, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(model, ids, max_tokens=15, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_stop_id_stops_and_is_not_returned() -> None:
    model = build()
    ids = prompt(3)
    free = generate(model, ids, max_tokens=20)
    stop = free[5]
    first = free.index(stop)
    assert generate(model, ids, max_tokens=20, stop_ids=(stop,)) == free[:first]
    assert list(stream(model, ids, max_tokens=0)) == []


def test_pick_token_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, 1.0, -5.0])
    g = torch.Generator().manual_seed(0)
    assert pick_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=g) == 1
    draws = {pick_token(logits, temperature=2.0, top_k=2, top_p=1.0, generator=g) for _ in range(200)}
    assert draws == {1, 2}  # only the two best, and both of them
    # probabilities at T=1: ~[0.02, 0.50, 0.45, 0.07, 0.00]; top_p 0.9 keeps tokens 1 and 2 only
    draws = {pick_token(logits, temperature=1.0, top_k=0, top_p=0.9, generator=g) for _ in range(300)}
    assert draws == {1, 2}
    draws = {pick_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=g) for _ in range(500)}
    assert {0, 1, 2, 3} <= draws


def test_tiny_temperature_and_top_p_sample_the_best_token() -> None:
    """logits / temperature overflowed to inf (inf - inf = NaN in the softmax) for temperature <=
    ~1e-38 in float32, and top_p = 1e-300 dropped every token: multinomial raised, and in the
    server that failed every request in the batch. Now every temperature > 0 and top_p in (0, 1]
    samples; near 0 they pick the best token."""
    logits = torch.tensor([0.0, 3.0, 2.9, 1.0, -5.0])
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-30, 1e-39, 1e-300, 5e-324):
        assert pick_token(logits, temperature=temperature, top_k=0, top_p=1.0, generator=g) == 1
        assert pick_token(logits.half(), temperature=temperature, top_k=2, top_p=1.0, generator=g) == 1
    for top_p in (1e-6, 1e-45, 1e-300, 5e-324):
        draws = {pick_token(logits, temperature=1.0, top_k=0, top_p=top_p, generator=g) for _ in range(50)}
        assert draws == {1}
    tied = torch.tensor([2.0, 2.0, -1.0])  # a tiny temperature samples among the best, never the rest
    assert {pick_token(tied, temperature=1e-300, top_k=0, top_p=1.0, generator=g) for _ in range(100)} == {0, 1}
    model = build()
    ids = prompt(5)
    greedy = generate(model, ids, max_tokens=12)
    assert generate(model, ids, max_tokens=12, temperature=1e-300, seed=1) == greedy
    assert generate(model, ids, max_tokens=12, temperature=1.0, top_p=1e-300, seed=1) == greedy


def test_seeds_are_64_bit_signed_and_nth_seed_wraps() -> None:
    model = build()
    ids = prompt(3)
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        assert len(generate(model, ids, max_tokens=3, temperature=1.0, seed=seed)) == 3
    assert nth_seed(5, 2) == 7 and nth_seed(SEED_MAX, 1) == SEED_MIN and nth_seed(SEED_MAX, 3) == SEED_MIN + 2
    assert nth_seed(-1, 1) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 3, "temperature": -1.0}, "temperature"),
        ({"max_tokens": 3, "temperature": float("nan")}, "temperature must be a finite number"),
        ({"max_tokens": 3, "temperature": float("inf")}, "temperature must be a finite number"),
        ({"max_tokens": 3, "top_k": -2}, "top_k"),
        ({"max_tokens": 3, "top_p": 0.0}, "top_p"),
        ({"max_tokens": 3, "top_p": float("nan")}, "top_p"),
        ({"max_tokens": 3, "temperature": 1.0, "seed": 2**64}, "seed must be a 64-bit signed integer"),
        ({"max_tokens": 3, "temperature": 1.0, "seed": SEED_MAX + 1}, "seed must be a 64-bit signed integer"),
        ({"max_tokens": 3, "temperature": 1.0, "seed": SEED_MIN - 1}, "seed must be a 64-bit signed integer"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(LmforgeError, match=match):
        generate(build(), [1, 2], **kwargs)


def test_empty_or_out_of_vocabulary_prompt_is_an_error() -> None:
    with pytest.raises(LmforgeError, match="empty"):
        generate(build(), [], max_tokens=3)
    with pytest.raises(LmforgeError, match="within"):
        generate(build(), [TINY.vocab_size], max_tokens=3)


# ---- lmforge sample -------------------------------------------------------------------------


class CharTokenizer:
    """Characters 'a'..: ids 1.., id 0 is the end-of-text token."""

    eos_id, bos_id, end_ids = 0, None, (0,)

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") + 1 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 1 + ord("a")) for i in ids if i)


def test_sample_command_prints_prompt_and_continuation(monkeypatch, capsys) -> None:
    cfg = replace(TINY, vocab_size=27)
    model = build(cfg)
    origin = Origin("checkpoint", Path("runs/x/checkpoints/step-000042"), 42, "x", "0" * 64)
    monkeypatch.setattr(generate_module, "load_model", lambda path, **_: Loaded(model, CharTokenizer(), None, origin))
    tok = CharTokenizer()
    kwargs = dict(max_tokens=10, temperature=0.0, top_k=0, top_p=1.0, seed=0)

    assert sample_command("runs/x", prompt="abc", num_samples=1, **kwargs) == 0
    out = capsys.readouterr().out
    greedy = generate(model, tok.encode("abc"), max_tokens=10, stop_ids=(0,))
    assert out == f"# runs/x (step 42)\nabc{tok.decode(greedy)}\n"

    assert sample_command("runs/x", prompt="abc", num_samples=2, **{**kwargs, "temperature": 1.0}) == 0
    out = capsys.readouterr().out
    assert "sample 1/2 (seed 0)" in out and "sample 2/2 (seed 1)" in out
    for seed in (0, 1):
        text = tok.decode(generate(model, tok.encode("abc"), max_tokens=10, temperature=1.0, seed=seed, stop_ids=(0,)))
        assert f"\nabc{text}\n" in out

    assert sample_command("runs/x", prompt="", num_samples=1, **kwargs) == 0  # starts from EOS
    assert capsys.readouterr().out.startswith("# runs/x (step 42)\n")

    # --compile: the decode step through torch.compile, the same greedy text, and a word on stderr about the wait
    assert sample_command("runs/x", prompt="abc", num_samples=1, compile=True, **kwargs) == 0
    captured = capsys.readouterr()
    assert captured.out == f"# runs/x (step 42)\nabc{tok.decode(greedy)}\n"
    assert "compiling the decode step" in captured.err
    assert model.aot_decode.runner is not None  # one stream: the step compiled ahead of time (lmforge/aot.py)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": float("nan")}, "top_p must be within"),
    ({"seed": 2**64}, "seed must be a 64-bit signed integer"),
    ({"prompt": "ab\udcff"}, "--prompt is not valid UTF-8"),  # a non-UTF-8 byte in argv (surrogateescape)
])
def test_sample_command_refuses_bad_settings_before_loading(monkeypatch, kwargs: dict, match: str) -> None:
    monkeypatch.setattr(generate_module, "load_model", lambda path, **_: pytest.fail("loaded a model for settings it must refuse"))
    settings = dict(prompt="abc", max_tokens=4, temperature=1.0, top_k=0, top_p=1.0, seed=0, num_samples=1)
    with pytest.raises(LmforgeError, match=match):
        sample_command("runs/x", **{**settings, **kwargs})


def test_sample_command_works_at_tiny_temperature_and_top_p(monkeypatch, capsys) -> None:
    """`lmforge sample --temperature 1e-300` / `--top-p 1e-300` printed a traceback; near 0 they are greedy."""
    model = build(replace(TINY, vocab_size=27))
    origin = Origin("checkpoint", Path("runs/x"), 1, "x", "0" * 64)
    monkeypatch.setattr(generate_module, "load_model", lambda path, **_: Loaded(model, CharTokenizer(), None, origin))
    settings = dict(prompt="abc", max_tokens=8, top_k=0, num_samples=2, seed=SEED_MAX)
    assert sample_command("runs/x", temperature=0.0, top_p=1.0, **settings) == 0
    greedy = capsys.readouterr().out
    for temperature, top_p in ((1e-300, 1.0), (1.0, 1e-300)):
        assert sample_command("runs/x", temperature=temperature, top_p=top_p, **settings) == 0
        out = capsys.readouterr().out
        assert out.split("-----", 2)[2] == greedy.split("-----", 2)[2]  # the same continuations
        assert f"(seed {SEED_MAX})" in out and f"(seed {SEED_MIN})" in out  # the second seed wraps
