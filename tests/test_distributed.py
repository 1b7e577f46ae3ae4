"""Many processes through the real launcher: `python -m torch.distributed.run ... -m lmforge train`
on CPU with gloo, against one process of the same config.

What is proved (docs/distributed.md states the promises):
- train.deterministic_reduce: 2 and 4 processes give bit-identical losses and weights to 1 process,
  including across a resume on a different world size (2 -> 4);
- plain DDP and FSDP2: the same samples (same global batches: equal step-1 loss on identical
  initial weights) and losses/weights within a stated tolerance of 1 process; an FSDP (sharded)
  checkpoint resumes on 1 process;
- a rank SIGKILLed under `--supervise --nproc-per-node 2` is restarted with the whole job, and the
  run finishes bit-identical to an uninterrupted 2-process run;
- config mistakes name the numbers, and a user error under the supervised torchrun is not retried.
- launch mistakes are one `error:` line and exit 2 before anything starts: a config that cannot run
  on `--nproc-per-node N` (checked by the parent), N < 1, `--nproc-per-node`/`--supervise` inside a
  torchrun worker, a malformed torchrun environment, a failed rendezvous; a non-zero rank prints
  its error once, prefixed.

Runtime: about eight short launches of a 2-layer model (global batch 8, micro batch 2, 9 steps).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env

STEPS = 9
# micro_batch 2 divides global_batch 8 on 1, 2 and 4 processes (4, 2, 1 micro batches per rank)
BASE = ["model.vocab_size=512", "train.micro_batch=2", f"train.max_steps={STEPS}", "train.ckpt_every_steps=3",
        "train.eval_every=0", "train.log_every=1", "train.keep_last=3"]
# Plain DDP/FSDP average per-rank gradients in another order than one process sums micro batches:
# float rounding differs in the last bits; after 9 AdamW steps weights agree to this much.
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sets(data: Path, *extra: str) -> list[str]:
    return [a for kv in (f"data.path={data}", *BASE, *extra) for a in ("--set", kv)]


def launch(nproc: int, data: Path, run_dir: Path, *extra: str, config: bool = True, check: bool = True,
           faults: str = "") -> subprocess.CompletedProcess:
    """One training command: `lmforge train` in this process for 1 process, torchrun for more."""
    args = ["train", *([str(TINY_CONFIG)] if config else []), "--run-dir", str(run_dir), *sets(data, *extra)]
    if nproc == 1:  # in this process (conftest.lmforge_in_process): the processes under test are torchrun's
        proc = lmforge_in_process(args, env={"LMFORGE_FAULTS": faults} if faults else None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "lmforge", *args]
        env = subprocess_env(LMFORGE_FAULTS=faults) if faults else subprocess_env()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def weight_bytes(run_dir: Path, step: int) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors").read_bytes()


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    out = {"one": root / "one", "det2": root / "det2"}
    launch(1, tiny_dataset, out["one"])
    launch(2, tiny_dataset, out["det2"], "train.parallel=ddp", "train.deterministic_reduce=true", f"train.max_steps={STEPS - 3}")
    return out


# ---- deterministic reduction: bit-identical on 1, 2 and 4 processes -------------------------


def test_two_processes_deterministic_reduce_is_bit_identical_to_one(runs):
    one, det2 = runs["one"], runs["det2"]
    assert weight_bytes(det2, 6) == weight_bytes(one, 6)
    assert weight_bytes(det2, 3) == weight_bytes(one, 3)
    l1, l2 = losses(one), losses(det2)
    assert [l2[s] for s in range(1, 7)] == [l1[s] for s in range(1, 7)]  # exactly: same samples, same sums
    # the sharded DCP state was written by both ranks and rank 0 published one manifest over it
    manifest = json.loads((det2 / "checkpoints" / "step-000006" / "MANIFEST.json").read_text())
    assert "model.safetensors" in manifest["files"] and any(f.startswith("train_state/") for f in manifest["files"])
    # only rank 0 writes records: one line per step, not two
    assert sorted(l2) == list(range(1, 7))


def test_checkpoint_from_two_processes_resumes_on_four_bit_identically(runs, tiny_dataset, tmp_path):
    four = tmp_path / "four"
    shutil.copytree(runs["det2"], four)
    proc = launch(4, tiny_dataset, four, "train.parallel=ddp", "train.deterministic_reduce=true", config=False)
    assert "resumed from" in proc.stderr and "4 processes" in proc.stderr
    resume = [json.loads(line) for line in (four / "events.jsonl").read_text().splitlines() if '"resume"' in line]
    assert [(e["step"], e["world"]) for e in resume] == [(6, 4)]
    assert weight_bytes(four, STEPS) == weight_bytes(runs["one"], STEPS)
    assert [losses(four)[s] for s in range(7, STEPS + 1)] == [losses(runs["one"])[s] for s in range(7, STEPS + 1)]


def test_guard_rollback_is_agreed_across_ranks(runs, tiny_dataset, tmp_path):
    """A NaN at step 8 under 2 processes: every rank takes the same rollback (one plan, from rank 0)
    and the healed run equals the same drill on 1 process, bit for bit."""
    two, one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(runs["det2"], two)
    shutil.copytree(runs["det2"], one)
    launch(2, tiny_dataset, two, "train.parallel=ddp", "train.deterministic_reduce=true", config=False, faults="nan@8")
    launch(1, tiny_dataset, one, "train.parallel=none", "train.deterministic_reduce=true", config=False, faults="nan@8")
    for run_dir in (two, one):
        ev = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        rb = [e for e in ev if e["kind"] == "rollback"]
        assert [(e["from_step"], e["to_step"], e["skipped_data_steps"]) for e in rb] == [(8, 6, [6, 8])]
        assert ev[-1]["kind"] == "completed"
    assert weight_bytes(two, STEPS) == weight_bytes(one, STEPS)


# ---- DDP and FSDP2: same samples, equal within tolerance ------------------------------------


@pytest.fixture(scope="module")
def ddp2(runs, tiny_dataset) -> Path:
    run_dir = runs["one"].parent / "ddp2"
    launch(2, tiny_dataset, run_dir, "train.parallel=ddp")
    return run_dir


def test_ddp_matches_one_process_within_tolerance(runs, ddp2):
    l1, l2 = losses(runs["one"]), losses(ddp2)
    assert l2[1] == pytest.approx(l1[1], rel=1e-6)  # same initial weights + same global batch
    assert [l2[s] for s in l1] == pytest.approx([l1[s] for s in l1], rel=LOSS_RTOL)
    assert_close_weights(weights(ddp2, STEPS), weights(runs["one"], STEPS))


def test_fsdp_matches_one_process_and_its_sharded_checkpoint_resumes_on_one(runs, tiny_dataset, tmp_path):
    fsdp = tmp_path / "fsdp"
    launch(2, tiny_dataset, fsdp, "train.parallel=fsdp", f"train.max_steps={STEPS - 3}")
    shards = sorted(p.name for p in (fsdp / "checkpoints" / "step-000006" / "train_state").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    l1, lf = losses(runs["one"]), losses(fsdp)
    assert [lf[s] for s in range(1, 7)] == pytest.approx([l1[s] for s in range(1, 7)], rel=LOSS_RTOL)
    # the consolidated export holds the full (unsharded) weights, tied head stored once
    assert_close_weights(weights(fsdp, 6), weights(runs["one"], 6))
    proc = launch(1, tiny_dataset, fsdp, "train.parallel=none", config=False)
    assert "resumed from" in proc.stderr and "step 6" in proc.stderr
    assert_close_weights(weights(fsdp, STEPS), weights(runs["one"], STEPS))


# ---- a rank dies: the supervisor restarts the whole job ---------------------------------------


def test_sigkill_of_one_rank_under_supervisor_restarts_to_a_bit_identical_finish(ddp2, tiny_dataset, tmp_path):
    run_dir = tmp_path / "sup"
    cmd = lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(run_dir), *sets(tiny_dataset, "train.parallel=ddp"),
                      "--supervise", "--nproc-per-node", "2", "--restart-delay", "0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(LMFORGE_FAULTS="kill@5/1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "restart 1/" in proc.stderr and "SIGKILL" in proc.stderr  # torchrun's report names the dead rank
    assert json.loads((run_dir / "faults-fired.json").read_text()) == ["kill@5/1"]
    kinds = [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "resume" in kinds and kinds[-1] == "completed"
    assert weight_bytes(run_dir, STEPS) == weight_bytes(ddp2, STEPS)


def test_user_error_under_supervised_torchrun_is_not_retried(tiny_dataset, tmp_path):
    # LMFORGE_DEVICE=gpu: the parent never looks at the device (it trains nowhere), so every rank finds it
    # when it joins the job; written to the error file, torchrun's "exit 1" is not retried
    args = ["train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "bad"), *sets(tiny_dataset, "train.parallel=ddp"),
            "--supervise", "--nproc-per-node", "2", "--restart-delay", "0"]
    proc = subprocess.run(lmforge_cmd(*args), capture_output=True, text=True, env=subprocess_env(LMFORGE_DEVICE="gpu"),
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "LMFORGE_DEVICE='gpu'" in proc.stderr
    assert "restart 1/" not in proc.stderr and "not restarting" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # a dataset that is not there: what every rank would refuse, the parent refuses in one line before launching
    missing = tmp_path / "no-such-data"
    proc = lmforge_in_process([*args, "--set", f"data.path={missing}"])
    assert_one_line_error(proc, str(missing))
    assert not (tmp_path / "bad").exists()


# ---- launching: mistakes refused in one line, exit 2, before any process is started --------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in this process, with `env` over the environment: the refusals below come before
    any process group or child process exists (one real rendezvous failure runs as a process)."""
    return lmforge_in_process(list(args), env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr[-3000:]  # no traceback, no torchrun report
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("extra, message", [
    ((), "train.parallel is 'none'; set --set train.parallel=ddp"),
    (("--supervise",), "train.parallel is 'none'; set --set train.parallel=ddp"),
    (("--set", "train.parallel=ddp", "--set", "train.micro_batch=8"),
     "train.global_batch (8) is not divisible by world size (2) x train.micro_batch (8) = 16"),
    (("--set", "train.parallel=fsdp", "--set", "train.deterministic_reduce=true"), "deterministic_reduce needs replicated weights"),
])
def test_nproc_per_node_checks_the_world_size_before_launching(tmp_path, extra, message):
    run_dir = tmp_path / "run"
    proc = cli("train", str(TINY_CONFIG), "--run-dir", str(run_dir), "--nproc-per-node", "2", *extra)
    assert_one_line_error(proc, message)
    assert not run_dir.exists()


def test_nproc_per_node_checks_a_resumed_runs_saved_config(tmp_path):
    run_dir = tmp_path / "run"  # a start that never trained: config.yaml only, train.parallel none
    run_dir.mkdir()
    shutil.copy(TINY_CONFIG, run_dir / "config.yaml")
    assert_one_line_error(cli("train", "--run-dir", str(run_dir), "--nproc-per-node", "2"), "train.parallel is 'none'")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_nproc_per_node_below_one_is_refused(tmp_path, n):
    proc = cli("train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"), "--nproc-per-node", n,
               "--set", f"data.path={tmp_path / 'none'}")
    assert_one_line_error(proc, f"argument --nproc-per-node: must be within 1..1024, got {n}")


@pytest.mark.parametrize("flags, message", [
    (("--nproc-per-node", "2", "--set", "train.parallel=ddp"), "--nproc-per-node 2: this process is already a torchrun worker"),
    (("--supervise",), "--supervise: this process is already a torchrun worker"),
])
def test_launch_flags_inside_a_torchrun_worker_are_refused(tmp_path, flags, message):
    env = subprocess_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = cli("train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"), *flags, env=env)
    assert_one_line_error(proc, message, "Use one or the other")
    assert not (tmp_path / "run").exists()


def tee_lines(out: str, rank: int, containing: str) -> list[str]:
    """What local rank `rank` wrote under `torchrun --tee 3` (torchrun prefixes its lines with
    `[default<R>]:`, or `[rank<R>]:` in other versions), prefix removed."""
    found = (re.match(rf"\[(?:default|rank){rank}\]:(.*)", line) for line in out.splitlines())
    return [m[1] for m in found if m and containing in m[1]]


def test_nproc_per_node_under_real_torchrun_is_refused_on_every_rank_once(tmp_path):
    """The audit's nested launch, and a non-zero rank's error printed once (`--tee 3`), prefixed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--tee", "3", "-m", "lmforge", "train", str(TINY_CONFIG),
           "--run-dir", str(tmp_path / "nest"), "--set", "train.parallel=ddp", "--nproc-per-node", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    rank1 = tee_lines(out, 1, "error:")
    assert len(rank1) == 1 and rank1[0].startswith("rank 1/2: error: --nproc-per-node 2: this process is already"), out[-3000:]
    assert not (tmp_path / "nest").exists()


def test_error_of_a_joined_nonzero_rank_prints_once(tmp_path):
    """An error inside training on rank 1 (here a malformed LMFORGE_FAULTS, refused first thing):
    only `rank 1/2: error: ...`, not that and then a plain `error: ...` (docs/distributed.md)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--tee", "3", "-m", "lmforge", "train", str(TINY_CONFIG),
           "--run-dir", str(tmp_path / "run"), "--set", "train.parallel=ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(LMFORGE_FAULTS="boom@1"), timeout=300)
    out = proc.stdout + proc.stderr
    rank1 = tee_lines(out, 1, "error:")
    assert len(rank1) == 1 and rank1[0].startswith("rank 1/2: error: LMFORGE_FAULTS='boom@1'"), out[-3000:]
    assert len(tee_lines(out, 0, "error:")) <= 1  # rank 0 prints it plainly, unless torchrun stopped it first


@pytest.mark.parametrize("env, named", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["MASTER_ADDR is not set", "MASTER_PORT is not set"]),
    ({"WORLD_SIZE": "abc"}, ["WORLD_SIZE='abc' is not a whole number"]),
    ({"WORLD_SIZE": "2"}, ["RANK is not set", "MASTER_ADDR is not set"]),
    ({"RANK": "1"}, ["WORLD_SIZE is not set"]),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, ["RANK=2 is not in 0..1"]),
])
def test_malformed_torchrun_environment_is_named(tmp_path, env, named):
    base = {k: v for k, v in subprocess_env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = cli("train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"), "--set", f"data.path={tmp_path / 'none'}",
               env={**base, **env})
    assert_one_line_error(proc, "torchrun environment", *named, "torchrun --nproc-per-node N", "--nproc-per-node N")
    assert not (tmp_path / "run").exists()


def test_failed_rendezvous_is_one_clear_line(tmp_path):
    with socket.socket() as taken:  # rank 0 must listen on MASTER_PORT: already taken
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = subprocess_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        proc = subprocess.run(lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run")), capture_output=True,
                              text=True, env=env, timeout=300)
    assert_one_line_error(proc, f"rank 0/2: could not join the process group at MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port}",
                          "address already in use")


# ---- in-process: the pieces ------------------------------------------------------------------


def test_micro_batches_per_rank_and_its_error():
    from lmforge.errors import ConfigError
    from lmforge.train.distributed import micro_batches_per_rank

    assert [micro_batches_per_rank(32, 4, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match=r"\(32\) is not divisible by world size \(16\) x train.micro_batch \(4\) = 64; set train.micro_batch to 2"):
        micro_batches_per_rank(32, 4, 16)


def test_config_keys_validate(tiny_dataset):
    from lmforge.config import load_config
    from lmforge.errors import ConfigError

    cfg = load_config(TINY_CONFIG, ["train.deterministic_reduce=true", "train.activation_checkpointing=true"])
    assert cfg.train.deterministic_reduce and cfg.train.activation_checkpointing
    with pytest.raises(ConfigError, match="deterministic_reduce needs replicated weights"):
        load_config(TINY_CONFIG, ["train.parallel=fsdp", "train.deterministic_reduce=true"])
    with pytest.raises(ConfigError, match="deterministic_reduce"):
        load_config(TINY_CONFIG, ["train.deterministic_reduce=maybe"])


def test_parallel_none_under_many_processes_is_refused():
    from lmforge.config import load_config
    from lmforge.errors import ConfigError
    from lmforge.train.distributed import Dist, check_parallel

    cfg = load_config(TINY_CONFIG)
    check_parallel(cfg.train, Dist())  # one process: fine
    with pytest.raises(ConfigError, match="set --set train.parallel=ddp"):
        check_parallel(cfg.train, Dist(rank=0, world=2))


def test_deterministic_step_in_one_process_equals_plain_accumulation(tiny_dataset):
    """The canonical sum is autograd's own accumulation order: bit-identical, with and without
    activation checkpointing (which recomputes, it does not change arithmetic)."""
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from lmforge.train.distributed import _checkpoint_blocks
    from lmforge.train.loop import train_step
    from lmforge.train.optim import build_optimizer

    cfg = load_config(TINY_CONFIG, [f"data.path={tiny_dataset}", "model.vocab_size=512"])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 512, (8, 64), generator=g), torch.randint(0, 512, (8, 64), generator=g)
    out = []
    for det, ckpt in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        if ckpt:
            _checkpoint_blocks(model)
        opt = build_optimizer(model, cfg.train)
        micro = [{"inputs": a, "targets": b} for a, b in zip(x.split(2), y.split(2))]
        r = train_step(model, opt, micro, lr=1e-3, grad_clip=1.0, dtype="fp32",
                       deterministic_reduce=det)
        out.append((r, [p.detach().clone() for p in model.parameters()]))
    (r0, w0) = out[0]
    for r, w in out[1:]:
        assert (r.loss, r.grad_norm) == (r0.loss, r0.grad_norm)
        assert all(torch.equal(a, b) for a, b in zip(w0, w))
