"""The dataset format: what manifest.json holds, reading it back, and verifying a dataset by it.

A prepared dataset (data/<name>/) is tokenizer.json, token shards (train-00000.bin, val-00000.bin,
...) and manifest.json, which records the format version, the tokenizer's sha256, the token dtype,
per split the shards with their token counts and sha256, the sources, and a document index (rows of
INDEX_COLUMNS). An SFT dataset (format 2, `"kind": "sft"`, written by data/sft.py) also has a loss
mask per token: `<split>-NNNNN.mask.bin` beside each token shard, one byte per token (1: trained),
with its sha256 in the shard's `mask` entry. A preference dataset (format 3, `"kind": "dpo"`, written
by data/preferences.py) has the same masks; its documents come in pairs, chosen then rejected. prepare.py writes it; loader.py, inspect.py, quickstart and the trainer read it
through `read_manifest`, and `verify_dataset` re-checks every checksum it records.

The `fingerprint` is a short hash of what decides the train token stream (tokenizer, dtype, train
shards and their masks): a run stores it and refuses to resume on data that changed under it.
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

FORMAT_VERSION = 1  # what prepare writes for text corpora
SFT_FORMAT_VERSION = 2  # loss masks beside the shards: an older lmforge refuses it instead of ignoring them
DPO_FORMAT_VERSION = 3  # documents in (chosen, rejected) pairs: an older lmforge refuses it instead of reading a stream
READABLE_VERSIONS = (FORMAT_VERSION, SFT_FORMAT_VERSION, DPO_FORMAT_VERSION)
MASK_SUFFIX = ".mask.bin"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
INDEX_COLUMNS = ["split", "shard", "offset", "source", "byte_offset"]  # one document index row


def fingerprint(tokenizer_sha256: str, dtype: str, train_shards: Sequence[dict[str, Any]]) -> str:
    """A short hash of everything that decides the train token stream."""
    h = hashlib.sha256(f"{tokenizer_sha256}|{dtype}".encode())
    for s in train_shards:
        h.update(f"|{s['sha256']}:{s['tokens']}".encode())
        if "mask" in s:  # only then: a dataset without masks keeps the fingerprint it always had
            h.update(f"|mask:{s['mask']['sha256']}".encode())
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
    if version not in READABLE_VERSIONS:
        raise DataError(f"{mpath}: dataset format version {version!r}, this lmforge reads "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; re-run prepare")
    return manifest


def document_starts(manifest: dict[str, Any], split: str) -> np.ndarray:
    """(D,) int64: the position of each document of `split` in its token stream (document index
    rows are in stream order), for cutting a stream into documents."""
    split_id = manifest["document_index"]["splits"].index(split)
    rows = np.array([r[1:3] for r in manifest["document_index"]["rows"] if r[0] == split_id], dtype=np.int64).reshape(-1, 2)
    shard_starts = np.cumsum([0] + [s["tokens"] for s in manifest["splits"][split]["shards"]])
    return shard_starts[rows[:, 0]] + rows[:, 1]


def input_names(manifest: dict[str, Any]) -> list[str]:
    """The names of the inputs a dataset was prepared from (`prepare A B C`: mix.input_names), in
    order; [] for a dataset that does not record them (SFT and preference data)."""
    return [str(i["name"]) for i in manifest.get("inputs") or []]


def document_inputs(manifest: dict[str, Any], split: str) -> np.ndarray:
    """(D,) int64: the input each document of `split` came from (an index into `input_names`), in
    stream order, beside `document_starts` (the document index's source -> that source's input)."""
    split_id = manifest["document_index"]["splits"].index(split)
    of_source = np.array([int(s.get("input", 0)) for s in manifest["sources"]] or [0], dtype=np.int64)
    rows = np.array([r[3] for r in manifest["document_index"]["rows"] if r[0] == split_id], dtype=np.int64)
    return of_source[rows]


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
            if "mask" in shard:
                m = root / shard["mask"]["file"]
                if not m.is_file():
                    problems.append(f"{shard['mask']['file']}: missing")
                elif m.stat().st_size != shard["tokens"]:
                    problems.append(f"{shard['mask']['file']}: {m.stat().st_size} bytes, manifest says {shard['tokens']}")
                elif sha256_file(m) != shard["mask"]["sha256"]:
                    problems.append(f"{shard['mask']['file']}: sha256 mismatch (the loss mask is corrupt; re-run prepare)")
    if not problems:
        expected = fingerprint(manifest["tokenizer_sha256"], manifest["dtype"], manifest["splits"]["train"]["shards"])
        if expected != manifest.get("fingerprint"):
            problems.append(f"{MANIFEST_FILE}: fingerprint {manifest.get('fingerprint')} does not match its shards ({expected})")
    return problems
