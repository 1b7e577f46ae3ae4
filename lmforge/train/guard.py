"""The training guard: a pure detector over recent history, and the rollback plan it leads to.

Detector. `check(history, loss, grad_norm, cfg)` looks at the last `guard.window` healthy losses
and returns a verdict for the new step:

  non_finite   loss or gradient norm is NaN or infinite (always acted on, from the first step)
  spike        the loss sits more than `spike_factor` robust standard deviations above the median
               of the window: z = (loss - median) / (1.4826 * MAD), one-sided (a falling loss is
               never a spike), with the MAD floored at 1 % of the median so a flat plateau does not
               turn noise into "infinite" z-scores
  ok           otherwise, or while fewer than `guard.warmup` steps of history exist (early
               training is noisy and falls fast; firing there would only waste rollbacks)

`patience` consecutive spiking steps are needed before acting on a spike. Spiking steps are not
added to the history, so a spike cannot raise the median it is judged against. Median/MAD rather
than mean/std: one outlier moves the mean and the std a lot, the median and MAD hardly at all.

Recovery plan. `plan_rollback` chooses the newest checkpoint at least `rollback_margin` steps
before the spike began and the data window to skip: every data step from that checkpoint's data
cursor up to the spike's, plus `skip_steps` more, so the batches that led into the spike are not
replayed (PaLM restarted ~100 steps early and skipped 200-500 batches by hand; this does it
automatically). The learning rate is multiplied by `lr_scale` after each rollback. The trainer
rewrites the chosen checkpoint with the advanced data cursor and the new lr scale, so a crash after
a rollback resumes with exactly the same skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median

from ..config import GuardConfig

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class Verdict:
    kind: str  # "ok" | "non_finite" | "spike"
    z: float = 0.0
    median: float = 0.0
    act: bool = False  # True when the trainer must roll back now

    def describe(self) -> str:
        if self.kind == "non_finite":
            return "non-finite loss or gradient norm"
        if self.kind == "spike":
            return f"loss spike: z = {self.z:.1f} above the window median {self.median:.4f}"
        return "ok"


@dataclass
class GuardState:
    """What the detector remembers; saved in every checkpoint (trainer.json)."""

    losses: list[float] = field(default_factory=list)  # recent healthy losses, newest last
    streak: int = 0  # consecutive spiking steps so far

    def to_dict(self) -> dict:
        return {"losses": list(self.losses), "streak": self.streak}

    @classmethod
    def from_dict(cls, d: dict | None) -> "GuardState":
        d = d or {}
        return cls(losses=[float(x) for x in d.get("losses", [])], streak=int(d.get("streak", 0)))


def robust_z(window: list[float], value: float) -> tuple[float, float]:
    """(z-score of value against the window by median/MAD, the median)."""
    med = median(window)
    mad = median(abs(x - med) for x in window)
    scale = max(MAD_TO_STD * mad, 0.01 * abs(med), 1e-12)
    return (value - med) / scale, med


def check(state: GuardState, loss: float, grad_norm: float, cfg: GuardConfig) -> tuple[Verdict, GuardState]:
    """Pure: the verdict for a new step and the state after it (the input state is unchanged)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return Verdict("non_finite", act=True), GuardState(list(state.losses), 0)
    if len(state.losses) >= max(cfg.warmup, 2):
        z, med = robust_z(state.losses[-cfg.window:], loss)
        if z > cfg.spike_factor:
            streak = state.streak + 1
            return Verdict("spike", z=z, median=med, act=streak >= cfg.patience), GuardState(list(state.losses), streak)
    losses = (state.losses + [loss])[-cfg.window:]
    return Verdict("ok"), GuardState(losses, 0)


@dataclass
class RollbackPlan:
    checkpoint_step: int  # optimizer step to return to
    skip_from: int  # first data step not to be read (the checkpoint's data cursor)
    skip_to: int  # the data cursor after the skip (exclusive end of the skipped window)
    lr_scale: float  # learning-rate multiplier from now on


def plan_rollback(
    *,
    spike_step: int,
    spike_data_step: int,
    patience_used: int,
    checkpoints: list[tuple[int, int]],
    lr_scale: float,
    cfg: GuardConfig,
) -> RollbackPlan | None:
    """Choose where to go back to. `checkpoints` are (optimizer step, data cursor) of the intact
    checkpoints; `spike_step` / `spike_data_step` are the 1-based step whose update raised the
    verdict and the data step it read. None when no checkpoint is early enough."""
    began = spike_step - patience_used + 1  # the first spiking step
    limit = began - 1 - cfg.rollback_margin  # a checkpoint taken after step `limit` is too late
    usable = [(s, d) for s, d in checkpoints if s <= limit]
    if not usable:
        return None
    step, data_step = max(usable)
    return RollbackPlan(step, data_step, spike_data_step + 1 + cfg.skip_steps, lr_scale * cfg.lr_scale)
