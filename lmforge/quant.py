"""How weights are held for inference: fp32 laid out for decoding, f16, or int8; and how a model
directory stores int8 weights.

Design
------
Decoding one token multiplies one activation row by every weight matrix, so its speed is the
speed of a matrix-vector product, i.e. of reading the weights. `prepare(model, weights)` turns a
loaded model into the form that reads fastest (in place; the model is for inference from then on):

  "fp32"  the same numbers, each wide `nn.Linear` weight (out >= in: q, o, gate, up, the head)
          stored column-major (its transpose contiguous): MKL's sgemm on such an (N, K) row-major
          weight with one activation row takes a gemv path that reads up to ~2x slower than the
          column-major layout, while narrow ones (k, v, down) read faster row-major (measured per
          shape on AVX2: docs/inference.md). No other change: the model's code runs as is. A
          model whose decode step is compiled keeps every weight row-major instead
          (`prepare(..., compiled=True)`): there one row's products are inductor's own loops over
          the weight rows (`model.linear`), which stream them ~1.5x faster than MKL's gemv.
          Several rows at once (serve's batched decode, one row per running request; its
          prompts) may multiply faster with oneDNN's prepacked copy of a weight: how much
          depends on the CPU, so `pack_measured(model)`, which the serve engine calls, times
          both products per shape on this machine and makes the layers where the packed one wins
          `PackedLinear`s (the same weight Parameter, so a tied embedding and the one-row path
          are unchanged, plus that copy) up to the row count where it still wins. Measured: on
          an AVX2 EPYC the head (1.9-2.8x) and gate/up/down up to ~24 rows (2-12 %); on an
          AVX-512 EPYC, where MKL's sgemm does not use AVX-512, every projection at every count
          from 2 to 256 rows (2-2.7x; docs/inference.md).
  "f16"   fbgemm's fp16 linear (weights packed in half precision, arithmetic in fp32): half the
          bytes, no bf16 matmul (which is slow without AVX-512/AMX).
  "int8"  every projection and the output head as `Int8Linear`: int8 weights with one fp32 scale
          per output row (symmetric, scale = max|w| / 127). On a CPU with AVX-512 VNNI every
          product (a decoding step of any row count, a prompt) runs lmforge's own kernel
          (lmforge/kernels.py `int8_linear`, lmforge/csrc/int8_linear.cpp): the 8-bit weights
          times the activations quantised to 8 bits per block of 32 at run time, llama.cpp's
          Q8_0 arithmetic (more exact than fbgemm's; 0.95-1.7x its speed per product, 1.45x over
          a 16-row forward's: docs/inference.md); except a
          compiled step of one row, which stays inductor's weight-only loop. Elsewhere a
          decoding step (one row per sequence) runs fbgemm's dynamic int8 linear (each activation row quantised to 8 bits at
          run time, as llama.cpp's Q8_0 dot products do per block of 32), except a compiled
          step of one row: weight-only int8 in fp32 through inductor's loop (`model.linear`),
          faster there and more exact; a prompt runs weight-only int8 on bf16 activations (more
          exact, slower; from DEQUANT_MIN_ROWS positions on, where the CPU has bf16 matrix
          instructions, as oneDNN's bf16 matmul on the int8 rows converted per call, 1.7-2.9x
          `aten._weight_int8pack_mm`). The embedding table stays
          fp32 (one row is read per token).

fbgemm's packed weights are TorchScript objects: eagerly each layer calls its own through a
scripted module (from Python, each call converted the object: ~14 µs, ~3 ms a token); under
`torch.compile` (a compiled decode step) through the opaque ops `lmforge::int8_linear` and
`lmforge::f16_linear`, which find the layer's packed weight by a handle buffer, so the graph has
no break and one graph serves every block.

Where fbgemm is missing (not an x86 build, a GPU), `Int8Linear` and `F16Linear` fall back to
dequantising into the activations' dtype per call: correct everywhere, fast only with fbgemm.
Where oneDNN is missing (`torch.backends.mkldnn.is_available()` false), `pack_measured` changes
nothing and the plain product runs.

Stored int8 (a model directory, `lmforge import --keep-quantized`)
------------------------------------------------------------------
model.safetensors holds, for each quantised matrix NAME (`...q_proj.weight`, the embedding, an
untied head), NAME as int8 (N, K) and NAME_scale (`...q_proj.weight_scale`) as fp32 (N, K / G):
one scale per group of G consecutive weights of a row, w = q * scale. G is 32 for a GGUF Q8_0
import (its blocks, kept exactly) and K (one scale per row) for `--quantize int8`. Norm weights
stay fp32. The directory's MANIFEST.json records `"quantization": {"format": "int8", "group_size":
G}` (covered by its self-checksum), so a reader knows before opening the tensors; `read_stored`
checks the tensors against it. Loading runs grouped scales as per-row int8 (the kernels take one
scale per row): each row is re-quantised once at load, which adds at most half a step of the row's
scale to each weight (measured effect: docs/inference.md); the stored numbers stay exact, and
`--quantize none` dequantises them exactly.

Trade-offs: the VNNI kernel's activations in 8 bits per block of 32 cost a little accuracy
against weight-only int8 on bf16 activations, and gain much against fbgemm's, which decoding
steps used before (SmolLM2-135M, mean |d log p| over the vocabulary against fp32,
benchmarks/int8_quality.py: a 58-token prompt 0.161 against weight-only's 0.132 for
`--quantize int8`, 0.220 against 0.175 for the Q8_0 import; 32 decoding steps 0.144 against
fbgemm's 0.333, and 0.190 against 0.361). Prompts pay those 0.03-0.045 for 1.7-2.3x their speed. Without the kernel: fbgemm holds the weights in 7 bits (to avoid the saturation of its 16-bit pair sums on
AVX2) and quantises the activations of a call with one scale (so several rows are each scaled to
the same range first): on SmolLM2-135M each of the two more than doubles the logit error of
8-bit weights alone (mean |d log p| against fp32 0.14 weight-only, 0.36 with 7-bit weights, 0.38 with
8-bit activations, 0.48 both; docs/inference.md). Weight-only kernels
(`torch.ops.aten._weight_int8pack_mm`, torchao's int8 weight-only) measured 2-4.5x slower than
fbgemm per matrix on this kind of CPU at 1 to 64 rows, so decoding steps pay that accuracy for
speed, and prompts (whose numbers stay in the K/V cache) do not. torch marks its quantised tensor
type deprecated; it is used only inside `_pack_int8`, and the fallback above keeps int8 working if
it goes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .errors import CheckpointError, ConfigError
from .hardware import CPU_BF16_FLAGS, cpu_flags
from .model import Linear, row_loop, row_loop_applies

WEIGHTS = ("fp32", "f16", "int8")  # `--quantize` choices (fp32: no quantisation, decoding layout)
SCALE_SUFFIX = "_scale"  # NAME_scale: the scales of the int8 matrix NAME
QUANT_KEY = "quantization"  # the MANIFEST.json field of a model directory with int8 weights


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise ConfigError(f"--quantize must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    return weights


def _fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


# ---- int8 numbers ---------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, group_size: int = 0, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (q int8 (N, K), scale fp32 (N, K / G)): symmetric, one scale per group of G
    weights of a row (G = 0: the whole row), q = round(w / scale) in [-levels, levels]."""
    N, K = w.shape
    G = group_size or K
    if K % G:
        raise ValueError(f"group size {G} does not divide the row length {K}")
    groups = w.detach().float().reshape(N, K // G, G)
    amax = groups.abs().amax(dim=-1)  # (N, K / G)
    scale = torch.where(amax > 0, amax / levels, torch.ones_like(amax))
    q = torch.round(groups / scale[..., None]).clamp_(-levels, levels).to(torch.int8)
    return q.reshape(N, K), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 (N, K), scale (N, K / G)) -> fp32 (N, K), exactly q * scale."""
    N, K = q.shape
    groups = scale.shape[1]
    return (q.float().reshape(N, groups, K // groups) * scale.float()[..., None]).reshape(N, K)


def per_row(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped int8 -> one scale per row (N, 1): unchanged when it already is, else re-quantised."""
    if scale.shape[1] == 1:
        return q, scale.float()
    return quantize_int8(dequantize_int8(q, scale))


# ---- modules --------------------------------------------------------------------------------


def _pack_int8(q: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's packed form of int8 rows q (N, K) with scales (N,)."""
    with warnings.catch_warnings():  # torch marks quantised tensors deprecated (see the module doc)
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


class _Fbgemm(nn.Module):
    """fbgemm's dynamic linear on one packed weight (int8, or fp16 when `int8` is False),
    scripted by `_script`: x (..., K) -> (..., N) in x's dtype. int8: several rows are each scaled
    to max |x| = 1 first and back after, so that fbgemm's one activation scale per call serves
    every row alike.

    Why TorchScript: the packed weight is a TorchScript object, and passing it to the op from
    Python converts it at every call, ~14 µs (measured on AVX2, one core: a 64x64 int8 product
    took 22 µs from Python, 7.4 µs from this scripted module), i.e. ~3 ms per SmolLM2-135M token;
    and each small op costs ~1 µs here against 3-4 µs from Python."""

    def __init__(self, packed: Any, int8: bool) -> None:
        super().__init__()
        self.packed = packed
        self.int8 = int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.float()
        if not self.int8:
            return torch.ops.quantized.linear_dynamic_fp16(flat, self.packed).to(x.dtype)
        if flat.numel() == flat.shape[-1]:  # one row: one scale per call is one per row
            return torch.ops.quantized.linear_dynamic(flat, self.packed, False).to(x.dtype)
        amax = flat.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        return (torch.ops.quantized.linear_dynamic(flat / amax, self.packed, False) * amax).to(x.dtype)


def _script(form: _Fbgemm) -> Any:
    """The scripted form's forward, called as a method (that skips `nn.Module.__call__`: 7.4
    against 9.6 µs for a 64x64 int8 product)."""
    try:
        with warnings.catch_warnings():  # torch marks TorchScript deprecated
            warnings.simplefilter("ignore")
            return torch.jit.script(form).forward
    except Exception:  # a torch without TorchScript: the module as it is (correct, ~14 µs a call slower)
        return form.forward


def _fbgemm_int8(q: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's form of int8 rows q (N, K), scales (N, 1): a callable, x (..., K) -> (..., N).

    7-bit weights so that 8-bit activations never saturate fbgemm's 16-bit pair sums on AVX2
    (2 * 255 * 63 < 2^15); the alternative, 7-bit activations, measured 3x the loss."""
    q7, s7 = quantize_int8(dequantize_int8(q, scale), levels=63)
    return _script(_Fbgemm(_pack_int8(q7, s7[:, 0]), int8=True))


# From this many rows on (a prompt's positions), on a CPU with bf16 matrix instructions
# (AVX512-BF16, AMX), a weight-only product converts the int8 rows to bf16 and runs oneDNN's bf16
# matmul, the fp32 scales applied to its products: the same arithmetic as
# `aten._weight_int8pack_mm` (int8 is exact in bf16; one bf16 rounding of each unscaled sum, where
# that op rounds the scaled one), 1.7-2x faster at 64 rows and 2.4-2.9x at 256, slower below ~24
# (the conversion is then most of the call; measured per shape: docs/inference.md). Without those
# instructions oneDNN's bf16 matmul is emulated, so the int8 op stays.
DEQUANT_MIN_ROWS = 32


@functools.cache
def _bf16_matmul() -> bool:
    return bool(cpu_flags() & set(CPU_BF16_FLAGS))


def _weight_only(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> x W^T (..., N), W = q * scale, on bf16 activations: `aten._weight_int8pack_mm`,
    or from DEQUANT_MIN_ROWS rows on (with bf16 instructions) the bf16 matmul on the rows converted."""
    K, N = q.shape[1], q.shape[0]
    flat = x.reshape(-1, K).to(torch.bfloat16)
    if flat.shape[0] >= DEQUANT_MIN_ROWS and _bf16_matmul():
        y = F.linear(flat, q.to(torch.bfloat16)).float() * scale[:, 0]
    else:
        y = torch.ops.aten._weight_int8pack_mm(flat, q, scale[:, 0].to(torch.bfloat16))
    return y.to(x.dtype).view(*x.shape[:-1], N)


# ---- fbgemm inside torch.compile ------------------------------------------------------------
# A compiled graph cannot take a packed weight itself (dynamo has no proxy for a TorchScript
# object, nor traces into a scripted module: each layer was a graph break, and the compiled
# decode step ran slower than eager). So a layer (`_OpaqueLayer`) registers its fbgemm form here
# under a handle, holds the handle as a 0-d buffer (a graph input like any buffer: one graph
# serves every layer of a shape), and under `torch.compile` calls an opaque op
# (`lmforge::int8_linear`, `lmforge::f16_linear`) that looks the form up. A plain dict (a
# WeakValueDictionary lookup cost ~2 µs a call); an entry goes when its layer does. A plain
# `Library` op with a Python kernel: `torch.library.custom_op`'s wrapper measured ~20 µs more per
# call. A layer still costs ~12 µs more compiled than eager (the dispatcher's round trip into
# Python and the lookup; docs/inference.md).
_FORMS: dict[int, Any] = {}
_NEXT_HANDLE = itertools.count(1)


class _OpaqueLayer(nn.Module):
    """A layer with a fast form that torch.compile cannot see (`packed`, None where the library
    is missing: fbgemm's scripted module, oneDNN's packed tensor) and the handle buffer that
    names it for the compiled path. A copy (`copy.deepcopy`) packs its own: a scripted method
    cannot be copied, and a copied handle would name the original's form."""

    def _form(self) -> Any:
        raise NotImplementedError

    def _register(self) -> None:
        # Not a submodule (dynamo cannot trace a scripted one; `.to()` and `state_dict` must not
        # see it): a plain attribute.
        self.__dict__["packed"] = form = self._form()
        handle = next(_NEXT_HANDLE)
        if form is not None:
            _FORMS[handle] = form
            weakref.finalize(self, _FORMS.pop, handle, None)
        self.register_buffer("handle", torch.tensor(handle), persistent=False)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("packed", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register()


def _int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> x W^T (..., N), W = q * scale: fbgemm's form of the layer `handle` names, or
    (none: no fbgemm, or the layer gone, e.g. a copy that outlived its original) weight-only."""
    form = _FORMS.get(int(handle))
    return form(x) if form is not None else _weight_only(x, q, scale)


def _f16_linear(x: torch.Tensor, weight: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> x W^T (..., N), W = weight (fp16): fbgemm's form, or the plain product."""
    form = _FORMS.get(int(handle))
    return form(x) if form is not None else F.linear(x, weight.to(x.dtype))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, form: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """x (..., K) -> x W^T (..., N) with W = weight (fp32): oneDNN's product on the packed copy
    where `form` = (packed copy, most rows) applies (2 .. most rows), else the plain product."""
    rows = x.numel() // x.shape[-1]
    if form is None or not 1 < rows <= form[1]:
        return F.linear(x, weight)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), form[0], None, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, handle: torch.Tensor) -> torch.Tensor:
    """`PackedLinear`'s product, the layer named by `handle` (the plain one if it is gone)."""
    return _onednn_linear(x, weight, _FORMS.get(int(handle)))


def _linear_shape(x: torch.Tensor, weight: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_LIB = torch.library.Library("lmforge", "FRAGMENT")
_LIB.define("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor handle) -> Tensor")
_LIB.define("f16_linear(Tensor x, Tensor weight, Tensor handle) -> Tensor")
_LIB.impl("int8_linear", _int8_linear, "CPU")
_LIB.define("packed_linear(Tensor x, Tensor weight, Tensor handle) -> Tensor")
_LIB.impl("f16_linear", _f16_linear, "CPU")
_LIB.impl("packed_linear", _packed_linear, "CPU")
torch.library.register_fake("lmforge::int8_linear", _linear_shape, lib=_LIB)
torch.library.register_fake("lmforge::f16_linear", _linear_shape, lib=_LIB)
torch.library.register_fake("lmforge::packed_linear", _linear_shape, lib=_LIB)


# ---- modules (continued) --------------------------------------------------------------------

# Without lmforge's VNNI kernel (`_int8_kernel`): a decoding step of up to this many sequences
# (serve's batched decode: one row per running request) runs fbgemm's int8 product; a prompt's
# positions, and more rows, the weight-only one: ~3x slower per matrix but ~2.7x more accurate
# than fbgemm (measured: docs/inference.md), and a prompt's numbers stay in its K/V cache for
# every later token.
FBGEMM_MAX_ROWS = 64


def _int8_kernel(out_features: int, in_features: int) -> bool:
    """Whether an int8 layer of this shape multiplies with lmforge's VNNI kernel (lmforge/kernels.py
    `int8_ready`: AVX-512 VNNI, the kernels built; `int8_fits`: 16 | N, 32 | K)."""
    return kernels.int8_fits(out_features, in_features) and kernels.int8_ready()


class Int8Linear(_OpaqueLayer):
    """y = x W^T with W = q * scale: q int8 (N, K), scale fp32 (N, 1); no bias (lmforge has none).

    On a CPU with AVX-512 VNNI (and a shape the kernel takes) every float32 product on the CPU
    without gradients, one row or a prompt's hundreds, eager or compiled, is lmforge's kernel
    (`kernels.int8_linear`: 8-bit weights, activations quantised per block of 32, llama.cpp's
    Q8_0 arithmetic), except a compiled step of one row (inductor's weight-only loop, below).
    Elsewhere:
    A decoding step (x (..., 1, K) or (rows, K), up to FBGEMM_MAX_ROWS rows): fbgemm's dynamic
    int8 linear on a 7-bit copy of the weights, each row quantised to 8 bits at run time
    (`_Fbgemm`). A prompt (x (B, T > 1, K)) or more rows: weight-only, `aten._weight_int8pack_mm`
    on bf16 activations. See the module doc. Inside `torch.compile` the fbgemm product is the
    opaque op `lmforge::int8_linear`; the rest traces.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        q, scale = per_row(q, scale)
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.reshape(-1, 1).contiguous(), persistent=False)
        self.register_buffer("kw", None, persistent=False)  # `kernels.int8_linear`'s weights where it runs (`_form`)
        self.register_buffer("ksum", None, persistent=False)
        self._register()

    def _form(self) -> Any:
        """lmforge's VNNI kernel's layout of the weights (buffers `kw`, `ksum`; no fbgemm form then),
        else fbgemm's form, else None."""
        if self.q.device.type == "cpu" and _int8_kernel(*self.q.shape):
            kw, ksum = kernels.int8_pack(self.q)
            self.register_buffer("kw", kw, persistent=False)
            self.register_buffer("ksum", ksum, persistent=False)
            return None
        self.register_buffer("kw", None, persistent=False)  # e.g. unpickled where the kernel does not run
        self.register_buffer("ksum", None, persistent=False)
        return _fbgemm_int8(self.q, self.scale) if _fbgemm() else None

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Linear":
        return cls(*quantize_int8(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As few Python-level ops as possible: each costs 3-4 µs here, ~10 % of a 576x576 product.
        if (self.kw is not None and x.device.type == "cpu" and x.dtype == torch.float32
                and not (x.requires_grad and torch.is_grad_enabled())):  # the kernel has no backward
            if not torch.compiler.is_compiling():
                return torch.ops.lmforge_kernels.int8_linear(x, self.kw, self.ksum, self.scale)
            if row_loop_applies(x, self.q):  # one row: inductor's loop over the int8 rows (`model.linear`)
                return row_loop(x, self.q) * self.scale[:, 0]
            if not torch.compiler.is_exporting():  # an exported program must not need lmforge's library
                return torch.ops.lmforge_kernels.int8_linear(x, self.kw, self.ksum, self.scale)
        if (x.device.type == "cpu" and x.numel() <= FBGEMM_MAX_ROWS * self.in_features
                and (x.dim() < 3 or x.shape[-2] == 1)):  # a decoding step, not a prompt's positions
            if torch.compiler.is_compiling():
                if row_loop_applies(x, self.q):  # one row: inductor's loop over the int8 rows (`model.linear`)
                    return row_loop(x, self.q) * self.scale[:, 0]
                return torch.ops.lmforge.int8_linear(x, self.q, self.scale, self.handle)
            if self.packed is not None:
                return self.packed(x)
        if x.device.type == "cpu":
            return _weight_only(x, self.q, self.scale)
        return F.linear(x, self.q.to(x.dtype) * self.scale.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class F16Linear(_OpaqueLayer):
    """y = x W^T with W held in fp16 (fbgemm: packed, fp32 arithmetic; called as `Int8Linear`'s
    form is, and inside `torch.compile` as the opaque op `lmforge::f16_linear`, except for one row:
    there `model.linear`'s loop, which reads the fp16 rows faster than fbgemm)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight", w.detach().half().contiguous(), persistent=False)
        self._register()

    def _form(self) -> Any:
        if not (_fbgemm() and hasattr(torch.ops.quantized, "linear_dynamic_fp16")):
            return None
        return _script(_Fbgemm(torch.ops.quantized.linear_prepack_fp16(self.weight.float(), None), int8=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            if torch.compiler.is_compiling():
                if row_loop_applies(x, self.weight):  # one row: inductor's own loop over the fp16 rows (`model.linear`)
                    return row_loop(x, self.weight)
                return torch.ops.lmforge.f16_linear(x, self.weight, self.handle)
            if self.packed is not None:
                return self.packed(x)
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, f16"


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(_OpaqueLayer, nn.Linear):
    """An fp32 linear layer (its own `weight` Parameter, shared as it was, e.g. with a tied
    embedding) plus oneDNN's prepacked copy of that weight, for products of several rows on CPU.

    One row (single-stream decoding), more than `max_rows` rows (None: no limit), a product with
    grad, another device or dtype: `F.linear` on `weight` as before (the decoding layout reads one
    row fastest; on some CPUs MKL's sgemm beats oneDNN from some row count: `pack_measured` finds
    it per shape).
    Several rows: oneDNN's linear on the packed copy (one pack serves any row count). The copy is
    taken once: the weight must not change afterwards (inference only, as `prepare`'s model is).
    Inside `torch.compile` (`serve --compile`) the product of several rows is the opaque op
    `lmforge::packed_linear` (inductor cannot take oneDNN's packed tensor), so compiling keeps the
    packed products; one row is `model.linear`'s loop over the plain weight."""

    def __init__(self, base: nn.Linear, max_rows: int | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.max_rows = max_rows
        self.weight = base.weight  # the same Parameter: names, ties and storage stay
        self.register_parameter("bias", None)
        self._register()

    def _form(self) -> tuple[torch.Tensor, int] | None:
        # an opaque oneDNN tensor that `state_dict` and `.to()` must not see, and the most rows it serves
        if not _onednn():
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().float(), None)
        return packed, self.max_rows if self.max_rows is not None else 2**62

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            if torch.compiler.is_compiling():
                if row_loop_applies(x, self.weight):  # one row: the plain weight through `model.linear`'s loop
                    return row_loop(x, self.weight)
                return torch.ops.lmforge.packed_linear(x, self.weight, self.handle)
            return _onednn_linear(x, self.weight, self.packed)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        most = "" if self.max_rows is None else f" (up to {self.max_rows})"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for several rows{most}"


def _packable(model: nn.Module, lin: object) -> bool:
    """A plain fp32 CPU `nn.Linear` of a model prepared for fp32 decoding, on a torch with oneDNN."""
    return (getattr(model, "weights", None) == "fp32" and type(lin) in (nn.Linear, Linear) and lin.weight.device.type == "cpu"
            and lin.weight.dtype == torch.float32 and _onednn())


# Row counts at which `packed_rows` compares the two products: serve's decode batch (one row per
# running request, 16 by default), a few prompts prefilled together, a long prompt.
PACK_ROWS = (16, 64, 256)
PACK_UNLIMITED = 2**62  # `packed_rows`: packed at any row count
PACK_MARGIN = 0.9  # the packed product must take at most this share of the plain one's time


def _best_seconds(form: str, shape: tuple[int, ...], rows: int, call: Any) -> float:
    """Seconds per call(), the best of 3 timings (a large product: fewer calls per timing)."""
    call()
    t0 = time.perf_counter()
    call()
    reps = max(1, min(5, int(0.01 / max(time.perf_counter() - t0, 1e-9))))  # ~10 ms per timing at most
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


@torch.no_grad()
def packed_rows(weight: torch.Tensor, timer: Any = None) -> int:
    """The most rows up to which oneDNN's prepacked product of `weight` (fp32, as laid out) measured
    faster on this machine than the plain one (`F.linear`): timed at each of PACK_ROWS with random
    rows, the packed one must take at most PACK_MARGIN of the plain one's time. 0: not at 16 rows
    (leave the layer as it is); the last count it won at, where it lost at a larger one;
    PACK_UNLIMITED where it won at all of them. timer(form, shape, rows, call) -> seconds per call
    (form "plain" or "packed"; tests give a made-up one).

    Which wins depends on the CPU and the shape: on an AVX2 EPYC the packed form won only for the
    head and gate/up/down up to ~24 rows; on an AVX-512 EPYC (where MKL's sgemm does not use
    AVX-512) it won 2-2.7x for every shape from 2 to 256 rows (docs/inference.md)."""
    timer = timer or _best_seconds
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float(), None)
    most = 0
    shape = tuple(weight.shape)
    for rows in PACK_ROWS:
        x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
        plain = timer("plain", shape, rows, lambda x=x: F.linear(x, weight))
        fast = timer("packed", shape, rows, lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        if fast > PACK_MARGIN * plain:
            return most
        most = rows
    return PACK_UNLIMITED


def pack_measured(model: nn.Module, timer: Any = None) -> dict[str, int]:
    """serve's form of a model prepared for fp32 decoding (`prepare(model, "fp32")`, on CPU): each
    projection (q, k, v, o, gate, up, down, the head) whose shape `packed_rows` finds faster
    prepacked on this machine becomes a `PackedLinear` up to that many rows (one measurement per
    distinct shape: 2.7 s in all for SmolLM2-135M on one AVX-512 core). Each costs a second copy of its weight (all
    of them: 540 MB for SmolLM2-135M). Returns {layer name: most rows} of the packed ones, e.g.
    {"q_proj": 16, "lm_head": PACK_UNLIMITED}; {} where nothing applies: other weights (f16,
    int8), a model not prepared, another device, a torch without oneDNN, a CPU where the plain
    products are as fast. A layer that is not a plain `Linear` (a LoRA adapter's wrapper, packed
    already) is left alone."""
    decided: dict[tuple[int, ...], int] = {}
    packed: dict[str, int] = {}
    for parent, attr in projections(model):
        lin = getattr(parent, attr)
        if not _packable(model, lin):
            continue
        shape = tuple(lin.weight.shape)
        if shape not in decided:
            decided[shape] = packed_rows(lin.weight, timer)
        if decided[shape]:
            setattr(parent, attr, PackedLinear(lin, None if decided[shape] == PACK_UNLIMITED else decided[shape]))
            packed[attr] = decided[shape]
    return packed


# ---- preparing a model ----------------------------------------------------------------------


def projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every weight matrix a forward multiplies by: each block's q, k, v,
    o, gate, up, down and the output head (tied or not)."""
    out: list[tuple[nn.Module, str]] = []
    for block in model.model.layers:
        out += [(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(block.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    out.append((model, "lm_head"))
    return out


@torch.no_grad()
def prepare(model: nn.Module, weights: str = "fp32", stored: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            *, compiled: bool = False) -> nn.Module:
    """The model (changed in place, for inference only) with its weights held as `weights`.

    stored: int8 matrices read from a quantised model directory (name -> (q, scale)); with
    weights "int8" they are used as they are instead of being quantised from the fp32 copy.
    compiled: its decode step is to be compiled (`generate.compile_decode`): fp32 weights then stay
    row-major, the layout that compiled one-row products read fastest (`model.linear`)."""
    check_weights(weights)
    stored = stored or {}
    for parent, attr in projections(model):
        lin = getattr(parent, attr)
        if not isinstance(lin, nn.Linear):
            continue  # prepared already
        name = _param_name(model, parent, attr)
        if weights == "fp32":
            # A wide matrix (out >= in: q, gate, up, the head) column-major, so x @ weight.t() reads
            # weight.t() row by row; a narrow one (k, v, down) stays row-major, which MKL's gemv
            # reads faster for that shape (measured per shape: docs/inference.md). For a tied head
            # this is the embedding's tensor too (a lookup reads one strided row).
            if lin.out_features >= lin.in_features and not compiled:
                lin.weight.data = lin.weight.data.t().contiguous().t()
        elif weights == "f16":
            setattr(parent, attr, F16Linear(lin.weight))
        elif name in stored:
            setattr(parent, attr, Int8Linear(*stored[name]))
        else:
            setattr(parent, attr, Int8Linear.from_float(lin.weight))
    if weights == "fp32" and getattr(model.cfg, "tie_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight  # still one tensor
    model.weights = weights  # what `generate` reports; read by nothing that computes
    return model


@contextlib.contextmanager
def decoding_layout(model: nn.Module) -> Iterator[nn.Module]:
    """The fp32 decoding layout for the duration of a block, then the row-major layout back (the
    same bytes: a transpose copies exactly). For a verb that decodes between computations whose
    numbers must stay as trained (eval: a few-row product differs in the last bit between the two
    layouts). A model already prepared (`model.weights` set) is left as it is."""
    if hasattr(model, "weights"):
        yield model
        return
    prepare(model, "fp32")
    try:
        yield model
    finally:
        row_major(model)
        del model.weights


@torch.no_grad()
def row_major(model: nn.Module) -> None:
    """Every fp32 projection weight row-major again (a transpose copies exactly; those that are
    already cost nothing): the layout of training, and of a compiled decode step's one-row
    products (`generate.compile_decode`)."""
    for parent, attr in projections(model):
        lin = getattr(parent, attr)
        if isinstance(lin, nn.Linear) and not lin.weight.is_contiguous():
            # `.data` only: a tied head stays the embedding's Parameter. Nothing is re-tied here: an
            # f16 or int8 head holds its own copy, and assigning the embedding to its `weight` once
            # replaced F16Linear's fp16 buffer with fp32, which its one-row loop then read
            lin.weight.data = lin.weight.data.contiguous()


def _param_name(model: nn.Module, parent: nn.Module, attr: str) -> str:
    """The stored tensor a projection's weight comes from (a tied head: the embedding)."""
    if parent is model and attr == "lm_head":
        return "model.embed_tokens.weight" if model.cfg.tie_embeddings else "lm_head.weight"
    for name, module in model.named_modules():
        if module is parent:
            return f"{name}.{attr}.weight"
    raise AssertionError(attr)


# ---- stored int8 ----------------------------------------------------------------------------


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """The tensors a quantised model directory stores as int8: every matrix (norms stay fp32)."""
    return len(shape) == 2


def stored_tensors(tensors: dict[str, torch.Tensor], quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: fp32 tensors, the quantised ones as NAME int8 + NAME_scale."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in quantized:
            q, scale = quantized[name]
            out[name], out[name + SCALE_SUFFIX] = q.contiguous(), scale.float().contiguous()
        else:
            out[name] = t
    return out


def read_stored(raw: dict[str, torch.Tensor], info: dict[str, Any] | None, source: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """model.safetensors' tensors -> (fp32 tensors, int8 ones as name -> (q, scale)), checked
    against the manifest's quantization record `info` (None: a plain fp32 directory)."""
    if info is None:
        stray = sorted(n for n in raw if n.endswith(SCALE_SUFFIX) or raw[n].dtype == torch.int8)
        if stray:
            raise CheckpointError(f"{source}: holds int8 tensors ({stray[0]}, ...) but its manifest records no "
                                  f"{QUANT_KEY}; the directory is damaged: import it again")
        return raw, {}
    if not (isinstance(info, dict) and info.get("format") == "int8" and isinstance(info.get("group_size"), int)
            and info["group_size"] >= 0):
        raise CheckpointError(f"{source}: unsupported {QUANT_KEY} record {info!r} (this lmforge reads "
                              "{\"format\": \"int8\", \"group_size\": G})")
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, t in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype != torch.int8:
            tensors[name] = t
            continue
        scale = raw.get(name + SCALE_SUFFIX)
        G = info["group_size"] or t.shape[1]
        if t.dim() != 2 or scale is None or tuple(scale.shape) != (t.shape[0], t.shape[1] // G) or t.shape[1] % G:
            raise CheckpointError(f"{source}: int8 tensor {name} {tuple(t.shape)} lacks a matching {name + SCALE_SUFFIX} "
                                  f"of shape (rows, row length / {G})")
        quantized[name] = (t, scale.float())
        tensors[name] = dequantize_int8(t, scale)
    orphans = sorted(n for n in raw if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] not in quantized)
    if orphans:
        raise CheckpointError(f"{source}: scale tensor {orphans[0]} has no int8 tensor beside it")
    return tensors, quantized


__all__ = ["WEIGHTS", "SCALE_SUFFIX", "QUANT_KEY", "check_weights", "quantize_int8", "dequantize_int8", "per_row",
           "Int8Linear", "F16Linear", "PackedLinear", "pack_measured", "packed_rows", "projections", "prepare", "decoding_layout", "row_major", "quantizable", "stored_tensors", "read_stored"]
