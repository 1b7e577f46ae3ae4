"""The valid values of a setting, written once: config fields and command-line flags share them.

A rule is a `Range` (a number: int or float, with optional bounds, each included or not), a
`Choice` (one of some strings) or `Text` (any string). Each one is used three ways:
- `check(name, value)` raises ConfigError naming the key or flag, the valid values and the value
  given (Config.validate runs it over every config field; library functions over their arguments);
- as an argparse `type=`, a rule parses the command-line string and checks it, so a bad flag is
  refused before any work, in one line (cli.py);
- `bad_values()` lists strings that must be refused (wrong type, NaN, infinity, just outside each
  bound); tests/test_bad_input.py generates its cases from them, so a new config key or flag gets
  its bad inputs for free.

Rules that hold whatever the bounds: a float is finite (NaN and infinity are refused everywhere,
no lmforge setting means "infinity"); an int fits in 64 signed bits (torch, numpy and SQLite store
it so; a larger one would fail deep inside them, e.g. `torch.manual_seed(10**30)`); text is UTF-8
without NUL characters (it becomes a path, a YAML value or a JSON string).

Trade-off: a rule judges one value alone. Rules between values (the global batch divisible by the
micro batch) stay hand-written in Config.validate, and rules about the machine (does the model
fit in memory) live where the machine is known (model.check_memory).
"""

from __future__ import annotations

import argparse
import difflib
import math
import threading
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# torch threads and tokenizer workers: more threads than cores only slow work down, and a huge
# count crashes torch (`serve --threads 100000` was a segmentation fault); 1024 is above any CPU.
MAX_THREADS = 1024
# Seconds: Python's timed waits (threading, asyncio, time.sleep) overflow above this (~292 years).
MAX_SECONDS = threading.TIMEOUT_MAX


@dataclass(frozen=True)
class Range:
    """A number: `kind` int or float, within [lo, hi] (an end left out by None; excluded if *_open)."""

    kind: type = int
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # what a special value means, shown after the range: "0 = all cores"

    # ---- judging a value ---------------------------------------------------------------------

    def _bounds(self) -> tuple[float, float, bool, bool]:
        """The bounds that apply: the given ones, within int64 for an int, open to infinity for a float."""
        lo = -math.inf if self.lo is None else self.lo
        hi = math.inf if self.hi is None else self.hi
        if self.kind is int:
            lo, hi = max(lo, INT64_MIN), min(hi, INT64_MAX)
        return lo, hi, self.lo_open, self.hi_open

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        lo, hi, lo_open, hi_open = self._bounds()
        return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)

    def describe(self, value: Any = None) -> str:
        """The valid values in words, as they fit the value given: ">= 1", "within (0, 1]", ..."""
        finite = self.kind is float and isinstance(value, float) and not math.isfinite(value)
        lo, hi = self.lo, self.hi
        if self.kind is int and isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            if lo is None and hi is None:
                return f"a 64-bit signed integer ({INT64_MIN}..{INT64_MAX})"
            lo, hi = (INT64_MIN if lo is None else lo), (INT64_MAX if hi is None else hi)  # name the int64 end too
        if lo is None and hi is None:
            return "a 64-bit signed integer" if self.kind is int else "a finite number"
        if lo is not None and hi is not None:
            if self.kind is int and not (self.lo_open or self.hi_open):
                text = f"within {_num(lo)}..{_num(hi)}"
            else:
                text = f"within {'(' if self.lo_open else '['}{_num(lo)}, {_num(hi)}{')' if self.hi_open else ']'}"
        elif lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(lo)}"
        else:
            text = f"{'<' if self.hi_open else '<='} {_num(hi)}"
        one_sided = lo is None or hi is None  # "within [0, 1]" already says finite; "> 0" does not
        return f"a finite number {text}" if finite and one_sided else text

    def message(self, name: str, value: Any) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{name} must be {self.describe(value)}{note}, got {value}"

    def check(self, name: str, value: Any) -> None:
        if not self.contains(value):
            raise ConfigError(self.message(name, value))

    # ---- the command line ----------------------------------------------------------------------

    def parse(self, text: str) -> int | float:
        """A command-line string as this kind of number ("1e6" is an int when it is whole); ConfigError if it is none."""
        s = text.strip().replace("_", "")
        try:
            if self.kind is float:
                return float(s)
            try:
                return int(s)
            except ValueError:
                f = float(s)
                if f.is_integer():
                    return int(f)
        except ValueError:
            pass
        raise ConfigError(f"expected {'an integer' if self.kind is int else 'a number'}, got {text!r}")

    def __call__(self, text: str) -> int | float:
        """argparse `type=`: parse and check; argparse prefixes the flag to the message."""
        try:
            value = self.parse(text)
            self.check("", value)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(" ")) from None
        return value

    # ---- for the tests that derive bad inputs ----------------------------------------------------

    def bad_values(self) -> list[str]:
        """Command-line strings (also YAML scalars) this range must refuse."""
        out = ["abc", ""]
        if self.kind is float:
            out += ["nan", "inf", "-inf", "1e400"]
        else:
            out += ["1.5", "nan", str(INT64_MAX + 1), str(INT64_MIN - 1)]
        if self.lo is not None:
            below = self.lo if self.lo_open else (self.lo - 1 if self.kind is int else self.lo - max(1.0, abs(self.lo)))
            out.append(_num(below))
        if self.hi is not None:
            above = self.hi if self.hi_open else (self.hi + 1 if self.kind is int else self.hi + max(1.0, abs(self.hi)))
            out.append(_num(above))
        return out

    def edge_values(self) -> list[int | float]:
        """Valid values at the ends (the closed ones), which must be accepted."""
        lo, hi, lo_open, hi_open = self._bounds()
        out: list[int | float] = []
        if math.isfinite(lo) and not lo_open:
            out.append(self.kind(lo))
        if math.isfinite(hi) and not hi_open:
            out.append(self.kind(hi))
        return out


@dataclass(frozen=True)
class Choice:
    """One of a few strings."""

    values: tuple[str, ...]
    note: str = ""

    def contains(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def describe(self, value: Any = None) -> str:
        quote = any(not v for v in self.values)  # an empty choice is only visible quoted: then quote them all
        return f"one of {', '.join(repr(v) if quote else v for v in self.values)}"

    def message(self, name: str, value: Any) -> str:
        note = f" ({self.note})" if self.note else ""
        near = difflib.get_close_matches(value, [v for v in self.values if v], n=1) if isinstance(value, str) else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{name} must be {self.describe(value)}{note}; got {value!r}{hint}"

    def check(self, name: str, value: Any) -> None:
        if not self.contains(value):
            raise ConfigError(self.message(name, value))

    def bad_values(self) -> list[str]:
        return [v for v in ("nope", "NONE", "x" * 300) if v not in self.values]

    def edge_values(self) -> list[str]:
        return list(self.values)


@dataclass(frozen=True)
class Text:
    """Any string that is UTF-8 text without NUL characters (it becomes a path, YAML or JSON)."""

    def contains(self, value: Any) -> bool:
        if not isinstance(value, str) or "\0" in value:
            return False
        try:
            value.encode("utf-8")  # a lone surrogate ("\ud800", or argv bytes that were not UTF-8) has no UTF-8 form
        except UnicodeEncodeError:
            return False
        return True

    def describe(self, value: Any = None) -> str:
        return "UTF-8 text without NUL characters"

    def message(self, name: str, value: Any) -> str:
        return f"{name} must be {self.describe(value)}, got {value!r}"

    def check(self, name: str, value: Any) -> None:
        if not self.contains(value):
            raise ConfigError(self.message(name, value))

    def __call__(self, text: str) -> str:
        """argparse `type=`: a flag's text as given, if it is UTF-8 text (a non-UTF-8 byte in argv
        arrives as a lone surrogate) without NUL characters."""
        if not self.contains(text):
            raise argparse.ArgumentTypeError(self.message("", text).removeprefix(" "))
        return text

    def bad_values(self) -> list[str]:
        return ["a\0b", "\ud800", "ab\udcff"]

    def edge_values(self) -> list[str]:
        return ["", "é"]


@dataclass(frozen=True)
class Count(Range):
    """A large count written the way people write it: 7e9, 7B, 1.5T, 300M, 2k, 1_000 (a float)."""

    kind: type = float

    def parse(self, text: str) -> float:
        s = text.strip().replace("_", "").replace(",", "")
        scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
        try:
            if s and s[-1].lower() in scale:
                return float(s[:-1]) * scale[s[-1].lower()]
            return float(s)
        except ValueError:
            raise ConfigError(f"not a number: {text!r} (e.g. 7e9, 7B, 300M, 2T)") from None

    def bad_values(self) -> list[str]:
        return [*super().bad_values(), "7X", "nanB"]


@dataclass(frozen=True)
class Weights:
    """A mapping of names (paths) to weights: each a finite number >= 0, their sum > 0, and each
    positive weight at least `finest` of the sum (the resolution of whatever mixes by them). The
    empty mapping means "none" (off)."""

    finest: float = 0.0
    what: str = "name"  # what a key is, in messages
    note: str = ""

    def problem(self, value: Any) -> str:
        """Why `value` is not valid ("" when it is)."""
        if not isinstance(value, dict):
            return f"expected a mapping of {self.what} to weight, e.g. {{data/wiki: 0.7, data/tickets: 0.3}}, got {value!r}"
        for name, w in value.items():
            if not isinstance(name, str) or not Text().contains(name) or not name.strip():
                return f"{name!r} is not a {self.what} (a non-empty text)"
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                return f"the weight of {name} must be a finite number >= 0, got {w!r}"
        total = sum(value.values())
        if value and not total > 0:
            return "the weights sum to 0; give at least one a weight > 0"
        small = [n for n, w in value.items() if 0 < w < self.finest * total]
        if small:
            return (f"the weight of {small[0]} is {value[small[0]] / total:.3g} of the sum, below the finest share "
                    f"{self.finest:.3g}; raise it, or give it weight 0")
        return ""

    def contains(self, value: Any) -> bool:
        return not self.problem(value)

    def describe(self, value: Any = None) -> str:
        return f"{{{self.what}: weight}}, weights >= 0 with a sum > 0" + (f", each > 0 at least {self.finest:.3g} of the sum"
                                                                          if self.finest else "")

    def message(self, name: str, value: Any) -> str:
        return f"{name}: {self.problem(value)}"

    def check(self, name: str, value: Any) -> None:
        if not self.contains(value):
            raise ConfigError(self.message(name, value))

    def bad_values(self) -> list[str]:
        """YAML values (for --set) that must be refused."""
        out = ["abc", "nan", "[1, 2]", "{a: nan}", "{a: -1}", "{a: 0}", "{a: 0, b: 0}", "{a: abc}", "{a: 1e400}",
               "{'': 1}", "{a: true}"]
        if self.finest:
            out.append(f"{{a: 1, b: {self.finest / 4}}}")
        return out

    def edge_values(self) -> list[dict[str, float]]:
        return [{}, {"a": 1.0}, {"a": 1.0, "b": 0.0}] + ([{"a": 1.0, "b": 2 * self.finest}] if self.finest else [])


Rule = Range | Choice | Text | Weights


def _num(x: float) -> str:
    """A bound as written: 1 not 1.0, 1e-08 kept exact."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return str(x)


# ---- the common ones (names say the range) ------------------------------------------------------


def positive_int(*, hi: int | None = None, note: str = "") -> Range:
    """1, 2, 3, ... (up to hi)."""
    return Range(int, lo=1, hi=hi, note=note)


def nonneg_int(*, hi: int | None = None, note: str = "") -> Range:
    """0, 1, 2, ... (up to hi); say what 0 means in `note`."""
    return Range(int, lo=0, hi=hi, note=note)


def any_int(note: str = "") -> Range:
    """Any 64-bit signed integer (seeds)."""
    return Range(int, note=note)


def positive_float(*, hi: float | None = None, note: str = "") -> Range:
    """A finite number > 0."""
    return Range(float, lo=0.0, lo_open=True, hi=hi, note=note)


def nonneg_float(*, hi: float | None = None, note: str = "") -> Range:
    """A finite number >= 0."""
    return Range(float, lo=0.0, hi=hi, note=note)


def finite_float(note: str = "") -> Range:
    """Any finite number."""
    return Range(float, note=note)


def fraction(*, lo_open: bool = False, hi_open: bool = False, note: str = "") -> Range:
    """A number within [0, 1] (each end excluded if asked)."""
    return Range(float, lo=0.0, hi=1.0, lo_open=lo_open, hi_open=hi_open, note=note)


def seconds(*, positive: bool = True, note: str = "") -> Range:
    """A duration in seconds: > 0 (or >= 0), and no longer than Python's timed waits allow."""
    return Range(float, lo=0.0, lo_open=positive, hi=MAX_SECONDS, note=note)


def thread_count(*, lo: int = 0, note: str = "0 = all cores") -> Range:
    """A thread count: lo..MAX_THREADS."""
    return Range(int, lo=lo, hi=MAX_THREADS, note=note)


def port(note: str = "0 = any free port") -> Range:
    """A TCP port to listen on."""
    return Range(int, lo=0, hi=65535, note=note)


# ---- rules of values that a flag and the library function behind it both check ---------------------
# (config keys carry theirs in lmforge/config.py; these are the values that are not config keys)

TEMPERATURE = nonneg_float(note="0 = greedy")  # sample --temperature, the server's temperature
TOP_K = nonneg_int(note="0 = off")
TOP_P = fraction(lo_open=True)
SEED = any_int()  # a sampling seed: 64-bit signed, as OpenAI's
MAX_TOKENS = nonneg_int()  # tokens to generate
QUICKSTART_MINUTES = Range(float, lo=0.0, lo_open=True, hi=7 * 24 * 60, note="quickstart sizes runs of minutes; a week at most")
VAL_FRACTION = fraction(hi_open=True)  # prepare --val-fraction: some documents must remain for training
# data inspect traces each sample of a step to its sources (~0.4 ms each): 65,536 take about half a minute
INSPECT_SAMPLES = positive_int(hi=65_536)
BOOTSTRAP = nonneg_int(hi=100_000, note="0 = none; each resample refits the law")  # plan fit --bootstrap
CONFIDENCE = fraction(note="a calibrated probability; 0 = route nothing")  # classify --min-confidence, /v1/classify
HELD_OUT = fraction(hi_open=True, note="the share of the examples held out for calibration; 0 = none")
# classify train --folds: cross-fitted calibration (understand/classify_train.py); each fold is one more head fit
FOLDS = Range(int, lo=2, hi=100, note="folds of the out-of-fold calibration")
# classify train --method setfit: the cap on its triplets (understand/classify_tune.py); each is a training text triple
MAX_PAIRS = positive_int(hi=10_000_000, note="setfit triplets in all")
PAIRS_PER_EXAMPLE = positive_int(hi=1_000, note="setfit triplets per example")
TUNE_STEPS = nonneg_int(note="0 = automatic")  # classify train --steps
NEAR_DUP_THRESHOLD = fraction(lo_open=True, note="an estimated Jaccard similarity")  # prepare --near-dup-threshold
# prepare --mix-max-repeat: each repeat is a pass over the kept text; past ~16 repeats data is worth
# nothing more (Muennighoff et al. 2023), so 100 is far beyond any sensible cap
MIX_MAX_REPEAT = Range(float, lo=1.0, hi=100.0, note="times an input's train text may be repeated")
# data.mix: the mixed order (data/order.py) lays positions out in blocks of MIX_BLOCK, each holding every
# dataset's exact quota, so a weight is resolved to 1/MIX_BLOCK of the sum; a smaller positive one is refused
MIX_BLOCK = 4096
MIX_WEIGHTS = Weights(finest=1 / MIX_BLOCK, what="dataset path")
EXAMPLES = nonneg_int(note="0 = none")  # data report --examples
AVERAGE_LAST = Range(int, lo=2, note="averaging one checkpoint is a copy of it")  # ckpt average --last
EMA_DECAY = fraction(lo_open=True, hi_open=True, note="a decay per step, e.g. 0.999")  # ckpt average --ema


def default_rule(hint: Any) -> Rule | None:
    """The rule a field or value of this type follows when it names none: int64, finite, text."""
    if hint is int:
        return Range(int)
    if hint is float:
        return Range(float)
    if hint is str:
        return Text()
    return None


__all__ = ["Range", "Count", "Choice", "Text", "Weights", "Rule", "INT64_MIN", "INT64_MAX", "MAX_THREADS", "MAX_SECONDS", "positive_int",
           "nonneg_int", "any_int", "positive_float", "nonneg_float", "finite_float", "fraction", "seconds", "thread_count",
           "port", "default_rule", "TEMPERATURE", "TOP_K", "TOP_P", "SEED", "MAX_TOKENS",
           "QUICKSTART_MINUTES", "BOOTSTRAP", "INSPECT_SAMPLES",
           "VAL_FRACTION", "CONFIDENCE", "HELD_OUT", "FOLDS", "NEAR_DUP_THRESHOLD", "MIX_MAX_REPEAT", "MIX_BLOCK", "MIX_WEIGHTS", "EXAMPLES", "AVERAGE_LAST",
           "EMA_DECAY"]
