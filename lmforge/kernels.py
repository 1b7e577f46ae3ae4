"""lmforge's own C++ kernels (lmforge/csrc/), built on this machine once and then loaded.

Design
------
One kernel so far: `decode_attention`, a batched decode step's attention fused into one loop per
(row, K/V head) that reads each cached key and value row once (lmforge/csrc/decode_attention.cpp;
why, and what it measured, is written there and in docs/inference.md). `model.decode_attention`
calls it for steps of several rows (serve's batched decode) where `ready()`, and otherwise runs
its batched matrix products, the reference the kernel is tested against.

- Built with torch's own extension builder (`torch.utils.cpp_extension.load_inline`: the C++
  compiler, ninja, torch's headers and libraries) with `-O3 -march=native -fopenmp`, into the cache
  (`util.cache_root()/kernels/lmforge_kernels_<key>.so`), keyed by the source, torch's version
  and the CPU's flags: native code for one kind of CPU must not load on another that shares the
  cache. The first use on a machine compiles (~20 s, one core; a line says so) in a directory of
  its own and renames the library into place (processes that start together each build, none
  waits on a lock a killed build left, none loads half a file); every later process loads it with
  `torch.ops.load_library` in milliseconds, without a compiler.
- The kernel must agree with the reference: after loading, one small step of each is compared
  (`_agrees`), and a kernel that does not is not used.
- Where it cannot be built (no C++ compiler or ninja, a torch without the builder) or is turned
  off (`LMFORGE_KERNELS=0`), everything runs as before, a little slower: one warning names why.
- Not for: one row (a single stream's step is compiled ahead of time, lmforge/aot.py, with the
  reference inside its graph; eagerly one row's products are small), K/V other than float32,
  gradients (the op has no backward; decoding runs without them), tensors off the CPU.
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

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for's threads (torch's own libgomp at run time)
ENV = "LMFORGE_KERNELS"  # "0": never build or use lmforge's kernels
MAX_GROUP = 8  # query heads per K/V head the kernel handles (its HEADS table)

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "ready": built, loaded and checked (or not), once per process


def key() -> str:
    """sha256 over what the built library depends on: the source, the flags, torch, the CPU."""
    parts = {"source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(), "flags": FLAGS, "torch": torch.__version__,
             "cpu": [platform.machine(), sorted(cpu_flags())]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def ready() -> bool:
    """Whether the kernels are loaded in this process: the first call builds them (once per
    machine, ~20 s) or loads them from the cache, and checks them; False where that failed (one
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
        agrees = _agrees()
    except Exception as e:  # no compiler, no ninja, a torch without the builder: the reference path
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warn(f"lmforge's decode-attention kernel could not be built ({type(e).__name__}: {first}); batched decode "
             f"steps use batched matrix products (same results, slower). {ENV}=0 turns the kernel off.")
        return False
    if not agrees:
        warn("lmforge's decode-attention kernel disagrees with the reference on this machine; it is not used "
             f"(rebuild by removing {built})")
        return False
    return True


def _build(name: str, built: Path) -> None:
    """Compile the kernel in a fresh directory beside `built` (which also loads it into this
    process) and rename the library to `built`: processes that build at once each build their own
    (no lock that a killed build would leave behind), and no process ever loads half a file."""
    from torch.utils import cpp_extension

    built.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # native code: only its user writes here
    console.print(f"building lmforge's decode-attention kernel into {built.parent} (once per machine, ~20 s)")
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=built.parent) as tmp:
        cpp_extension.load_inline(name, cpp_sources=[SOURCE.read_text()], is_python_module=False,
                                  extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=tmp, verbose=False)
        os.replace(Path(tmp) / f"{name}.so", built)


def _agrees() -> bool:
    """One small step through the kernel and through torch's attention agree."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 32, generator=g)
    k, v = torch.randn(3, 2, 40, 32, generator=g), torch.randn(3, 2, 40, 32, generator=g)
    mask = torch.arange(40)[None, None, :] <= torch.tensor([39, 0, 17])[:, None, None]
    with torch.no_grad():
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        return torch.allclose(decode_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-4)


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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The fused kernel: q (B, H, 1, hd), k and v (B, KV, L, hd), mask (B, 1, L) -> (B, H, 1, hd);
    `model.decode_attention`'s arguments and result. Only where `applies` (it loads nothing)."""
    return torch.ops.lmforge_kernels.decode_attention(q, k, v, mask)


def _shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)
