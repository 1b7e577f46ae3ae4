"""Accelerators: a table of datasheet figures, and this machine's CPU measured on the spot.

Who uses it: `lmforge plan` (cost and deployment figures), the trainer (the peak its MFU is
measured against: a GPU's datasheet bf16 peak, or on a CPU the matmul rate measured now; and the
answer to `train.dtype: auto`, `auto_dtype`) and benchmarks/train_throughput.py (the same
measurement, run longer).

Trade-offs. Peaks are nominal datasheet numbers (dense bf16), not measurements: a run's MFU is
against what the vendor promises. A CPU has no datasheet figure that means anything for torch, so
`matmul_rate` times repeated square matmuls instead; it uses a private RNG so measuring never moves
a trainer's checkpointed global RNG state.

`auto_dtype` is a rule, not a measurement: bf16 where the device multiplies bf16 natively (a CUDA
GPU with bf16 tensor cores; a CPU with AMX-BF16 or AVX512-BF16), else fp32. Timing would make the
answer depend on the load of the moment, and a run's dtype must be the same on every rank and at
every start. On a CPU without those instructions bf16 matmuls are emulated and run many times
slower than fp32 (docs/benchmarks.md), so fp32 is the faster choice there, not only the exact one.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    mem_bandwidth: float  # bytes/s
    memory: float  # bytes per device
    note: str = ""


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


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix instructions


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports in /proc/cpuinfo (x86 "flags", ARM "Features"; empty
    elsewhere, or when unreadable). Read once per process: every int8 layer built asks."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def auto_dtype(device: Any) -> str:
    """What `dtype: auto` means on `device` (a torch.device or its type name): "bf16" where bf16
    matmuls run natively, else "fp32". CUDA: bf16 when the GPU supports it without emulation
    (compute capability 8.0 and up: A100, H100, L4, ...); CPU: bf16 when Linux lists AMX-BF16 or
    AVX512-BF16 among its flags; anything else: fp32. Deterministic: no timing. Training resolves
    it once when a run starts (the run's config records the answer); inference may use it too."""
    import torch

    kind = device if isinstance(device, str) else device.type
    if kind == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the keyword: it did not count emulation then
            native = torch.cuda.is_bf16_supported()
        return "bf16" if native else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_flags() & set(CPU_BF16_FLAGS) else "fp32"
    return "fp32"


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
    """This machine's RAM in bytes, or the cgroup (container) limit when that is lower; 0.0 if unknown."""
    total = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = float(line.split()[1]) * 1024  # kB
                break
    except OSError:
        pass
    if not total:
        try:
            total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 0.0
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2; "max" = no limit
        if limit.isdigit():
            total = min(total, float(limit))
    except OSError:
        pass
    return total


def memory_total(device: Any = None) -> float:
    """Bytes of memory `device` has: a CUDA device's total memory, else this machine's RAM (see
    `_mem_total`); 0.0 when unknown."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        return float(torch.cuda.get_device_properties(device).total_memory)
    return _mem_total()


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


def gpu_peak_flops(device_name: str) -> float | None:
    """The datasheet bf16 peak of a GPU named as torch.cuda.get_device_name() names it, or None
    when the table has no entry for it.

    Matched word by word, not by substring ("l4" is not an "L40S", "a10" not an "A100"): an entry
    `model` matches when the name has the word `model`; an entry `model-variant` ("h100-pcie",
    "a100-40gb") only when it has both words, and then it wins over the bare `model` entry. So
    "NVIDIA H100 80GB HBM3" (SXM) is h100, "NVIDIA H100 PCIe" h100-pcie, "NVIDIA A100-SXM4-40GB"
    a100-40gb.
    """
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    best: tuple[str, Hardware] | None = None
    for key, hw in HARDWARE.items():
        model, _, variant = key.partition("-")
        if model in words and (not variant or variant in words) and (best is None or len(key) > len(best[0])):
            best = (key, hw)
    return best[1].peak_flops if best else None


def peak_flops(device: Any, dtype: str = "bf16") -> float | None:
    """The peak a trainer's MFU is measured against: a known GPU's datasheet bf16 peak (the table),
    None for an unknown GPU; on the CPU, this machine's matmul rate in the run's dtype, measured now
    with the current threads (512^3 products for ~0.1 s: an estimate, since a CPU's peak depends on
    its vector units and on what else runs; benchmarks/train_throughput.py measures it longer)."""
    import torch

    if device.type != "cuda":
        return matmul_rate(torch.bfloat16 if dtype == "bf16" else torch.float32, 512, 0.1)
    return gpu_peak_flops(torch.cuda.get_device_name(device))
