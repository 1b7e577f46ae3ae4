"""lmforge/jsonl.py: the one JSONL reader (file:line errors) and the one rule for NaN/inf, through
every writer of JSON records and back through every reader of them.

The rule: a non-finite float is written as the string "nan", "inf" or "-inf"; readers turn those
back into floats where they expect numbers. `strict` below parses the way browsers and jq do (no
bare NaN/Infinity), so a writer that broke the rule fails here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lmforge.config import Config, DataConfig, ModelConfig, TrainConfig
from lmforge.errors import DataError
from lmforge.jsonl import (
    append_jsonl,
    as_number,
    dumps_record,
    parse_jsonl,
    read_jsonl,
    read_records,
    restore_numbers,
    to_record,
)

VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def strict(text: str) -> Any:
    """json.loads that refuses bare NaN / Infinity / -Infinity, as standard JSON parsers do."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"bare {name} in JSON: {text[:200]}")

    return json.loads(text, parse_constant=refuse)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---- the rule ----------------------------------------------------------------------------------


def test_rule_writes_strings_at_any_depth_and_reads_them_back() -> None:
    record = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf}], "d": (2, math.nan), "e": None, "f": "text"}
    text = dumps_record(record)
    assert strict(text) == {"a": "nan", "b": [1.5, "inf", {"c": "-inf"}], "d": [2, "nan"], "e": None, "f": "text"}
    back = restore_numbers(strict(text))
    assert math.isnan(back["a"]) and back["b"][1] == math.inf and back["b"][2]["c"] == -math.inf
    assert back["e"] is None and back["f"] == "text"  # null stays "no value"; other strings stay
    assert to_record(1.0) == 1.0 and to_record("nan") == "nan"


@pytest.mark.parametrize("value, expected", [
    (3, 3.0), (2.5, 2.5), ("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf),
    (None, None), ("3.0", None), (True, None), ([1], None),
])
def test_as_number(value: Any, expected: float | None) -> None:
    got = as_number(value)
    assert got is None if expected is None else same(got, expected)


def test_dumps_record_refuses_what_the_rule_cannot_reach() -> None:
    import numpy as np

    with pytest.raises(ValueError):  # a numpy float32 NaN is not a Python float: never bare NaN
        dumps_record({"x": np.float32("nan")}, default=float)


# ---- the strict reader -------------------------------------------------------------------------


def test_parse_jsonl_names_file_line_column_and_what_was_expected(tmp_path: Path) -> None:
    data = '{"a": 1}\r\n\n{"b": "x\u2028y"}\n{oops\n'.encode()  # U+2028 inside a string is one line
    lines = parse_jsonl(data, "f.jsonl", what="one object per line")
    first, second = next(lines), next(lines)
    assert (first.where, first.line, first.offset, first.value) == ("f.jsonl:1", 1, 0, {"a": 1})
    assert (second.where, second.offset, second.value) == ("f.jsonl:3", 11, {"b": "x\u2028y"})
    assert data[second.offset:].startswith(b'{"b"')
    with pytest.raises(DataError, match=r"^f\.jsonl:4: invalid JSON \(Expecting property name .* at column 2\); "
                                        r"expected one object per line$"):
        next(lines)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8 \(byte 7 of the line\); expected items"):
        list(read_jsonl(bad, what="items"))
    with pytest.raises(DataError, match="cannot read"):
        list(read_jsonl(tmp_path / "missing.jsonl", what="items"))



@pytest.mark.parametrize("line, path", [
    (rb'{"text": "ab\ud800"}', "$.text"),  # the escape (before: UnicodeEncodeError from prepare, a traceback)
    (rb'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\udfff!"}]}', "$.messages[1].content"),
    (rb'{"\ud800": 1}', "$.\\ud800 (its key)"),
    (b'{"text": "\xed\xa0\x80"}', "$.text"),  # the surrogate's UTF-8-like bytes: json reads them with surrogatepass
    (rb'"\udc00"', "$"),
])
def test_a_lone_surrogate_in_a_line_is_refused_naming_where(line: bytes, path: str) -> None:
    lines = parse_jsonl(rb'{"text": "ok \ud83d\ude00 \\ud800"}' + b"\n" + line, "f.jsonl", what="items")
    assert next(lines).value == {"text": "ok \U0001f600 \\ud800"}  # pairs and an escaped backslash are text
    with pytest.raises(DataError) as e:
        next(lines)
    assert str(e.value) == (f"f.jsonl:2: the string at {path} holds a lone UTF-16 surrogate (a \\ud800-style escape "
                            "without its pair): not Unicode text; fix or remove that line")
    str(e.value).encode("utf-8")  # the message itself can be printed

# ---- run files: appending and the lenient reader --------------------------------------------------


def test_append_ends_a_torn_line_and_read_records_skips_it(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a kill mid-append
    append_jsonl(path, {"step": 3, "loss": math.nan}, fsync=True)
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2, "lo', '{"step": 3, "loss": "nan"}']
    with open(path, "ab") as f:
        f.write(b'[1, 2]\n\xff\xfe\n')  # not an object; not UTF-8
    assert read_records(path) == [{"step": 1}, {"step": 3, "loss": "nan"}]
    assert read_records(tmp_path / "none.jsonl") == []


# ---- every writer, every reader ------------------------------------------------------------------


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    model = ModelConfig(vocab_size=512, n_layer=2, n_head=2, d_model=64, max_seq_len=64)
    Config(model=model, data=DataConfig(path="data/x", seq_len=64),
           train=TrainConfig(global_batch=8, micro_batch=8)).save(run / "config.yaml")
    return run


def test_metrics_and_events_jsonl_from_the_trainer(tmp_path: Path) -> None:
    from lmforge.evaluate.watch import run_completed
    from lmforge.plan.fit import read_run
    from types import SimpleNamespace

    from lmforge.train import records
    from lmforge.train.distributed import SINGLE
    from lmforge.train.records import data_step_of_run

    run = _run_dir(tmp_path)
    trainer = SimpleNamespace(run_dir=run, dist=SINGLE, step=1, store=None, run_id=0)  # what records need of a Run
    records.log_metrics(trainer, {"loss": 3.5, "tokens": 512, "val_loss": 3.25})
    trainer.step = 2
    records.log_metrics(trainer, {"loss": math.nan, "grad_norm": math.inf, "x": -math.inf, "val_loss": math.nan,
                                  "tokens": 1024})
    records.log_event(trainer, "non_finite", {"loss": math.nan, "grad_norm": math.inf, "delta": -math.inf, "data_step": 1})
    records.log_event(trainer, "rollback", {"from_step": 2, "to_step": 1, "reason": "non_finite",
                                            "skipped_data_steps": [1, 2], "lr_scale": 1.0, "loss": math.nan})
    records.log_event(trainer, "completed", {}, step=3)
    for name in ("metrics.jsonl", "events.jsonl"):  # every line is standard JSON
        for line in (run / name).read_text().splitlines():
            strict(line)
    metrics = read_records(run / "metrics.jsonl")
    assert [as_number(metrics[1][k]) for k in ("grad_norm", "x")] == [math.inf, -math.inf]
    assert math.isnan(as_number(metrics[1]["loss"]))
    event = read_records(run / "events.jsonl")[0]
    assert same(as_number(event["loss"]), math.nan) and as_number(event["delta"]) == -math.inf
    # The readers of these files: `plan fit` (the last *finite* losses, the largest tokens), the
    # sidecar's exit check, `data inspect RUN --step` (through the rollback).
    point = read_run(run)
    assert (point.loss, point.tokens) == (3.25, 1024.0)
    assert run_completed(run)
    assert data_step_of_run(run, 2)["data_step"] == 1  # the step that raised the verdict, as read
    assert data_step_of_run(run, 3)["data_step"] == (3 - 1) - 1 + 2


def test_eval_results_store_and_runs_json_from_the_sidecar(tmp_path: Path, capsys) -> None:
    from lmforge.artifacts import EVAL_RESULTS_FILE as RESULTS_FILE
    from lmforge.evaluate.watch import _record, read_results
    from lmforge.track import views
    from lmforge.track.store import Store

    run = _run_dir(tmp_path)
    db = tmp_path / "lmforge.db"
    results = {"loss": math.nan, "perplexity": math.inf, "delta": -math.inf, "acc": 0.5}
    with Store.open(db) as store:
        run_id = store.start_run("r", str(run), {})
        _record(run, store, Path("step-000010"), "step-000010:abc", 10, results, 1.0)
        assert [same(a, b) for a, b in zip(store.metrics(run_id, ["eval/loss"])["eval/loss"]["value"], [math.nan])] == [True]
        assert store.metrics(run_id, ["eval/perplexity", "eval/delta"]) == {
            "eval/perplexity": {"step": [10], "value": [math.inf]}, "eval/delta": {"step": [10], "value": [-math.inf]}}
        (event,) = [e for e in store.events(run_id) if e["kind"] == "eval"]
        assert event["data"] == {"checkpoint": "step-000010", "loss": "nan", "perplexity": "inf", "delta": "-inf", "acc": 0.5}
    line = (run / RESULTS_FILE).read_text()
    assert strict(line)["metrics"] == {"loss": "nan", "perplexity": "inf", "delta": "-inf", "acc": 0.5}
    (row,) = read_results(run)
    assert all(same(row["metrics"][k], v) for k, v in results.items())
    # `lmforge runs show --json` (and the dashboard's API, tests/test_dashboard.py): the same rule.
    capsys.readouterr()
    assert views.runs_show(str(db), "r", as_json=True) == 0
    shown = strict(capsys.readouterr().out)
    assert shown["summary"]["eval/loss"]["last"] == "nan" and shown["summary"]["eval/delta"]["last"] == "-inf"
    assert [e["data"]["perplexity"] for e in shown["events"] if e["kind"] == "eval"] == ["inf"]


def test_progress_json_lines(monkeypatch, capsys) -> None:
    from lmforge.util import progress_bar, set_progress_mode

    monkeypatch.setenv("LMFORGE_PROGRESS", "auto")  # restored after the test
    set_progress_mode("json")
    try:
        with progress_bar() as bar:
            task = bar.add_task("train", total=2, loss_value=math.nan)
            bar.advance(task, 2)
    finally:
        set_progress_mode("auto")
    lines = [strict(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["loss_value"] == "nan" and lines[-1]["completed"] == 2
