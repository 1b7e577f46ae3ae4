"""Training throughput on this machine: tokens/s, achieved GFLOP/s and fraction of measured peak.

Times full training steps (forward + backward + gradient clipping + AdamW step) of the lmforge
Transformer, in fp32 and in bf16 autocast, through the trainer's own `train_step` and optimizer
(`lmforge.train.loop`, `lmforge.train.optim`). FLOPs come from `lmforge.model.flops_per_token`. The matmul peak is
MEASURED in the same run (a large fp32 and a large bf16 matmul), so the MFU figure is relative to
what this machine actually delivers, not a datasheet.

CPU timings are noisy when anything else runs: the script prints the load average and takes the
best of several repeats. `--baseline` also times a nanoGPT-style GPT-2 model (gpt_baseline.py) on
the same batches, eager and compiled, interleaving the repeats of every variant so that the
machine's drift hits all of them alike, and prints lmforge's speed relative to the faster
baseline. Example:

    python benchmarks/train_throughput.py                       # reference shape, fp32 + bf16
    python benchmarks/train_throughput.py --dtype bf16 --compile
    python benchmarks/train_throughput.py --compile --baseline  # the issue's comparison, same run
    python benchmarks/train_throughput.py --set n_layer=8 --set d_model=512 --micro-batch 4
    python benchmarks/train_throughput.py --dtype bf16 --compile --breakdown --matmuls

`--breakdown` splits a step into forward, backward, clipping and optimizer (best of 30 each);
`--matmuls` records every matmul of one step (shapes, strides, dtype), replays each alone and
prints the achieved GFLOP/s per shape: which matmuls run far below the peak, and whether the
model's matmuls are slower in context than alone (the sum of the replay vs the step's own).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import replace
from collections.abc import Callable

import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.hardware import matmul_rate
from lmforge.model import Transformer, autocast, flops_per_token
from lmforge.train.loop import train_step
from lmforge.train.optim import build_optimizer

# karpathy/nanoGPT's shakespeare_char-sized reference: 4 layers, 4 heads, d_model 256, seq 256,
# micro batch 8, vocab 65. nanoGPT reached ~8,600 tok/s fp32 and ~16,000 tok/s bf16 here.
CONFIGS: dict[str, tuple[ModelConfig, int, int]] = {  # name -> (model, seq_len, micro batch)
    "reference": (ModelConfig(vocab_size=65, n_layer=4, n_head=4, d_model=256, max_seq_len=256), 256, 8),
    "small": (ModelConfig(vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=512), 512, 4),
}


def interleaved_best(fns: dict[str, Callable[[], object]], *, repeats: int, number: int) -> dict[str, float]:
    """Best over `repeats` of the mean time of `number` calls, for each function, taking the
    functions in turn within every repeat (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / number)
    return best


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072), seconds: float = 0.5) -> float:
    """Best achieved FLOP/s of square matmuls in dtype: this machine's practical matmul peak.

    Several sizes, because the fastest one differs between the fp32 (MKL) and bf16 (oneDNN,
    AMX where the CPU has it) kernels. The trainer's MFU uses the same `hardware.matmul_rate`, shorter."""
    return max(matmul_rate(dtype, n, seconds) for n in sizes)


def lmforge_step(cfg: ModelConfig, batches: list, dtype: str, compile: bool) -> Callable[[], object]:
    """One full training step of lmforge's model through the trainer's own train_step."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.train()
    optimizer = build_optimizer(model, TrainConfig())  # fused AdamW, the trainer's groups
    run_model = torch.compile(model) if compile else model
    micro = [{"inputs": x, "targets": y} for x, y in batches]  # the trainer's micro batches are dicts (data/loader.py)
    return lambda: train_step(run_model, optimizer, micro, lr=3e-4, grad_clip=1.0, dtype=dtype)


def breakdown(cfg: ModelConfig, batch: tuple, dtype: str, compile: bool, n: int = 30) -> dict[str, float]:
    """Best-of-n seconds of each part of a step: zero_grad, forward, backward, clip, AdamW."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    optimizer = build_optimizer(model, TrainConfig())
    run_model = torch.compile(model) if compile else model
    x, y = batch
    best: dict[str, float] = {}
    for i in range(n + 3):  # 3 warm-up steps (compilation)
        t = [time.perf_counter()]
        optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        with autocast(dtype, "cpu"):
            _, loss = run_model(x, y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t.append(time.perf_counter())
        optimizer.step()
        t.append(time.perf_counter())
        if i >= 3:
            for name, a, b in zip(("zero_grad", "forward", "backward", "clip", "optimizer"), t, t[1:]):
                best[name] = min(best.get(name, math.inf), b - a)
    return best


MATMULS = ("mm", "addmm", "bmm", "baddbmm")


def matmul_table(cfg: ModelConfig, batch: tuple, dtype: str) -> None:
    """Every matmul of one eager step, replayed alone (best of 10 each), grouped by shape/layout."""
    from torch.profiler import profile
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = Transformer(cfg)
    x, y = batch
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in MATMULS:
                # the operands themselves (kept alive here), with their layouts; values do not matter
                calls.append((func, [a.detach() if isinstance(a, torch.Tensor) else a for a in args], kwargs or {}))
            return func(*args, **(kwargs or {}))

    def step():
        with autocast(dtype, "cpu"):
            _, loss = model(x, y)
        loss.backward()

    with Record():
        step()
    step()
    with profile() as prof:  # the same matmuls in context, for comparison with their replay
        step()
    in_step = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.removeprefix("aten::") in MATMULS) / 1e6
    rows: dict[tuple, list[float]] = {}
    for func, args, kwargs in calls:
        a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]  # (.., M, K) @ (.., K, N)
        flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        best = math.inf
        for _ in range(10):
            t = time.perf_counter()
            func(*args, **kwargs)
            best = min(best, time.perf_counter() - t)
        key = (func.overloadpacket.__name__, tuple(a.shape), a.stride(), tuple(b.shape), b.stride())
        row = rows.setdefault(key, [0, 0.0, 0.0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + best, row[2] + flops
    print(f"{dtype} matmuls of one step (forward + backward), replayed alone; A (shape, strides) @ B (shape, strides):")
    for (op, sa, ta, sb, tb), (count, sec, flops) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"  {count:3d} x {op:8s} {str(sa):>15} {str(ta):>16} @ {str(sb):>15} {str(tb):>16}: "
              f"{sec * 1e3:6.2f} ms {flops / sec / 1e9:6.0f} GFLOP/s")
    replay = sum(r[1] for r in rows.values())
    print(f"  replayed alone: {replay * 1e3:.1f} ms, {sum(r[2] for r in rows.values()) / replay / 1e9:.0f} GFLOP/s; "
          f"the same matmuls inside the step (profiler): {in_step * 1e3:.1f} ms")


def baseline_steps(cfg: ModelConfig, seq_len: int, batches: list, dtype: str, compile: bool) -> Callable[[], object]:
    """The nanoGPT-style baseline's step (gpt_baseline.py) on the same batches."""
    from gpt_baseline import GPTBaseline, baseline_optimizer, baseline_step

    torch.manual_seed(0)
    model = GPTBaseline(cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.d_model, seq_len)
    optimizer = baseline_optimizer(model)
    run_model = torch.compile(model) if compile else model

    return lambda: baseline_step(run_model, optimizer, batches, dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="reference", choices=sorted(CONFIGS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT", help="override a ModelConfig int field")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step")
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step")
    p.add_argument("--breakdown", action="store_true", help="split a step into forward/backward/clip/optimizer")
    p.add_argument("--matmuls", action="store_true", help="per-shape GFLOP/s of one step's matmuls, replayed alone")
    p.add_argument("--baseline", action="store_true",
                   help="also time the nanoGPT-style baseline (eager and compiled) in the same run")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, seq_len, micro_batch = CONFIGS[args.config]
    for item in args.set:
        k, v = item.split("=", 1)
        cfg = replace(cfg, **{k: int(v)})
    seq_len = args.seq_len or seq_len
    micro_batch = args.micro_batch or micro_batch
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))

    load1, load5, _ = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average {load1:.2f} (1 min) {load5:.2f} (5 min)")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    fpt = flops_per_token(cfg, seq_len)
    print(f"config {args.config}: {cfg}\nseq_len {seq_len}, micro batch {micro_batch} x {args.grad_accum}, "
          f"{fpt / 1e6:.1f} MFLOP/token, compile: {args.compile}")

    tokens = micro_batch * seq_len * args.grad_accum
    for dtype in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
        gen = torch.Generator().manual_seed(0)
        batches = [
            (torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), generator=gen),
             torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), generator=gen))
            for _ in range(args.grad_accum)
        ]
        steps = {"lmforge": lmforge_step(cfg, batches, dtype, args.compile)}
        if args.baseline:
            steps["baseline eager"] = baseline_steps(cfg, seq_len, batches, dtype, compile=False)
            steps["baseline compiled"] = baseline_steps(cfg, seq_len, batches, dtype, compile=True)
        for step in steps.values():
            step()  # compile / allocator warm-up beyond the timer's own warm-up call
        secs = interleaved_best(steps, repeats=args.repeats, number=args.steps)
        for name, sec in secs.items():
            tps = tokens / sec
            flops = tps * fpt
            print(f"{dtype:>5} {name:<17}: {tps:8.0f} tokens/s  {sec * 1e3:7.1f} ms/step  {flops / 1e9:6.0f} GFLOP/s  "
                  f"{100 * flops / peaks[dtype]:5.1f}% of {dtype} matmul peak")
        if args.baseline:
            base = min(secs["baseline eager"], secs["baseline compiled"])
            print(f"{dtype:>5} lmforge / faster baseline: {base / secs['lmforge']:.2f}x")
        if args.breakdown:
            parts = breakdown(cfg, batches[0], dtype, args.compile)
            print(f"{dtype:>5} one micro batch, best of 30: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items())
                  + f" (sum {sum(parts.values()) * 1e3:.1f} ms)")
        if args.matmuls:
            matmul_table(cfg, batches[0], dtype)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps["lmforge"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    load1, _, _ = os.getloadavg()
    print(f"load average after: {load1:.2f}")


if __name__ == "__main__":
    main()
