"""Recipes and tasks that ship inside the package, usable by name from anywhere.

The shipped training recipes (`lmforge/configs/*.yaml`), evaluation tasks (`lmforge/tasks/*.jsonl`)
and data sets (`lmforge/datasets/*.jsonl`: `prepare --sft`'s `support-chat`, `classify`'s `stdlib-modules-*`)
are package data, so `pip install .` carries them. In a checkout, `configs` and `tasks` at the
repository root are symlinks to these directories, so the documented paths (`configs/small-cpu.yaml`)
keep working there; anywhere else the bundled file is reached by its name (`small-cpu`, `python-mc`).

Design: `resolve_bundled` is the one place that turns what a user typed into a file: a path that
exists always wins (a local `small-cpu.yaml` shadows nothing by surprise: it is what was named);
otherwise a bare name (no directory part, with or without the suffix) is looked up among the
bundled files; otherwise the error names the path and lists the bundled names. `load_config` and
`load_task` call it, so `lmforge train`, `lmforge eval --tasks`, `eval.tasks` in a config, the
supervisor and quickstart all accept the same things.

Trade-off: the files are found next to this module (`Path(__file__)`) rather than through
`importlib.resources`, because every caller needs a real path on disk (YAML and JSONL readers,
error messages that name `file:line`) and lmforge is never imported from a zip archive.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from .errors import ConfigError, DataError, LmforgeError

Kind = Literal["config", "task", "data"]
HOME = Path(__file__).resolve().parent
# kind -> (directory in the package, file suffix, error class, what the message calls it)
_KINDS: dict[str, tuple[str, str, type[LmforgeError], str]] = {
    "config": ("configs", ".yaml", ConfigError, "config file"),
    "task": ("tasks", ".jsonl", DataError, "task file"),
    "data": ("datasets", ".jsonl", DataError, "input"),
}


def bundled_dir(kind: Kind) -> Path:
    """The package directory holding the bundled files of this kind."""
    return HOME / _KINDS[kind][0]


def bundled_names(kind: Kind) -> list[str]:
    """The names (file stems) of the bundled files of this kind, sorted."""
    folder, suffix = _KINDS[kind][:2]
    return sorted(p.stem for p in (HOME / folder).glob(f"*{suffix}"))


def resolve_bundled(path: str | os.PathLike, kind: Kind) -> Path:
    """The file a user means by `path`: the path itself when it exists, else the bundled file of that
    name (`small-cpu` or `small-cpu.yaml` -> lmforge/configs/small-cpu.yaml); raises ConfigError
    (config) or DataError (task) naming the path and the bundled names when neither exists."""
    folder, suffix, error, what = _KINDS[kind]
    p = Path(path)
    if p.exists():
        return p
    if str(p) == p.name:  # a bare name: no directory part
        candidate = HOME / folder / (p.name if p.name.endswith(suffix) else p.name + suffix)
        if candidate.is_file():
            return candidate
    names = ", ".join(bundled_names(kind)) or "none"
    raise error(f"{what} not found: {p} (or give a bundled one by name: {names})")


__all__ = ["bundled_dir", "bundled_names", "resolve_bundled"]
