"""Texts -> vectors from an lmforge model: pooling and batched, deterministic embedding.

Design
------
A vector is a pooled read of the model's final-normed hidden states (`Transformer.hidden_states`,
the input of lm_head; HF's `last_hidden_state`), so the same weights serve generation and
embedding, and an exported model gives the same vectors in sentence-transformers.

- `Pooling` is what turns (T, C) token states into one (C,) vector, recorded with the model as the
  config's `embed:` section (lmforge/config.py), so a run, a checkpoint and a model directory carry
  it: `mean` (padding excluded), `last` (the last real token), `weighted_mean` (token t of L weighs
  t / (1 + ... + L): SGPT's position weighting, sentence-transformers' `weightedmean`), optional L2
  normalisation, optional bidirectional attention, and the prefixes put before queries and
  documents. The default (`weighted_mean`) was chosen by measurement on a raw model (SmolLM2-135M
  on the bundled retrieval task: nDCG@10 0.087 weighted_mean, 0.072 mean, 0.016 last; a causal
  model's early tokens have seen little, and its first token's state is an outlier that a plain
  mean lets dominate): docs/embeddings.md has the figures.
- `pool` is one pure function of (hidden states, padding mask, method), used by inference here and
  by the contrastive objective in training, so the two cannot drift apart.
- Batching: texts are tokenized once, sorted by length (longest first, ties by input order) and
  cut into batches (`plan_batches`) of at most `batch_size` texts and, on a CPU, at most
  BATCH_TOKENS_CPU (1,024) padded tokens, so a batch pads little and its activations stay in the
  core's caches between the ~20 passes a block makes over them (measured: batches of 32 texts of
  ~100 tokens ran at 50 % of the matmul peak for the small-cpu shape, 1,024-token batches at 67 %;
  SmolLM2-135M 74 -> 78 %; docs/embeddings.md "Speed"); the output is put back in input order.
  `compile=True` runs the blocks through torch.compile (`model.compile_blocks`), for long jobs.
  Rows are right-padded: with causal attention the real tokens never see the padding after
  them, so no mask is needed in the forward and the fused causal kernel runs; pooling masks the
  padding out. A bidirectional pass gives the forward a (B, T, T) mask whose keys are the real
  tokens only.
- Truncation: a text longer than `max_len` tokens (default: the model's max_seq_len) keeps its
  first `max_len` tokens (the prefix included). `lmforge embed` reports how many were cut; an
  index chunks documents to fit, so it never relies on this; the server refuses such an input.
- Determinism: tokenization, the sort and the batch shapes are functions of the input list, and
  CPU kernels are deterministic for the same shapes and thread count, so the same texts through
  the same model give the same vectors bit for bit on the same machine and threads. A text's
  vector does depend in the last float bits on the batch it shared (GEMM blocking depends on the
  batch shape); tests check a text alone against the same text in a padded batch to 1e-5.
- Precision: bf16 autocast only where bf16 is native (CUDA; a CPU with AMX or AVX512-BF16).
  On an AVX2-only CPU bf16 is emulated and measured ~20x slower than fp32, so "auto" is fp32 there.
  Pooling and normalisation run in fp32 either way; the output is float32. The rule is
  `hardware.auto_dtype`, the one `train.dtype: auto` follows.

Trade-offs: one forward per batch holds (B, T, C) hidden states and, bidirectionally, a (B, T, T)
mask, both small next to the model; `fingerprint()` identifies the model by its weights' sha256
(recorded in its manifest, not recomputed), its tokenizer, the pooling and the dimension, which is
what an index or classifier directory records and compares.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..config import POOLINGS, EmbedConfig
from ..errors import ConfigError, DataError
from ..threads import Governor, govern

if TYPE_CHECKING:
    import torch

    from ..artifacts import Loaded

Kind = Literal["document", "query"]
KINDS = ("document", "query")
DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Pooling:
    """How a model's token states become one vector, and what is put before a query or a document."""

    method: str = "weighted_mean"  # mean | last | weighted_mean (the config's default)
    normalize: bool = True  # L2 norm 1 (dot product = cosine)
    bidirectional: bool = False  # attend both ways in embedding passes
    query_prefix: str = ""
    document_prefix: str = ""

    def __post_init__(self) -> None:
        if self.method not in POOLINGS:
            raise ConfigError(f"pooling method must be one of {', '.join(POOLINGS)}; got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pooling:
        """The inverse of to_dict; unknown keys and wrong types are a ConfigError naming them."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"pooling: unknown key(s) {unknown} (valid: {', '.join(known)})")
        for k, v in d.items():
            want = bool if k in ("normalize", "bidirectional") else str
            if not isinstance(v, want):
                raise ConfigError(f"pooling.{k}: expected {want.__name__}, got {v!r}")
        return cls(**d)

    @classmethod
    def from_config(cls, embed: EmbedConfig) -> Pooling:
        """The pooling a model's config records (its `embed:` section)."""
        return cls(embed.pooling, embed.normalize, embed.bidirectional, embed.query_prefix, embed.document_prefix)

    def prefix(self, kind: str) -> str:
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        return self.query_prefix if kind == "query" else self.document_prefix


# ---- pure functions ------------------------------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """hidden (B, T, C), mask (B, T) bool (True: a real token; each row has at least one, and the
    real tokens come first) -> (B, C) fp32 pooled vectors, padding excluded."""
    import torch

    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    if method == "mean":
        return (h * m).sum(dim=1) / m.sum(dim=1)
    if method == "weighted_mean":  # token t (1-based) of a row weighs t; padding 0
        w = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1) * m  # (B, T, 1)
        return (h * w).sum(dim=1) / w.sum(dim=1)
    if method == "last":
        last = mask.long().sum(dim=1) - 1  # (B,) index of each row's last real token
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ConfigError(f"pooling method must be one of {', '.join(POOLINGS)}; got {method!r}")


def finish(vectors: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pooled vectors (B, C) -> what the model emits: L2-normalised when the pooling says so."""
    import torch.nn.functional as F

    return F.normalize(vectors, dim=-1) if pooling.normalize else vectors


def padding_masks(lengths: torch.Tensor, T: int, bidirectional: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask (B, T) bool of real tokens, the forward's attn_mask): None for causal attention
    (right padding never reaches the real tokens before it), else (B, T, T) True where the key is
    a real token (every query row, padding ones included, sees at least one key: no NaN)."""
    import torch

    mask = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
    if not bidirectional:
        return mask, None
    return mask, mask[:, None, :].expand(-1, T, -1)  # (B, T, T)


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """"fp32" or "bf16" for a requested dtype (None or "auto": `hardware.auto_dtype`, the rule
    `train.dtype: auto` follows: bf16 where the device multiplies bf16 natively, else fp32)."""
    from ..hardware import auto_dtype

    dtype = dtype or "auto"
    if dtype not in DTYPES:
        raise ConfigError(f"embedding dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return auto_dtype(device) if dtype == "auto" else dtype


def fingerprint_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None when two fingerprints name the same model, tokenizer, pooling and dimension; else what
    differs, for a one-line refusal ("model sha256 1a2b3c4d... here, 5e6f7a8b... recorded")."""
    diffs = []
    for key in sorted(set(recorded) | set(current)):
        a, b = current.get(key), recorded.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"pooling.{k} {a.get(k)!r} here, {b.get(k)!r} recorded" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]
        elif key.endswith("sha256"):
            diffs.append(f"{key.replace('_', ' ')} {str(a)[:12]}... here, {str(b)[:12]}... recorded")
        else:
            diffs.append(f"{key} {a!r} here, {b!r} recorded")
    return "; ".join(diffs) or None


# ---- the embedder --------------------------------------------------------------------------------


BATCH_TOKENS_CPU = 1024  # padded tokens per forward on a CPU; measured in docs/embeddings.md "Speed"


def plan_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of each batch over texts of `lengths`, sorted longest first: up to batch_size
    texts, and with batch_tokens > 0 no more than fit that many padded tokens (count x the first,
    longest, length); a batch always takes at least one text."""
    out, start = [], 0
    while start < len(lengths):
        n = batch_size if batch_tokens <= 0 else max(1, min(batch_size, batch_tokens // max(1, lengths[start])))
        out.append((start, min(start + n, len(lengths))))
        start += n
    return out


class Embedder:
    """A loaded model that turns texts into (N, dim) float32 vectors; see the module docstring."""

    def __init__(self, loaded: Loaded, pooling: Pooling | None = None, *, batch_size: int = 32,
                 dtype: str | None = None, max_len: int | None = None, batch_tokens: int | None = None,
                 compile: bool = False) -> None:
        """batch_size: the most texts per forward; batch_tokens: the most padded tokens per forward
        (None: BATCH_TOKENS_CPU on a CPU, no limit elsewhere; 0: no limit); compile: the model's
        blocks through torch.compile (`model.compile_blocks`; the model is changed in place)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        cfg = loaded.model.cfg
        if max_len is not None and not 1 <= max_len <= cfg.max_seq_len:
            raise ConfigError(f"max_len must be within 1..{cfg.max_seq_len} (the model's max_seq_len), got {max_len}")
        self.loaded = loaded
        self.model = loaded.model  # no dropout in the model: train and eval mode compute the same
        self.tokenizer = loaded.tokenizer
        self.pooling = pooling if pooling is not None else Pooling.from_config(loaded.config.embed)
        self.batch_size = batch_size
        self.max_len: int = max_len or cfg.max_seq_len
        self.dim: int = cfg.d_model
        self.device = next(self.model.parameters()).device
        if batch_tokens is not None and batch_tokens < 0:
            raise ConfigError(f"batch_tokens must be >= 0 (0: no token budget), got {batch_tokens}")
        self.batch_tokens = batch_tokens if batch_tokens is not None else (BATCH_TOKENS_CPU if self.device.type == "cpu" else 0)
        if compile:
            from ..model import compile_blocks

            compile_blocks(self.model)
        self.dtype = resolve_dtype(dtype, self.device)

    @property
    def compiled(self) -> bool:
        """The blocks run compiled (compile=True, and compiling has not failed)."""
        from ..model import is_compiled

        return is_compiled(self.model)

    @classmethod
    def load(cls, path: str | os.PathLike, *, pooling: Pooling | None = None, device: Any = None,
             dtype: str | None = None, batch_size: int = 32, max_len: int | None = None,
             batch_tokens: int | None = None, compile: bool = False) -> Embedder:
        """A run, checkpoint or model directory, through the one loader (`artifacts.load_model`)."""
        from ..artifacts import load_model

        return cls(load_model(path, device=device), pooling, batch_size=batch_size, dtype=dtype, max_len=max_len,
                   batch_tokens=batch_tokens, compile=compile)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, config: Any, pooling: Pooling | None = None,
                   **kwargs: Any) -> Embedder:
        """An embedder over a model in memory (evaluation, training). It was not loaded from disk,
        so it has no checksum and no `fingerprint()`."""
        from ..artifacts import Loaded

        return cls(Loaded(model, tokenizer, config, None), pooling, **kwargs)  # type: ignore[arg-type]

    def fingerprint(self) -> dict[str, Any]:
        """What index and classifier directories record and compare to refuse another model."""
        if self.loaded.origin is None:
            raise ConfigError("this embedder's model was not loaded from a run, checkpoint or model directory, "
                              "so there is no checksum to record; load it with Embedder.load(path)")
        return {"model_sha256": self.loaded.origin.model_sha256, "tokenizer_sha256": self.tokenizer.sha256,
                "pooling": self.pooling.to_dict(), "dim": self.dim}

    def tokenize(self, texts: Sequence[str], *, kind: Kind = "document") -> list[list[int]]:
        """Token ids of each text with its kind's prefix, not truncated. An empty text (or one that
        is not a string) is a DataError naming its index: it has nothing to pool."""
        prefix = self.pooling.prefix(kind)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"text {i} is {type(t).__name__}, not a string")
            if not t:
                raise DataError(f"text {i} is empty; an empty text has no tokens to pool (drop it or give it content)")
        return self.tokenizer.encode_batch([prefix + t for t in texts])

    def embed(self, texts: Sequence[str], *, kind: Kind = "document", progress: bool = False) -> np.ndarray:
        """Texts -> (N, dim) float32 vectors in input order; the kind's prefix is put before each."""
        return self.embed_ids(self.tokenize(texts, kind=kind), progress=progress)

    def embed_ids(self, ids: Sequence[Sequence[int]], *, progress: bool = False, governor: Governor | None = None) -> np.ndarray:
        """Token-id lists (no prefix added; each cut to max_len) -> (N, dim) float32 in input order."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for chosen, hidden, mask in self.hidden_batches(ids, progress=progress, governor=governor):
            out[chosen] = finish(pool(hidden, mask, self.pooling.method), self.pooling).cpu().numpy()
        return out

    def hidden_batches(self, ids: Sequence[Sequence[int]], *, progress: bool = False, governor: Governor | None = None
                       ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Per length-sorted batch: (the inputs' indices, hidden states (B, T, C), real-token mask
        (B, T)), computed without gradients under this embedder's precision and attention. Each
        input is cut to max_len; an empty one or a token id outside the vocabulary is a DataError.
        governor: told each batch's time and tokens (lmforge/threads.py: fewer threads while the
        machine is busy; an exact one keeps the vectors those of any other power-of-two count)."""
        import torch

        vocab = self.model.cfg.vocab_size
        for i, row in enumerate(ids):
            if len(row) == 0:
                raise DataError(f"input {i} has no tokens; an empty input has nothing to pool")
            if any(not (isinstance(t, (int, np.integer)) and 0 <= t < vocab) for t in row):
                raise DataError(f"input {i}: token ids must be integers within 0..{vocab - 1}")
        rows = [list(r[: self.max_len]) for r in ids]
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))  # longest first; stable
        bar = _Bar(len(rows)) if progress else None
        try:
            for start, end in plan_batches([len(rows[i]) for i in order], self.batch_size, self.batch_tokens):
                chosen = order[start:end]
                lengths = torch.tensor([len(rows[i]) for i in chosen], device=self.device)
                T = int(lengths.max())
                idx = torch.zeros((len(chosen), T), dtype=torch.long)  # padding id 0: masked, never pooled
                for b, i in enumerate(chosen):
                    idx[b, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                mask, attn = padding_masks(lengths, T, self.pooling.bidirectional)
                t0 = time.perf_counter()
                hidden = self._forward(idx.to(self.device), attn, lengths)  # (B, T, C)
                yield chosen, hidden, mask
                if governor is not None:
                    governor.step(time.perf_counter() - t0, work=int(lengths.sum()))
                if bar is not None:
                    bar.advance(len(chosen), int(lengths.sum()))
        finally:
            if bar is not None:
                bar.close()

    def _forward(self, idx: torch.Tensor, attn: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor:
        """The hidden states of one batch. With compile=True, a first forward whose compilation
        fails (e.g. no C++ compiler here) warns once and runs eagerly (`model.run_compiled`), as
        does every later batch: the same vectors up to float rounding, only slower."""
        import torch

        from ..model import autocast, run_compiled
        from ..util import compile_failed

        def forward() -> torch.Tensor:
            with torch.inference_mode(), autocast(self.dtype, self.device.type):
                return self.model.hidden_states(idx, attn_mask=attn, lengths=lengths)

        return run_compiled(self.model, "forward", forward, compile_failed("embedding"))


class _Bar:
    """A progress bar over texts, showing texts/s and tokens/s (util.progress_bar's modes)."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from ..util import progress_bar

        self.progress = progress_bar(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[texts_per_s]:,.1f} texts/s, {task.fields[tokens_per_s]:,.0f} tokens/s"),
                                     TimeRemainingColumn(), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("embedding", total=total, texts_per_s=0.0, tokens_per_s=0.0, tokens=0)
        self.start, self.tokens, self.texts = time.perf_counter(), 0, 0

    def advance(self, texts: int, tokens: int) -> None:
        self.texts += texts
        self.tokens += tokens
        s = max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, advance=texts, tokens=self.tokens, texts_per_s=self.texts / s,
                             tokens_per_s=self.tokens / s)

    def close(self) -> None:
        self.progress.stop()




# ---- `lmforge embed` ---------------------------------------------------------------------------

OUT_DTYPES = ("float32", "float16")


def ids_path(out: Path) -> Path:
    """The ids that go beside vectors.npy: vectors.ids.jsonl, one {"id": ...} per row, in row order."""
    return out.with_name(out.name.removesuffix(".npy") + ".ids.jsonl")


def write_vectors(out: Path, ids: Sequence[str], vectors: np.ndarray, *, overwrite: bool = False) -> list[Path]:
    """Vectors and their ids, each file written atomically: OUT.npy + OUT.ids.jsonl, or one
    OUT.parquet (columns id, embedding) when pyarrow is importable. Returns the files written."""
    import io
    import json

    from ..util import atomic_write_bytes

    if out.suffix not in (".npy", ".parquet"):
        raise ConfigError(f"--out {out}: name a .npy file (vectors, plus ids in .ids.jsonl beside it) or a .parquet file")
    targets = [out, ids_path(out)] if out.suffix == ".npy" else [out]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; choose another --out or pass --overwrite")
    if out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"--out {out}: parquet needs pyarrow (pip install pyarrow); or write a .npy file") from None
        flat = pa.array(vectors.reshape(-1))
        table = pa.table({"id": pa.array(list(ids), pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(out, buf.getvalue())
        return targets
    atomic_write_bytes(targets[1], "".join(json.dumps({"id": i}, ensure_ascii=False) + "\n" for i in ids).encode("utf-8"))
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    atomic_write_bytes(out, buf.getvalue())
    return targets


def embed_command(model: str, inputs: Sequence[str], out: str, *, kind: str = "document", dtype: str = "float32",
                  batch_size: int = 32, threads: int = 0, max_len: int | None = None, text_field: str = "text",
                  id_field: str = "id", strict: bool = False, overwrite: bool = False, compile: bool = False) -> int:
    """`lmforge embed MODEL INPUTS... --out vectors.npy`: texts (understand/texts.py) -> vectors."""
    import torch

    from ..util import console, out as results_out, warn, writes_to
    from .texts import read_texts

    if dtype not in OUT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(OUT_DTYPES)}; got {dtype!r}")
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: lmforge chooses), got {threads}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    target = Path(out)
    if target.suffix not in (".npy", ".parquet"):
        raise ConfigError(f"--out {out}: name a .npy file (vectors, plus ids in .ids.jsonl beside it) or a .parquet file")
    if not overwrite and target.exists():
        raise ConfigError(f"{target} already exists; choose another --out or pass --overwrite")
    found = read_texts(inputs, text_field=text_field, id_field=id_field, strict=strict)  # before loading a model
    if found.not_utf8:
        names = ", ".join(found.not_utf8[:5]) + (" ..." if len(found.not_utf8) > 5 else "")
        warn(f"skipped {len(found.not_utf8)} file(s) that are not UTF-8: {names} (--strict refuses them)")
    # Powers of two, like training: the vectors do not depend on the count (lmforge/threads.py)
    governor = govern(threads or None, exact=True)
    emb = Embedder.load(model, batch_size=batch_size, max_len=max_len, compile=compile)
    ids = emb.tokenize(found.texts, kind=kind)  # type: ignore[arg-type]
    cut = sum(len(r) > emb.max_len for r in ids)
    console.print(f"embedding {len(ids)} texts from {found.files} file(s) with {model} "
                  f"({emb.pooling.method} pooling, {emb.dtype}, {torch.get_num_threads()} threads"
                  f"{', compiled' if compile else ''})", markup=False)
    start = time.perf_counter()
    vectors = emb.embed_ids(ids, progress=True, governor=governor)
    seconds = time.perf_counter() - start
    with writes_to(target):
        written = write_vectors(target, found.ids, vectors.astype(np.float16 if dtype == "float16" else np.float32),
                                overwrite=overwrite)
    tokens = sum(min(len(r), emb.max_len) for r in ids)
    notes = [f"{cut} cut to {emb.max_len} tokens" if cut else "",
             f"{found.empty} empty skipped" if found.empty else "",
             f"{len(found.not_utf8)} non-UTF-8 file(s) skipped" if found.not_utf8 else ""]
    notes_text = "; ".join(n for n in notes if n)
    results_out.print(f"embedded {len(ids)} texts ({tokens} tokens) in {seconds:.1f}s "
                      f"({len(ids) / max(seconds, 1e-9):.1f} texts/s, {tokens / max(seconds, 1e-9):,.0f} tokens/s) -> "
                      f"{', '.join(map(str, written))}: {len(ids)} x {emb.dim} {dtype}"
                      + (f" ({notes_text})" if notes_text else ""), markup=False)
    return 0


__all__ = ["Pooling", "Embedder", "pool", "finish", "padding_masks", "resolve_dtype",
           "fingerprint_mismatch", "embed_command", "write_vectors", "ids_path", "KINDS", "DTYPES", "OUT_DTYPES"]
