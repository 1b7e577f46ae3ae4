"""Peak memory of `lmforge eval --text` on a file of one long line (issue 21.4).

    python benchmarks/eval_text_memory.py [--mb 5 50] [--run RUN]

For each size, writes a file of that many MB that is ONE line (tinyshakespeare with its newlines
replaced by spaces, repeated) and runs `lmforge eval RUN --text FILE --json` in a child process;
prints the child's peak RSS (getrusage) and wall time. The text is read and tokenized in bounded
pieces (evaluate/harness.py `text_pieces`), so the peak should not grow with the file: before, a
50 MB line passed 8.9 GB in 100 s and was still growing. Without --run, a tiny run is trained first
(tiny-cpu, 10 steps on 200 kB of tinyshakespeare). The machine load (uptime) is printed first: wall
times taken while other jobs run are upper bounds; the peak RSS does not depend on load.
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
            peak, out = peak_rss([sys.executable, "-m", "lmforge", "--progress", "quiet", "eval", run, "--text", str(text),
                                  "--json"], env=env)
            wall = time.perf_counter() - start
            loss = json.loads(out)["metrics"]["loss"]
            print(f"{mb:g} MB on one line: peak RSS {peak / 2**20:.0f} MiB, {wall:.0f} s (loss {loss:.4f})", flush=True)


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
