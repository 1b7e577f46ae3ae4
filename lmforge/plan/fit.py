"""`plan fit`: the five constants of a loss law fitted to the user's own runs.

A run directory gives one point (N, D, final loss): N from its config.yaml through the model code,
D and the loss from its metrics.jsonl. The fit follows Hoffmann et al. and Besiroglu et al. 2024
("Chinchilla Scaling: A replication attempt"): Huber loss (delta 1e-3) between log L and the
log-sum-exp form of the law, BFGS from the best points of a grid of initialisations, and a
bootstrap over runs for the uncertainty of each constant. `_fit_warnings` says when the runs do
not pin the law down, rather than printing confident nonsense.

Trade-off. The fit uses scipy's BFGS with an analytic numpy gradient. With five parameters the
limited-memory variant the papers name (L-BFGS) buys nothing, and scipy's L-BFGS-B was up to 20x
slower on a busy machine (OpenBLAS threads spinning on tiny vectors). torch.optim.LBFGS was tried
first, torch being a dependency already, but its per-step autograd overhead made a 100-replicate
bootstrap take minutes; this way a fit with bootstrap takes about a second.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import CONFIG_FILE, METRICS_FILE
from ..config import load_config
from ..errors import ConfigError
from ..jsonl import as_number, read_records
from ..model import num_params
from .laws import LossLaw


@dataclass(frozen=True)
class RunPoint:
    name: str
    n_params: float
    tokens: float
    loss: float


def read_run(run_dir: str | os.PathLike) -> RunPoint:
    """(N, D, final loss) of a run directory: config.yaml + metrics.jsonl.

    The loss is the last finite validation loss, else the last finite training loss (a NaN the
    guard rolled back is not the run's result); D is the largest `tokens` value logged (else
    steps x global batch x seq_len). Lines that do not parse (one torn by a crash) are skipped.
    """
    run = Path(run_dir)
    cfg_path, log_path = run / CONFIG_FILE, run / METRICS_FILE
    if not cfg_path.is_file():
        raise ConfigError(f"{run}: no config.yaml; is this a run directory (runs/<name>/)?")
    if not log_path.is_file():
        raise ConfigError(f"{run}: no metrics.jsonl; has the run logged any steps?")
    cfg = load_config(cfg_path)
    val_loss = train_loss = None
    tokens = 0.0
    step = 0
    for rec in read_records(log_path):
        val, loss, seen = as_number(rec.get("val_loss")), as_number(rec.get("loss")), as_number(rec.get("tokens"))
        if val is not None and math.isfinite(val):
            val_loss = val
        if loss is not None and math.isfinite(loss):
            train_loss = loss
        if seen is not None and math.isfinite(seen):
            tokens = max(tokens, seen)
        if isinstance(rec.get("step"), int):
            step = max(step, rec["step"])
    loss = val_loss if val_loss is not None else train_loss
    if loss is None or loss <= 0:
        raise ConfigError(f"{log_path}: no finite loss or val_loss logged")
    if tokens <= 0:
        tokens = float(step * cfg.train.global_batch * cfg.data.seq_len)
    if tokens <= 0:
        raise ConfigError(f"{log_path}: no tokens or steps logged")
    return RunPoint(run.name, float(num_params(cfg.model)), tokens, loss)


def expand_runs(patterns: list[str]) -> list[Path]:
    """Run directories from paths or globs (shells on some systems do not expand them)."""
    out: list[Path] = []
    for p in patterns:
        matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        if not matches:
            raise ConfigError(f"no run directories match {p!r}")
        out.extend(Path(m) for m in matches)
    return out


@dataclass
class Fit:
    law: LossLaw
    points: list[RunPoint]
    objective: float
    bootstrap: dict[str, dict[str, float]]  # constant -> {std, p05, p95}
    residual_rms: float  # RMS of log L residuals
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": self.law.to_dict(),
            "bootstrap": self.bootstrap,
            "residual_rms_log_loss": self.residual_rms,
            "warnings": self.warnings,
            "objective": self.objective,
            "runs": [asdict(p) for p in self.points],
        }


_HUBER_DELTA = 1e-3


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[Any, np.ndarray]:
    """Sum over runs of Huber(log-sum-exp form of the law - log L), and its gradient.

    theta = (log A, log B, log E, alpha, beta), shape (5,) or (K, 5) for a batch of candidates;
    run data shape (P,). Returns the objective, shape () or (K,), and the gradient, like theta.
    In log space the law is log L = LSE(log A - alpha log N, log B - beta log D, log E), which
    keeps A and B (up to ~1e10) on the same footing as the exponents.
    """
    a, b, e, alpha, beta = (x[..., None] for x in np.moveaxis(theta, -1, 0))  # each (..., 1)
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e), axis=-1)  # (..., P, 3)
    top = terms.max(axis=-1, keepdims=True)
    weights = np.exp(terms - top)
    total = weights.sum(axis=-1)  # (..., P)
    pred = top[..., 0] + np.log(total)  # (..., P)
    weights /= total[..., None]  # softmax = d pred / d term
    r = pred - log_l
    value = np.where(np.abs(r) <= _HUBER_DELTA, 0.5 * r * r, _HUBER_DELTA * (np.abs(r) - 0.5 * _HUBER_DELTA)).sum(-1)
    g = np.clip(r, -_HUBER_DELTA, _HUBER_DELTA)  # (..., P): d huber / d pred
    grad = np.stack([
        (g * weights[..., 0]).sum(-1),
        (g * weights[..., 1]).sum(-1),
        (g * weights[..., 2]).sum(-1),
        -(g * weights[..., 0] * log_n).sum(-1),
        -(g * weights[..., 1] * log_d).sum(-1),
    ], axis=-1)
    return value, grad


def _init_grid() -> np.ndarray:
    """Hoffmann et al.'s grid of initialisations, (4500, 5): (log A, log B, log E, alpha, beta)."""
    axes = [
        np.arange(0.0, 30.0, 5.0),  # log A
        np.arange(0.0, 30.0, 5.0),  # log B
        np.arange(-1.0, 1.5, 0.5),  # log E
        np.arange(0.0, 2.5, 0.5),  # alpha
        np.arange(0.0, 2.5, 0.5),  # beta
    ]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 5)


def _fit_once(data: tuple[np.ndarray, np.ndarray, np.ndarray], inits: np.ndarray, keep: int) -> tuple[np.ndarray, float]:
    """Best (theta, objective) from BFGS started at the `keep` best initialisations."""
    from scipy.optimize import minimize

    start, _ = _huber_objective(inits, *data)  # (K,): one vectorised pass over the grid
    best_theta, best_value = inits[int(np.argmin(start))], math.inf
    for k in np.argsort(start)[:keep]:
        res = minimize(
            _huber_objective, inits[k], args=data, jac=True, method="BFGS",
            options={"maxiter": 2000, "gtol": 1e-12},
        )
        if np.isfinite(res.fun) and res.fun < best_value:
            best_theta, best_value = res.x, float(res.fun)
    return best_theta, best_value


def fit_law(points: list[RunPoint], bootstrap: int = 100, seed: int = 0, name: str = "fitted") -> Fit:
    """Fit E, A, B, alpha, beta to runs; bootstrap over runs for the spread of each constant."""
    if len(points) < 5:
        raise ConfigError(
            f"fitting five constants needs at least 5 runs (have {len(points)}); train a sweep over "
            "a few model sizes and token counts"
        )
    if len({round(p.n_params) for p in points}) < 2 or len({round(p.tokens) for p in points}) < 2:
        raise ConfigError(
            "the runs must differ in both model size and tokens trained, or alpha and beta cannot "
            "be told apart; add runs with other sizes or step counts"
        )
    data = tuple(np.log([[p.n_params, p.tokens, p.loss] for p in points]).T)  # 3 x (P,)
    grid = _init_grid()
    theta, value = _fit_once(data, grid, keep=5)

    def as_law(t: np.ndarray) -> LossLaw:
        a, b, e, alpha, beta = (float(x) for x in t)
        return LossLaw(name, math.exp(e), math.exp(a), math.exp(b), alpha, beta, f"fit to {len(points)} runs")

    law = as_law(theta)
    # Resample runs with replacement and refit, starting from the fit
    rng = np.random.default_rng(seed)
    samples: list[LossLaw] = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(points), len(points))
        t, _ = _fit_once(tuple(x[idx] for x in data), theta[None, :], keep=1)
        samples.append(as_law(t))
    spread: dict[str, dict[str, float]] = {}
    for k in ("E", "A", "B", "alpha", "beta"):
        vals = np.array([getattr(s, k) for s in samples]) if samples else np.array([getattr(law, k)])
        spread[k] = {
            "std": float(vals.std()),
            "p05": float(np.percentile(vals, 5)),
            "p95": float(np.percentile(vals, 95)),
        }
    residuals = np.log(law.loss(np.exp(data[0]), np.exp(data[1]))) - data[2]
    rms = float(np.sqrt(np.mean(np.square(residuals))))
    return Fit(law, sorted(points, key=lambda p: (p.n_params, p.tokens)), value, spread, rms, _fit_warnings(law, spread, rms, points))


def _fit_warnings(law: LossLaw, spread: dict[str, dict[str, float]], rms: float, points: list[RunPoint]) -> list[str]:
    """Say when the runs do not pin the law down, instead of printing confident nonsense."""
    out = []
    if law.E < 0.05 * min(p.loss for p in points):
        out.append(
            f"E collapsed to {law.E:.3g}: the runs show no loss floor yet (models too small or runs too "
            "short), so predictions far from them are unreliable; add larger and longer runs"
        )
    for k in ("alpha", "beta"):
        lo, hi = spread[k]["p05"], spread[k]["p95"]
        if hi - lo > 0.25:
            out.append(f"{k} is poorly determined (90% bootstrap interval {lo:.3g} .. {hi:.3g}); "
                       "add runs spanning a wider range of " + ("sizes" if k == "alpha" else "token counts"))
    if rms > 0.05:
        out.append(f"the law misses the runs by {rms:.1%} (RMS, log loss); check for diverged or unfinished runs")
    return out
