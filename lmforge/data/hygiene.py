"""Corpus hygiene for `lmforge prepare`: quality filters, PII scrubbing, exact and near-duplicate removal.

Each document of a corpus goes through four stages, in this order; the first one that objects
decides, and its rule is what the report counts:

1. **PII** (`--pii redact|drop|keep`, default redact): `lmforge.data.pii.Scrubber` replaces e-mail
   addresses, phone numbers, card numbers, secrets ... by typed placeholders (redact) or marks the
   document to be dropped (drop). Every later stage sees the scrubbed text, so two tickets that
   differ only in the customer's address are duplicates of each other.
2. **Quality** (`--quality on|off`, `--skip-rule NAME`): the rules of `RULES`, heuristics from the
   literature with their sources (Gopher: Rae et al. 2021, "Scaling Language Models: Methods,
   Analysis & Insights from Training Gopher", appendix A.1.1 and table A1; C4: Raffel et al. 2020;
   FineWeb: Penedo et al. 2024; Codex: Chen et al. 2021; StarCoder: Li et al. 2023). Which rules
   apply depends on the document's *genre*: **code** when its file's extension is in
   `CODE_EXTENSIONS`, **prose** otherwise (every JSONL record is prose). Prose rules are the
   Gopher/C4/FineWeb ones; code rules catch minified and generated files; one rule (binary-ish
   content) applies to both. Defaults: a clean code base and clean prose lose < 1 % (docs/data.md
   has the figures, measured on the Python standard library and tinyshakespeare).
3. **Exact duplicates** (`--no-dedup` turns 3 and 4 off): the sha256 of the *normalised* text,
   where normalising collapses every run of whitespace (spaces, tabs, newlines) into one space and
   strips both ends (`normalise`); case and punctuation are kept (code is case-sensitive).
4. **Near duplicates**: MinHash signatures of the set of word 5-grams (words: runs of
   non-whitespace, lower-cased), indexed with `datasketch.MinHashLSH`; a document whose estimated
   Jaccard similarity to an earlier kept document is >= the threshold (default 0.8) is dropped.
   The default follows Lee et al. 2022, "Deduplicating Training Data Makes Language Models
   Better" (NearDup: space-separated 5-grams, MinHash + LSH, pairs above ~0.8 similarity are
   duplicates), as does Gopher (13-grams, Jaccard 0.8).

Deterministic by construction: documents are decided one by one in corpus order (inputs as given,
directories walked in sorted order, documents in file order), so "the first occurrence is kept"
names one document, and the whole outcome is a pure function of (inputs, settings). The
per-document work (scrub, features, hashes, signature: `analyse`) is a pure function too, and runs
in worker processes (`Analyser`) in bounded batches whose results come back in order; only the
decisions (the dedup index) stay in the main process.

Dedup runs across the train/val split: a val document that is a (near) copy of an earlier train
document is dropped, and the other way round, so validation never scores text the model saw; the
report counts these pairs (`cross_split`).

MinHash: datasketch's own `MinHash.update_batch` hashes every shingle with SHA-1 in a Python
loop; here a signature is computed vectorised in numpy (word hashes from a polynomial prefix hash
of the UTF-8 bytes, shingle hashes combined from word hashes, 128 multiply-shift hash functions),
which measured 3-4x faster on the standard library (docs/data.md); the LSH index and its choice
of bands and rows for the threshold are datasketch's (`MinHashLSH`, which needs only
`.hashvalues`). Candidates are confirmed with the signatures' estimated Jaccard, so a band
collision below the threshold does not drop a document.

Memory: the dedup state grows with the number of *kept* documents, not with their size: a 16-byte
digest in a set, a 512-byte signature, and the LSH bands (about 1.5 KB per document in all); a
1 GB corpus of 17 KB documents holds ~60k of them (~100 MB). Everything else streams.

Examples of what was removed or redacted are recorded at prepare time, at most `examples` per rule
(default 10), as short snippets that went through the redacting scrubber whatever `--pii` says,
so `lmforge data report --examples N` never shows a secret (`_snippet`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from difflib import get_close_matches
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError
from ..ranges import EXAMPLES, NEAR_DUP_THRESHOLD, Choice

# ---- genres ----------------------------------------------------------------------------------

# Files whose documents are judged as code (the extension, lower-cased, decides; see docs/data.md).
CODE_EXTENSIONS = frozenset(
    ".py .pyi .pyx .ipynb .c .h .cc .cpp .cxx .hpp .hh .cs .java .kt .kts .scala .go .rs .swift .m .mm "
    ".js .mjs .cjs .jsx .ts .tsx .vue .svelte .php .rb .pl .pm .lua .r .jl .hs .ml .mli .ex .exs .erl .clj "
    ".dart .f .f90 .sh .bash .zsh .fish .ps1 .bat .cmd .sql .css .scss .sass .less .html .htm .xml .xsl "
    ".json .yaml .yml .toml .ini .cfg .conf .properties .gradle .cmake .mk .make .dockerfile .proto "
    ".graphql .tf .hcl .nix .vim .el .lisp .scm .asm .s .v .sv .vhd .tex .bib .csv .tsv".split()
)
CODE_NAMES = frozenset({"makefile", "dockerfile", "cmakelists.txt", "gemfile", "rakefile", "jenkinsfile"})


def genre_of(path: str | os.PathLike, kind: str) -> str:
    """"code" or "prose": code when a text file's extension (or name) is a code one; JSONL is prose."""
    if kind == "jsonl":
        return "prose"
    name = os.path.basename(str(path)).lower()
    return "code" if name in CODE_NAMES or os.path.splitext(name)[1] in CODE_EXTENSIONS else "prose"


# ---- quality rules ---------------------------------------------------------------------------

GOPHER = "Gopher (Rae et al. 2021), appendix A.1.1"
GOPHER_REP = "Gopher (Rae et al. 2021), table A1 (repetition)"
CODEX = "Codex (Chen et al. 2021) and StarCoder (Li et al. 2023)"


@dataclass(frozen=True)
class Rule:
    """A document fails when `feature` is below `low` or above `high` (either may be None).

    min_words: the rule judges only documents of at least this many words. Gopher's ratio and
    repetition rules were made for documents of >= 50 words (its own length rule); on a
    ten-word ticket one number or one repeated line swings a ratio past any threshold, so they
    apply from 50 words on, and shorter documents face only the length and binary rules."""

    name: str
    genre: str  # "prose" | "code" | "any"
    feature: str
    low: float | None
    high: float | None
    source: str
    what: str
    min_words: int = 0

    def fails(self, value: float) -> bool:
        return (self.low is not None and value < self.low) or (self.high is not None and value > self.high)


RATIO_MIN_WORDS = 50  # Gopher's minimum document length: where its ratio rules start to judge


def _ngram_rules() -> list[Rule]:
    top = [Rule(f"top_{n}gram", "prose", f"top_{n}gram", None, t, GOPHER_REP,
                f"characters in the most frequent word {n}-gram > {t:.0%}", RATIO_MIN_WORDS) for n, t in ((2, 0.20), (3, 0.18), (4, 0.16))]
    dup = [Rule(f"dup_{n}gram", "prose", f"dup_{n}gram", None, t, GOPHER_REP,
                f"characters in duplicated word {n}-grams > {t:.0%}", RATIO_MIN_WORDS)
           for n, t in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))]
    return top + dup


# In the order they are checked (cheap features first); the first failing rule is the one reported.
RULES: tuple[Rule, ...] = (
    Rule("binary", "any", "control_chars", None, 0.01, "lmforge (text that decodes as UTF-8 but is not text)",
         "control characters (other than tab, newline, carriage return, form feed) or U+FFFD > 1% of characters"),
    Rule("min_words", "prose", "words", 5, None, "Gopher (>= 50 words), lowered to 5: a ticket or a chat message is short but whole",
         "fewer than 5 words"),
    Rule("max_words", "prose", "words", None, 100_000, GOPHER, "more than 100,000 words"),
    Rule("mean_word_length", "prose", "mean_word_length", 3, 10, GOPHER, "mean word length outside 3..10 characters", RATIO_MIN_WORDS),
    Rule("symbol_ratio", "prose", "symbol_ratio", None, 0.1, GOPHER, "'#' and '...' per word > 0.1", RATIO_MIN_WORDS),
    Rule("bullet_lines", "prose", "bullet_lines", None, 0.9, GOPHER, "more than 90% of lines start with a bullet", RATIO_MIN_WORDS),
    Rule("ellipsis_lines", "prose", "ellipsis_lines", None, 0.3, GOPHER, "more than 30% of lines end with an ellipsis", RATIO_MIN_WORDS),
    Rule("alpha_words", "prose", "alpha_words", 0.8, None, GOPHER, "fewer than 80% of words contain a letter", RATIO_MIN_WORDS),
    Rule("punctuation_lines", "prose", "punctuation_lines", 0.12, None,
         "FineWeb (Penedo et al. 2024), after C4's terminal-punctuation rule (Raffel et al. 2020)",
         "12% or fewer of the lines end in punctuation", RATIO_MIN_WORDS),
    Rule("dup_lines", "prose", "dup_lines", None, 0.30, GOPHER_REP, "more than 30% of lines are repeats", RATIO_MIN_WORDS),
    Rule("dup_paragraphs", "prose", "dup_paragraphs", None, 0.30, GOPHER_REP, "more than 30% of paragraphs are repeats", RATIO_MIN_WORDS),
    Rule("dup_line_chars", "prose", "dup_line_chars", None, 0.20, GOPHER_REP, "more than 20% of characters in repeated lines", RATIO_MIN_WORDS),
    Rule("dup_paragraph_chars", "prose", "dup_paragraph_chars", None, 0.20, GOPHER_REP,
         "more than 20% of characters in repeated paragraphs", RATIO_MIN_WORDS),
    *_ngram_rules(),
    Rule("generated", "code", "generated", None, 0.5, "StarCoder (Li et al. 2023): auto-generated files",
         "a generated-file marker in the first 5 lines ('auto-generated', 'do not edit', ...)"),
    Rule("max_line_length", "code", "max_line_length", None, 1000, CODEX, "a line longer than 1,000 characters (minified)"),
    Rule("mean_line_length", "code", "mean_line_length", None, 100, CODEX, "mean line length over 100 characters"),
    Rule("alnum_fraction", "code", "alnum_fraction", 0.25, None, CODEX, "fewer than 25% alphanumeric characters"),
)
RULE_NAMES = tuple(r.name for r in RULES)
# What else the report counts as a reason for removal (besides the quality rules).
EXACT_DUP, NEAR_DUP, PII_DROP = "exact_dup", "near_dup", "pii"
STAGE_OF = {EXACT_DUP: "dedup", NEAR_DUP: "dedup", PII_DROP: "pii", **{r: "quality" for r in RULE_NAMES}}

_GENERATED = re.compile(r"auto-?generated|automatically generated|generated by|do not edit|don't edit", re.I)
_BULLETS = ("•", "-", "*", "·", "‣", "▪", "◦", "–")
_TERMINAL = tuple('.!?:;,"\')]»”’…')
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_ALPHA = np.zeros(256, dtype=bool)  # ASCII letters, and every byte of a non-ASCII character
_ALPHA[ord("a"):ord("z") + 1] = _ALPHA[ord("A"):ord("Z") + 1] = _ALPHA[128:] = True
_ALNUM = _ALPHA.copy()
_ALNUM[ord("0"):ord("9") + 1] = True
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\ufffd]")


# ---- words and hashes ------------------------------------------------------------------------

_B = np.uint64(0x100000001B3)  # odd: invertible mod 2**64
_B_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_MIX = np.uint64(0x9E3779B97F4A7C15)
NUM_PERM = 128
SHINGLE = 5
_rng = np.random.default_rng(20221216)  # fixed: signatures are comparable across runs and machines
_PERM_A = _rng.integers(1, 1 << 63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
_PERM_B = _rng.integers(0, 1 << 63, NUM_PERM, dtype=np.uint64)
_CHUNK = 4096  # shingles per block of the signature computation: bounds its (block, 128) temporary


def _pow_table(base: np.uint64, n: int) -> np.ndarray:
    t = np.empty(n, dtype=np.uint64)
    if n:
        t[0] = 1
        t[1:] = base
        np.cumprod(t, out=t)  # wraps mod 2**64, as intended
    return t


class Words(NamedTuple):
    """The whitespace-separated words of a text, as arrays (one entry per word)."""

    hashes: np.ndarray  # (W,) uint64: polynomial hash of the word's lower-cased UTF-8 bytes
    chars: np.ndarray  # (W,) int64: characters (not bytes) per word
    alpha: np.ndarray  # (W,) bool: the word contains a letter


def words(text: str) -> Words:
    """Words (runs of non-whitespace) of the lower-cased text, hashed vectorised.

    hash(word) = sum_i (byte_i + 1) * B**i over the word's bytes, computed for every word at once
    from a prefix sum over the whole text: (P[end] - P[start]) * B**-start (all mod 2**64)."""
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    n = len(data)
    if n == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return Words(empty, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
    space = _SPACE[data]
    edges = np.diff(np.concatenate(([True], space, [True])).astype(np.int8))
    starts = np.flatnonzero(edges == -1)
    ends = np.flatnonzero(edges == 1)  # exclusive
    pw = _pow_table(_B, n)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum((data.astype(np.uint64) + np.uint64(1)) * pw, out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * _pow_table(_B_INV, n)[starts]
    lead = np.zeros(n + 1, dtype=np.int64)  # characters: bytes that are not UTF-8 continuation bytes
    np.cumsum((data & 0xC0) != 0x80, out=lead[1:])
    alpha = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(_ALPHA[data], out=alpha[1:])
    return Words(hashes, lead[ends] - lead[starts], (alpha[ends] - alpha[starts]) > 0)


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """(W,) word hashes -> (max(W - n + 1, 0),) hashes of consecutive n-grams (order matters)."""
    length = len(h) - n + 1
    if length <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = h[:length].copy()
    for i in range(1, n):
        acc = acc * _MIX ^ h[i:i + length]
    return acc ^ (acc >> np.uint64(31))


def signature(h: np.ndarray) -> np.ndarray:
    """(NUM_PERM,) uint32 MinHash signature of the set of word SHINGLE-grams (a short text: its words)."""
    sh = ngram_hashes(h, SHINGLE) if len(h) >= SHINGLE else ngram_hashes(h, max(1, len(h)))
    if len(sh) == 0:
        return np.full(NUM_PERM, 0xFFFFFFFF, dtype=np.uint32)
    out = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
    for i in range(0, len(sh), _CHUNK):
        block = sh[i:i + _CHUNK, None] * _PERM_A + _PERM_B  # (block, NUM_PERM): multiply-shift hashing
        np.minimum(out, block.min(axis=0), out=out)
    return (out >> np.uint64(32)).astype(np.uint32)


def normalise(text: str) -> str:
    """What exact dedup compares: whitespace runs collapsed to one space, both ends stripped."""
    return " ".join(text.split())


def exact_key(text: str) -> bytes:
    return hashlib.sha256(normalise(text).encode("utf-8")).digest()[:16]


# ---- features --------------------------------------------------------------------------------


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total = 0
    for item in items:
        total += len(item)
        if item in seen:
            dup += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup / len(items), dup_chars / max(total, 1)


def _top_ngram(w: Words, n: int, total: int) -> float:
    g = ngram_hashes(w.hashes, n)
    if len(g) == 0:
        return 0.0
    _, first, counts = np.unique(g, return_index=True, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] < 2:
        return 0.0
    pos = int(first[best])
    return float(w.chars[pos:pos + n].sum()) * int(counts[best]) / total


def _dup_ngram(w: Words, n: int, total: int) -> float:
    """Characters of the words covered by any n-gram that occurs more than once / all word characters."""
    g = ngram_hashes(w.hashes, n)
    if len(g) < 2:
        return 0.0
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    if len(starts) == 0:
        return 0.0
    cover = np.bincount(starts, minlength=len(w.hashes) + 1) - np.bincount(starts + n, minlength=len(w.hashes) + n + 1)[
        :len(w.hashes) + 1]
    covered = np.cumsum(cover)[:len(w.hashes)] > 0
    return float(w.chars[covered].sum()) / total


class Features:
    """The values the rules look at, computed on first use (a document stops at its first failing rule)."""

    def __init__(self, text: str, w: Words):
        self.text = text
        self.w = w
        self._lines: list[str] | None = None
        self._cache: dict[str, float] = {}

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = [line for line in self.text.split("\n") if line.strip()]
        return self._lines

    def __getitem__(self, name: str) -> float:
        if name not in self._cache:
            self._cache[name] = self._compute(name)
        return self._cache[name]

    def _compute(self, name: str) -> float:
        w, text = self.w, self.text
        n_words = len(w.hashes)
        word_chars = int(w.chars.sum()) or 1
        if name == "control_chars":
            return len(_CONTROL.findall(text)) / max(len(text), 1)
        if name == "words":
            return n_words
        if name == "mean_word_length":
            return word_chars / n_words if n_words else 0.0
        if name == "symbol_ratio":
            return (text.count("#") + text.count("...") + text.count("…")) / max(n_words, 1)
        if name == "bullet_lines":
            return sum(line.lstrip().startswith(_BULLETS) for line in self.lines) / max(len(self.lines), 1)
        if name == "ellipsis_lines":
            return sum(line.rstrip().endswith(("...", "…")) for line in self.lines) / max(len(self.lines), 1)
        if name == "alpha_words":
            return float(w.alpha.mean()) if n_words else 0.0
        if name == "punctuation_lines":
            return sum(line.rstrip().endswith(_TERMINAL) for line in self.lines) / max(len(self.lines), 1)
        if name in ("dup_lines", "dup_line_chars"):
            self._cache["dup_lines"], self._cache["dup_line_chars"] = _dup_fractions([ln.strip() for ln in self.lines])
            return self._cache[name]
        if name in ("dup_paragraphs", "dup_paragraph_chars"):
            paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
            self._cache["dup_paragraphs"], self._cache["dup_paragraph_chars"] = _dup_fractions(paragraphs)
            return self._cache[name]
        if name.startswith("top_"):
            return _top_ngram(w, int(name[4:-4]), word_chars)
        if name.startswith("dup_") and name.endswith("gram"):
            return _dup_ngram(w, int(name[4:-4]), word_chars)
        if name == "generated":
            return 1.0 if _GENERATED.search("\n".join(text.split("\n", 5)[:5])) else 0.0
        if name in ("max_line_length", "mean_line_length"):
            lengths = [len(line) for line in text.split("\n")]
            self._cache["max_line_length"] = max(lengths)
            self._cache["mean_line_length"] = sum(lengths) / len(lengths)
            return self._cache[name]
        if name == "alnum_fraction":
            data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            return float(_ALNUM[data].mean()) if len(data) else 0.0
        raise KeyError(name)


def failed_rule(text: str, genre: str, rules: Sequence[Rule], w: Words | None = None) -> str | None:
    """The name of the first rule of `rules` (for this genre) that the document fails, or None."""
    f = Features(text, w if w is not None else words(text))
    n_words = len(f.w.hashes)
    for rule in rules:
        if rule.genre in (genre, "any") and n_words >= rule.min_words and rule.fails(f[rule.feature]):
            return rule.name
    return None


def measure(text: str, genre: str) -> dict[str, float]:
    """Every feature of the rules that apply to this genre (for docs, tuning and tests)."""
    f = Features(text, words(text))
    return {r.feature: f[r.feature] for r in RULES if r.genre in (genre, "any")}


# ---- settings --------------------------------------------------------------------------------

PII_MODES = ("redact", "drop", "keep")
DEFAULT_THRESHOLD = 0.8  # Lee et al. 2022 (see the module docstring)
EXAMPLES_PER_RULE = 10
SNIPPET_CHARS = 240


@dataclass(frozen=True)
class Settings:
    """What hygiene does; recorded in the manifest. `Settings()` is the default of `lmforge prepare`."""

    dedup: bool = True  # exact and near-duplicate removal
    # estimated Jaccard of word 5-gram sets; None: exact dedup only (SFT examples: sft.py)
    near_dup_threshold: float | None = DEFAULT_THRESHOLD
    quality: bool = True
    skip_rules: tuple[str, ...] = ()  # quality rules switched off one by one
    pii: str = "redact"  # redact | drop | keep
    examples: int = EXAMPLES_PER_RULE  # examples recorded per rule

    @classmethod
    def off(cls) -> "Settings":
        """Everything off: the corpus goes through as it is (prepare before hygiene existed)."""
        return cls(dedup=False, quality=False, pii="keep")

    @property
    def active_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in RULES if r.name not in self.skip_rules) if self.quality else ()

    @property
    def can_drop(self) -> bool:
        """Whether any stage can remove a document (else --allow-empty has nothing to allow)."""
        return self.dedup or bool(self.active_rules) or self.pii == "drop"

    @property
    def near_dup(self) -> bool:
        return self.dedup and self.near_dup_threshold is not None

    def validate(self) -> "Settings":
        Choice(PII_MODES).check("--pii", self.pii)
        if self.near_dup_threshold is not None:
            NEAR_DUP_THRESHOLD.check("--near-dup-threshold", self.near_dup_threshold)
        for name in self.skip_rules:
            if name not in RULE_NAMES:
                near = get_close_matches(name, RULE_NAMES, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (rules: {', '.join(RULE_NAMES)})"
                raise DataError(f"--skip-rule {name!r} is not a quality rule{hint}")
        EXAMPLES.check("examples per rule", self.examples)
        return self

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip_rules"] = list(self.skip_rules)
        d["near_dup"] = {"shingle": f"word {SHINGLE}-grams (lower-cased)", "num_perm": NUM_PERM,
                         "normalise_exact": "whitespace runs -> one space, stripped; case kept"} if self.near_dup else None
        if not self.dedup:
            d["near_dup_threshold"] = None
        return d


def settings_from_switches(
    *,
    no_dedup: bool = False,
    near_dup_threshold: float | None = None,
    quality: str = "on",
    skip_rules: Sequence[str] = (),
    pii: str = "redact",
    allow_empty: bool = False,
) -> Settings:
    """The command line's switches -> Settings; a combination that makes no sense is refused in one line."""
    if quality not in ("on", "off"):
        raise DataError(f"--quality must be on or off, got {quality!r} (switch single rules off with --skip-rule NAME)")
    if no_dedup and near_dup_threshold is not None:
        raise DataError("--near-dup-threshold with --no-dedup: there is no near-duplicate stage to set; drop one of them")
    if quality == "off" and skip_rules:
        raise DataError("--skip-rule with --quality off: every quality rule is already off; drop one of them")
    s = Settings(
        dedup=not no_dedup,
        near_dup_threshold=DEFAULT_THRESHOLD if near_dup_threshold is None else near_dup_threshold,
        quality=quality == "on",
        skip_rules=tuple(dict.fromkeys(skip_rules)),
        pii=pii,
    ).validate()
    if allow_empty and not s.can_drop:
        raise DataError("--allow-empty with --no-dedup, --quality off and --pii keep|redact: no stage removes documents, "
                        "so no input can become empty; drop --allow-empty")
    return s


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour decides what hygiene does (recorded in the manifest)."""
    out = {}
    for dist in ("datasketch", "phonenumbers", "google-re2", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ---- per-document analysis (worker side) -----------------------------------------------------


class Analysis(NamedTuple):
    """What one document's analysis returns to the deciding process."""

    text: str  # scrubbed (or unchanged) text
    reason: str | None  # a quality rule or PII_DROP: the document is removed; None: it goes on to dedup
    redactions: dict[str, int]  # PII items redacted, by kind
    exact: bytes | None  # exact-dup key (None with dedup off)
    signature: np.ndarray | None  # MinHash signature (None with dedup off or exact only)


_scrubbers: dict[str, Any] = {}


def scrubber(mode: str) -> Any:
    """The PII scrubber of a mode (one per process): lmforge.data.pii.Scrubber."""
    if mode not in _scrubbers:
        try:
            from .pii import Scrubber
        except ImportError as e:  # pragma: no cover - pii.py ships with lmforge
            raise DataError(f"the PII stage is not available ({e}); pass --pii keep") from None
        _scrubbers[mode] = Scrubber(mode=mode)
    return _scrubbers[mode]


def analyse(text: str, genre: str, settings: Settings) -> Analysis:
    """Scrub, then judge one document (pure: the same text and settings give the same answer)."""
    redactions: dict[str, int] = {}
    if settings.pii != "keep":
        result = scrubber(settings.pii).scrub(text)
        if result.drop:  # nothing was redacted: the whole document goes
            return Analysis(text, PII_DROP, {}, None, None)
        redactions = {k: int(v) for k, v in result.counts.items() if v}
        text = result.text
    w = words(text) if settings.quality or settings.dedup else None
    rules = settings.active_rules
    reason = failed_rule(text, genre, rules, w) if rules else None
    if reason is not None or not settings.dedup:
        return Analysis(text, reason, redactions, None, None)
    assert w is not None
    return Analysis(text, None, redactions, exact_key(text), signature(w.hashes) if settings.near_dup else None)


def analyse_batch(batch: list[tuple[str, str]], settings: Settings) -> list[Analysis]:
    return [analyse(text, genre, settings) for text, genre in batch]


class Analyser:
    """Runs `analyse` over batches of documents, in worker processes when asked, results in order.

    At most 2 x processes batches are in flight, so memory stays bounded however long the corpus
    is (Pool.imap would read the whole input ahead). processes <= 1: in this process."""

    def __init__(self, settings: Settings, processes: int):
        self.settings = settings
        self.pool = None
        if processes > 1:
            import multiprocessing as mp

            # fork: workers start at once and share the imported modules; they never touch the
            # tokenizer's threads (the pool starts before any tokenizer work in prepare).
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.pool = ctx.Pool(processes)
        self.depth = 2 * max(processes, 1)

    def map(self, batches: Iterable[tuple[Any, list[tuple[str, str]]]]) -> Iterator[tuple[Any, list[Analysis]]]:
        """(tag, batch) pairs -> (tag, analyses) pairs, in the same order."""
        if self.pool is None:
            for tag, batch in batches:
                yield tag, analyse_batch(batch, self.settings)
            return
        from collections import deque

        pending: deque = deque()
        for tag, batch in batches:
            pending.append((tag, self.pool.apply_async(analyse_batch, (batch, self.settings))))
            if len(pending) >= self.depth:
                t, r = pending.popleft()
                yield t, r.get()
        while pending:
            t, r = pending.popleft()
            yield t, r.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ---- decisions and the record (deciding process) ---------------------------------------------


class _Sig:
    """What datasketch.MinHashLSH reads from a MinHash: its length and hash values."""

    __slots__ = ("hashvalues",)

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


@dataclass
class _Count:
    documents: int = 0
    bytes: int = 0

    def add(self, nbytes: int) -> None:
        self.documents += 1
        self.bytes += nbytes


@dataclass
class Hygiene:
    """Decides, document by document in corpus order, and records what it did (`record()`)."""

    settings: Settings
    inputs: list[str]  # input names, in order
    kept: dict[str, _Count] = field(default_factory=dict)
    read: dict[str, _Count] = field(default_factory=dict)
    removed: dict[str, dict[str, _Count]] = field(default_factory=dict)  # reason -> input -> count
    redacted: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # kind -> input -> {documents, items}
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    cross: list[tuple[float, float]] = field(default_factory=list)  # (u of the dropped copy, u of its kept original)

    def __post_init__(self) -> None:
        self.kept = {n: _Count() for n in self.inputs}
        self.read = {n: _Count() for n in self.inputs}
        self._exact: dict[bytes, int] = {}  # key -> id of the kept document
        self._u: list[float] = []  # id -> u of kept documents (dedup only)
        self._where: list[tuple[str, int]] = []  # id -> (source, byte offset): named in a copy's example
        self._sigs: list[np.ndarray] = []
        self._lsh = None
        if self.settings.near_dup:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=self.settings.near_dup_threshold, num_perm=NUM_PERM)

    def decide(self, a: Analysis, *, input_name: str, source: str, byte_offset: int, nbytes: int, u: float,
               original: str) -> bool:
        """True: keep the document (a.text). Records the reason otherwise."""
        self.read[input_name].add(nbytes)
        for kind, n in a.redactions.items():
            slot = self.redacted.setdefault(kind, {}).setdefault(input_name, {"documents": 0, "items": 0})
            slot["documents"] += 1
            slot["items"] += n
            if a.reason is None:
                self._example(f"pii:{kind}", input_name, source, byte_offset, a.text, around=f"<{kind.upper()}")
        reason, of = a.reason, None
        if reason is None and self.settings.dedup:
            assert a.exact is not None
            of = self._exact.get(a.exact)
            if of is not None:
                reason = EXACT_DUP
            else:
                near: list[int] = []
                if self._lsh is not None:
                    assert a.signature is not None and self.settings.near_dup_threshold is not None
                    near = [k for k in self._lsh.query(_Sig(a.signature))
                            if float(np.mean(self._sigs[k] == a.signature)) >= self.settings.near_dup_threshold]
                if near:
                    reason, of = NEAR_DUP, min(near)  # the earliest kept match: deterministic
                else:
                    doc_id = len(self._u)
                    self._exact[a.exact] = doc_id
                    self._u.append(u)
                    self._where.append((source, byte_offset))
                    if self._lsh is not None:
                        self._sigs.append(a.signature)
                        self._lsh.insert(doc_id, _Sig(a.signature), check_duplication=False)
        if reason is None:
            self.kept[input_name].add(nbytes)
            return True
        self.removed.setdefault(reason, {}).setdefault(input_name, _Count()).add(nbytes)
        if of is not None:
            self.cross.append((u, self._u[of]))
        # PII-dropped documents are shown redacted (their original text may be the secret).
        self._example(reason, input_name, source, byte_offset, original,
                      copy_of=None if of is None else {"source": self._where[of][0], "byte_offset": self._where[of][1]})
        return False

    def _example(self, key: str, input_name: str, source: str, byte_offset: int, text: str, around: str | None = None,
                 copy_of: dict[str, Any] | None = None) -> None:
        bucket = self.examples.setdefault(key, [])
        if len(bucket) < self.settings.examples:
            bucket.append({"input": input_name, "source": source, "byte_offset": byte_offset,
                           "text": _snippet(text, around)} | ({"copy_of": copy_of} if copy_of else {}))

    def empty_inputs(self) -> list[str]:
        """Inputs that had documents and have none left."""
        return [n for n in self.inputs if self.read[n].documents and not self.kept[n].documents]

    def record(self, val_fraction: float, forced_u: float | None) -> dict[str, Any]:
        """The manifest's "hygiene" section (docs/data.md: Report)."""

        def split(u: float) -> str:
            return "val" if u < val_fraction or u == forced_u else "train"

        cross = {"val_dropped_as_copy_of_train": 0, "train_dropped_as_copy_of_val": 0}
        for u_copy, u_orig in self.cross:
            if split(u_copy) != split(u_orig):
                cross["val_dropped_as_copy_of_train" if split(u_copy) == "val" else "train_dropped_as_copy_of_val"] += 1
        return {
            "settings": self.settings.record(),
            "versions": versions(),
            "rules": {r.name: {"genre": r.genre, "low": r.low, "high": r.high, "min_words": r.min_words, "source": r.source,
                                "what": r.what}
                      for r in self.settings.active_rules},
            "inputs": {n: {"documents": self.read[n].documents, "bytes": self.read[n].bytes,
                           "kept_documents": self.kept[n].documents, "kept_bytes": self.kept[n].bytes} for n in self.inputs},
            "removed": {reason: {n: asdict(c) for n, c in per.items()} for reason, per in sorted(self.removed.items())},
            "redacted": {kind: dict(per) for kind, per in sorted(self.redacted.items())},
            "cross_split": cross,
            "examples": self.examples,
            "pii_scrubber": None if self.settings.pii == "keep" else scrubber(self.settings.pii).settings(),
        }


def _snippet(text: str, around: str | None = None) -> str:
    """A short piece of a document (around the first `around` if given), always PII-redacted."""
    start = 0
    if around is not None:
        i = text.find(around)
        start = max(0, i - SNIPPET_CHARS // 3) if i >= 0 else 0
    piece = text[start:start + SNIPPET_CHARS]
    try:
        piece = scrubber("redact").scrub(piece).text
    except DataError:  # pragma: no cover - no PII stage at all: show nothing rather than a secret
        return "(hidden: the PII scrubber is not available)"
    return ("…" if start else "") + piece + ("…" if start + SNIPPET_CHARS < len(text) else "")


# ---- the report (reading the record back) ----------------------------------------------------


def report(manifest: dict[str, Any]) -> dict[str, Any]:
    """The hygiene section of a dataset's manifest in the form `lmforge data report` and the dashboard show:
    totals per input, removals per rule (with the stage and per input), redactions per kind, cross-split
    copies, mixing, examples. A dataset prepared before hygiene existed reports {"hygiene": None}."""
    h = manifest.get("hygiene")
    out: dict[str, Any] = {"fingerprint": manifest.get("fingerprint"), "hygiene": None, "mix": manifest.get("mix")}
    if not h:
        return out
    rows = []
    for reason, per in h["removed"].items():
        rows.append({"rule": reason, "stage": STAGE_OF.get(reason, "quality"),
                     "documents": sum(c["documents"] for c in per.values()), "bytes": sum(c["bytes"] for c in per.values()),
                     "by_input": per, "what": h["rules"].get(reason, {}).get("what", _WHAT.get(reason, ""))})
    rows.sort(key=lambda r: (-r["documents"], r["rule"]))
    inputs = h["inputs"]
    total = {k: sum(v[k] for v in inputs.values()) for k in ("documents", "bytes", "kept_documents", "kept_bytes")}
    out["hygiene"] = {
        "settings": h["settings"], "versions": h["versions"], "inputs": inputs, "total": total, "removed": rows,
        "redacted": [{"kind": k, "documents": sum(c["documents"] for c in per.values()),
                      "items": sum(c["items"] for c in per.values()), "by_input": per} for k, per in h["redacted"].items()],
        "cross_split": h["cross_split"], "examples": h.get("examples", {}),
    }
    return out


_WHAT = {EXACT_DUP: "same text as an earlier kept document (whitespace-normalised)",
         NEAR_DUP: "estimated Jaccard of word 5-grams >= threshold with an earlier kept document",
         PII_DROP: "contains PII or a secret (--pii drop)"}


__all__ = [
    "CODE_EXTENSIONS", "RULES", "RULE_NAMES", "Rule", "Settings", "settings_from_switches", "genre_of", "words",
    "ngram_hashes", "signature", "normalise", "exact_key", "failed_rule", "measure", "analyse", "Analysis",
    "Analyser", "Hygiene", "report", "versions", "PII_MODES", "DEFAULT_THRESHOLD", "EXACT_DUP", "NEAR_DUP", "PII_DROP",
]
