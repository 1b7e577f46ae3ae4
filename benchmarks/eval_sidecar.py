"""Sidecar or afterwards? Wall time of training + evaluating every checkpoint, two ways, in one run:

  beside  training with train.threads=1 and `lmforge eval RUN --watch --threads 1` running
          at the same time (the sidecar exits once training completed and all is evaluated)
  after   training with train.threads=2, then the same evaluations with 2 threads
          (`lmforge eval RUN --watch --once --threads 2`); and the same with 1 thread each
  both2   (--oversubscribed) training with 2 threads AND a 2-thread sidecar beside it: what
          happens when nobody chooses thread counts

Every configuration trains the same recipe (configs/small-cpu.yaml, the quickstart model, with
fewer steps and a checkpoint every `--ckpt-every` steps) on a dataset prepared here from this
Python's standard library, and evaluates every checkpoint on `--max-batches` validation batches
plus tasks/python-mc.jsonl. Real processes, real CLI. Prints the load average first: on a shared
machine the figures move with it. Example:

    python benchmarks/eval_sidecar.py                    # beside vs after
    python benchmarks/eval_sidecar.py --steps 80 --oversubscribed
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lmforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", *args]


def env(db: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LMFORGE_FAULTS")}
    e["LMFORGE_DB"] = str(db)
    return e


def train_cmd(data: Path, run_dir: Path, threads: int, args: argparse.Namespace) -> list[str]:
    sets = [f"data.path={data}", f"train.threads={threads}", f"train.max_steps={args.steps}",
            f"train.ckpt_every_steps={args.ckpt_every}", "train.keep_last=100", "train.eval_every=0",
            f"train.warmup_steps={min(30, args.steps // 4)}"]
    return lmforge("train", str(REPO / "configs" / "small-cpu.yaml"), "--run-dir", str(run_dir),
                   *[a for s in sets for a in ("--set", s)])


def eval_cmd(run_dir: Path, threads: int, args: argparse.Namespace, *extra: str) -> list[str]:
    return lmforge("eval", str(run_dir), "--watch", "--threads", str(threads), "--interval", "1",
                   "--max-batches", str(args.max_batches), "--tasks", str(REPO / "tasks" / "python-mc.jsonl"), *extra)


def run_pair(data: Path, root: Path, name: str, train_threads: int, eval_threads: int, args: argparse.Namespace) -> dict:
    """Training and the sidecar started together; seconds until each finished."""
    run_dir = root / name
    run_dir.mkdir()
    e = env(root / f"{name}.db")
    t0 = time.perf_counter()
    train = subprocess.Popen(train_cmd(data, run_dir, train_threads, args), env=e,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    side = subprocess.Popen(eval_cmd(run_dir, eval_threads, args), env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, terr = train.communicate()
    t_train = time.perf_counter() - t0
    _, serr = side.communicate()
    t_all = time.perf_counter() - t0
    if train.returncode or side.returncode:
        raise SystemExit(f"{name} failed:\n{terr[-2000:]}\n{serr[-2000:]}")
    return {"train": t_train, "total": t_all, "evaluated": serr.count("evaluated step-")}


def run_after(data: Path, root: Path, threads: int, args: argparse.Namespace) -> dict:
    run_dir = root / f"after{threads}"
    e = env(root / f"after{threads}.db")
    t0 = time.perf_counter()
    subprocess.run(train_cmd(data, run_dir, threads, args), env=e, check=True, capture_output=True)
    t_train = time.perf_counter() - t0
    out = subprocess.run(eval_cmd(run_dir, threads, args, "--once"), env=e, check=True, capture_output=True, text=True)
    return {"train": t_train, "total": time.perf_counter() - t0, "evaluated": out.stderr.count("evaluated step-")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--max-batches", type=int, default=8, help="validation batches per evaluation")
    ap.add_argument("--oversubscribed", action="store_true", help="also run 2-thread training + 2-thread sidecar")
    args = ap.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"small-cpu model, {args.steps} steps, a checkpoint every {args.ckpt_every}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(str(p) for p in stdlib.glob("*.py"))[:120]
        subprocess.run(lmforge("prepare", *files, "--out", str(root / "data"), "--vocab-size", "4096"),
                       check=True, capture_output=True)
        print(f"{'configuration':<30}{'training s':>12}{'all done s':>12}{'evaluated':>11}", flush=True)
        plan = [("beside (1 + 1 threads)", lambda: run_pair(root / "data", root, "beside", 1, 1, args)),
                ("after (2 threads, then eval)", lambda: run_after(root / "data", root, 2, args)),
                ("after (1 thread, then eval)", lambda: run_after(root / "data", root, 1, args))]
        if args.oversubscribed:
            plan.append(("beside (2 + 2 threads)", lambda: run_pair(root / "data", root, "both2", 2, 2, args)))
        results = {}
        for name, fn in plan:  # print each as it finishes: an oversubscribed run can take long
            r = results[name] = fn()
            print(f"{name:<30}{r['train']:>12.1f}{r['total']:>12.1f}{r['evaluated']:>11}", flush=True)
    a, b = results["beside (1 + 1 threads)"]["total"], results["after (2 threads, then eval)"]["total"]
    print(f"beside / after = {a / b:.2f} ({'beside finishes sooner' if a < b else 'after finishes sooner'})")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
