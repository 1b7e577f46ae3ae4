"""SFT throughput: packing whole conversations into rows with document masking, against padding
(one conversation per row), on a realistic mix of conversation lengths.

The data: N synthetic conversations whose lengths follow a log-normal law (default median 200
tokens, sigma 0.8: most short, a long tail, as chat logs are), clipped to [24, seq_len + 1], with
random token ids and a loss mask on the last 60 % of each (the "answer"), written as a real SFT
dataset (the shards, masks and document index `prepare --sft` writes) and read by the trainer's
own loader (data/loader.py `DocumentRows`) and `train_step` (objective next_token):

  packed+docmask  several conversations per row (greedy, in order, up to seq_len + 1 tokens),
                  attention block-diagonal per conversation, positions restarting (the default)
  packed          the same rows with plain causal attention across conversations (for reference:
                  what document masking costs; not what lmforge trains by default)
  padded          one conversation per row, each batch padded to its longest row

Each variant trains the same model from the same initial weights for `--steps` optimizer steps
of `--global-batch` rows, the variants taking turns step by step (so a machine whose load drifts
slows them alike); the first two steps are warm-up and not timed. Reported: real
(non-padding) tokens per second, trained (answer) tokens per second, and how full the rows are.
The model's shape is what decides the cost, so it is built from a config (random weights): the
default is small enough for a CPU; `--smollm2` uses SmolLM2-135M's shape (a GPU).

    python benchmarks/finetune.py                                   # CPU: small model, seq 512
    python benchmarks/finetune.py --device cuda --smollm2 --seq-len 2048 --global-batch 16 --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.loader import Loader
from lmforge.data.manifest import SFT_FORMAT_VERSION
from lmforge.data.prepare import Source, token_dtype, write_dataset
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import split_micro, train_step
from lmforge.train.objectives import NextToken
from lmforge.train.optim import build_optimizer

SMOLLM2 = ModelConfig(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536, max_seq_len=8192,
                      rope_theta=100000.0)
SMALL = ModelConfig(vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=4096)


def lengths(n: int, median: float, sigma: float, longest: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n).round(), 24, longest).astype(np.int64)


def write_data(root: Path, sizes: np.ndarray, vocab: int) -> Path:
    """A real SFT dataset of random conversations of these sizes (answer: the last 60 %)."""
    tok = Tokenizer.train(["benchmark"] * 4, vocab_size=300)  # the dataset needs one; ids are drawn up to `vocab`
    dtype = token_dtype(tok) if vocab <= 2**16 else np.dtype("<u4")
    rng = np.random.default_rng(1)
    src = root / "synthetic.jsonl"
    src.write_text("")

    def fill(writers) -> None:
        for n in sizes.tolist():
            ids = rng.integers(10, vocab, n).astype(dtype)
            mask = (np.arange(n) >= int(0.4 * n)).astype(np.uint8)
            writers["train"].add(ids, 0, 0, 0, mask=mask)

    out = root / "ds"
    write_dataset(out, overwrite=True, tok=tok, dtype=dtype, sources=[Source(src, "jsonl")], skipped=[], val_fraction=0.0,
                  shard_tokens=50_000_000, fill=fill, masks=True, extra={"kind": "sft"}, format_version=SFT_FORMAT_VERSION)
    return out


class Variant:
    """One way of reading the data, with its own copy of the model and optimizer."""

    def __init__(self, name: str, data: Path, cfg: ModelConfig, args, *, packing: bool, document_mask: str, dev: torch.device):
        self.name, self.args, self.dev = name, args, dev
        self.loader = Loader(data, seq_len=args.seq_len, global_batch=args.global_batch, seed=0, packing=packing,
                             document_mask=document_mask)
        torch.manual_seed(0)
        self.model = Transformer(cfg).to(dev)
        self.opt = build_optimizer(self.model, TrainConfig(lr=1e-4))
        self.times: list[float] = []
        self.real: list[int] = []
        self.trained: list[int] = []

    def step(self, timed: bool) -> None:
        batch = self.loader.next()
        micro = split_micro(batch, self.args.micro_batch, self.dev)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(self.model, self.opt, micro, lr=1e-4, grad_clip=1.0, dtype=self.args.dtype, objective=NextToken())
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - t0)
            self.real.append(int((batch["targets"] != -100).sum()))  # real (non-padding) tokens
            self.trained.append(int(batch["loss_mask"].sum()))

    def report(self) -> dict:
        a = self.args
        row = {"variant": self.name, "rows": self.loader.n_samples, "fill": sum(self.real) / (len(self.real) * a.global_batch * a.seq_len),
               "s_per_step": statistics.median(self.times), "tokens_per_s": sum(self.real) / sum(self.times),
               "trained_per_s": sum(self.trained) / sum(self.times)}
        print(f"{self.name:15s} {row['rows']:6d} rows  fill {row['fill']:5.1%}  {row['s_per_step']:7.3f} s/step  "
              f"{row['tokens_per_s']:10,.0f} tokens/s  {row['trained_per_s']:10,.0f} trained tokens/s")
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M's shape (default: a 6-layer, d_model 384 model)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=0, help="default: the global batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--conversations", type=int, default=4000)
    ap.add_argument("--median", type=float, default=200.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    args.micro_batch = args.micro_batch or args.global_batch
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = SMOLLM2 if args.smollm2 else SMALL
    sizes = lengths(args.conversations, args.median, args.sigma, args.seq_len + 1)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"load average {os.getloadavg()[0]:.2f}; model {'SmolLM2-135M shape' if args.smollm2 else 'small'}, dtype {args.dtype}; "
          f"seq_len {args.seq_len}, {args.global_batch} rows/step (micro {args.micro_batch}), {args.steps} timed steps")
    print(f"conversations: {len(sizes)}, tokens median {int(np.median(sizes))}, mean {sizes.mean():.0f}, "
          f"p90 {int(np.percentile(sizes, 90))}, longest {sizes.max()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), sizes, cfg.vocab_size)
        variants = [Variant("packed+docmask", data, cfg, args, packing=True, document_mask="true", dev=dev),
                    Variant("packed", data, cfg, args, packing=True, document_mask="false", dev=dev),
                    Variant("padded", data, cfg, args, packing=False, document_mask="false", dev=dev)]
        for step in range(args.steps + 2):  # the variants take turns, so drifting load hits all alike
            for v in variants:
                v.step(timed=step >= 2)
        rows = [v.report() for v in variants]
    base = rows[2]["tokens_per_s"]
    for r in rows[:2]:
        print(f"{r['variant']}: {r['tokens_per_s'] / base:.2f}x the tokens/s of padding")


if __name__ == "__main__":
    main()
