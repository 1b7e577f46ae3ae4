"""Per-step cost of recording a run in the experiment store, relative to a tiny model's step.

The trainer calls `store.log_metrics(...)` and `store.heartbeat(...)` once per logged step. Both
only enqueue; a background thread writes batches to SQLite. This script measures:

1. the caller's cost: mean time of one log_metrics + heartbeat pair over many calls, and the
   total CPU those calls and their background writes take (process CPU time until flushed);
2. end to end: N training steps of a tiny lmforge Transformer (forward + backward + AdamW) with
   and without logging EVERY step (the worst case; the trainer logs every `log_every` steps), so
   the writer thread's competition for the GIL and the CPU is included. Best of several repeats,
   alternating the two variants. On a shared CPU both the wall and the CPU figures move by
   several percent from repeat to repeat, so they show only that logging is lost in the noise;
   measurement 1 is the one that resolves the overhead.

The goal is an overhead below 1 % of the step time. Example:

    python benchmarks/store_overhead.py
    python benchmarks/store_overhead.py --steps 400 --repeats 5 --d-model 128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lmforge.track.store import Store

METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens")


def build_step(d_model: int, n_layer: int, seq_len: int, batch: int):
    """A closure doing one training step of a tiny Transformer (or a matmul workload if the model
    module is unavailable), returning the loss as a float like the trainer's log line would."""
    torch.manual_seed(0)
    try:
        from lmforge.config import ModelConfig
        from lmforge.model import Transformer

        cfg = ModelConfig(vocab_size=256, n_layer=n_layer, n_head=4, d_model=d_model, max_seq_len=seq_len)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 256, (batch, seq_len))  # (B, T)
        y = torch.randint(0, 256, (batch, seq_len))

        def step() -> float:
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return step, f"Transformer(n_layer={n_layer}, d_model={d_model}) B={batch} T={seq_len}"
    except ImportError:
        a = torch.randn(256, 256)

        def step() -> float:
            return float((a @ a @ a).sum())

        return step, "256x256 matmul chain (lmforge.model not found)"


def timed_steps(step, n: int, store: Store | None, run_id: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, writer thread included) for n steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        loss = step()
        if store is not None:
            store.log_metrics(run_id, i, {"loss": loss, "lr": 1e-3, "grad_norm": 0.9,
                                          "tokens_per_s": 1.2e4, "tokens": i * 4096})
            store.heartbeat(run_id, i)
    if store is not None:
        store.flush(timeout=120)  # charge the background writes to the logged variant
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20000, help="calls for the caller-side timing")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    step, what = build_step(args.d_model, args.n_layer, args.seq_len, args.batch)
    print(f"model: {what}; torch threads {args.threads}; load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        run_id = store.start_run("bench", str(Path(tmp) / "run"), {"bench": True})

        # 1. Caller side: what the training thread pays per step (wall), and the total CPU of
        #    logging a step: the call plus the writer thread's share of the batched writes.
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.calls):
            store.log_metrics(run_id, i, {k: 1.0 for k in METRICS})
            store.heartbeat(run_id, i)
        call_s = (time.perf_counter() - t0) / args.calls
        t1 = time.perf_counter()
        store.flush(timeout=120)
        flush_s = time.perf_counter() - t1
        total_cpu_s = (time.process_time() - c0) / args.calls

        # 2. End to end, alternating variants; warm up the model first.
        for _ in range(5):
            step()
        plain, logged = [], []
        for _r in range(args.repeats):
            plain.append(timed_steps(step, args.steps, None, run_id))
            logged.append(timed_steps(step, args.steps, store, run_id))
        store.flush(timeout=120)
        written = len(store.metrics(run_id, ["loss"])["loss"]["step"])
        store.close()

    step_s, logged_s = min(w for w, _ in plain) / args.steps, min(w for w, _ in logged) / args.steps
    cpu_s, logged_cpu_s = min(c for _, c in plain) / args.steps, min(c for _, c in logged) / args.steps
    spread = 100 * (max(w for w, _ in plain) - min(w for w, _ in plain)) / min(w for w, _ in plain)
    print(f"step wall time  no logging / logging every step: {step_s * 1e3:8.3f} / {logged_s * 1e3:8.3f} ms"
          f"  -> {100 * (logged_s - step_s) / step_s:+.2f} %  (repeat-to-repeat spread {spread:.1f} %)")
    print(f"step CPU time   no logging / logging every step: {cpu_s * 1e3:8.3f} / {logged_cpu_s * 1e3:8.3f} ms"
          f"  -> {100 * (logged_cpu_s - cpu_s) / cpu_s:+.2f} %  (all threads, writer included)")
    print(f"log_metrics + heartbeat call (training thread): {call_s * 1e6:7.2f} us "
          f"= {100 * call_s / step_s:.3f} % of a step")
    print(f"CPU per logged step, call + background write:   {total_cpu_s * 1e6:7.2f} us "
          f"= {100 * total_cpu_s / cpu_s:.3f} % of a step's CPU time   (goal < 1 %)")
    print("(the end-to-end lines above are within their own noise on a shared CPU; the two lines "
          "here are the direct measurement)")
    print(f"background write of {args.calls} steps x {len(METRICS)} metrics: flushed in {flush_s:.2f} s "
          f"({args.calls * len(METRICS) / max(flush_s, 1e-9):,.0f} rows/s); {written} loss rows stored")


if __name__ == "__main__":
    main()
