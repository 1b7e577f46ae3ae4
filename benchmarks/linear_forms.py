"""ms per matrix product on one thread, per SmolLM2-135M weight shape and row count, for each form
an fp32 weight can take (docs/inference.md, "serve's several-row products", has the figures).

Forms: row-major (`F.linear` on the (out, in) weight as trained), column-major (its transpose
contiguous), the decoding layout `quant.prepare(model, "fp32")` picks (column-major when out >= in),
and oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise` on a weight from
`torch.ops.mkldnn._reorder_linear_weight`). Each block shape is 30 distinct matrices used in turn,
as a forward uses the 30 layers', so none is read from cache; the head is one 113 MB matrix. Each
figure is the best of 3 passes. --mkl adds MKL's packed sgemm (`torch.ops.mkl._mkl_linear`), packed
for the row count it is called with (a call with another count runs the plain product).

    OMP_NUM_THREADS=1 python benchmarks/linear_forms.py --rows 1,4,8,16
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16", help="row counts, comma-separated")
    ap.add_argument("--mkl", action="store_true", help="also MKL's packed sgemm")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), capability {torch.backends.cpu.get_cpu_capability()}")
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
