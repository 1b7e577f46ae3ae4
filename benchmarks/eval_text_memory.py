"""Peak memory of `lmforge eval --text` on a file of one long line (issue 21.4).

    python benchmarks/eval_text_memory.py [--mb 5 50] [--run RUN] [--text-only]

For each size, writes a file of that many MB that is ONE line (tinyshakespeare with its newlines
replaced by spaces, repeated) and runs `lmforge eval RUN --text FILE --json` in a child process;
prints the child's peak RSS (getrusage) and wall time. The text is read and tokenized in bounded
pieces (evaluate/harness.py `text_pieces`), so the peak should not grow with the file: before, a
50 MB line passed 8.9 GB in 100 s and was still growing. Without --run, a tiny run is trained first
(tiny-cpu, 10 steps on 200 kB of tinyshakespeare). The machine load (uptime) is printed first: wall
times taken while other jobs run are upper bounds; the peak RSS does not depend on load.

--text-only runs, in the child, the text side of `eval --text` alone: the same functions (read in
pieces, tokenize 16 pieces per call, cut into batches of windows), every batch built and dropped,
no model. It is what grew with the file, and it takes minutes where the whole command on 50 MB
takes an hour of CPU (the model's forward passes over 26M tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def lmforge(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", "--progress", "quiet", *args], env=env, check=True,
                          capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[5, 50], help="file sizes in MB (default: 5 50)")
    ap.add_argument("--run", help="a run or checkpoint to evaluate (default: train a tiny one)")
    ap.add_argument("--text-only", action="store_true", help="the text pipeline of eval --text alone, no model")
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = args.run
        if run is None:
            (work / "corpus.txt").write_bytes(SHAKESPEARE.read_bytes()[:200_000])
            lmforge("prepare", str(work / "corpus.txt"), "--out", str(work / "data"), "--vocab-size", "512", env=env)
            run = str(work / "run")
            lmforge("train", str(REPO / "configs" / "tiny-cpu.yaml"), "--run-dir", run, "--set", f"data.path={work / 'data'}",
                    "--set", "train.max_steps=10", env={**env, "LMFORGE_DB": str(work / "lmforge.db")})
        line = SHAKESPEARE.read_text(encoding="utf-8").replace("\n", " ")
        for mb in args.mb:
            n = int(mb * 1_000_000)
            text = work / "line.txt"
            text.write_text((line * (n // len(line) + 1))[:n], encoding="utf-8")
            start = time.perf_counter()
            if args.text_only:
                peak, out = peak_rss([sys.executable, "-c", TEXT_ONLY, run, str(text)], env=env)
                what = f"{int(out):,} tokens"
            else:
                peak, out = peak_rss([sys.executable, "-m", "lmforge", "--progress", "quiet", "eval", run, "--text",
                                      str(text), "--json"], env=env)
                what = f"loss {json.loads(out)['metrics']['loss']:.4f}"
            wall = time.perf_counter() - start
            label = "text pipeline of eval --text" if args.text_only else "eval --text"
            print(f"{label}, {mb:g} MB on one line: peak RSS {peak / 2**20:.0f} MiB, {wall:.0f} s ({what})", flush=True)


# The text side of evaluate_model for --text: the same functions, every batch made, no model.
TEXT_ONLY = """
import sys
from lmforge.artifacts import load_model
from lmforge.evaluate.harness import encoded, text_pieces
from lmforge.evaluate.loss import stream_batches
loaded = load_model(sys.argv[1])
tok, seq_len = loaded.tokenizer, min(loaded.config.data.seq_len, loaded.model.cfg.max_seq_len)
n = 0
for batch in stream_batches(encoded(tok, text_pieces(sys.argv[2])), start_id=tok.eos_id, seq_len=seq_len,
                           batch_size=loaded.config.eval.batch_size):
    n += int((batch['targets'] != -100).sum())
print(n)
"""


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """(peak RSS in bytes, stdout) of `cmd`, run as the only child of a fresh launcher process, so
    getrusage's RUSAGE_CHILDREN maximum is this command's alone."""
    launcher = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                "print(r.stdout, end=''); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", launcher, *cmd], env=env, capture_output=True, text=True, check=True)
    first, _, rest = r.stdout.partition("\n")
    return int(first) * 1024, rest  # ru_maxrss is in KiB on Linux

if __name__ == "__main__":
    main()
