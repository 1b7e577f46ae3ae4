"""Search speed, approximate-index recall, index build time and retrieval quality by mode
(docs/search.md has the figures and the commands).

Sections (all by default, or name some):

- vectors   synthetic unit vectors (dim 256, the small-cpu model's width) at each --sizes: exact
            search (search.exact_search over the float16 memmap) p50/p99; FAISS IVF as lmforge
            builds it (search.Ann) and usearch HNSW (f16): build time, p50/p99 and recall@10 against
            exact search, both proposing 100 candidates that are rescored exactly, which is what
            `lmforge search` does. The vectors have cluster structure in a 64-d latent space
            (--noise 1.0: a query's 10th neighbour at cosine ~0.6, a random pair at ~0.0, like
            sentence embeddings); --noise 1.5 makes neighbours barely closer than strangers.
- build     `index build` of 100,000 short texts (stdlib source lines, 40-120 characters, JSONL)
            with a small-cpu-shaped model (configs/small-cpu.yaml: 4 layers, d_model 256, an 8k BPE
            trained here; random weights unless --build-model names a trained one: speed does not
            depend on the weights), end to end: chunking, embedding, vectors, SQLite, BM25.
- quality   the bundled retrieval task (docstring -> function, lmforge/tasks/stdlib-doc2code.jsonl)
            indexed with each --model (one record per function, its id the doc id) and searched in
            every mode: nDCG@10, recall@10, MRR@10 of dense, bm25 and hybrid. Decides DEFAULT_MODE.
            For a contrastive run, `index tune` then chooses the index's default on the run's
            held-out val pairs, and a last row searches with it (no --mode).

    python benchmarks/search.py --threads 2
    python benchmarks/search.py vectors --sizes 100000 1000000
    python benchmarks/search.py quality --model models/smol --model runs/embed1

Run it alone: it measures the whole machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DIM = 256
SECTIONS = ("vectors", "build", "quality")
QUERIES = 200


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p))


def synthetic(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors (float16) and QUERIES unit queries (float32) from the same distribution."""
    rng = np.random.default_rng(seed)
    latent = 64
    w = (rng.standard_normal((latent, DIM)) / math.sqrt(latent)).astype(np.float32)
    centers = rng.standard_normal((1000, latent)).astype(np.float32)

    def sample(m: int) -> np.ndarray:
        out = np.empty((m, DIM), np.float32)
        for s in range(0, m, 100_000):
            k = min(100_000, m - s)
            z = centers[rng.integers(0, 1000, k)] + noise * rng.standard_normal((k, latent), dtype=np.float32)
            x = z @ w + 0.1 * rng.standard_normal((k, DIM), dtype=np.float32)
            out[s:s + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return sample(n).astype(np.float16), sample(QUERIES)


def measure(label: str, build_s: float, vecs: np.ndarray, queries: np.ndarray, exact: list[set[int]],
            propose) -> None:  # noqa: ANN001 - propose(query) -> (1, C) candidate rows
    from lmforge.understand.index import search as S

    times, recall = [], []
    for q, truth in zip(queries, exact):
        t = time.perf_counter()
        rows, _ = S.rescore(vecs, q[None], propose(q), 10)
        times.append(time.perf_counter() - t)
        recall.append(len(truth & set(rows[0].tolist())) / 10)
    print(f"| {len(vecs):,} | {label} | {build_s:.1f} | {pct(times, 50):.2f} | {pct(times, 99):.2f} | "
          f"{statistics.mean(recall):.3f} |", flush=True)


def vectors_section(sizes: list[int], noise: float, methods: list[str]) -> None:
    try:
        import usearch.index as ui  # the alternative measured against FAISS; not an lmforge dependency
    except ImportError:
        ui = None

    from lmforge.understand.index import search as S

    print(f"\n## vectors (dim {DIM}, noise {noise}, {QUERIES} queries, k = 10, {S.CANDIDATES} candidates rescored)")
    print("| rows | method | build s | p50 ms | p99 ms | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        x, queries = synthetic(n, noise)
        with tempfile.TemporaryDirectory() as tmp:  # the vectors as search reads them: a float16 memmap
            path = Path(tmp) / "vectors.f16"
            x.tofile(path)
            del x
            vecs = np.memmap(path, dtype="<f2", mode="c", shape=(n, DIM))
            exact, times = [], []
            S.exact_search(vecs, queries[:1], 10)  # warm the page cache and torch
            for q in queries:
                t = time.perf_counter()
                rows, _ = S.exact_search(vecs, q[None], 10)
                times.append(time.perf_counter() - t)
                exact.append(set(rows[0].tolist()))
            print(f"| {n:,} | exact (float16 scan + float32 rescore) | - | {pct(times, 50):.1f} | {pct(times, 99):.1f} | "
                  "1.000 |", flush=True)
            if "faiss" in methods:
                t = time.perf_counter()
                ann = S.Ann.build(vecs)
                measure(f"FAISS IVF{ann.index.nlist},SQfp16 nprobe {S.ANN_NPROBE}", time.perf_counter() - t, vecs,
                        queries, exact, lambda q, ann=ann: ann.search(q[None], S.CANDIDATES))
                del ann
            if "usearch" not in methods:
                continue
            if ui is None:
                print(f"| {n:,} | usearch: not installed (pip install usearch) | - | - | - | - |")
                continue
            t = time.perf_counter()
            u = ui.Index(ndim=DIM, metric="ip", dtype="f16", connectivity=16, expansion_add=64, expansion_search=128)
            for s in range(0, n, 262_144):
                block = np.asarray(vecs[s:s + 262_144], dtype=np.float32)
                u.add(np.arange(s, s + len(block)), block, threads=torch.get_num_threads())
            measure("usearch HNSW M16 ef_add 64 ef 128 (f16)", time.perf_counter() - t, vecs, queries, exact,
                    lambda q, u=u: u.search(q, S.CANDIDATES).keys.astype(np.int64)[None])
            del u, vecs


def short_texts(n: int) -> list[str]:
    """n distinct stdlib source lines of 40-120 characters (deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    for path in sorted(root.glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if 40 <= len(line) <= 120:
                seen.setdefault(line, None)
                if len(seen) == n:
                    return list(seen)
    texts = list(seen)
    return [texts[i % len(texts)] + f" #{i // len(texts)}" for i in range(n)]  # more than the stdlib has


def small_cpu_model(work: Path) -> Path:
    """A random-initialised small-cpu-shaped model directory with an 8k BPE trained on the stdlib."""
    from lmforge import artifacts, convert
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    out = work / "small-cpu"
    if out.exists():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))]
    tok = Tokenizer.train(texts, vocab_size=8192)
    cfg = load_config("small-cpu").model
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    return artifacts.write_model_dir(convert.bundle_from_model(Transformer(cfg), tok), out)


def build_section(work: Path, model: str | None, n: int, batch_size: int, compile: bool = False) -> None:
    from lmforge.understand.index.build import build_index

    path = Path(model) if model else small_cpu_model(work)
    corpus = work / "short.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(short_texts(n))))
    t, cpu = time.perf_counter(), time.process_time()
    m = build_index(path, [corpus], work / "idx-build", overwrite=True, batch_size=batch_size, compile=compile)
    s, cpu = time.perf_counter() - t, time.process_time() - cpu
    c = m["counts"]
    print(f"\n## build: {c['chunks']:,} chunks ({c['tokens']:,} tokens) from {n:,} short texts with "
          f"{'--model ' + model if model else 'a random-initialised small-cpu-shaped model'}, batch {batch_size}"
          f"{', --compile' if compile else ''}")
    print(f"{s:.1f} s wall ({c['chunks'] / s:,.0f} chunks/s, {c['tokens'] / s:,.0f} tokens/s), {cpu:.1f} s of CPU over "
          f"{torch.get_num_threads()} threads (a machine shared with other jobs stretches the wall time); goal <= 300 s")


def quality_section(work: Path, models: list[str], task_path: str) -> None:
    from lmforge.evaluate.metrics import retrieval_metrics
    from lmforge.evaluate.tasks import load_task
    from lmforge.understand.index.build import build_index, tune_index
    from lmforge.errors import LmforgeError
    from lmforge.understand.index.search import Searcher, load_embedder
    from lmforge.understand.index.store import Index
    from lmforge.understand.index.tune import describe

    task = load_task(task_path)
    corpus = work / "task-docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in task.docs))
    print(f"\n## quality: {task.name}, {len(task.docs)} docs, {len(task.queries)} queries")
    print("| model | mode | nDCG@10 | recall@10 | MRR@10 |")
    print("|---|---|---:|---:|---:|")
    def measure(out: Path, model: str, name: str, mode: str | None) -> None:
        with Index.open(out) as index:
            searcher = Searcher(index, load_embedder(index))
            ranked = []
            for q in task.queries:
                ids: list[str] = []
                for h in searcher.search(q.text, k=30, mode=mode):  # chunks -> their record: its best chunk counts
                    if h.record not in ids:
                        ids.append(h.record)
                ranked.append(ids[:10])
        m = retrieval_metrics(ranked, [q.relevant for q in task.queries])
        print(f"| {model} | {name} | {m['ndcg@10']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} |", flush=True)

    for model in models:
        out = work / f"idx-{Path(model).name}"
        build_index(model, [corpus], out, overwrite=True, tune=False)  # tuned below, after the untuned rows
        for mode in ("bm25", "dense", "hybrid"):  # an untuned index: hybrid is plain RRF (k 60, equal weights)
            measure(out, model, mode, mode)
        try:  # a contrastive run: `lmforge index tune` measures on its held-out val pairs and records the default
            record = tune_index(out)
        except LmforgeError as e:
            print(f"(no tuned row for {model}: {e})")
            continue
        measure(out, model, f"tuned (no --mode): {describe(record)}", None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", help=f"some of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--ann", nargs="+", default=["faiss", "usearch"], help="vectors: the ANN libraries to measure")
    p.add_argument("--texts", type=int, default=100_000, help="short texts for the build section")
    p.add_argument("--batch-size", type=int, default=64, help="build: chunks per embedding forward")
    p.add_argument("--compile", action="store_true", help="build: embed through torch.compile (`index build --compile`)")
    p.add_argument("--model", action="append", default=[], help="quality: a model to index the task with (repeatable)")
    p.add_argument("--build-model", help="build: this model instead of a random-initialised small-cpu-shaped one")
    p.add_argument("--task", default="stdlib-doc2code", help="retrieval task file or bundled name (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: all cores)")
    p.add_argument("--work", help="working directory (default: a temporary one)")
    args = p.parse_args()
    args.sections = args.sections or list(SECTIONS)
    if set(args.sections) - set(SECTIONS):
        p.error(f"sections are {', '.join(SECTIONS)}; got {' '.join(args.sections)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"# benchmarks/search.py on {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "vectors" in args.sections:
            vectors_section(args.sizes, args.noise, args.ann)
        if "build" in args.sections:
            build_section(work, args.build_model, args.texts, args.batch_size, args.compile)
        if "quality" in args.sections:
            if not args.model:
                print("\n## quality: skipped (give --model, a trained model: a random one ranks at random)")
            else:
                quality_section(work, args.model, args.task)
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
