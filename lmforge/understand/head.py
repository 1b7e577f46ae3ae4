"""A logistic-regression head on frozen pooled embeddings: fitted in seconds, stored as safetensors.

Design
------
logits = ((x - mean) / scale) @ weight.T + bias, with x a (N, dim) embedding. The embeddings are
standardised per dimension first (mean and scale of the training vectors, stored with the head):
a causal language model's pooled states are anisotropic (every pair has cosine ~0.9 and a few
dimensions carry most of the norm), and an unscaled problem converges slowly and depends on C.

Fitting: full-batch L-BFGS (torch, fp64, strong-Wolfe line search) on

    mean cross-entropy (softmax; multi-label: binary cross-entropy per label, summed over labels)
    + ||weight||^2 / (2 C N)

which is scikit-learn's `LogisticRegression(C=C)` objective divided by N (the same minimiser; the
bias is not penalised). Deterministic on the CPU: no sampling, fixed iteration budget, fp64.
benchmarks/classify.py measures it against scikit-learn's lbfgs on the same features (time and
agreement of predictions); scikit-learn is not a dependency of lmforge.

File: head.safetensors holds `weight` (L, dim), `bias` (L,), `mean` (dim,), `scale` (dim,), fp32.
A zero-shot classifier stores its label vectors as `weight` (bias 0, mean 0, scale 1), so both
kinds run through `logits`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError

MAX_ITER = 500


@dataclass
class Head:
    weight: np.ndarray  # (L, dim) float32
    bias: np.ndarray  # (L,)
    mean: np.ndarray  # (dim,)
    scale: np.ndarray  # (dim,)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, dim) embeddings -> (N, L) float64 logits."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return z @ self.weight.T.astype(np.float64) + self.bias

    def save(self, path: str | os.PathLike) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), dtype=np.float32))
                   for k in ("weight", "bias", "mean", "scale")}, str(path), metadata={"format": "pt"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Head:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read the classifier head {path} ({e})") from None
        missing = {"weight", "bias", "mean", "scale"} - set(t)
        if missing:
            raise CheckpointError(f"{path}: the classifier head lacks {sorted(missing)}")
        w = t["weight"]
        if w.ndim != 2 or t["bias"].shape != (w.shape[0],) or t["mean"].shape != (w.shape[1],) or \
                t["scale"].shape != (w.shape[1],):
            raise CheckpointError(f"{path}: the classifier head's tensors do not fit together (weight {w.shape})")
        return cls(w, t["bias"], t["mean"], t["scale"])


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale (std, 1 where a dimension is constant)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-8, std, 1.0)


def fit_head(x: np.ndarray, targets: np.ndarray, n_labels: int, *, multi_label: bool, c: float = 1.0,
             max_iter: int = MAX_ITER) -> Head:
    """Fit the head (module docstring): single-label targets (N,) class indices, multi-label (N, L) 0/1."""
    import torch

    if c <= 0:
        raise ValueError(f"C must be > 0, got {c}")
    mean, scale = standardiser(x)
    z = torch.from_numpy((np.asarray(x, dtype=np.float64) - mean) / scale)  # (N, dim) fp64
    n, dim = z.shape
    w = torch.zeros(n_labels, dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    if multi_label:
        y = torch.as_tensor(np.asarray(targets, dtype=np.float64))
    else:
        y = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    lam = 1.0 / (c * n)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ w.T + b
        if multi_label:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / n
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        loss = loss + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Head(w.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32),
                mean.astype(np.float32), scale.astype(np.float32))


def out_of_fold_logits(x: np.ndarray, targets: np.ndarray, fold: np.ndarray, n_labels: int, *, multi_label: bool,
                       c: float = 1.0) -> np.ndarray:
    """Cross-fitted logits (N, L): item i's row comes from a head fitted (as `fit_head`, its own
    standardisation included) on every item whose fold differs from i's. `fold` (N,) holds each
    item's fold, -1 for an item that is always fitted on and never scored (its row stays NaN)."""
    fold = np.asarray(fold)
    out = np.full((len(x), n_labels), np.nan)
    for k in sorted(set(fold.tolist()) - {-1}):
        scored = fold == k
        head = fit_head(x[~scored], targets[~scored], n_labels, multi_label=multi_label, c=c)
        out[scored] = head.logits(x[scored])
    return out


__all__ = ["Head", "fit_head", "standardiser", "out_of_fold_logits"]
