"""Learning-rate schedules are pure functions of the step: checked against hand-computed tables."""

import math

import pytest

from lmforge.config import TrainConfig
from lmforge.train.optim import lr_at, param_groups


def cfg(**kw):
    base = dict(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=14)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.25), (1, 0.5), (3, 1.0),  # linear warmup, first step not zero
        (4, 1.0),  # cosine starts at the peak
        (9, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),  # halfway: 0.55
        (14, 0.1), (20, 0.1),  # floor at and after max_steps
    ],
)
def test_cosine_table(step, expected):
    assert lr_at(step, cfg(schedule="cosine")) == pytest.approx(expected)


@pytest.mark.parametrize(
    "step, expected",
    # max_steps 20, decay_fraction 0.25 -> decay over steps 15..20
    [(0, 0.25), (3, 1.0), (10, 1.0), (14, 1.0), (15, 1.0), (16, 1.0 - 0.9 * 0.2), (18, 1.0 - 0.9 * 0.6), (20, 0.1), (25, 0.1)],
)
def test_wsd_table(step, expected):
    c = cfg(schedule="wsd", max_steps=20, decay_fraction=0.25)
    assert lr_at(step, c) == pytest.approx(expected)


def test_constant_and_no_warmup():
    assert [lr_at(s, cfg(schedule="constant")) for s in (0, 3, 4, 100)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_at(0, cfg(schedule="cosine", warmup_steps=0)) == pytest.approx(1.0)


def test_param_groups_decay_only_matrices():
    import torch.nn as nn

    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 4)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(4,), (4,), (4,), (10, 4)]
