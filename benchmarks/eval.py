"""Multiple-choice scoring speed: the packed scorer against the naive one-forward-per-choice one.

Both scorers run in the same process on the same requests; the script asserts they agree (same
accuracy, log-probs allclose) and prints items/s and the speed-up. Two 4-choice tasks:

- `python-mc`: the shipped tasks/python-mc.jsonl (short contexts, 32 items);
- `stdlib-lines`: built here from this Python's standard library: the context is up to
  `--context` tokens of a module, the choices are the true next line and three other lines of the
  same module (longer contexts, the common shape of code and document tasks).

The model is the quickstart shape (configs/small-cpu.yaml: 4 layers, d_model 256, max_seq_len
256) with random weights, or a real checkpoint with --checkpoint (speed does not depend on the
weights). The tokenizer is a 4k BPE trained here on a few standard-library files (or the
checkpoint's). fp32, `--threads` torch threads. Example:

    python benchmarks/eval.py                       # both tasks, 1 thread
    python benchmarks/eval.py --threads 2 --items 200 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import random
import sysconfig
import time
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.evaluate.score import make_request, score_naive, score_packed
from lmforge.evaluate.tasks import encode_request, load_task
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def stdlib_files(n: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 5_000 < p.stat().st_size < 200_000)
    return files[:n]


def stdlib_lines_task(tok: Tokenizer, items: int, context_tokens: int, rng: random.Random) -> list[tuple[str, list[str], int]]:
    """(context, 4 choices, gold) items from standard-library modules."""
    out = []
    files = stdlib_files(40)
    while len(out) < items:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        candidates = [i for i in range(20, len(lines)) if 8 < len(lines[i].strip()) < 60]
        if len(candidates) < 4:
            continue
        i = rng.choice(candidates)
        context = "".join(lines[max(0, i - 60) : i])
        ids = tok.encode(context)[-context_tokens:]
        context = tok.decode(ids)
        others = rng.sample([j for j in candidates if lines[j] != lines[i]], 3)
        choices = [lines[i]] + [lines[j] for j in others]
        if len(set(choices)) < 4:
            continue
        rng.shuffle(choices)
        out.append((context, choices, choices.index(lines[i])))
    return out


def requests_for(tok: Tokenizer, items, max_len: int):
    return [make_request(*encode_request(tok, c, ch), max_len) for c, ch, _ in items]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a run or checkpoint directory (default: random weights)")
    ap.add_argument("--items", type=int, default=128, help="stdlib-lines items")
    ap.add_argument("--context", type=int, default=160, help="stdlib-lines context tokens")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timings per scorer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{args.threads} thread(s), torch {torch.__version__}")

    if args.checkpoint:
        from lmforge.artifacts import load_model

        loaded = load_model(args.checkpoint)
        model, tok = loaded.model, loaded.tokenizer
        print(f"model: {args.checkpoint} ({loaded.origin.describe()})")
    else:
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(30)]
        tok = Tokenizer.train(texts, vocab_size=4096)
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=256, max_seq_len=256))
        print("model: quickstart shape (4 layers, d_model 256, max_seq_len 256), random weights, 4k BPE")
    model.eval()
    max_len = model.cfg.max_seq_len

    task = load_task(REPO / "tasks" / "python-mc.jsonl")
    tasks = {
        "python-mc": [(i.context, list(i.choices), i.gold) for i in task.items],
        "stdlib-lines": stdlib_lines_task(tok, args.items, min(args.context, max_len - 40), random.Random(0)),
    }
    print(f"{'task':<14}{'items':>6}{'ctx tok':>9}{'naive it/s':>12}{'packed it/s':>13}{'speed-up':>10}  agree")
    for name, items in tasks.items():
        reqs = requests_for(tok, items, max_len)
        mean_ctx = sum(len(r.context) for r in reqs) / len(reqs)
        t_naive, naive = min((timed(lambda: score_naive(model, reqs)) for _ in range(args.repeats)), key=lambda t: t[0])  # noqa: B023 (run in this pass)
        t_fast, fast = min((timed(lambda: score_packed(model, reqs, batch_size=args.batch_size)) for _ in range(args.repeats)),  # noqa: B023
                           key=lambda t: t[0])
        a = torch.tensor([[s.logprob for s in row] for row in naive], dtype=torch.float64)
        b = torch.tensor([[s.logprob for s in row] for row in fast], dtype=torch.float64)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        acc_naive = (a.argmax(1) == torch.tensor([g for *_, g in items])).float().mean().item()
        acc_fast = (b.argmax(1) == torch.tensor([g for *_, g in items])).float().mean().item()
        assert acc_naive == acc_fast, (acc_naive, acc_fast)
        print(f"{name:<14}{len(items):>6}{mean_ctx:>9.0f}{len(items) / t_naive:>12.1f}{len(items) / t_fast:>13.1f}"
              f"{t_naive / t_fast:>9.1f}x  acc {acc_fast:.3f} both, max |dlogprob| {float((a - b).abs().max()):.1e}")


if __name__ == "__main__":
    main()
