"""Training and the quickstart beside one busy core: what choosing and adapting threads buys.

A "busy core" is one Python process spinning (`while True: pass`) for as long as a variant runs,
started a second before it and killed after it: another user's CPU-bound job. Each variant runs
`python -m lmforge` in a subprocess (OMP_NUM_THREADS unset, as a user's shell has it); rounds
interleave the variants and each figure is the median over rounds.

train: the small-cpu recipe (the quickstart's model) on tinyshakespeare (shared/data), --steps
  steps, logging every 2; tokens/s from the run's own metrics.jsonl (from the first logged step
  to the last: start-up excluded). Variants:
    idle, 2 threads                    no busy core (the machine's speed)
    busy, 2 threads, not adapting      LMFORGE_ADAPT_THREADS=0 --threads 2: what "all cores" did
    busy, 2 threads, adapting          --threads 2: starts at 2, the governor drops to 1
    busy, chosen                       no --threads: the start count is chosen (the default)
    busy, 1 thread                     --threads 1
  Every variant trains the same run but for its thread count; their final weights are compared
  (threads must not change the numbers: lmforge/threads.py) and the result printed.
quickstart: `lmforge quickstart --minutes M` in a fresh workdir (its data prepared once, beforehand,
  and copied in, so the figure is the plan, the training and the report), wall time against the
  M minutes it plans, with the steps it planned and its final validation loss. Variants: idle
  (chosen threads); a busy core from the start, or from 30 s in (after the quickstart timed its
  steps and planned the run: the load changes under a plan), each with the threads chosen and
  adapting, and with LMFORGE_ADAPT_THREADS=0 --threads 2 (what "all cores" did).

    python benchmarks/threads.py                                # both parts, 1 round
    python benchmarks/threads.py --part train --rounds 3 --steps 30
    python benchmarks/threads.py --part quickstart --minutes 2

Prints the load average before and after (other processes bias every row alike, not one).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPIN = "import time\ntime.sleep({delay})\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"


@contextlib.contextmanager
def busy_core(on: bool, delay: float = 0.0, seconds: float = 3600) -> Iterator[None]:
    """One spinning process while the block runs, from `delay` seconds into it (bounded by
    `seconds` even if this script dies)."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", SPIN.format(delay=delay, seconds=seconds)])
    if not delay:
        time.sleep(1.0)  # running, and visible in /proc/stat, before the variant starts
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def env(adapt: bool) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["LMFORGE_DB"] = str(WORK / "lmforge.db")
    if not adapt:
        e["LMFORGE_ADAPT_THREADS"] = "0"
    return e


def lmforge(*args: str, adapt: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], env=env(adapt), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lmforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


# ---- training ------------------------------------------------------------------------------------

TRAIN_VARIANTS = {  # name -> (busy core, --threads or None, adapting)
    "idle, 2 threads": (False, 2, True),
    "busy, 2 threads, not adapting": (True, 2, False),
    "busy, 2 threads, adapting": (True, 2, True),
    "busy, chosen (default)": (True, None, True),
    "busy, 1 thread": (True, 1, True),
}


def dataset() -> Path:
    out = WORK / "data" / "shk"
    if not (out / "manifest.json").is_file():
        corpus = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
        if not corpus.is_file():
            raise SystemExit(f"corpus not found: {corpus}")
        lmforge("prepare", str(corpus), "--out", str(out), "--vocab-size", "8192", "--overwrite")
    return out


def weights_digest(run_dir: Path) -> str:
    from safetensors.torch import load_file

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(run_dir / "checkpoints" / latest / "model.safetensors")
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].numpy().tobytes())
    return h.hexdigest()[:16]


def train_once(name: str, data: Path, steps: int, round_: int) -> dict:
    busy, threads, adapt = TRAIN_VARIANTS[name]
    run_dir = WORK / "runs" / f"{re.sub(r'[^a-z0-9]+', '-', name)}-{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["train", "small-cpu", "--run-dir", str(run_dir), "--set", f"data.path={data}", "--set", f"train.max_steps={steps}",
            "--set", "train.log_every=2", "--set", "train.eval_every=0", "--set", f"train.ckpt_every_steps={steps}",
            "--set", "train.dtype=fp32"]
    if threads is not None:
        args += ["--threads", str(threads)]
    with busy_core(busy):
        t0 = time.perf_counter()
        lmforge(*args, adapt=adapt)
        wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "tokens" in m]
    rate = (metrics[-1]["tokens"] - metrics[0]["tokens"]) / (metrics[-1]["time"] - metrics[0]["time"])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    changes = [f"{e['from']}->{e['to']} at step {e['step']}" for e in events if e.get("kind") == "threads"]
    return {"rate": rate, "wall": wall, "changes": changes, "digest": weights_digest(run_dir)}


def bench_train(rounds: int, steps: int) -> None:
    data = dataset()
    results: dict[str, list[dict]] = {name: [] for name in TRAIN_VARIANTS}
    print(f"training: small-cpu recipe, fp32, {steps} steps x 4,096 tokens; load average before: {load()}", flush=True)
    for r in range(rounds):
        for name in TRAIN_VARIANTS:
            results[name].append(train_once(name, data, steps, r))
            last = results[name][-1]
            print(f"  round {r + 1}: {name}: {last['rate']:,.0f} tokens/s, {last['wall']:.1f} s, "
                  f"threads {', '.join(last['changes']) or 'unchanged'}", flush=True)
    print(f"load average after: {load()}\n")
    base = statistics.median(x["rate"] for x in results["busy, 2 threads, not adapting"])
    print("| variant | tokens/s (median) | vs not adapting | thread changes (last round) |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        rate = statistics.median(x["rate"] for x in rows)
        print(f"| {name} | {rate:,.0f} | {rate / base:.1f}x | {', '.join(rows[-1]['changes']) or '-'} |")
    digests = {x["digest"] for rows in results.values() for x in rows}
    print(f"\nfinal weights identical across all variants and rounds: {'yes' if len(digests) == 1 else 'NO ' + str(digests)}")


# ---- quickstart ----------------------------------------------------------------------------------

QUICKSTART_VARIANTS = {  # name -> (busy core, from this many seconds in, --threads or None, adapting)
    "idle, chosen": (False, 0.0, None, True),
    "busy, chosen and adapting": (True, 0.0, None, True),
    "busy, 2 threads, not adapting": (True, 0.0, 2, False),
    # the load arrives after the quickstart has timed its steps and planned the run
    "busy from 30 s in, chosen and adapting": (True, 30.0, None, True),
    "busy from 30 s in, 2 threads, not adapting": (True, 30.0, 2, False),
}


def quickstart_once(name: str, minutes: float, round_: int) -> dict:
    busy, delay, threads, adapt = QUICKSTART_VARIANTS[name]
    work = WORK / "qs" / f"{re.sub(r'[^a-z0-9]+', '-', name)}-{round_}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    shutil.copytree(WORK / "qs-data" / "data" / "stdlib", work / "data" / "stdlib")  # prepared once (verified on use)
    args = ["quickstart", "--workdir", str(work), "--minutes", str(minutes)]
    if threads is not None:
        args += ["--threads", str(threads)]
    with busy_core(busy, delay):
        t0 = time.perf_counter()
        proc = lmforge(*args, adapt=adapt)
        wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    steps = re.search(r"-> (\d+) steps", text)
    loss = re.search(r"validation loss after \d+ steps: ([\d.]+)", text)
    events_file = work / "runs" / "stdlib" / "events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    changes = [f"{e['from']}->{e['to']}" for e in events if e.get("kind") == "threads"]
    train_times = [e["time"] for e in events if e.get("kind") in ("start", "completed")]
    return {"wall": wall, "train": train_times[-1] - train_times[0], "steps": int(steps.group(1)) if steps else 0,
            "loss": float(loss.group(1)) if loss else float("nan"), "changes": changes}


def bench_quickstart(rounds: int, minutes: float) -> None:
    if not (WORK / "qs-data" / "data" / "stdlib" / "manifest.json").is_file():
        print("preparing the quickstart's data once (not timed)...", flush=True)
        shutil.rmtree(WORK / "qs-data", ignore_errors=True)
        lmforge("quickstart", "--workdir", str(WORK / "qs-data"), "--minutes", "0.05")
    print(f"quickstart --minutes {minutes:g} (data prepared beforehand); load average before: {load()}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in QUICKSTART_VARIANTS}
    for r in range(rounds):
        for name in QUICKSTART_VARIANTS:
            results[name].append(quickstart_once(name, minutes, r))
            x = results[name][-1]
            print(f"  round {r + 1}: {name}: {x['wall']:.0f} s in all, training {x['train']:.0f} s, {x['steps']} steps, "
                  f"val loss {x['loss']:.3f}, threads {', '.join(x['changes']) or 'unchanged'}", flush=True)
    print(f"load average after: {load()}\n")
    print(f"| variant | wall s (median) | training s (planned {minutes * 60:.0f}) | steps planned | val loss after |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        med = {k: statistics.median(x[k] for x in rows) for k in ("wall", "train", "steps", "loss")}
        print(f"| {name} | {med['wall']:.0f} | {med['train']:.0f} | {med['steps']:.0f} | {med['loss']:.3f} |")


def main() -> None:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["train", "quickstart", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="training steps per variant")
    ap.add_argument("--minutes", type=float, default=2.0, help="the quickstart's --minutes")
    ap.add_argument("--work", default="/tmp/lmforge-bench-threads", help="datasets and runs (reused: the data)")
    args = ap.parse_args()
    WORK = Path(args.work)
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}", flush=True)
    if args.part in ("train", "all"):
        bench_train(args.rounds, args.steps)
    if args.part in ("quickstart", "all"):
        bench_quickstart(args.rounds, args.minutes)


WORK = Path("/tmp/lmforge-bench-threads")

if __name__ == "__main__":
    main()
