"""The decoder: a Llama-style transformer in one file.

Design
------
Token embedding -> n_layer x [RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head. No biases anywhere; the output head is
optionally tied to the embedding (then `lm_head.weight` IS `model.embed_tokens.weight`).

Parameter names map one-to-one onto Hugging Face `LlamaForCausalLM` state-dict keys
(`model.layers.{i}.self_attn.q_proj.weight`, ...), and RoPE uses HF's `rotate_half` convention
(the two halves of each head are the real and imaginary parts, not interleaved pairs), so an HF
Llama checkpoint imports with a pure key map and no weight permutation. Llama 3.1/3.2's RoPE
frequency scaling (`rope_scaling: llama3`) only changes the cos/sin tables, built once per model.

Trade-offs
----------
- q, k, v and gate, up stay separate `nn.Linear`s so the names match HF. Concatenating their
  weights into one matmul per step was measured slower on CPU (the concatenation and the split
  of the gradients cost more than the larger matmul gains; docs/model.md). They are `Linear`s,
  nn.Linear whose product (`linear`) of one row inside a compiled decode step is a reduction
  inductor generates: it streams the weights ~1.5x faster than the sgemv the graph would call.
- Attention goes through `F.scaled_dot_product_attention` (fused flash kernels on CPU and GPU;
  grouped-query attention via its `enable_gqa` flag, so K/V heads are never copied per query
  head), except for bf16 on CPU up to EXPLICIT_ATTENTION_MAX_LEN positions: there the flash
  kernel's backward is ~2x slower than two AMX batched matmuls and a softmax, so an explicit
  path is used (it keeps the (B, H, T, T) probabilities for backward, hence the length cap).
  The decode step (one query per row) takes `decode_attention`, two batched matmuls over the
  cache views: ~1 % of serve's step faster than SDPA there (docs/inference.md).
- The residual stream stays in the parameters' dtype (fp32 under autocast); matmuls run in bf16
  under autocast. Each norm output is cast once for the matmuls that share it, and RoPE runs on
  contiguous (B, T, H, hd) tensors in the activations' dtype (no silent promotion to fp32).
- The loss is mean cross-entropy computed in fp32 (ignore_index -100). `forward(idx, targets)`
  still returns the logits (in the autocast dtype), because computing them is the cost and
  returning them is free.
- Decoding: a prefill, `forward(idx, cache=...)`, appends the prompt's K/V to a preallocated
  cache (known here only through `KVCacheLike`: `pos`, `update()`, `advance()`) and attends over
  everything cached so far. Each further token is `decode(idx, positions, k, v)`: one token per
  row, every row at its own position, over the rows' per-layer cache tensors (a single stream is
  one row; the server's batch many). Its blocks (`Block.decode`) see only tensors, so one
  torch.compile graph serves every block and step (`compile_blocks(model, "decode")`). The
  caches themselves (generate.KVCache, the server's slot cache) and sampling live above this
  module, which imports none of them.

`num_params` and `flops_per_token` are computed analytically from the config (no model built), so
`lmforge plan` can size models that would not fit in memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig
from .errors import ConfigError, LmforgeError


class KVCacheLike(Protocol):
    """What the model needs of a KV cache (generate.KVCache, serve.engine.SlotView)."""

    pos: int  # positions 0 .. pos-1 are cached (the shared-position path reads it)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's K/V (B, kv, T, hd) of `layer`; return everything to attend over."""
        ...

    def advance(self, n: int) -> None:
        """The forward pass consumed n positions."""
        ...


# ---- RoPE -----------------------------------------------------------------------------------


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_len: int
) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of inverse frequencies (hd/2,): stretch only the slow rotations.

    A frequency's wavelength 2*pi/inv_freq is how many positions one full turn takes. Relative to
    the pretraining context L = original_max_len:
    - wavelength < L / high_freq_factor (fast, turns many times within L): kept, these encode
      local order and were seen at every phase during pretraining;
    - wavelength > L / low_freq_factor (slow, less than ~one turn within L): divided by `factor`,
      so positions up to factor * L land on angles pretraining already covered (interpolation);
    - in between: a blend that is linear in L / wavelength (the number of turns within L),
      s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor) in [0, 1],
      inv_freq * ((1 - s) / factor + s): s = 0 meets the divided side, s = 1 the kept side.
    """
    wavelen = 2 * math.pi / inv_freq  # (hd/2,) positions per turn
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = inv_freq * ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen > original_max_len / low_freq_factor, inv_freq / factor, blended)
    return torch.where(wavelen < original_max_len / high_freq_factor, inv_freq, out)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, cfg: ModelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim), in the HF Llama layout.

    Frequency i (0 <= i < head_dim/2) rotates the pair (x[i], x[i + head_dim/2]); the table repeats
    the frequencies twice so a whole head is rotated with two elementwise products. A cfg with
    rope_scaling "llama3" rescales the frequencies (`llama3_inv_freq`); without one, plain RoPE.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if cfg is not None and cfg.rope_scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, cfg.rope_factor, cfg.rope_low_freq_factor,
                                   cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos().float(), angles.sin().float()


def fold_sign(sin: torch.Tensor) -> torch.Tensor:
    """The sin table (..., hd) with its first half negated, the form `apply_rope` takes.

    HF rotates with rotate_half(x) = (-x2, x1); times sin that is (x2, x1) * (-sin1, sin2), i.e.
    `x.roll(hd/2)` times this table: one copy instead of rotate_half's negation and concatenation,
    with the same products, so the same numbers bit for bit."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hd) by position, HF's `x * cos + rotate_half(x) * sin`; cos and the
    sign-folded sin (`fold_sign`) broadcast against x (e.g. (T, 1, hd) for x (B, T, H, hd)) and are
    already in x's dtype."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# ---- attention kernels ----------------------------------------------------------------------

EXPLICIT_ATTENTION_MAX_LEN = 1024


def use_explicit_attention(q: torch.Tensor) -> bool:
    """True for bf16 on CPU up to EXPLICIT_ATTENTION_MAX_LEN positions.

    There, SDPA's fused CPU flash kernel is slow in backward (measured ~2x slower than two AMX
    batched matmuls and a softmax, docs/model.md). The explicit path stores the (B, H, T, T)
    probabilities for backward, hence the length cap; fp32, GPUs and long sequences keep SDPA.
    """
    T = q.shape[2]
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and T <= EXPLICIT_ATTENTION_MAX_LEN


CAUSAL_SPLIT_MIN_LEN = 64


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v for q (B, H, T, hd) and k, v (B, KV, T, hd).

    Grouped-query attention without copying K/V per head: the G = H / KV query heads that share
    a K/V head are stacked along the time axis, so each K/V head meets a (G*T, hd) block of queries.

    Half of the causal square is masked, so from CAUSAL_SPLIT_MIN_LEN positions on the queries are
    taken in two halves: the first T/2 only against the first T/2 keys, the rest against all T.
    That is 3/4 of the full square's matmul and softmax work, for two more small kernels
    (finer splits measured no better: more, smaller matmuls; docs/model.md).
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    q = q.reshape(B * KV, G, T, hd)  # head h = kv * G + g uses K/V head kv, as in SDPA's enable_gqa
    k = k.reshape(B * KV, T, hd)
    v = v.reshape(B * KV, T, hd)
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    half = T // 2
    spans = [(0, half), (half, T)] if T >= CAUSAL_SPLIT_MIN_LEN else [(0, T)]  # queries [a, b) see keys [0, b)
    ys = []
    for a, b in spans:
        qs = q[:, :, a:b].reshape(B * KV, G * (b - a), hd)
        m = mask[a:b, :b].repeat(G, 1).expand(B * KV, G * (b - a), b)
        scores = torch.baddbmm(m, qs, k[:, :b].transpose(1, 2), alpha=hd**-0.5)  # (B*KV, G*(b-a), b)
        ys.append(torch.bmm(scores.softmax(dim=-1), v[:, :b]).view(B, KV, G, b - a, hd))  # softmax accumulates in fp32
    y = torch.cat(ys, dim=3) if len(ys) > 1 else ys[0]
    return y.view(B, H, T, hd)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), masked) v for one query per row (`Attention.decode`): q (B, H, 1,
    hd), k and v (B, KV, L, hd) (strided views of a cache are fine), mask (B, 1, L) bool (True: may
    attend; every row must see at least one key). Returns (B, H, 1, hd).

    Several rows (serve's batched step) run lmforge's fused kernel where it is built
    (lmforge/kernels.py: one loop per (row, K/V head) reading each cached row once, 3-4x faster
    at 16 rows). Otherwise, and for one row, the G = H / KV query heads that share a K/V head
    become G query rows of one small product per (row, K/V head): scores (B, KV, G, L) from one
    batched matmul over the views as they lie (no copy of K/V, none per query head), a masked
    softmax, and a second batched matmul with V. SDPA's flash kernel on the same views, for one
    query position, spends more per (row, head) on its blocking than these shapes pay back
    (measured: docs/inference.md).
    """
    if kernels.applies(q, k, v):  # several rows: one fused loop per (row, K/V head), lmforge/kernels.py
        return kernels.decode_attention(q, k, v, mask)
    return _attention_products(q, k, v, mask)


def _attention_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`decode_attention` by batched matrix products (the reference lmforge's kernel is tested against)."""
    B, H, _, hd = q.shape
    KV, L = k.shape[1], k.shape[2]
    G = H // KV
    # bmm over (B*KV) batches of the views as they lie: flattening (B, KV) of a cache's view is
    # itself a view, and bmm reads strided operands; no decision here depends on whether L fills
    # the cache, so one exported graph serves every L <= S (lmforge/aot.py)
    scores = torch.bmm(q.reshape(B * KV, G, hd), k.flatten(0, 1).transpose(1, 2)).view(B, KV, G, L)  # head h = kv * G + g, as enable_gqa
    scores = scores.mul_(hd**-0.5).masked_fill_(~mask[:, None], float("-inf"))  # mask (B, 1, 1, L)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)  # accumulated in fp32 whatever the weights
    return torch.bmm(probs.view(B * KV, G, L), v.flatten(0, 1)).view(B, H, 1, hd)  # (B*KV, G, hd) -> (B, H, 1, hd)


def row_loop_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` multiplies x by weight in inductor's own loop (`row_loop`): one row inside
    `torch.compile` on a CPU, without grad or autocast, a row-major weight."""
    return (torch.compiler.is_compiling() and x.numel() == x.shape[-1] and x.device.type == "cpu"
            and weight.stride(-1) == 1 and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def row_loop(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for one row x (..., K) and a row-major W = weight (N, K) of any dtype, in fp32, as a
    reduction over each row of W (see `linear`); y (..., N) in x's dtype."""
    # x as a view of itself: inductor then computes it into a buffer once, where it would
    # otherwise recompute the norm or activation that made x inside the loop over every weight
    # row (an int8 head with its norm took 4.9 ms where it takes 1.0; docs/inference.md)
    x = x.as_strided(x.shape, x.stride())
    y = (weight * x.reshape(1, -1)).sum(-1)  # (N,): one dot product per weight row
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for x (..., K) and W = weight (N, K), no bias; y (..., N) in x's dtype.

    One row inside `torch.compile` on a CPU, without grad or autocast (a decode step of one
    sequence: `sample --compile`, a server's step with one request running; `row_loop_applies`):
    written as a reduction over each row of W (`row_loop`), which inductor generates as a loop of
    its own (fused with the norm or activation before it) that streams W at the core's memory
    bandwidth: 32-38 GB/s on one core of the AMD EPYC (AVX-512) this was measured on, where the
    sgemv a compiled graph calls (MKL) read at 16-27 (docs/inference.md "Compiled decoding").
    Everywhere else, and for a W that is not row-major (the eager decoding layout,
    lmforge/quant.py), the plain product: for several rows a GEMM reuses each loaded weight across
    the rows, which this loop would not. `quant.F16Linear` and `quant.Int8Linear` (which scales the
    sums) use `row_loop` on their fp16 and int8 rows under the same condition: the products and
    sums are then in fp32 (for int8: weight-only, more exact than fbgemm's)."""
    return row_loop(x, weight) if row_loop_applies(x, weight) else F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters, names and initialisation) whose product without a bias is
    `linear`: the model's projections and head, so a compiled one-row decode step streams their
    weights through inductor's own loops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight) if self.bias is None else F.linear(x, self.weight, self.bias)


def autocast(dtype: str, device_type: str) -> contextlib.AbstractContextManager:
    """The mixed precision a forward runs in: bf16 autocast on `device_type` (where the batch is)
    for dtype "bf16" (config `train.dtype`), nothing for "fp32". Training and evaluation both
    enter it, so a loss is computed the same way in each."""
    if dtype == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if dtype == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"autocast needs a resolved dtype (bf16 or fp32), got {dtype!r}; a run resolves "
                     "train.dtype=auto when it starts (hardware.auto_dtype)")


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Cast a norm's output to the autocast dtype once, so the matmuls that share it (q, k, v;
    gate, up) do not each make their own copy, and their input gradients are summed in bf16."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def document_attention(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows of several documents -> (positions, attn_mask) for `Transformer.forward`.

    documents (B, T) int64: the document of each position (equal ids = one document; any value,
    e.g. -1 for padding). positions (B, T) restart at 0 where a document starts, so RoPE sees each
    one from its beginning; attn_mask (B, T, T) bool lets a position see the earlier positions of
    its own document only (block-diagonal causal), so a row's logits equal each document's alone.
    """
    B, T = documents.shape
    idx = torch.arange(T, device=documents.device).expand(B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T): where my document began
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    same = documents[:, :, None] == documents[:, None, :]  # (B, T, T)
    return idx - first, same & causal


class Unpadded(NamedTuple):
    """Right-padded rows (B, T) run on their real tokens only: `hidden_states(lengths=...)`.

    Embedding batches mix lengths, so a (B, T) batch carries padding (13 % of the positions in
    benchmarks/embed.py's throughput texts, length-sorted batches of 32). Projections, norms and
    the MLP treat every position alike, so they run on the N real tokens as one (1, N, C) row and
    never compute the padding; only attention needs each token back in its (B, T) row, so q, k, v
    are scattered there (zeros at the padding, which causal attention or the padding mask never
    lets a real token see) and its output is gathered back. Three scatters and a gather per layer
    cost far less than the padding's share of the matmuls (docs/embeddings.md "Speed").
    """

    index: torch.Tensor  # (N,) int64: flat position b * T + t of each real token, row by row
    batch: int  # B
    length: int  # T

    @classmethod
    def of(cls, lengths: torch.Tensor, T: int) -> Unpadded:
        """lengths (B,): row b's tokens are 0 .. lengths[b] - 1, padding after them."""
        real = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        return cls(real.flatten().nonzero().squeeze(1), int(lengths.shape[0]), T)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        """(1, N, *rest) -> (B, T, *rest), zeros at the padding."""
        out = t.new_zeros(self.batch * self.length, *t.shape[2:])
        out[self.index] = t[0]
        return out.view(self.batch, self.length, *t.shape[2:])

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, *rest) -> (1, N, *rest): the real tokens."""
        return t.flatten(0, 1)[self.index].unsqueeze(0)


# ---- blocks ---------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.kv_heads, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, H, hd), k and v (B, T, KV, hd), q and k rotated by RoPE.

        They are rotated while still contiguous (elementwise ops and their gradients are faster
        there than on the transposed views); cos/sin (T, hd) or (B, T, hd) broadcast over heads."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        cos, sin = cos.to(q.dtype).unsqueeze(-2), sin.to(q.dtype).unsqueeze(-2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCacheLike | None,
        attn_mask: torch.Tensor | None = None, unpadded: Unpadded | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape  # (1, N, C) with `unpadded`: the real tokens of its rows
        q, k, v = self.project(x, cos, sin)  # (B, T, heads, hd)
        if unpadded is not None:  # each token back in its row for attention: (1, N, heads, hd) -> (B', T', heads, hd)
            q, k, v = unpadded.scatter(q), unpadded.scatter(k), unpadded.scatter(v)
        # (B, T, H, hd) -> (B, H, T, hd): heads become a batch dimension for attention
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.kv_heads != self.n_head
        if attn_mask is not None:  # packed rows (evaluate/score.py), bidirectional embeddings: (B, T, T) -> (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None], enable_gqa=gqa)
        elif cache is None and use_explicit_attention(q):
            y = explicit_causal_attention(q, k, v)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, kv, start + T, hd): everything so far
            mask = None
            if T > 1:  # query t sits at position start + t and sees keys 0 .. start + t
                key_pos = torch.arange(start + T, device=x.device)
                query_pos = torch.arange(start, start + T, device=x.device)
                mask = key_pos[None, :] <= query_pos[:, None]  # (T, start + T)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).flatten(2)  # (B, T, H*hd)
        if unpadded is not None:
            y = unpadded.gather(y)  # (1, N, H*hd)
        return self.o_proj(y)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One new token per row: x (B, 1, C) -> (B, 1, C). Its K/V go into this layer's cache,
        k_cache and v_cache (B, KV, S, hd), contiguous, at the flat rows `rows` (B * KV,) of their
        (B * KV * S, hd) view (`Transformer.decode` computes them once for all layers); it then
        attends over the first L = mask.shape[-1] positions, mask (B, 1, L) saying which."""
        hd = self.head_dim
        q, k, v = self.project(x, cos, sin)  # (B, 1, heads, hd)
        # one index_copy_ per tensor, (b, kv) row order as `rows`: 28 us where a scatter_ took 35 (docs/inference.md)
        k_cache.view(-1, hd).index_copy_(0, rows, k.reshape(-1, hd).to(k_cache.dtype))
        v_cache.view(-1, hd).index_copy_(0, rows, v.reshape(-1, hd).to(v_cache.dtype))
        L = mask.shape[-1]
        y = decode_attention(q.transpose(1, 2), k_cache[:, :, :L].to(q.dtype), v_cache[:, :, :L].to(q.dtype), mask)
        return self.o_proj(y.transpose(1, 2).flatten(2))  # (B, H, 1, hd) -> (B, 1, H*hd) -> (B, 1, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.up_proj = Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.down_proj = Linear(cfg.ff_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCacheLike | None,
        attn_mask: torch.Tensor | None = None, unpadded: Unpadded | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(autocast_input(self.input_layernorm(x)), cos, sin, cache, attn_mask, unpadded)  # (B, T, C)
        return x + self.mlp(autocast_input(self.post_attention_layernorm(x)))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One decode step of this block, x (B, 1, C); the arguments are `Attention.decode`'s. Only
        tensors go in (no cache object, no layer index, no Python int that changes per step), so
        one compiled graph serves every block and step (`compile_blocks(model, "decode")`)."""
        x = x + self.self_attn.decode(autocast_input(self.input_layernorm(x)), cos, sin, k_cache, v_cache, rows, mask)
        return x + self.mlp(autocast_input(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """The `model.` prefix of the HF key names: embedding, blocks, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


# ---- the model ------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        built_on = torch.get_default_device()  # the CPU, unless a `with torch.device(...)` says otherwise
        if built_on.type != "meta":  # a model of shapes only allocates nothing
            check_memory(cfg, built_on, fix="model.n_layer, model.d_model, model.d_ff or model.vocab_size")
        self.cfg = cfg
        self.compile_pending: set[str] = set()  # compiled methods whose first call has not yet succeeded (run_compiled)
        self.aot_decode: Any = None  # a one-row decode step compiled ahead of time (generate.compile_decode, lmforge/aot.py)
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # the classification head (model.num_labels): logits (B, L) of a pooled embedding (B, C), applied by the
        # classification objective and the classifier (understand/), never by forward
        self.score = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels else None
        # Not parameters and not saved: they are a pure function of the config.
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", fold_sign(sin), persistent=False)  # as apply_rope takes it
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) for matrices, residual projections scaled by 1/sqrt(2 n_layer)
        (GPT-2: each block adds two residual branches, so the stream's variance stays O(1)),
        norm weights 1. Deterministic under torch.manual_seed (modules are visited in order)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.cfg.tie_embeddings:
                    continue  # same tensor as the embedding, initialised there
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
                if module.bias is not None:  # the classification head's
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCacheLike | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        hidden: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) int64 -> logits (B, T, V); with targets (B, T) -> (logits, mean fp32 loss);
        with hidden=True -> the hidden states (B, T, C) instead of logits (`hidden_states`; the
        contrastive objective embeds through forward, which a DDP wrapper must see called).

        With a cache, idx holds the tokens after the cache.pos already cached ones; RoPE positions
        continue from there. positions (B, T) int64 and attn_mask (B, T, T) bool (True: may
        attend) pack several sequences into one row, e.g. a shared context followed by every
        answer choice (evaluate/score.py); they are used together, never with a cache (rows that
        decode at their own positions go through `decode`). lengths
        (B,): rows right-padded after that many tokens, whose padding is never computed
        (`hidden_states`; embeddings).
        """
        B, T = idx.shape
        if hidden:
            return self.hidden_states(idx, cache=cache, positions=positions, attn_mask=attn_mask, lengths=lengths)
        logits = self.lm_head(self.hidden_states(idx, cache=cache, positions=positions, attn_mask=attn_mask,
                                                 lengths=lengths))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-100
        )
        return logits, loss

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCacheLike | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> the final-normed hidden states (B, T, C) that lm_head reads (HF's
        `last_hidden_state`); arguments as in `forward`. Embeddings pool these (understand/embed.py):
        causally with no mask (right padding never reaches the real tokens before it), or
        bidirectionally with attn_mask (B, T, T) True where the key is a real token.

        lengths (B,) int64: row b is right-padded after lengths[b] tokens. Everything but attention
        then runs on the real tokens only (`Unpadded`) and the padding's hidden states are zeros;
        the real tokens' states are those of the padded forward up to float rounding (matmuls of
        another shape). Not with a cache or positions (they place tokens themselves)."""
        if cache is not None and (positions is not None or attn_mask is not None):
            raise ValueError("a cache is filled from its own position (prefill); rows at their own positions "
                             "decode through Transformer.decode")
        unpadded = None
        if lengths is not None:
            if cache is not None or positions is not None:
                raise ValueError("lengths (unpadded rows) cannot be combined with a cache or positions")
            if int(lengths.min()) < idx.shape[1]:  # some padding to skip
                unpadded = Unpadded.of(lengths, idx.shape[1])
                positions = (unpadded.index % unpadded.length).unsqueeze(0)  # (1, N): each token's place in its row
                idx = idx.flatten()[unpadded.index].unsqueeze(0)  # (1, N)
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if positions is not None:  # a packed row may be longer than any one sequence in it
            T_max = int(positions.max()) + 1 if positions.numel() else 0
            if T_max > self.cfg.max_seq_len:
                raise LmforgeError(f"position {T_max - 1} is beyond model.max_seq_len ({self.cfg.max_seq_len})")
        elif start + T > self.cfg.max_seq_len:
            raise LmforgeError(
                f"sequence of {start + T} tokens is longer than model.max_seq_len "
                f"({self.cfg.max_seq_len}); shorten the input"
            )
        if positions is None:
            cos = self.rope_cos[start : start + T]  # (T, hd)
            sin = self.rope_sin[start : start + T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, hd)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        for block in self.model.layers:
            x = block(x, cos, sin, cache, attn_mask, unpadded)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)  # (B, T, C)
        return x if unpadded is None else unpadded.scatter(x)

    def decode(self, idx: torch.Tensor, positions: torch.Tensor, k: Sequence[torch.Tensor],
               v: Sequence[torch.Tensor], masked: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """One decode step: idx (B, 1) int64, each row's next token, at positions (B, 1) int64 ->
        logits (B, V). k, v: per layer the rows' caches (B, KV, S, hd), contiguous (a
        generate.KVCache's tensors, or rows of the server's slot cache); row b's token is written
        at positions[b] and attends to that row's positions 0 .. positions[b].

        The decode path of `sample`, `serve`, eval's generation tasks and `ask` alike (after a
        prefill through `forward` with a cache). Attention covers L = max(positions) + 1 cached
        positions, a mask hiding each row's unused ones; the slot and mask arithmetic is done here
        once for all layers, so each block sees only tensors (`Block.decode`, compilable).
        masked: what runs the step once the mask is made (default `decode_masked`; a one-row step
        compiled ahead of time, lmforge/aot.py, takes the same arguments)."""
        S = k[0].shape[2]
        L = int(positions.max()) + 1
        if L > min(S, self.cfg.max_seq_len):
            raise LmforgeError(f"decoding position {L - 1} is beyond the KV cache ({S} positions) or "
                               f"model.max_seq_len ({self.cfg.max_seq_len})")
        mask = torch.arange(L, device=idx.device)[None, None, :] <= positions[:, :, None]  # (B, 1, L)
        return (masked or self.decode_masked)(idx, positions, mask, k, v)

    def decode_masked(self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                      k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
        """`decode` once its mask (B, 1, L) is made: only tensors in and out, no Python number
        read from them, so lmforge/aot.py can export it whole for every L <= S."""
        B, S = idx.shape[0], k[0].shape[2]
        heads = torch.arange(B * self.cfg.kv_heads, device=idx.device).view(B, -1)  # (B, KV): row b's heads b*KV ..
        rows = (heads * S + positions).flatten()  # (B * KV,): each (row, head)'s slot in a layer's (B*KV*S, hd) view
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, 1, hd)
        x = self.model.embed_tokens(idx)  # (B, 1, C)
        for i, block in enumerate(self.model.layers):
            x = block.decode(x, cos, sin, k[i], v[i], rows, mask)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step's last part, the final norm and the head: x (B, 1, C) -> logits (B, V).
        A method of its own so that `compile_blocks(model, "decode")` compiles it too (the head is
        a fifth of a step's weights: one row's product is then `linear`'s loop)."""
        return self.lm_head(self.model.norm(x))[:, 0]


# ---- compiled blocks (opt-in) ---------------------------------------------------------------


COMPILED = ("forward", "decode")  # the Block methods `compile_blocks` can compile
# Graphs one compiled method may hold: a decode step has one for a batch of one row and one for
# more, each again with LoRA adapters selected and per thread count the governor moves through;
# dynamo's default of 8 would silently fall back to eager on a busy server.
RECOMPILE_LIMIT = 32
T_ = TypeVar("T_")


def compile_blocks(model: Transformer, method: str = "forward") -> None:
    """Run every block's `method` through `torch.compile` (dynamic shapes), for long jobs:
    "forward" (embeddings: `embed`, `index`, `topics --compile`) or "decode" (a decode step:
    `sample`, `serve --compile`; then the final norm and head too, `Transformer.logits`).

    For several rows the matrix products already run at the core's peak; what compiling gains is
    the work around them (the norms, RoPE, SiLU and the gate product, residual adds, the cache
    writes, the unpadding copies), fused into a few loops instead of ~20-40 small kernels per
    block, each with its dispatch cost: +6-9 points of the matmul peak for embeddings
    (docs/embeddings.md "Speed"). For one row (a single stream's decode step) the products
    themselves become inductor's loops (`linear`: the weights stream at the core's memory
    bandwidth, ~1.7x the tokens/s of eager fp32 decoding; docs/inference.md). One graph serves
    every block (the same code; a decode step's blocks see only tensors, `Block.decode`), batch
    and length; it costs 3-15 s of compilation the first time in a process (inductor's on-disk
    cache makes later processes quicker), so it is opt-in (`--compile`), not a default. The
    numbers equal the eager ones up to float rounding (fused reductions sum in another order).
    Inductor builds kernels for the thread count of the moment: when the thread governor changes
    it, the next call compiles once more for the new count (never more threads than torch is
    told). `run_compiled` falls back to eager where compiling fails; `eager_blocks` undoes it; the
    weights, names and state dict are untouched either way. A compiled model must not be
    deep-copied (the copy's blocks would call the original's compiled methods): `eager_blocks`
    first."""
    if method not in COMPILED:
        raise ValueError(f"compile_blocks: method must be one of {COMPILED}, got {method!r}")
    # No "duck shaping" (process-wide; it only makes graphs more general): by default sizes of the
    # first call that happen to be equal share one symbol, e.g. an attended length of 3 and
    # SmolLM2's 3 K/V heads, and the length is then specialised to that constant, so the next
    # step compiles again. Older torch versions have neither setting; they keep their defaults.
    with contextlib.suppress(ImportError, AttributeError):
        import torch.fx.experimental._config as fx_config

        if hasattr(fx_config, "use_duck_shape"):
            fx_config.use_duck_shape = False
    import torch._dynamo

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    if hasattr(torch._dynamo.config, limit):
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    for module, name in _compiled_parts(model, method):
        # an instance attribute over the class's method
        setattr(module, name, torch.compile(getattr(module, name), dynamic=True))
    model.compile_pending.add(method)


def _compiled_parts(model: Transformer, method: str) -> list[tuple[nn.Module, str]]:
    """(module, method name) of what `compile_blocks(model, method)` compiles: every block's
    `method`, and for a decode step also the final norm and head (`Transformer.logits`)."""
    parts: list[tuple[nn.Module, str]] = [(block, method) for block in model.model.layers]
    return parts + [(model, "logits")] if method == "decode" else parts


def eager_blocks(model: Transformer, method: str | None = None) -> None:
    """Undo `compile_blocks` for `method` (None: both), e.g. where compiling failed (no C++
    compiler on the machine)."""
    for m in COMPILED if method is None else (method,):
        for module, name in _compiled_parts(model, m):
            module.__dict__.pop(name, None)
    model.compile_pending.difference_update(COMPILED if method is None else (method,))
    if method in (None, "decode"):
        model.aot_decode = None


def is_compiled(model: Transformer, method: str = "forward") -> bool:
    """Whether `compile_blocks(model, method)` is in effect."""
    return any(name in vars(module) for module, name in _compiled_parts(model, method))


def run_compiled(model: Transformer, method: str, call: Callable[[], T_], fallback: Callable[[Exception], None]) -> T_:
    """call(), which runs the blocks' `method`: the first call after `compile_blocks(model,
    method)` is where torch.compile builds its kernels. If that fails (e.g. no C++ compiler on the
    machine), `method` goes back to eager, fallback(error) tells the user, and call() runs again
    eagerly: the same results up to float rounding, only slower. A call's side effects are safe
    to repeat (a decode step rewrites the same cache positions). A user's mistake (LmforgeError)
    is not a compiler failure: it is raised as it is. Later calls go straight through. Each
    method has its own first call (a server embeds and decodes on two threads)."""
    if method not in model.compile_pending:
        return call()
    try:
        out = call()
    except LmforgeError:
        raise
    except Exception as e:  # the compiler's failure, whatever its type; a real error shows again eagerly
        eager_blocks(model, method)
        fallback(e)
        return call()
    model.compile_pending.discard(method)
    return out


# ---- analytic size and cost -----------------------------------------------------------------


def num_params(cfg: ModelConfig, *, include_embedding: bool = True) -> int:
    """Parameter count from the config alone; equals `sum(p.numel() for p in Transformer(cfg)
    .parameters())` (a tied head counted once).

    include_embedding=False leaves out the token embedding and an untied lm_head (the
    "non-embedding" N of the scaling-law papers).
    """
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_head * hd + 2 * d * cfg.kv_heads * hd + cfg.n_head * hd * d  # q, k, v, o
    mlp = 3 * d * cfg.ff_dim  # gate, up, down
    norms = 2 * d
    body = cfg.n_layer * (attn + mlp + norms) + d  # + final norm
    if not include_embedding:
        return body
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return body + embedding + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B style:

        6 * (N_non_embedding + vocab_size * d_model)  +  12 * n_layer * d_model * seq_len

    The first term is every weight matmul, the lm_head included (the embedding lookup is not a
    matmul): 2 FLOPs per multiply-add forward, twice that backward. The second term is attention's
    QK^T and AV (each 2 * seq_len * d_model FLOPs per token per layer forward, x3 with backward),
    counted for the full square as PaLM does although the causal mask halves the useful work. The
    norm weights in N add a negligible ~0.1%.
    """
    n = num_params(cfg, include_embedding=False) + cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.d_model * seq_len


def memory_needed(cfg: ModelConfig, *, micro_batch: int = 0, seq_len: int = 0, shards: int = 1,
                  kv_batch: int = 0, kv_bytes: int = 4, reference: bool = False) -> dict[str, int]:
    """The bytes a model needs at least, from its config alone (nothing is allocated), by part:
    its fp32 weights (4 bytes per parameter) and RoPE tables; to train (micro_batch > 0) also the
    gradients and AdamW's two moments (12 more bytes per parameter; both divided over `shards`
    under FSDP) and a micro batch's fp32 logits with their gradient; with `reference`, a frozen
    fp32 copy of the weights (DPO's reference, never sharded); to serve (kv_batch > 0) a KV
    cache of kv_batch full-length sequences of kv_bytes per value. Activations are not counted
    (they depend on checkpointing and kernels), so what this refuses certainly does not fit."""
    n = num_params(cfg)
    parts = {"weights": 4 * n // shards, "RoPE tables": 2 * 4 * cfg.max_seq_len * cfg.head_dim}
    if micro_batch:
        parts["gradients and AdamW moments"] = 12 * n // shards
        parts["logits"] = 2 * 4 * micro_batch * seq_len * cfg.vocab_size
    if reference:
        parts["reference copy"] = 4 * n
    if kv_batch:
        parts["KV cache"] = 2 * cfg.n_layer * kv_batch * cfg.kv_heads * cfg.max_seq_len * cfg.head_dim * kv_bytes
    return parts


def check_memory(cfg: ModelConfig, device: torch.device, *, fix: str, **need: int) -> None:
    """ConfigError with the numbers when `memory_needed(cfg, **need)` exceeds what `device` has (a
    GPU's memory; RAM for the CPU); `fix` names what to lower. Called before anything is allocated:
    `model.n_layer=100000000` was an hour of building modules before an out-of-memory crash."""
    from .hardware import memory_total
    from .util import human_bytes

    have = memory_total(device)
    parts = memory_needed(cfg, **need)
    total = sum(parts.values())
    if have and total > have:
        what = "the GPU" if device.type == "cuda" else "this machine's RAM"
        detail = " + ".join(f"{human_bytes(v)} {k}" for k, v in parts.items() if v)
        raise ConfigError(
            f"not enough memory: a model of {num_params(cfg):,} parameters (model.n_layer {cfg.n_layer}, d_model "
            f"{cfg.d_model}, vocab_size {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}) needs at least {human_bytes(total)} "
            f"here ({detail}), but {what} has {human_bytes(have)}; lower {fix}"
        )


__all__ = ["Transformer", "compile_blocks", "eager_blocks", "document_attention", "num_params", "flops_per_token", "memory_needed", "check_memory", "rope_tables", "llama3_inv_freq", "fold_sign", "apply_rope"]
