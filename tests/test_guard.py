"""The guard's detector and rollback planner are pure functions: tables of synthetic histories."""

import math

import pytest

from lmforge.config import GuardConfig
from lmforge.train.guard import GuardState, check, plan_rollback, robust_z


def run_history(losses, cfg, grad_norms=None):
    """Feed a loss sequence through the detector; return the verdict kinds and the acting steps."""
    state, kinds, acts = GuardState(), [], []
    for i, loss in enumerate(losses):
        verdict, state = check(state, loss, (grad_norms or [1.0] * len(losses))[i], cfg)
        kinds.append(verdict.kind)
        if verdict.act:
            acts.append(i)
    return kinds, acts


def noisy_decay(n, seed=0):
    import random

    rng = random.Random(seed)
    return [2.0 + 8.0 * math.exp(-i / 30) + rng.gauss(0, 0.05) for i in range(n)]


CFG = GuardConfig(window=20, warmup=10, spike_factor=6.0, patience=1)


@pytest.mark.parametrize(
    "losses, expected_acts",
    [
        ([3.0] * 30, []),  # flat
        (noisy_decay(200), []),  # a normal run's falling, noisy loss never fires
        ([3.0] * 15 + [float("nan")] + [3.0] * 5, [15]),  # NaN acts at once
        ([3.0] * 15 + [float("inf")], [15]),
        ([float("nan")], [0]),  # even on the first step
        ([3.0 + 0.01 * (i % 3) for i in range(20)] + [9.0], [20]),  # a clear spike
        ([3.0] * 5 + [9.0], []),  # within warmup: early noise is not judged
        ([3.0 + 0.01 * (i % 3) for i in range(20)] + [3.05], []),  # small bump below the factor
        ([3.0 + 0.01 * (i % 3) for i in range(20)] + [1.0], []),  # falling is never a spike
    ],
    ids=["flat", "normal-run", "nan", "inf", "nan-first-step", "spike", "warmup", "bump", "drop"],
)
def test_detector_table(losses, expected_acts):
    assert run_history(losses, CFG)[1] == expected_acts


def test_nonfinite_grad_norm_acts():
    kinds, acts = run_history([3.0] * 12, CFG, grad_norms=[1.0] * 11 + [float("nan")])
    assert kinds[-1] == "non_finite" and acts == [11]


def test_patience_needs_consecutive_spikes_and_spikes_do_not_enter_history():
    cfg = GuardConfig(window=20, warmup=10, spike_factor=6.0, patience=3)
    base = [3.0 + 0.01 * (i % 3) for i in range(20)]
    kinds, acts = run_history(base + [9.0, 9.0, 3.0, 9.0, 9.0, 9.0], cfg)
    assert kinds[20:] == ["spike", "spike", "ok", "spike", "spike", "spike"]
    assert acts == [25]  # the third consecutive spike; the streak was broken by the ok step


def test_robust_z_ignores_one_outlier_in_the_window():
    window = [3.0] * 19 + [100.0]
    z, med = robust_z(window, 3.5)
    assert med == 3.0 and z == pytest.approx(0.5 / 0.03)  # MAD 0 -> floor at 1 % of the median


def test_state_round_trips():
    s = GuardState([1.0, 2.0], 1)
    assert GuardState.from_dict(s.to_dict()) == s
    assert GuardState.from_dict(None) == GuardState()


@pytest.mark.parametrize(
    "spike_step, patience_used, margin, skip, expected",
    [
        # checkpoints at steps 0, 10, 20 with data cursors equal to their steps
        (15, 1, 0, 0, (10, 10, 15)),  # spike in step 15 read data step 14: skip 10..14
        (20, 1, 0, 0, (10, 10, 20)),  # step 20's checkpoint was written after the bad update
        (21, 1, 0, 0, (20, 20, 21)),
        (25, 3, 0, 0, (20, 20, 25)),  # spike began at 23
        (25, 6, 0, 0, (10, 10, 25)),  # spike began at 20: checkpoint 20 is too late
        (25, 1, 10, 0, (10, 10, 25)),  # margin: at least 10 steps before step 25
        (25, 1, 0, 7, (20, 20, 32)),  # skip 7 more data steps after the spike
    ],
)
def test_rollback_plan_table(spike_step, patience_used, margin, skip, expected):
    cfg = GuardConfig(rollback_margin=margin, skip_steps=skip, lr_scale=0.5)
    plan = plan_rollback(spike_step=spike_step, spike_data_step=spike_step - 1, patience_used=patience_used,
                         checkpoints=[(0, 0), (10, 10), (20, 20)], lr_scale=1.0, cfg=cfg)
    assert (plan.checkpoint_step, plan.skip_from, plan.skip_to) == expected
    assert plan.lr_scale == 0.5


def test_rollback_plan_none_when_no_checkpoint_is_early_enough():
    cfg = GuardConfig(rollback_margin=100)
    assert plan_rollback(spike_step=50, spike_data_step=49, patience_used=1, checkpoints=[(0, 0), (40, 40)],
                         lr_scale=1.0, cfg=cfg) is None
