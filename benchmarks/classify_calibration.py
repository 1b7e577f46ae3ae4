"""Which temperature calibrates a classifier best: the ways of fitting T compared on the test file.

`classify train --calibration cv` fits the temperature on out-of-fold logits of the examples the
head (and setfit's contrastive stage) learned from. For `head` those logits are honest (the frozen
model never saw the scored fold); for `setfit` the model was tuned on every example, the scored
fold included, so its out-of-fold logits may be over-confident. This script measures it on one
trained classifier: for each way of fitting T it prints T and the test accuracy (the same for every
T), NLL and ECE (15 bins):

- `none`: T = 1;
- `recorded`: the classifier's own T (what `classify eval` uses);
- `cv K`: T fitted on K-fold out-of-fold logits of the classifier's own embeddings of the examples
  (classify_train.folds, head.out_of_fold_logits: what `--calibration cv --folds K` does);
- `raw cv K` (with --base): T fitted on out-of-fold logits of heads on the BASE model's embeddings
  (a model that never saw the examples), then applied to the classifier's head;
- `test (oracle)`: T fitted on the test logits themselves, the best one scalar can do.

The examples are the ones `classify train --examples-per-class N --seed 0` keeps from the training
file, as benchmarks/classify.py's "N/class" rows; the classifier must have been trained on them.

    python benchmarks/classify_calibration.py /tmp/w/clf-smol-setfit-None-8class --base /tmp/w/smollm2 --threads 1
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from lmforge.evaluate import classification as M
from lmforge.understand import calibrate
from lmforge.understand.classify import Classifier
from lmforge.understand.classify_train import folds, per_class, targets
from lmforge.understand.embed import Embedder
from lmforge.understand.head import out_of_fold_logits
from lmforge.understand.labelled import read_examples
from lmforge.util import set_progress_mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("classifier", help="a single-label classifier trained on the --examples-per-class examples")
    ap.add_argument("--base", help="the model it was tuned from (setfit): adds the 'raw cv' rows")
    ap.add_argument("--train", default="stdlib-modules-train")
    ap.add_argument("--test", default="stdlib-modules-test")
    ap.add_argument("--examples-per-class", type=int, default=8)
    ap.add_argument("--folds", default="5,8", help="K for the cv rows, comma-separated")
    ap.add_argument("--c", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_progress_mode("quiet")
    clf = Classifier.load(args.classifier, device="cpu")
    if clf.spec.multi_label:
        sys.exit("single-label classifiers only")
    ex = per_class(read_examples(args.train), args.examples_per_class, seed=0)
    test = read_examples(args.test)
    labels = clf.labels
    y, yt = targets(ex, labels), targets(test, labels)
    x = clf.embedder.embed(ex.texts, kind="document")
    test_logits = clf.logits(test.texts)
    ks = [int(k) for k in args.folds.split(",")]
    ways: list[tuple[str, float]] = [("none", 1.0), ("recorded", clf.spec.temperature)]

    def cv_t(vectors: np.ndarray, k: int) -> float:
        fold = np.asarray(folds(ex, k, seed=0))
        oof = out_of_fold_logits(vectors, y, fold, len(labels), multi_label=False, c=args.c)
        keep = fold >= 0
        acc = float((oof[keep].argmax(1) == y[keep]).mean())
        print(f"  out-of-fold accuracy ({'base' if vectors is not x else 'own'} model, K = {k}): {acc:.3f}", flush=True)
        return calibrate.fit_temperature(oof[keep], y[keep], False)

    ways += [(f"cv {k}", cv_t(x, k)) for k in ks]
    if args.base:
        xb = Embedder.load(args.base, device="cpu").embed(ex.texts, kind="document")
        ways += [(f"raw cv {k}", cv_t(xb, k)) for k in ks]
    ways.append(("test (oracle)", calibrate.fit_temperature(test_logits, yt, False)))
    print(f"\n{args.classifier}: {clf.spec.method}, {len(ex)} examples, test {len(test)} items, "
          f"accuracy {float((test_logits.argmax(1) == yt).mean()):.3f}\n")
    print("| T fitted on | T | test NLL | test ECE |\n|---|---|---|---|")
    for name, t in ways:
        p = calibrate.softmax(test_logits, t)
        print(f"| {name} | {t:.3g} | {calibrate.nll_at(test_logits, yt, t, False):.3f} | "
              f"{M.ece(p.max(1), p.argmax(1) == yt):.3f} |", flush=True)


if __name__ == "__main__":
    main()
