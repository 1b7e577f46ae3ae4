"""lmforge's own C++ kernels (lmforge/csrc/), built on this machine once and then loaded.

Design
------
Two kernels, in one library (why each, and what it measured, is written in its source and in
docs/inference.md):

- `decode_attention` (lmforge/csrc/decode_attention.cpp): a batched decode step's attention fused
  into one loop per (row, K/V head) that reads each cached key and value row once.
  `model.decode_attention` calls it for steps of several rows (serve's batched decode) where
  `ready()`, and otherwise runs its batched matrix products, the reference the kernel is tested
  against.
- `int8_linear` (lmforge/csrc/int8_linear.cpp): int8 weights times activations quantised per
  block of 32 (llama.cpp's Q8_0 arithmetic) with AVX-512 VNNI's 8-bit dot products. Defined only
  where the CPU has them (`int8_ready()`); `quant.Int8Linear` then multiplies every row count with
  it (`int8_pack` lays its weights out; `int8_reference` is the same arithmetic in torch, the spec),
  and elsewhere keeps fbgemm and its weight-only products.

- Built with torch's own extension builder (`torch.utils.cpp_extension.load_inline`: the C++
  compiler, ninja, torch's headers and libraries) with `-O3 -march=native -fopenmp`, into the cache
  (`util.cache_root()/kernels/lmforge_kernels_<key>.so`), keyed by the source, torch's version
  and the CPU's flags: native code for one kind of CPU must not load on another that shares the
  cache. The first use on a machine compiles (~30 s, one core; a line says so) in a directory of
  its own and renames the library into place (processes that start together each build, none
  waits on a lock a killed build left, none loads half a file); every later process loads it with
  `torch.ops.load_library` in milliseconds, without a compiler.
- The kernels must agree with their references: after loading, one small call of each is
  compared (`_agrees`), and a library that does not is not used.
- Where they cannot be built (no C++ compiler or ninja, a torch without the builder) or are turned
  off (`LMFORGE_KERNELS=0`), everything runs as before, slower: one warning names why.
- decode_attention is not for: one row (a single stream's step is compiled ahead of time,
  lmforge/aot.py, with the reference inside its graph; eagerly one row's products are small), K/V
  other than float32, gradients (the op has no backward; decoding runs without them), tensors off
  the CPU. int8_linear: float32 activations on the CPU without gradients, weights with 16 | N and
  32 | K; a compiled one-row step and an exported program keep `Int8Linear`'s weight-only loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import threading
from pathlib import Path

import torch

from .hardware import cpu_flags
from .util import cache_root, console, warn

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("decode_attention.cpp", "int8_linear.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for's threads (torch's own libgomp at run time)
ENV = "LMFORGE_KERNELS"  # "0": never build or use lmforge's kernels
MAX_GROUP = 8  # query heads per K/V head the kernel handles (its HEADS table)
INT8_BLOCK = 32  # activation values per scale in int8_linear (Q8_0's block)
INT8_COLS = 16  # output columns per vector in int8_linear's weight layout
INT8_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")  # /proc/cpuinfo's names of what int8_linear needs

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "ready": built, loaded and checked (or not), once per process


def key() -> str:
    """sha256 over what the built library depends on: the source, the flags, torch, the CPU."""
    parts = {"source": [hashlib.sha256(p.read_bytes()).hexdigest() for p in SOURCES], "flags": FLAGS, "torch": torch.__version__,
             "cpu": [platform.machine(), sorted(cpu_flags())]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def ready() -> bool:
    """Whether the kernels are loaded in this process: the first call builds them (once per
    machine, ~30 s) or loads them from the cache, and checks them; False where that failed (one
    warning) or `LMFORGE_KERNELS=0`."""
    if "ready" not in _state:
        with _lock:
            if "ready" not in _state:
                _state["ready"] = _load()
    return _state["ready"]


def _load() -> bool:
    if os.environ.get(ENV, "1") == "0":
        return False
    name = f"lmforge_kernels_{key()}"
    built = cache_root() / "kernels" / f"{name}.so"
    try:
        if not hasattr(torch.ops.lmforge_kernels, "decode_attention"):
            if built.is_file():
                torch.ops.load_library(str(built))  # no compiler or ninja needed once built
            else:
                _build(name, built)
        torch.library.register_fake("lmforge_kernels::decode_attention", _shape)  # torch.compile's graphs call it too
        if _has_int8():
            torch.library.register_fake("lmforge_kernels::int8_linear", _int8_shape)
        agrees = _agrees()
    except Exception as e:  # no compiler, no ninja, a torch without the builder: the reference path
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warn(f"lmforge's kernels could not be built ({type(e).__name__}: {first}); batched decode steps use "
             f"batched matrix products and int8 products fbgemm (slower). {ENV}=0 turns the kernels off.")
        return False
    if not agrees:
        warn("lmforge's kernels disagree with their references on this machine; they are not used "
             f"(rebuild by removing {built})")
        return False
    return True


def _build(name: str, built: Path) -> None:
    """Compile the kernel in a fresh directory beside `built` (which also loads it into this
    process) and rename the library to `built`: processes that build at once each build their own
    (no lock that a killed build would leave behind), and no process ever loads half a file."""
    from torch.utils import cpp_extension

    built.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # native code: only its user writes here
    console.print(f"building lmforge's kernels into {built.parent} (once per machine, ~30 s)")
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=built.parent) as tmp:
        cpp_extension.load_inline(name, cpp_sources=[p.read_text() for p in SOURCES], is_python_module=False,
                                  extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=tmp, verbose=False)
        os.replace(Path(tmp) / f"{name}.so", built)


def _agrees() -> bool:
    """One small step through each kernel and through its reference agree (attention: torch's)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 32, generator=g)
    k, v = torch.randn(3, 2, 40, 32, generator=g), torch.randn(3, 2, 40, 32, generator=g)
    mask = torch.arange(40)[None, None, :] <= torch.tensor([39, 0, 17])[:, None, None]
    with torch.no_grad():
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        if not torch.allclose(decode_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-4):
            return False
        if not _has_int8():
            return True
        w = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=g)
        scale, x = torch.rand(48, generator=g) / 100, torch.randn(21, 96, generator=g)
        want = int8_reference(x, w, scale)
        return torch.allclose(int8_linear(x, *int8_pack(w), scale), want, atol=1e-5, rtol=1e-5)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` may take these tensors (see the module doc), the kernel
    loaded: several rows, float32 on the CPU, no gradient, a supported shape. Inside a graph
    being traced it only reads whether the kernel is loaded (a build there would break the graph;
    `serve --compile` loads it in its warm-up, before compiling)."""
    H, KV, hd = q.shape[1], k.shape[1], q.shape[-1]
    return (q.shape[0] > 1 and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
            and hd > 0 and hd % 16 == 0 and 0 < KV <= H and H // KV <= MAX_GROUP
            and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not torch.compiler.is_exporting()
            and (_state.get("ready", False) if torch.compiler.is_compiling() else ready()))


def int8_ready() -> bool:
    """Whether `int8_linear` runs here: a CPU with AVX-512 VNNI and the kernels `ready()` (built
    or loaded on the first call; on other CPUs nothing is built for it)."""
    return bool(set(INT8_FLAGS) <= cpu_flags()) and ready() and _has_int8()


def _has_int8() -> bool:
    return hasattr(torch.ops.lmforge_kernels, "int8_linear")


def int8_fits(out_features: int, in_features: int) -> bool:
    """Whether a weight of this shape has `int8_linear`'s layout: 16 | N, 32 | K."""
    return out_features % INT8_COLS == 0 and in_features % INT8_BLOCK == 0 and in_features > 0


def int8_pack(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows q (N, K) -> `int8_linear`'s (w, wsum): w (N/16, K/4, 16, 4), each 64-byte vector 4
    consecutive k of 16 consecutive rows (VNNI's operand); wsum (N/16, K/32, 16) int32, -128 * the
    sum of each row's block of 32 (x enters as unsigned q + 128; this takes the 128 back out)."""
    N, K = q.shape
    w = q.reshape(N // INT8_COLS, INT8_COLS, K // 4, 4).permute(0, 2, 1, 3).contiguous()
    blocks = q.to(torch.int32).reshape(N // INT8_COLS, INT8_COLS, K // INT8_BLOCK, INT8_BLOCK).sum(-1, dtype=torch.int32)
    return w, (-128 * blocks.permute(0, 2, 1)).contiguous()


def int8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`int8_linear`'s arithmetic in torch: x (..., K) quantised per block of 32 (s = max|x| / 127,
    round(x * (127 / max|x|)) half to even, float32 as the kernel computes them), times q (N, K)
    int8, exactly, per block; then scale (N,) per output row. Float64 sums (the kernel's are float32)."""
    K = x.shape[-1]
    blocks = x.reshape(-1, K // INT8_BLOCK, INT8_BLOCK).float()
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax as a division (`127 / tensor` multiplies by a reciprocal: another rounding)
    inv = torch.full_like(amax, 127).div(amax)
    inv = torch.where((amax > 0) & torch.isfinite(inv), inv, torch.zeros_like(amax))  # a tiny amax overflows 127 / amax
    xq = torch.round(blocks * inv).clamp(-128, 127)  # (M, G, 32) integers
    dots = torch.einsum("mgk,ngk->mgn", xq.double(), q.double().reshape(q.shape[0], K // INT8_BLOCK, INT8_BLOCK))
    y = (dots * (amax / 127).double()).sum(1) * scale.reshape(-1).double()
    return y.float().reshape(*x.shape[:-1], q.shape[0])


def int8_linear(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel: x (..., K) float32 -> (..., N), weights from `int8_pack`, scale (N,) float32.
    Only where `int8_ready()` (it loads nothing)."""
    return torch.ops.lmforge_kernels.int8_linear(x, w, wsum, scale)


def _int8_shape(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0] * INT8_COLS)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fused kernel: q (B, H, 1, hd), k and v (B, KV, L, hd), mask (B, 1, L) -> (B, H, 1, hd);
    `model.decode_attention`'s arguments and result. Only where `applies` (it loads nothing)."""
    return torch.ops.lmforge_kernels.decode_attention(q, k, v, mask)


def _shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)
