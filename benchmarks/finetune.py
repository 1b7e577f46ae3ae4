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

LoRA against a full fine-tune (`--lora-vs-full`): the same model shape (SmolLM2-135M's,
random weights), the same packed SFT rows, `--steps` timed optimizer steps each, every variant in
its own fresh process so that each one's peak memory is its own: on CUDA the peak of allocated
memory, on a CPU the peak resident set size above what the process held before the model was
built (the interpreter, torch and the data). Also reported: the weights that train, the optimizer
state, and the bytes a checkpoint needs for the weights (model.safetensors, or the adapter's
adapter_model.safetensors) and for the training state (DCP: the trained weights and their AdamW
moments). LoRA is rank `--rank` (alpha 2 x rank) on every linear layer of every block.

    python benchmarks/finetune.py --lora-vs-full --seq-len 128 --global-batch 2 --steps 3        # CPU
    python benchmarks/finetune.py --lora-vs-full --device cuda --seq-len 2048 --global-batch 16 --dtype bf16

`--dpo` measures a DPO step (train.objective: dpo) against an SFT step on the same prompts: N
synthetic preference pairs (prompt and completion lengths log-normal, medians `--median` / 2
each, random ids), written as a real preference dataset (`prepare --dpo`'s layout: each pair two
documents with the loss mask on the completion) and as an SFT dataset of the same prompts with
their chosen completions (one example per row, padded, as DPO reads its pairs). Per step of
`--global-batch` prompts: SFT trains on prompt + chosen; DPO reads prompt + chosen and prompt +
rejected, through the model (forward and backward) and through the frozen reference (forward
only, no gradients), so about 2 x (3 + 1) / 3 = 2.7x the FLOPs of the SFT step. Reported: seconds
per step and prompts per second of each, the ratio, and the memory of the reference copy (its
fp32 weights: 4 bytes per parameter, a quarter of the 16 that weights, gradients and AdamW's two
moments take); on a GPU also each step's peak memory above what the models hold.

    python benchmarks/finetune.py --dpo                             # CPU: small model
    python benchmarks/finetune.py --dpo --device cuda --smollm2 --seq-len 1024 --global-batch 16 --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.loader import Loader
from lmforge.data.manifest import DPO_FORMAT_VERSION, SFT_FORMAT_VERSION
from lmforge.data.prepare import Source, token_dtype, write_dataset
from lmforge.model import Transformer, num_params
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import split_micro, train_step
from lmforge.train.objectives import DPO, FrozenCopy, NextToken
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


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, args) -> dict:
    """One variant ("full" or "lora") in this process: its step time, peak memory and sizes."""
    from lmforge.artifacts import ADAPTER_FILE, MODEL_FILE
    from lmforge.config import LORA_TARGETS, Config, LoraConfig
    from lmforge.lora import attach
    from lmforge.train.checkpoint import save_checkpoint

    dev = torch.device(args.device)
    cfg = SMOLLM2 if args.smollm2 else SMALL
    sizes = lengths(args.conversations, args.median, args.sigma, args.seq_len + 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), sizes, cfg.vocab_size)
        loader = Loader(data, seq_len=args.seq_len, global_batch=args.global_batch, seed=0, packing=True, document_mask="true")
        batches = [loader.next() for _ in range(args.steps + 2)]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else rss_bytes()
        torch.manual_seed(0)
        model = Transformer(cfg).to(dev)
        lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, target_modules=list(LORA_TARGETS))
        if variant == "lora":
            attach(model, lora)
        opt = build_optimizer(model, TrainConfig(lr=1e-4))
        times = []
        for i, batch in enumerate(batches):
            micro = split_micro(batch, args.micro_batch, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(model, opt, micro, lr=1e-4, grad_clip=1.0, dtype=args.dtype, objective=NextToken())
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        moments = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
        run = Path(tmp) / "run"
        save_checkpoint(run, 1, model=model, optimizer=opt, config=Config(lora=lora if variant == "lora" else LoraConfig()),
                        trainer_state={}, tokenizer_path=data / "tokenizer.json",
                        base={"sha256": "0" * 64, "path": "base"} if variant == "lora" else None)
        ckpt = run / "checkpoints" / "step-000001"
        weights = (ckpt / (ADAPTER_FILE if variant == "lora" else MODEL_FILE)).stat().st_size
        state = sum(f.stat().st_size for f in (ckpt / "train_state").rglob("*") if f.is_file())
    return {"variant": variant, "s_per_step": statistics.median(times), "peak_bytes": peak, "trained": trained,
            "params": sum(p.numel() for p in model.parameters()), "optimizer_bytes": moments, "weights_file_bytes": weights,
            "train_state_bytes": state}


def lora_vs_full(args) -> None:
    """Each variant in a fresh process (its peak memory is its own), then the comparison."""
    rows = []
    for variant in ("full", "lora"):
        argv = [a for a in sys.argv[1:] if a != "--lora-vs-full"]
        out = subprocess.run([sys.executable, __file__, *argv, "--measure", variant], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dev = torch.device(args.device)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{args.threads or os.cpu_count()} threads'}), "
          f"load average {os.getloadavg()[0]:.2f}; model {'SmolLM2-135M shape' if args.smollm2 else 'small'} "
          f"({rows[0]['params'] / 1e6:.1f}M), dtype {args.dtype}; packed rows of seq_len {args.seq_len}, {args.global_batch} "
          f"rows/step (micro {args.micro_batch}), {args.steps} timed steps; LoRA rank {args.rank} on every block linear layer")
    mib = 1 << 20
    print(f"{'':6s} {'trained':>12s} {'s/step':>8s} {'peak memory':>12s} {'optimizer':>10s} {'weights file':>13s} {'train_state':>12s}")
    for r in rows:
        print(f"{r['variant']:6s} {r['trained']:12,d} {r['s_per_step']:8.3f} {r['peak_bytes'] / mib:10.0f} MiB "
              f"{r['optimizer_bytes'] / mib:6.1f} MiB {r['weights_file_bytes'] / mib:9.1f} MiB {r['train_state_bytes'] / mib:8.1f} MiB")
    full, lora = rows
    print(f"lora / full: step time {lora['s_per_step'] / full['s_per_step']:.2f}x, peak memory "
          f"{lora['peak_bytes'] / full['peak_bytes']:.2f}x, weights on disk {lora['weights_file_bytes'] / full['weights_file_bytes']:.3f}x, "
          f"training state {lora['train_state_bytes'] / full['train_state_bytes']:.3f}x")


def write_pairs(root: Path, n: int, median: float, sigma: float, longest: int, vocab: int) -> tuple[Path, Path]:
    """(a preference dataset of n random pairs, an SFT dataset of their prompts with the chosen
    completions): each sequence of at most `longest` tokens, the mask on the completions."""
    tok = Tokenizer.train(["benchmark"] * 4, vocab_size=300)
    dtype = token_dtype(tok) if vocab <= 2**16 else np.dtype("<u4")
    rng = np.random.default_rng(2)
    prompts = lengths(n, median / 2, sigma, longest // 2, seed=3)
    completions = np.minimum(lengths(2 * n, median / 2, sigma, longest // 2, seed=4).reshape(n, 2), longest - prompts[:, None])
    src = root / "synthetic.jsonl"
    src.write_text("")
    seqs = []
    for p, (c, r) in zip(prompts.tolist(), completions.tolist()):
        prompt = rng.integers(10, vocab, p)
        seqs.append([np.concatenate([prompt, rng.integers(10, vocab, k)]).astype(dtype) for k in (c, r)])
    masks = [[(np.arange(len(s)) >= p).astype(np.uint8) for s in pair] for p, pair in zip(prompts.tolist(), seqs)]

    def fill(both: bool):
        def go(writers) -> None:
            for pair, mask in zip(seqs, masks):
                for ids, m in list(zip(pair, mask))[: 2 if both else 1]:
                    writers["train"].add(ids, 0, 0, 0, mask=m)
        return go

    out = []
    for name, both, kind, version in (("dpo", True, "dpo", DPO_FORMAT_VERSION), ("sft", False, "sft", SFT_FORMAT_VERSION)):
        write_dataset(root / name, overwrite=True, tok=tok, dtype=dtype, sources=[Source(src, "jsonl")], skipped=[],
                      val_fraction=0.0, shard_tokens=50_000_000, fill=fill(both), masks=True, extra={"kind": kind},
                      format_version=version)
        out.append(root / name)
    return out[0], out[1]


def dpo_main(args, cfg: ModelConfig, dev: torch.device) -> None:
    sizes_note = f"prompt and completion lengths log-normal, medians {args.median / 2:.0f} tokens each"
    with tempfile.TemporaryDirectory() as tmp:
        dpo_data, sft_data = write_pairs(Path(tmp), args.conversations, args.median, args.sigma, args.seq_len + 1, cfg.vocab_size)
        torch.manual_seed(0)
        start = Transformer(cfg).to(dev)
        variants = []
        for name, data in (("sft", sft_data), ("dpo", dpo_data)):
            loader = Loader(data, seq_len=args.seq_len, global_batch=args.global_batch, seed=0, packing=False,
                            document_mask="false")
            model = copy.deepcopy(start)
            reference = copy.deepcopy(start) if name == "dpo" else None  # the frozen starting weights
            objective = DPO(0.1, FrozenCopy(reference)) if reference is not None else NextToken()
            variants.append({"name": name, "loader": loader, "model": model, "objective": objective, "reference": reference,
                             "opt": build_optimizer(model, TrainConfig(lr=1e-6)), "times": [], "peak": 0})
        print(f"{args.conversations} pairs, {sizes_note}; each sequence at most {args.seq_len + 1} tokens; "
              f"{args.global_batch} prompts/step (micro {args.micro_batch})")
        for step in range(args.steps + 2):  # taking turns: drifting load hits both alike; 2 warm-up steps
            for v in variants:
                micro = split_micro(v["loader"].next(), args.micro_batch, dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    held = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                train_step(v["model"], v["opt"], micro, lr=1e-6, grad_clip=1.0, dtype=args.dtype, objective=v["objective"])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    v["peak"] = max(v["peak"], torch.cuda.max_memory_allocated() - held)
                if step >= 2:
                    v["times"].append(time.perf_counter() - t0)
    sft, dpo = variants
    n = num_params(cfg)
    ref_bytes = sum(p.numel() * p.element_size() for p in dpo["reference"].parameters())
    for v in variants:
        s_step = statistics.median(v["times"])
        peak = f"  step peak {v['peak'] / 2**20:8.1f} MiB above the models" if dev.type == "cuda" else ""
        print(f"{v['name']:4s} {s_step:8.3f} s/step  {args.global_batch / s_step:8.2f} prompts/s{peak}")
    ratio = statistics.median(dpo["times"]) / statistics.median(sft["times"])
    print(f"dpo / sft step time: {ratio:.2f}x (FLOPs: 2 sequences x (3 + 1) / 3 = 2.67x)")
    print(f"reference copy: {ref_bytes / 2**20:.1f} MiB ({n:,} parameters x 4 bytes), "
          f"+{ref_bytes / (16 * n):.0%} over weights + gradients + AdamW moments ({16 * n / 2**20:.1f} MiB)")


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
    ap.add_argument("--lora-vs-full", action="store_true", help="LoRA against a full fine-tune (SmolLM2-135M's shape)")
    ap.add_argument("--rank", type=int, default=16, help="--lora-vs-full: the LoRA rank")
    ap.add_argument("--measure", choices=["full", "lora"], help=argparse.SUPPRESS)  # one variant, in a child process
    ap.add_argument("--dpo", action="store_true", help="a DPO step against an SFT step on the same prompts (--conversations: pairs)")
    args = ap.parse_args()
    args.micro_batch = args.micro_batch or args.global_batch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lora_vs_full or args.measure:
        args.smollm2 = args.smollm2 or args.lora_vs_full or args.measure is not None
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    if args.lora_vs_full:
        lora_vs_full(args)
        return
    dev = torch.device(args.device)
    cfg = SMOLLM2 if args.smollm2 else SMALL
    if args.dpo:
        print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
              f"load average {os.getloadavg()[0]:.2f}; model {'SmolLM2-135M shape' if args.smollm2 else 'small'}, dtype {args.dtype}; "
              f"{args.steps} timed steps")
        return dpo_main(args, cfg, dev)
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
