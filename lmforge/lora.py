"""LoRA adapters: train one on a frozen base, save it as PEFT does, merge it, serve many at once.

Design
------
A LoRA adapter adds, to a frozen linear layer y = x W^T, a low-rank update of rank r:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A (r, in), B (out, r)

A starts random (Kaiming-uniform, as PEFT initialises it) and B at zero, so training starts from
the base model's exact outputs. Only A and B train: the optimizer holds them alone (train/optim.py
skips frozen parameters), so its state is a few MB, and a checkpoint holds the adapter and that
state and records the base model by checksum (train/checkpoint.py, artifacts.py).

Names. `LoRALinear` subclasses `nn.Linear` and keeps the base layer's own `weight` Parameter, so
the base weights keep their Hugging Face Llama names (`model.layers.0.self_attn.q_proj.weight`)
and the adapter's are `...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`: PEFT's names without
its `base_model.model.` prefix. `lora.target_modules` names layers as PEFT's `target_modules` does
(q_proj, ..., down_proj). So an adapter is saved as PEFT saves one (`adapter_model.safetensors` with
`base_model.model.<name>.lora_A.weight` keys, `adapter_config.json`), and
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads it onto our Hugging Face export
and computes our logits (tests/test_lora.py). We write our own ~300 lines rather than wrap our
model in PEFT: PEFT renames every parameter (`base_model.model...base_layer.weight`), which
checkpoints, the loader and the server would all have to translate, and its mixed-adapter batches
loop over adapters; PEFT stays a test dependency that proves the files are its own.

Serving many (`AdapterSet`): every adapted layer of the one base model becomes a
`MultiLoRALinear` holding a bank of adapters, A (slots, r_max, in) and B (slots, out, r_max), with
each adapter's alpha / r folded into its B and ranks below r_max padded with zeros (exact: the
padded rows and columns add nothing). Slot 0 is all zeros: the base model. A forward over a batch
whose rows use different adapters gathers each row's A and B and runs two batched matmuls, so
requests for different adapters decode together in one forward (as multi-LoRA servers do; serve/
engine.py sets the rows). Adapters load lazily into the bank's slots, and the least recently used
one that no request holds is replaced when another is needed; a request pins its slot until it
ends.

Trade-offs
----------
- Unmerged adapters cost two small matmuls per adapted layer per forward; merging (W + s B A,
  `merge`) removes that but cannot be undone, so sample/eval/serve keep them separate (the
  reference of DPO is the base with the adapter switched off: `adapters_disabled`), and export
  merges on request (`lmforge export --merge`).
- The serving bank gathers A and B per row (B * r * (in + out) values per layer and step): cheap
  for decode batches of tens of rows at ranks of 8 to 64; a segmented kernel would avoid the copy.
- Only the block's linear layers can be targeted (no embedding or head adapters, no DoRA, no
  rsLoRA scaling, no biases): an adapter_config.json asking for any of those is refused by name.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import LORA_TARGETS, LoraConfig
from .errors import CheckpointError, LmforgeError
from .model import linear

PEFT_PREFIX = "base_model.model."  # what PEFT puts before a model's own parameter names
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


# ---- one adapter, trained or used --------------------------------------------------------------


class LoRALinear(nn.Linear):
    """A frozen base linear layer (its own `weight`, not copied) plus a LoRA adapter (lora_A,
    lora_B). `enabled = False` computes the base layer alone."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, init: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: the base keeps its name and its storage
        self.register_parameter("bias", None)
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)  # (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)  # (out, r)
        nn.init.zeros_(self.lora_B.weight)
        if init:  # PEFT's init: a random A, B = 0 (a loaded adapter skips it: torch's RNG is left alone)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_A.weight)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = linear(x, self.weight)  # the base product as the model's own layers compute it
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def _targets(model: nn.Module, target_modules: list[str] | tuple[str, ...]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every block layer named in target_modules, in order."""
    wanted = set(target_modules)
    out = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if attr in wanted and isinstance(child, nn.Linear) and ".layers." in f".{name}.":
                out.append((module, attr, f"{name}.{attr}"))
    return out


def attach(model: nn.Module, cfg: LoraConfig, *, init: bool = True) -> list[str]:
    """Freeze every weight of `model` and give each target layer a fresh adapter (A random from
    torch's RNG, B = 0: the model computes exactly what it did; init=False: zeros, for an adapter
    about to be loaded). Returns the adapted layers' names. Call it before the optimizer is built
    and before a DDP wrapper."""
    if cfg.rank < 1:
        raise ValueError("attach needs lora.rank >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for parent, attr, name in _targets(model, cfg.target_modules):
        base = getattr(parent, attr)
        if isinstance(base, LoRALinear):
            raise LmforgeError(f"{name} already has an adapter")
        setattr(parent, attr, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, init=init))
        names.append(name)
    if not names:
        raise LmforgeError(f"lora.target_modules {list(cfg.target_modules)} names no layer of this model "
                           f"(valid: {', '.join(LORA_TARGETS)})")
    return names


def adapted(model: nn.Module) -> dict[str, LoRALinear]:
    """The layers of `model` that carry an adapter, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapter(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's names (`base_model.model.<layer>.lora_A.weight`), as
    contiguous CPU tensors: what adapter_model.safetensors holds."""
    out = {}
    for name, m in adapted(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu").contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu").contiguous()
    return out


def split_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT-named adapter tensors -> {layer name: (A (r, in), B (out, r))}; a key that is not a
    LoRA A or B, or a layer with one of the two, is a CheckpointError naming it."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            raise CheckpointError(f"{source}: {key!r} is not a LoRA weight (expected {PEFT_PREFIX}<layer>.lora_A.weight "
                                  "or .lora_B.weight)")
        pairs.setdefault(key[len(PEFT_PREFIX):-len(suffix)], {})[suffix[1:7]] = t
    out = {}
    for layer, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{source}: layer {layer} has {', '.join(ab)} but not both lora_A and lora_B")
        out[layer] = (ab["lora_A"], ab["lora_B"])
    return out


def check_adapter(cfg: LoraConfig, layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """The adapter's layers fit a model whose weight shapes are `shapes` (artifacts.expected_shapes):
    each layer exists and is a target, A is (rank, in), B (out, rank)."""
    for layer, (a, b) in layers.items():
        w = shapes.get(f"{layer}.weight")
        if w is None or layer.rsplit(".", 1)[-1] not in cfg.target_modules:
            raise CheckpointError(f"{source}: the adapter has weights for {layer}, which is not one of its "
                                  f"target_modules {list(cfg.target_modules)} in this model")
        if tuple(a.shape) != (cfg.rank, w[1]) or tuple(b.shape) != (w[0], cfg.rank):
            raise CheckpointError(f"{source}: {layer}'s adapter is A {tuple(a.shape)}, B {tuple(b.shape)}; a rank-{cfg.rank} "
                                  f"adapter of this model's {tuple(w)} weight is A {(cfg.rank, w[1])}, B {(w[0], cfg.rank)}")


def load_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-named adapter tensors into the adapters `attach` gave `model` (names and shapes checked)."""
    layers = split_tensors(tensors, source)
    mine = adapted(model)
    if set(layers) != set(mine):
        raise CheckpointError(f"{source}: the adapter's layers do not fit the model: missing "
                              f"{sorted(set(mine) - set(layers))[:3]}, unexpected {sorted(set(layers) - set(mine))[:3]}")
    with torch.no_grad():
        for name, (a, b) in layers.items():
            m = mine[name]
            if a.shape != m.lora_A.weight.shape or b.shape != m.lora_B.weight.shape:
                raise CheckpointError(f"{source}: {name}'s adapter is A {tuple(a.shape)}, B {tuple(b.shape)}; the model's "
                                      f"is A {tuple(m.lora_A.weight.shape)}, B {tuple(m.lora_B.weight.shape)}")
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, `model` computes its base alone (every adapter off), e.g. DPO's reference model
    without a second copy of the weights; on exit each adapter is as it was."""
    layers = list(adapted(model).values())
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


def merge(base: dict[str, torch.Tensor], cfg: LoraConfig, tensors: dict[str, torch.Tensor],
          source: str = "adapter") -> dict[str, torch.Tensor]:
    """Base weights (lmforge/HF names) with the adapter folded in: W + (alpha / r) B A for each
    adapted layer, computed in float64 and stored in W's dtype. The base dict is not changed."""
    out = dict(base)
    for layer, (a, b) in split_tensors(tensors, source).items():
        key = f"{layer}.weight"
        if key not in out:
            raise CheckpointError(f"{source}: the adapter has weights for {layer}, which the base model does not have")
        w = out[key]
        out[key] = (w.double() + cfg.alpha / cfg.rank * (b.double() @ a.double())).to(w.dtype)
    return out


# ---- adapter_config.json -------------------------------------------------------------------------


def peft_config(cfg: LoraConfig, base: str = "") -> dict[str, Any]:
    """adapter_config.json of an adapter, as PEFT writes it (a LoRA on a causal LM)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(set(cfg.target_modules), key=LORA_TARGETS.index),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


# PEFT options that change what an adapter computes, with the value lmforge computes (anything else is refused)
_PLAIN = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
          "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def config_from_peft(d: dict[str, Any], source: str) -> LoraConfig:
    """An adapter_config.json -> LoraConfig; what lmforge cannot compute is refused naming the key."""
    if d.get("peft_type") != "LORA":
        raise CheckpointError(f"{source}: peft_type is {d.get('peft_type')!r}; lmforge loads LoRA adapters only")
    for key, plain in _PLAIN.items():
        if d.get(key, plain) not in (plain, None, [], {}) and not (plain is None and d.get(key) in ([], {})):
            raise CheckpointError(f"{source}: {key} = {d[key]!r} is not supported (lmforge computes {key} = {plain!r})")
    targets = d.get("target_modules")
    if isinstance(targets, str):
        targets = [targets] if targets in LORA_TARGETS else None  # PEFT reads any other string as a regex
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise CheckpointError(f"{source}: target_modules {d.get('target_modules')!r}: lmforge adapts the block layers "
                              f"{', '.join(LORA_TARGETS)} by name")
    r, alpha, dropout = d.get("r"), d.get("lora_alpha", 8), d.get("lora_dropout", 0.0)
    ok = isinstance(r, int) and not isinstance(r, bool) and r >= 1
    ok = ok and isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
    ok = ok and isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1
    if not ok:
        raise CheckpointError(f"{source}: r must be an integer >= 1, lora_alpha a number > 0 and lora_dropout within "
                              f"[0, 1); got r={r!r}, lora_alpha={alpha!r}, lora_dropout={dropout!r}")
    return LoraConfig(rank=r, alpha=float(alpha), dropout=float(dropout), target_modules=list(targets))


# ---- many adapters on one base (serving) ---------------------------------------------------------


class _Selection(threading.local):
    """The adapter slot of each row of the forward this thread runs (None: the base for every row)."""

    rows: torch.Tensor | None = None  # (B,) int64 slot per row


class MultiLoRALinear(nn.Linear):
    """A frozen base linear layer and a bank of adapters; each row of a batch uses the adapter
    its slot names (`AdapterSet.selected`). Bank: A (S, r_max, in), B (S, out, r_max) with the
    scaling folded into B; slot 0 is zeros (the base)."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, selection: _Selection) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        w = base.weight
        self.register_buffer("bank_A", torch.zeros(slots, rank, self.in_features, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("bank_B", torch.zeros(slots, self.out_features, rank, dtype=w.dtype, device=w.device), persistent=False)
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        y = linear(x, self.weight)
        rows = self.selection.rows
        if rows is None:
            return y
        a = self.bank_A.index_select(0, rows).to(x.dtype)  # (B, r, in): each row's own adapter
        b = self.bank_B.index_select(0, rows).to(x.dtype)  # (B, out, r)
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)).to(y.dtype)


class AdaptersBusy(LmforgeError):
    """Every adapter slot is held by a running or waiting request (HTTP 429: retry later)."""


@dataclass
class AdapterEntry:
    """An adapter a server offers: its settings (from adapter_config.json) and where its weights are."""

    name: str
    cfg: LoraConfig
    path: str  # shown in messages
    sha256: str  # of its weights file: identifies what /v1/models lists


class AdapterSet:
    """Many adapters on one base model: the base's target layers become `MultiLoRALinear`s that
    share `capacity` + 1 slots; adapters load on first use (`load(name)` gives their PEFT-named
    tensors) and the least recently used unpinned one makes room for the next."""

    def __init__(self, model: nn.Module, entries: dict[str, AdapterEntry], capacity: int,
                 load: Callable[[str], dict[str, torch.Tensor]]) -> None:
        if capacity < 1:
            raise LmforgeError(f"the adapter capacity must be >= 1, got {capacity}")
        if has_adapter(model):
            raise LmforgeError("the base model already carries an adapter; serve adapters on a model without one")
        self.entries, self.load = dict(entries), load
        self.capacity = min(capacity, max(len(entries), 1))
        self.rank = max((e.cfg.rank for e in entries.values()), default=1)
        targets = sorted({t for e in entries.values() for t in e.cfg.target_modules}, key=LORA_TARGETS.index)
        self.selection = _Selection()
        self.layers: dict[str, MultiLoRALinear] = {}
        for parent, attr, name in _targets(model, targets or ["q_proj"]):
            layer = MultiLoRALinear(getattr(parent, attr), self.capacity + 1, self.rank, self.selection)
            setattr(parent, attr, layer)
            self.layers[name] = layer
        self.lock = threading.Lock()
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # loaded adapters, least recently used first
        self.pins = [0] * (self.capacity + 1)  # requests holding each slot (slot 0, the base, is never replaced)
        self.loads = 0  # adapters loaded so far (a reload after an eviction counts again)

    def acquire(self, name: str, count: int = 1) -> int:
        """The slot holding adapter `name`, loaded now if it is not, pinned `count` times (one per
        request; each `release`s once when it ends)."""
        with self.lock:
            slot = self.slot_of.get(name)
            if slot is None:
                slot = self._free_slot()
                self._fill(slot, name)
                self.slot_of[name] = slot
            self.slot_of.move_to_end(name)
            self.pins[slot] += count
            return slot

    def release(self, slot: int) -> None:
        if slot:
            with self.lock:
                self.pins[slot] -= 1

    def _free_slot(self) -> int:
        used = set(self.slot_of.values())
        for slot in range(1, self.capacity + 1):
            if slot not in used:
                return slot
        for old, slot in self.slot_of.items():  # least recently used first
            if not self.pins[slot]:
                del self.slot_of[old]
                return slot
        raise AdaptersBusy(f"all {self.capacity} adapter slots are held by requests in flight (serve.max_adapters "
                           f"{self.capacity}); retry later, or serve with a larger --max-adapters")

    def _fill(self, slot: int, name: str) -> None:
        entry = self.entries[name]
        layers = split_tensors(self.load(name), entry.path)
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise CheckpointError(f"{entry.path}: the adapter has weights for {unknown[0]}, not a layer of the served model")
        with torch.no_grad():
            for lname, layer in self.layers.items():
                layer.bank_A[slot].zero_()
                layer.bank_B[slot].zero_()
                if lname in layers:
                    a, b = layers[lname]
                    r = a.shape[0]
                    layer.bank_A[slot, :r] = a
                    layer.bank_B[slot, :, :r] = b * entry.cfg.scaling
        self.loads += 1

    @contextlib.contextmanager
    def selected(self, slots: list[int]) -> Iterator[None]:
        """Forwards on this thread inside use adapter slots[b] for row b (all 0: the base alone)."""
        if not any(slots):
            yield
            return
        device = next(iter(self.layers.values())).bank_A.device
        self.selection.rows = torch.tensor(slots, dtype=torch.long, device=device)
        try:
            yield
        finally:
            self.selection.rows = None

    def loaded(self) -> list[str]:
        with self.lock:
            return list(self.slot_of)


__all__ = ["PEFT_PREFIX", "LoRALinear", "MultiLoRALinear", "attach", "adapted", "has_adapter", "adapter_tensors",
           "split_tensors", "check_adapter", "load_adapter", "adapters_disabled", "merge", "peft_config",
           "config_from_peft", "AdapterEntry", "AdapterSet", "AdaptersBusy"]
