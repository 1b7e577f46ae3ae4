"""Many LoRA adapters on one base: `lmforge serve BASE --adapter DIR` with 1, 10 and 100 adapters,
16 concurrent clients spread over the adapters, against the base model served alone.

The base is benchmarks/serve.py's (a random-initialised model of the configs/small-cpu.yaml shape,
vocab 8192, saved as a real checkpoint); each adapter is a random rank-`--rank` LoRA on every
linear layer of every block, written as an adapter directory (`export --format peft`'s layout).
One `lmforge serve` process per configuration is started (all at once, each on its own loopback
port), and the same greedy requests (fixed prompt and output lengths, ignore_eos) are sent to
each in turn, round after round, so load from other processes biases none of them:

- `base alone`: a server without adapters (requests name no model);
- `N adapters`: a server with N adapters, all held in memory (--max-adapters N); request i names
  adapter i mod N, so every decode batch mixes up to 16 adapters;
- `N adapters, LRU 16` (with --lru): --max-adapters 16 below N = 100: adapters are unloaded and
  loaded again as requests come (the cost of the lazy bound).

Reported: aggregate generated tokens/s (median over rounds), p50/p99 latency, and the ratio to the
base served alone.

    python benchmarks/serve_adapters.py                      # 32 requests, 16 clients, 64 new tokens, 3 rounds
    python benchmarks/serve_adapters.py --counts 1,10,100 --lru --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve import free_port, make_checkpoint, percentile, run_level  # noqa: E402

from lmforge.artifacts import load_model, write_adapter_dir  # noqa: E402
from lmforge.config import LORA_TARGETS, LoraConfig  # noqa: E402
from lmforge.lora import adapted, adapter_tensors, attach  # noqa: E402


def make_adapters(run: Path, root: Path, count: int, rank: int) -> Path:
    """`count` random adapter directories of the base in `run`, in one folder (served as --adapter DIR)."""
    loaded = load_model(run, device="cpu")
    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=list(LORA_TARGETS))
    attach(loaded.model, cfg)
    g = torch.Generator().manual_seed(count)
    for i in range(count):
        with torch.no_grad():
            for m in adapted(loaded.model).values():
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.02)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
        write_adapter_dir(root / f"a{i:03d}", adapter_tensors(loaded.model), cfg, loaded.origin)
    return root


def start(run: Path, extra: list[str], args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port), "--max-batch",
                             str(args.clients), "--max-queue", str(args.requests), "--max-tokens", str(args.max_tokens),
                             "--threads", str(args.threads), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(base: str, proc: subprocess.Popen) -> None:
    for _ in range(3000):
        if proc.poll() is not None:
            raise SystemExit(f"a server exited with status {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("a server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,10,100", help="numbers of adapters, comma-separated")
    ap.add_argument("--lru", action="store_true", help="also serve the largest count with --max-adapters 16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = ap.parse_args()
    counts = [int(x) for x in args.counts.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run, tokenizer, model = make_checkpoint(root)
        folders = {n: make_adapters(run, root / f"adapters-{n}", n, args.rank) for n in counts}
        setups: list[tuple[str, list[str], int]] = [("base alone", [], 0)]
        setups += [(f"{n} adapter{'s' if n > 1 else ''}", ["--adapter", str(folders[n]), "--max-adapters", str(n)], n)
                   for n in counts]
        if args.lru:
            n = max(counts)
            setups.append((f"{n} adapters, LRU 16", ["--adapter", str(folders[n]), "--max-adapters", "16"], n))
        servers = [start(run, extra, args) for _name, extra, _n in setups]
        try:
            for proc, base in servers:
                wait_healthy(base, proc)
            g = torch.Generator().manual_seed(1)
            prompts = [torch.randint(3, tokenizer.vocab_size, (args.prompt_tokens,), generator=g).tolist()
                       for _ in range(args.requests)]
            names = [[None] * args.requests if n == 0 else [f"a{i % n:03d}" for i in range(args.requests)]
                     for _name, _extra, n in setups]
            for (_proc, base), models in zip(servers, names):  # warm-up: every adapter's first load
                asyncio.run(run_level(base, prompts, 2, args.clients, models))
            print(f"model: small-cpu shape, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, vocab "
                  f"{tokenizer.vocab_size}; adapters: rank {args.rank} on {', '.join(LORA_TARGETS)}; {args.requests} requests "
                  f"x {args.prompt_tokens} prompt + {args.max_tokens} new tokens, greedy, {args.clients} clients; torch "
                  f"threads {args.threads} per server; {args.rounds} interleaved rounds")
            runs: list[list[tuple[float, list[float], list]]] = [[] for _ in setups]
            for _ in range(args.rounds):
                for i, ((_proc, base), models) in enumerate(zip(servers, names)):
                    runs[i].append(asyncio.run(run_level(base, prompts, args.max_tokens, args.clients, models)))
            print(f"{'served':<22} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'vs base alone':>14}")
            base_tps = None
            for (name, _extra, _n), level in zip(setups, runs):
                tps = statistics.median(args.requests * args.max_tokens / wall for wall, _l, _t in level)
                latencies = [x for _w, lat, _t in level for x in lat]
                base_tps = base_tps or tps
                print(f"{name:<22} {tps:9.1f} {percentile(latencies, 0.5):8.3f} {percentile(latencies, 0.99):8.3f} "
                      f"{tps / base_tps:13.0%}")
        finally:
            for proc, _base in servers:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
