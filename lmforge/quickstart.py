"""`lmforge quickstart`: the whole life of a model on data every machine has, in minutes on a CPU.

The stand-in for "your company's code base" is the Python standard library of the running
interpreter (its .py files, without the test suites and site-packages). The quickstart:

1. prepares it (tokenizer + shards) into <workdir>/data/<name>, or reuses a verified copy;
2. plans a run of the bundled small-cpu recipe whose max_steps fits the time budget, calibrated by
   timing two training steps of that very model on this machine, in the dtype the run will use
   (`train.dtype: auto`: fp32 on a CPU without native bf16, where bf16 is many times slower);
3. trains it into <workdir>/runs/<name> (resuming if a previous quickstart was interrupted),
   started like any `lmforge train` (train/start.py: the run directory's lock, the resume checks);
4. reports validation loss and perplexity before (step 0) and after training, prints samples,
   indexes a few of the corpus's files (at most SEARCH_BYTES of them) with the model it trained
   (raw mean pooling, no contrastive stage) into <workdir>/idx/<name>, shows one search whose
   query is a docstring line of one of them, and says what to do next.

<name> is `stdlib` for the default corpus; for `--source DIR` it is DIR's base name plus a short
hash of its resolved path (e.g. `mycode-1a2b3c4d`), so a different source never reuses another
source's dataset or run, and one workdir can hold several.

Running it again reuses everything that exists for that source: the data, the run (finished runs
are not retrained), so the second run takes seconds. A run keeps the step count it was planned
with: `--minutes` only sizes a new run (the learning-rate schedule is laid out over max_steps, so
stretching a run afterwards would not be the same training). When it differs from the reused
run's, quickstart says so, and how to get a run of the new size.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import Config, load_config
from .ranges import QUICKSTART_MINUTES
from .util import atomic_write_text, console
from .util import out as results_out  # the report (step 4): stdout, every progress mode

RECIPE = "small-cpu"  # a bundled recipe (lmforge/configs/small-cpu.yaml), found by name from any directory
STDLIB_EXCLUDE = [
    "site-packages/*", "dist-packages/*", "test/*", "tests/*", "*/test/*", "*/tests/*",
    "idlelib/*", "lib2to3/*", "ensurepip/*", "tkinter/*", "turtledemo/*", "pydoc_data/*",
    "__pycache__/*", "*/__pycache__/*",
]
PROMPTS = ["def read_config(path):\n", "class Cache:\n    def __init__(self", "import os\n\n"]
SEARCH_BYTES = 40_000  # source bytes the closing search demo indexes: a few seconds of embedding
SEARCH_FILE_BYTES = 20_000  # files larger than this are left out of the demo (they would take its whole budget)


def quickstart(workdir: str = "lmforge-quickstart", minutes: float = 3.0, source: str | None = None,
               threads: int | None = None) -> int:
    from .data.manifest import MANIFEST_FILE, read_manifest, verify_dataset
    from .data.prepare import prepare
    from .generate import generate
    from .artifacts import CONFIG_FILE, QUICKSTART_FILE, checkpoint_step, find_resume_checkpoint, load_model
    from .train.loop import device
    from .train.start import StartRequest, plan_start, start
    from .model import Transformer, num_params
    from .threads import choose

    QUICKSTART_MINUTES.check("--minutes", minutes)
    n_threads = choose(threads, exact=True)  # as training will (powers of two), before the step-time calibration
    work = Path(workdir)
    src = Path(source) if source else Path(sysconfig.get_paths()["stdlib"])
    name = source_name(source)
    data_dir = work / "data" / name
    run_dir = work / "runs" / name
    t0 = time.perf_counter()

    # 1. data ----------------------------------------------------------------------------------
    console.rule("[bold]1/4 prepare")
    if (data_dir / MANIFEST_FILE).is_file() and not verify_dataset(data_dir):
        console.print(f"reusing the verified dataset in {data_dir}")
    else:
        console.print(f"preparing {src} (your code base would go here) -> {data_dir}")
        prepare(
            [str(src)], str(data_dir), vocab_size=4096, tokenizer=None, include=["*.py"],
            exclude=STDLIB_EXCLUDE if not source else [], text_field="text", val_fraction=0.02,
            shard_tokens=50_000_000, strict=False, workers=n_threads, overwrite=True,
        )
    manifest = read_manifest(data_dir)

    # 2. config --------------------------------------------------------------------------------
    console.rule("[bold]2/4 plan the run")
    saved = run_dir / CONFIG_FILE
    plan_file = run_dir / QUICKSTART_FILE  # what the run was planned for (source, minutes)
    request = StartRequest(run_dir=str(run_dir))  # a reused run: its saved config
    if saved.is_file():
        cfg = load_config(saved)
        planned = _planned_minutes(plan_file)
        console.print(f"reusing the run in {run_dir} ({cfg.train.max_steps} steps"
                      + (f", planned for {planned:g} min)" if planned is not None else ")"))
        if planned is None or not math.isclose(planned, minutes):
            console.print(
                f"--minutes {minutes:g} does not resize it (a run keeps the steps it was planned with); "
                f"for a {minutes:g}-minute run use another --workdir or delete {run_dir}"
            )
    else:
        request = StartRequest(config=RECIPE, run_dir=str(run_dir), overrides=(f"data.path={data_dir}",)
                               + ((f"train.threads={threads}",) if threads else ()))
        recipe = plan_start(request, device=device()).cfg  # checked and resolved: train.dtype as the run will use it
        step_s = _seconds_per_step(recipe)
        steps = max(20, int(minutes * 60 / step_s))
        request = replace(request, overrides=request.overrides + (
            f"train.max_steps={steps}", f"train.warmup_steps={min(recipe.train.warmup_steps, steps // 10)}",
            f"train.eval_every={max(1, steps // 4)}", f"train.ckpt_every_steps={max(1, steps // 4)}"))
        cfg = plan_start(request, device=device()).cfg
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_file, json.dumps({"source": str(src.resolve()), "minutes": minutes}) + "\n")
        console.print(
            f"model: {num_params(cfg.model) / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, "
            f"d_model {cfg.model.d_model}; {step_s:.2f} s/step measured -> {cfg.train.max_steps} steps "
            f"x {cfg.train.global_batch * cfg.data.seq_len:,} tokens in ~{minutes:g} min"
        )

    # 3. train ---------------------------------------------------------------------------------
    console.rule("[bold]3/4 train")
    torch.manual_seed(cfg.train.seed)
    before = _val_loss(Transformer(cfg.model), cfg)
    ckpt, _ = find_resume_checkpoint(run_dir)
    done = ckpt is not None and checkpoint_step(ckpt) >= cfg.train.max_steps
    if done:
        console.print(f"the run in {run_dir} is already complete ({ckpt.name}); not retraining it")
    else:
        code = start(request)  # the run directory's lock, the resume checks: like any `lmforge train`
        if code != 0:
            return code
    loaded = load_model(run_dir)
    model, tok, cfg, step = loaded.model, loaded.tokenizer, loaded.config, loaded.origin.step
    after = _val_loss(model, cfg)

    # 4. report --------------------------------------------------------------------------------
    results_out.rule("[bold]4/4 results")
    results_out.print(
        f"dataset: {manifest['splits']['train']['tokens']:,} train tokens, "
        f"{manifest['splits']['val']['tokens']:,} validation tokens"
        if "splits" in manifest else f"dataset: {data_dir}"
    )
    results_out.print(f"validation loss before training: {before:.3f} (perplexity {math.exp(before):,.1f})")
    results_out.print(f"validation loss after {step} steps: {after:.3f} (perplexity {math.exp(after):,.1f})")
    for i, prompt in enumerate(PROMPTS):
        ids = generate(model, tok.encode(prompt), max_tokens=60, temperature=0.8, top_k=50, seed=i,
                       stop_ids=[tok.eos_id] if tok.eos_id is not None else [])
        results_out.rule(f"sample {i + 1}", style="dim")
        results_out.print(prompt + tok.decode(ids), markup=False, highlight=False)
    idx_dir, query = _search_demo(loaded, run_dir, src, work / "idx" / name, exclude=STDLIB_EXCLUDE if not source else [])
    results_out.rule("[bold]next")
    results_out.print(
        f"finished in {time.perf_counter() - t0:.0f} s. Next:\n"
        f"  lmforge sample {run_dir} --prompt 'def main(' --max-tokens 80\n"
        f"  lmforge search {idx_dir} {shlex.quote(query)} -k 5   # docs/search.md: index, search, ask\n"
        f"  lmforge train {saved} --run-dir {run_dir} --set train.max_steps={cfg.train.max_steps * 2}   # train longer\n"
        f"  lmforge prepare ./your-code --out data/yours && "
        f"lmforge train {RECIPE} --set data.path=data/yours   # your own data",
        markup=False, highlight=False,
    )
    return 0


def _search_demo(loaded, run_dir: Path, src: Path, idx_dir: Path, exclude: list[str]) -> tuple[Path, str]:  # noqa: ANN001
    """Index a few of the corpus's files with the model just trained (its raw mean pooling), search
    them once with a docstring line of one of them, and print the best chunks."""
    from .data.prepare import collect_sources
    from .understand.embed import Embedder
    from .understand.index.build import build_index
    from .understand.index.search import Searcher
    from .understand.index.store import Index

    console.rule("[bold]search: index a few files with the trained model")
    found = collect_sources([src], include=["*.py"], exclude=exclude)
    sources = [s for s in found if 0 < s.bytes <= SEARCH_FILE_BYTES] or sorted(found, key=lambda s: s.bytes)[:1]
    step = max(1, len(sources) // 12)  # files spread over the corpus, not its first few
    chosen, total = [], 0
    for s in sources[::step]:
        if total + s.bytes > SEARCH_BYTES and chosen:
            break
        chosen.append(s.path)
        total += s.bytes
    embedder = Embedder(loaded)  # the run's weights as loaded above; the pooling its config records (mean)
    build_index(run_dir, chosen, idx_dir, overwrite=True, chunk_size=min(128, loaded.model.cfg.max_seq_len),
                embedder=embedder)
    query = _docstring_line(chosen) or "open a file and read it"
    with Index.open(idx_dir) as index:
        hits = Searcher(index, embedder).search(query, k=3)
    results_out.rule(f"search {len(chosen)} files for: {query}", style="dim")
    for i, h in enumerate(hits, 1):
        first = next((line.strip() for line in h.text.splitlines() if line.strip()), "")
        results_out.print(f"{i}. {h.where()}  {first[:80]}", markup=False, highlight=False)
    return idx_dir, query


def _docstring_line(paths: list[Path]) -> str | None:
    """The first line of a function's docstring in the middle one of these files (a query whose
    answer is in the index: docstring -> code, as the bundled retrieval task asks)."""
    for path in paths[len(paths) // 2:] + paths[:len(paths) // 2]:
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r'\n\s+def \w+\(.*?\):\n\s+(?:"""|\'\'\')([^\n]+)', text):
            line = m.group(1).strip().strip('"\'').strip()
            if len(line.split()) >= 4:
                return line
    return None


def source_name(source: str | None) -> str:
    """`stdlib` for the default corpus; else the directory's base name + 8 hex of its resolved path."""
    if not source:
        return "stdlib"
    resolved = Path(source).resolve()
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", resolved.name).strip("-.")[:40] or "source"
    return f"{base}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"


def _planned_minutes(plan_file: Path) -> float | None:
    try:
        return float(json.loads(plan_file.read_text())["minutes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a run from before quickstart recorded its plan


def _val_loss(model: torch.nn.Module, cfg: Config) -> float:
    from .train.loop import val_batches
    from .train.objectives import make_objective, validation_loss

    return validation_loss(model, make_objective(cfg), val_batches(cfg, cfg.train.micro_batch,
                           cfg.train.eval_batches), dtype=cfg.train.dtype)


def _seconds_per_step(cfg: Config) -> float:
    """Time two optimizer steps of the configured model on random tokens (after one warm-up)."""
    from .model import Transformer
    from .train.loop import train_step
    from .train.optim import build_optimizer

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch, cfg.data.seq_len)
    micro = [
        {"inputs": torch.randint(0, cfg.model.vocab_size, shape, generator=g),
         "targets": torch.randint(0, cfg.model.vocab_size, shape, generator=g)}
        for _ in range(cfg.train.global_batch // cfg.train.micro_batch)
    ]
    train_step(model, opt, micro, lr=1e-4, grad_clip=1.0, dtype=cfg.train.dtype)
    start = time.perf_counter()
    for _ in range(2):
        train_step(model, opt, micro, lr=1e-4, grad_clip=1.0, dtype=cfg.train.dtype)
    return (time.perf_counter() - start) / 2
