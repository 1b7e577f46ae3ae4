"""A single stream's decode step compiled ahead of time: one call into C++ per token.

Design
------
`compile_blocks(model, "decode")` compiles each block's decode step with torch.compile; a step
then still runs Python per block (dynamo's guard checks on ~270 tensors, the generated wrapper
code, the call itself): ~3-4 ms of a 17 ms fp32 step of SmolLM2-135M on one core, a fifth of
the step, and half of an int8 one. For a step of ONE row (`sample`, eval's generation tasks,
`ask`, a server with one request running) `AotDecode` removes it: `Transformer.decode_masked`
(every block, the final norm and head) is exported whole with torch.export, the attended
length L and the cache length S as dynamic dimensions, and compiled by AOTInductor into one
shared library. A step is then one call from Python with the token, its position, the mask and
the cache tensors; the kernels are the ones torch.compile generates (SmolLM2-135M's logits
equal the per-block step's bit for bit), so this changes speed, not numbers.

- Weights stay out of the library (`package_constants_in_so=False`): the runner reads the
  model's own tensors (`load_constants(..., user_managed=True)`: no copy, no second 540 MB). The
  package depends on the model's structure only (config, layer classes, tensor names, dtypes,
  shapes), not on its values, so one package serves every model of the same shape (each
  fine-tune of a base).
- Packages are cached on disk (`cache_dir()`: $LMFORGE_CACHE_DIR, else $XDG_CACHE_HOME/lmforge,
  else ~/.cache/lmforge), under a key over that structure, the torch version, lmforge's model
  code, the thread count and the CPU (inductor compiles with -march=native): the first step
  costs an export and a C++ compile (~45-55 s for SmolLM2-135M on one core), later processes
  load the package in ~0.01 s (`_Runner`). A package is native code: the cache must be
  writable only by its user, as inductor's own. It is written to a temporary name and renamed:
  never half a file.
- Threads: a package is compiled for the thread count of the first step (serial kernels for
  one thread; for more, kernels that follow the count of the moment, `_export`), and runs
  correctly at any count. A later step at another count (the thread governor's, on a busy
  machine) loads that count's package where one is cached, else runs the one it has: no
  minute-long stall mid-stream (`AotDecode.ready`).
- Not for: batches of several rows (serve's batched steps keep `compile_blocks`), models with
  LoRA layers (their adapters are switched per request or toggled; an export would freeze
  one state), a model off the CPU. Those, and any step where the build failed (one warning),
  take `compile_blocks`' path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .hardware import cpu_flags
from .lora import LoRALinear, MultiLoRALinear
from .model import Transformer
from .util import FILE_MODE, cache_root, console, fsync_dir, warn

# The files whose code the exported step runs (a change in any of them is another package).
_SOURCES = ("model.py", "quant.py", "aot.py")


def cache_dir() -> Path:
    """Where packages are kept: `util.cache_root()`/aot."""
    return cache_root() / "aot"


def supported(model: Transformer) -> bool:
    """Whether `AotDecode` can serve this model: on the CPU, with no LoRA layer."""
    return (model.model.embed_tokens.weight.device.type == "cpu"
            and not any(isinstance(m, (LoRALinear, MultiLoRALinear)) for m in model.modules()))


class _Step(nn.Module):
    """What is exported: `Transformer.decode_masked` (its tensors are this module's under "m.")."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.m = model

    def forward(self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
        torch._check(mask.shape[-1] <= k[0].shape[2])  # L <= S: what `Transformer.decode` checks
        return self.m.decode_masked(idx, positions, mask, k, v)


def _tensors(step: _Step) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the step by name, tied ones under each of their names."""
    named: dict[str, torch.Tensor] = dict(step.named_parameters(remove_duplicate=False))
    named.update(step.named_buffers(remove_duplicate=False))
    return named


def package_key(model: Transformer, threads: int) -> str:
    """sha256 over what the compiled library depends on: the model's structure (not its values),
    lmforge's code for it, torch, the thread count and the CPU."""
    here = Path(__file__).parent
    parts: dict[str, Any] = {
        "torch": torch.__version__,
        "code": [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _SOURCES],
        "config": dataclasses.asdict(model.cfg),
        "modules": [(name, type(m).__qualname__) for name, m in model.named_modules()],
        "tensors": [(name, str(t.dtype), list(t.shape), list(t.stride()))
                    for name, t in _tensors(_Step(model)).items()],
        "threads": threads,
        "cpu": [platform.machine(), torch.backends.cpu.get_cpu_capability(), sorted(cpu_flags())],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _export(model: Transformer, path: Path, threads: int) -> None:
    """torch.export of the step on a small cache (S = 4, L = 3), then AOTInductor into `path`,
    kernels for `threads` threads. Either way they run correctly at any count: one thread gives
    serial kernels (no OpenMP), more give kernels that size their per-thread partial sums by
    the count of the moment (`cpp.dynamic_threads`; the default sizes them at compile time,
    and a step with more threads would write past them)."""
    cfg = model.cfg
    weight = model.model.embed_tokens.weight
    shape = (1, cfg.kv_heads, 4, cfg.head_dim)
    k = [torch.zeros(shape, dtype=weight.dtype) for _ in range(cfg.n_layer)]
    v = [torch.zeros(shape, dtype=weight.dtype) for _ in range(cfg.n_layer)]
    args = (torch.tensor([[1]]), torch.tensor([[2]]), torch.ones(1, 1, 3, dtype=torch.bool), k, v)
    S = torch.export.Dim("S", min=2, max=1 << 24)
    L = torch.export.Dim("L", min=2, max=1 << 24)
    cache = [{2: S}] * cfg.n_layer
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations, nothing a user can act on
        # strict: dynamo traces it, so `model.linear` sees a compiled one-row product and emits its loop
        program = torch.export.export(_Step(model), args, dynamic_shapes=(None, None, {2: L}, cache, cache), strict=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.pt2")  # AOTI wants .pt2
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp,
                inductor_configs={"aot_inductor.package_constants_in_so": False, "cpp.dynamic_threads": threads > 1})
            os.chmod(tmp, FILE_MODE)  # the modes of the files beside it, not mkstemp's private ones
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    fsync_dir(path.parent)


class _Runner:
    """A loaded package: torch's C++ loader (`torch._C._aoti.AOTIModelPackageLoader`), called with
    the step's inputs flat, in `_Step.forward`'s order (idx, positions, mask, k..., v...).

    Not `torch._inductor.aoti_load_package`: that spent ~1 s of each load compiling probe
    programs for a vector-ISA check that only warns (the package key covers the CPU already),
    its module imports dynamo (~0.9 s), and its call parses the call spec and flattens the
    inputs at every step. Where torch's loader is not as 2.13 has it, that function is used."""

    def __init__(self, path: Path) -> None:
        self.public = None
        try:
            # (file, model name as aoti_compile_and_package names it, run single-threaded, runners, device index)
            self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
            self.fqns: list[str] = self.loader.get_constant_fqns()
        except (AttributeError, TypeError):
            self.public = torch._inductor.aoti_load_package(str(path))
            self.fqns = self.public.get_constant_fqns()

    def load_constants(self, tensors: dict[str, torch.Tensor]) -> None:
        """The model's own tensors, by name, read in place (no copy): they must stay the ones given."""
        constants = {name: tensors[name] for name in self.fqns}
        if self.public is not None:
            self.public.load_constants(constants, check_full_update=True, user_managed=True)
        else:  # (constants, use the inactive buffer, check that every constant is given, user managed, copy to device)
            self.loader.load_constants(constants, False, True, True, False)

    def __call__(self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.public is not None:
            return self.public(idx, positions, mask, list(k), list(v))
        return self.loader.boxed_run([idx, positions, mask, *k, *v])[0]


def _runner(model: Transformer, path: Path) -> _Runner:
    """The package at `path`, loaded, reading the model's own tensors (no copy): they must stay the
    ones it was given (inference: nothing replaces a prepared model's weights)."""
    runner = _Runner(path)
    runner.load_constants(_tensors(_Step(model)))
    return runner


class AotDecode:
    """A model's one-row decode step compiled ahead of time, built at its first step (see the
    module doc): `generate.compile_decode` sets one as `model.aot_decode`, and `decode_step`
    runs a step of one row through it (`Transformer.decode(..., masked=aot)`) once `ready`.
    Threads: the first step compiles (or loads) the package for its thread count; a later step
    at another count (the thread governor's) loads that count's package where one is cached and
    otherwise runs the nearest one it has (correct at any count, `_export`) rather than stall
    for a compile. A failed build warns once; every later step then takes `compile_blocks`'
    path."""

    def __init__(self) -> None:
        self.runners: dict[int, Any] = {}  # thread count -> the package's runner
        self.missing: set[int] = set()  # counts met mid-run with no package cached: the nearest runner serves
        self.runner: Any = None  # the one the next step runs
        self.failed = False
        self.path: Path | None = None  # the package last loaded

    def ready(self, model: Transformer) -> bool:
        """Whether the step can run now: picks the runner for this thread count, loading the
        package for this model's key and count where one is cached, compiling one at the first
        step only (see the class doc)."""
        if self.failed:
            return False
        threads = torch.get_num_threads()
        if threads in self.runners:
            self.runner = self.runners[threads]
            return True
        if self.runners and (threads in self.missing or not self.package(model, threads).exists()):
            # a count met mid-run (the thread governor's): not worth a minute's stall; every package
            # runs correctly at any count (`_export`), the nearest one serves. Remembered: the key
            # (hashes and /proc) is not worth computing at every step
            self.missing.add(threads)
            self.runner = self.runners[min(self.runners, key=lambda n: (abs(n - threads), -n))]
            return True
        try:
            self.runner = self.runners[threads] = self._load(model, threads)
        except Exception as e:  # the export's or the compiler's failure, whatever its type
            self.failed = True
            first = (str(e).strip().splitlines() or [""])[0][:200]
            warn(f"could not compile the decode step ahead of time ({type(e).__name__}: {first}); "
                 "decoding with torch.compile's per-block step")
            return False
        return True

    @staticmethod
    def package(model: Transformer, threads: int) -> Path:
        """Where the package of this model's shape for `threads` threads is kept."""
        return cache_dir() / f"decode-{package_key(model, threads)}.pt2"

    def cached(self, model: Transformer) -> bool:
        """Whether a step at this thread count finds its package compiled already."""
        threads = torch.get_num_threads()
        return any(n >= threads for n in self.runners) or self.package(model, threads).exists()

    def _load(self, model: Transformer, threads: int) -> Any:
        self.path = path = self.package(model, threads)
        if path.exists():
            try:
                return _runner(model, path)
            except Exception:  # a package this torch cannot read (damaged outside lmforge): compiled once more
                path.unlink(missing_ok=True)
        with console.status(f"compiling the decode step ahead of time ({threads} thread(s); once per "
                            f"model shape and machine, kept in {path.parent})"):
            _export(model, path, threads)
        return _runner(model, path)

    def __call__(self, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 k: Sequence[torch.Tensor], v: Sequence[torch.Tensor]) -> torch.Tensor:
        """`Transformer.decode_masked`'s logits (1, V) (after `ready`)."""
        return self.runner(idx, positions, mask, k, v)
