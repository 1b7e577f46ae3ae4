"""What `lmforge plan` prints: the plan and the fit as tables for a terminal, and the planned
training config as YAML. Pure presentation: every figure comes from sizing.py or fit.py.

The tables are compact on purpose, to fit an 80-column terminal: dollars when a price is given,
else GPU-hours; the predicted loss is the target for every candidate (D_train is solved for it),
so it is in the title rather than a column.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING
from collections.abc import Callable

from ..hardware import GB
from ..util import human_bytes, human_count

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .fit import Fit
    from .sizing import Plan


def config_yaml(plan: Plan, command: str = "lmforge plan") -> str:
    """The planned training config as YAML, with a header saying what is left to set."""
    rec, m = plan.recommended, plan.architecture
    header = [
        f"# Written by `{command}`.",
        f"# Target loss {plan.target_loss:.4f} ({plan.law.name} law); {human_count(plan.architecture_params)} parameters,",
        f"# {human_count(rec.train_tokens)} training tokens ({rec.tokens_per_param:.0f} per parameter).",
        "# data.path is empty: point it at a dataset prepared with a matching vocabulary, e.g.",
        f"#   lmforge prepare CORPUS --out data/mycorpus --vocab-size {m.vocab_size}",
        "#   lmforge train THIS.yaml --set data.path=data/mycorpus",
        "",
    ]
    return "\n".join(header) + plan.config.to_yaml()


def _sci(x: float | None) -> str:
    """Compact scientific notation: 1.13e23."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    exp = math.floor(math.log10(abs(x)))
    return f"{x / 10**exp:.2f}e{exp}"


def _money(x: float | None) -> str:
    return "-" if x is None else f"${human_count(x)}"


def _table(title: str, columns: tuple[str, ...] | list[str], no_wrap: bool = True) -> Table:
    """A borderless right-aligned table in the style every plan table shares."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in columns:
        table.add_column(col, justify="right", no_wrap=no_wrap)
    return table


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def render_plan(plan: Plan) -> None:
    out = _console()
    _print_inputs(out, plan)
    out.print(_candidates_table(plan))
    _print_recommendation(out, plan)
    out.print(_architecture_table(plan))
    out.print(
        f"Training FLOPs/token from the model code (attention at seq_len {plan.config.data.seq_len} "
        f"included): {plan.architecture_flops_per_token:.3g}, vs 6N = {6 * plan.architecture_params:.3g}."
    )
    out.print(_deployment_table(plan))
    t = plan.config.train
    out.print(
        f"Training config: seq_len {plan.config.data.seq_len}, global batch {t.global_batch} "
        f"({t.global_batch * plan.config.data.seq_len:,} tokens), {t.max_steps:,} steps, lr {t.lr:g}, "
        f"warmup {t.warmup_steps} (write it with --write-config PATH)."
    )
    for w in plan.warnings:
        out.print(f"[bold yellow]warning:[/] {w}")


def _print_inputs(out: Console, plan: Plan) -> None:
    law, hw = plan.law, plan.hardware
    quality = f" (the quality of a Chinchilla-optimal {human_count(plan.quality_of)}-parameter model)" if plan.quality_of else ""
    out.print(
        f"[bold]Target loss {plan.target_loss:.4f}[/]{quality}; law {law.name}: "
        f"E {law.E:g}, A {law.A:g}, B {law.B:g}, alpha {law.alpha:g}, beta {law.beta:g}"
    )
    out.print(
        f"Inference: {human_count(plan.inference_tokens)} tokens "
        f"({plan.costs.prefill_fraction:.0%} prefill). Hardware {hw.name}: "
        f"{hw.peak_flops / 1e12:.3g} TFLOP/s bf16, {hw.mem_bandwidth / 1e9:.0f} GB/s, "
        f"{hw.memory / GB:.0f} GB{' (' + hw.note + ')' if hw.note else ''}. "
        f"MFU train {plan.costs.train_mfu:g} / prefill {plan.costs.prefill_mfu:g} / decode {plan.costs.decode_mfu:g}. "
        f"Minimising {'total FLOPs' if plan.objective == 'flops' else 'total GPU-hours (cost)'}."
    )


def _candidates_table(plan: Plan) -> Table:
    priced = plan.costs.price_per_gpu_hour is not None
    unit = "$" if priced else ("CPU-h" if plan.hardware.name == "cpu" else "GPU-h")
    money: Callable[[float | None], str] = _money if priced else (lambda x: human_count(x))  # type: ignore[arg-type]
    constrained = plan.unique_tokens is not None
    cols = ["\n", "\nparams", "train\ntokens", "tokens\n/param", "train\nFLOPs", "infer\nFLOPs",
            f"train\n{unit}", f"infer\n{unit}", f"total\n{unit}"] + (["\nepochs"] if constrained else [])
    table = _table(f"Candidates (each predicted to reach loss {plan.target_loss:.4f})", cols)
    for c in plan.candidates:
        style = "bold green" if c is plan.recommended else ("cyan" if c is plan.chinchilla else None)
        label = {"recommended": "best", "chinchilla-optimal": "chin"}.get(c.label, c.label)
        row = [
            label, human_count(c.n_params), human_count(c.train_tokens), f"{c.tokens_per_param:.0f}",
            _sci(c.train_flops), _sci(c.inference_flops),
            money(c.train_cost if priced else c.train_gpu_hours),
            money(c.inference_cost if priced else c.inference_gpu_hours),
            money(c.total_cost if priced else c.total_gpu_hours),
        ]
        if constrained:
            row.append(f"{c.epochs:.1f}" if c.epochs else "-")
        table.add_row(*row, style=style)
    return table


def _print_recommendation(out: Console, plan: Plan) -> None:
    rec, chin = plan.recommended, plan.chinchilla
    priced = plan.costs.price_per_gpu_hour is not None
    what = "FLOPs" if plan.objective == "flops" else "GPU-hours"
    out.print(
        f"[bold green]Recommended:[/] {human_count(rec.n_params)} parameters on {human_count(rec.train_tokens)} "
        f"tokens ({rec.tokens_per_param:.0f} tokens/param), {_sci(rec.total_flops)} FLOPs in all; "
        f"{plan.saving:.1%} fewer total {what} than the Chinchilla-optimal {human_count(chin.n_params)} "
        f"model of the same quality ({_sci(chin.total_flops)} FLOPs"
        + (f", {_money(chin.total_cost)} -> {_money(rec.total_cost)})" if priced else ")")
        + "."
    )


def _architecture_table(plan: Plan) -> Table:
    m = plan.architecture
    table = _table("Architecture (parameter count from lmforge.model)",
                   ("layers", "d_model", "heads", "kv heads", "d_ff", "vocab", "params", "vs N"))
    table.add_row(
        str(m.n_layer), str(m.d_model), str(m.n_head), str(m.kv_heads), str(m.ff_dim), str(m.vocab_size),
        f"{plan.architecture_params:,}", f"{plan.architecture_params / plan.recommended.n_params - 1:+.1%}",
    )
    return table


def _deployment_table(plan: Plan) -> Table:
    d = plan.deployment
    table = _table(f"Deployment on {plan.hardware.name} (bf16, context {d['context']}, batch {d['batch']})",
                   ("weights", "KV/token", "KV cache", "devices", "decode ceiling, 1 stream"))
    table.add_row(
        human_bytes(d["weight_bytes"]), human_bytes(d["kv_bytes_per_token"]), human_bytes(d["kv_bytes"]),
        str(d["devices_needed"]), f"{d['decode_tokens_per_s_single_stream']:,.0f} tokens/s",
    )
    return table


def render_fit(fit: Fit) -> None:
    out = _console()
    runs = _table(f"Runs ({len(fit.points)})", ("run", "params", "tokens", "loss", "law"), no_wrap=False)
    for p in fit.points:
        runs.add_row(p.name, human_count(p.n_params), human_count(p.tokens), f"{p.loss:.4f}",
                     f"{float(fit.law.loss(p.n_params, p.tokens)):.4f}")
    out.print(runs)
    consts = _table(f"Fitted L = E + A/N^alpha + B/D^beta ({len(fit.points)} runs, bootstrap)",
                    ("constant", "value", "std", "5%", "95%"), no_wrap=False)
    for k in ("E", "A", "B", "alpha", "beta"):
        s = fit.bootstrap[k]
        consts.add_row(k, f"{getattr(fit.law, k):.4g}", f"{s['std']:.3g}", f"{s['p05']:.4g}", f"{s['p95']:.4g}")
    out.print(consts)
    out.print(f"RMS residual of log loss: {fit.residual_rms:.4f}")
    for w in fit.warnings:
        out.print(f"[bold yellow]warning:[/] {w}")

