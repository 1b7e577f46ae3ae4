"""The planner: the model size and token budget that reach a target loss at the least training +
inference cost (Sardana et al. 2024, "Beyond Chinchilla-Optimal", arXiv 2401.00448).

The Chinchilla-optimal model minimises *training* compute only; a model that will serve D_inf
tokens should minimise

    training + inference  =  6 N D_train  +  2 N D_inf          (FLOPs)

subject to L(N, D_train) = target. For a fixed target, the law gives D_train as a function of N
(laws.py `tokens_for_loss`, finite only above the N at which the model term alone uses up the
loss budget), so planning is a one-dimensional minimisation over log N: a dense grid, then a
golden-section refinement. Dollars are the same problem with each kind of FLOP divided by its own
achieved utilisation (training, prefill, decode) and multiplied by the price of a GPU-hour; only
the utilisation ratios move the optimum, the price scales it. Utilisation factors are inputs with
stated defaults, not measurements.

`make_plan` then turns the recommended N into a concrete architecture, its deployment footprint
and a training config (architecture.py), and says in `warnings` where the figures rest on
extrapolation or the data cannot support the plan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import Config, ModelConfig
from ..errors import ConfigError, LmforgeError
from ..hardware import HARDWARE, Hardware
from ..model import flops_per_token, num_params
from ..util import human_bytes, human_count
from .architecture import choose_architecture, deployment, training_config
from .laws import LAWS, REPEAT_DECAY, LossLaw, tokens_for_effective

# ---- costs of one candidate ----------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """How FLOPs turn into GPU-hours and dollars.

    Decode is memory-bound: at batch b a decode step does 2 N b FLOPs while reading 2 N bytes of
    weights, so its utilisation is about b * bandwidth / peak (~0.34 % per sequence in the batch
    on an H100); 0.1 corresponds to ~30 concurrent sequences. Prefill is a large matmul like
    training.
    """

    train_mfu: float = 0.4
    prefill_mfu: float = 0.5
    decode_mfu: float = 0.1
    prefill_fraction: float = 0.5  # share of inference tokens that are prompt (prefill) tokens
    price_per_gpu_hour: float | None = None

    def validate(self) -> None:
        for k in ("train_mfu", "prefill_mfu", "decode_mfu"):
            v = getattr(self, k)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"--{k.replace('_', '-')} must be within (0, 1], got {v}")
        if not 0.0 <= self.prefill_fraction <= 1.0:
            raise ConfigError(f"--prefill-fraction must be within [0, 1], got {self.prefill_fraction}")
        if self.price_per_gpu_hour is not None and self.price_per_gpu_hour < 0:
            raise ConfigError(f"--price-per-gpu-hour must be >= 0, got {self.price_per_gpu_hour}")


@dataclass
class Candidate:
    n_params: float
    train_tokens: float  # tokens actually trained on (repeats included)
    effective_tokens: float  # what the law sees (== train_tokens unless data-constrained)
    tokens_per_param: float
    train_flops: float
    inference_flops: float
    train_gpu_hours: float
    inference_gpu_hours: float
    train_cost: float | None
    inference_cost: float | None
    loss: float
    epochs: float | None = None  # train_tokens / unique tokens, when known
    label: str = ""

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops

    @property
    def total_gpu_hours(self) -> float:
        return self.train_gpu_hours + self.inference_gpu_hours

    @property
    def total_cost(self) -> float | None:
        if self.train_cost is None or self.inference_cost is None:
            return None
        return self.train_cost + self.inference_cost

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(total_flops=self.total_flops, total_gpu_hours=self.total_gpu_hours, total_cost=self.total_cost)
        return out


def _figures(
    law: LossLaw, n: Any, target: float, inference_tokens: float, hardware: Hardware, costs: CostModel,
    unique: float | None,
) -> dict[str, Any]:
    """Every figure of a candidate, vectorised over sizes n (inf where the target is out of reach).

    The one place the cost model lives: the optimiser and the table both read it.
    """
    n = np.asarray(n, dtype=np.float64)
    effective = law.tokens_for_loss(n, target)  # what the law needs
    tokens = effective if unique is None else tokens_for_effective(effective, unique)  # what we train on
    train_flops = 6.0 * n * tokens
    prefill = 2.0 * n * inference_tokens * costs.prefill_fraction
    decode = 2.0 * n * inference_tokens * (1 - costs.prefill_fraction)
    train_hours = train_flops / (hardware.peak_flops * costs.train_mfu) / 3600
    inference_hours = (prefill / costs.prefill_mfu + decode / costs.decode_mfu) / hardware.peak_flops / 3600
    return {
        "tokens": tokens, "effective": effective, "train_flops": train_flops,
        "inference_flops": prefill + decode, "train_hours": train_hours, "inference_hours": inference_hours,
    }


def _objective(
    law: LossLaw, n: np.ndarray, target: float, inference_tokens: float, hardware: Hardware,
    costs: CostModel, unique: float | None, objective: str,
) -> np.ndarray:
    """Total FLOPs or total device-hours over an array of sizes n; inf where infeasible."""
    f = _figures(law, n, target, inference_tokens, hardware, costs, unique)
    if objective == "flops":
        return f["train_flops"] + f["inference_flops"]
    return f["train_hours"] + f["inference_hours"]


def evaluate(
    law: LossLaw, n: float, target: float, inference_tokens: float, hardware: Hardware, costs: CostModel,
    unique: float | None = None, label: str = "",
) -> Candidate:
    """All the figures for a model of n parameters trained to reach `target`."""
    f = {k: float(v) for k, v in _figures(law, n, target, inference_tokens, hardware, costs, unique).items()}
    price = costs.price_per_gpu_hour
    return Candidate(
        n_params=float(n),
        train_tokens=f["tokens"],
        effective_tokens=f["effective"],
        tokens_per_param=f["tokens"] / n,
        train_flops=f["train_flops"],
        inference_flops=f["inference_flops"],
        train_gpu_hours=f["train_hours"],
        inference_gpu_hours=f["inference_hours"],
        train_cost=None if price is None else f["train_hours"] * price,
        inference_cost=None if price is None else f["inference_hours"] * price,
        loss=float(law.loss(n, f["effective"])),
        epochs=None if unique is None else f["tokens"] / unique,
        label=label,
    )


def optimal_params(
    law: LossLaw, target: float, inference_tokens: float, hardware: Hardware, costs: CostModel,
    unique: float | None = None, objective: str = "flops",
) -> float:
    """argmin over N of the objective subject to L(N, D_train(N)) = target.

    The objective is smooth and unimodal in log N (training cost falls towards +inf as N shrinks
    to the minimum size, inference cost grows linearly in N), so a log grid brackets the minimum
    and golden-section search refines it to ~1e-9 relative.
    """
    n_min = law.min_params(target)
    log_n = np.linspace(math.log(n_min) + 1e-6, math.log(n_min) + math.log(1e6), 4001)
    values = _objective(law, np.exp(log_n), target, inference_tokens, hardware, costs, unique, objective)
    if not np.isfinite(values).any():
        raise LmforgeError("no model size reaches the target loss with the data available")
    i = int(np.argmin(values))
    lo, hi = log_n[max(i - 1, 0)], log_n[min(i + 1, len(log_n) - 1)]
    f = lambda x: float(_objective(law, np.exp(np.array([x])), target, inference_tokens, hardware, costs, unique, objective)[0])  # noqa: E731
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = f(c), f(d)
    for _ in range(100):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = f(d)
        if hi - lo < 1e-10:
            break
    return math.exp((lo + hi) / 2)


# ---- the plan --------------------------------------------------------------------------------


@dataclass
class Plan:
    law: LossLaw
    hardware: Hardware
    costs: CostModel
    objective: str
    target_loss: float
    quality_of: float | None
    inference_tokens: float
    unique_tokens: float | None
    recommended: Candidate
    chinchilla: Candidate
    candidates: list[Candidate]
    architecture: ModelConfig
    architecture_params: int
    architecture_flops_per_token: float
    deployment: dict[str, Any]
    config: Config
    warnings: list[str] = field(default_factory=list)

    @property
    def saving(self) -> float:
        """Fraction of the Chinchilla-optimal model's total (FLOPs or GPU-hours) saved."""
        rec, chin = self.recommended, self.chinchilla
        if self.objective == "flops":
            return 1.0 - rec.total_flops / chin.total_flops
        return 1.0 - rec.total_gpu_hours / chin.total_gpu_hours

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": self.law.to_dict(),
            "hardware": asdict(self.hardware),
            "costs": asdict(self.costs),
            "objective": self.objective,
            "target_loss": self.target_loss,
            "quality_of": self.quality_of,
            "inference_tokens": self.inference_tokens,
            "unique_tokens": self.unique_tokens,
            "recommended": self.recommended.to_dict(),
            "chinchilla": self.chinchilla.to_dict(),
            "saving": self.saving,
            "candidates": [c.to_dict() for c in self.candidates],
            "architecture": asdict(self.architecture),
            "architecture_params": self.architecture_params,
            "architecture_flops_per_token": self.architecture_flops_per_token,
            "deployment": self.deployment,
            "config": self.config.to_dict(),
            "warnings": self.warnings,
        }


def make_plan(
    *,
    target_loss: float | None = None,
    quality_of: float | None = None,
    inference_tokens: float = 0.0,
    unique_tokens: float | None = None,
    law: LossLaw = LAWS["besiroglu"],
    hardware: Hardware = HARDWARE["h100"],
    costs: CostModel = CostModel(),
    objective: str | None = None,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    batch: int = 1,
) -> Plan:
    """Recommend N and D_train minimising training + inference for a target loss."""
    target = _target(law, target_loss, quality_of)
    objective = _check_inputs(inference_tokens, unique_tokens, vocab_size, seq_len, batch, costs, objective)
    if unique_tokens is not None:
        _check_data_suffices(law, target, unique_tokens)
    figures = (target, inference_tokens, hardware, costs, unique_tokens)
    n_best = optimal_params(law, target, inference_tokens, hardware, costs, unique_tokens, objective)
    rec = evaluate(law, n_best, *figures, "recommended")
    # The Chinchilla-optimal model of the same quality: training compute alone minimised.
    n_chin = optimal_params(law, target, 0.0, hardware, costs, unique_tokens, "flops")
    chin = evaluate(law, n_chin, *figures, "chinchilla-optimal")
    candidates = [rec, chin]
    for scale in (0.5, 0.7, 1.4, 2.0):  # neighbours, to show how flat the optimum is
        n = n_best * scale
        if n > law.min_params(target) * 1.05:
            c = evaluate(law, n, *figures, f"{scale:g}x")
            if math.isfinite(c.train_tokens):
                candidates.append(c)
    candidates.sort(key=lambda c: c.n_params)

    arch = choose_architecture(rec.n_params, vocab_size, seq_len)
    arch_params = num_params(arch)
    dep = deployment(arch, hardware, seq_len, batch)
    return Plan(
        law=law, hardware=hardware, costs=costs, objective=objective, target_loss=target,
        quality_of=quality_of, inference_tokens=inference_tokens, unique_tokens=unique_tokens,
        recommended=rec, chinchilla=chin, candidates=candidates, architecture=arch,
        architecture_params=arch_params, architecture_flops_per_token=flops_per_token(arch, seq_len),
        deployment=dep, config=training_config(arch, rec.train_tokens, seq_len),
        warnings=_law_warnings(rec, unique_tokens) + _model_warnings(rec, arch, arch_params, dep, hardware),
    )


def _target(law: LossLaw, target_loss: float | None, quality_of: float | None) -> float:
    """The loss to reach: given, or that of a Chinchilla-optimal model of `quality_of` parameters."""
    if (target_loss is None) == (quality_of is None):
        raise ConfigError(
            "give exactly one target: --target-loss LOSS (e.g. 2.3) or --quality-of N "
            "(the loss of a Chinchilla-optimal model with N parameters, e.g. 7e9)"
        )
    if quality_of is not None:
        if not quality_of > 0:
            raise ConfigError(f"--quality-of must be a positive parameter count, got {quality_of}")
        target = law.quality_of(quality_of)
    else:
        target = float(target_loss)  # type: ignore[arg-type]
    if not target > law.E:
        raise ConfigError(
            f"target loss {target:g} is at or below the irreducible loss E = {law.E:g} of the "
            f"{law.name} law: no model reaches it. Aim higher than {law.E:g}, or give --quality-of N"
        )
    return target


def _check_inputs(
    inference_tokens: float, unique_tokens: float | None, vocab_size: int, seq_len: int, batch: int,
    costs: CostModel, objective: str | None,
) -> str:
    """Refuse impossible inputs; returns the objective (cost when a price is given, else flops)."""
    if inference_tokens < 0:
        raise ConfigError(f"--inference-tokens must be >= 0, got {inference_tokens:g}")
    if unique_tokens is not None and not unique_tokens > 0:
        raise ConfigError(f"--unique-tokens must be > 0, got {unique_tokens:g}")
    if vocab_size <= 0 or seq_len <= 0 or batch <= 0:
        raise ConfigError("--vocab-size, --seq-len and --batch must be > 0")
    costs.validate()
    objective = objective or ("cost" if costs.price_per_gpu_hour is not None else "flops")
    if objective not in ("flops", "cost"):
        raise ConfigError(f"--objective must be flops or cost, got {objective!r}")
    return objective


def _check_data_suffices(law: LossLaw, target: float, unique_tokens: float) -> None:
    """The best the data can ever be worth is U (1 + R*); the largest models need the least."""
    most = unique_tokens * (1 + REPEAT_DECAY)
    least = float(law.tokens_for_loss(law.min_params(target) * 1e6, target))
    if least >= most:
        raise LmforgeError(
            f"{human_count(unique_tokens)} unique tokens cannot reach loss {target:.4g}: even a "
            f"huge model needs ~{human_count(least)} effective tokens and repeating data is worth "
            f"at most {human_count(most)} (Muennighoff et al. 2023). Get more unique data or aim "
            f"for a higher loss"
        )


def _law_warnings(rec: Candidate, unique_tokens: float | None) -> list[str]:
    """Where the recommendation leans on repeated data or lies outside the laws' fitted range."""
    out = []
    if unique_tokens is not None and rec.train_tokens > unique_tokens:
        out.append(
            f"data-constrained: training on {human_count(rec.train_tokens)} tokens is "
            f"{rec.train_tokens / unique_tokens:.1f} epochs of your {human_count(unique_tokens)} unique "
            f"tokens; repeated tokens are worth less (Muennighoff et al. 2023, R* = {REPEAT_DECAY}), so "
            f"the plan trains on {human_count(rec.train_tokens)} tokens to be worth "
            f"{human_count(rec.effective_tokens)} fresh ones"
        )
        if rec.epochs and rec.epochs > 4:
            out.append("beyond ~4 epochs returns fall quickly; more unique data would cut the cost")
    if rec.tokens_per_param > 500:
        out.append(
            f"{rec.tokens_per_param:.0f} tokens/parameter is far outside the ~1-100 range the published "
            "laws were fitted on; Sardana et al. 2024 saw quality keep improving up to 10,000, but treat "
            "the figures as an extrapolation, or fit the law to your own runs (lmforge plan fit)"
        )
    return out


def _model_warnings(
    rec: Candidate, arch: ModelConfig, arch_params: int, dep: dict[str, Any], hardware: Hardware
) -> list[str]:
    """Where the concrete model differs from the recommendation or does not fit one device."""
    out = []
    if abs(arch_params / rec.n_params - 1) > 0.1:
        out.append(
            f"no architecture with vocabulary {arch.vocab_size} comes within 10% of {human_count(rec.n_params)} "
            f"parameters; the nearest has {human_count(arch_params)}"
        )
    embedding = arch.vocab_size * arch.d_model
    if embedding > 0.5 * arch_params:
        out.append(
            f"the token embedding is {embedding / arch_params:.0%} of this model's parameters; the law "
            "counts them all, but they add little capacity: a smaller vocabulary (--vocab-size, and "
            "the same at lmforge prepare) leaves more for the layers"
        )
    if dep["devices_needed"] and dep["devices_needed"] > 1:
        out.append(
            f"weights + KV cache ({human_bytes(dep['total_bytes'])}) exceed one {hardware.name}'s "
            f"memory ({human_bytes(hardware.memory)}): serving needs {dep['devices_needed']} devices"
        )
    return out
