"""Prepare throughput with hygiene on vs off, and peak memory at a large input.

    python benchmarks/prepare.py --mb 200                 # throughput: hygiene off vs on, same tokenizer
    python benchmarks/prepare.py --mb 1024 --only on      # peak RSS of prepare (all its processes) at 1 GB

The corpus is generated into a temporary directory: this Python's standard library (.py files, no
site-packages) and tinyshakespeare (if found) repeated until --mb, each copy varied so that copies
are not near duplicates of each other (every word of 4+ letters gets a per-copy suffix: its word
5-grams all differ, it still looks like code), plus planted duplicates: --exact-dup of the files
get an exact copy (re-indented), --near-dup a near copy (two lines changed).

Wall time on a shared machine swings with the other jobs' load, so the CPU time of prepare's
process tree (user + system, workers included) is printed too: on a busy machine the ratio of CPU
times is the meaningful one.

Each prepare runs as its own process (`python -m lmforge prepare`) with a tokenizer trained once
beforehand (`--tokenizer`), so "off" is scan + tokenize alone and "on" adds the hygiene stages; the
peak RSS is the largest sum over prepare's process tree (main + hygiene workers), sampled from
/proc every 0.1 s. Prints a JSON line per run and a summary; docs/data.md records the figures.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SKIP = ["site-packages/*", "dist-packages/*", "__pycache__/*", "*/__pycache__/*"]
WORD = re.compile(r"\b([A-Za-z]{4,})\b")


def base_files() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if any(fnmatch.fnmatch(p.relative_to(root).as_posix(), s) for s in SKIP):
            continue
        try:
            out.append((p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    if SHAKESPEARE.is_file():
        out.append(("tinyshakespeare.txt", SHAKESPEARE.read_text(encoding="utf-8")))
    return out


def generate(root: Path, mb: float, exact_dup: float, near_dup: float) -> dict[str, int]:
    files = base_files()
    target = int(mb * 1e6)
    written = planted_exact = planted_near = n = 0
    copy = 0
    while written < target:
        for i, (rel, text) in enumerate(files):
            if written >= target:
                break
            varied = WORD.sub(lambda m, c=copy: f"{m.group(1)}{c:x}", text) if copy else text
            path = root / f"copy{copy:03d}" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(varied, encoding="utf-8")
            written += len(varied.encode())
            n += 1
            h = (i * 2654435761 + copy * 40503) % 1000 / 1000  # deterministic choice of files to plant
            if h < exact_dup:
                dup = path.with_name(path.stem + "_dup" + path.suffix)
                dup.write_text(varied.replace("\n", "  \n"), encoding="utf-8")  # same after normalisation
                written += dup.stat().st_size
                planted_exact += 1
            elif h < exact_dup + near_dup:
                lines = varied.split("\n")
                for k in (len(lines) // 3, 2 * len(lines) // 3):
                    lines[k] = "# changed line"
                dup = path.with_name(path.stem + "_near" + path.suffix)
                dup.write_text("\n".join(lines), encoding="utf-8")
                written += dup.stat().st_size
                planted_near += 1
        copy += 1
    return {"bytes": written, "files": n, "planted_exact": planted_exact, "planted_near": planted_near, "copies": copy}


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_prepare(args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LMFORGE_PROGRESS": "quiet"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak, last = 0, t0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
        if time.perf_counter() - last > 60:  # a long run says where it is (the 1 GB memory run takes a while)
            last = time.perf_counter()
            print(json.dumps({"running_s": round(last - t0), "peak_rss_mb_so_far": round(peak / 2**20),
                              "load_average": os.getloadavg()}), flush=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # prepare and its joined workers
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        sys.exit(f"prepare failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak / 2**20, "stdout": out.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200, help="corpus size in MB (default 200)")
    ap.add_argument("--exact-dup", type=float, default=0.03, help="fraction of files planted with an exact copy")
    ap.add_argument("--near-dup", type=float, default=0.03, help="fraction of files planted with a near copy")
    ap.add_argument("--only", choices=["on", "off"], help="run only this setting (e.g. the 1 GB memory run)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--keep", help="generate into this directory and keep it (default: a temp dir, removed)")
    a = ap.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="lmforge-bench-prepare-"))
    try:
        corpus = root / "corpus"
        t = time.perf_counter()
        if not corpus.is_dir():
            corpus.mkdir(parents=True)
            info = generate(corpus, a.mb, a.exact_dup, a.near_dup)
        else:
            info = {"bytes": sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())}
        print(json.dumps({"corpus": str(corpus), **info, "generate_s": round(time.perf_counter() - t, 1)}), flush=True)
        tok = root / "tok"
        if not (tok / "tokenizer.json").is_file():  # one tokenizer for every run: off is tokenize alone
            sample = sorted(corpus.glob("copy000"))[0]
            run_prepare(["prepare", str(sample), "--out", str(tok), "--vocab-size", "8192", "--no-dedup", "--quality", "off",
                         "--pii", "keep", "--overwrite"])
        mb = info["bytes"] / 1e6
        results = {}
        settings = {"off": ["--no-dedup", "--quality", "off", "--pii", "keep"], "on": []}
        for name in ([a.only] if a.only else ["off", "on"]):
            r = run_prepare(["prepare", str(corpus), "--out", str(root / f"ds-{name}"), "--tokenizer", str(tok / "tokenizer.json"),
                             "--workers", str(a.workers), "--overwrite", *settings[name]])
            r["mb_per_s"] = mb / r["seconds"]
            r["load_average"] = os.getloadavg()
            results[name] = r
            print(json.dumps({"hygiene": name, "mb": round(mb, 1), **{k: (round(v, 2) if isinstance(v, float) else v)
                                                                      for k, v in r.items()}}), flush=True)
        if "on" in results:
            m = json.loads((root / "ds-on" / "manifest.json").read_text())["hygiene"]
            print(json.dumps({"removed": {k: sum(c["documents"] for c in v.values()) for k, v in m["removed"].items()},
                              "redacted": {k: sum(c["items"] for c in v.values()) for k, v in m["redacted"].items()}}))
        if len(results) == 2:
            on, off = results["on"]["seconds"], results["off"]["seconds"]
            con, coff = results["on"]["cpu_s"], results["off"]["cpu_s"]
            print(f"hygiene on: {on:.1f} s ({mb / on:.2f} MB/s), off: {off:.1f} s ({mb / off:.2f} MB/s): "
                  f"on / off = {on / off:.2f} (goal <= 2); CPU time on {con:.0f} s, off {coff:.0f} s: {con / coff:.2f}; "
                  f"peak RSS on {results['on']['peak_rss_mb']:.0f} MB, "
                  f"off {results['off']['peak_rss_mb']:.0f} MB; load average {os.getloadavg()}")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
