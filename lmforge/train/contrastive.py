"""The contrastive stage as a library call: train an embedding model on text pairs in Python.

`train_pairs(pairs, init_from=..., run_dir=...)` writes the pairs as a JSONL file and starts (or
resumes) an ordinary run of the one training loop on it, with `train.objective: contrastive` (the
bundled `embed-cpu` recipe unless another config is given), exactly as

    lmforge train embed-cpu --run-dir RUN --set init.from=MODEL --set data.pairs=RUN.pairs.jsonl

would: the same checks, lock, checkpoints, guard, store and exact resume. The run directory is
then a model: `Embedder.load(run_dir)`, `lmforge embed`, `lmforge index build`. This is the
building block for other stages that shape embeddings with pairs, e.g. SetFit-style
classification (pairs of texts with the same label as positives, docs/embeddings.md).

Trade-off: the pairs go through a file (beside the run directory, not inside it: a refused start
must leave no run directory), so the run records where its data is and a resume re-reads the same
pairs; calling it again with other pairs on the same run directory is refused by the resume check
(the pairs' fingerprint changed). Runs in the calling process's main thread (training turns
SIGINT/SIGTERM into a checkpoint and a stop).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..artifacts import EVENTS_FILE
from ..errors import DataError, LmforgeError
from ..util import atomic_write_text


def pairs_file_for(run_dir: str | os.PathLike) -> Path:
    """Where train_pairs writes a run's pairs by default: RUN.pairs.jsonl beside the run directory."""
    rd = Path(run_dir)
    return rd.parent / f"{rd.name}.pairs.jsonl"


Groups = Sequence[int | Sequence[int]]  # per pair: a group or a list of groups (a text's labels)


def write_pairs(pairs: Iterable[Sequence[str]], path: str | os.PathLike, groups: Groups | None = None, *,
                positive_groups: Groups | None = None, negative_groups: Groups | None = None) -> Path:
    """(query, positive[, negative]) tuples -> a JSONL file of {"query", "positive"[, "negative"][, "group",
    "positive_group", "negative_group"]} (atomically); every tuple has 2 or 3 non-empty strings, all of one
    length. `groups`: per pair, the groups (an integer or a list) of its query, and of its positive unless
    `positive_groups` gives the positive's; `negative_groups`: its negative's. Texts that share a group are
    not each other's in-batch negatives (data/pairs.py)."""
    parts = ("query", "positive", "negative")
    lines, width = [], None
    pairs = list(pairs)
    named = {"group": groups, "positive_group": positive_groups, "negative_group": negative_groups}
    named = {k: v for k, v in named.items() if v is not None}
    if named and "group" not in named:
        raise ValueError("positive_groups and negative_groups need groups (the queries' groups)")
    for name, given in named.items():
        if len(given) != len(pairs):
            raise ValueError(f"{len(given)} {name}s for {len(pairs)} pairs")
    for i, pair in enumerate(pairs):
        if not 2 <= len(pair) <= 3 or not all(isinstance(t, str) and t.strip() for t in pair):
            raise DataError(f"pair {i}: expected 2 or 3 non-empty strings (query, positive[, negative]), got {pair!r}")
        if width is not None and len(pair) != width:
            raise DataError(f"pair {i} has {len(pair)} texts, the pairs before it {width}: give every pair a negative or none")
        width = len(pair)
        record: dict[str, object] = dict(zip(parts, pair))
        for name, given in named.items():
            g = given[i]
            record[name] = int(g) if isinstance(g, (int, np.integer)) else [int(x) for x in g]
        lines.append(json.dumps(record, ensure_ascii=False))
    if len(lines) < 2:
        raise DataError(f"{len(lines)} pair(s): the contrastive stage needs at least 2")
    path = Path(path)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def train_pairs(pairs: Iterable[Sequence[str]], *, init_from: str | os.PathLike, run_dir: str | os.PathLike,
                config: str = "embed-cpu", overrides: Sequence[str] = (), pairs_file: str | os.PathLike | None = None,
                groups: Groups | None = None, positive_groups: Groups | None = None,
                negative_groups: Groups | None = None) -> Path:
    """Train (or resume) the embedding model `run_dir` from `init_from` (a run, checkpoint or model
    directory) on (query, positive[, negative]) text tuples through the training loop; returns
    `run_dir`. `overrides` are `section.key=value` settings as `--set` takes them (train.max_steps=...,
    embed.pooling=mean). `groups`, `positive_groups`, `negative_groups`: see write_pairs (SetFit-style
    pairs from labels). A run that does
    not complete raises LmforgeError naming its exit status."""
    from .start import StartRequest, train_command

    path = write_pairs(pairs, pairs_file if pairs_file is not None else pairs_file_for(run_dir), groups,
                       positive_groups=positive_groups, negative_groups=negative_groups)
    request = StartRequest(config=config, run_dir=str(run_dir),
                           overrides=(f"init.from={init_from}", f"data.pairs={path}", *overrides))
    code = train_command(request)
    if code != 0:
        raise LmforgeError(f"the contrastive run {run_dir} stopped with exit status {code}; see {Path(run_dir) / EVENTS_FILE}")
    return Path(run_dir)


__all__ = ["train_pairs", "write_pairs", "pairs_file_for", "Groups"]
