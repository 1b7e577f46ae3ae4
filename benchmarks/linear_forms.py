"""ms per matrix product on one thread, per SmolLM2-135M weight shape and row count, for each form
an fp32 weight can take (docs/inference.md, "serve's several-row products", has the figures).

Forms: row-major (`F.linear` on the (out, in) weight as trained), column-major (its transpose
contiguous), the decoding layout `quant.prepare(model, "fp32")` picks (column-major when out >= in),
and oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise` on a weight from
`torch.ops.mkldnn._reorder_linear_weight`). Each block shape is 30 distinct matrices used in turn,
as a forward uses the 30 layers', so none is read from cache; the head is one 113 MB matrix. Each
figure is the best of 3 passes. --mkl adds MKL's packed sgemm (`torch.ops.mkl._mkl_linear`), packed
for the row count it is called with (a call with another count runs the plain product).

--one-row: instead, one activation row (a single stream's decode step) against each weight form a
compiled decode step can use (docs/inference.md "Compiled decoding"): fp32 through MKL (row- and
column-major) and through `model.linear` compiled (inductor's own loop over the row-major weight);
f16 and int8 through fbgemm (`quant.F16Linear`, `quant.Int8Linear` eagerly) and through the
compiled loop. The compiled figures include the call into a compiled function (~10-25 us), which a
decode step pays once per block, not per product; 30 int8 or f16 copies of the smaller shapes fit
in the 32 MB L3 of the machine measured, so those read partly from cache.

    OMP_NUM_THREADS=1 python benchmarks/linear_forms.py --rows 1,4,8,16
--int8-prompt: instead, int8 weights at several rows (a prompt's positions) through each product
`quant.Int8Linear` can run: fbgemm's dynamic int8 (decoding steps), `aten._weight_int8pack_mm` on
bf16 activations, and the int8 rows converted to bf16 for oneDNN's bf16 matmul (the weight-only
forms; `quant.DEQUANT_MIN_ROWS` picks between them).

--int8-kernel: instead, int8 weights through lmforge's VNNI kernel (`kernels.int8_linear`, where
the CPU has AVX-512 VNNI) against fbgemm's dynamic int8 and the weight-only bf16 product, per shape
and row count, and then every product of one SmolLM2-135M forward in turn (30 layers' q, k, v, o,
gate, up, down and the head: 135 MB, from memory), as a serve step (16 rows) or a prompt (64) runs them.

    OMP_NUM_THREADS=1 python benchmarks/linear_forms.py --one-row
    OMP_NUM_THREADS=1 python benchmarks/linear_forms.py --int8-prompt --rows 4,8,16,32,64,128,256
    OMP_NUM_THREADS=1 python benchmarks/linear_forms.py --int8-kernel --rows 1,8,16,64,256
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"q, o": (576, 576), "k, v": (192, 576), "gate, up": (1536, 576), "down": (576, 1536), "head": (49152, 576)}
LAYERS = 30


def best_ms(calls: list[Callable[[], torch.Tensor]], passes: int) -> float:
    """Best of 3 timings of `passes` passes over `calls`, in ms per call."""
    for f in calls:
        f()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(passes):
            for f in calls:
                f()
        best = min(best, (time.perf_counter() - start) / passes / len(calls))
    return best * 1e3


def one_row() -> None:
    """The --one-row table: us per product of one row, and the weights' GB/s."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmforge.model import linear
    from lmforge.quant import F16Linear, Int8Linear

    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # a graph per shape and weight dtype
    loop = torch.compile(lambda x, w: linear(x, w), dynamic=False)
    loop16 = torch.compile(lambda x, w: linear(x, w), dynamic=False)
    loop8 = torch.compile(lambda x, layer: linear(x, layer.q) * layer.scale[:, 0], dynamic=False)
    cols = ["fp32 MKL row-major", "fp32 MKL column-major", "fp32 compiled loop", "f16 fbgemm", "f16 compiled loop",
            "int8 fbgemm", "int8 compiled loop"]
    print("us per product of one row (GB/s of weights read)")
    print("| shape (out x in) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    with torch.no_grad():
        for name, (N, K) in SHAPES.items():
            copies = 2 if N > 10_000 else LAYERS  # two heads: 226 MB, past any cache
            ws = [torch.randn(N, K) * 0.05 for _ in range(copies)]
            col = [w.t().contiguous().t() for w in ws]
            f16 = [F16Linear(w) for w in ws]
            int8 = [Int8Linear.from_float(w) for w in ws]
            x = torch.randn(1, K)
            passes = 10 if copies == 2 else 20
            runs = [([lambda w=w, x=x: F.linear(x, w) for w in ws], 4),
                    ([lambda w=w, x=x: F.linear(x, w) for w in col], 4),
                    ([lambda w=w, x=x: loop(x, w) for w in ws], 4),
                    ([lambda m=m, x=x: m(x) for m in f16], 2),
                    ([lambda m=m, x=x: loop16(x, m.weight) for m in f16], 2),
                    ([lambda m=m, x=x: m(x) for m in int8], 1),
                    ([lambda m=m, x=x: loop8(x, m) for m in int8], 1)]
            cells = []
            for calls, nbytes in runs:
                ms = best_ms(calls, passes)
                cells.append(f"{ms * 1e3:.0f} ({N * K * nbytes / ms / 1e6:.0f})")
            print(f"| {name} {N}x{K} | " + " | ".join(cells) + " |", flush=True)


def int8_prompt(rows: list[int]) -> None:
    """The --int8-prompt table: ms per product of int8 weights at each row count."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmforge.quant import Int8Linear

    cols = ["fbgemm dynamic int8", "weight-only _weight_int8pack_mm", "weight-only converted to bf16"]
    print("ms per product, int8 weights (30 distinct matrices of a shape, one head)")
    print("| shape (out x in) | rows | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    with torch.no_grad():
        for name, (N, K) in SHAPES.items():
            if N > 10_000:
                continue  # a prompt's logits: one row per prompt (`serve`), or a plain forward's every position
            layers = [Int8Linear.from_float(torch.randn(N, K) * 0.05) for _ in range(LAYERS)]
            for M in rows:
                x = torch.randn(M, K)
                xb = x.bfloat16()
                ms = [best_ms([lambda m=m, x=x: m.packed(x) for m in layers], 5),
                      best_ms([lambda m=m, xb=xb: torch.ops.aten._weight_int8pack_mm(xb, m.q, m.scale[:, 0].bfloat16())
                               for m in layers], 5),
                      best_ms([lambda m=m, xb=xb: F.linear(xb, m.q.bfloat16()) * m.scale[:, 0].bfloat16()
                               for m in layers], 5)]
                print(f"| {name} {N}x{K} | {M} | " + " | ".join(f"{v:.3f}" for v in ms) + " |", flush=True)


def int8_kernel(rows: list[int]) -> None:
    """The --int8-kernel tables: ms per product, and per forward's products in turn."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lmforge import kernels
    from lmforge.quant import _fbgemm_int8, _weight_only, quantize_int8

    if not kernels.int8_ready():
        raise SystemExit("lmforge's int8 kernel does not run here (it needs AVX-512 VNNI and a C++ compiler)")

    def forms(N: int, K: int) -> tuple:
        """(fbgemm's form, the kernel's arguments, the weight-only ones, K) of one random matrix."""
        q, scale = quantize_int8(torch.randn(N, K) * 0.05)
        return _fbgemm_int8(q, scale), (*kernels.int8_pack(q), scale), (q, scale), K

    cols = ["fbgemm dynamic int8", "lmforge VNNI kernel", "weight-only bf16"]
    print("ms per product, int8 weights (30 distinct matrices of a shape, one head)")
    print("| shape (out x in) | rows | " + " | ".join(cols) + " | kernel speed-up over fbgemm |")
    print("|---" * (len(cols) + 3) + "|")
    with torch.no_grad():
        for name, (N, K) in SHAPES.items():
            layers = [forms(N, K) for _ in range(1 if N > 10_000 else LAYERS)]
            for M in rows:
                x = torch.randn(M, K)
                ms = [best_ms([lambda f=f, x=x: f[0](x) for f in layers], 5),
                      best_ms([lambda f=f, x=x: kernels.int8_linear(x, *f[1]) for f in layers], 5),
                      best_ms([lambda f=f, x=x: _weight_only(x, *f[2]) for f in layers], 2)]
                print(f"| {name} {N}x{K} | {M} | " + " | ".join(f"{v:.3f}" for v in ms) + f" | {ms[0] / ms[1]:.2f}x |",
                      flush=True)
        block = ("q, o", "k, v", "k, v", "q, o", "gate, up", "gate, up", "down")  # a block's seven products
        step = [forms(*SHAPES[name]) for _ in range(LAYERS) for name in block] + [forms(*SHAPES["head"])]
        print()
        print("ms for every product of one forward in turn (30 layers + the head, 135 MB of int8 weights)")
        print("| rows | fbgemm dynamic int8 | lmforge VNNI kernel | speed-up |")
        print("|---|---|---|---|")
        for M in rows:
            xs = {K: torch.randn(M, K) for K in (576, 1536)}
            fb = best_ms([lambda xs=xs: [f[0](xs[f[3]]) for f in step]], 3)
            kn = best_ms([lambda xs=xs: [kernels.int8_linear(xs[f[3]], *f[1]) for f in step]], 3)
            print(f"| {M} | {fb:.2f} | {kn:.2f} | {fb / kn:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16", help="row counts, comma-separated")
    ap.add_argument("--mkl", action="store_true", help="also MKL's packed sgemm")
    ap.add_argument("--one-row", action="store_true", help="one row against every weight form a compiled decode step uses")
    ap.add_argument("--int8-prompt", action="store_true", help="int8 weights at several rows: fbgemm and both weight-only products")
    ap.add_argument("--int8-kernel", action="store_true", help="int8 weights: lmforge's VNNI kernel against fbgemm and weight-only")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), capability {torch.backends.cpu.get_cpu_capability()}")
    if args.one_row:
        one_row()
        return
    if args.int8_prompt:
        int8_prompt(rows)
        return
    if args.int8_kernel:
        int8_kernel(rows)
        return
    cols = ["row-major", "column-major", "decoding layout", "oneDNN prepacked"] + (["MKL packed"] if args.mkl else [])
    print("| shape (out x in) | rows | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for name, (N, K) in SHAPES.items():
        copies = 1 if N > 10_000 else LAYERS
        ws = [torch.randn(N, K) * 0.05 for _ in range(copies)]
        col = [w.t().contiguous().t() for w in ws]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
        passes = 10 if copies == 1 else 20
        for M in rows:
            x = torch.randn(M, K)
            ms = [best_ms([lambda x=x, w=w: F.linear(x, w) for w in ws], passes),
                  best_ms([lambda x=x, w=w: F.linear(x, w) for w in col], passes)]
            ms.append(ms[1] if N >= K else ms[0])
            ms.append(best_ms([lambda x=x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                               for p in packed], passes))
            if args.mkl:
                mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, M) for w in ws]
                ms.append(best_ms([lambda x=x, p=p, w=w, M=M: torch.ops.mkl._mkl_linear(x, p, w, None, M)
                                   for p, w in zip(mkl, ws)], passes))
            print(f"| {name} {N}x{K} | {M} | " + " | ".join(f"{v:.3f}" for v in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
