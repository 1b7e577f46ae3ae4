"""The dataset format: what manifest.json holds, reading it back, and verifying a dataset by it.

A prepared dataset (data/<name>/) is tokenizer.json, token shards (train-00000.bin, val-00000.bin,
...) and manifest.json, which records the format version, the tokenizer's sha256, the token dtype,
per split the shards with their token counts and sha256, the sources, and a document index (rows of
INDEX_COLUMNS). prepare.py writes it; loader.py, inspect.py, quickstart and the trainer read it
through `read_manifest`, and `verify_dataset` re-checks every checksum it records.

The `fingerprint` is a short hash of what decides the train token stream (tokenizer, dtype, train
shards): a run stores it and refuses to resume on data that changed under it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from ..tokenizer import TOKENIZER_FILE, Tokenizer
from ..util import sha256_file

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
INDEX_COLUMNS = ["split", "shard", "offset", "source", "byte_offset"]  # one document index row


def fingerprint(tokenizer_sha256: str, dtype: str, train_shards: Sequence[dict[str, Any]]) -> str:
    """A short hash of everything that decides the train token stream."""
    h = hashlib.sha256(f"{tokenizer_sha256}|{dtype}".encode())
    for s in train_shards:
        h.update(f"|{s['sha256']}:{s['tokens']}".encode())
    return h.hexdigest()[:16]


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the dataset at `path`; DataError when there is none, it is corrupt, or it
    is of another format version."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"dataset not found: {root}")
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise DataError(f"not a prepared dataset: {root} has no {MANIFEST_FILE} (create one with `lmforge prepare`)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"corrupt manifest: {mpath} ({str(e) or 'nested too deeply'})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{mpath}: dataset format version {version!r}, this lmforge reads {FORMAT_VERSION}; re-run prepare")
    return manifest


def verify_dataset(path: str | os.PathLike) -> list[str]:
    """Re-check the tokenizer hash and every shard's size and sha256; returns the problems found."""
    root = Path(path)
    try:
        manifest = read_manifest(root)
    except DataError as e:
        return [str(e)]
    try:
        return _check_files(root, manifest)
    except (KeyError, TypeError, ValueError) as e:
        return [f"{MANIFEST_FILE}: malformed ({type(e).__name__}: {e}); re-run prepare"]


def _check_files(root: Path, manifest: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    try:
        sha = Tokenizer.load(root / manifest["tokenizer"]).sha256
        if sha != manifest["tokenizer_sha256"]:
            problems.append(f"{TOKENIZER_FILE}: sha256 {sha[:12]}… does not match the manifest ({manifest['tokenizer_sha256'][:12]}…)")
    except DataError as e:
        problems.append(str(e))
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            f = root / shard["file"]
            if not f.is_file():
                problems.append(f"{shard['file']}: missing")
                continue
            size = f.stat().st_size
            if size != shard["tokens"] * itemsize:
                problems.append(f"{shard['file']}: {size} bytes, manifest says {shard['tokens'] * itemsize}")
            elif sha256_file(f) != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 mismatch (the shard is corrupt; re-run prepare)")
    if not problems:
        expected = fingerprint(manifest["tokenizer_sha256"], manifest["dtype"], manifest["splits"]["train"]["shards"])
        if expected != manifest.get("fingerprint"):
            problems.append(f"{MANIFEST_FILE}: fingerprint {manifest.get('fingerprint')} does not match its shards ({expected})")
    return problems
