#!/usr/bin/env python3
"""Build the bundled classification task `stdlib-modules`: a Python standard-library function ->
the top-level package it lives in (asyncio, email, tkinter, ...), split by FILE.

    python3 scripts/make_stdlib_modules_task.py     # writes lmforge/datasets/stdlib-modules-{train,test,labels}.jsonl

Labels: the 12 packages of LABELS (each has 3+ files with functions in CPython 3.10-3.13; distutils
is left out because 3.12 removed it). Examples: every function or method (code as written, with its
docstring, cut at a line boundary after MAX_CHARS characters; at least MIN_CHARS) of the package's
files, tests and demos excluded.

The split is by file, so no file (its helpers, its idioms, its near-duplicate methods) is on both
sides: within each package the files are ordered by a hash of their path (relative to the standard
library) and go to the test side until it holds TEST_SHARE of the package's functions (at least one
file; the train side keeps at least one). Then each side is sampled by a hash of the function's id
down to TRAIN_PER_LABEL / TEST_PER_LABEL per label. Everything is a pure function of the paths and
the source, so the same Python gives the same files; the shipped files were made with CPython 3.11.

Records: {"id": "email/_header_value_parser.py::get_word", "text": code, "label": "email"}.
The labels file: {"label": name, "description": one line} per label, for zero-shot.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "lmforge" / "datasets"
LABELS = {
    "asyncio": "asynchronous I/O: event loops, coroutines, tasks, futures, streams, transports",
    "ctypes": "calling C functions in shared libraries: C data types, structures, pointers",
    "email": "parsing and generating email messages: headers, MIME parts, encodings",
    "http": "HTTP clients and servers, cookies and status codes",
    "idlelib": "the IDLE editor: windows, menus, syntax colouring, the debugger and shell",
    "importlib": "the import system: finders, loaders, module specs, resources, metadata",
    "logging": "logging: loggers, handlers, formatters, configuration",
    "multiprocessing": "processes, pools, queues, locks and shared memory between processes",
    "tkinter": "Tk graphical user interfaces: widgets, canvases, events, dialogs",
    "unittest": "unit testing: test cases, assertions, suites, runners, mocks",
    "urllib": "URLs: parsing, quoting, opening and fetching, robots.txt",
    "xml": "XML: DOM, SAX, ElementTree parsing and writing",
}
SKIP_DIRS = {"test", "tests", "idle_test", "turtledemo", "__pycache__"}
TEST_SHARE = 0.25
TRAIN_PER_LABEL = 48
TEST_PER_LABEL = 24
MAX_CHARS = 360
MIN_CHARS = 80


def stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def cut(code: str) -> str:
    """The code up to the last line boundary within MAX_CHARS (the first line whole)."""
    if len(code) <= MAX_CHARS:
        return code
    head = code[:MAX_CHARS]
    return head[: head.rfind("\n")] if "\n" in head else head


def functions(path: Path, rel: str) -> list[dict[str, str]]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            code = cut(textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno])).strip())
            if len(code) >= MIN_CHARS:
                out.append({"id": f"{rel}::{node.name}@{node.lineno}", "text": code})
    return out


def build(stdlib: Path) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for label in LABELS:
        files = []
        for f in sorted((stdlib / label).rglob("*.py")):
            rel = f.relative_to(stdlib).as_posix()
            if SKIP_DIRS & set(Path(rel).parts):
                continue
            fns = functions(f, rel)
            if fns:
                files.append((rel, fns))
        if len(files) < 2:
            sys.exit(f"{label}: {len(files)} file(s) with functions; need 2+ to split by file")
        files.sort(key=lambda rf: stable_hash("file:" + rf[0]))
        total = sum(len(fns) for _, fns in files)
        side_test, held = [], 0
        for rel, fns in files[:-1]:  # the last file always stays on the train side
            if held >= TEST_SHARE * total and side_test:
                break
            side_test.append(rel)
            held += len(fns)
        for rel, fns in files:
            for fn in fns:
                (test if rel in side_test else train).append({**fn, "label": label})
    pick = lambda rows, n: [r for lab in LABELS for r in sorted(  # noqa: E731
        (r for r in rows if r["label"] == lab), key=lambda r: stable_hash("fn:" + r["id"]))[:n]]
    return pick(train, TRAIN_PER_LABEL), pick(test, TEST_PER_LABEL)


def main() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, test = build(stdlib)
    train_files = {r["id"].split("::")[0] for r in train}
    test_files = {r["id"].split("::")[0] for r in test}
    assert not train_files & test_files, "a file on both sides"
    for name, rows in (("train", train), ("test", test)):
        path = OUT / f"stdlib-modules-{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} examples, {path.stat().st_size / 1024:.0f} KB")
    path = OUT / "stdlib-modules-labels.jsonl"
    path.write_text("".join(json.dumps({"label": k, "description": v}) + "\n" for k, v in LABELS.items()), encoding="utf-8")
    print(f"{path}: {len(LABELS)} labels")


if __name__ == "__main__":
    main()
