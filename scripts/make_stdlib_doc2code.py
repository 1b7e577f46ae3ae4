#!/usr/bin/env python3
"""Build the bundled retrieval task `stdlib-doc2code` (docstring -> function) from this Python's
standard library, and the training pairs of the other files.

    python3 scripts/make_stdlib_doc2code.py                       # writes lmforge/tasks/stdlib-doc2code.jsonl
    python3 scripts/make_stdlib_doc2code.py --pairs pairs.jsonl   # also the train-side pairs (contrastive stage)
    python3 scripts/make_stdlib_doc2code.py --corpus stdlib-train  # also the train-side files (pretraining corpus)

Every function or method with a docstring becomes a pair: the query is the docstring's first
paragraph (whitespace collapsed), the document is the function's code with the docstring removed
(cut at a line boundary after MAX_DOC_CHARS characters). Files are split, not functions: a file
whose path hashes below TEST_PERCENT goes to the test side (the task), every other file to the
train side (the pairs), so no file, and therefore no near-duplicate helper or shared idiom of one
module, is on both sides. The split is a pure function of the file's path relative to the standard
library, so the pairs of any Python version exclude the task's files.

The task: N_QUERIES queries sampled (by a hash of their id) from the test side, each with its one
relevant function, in a corpus of those functions plus N_DISTRACTORS other test-side functions.
Format: docs/eval.md ("Retrieval tasks"). Tests, demos and vendored code are left out (idle_test,
test, tests, turtledemo, encodings, site-packages, ensurepip, lib2to3, pydoc_data).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "lmforge" / "tasks" / "stdlib-doc2code.jsonl"
TEST_PERCENT = 20
N_QUERIES = 300
N_DISTRACTORS = 450
MAX_DOC_CHARS = 500
MAX_QUERY_CHARS = 300
SKIP_DIRS = {"test", "tests", "idle_test", "turtledemo", "encodings", "site-packages", "ensurepip", "lib2to3",
             "pydoc_data", "__pycache__"}


def stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def is_test_file(rel: str) -> bool:
    """The split: a pure function of the path relative to the standard library."""
    return stable_hash("file:" + rel) % 100 < TEST_PERCENT


def first_paragraph(doc: str) -> str:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(para.split())[:MAX_QUERY_CHARS]


def functions(path: Path, rel: str) -> list[dict[str, str]]:
    """{"id", "query", "code"} for each documented function or method of one file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                item = pair(child, lines, f"{rel}::{prefix}{child.name}")
                if item:
                    out.append(item)
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def pair(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], ident: str) -> dict[str, str] | None:
    doc = ast.get_docstring(fn)
    if not doc or not fn.body or fn.end_lineno is None:
        return None
    query = first_paragraph(doc)
    if len(query.split()) < 4:
        return None
    first = fn.body[0]  # the docstring's statement: its lines are cut out of the code
    kept = lines[fn.lineno - 1 : first.lineno - 1] + lines[(first.end_lineno or first.lineno) : fn.end_lineno]
    code = textwrap.dedent("\n".join(kept)).strip("\n")
    body_lines = [ln for ln in code.splitlines()[1:] if ln.strip()]
    if len(body_lines) < 2:
        return None
    if len(code) > MAX_DOC_CHARS:  # cut at a line boundary
        code = code[: code.rfind("\n", 0, MAX_DOC_CHARS)].rstrip()
    return {"id": ident, "query": query, "code": code}


def collect(stdlib: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(test-side, train-side) pairs, in path order; duplicate code kept once (its first place)."""
    test, train, seen = [], [], set()
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        for item in functions(path, rel):
            if item["code"] in seen:
                continue
            seen.add(item["code"])
            (test if is_test_file(rel) else train).append(item)
    return test, train


def build_task(test: list[dict[str, str]]) -> list[dict]:
    ranked = sorted(test, key=lambda it: stable_hash("pick:" + it["id"]))
    queries, distractors = ranked[:N_QUERIES], ranked[N_QUERIES : N_QUERIES + N_DISTRACTORS]
    docs = sorted(queries + distractors, key=lambda it: it["id"])
    records: list[dict] = [{"type": "doc", "id": it["id"], "text": it["code"]} for it in docs]
    records += [{"type": "query", "id": "q:" + it["id"], "text": it["query"], "relevant": [it["id"]]}
                for it in sorted(queries, key=lambda it: it["id"])]
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library directory")
    ap.add_argument("--task", default=str(TASK), help="where the task goes (default: the bundled file)")
    ap.add_argument("--pairs", help="also write the train-side pairs {query, positive} here (JSONL)")
    ap.add_argument("--corpus", help="also copy the train-side .py files into this directory (to pretrain on)")
    args = ap.parse_args()
    test, train = collect(Path(args.stdlib))
    records = build_task(test)
    write_jsonl(Path(args.task), records)
    n_docs = sum(r["type"] == "doc" for r in records)
    print(f"wrote {args.task}: {n_docs} documents, {len(records) - n_docs} queries "
          f"({Path(args.task).stat().st_size / 1024:.0f} KiB) from {len(test)} test-side functions "
          f"(Python {sys.version.split()[0]})")
    if args.pairs:
        write_jsonl(Path(args.pairs), [{"query": it["query"], "positive": it["code"]} for it in train])
        print(f"wrote {args.pairs}: {len(train)} train-side pairs")
    if args.corpus:
        stdlib, n = Path(args.stdlib), 0
        for path in sorted(stdlib.rglob("*.py")):
            rel = path.relative_to(stdlib).as_posix()
            if not (SKIP_DIRS & set(rel.split("/")[:-1])) and not is_test_file(rel):
                dest = Path(args.corpus) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                n += 1
        print(f"copied {n} train-side files into {args.corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
