"""Training: train_step on its own, golden losses, bit-exact resume after SIGKILL, clean stop on
SIGTERM, resume with safe and unsafe config changes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env
from lmforge.config import load_config
from lmforge.model import Transformer
from lmforge.train.loop import train_step
from lmforge.train.optim import build_optimizer, lr_at

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"


def tiny_cfg(data: Path, *extra: str):
    return load_config(TINY_CONFIG, [f"data.path={data}", "model.vocab_size=512", *extra])


def run_train(data: Path, run_dir: Path, *extra: str, faults: str = "", check: bool = True,
              extra_args: list[str] = (), env: dict[str, str] | None = None, cwd: Path | None = None,
              config: Path | None = TINY_CONFIG, process: bool = False) -> subprocess.CompletedProcess:
    """`lmforge train` on the tiny config. In this process (conftest.lmforge_in_process) unless the
    test is about the process: `process=True`, a kill fault (it SIGKILLs the process) or --supervise
    (the supervisor starts and watches its own children), which run `python -m lmforge`."""
    sets = [a for kv in (f"data.path={data}", *extra) for a in ("--set", kv)] + list(extra_args)
    args = ["train", *([str(config)] if config else []), "--run-dir", str(run_dir), *sets]
    extra_env = {**(env or {}), **({"LMFORGE_FAULTS": faults} if faults else {})}
    if process or "kill" in faults or "--supervise" in extra_args:
        proc = subprocess.run(lmforge_cmd(*args), capture_output=True, text=True, env=subprocess_env(**extra_env),
                              timeout=300, cwd=cwd)
    else:
        proc = lmforge_in_process(args, env=extra_env, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_weights(run_dir: Path, step: int = 40) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors").read_bytes()


# ---- train_step ------------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_big_batch(tiny_dataset):
    cfg = tiny_cfg(tiny_dataset)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (8, 64), generator=g)
    y = torch.randint(0, 512, (8, 64), generator=g)
    results = []
    for micro in (8, 4, 2):
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        opt = build_optimizer(model, cfg.train)
        batches = [{"inputs": a, "targets": b} for a, b in zip(x.split(micro), y.split(micro))]
        r = train_step(model, opt, batches, lr=1e-3, grad_clip=1.0, dtype="fp32")
        results.append((r, [p.grad.clone() for p in model.parameters()]))  # clipped, averaged grads
    (r0, w0) = results[0]
    for r, w in results[1:]:
        assert r.loss == pytest.approx(r0.loss, rel=1e-5)
        assert r.grad_norm == pytest.approx(r0.grad_norm, rel=1e-4)
        for a, b in zip(w0, w):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_train_step_learns_a_fixed_batch_and_clips(tiny_dataset):
    cfg = tiny_cfg(tiny_dataset)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    x = torch.randint(0, 512, (4, 64))
    y = torch.roll(x, -1, dims=1)
    batch = [{"inputs": x, "targets": y}]
    losses = [train_step(model, opt, batch, lr=3e-3, grad_clip=0.5, dtype="fp32").loss for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    before = [p.detach().clone() for p in model.parameters()]
    r = train_step(model, opt, batch, lr=0.0, grad_clip=0.5, dtype="fp32")
    assert r.grad_norm > 0
    # lr 0 with decoupled weight decay 0 at lr 0: nothing moves
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_bf16_step_runs_and_keeps_fp32_master_weights(tiny_dataset):
    cfg = tiny_cfg(tiny_dataset)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    x = torch.randint(0, 512, (2, 64))
    r = train_step(model, opt, [{"inputs": x, "targets": x}], lr=1e-3, grad_clip=1.0, dtype="bf16")
    assert torch.isfinite(torch.tensor(r.loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- golden losses ---------------------------------------------------------------------------


def test_golden_losses(tiny_dataset, tmp_path):
    """The first 20 losses of the tiny deterministic CPU run. Regenerate deliberately with
    LMFORGE_REGEN_GOLDEN=1 when a change is meant to alter numerics, and say why in the commit."""
    import os

    run_train(tiny_dataset, tmp_path / "g", "train.log_every=1", "train.max_steps=20", "train.eval_every=0")
    lines = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 20
    if os.environ.get("LMFORGE_REGEN_GOLDEN") or not GOLDEN.exists():
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
        pytest.skip("golden losses regenerated")
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < losses[0] - 0.3  # it learns
    assert all(0 < r["mfu"] < 1 for r in lines if "loss" in r)  # against this CPU's matmul rate, measured at start
    peak = [json.loads(x) for x in (tmp_path / "g" / "events.jsonl").read_text().splitlines() if '"mfu_peak"' in x]
    assert len(peak) == 1 and peak[0]["source"] == "measured matmul rate" and peak[0]["peak_flops"] > 1e9


# ---- resume ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tiny_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_train(tiny_dataset, run_dir)
    return run_dir


@pytest.mark.parametrize("k", [7, 10, 23])  # before the first checkpoint, on one, between two
def test_resume_after_sigkill_is_bit_identical(tiny_dataset, straight_run, tmp_path, k):
    run_dir = tmp_path / "run"
    killed = run_train(tiny_dataset, run_dir, faults=f"kill@{k}", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "checkpoints" / "step-000040").exists()
    resumed = run_train(tiny_dataset, run_dir)
    assert f"at step {k // 10 * 10}" in resumed.stderr  # checkpoints at 0 (fresh run), 10, 20, ...
    assert final_weights(run_dir) == final_weights(straight_run)
    trainer = [json.loads((r / "checkpoints" / "step-000040" / "trainer.json").read_text()) for r in (run_dir, straight_run)]
    assert trainer[0] == trainer[1]  # the complete state: data cursor, guard history, RNG states, counters
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len([s for s in steps if s == 40]) == 2  # loss + val_loss lines, no duplicates


def test_external_sigkill_at_a_random_moment(tiny_dataset, straight_run, tmp_path):
    """A kill from outside can land anywhere, even inside a checkpoint write."""
    run_dir = tmp_path / "run"
    sets = ["--set", f"data.path={tiny_dataset}"]
    proc = subprocess.Popen(lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(run_dir), *sets),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 15' in metrics.read_text():
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    run_train(tiny_dataset, run_dir)
    assert final_weights(run_dir) == final_weights(straight_run)


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tiny_dataset, straight_run, tmp_path):
    run_dir = tmp_path / "run"
    sets = ["--set", f"data.path={tiny_dataset}", "--set", "train.max_steps=100000", "--set", "train.ckpt_every_steps=0"]
    proc = subprocess.Popen(lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(run_dir), *sets),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and '"step": 10' in metrics.read_text()):
        time.sleep(0.02)
    # one job per run directory: a second start while this one trains is refused, touching nothing
    second = lmforge_in_process(["train", str(TINY_CONFIG), "--run-dir", str(run_dir), *sets])  # another process
    assert second.returncode == 2 and "is in use by another `lmforge train`" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Run the same command again to resume" in err
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(ckpts) == 2 and ckpts[0].name == "step-000000" and int(ckpts[1].name[5:]) >= 10  # the stop step
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "interrupted" and events[-1]["signal"] == "SIGTERM"


def test_resume_with_safe_change_and_refusal_of_unsafe(tiny_dataset, straight_run, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_dataset, run_dir, "train.max_steps=20")
    proc = run_train(tiny_dataset, run_dir, "train.max_steps=30", "train.lr=5e-4")
    assert "train.lr: 0.001 -> 0.0005" in proc.stderr and "resumed from" in proc.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lr_by_step = {r["step"]: r["lr"] for r in metrics if "lr" in r}
    assert max(lr_by_step) == 30
    # logged lr at step s is the lr of update s-1: the old schedule before the resume, the new after
    old, new = tiny_cfg(tiny_dataset, "train.max_steps=20"), tiny_cfg(tiny_dataset, "train.max_steps=30", "train.lr=5e-4")
    assert lr_by_step[20] == pytest.approx(lr_at(19, old.train))
    assert lr_by_step[25] == pytest.approx(lr_at(24, new.train))
    assert lr_by_step[30] == pytest.approx(lr_at(29, new.train))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "config_change" and e["train.lr"] == [0.001, 0.0005] for e in events)
    bad = run_train(tiny_dataset, run_dir, "train.max_steps=30", "model.n_layer=3", check=False)
    assert bad.returncode == 2
    assert "cannot resume with a changed model.n_layer: 2 -> 3" in bad.stderr and "Traceback" not in bad.stderr


# ---- starts that fail, and what they leave ---------------------------------------------------


def assert_user_error(proc: subprocess.CompletedProcess, *messages: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for m in messages:
        assert m in proc.stderr, proc.stderr[-3000:]


def test_run_dir_that_is_a_file_is_a_clear_error(tiny_dataset, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a run")
    assert_user_error(run_train(tiny_dataset, afile, check=False), f"--run-dir {afile}: exists and is not a directory")
    assert_user_error(run_train(tiny_dataset, afile / "sub", check=False), f"--run-dir {afile / 'sub'}: {afile} is a file")
    supervised = run_train(tiny_dataset, afile, check=False, extra_args=["--supervise"])
    assert_user_error(supervised, "exists and is not a directory")
    assert afile.read_text() == "not a run"


def test_failed_start_writes_nothing_and_a_never_trained_dir_is_started_afresh(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    refused = run_train(tiny_dataset, run_dir, check=False, env={"LMFORGE_DEVICE": "gpu"})
    assert_user_error(refused, "LMFORGE_DEVICE='gpu'")
    assert not run_dir.exists()  # no config.yaml left for the next start to "resume"
    # a directory holding only a config.yaml (an earlier start that never trained) is not a run to resume
    run_dir.mkdir()
    tiny_cfg(tmp_path / "elsewhere").save(run_dir / "config.yaml")
    proc = run_train(tiny_dataset, run_dir, "train.max_steps=2", "train.eval_every=0")
    assert "is from an earlier start that never trained (no checkpoint); replacing it" in proc.stderr
    assert "cannot resume" not in proc.stderr
    assert load_config(run_dir / "config.yaml").data.path == str(tiny_dataset)
    assert [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()][0] == "start"


def test_a_short_val_split_is_refused_before_any_step(tiny_dataset, tmp_path):
    from lmforge.data.prepare import prepare

    corpus = tmp_path / "c.txt"
    corpus.write_bytes((tiny_dataset.parent / "corpus.txt").read_bytes()[:20_000])
    data = tmp_path / "noval"
    prepare([str(corpus)], str(data), vocab_size=512, tokenizer=str(tiny_dataset / "tokenizer.json"), include=[],
            exclude=[], text_field="text", val_fraction=0.0, shard_tokens=50_000, strict=False, workers=1, overwrite=False)
    run_dir = tmp_path / "run"
    proc = run_train(data, run_dir, check=False)
    assert_user_error(proc, "the val split has 0 tokens", "--set train.eval_every=0")
    assert not run_dir.exists()  # refused at the start: no step was trained and lost
    run_train(data, run_dir, "train.eval_every=0", "train.max_steps=1")  # without validation it trains


def test_a_directory_given_as_the_config_points_to_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    proc = lmforge_in_process(["train", str(run_dir)])
    assert_user_error(proc, f"config file {run_dir} is a directory", f"lmforge train --run-dir {run_dir}")


def test_resume_from_another_directory_explains_the_relative_data_path(tiny_dataset, tmp_path):
    start = tmp_path / "start"
    (start / "data").mkdir(parents=True)
    (start / "data" / "shk").symlink_to(tiny_dataset)
    run_train(Path("data/shk"), Path("runs/r"), "train.max_steps=1", "train.eval_every=0", cwd=start)
    proc = run_train(Path("data/shk"), Path("start/runs/r"), check=False, config=None, cwd=tmp_path)
    assert_user_error(proc, f"data.path data/shk of start/runs/r is not found from the current directory ({tmp_path})",
                      "relative data.path", f"this run last ran in {start}")
