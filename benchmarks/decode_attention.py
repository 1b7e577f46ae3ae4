"""A batched decode step's attention: lmforge's fused kernel against the batched matrix products.

Per layer (µs, best of 3), for B rows at L attended positions (each row keeping a random prefix
of 1/3 L .. L, the first all L, as a server's rows of mixed lengths), SmolLM2-135M's heads (9
query heads on 3 K/V heads of 64) unless told otherwise; each layer reads its own cache of
--slots x S positions, 30 of them, so K/V come from memory as in a real step, not from the
cache of the CPU. Beside them: a plain read of the same slices (`torch.sum`, the bytes' floor).
With --model, also one whole decode step of 16 rows of that model, with the kernel and without.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --threads 1,2 --rows 4,16 --lengths 64,128,256,512
    python benchmarks/decode_attention.py --model /tmp/lmforge-bench-decode/smollm2-135m-q8_0 --quantize int8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge import kernels, model  # noqa: E402


def best_us(fn, repeats: int = 3, inner: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best * 1e6


def layer_table(threads: list[int], rows: list[int], lengths: list[int], H: int, KV: int, hd: int, layers: int) -> None:
    print(f"per layer, µs (H={H}, KV={KV}, head_dim={hd}; {layers} layers' caches, each read once per pass)")
    print("| threads | rows | L | K/V read MB | plain read | batched products | kernel | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for t in threads:
        torch.set_num_threads(t)
        for B in rows:
            for L in lengths:
                g = torch.Generator().manual_seed(L)
                S = L + 64
                caches = [(torch.randn(B, KV, S, hd, generator=g), torch.randn(B, KV, S, hd, generator=g))
                          for _ in range(layers)]
                q = torch.randn(B, 1, H, hd, generator=g).transpose(1, 2)
                lengths_b = torch.randint(max(1, L // 3), L + 1, (B,), generator=g)
                lengths_b[0] = L
                mask = torch.arange(L)[None, None, :] < lengths_b[:, None, None]
                kept = int(mask.sum()) * KV * hd * 4 * 2

                views = [(k[:, :, :L], v[:, :, :L]) for k, v in caches]
                plain = best_us(lambda views=views: [(k.sum(), v.sum()) for k, v in views]) / layers
                products = best_us(lambda views=views, q=q, mask=mask: [model._attention_products(q, k, v, mask)
                                                                        for k, v in views]) / layers
                fused = best_us(lambda views=views, q=q, mask=mask: [kernels.decode_attention(q, k, v, mask)
                                                                     for k, v in views]) / layers
                print(f"| {t} | {B} | {L} | {kept / 1e6:.2f} | {plain:.0f} | {products:.0f} | {fused:.0f} | "
                      f"{products / fused:.1f}x |", flush=True)


def step_table(path: str, quantize: str, threads: list[int], rows: int, positions: tuple[int, int]) -> None:
    from lmforge.generate import KVCache, load_for_decoding

    m = load_for_decoding(path, quantize).model
    print(f"\none decode step of {rows} rows at positions {positions[0]}-{positions[1]}, {path} ({quantize}), ms (median of 10)")
    print("| threads | batched products | kernel | speed-up |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cache = KVCache.for_model(m, batch_size=rows, max_len=positions[1] + 8)
    idx = torch.randint(0, m.cfg.vocab_size, (rows, 1), generator=g)
    pos = torch.randint(positions[0], positions[1], (rows, 1), generator=g)
    for t in threads:
        torch.set_num_threads(t)
        got = {}
        for name, on in (("products", False), ("kernel", True)):
            kernels._state["ready"] = on
            with torch.inference_mode():
                for _ in range(3):
                    m.decode(idx, pos, cache.k, cache.v)
                times = []
                for _ in range(10):
                    start = time.perf_counter()
                    m.decode(idx, pos, cache.k, cache.v)
                    times.append(time.perf_counter() - start)
            got[name] = statistics.median(times) * 1e3
        print(f"| {t} | {got['products']:.1f} | {got['kernel']:.1f} | {got['products'] / got['kernel']:.2f}x |", flush=True)
    kernels._state.pop("ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1", help="thread counts, comma-separated")
    ap.add_argument("--rows", default="4,16", help="rows per step (running requests), comma-separated")
    ap.add_argument("--lengths", default="64,128,256,512", help="attended positions L, comma-separated")
    ap.add_argument("--heads", default="9,3,64", help="query heads, K/V heads, head_dim")
    ap.add_argument("--layers", type=int, default=30, help="distinct caches a pass reads (a model's layers)")
    ap.add_argument("--model", help="also one whole decode step of this model, with the kernel and without")
    ap.add_argument("--quantize", default="fp32", help="--model's weights: fp32, f16 or int8")
    args = ap.parse_args()
    if not kernels.ready():
        sys.exit("lmforge's kernel is not available here (see the warning above)")
    threads = [int(t) for t in args.threads.split(",")]
    H, KV, hd = (int(x) for x in args.heads.split(","))
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    layer_table(threads, [int(b) for b in args.rows.split(",")], [int(x) for x in args.lengths.split(",")], H, KV, hd,
                args.layers)
    if args.model:
        step_table(args.model, args.quantize, threads, 16, (40, 120))


if __name__ == "__main__":
    main()
