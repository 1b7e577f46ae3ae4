"""Classifiers on your own model: the classifier directory, loading it, and predicting with routing.

This module is the inference side (what `classify predict`, `classify eval` and `POST /v1/classify`
run); it imports neither train/ nor evaluate/, so the server can use it. Fitting lives in
classify_train.py, metrics and reports in classify_report.py, calibration in calibrate.py, the
logistic-regression head in head.py, label files and examples in labelled.py.

The classifier directory (`clf/NAME/`, written atomically, verified like a checkpoint)
------------------------------------------------------------------------------------
    MANIFEST.json      kind "classifier", sha256 of every file, and a "classifier" section:
                       method, multi_label, labels, descriptions, temperature, threshold, fallback,
                       label_thresholds (multi-label), scorer and template (zero-shot), the
                       embedding model (its path and `Embedder.fingerprint()`), training facts,
                       calibration (held-out, cv or none) and the metrics on what calibrated it
                       (held_out or out_of_fold: accuracy, NLL and ECE before and after)
    head.safetensors   the head (head.py); a zero-shot classifier's label vectors; finetune: the
                       tuned model's own classification head (mean 0, scale 1)
    model/             setfit, finetune: the tuned embedding model (classify_tune.py), recorded as
                       the embedding path "model" (relative: inside the classifier)

Loading checks the embedding model against the recorded fingerprint (weights sha256, tokenizer
sha256, pooling, dimension): a classifier used with another model is refused, naming both
checksums. `--model PATH` names the model when it moved; the check is the same.

Scores
------
- head: logits = the head on the pooled embedding; softmax (single-label) or sigmoids (multi-label)
  of logits / temperature.
- zero-shot, scorer "embedding": logits = cosine(text vector, label vector); the label vector
  embeds "name: description" (or the name) as a query (the model's query prefix), the text as a
  document. Without held-out data the temperature is DEFAULT_ZERO_SHOT_T (cosines differ by
  hundredths; T = 1 would make every item look unsure).
- zero-shot, scorer "lm": logits = log P(" " + label name | template filled with the text), the
  way `lmforge eval` scores a multiple-choice item (evaluate/score.py's packed scorer, imported
  only on this path; the server refuses such a classifier so serve/ stays free of evaluate/).

Routing: an item whose confidence (calibrate.py) is below the threshold (`--min-confidence`, else
the one recorded at training) goes to the fallback (default "review"): `label` is where it goes,
`predicted` what the model said, `routed` whether it was sent to the fallback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import CLASSIFIER_HEAD, MANIFEST, read_manifest, verify_manifest
from ..errors import CheckpointError
from ..ranges import CONFIDENCE
from . import calibrate
from .head import Head

if TYPE_CHECKING:
    from .embed import Embedder

KIND = "classifier"
METHODS = ("head", "zero-shot", "setfit", "finetune")
SCORERS = ("embedding", "lm")
DEFAULT_FALLBACK = "review"
DEFAULT_TEMPLATE = "{text}\nCategory:"
DEFAULT_ZERO_SHOT_T = 0.02  # zero-shot with the embedding scorer and no held-out data to fit T
CALIBRATIONS = ("auto", "cv", "held-out")  # classify train --calibration (classify_train.py, step 3)
DEFAULT_FOLDS = 5
CV_BELOW = 50  # auto: cross-fitted calibration below this many examples per label (N / L)


@dataclass
class Spec:
    """The manifest's "classifier" section (module docstring)."""

    method: str
    multi_label: bool
    labels: list[str]
    embedding: dict[str, Any]  # {"path": str, "fingerprint": Embedder.fingerprint()}
    descriptions: list[str] = field(default_factory=list)
    temperature: float = 1.0
    threshold: float = 0.0  # --min-confidence recorded at training
    fallback: str = DEFAULT_FALLBACK
    label_thresholds: list[float] | None = None  # multi-label: per-label decision thresholds
    scorer: str | None = None  # zero-shot: "embedding" | "lm"
    template: str | None = None  # zero-shot lm: the context, with {text}
    calibrated: bool = False  # the temperature was fitted on held-out data
    # what it was fitted on: "held-out" (a split the head did not see), "cv" (out-of-fold logits of
    # every example), "none"; None in a classifier written before this was recorded
    calibration: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def calibration_note(self) -> str:
        """How the temperature was fitted, in words (eval's report says it)."""
        if not self.calibrated:
            return f"not calibrated (T = {self.temperature:.3g})"
        if self.calibration == "cv":
            items = self.metrics.get("out_of_fold", {}).get("items", "?")
            base = ", heads on the starting model's embeddings" if self.training.get("calibration_embeddings") == "base" \
                else ""
            return f"T = {self.temperature:.3g}, fitted on out-of-fold logits of {items} examples " \
                   f"({self.training.get('folds', '?')} folds{base})"
        items = self.metrics.get("held_out", {}).get("items", "?")
        return f"T = {self.temperature:.3g}, fitted on {items} held-out examples"

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Spec:
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{where}: corrupt: {MANIFEST} (classifier section: {why})")

        if not isinstance(d, dict):
            raise bad("missing or not an object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise bad(f"unknown key(s) {unknown}; written by a newer lmforge?")
        try:
            spec = cls(**d)
        except TypeError as e:
            raise bad(str(e)) from None
        if spec.method not in METHODS:
            raise bad(f"method {spec.method!r}")
        if not (isinstance(spec.labels, list) and len(spec.labels) >= 2 and all(isinstance(x, str) for x in spec.labels)):
            raise bad("labels must be a list of at least two strings")
        if not (isinstance(spec.temperature, (int, float)) and spec.temperature > 0 and math.isfinite(spec.temperature)):
            raise bad(f"temperature {spec.temperature!r}")
        if spec.multi_label and (spec.label_thresholds is None or len(spec.label_thresholds) != len(spec.labels)):
            raise bad("a multi-label classifier needs one threshold per label")
        if not isinstance(spec.embedding, dict) or not isinstance(spec.embedding.get("fingerprint"), dict):
            raise bad("embedding.fingerprint is missing")
        return spec


def is_classifier_dir(path: str | os.PathLike) -> bool:
    """A directory whose manifest says it is a classifier (read leniently; loading verifies it)."""
    import json

    p = Path(path)
    try:
        return json.loads((p / MANIFEST).read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: nested too deeply
        return False


def check_threshold(value: float, flag: str = "--min-confidence") -> float:
    CONFIDENCE.check(flag, value)
    return float(value)


def embedding_model_path(clf_dir: Path, spec: Spec) -> Path:
    """Where the classifier's embedding model is: inside it (setfit, finetune write `model/`) or
    the path recorded at training (absolute)."""
    recorded = Path(spec.embedding.get("path", ""))
    return recorded if recorded.is_absolute() else clf_dir / recorded


class Classifier:
    """A loaded classifier directory: its spec, head and embedding model."""

    def __init__(self, path: Path, spec: Spec, head: Head, embedder: Embedder) -> None:
        self.path, self.spec, self.head, self.embedder = path, spec, head, embedder
        self.labels = spec.labels

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: str | os.PathLike | None = None, device: Any = None,
             dtype: str | None = None, batch_size: int = 32) -> Classifier:
        """Verify a classifier directory, load its embedding model (`model` overrides the recorded
        path) and refuse it when its fingerprint is not the recorded one (module docstring)."""
        from .embed import Embedder, Pooling, fingerprint_mismatch

        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"no such classifier directory: {p}")
        if not is_classifier_dir(p):
            raise CheckpointError(f"{p} is not a classifier directory (no {MANIFEST} of kind {KIND!r}; "
                                  "`lmforge classify train` writes one)")
        problems = verify_manifest(p, KIND, (CLASSIFIER_HEAD,))
        if problems:
            raise CheckpointError("classifier refused: " + "; ".join(problems))
        spec = Spec.from_dict(read_manifest(p).fields.get("classifier"), str(p))
        head = Head.load(p / CLASSIFIER_HEAD)
        if head.weight.shape[0] != len(spec.labels):
            raise CheckpointError(f"{p}: the head has {head.weight.shape[0]} rows for {len(spec.labels)} labels")
        where = Path(model) if model is not None else embedding_model_path(p, spec)
        if not where.exists():
            raise CheckpointError(f"{p} was trained on the embedding model at {where}, which is gone; give its new "
                                  "place with --model PATH (it must be the same model: its checksum is checked)")
        recorded = spec.embedding["fingerprint"]
        pooling = Pooling.from_dict(recorded["pooling"]) if isinstance(recorded.get("pooling"), dict) else None
        emb = Embedder.load(where, pooling=pooling, device=device, dtype=dtype, batch_size=batch_size)
        diff = fingerprint_mismatch(recorded, emb.fingerprint())
        if diff:
            raise CheckpointError(f"{p} was trained on another embedding model than {where}: {diff}; use the model it "
                                  "was trained on (--model) or train a classifier on this one")
        if emb.dim != head.dim:
            raise CheckpointError(f"{p}: the head takes {head.dim}-dim vectors, {where} gives {emb.dim}")
        return cls(p, spec, head, emb)

    # ---- scores ---------------------------------------------------------------------------------

    def logits(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """(N, L) raw scores (before the temperature) of non-empty texts."""
        if not len(texts):
            return np.zeros((0, len(self.labels)))
        if self.spec.method == "zero-shot" and self.spec.scorer == "lm":
            from .zeroshot import lm_logits

            return lm_logits(self.embedder, texts, self.labels, self.spec.template or DEFAULT_TEMPLATE)
        x = self.embedder.embed(texts, kind="document", progress=progress)
        if self.spec.method == "zero-shot":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return self.head.logits(x)

    def probabilities(self, logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        t = self.spec.temperature if temperature is None else temperature
        return calibrate.probabilities(logits, t, self.spec.multi_label)

    def decide(self, probs: np.ndarray) -> list[tuple[str, ...]]:
        """Each item's predicted label(s): the argmax, or (multi-label) every label at or above its threshold."""
        if self.spec.multi_label:
            t = np.asarray(self.spec.label_thresholds, dtype=np.float64)
            return [tuple(lab for lab, hit in zip(self.labels, row >= t) if hit) for row in probs]
        return [(self.labels[int(i)],) for i in probs.argmax(axis=1)] if len(probs) else []

    def predict(self, texts: Sequence[str], *, min_confidence: float | None = None,
                ids: Sequence[str] | None = None, progress: bool = False) -> list[dict[str, Any]]:
        """One record per text (empty ones routed with no scores): see `record`."""
        keep = [i for i, t in enumerate(texts) if t.strip()]
        probs = self.probabilities(self.logits([texts[i] for i in keep], progress=progress))
        out: list[dict[str, Any]] = [self.empty_record() for _ in texts]
        for row, i in enumerate(keep):
            out[i] = self.record(probs[row], min_confidence)
        if ids is not None:
            for rec, ident in zip(out, ids):
                rec["id"] = ident
        return out

    def threshold(self, min_confidence: float | None) -> float:
        return self.spec.threshold if min_confidence is None else check_threshold(min_confidence)

    def record(self, probs: np.ndarray, min_confidence: float | None = None) -> dict[str, Any]:
        """{"label": where it goes, "predicted": the model's label (multi-label: list), "confidence",
        "routed", "scores": {label: calibrated probability}}."""
        conf = float(calibrate.confidence(probs[None, :], self.spec.multi_label)[0])
        routed = conf < self.threshold(min_confidence)
        decided = self.decide(probs[None, :])[0]
        predicted: str | list[str] = list(decided) if self.spec.multi_label else decided[0]
        return {"label": self.spec.fallback if routed else predicted, "predicted": predicted,
                "confidence": round(conf, 6), "routed": bool(routed),
                "scores": {lab: round(float(p), 6) for lab, p in zip(self.labels, probs)}}

    def empty_record(self) -> dict[str, Any]:
        return {"label": self.spec.fallback, "predicted": None, "confidence": 0.0, "routed": True, "scores": {},
                "empty": True}


__all__ = ["Classifier", "Spec", "KIND", "METHODS", "SCORERS", "DEFAULT_FALLBACK", "DEFAULT_TEMPLATE", "CALIBRATIONS",
           "DEFAULT_FOLDS", "CV_BELOW",
           "DEFAULT_ZERO_SHOT_T", "is_classifier_dir", "check_threshold", "embedding_model_path"]
