"""lm-evaluation-harness itself, pointed at a real `lmforge serve`, scores a task as `lmforge eval` does.

lm-eval's `local-completions` model sends each (context, choice) as token ids with `echo`,
`logprobs` and `max_tokens` 1, and sums the echoed log-probs of the choice's tokens. The task is
the shipped tasks/python-mc.jsonl, given to lm-eval as a local `json` dataset (no hub access),
and the tokenizer is the served checkpoint's own, exported as a Hugging Face directory. Every
per-choice log-likelihood must equal lmforge's in-process scorer's, and the task's acc and
acc_norm must equal `lmforge eval`'s: same tokens (trailing context whitespace moved into the
choice, as lm-eval does), same metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, lmforge_in_process, subprocess_env
from lmforge.evaluate.score import make_request, score_packed
from lmforge.evaluate.tasks import encode_request, load_task
from lmforge.artifacts import load_model
from test_serve import KEY, checkpoint, one_thread, server  # noqa: F401  (fixtures: a tiny checkpoint served for real)

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra (scripts/setup.sh --test)")
pytestmark = pytest.mark.slow

TASK = REPO / "tasks" / "python-mc.jsonl"


def test_lm_eval_through_the_server_equals_lmforge_eval(checkpoint, server, tmp_path) -> None:  # noqa: F811 (fixtures)
    hf = tmp_path / "hf"
    r = lmforge_in_process(["export", str(checkpoint), "--format", "hf", "--out", str(hf)])
    assert r.returncode == 0, r.stderr[-2000:]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "python_mc.yaml").write_text(
        "task: python_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(TASK))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        'target_delimiter: ""\n'  # lmforge task choices carry their own leading space
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    args = ",".join([f"model={checkpoint.name}", f"base_url={server}/v1/completions", f"tokenizer={hf}",
                     "tokenizer_backend=huggingface", "max_length=256", "num_concurrent=4"])
    env = subprocess_env(OPENAI_API_KEY=KEY, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                         HF_DATASETS_CACHE=str(tmp_path / "hf-cache"), HF_HOME=str(tmp_path / "hf-home"))
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", "python_mc",
                        "--include_path", str(tasks), "--model_args", args, "--output_path", str(tmp_path / "out"),
                        "--log_samples"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["python_mc"]
    samples = sorted((json.loads(line) for line in next((tmp_path / "out").rglob("samples_python_mc_*.jsonl")).open()),
                     key=lambda s: s["doc_id"])

    loaded = load_model(checkpoint)
    model, tok = loaded.model, loaded.tokenizer
    task = load_task(TASK)
    requests = [make_request(*encode_request(tok, item.context, item.choices), model.cfg.max_seq_len) for item in task.items]
    ours = [[s.logprob for s in row] for row in score_packed(model, requests)]
    theirs = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
    assert len(theirs) == len(ours) == 32
    for a, b in zip(theirs, ours):
        assert a == pytest.approx(b, abs=1e-4)

    r = lmforge_in_process(["eval", str(checkpoint), "--tasks", str(TASK), "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads(r.stdout)["metrics"]
    assert results["acc,none"] == pytest.approx(metrics["python-mc/acc"], abs=1e-9)
    assert results["acc_norm,none"] == pytest.approx(metrics["python-mc/acc_norm"], abs=1e-9)
    assert 0.0 < metrics["python-mc/acc"] < 1.0  # the random model gets some right and some wrong: a real comparison
