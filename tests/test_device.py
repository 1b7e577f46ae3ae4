"""util.default_device: the one place that decides where models train and run (LMFORGE_DEVICE)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.util import default_device

from conftest import TINY_CONFIG, lmforge_cmd, subprocess_env


def test_default_is_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.delenv("LMFORGE_DEVICE", raising=False)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_can_be_forced(monkeypatch):
    monkeypatch.setenv("LMFORGE_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")


@pytest.mark.parametrize("value, message", [
    ("tpu", "expected cpu, cuda or cuda:N"),
    ("gpu0", "expected cpu, cuda or cuda:N"),
    ("mps", "expected cpu, cuda or cuda:N"),
])
def test_bad_values_name_the_variable(monkeypatch, value, message):
    monkeypatch.setenv("LMFORGE_DEVICE", value)
    with pytest.raises(ConfigError, match=f"LMFORGE_DEVICE='{value}': {message}"):
        default_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LMFORGE_DEVICE", "cuda")
    with pytest.raises(ConfigError, match="has no CUDA device"):
        default_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_refuses_a_missing_gpu_without_a_traceback(tmp_path, tiny_dataset):
    env = subprocess_env(LMFORGE_DEVICE="cuda")
    r = subprocess.run(lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"),
                                   "--set", f"data.path={tiny_dataset}", "--set", "train.max_steps=2"),
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "LMFORGE_DEVICE='cuda'" in r.stderr and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
