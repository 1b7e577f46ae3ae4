"""Loss laws: L(N, D) = E + A / N^alpha + B / D^beta, the published constants, and the
data-constrained correction for repeated tokens.

A law (Hoffmann et al. 2022, "Chinchilla") predicts the final loss of a model with N parameters
trained on D tokens. Everything here is closed-form arithmetic on numpy arrays, so the planner
(sizing.py) can evaluate thousands of candidate sizes at once.

Repeated data (training on more tokens than the unique tokens available) follows Muennighoff et
al. 2023 ("Scaling Data-Constrained Language Models", arXiv 2305.16264): repeated tokens are worth
less, so reaching an effective D takes more (repeated) tokens, and beyond ~R* = 15.4 extra epochs
the returns vanish: `tokens_for_effective` says +inf there and the planner refuses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..ranges import positive_float


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta; N counts all parameters (embeddings included)."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n: Any, d: Any) -> Any:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def tokens_for_loss(self, n: Any, target: float) -> Any:
        """D with L(n, D) = target; +inf where the model term alone already exceeds the budget."""
        n = np.asarray(n, dtype=np.float64)
        room = target - self.E - self.A / np.power(n, self.alpha)  # loss left for the data term
        safe = np.where(room > 0, room, 1.0)
        return np.where(room > 0, np.power(self.B / safe, 1.0 / self.beta), np.inf)

    def min_params(self, target: float) -> float:
        """The N below which no amount of data reaches `target` (A / N^alpha = target - E)."""
        return (self.A / (target - self.E)) ** (1.0 / self.alpha)

    def chinchilla_tokens(self, n: Any) -> Any:
        """Training-compute-optimal D for a model of n parameters (C = 6 N D).

        Minimising L at fixed C gives alpha A / N^alpha = beta B / D^beta, i.e.
        D = (beta B / (alpha A))^(1/beta) * N^(alpha/beta).
        """
        return (self.beta * self.B / (self.alpha * self.A)) ** (1.0 / self.beta) * np.power(
            n, self.alpha / self.beta
        )

    def chinchilla_optimal(self, compute: float) -> tuple[float, float]:
        """(N, D) minimising L at training compute `compute` = 6 N D (Hoffmann et al. eq. 4)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * (compute / 6.0) ** (b / (a + b))
        return float(n), float(compute / (6.0 * n))

    def quality_of(self, n: float) -> float:
        """The loss of a Chinchilla-optimal model with n parameters."""
        return float(self.loss(n, self.chinchilla_tokens(n)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LAWS: dict[str, LossLaw] = {
    # Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI), the refit of
    # Hoffmann et al.'s approach 3 on the data read off their figure. Default.
    "besiroglu": LossLaw("besiroglu", 1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024 (Epoch AI refit)"),
    # Hoffmann et al. 2022, eq. 10 as printed.
    "hoffmann": LossLaw("hoffmann", 1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, eq. 10"),
    # The Chinchilla constants with the unrounded exponents that Sardana et al. 2024 use.
    "sardana": LossLaw("sardana", 1.69, 406.4, 410.7, 0.336, 0.283, "Sardana et al. 2024 (Chinchilla constants)"),
}
LAWS["epoch"] = LAWS["besiroglu"]


def load_law(spec: str) -> LossLaw:
    """A law by name (besiroglu, epoch, hoffmann, sardana) or a JSON file from `plan fit --save`."""
    if spec in LAWS:
        return LAWS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"--law {spec!r} is neither a known law ({', '.join(sorted(LAWS))}) nor a file; "
            "write one with `lmforge plan fit RUN_DIR... --save law.json`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw = raw.get("law", raw)
        law = LossLaw(
            name=str(raw.get("name", path.stem)),
            E=float(raw["E"]), A=float(raw["A"]), B=float(raw["B"]),
            alpha=float(raw["alpha"]), beta=float(raw["beta"]),
            source=str(raw.get("source", str(path))),
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as e:
        raise ConfigError(f"{path}: not a loss-law JSON with E, A, B, alpha, beta ({e or 'nested too deeply'})") from None
    for k in ("E", "A", "B", "alpha", "beta"):  # L(N, D) = E + A / N^alpha + B / D^beta: each a number > 0
        positive_float().check(f"{path}: {k}", getattr(law, k))
    return law


# ---- data-constrained correction (Muennighoff et al. 2023) ---------------------------------------

# R*_D: the number of extra epochs after which repeated data has lost 1 - 1/e of its value.
REPEAT_DECAY = 15.4


def effective_tokens(tokens: Any, unique: float) -> Any:
    """D' = U + U R* (1 - exp(-R / R*)) with R = D / U - 1 repetitions beyond the first epoch."""
    tokens = np.asarray(tokens, dtype=np.float64)
    repeats = np.maximum(tokens / unique - 1.0, 0.0)
    return np.where(
        tokens <= unique, tokens, unique + unique * REPEAT_DECAY * (1.0 - np.exp(-repeats / REPEAT_DECAY))
    )


def tokens_for_effective(effective: Any, unique: float) -> Any:
    """The inverse of `effective_tokens`: tokens to train on (repeating) to be worth `effective`.

    +inf when effective >= U (1 + R*): repetition alone can never get there.
    """
    effective = np.asarray(effective, dtype=np.float64)
    frac = (effective / unique - 1.0) / REPEAT_DECAY
    ok = frac < 1.0
    repeats = -REPEAT_DECAY * np.log1p(-np.where(ok, np.maximum(frac, 0.0), 0.0))
    return np.where(effective <= unique, effective, np.where(ok, unique * (1.0 + repeats), np.inf))
