#!/bin/bash
# The GPU recipes' training throughput on this machine's GPU: tokens/s, achieved TFLOP/s and MFU
# (against the datasheet bf16 peak of a known GPU, lmforge/hardware.py's table) as `lmforge train`
# logs them, plus the GPU's peak memory (nvidia-smi, sampled each second). A few steps each, no
# evaluation; the first logged window includes torch.compile's compilation and is not a figure.
#
#   bash benchmarks/gpu_recipes.sh DATASET [recipe ...]     # default: gpu-125m gpu-350m gpu-1b
#
# DATASET: a prepared dataset (`lmforge prepare`); its contents do not matter for speed, e.g. the
# Python standard library with --vocab-size 32000. gpu-1b runs on one GPU here (parallel none,
# global batch 128: same micro batch and sequence length, fewer micro batches per step).
set -u
DATA=${1:?usage: bash benchmarks/gpu_recipes.sh DATASET [recipe ...]}; shift
RECIPES=${*:-gpu-125m gpu-350m gpu-1b}
REPO=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
export LMFORGE_DB=$TMP/store.db
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
for r in $RECIPES; do
  extra=(--set train.max_steps=15 --set train.log_every=5)
  [ "$r" = gpu-1b ] && extra=(--set train.parallel=none --set train.global_batch=128 --set train.max_steps=6 --set train.log_every=2)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 1000 > "$TMP/mem_$r" & mon=$!
  python3 -m lmforge train "$REPO/configs/$r.yaml" --run-dir "$TMP/$r" --set data.path="$DATA" --set train.eval_every=0 \
    --set train.ckpt_every_steps=0 "${extra[@]}" > "$TMP/$r.log" 2>&1 || { echo "$r failed:"; tail -5 "$TMP/$r.log"; }
  kill $mon 2>/dev/null
  python3 - "$TMP/$r/metrics.jsonl" "$TMP/mem_$r" "$r" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l][1:]  # drop the compile window
mem = max((int(x) for x in open(sys.argv[2]).read().split() if x.isdigit()), default=0)
if rows:
    tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
    tf = sorted(r["tflops"] for r in rows)[len(rows) // 2]
    mfu = sorted(r.get("mfu", float("nan")) for r in rows)[len(rows) // 2]
    print(f"{sys.argv[3]:<9} {tps:10,.0f} tokens/s  {tf:6.1f} TFLOP/s  MFU {100 * mfu:5.1f}%  peak memory {mem / 1024:5.1f} GiB")
PY
done
