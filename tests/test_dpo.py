"""DPO (train.objective: dpo; train/objectives.py `DPO`, data/preferences.py, loader `PreferencePairs`):
the loss equals DPO written by hand (golden numbers, and token by token on a model), pairs are
rendered like SFT prompt/completions with the mask on the completions, identical pairs are counted
and skipped, bad input is one line naming file:line, a tiny DPO run raises held-out reward
accuracy and margin, and a run from the CLI resumes bit for bit after SIGKILL with its reference
re-derived from init.from (even after the source run moved on), or is refused when it is gone."""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env
from lmforge.config import ModelConfig, load_config
from lmforge.data.loader import Loader, TokenDataset, val_batches
from lmforge.data.manifest import read_manifest, verify_dataset
from lmforge.data.preferences import encode_pair, prepare_dpo
from lmforge.data.sft import Encoder, load_tokenizer
from lmforge.errors import DataError
from lmforge.model import Transformer
from lmforge.train.loop import split_micro, train_step
from lmforge.train.objectives import DPO, FrozenCopy, dpo_loss
from lmforge.train.optim import build_optimizer

SEQ = 96


def pairs(n: int, seed: int = 0) -> list[dict]:
    """n arithmetic preference pairs: the sum (chosen) over a brush-off (rejected); every third
    one in TRL's standard (string) form, the others conversational."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        question, good, bad = f"What is {a} plus {b}?", f"{a} + {b} = {a + b}.", rng.choice(["No idea.", "Ask someone else."])
        if i % 3 == 2:
            out.append({"prompt": question, "chosen": " " + good, "rejected": " " + bad})
        else:
            out.append({"prompt": [{"role": "user", "content": question}], "chosen": [{"role": "assistant", "content": good}],
                        "rejected": bad})  # a string reply after a message prompt
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def prefs(tmp_path_factory, chat_tokenizer_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("prefs")
    return prepare_dpo([write_jsonl(root / "pairs.jsonl", pairs(120))], root / "prefs", tokenizer=chat_tokenizer_dir,
                       val_fraction=0.15, workers=1)


def tiny_model(vocab: int = 320, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=SEQ))


# ---- the loss ------------------------------------------------------------------------------------


def test_the_loss_and_metrics_equal_dpo_on_golden_numbers() -> None:
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]])  # (pairs, [chosen, rejected]) sequence log-probs
    reference = torch.tensor([[-1.5, -1.5], [-2.0, -2.0]])
    out = dpo_loss(policy, reference, beta=0.5)
    # pair 0: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; pair 1: 0.5 * ((-3 + 2) - (-1 + 2)) = -1
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0)), abs=1e-6)
    assert float(out.loss) == pytest.approx(1.7873393, abs=1e-6) and out.count == 2
    got = {k: float(v) for k, v in out.metrics.items()}
    assert got == pytest.approx({"reward_accuracy": 1.0, "reward_margin": -0.5, "chosen_reward": 0.25 - 0.5,
                                 "rejected_reward": -0.25 + 0.5})


def hand_logp(model: Transformer, inputs: list[int], targets: list[int], mask: list[bool]) -> float:
    """Σ log p(target) over the masked targets of one unpadded sequence, position by position."""
    logp = torch.log_softmax(model(torch.tensor([inputs]))[0].double(), -1)
    return sum(float(logp[t, y]) for t, (y, m) in enumerate(zip(targets, mask)) if m)


def test_the_objective_is_dpo_on_the_completion_tokens_of_each_pair(prefs: Path) -> None:
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)  # a reference unlike the policy: it must count
    batch = Loader(prefs, seq_len=SEQ, global_batch=6, seed=0).peek(0)
    assert batch["inputs"].shape[:2] == (6, 2) and batch["loss_mask"].dtype == torch.bool
    objective = DPO(beta=0.2, reference=FrozenCopy(reference))
    out = objective.loss(policy, batch)
    want = 0.0
    with torch.no_grad():
        for i in range(6):
            rewards = []
            for side in (0, 1):
                n = int((batch["targets"][i, side] != -100).sum())  # the unpadded sequence
                row = [batch[k][i, side, :n].tolist() for k in ("inputs", "targets", "loss_mask")]
                rewards.append(0.2 * (hand_logp(policy, *row) - hand_logp(reference, *row)))
            want += -math.log(1 / (1 + math.exp(-(rewards[0] - rewards[1]))))
    assert out.count == objective.units(batch) == 6
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-4)
    assert not any(p.requires_grad for p in reference.parameters())  # frozen: no gradient reaches it


def test_a_step_weighs_every_pair_alike_whatever_the_micro_batch(prefs: Path) -> None:
    batch = Loader(prefs, seq_len=SEQ, global_batch=4, seed=0).peek(0)
    results = []
    for micro in (4, 1):
        model = tiny_model()
        opt = build_optimizer(model, load_config(TINY_CONFIG).train)
        r = train_step(model, opt, split_micro(batch, micro, torch.device("cpu")), lr=0.0, grad_clip=0.0, dtype="fp32",
                       objective=DPO(0.1, FrozenCopy(tiny_model(seed=1))))
        results.append((r, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    assert a.units == b.units == 4 and a.loss == pytest.approx(b.loss, rel=1e-5)
    assert a.metrics == pytest.approx(b.metrics, rel=1e-5, abs=1e-7)
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(ga, gb))


def test_with_lora_the_reference_is_the_base_with_adapters_off(prefs: Path) -> None:
    """AdaptersOff: the loss equals DPO against a frozen copy of the base, with no second copy of
    the weights; afterwards the adapters are on again."""
    from lmforge.config import LoraConfig
    from lmforge.lora import attach
    from lmforge.train.objectives import AdaptersOff

    batch = Loader(prefs, seq_len=SEQ, global_batch=4, seed=0).peek(0)
    base = tiny_model(seed=0)
    policy = copy.deepcopy(base)
    torch.manual_seed(3)
    attach(policy, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # B = 0 at init: give the adapters weights, so the policy differs from its base
        for p in policy.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    off = DPO(beta=0.2, reference=AdaptersOff()).loss(policy, batch)
    frozen = DPO(beta=0.2, reference=FrozenCopy(base)).loss(policy, batch)
    assert float(off.loss.detach()) == pytest.approx(float(frozen.loss.detach()), rel=1e-5)
    assert float(off.loss.detach()) != pytest.approx(DPO(beta=0.2, reference=FrozenCopy(policy)).loss(policy, batch).loss.item())
    with torch.no_grad():  # adapters back on: the policy is not its base
        assert not torch.allclose(policy(batch["inputs"][:, 0]), base(batch["inputs"][:, 0]))


# ---- data: rendering, masks, identical pairs, bad input -----------------------------------------------


def test_pairs_render_like_sft_prompt_completions_with_the_mask_on_the_completion(chat_tokenizer_dir: Path,
                                                                                   prefs: Path) -> None:
    tok = load_tokenizer(chat_tokenizer_dir)
    enc = Encoder(tok)
    messages = {"prompt": [{"role": "user", "content": "What is 1 plus 2?"}], "chosen": "1 + 2 = 3.", "rejected": "No idea."}
    chosen, rejected, templated = encode_pair(enc, messages, "x:1")
    sft = enc.encode({"prompt": messages["prompt"], "completion": [{"role": "assistant", "content": "1 + 2 = 3."}]},
                     "prompt-completion", "x:1")
    assert templated and chosen == sft  # one code path with prepare --sft
    trained = tok.decode([i for i, m in zip(*rejected) if m])
    assert trained == "No idea.<|im_end|>"  # the completion and its end of turn, nothing of the prompt
    assert tok.decode(rejected[0]).startswith("<|im_start|>user\nWhat is 1 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    plain, _, templated = encode_pair(enc, {"prompt": "What is 1 plus 2?", "chosen": " 3.", "rejected": " 4."}, "x:2")
    assert not templated and tok.decode(plain[0]) == "What is 1 plus 2? 3.<|im_end|>"  # TRL's standard form: no template
    # on disk: pairs as consecutive documents, masks checksummed, read back as (B, 2, T)
    m = read_manifest(prefs)
    assert m["kind"] == "dpo" and m["format_version"] == 3 and m["dpo"]["pairs"] == 120 and verify_dataset(prefs) == []
    assert TokenDataset(prefs).document_starts.size == 2 * (120 - m["dpo"]["val_pairs"])
    b = next(val_batches(prefs, seq_len=SEQ, batch_size=3))
    assert b["inputs"].shape[:2] == (3, 2)
    for row in range(3):
        chosen_text = tok.decode(b["targets"][row, 0][b["loss_mask"][row, 0]].tolist())
        assert " + " in chosen_text and chosen_text.endswith("<|im_end|>")


def test_pairs_whose_chosen_equals_rejected_are_counted_and_skipped(chat_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    same = {"prompt": "Hi", "chosen": " Hello.", "rejected": " Hello."}
    same_messages = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.",
                     "rejected": [{"role": "assistant", "content": "Hello."}]}  # renders to the same tokens
    src = write_jsonl(tmp_path / "p.jsonl", [*pairs(6), same, *pairs(3, seed=1), same_messages])
    out = prepare_dpo([src], tmp_path / "d", tokenizer=chat_tokenizer_dir, val_fraction=0.0, workers=1)
    m = read_manifest(out)["dpo"]
    assert m["pairs"] == 9 and m["identical_skipped"] == 2
    err = capsys.readouterr().err
    assert err.count("skipped 2 pair(s) whose chosen equals rejected") == 1 and f"{src}:7" in " ".join(err.split())
    with pytest.raises(DataError, match=r"no preference pairs to train on .*every chosen equals its rejected"):
        prepare_dpo([write_jsonl(tmp_path / "same.jsonl", [same])], tmp_path / "e", tokenizer=chat_tokenizer_dir, workers=1)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": " Hello."}, r"p.jsonl:2: a preference pair needs .* missing 'rejected' \(keys: \['chosen', 'prompt'\]\)"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"},
     r"p.jsonl:2: 'chosen' must be a string after a string prompt"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     r"p.jsonl:2: 'chosen' has no assistant turn"),
    ({"prompt": [{"role": "bot", "content": "Hi"}], "chosen": "a", "rejected": "b"},
     r"p.jsonl:2: prompt\[0\] has the unknown role 'bot'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"p.jsonl:2: 'prompt' must be a string or a list of messages, got int"),
    ('["not an object"]', r"p.jsonl:2: expected a JSON object"),
])
def test_bad_pairs_are_one_line_naming_file_and_line(chat_tokenizer_dir: Path, tmp_path: Path, record, message) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [pairs(1)[0], record])
    with pytest.raises(DataError, match=message):
        prepare_dpo([src], tmp_path / "d", tokenizer=chat_tokenizer_dir, workers=1)
    assert not (tmp_path / "d").exists()  # nothing written


def test_cli_bad_input_and_mismatched_data_are_one_line(chat_tokenizer_dir: Path, prefs: Path, tiny_sft_dataset: Path,
                                                       tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [pairs(1)[0], {"prompt": "Hi", "chosen": " a"}])
    cases = [
        (["prepare", str(src), "--dpo", "--tokenizer", str(chat_tokenizer_dir), "--out", str(tmp_path / "d")],
         f"{src}:2: a preference pair needs"),
        (["prepare", str(src), "--sft", "--tokenizer", str(chat_tokenizer_dir), "--out", str(tmp_path / "d")],
         f"{src}:1: a preference pair (\"chosen\", \"rejected\"): prepare preference data with --dpo"),
        (["train", "dpo-cpu", "--run-dir", str(tmp_path / "r1"), "--set", f"data.path={prefs}", "--set", "data.seq_len=96",
          "--set", "model.max_seq_len=96"], "train.objective=dpo needs the model to tune: set init.from"),
        (["train", "dpo-cpu", "--run-dir", str(tmp_path / "r2"), "--set", f"data.path={tiny_sft_dataset}", "--set",
          "data.seq_len=96", "--set", "model.max_seq_len=96"], "train.objective=dpo trains on preference pairs, but data.path"),
        (["train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "r3"), "--set", f"data.path={prefs}", "--set", "model.vocab_size=0"],
         "holds preference pairs (prepare --dpo): train them with train.objective=dpo"),
    ]
    for args, line in cases:
        proc = lmforge_in_process(args)
        err = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and line in err and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # one line (rich may wrap it once)
    assert not (tmp_path / "d").exists() and not (tmp_path / "r1" / "checkpoints").exists()


# ---- training -----------------------------------------------------------------------------------------


def held_out(objective: DPO, model: Transformer, prefs: Path) -> dict[str, float]:
    """Mean reward accuracy and margin per held-out pair."""
    totals: dict[str, float] = {}
    n = 0
    with torch.no_grad():
        for b in val_batches(prefs, seq_len=SEQ, batch_size=8):
            out = objective.loss(model, b)
            n += out.count
            for k, v in out.metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / n for k, v in totals.items()}


def test_a_tiny_dpo_run_raises_held_out_reward_accuracy_and_margin(prefs: Path) -> None:
    model = tiny_model()
    objective = DPO(0.5, FrozenCopy(copy.deepcopy(model)))  # the starting weights
    before = held_out(objective, model, prefs)
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0  # policy == reference: no preference yet
    loader = Loader(prefs, seq_len=SEQ, global_batch=8, seed=0)
    opt = build_optimizer(model, load_config(TINY_CONFIG).train)
    for _ in range(25):
        train_step(model, opt, split_micro(loader.next(), 4, torch.device("cpu")), lr=3e-3, grad_clip=1.0, dtype="fp32",
                   objective=objective)
    after = held_out(objective, model, prefs)
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 1.0, after
    assert after["chosen_reward"] > after["rejected_reward"]


DPO_SETS = ["data.seq_len=96", "train.max_steps=12", "train.ckpt_every_steps=4", "train.eval_every=6", "train.eval_batches=2",
            "train.log_every=1", "train.keep_last=3", "train.dtype=fp32", "train.threads=1", "train.lr=3e-3", "train.dpo_beta=0.5",
            "train.warmup_steps=2", "guard.warmup=50"]


def train(run_dir: Path, base: Path, prefs: Path, *extra: str, faults: str = "", config: str = "dpo-cpu") -> subprocess.CompletedProcess:
    sets = (f"init.from={base}", f"data.path={prefs}", *DPO_SETS, *extra)
    args = ["train", config, "--run-dir", str(run_dir), *[a for kv in sets for a in ("--set", kv)]]
    if "kill" not in faults:  # a kill fault SIGKILLs the process: that one runs in a subprocess
        return lmforge_in_process(args, env={"LMFORGE_FAULTS": faults} if faults else None)
    return subprocess.run(lmforge_cmd(*args), capture_output=True, text=True, env=subprocess_env(LMFORGE_FAULTS=faults),
                          timeout=600)


def weights(run_dir: Path, step: int = 12) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_sft_dataset: Path) -> Path:
    """A tiny chat model to tune: 4 SFT steps of configs/tiny-cpu.yaml with the chat tokenizer."""
    from lmforge.train.start import StartRequest, train_command

    rd = tmp_path_factory.mktemp("dpobase") / "base"
    sets = (f"data.path={tiny_sft_dataset}", "model.vocab_size=0", f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}",
            "train.max_steps=4", "train.ckpt_every_steps=4", "train.eval_every=0", "train.keep_last=3")
    assert train_command(StartRequest(config=str(TINY_CONFIG), run_dir=str(rd), overrides=sets)) == 0
    return rd


def test_a_dpo_run_from_the_cli_resumes_bit_for_bit_with_its_reference(base_run: Path, prefs: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    straight = train(tmp_path / "straight", base, prefs)
    assert straight.returncode == 0, straight.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "reward_accuracy" in m]
    assert len(logged) == 12 and {"reward_margin", "chosen_reward", "rejected_reward"} <= set(logged[0])
    assert logged[0]["reward_accuracy"] == 0.0 and logged[-1]["reward_accuracy"] > 0.5  # it learns the preference
    assert logged[-1]["loss"] < math.log(2)
    held_out_metrics = [m for m in metrics if "val_loss" in m]  # at steps 6 and 12: the held-out pairs' loss and rewards
    assert [m["step"] for m in held_out_metrics] == [6, 12] and held_out_metrics[-1]["val_reward_accuracy"] > 0.5
    assert held_out_metrics[-1]["val_loss"] < math.log(2) and held_out_metrics[-1]["val_reward_margin"] > 0
    from lmforge.track.store import Store

    with Store.open(readonly=True) as store:  # the experiment store has them too (the test session's)
        keys = store.metric_keys(store.run_id(str(tmp_path / "straight")))
    assert {"reward_accuracy", "reward_margin", "val_reward_accuracy", "val_chosen_reward"} <= set(keys)
    record = json.loads((tmp_path / "straight" / "checkpoints" / "step-000012" / "trainer.json").read_text())["reference"]
    init = base / "checkpoints" / "step-000004"
    assert record["path"] == str(init.resolve()) and record["model_sha256"] == read_manifest_sha(init)

    killed = tmp_path / "killed"
    proc = train(killed, base, prefs, faults="kill@7")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    shutil.copytree(killed, tmp_path / "killed-too")
    # the source run moves on: init.from now resolves to other weights; the resume must use the recorded ones
    more = lmforge_in_process(["train", "--run-dir", str(base), "--set", "train.max_steps=8"])
    assert more.returncode == 0 and (base / "checkpoints" / "step-000008").is_dir(), more.stderr[-2000:]
    resumed = train(killed, base, prefs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = " ".join((resumed.stdout + resumed.stderr).split())
    assert "at step 4" in out and f"DPO reference: the weights of {init.resolve()}" in out
    assert weights(killed) == weights(tmp_path / "straight")

    # the recorded weights gone, and init.from elsewhere: refused in one line, nothing trained
    shutil.rmtree(init)
    refused = train(tmp_path / "killed-too", base, prefs)
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "cannot resume: this DPO run's reference" in err and "Traceback" not in refused.stderr, err
    assert not (tmp_path / "killed-too" / "checkpoints" / "step-000008").exists()


def read_manifest_sha(ckpt: Path) -> str:
    from lmforge.artifacts import read_manifest as read_checkpoint_manifest

    return read_checkpoint_manifest(ckpt).sha256("model.safetensors")
