"""lmforge's kernels (lmforge/kernels.py, lmforge/csrc/): the fused decode-attention kernel against
the batched-matmul reference (`model._attention_products`), on the shapes decoding meets (grouped
heads, head sizes, lengths around its 16-wide blocks, strided cache views, masks), and its place in
the model: which steps take it, and what happens where it cannot be built. The VNNI int8 product
(where the CPU has AVX-512 VNNI) against its arithmetic written in torch (`int8_reference`), and
against the exact product."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import kernels, model
from lmforge.config import ModelConfig
from lmforge.generate import KVCache

REPO = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler on this machine: the kernel cannot be built")


def case(B: int, H: int, KV: int, hd: int, L: int, S: int, seed: int = 0, scale: float = 1.0, prefix: bool = True):
    """q (B, H, 1, hd); k, v: the first L positions of (B, KV, S, hd) caches (strided views); a
    mask (B, 1, L) keeping a prefix of each row (random lengths, the first row all L) or, with
    prefix False, random positions (at least one per row)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, hd, generator=g).transpose(1, 2) * scale  # as Attention.decode hands it over
    k = torch.randn(B, KV, S, hd, generator=g)[:, :, :L]
    v = torch.randn(B, KV, S, hd, generator=g)[:, :, :L]
    if prefix:
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        lengths[0] = L
        mask = torch.arange(L)[None, None, :] < lengths[:, None, None]
    else:
        mask = torch.rand(B, 1, L, generator=g) < 0.5
        mask[:, 0, torch.randint(0, L, (B,), generator=g)] = True
    return q, k, v, mask


@needs_compiler
def test_the_kernel_builds_and_loads_on_this_machine():
    assert kernels.ready(), "the kernel did not build here (see the warning above)"
    assert (Path(os.environ["LMFORGE_CACHE_DIR"]) / "kernels" / f"lmforge_kernels_{kernels.key()}.so").is_file()


@needs_compiler
@pytest.mark.parametrize("H,KV,hd", [(9, 3, 64), (4, 4, 32), (8, 2, 16), (16, 2, 128), (6, 1, 48)])
@pytest.mark.parametrize("L", [1, 15, 16, 17, 100])
def test_the_kernel_matches_the_batched_products(H, KV, hd, L):
    assert kernels.ready()
    for prefix in (True, False):
        q, k, v, mask = case(B=5, H=H, KV=KV, hd=hd, L=L, S=L + 7, seed=L, prefix=prefix)
        torch.testing.assert_close(kernels.decode_attention(q, k, v, mask), model._attention_products(q, k, v, mask),
                                   rtol=1e-5, atol=2e-6)


@needs_compiler
def test_the_kernel_keeps_its_softmax_exact_over_a_wide_range_of_scores():
    # scores up to ~ +-250: the max subtraction and the polynomial exp must neither overflow nor
    # lose the small weights that still count
    assert kernels.ready()
    q, k, v, mask = case(B=4, H=6, KV=2, hd=64, L=70, S=80, seed=3, scale=30.0)
    got, products = kernels.decode_attention(q, k, v, mask), model._attention_products(q, k, v, mask)
    exact = model._attention_products(q.double(), k.double(), v.double(), mask)
    assert torch.isfinite(got).all()
    # at such scores float32 rounding of a score moves its weight by ~1e-5 in either path: the
    # kernel must be as close to the float64 result as the products are
    assert (got - exact).abs().max() <= 2 * (products - exact).abs().max() + 1e-6


@needs_compiler
def test_the_kernel_never_reads_the_positions_a_row_masks():
    # a slot's cache beyond its length holds whatever an earlier request left (here NaN): the
    # kernel skips it, where the products multiply it by a zero weight
    assert kernels.ready()
    q, k, v, mask = case(B=3, H=9, KV=3, hd=64, L=40, S=40, seed=5)
    clean = kernels.decode_attention(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    hidden = ~mask[:, 0]  # (B, L)
    k2.permute(0, 2, 1, 3)[hidden] = float("nan")
    v2.permute(0, 2, 1, 3)[hidden] = float("nan")
    assert torch.equal(kernels.decode_attention(q, k2, v2, mask), clean)


def test_which_steps_take_the_kernel(monkeypatch):
    """Several float32 rows on the CPU without gradients, a supported shape; nothing else."""
    monkeypatch.setitem(kernels._state, "ready", True)
    q, k, v, _ = case(B=2, H=9, KV=3, hd=64, L=8, S=8)
    assert kernels.applies(q, k, v)
    assert not kernels.applies(q[:1], k[:1], v[:1])  # one row: the reference (the compiled single stream's graph)
    assert not kernels.applies(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not kernels.applies(q[..., :8], k[..., :8], v[..., :8])  # head_dim not a multiple of 16
    assert not kernels.applies(q.repeat(1, 3, 1, 1), k[:, :1], v[:, :1])  # 27 query heads per K/V head
    assert not kernels.applies(q.clone().requires_grad_(), k, v)
    with torch.no_grad():
        assert kernels.applies(q.clone().requires_grad_(), k, v)
    monkeypatch.setitem(kernels._state, "ready", False)
    assert not kernels.applies(q, k, v)


@needs_compiler
def test_a_batched_decode_step_runs_the_kernel_and_agrees_with_the_reference(monkeypatch):
    assert kernels.ready()
    cfg = ModelConfig(vocab_size=97, d_model=96, n_layer=2, n_head=6, n_kv_head=2, max_seq_len=64)
    torch.manual_seed(0)
    m = model.Transformer(cfg).eval()
    calls = []
    fused = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(a[0].shape[0]) or fused(*a))

    def step(rows: int) -> torch.Tensor:
        cache = KVCache.for_model(m, batch_size=rows, max_len=32)
        ids = torch.randint(0, 97, (rows, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            m(ids, cache=cache, hidden=True)
            positions = torch.tensor([[12 - r] for r in range(rows)])  # each row at its own length
            return m.decode(ids[:, -1:], positions, cache.k, cache.v)

    with_kernel = step(3)
    assert calls == [3, 3]  # both layers
    calls.clear()
    step(1)
    assert calls == []
    monkeypatch.setitem(kernels._state, "ready", False)
    torch.testing.assert_close(with_kernel, step(3), rtol=1e-5, atol=1e-5)
    assert calls == []


@needs_compiler
def test_torch_compile_calls_the_kernel_inside_its_graph():
    assert kernels.ready()
    q, k, v, mask = case(B=4, H=9, KV=3, hd=64, L=20, S=24)
    compiled = torch.compile(model.decode_attention, fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, mask), model._attention_products(q, k, v, mask), rtol=1e-5, atol=2e-6)


# ---- int8_linear (AVX-512 VNNI) ----------------------------------------------------------------

needs_vnni = pytest.mark.skipif(not set(kernels.INT8_FLAGS) <= kernels.cpu_flags(),
                                reason="this CPU has no AVX-512 VNNI: int8 products stay fbgemm's")


def int8_case(N: int, K: int, M: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    return q, torch.rand(N, generator=g) / 50 + 1e-3, torch.randn(M, K, generator=g)


@needs_compiler
@needs_vnni
def test_the_int8_kernel_builds_where_the_cpu_has_vnni():
    assert kernels.int8_ready() and kernels.int8_fits(576, 576) and not kernels.int8_fits(24, 576)
    assert not kernels.int8_fits(576, 48)


@needs_compiler
@needs_vnni
@pytest.mark.parametrize("N,K", [(16, 32), (48, 96), (192, 576), (576, 1536)])
@pytest.mark.parametrize("M", [1, 3, 15, 16, 17, 64, 129, 300])  # tiles of 16 rows, chunks of 128
def test_the_int8_kernel_computes_q8_0s_arithmetic(N, K, M):
    """Activations quantised per block of 32, exact integer dot products, the scales: the kernel
    and its torch reference agree to float32 rounding (the reference sums in float64)."""
    assert kernels.int8_ready()
    q, scale, x = int8_case(N, K, M, seed=N + K + M)
    got = kernels.int8_linear(x, *kernels.int8_pack(q), scale)
    want = kernels.int8_reference(x, q, scale)
    assert got.shape == (M, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_compiler
@needs_vnni
def test_the_int8_kernel_takes_any_leading_shape_and_strided_rows():
    assert kernels.int8_ready()
    q, scale, x = int8_case(32, 64, 12)
    w = kernels.int8_pack(q)
    flat = kernels.int8_linear(x, *w, scale)
    assert torch.equal(kernels.int8_linear(x.view(3, 4, 64), *w, scale), flat.view(3, 4, 32))
    wide = torch.randn(12, 100)
    wide[:, 10:74] = x  # rows of a larger tensor (a strided view)
    assert torch.equal(kernels.int8_linear(wide[:, 10:74], *w, scale), flat)
    assert kernels.int8_linear(x[:0], *w, scale).shape == (0, 32)


@needs_compiler
@needs_vnni
def test_the_int8_kernel_is_closer_to_the_exact_product_than_one_scale_per_row():
    """A row with one large value (SmolLM2's activations have such outliers): per block, the other
    blocks keep their own scale, so the result stays near the float product of the int8 weights,
    where one scale for the row (fbgemm's) loses the small values."""
    assert kernels.int8_ready()
    q, scale, x = int8_case(64, 1024, 4, seed=3)  # 32 blocks, one of them with the outlier
    x[:, 7] = 200.0
    exact = x.double() @ (q.double() * scale.double()[:, None]).t()
    got = kernels.int8_linear(x, *kernels.int8_pack(q), scale).double()
    per_row_scale = x.abs().amax(-1, keepdim=True) / 127
    per_row = (torch.round(x / per_row_scale) * per_row_scale).double() @ (q.double() * scale.double()[:, None]).t()
    assert float((got - exact).abs().mean()) < 0.35 * float((per_row - exact).abs().mean())


@needs_compiler
@needs_vnni
def test_a_non_finite_activation_makes_its_row_nan_and_only_its_row():
    assert kernels.int8_ready()
    q, scale, x = int8_case(32, 64, 3)
    x[1, 40], x[2, 3] = float("nan"), float("inf")
    got = kernels.int8_linear(x, *kernels.int8_pack(q), scale)
    assert got[1:].isnan().all() and torch.isfinite(got[0]).all()


@needs_compiler
@needs_vnni
def test_a_block_of_tiny_values_counts_as_zeros_in_kernel_and_reference():
    """max |x| below ~4e-37 (denormals too) overflows 127 / max |x|: that block is zeros in both."""
    assert kernels.int8_ready()
    q, scale, x = int8_case(32, 64, 2)
    x[0, :32] = 0.0
    x[0, 5], x[1, 40] = 1e-37, 1e-40
    got = kernels.int8_linear(x, *kernels.int8_pack(q), scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, kernels.int8_reference(x, q, scale), rtol=1e-5, atol=1e-4)


@needs_compiler
@needs_vnni
def test_the_int8_kernel_refuses_what_does_not_fit_with_a_message():
    assert kernels.int8_ready()
    q, scale, x = int8_case(32, 64, 3)
    w, wsum = kernels.int8_pack(q)
    with pytest.raises(RuntimeError, match="multiple of 32 and match"):
        kernels.int8_linear(torch.randn(3, 96), w, wsum, scale)
    with pytest.raises(RuntimeError, match="must be float32"):
        kernels.int8_linear(x.double(), w, wsum, scale)
    with pytest.raises(RuntimeError, match="scale must be 32"):
        kernels.int8_linear(x, w, wsum, scale[:16])
    with pytest.raises(RuntimeError, match="wsum must be contiguous int32"):
        kernels.int8_linear(x, w, wsum.long(), scale)


def _ready_in_a_fresh_process(tmp_path: Path, env: dict[str, str], patch: str = "") -> subprocess.CompletedProcess:
    code = f"{patch}\nfrom lmforge import kernels\nprint('READY', kernels.ready())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LMFORGE_CACHE_DIR": str(tmp_path), **env})


def test_where_the_kernel_cannot_be_built_one_warning_names_why_and_decoding_goes_on(tmp_path):
    boom = ("import torch.utils.cpp_extension as ce\n"
            "def fail(*a, **k): raise RuntimeError('Ninja is required to load C++ extensions')\n"
            "ce.load_inline = fail")
    out = _ready_in_a_fresh_process(tmp_path, {}, boom)
    assert out.returncode == 0, out.stderr
    assert "READY False" in out.stdout
    text = " ".join(out.stderr.split())
    assert "could not be built (RuntimeError: Ninja is required" in text and "LMFORGE_KERNELS=0" in text


def test_lmforge_kernels_0_turns_the_kernel_off_and_builds_nothing(tmp_path):
    out = _ready_in_a_fresh_process(tmp_path, {"LMFORGE_KERNELS": "0"})
    assert out.returncode == 0, out.stderr
    assert "READY False" in out.stdout and "warning" not in out.stderr
    assert not (tmp_path / "kernels").exists()


@needs_compiler
def test_a_built_kernel_loads_in_a_later_process_without_a_compiler():
    assert kernels.ready()  # built (or loaded) into this session's cache
    boom = ("import torch.utils.cpp_extension as ce\n"
            "def fail(*a, **k): raise RuntimeError('no compiler here')\n"
            "ce.load_inline = fail")
    out = _ready_in_a_fresh_process(Path(os.environ["LMFORGE_CACHE_DIR"]), {}, boom)
    assert out.returncode == 0, out.stderr
    assert "READY True" in out.stdout and "building" not in out.stderr
