"""Bad input to every verb: a one-line error and exit 2, never a traceback (issue 21.8, "keep it fixed").

Where the cases come from:
- config keys: every field of the config dataclasses gets the bad values of its rule
  (lmforge/ranges.py `bad_values`: not a number, NaN, infinity, beyond 64 bits, just outside each
  bound; text with NUL or a lone surrogate), each given as `lmforge train CONFIG --set key=VALUE`.
  A new key gets its cases for free.
- flags: every flag of every verb whose argparse type is a rule gets that rule's bad values, as
  `lmforge VERB ... --flag=VALUE`. A new flag gets its cases for free; a numeric flag without a rule
  fails `test_every_numeric_flag_has_a_rule`; a new verb needs one line in VERBS (the arguments it
  requires), which `test_every_verb_has_its_required_arguments` asks for.
- by hand: mistakes at the level of files (binary, empty, a directory, nested too deeply, a symbolic
  link loop, too large), values within their range that the machine cannot hold (model memory), and
  values that are legitimate and must be accepted.

Every case runs in-process through `lmforge.cli.main` with stderr captured: it must exit 2 with
exactly one non-empty stderr line, starting with "error:" (or exit 0 where the input is legitimate),
and no exception may escape (that would be a user's traceback). A few run as subprocesses where
the process itself matters (argv bytes that are not UTF-8, nothing else on stderr).
Count: `python3 -m pytest tests/test_bad_input.py -q` reports one test per case.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, lmforge_cmd, subprocess_env
from lmforge import ranges
from lmforge.cli import build_parser, main
from lmforge.config import Config, _HINTS, _yaml_key, field_rule

RUN, DATA, CORPUS = "<run>", "<data>", "<corpus>"  # placeholders, filled in from fixtures per case

# The arguments each verb requires (placeholders allowed): a flag's bad value is refused while parsing,
# so these only have to parse. A new verb: add one line.
VERBS: dict[tuple[str, ...], list[str]] = {
    ("prepare",): [CORPUS, "--out", "<tmp>/out"],
    ("data", "info"): [DATA],
    ("data", "verify"): [DATA],
    ("data", "inspect"): [DATA, "--step", "0"],
    ("data", "report"): [DATA],
    ("train",): [str(TINY_CONFIG)],
    ("ckpt", "verify"): [RUN],
    ("ckpt", "average"): [RUN, "--out", "<tmp>/avg"],
    ("sample",): [RUN],
    ("quickstart",): [],
    ("plan",): [],
    ("plan", "fit"): [RUN],
    ("runs",): [],
    ("runs", "list"): [],
    ("runs", "show"): ["x"],
    ("runs", "compare"): ["x", "y"],
    ("runs", "delete"): ["x"],
    ("runs", "export"): ["x", "--to", "mlflow"],
    ("dashboard",): [],
    ("eval",): [RUN],
    ("import",): [RUN, "--out", "<tmp>/imported"],
    ("export",): [RUN, "--format", "hf", "--out", "<tmp>/exported"],
    ("serve",): [RUN],
    ("embed",): [RUN, CORPUS, "--out", "<tmp>/vectors.npy"],
    ("index", "build"): [RUN, CORPUS, "--out", "<tmp>/index"],
    ("index", "add"): ["<tmp>/index", CORPUS],
    ("index", "info"): ["<tmp>/index"],
    ("index", "verify"): ["<tmp>/index"],
    ("index", "tune"): ["<tmp>/index"],
    ("search",): ["<tmp>/index", "a query"],
    ("ask",): ["<tmp>/index", "a question", "--model", RUN],
    ("topics",): [RUN, CORPUS, "--out", "<tmp>/topics"],
    ("classify", "train"): [RUN, CORPUS, "--out", "<tmp>/clf"],
    ("classify", "eval"): ["<tmp>/clf", CORPUS],
    ("classify", "predict"): ["<tmp>/clf", CORPUS, "--out", "<tmp>/preds.jsonl"],
}
BOOL_BAD = ["maybe", "2", "1.5", "[1]"]  # a bool key: anything but true/false (and yes/no/on/off)


def verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(verb path, its parser) for every command and sub-command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from verbs(sub, (*path, name))


def flag_actions():
    """(verb path, flag, action) for every optional argument of every verb (the top level's too)."""
    for path, parser in verbs(build_parser()):
        for action in parser._actions:
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield path, action.option_strings[-1], action


def rule_flags():
    return [(path, flag, action.type) for path, flag, action in flag_actions()
            if isinstance(action.type, (ranges.Range, ranges.Text))]


def config_keys():
    """("section.key", rule or None for a bool, type hint) for every config field."""
    for section in fields(Config):
        cls = _HINTS[Config][section.name]
        for f in fields(cls):
            yield f"{section.name}.{_yaml_key(f.name)}", field_rule(cls, f.name), _HINTS[cls][f.name]


# ---- running a case ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LMFORGE_PROGRESS", "quiet")  # main() sets it; monkeypatch puts the old value back
    monkeypatch.delenv("LMFORGE_FAULTS", raising=False)


@pytest.fixture(scope="module")
def files(tiny_run: Path, tiny_dataset: Path, tmp_path_factory) -> dict[str, Path]:
    """Bad files of every kind, and the good ones the verbs need."""
    root = tmp_path_factory.mktemp("badfiles")
    corpus = root / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
    binary = root / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = root / "empty.txt"
    empty.write_bytes(b"")
    deep = root / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 3000 + "]" * 3000 + "}\n")  # the had 100,000: any depth past
    # past the recursion limit is the same mistake; PyYAML takes ~2 frames a level, and the limit is 1,000, or
    # 2,000 in a process where inductor has compiled anything (it raises it): past both
    deep_yaml = root / "deep.yaml"
    deep_yaml.write_text("train: " + "[" * 3000 + "]" * 3000 + "\n")
    huge = root / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\ntrain: {}\n")
    (root / "deep_dataset").mkdir()
    (root / "deep_dataset" / "manifest.json").write_text("[" * 3000 + "]" * 3000)
    loop = root / "loop"
    loop.symlink_to(root / "loop")
    surrogate = root / "surrogate.jsonl"  # valid JSON, not Unicode text: the "\ud800", in a file
    surrogate.write_text('{"text": "fine", "label": "a"}\n{"text": "bad \\ud800", "label": "b"}\n')
    (root / "deep_manifest").mkdir()
    (root / "deep_manifest" / "MANIFEST.json").write_text("[" * 100_000 + "]" * 100_000)
    return {"root": root, "run": tiny_run, "data": tiny_dataset, "corpus": corpus, "binary": binary, "empty": empty,
            "deep": deep, "deep_yaml": deep_yaml, "huge": huge, "loop": loop, "dir": root, "deep_dataset": root / "deep_dataset",
            "surrogate": surrogate, "deep_manifest": root / "deep_manifest"}


def fill(argv: list[str], files: dict[str, Path], tmp_path: Path) -> list[str]:
    subst = {RUN: str(files["run"]), DATA: str(files["data"]), CORPUS: str(files["corpus"])}
    out = []
    for a in argv:
        a = subst.get(a, a).replace("<tmp>", str(tmp_path))
        for name, p in files.items():
            a = a.replace(f"<{name}>", str(p))
        out.append(a)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit code, non-empty stderr lines) of `lmforge ARGV` in this process. An exception other than
    SystemExit escapes: the test fails with the traceback a user would have seen."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


def refused(argv: list[str], capsys, *mentions: str) -> str:
    code, lines = run_cli(argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (argv, code, lines)
    for m in mentions:
        assert m in lines[0], (m, lines[0])
    return lines[0]


# ---- generated: every config key ------------------------------------------------------------------


def config_cases():
    for key, rule, _hint in config_keys():
        for value in (BOOL_BAD if rule is None else rule.bad_values()):
            yield pytest.param(key, value, id=f"{key}={value!r}"[:80])


@pytest.mark.parametrize("key, value", list(config_cases()))
def test_config_key_bad_value(key: str, value: str, tmp_path: Path, capsys) -> None:
    refused(["train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"), "--set", f"{key}={value}"], capsys, key)
    assert not (tmp_path / "run").exists()  # a refused start writes nothing


def test_every_config_key_has_bad_values() -> None:
    """Each non-bool field has a rule, so it has cases above (the type's rule when it names none)."""
    keys = list(config_keys())
    assert len(keys) > 50
    for key, rule, hint in keys:
        assert (rule is None) == (hint is bool), key
        assert rule is None or len(rule.bad_values()) >= 2, key


# ---- generated: every flag of every verb ----------------------------------------------------------


def flag_cases():
    for path, flag, rule in rule_flags():
        for value in rule.bad_values():
            yield pytest.param(path, flag, value, id=f"{' '.join(path)} {flag}={value!r}"[:80])


@pytest.mark.parametrize("path, flag, value", list(flag_cases()))
def test_flag_bad_value(path: tuple[str, ...], flag: str, value: str, files, tmp_path: Path, capsys) -> None:
    argv = [*path, *fill(VERBS[path], files, tmp_path), f"{flag}={value}"]
    refused(argv, capsys, flag)


def test_every_verb_has_its_required_arguments() -> None:
    def needs_arguments(parser: argparse.ArgumentParser) -> bool:  # a command, not only a group of sub-commands
        return not any(isinstance(a, argparse._SubParsersAction) and a.required for a in parser._actions)

    missing = [" ".join(path) for path, parser in verbs(build_parser())
               if path and needs_arguments(parser) and path not in VERBS]
    assert not missing, f"add the required arguments of {missing} to VERBS in tests/test_bad_input.py"


def test_every_numeric_flag_has_a_rule() -> None:
    """A flag typed plain int or float would take NaN, infinity or -1 silently: give it a rule (ranges.py)."""
    plain = [(path, flag) for path, flag, action in flag_actions() if action.type in (int, float)]
    assert not plain, f"give these flags a ranges.py rule as their type: {plain}"


def test_edge_values_of_every_flag_parse(files, tmp_path: Path) -> None:
    """The closed ends of each flag's range are accepted (a bound written > where >= was meant fails here)."""
    parser = build_parser()
    checked = 0
    for path, flag, rule in rule_flags():
        for value in rule.edge_values():
            parser.parse_args([*path, *fill(VERBS[path], files, tmp_path), f"{flag}={value}"])
            checked += 1
    assert checked > 30


def test_every_rule_refuses_its_bad_values_and_accepts_its_edges() -> None:
    rules = [rule for _, rule, _ in config_keys() if rule is not None] + [rule for _, _, rule in rule_flags()]
    for rule in rules:
        for value in rule.edge_values():
            rule.check("x", value)
        for text in rule.bad_values():
            if isinstance(rule, ranges.Range):
                try:
                    value = rule.parse(text)
                except ranges.ConfigError:
                    continue
            else:
                value = text
            assert not rule.contains(value), (rule, text)


def test_range_messages_name_the_range_and_the_value() -> None:
    assert ranges.positive_int().message("train.max_steps", 0) == "train.max_steps must be >= 1, got 0"
    assert ranges.thread_count().message("--threads", -1) == "--threads must be within 0..1024 (0 = all cores), got -1"
    assert ranges.positive_float().message("train.lr", math.inf) == "train.lr must be a finite number > 0, got inf"
    assert ranges.fraction(lo_open=True).message("top_p", math.nan) == "top_p must be within (0, 1], got nan"
    assert ranges.any_int().message("seed", 2**64).startswith("seed must be a 64-bit signed integer (-9223372036854775808..")
    assert ranges.positive_int().message("n", 2**64) == f"n must be within 1..{2**63 - 1}, got {2**64}"
    assert ranges.Range(int).parse("1e6") == 1_000_000 and ranges.Count().parse("7B") == 7e9


# ---- by hand: files and values no rule can see ------------------------------------------------------

HAND = [
    # prepare
    (["prepare", "<deep>", "--out", "<tmp>/o"], "JSON nested too deeply"),
    (["prepare", "<loop>", "--out", "<tmp>/o"], "symbolic link loop"),
    (["prepare", CORPUS, "--out", "<loop>"], "symbolic link loop"),
    (["prepare", CORPUS, "--out", "<tmp>/o", "--vocab-size", "100"], "too small"),
    (["prepare", CORPUS, "--out", "<tmp>/o", "--special-tokens", "a,b"], "must include"),
    (["prepare", CORPUS, "--out", "<tmp>/o", "--tokenizer", "<binary>"], "not a valid tokenizer.json"),
    (["prepare", "<binary>", "--out", "<tmp>/o", "--strict"], "not UTF-8"),
    (["prepare", "<empty>", "--out", "<tmp>/o"], "empty corpus"),
    (["prepare", CORPUS, "--out", "<binary>"], "is a file"),
    (["prepare", "<tmp>/missing.txt", "--out", "<tmp>/o"], "input not found"),
    # data
    (["data", "info", "<binary>"], "not a prepared dataset"),
    (["data", "info", "<deep_dataset>"], "corrupt manifest"),
    (["data", "verify", "<dir>"], "not a prepared dataset"),
    (["data", "inspect", DATA, "--step", "0"], "needs --seq-len and --global-batch"),
    (["data", "inspect", DATA, "--step", "0", "--seq-len", "64", "--global-batch", "100000"], "--max-samples"),
    (["data", "inspect", DATA, "--step", "0", "--seq-len", "100000000", "--global-batch", "2"], "fewer than one sample"),
    (["data", "inspect", RUN, "--step", "0"], "training step as logged"),
    # train: the config file, and values within their range that this machine cannot hold
    (["train", "<binary>", "--run-dir", "<tmp>/r"], "not a text file"),
    (["train", "<dir>", "--run-dir", "<tmp>/r"], "is a directory"),
    (["train", "<huge>", "--run-dir", "<tmp>/r"], "not a config file"),
    (["train", "<deep_yaml>", "--run-dir", "<tmp>/r"], "nests too deeply"),
    (["train", "<corpus>", "--run-dir", "<tmp>/r"], "expected a mapping"),
    (["train", "<tmp>/missing.yaml", "--run-dir", "<tmp>/r"], "config file not found"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "trian.lr=1"], "did you mean 'train'"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "train.lr"], "must look like section.key=value"),
    (["train", str(TINY_CONFIG), "--run-dir", "<binary>"], "not a directory"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "train.lr=" + "[" * 600], "expected a number"),  # YAML recursion
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "train.lr=1" + "0" * 400], "must be a finite number"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "data.path=<data>", "--set", "model.n_layer=100000000"],
     "not enough memory"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "data.path=<data>", "--set", "model.d_model=10000000"],
     "not enough memory"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "data.path=<data>", "--set", "model.max_seq_len=10000000000"],
     "not enough memory"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "data.path=<data>", "--set", "train.global_batch=1048576",
      "--set", "train.micro_batch=1048576"], "not enough memory"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "data.path=<binary>"], "not a prepared dataset"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "data.path=<data>", "--from", "<binary>"],
     "not a run, checkpoint or model directory"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "data.path=<data>", "--set", "init.from=<binary>"], "is a file"),
    (["train", str(TINY_CONFIG), "--run-dir", "<tmp>/r", "--set", "train.global_batch=8", "--set", "train.micro_batch=3"],
     "must be divisible"),
    # sample / eval / serve / export / import on bad paths and files
    (["sample", "<tmp>/missing"], "no such run"),
    (["sample", "<binary>"], "is a file"),
    (["eval", RUN, "--text", "<binary>"], "not UTF-8"),
    (["eval", RUN, "--text", "<empty>"], "empty"),
    (["eval", RUN, "--text", "<dir>"], "no such file"),
    (["eval", RUN, "--tasks", "<binary>"], "invalid JSON"),
    (["eval", RUN, "--tasks", "<deep>"], "nested too deeply"),
    (["eval", RUN, "--data", "<binary>"], "not a prepared dataset"),
    (["eval", RUN, "--data", DATA, "--text", "<corpus>"], "not both"),
    (["serve", RUN, "--chat-template", "<binary>"], "not a text file"),
    (["serve", RUN, "--chat-template", "<dir>"], "is a directory"),
    (["serve", RUN, "--api-key-file", "<binary>"], "not a text file"),
    (["serve", RUN, "--api-key-file", "<empty>"], "is empty"),
    (["serve", RUN, "--max-batch", "1000000000000", "--port", "0"], "not enough memory"),
    (["export", RUN, "--format", "hf", "--out", "<binary>"], "already exists"),
    (["export", "<binary>", "--format", "gguf", "--out", "<tmp>/x.gguf"], "expected a .gguf file or a directory"),
    (["import", "<binary>", "--out", "<tmp>/m"], "expected a .gguf file or a directory"),
    (["import", "<dir>", "--out", "<tmp>/m"], "not a run, checkpoint or model directory"),
    (["ckpt", "verify", "<binary>"], "holds no checkpoints"),
    (["ckpt", "verify", "<tmp>/missing"], "no such run or checkpoint"),
    # the understanding verbs: their input files (every JSONL goes through lmforge/jsonl.py's one reader)
    (["prepare", "<surrogate>", "--out", "<tmp>/o"], "lone UTF-16 surrogate"),  # before: UnicodeEncodeError
    (["embed", RUN, "<surrogate>", "--out", "<tmp>/o.npy"], "lone UTF-16 surrogate"),
    (["index", "build", RUN, "<surrogate>", "--out", "<tmp>/o"], "lone UTF-16 surrogate"),
    (["topics", RUN, "<surrogate>", "--out", "<tmp>/o"], "lone UTF-16 surrogate"),
    (["classify", "train", RUN, "<surrogate>", "--out", "<tmp>/o"], "lone UTF-16 surrogate"),  # before: TypeError
    (["classify", "train", RUN, "<deep>", "--out", "<tmp>/o"], "nested too deeply"),  # before: RecursionError
    (["embed", RUN, "<deep>", "--out", "<tmp>/o.npy"], "nested too deeply"),
    (["embed", RUN, "<binary>", "--out", "<tmp>/o.npy", "--strict"], "not UTF-8"),
    (["embed", RUN, CORPUS, "--out", "<binary>"], "name a .npy file"),
    (["classify", "predict", "<deep_manifest>", CORPUS, "--out", "<tmp>/o.jsonl"], "not a classifier directory"),  # RecursionError
    (["classify", "predict", "<tmp>/missing", CORPUS, "--out", "<tmp>/o.jsonl"], "no such classifier"),
    (["search", "<binary>", "a query"], "no such index"),
    (["ask", "<binary>", "a question", "--model", RUN], "no such index"),
    (["index", "add", "<binary>", CORPUS], "no such index"),
    (["index", "tune", "<binary>"], "no such index"),
    (["index", "tune", "<tmp>/missing", "--pairs", "<binary>"], "no such index"),
    (["topics", RUN, CORPUS, "--out", "<tmp>/o", "--stop-words", "<binary>"], "--stop-words"),
    # plan / runs
    (["plan", "--quality-of", "7B", "--law", "<binary>"], "not a loss-law JSON"),
    (["plan", "--quality-of", "7B", "--law", "<deep>"], "not a loss-law JSON"),
    (["plan", "--quality-of", "7B", "--law", "<tmp>/nan-law.json"], "must be a finite number > 0"),
    (["plan", "--quality-of", "7B", "--hardware", "nope"], "unknown --hardware"),
    (["plan", "fit", "<binary>"], "no config.yaml"),
    (["runs", "--db", "<binary>"], "not a readable lmforge experiment store"),
    (["runs", "show", "no-such-run"], "no run named"),
]


@pytest.mark.parametrize("argv, message", HAND, ids=[" ".join(a)[:70] for a, _ in HAND])
def test_bad_file_or_value(argv: list[str], message: str, files, tmp_path: Path, capsys, monkeypatch) -> None:
    import lmforge.serve.api as api

    monkeypatch.setattr(api, "_server", lambda *a: pytest.fail("serve started listening on a bad input"))
    (tmp_path / "nan-law.json").write_text(json.dumps({"E": float("nan"), "A": 1, "B": 1, "alpha": 0.3, "beta": 0.3}))
    refused(fill(argv, files, tmp_path), capsys, message)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()  # nothing half-made is left


# ---- legitimate: accepted ----------------------------------------------------------------------------


def test_legitimate_values_are_accepted(files, tmp_path: Path, capsys) -> None:
    run = files["run"]
    for argv in (["sample", str(run), "--temperature", "1e-300", "--top-p", "1e-300", "--seed", "-1", "--max-tokens", "2"],
                 ["sample", str(run), "--max-tokens", "0"],
                 ["data", "inspect", str(files["data"]), "--step", "0", "--seq-len", "64", "--global-batch", "100000",
                  "--max-samples", "2", "--json"],
                 ["eval", str(run), "--text", str(files["corpus"]), "--max-batches", "0", "--json"]):
        code, lines = run_cli(argv, capsys)
        assert code == 0, (argv, lines)


def test_data_inspect_on_a_run_with_a_torn_events_line(files, tmp_path: Path, capsys) -> None:
    """A crash mid-append leaves half a line in events.jsonl: data inspect skips it (before: JSONDecodeError)."""
    run = Path(shutil.copytree(files["run"], tmp_path / "run"))
    with open(run / "events.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "rollback", "from_st')
    code, lines = run_cli(["data", "inspect", str(run), "--step", "3", "--json"], capsys)
    assert code == 0, lines


def test_eval_batches_zero_means_the_whole_val_split(files, tmp_path: Path, capsys) -> None:
    """train.eval_batches=0 is the whole val split, as `eval --max-batches 0` (before: a NaN val_loss, exit 0)."""
    from lmforge.data.loader import TokenDataset

    rd = tmp_path / "r"
    code, lines = run_cli(["train", str(TINY_CONFIG), "--run-dir", str(rd), "--set", f"data.path={files['data']}",
                           "--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "train.eval_batches=0"], capsys)
    assert code == 0, lines
    records = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val and all(math.isfinite(v) for v in val), records
    assert TokenDataset(files["data"], "val").num_samples(64) > 4 * 4  # more than eval_batches 4 would read


# ---- subprocesses: where the process itself matters -----------------------------------------------


def test_argv_that_is_not_utf8_is_one_line_from_a_real_process(files) -> None:
    r = subprocess.run([*map(str.encode, lmforge_cmd("sample", str(files["run"]), "--prompt")), b"ab\xff"],
                       capture_output=True, env=subprocess_env(), timeout=120)
    lines = [line for line in r.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--prompt" in lines[0], lines
    assert r.stdout == b""


@pytest.mark.parametrize("argv, message", [
    (["eval", "<run>", "--threads", "-1"], "--threads"),  # before: RuntimeError from set_num_threads
    (["prepare", "<deep>", "--out", "<tmp>/o"], "nested too deeply"),  # before: RecursionError
])
def test_a_real_process_prints_one_line(argv: list[str], message: str, files, tmp_path: Path) -> None:
    r = subprocess.run(lmforge_cmd(*fill(argv, files, tmp_path)), capture_output=True, text=True, env=subprocess_env(),
                       timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
