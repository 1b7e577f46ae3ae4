"""The `lmforge` command line: one subcommand per verb.

Each `cmd_*` function parses nothing itself: it takes the argparse namespace, calls one library
function and prints its result. Library code never imports this module. A user mistake raises
`LmforgeError` somewhere below; `main()` prints its message without a traceback and exits 2.
Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from rich.markup import escape

from . import __version__
from . import ranges as R
from .artifacts import CONFIG_FILE
from .config import VOCAB_SIZE, rule_of
from .errors import LmforgeError
from .util import PROGRESS_MODES, console, out, progress_mode, set_progress_mode


# ---- prepare / data --------------------------------------------------------------------------


def hygiene_flags(args: argparse.Namespace, *more: str) -> list[str]:
    """The hygiene flags given (those of a text corpus only, and `more`), for refusing them where they do not apply."""
    given = {"--near-dup-threshold": args.near_dup_threshold is not None, "--quality": args.quality is not None,
             "--skip-rule": bool(args.skip_rule), "--mix": args.mix is not None,
             "--mix-max-repeat": args.mix_max_repeat is not None, "--no-dedup": args.no_dedup,
             "--pii": args.pii is not None, "--allow-empty": args.allow_empty}
    text_only = ("--near-dup-threshold", "--quality", "--skip-rule", "--mix", "--mix-max-repeat")
    return [flag for flag in (*text_only, *more) if given[flag]]


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.hygiene import settings_from_switches
    from .data.prepare import prepare
    from .threads import check_threads, cores, default_threads, measure_others

    if args.sft and args.dpo:
        raise LmforgeError("give --sft (examples) or --dpo (preference pairs), not both")
    workers = check_threads(args.workers) or default_threads(cores(), measure_others())
    if args.dpo:
        from .data.preferences import prepare_dpo

        if not args.tokenizer:
            raise LmforgeError("prepare --dpo needs --tokenizer: the model directory (or run) to tune, whose "
                               "tokenizer and chat template render the pairs, e.g. --tokenizer runs/support")
        if args.train_on_prompt:
            raise LmforgeError("--train-on-prompt goes with --sft: DPO compares the completions, the prompt is their condition")
        given = hygiene_flags(args, "--no-dedup", "--pii", "--allow-empty")
        if given:
            raise LmforgeError(f"{', '.join(given)} with --dpo: preference pairs are not cleaned by prepare (hygiene runs on "
                               "text corpora and --sft examples); drop " + ("it" if len(given) == 1 else "them"))
        prepare_dpo(args.inputs, args.out, tokenizer=args.tokenizer, include=args.include, exclude=args.exclude,
                    val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=workers,
                    overwrite=args.overwrite)
        return 0
    if args.sft:
        from .data.sft import prepare_sft

        if not args.tokenizer:
            raise LmforgeError("prepare --sft needs --tokenizer: the model directory (or run) to fine-tune, whose "
                               "tokenizer and chat template render the examples, e.g. --tokenizer models/smol")
        given = hygiene_flags(args)
        if given:
            raise LmforgeError(f"{', '.join(given)} with --sft: fine-tuning examples get exact dedup and PII scrubbing "
                               "only (--no-dedup, --pii; docs/finetune.md); drop " + ("it" if len(given) == 1 else "them"))
        prepare_sft(args.inputs, args.out, tokenizer=args.tokenizer, train_on_prompt=args.train_on_prompt,
                    include=args.include, exclude=args.exclude, val_fraction=args.val_fraction,
                    shard_tokens=args.shard_tokens, workers=workers, overwrite=args.overwrite,
                    dedup=not args.no_dedup, pii="redact" if args.pii is None else args.pii, allow_empty=args.allow_empty)
        return 0
    if args.train_on_prompt:
        raise LmforgeError("--train-on-prompt goes with --sft (a text corpus trains on every token already)")
    hygiene = settings_from_switches(no_dedup=args.no_dedup, near_dup_threshold=args.near_dup_threshold,
                                     quality="on" if args.quality is None else args.quality, skip_rules=args.skip_rule, pii="redact" if args.pii is None else args.pii,
                                     allow_empty=args.allow_empty)
    prepare(
        args.inputs,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        special_tokens=[t for t in args.special_tokens.split(",") if t],
        include=args.include,
        exclude=args.exclude,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        strict=args.strict,
        workers=workers,
        overwrite=args.overwrite,
        hygiene=hygiene,
        allow_empty=args.allow_empty,
        mix=args.mix,
        mix_max_repeat=args.mix_max_repeat,
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data import inspect as p

    if args.data_cmd == "info":
        return p.cmd_info(args.path, as_json=args.json)
    if args.data_cmd == "verify":
        return p.cmd_verify(args.path)
    if args.data_cmd == "report":
        return p.cmd_report(args.path, as_json=args.json, examples=args.examples)
    if args.data_cmd == "inspect":
        path, step, seq_len, global_batch, seed = args.path, args.step, args.seq_len, args.global_batch, args.seed
        packing = not args.no_packing
        if (Path(args.path) / CONFIG_FILE).is_file():  # a run directory: its data, its step mapping
            from .config import load_config
            from .train.records import data_step_of_run

            packing = load_config(Path(args.path) / CONFIG_FILE).data.packing  # how the run cut its samples

            if args.step < 1:  # mapped to data step step - 1: a clear message before a negative one appears
                raise LmforgeError(f"--step with a run directory is a training step as logged (1, 2, ...), got {args.step}")
            view = data_step_of_run(args.path, args.step)
            for line in view["notes"]:  # part of the answer; beside --json they stay off stdout
                (console if args.json else out).print(line, markup=False)
            path, step, seq_len, global_batch, seed = view["data_path"], view["data_step"], view["seq_len"], view["global_batch"], view["seed"]
        elif seq_len is None or global_batch is None:
            raise LmforgeError("data inspect on a dataset needs --seq-len and --global-batch (or give a run directory)")
        return p.cmd_inspect(path, step=step, seq_len=seq_len, global_batch=global_batch, seed=seed,
                             as_json=args.json, max_chars=args.max_chars, max_samples=args.max_samples,
                             show_mask=args.show_mask, packing=packing)
    raise AssertionError(args.data_cmd)


# ---- train / sample / quickstart ---------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    if args.threads:  # train.threads (StartRequest.threads), recorded in the run like an override
        from .threads import check_threads

        check_threads(args.threads)
    from .train.start import StartRequest

    request = StartRequest.from_args(args)  # every flag the training process gets (one field each)
    if args.supervise or args.nproc_per_node is not None:  # a parent process: the supervisor and/or torchrun
        from .train.supervise import launch

        return launch(request, supervise=args.supervise, nproc_per_node=args.nproc_per_node,
                      max_restarts=args.max_restarts, restart_delay=args.restart_delay)
    from .train.start import train_command

    return train_command(request)


def cmd_ckpt(args: argparse.Namespace) -> int:
    """`lmforge ckpt verify`: one line per checkpoint on stdout (the result); exit 1 when any is damaged.
    `lmforge ckpt average`: average.py."""
    if args.ckpt_cmd == "average":
        from .average import average_command

        return average_command(args.path, args.out, last=args.last, steps=args.steps, ema=args.ema, overwrite=args.overwrite)
    from .errors import CheckpointError
    from .artifacts import is_checkpoint_dir, is_model_dir, list_checkpoints, verify_checkpoint, verify_model_dir

    path = Path(args.path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    model_dir = not is_checkpoint_dir(path) and is_model_dir(path)
    ckpts = [path] if is_checkpoint_dir(path) or model_dir else list_checkpoints(path)
    if not ckpts:
        raise CheckpointError(f"{path} holds no checkpoints (expected {path}/checkpoints/step-NNNNNN)")
    bad = 0
    for c in ckpts:
        problems = verify_model_dir(c) if model_dir else verify_checkpoint(c)
        if not problems:
            out.print(f"[green]{'ok':<11}[/]{escape(str(c))}")
            continue
        bad += 1
        status = "incomplete" if any("incomplete" in p or "missing" in p for p in problems) else "corrupt"
        out.print(f"[red]{status:<11}[/]{escape(str(c))}")  # "incomplete" is 10 wide: one space after it
        for p in problems:
            out.print(f"{'':11}{p}", markup=False)
    out.print(f"{len(ckpts) - bad} ok, {bad} damaged")
    return 1 if bad else 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .generate import sample_command

    return sample_command(
        args.path,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
        threads=args.threads,
        quantize=args.quantize,
        compile=args.compile,
    )


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    return quickstart(workdir=args.workdir, minutes=args.minutes, source=args.source, threads=args.threads)


# ---- plan ------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import fit_command, plan_command

    if args.plan_action == "fit":
        return fit_command(args.runs, bootstrap=args.bootstrap, seed=args.seed, save=args.save, as_json=args.json)
    return plan_command(
        target_loss=args.target_loss, quality_of=args.quality_of, inference_tokens=args.inference_tokens,
        unique_tokens=args.unique_tokens, law=args.law, objective=args.objective, hardware=args.hardware,
        peak_flops=args.peak_flops, mem_bandwidth=args.mem_bandwidth, gpu_memory_gb=args.gpu_memory,
        price_per_gpu_hour=args.price_per_gpu_hour, train_mfu=args.train_mfu, prefill_mfu=args.prefill_mfu,
        decode_mfu=args.decode_mfu, prefill_fraction=args.prefill_fraction, vocab_size=args.vocab_size,
        seq_len=args.seq_len, batch=args.batch, write_config=args.write_config, overwrite=args.overwrite,
        as_json=args.json,
    )


# '7e9', '7B', '1.5T', '300M', '2k' -> float (argparse type): a count of parameters, tokens, FLOP/s, bytes
parse_count = R.Count(lo=0.0, lo_open=True)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """`lmforge plan [options]` plans; `lmforge plan fit RUN_DIR...` fits the law."""
    from .hardware import HARDWARE  # the names only: no torch, no measurement

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Size a model for its inference budget: the N and D_train that reach a target loss at the\n"
        "least training + inference cost (Sardana et al. 2024), an architecture, a config to train."
    )
    p.epilog = (
        "examples:\n"
        "  lmforge plan --quality-of 7e9 --inference-tokens 1e13 --hardware h100 --price-per-gpu-hour 2.5\n"
        "  lmforge plan --target-loss 2.3 --inference-tokens 2e12 --unique-tokens 4e10 --hardware a100 \\\n"
        "               --write-config configs/planned.yaml\n"
        "  lmforge plan fit runs/sweep-* --save law.json && lmforge plan --law law.json --target-loss 3.1 ...\n"
        "details: docs/plan.md"
    )
    g = p.add_argument_group("target (one of)")
    g.add_argument("--target-loss", type=R.positive_float(), metavar="LOSS", help="final loss (nats/token) the model must reach")
    g.add_argument("--quality-of", type=parse_count, metavar="N",
                   help="the loss of a Chinchilla-optimal model with N parameters (e.g. 7e9, 7B)")
    p.add_argument("--inference-tokens", type=R.Count(lo=0.0), default=0.0, metavar="TOKENS",
                   help="tokens the model will process over its life (prompt + generated)")
    p.add_argument("--unique-tokens", type=parse_count, metavar="TOKENS", help="unique training tokens available (enables the repetition correction)")
    p.add_argument("--law", default="besiroglu", metavar="NAME|PATH",
                   help="besiroglu (default), hoffmann, sardana, or a JSON file from `plan fit --save`")
    p.add_argument("--objective", choices=("flops", "cost"),
                   help="minimise total FLOPs, or GPU-hours/dollars (default: cost when a price is given)")
    h = p.add_argument_group("hardware and costs")
    h.add_argument("--hardware", default="h100", metavar="NAME", help=f"{', '.join(HARDWARE)}, cpu (measured now) or custom")
    h.add_argument("--peak-flops", type=parse_count, metavar="FLOP/S", help="override: dense bf16 FLOP/s per device")
    h.add_argument("--mem-bandwidth", type=parse_count, metavar="BYTES/S", help="override: memory bandwidth, bytes/s")
    h.add_argument("--gpu-memory", type=R.positive_float(), metavar="GB", help="override: memory per device, GB")
    h.add_argument("--price-per-gpu-hour", type=R.nonneg_float(), metavar="DOLLARS", help="dollars per device-hour")
    h.add_argument("--train-mfu", type=R.fraction(lo_open=True), default=0.4, metavar="F", help="achieved utilisation in training (default 0.4)")
    h.add_argument("--prefill-mfu", type=R.fraction(lo_open=True), default=0.5, metavar="F", help="utilisation on prompt tokens (default 0.5)")
    h.add_argument("--decode-mfu", type=R.fraction(lo_open=True), default=0.1, metavar="F", help="utilisation on generated tokens (default 0.1, memory-bound)")
    h.add_argument("--prefill-fraction", type=R.fraction(), default=0.5, metavar="F", help="share of inference tokens that are prompt (default 0.5)")
    a = p.add_argument_group("architecture and config")
    a.add_argument("--vocab-size", type=VOCAB_SIZE, default=32000, metavar="V", help="tokenizer vocabulary (match lmforge prepare --vocab-size)")
    a.add_argument("--seq-len", type=R.positive_int(), default=2048, metavar="T", help="training context and deployment context")
    a.add_argument("--batch", type=R.positive_int(), default=1, metavar="B", help="concurrent sequences for the KV-cache estimate")
    a.add_argument("--write-config", metavar="PATH", help="write a training YAML for the recommended model")
    a.add_argument("--overwrite", action="store_true", help="replace the --write-config file if it exists")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    sub = p.add_subparsers(dest="plan_action", metavar="ACTION")
    f = sub.add_parser("fit", help="fit the loss law to your own runs (run directories)")
    f.add_argument("runs", nargs="+", help="run directories holding config.yaml and metrics.jsonl (globs allowed)")
    f.add_argument("--bootstrap", type=R.BOOTSTRAP, default=100, metavar="R", help="bootstrap resamples for the uncertainty (0: none)")
    f.add_argument("--seed", type=R.any_int(), default=0)
    f.add_argument("--save", metavar="PATH", help="write the fitted law as JSON (use with plan --law PATH)")
    f.add_argument("--json", action="store_true", help="print the fit as JSON")


# ---- runs / dashboard (the experiment store) ---------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    from .track import views

    action = args.runs_cmd or "list"
    db, as_json = getattr(args, "db", None), getattr(args, "json", False)  # SUPPRESS-ed when absent
    if action == "list":
        return views.runs_list(db, as_json=as_json)
    if action == "show":
        return views.runs_show(db, args.run, as_json=as_json)
    if action == "compare":
        return views.runs_compare(db, args.runs, as_json=as_json)
    if action == "delete":
        return views.runs_delete(db, args.runs, yes=args.yes)
    if action == "export":
        return views.runs_export(db, args.run, to=args.to, uri=args.uri)
    raise AssertionError(action)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .track.dashboard import serve_dashboard

    return serve_dashboard(args.db, host=args.host, port=args.port)


# ---- eval ------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from .threads import check_threads

    check_threads(args.threads)
    # Flags that would be silently ignored are mistakes: say so rather than do something else.
    if not args.watch:
        given = [flag for flag, value in (("--once", args.once), ("--follow", args.follow),
                                          ("--interval", args.interval is not None)) if value]
        if given:
            raise LmforgeError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to the sidecar: "
                               f"add --watch (lmforge eval RUN --watch {' '.join(given)} ...)")
    if args.watch and args.compile:
        raise LmforgeError("--compile applies to one evaluation, not to the --watch sidecar (which shares the machine "
                           "with training): drop --compile or --watch")
    if args.watch:
        from .evaluate.watch import watch

        if args.json:
            raise LmforgeError("--json prints one evaluation; the --watch sidecar records each checkpoint's metrics "
                               "in RUN/eval-results.jsonl (JSON lines) instead: drop --json")
        if args.once and args.follow:
            raise LmforgeError("--once makes one pass and exits, --follow keeps watching after the run completed: give one")
        return watch(args.path, tasks=args.tasks, data=args.data, text=args.text, batch_size=args.batch_size,
                     threads=args.threads, max_batches=args.max_batches,
                     interval=10.0 if args.interval is None else args.interval,
                     once=args.once, follow=args.follow, scorer=args.scorer, retrieval=args.retrieval)
    from .evaluate.harness import eval_command

    return eval_command(args.path, tasks=args.tasks, data=args.data, text=args.text, batch_size=args.batch_size,
                        threads=args.threads, max_batches=args.max_batches, as_json=args.json, scorer=args.scorer,
                        retrieval=args.retrieval, compile=args.compile)


# ---- embed -----------------------------------------------------------------------------------


def cmd_embed(args: argparse.Namespace) -> int:
    from .understand.embed import embed_command

    return embed_command(args.model, args.inputs, args.out, kind=args.kind, dtype=args.dtype, batch_size=args.batch_size,
                         threads=args.threads, max_len=args.max_len, text_field=args.text_field, id_field=args.id_field,
                         strict=args.strict, overwrite=args.overwrite, compile=args.compile)


# ---- classify ---------------------------------------------------------------------------------


def cmd_classify(args: argparse.Namespace) -> int:
    if args.classify_cmd == "train":
        from .understand.classify_train import train_command
        from .understand.classify_tune import Tuning

        train_command(args.model, args.examples, args.out, method=args.method, labels_file=args.labels,
                      scorer=args.zero_shot_scorer, template=args.template, held_out=args.held_out,
                      calibration=args.calibration, n_folds=args.folds,
                      examples_per_class=args.examples_per_class, seed=args.seed, c=args.c,
                      min_confidence=args.min_confidence, fallback=args.fallback, text_field=args.text_field,
                      label_field=args.label_field, batch_size=args.batch_size, threads=args.threads,
                      overwrite=args.overwrite,
                      tuning=Tuning(steps=args.steps, lr=args.lr, batch=args.tune_batch,
                                    pairs_per_example=args.pairs_per_example, max_pairs=args.max_pairs))
        return 0
    if args.classify_cmd == "eval":
        from .understand.classify_report import eval_command

        eval_command(args.classifier, args.test, min_confidence=args.min_confidence, as_json=args.json,
                     report=args.report, allow_unknown=args.allow_unknown_labels, model=args.model,
                     text_field=args.text_field, label_field=args.label_field, batch_size=args.batch_size,
                     threads=args.threads, overwrite=args.overwrite)
        return 0
    if args.classify_cmd == "predict":
        from .understand.classify_report import predict_command

        predict_command(args.classifier, args.input, args.out, min_confidence=args.min_confidence, model=args.model,
                        text_field=args.text_field, id_field=args.id_field, batch_size=args.batch_size,
                        chunk=args.chunk, threads=args.threads, overwrite=args.overwrite)
        return 0
    raise AssertionError(args.classify_cmd)


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    from .understand.classify import (CALIBRATIONS, CV_BELOW, DEFAULT_FALLBACK, DEFAULT_FOLDS, DEFAULT_TEMPLATE, METHODS,
                                      SCORERS)
    from .understand.classify_tune import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_MAX_PAIRS, DEFAULT_PAIRS_PER_EXAMPLE, FINETUNE_EPOCHS

    sub = p.add_subparsers(dest="classify_cmd", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--text-field", type=R.Text(), default="text", help="JSONL field / CSV column holding the text")
    common.add_argument("--batch-size", type=R.positive_int(), default=32, help="texts per forward (sorted by length)")
    common.add_argument("--threads", type=THREADS, default=0, metavar="N", help=f"torch threads (default: {THREADS_DEFAULT})")
    common.add_argument("--overwrite", action="store_true", help="replace --out / --report if it exists")

    t = sub.add_parser("train", parents=[common], help="labelled examples -> a classifier directory (clf/NAME)")
    t.add_argument("model", help="embedding model: run directory (newest checkpoint), checkpoint or model directory")
    t.add_argument("examples", nargs="?", help="labelled examples: .jsonl ({text, label} or {text, labels: [...]}) or "
                   ".csv with a header (text,label); zero-shot: optional, then used only to calibrate")
    t.add_argument("--out", required=True, help="classifier directory to write, e.g. clf/tickets")
    t.add_argument("--method", choices=METHODS, default="head", help="head: logistic regression on frozen embeddings "
                   "(default); zero-shot: label names only; setfit, finetune: train the model (docs/classify.md)")
    t.add_argument("--labels", help="zero-shot: label file (.jsonl {label, description} or one 'name: description' "
                   "per line)")
    t.add_argument("--zero-shot-scorer", choices=SCORERS, default="embedding",
                   help="zero-shot: embedding similarity (default) or the LM's likelihood of each label name")
    t.add_argument("--template", type=R.Text(), default=DEFAULT_TEMPLATE, help="zero-shot lm scorer: the context, "
                   "{text} for the text (default %(default)r)")
    t.add_argument("--calibration", choices=CALIBRATIONS, default="auto", help="where the temperature is fitted: "
                   "held-out (a split the head does not see), cv (out-of-fold logits; the head and setfit learn from "
                   f"every example), auto (default: cv below {CV_BELOW} examples per label for head and setfit)")
    t.add_argument("--held-out", type=R.HELD_OUT, default=0.2, help="held-out calibration: share of the examples held "
                   "out to fit the temperature (default %(default)g)")
    t.add_argument("--folds", type=R.FOLDS, default=DEFAULT_FOLDS, help="cv calibration: folds (default %(default)s)")
    t.add_argument("--examples-per-class", type=R.positive_int(), help="keep only N examples of each label (fixed "
                   "order by --seed)")
    t.add_argument("--seed", type=R.any_int(), default=0, help="the held-out split or cv folds, and the --examples-per-class choice")
    t.add_argument("--c", type=R.positive_float(), default=1.0, help="head: inverse L2 strength, as scikit-learn's C "
                   "(default 1)")
    t.add_argument("--min-confidence", type=R.CONFIDENCE, default=0.0, help="recorded threshold: below it predict and "
                   "serve route to --fallback (default 0: route nothing)")
    t.add_argument("--fallback", type=R.Text(), default=DEFAULT_FALLBACK, help="where low-confidence items go "
                   "(default %(default)s)")
    t.add_argument("--label-field", type=R.Text(), default="label", help="JSONL field / CSV column of the label (its "
                   "plural, e.g. labels, for multi-label)")
    t.add_argument("--steps", type=R.TUNE_STEPS, default=0, help="setfit, finetune: optimizer steps of the training "
                   f"stage (default 0: setfit one pass over its pairs, finetune {FINETUNE_EPOCHS} passes over the examples)")
    t.add_argument("--lr", type=R.positive_float(), default=DEFAULT_LR, help="setfit, finetune: peak learning rate "
                   "(default %(default)g)")
    t.add_argument("--tune-batch", type=R.positive_int(), default=DEFAULT_BATCH, help="setfit, finetune: texts (setfit: "
                   "triplets, each the others' in-batch negatives) per step (default %(default)s)")
    t.add_argument("--pairs-per-example", type=R.PAIRS_PER_EXAMPLE, default=DEFAULT_PAIRS_PER_EXAMPLE, help="setfit: "
                   "triplets per example at most (default %(default)s)")
    t.add_argument("--max-pairs", type=R.MAX_PAIRS, default=DEFAULT_MAX_PAIRS, help="setfit: triplets in all at most, "
                   "whatever the number of classes (default %(default)s)")
    t.set_defaults(func=cmd_classify)

    e = sub.add_parser("eval", parents=[common], help="accuracy, macro-F1, per class, confusion, ECE, coverage curve")
    e.add_argument("classifier", help="classifier directory (clf/NAME)")
    e.add_argument("test", help="labelled test file (.jsonl or .csv, as for train)")
    e.add_argument("--min-confidence", type=R.CONFIDENCE, help="routing threshold to report (default: the recorded one)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--report", help="write a self-contained HTML report (charts, tables) here")
    e.add_argument("--allow-unknown-labels", action="store_true", help="count test items whose label the classifier "
                   "does not know as wrong instead of refusing the file")
    e.add_argument("--model", help="the classifier's embedding model, when it moved (checked by checksum)")
    e.add_argument("--label-field", type=R.Text(), default="label", help="JSONL field / CSV column of the label")
    e.set_defaults(func=cmd_classify)

    r = sub.add_parser("predict", parents=[common], help="texts -> labels, scores and routing, as JSONL (streamed)")
    r.add_argument("classifier", help="classifier directory (clf/NAME)")
    r.add_argument("input", help=".jsonl ({text, id?}), .csv (header with text) or a text file (one text per line)")
    r.add_argument("--out", required=True, help="predictions JSONL to write")
    r.add_argument("--min-confidence", type=R.CONFIDENCE, help="route below this confidence (default: the recorded one)")
    r.add_argument("--model", help="the classifier's embedding model, when it moved (checked by checksum)")
    r.add_argument("--id-field", type=R.Text(), default="id", help="JSONL field / CSV column of the id (else FILE:LINE)")
    r.add_argument("--chunk", type=R.positive_int(), default=1024, help="texts read, scored and written at a time "
                   "(bounds memory)")
    r.set_defaults(func=cmd_classify)


# ---- topics -----------------------------------------------------------------------------------


def parse_ngram_range(text: str) -> tuple[int, int]:
    """'1,2' -> (1, 2); '2' -> (2, 2) (argparse type)."""
    try:
        lo, _, hi = text.partition(",")
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not MIN,MAX: {text!r} (e.g. 1,2 for words and word pairs)") from None
    if not 1 <= lo_n <= hi_n <= 5:
        raise argparse.ArgumentTypeError(f"MIN,MAX must satisfy 1 <= MIN <= MAX <= 5, got {text!r}")
    return lo_n, hi_n


def parse_distance_or_auto(text: str) -> float | None:
    """'auto' -> None; else a float (argparse type)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a cosine distance or auto: {text!r} (e.g. 0.3)") from None
    if not 0.0 <= value <= 2.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"a cosine distance is within 0..2, got {text!r}")
    return value


def cmd_topics(args: argparse.Namespace) -> int:
    from .understand.topics import Settings, topics_command

    settings = Settings(
        reduce=args.reduce, n_components=args.n_components, n_neighbors=args.n_neighbors, min_dist=args.min_dist,
        cluster=args.cluster, min_cluster_size=args.min_cluster_size, min_samples=args.min_samples,
        n_topics=args.n_topics, fit_max=args.fit_max, top_words=args.top_words, stop_words=args.stop_words,
        ngram_range=args.ngram_range, min_df=args.min_df, representative_docs=args.representative_docs,
        reassign_outliers=args.reassign_outliers, outlier_max_distance=args.outlier_max_distance, seed=args.seed,
        map_points=args.map_points, time_bins=args.time_bins,
    )
    return topics_command(args.model, args.inputs, args.out, settings=settings, text_field=args.text_field,
                          id_field=args.id_field, time_field=None if args.time_field == "none" else args.time_field,
                          labels=args.labels, namer=args.namer,
                          batch_size=args.batch_size, threads=args.threads, max_len=args.max_len, strict=args.strict,
                          overwrite=args.overwrite, as_json=args.json, compile=args.compile)


# ---- import / export ------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    from .convert import import_command

    return import_command(args.source, args.out, overwrite=args.overwrite, keep_quantized=args.keep_quantized)


def cmd_export(args: argparse.Namespace) -> int:
    from .convert import export_command

    return export_command(args.source, args.format, args.out, dtype=args.dtype, overwrite=args.overwrite, merge=args.merge)


# ---- serve -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.api import serve_command

    return serve_command(
        args.path, host=args.host, port=args.port, api_key=args.api_key, api_key_file=args.api_key_file,
        insecure=args.insecure, max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
        model_name=args.model_name, max_embed_inputs=args.max_embed_inputs, chat_template=args.chat_template, request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes, threads=args.threads, shutdown_grace=args.shutdown_grace,
        quantize=args.quantize,
        index=args.index, adapters=args.adapter, max_adapters=args.max_adapters, compile=args.compile,
    )


# ---- index / search / ask --------------------------------------------------------------------


def cmd_index(args: argparse.Namespace) -> int:
    from .understand.index import build as b

    if args.index_cmd == "build":
        b.build_index(args.model, args.inputs, args.out, chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap,
                include=args.include, exclude=args.exclude, text_field=args.text_field, strict=args.strict,
                overwrite=args.overwrite, batch_size=args.batch_size, tune=not args.no_tune,
                compile=args.compile)
        return 0
    if args.index_cmd == "add":
        b.add_to_index(args.path, args.inputs, include=args.include or None, exclude=args.exclude or None, strict=args.strict,
              model=args.model, batch_size=args.batch_size, compile=args.compile)
        return 0
    if args.index_cmd == "info":
        return b.info_command(args.path, as_json=args.json)
    if args.index_cmd == "verify":
        return b.verify_command(args.path)
    if args.index_cmd == "tune":
        return b.tune_command(args.path, pairs=args.pairs, model=args.model, as_json=args.json)
    raise AssertionError(args.index_cmd)


def cmd_search(args: argparse.Namespace) -> int:
    from .understand.index.search import search_command

    return search_command(args.index, args.query, k=args.k, mode=args.mode, model=args.model, as_json=args.json)


def cmd_ask(args: argparse.Namespace) -> int:
    from .threads import check_threads
    from .understand.ask import ask_command

    check_threads(args.threads)
    return ask_command(args.index, args.question, model=args.model, k=args.k, mode=args.mode,
                       max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                       embed_model=args.embed_model, chat_template=args.chat_template, as_json=args.json,
                       threads=args.threads, compile=args.compile)


def add_understand_parsers(sub: argparse._SubParsersAction) -> None:
    """`index build|add|info|verify`, `search`, `ask` (docs/search.md)."""
    from .understand.index import DEFAULT_MODE, MODES  # names only: no numpy, no model code

    p = sub.add_parser("index", help="your documents -> a local search index (build, add, info, verify, tune)")
    isub = p.add_subparsers(dest="index_cmd", metavar="ACTION", required=True)
    i = isub.add_parser("build", help="chunk, embed and store documents: lmforge index build MODEL INPUTS... --out idx/NAME")
    i.add_argument("model", help="the embedding model: a run directory (newest checkpoint), checkpoint or model directory")
    i.add_argument("inputs", nargs="+", help="files, directories (recursive) or .jsonl files (a text field, optional id)")
    i.add_argument("--out", required=True, help="index directory to write, e.g. idx/company")
    i.add_argument("--chunk-size", type=R.positive_int(), help="tokens per chunk (default: 256, or the model's context if smaller)")
    i.add_argument("--chunk-overlap", type=R.nonneg_int(), help="tokens shared by neighbouring chunks (default: chunk size / 8)")
    i.add_argument("--include", type=R.Text(), action="append", default=[], help="glob of files to take from directories (repeatable)")
    i.add_argument("--exclude", type=R.Text(), action="append", default=[], help="glob of files to skip (repeatable)")
    i.add_argument("--text-field", type=R.Text(), default="text", help="JSONL field holding the text (default: %(default)s)")
    i.add_argument("--strict", action="store_true", help="fail on files that are not UTF-8 instead of skipping them")
    i.add_argument("--batch-size", type=R.positive_int(), default=32, help="chunks per embedding forward (default: %(default)s)")
    i.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    i.add_argument("--overwrite", action="store_true", help="replace the index at --out (never anything else)")
    i.add_argument("--no-tune", action="store_true", help="do not choose the default search on the model's held-out "
                   "pairs (done when MODEL is a contrastive run with its pairs file here; `index tune` later)")
    i = isub.add_parser("add", help="add new and changed files (unchanged ones skipped), atomically")
    i.add_argument("path", help="index directory")
    i.add_argument("inputs", nargs="+", help="files or directories; the index's chunking and text field are used")
    i.add_argument("--include", type=R.Text(), action="append", default=[], help="glob of files to take (default: the index's)")
    i.add_argument("--exclude", type=R.Text(), action="append", default=[], help="glob of files to skip (default: the index's)")
    i.add_argument("--strict", action="store_true", help="fail on files that are not UTF-8 instead of skipping them")
    i.add_argument("--model", help="the index's model, if it moved since the build (its checksum must match)")
    i.add_argument("--batch-size", type=R.positive_int(), default=32, help="chunks per embedding forward (default: %(default)s)")
    i.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    i = isub.add_parser("info", help="model, pooling, chunking, counts and size")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i = isub.add_parser("verify", help="re-check every checksum; names any bad file")
    i.add_argument("path")
    i = isub.add_parser("tune", help="choose the default search mode and fusion by measurement on held-out pairs")
    i.add_argument("path", help="index directory")
    i.add_argument("--pairs", help="JSONL of {query, positive[, negative]} pairs the model never trained on "
                   "(default: the val split of the contrastive run that made the index's model)")
    i.add_argument("--model", help="the index's model, if it moved since the build (its checksum must match)")
    i.add_argument("--json", action="store_true", help="print the recorded setting and every score as JSON")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="ranked chunks of an index for a query, with file:lines")
    p.add_argument("index", help="index directory (lmforge index build)")
    p.add_argument("query")
    p.add_argument("-k", type=R.positive_int(), default=5, help="results to show (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, help="dense (the model), bm25 (words) or hybrid (both, fused by reciprocal "
                   f"rank); default: what `lmforge index tune` chose for the index, else {DEFAULT_MODE}")
    p.add_argument("--model", help="the index's model, if it moved since the build (its checksum must match)")
    p.add_argument("--json", action="store_true", help="print JSON (every result's span and text)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from an index's documents, citing its sources")
    p.add_argument("index", help="index directory (lmforge index build)")
    p.add_argument("question")
    p.add_argument("--model", required=True, help="the generating model: run, checkpoint or model directory")
    p.add_argument("-k", type=R.positive_int(), default=5, help="chunks retrieved (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, help=f"retrieval mode (default: the index's tuned one, else {DEFAULT_MODE})")
    p.add_argument("--max-tokens", type=R.MAX_TOKENS, default=256, help="longest answer in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=R.TEMPERATURE, default=0.0, help="0 (the default) means greedy")
    p.add_argument("--seed", type=R.SEED, default=0)
    p.add_argument("--embed-model", help="the index's embedding model, if it moved since the build")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the model's, else a plain prompt)")
    p.add_argument("--json", action="store_true", help="print JSON: the answer, cited and all retrieved sources")
    p.add_argument("--threads", type=THREADS, default=0, metavar="N", help=f"torch threads (default: {THREADS_DEFAULT})")
    p.add_argument("--compile", action="store_true", help=DECODE_COMPILE_HELP)
    p.set_defaults(func=cmd_ask)


# ---- parser ----------------------------------------------------------------------------------

THREADS_DEFAULT = "the cores other processes leave free, at least 1; fewer while they take more (docs/inference.md)"
DECODE_COMPILE_HELP = ("compile the decode step (one stream's ahead of time, cached per model shape and machine): up to "
                       "~1 min at the first token the first time, then ~1.4-2x the tokens/s of one stream on a CPU "
                       "(docs/inference.md)")
COMPILE_HELP = ("torch.compile the model's blocks: ~15 s to compile, then up to ~10 %% faster embedding on one core "
                "(docs/embeddings.md \"Speed\")")
WEIGHTS_CHOICES = ("fp32", "f16", "int8")  # lmforge/quant.py WEIGHTS (not imported: it loads torch)
QUANTIZE_HELP = ("weights for inference: fp32, f16 (half the bytes) or int8 (a quarter; docs/inference.md); "
                 "default: as stored")
THREADS = R.thread_count(note="0 = lmforge chooses")  # every --threads; above this machine's cores: threads.check_threads


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported like every other lmforge error: one line
    `error: ...` naming the command and the flag, exit 2 (argparse's own form is a usage block and a
    second line; the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        console.quiet = False  # errors print in every progress mode
        console.print(f"[bold red]error:[/] {escape(self.prog)}: {escape(' '.join(message.split()))}", soft_wrap=True)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lmforge",
        description="Train your own language model on your own data, inside your own walls.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("--progress", choices=PROGRESS_MODES, help="auto (rich bars on a terminal, log lines otherwise; "
                        "the default, or $LMFORGE_PROGRESS), json (JSON lines on stderr), quiet (warnings and errors only); "
                        "a command's results always print, on stdout")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", help="corpus -> tokenizer + checksummed token shards")
    p.add_argument("inputs", nargs="+", help="files, directories (recursive) or .jsonl files")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--vocab-size", type=VOCAB_SIZE, default=8192, help="BPE vocabulary size to train")
    p.add_argument("--tokenizer", help="reuse this tokenizer.json (or a directory holding one); with --sft or --dpo a model "
                   "directory or run, whose chat template renders the examples")
    p.add_argument("--sft", action="store_true", help="fine-tuning examples (.jsonl: {text}, {messages} or {prompt, "
                   "completion}) with a loss mask: assistant turns trained, prompts not (docs/finetune.md)")
    p.add_argument("--dpo", action="store_true", help="preference pairs (.jsonl: {prompt, chosen, rejected}) for "
                   "train.objective dpo, rendered as --sft renders prompt/completion (docs/finetune.md)")
    p.add_argument("--train-on-prompt", action="store_true", help="with --sft: train on every token, prompts included")
    p.add_argument("--special-tokens", type=R.Text(), default="<|bos|>,<|eos|>,<|pad|>",
                   help="comma-separated special tokens of a trained tokenizer (must include <|bos|>, <|eos|>, <|pad|>)")
    p.add_argument("--include", type=R.Text(), action="append", default=[], help="glob of files to take from directories (repeatable)")
    p.add_argument("--exclude", type=R.Text(), action="append", default=[], help="glob of files to skip (repeatable)")
    p.add_argument("--text-field", type=R.Text(), default="text", help="JSONL field holding the text")
    p.add_argument("--val-fraction", type=R.VAL_FRACTION, default=0.01, help="fraction of documents for validation")
    p.add_argument("--shard-tokens", type=R.positive_int(), default=50_000_000, help="max tokens per shard")
    p.add_argument("--strict", action="store_true", help="fail on files that are not UTF-8 instead of skipping them")
    p.add_argument("--threads", "--workers", dest="workers", type=THREADS, default=0, metavar="N",
                   help=f"tokenizer threads and hygiene processes (default: {THREADS_DEFAULT})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    h = p.add_argument_group("hygiene (on by default; docs/data.md: Hygiene)")
    h.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    h.add_argument("--near-dup-threshold", type=R.NEAR_DUP_THRESHOLD, metavar="J",
                   help="estimated Jaccard similarity of word 5-grams at which a later document is a near duplicate "
                        "(default 0.8, Lee et al. 2022)")
    h.add_argument("--quality", type=R.Text(), metavar="on|off", help="quality filters (default on)")
    h.add_argument("--skip-rule", type=R.Text(), action="append", default=[], metavar="RULE",
                   help="switch one quality rule off (repeatable), e.g. dup_lines; the rules: docs/data.md (Quality rules)")
    h.add_argument("--pii", choices=["redact", "drop", "keep"],
                   help="PII and secrets: redact (typed placeholders, default), drop the document, keep")
    h.add_argument("--allow-empty", action="store_true", help="warn instead of failing when hygiene empties an input")
    h.add_argument("--mix", type=R.Text(), metavar="NAME=W,...", help="weighted mixing of the inputs' train text; NAME is an input's "
                   "base name without extension, e.g. --mix wiki=0.5,tickets=0.3,code=0.2")
    h.add_argument("--mix-max-repeat", type=R.MIX_MAX_REPEAT, metavar="R",
                   help="with --mix: most times an input is repeated before the mixture stops (default 4)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help="inspect a prepared dataset")
    dsub = p.add_subparsers(dest="data_cmd", metavar="ACTION", required=True)
    d = dsub.add_parser("info", help="tokens, documents, shards, tokenizer, sources")
    d.add_argument("path")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("verify", help="re-check every checksum; names any bad shard")
    d.add_argument("path")
    d = dsub.add_parser("report", help="what hygiene removed and redacted, per rule and input; the mixture")
    d.add_argument("path")
    d.add_argument("--json", action="store_true")
    d.add_argument("--examples", type=R.EXAMPLES, default=0, metavar="N",
                   help="show up to N recorded examples per rule (redacted; at most 10 are recorded)")
    d = dsub.add_parser("inspect", help="which documents and text were in a training step")
    d.add_argument("path", help="a dataset (then --step is the data step), or a run directory (then --step is the "
                   "training step as logged, mapped through the run's rollbacks and skips)")
    d.add_argument("--step", type=R.nonneg_int(note="data steps count from 0; a run's training steps from 1"), required=True)
    d.add_argument("--seq-len", type=rule_of("data.seq_len"), help="required with a dataset path")
    d.add_argument("--global-batch", type=rule_of("train.global_batch"), help="required with a dataset path")
    d.add_argument("--seed", type=rule_of("data.seed"), default=0)
    d.add_argument("--max-chars", type=R.nonneg_int(), default=200, help="text shown per sample (without --show-mask)")
    d.add_argument("--max-samples", type=R.INSPECT_SAMPLES, metavar="N",
                   help=f"show the first N samples of the step (default: all; a step of more than "
                        f"{R.INSPECT_SAMPLES.hi:,} samples needs it)")
    d.add_argument("--show-mask", action="store_true", help="each sample whole, its trained tokens marked (SFT data): "
                   "trained text bold, untrained dim between ⟦ ⟧; --json gives the mask per token")
    d.add_argument("--no-packing", action="store_true", help="SFT data read one example per row (data.packing=false)")
    d.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train (or resume) a run from a config")
    p.add_argument("config", nargs="?", help="YAML config, or a bundled recipe by name, e.g. small-cpu "
                   "(optional when resuming a run directory)")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", type=R.Text(), action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--from", dest="from_", metavar="CHECKPOINT", help="branch a new run from this checkpoint (weights, optimizer, step)")
    p.add_argument("--supervise", action="store_true", help="restart the training process after a crash or kill "
                   "(not inside torchrun: use its --max-restarts there)")
    p.add_argument("--max-restarts", type=R.nonneg_int(note="0 = never restart"), default=10,
                   help="with --supervise: restarts before giving up")
    p.add_argument("--restart-delay", type=R.seconds(positive=False), default=5.0,
                   help="with --supervise: first backoff in seconds (doubles)")
    p.add_argument("--nproc-per-node", type=R.positive_int(hi=R.MAX_THREADS), default=None, metavar="N",
                   help="run N (>= 1) processes on this machine under torchrun (--standalone), checked before launch; "
                   "with --supervise the whole job is restarted. Not inside torchrun: it launches the processes there")
    p.add_argument("--threads", type=THREADS, metavar="N", help=f"torch threads per process, recorded as train.threads "
                   f"(default: the config's; 0 there: {THREADS_DEFAULT}); fewer while other processes hold cores")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ckpt", help="checkpoint tools")
    csub = p.add_subparsers(dest="ckpt_cmd", metavar="ACTION", required=True)
    c = csub.add_parser("verify", help="check every checkpoint of a run: ok / corrupt (which file) / incomplete")
    c.add_argument("path", help="run directory or checkpoint directory")
    c = csub.add_parser("average", help="weighted mean of a run's checkpoints -> a model directory")
    c.add_argument("path", help="run directory")
    c.add_argument("--last", type=R.AVERAGE_LAST, metavar="N", help="the newest N checkpoints (N >= 2)")
    c.add_argument("--steps", type=R.Text(), metavar="S1,S2,...", help="these steps (instead of --last)")
    c.add_argument("--ema", type=R.EMA_DECAY, metavar="DECAY", help="weights proportional to DECAY ** (last step - step) "
                   "instead of uniform")
    c.add_argument("--out", required=True, help="model directory to write")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_ckpt)

    p = sub.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("path", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--prompt", type=R.Text(), default="", help="text to continue")
    p.add_argument("--max-tokens", type=R.MAX_TOKENS, default=100)
    p.add_argument("--temperature", type=R.TEMPERATURE, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=R.TOP_K, default=0)
    p.add_argument("--top-p", type=R.TOP_P, default=1.0)
    p.add_argument("--seed", type=R.SEED, default=0)
    p.add_argument("--num-samples", type=R.positive_int(), default=1)
    p.add_argument("--threads", type=THREADS, metavar="N", help=f"torch threads (default: {THREADS_DEFAULT})")
    p.add_argument("--quantize", choices=WEIGHTS_CHOICES, help=QUANTIZE_HELP)
    p.add_argument("--compile", action="store_true", help=DECODE_COMPILE_HELP)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("quickstart", help="the whole life of a model on local data, in minutes on a CPU")
    p.add_argument("--workdir", default="lmforge-quickstart",
                   help="where data and runs go: <workdir>/data/<name>, <workdir>/runs/<name> (default: %(default)s)")
    p.add_argument("--minutes", type=R.QUICKSTART_MINUTES, default=3.0,
                   help="training time budget in minutes; sizes a new run only, a reused run keeps its steps "
                        "(default: %(default)g)")
    p.add_argument("--source", help="corpus directory of .py files; <name> is its base name + a hash of its path "
                                    "(default: this Python's standard library, <name> = stdlib)")
    p.add_argument("--threads", type=THREADS, metavar="N", help=f"torch threads (default: {THREADS_DEFAULT})")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("plan", help="size a model for its inference budget")
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

    # `--db`/`--json` are accepted before or after the action: `lmforge runs --json` and
    # `lmforge runs show exp1 --json`. SUPPRESS keeps a sub-level default from hiding the other.
    store_opts = Parser(add_help=False)
    store_opts.add_argument("--db", default=argparse.SUPPRESS, help="experiment store (default: $LMFORGE_DB or ./lmforge.db)")
    store_opts.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    p = sub.add_parser("runs", parents=[store_opts], help="the experiment store: list, show, compare, delete runs")
    rsub = p.add_subparsers(dest="runs_cmd", metavar="ACTION")
    rsub.add_parser("list", parents=[store_opts], help="table of runs (the default)")
    r = rsub.add_parser("show", parents=[store_opts], help="config, metrics summary, events and checkpoints of a run")
    r.add_argument("run", help="run name, id or run directory")
    r = rsub.add_parser("compare", parents=[store_opts], help="config diff and final metrics side by side")
    r.add_argument("runs", nargs="+", help="two or more run names, ids or run directories")
    r = rsub.add_parser("delete", parents=[store_opts], help="remove runs from the store (run directories are kept)")
    r.add_argument("runs", nargs="+", help="run names, ids or run directories")
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    r = rsub.add_parser("export", parents=[store_opts], help="copy a run to MLflow (file store) or W&B (offline)")
    r.add_argument("run", help="run name, id or run directory")
    r.add_argument("--to", required=True, choices=["mlflow", "wandb"])
    r.add_argument("--uri", help="MLflow: directory or tracking URI (default ./mlruns); W&B: directory (default ./wandb-offline)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("dashboard", help="web page with runs, curves, events and comparisons")
    p.add_argument("--db", help="experiment store (default: $LMFORGE_DB or ./lmforge.db)")
    p.add_argument("--host", type=R.Text(), default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=R.port(), default=8765)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("eval", help="metrics of a checkpoint (loss, perplexity, bits/byte, tasks); --watch beside training")
    p.add_argument("path", help="run directory (newest intact checkpoint; with --watch: every one) or checkpoint directory")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="task files (docs/eval.md) or bundled tasks by name, "
                   "e.g. python-mc")
    p.add_argument("--retrieval", nargs="+", metavar="TASK", help="retrieval tasks (docs and queries, docs/eval.md) or "
                   "bundled ones by name, e.g. stdlib-doc2code: nDCG@10, recall@1/10/100, MRR@10 of the model's "
                   "embeddings (alone, no loss on the run's data)")
    p.add_argument("--data", help="prepared dataset whose val split to score (default: the run's data.path)")
    p.add_argument("--text", help="score a UTF-8 text file instead of a dataset")
    p.add_argument("--batch-size", type=rule_of("eval.batch_size"), help="rows per forward (default: eval.batch_size)")
    p.add_argument("--threads", type=THREADS, metavar="N",
                   help=f"torch threads (default: {THREADS_DEFAULT}; with --watch: the run's eval.threads)")
    p.add_argument("--max-batches", type=R.nonneg_int(note="0 = all"), default=0, help="score at most this many val batches (0: all)")
    p.add_argument("--scorer", choices=["packed", "naive"], default="packed", help="naive: one forward per choice (reference)")
    p.add_argument("--compile", action="store_true", help="generation tasks: " + DECODE_COMPILE_HELP + " (not with --watch)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", action="store_true", help="sidecar: evaluate each new checkpoint of the run once")
    p.add_argument("--interval", type=R.seconds(), help="--watch: seconds between looks at the run (default 10)")
    p.add_argument("--once", action="store_true", help="--watch: one pass over the checkpoints present, then exit "
                   "(not with --follow)")
    p.add_argument("--follow", action="store_true", help="--watch: keep watching after the run completed (not with --once)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("embed", help="texts -> vectors from your own model (pooling recorded with the model)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "inputs: a .jsonl file gives one text per record (--text-field, id from --id-field or FILE:LINE);\n"
                           "any other file one text per non-blank line (id FILE:LINE); a directory one text per file\n"
                           "in it (id: its path; .jsonl files in it as above). Details: docs/embeddings.md"))
    p.add_argument("model", help="run directory (newest checkpoint), checkpoint directory or model directory")
    p.add_argument("inputs", nargs="+", help="text files (one text per line), .jsonl files or directories")
    p.add_argument("--out", required=True, help="vectors: OUT.npy (+ ids in OUT.ids.jsonl) or OUT.parquet (needs pyarrow)")
    p.add_argument("--kind", choices=["document", "query"], default="document",
                   help="which of the model's prefixes goes before each text (embed.document_prefix / query_prefix)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="dtype of the written vectors")
    p.add_argument("--batch-size", type=R.positive_int(), default=32, help="texts per forward (sorted by length)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--threads", type=THREADS, default=0, metavar="N", help=f"torch threads (default: {THREADS_DEFAULT})")
    p.add_argument("--max-len", type=R.positive_int(), help="cut texts to this many tokens (default: the model's max_seq_len)")
    p.add_argument("--text-field", type=R.Text(), default="text", help="JSONL field holding the text")
    p.add_argument("--id-field", type=R.Text(), default="id", help="JSONL field holding the id (default id; else FILE:LINE)")
    p.add_argument("--strict", action="store_true", help="fail on files that are not UTF-8 instead of skipping them")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its ids file) if they exist")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("classify", help="train / eval / predict: labels with calibrated confidence; unsure -> review")
    add_classify_arguments(p)


    p = sub.add_parser("topics", help="a pile of text -> topics, keywords, names and an offline HTML report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                           "pipeline: embed (MODEL) -> reduce (UMAP) -> cluster (HDBSCAN) -> outliers reassigned to the\n"
                           "nearest topic -> keywords (c-TF-IDF) -> names; inputs as `lmforge embed` reads them.\n"
                           "writes OUT/topics.jsonl, assignments.jsonl, report.html, MANIFEST.json. Details: docs/topics.md"))
    p.add_argument("model", help="run directory (newest checkpoint), checkpoint directory or model directory")
    p.add_argument("inputs", nargs="+", help="text files (one text per line), .jsonl files or directories")
    p.add_argument("--out", required=True, help="topics directory to write, e.g. topics/brand")
    p.add_argument("--text-field", type=R.Text(), default="text", help="JSONL field holding the text")
    p.add_argument("--id-field", type=R.Text(), default="id", help="JSONL field holding the id (default id; else FILE:LINE)")
    p.add_argument("--time-field", type=R.Text(), default="auto", help="JSONL field holding a timestamp (ISO 8601 or seconds): topics "
                   "over time; auto (default): the first record's timestamp, time, date, datetime, created_at, created "
                   "or ts field, if any; none: no timestamps")
    p.add_argument("--labels", metavar="GOLD.jsonl", help='known labels ({"id": ..., "label": ...} per line): NMI and ARI')
    p.add_argument("--seed", type=R.any_int(), default=0, help="seed of UMAP, samples and k-means (same seed, same topics)")
    g = p.add_argument_group("reduce")
    g.add_argument("--reduce", choices=["umap", "pca", "none"], default="umap")
    g.add_argument("--n-components", type=R.positive_int(hi=1000), default=5, help="dimensions after reduction (default %(default)s)")
    g.add_argument("--n-neighbors", type=R.Range(int, lo=2, hi=1000), default=15, help="UMAP neighbours (default %(default)s)")
    g.add_argument("--min-dist", type=R.nonneg_float(), default=0.0, help="UMAP min_dist (default %(default)s)")
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", choices=["hdbscan", "kmeans"], default="hdbscan")
    g.add_argument("--min-cluster-size", type=R.Range(int, lo=2), default=10, help="HDBSCAN: smallest topic (default %(default)s)")
    g.add_argument("--min-samples", type=R.positive_int(), help="HDBSCAN min_samples (default: --min-cluster-size)")
    g.add_argument("--n-topics", type=R.positive_int(), help="k-means: the number of topics")
    g.add_argument("--fit-max", type=R.positive_int(), default=100_000, help="fit reduce and cluster on at most this many documents "
                   "(a seeded sample; the rest are projected and take their nearest fitted document's topic)")
    g = p.add_argument_group("outliers")
    g.add_argument("--reassign-outliers", action=argparse.BooleanOptionalAction, default=True,
                   help="give each outlier the topic with the nearest centroid, within --outlier-max-distance (default: on)")
    g.add_argument("--outlier-max-distance", type=parse_distance_or_auto, default=None, metavar="DISTANCE|auto",
                   help="largest cosine distance to a topic's centroid an outlier may join from; auto (default): "
                   "the topic's own radius (its farthest member)")
    g = p.add_argument_group("keywords, names, report")
    g.add_argument("--top-words", type=R.positive_int(hi=1000), default=10, help="keywords per topic (default %(default)s)")
    g.add_argument("--stop-words", type=R.Text(), default="english", help="english (default), none, or a file of words (one per line)")
    g.add_argument("--ngram-range", type=parse_ngram_range, default=(1, 1), metavar="MIN,MAX",
                   help="keyword lengths in words (default 1,1; 1,2 adds word pairs)")
    g.add_argument("--min-df", type=R.positive_int(), default=1, help="keep terms found in at least this many documents")
    g.add_argument("--representative-docs", type=R.nonneg_int(hi=1000), default=3, help="documents shown per topic (default %(default)s)")
    g.add_argument("--namer", metavar="RUN_OR_MODEL_DIR", help="an lmforge chat model that names each topic "
                   "(default: the top keywords)")
    g.add_argument("--map-points", type=R.nonneg_int(), default=10_000, help="documents on the report's map (default %(default)s)")
    g.add_argument("--time-bins", type=R.positive_int(hi=10000), default=20, help="bins of the topics-over-time chart (default %(default)s)")
    g = p.add_argument_group("embedding and output")
    g.add_argument("--batch-size", type=R.positive_int(), default=32, help="texts per forward (sorted by length)")
    g.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    g.add_argument("--threads", type=THREADS, default=0, metavar="N", help=f"torch threads (default: {THREADS_DEFAULT})")
    g.add_argument("--max-len", type=R.positive_int(), help="cut texts to this many tokens (default: the model's max_seq_len)")
    g.add_argument("--strict", action="store_true", help="fail on files that are not UTF-8 instead of skipping them")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it is a topics directory")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("import", help="a Hugging Face Llama dir or a GGUF file -> an lmforge model directory")
    p.add_argument("source", help="local Hugging Face model directory (config.json + safetensors) or a .gguf file")
    p.add_argument("--out", required=True, help="model directory to write (model.safetensors, config.yaml, tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--keep-quantized", action="store_true", help="a quantized GGUF: store its matrices as int8 "
                   "(Q8_0 exactly; other types re-quantized to int8 groups of 32) instead of fp32; sample and serve "
                   "then run them as int8")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="a run, checkpoint or model directory -> Hugging Face dir, GGUF file or PEFT adapter")
    p.add_argument("source", help="run directory (newest checkpoint), checkpoint directory or model directory")
    p.add_argument("--format", required=True, choices=["hf", "gguf", "peft"],
                   help="hf: a transformers model directory; gguf: a llama.cpp file; peft: a LoRA run's adapter alone")
    p.add_argument("--out", required=True, help="directory (hf, peft) or .gguf file (gguf) to write")
    p.add_argument("--merge", action="store_true", help="a LoRA run: fold its adapter into the base's weights (hf, gguf)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"], help="GGUF tensor type (hf: always f32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("path", help="run directory (newest checkpoint), checkpoint or model directory, or a classifier "
                   "directory (clf/NAME: its embedding model, plus POST /v1/classify)")
    p.add_argument("--host", type=R.Text(), help="address to bind (default: serve.host of the run's config, 127.0.0.1)")
    p.add_argument("--port", type=R.port(), help="port (default: serve.port, 8000)")
    p.add_argument("--api-key", type=R.Text(), help="required bearer key (visible in `ps`; prefer --api-key-file or $LMFORGE_API_KEY)")
    p.add_argument("--api-key-file", help="file holding the required bearer key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-batch", type=rule_of("serve.max_batch"), help="requests decoded together (default: serve.max_batch)")
    p.add_argument("--max-queue", type=rule_of("serve.max_queue"), help="requests waiting for a slot before 429s (default: serve.max_queue)")
    p.add_argument("--max-tokens", type=rule_of("serve.max_tokens"), help="largest max_tokens a request may ask for (default: serve.max_tokens)")
    p.add_argument("--max-embed-inputs", type=rule_of("serve.max_embed_inputs"), help="most inputs one /v1/embeddings "
                   "request may carry (default: serve.max_embed_inputs, 256)")
    p.add_argument("--model-name", type=R.Text(), help="model id in the API (default: the directory name)")
    p.add_argument("--chat-template", help="Jinja chat template file (default: tokenizer_config.json's, else a plain one)")
    p.add_argument("--request-timeout", type=R.seconds(), default=600.0, help="seconds before a request is dropped (504)")
    p.add_argument("--max-body-bytes", type=R.positive_int(), default=1 << 20, help="largest request body (413 above)")
    p.add_argument("--threads", type=THREADS, metavar="N", help=f"torch threads (default: {THREADS_DEFAULT})")
    p.add_argument("--quantize", choices=WEIGHTS_CHOICES, help=QUANTIZE_HELP)
    p.add_argument("--shutdown-grace", type=R.seconds(positive=False), default=5.0, metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C: how long requests in flight may finish before they are cut short "
                        "(503, an error event in a stream); default %(default)g")
    p.add_argument("--index", metavar="IDX", help="also serve POST /v1/search over this index (built by the served model)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="also serve a LoRA adapter of this base (a LoRA run, checkpoint or adapter directory), picked by a "
                        "request's \"model\": NAME; repeatable; a bare DIR serves each of its subdirectories by name")
    p.add_argument("--max-adapters", type=rule_of("serve.max_adapters"), metavar="N",
                   help="adapters held in memory at once, least recently used unloaded first (default: serve.max_adapters)")
    p.add_argument("--compile", action="store_true", help=DECODE_COMPILE_HELP.replace("at the first token", "at start"))
    p.set_defaults(func=cmd_serve)

    add_understand_parsers(sub)
    return parser


def _rank_prefix() -> str | None:
    """How this process labels its error: "" alone or as rank 0; "rank R/W: " as another torchrun
    rank (docs/distributed.md: a non-zero rank prints only that form); None when train_command
    has already printed it so (it does for a rank that joined the process group)."""
    dist_mod = sys.modules.get("lmforge.train.distributed")  # loaded only by commands that may join a group
    if dist_mod is None:
        return ""
    d = dist_mod.joined()
    if d is not None:
        return "" if d.is_main else None
    try:
        d = dist_mod.read_env()
    except LmforgeError:  # the environment itself is the error: no rank to name
        return ""
    return "" if d.is_main else f"rank {d.rank}/{d.world}: "


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_progress_mode(args.progress or progress_mode())  # an env var so child processes inherit it
    try:
        return int(args.func(args) or 0)
    except LmforgeError as e:
        prefix = _rank_prefix()
        if prefix is None:
            return 2  # a non-zero torchrun rank whose train_command already printed `rank R/W: error: ...`
        console.quiet = False  # errors print in every progress mode
        console.print(f"[bold red]{prefix}error:[/] {escape(str(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except BrokenPipeError:  # `lmforge ... | head`: the reader left; not an error worth a traceback
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter shutdown quiet
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 141


if __name__ == "__main__":
    sys.exit(main())
