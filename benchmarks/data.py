"""Data benchmark: prepare throughput against raw `tokenizers`, and loader samples/s.

    python benchmarks/data.py [--copies 10] [--vocab-size 8192] [--seq-len 1024] [--global-batch 32]

Prints, in one run on the same text:
- raw HF `Tokenizer.encode_batch` MB/s over the documents prepare makes (and `encode_batch_fast`);
- `prepare` MB/s end to end with a given tokenizer (scan, tokenize, shards, sha256, manifest,
  atomic rename) and the ratio prepare / raw (goal >= 0.8);
- `prepare` with tokenizer training, for reference;
- loader samples/s and tokens/s at seq_len 1024, against the goal of 50x a 30k tokens/s model;
- the cost of one 1024-sample `global_batch` of order ids.
The corpus is tinyshakespeare.txt copied `--copies` times into separate files. The machine load
(uptime) is printed first: figures taken while other jobs run are lower bounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.loader import Loader
from lmforge.data.order import global_batch
from lmforge.data.prepare import Source, iter_documents, prepare

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL_TOKENS_PER_S = 30_000  # the upper end of what the next issue's default CPU model trains at


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    print("machine:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), f"| cpus {os.cpu_count()}")
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        for i in range(args.copies):
            shutil.copy(SHAKESPEARE, corpus / f"copy{i:03d}.txt")
        files = sorted(corpus.iterdir())
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"corpus: {args.copies} x tinyshakespeare = {mb:.1f} MB")

        t = time.perf_counter()
        trained = prepare([corpus], work / "trained", vocab_size=args.vocab_size)
        train_s = time.perf_counter() - t

        # the same documents prepare tokenizes, for the raw baseline
        docs = [d.text for i, f in enumerate(files) for d in iter_documents(Source(f, "text"), i, "text")]

        def raw(fast: bool) -> float:
            # a freshly loaded tokenizer each time, as prepare does: the BPE word cache starts cold
            hf = HFTokenizer.from_file(str(trained / "tokenizer.json"))
            t = time.perf_counter()
            (hf.encode_batch_fast if fast else hf.encode_batch)(docs, add_special_tokens=False)
            return time.perf_counter() - t

        def prep() -> float:
            t = time.perf_counter()
            prepare([corpus], work / "ds", tokenizer=trained, overwrite=True)
            return time.perf_counter() - t

        raw(True)  # start the thread pool
        runs = [(raw(False), raw(True), prep()) for _ in range(args.repeats)]  # interleaved: load drift hits all three
        raw_s, fast_s, prep_s = (min(r[k] for r in runs) for k in range(3))
        print(f"raw tokenizers encode_batch      {mb / raw_s:8.2f} MB/s  ({raw_s:.2f} s)")
        print(f"raw tokenizers encode_batch_fast {mb / fast_s:8.2f} MB/s  ({fast_s:.2f} s)")
        print(f"lmforge prepare (--tokenizer)    {mb / prep_s:8.2f} MB/s  ({prep_s:.2f} s)"
              f"  ratio vs encode_batch {raw_s / prep_s:.2f} (goal >= 0.8), vs encode_batch_fast {fast_s / prep_s:.2f}")
        print(f"lmforge prepare (train BPE {args.vocab_size}) {mb / train_s:6.2f} MB/s  ({train_s:.2f} s)")

        loader = Loader(work / "ds", seq_len=args.seq_len, global_batch=args.global_batch, seed=0)
        loader.next()  # fault the pages in once, as training would after its first epoch
        steps = max(20, 200_000 // (args.seq_len * args.global_batch) * 10)
        t = time.perf_counter()
        for _ in range(steps):
            loader.next()
        loader_s = time.perf_counter() - t
        samples_per_s = steps * args.global_batch / loader_s
        tokens_per_s = samples_per_s * args.seq_len
        goal = 50 * MODEL_TOKENS_PER_S
        print(f"loader seq_len {args.seq_len} batch {args.global_batch}: {samples_per_s:,.0f} samples/s = "
              f"{tokens_per_s / 1e6:.1f} M tokens/s  ({tokens_per_s / MODEL_TOKENS_PER_S:,.0f}x a {MODEL_TOKENS_PER_S // 1000}k tokens/s model; "
              f"goal >= 50x = {goal / 1e6:.1f} M tokens/s)")

        order_s = best_of(200, lambda: global_batch(123_456, seed=0, n_samples=10**9, global_batch=1024))
        print(f"order: global_batch of 1024 ids over 1e9 samples: {order_s * 1e6:.0f} us")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
