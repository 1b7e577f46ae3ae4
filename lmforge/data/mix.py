"""Weighted mixing of inputs at prepare time (`lmforge prepare --mix wiki=0.5,tickets=0.3,code=0.2`).

Names: an input's name is the base name of its path as given on the command line, without its
last extension (`./tickets/` -> tickets, `wiki.jsonl` -> wiki, `src/code` -> code); `input_names`
makes them, and with --mix two inputs with the same name are refused.

Weights are shares of the *train* text in bytes (UTF-8, after hygiene): a weight of 0.5 means half
the bytes of the train split come from that input. The validation split is not mixed (every kept
val document once), so per-input validation figures mean the same with and without --mix.

The rule for running out ("repeat up to a cap, then stop"): with S_i the kept train bytes of
input i and w_i its normalised weight, the mixture's size is

    T = min(sum_i S_i, min_i(max_repeat * S_i / w_i))

i.e. the size of the whole kept corpus, unless some input would then have to be repeated more
than `max_repeat` times (default 4: Muennighoff et al. 2023, "Scaling Data-Constrained Language
Models", find up to ~4 epochs of repeated data almost as good as new data); then the mixture stops
where the first input reaches its cap. Input i is written `r_i = w_i * T / S_i` times: every
document floor(r_i) times, plus once more when its key (a uniform number from its content hash,
independent of the split decision) is below the fractional part, so an input with r_i < 1 is
subsampled. Copies go into rounds (round k holds every document's k-th copy, in corpus order),
so a document's copies are far apart in the token stream.

Everything is a pure function of the content and the settings, and the realised shares (bytes
and tokens per input) are recorded in the manifest beside the targets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..ranges import MIX_MAX_REPEAT

DEFAULT_MAX_REPEAT = 4.0
RULE = ("T = min(kept train bytes, min over inputs of max_repeat * bytes / weight); input i is written "
        "weight * T / bytes times (whole copies, then a hash-chosen subset for the fraction), in rounds")


def base_name(raw: str | os.PathLike) -> str:
    """An input's base name: a directory's name, a file's name without its last extension."""
    p = Path(raw)
    name = Path(os.path.abspath(p)).name  # as given ("." is the current directory's name); links not followed
    return (name if p.is_dir() else (Path(name).stem or name)) or "input"


def input_names(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """One name per input (`base_name`); a repeated name gets -2, -3, ... (--mix refuses repeats)."""
    names: list[str] = []
    for raw in inputs:
        base = base_name(raw)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def parse_mix(spec: str) -> dict[str, float]:
    """'wiki=0.5,tickets=0.3,code=0.2' -> weights normalised to sum to 1 (DataError naming what is wrong)."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise DataError(f"--mix {spec!r}: {part!r} is not NAME=WEIGHT (e.g. --mix wiki=0.5,tickets=0.3,code=0.2)")
        try:
            w = float(value)
        except ValueError:
            raise DataError(f"--mix {spec!r}: the weight of {name!r} is not a number: {value.strip()!r}") from None
        if not math.isfinite(w) or w < 0:
            raise DataError(f"--mix {spec!r}: the weight of {name!r} must be a finite number >= 0, got {value.strip()}")
        if name in weights:
            raise DataError(f"--mix {spec!r}: {name!r} is named twice")
        weights[name] = w
    if not weights:
        raise DataError(f"--mix {spec!r}: no NAME=WEIGHT pairs (e.g. --mix wiki=0.5,tickets=0.3,code=0.2)")
    total = sum(weights.values())
    if total <= 0:
        raise DataError(f"--mix {spec!r}: the weights sum to 0; give at least one input a weight > 0")
    return {n: w / total for n, w in weights.items()}


def check_names(weights: dict[str, float], names: Sequence[str], inputs: Sequence[str | os.PathLike]) -> None:
    """Every --mix name is an input and every input has a weight; names are unique."""
    seen: dict[str, str] = {}
    for raw in inputs:
        name = base_name(raw)
        if name in seen:
            raise DataError(f"--mix: inputs {seen[name]} and {raw} have the same name {name!r} (an input's name is its "
                            f"base name without extension); put one under another directory name")
        seen[name] = str(raw)
    for name in weights:
        if name not in names:
            raise DataError(f"--mix names {name!r}, which is not an input (inputs: {', '.join(names)}; an input's name "
                            f"is its base name without extension)")
    missing = [n for n in names if n not in weights]
    if missing:
        raise DataError(f"--mix gives no weight to input(s) {', '.join(missing)}; name every input (weight 0 leaves one "
                        f"out of the train split)")


def plan(weights: dict[str, float], train_bytes: dict[str, int], max_repeat: float) -> dict[str, Any]:
    """The repeat factor of each input and the mixture's target size (the rule in the module docstring)."""
    MIX_MAX_REPEAT.check("--mix-max-repeat", max_repeat)
    empty = [n for n, w in weights.items() if w > 0 and train_bytes.get(n, 0) == 0]
    if empty:
        raise DataError(f"--mix gives weight to input(s) with no train text left: {', '.join(empty)}; "
                        f"give them weight 0 or check the hygiene report")
    total = sum(train_bytes.get(n, 0) for n, w in weights.items() if w > 0)
    caps = {n: max_repeat * train_bytes[n] / w for n, w in weights.items() if w > 0}
    tightest = min(caps, key=lambda n: (caps[n], n))
    target = min(float(total), caps[tightest])
    repeat = {n: (w * target / train_bytes[n] if w > 0 else 0.0) for n, w in weights.items()}
    return {"target_bytes": target, "repeat": repeat, "capped_by": tightest if caps[tightest] < total else None}


def copies(repeat: float, key: float) -> int:
    """How many times a document of an input with this repeat factor is written (key uniform in [0, 1))."""
    whole = math.floor(repeat)
    return whole + (1 if key < repeat - whole else 0)


def mix_key(u: float) -> float:
    """A uniform number from a document's split hash u, independent of the split (u < val_fraction)
    decision: u's low-order bits (u has 53 significant bits; the split reads its top ones)."""
    return (u * 2.0**24) % 1.0
