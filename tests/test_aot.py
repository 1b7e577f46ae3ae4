"""The one-row decode step compiled ahead of time (lmforge/aot.py): the same numbers as the
per-block compiled step, one package per model shape (not per weights), a failed build that
falls back with one warning and leaves no file, and the steps it must not take."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from lmforge import aot
from lmforge.config import ModelConfig
from lmforge.generate import KVCache, compile_decode, decode_step, generate
from lmforge.model import Transformer, eager_blocks

# GQA (4 query heads on 2 K/V heads), untied head: the shapes of SmolLM2's step on a tiny scale
CFG = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=24,
                  tie_embeddings=False, init_std=0.5)


def build(seed: int = 0, cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def prompt(n: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def counted(model: Transformer) -> list[int]:
    """Wrap the model's ahead-of-time step so each call through it is counted."""
    calls = [0]
    step = model.aot_decode
    original = type(step).__call__

    class Counted(type(step)):  # type: ignore[misc]
        def __call__(self, *args):
            calls[0] += 1
            return original(self, *args)

    step.__class__ = Counted
    return calls


def test_the_ahead_of_time_step_decodes_as_the_per_block_step(tmp_path, monkeypatch) -> None:
    """Greedy tokens of the eager model; each one-row step's logits and K/V writes equal the
    per-block compiled step's (float rounding apart: the same loops, fused across blocks), at
    every attended length up to a full cache (L = S); several rows do not go through it."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    ids = prompt(6)
    model, blocks = build(), build()
    eager = generate(model, ids, max_tokens=16)
    compile_decode(model)
    compile_decode(blocks)
    blocks.aot_decode = None  # the per-block path alone
    calls = counted(model)
    assert generate(model, ids, max_tokens=16) == eager
    assert calls[0] == 15  # every decode step (the first token comes from the prefill)
    assert model.aot_decode.path is not None and model.aot_decode.path.is_file()
    assert [p.name for p in tmp_path.joinpath("aot").iterdir()] == [model.aot_decode.path.name]  # no temporary left

    S = 9
    caches = [KVCache.for_model(m, max_len=S) for m in (model, blocks)]
    with torch.no_grad():
        for m, cache in zip((model, blocks), caches):
            m(torch.tensor([ids[:3]]), cache=cache)
        for pos in range(3, S):  # the last step attends the whole cache
            token, where = torch.tensor([[ids[pos % 6]]]), torch.tensor([[pos]])
            got = decode_step(model, token, where, caches[0].k, caches[0].v)
            want = decode_step(blocks, token, where, caches[1].k, caches[1].v)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert got.shape == (1, CFG.vocab_size)
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        before = calls[0]
        two = [KVCache.for_model(model, batch_size=2, max_len=S) for _ in range(2)]
        rows = (torch.tensor([[1], [2]]), torch.tensor([[3], [5]]))
        torch.testing.assert_close(decode_step(model, *rows, two[0].k, two[0].v),
                                   decode_step(blocks, *rows, two[1].k, two[1].v), rtol=1e-5, atol=1e-5)
        assert calls[0] == before  # a batch of two rows took the per-block step
    eager_blocks(model, "decode")
    assert model.aot_decode is None


def test_one_package_serves_every_model_of_a_shape(tmp_path, monkeypatch) -> None:
    """The key covers the structure, not the values: a model with other weights loads the package
    the first one built (no export) and decodes with its own weights; another dtype, shape or
    thread count is another key."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    ids = prompt(5)
    first = build(seed=0)
    compile_decode(first)
    generate(first, ids, max_tokens=3)
    other = build(seed=7)
    eager = generate(other, ids, max_tokens=12)
    assert aot.package_key(other, 1) == aot.package_key(first, 1)

    def no_export(*args):
        raise AssertionError("the package was compiled again")

    monkeypatch.setattr(aot, "_export", no_export)
    compile_decode(other)
    assert generate(other, ids, max_tokens=12) == eager
    assert other.aot_decode.runner is not None and other.aot_decode.path == first.aot_decode.path

    # a damaged package (truncated outside lmforge) is compiled once more, not a failure
    monkeypatch.undo()
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    first.aot_decode.path.write_bytes(b"not a package")
    exports = []
    real = aot._export
    monkeypatch.setattr(aot, "_export", lambda model, path, threads: exports.append(path) or real(model, path, threads))
    third = build(seed=3)
    want = generate(third, ids, max_tokens=12)
    compile_decode(third)
    assert generate(third, ids, max_tokens=12) == want
    assert exports == [first.aot_decode.path] and third.aot_decode.runner is not None
    assert (first.aot_decode.path.stat().st_mode & 0o777) == 0o666 & ~current_umask()

    key = aot.package_key(first, 1)
    assert aot.package_key(first, 2) != key
    assert aot.package_key(build(cfg=replace(CFG, n_layer=3)), 1) != key
    assert aot.package_key(build().to(torch.bfloat16), 1) != key


def test_a_failed_build_warns_once_leaves_no_file_and_decodes_with_the_blocks(tmp_path, monkeypatch, capsys) -> None:
    """A compiler failure mid-write (no C++ compiler, a full disk) leaves no package or temporary
    behind, warns once, and every step takes the per-block path, with the eager tokens."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))

    def broken(program, package_path, **kwargs):
        with open(package_path, "wb") as f:
            f.write(b"half a package")
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\ng++: not found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    model = build()
    ids = prompt(5)
    eager = generate(model, ids, max_tokens=10)
    compile_decode(model)
    assert generate(model, ids, max_tokens=10) == eager
    assert generate(model, ids, max_tokens=10) == eager
    err = capsys.readouterr().err
    assert err.count("could not compile the decode step ahead of time") == 1 and "CppCompileError" in err
    assert model.aot_decode.failed and model.aot_decode.runner is None
    assert os.listdir(tmp_path / "aot") == []
    assert all("decode" in vars(block) for block in model.model.layers)  # the per-block step stands


def test_models_with_lora_layers_keep_the_per_block_step() -> None:
    """An adapter is toggled or switched per request: a graph exported with one state would
    ignore the next, so a model with LoRA layers gets no ahead-of-time step."""
    from lmforge.config import LoraConfig
    from lmforge.lora import attach

    model = build()
    attach(model, LoraConfig(rank=2))
    compile_decode(model)
    assert model.aot_decode is None and not aot.supported(model)
    plain = build()
    compile_decode(plain)
    assert isinstance(plain.aot_decode, aot.AotDecode) and aot.supported(plain)


def test_a_thread_count_met_mid_run_runs_the_package_at_hand(monkeypatch, tmp_path) -> None:
    """The first step compiles for its count; a later count loads its own package where one is
    cached and otherwise runs the nearest package it has (no compile mid-stream)."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    loads: list[int] = []

    def load(self, model, threads):
        loads.append(threads)
        return f"runner for {threads}"

    monkeypatch.setattr(aot.AotDecode, "_load", load)
    step, model = aot.AotDecode(), build()
    cached = step.package(model, 4)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    before = torch.get_num_threads()
    try:
        for threads, runner in ((2, 2), (1, 2), (3, 2), (2, 2), (4, 4), (3, 4), (1, 2)):
            torch.set_num_threads(threads)
            assert step.ready(model) and step.runner == f"runner for {runner}"
    finally:
        torch.set_num_threads(before)
    assert loads == [2, 4]


def test_a_package_for_two_threads_runs_at_one_and_at_three(tmp_path, monkeypatch) -> None:
    """Kernels built for 2 threads size their per-thread sums at run time: at 1 and at 3 threads
    (more than built: fixed-size per-thread sums would be written past) the logits are the
    per-block step's."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    model, blocks = build(), build()
    compile_decode(model)
    compile_decode(blocks)
    blocks.aot_decode = None
    ids = prompt(6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            cache = KVCache.for_model(model, max_len=8)
            model(torch.tensor([ids]), cache=cache)
            assert model.aot_decode.ready(model) and list(model.aot_decode.runners) == [2]
            for threads in (1, 3):
                torch.set_num_threads(threads)
                k, v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
                step = (torch.tensor([[3]]), torch.tensor([[6]]))
                got = decode_step(model, *step, cache.k, cache.v)
                assert model.aot_decode.runner is model.aot_decode.runners[2]
                torch.testing.assert_close(got, decode_step(blocks, *step, k, v), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
