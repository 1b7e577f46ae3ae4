"""`lmforge classify train`: labelled examples (or label names) -> a classifier directory.

Steps, each a function a test can call:
1. read the examples (labelled.py) and the label set: the labels seen, sorted; zero-shot takes
   them from a label file (names and descriptions), and any examples given only calibrate;
2. `per_class` (optional): keep the first N examples of each label in a fixed pseudo-random order
   (a hash of the seed and the example's text: the same examples are chosen whatever the file's path
   or line order, so a figure reproduces in another checkout), the "8 examples per class" setting;
3. how to calibrate (`--calibration`, `resolve_calibration`), and the items it scores:
   - `held-out`: `split` puts a share aside, stratified by each example's first label, chosen by
     the same hash: a label with n >= 2 examples puts round(n * held_out) of them, at least 1 and
     at most n - 1, aside; a label with one example keeps it for fitting. The head (and setfit's
     triplets) learn from the rest only.
   - `cv` (cross-fitted): the head (and setfit's triplets) learn from EVERY example; `folds` deals
     the examples into K folds, stratified by first label in the same hash order (round-robin,
     carried on from one label to the next, so folds differ in size by at most one and each holds
     a label's examples to within one); a label with one example is never scored, as `split` never
     holds it out. The temperature (and multi-label thresholds) are fitted on out-of-fold logits:
     item i scored by a head fitted on the other folds (head.out_of_fold_logits), K more head fits
     on the same embeddings (seconds). setfit's out-of-fold heads are fitted on the STARTING
     model's embeddings of the examples, not the tuned model's: the tuned model has been pulled
     towards every example's label, the scored fold's included, so its out-of-fold heads are
     right on ~97 % of the examples where the test gets ~49 % and the T they give sharpens
     (measured: test ECE 0.22 -> 0.41 on stdlib-modules at 8/class). The starting model never saw
     the examples; its out-of-fold T (1.5 there) brought the tuned head's test ECE to 0.095
     (docs/classify.md). The manifest records which (`training.calibration_embeddings`: own or base).
   - `auto` (the default): cv when there are fewer than CV_BELOW examples per label on average
     (there a held-out share costs the head a fifth of too few examples, and fits T on a handful
     of items), held-out otherwise. finetune is always held-out: its head is trained inside the
     model, so an out-of-fold logit would take one fine-tune per fold. zero-shot fits nothing on
     the examples: every given example calibrates.
4. fit by method (head: logistic regression on the frozen embeddings, head.py; zero-shot: label
   vectors or the LM scorer, zeroshot.py; setfit and finetune: see below);
5. calibrate (calibrate.py: one temperature; multi-label thresholds) on the held-out split or the
   out-of-fold logits, and record accuracy, NLL and ECE there before and after (the manifest's
   `calibration` says which, `metrics.held_out` or `metrics.out_of_fold` holds them);
6. write `clf/NAME/` atomically (util.atomic_dir; artifacts.write_manifest(kind="classifier")).

setfit and finetune train the embedding model itself through lmforge's training loop (deterministic
order, exact resume, guard, store) on the `contrastive` and `classification` objectives of
train/objectives.py (classify_tune.py: the bounded pair rule, the work directory, resume), on the
examples that are not held out (cv: all of them), then write the tuned model into the classifier
as `model/`: its checksum is the one the classifier records, and the held-out split or the
out-of-fold logits calibrate the tuned model's head exactly as they do for `head`.

Trade-offs: held-out: the head is fitted on the split that is not held out and is not refitted on
all the examples afterwards (a refit on more data changes the logit scale the temperature was
fitted for). cv: the out-of-fold heads see (K-1)/K of the examples, the final head all of them, so
its logits run slightly larger than the ones T was fitted on (T errs towards over-confidence);
setfit's T comes from another model's heads (the starting model's), an estimate of how far a head
fitted on these few examples over-reaches on new text, not a fit of the tuned head itself, and
multi-label its per-label thresholds come from those heads too.
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
from ..util import atomic_dir, console, writes_to
from ..util import out as results_out
from . import calibrate
from .classify import (CALIBRATIONS, CV_BELOW, DEFAULT_FALLBACK, DEFAULT_FOLDS, DEFAULT_TEMPLATE, DEFAULT_ZERO_SHOT_T,
                       KIND, METHODS, SCORERS, Spec, check_threshold)
from .classify_tune import Tuning, clear_work, final_loss, run_finetune, run_setfit, tuning_dir, write_tuned_model
from .head import Head, fit_head, out_of_fold_logits
from .labelled import Examples, Label, check_label_count, read_examples, read_label_file

DEFAULT_HELD_OUT = 0.2


def _hash_order(ex: Examples, idx: list[int], seed: int) -> list[int]:
    """`idx` in the pseudo-random order of a hash of the seed and each example's text (equal texts:
    file order). Not of FILE:LINE: an absolute path in the key chose other examples in another
    checkout."""
    return sorted(idx, key=lambda i: hashlib.sha256(f"{seed}:{ex.texts[i]}".encode()).digest()[:8])


def _strata(ex: Examples, seed: int) -> dict[str, list[int]]:
    """Each first label's example indices (the stratum of per_class, split and folds), in hash order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, labs in enumerate(ex.labels):
        groups[labs[0] if labs else ""].append(i)
    return {key: _hash_order(ex, idx, seed) for key, idx in groups.items()}


def per_class(ex: Examples, n: int, seed: int = 0) -> Examples:
    """The first n examples of each label (by its first label) in hash order (module docstring), kept in file order."""
    R.positive_int().check("--examples-per-class", n)
    keep = sorted(i for idx in _strata(ex, seed).values() for i in idx[:n])
    return ex.subset(keep)


def split(ex: Examples, held_out: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fit indices, held-out indices), stratified and deterministic (module docstring)."""
    R.HELD_OUT.check("--held-out", held_out)
    hold: list[int] = []
    for idx in _strata(ex, seed).values():
        n = len(idx)
        k = 0 if held_out == 0 or n < 2 else min(n - 1, max(1, round(n * held_out)))
        hold += idx[:k]
    held = set(hold)
    return [i for i in range(len(ex)) if i not in held], sorted(held)


def folds(ex: Examples, k: int, seed: int = 0) -> list[int]:
    """Each example's fold in 0..k-1, -1 for one never scored (a label with one example): stratified
    by first label and deterministic (module docstring, step 3)."""
    R.FOLDS.check("--folds", k)
    fold = [-1] * len(ex)
    dealt = 0  # carried from label to label: the first folds do not collect every label's remainder
    strata = _strata(ex, seed)
    for key in sorted(strata):
        idx = strata[key]
        if len(idx) < 2:
            continue
        for i in idx:
            fold[i] = dealt % k
            dealt += 1
    return fold


def resolve_calibration(calibration: str, method: str, examples: int, labels: int) -> str:
    """"cv" or "held-out": what `--calibration` (auto, cv, held-out) means for this method and size."""
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"--calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}")
    if calibration == "cv" and method == "finetune":
        raise ConfigError("--calibration cv is for head and setfit: finetune trains its head inside the model, so "
                          "out-of-fold logits would take one fine-tune per fold; use --calibration held-out (auto)")
    if calibration == "cv" and method == "zero-shot":
        raise ConfigError("--calibration cv is for head and setfit: zero-shot fits nothing on the examples, every "
                          "one already calibrates; leave --calibration at auto")
    if calibration == "auto":
        return "cv" if method in ("head", "setfit") and examples < CV_BELOW * labels else "held-out"
    return calibration


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


def zero_shot_head(emb: Any, declared: list[Label], texts: list[str], scorer: str, template: str) -> tuple[Head, np.ndarray]:
    """Step 4 for zero-shot: (the head, its logits on `texts`, the examples that calibrate). The
    embedding scorer's head is the label vectors (zeroshot.py) over unit-length text vectors; the
    LM scorer's is a placeholder the classifier never uses (the LM scores each label name)."""
    from .zeroshot import label_vectors, lm_logits

    n, dim = len(declared), emb.dim
    if scorer == "lm":
        head = Head(np.zeros((n, dim), np.float32), np.zeros(n, np.float32), np.zeros(dim, np.float32),
                    np.ones(dim, np.float32))
        return head, lm_logits(emb, texts, [lab.name for lab in declared], template) if texts else np.zeros((0, n))
    head = Head(label_vectors(emb, declared).astype(np.float32), np.zeros(n, np.float32), np.zeros(dim, np.float32),
                np.ones(dim, np.float32))
    if not texts:
        return head, np.zeros((0, n))
    x = emb.embed(texts, kind="document", progress=True)
    return head, head.logits(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def calibrate_spec(spec: Spec, logits: np.ndarray, y: np.ndarray, how: str, uncalibrated_t: float) -> None:
    """Step 5: fit the spec's temperature (and multi-label thresholds) on `logits` against `y`, and
    record how (`calibration`) and the metrics there before and after (`metrics.held_out`, or
    `metrics.out_of_fold` when `how` is "cv"); with nothing to fit on, `uncalibrated_t`."""
    if not len(y):
        spec.calibration, spec.temperature = "none", uncalibrated_t
        spec.label_thresholds = [0.5] * len(spec.labels) if spec.multi_label else None
        return
    multi = spec.multi_label
    spec.temperature = calibrate.fit_temperature(logits, y, multi)
    spec.calibrated, spec.calibration = True, how
    if multi:
        spec.label_thresholds = calibrate.label_thresholds(calibrate.probabilities(logits, spec.temperature, True), y)
    key = "out_of_fold" if how == "cv" else "held_out"
    spec.metrics = {key: held_out_metrics(logits, y, spec.temperature, multi, spec.label_thresholds)}


def train_command(model: str, examples: str | None, out: str, *, method: str = "head", labels_file: str | None = None,
                  scorer: str = "embedding", template: str = DEFAULT_TEMPLATE, held_out: float = DEFAULT_HELD_OUT,
                  calibration: str = "auto", n_folds: int = DEFAULT_FOLDS,
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
    R.FOLDS.check("--folds", n_folds)
    resolve_calibration(calibration, method, 0, 1)  # its mistakes before any file is read
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
    how = resolve_calibration(calibration, method, len(ex) if ex is not None else 0, len(labels))
    fold: list[int] = []  # cv: each example's fold (-1: never scored)
    if method == "zero-shot":
        fit_idx, hold_idx = [], list(range(len(ex))) if ex is not None else []  # examples only calibrate
    elif how == "cv":
        fit_idx, hold_idx = list(range(len(ex))), []  # type: ignore[arg-type]
        fold = folds(ex, n_folds, seed)  # type: ignore[arg-type]
    else:
        fit_idx, hold_idx = split(ex, held_out, seed)  # type: ignore[arg-type]
        missing = [lab for lab in labels if not any(lab in ex.labels[i] for i in fit_idx)]  # type: ignore[union-attr]
        if missing:
            raise DataError(f"{examples}: no example of {missing[0]!r} is left to fit on after the held-out split")
    if multi and method == "zero-shot" and not hold_idx:
        raise ConfigError("zero-shot multi-label needs labelled examples to fit each label's threshold")

    # 4: embed and fit
    choose(threads or None, exact=True)  # powers of two: the vectors do not depend on the count (lmforge/threads.py)
    start = time.perf_counter()
    emb = Embedder.load(model, batch_size=batch_size)
    cal_note = f"calibrated on {n_folds}-fold out-of-fold logits" if how == "cv" else f"{len(hold_idx)} held out"
    console.print(f"classify train: {method} on {model} ({len(labels)} labels, "
                  f"{len(fit_idx)} to fit, {cal_note}, {'multi' if multi else 'single'}-label)", markup=False)
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
        if how == "cv":  # the starting model's view of the examples calibrates (module docstring, step 3)
            x_cal = emb.embed(ex.texts, kind="document", progress=True)  # type: ignore[union-attr]
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
        x = x_cal = emb.embed(ex.texts, kind="document", progress=True)  # type: ignore[union-attr]
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
        spec.scorer, spec.template = scorer, (template if scorer == "lm" else None)
        head, hold_logits = zero_shot_head(emb, declared, [ex.texts[i] for i in hold_idx] if ex is not None else [],
                                           scorer, template)
        spec.training = {"examples": 0, "labels_from": labels_file or examples}

    # 5: calibrate, on the held-out split or (cv) the out-of-fold logits of every example that has a fold
    if how == "cv":
        scored = [i for i, k in enumerate(fold) if k >= 0]
        cal_logits = out_of_fold_logits(x_cal, y, np.asarray(fold), len(labels), multi_label=multi, c=c)[scored]
        cal_y = y[scored]
        spec.training |= {"folds": n_folds, "calibration_embeddings": "base" if method == "setfit" else "own"}
    else:
        cal_logits, cal_y = hold_logits, y[hold_idx] if ex is not None else y
    calibrate_spec(spec, cal_logits, cal_y, how,
                   uncalibrated_t=DEFAULT_ZERO_SHOT_T if method == "zero-shot" and scorer == "embedding" else 1.0)
    spec.training["held_out"] = len(hold_idx)
    spec.training["seconds"] = round(time.perf_counter() - start, 3)
    spec.training["seed"] = seed

    # 6: write
    with writes_to(target), atomic_dir(target, overwrite=overwrite) as tmp:
        head.save(tmp / CLASSIFIER_HEAD)
        if tuned is not None:
            shutil.copytree(tuned, tmp / CLASSIFIER_MODEL)
        write_manifest(tmp, kind=KIND, extra={"classifier": spec.to_dict()})
    if tuned is not None:
        shutil.rmtree(work, ignore_errors=True)  # the run, its data and the staged model: all inside the classifier now
    summary = spec.metrics.get("held_out") or spec.metrics.get("out_of_fold")
    where = f"out of fold ({n_folds} folds)" if how == "cv" else "held out"
    cal = (f"; {where} {summary['items']}: accuracy {summary['accuracy_after']:.3f}, ECE {summary['ece_before']:.3f} "
           f"-> {summary['ece_after']:.3f}, NLL {summary['nll_before']:.3f} -> {summary['nll_after']:.3f} "
           f"(T = {spec.temperature:.3g})") if summary else f" (not calibrated: no examples to calibrate on; T = {spec.temperature:g})"
    results_out.print(f"wrote {target}: {method}, {len(labels)} labels, trained in {spec.training['seconds']:.1f}s{cal}",
                      markup=False)
    return spec.to_dict()


__all__ = ["train_command", "per_class", "split", "folds", "resolve_calibration", "targets", "held_out_metrics",
           "zero_shot_head", "calibrate_spec", "DEFAULT_HELD_OUT"]
