"""`lmforge serve BASE --adapter NAME=PATH`: the adapters a server offers on its one base model.

Design
------
`open_adapters` turns the `--adapter` arguments into an `AdapterSet` (lmforge/lora.py) installed
in the served model: each `NAME=PATH` names a LoRA run, a LoRA checkpoint or an adapter directory
(`export --format peft`); a bare `DIR` offers every subdirectory of DIR, each named by its folder.
Everything that can be wrong is found at startup, before the port opens: a path that is not a
LoRA adapter, an adapter trained on another base (refused naming both sha256s), an adapter name
used twice or equal to the base model's name (a request's `model` must pick one thing), and an
adapter_config.json that lmforge cannot compute. Only the small files are read then (manifests,
adapter_config.json); an adapter's weights are read when a request first asks for it, checked
against their recorded sha256 and their names and shapes against the base, and stay loaded until
the least recently used one makes room (`serve.max_adapters`).

Trade-off: an adapter that fails to load at first use (its file changed since startup) fails that
request with a 500 naming it, and the next request tries again; the server and its other adapters
go on.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import Loaded, check_base, expected_shapes, read_adapter_config, read_adapter_tensors, resolve_origin
from ..errors import CheckpointError, LmforgeError
from ..lora import AdapterEntry, AdapterSet, check_adapter, split_tensors


def parse_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """`--adapter` values -> (name, path): NAME=PATH as given, a bare DIR as one per subdirectory."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep:
            if not name.strip() or not path:
                raise LmforgeError(f"--adapter {spec!r}: expected NAME=PATH (a LoRA run or adapter directory) or a "
                                   "directory of adapters")
            out.append((name.strip(), Path(path)))
            continue
        folder = Path(spec)
        if not folder.is_dir():
            raise LmforgeError(f"--adapter {spec}: no such directory; give NAME=PATH, or a directory whose "
                               "subdirectories are adapters")
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not children:
            raise LmforgeError(f"--adapter {spec}: the directory holds no adapter directories")
        out += [(p.name, p) for p in children]
    return out


def open_adapters(base: Loaded, base_name: str, specs: list[str], capacity: int) -> AdapterSet:
    """Check every adapter against the served base (by checksum, shapes at first use) and install
    them in its model; refuses a wrong one naming it."""
    if base.origin.is_adapter:
        raise LmforgeError(f"--adapter serves adapters on a base model, but {base.origin.path} is itself a LoRA adapter "
                           f"(on {base.origin.base_path}); serve that base with --adapter NAME={base.origin.path}")
    entries: dict[str, AdapterEntry] = {}
    origins = {}
    for name, path in parse_specs(specs):
        if name == base_name:
            raise LmforgeError(f"--adapter {name}={path}: {name!r} is the base model's name; a request's \"model\" must "
                               "pick one of them: rename the adapter (or the base with --model-name)")
        if name in entries:
            raise LmforgeError(f"--adapter: the name {name!r} is given twice ({entries[name].path} and {path})")
        try:
            origin = resolve_origin(path)
        except CheckpointError as e:
            raise LmforgeError(f"--adapter {name}={path}: {e}") from None
        if not origin.is_adapter:
            raise LmforgeError(f"--adapter {name}={path}: not a LoRA adapter (whole weights: a run with lora.rank 0 or a "
                               "model); give a LoRA run, checkpoint or adapter directory (export --format peft)")
        check_base(origin, base.origin, base.origin.path)
        entries[name] = AdapterEntry(name, read_adapter_config(origin.path), str(path), origin.model_sha256)
        origins[name] = origin
    shapes = expected_shapes(base.config.model)

    def load(name: str) -> dict:
        origin, entry = origins[name], entries[name]
        tensors = read_adapter_tensors(origin)
        check_adapter(entry.cfg, split_tensors(tensors, entry.path), shapes, entry.path)
        return tensors

    return AdapterSet(base.model, entries, capacity, load)


__all__ = ["parse_specs", "open_adapters"]
