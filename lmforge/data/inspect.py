"""`lmforge data info / verify / inspect`: a prepared dataset, read back for a person.

- info: the manifest's figures (tokens, documents, shards, tokenizer, sources).
- verify: every checksum re-checked (manifest.py `verify_dataset`); each bad file named; exit 1.
- inspect: which documents (source file + byte offset) and text a data step reads. The step's
  sample ids come from the same pure function the loader uses (order.py), each sample's tokens from
  the same source (a window of the stream, a row of whole SFT examples, or a preference pair: loader.py
  `open_source`), traced through the document index back to its sources (`DocumentIndex`,
  `trace`). `--show-mask` shows each sample whole with the tokens it trains on marked (the loss
  mask exactly as the loader applies it: `TokenDataset.trained_targets`).

This module sits above the loader (it opens the token stream) and the manifest; nothing below it
imports it, which is what keeps loader.py and prepare.py free of each other.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from ..errors import DataError
from ..ranges import INSPECT_SAMPLES
from ..tokenizer import Tokenizer
from ..util import human_bytes
from ..util import out as results_out  # command results: stdout, every progress mode
from .loader import TokenDataset, open_source, require_samples
from .manifest import SPLITS, document_starts, read_manifest, verify_dataset
from .order import global_batch as batch_ids


def cmd_verify(path: str | os.PathLike) -> int:
    """Print the verdict; 0 when every checksum matches, 1 otherwise (each bad file named).

    A path that is not a dataset at all raises DataError (exit 2), like any other bad input.
    """
    manifest = read_manifest(path)
    problems = verify_dataset(path)
    if not problems:
        n = sum(len(manifest["splits"][s]["shards"]) for s in SPLITS)
        results_out.print(f"[green]ok[/] {path}: tokenizer and {n} shard(s) match the manifest")
        return 0
    for p in problems:
        results_out.print(f"[bold red]bad:[/] {p}", soft_wrap=True)
    return 1


def cmd_info(path: str | os.PathLike, as_json: bool = False) -> int:
    manifest = read_manifest(path)
    splits = manifest["splits"]
    summary = {
        "path": str(path),
        "fingerprint": manifest["fingerprint"],
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "vocab_size": manifest["vocab_size"],
        "dtype": manifest["dtype"],
        "eos_id": manifest["eos_id"],
        **{f"{s}_{k}": splits[s][k] for s in SPLITS for k in ("tokens", "documents")},
        **{f"{s}_shards": len(splits[s]["shards"]) for s in SPLITS},
        "sources": len(manifest["sources"]),
        "source_bytes": sum(s["bytes"] for s in manifest["sources"]),
        "skipped": len(manifest["skipped"]),
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(title=f"dataset {path}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, human_bytes(value) if key == "source_bytes" else str(value))
    results_out.print(table)
    return 0


@dataclass
class DocumentIndex:
    """Document index of one split, for tracing a token position of its stream to its source."""

    starts: np.ndarray  # (D,) int64: token position of each document in the split's stream
    sources: np.ndarray  # (D,) int64
    byte_offsets: np.ndarray  # (D,) int64

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], split: str) -> "DocumentIndex":
        split_id = manifest["document_index"]["splits"].index(split)
        rows = np.array([r for r in manifest["document_index"]["rows"] if r[0] == split_id], dtype=np.int64).reshape(-1, 5)
        return cls(document_starts(manifest, split), rows[:, 3], rows[:, 4])

    def document_at(self, position: int) -> int:
        return bisect.bisect_right(self.starts, position) - 1


def trace(ds: TokenDataset, index: DocumentIndex, nbytes: np.ndarray, start: int, length: int) -> list[dict[str, Any]]:
    """Documents overlapped by train tokens [start, start + length), with where the window enters each.

    `byte_offset` is exact for text files (a byte-level token's bytes are source bytes, so the
    document's tokens before the window add their byte lengths); for JSONL it is the line start.
    """
    out = []
    d = index.document_at(start)
    while d < len(index.starts) and index.starts[d] < start + length:
        doc_start = int(index.starts[d])
        src = ds.manifest["sources"][int(index.sources[d])]
        first = max(start, doc_start)  # first window token inside document d
        offset = int(index.byte_offsets[d])
        if src["kind"] == "text" and first > doc_start:
            offset += int(nbytes[ds.window(doc_start, first - doc_start)].sum())
        out.append({"source": src["path"], "byte_offset": offset, "kind": src["kind"]})
        d += 1
    return out


def cmd_inspect(
    path: str | os.PathLike,
    step: int,
    seq_len: int,
    global_batch: int,
    seed: int = 0,
    as_json: bool = False,
    max_chars: int = 200,
    max_samples: int | None = None,
    show_mask: bool = False,
    packing: bool = True,
) -> int:
    """Show which documents (source file + byte offset) and text a data step reads: all of its
    samples, or the first `max_samples`; a step of more than INSPECT_SAMPLES.hi needs max_samples
    (each sample is traced, so the work is bounded by it, not by the global batch). With
    `show_mask`, each sample whole with its trained tokens marked."""
    limit = int(INSPECT_SAMPLES.hi or 0)
    if max_samples is None and global_batch > limit:
        raise DataError(f"a step of global batch {global_batch:,} reads {global_batch:,} samples; data inspect traces at "
                        f"most {limit:,} at once: pass --max-samples N (up to {limit:,}) to see the first N")
    if max_samples is not None:
        INSPECT_SAMPLES.check("--max-samples", max_samples)
    ds = TokenDataset(path)
    source = open_source(ds, seq_len=seq_len, document_mask="false", packing=packing)
    n = require_samples(source)
    ids = batch_ids(step, seed=seed, n_samples=n, global_batch=global_batch)[:max_samples]
    tok = Tokenizer.load(ds.tokenizer_path)
    index = DocumentIndex.from_manifest(ds.manifest, "train")
    nbytes = tok.token_nbytes()
    samples = []
    for sample, (start, length) in zip(ids.tolist(), source.spans(ids)):
        window = ds.window(start, length)
        docs = trace(ds, index, nbytes, start, length)
        record: dict[str, Any] = {"sample": sample, "token_start": start, "documents": docs}
        if show_mask:
            trained = [False] + ds.trained_targets(start, length).tolist()  # the first token is no one's target
            record |= {"tokens": window.tolist(), "mask": [int(t) for t in trained],
                       "segments": mask_segments(tok, window, trained)}
        else:
            record["text"] = tok.decode(window)[:max_chars]
        samples.append(record)
    epoch = step * global_batch // n
    what = {"sft": f"rows of whole examples, at most {seq_len + 1} tokens",
            "dpo": f"preference pairs, each its chosen then its rejected sequence of at most {seq_len + 1} tokens"}.get(
                ds.kind, f"samples of {seq_len + 1} tokens")
    if as_json:
        print(json.dumps({"step": step, "epoch": epoch, "n_samples": n, "samples": samples}, indent=2, ensure_ascii=False))
        return 0
    shown = f"; the first {len(samples):,} of its {global_batch:,}" if len(samples) < global_batch else ""
    table = Table(title=f"step {step} (epoch {epoch}, {n} {what}{shown})")
    for col in ("sample", "source @ byte offset", "text"):
        table.add_column(col, overflow="fold")
    for s in samples:
        where = "\n".join(f"{d['source']} @ {d['byte_offset']}" for d in s["documents"])
        table.add_row(str(s["sample"]), where, marked_text(s["segments"]) if show_mask else repr(s["text"]))
    results_out.print(table)
    if show_mask:
        results_out.print("trained tokens: [bold]bold[/]; not trained: [dim]⟦dim, in brackets⟧[/]")
    return 0


def mask_segments(tok: Tokenizer, tokens: np.ndarray, trained: list[bool]) -> list[dict[str, Any]]:
    """Runs of consecutive tokens with the same flag, decoded: [{"text", "trained"}, ...]."""
    out: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(trained) + 1):
        if i == len(trained) or trained[i] != trained[start]:
            out.append({"text": tok.decode(tokens[start:i]), "trained": bool(trained[start])})
            start = i
    return out


def marked_text(segments: list[dict[str, Any]]) -> Text:
    """Trained text bold, untrained dim between ⟦ ⟧ (visible without colours too)."""
    text = Text()
    for seg in segments:
        if seg["trained"]:
            text.append(seg["text"], style="bold")
        else:
            text.append(f"⟦{seg['text']}⟧", style="dim")
    return text
