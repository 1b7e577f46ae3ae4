"""Seconds per training step on 1 process and on N processes (DDP, DDP + deterministic_reduce,
FSDP), through the real launcher (`python -m torch.distributed.run ... -m lmforge train`), CPU/gloo.

Baseline: the 1-process run of the same config. The figure is the median gap between consecutive
`metrics.jsonl` lines (log_every=1), skipping the first steps (start-up, first checkpoint). It
prints the load average: on a shared machine the numbers are noisy; compare within one run.

    python benchmarks/distributed_reduce.py                  # tiny recipe, 2 processes
    python benchmarks/distributed_reduce.py --nproc 4 --steps 30 --set model.d_model=128
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds_per_step(run_dir: Path, skip: int) -> float:
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gaps = [b - a for a, b in zip(times, times[1:])][skip:]
    return statistics.median(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.txt"
        corpus.write_bytes(CORPUS.read_bytes()[:200_000])
        subprocess.run([sys.executable, "-m", "lmforge", "prepare", str(corpus), "--out", str(root / "data"),
                        "--vocab-size", "512", "--workers", "1"], check=True, env=env, capture_output=True)
        sets = [f"data.path={root / 'data'}", "model.vocab_size=512", "train.micro_batch=2", f"train.max_steps={args.steps}",
                "train.eval_every=0", "train.log_every=1", "train.ckpt_every_steps=100000", *args.set]
        variants = {
            "1 process (baseline)": (1, []),
            f"{args.nproc} x ddp": (args.nproc, ["train.parallel=ddp"]),
            f"{args.nproc} x ddp + deterministic_reduce": (args.nproc, ["train.parallel=ddp", "train.deterministic_reduce=true"]),
            f"{args.nproc} x fsdp": (args.nproc, ["train.parallel=fsdp"]),
        }
        print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs; overrides: {' '.join(args.set) or '-'}")
        results = {}
        for name, (n, extra) in variants.items():
            run_dir = root / name.replace(" ", "_").replace("+", "")
            train = ["train", str(CONFIG), "--run-dir", str(run_dir), *[a for kv in sets + extra for a in ("--set", kv)]]
            if n == 1:
                cmd = [sys.executable, "-m", "lmforge", *train]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
                       "127.0.0.1", "--master-port", str(free_port()), "-m", "lmforge", *train]
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            results[name] = seconds_per_step(run_dir, skip=3)
        base = results["1 process (baseline)"]
        for name, s in results.items():
            print(f"{name:<40} {1000 * s:8.1f} ms/step   {s / base:5.2f}x the 1-process time")
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
