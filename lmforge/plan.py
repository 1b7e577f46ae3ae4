"""Scaling laws and inference-aware sizing: `lmforge plan` and `lmforge plan fit`.

Design. A loss law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "Chinchilla")
predicts the final loss of a model with N parameters trained on D tokens. Sardana et al. 2024
("Beyond Chinchilla-Optimal", arXiv 2401.00448) point out that the Chinchilla-optimal model
minimises *training* compute only; a model that will serve D_inf tokens should minimise

    training + inference  =  6 N D_train  +  2 N D_inf          (FLOPs)

subject to L(N, D_train) = target. For a fixed target, the law gives D_train as a function of N
(D_train(N) = (B / (target - E - A / N^alpha))^(1/beta), finite only above the N at which the
model term alone uses up the loss budget), so planning is a one-dimensional minimisation over
log N: a dense grid, then a golden-section refinement. Dollars are the same problem with each
kind of FLOP divided by its own achieved utilisation (training, prefill, decode) and multiplied
by the price of a GPU-hour; only the utilisation ratios move the optimum, the price scales it.

From the recommended N we pick a concrete architecture whose exact parameter count comes from
`lmforge.model.num_params` (never recounted here), show its deployment footprint (weights,
KV cache, the memory-bandwidth ceiling on single-stream decode), and can write a training config
for it with a token budget, batch size and learning rate derived from the compute.

`plan fit` fits the five constants to the user's own runs (run directories with config.yaml and
metrics.jsonl) the way Hoffmann et al. and Besiroglu et al. 2024 ("Chinchilla Scaling: A
replication attempt") did: Huber loss (delta 1e-3) between log L and the log-sum-exp form of the
law, BFGS from the best points of a grid of initialisations, and a bootstrap over runs for the
uncertainty.

Trade-offs.
- The fit uses scipy's BFGS with an analytic numpy gradient. With five parameters the limited-
  memory variant the papers name (L-BFGS) buys nothing, and scipy's L-BFGS-B was up to 20x
  slower on a busy machine (OpenBLAS threads spinning on tiny vectors). torch.optim.LBFGS was
  tried first, torch being a dependency already, but its per-step autograd overhead made a
  100-replicate bootstrap take minutes; this way a fit with bootstrap takes about a second.
- Repeated data (D_train beyond the unique tokens available) is handled with the data-constrained
  law of Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", arXiv 2305.16264):
  repeated tokens are worth less, so the plan trains on more (repeated) tokens to reach the same
  effective D, and refuses when no amount of repetition gets there (beyond ~R* = 15.4 extra
  epochs the returns vanish).
- Hardware peaks are nominal datasheet numbers (dense bf16); utilisation factors are flags with
  stated defaults, not measurements. `cpu` is measured on the spot in well under two seconds.
- Training config heuristics (batch size and peak learning rate as power laws of compute) follow
  DeepSeek LLM (Bi et al. 2024, arXiv 2401.02954); they are starting points, not tuned values.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from .errors import ConfigError, LmforgeError
from .util import atomic_write_text, human_bytes, human_count

# ---- the loss law ------------------------------------------------------------------------------


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
        return LossLaw(
            name=str(raw.get("name", path.stem)),
            E=float(raw["E"]), A=float(raw["A"]), B=float(raw["B"]),
            alpha=float(raw["alpha"]), beta=float(raw["beta"]),
            source=str(raw.get("source", str(path))),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a loss-law JSON with E, A, B, alpha, beta ({e})") from None


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


# ---- hardware ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    mem_bandwidth: float  # bytes/s
    memory: float  # bytes per device
    note: str = ""


GB = 1e9
HARDWARE: dict[str, Hardware] = {
    # Datasheet dense (non-sparse) bf16 tensor throughput, HBM bandwidth, memory per device.
    "h100": Hardware("h100", 989e12, 3.35e12, 80 * GB, "H100 SXM"),
    "h100-pcie": Hardware("h100-pcie", 756e12, 2.0e12, 80 * GB, "H100 PCIe"),
    "h200": Hardware("h200", 989e12, 4.8e12, 141 * GB, "H200 SXM"),
    "b200": Hardware("b200", 2250e12, 8.0e12, 192 * GB, "B200"),
    "a100": Hardware("a100", 312e12, 2.039e12, 80 * GB, "A100 SXM 80GB"),
    "a100-40gb": Hardware("a100-40gb", 312e12, 1.555e12, 40 * GB, "A100 40GB"),
    "l40s": Hardware("l40s", 362e12, 864e9, 48 * GB, "L40S"),
    "l4": Hardware("l4", 121e12, 300e9, 24 * GB, "L4"),
    "a10": Hardware("a10", 125e12, 600e9, 24 * GB, "A10"),
    "mi300x": Hardware("mi300x", 1307e12, 5.3e12, 192 * GB, "AMD MI300X"),
}


def matmul_rate(dtype: Any, size: int, seconds: float) -> float:
    """FLOP/s of repeated (size x size) @ (size x size) CPU matmuls in `dtype` for about `seconds`
    (after one warm-up product), with torch's current thread count."""
    import torch

    g = torch.Generator().manual_seed(0)  # not the global RNG: a trainer's RNG state is checkpointed
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    torch.mm(a, b)  # warm up kernels and caches
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.mm(a, b)
        steps += 1
    return 2.0 * size**3 * steps / elapsed


def measure_cpu(seconds: float = 0.25) -> Hardware:
    """This machine's CPU, measured now: best of bf16/fp32 matmul FLOP/s, copy bandwidth, RAM.

    Each measurement runs for about `seconds`, so the whole thing stays well under two seconds.
    """
    import torch

    fp32 = matmul_rate(torch.float32, 512, seconds)
    bf16 = matmul_rate(torch.bfloat16, 512, seconds)
    src = np.ones(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB: larger than any cache
    dst = np.empty_like(src)
    best = math.inf
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 2.0 * src.nbytes / best  # a copy reads and writes every byte
    memory = _mem_total()
    note = f"measured: fp32 {fp32 / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads"
    return Hardware("cpu", max(fp32, bf16), bandwidth, memory, note)


def _mem_total() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def get_hardware(
    name: str,
    *,
    peak_flops: float | None = None,
    mem_bandwidth: float | None = None,
    memory_gb: float | None = None,
) -> Hardware:
    """A hardware entry by name (or `cpu`, measured; or `custom`), with any value overridden."""
    key = name.lower()
    if key == "cpu":
        hw = measure_cpu()
    elif key == "custom":
        if not (peak_flops and mem_bandwidth and memory_gb):
            raise ConfigError(
                "--hardware custom needs --peak-flops, --mem-bandwidth and --gpu-memory "
                "(e.g. --peak-flops 312e12 --mem-bandwidth 2e12 --gpu-memory 80)"
            )
        hw = Hardware("custom", peak_flops, mem_bandwidth, memory_gb * GB)
    elif key in HARDWARE:
        hw = HARDWARE[key]
    else:
        raise ConfigError(
            f"unknown --hardware {name!r}; choose one of {', '.join(HARDWARE)}, cpu (measured now) "
            "or custom (with --peak-flops, --mem-bandwidth, --gpu-memory)"
        )
    if peak_flops:
        hw = replace(hw, peak_flops=peak_flops)
    if mem_bandwidth:
        hw = replace(hw, mem_bandwidth=mem_bandwidth)
    if memory_gb:
        hw = replace(hw, memory=memory_gb * GB)
    for label, value in (("peak FLOP/s", hw.peak_flops), ("bandwidth", hw.mem_bandwidth)):
        if not value > 0:
            raise ConfigError(f"hardware {hw.name}: {label} must be > 0, got {value}")
    return hw


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


# ---- architecture, deployment and a config to train ------------------------------------------


def _aspect_target(n: float) -> float:
    """Preferred d_model / n_layer: ~45 at 10M params, 64 at 100M, ~120 at 7B (GPT-2, Pythia,
    Llama shapes); Kaplan et al. 2020 found the loss flat over a wide range of aspect ratios."""
    return float(np.clip(64.0 * (n / 1e8) ** 0.15, 32.0, 128.0))


def choose_architecture(n: float, vocab_size: int = 32000, seq_len: int = 2048) -> ModelConfig:
    """A Llama-style shape whose exact parameter count (model code) is close to n.

    For every width (a multiple of the head size) the depth that best matches n is solved from
    the count being linear in n_layer; the winner minimises relative count error plus a small
    penalty for straying from the preferred aspect ratio. Head size 64 below d_model 2048, 128
    above, a multiple of four heads from d_model 1024; grouped-query attention (4 query heads per
    KV head) from 8 heads up, which quarters the KV cache.
    """
    from .model import num_params  # the one place that counts parameters

    best: tuple[float, ModelConfig] | None = None
    target_aspect = _aspect_target(n)
    for d_model in range(64, 16384 + 1, 64):
        head_dim = 64 if d_model < 2048 else 128
        # Widths friendly to tensor cores and to grouped-query attention: 64-multiples while
        # small, then a multiple of 4 heads.
        if d_model >= 1024 and d_model % (4 * head_dim):
            continue
        n_head = d_model // head_dim
        n_kv = n_head // 4 if n_head >= 8 and n_head % 4 == 0 else 0
        base = ModelConfig(
            vocab_size=vocab_size, n_layer=1, n_head=n_head, n_kv_head=n_kv, d_model=d_model,
            max_seq_len=seq_len,
        )
        one, two = num_params(base), num_params(replace(base, n_layer=2))
        per_layer, rest = two - one, 2 * one - two
        if best is not None and rest >= n * 1.5:
            break  # wider models only overshoot further (the narrowest is kept whatever n is)
        layers = max(1, round((n - rest) / per_layer))
        cfg = replace(base, n_layer=layers)
        error = abs(num_params(cfg) - n) / n
        score = error + 0.05 * abs(math.log(d_model / layers / target_aspect))
        if best is None or score < best[0]:
            best = (score, cfg)
    assert best is not None
    return best[1]


def deployment(cfg: ModelConfig, hw: Hardware, context: int, batch: int = 1, bytes_per_value: int = 2) -> dict[str, Any]:
    """Weights and KV-cache memory at `context` tokens for `batch` sequences, and the decode ceiling.

    A single-stream decode step must read every weight and the whole KV cache once, so
    tokens/s <= bandwidth / (weight bytes + KV bytes); batching amortises the weight read.
    """
    from .model import num_params

    weights = num_params(cfg) * bytes_per_value
    kv_per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * bytes_per_value  # K and V
    kv = kv_per_token * context * batch
    single = hw.mem_bandwidth / (weights + kv_per_token * context)
    return {
        "weight_bytes": weights,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes": kv,
        "context": context,
        "batch": batch,
        "total_bytes": weights + kv,
        "devices_needed": max(1, math.ceil((weights + kv) / hw.memory)) if hw.memory else None,
        "decode_tokens_per_s_single_stream": single,
    }


def training_config(cfg: ModelConfig, train_tokens: float, seq_len: int) -> Config:
    """A full training config for `cfg` on `train_tokens` tokens.

    Batch size (tokens) and peak learning rate follow DeepSeek LLM's fits (Bi et al. 2024):
    B = 0.292 C^0.3271, lr = 0.3118 C^-0.125 with C = 6 N D; the batch is rounded to a power of
    two sequences and the lr clamped to [1e-4, 3e-3] (their fit was made on 1e17-3e20 FLOPs).
    """
    from .model import num_params

    compute = 6.0 * num_params(cfg) * train_tokens
    batch_tokens = 0.292 * compute**0.3271
    global_batch = int(2 ** max(0, round(math.log2(max(1.0, batch_tokens / seq_len)))))
    micro_batch = min(global_batch, 8)
    max_steps = max(1, math.ceil(train_tokens / (global_batch * seq_len)))
    lr = float(np.clip(0.3118 * compute**-0.125, 1e-4, 3e-3))
    warmup = min(2000, max(1, round(0.01 * max_steps)))
    every = max(1, min(1000, max_steps // 20))
    return Config(
        model=replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len)),
        data=DataConfig(path="", seq_len=seq_len),
        train=TrainConfig(
            global_batch=global_batch, micro_batch=micro_batch, max_steps=max_steps,
            lr=float(f"{lr:.3g}"), warmup_steps=warmup, schedule="cosine",
            eval_every=every, ckpt_every_steps=every,
        ),
    )


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

    warnings: list[str] = []
    if unique_tokens is not None:
        # The best the data can ever be worth is U (1 + R*); the largest models need the least.
        most = unique_tokens * (1 + REPEAT_DECAY)
        least = float(law.tokens_for_loss(law.min_params(target) * 1e6, target))
        if least >= most:
            raise LmforgeError(
                f"{human_count(unique_tokens)} unique tokens cannot reach loss {target:.4g}: even a "
                f"huge model needs ~{human_count(least)} effective tokens and repeating data is worth "
                f"at most {human_count(most)} (Muennighoff et al. 2023). Get more unique data or aim "
                f"for a higher loss"
            )
    n_best = optimal_params(law, target, inference_tokens, hardware, costs, unique_tokens, objective)
    rec = evaluate(law, n_best, target, inference_tokens, hardware, costs, unique_tokens, "recommended")
    # The Chinchilla-optimal model of the same quality: training compute alone minimised.
    n_chin = optimal_params(law, target, 0.0, hardware, costs, unique_tokens, "flops")
    chin = evaluate(law, n_chin, target, inference_tokens, hardware, costs, unique_tokens, "chinchilla-optimal")

    candidates = [rec, chin]
    for scale in (0.5, 0.7, 1.4, 2.0):
        n = n_best * scale
        if n > law.min_params(target) * 1.05:
            c = evaluate(law, n, target, inference_tokens, hardware, costs, unique_tokens, f"{scale:g}x")
            if math.isfinite(c.train_tokens):
                candidates.append(c)
    candidates.sort(key=lambda c: c.n_params)

    if unique_tokens is not None and rec.train_tokens > unique_tokens:
        warnings.append(
            f"data-constrained: training on {human_count(rec.train_tokens)} tokens is "
            f"{rec.train_tokens / unique_tokens:.1f} epochs of your {human_count(unique_tokens)} unique "
            f"tokens; repeated tokens are worth less (Muennighoff et al. 2023, R* = {REPEAT_DECAY}), so "
            f"the plan trains on {human_count(rec.train_tokens)} tokens to be worth "
            f"{human_count(rec.effective_tokens)} fresh ones"
        )
        if rec.epochs and rec.epochs > 4:
            warnings.append(
                "beyond ~4 epochs returns fall quickly; more unique data would cut the cost"
            )

    if rec.tokens_per_param > 500:
        warnings.append(
            f"{rec.tokens_per_param:.0f} tokens/parameter is far outside the ~1-100 range the published "
            "laws were fitted on; Sardana et al. 2024 saw quality keep improving up to 10,000, but treat "
            "the figures as an extrapolation, or fit the law to your own runs (lmforge plan fit)"
        )

    from .model import flops_per_token, num_params

    arch = choose_architecture(rec.n_params, vocab_size, seq_len)
    arch_params = num_params(arch)
    cfg = training_config(arch, rec.train_tokens, seq_len)
    if abs(arch_params / rec.n_params - 1) > 0.1:
        warnings.append(
            f"no architecture with vocabulary {vocab_size} comes within 10% of {human_count(rec.n_params)} "
            f"parameters; the nearest has {human_count(arch_params)}"
        )
    embedding = vocab_size * arch.d_model
    if embedding > 0.5 * arch_params:
        warnings.append(
            f"the token embedding is {embedding / arch_params:.0%} of this model's parameters; the law "
            "counts them all, but they add little capacity: a smaller vocabulary (--vocab-size, and "
            "the same at lmforge prepare) leaves more for the layers"
        )
    dep = deployment(arch, hardware, seq_len, batch)
    if dep["devices_needed"] and dep["devices_needed"] > 1:
        warnings.append(
            f"weights + KV cache ({human_bytes(dep['total_bytes'])}) exceed one {hardware.name}'s "
            f"memory ({human_bytes(hardware.memory)}): serving needs {dep['devices_needed']} devices"
        )
    return Plan(
        law=law, hardware=hardware, costs=costs, objective=objective, target_loss=target,
        quality_of=quality_of, inference_tokens=inference_tokens, unique_tokens=unique_tokens,
        recommended=rec, chinchilla=chin, candidates=candidates, architecture=arch,
        architecture_params=arch_params, architecture_flops_per_token=flops_per_token(arch, seq_len),
        deployment=dep, config=cfg, warnings=warnings,
    )


def config_yaml(plan: Plan, command: str = "lmforge plan") -> str:
    """The planned training config as YAML, with a header saying what is left to set."""
    rec, m = plan.recommended, plan.architecture
    header = [
        f"# Written by `{command}`.",
        f"# Target loss {plan.target_loss:.4f} ({plan.law.name} law); {human_count(plan.architecture_params)} parameters,",
        f"# {human_count(rec.train_tokens)} training tokens ({rec.tokens_per_param:.0f} per parameter).",
        "# data.path is empty: point it at a dataset prepared with a matching vocabulary, e.g.",
        f"#   lmforge prepare CORPUS --out data/mycorpus --vocab-size {m.vocab_size}",
        "#   lmforge train THIS.yaml --set data.path=data/mycorpus",
        "",
    ]
    return "\n".join(header) + plan.config.to_yaml()


# ---- fitting the law to your own runs --------------------------------------------------------


@dataclass(frozen=True)
class RunPoint:
    name: str
    n_params: float
    tokens: float
    loss: float


def read_run(run_dir: str | os.PathLike) -> RunPoint:
    """(N, D, final loss) of a run directory: config.yaml + metrics.jsonl.

    The loss is the last validation loss, else the last training loss; D is the largest `tokens`
    value logged (else steps x global batch x seq_len).
    """
    from .model import num_params

    run = Path(run_dir)
    cfg_path, log_path = run / "config.yaml", run / "metrics.jsonl"
    if not cfg_path.is_file():
        raise ConfigError(f"{run}: no config.yaml; is this a run directory (runs/<name>/)?")
    if not log_path.is_file():
        raise ConfigError(f"{run}: no metrics.jsonl; has the run logged any steps?")
    cfg = load_config(cfg_path)
    val_loss = train_loss = None
    tokens = 0.0
    step = 0
    for i, line in enumerate(log_path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; the rest of the log still counts
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("val_loss"), (int, float)):
            val_loss = float(rec["val_loss"])
        if isinstance(rec.get("loss"), (int, float)):
            train_loss = float(rec["loss"])
        if isinstance(rec.get("tokens"), (int, float)):
            tokens = max(tokens, float(rec["tokens"]))
        if isinstance(rec.get("step"), int):
            step = max(step, rec["step"])
    loss = val_loss if val_loss is not None else train_loss
    if loss is None or not math.isfinite(loss) or loss <= 0:
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


# ---- rendering -----------------------------------------------------------------------------------


def _sci(x: float | None) -> str:
    """Compact scientific notation: 1.13e23."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    exp = math.floor(math.log10(abs(x)))
    return f"{x / 10**exp:.2f}e{exp}"


def _money(x: float | None) -> str:
    return "-" if x is None else f"${human_count(x)}"


def render_plan(plan: Plan) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    law, hw, rec, chin = plan.law, plan.hardware, plan.recommended, plan.chinchilla
    quality = f" (the quality of a Chinchilla-optimal {human_count(plan.quality_of)}-parameter model)" if plan.quality_of else ""
    out.print(
        f"[bold]Target loss {plan.target_loss:.4f}[/]{quality}; law {law.name}: "
        f"E {law.E:g}, A {law.A:g}, B {law.B:g}, alpha {law.alpha:g}, beta {law.beta:g}"
    )
    out.print(
        f"Inference: {human_count(plan.inference_tokens)} tokens "
        f"({plan.costs.prefill_fraction:.0%} prefill). Hardware {hw.name}: "
        f"{hw.peak_flops / 1e12:.3g} TFLOP/s bf16, {hw.mem_bandwidth / 1e9:.0f} GB/s, "
        f"{hw.memory / GB:.0f} GB{' (' + hw.note + ')' if hw.note else ''}. "
        f"MFU train {plan.costs.train_mfu:g} / prefill {plan.costs.prefill_mfu:g} / decode {plan.costs.decode_mfu:g}. "
        f"Minimising {'total FLOPs' if plan.objective == 'flops' else 'total GPU-hours (cost)'}."
    )
    # Compact on purpose, to fit an 80-column terminal: dollars when priced, else GPU-hours. The
    # predicted loss is the target for every row (D_train is solved for it), so it is in the title.
    priced = plan.costs.price_per_gpu_hour is not None
    unit = "$" if priced else ("CPU-h" if hw.name == "cpu" else "GPU-h")
    money = _money if priced else (lambda x: human_count(x))  # noqa: E731
    constrained = plan.unique_tokens is not None
    table = Table(
        title=f"Candidates (each predicted to reach loss {plan.target_loss:.4f})",
        box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
    )
    cols = ["\n", "\nparams", "train\ntokens", "tokens\n/param", "train\nFLOPs", "infer\nFLOPs",
            f"train\n{unit}", f"infer\n{unit}", f"total\n{unit}"]
    if constrained:
        cols.append("\nepochs")
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    for c in plan.candidates:
        style = "bold green" if c is rec else ("cyan" if c is chin else None)
        label = {"recommended": "best", "chinchilla-optimal": "chin"}.get(c.label, c.label)
        row = [
            label, human_count(c.n_params), human_count(c.train_tokens), f"{c.tokens_per_param:.0f}",
            _sci(c.train_flops), _sci(c.inference_flops),
            money(c.train_cost if priced else c.train_gpu_hours),
            money(c.inference_cost if priced else c.inference_gpu_hours),
            money(c.total_cost if priced else c.total_gpu_hours),
        ]
        if constrained:
            row.append(f"{c.epochs:.1f}" if c.epochs else "-")
        table.add_row(*row, style=style)
    out.print(table)
    what = "FLOPs" if plan.objective == "flops" else "GPU-hours"
    out.print(
        f"[bold green]Recommended:[/] {human_count(rec.n_params)} parameters on {human_count(rec.train_tokens)} "
        f"tokens ({rec.tokens_per_param:.0f} tokens/param), {_sci(rec.total_flops)} FLOPs in all; "
        f"{plan.saving:.1%} fewer total {what} than the Chinchilla-optimal {human_count(chin.n_params)} "
        f"model of the same quality ({_sci(chin.total_flops)} FLOPs"
        + (f", {_money(chin.total_cost)} -> {_money(rec.total_cost)})" if priced else ")")
        + "."
    )
    m = plan.architecture
    arch = Table(title="Architecture (parameter count from lmforge.model)", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("layers", "d_model", "heads", "kv heads", "d_ff", "vocab", "params", "vs N"):
        arch.add_column(col, justify="right", no_wrap=True)
    arch.add_row(
        str(m.n_layer), str(m.d_model), str(m.n_head), str(m.kv_heads), str(m.ff_dim), str(m.vocab_size),
        f"{plan.architecture_params:,}", f"{plan.architecture_params / rec.n_params - 1:+.1%}",
    )
    out.print(arch)
    out.print(
        f"Training FLOPs/token from the model code (attention at seq_len {plan.config.data.seq_len} "
        f"included): {plan.architecture_flops_per_token:.3g}, vs 6N = {6 * plan.architecture_params:.3g}."
    )
    d = plan.deployment
    dep = Table(title=f"Deployment on {hw.name} (bf16, context {d['context']}, batch {d['batch']})",
                box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("weights", "KV/token", "KV cache", "devices", "decode ceiling, 1 stream"):
        dep.add_column(col, justify="right", no_wrap=True)
    dep.add_row(
        human_bytes(d["weight_bytes"]), human_bytes(d["kv_bytes_per_token"]), human_bytes(d["kv_bytes"]),
        str(d["devices_needed"]), f"{d['decode_tokens_per_s_single_stream']:,.0f} tokens/s",
    )
    out.print(dep)
    t = plan.config.train
    out.print(
        f"Training config: seq_len {plan.config.data.seq_len}, global batch {t.global_batch} "
        f"({t.global_batch * plan.config.data.seq_len:,} tokens), {t.max_steps:,} steps, lr {t.lr:g}, "
        f"warmup {t.warmup_steps} (write it with --write-config PATH)."
    )
    for w in plan.warnings:
        out.print(f"[bold yellow]warning:[/] {w}")


def render_fit(fit: Fit) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    runs = Table(title=f"Runs ({len(fit.points)})", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("run", "params", "tokens", "loss", "law"):
        runs.add_column(col, justify="right")
    for p in fit.points:
        runs.add_row(p.name, human_count(p.n_params), human_count(p.tokens), f"{p.loss:.4f}",
                     f"{float(fit.law.loss(p.n_params, p.tokens)):.4f}")
    out.print(runs)
    consts = Table(title=f"Fitted L = E + A/N^alpha + B/D^beta ({len(fit.points)} runs, bootstrap)", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("constant", "value", "std", "5%", "95%"):
        consts.add_column(col, justify="right")
    for k in ("E", "A", "B", "alpha", "beta"):
        s = fit.bootstrap[k]
        consts.add_row(k, f"{getattr(fit.law, k):.4g}", f"{s['std']:.3g}", f"{s['p05']:.4g}", f"{s['p95']:.4g}")
    out.print(consts)
    out.print(f"RMS residual of log loss: {fit.residual_rms:.4f}")
    for w in fit.warnings:
        out.print(f"[bold yellow]warning:[/] {w}")


# ---- command line -------------------------------------------------------------------------------


def parse_count(text: str) -> float:
    """'7e9', '7B', '1.5T', '300M', '2k' -> float (argparse type)."""
    s = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    try:
        if s and s[-1].lower() in scale:
            return float(s[:-1]) * scale[s[-1].lower()]
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 7e9, 7B, 300M, 2T)") from None


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """`lmforge plan [options]` plans; `lmforge plan fit RUN_DIR...` fits the law."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Size a model for its inference budget: the N and D_train that reach a target loss at the\n"
        "least training + inference cost (Sardana et al. 2024), an architecture, a config to train."
    )
    p.epilog = (
        "examples:\n"
        "  lmforge plan --quality-of 7e9 --inference-tokens 1e13 --hardware h100 --price-per-gpu-hour 2.5\n"
        "  lmforge plan --target-loss 2.3 --inference-tokens 2e12 --unique-tokens 4e10 --hardware a100 \\\n"
        "               --write-config configs/planned.yaml\n"
        "  lmforge plan fit runs/sweep-* --save law.json && lmforge plan --law law.json --target-loss 3.1 ...\n"
        "details: docs/plan.md"
    )
    g = p.add_argument_group("target (one of)")
    g.add_argument("--target-loss", type=float, metavar="LOSS", help="final loss (nats/token) the model must reach")
    g.add_argument("--quality-of", type=parse_count, metavar="N",
                   help="the loss of a Chinchilla-optimal model with N parameters (e.g. 7e9, 7B)")
    p.add_argument("--inference-tokens", type=parse_count, default=0.0, metavar="TOKENS",
                   help="tokens the model will process over its life (prompt + generated)")
    p.add_argument("--unique-tokens", type=parse_count, metavar="TOKENS", help="unique training tokens available (enables the repetition correction)")
    p.add_argument("--law", default="besiroglu", metavar="NAME|PATH",
                   help="besiroglu (default), hoffmann, sardana, or a JSON file from `plan fit --save`")
    p.add_argument("--objective", choices=("flops", "cost"),
                   help="minimise total FLOPs, or GPU-hours/dollars (default: cost when a price is given)")
    h = p.add_argument_group("hardware and costs")
    h.add_argument("--hardware", default="h100", metavar="NAME", help=f"{', '.join(HARDWARE)}, cpu (measured now) or custom")
    h.add_argument("--peak-flops", type=parse_count, metavar="FLOP/S", help="override: dense bf16 FLOP/s per device")
    h.add_argument("--mem-bandwidth", type=parse_count, metavar="BYTES/S", help="override: memory bandwidth, bytes/s")
    h.add_argument("--gpu-memory", type=float, metavar="GB", help="override: memory per device, GB")
    h.add_argument("--price-per-gpu-hour", type=float, metavar="DOLLARS", help="dollars per device-hour")
    h.add_argument("--train-mfu", type=float, default=0.4, metavar="F", help="achieved utilisation in training (default 0.4)")
    h.add_argument("--prefill-mfu", type=float, default=0.5, metavar="F", help="utilisation on prompt tokens (default 0.5)")
    h.add_argument("--decode-mfu", type=float, default=0.1, metavar="F", help="utilisation on generated tokens (default 0.1, memory-bound)")
    h.add_argument("--prefill-fraction", type=float, default=0.5, metavar="F", help="share of inference tokens that are prompt (default 0.5)")
    a = p.add_argument_group("architecture and config")
    a.add_argument("--vocab-size", type=int, default=32000, metavar="V", help="tokenizer vocabulary (match lmforge prepare --vocab-size)")
    a.add_argument("--seq-len", type=int, default=2048, metavar="T", help="training context and deployment context")
    a.add_argument("--batch", type=int, default=1, metavar="B", help="concurrent sequences for the KV-cache estimate")
    a.add_argument("--write-config", metavar="PATH", help="write a training YAML for the recommended model")
    a.add_argument("--overwrite", action="store_true", help="replace the --write-config file if it exists")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    sub = p.add_subparsers(dest="plan_action", metavar="ACTION")
    f = sub.add_parser("fit", help="fit the loss law to your own runs (run directories)")
    f.add_argument("runs", nargs="+", help="run directories holding config.yaml and metrics.jsonl (globs allowed)")
    f.add_argument("--bootstrap", type=int, default=100, metavar="R", help="bootstrap resamples for the uncertainty (0: none)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--save", metavar="PATH", help="write the fitted law as JSON (use with plan --law PATH)")
    f.add_argument("--json", action="store_true", help="print the fit as JSON")


def check_output(path: str, flag: str, overwrite: bool) -> None:
    """Refuse an output path that cannot become a file: a directory, or (without --overwrite) an
    existing file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path, e.g. {p / 'planned.yaml'}")
    if os.path.lexists(p) and not overwrite:
        raise ConfigError(f"{flag} {path} already exists; choose another path or pass --overwrite to replace it")


def write_output(path: str, flag: str, text: str) -> None:
    """Write an output file atomically; an OS error (no such directory, no permission, a read-only
    file system) is a ConfigError naming the path, and leaves nothing behind."""
    check_output(path, flag, overwrite=True)  # it may have become a directory while planning
    try:
        atomic_write_text(path, text)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and Path(os.fsdecode(e.filename)).parent != Path(path).parent else ""
        raise ConfigError(f"cannot write {flag} {path}: {e.strerror or e}{where}") from None


def plan_command(args: argparse.Namespace) -> int:
    if getattr(args, "plan_action", None) == "fit":
        return fit_command(args)
    if args.write_config:  # before planning: a bad path fails at once
        check_output(args.write_config, "--write-config", overwrite=getattr(args, "overwrite", False))
    hw = get_hardware(args.hardware, peak_flops=args.peak_flops, mem_bandwidth=args.mem_bandwidth, memory_gb=args.gpu_memory)
    plan = make_plan(
        target_loss=args.target_loss,
        quality_of=args.quality_of,
        inference_tokens=args.inference_tokens,
        unique_tokens=args.unique_tokens,
        law=load_law(args.law),
        hardware=hw,
        costs=CostModel(args.train_mfu, args.prefill_mfu, args.decode_mfu, args.prefill_fraction, args.price_per_gpu_hour),
        objective=args.objective,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        batch=args.batch,
    )
    if args.write_config:
        write_output(args.write_config, "--write-config", config_yaml(plan))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan)
        if args.write_config:
            print(f"wrote {args.write_config}; set data.path before training (--set data.path=...)")
    return 0


def fit_command(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.save:  # `plan fit --save` replaces an earlier fit (a law file is refitted in place)
        check_output(args.save, "--save", overwrite=True)
    points = [read_run(r) for r in expand_runs(args.runs)]
    fit = fit_law(points, bootstrap=args.bootstrap, seed=args.seed)
    if args.save:
        write_output(args.save, "--save", json.dumps(fit.to_dict(), indent=2) + "\n")
    if args.json:
        print(json.dumps(fit.to_dict(), indent=2))
    else:
        render_fit(fit)
        if args.save:
            print(f"wrote {args.save}; plan with it: lmforge plan --law {args.save} --target-loss ...")
    return 0
