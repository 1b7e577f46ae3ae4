"""Serving throughput and latency: `lmforge serve` at 1, 4 and 16 concurrent clients.

Saves a random-initialised model of the configs/small-cpu.yaml shape (4 layers, d_model 256,
vocab 8192 from a BPE trained on this Python's standard library; random weights are fine for
speed) as a real checkpoint, starts `lmforge serve` on a free loopback port, and sends the same
requests (greedy, fixed prompt and output lengths with ignore_eos) at each concurrency level:

- concurrency 1 is sequential one-at-a-time generation through the server (the baseline);
- the same run also times `lmforge.generate.generate` in-process, one request after another
  (no HTTP, no batching);
- reported: aggregate generated tokens/s, p50/p99 request latency, speed-up over the sequential
  server run and over in-process generate(), and whether every greedy output equals the
  sequential one.

    python benchmarks/serve.py                       # 32 requests, 32-token prompts, 64 new tokens, 3 rounds
    python benchmarks/serve.py --requests 64 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.config import load_config  # noqa: E402
from lmforge.generate import generate  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.checkpoint import save_checkpoint  # noqa: E402


def stdlib_texts(limit_bytes: int = 4_000_000) -> list[str]:
    out, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(text)
        total += len(text)
        if total > limit_bytes:
            break
    return out


def make_checkpoint(root: Path) -> tuple[Path, Tokenizer, Transformer]:
    texts = stdlib_texts()
    tokenizer = Tokenizer.train(texts, vocab_size=8192)
    tok_path = tokenizer.save(root / "tokenizer.json")
    cfg = load_config(REPO / "configs" / "small-cpu.yaml", [f"model.vocab_size={tokenizer.vocab_size}", "data.path=unused"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    run = root / "small"
    save_checkpoint(run, 0, model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg,
                    trainer_state={}, tokenizer_path=tok_path)
    return run, tokenizer, model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_level(base: str, prompts: list[list[int]], max_tokens: int, clients: int,
                    models: list[str | None] | None = None) -> tuple[float, list[float], list[list[int]]]:
    """(wall seconds, per-request latencies, generated texts) with `clients` concurrent workers;
    request i asks for models[i] (an adapter's name; None or no list: the served model)."""
    latencies: list[float] = [0.0] * len(prompts)
    texts: list = [None] * len(prompts)
    next_index = iter(range(len(prompts)))

    async def worker(c: httpx.AsyncClient) -> None:
        for i in next_index:
            start = time.perf_counter()
            model = {"model": models[i]} if models is not None and models[i] is not None else {}
            r = await c.post(base + "/v1/completions", json={"prompt": prompts[i], "max_tokens": max_tokens,
                                                            "temperature": 0, "ignore_eos": True, **model})
            r.raise_for_status()
            latencies[i] = time.perf_counter() - start
            texts[i] = r.json()["choices"][0]["text"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        start = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(clients)])
        return time.perf_counter() - start, latencies, texts


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the server and the in-process baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        run, tokenizer, model = make_checkpoint(Path(tmp))
        g = torch.Generator().manual_seed(1)
        # prompts of real text tokens (ids above the 3 special tokens)
        prompts = [torch.randint(3, tokenizer.vocab_size, (args.prompt_tokens,), generator=g).tolist()
                   for _ in range(args.requests)]
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port),
                                   "--max-batch", str(max(levels)), "--max-queue", str(args.requests),
                                   "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(1200):
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            asyncio.run(run_level(base, prompts[:2], 4, 2))  # warm-up
            print(f"model: small-cpu shape, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                  f"vocab {tokenizer.vocab_size}; {args.requests} requests x {args.prompt_tokens} prompt + "
                  f"{args.max_tokens} new tokens, greedy; torch threads {args.threads}")

            # Rounds interleave every level and the in-process baseline, and each figure is the
            # median over rounds, so load from other processes on a shared machine biases no level.
            n = max(4, args.requests // 4)
            gen_runs: list[float] = []
            runs: dict[int, list[tuple[float, list[float], list]]] = {c: [] for c in levels}
            for _ in range(args.rounds):
                start = time.perf_counter()
                with torch.inference_mode():
                    for p in prompts[:n]:  # generate(), one request after another
                        generate(model, p, max_tokens=args.max_tokens)
                gen_runs.append(n * args.max_tokens / (time.perf_counter() - start))
                for clients in levels:
                    runs[clients].append(asyncio.run(run_level(base, prompts, args.max_tokens, clients)))
            gen_tps = statistics.median(gen_runs)
            print(f"{'in-process generate(), sequential':<36} {gen_tps:9.1f} tok/s   (first {n} requests; "
                  f"median of {args.rounds} rounds)")
            print(f"{'clients':<8} {'tok/s':>9} {'p50 s':>8} {'p99 s':>8} {'speed-up':>9} {'vs generate()':>14}  same greedy output")
            baseline_tps, baseline_texts = None, runs[levels[0]][0][2]
            for clients in levels:
                tps = statistics.median(args.requests * args.max_tokens / wall for wall, _l, _t in runs[clients])
                latencies = [x for _w, lat, _t in runs[clients] for x in lat]
                baseline_tps = baseline_tps or tps
                same = "yes" if all(texts == baseline_texts for _w, _l, texts in runs[clients]) else "NO"
                print(f"{clients:<8} {tps:9.1f} {percentile(latencies, 0.5):8.3f} {percentile(latencies, 0.99):8.3f} "
                      f"{tps / baseline_tps:8.2f}x {tps / gen_tps:13.2f}x  {same}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
