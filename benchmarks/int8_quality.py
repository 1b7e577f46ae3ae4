"""What each int8 product costs in accuracy, against the fp32 model, on a real model's text.

For an fp32 model directory (int8 weights quantised from it at load, `--quantize int8`) and,
with --q8-0, a kept-Q8_0 import of the same model: the log-probabilities of every position of a
prompt, and of DECODE greedy decoding steps fed fp32's own tokens (one row, eager: `lmforge sample`'s
step), through each int8 form this machine has, against fp32's:

- "kernel": lmforge's VNNI kernel (AVX-512 VNNI; 8-bit activations per block of 32, Q8_0's
  arithmetic) for every product;
- "fbgemm": the path without it (prompts weight-only on bf16 activations, steps fbgemm's dynamic
  int8 on 7-bit weights).

Printed per form: mean |Δ log p| over the whole vocabulary and positions, and how often the top
token equals fp32's. The prompt is benchmarks/decode.py's.

    OMP_NUM_THREADS=1 python benchmarks/int8_quality.py --model DIR [--q8-0 DIR] [--decode 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from decode import PROMPT  # noqa: E402

from lmforge import kernels, quant  # noqa: E402
from lmforge.generate import KVCache, decode_step, load_for_decoding  # noqa: E402


def logprobs(model: torch.nn.Module, ids: list[int], steps: int, fed: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt positions' log-probs (T, V), each decoding step's (steps, V)), the steps fed `fed`
    (fp32's greedy tokens; None: this model's own, which are returned as the argmax rows)."""
    with torch.inference_mode():
        cache = KVCache.for_model(model, max_len=len(ids) + steps + 1)
        prompt = torch.log_softmax(model(torch.tensor([ids]), cache=cache).float()[0], -1)
        token, rows = int(prompt[-1].argmax()), []
        for i in range(steps):
            tok = fed[i] if fed is not None else token
            logits = decode_step(model, torch.tensor([[tok]]), torch.tensor([[len(ids) + i]]), cache.k, cache.v)
            rows.append(torch.log_softmax(logits.float().reshape(-1), -1))
            token = int(rows[-1].argmax())
    return prompt, torch.stack(rows) if rows else torch.empty(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an fp32 model directory")
    ap.add_argument("--q8-0", default=None, help="a kept-Q8_0 import of the same model (`import --keep-quantized`)")
    ap.add_argument("--decode", type=int, default=32, help="decoding steps fed fp32's greedy tokens")
    args = ap.parse_args()
    torch.set_num_threads(1)
    fp32 = load_for_decoding(args.model, "fp32")
    ids = fp32.tokenizer.encode(PROMPT)
    ref_prompt, ref_steps = logprobs(fp32.model, ids, args.decode, None)
    greedy = [int(ref_prompt[-1].argmax())] + [int(r.argmax()) for r in ref_steps[:-1]]
    forms = ["kernel", "fbgemm"] if kernels.int8_ready() else ["fbgemm"]
    print(f"{len(ids)}-token prompt, {args.decode} decoding steps fed fp32's greedy tokens; "
          f"mean |Δ log p| against fp32 over the vocabulary (top-1 equal)")
    print("| weights | form | prompt | decoding steps |")
    print("|---|---|---|---|")
    sources = [("--quantize int8", args.model)] + ([("Q8_0 kept", args.q8_0)] if args.q8_0 else [])
    real = quant._int8_kernel
    for label, path in sources:
        for form in forms:
            quant._int8_kernel = real if form == "kernel" else (lambda n, k: False)
            model = load_for_decoding(path, "int8").model
            prompt, steps = logprobs(model, ids, args.decode, greedy)
            cells = []
            for got, ref in ((prompt, ref_prompt), (steps, ref_steps)):
                same = (got.argmax(-1) == ref.argmax(-1)).float().mean() * 100
                cells.append(f"{(got - ref).abs().mean():.3f} ({same:.1f} %)")
            print(f"| {label} | {form} | " + " | ".join(cells) + " |", flush=True)
    quant._int8_kernel = real


if __name__ == "__main__":
    main()
