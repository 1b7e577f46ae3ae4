"""`lmforge classify train`: labelled examples (or label names) -> a classifier directory.

Steps, each a function a test can call:
1. read the examples (labelled.py) and the label set: the labels seen, sorted; zero-shot takes
   them from a label file (names and descriptions), and any examples given only calibrate;
2. `per_class` (optional): keep the first N examples of each label in a fixed pseudo-random order
   (a hash of the seed and the example's FILE:LINE), the "8 examples per class" setting;
3. `split`: the held-out share for calibration, stratified by each example's first label, chosen
   by the same hash: a label with n >= 2 examples puts round(n * held_out) of them, at least 1 and
   at most n - 1, aside; a label with one example keeps it for fitting;
4. fit by method (head: logistic regression on the frozen embeddings, head.py; zero-shot: label
   vectors or the LM scorer, zeroshot.py; setfit and finetune: see below);
5. calibrate on the held-out split (calibrate.py: one temperature; multi-label thresholds), and
   record accuracy, NLL and ECE there before and after;
6. write `clf/NAME/` atomically (util.atomic_dir; artifacts.write_manifest(kind="classifier")).

setfit and finetune train the embedding model itself through lmforge's training loop (deterministic
order, exact resume, guard, store) on the `contrastive` and `classification` objectives of
train/objectives.py (classify_tune.py: the bounded pair rule, the work directory, resume), on the
examples that are not held out, then write the tuned model into the classifier as `model/`: its
checksum is the one the classifier records, and the held-out split calibrates the tuned model's
head exactly as it does for `head`.

Trade-off: the head is fitted on the split that is not held out and is not refitted on all the
examples afterwards (a refit on more data changes the logit scale the temperature was fitted for).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import CLASSIFIER_HEAD, CLASSIFIER_MODEL, write_manifest
from .. import ranges as R
from ..errors import ConfigError, DataError
from ..threads import choose
from ..util import atomic_dir, console
from ..util import out as results_out
from . import calibrate
from .classify import (DEFAULT_FALLBACK, DEFAULT_TEMPLATE, DEFAULT_ZERO_SHOT_T, KIND, METHODS, SCORERS, Spec,
                       check_threshold)
from .classify_tune import Tuning, clear_work, final_loss, run_finetune, run_setfit, tuning_dir, write_tuned_model
from .head import Head, fit_head
from .labelled import Examples, Label, check_label_count, read_examples, read_label_file

DEFAULT_HELD_OUT = 0.2


def _rank(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16)


def per_class(ex: Examples, n: int, seed: int = 0) -> Examples:
    """The first n examples of each label (by its first label) in hash order (module docstring), kept in file order."""
    R.positive_int().check("--examples-per-class", n)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, labs in enumerate(ex.labels):
        groups[labs[0] if labs else ""].append(i)
    keep = sorted(i for idx in groups.values() for i in sorted(idx, key=lambda i: _rank(seed, ex.wheres[i]))[:n])
    return ex.subset(keep)


def split(ex: Examples, held_out: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit indices, held-out indices), stratified and deterministic (module docstring)."""
    R.HELD_OUT.check("--held-out", held_out)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, labs in enumerate(ex.labels):
        groups[labs[0] if labs else ""].append(i)
    hold: list[int] = []
    for idx in groups.values():
        n = len(idx)
        k = 0 if held_out == 0 or n < 2 else min(n - 1, max(1, round(n * held_out)))
        hold += sorted(idx, key=lambda i: _rank(seed, ex.wheres[i]))[:k]
    held = set(hold)
    return [i for i in range(len(ex)) if i not in held], sorted(held)


def targets(ex: Examples, labels: list[str]) -> np.ndarray:
    """Class indices (N,) or, multi-label, a 0/1 matrix (N, L)."""
    index = {lab: j for j, lab in enumerate(labels)}
    if ex.multi_label:
        y = np.zeros((len(ex), len(labels)), dtype=np.int64)
        for i, labs in enumerate(ex.labels):
            for lab in labs:
                y[i, index[lab]] = 1
        return y
    return np.array([index[labs[0]] for labs in ex.labels], dtype=np.int64)


def held_out_metrics(logits: np.ndarray, y: np.ndarray, temperature: float, multi_label: bool,
                     label_thresholds: list[float] | None) -> dict[str, Any]:
    """accuracy (subset accuracy), NLL and ECE (15 bins) before (T = 1) and after calibration."""
    from ..evaluate.classification import ece

    out: dict[str, Any] = {"items": int(len(y))}
    for name, t in (("before", 1.0), ("after", temperature)):
        p = calibrate.probabilities(logits, t, multi_label)
        if multi_label:
            thr = np.asarray(label_thresholds if name == "after" and label_thresholds else [0.5] * p.shape[1])
            out[f"accuracy_{name}"] = float(((p >= thr) == y.astype(bool)).all(axis=1).mean())
            out[f"ece_{name}"] = ece(p.reshape(-1), y.reshape(-1).astype(bool))
        else:
            out[f"accuracy_{name}"] = float((p.argmax(axis=1) == y).mean())
            out[f"ece_{name}"] = ece(p.max(axis=1), p.argmax(axis=1) == y)
        out[f"nll_{name}"] = calibrate.nll_at(logits, y, t, multi_label)
    return out


def model_head(emb: Any) -> Head:
    """A finetuned model's own classification head (model.py `score`) as a Head on its embeddings."""
    score = emb.loaded.model.score
    w = score.weight.detach().float().cpu().numpy()
    return Head(w, score.bias.detach().float().cpu().numpy(), np.zeros(w.shape[1], np.float32),
                np.ones(w.shape[1], np.float32))


def train_command(model: str, examples: str | None, out: str, *, method: str = "head", labels_file: str | None = None,
                  scorer: str = "embedding", template: str = DEFAULT_TEMPLATE, held_out: float = DEFAULT_HELD_OUT,
                  examples_per_class: int | None = None, seed: int = 0, c: float = 1.0, min_confidence: float = 0.0,
                  fallback: str = DEFAULT_FALLBACK, text_field: str = "text", label_field: str = "label",
                  batch_size: int = 32, threads: int = 0, overwrite: bool = False,
                  tuning: Tuning | None = None) -> dict[str, Any]:
    """`lmforge classify train` (module docstring); returns the spec it wrote, as a dict. `tuning`:
    the training stage's settings (setfit, finetune; classify_tune.Tuning)."""

    from .embed import Embedder

    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    tuning = tuning or Tuning()
    tuning.check()
    if scorer not in SCORERS:
        raise ConfigError(f"--zero-shot-scorer must be one of {', '.join(SCORERS)}; got {scorer!r}")
    R.positive_float().check("--c", c)
    R.HELD_OUT.check("--held-out", held_out)
    check_threshold(min_confidence)
    if not fallback.strip():
        raise ConfigError("--fallback must be a non-empty label name (where unsure items go), e.g. review")
    R.thread_count().check("--threads", threads)
    R.positive_int().check("--batch-size", batch_size)
    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; choose another --out or pass --overwrite")
    if method == "zero-shot":
        from .zeroshot import check_template

        check_template(template)
    elif labels_file is not None:
        raise ConfigError("--labels is for --method zero-shot (label names and descriptions); the other methods take "
                          "their labels from the examples")
    if examples is None and method != "zero-shot":
        raise ConfigError(f"--method {method} learns from labelled examples: give a .jsonl or .csv file of them")

    # 1-3: examples, labels, split (everything checked before a model loads)
    ex = read_examples(examples, text_field=text_field, label_field=label_field) if examples else None
    if ex is not None and examples_per_class is not None:
        ex = per_class(ex, examples_per_class, seed)
    declared: list[Label] | None = read_label_file(labels_file) if labels_file else None
    if declared is not None:
        labels = [lab.name for lab in declared]
        if ex is not None:
            unknown = sorted({lab for labs in ex.labels for lab in labs} - set(labels))
            if unknown:
                first = next(w for w, labs in zip(ex.wheres, ex.labels) if set(labs) & set(unknown))
                raise DataError(f"{first}: label {unknown[0]!r} is not in {labels_file} "
                                f"({len(unknown)} such label(s): {', '.join(unknown[:5])})")
    elif ex is not None:
        labels = ex.label_names()
        check_label_count(labels, str(examples))
        declared = [Label(lab) for lab in labels]
    else:
        raise ConfigError("--method zero-shot needs the labels: --labels FILE (names, optional descriptions) or a "
                          "labelled file whose labels it takes")
    multi = bool(ex is not None and ex.multi_label)
    if fallback in labels:
        raise ConfigError(f"--fallback {fallback!r} is also a label; name the fallback something else (e.g. review)")
    if method == "zero-shot":
        fit_idx, hold_idx = [], list(range(len(ex))) if ex is not None else []  # examples only calibrate
    else:
        fit_idx, hold_idx = split(ex, held_out, seed)  # type: ignore[arg-type]
        missing = [lab for j, lab in enumerate(labels) if not any(
            lab in ex.labels[i] for i in fit_idx)]  # type: ignore[union-attr]
        if missing:
            raise DataError(f"{examples}: no example of {missing[0]!r} is left to fit on after the held-out split")
    if multi and method == "zero-shot" and not hold_idx:
        raise ConfigError("zero-shot multi-label needs labelled examples to fit each label's threshold")

    # 4: embed and fit
    choose(threads or None, exact=True)  # powers of two: the vectors do not depend on the count (lmforge/threads.py)
    start = time.perf_counter()
    emb = Embedder.load(model, batch_size=batch_size)
    console.print(f"classify train: {method} on {model} ({len(labels)} labels, "
                  f"{len(fit_idx)} to fit, {len(hold_idx)} held out, {'multi' if multi else 'single'}-label)",
                  markup=False)
    y = targets(ex, labels) if ex is not None else np.zeros((0,), dtype=np.int64)
    spec = Spec(method=method, multi_label=multi, labels=labels, descriptions=[lab.description for lab in declared],
                embedding={"path": str(Path(model).resolve()), "fingerprint": emb.fingerprint()},
                threshold=float(min_confidence), fallback=fallback)
    tuned: Path | None = None  # setfit, finetune: the tuned model directory, copied into the classifier as model/
    work = tuning_dir(target)
    if method in ("setfit", "finetune"):
        clear_work(work, method, overwrite)
    if method == "setfit":
        fit_ex = ex.subset(fit_idx)  # type: ignore[union-attr]
        del emb  # the training run loads its own copy
        run_dir, facts = run_setfit(model, fit_ex.texts, fit_ex.labels if multi else [labs[0] for labs in fit_ex.labels],
                                    fit_ex.wheres, work, tuning, seed, threads)
        tuned = write_tuned_model(run_dir, work)
        emb = Embedder.load(tuned, batch_size=batch_size)
        trained = time.perf_counter()
        x = emb.embed(ex.texts, kind="document", progress=True)  # type: ignore[union-attr]
        head = fit_head(x[fit_idx], y[fit_idx], len(labels), multi_label=multi, c=c)
        spec.training = {"examples": len(fit_idx), "tune_seconds": round(trained - start, 3), "C": c, **facts,
                         **final_loss(run_dir)}
        hold_logits = head.logits(x[hold_idx])
    elif method in ("head", "finetune"):
        x = emb.embed(ex.texts, kind="document", progress=True)  # type: ignore[union-attr]
        embedded = time.perf_counter()
        head = fit_head(x[fit_idx], y[fit_idx], len(labels), multi_label=multi, c=c)
        spec.training = {"examples": len(fit_idx), "embed_seconds": round(embedded - start, 3),
                         "fit_seconds": round(time.perf_counter() - embedded, 3), "C": c}
        if method == "finetune":  # the whole model and its own head (started from this probe), through the loop
            del emb
            work.mkdir(parents=True, exist_ok=True)
            probe = work / CLASSIFIER_HEAD
            if not probe.is_file():  # a resumed stage keeps the probe its run was started with
                head.save(probe)
            run_dir, facts = run_finetune(model, [ex.texts[i] for i in fit_idx], y[fit_idx], probe,  # type: ignore[union-attr]
                                          work, tuning, threads)
            tuned = write_tuned_model(run_dir, work)
            emb = Embedder.load(tuned, batch_size=batch_size)
            head = model_head(emb)
            spec.training |= {"tune_seconds": round(time.perf_counter() - embedded, 3), **facts, **final_loss(run_dir)}
            x = emb.embed([ex.texts[i] for i in hold_idx], kind="document", progress=True) if hold_idx else \
                np.zeros((0, head.dim), np.float32)  # type: ignore[union-attr]
            hold_logits = head.logits(x)
        else:
            hold_logits = head.logits(x[hold_idx])
    if tuned is not None:  # the classifier's embedding model is its own model/ (classify.embedding_model_path)
        spec.embedding = {"path": CLASSIFIER_MODEL, "fingerprint": emb.fingerprint(), "base": spec.embedding}
    if method == "zero-shot":
        from .zeroshot import label_vectors, lm_logits

        spec.scorer = scorer
        if scorer == "lm":
            spec.template = template
            dim = emb.dim
            head = Head(np.zeros((len(labels), dim), np.float32), np.zeros(len(labels), np.float32),
                        np.zeros(dim, np.float32), np.ones(dim, np.float32))  # unused: the LM scores
            hold_logits = lm_logits(emb, [ex.texts[i] for i in hold_idx], labels, template) if hold_idx else \
                np.zeros((0, len(labels)))  # type: ignore[union-attr]
        else:
            vecs = label_vectors(emb, declared)
            head = Head(vecs.astype(np.float32), np.zeros(len(labels), np.float32), np.zeros(emb.dim, np.float32),
                        np.ones(emb.dim, np.float32))
            if hold_idx:
                x = emb.embed([ex.texts[i] for i in hold_idx], kind="document", progress=True)  # type: ignore[union-attr]
                hold_logits = head.logits(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
            else:
                hold_logits = np.zeros((0, len(labels)))
        spec.training = {"examples": 0, "labels_from": labels_file or examples}

    # 5: calibrate
    y_hold = y[hold_idx] if ex is not None else y
    if len(hold_idx):
        spec.temperature = calibrate.fit_temperature(hold_logits, y_hold, multi)
        spec.calibrated = True
        if multi:
            spec.label_thresholds = calibrate.label_thresholds(
                calibrate.probabilities(hold_logits, spec.temperature, True), y_hold)
        spec.metrics = {"held_out": held_out_metrics(hold_logits, y_hold, spec.temperature, multi,
                                                     spec.label_thresholds)}
    else:
        spec.temperature = DEFAULT_ZERO_SHOT_T if method == "zero-shot" and scorer == "embedding" else 1.0
        spec.label_thresholds = [0.5] * len(labels) if multi else None
    spec.training["held_out"] = len(hold_idx)
    spec.training["seconds"] = round(time.perf_counter() - start, 3)
    spec.training["seed"] = seed

    # 6: write
    with atomic_dir(target, overwrite=overwrite) as tmp:
        head.save(tmp / CLASSIFIER_HEAD)
        if tuned is not None:
            shutil.copytree(tuned, tmp / CLASSIFIER_MODEL)
        write_manifest(tmp, kind=KIND, extra={"classifier": spec.to_dict()})
    if tuned is not None:
        shutil.rmtree(work, ignore_errors=True)  # the run, its data and the staged model: all inside the classifier now
    summary = spec.metrics.get("held_out")
    cal = (f"; held out {summary['items']}: accuracy {summary['accuracy_after']:.3f}, ECE {summary['ece_before']:.3f} "
           f"-> {summary['ece_after']:.3f}, NLL {summary['nll_before']:.3f} -> {summary['nll_after']:.3f} "
           f"(T = {spec.temperature:.3g})") if summary else f" (not calibrated: no held-out examples; T = {spec.temperature:g})"
    results_out.print(f"wrote {target}: {method}, {len(labels)} labels, trained in {spec.training['seconds']:.1f}s{cal}",
                      markup=False)
    return spec.to_dict()


__all__ = ["train_command", "per_class", "split", "targets", "held_out_metrics", "DEFAULT_HELD_OUT"]
