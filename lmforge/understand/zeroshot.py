"""Zero-shot scores: no examples, only the label names (and descriptions).

- `label_vectors`: each label embedded as a query ("name: description", or the name), L2-normalised;
  a text's scores are its cosine with each (classify.py), the same product a retrieval query makes.
- `lm_logits`: the language model's log-likelihood of " " + label name after the template filled
  with the text, built and scored exactly as `lmforge eval` scores a multiple-choice item
  (evaluate/tasks.py `encode_request`: whitespace moves to the continuation; evaluate/score.py's
  packed scorer: the text is encoded once per item and every label is scored in the same row).
  The summed log-probability favours short label names; the temperature fitted on held-out data
  does not change that ranking, so name labels alike (one word each) or use the embedding scorer.

This module imports evaluate/ (for the lm scorer only); the server never loads it (classify.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from .embed import Embedder
    from .labelled import Label


def label_text(label: Label) -> str:
    return f"{label.name}: {label.description}" if label.description else label.name


def label_vectors(embedder: Embedder, labels: Sequence[Label]) -> np.ndarray:
    """(L, dim) unit vectors of the labels, embedded as queries."""
    v = embedder.embed([label_text(lab) for lab in labels], kind="query")
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def check_template(template: str) -> str:
    if template.count("{text}") != 1:
        raise ConfigError(f"--template must hold {{text}} once (where the text goes), got {template!r}")
    return template


def lm_logits(embedder: Embedder, texts: Sequence[str], labels: Sequence[str], template: str, *,
              batch_size: int = 8) -> np.ndarray:
    """(N, L) log P(" " + label | template(text)) under the embedder's language model (module docstring)."""
    import torch

    from ..evaluate.score import make_request, score_packed
    from ..evaluate.tasks import encode_request

    model, tok = embedder.model, embedder.tokenizer
    max_len = model.cfg.max_seq_len
    requests = []
    for i, text in enumerate(texts):
        ctx, conts = encode_request(tok, check_template(template).replace("{text}", text), [" " + lab for lab in labels])
        requests.append(make_request(ctx, conts, max_len, f"text {i}"))
    out = np.empty((len(texts), len(labels)), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(requests), 64):  # bounded memory: 64 items' rows at a time
            scores = score_packed(model, requests[start : start + 64], batch_size=batch_size)
            for k, row in enumerate(scores):
                out[start + k] = [s.logprob for s in row]
    return out


__all__ = ["label_vectors", "label_text", "lm_logits", "check_template"]
