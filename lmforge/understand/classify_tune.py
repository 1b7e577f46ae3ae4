"""`classify train --method setfit | finetune`: train the embedding model itself, then the head.

Both run lmforge's one training loop (train/loop.py: deterministic order, exact resume, guard,
experiment store) as an ordinary run, started through `train/start.py` with the bundled
`embed-cpu` recipe and a few overrides, in a work directory beside the classifier (`OUT.tuning/`:
the run `METHOD-NAME`, which `lmforge runs` lists, and its data file). The tuned model is then written into the classifier directory as a model
directory (`model/`: model.safetensors, config.yaml with the pooling, tokenizer, manifest), the
head is fitted on (setfit) or kept for (finetune) its embeddings, and the work directory is
removed. A run that stops (Ctrl-C, a crash) leaves its work directory: the same command resumes
it from its newest checkpoint (the same pairs or examples; other ones are refused by the resume
check, and --overwrite starts over).

setfit (Tunstall et al. 2022, SetFit's recipe on lmforge's contrastive objective)
-------------------------------------------------------------------------------
Triplets (anchor, positive: an example that shares a label with it, negative: an example that
shares none) built from the examples that are not held out (cv calibration: all), trained with the `contrastive`
objective (train/contrastive.py `train_pairs`: InfoNCE over in-batch negatives plus the explicit
negative). Single-label, a positive is another example of the anchor's label and a negative one of
another label; multi-label it is SetFit's rule for label sets (a pair is positive when the two
share any label). Each text of a triplet carries its labels as its groups (`group`,
`positive_group`, `negative_group`: data/pairs.py), so no text that shares a label with a query is
one of its in-batch negatives (train/objectives.py): SetFit's positive/negative labels, expressed
for an in-batch loss.

The bound (SetFit's most reported problem is pair generation that grows with the square of the
examples or classes). Every anchor i gets at most k = `pairs_per_example` triplets, its j-th
(j = 0 .. k-1) being:
    positive: the m_i examples that share a label with it, in an order fixed by a hash of (seed,
              anchor), the j-th of them (so an anchor never repeats a positive; single-label a label
              with m examples gives each anchor at most m - 1 triplets, and one example none);
    negative: a label the anchor lacks (or the pool of unlabelled examples), drawn by a hash of
              (seed, anchor, j), then an example of it drawn by the same hash (O(1) per triplet,
              whatever the number of classes). Multi-label, that example may carry one of the
              anchor's labels too: then up to NEGATIVE_DRAWS draws, and a triplet with no negative
              found is left out (an anchor with every label has none).
The triplets are ordered by (j, hash(seed, anchor)), every anchor's first triplet before any
anchor's second, and the first `max_pairs` are kept. So the count is at most min(sum_i min(k, m_i),
max_pairs) <= min(N * k, max_pairs) (single-label exactly min(sum_i min(k, m_label - 1), max_pairs)),
linear in the examples and independent of the number of classes, and the same for the same
(examples, seed). The run is one pass over the triplets unless --steps says otherwise.

finetune
--------
A linear probe is first fitted by logistic regression on the starting model's embeddings (head.py,
as --method head does); it starts the model's own classification head (`model.num_labels`, the
`score` layer, with the probe's standardisation folded in: train/init_from.py `init_score`), and
the whole model and that head are trained through the loop's `classification` objective
(cross-entropy on the pooled, normalised embedding; multi-label: binary cross-entropy). The head
is part of the tuned model's weights (model/model.safetensors: score.weight, score.bias) and is
also written as the classifier's head.safetensors (mean 0, scale 1), so predict, eval and serve
compute exactly what was trained. Default length: FINETUNE_EPOCHS passes over the examples.

Trade-offs: the work directory holds one more copy of the model while it runs (the run's
checkpoints); the tuned model is a full copy inside the classifier (no adapter), which is what
lets `lmforge serve clf/NAME` load one directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import ranges as R
from ..artifacts import CLASSIFIER_MODEL, read_bundle, write_model_dir
from ..errors import ConfigError, DataError
from ..util import atomic_write_text, console

DEFAULT_PAIRS_PER_EXAMPLE = 4
DEFAULT_MAX_PAIRS = 2000
NEGATIVE_DRAWS = 8  # multi-label: draws for a negative that shares no label with its anchor (then none)
DEFAULT_LR = 5e-5  # embed-cpu's; a few steps of full fine-tuning
DEFAULT_BATCH = 16  # texts (setfit: triplets) per step; the contrastive objective's in-batch candidates
FINETUNE_EPOCHS = 3
MAX_TRAIN_TOKENS = 512  # a training text is cut here (prediction reads up to the model's context)
TUNING_SUFFIX = ".tuning"
STAGED = ("pairs.jsonl", "examples.jsonl", "head.safetensors", "model")  # what a work directory holds besides its run


@dataclass(frozen=True)
class Tuning:
    """The settings of the training stage (CLI flags of `classify train`)."""

    steps: int = 0  # optimizer steps; 0: setfit one pass over the triplets, finetune FINETUNE_EPOCHS passes
    lr: float = DEFAULT_LR
    batch: int = DEFAULT_BATCH
    pairs_per_example: int = DEFAULT_PAIRS_PER_EXAMPLE  # setfit
    max_pairs: int = DEFAULT_MAX_PAIRS  # setfit

    def check(self) -> None:
        R.TUNE_STEPS.check("--steps", self.steps)
        R.positive_float().check("--lr", self.lr)
        R.positive_int().check("--tune-batch", self.batch)
        R.PAIRS_PER_EXAMPLE.check("--pairs-per-example", self.pairs_per_example)
        R.MAX_PAIRS.check("--max-pairs", self.max_pairs)


def _rank(*key: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, key)).encode()).digest()[:8], "little")


def _label_sets(labels: Sequence[str | Sequence[str]]) -> list[frozenset[str]]:
    return [frozenset([lab]) if isinstance(lab, str) else frozenset(lab) for lab in labels]


def setfit_pairs(labels: Sequence[str | Sequence[str]], keys: Sequence[str], *,
                 pairs_per_example: int = DEFAULT_PAIRS_PER_EXAMPLE, max_pairs: int = DEFAULT_MAX_PAIRS,
                 seed: int = 0) -> list[tuple[int, int, int]]:
    """(anchor, positive, negative) example indices by the bounded rule of the module docstring.
    labels[i]: example i's label, or its labels (multi-label: a list, maybe empty); keys[i]: its stable
    name (FILE:LINE), which the hashes use. A positive shares a label with its anchor, a negative none."""
    sets = _label_sets(labels)
    by_label: dict[str, list[int]] = defaultdict(list)
    unlabelled: list[int] = []  # multi-label examples with no label: anyone's negative, no one's positive
    for i, labs in enumerate(sets):
        for lab in labs:
            by_label[lab].append(i)
        if not labs:
            unlabelled.append(i)
    names = sorted(by_label)
    if len(names) < 2:
        raise DataError("setfit needs examples of at least two labels to build negatives")
    ranked: list[tuple[int, int, tuple[int, int, int]]] = []
    for i, labs in enumerate(sets):
        mates = sorted({p for lab in labs for p in by_label[lab]} - {i})  # every example sharing a label with i
        if not mates:
            continue  # a label with one example (or no label): no positive for it
        mates.sort(key=lambda p: _rank(seed, keys[i], keys[p]))  # O(m log m) per anchor: fine at thousands per label
        pools = [by_label[n] for n in names if n not in labs] + ([unlabelled] if unlabelled else [])
        if not pools:
            continue  # i carries every label: nothing can be its negative
        order = _rank(seed, keys[i])
        for j in range(min(pairs_per_example, len(mates))):
            negative = _negative(sets, labs, pools, seed, keys[i], j)
            if negative is not None:
                ranked.append((j, order, (i, mates[j], negative)))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [t for _, _, t in ranked[:max_pairs]]


def _negative(sets: Sequence[frozenset[str]], labs: frozenset[str], pools: Sequence[Sequence[int]], seed: int,
              key: str, j: int) -> int | None:
    """The j-th negative of the anchor named `key` with labels `labs`: a pool (a label it lacks) drawn by a
    hash of (seed, key, j), then an example of it by the same hash. Single-label, the first draw always
    shares no label with the anchor; multi-label, the example may also carry one of the anchor's labels,
    and up to NEGATIVE_DRAWS draws are made (then the triplet is left out: constant work per triplet)."""
    for draw in range(NEGATIVE_DRAWS):
        h = _rank(seed, key, j, "negative", *([draw] if draw else []))  # draw 0: the single-label hash
        pool = pools[h % len(pools)]
        n = pool[(h >> 20) % len(pool)]
        if not sets[n] & labs:
            return n
    return None


def tuning_dir(target: Path) -> Path:
    """The work directory of a classifier's training stage: OUT.tuning beside OUT."""
    return target.parent / f"{target.name}{TUNING_SUFFIX}"


def run_dir_of(work: Path, method: str) -> Path:
    """The training run inside a work directory, METHOD-NAME: the name `lmforge runs` lists it under."""
    return work / f"{method}-{work.name.removesuffix(TUNING_SUFFIX)}"


def _overrides(model: str, tuning: Tuning, steps: int, n: int, threads: int) -> list[str]:
    """The run's settings over the embed-cpu recipe. Texts are cut at MAX_TRAIN_TOKENS (or the model's
    context if shorter; a batch is trimmed to its longest row, so this is a cap, not a cost)."""
    from ..artifacts import read_config, resolve_origin

    batch = max(1, min(tuning.batch, n))
    context = read_config(resolve_origin(model).path).model.max_seq_len
    return [f"model.max_seq_len={context}", f"data.seq_len={min(context, MAX_TRAIN_TOKENS)}", f"train.max_steps={steps}", f"train.lr={tuning.lr!r}", f"train.global_batch={batch}",
            f"train.micro_batch={batch}", f"train.warmup_steps={steps // 10}", "train.eval_every=0",
            "data.pairs_val_fraction=0", f"train.ckpt_every_steps={max(steps, 1)}", "train.keep_last=1",
            "train.log_every=1", "guard.warmup=10", f"train.threads={threads}"]


def run_setfit(model: str, texts: Sequence[str], labels: Sequence[str | Sequence[str]], keys: Sequence[str], work: Path,
               tuning: Tuning, seed: int, threads: int = 0) -> tuple[Path, dict[str, object]]:
    """Train `model` on the bounded triplets of (texts, labels) (module docstring; labels[i] a label or,
    multi-label, a list of them); returns the run directory and the facts to record."""
    from ..train.contrastive import train_pairs

    triplets = setfit_pairs(labels, keys, pairs_per_example=tuning.pairs_per_example, max_pairs=tuning.max_pairs,
                            seed=seed)
    if len(triplets) < 2:
        raise DataError(f"setfit built {len(triplets)} pair(s) from these examples: it needs two examples of a label "
                        "at least twice (or more examples per label); use --method head")
    sets = _label_sets(labels)
    label_id = {lab: g for g, lab in enumerate(sorted(set().union(*sets)))}

    def ids(example: int) -> list[int]:  # a text's groups: its labels' indices (data/pairs.py)
        return sorted(label_id[lab] for lab in sets[example])
    steps = tuning.steps or math.ceil(len(triplets) / max(1, min(tuning.batch, len(triplets))))
    console.print(f"setfit: {len(triplets)} triplets (<= {tuning.pairs_per_example} per example, cap "
                  f"{tuning.max_pairs}), {steps} steps", markup=False)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir_of(work, "setfit")
    resumed = _train(run_dir, lambda: train_pairs([(texts[a], texts[p], texts[n]) for a, p, n in triplets], init_from=model,
                                        run_dir=run_dir, overrides=_overrides(model, tuning, steps, len(triplets), threads),
                                        pairs_file=work / "pairs.jsonl", groups=[ids(a) for a, _, _ in triplets],
                                        positive_groups=[ids(p) for _, p, _ in triplets],
                                        negative_groups=[ids(n) for _, _, n in triplets]))
    return run_dir, {"resumed": resumed, "pairs": len(triplets), "pairs_per_example": tuning.pairs_per_example,
                     "max_pairs": tuning.max_pairs, "steps": steps, "lr": tuning.lr, "batch": min(tuning.batch, len(triplets))}


def run_finetune(model: str, texts: Sequence[str], y: np.ndarray, probe: Path, work: Path, tuning: Tuning,
                 threads: int = 0) -> tuple[Path, dict[str, object]]:
    """Train the whole `model` and a classification head started from the linear probe in `probe`
    on (texts, y) through the classification objective (module docstring); returns the run
    directory and the facts to record."""
    from ..train.start import StartRequest, train_command

    work.mkdir(parents=True, exist_ok=True)
    examples = work / "examples.jsonl"
    atomic_write_text(examples, "".join(json.dumps({"text": t, "label": row.tolist() if y.ndim == 2 else int(row)},
                                                   ensure_ascii=False) + "\n" for t, row in zip(texts, y)))
    steps = tuning.steps or math.ceil(FINETUNE_EPOCHS * len(texts) / max(1, min(tuning.batch, len(texts))))
    console.print(f"finetune: {len(texts)} examples, {steps} steps", markup=False)
    run_dir = run_dir_of(work, "finetune")
    overrides = ["train.objective=classification", "data.pairs=", f"data.examples={examples.resolve()}",
                 f"model.num_labels={int(probe_rows(probe))}", f"train.classification_head={probe.resolve()}",
                 f"init.from={model}",
                 *_overrides(model, tuning, steps, len(texts), threads)]

    def start() -> None:
        code = train_command(StartRequest(config="embed-cpu", run_dir=str(run_dir), overrides=tuple(overrides)))
        if code != 0:
            from ..errors import LmforgeError

            raise LmforgeError(f"the finetune run {run_dir} stopped with exit status {code}; rerun the same command to "
                               f"resume it, or see {run_dir / 'events.jsonl'}")

    resumed = _train(run_dir, start)
    return run_dir, {"resumed": resumed, "steps": steps, "lr": tuning.lr, "batch": min(tuning.batch, len(texts)), "epochs":
                     round(steps * min(tuning.batch, len(texts)) / len(texts), 2)}


def probe_rows(probe: Path) -> int:
    from .head import Head

    return Head.load(probe).weight.shape[0]


def _train(run_dir: Path, start: Callable[[], object]) -> bool:
    """Start (or resume: the loop picks up the run's newest checkpoint) the run; whether it resumed."""
    resumed = run_dir.exists()
    if resumed:
        console.print(f"resuming the training stage in {run_dir}", markup=False)
    start()
    return resumed


def final_loss(run_dir: Path) -> dict[str, float]:
    """The first and last logged training loss of a run (metrics.jsonl), for the classifier's record."""
    from ..artifacts import METRICS_FILE
    from ..jsonl import read_records

    losses = [r["loss"] for r in read_records(run_dir / METRICS_FILE) if isinstance(r.get("loss"), (int, float))]
    return {"loss_first": round(float(losses[0]), 6), "loss_last": round(float(losses[-1]), 6)} if losses else {}


def write_tuned_model(run_dir: Path, work: Path) -> Path:
    """The run's newest checkpoint -> a model directory `work/model/` (then copied into the classifier)."""
    return write_model_dir(read_bundle(run_dir), work / CLASSIFIER_MODEL, overwrite=True)


def clear_work(work: Path, method: str, overwrite: bool) -> None:
    """--overwrite starts the training stage over; without it an unfinished run is resumed. A work
    directory without a run of this method (a start that was refused, another method's) holds only
    what this module writes again."""
    if not work.exists():
        return
    if overwrite or not run_dir_of(work, method).is_dir():
        ours = set(STAGED) | {run_dir_of(work, m).name for m in ("setfit", "finetune")}
        if not work.is_dir() or not {p.name for p in work.iterdir()} <= ours:
            raise ConfigError(f"{work} is the work directory of `classify train` but holds other files; move it away")
        shutil.rmtree(work)


__all__ = ["Tuning", "setfit_pairs", "run_setfit", "run_finetune", "write_tuned_model", "tuning_dir", "run_dir_of", "clear_work",
           "final_loss", "DEFAULT_PAIRS_PER_EXAMPLE", "DEFAULT_MAX_PAIRS", "DEFAULT_LR", "DEFAULT_BATCH",
           "FINETUNE_EPOCHS"]
