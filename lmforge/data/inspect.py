"""`lmforge data info / verify / report / inspect`: a prepared dataset, read back for a person.

- info: the manifest's figures (tokens, documents, shards, tokenizer, sources).
- verify: every checksum re-checked (manifest.py `verify_dataset`); each bad file named; exit 1.
- report: what hygiene removed and redacted, per rule and input, and the mixture (`hygiene.report`
  reads the manifest's record; `--examples N` shows the redacted examples recorded at prepare time).
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
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table
from rich.text import Text

from ..errors import DataError
from ..ranges import EXAMPLES, INSPECT_SAMPLES
from ..tokenizer import Tokenizer
from ..util import human_bytes
from ..util import out as results_out  # command results: stdout, every progress mode
from .hygiene import report
from .manifest import SPLITS, document_starts, read_manifest, verify_dataset
from .order import global_batch as batch_ids

if TYPE_CHECKING:  # the loader imports torch: only `inspect` needs it, not info/verify/report
    from .loader import TokenDataset


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
    from .loader import TokenDataset, open_source, require_samples

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


def cmd_report(path: str | os.PathLike, as_json: bool = False, examples: int = 0) -> int:
    """What hygiene removed and redacted, per rule and input, and the mixture (hygiene.report)."""
    EXAMPLES.check("--examples", examples)
    manifest = read_manifest(path)
    rep = report(manifest)
    h = rep["hygiene"]
    if h is not None:
        h["examples"] = {k: v[:examples] for k, v in h["examples"].items()} if examples else {}
    if as_json:
        print(json.dumps({"path": str(path), **rep}, indent=2, ensure_ascii=False))
        return 0
    o = results_out
    if h is None:
        o.print(Text(f"{path}: prepared without hygiene (an lmforge before it existed); re-run prepare to clean it"))
    else:
        s = h["settings"]
        dedup = ("off" if not s["dedup"] else "on (exact only)" if s["near_dup_threshold"] is None
                 else f"on (near-dup threshold {s['near_dup_threshold']})")
        quality = ("on" + (f" (skipping {', '.join(s['skip_rules'])})" if s["skip_rules"] else "")) if s["quality"] else "off"
        libs = ", ".join(f"{k} {v}" for k, v in h["versions"].items())
        o.print(Text(f"dataset {path}: dedup {dedup}, quality {quality}, pii {s['pii']}  ({libs})"))
        t = Table(title="inputs", title_justify="left", header_style="bold")
        for col in ("input", "documents", "bytes", "kept documents", "kept bytes", "removed"):
            t.add_column(col, justify="left" if col == "input" else "right", no_wrap=col == "input")
        for name, c in list(h["inputs"].items()) + [("total", h["total"])]:
            gone = c["documents"] - c["kept_documents"]
            t.add_row(Text(name), str(c["documents"]), human_bytes(c["bytes"]), str(c["kept_documents"]),
                      human_bytes(c["kept_bytes"]), f"{gone} ({gone / max(c['documents'], 1):.1%})")
        o.print(t)
        names = list(h["inputs"])
        if h["removed"]:
            t = Table(title="removed, per rule (documents)", title_justify="left", header_style="bold")
            for col in ("rule", "stage", "documents", "bytes", *names, "what"):
                t.add_column(Text(col), justify="right" if col in ("documents", "bytes", *names) else "left")
            for r in h["removed"]:
                t.add_row(r["rule"], r["stage"], str(r["documents"]), human_bytes(r["bytes"]),
                          *[str(r["by_input"].get(n, {}).get("documents", 0)) for n in names], Text(r["what"]))
            o.print(t)
        else:
            o.print("removed: nothing")
        if h["redacted"]:
            t = Table(title="redacted PII (documents / items)", title_justify="left", header_style="bold")
            for col in ("kind", "documents", "items", *names):
                t.add_column(Text(col), justify="left" if col == "kind" else "right")
            for r in h["redacted"]:
                per = [f"{r['by_input'][n]['documents']} / {r['by_input'][n]['items']}" if n in r["by_input"] else "0"
                       for n in names]
                t.add_row(r["kind"], str(r["documents"]), str(r["items"]), *per)
            o.print(t)
        elif s["pii"] != "keep":
            o.print("redacted: nothing")
        c = h["cross_split"]
        o.print(f"cross-split copies removed: {c['val_dropped_as_copy_of_train']} val document(s) were copies of train "
                f"documents, {c['train_dropped_as_copy_of_val']} train document(s) copies of val documents")
    if rep["mix"]:
        m = rep["mix"]
        t = Table(title=f"mixture (max repeat {m['max_repeat']:g}" + (f", capped by {m['capped_by']}" if m["capped_by"] else "")
                  + ")", title_justify="left", header_style="bold")
        for col in ("input", "weight", "kept train bytes", "repeat", "written bytes", "tokens", "token share"):
            t.add_column(col, justify="left" if col == "input" else "right")
        for name, r in m["inputs"].items():
            t.add_row(Text(name), f"{r['weight']:.3f}", human_bytes(r["kept_train_bytes"]), f"{r['repeat']:.3f}",
                      human_bytes(r["written_bytes"]), str(r["tokens"]), f"{r['token_share']:.3f}")
        o.print(t)
    if h is not None and examples:
        for rule, items in h["examples"].items():
            o.print(Text(f"examples: {rule}", style="bold"))
            for e in items:
                of = f" copy of {e['copy_of']['source']} @ {e['copy_of']['byte_offset']}" if "copy_of" in e else ""
                o.print(Text(f"  {e['source']} @ {e['byte_offset']} ({e['input']}){of}: {e['text']!r}"), soft_wrap=True)
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
