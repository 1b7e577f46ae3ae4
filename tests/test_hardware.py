"""lmforge/hardware.py: which datasheet peak a GPU's name gets (the trainer's MFU denominator),
and the CPU measurement. `get_hardware` (the plan's --hardware) is tested in test_plan.py."""

from __future__ import annotations

import pytest
import torch

from lmforge.hardware import HARDWARE, gpu_peak_flops, matmul_rate


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"),  # SXM: not the PCIe card, whose entry name is longer
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ("NVIDIA L40S", "l40s"),  # not the L4 ("l4" is a prefix of "l40s", not a word of it)
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10", "a10"),
    ("AMD Instinct MI300X", "mi300x"),
    ("NVIDIA B200", "b200"),
])
def test_gpu_names_map_to_their_table_entry(name: str, key: str) -> None:
    assert gpu_peak_flops(name) == HARDWARE[key].peak_flops


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA GH200 480GB", "Tesla V100-SXM2-16GB"])
def test_unknown_gpus_have_no_peak(name: str) -> None:
    assert gpu_peak_flops(name) is None


def test_matmul_rate_leaves_the_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    assert matmul_rate(torch.float32, 64, 0.01) > 1e6
    assert torch.equal(torch.random.get_rng_state(), before)  # a trainer's checkpointed RNG state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_this_gpu_is_in_the_table() -> None:
    from lmforge.hardware import peak_flops

    name = torch.cuda.get_device_name(0)
    assert peak_flops(torch.device("cuda", 0)) == gpu_peak_flops(name), name
    assert gpu_peak_flops(name) is not None, f"{name}: add it to lmforge/hardware.py's table"


# ---- train.dtype: auto -------------------------------------------------------------------------


@pytest.mark.parametrize("flags, dtype", [
    ({"avx2", "fma"}, "fp32"),  # AVX2 only (an AMD EPYC): bf16 matmuls are emulated, many times slower
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16"),
    (set(), "fp32"),  # not Linux, or /proc/cpuinfo unreadable
])
def test_auto_dtype_on_a_cpu_follows_its_bf16_instructions(monkeypatch, flags, dtype) -> None:
    import lmforge.hardware as hw

    monkeypatch.setattr(hw, "cpu_flags", lambda: flags)
    assert hw.auto_dtype(torch.device("cpu")) == dtype
    assert hw.auto_dtype("cpu") == dtype


def test_auto_dtype_on_cuda_asks_for_native_bf16(monkeypatch) -> None:
    import lmforge.hardware as hw

    asked = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return True  # a GPU with native bf16 (A100, H100, ...)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert hw.auto_dtype("cuda") == "bf16" and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert hw.auto_dtype("cuda") == "fp32"  # bf16 by emulation only (a pre-Ampere GPU): fp32


def test_this_cpu_reads_its_flags() -> None:
    from pathlib import Path

    from lmforge.hardware import cpu_flags

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo here")
    assert cpu_flags(), "a Linux CPU lists its flags"
