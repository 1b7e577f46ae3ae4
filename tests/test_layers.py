"""Imports point down (docs: DESIGN.md "Layout"). This test reads every lmforge module's imports
with `ast` (module level, inside functions and under TYPE_CHECKING alike; relative imports
resolved) and keeps these rules true:

1. Library code never imports lmforge.cli; only lmforge/__main__.py does.
2. The layers below training (artifacts, model, generate, convert, data, evaluate, serve, track,
   tokenizer, config, util, errors, and the low-level hardware, jsonl, lora, chat, aot, kernels modules) import nothing
   from lmforge.train.
3. serve imports neither lmforge.train nor lmforge.evaluate.
4. model.py imports nothing from generate, aot, serve, train or evaluate (the KV cache is a Protocol there).
5. No import cycles between modules (a cycle is reported module by module).

Each rule is also checked against a made-up violation, so a broken reader cannot pass vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"

BELOW_TRAIN = ("artifacts", "model", "generate", "convert", "data", "evaluate", "serve", "track", "tokenizer", "config",
               "util", "errors", "hardware", "jsonl", "lora", "chat", "aot", "kernels")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The lmforge modules `source` (module `name`, a package's __init__ if is_package) imports
    anywhere in its text."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from . import checkpoint` imports the submodule; `from .x import name` imports x
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import lmforge.train.loop` names the module itself
                t = t.rpartition(".")[0]
            if t.startswith("lmforge") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path.read_text(encoding="utf-8"), known, path.name == "__init__.py")
            for name, path in mods.items()}


def under(name: str, *prefixes: str) -> bool:
    return any(name == f"lmforge.{p}" or name.startswith(f"lmforge.{p}.") for p in prefixes)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(_cycle_path(g, set(component)))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _cycle_path(g: dict[str, set[str]], component: set[str]) -> list[str]:
    """One concrete cycle through a component: a -> b -> ... -> a."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in g[path[-1]] if w in component)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        step = next((w for w in nxt if w not in seen), None)
        if step is None:  # every neighbour seen: the walk closed a cycle through nxt[0]
            return path[path.index(nxt[0]):] + [nxt[0]]
        path.append(step)
        seen.add(step)


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, deps in sorted(g.items()):
        for dep in sorted(deps):
            if dep == "lmforge.cli" and name != "lmforge.__main__":
                bad.append(f"rule 1: {name} imports lmforge.cli (only __main__ may)")
            if under(name, *BELOW_TRAIN) and under(dep, "train"):
                bad.append(f"rule 2: {name} imports {dep} (the layers below train/ never import it)")
            if under(name, "serve") and under(dep, "train", "evaluate"):
                bad.append(f"rule 3: {name} imports {dep} (serve imports neither train nor evaluate)")
            if name == "lmforge.model" and under(dep, "generate", "aot", "serve", "train", "evaluate"):
                bad.append(f"rule 4: lmforge.model imports {dep}")
    return bad


def test_the_reader_sees_every_kind_of_import() -> None:
    known = {"lmforge", "lmforge.a", "lmforge.pkg", "lmforge.pkg.b", "lmforge.pkg.c", "lmforge.cli", "lmforge.train",
             "lmforge.train.loop"}
    src = (
        "from typing import TYPE_CHECKING\n"
        "from . import a\n"  # lmforge.pkg.c: `.` is lmforge.pkg
        "from .b import thing\n"
        "from .. import cli\n"
        "if TYPE_CHECKING:\n    from ..train import loop\n"
        "def f():\n    import lmforge.train.loop as L\n    from lmforge import a\n"
    )
    assert imports_of("lmforge.pkg.c", src, known) == {"lmforge.pkg.b", "lmforge.cli", "lmforge.train.loop", "lmforge.a",
                                                       "lmforge.pkg"}
    assert imports_of("lmforge.pkg", "from . import b\nfrom .c import x\n", known, is_package=True) == {
        "lmforge.pkg.b", "lmforge.pkg.c"}


def test_the_rules_catch_made_up_violations() -> None:
    g = {"lmforge.serve.api": {"lmforge.evaluate.harness", "lmforge.cli"}, "lmforge.model": {"lmforge.generate"},
         "lmforge.artifacts": {"lmforge.train.checkpoint"}, "lmforge.generate": {"lmforge.model"}}
    assert [v.split(":")[0] for v in violations(g)] == ["rule 2", "rule 4", "rule 1", "rule 3"]
    assert cycles(g) == [["lmforge.generate", "lmforge.model", "lmforge.generate"]]
    three = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(three) == [["a", "b", "c", "a"]]


def test_the_module_list_is_complete() -> None:
    names = set(modules())
    assert {"lmforge.artifacts", "lmforge.model", "lmforge.train.loop", "lmforge.serve.api", "lmforge.cli"} <= names


def test_imports_point_down() -> None:
    bad = violations(graph())
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)
