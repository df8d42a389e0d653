#!/usr/bin/env bash
# On the GPU machine (after `source .gpuassets/b/setup.sh`): install patchc without deps (the image has
# torch/transformers/triton), then run `patchc prune` on the real SmolLM2-135M and copy the results to $OUT.
#   bash bench/gpu_prune.sh NAME SPARSITY MODE STEPS [extra prune args...]
set -euo pipefail
name=$1 sparsity=$2 mode=$3 steps=$4; shift 4
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps --no-build-isolation -e .
export PATCHC_SMOLLM2=/root/assets/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf PYTHONUNBUFFERED=1
run=/tmp/runs/$name
python3 -m patchc prune smollm2-135m --sparsity "$sparsity" --mode "$mode" --steps "$steps" \
  --data /root/assets/data/calib/c4_en_train_head1000 --seq-len 2048 --batch-size 8 --calib-samples 64 \
  --eval-ppl /root/assets/data/wikitext2/wiki.test.raw.txt --eval-seq-len 2048 \
  --device cuda --dtype bfloat16 --out "$run" --overwrite --save-every 100 "$@" 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s\]$' | grep -v '^\s*$' | tail -n 40
mkdir -p "$OUT/$name"
cp "$run/prune.json" "$run/log.jsonl" "$OUT/$name/"
python3 - "$run/prune.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); p = r["ppl"]
print(f"{r['config']['mode']} s={r['sparsity']['achieved']:.4f} steps={r['config']['steps']} tokens={r['tokens_trained']:,} "
      f"PPL dense {p['dense']['ppl']:.3f} one-shot-start {p['init']['ppl']:.3f} final {p['final']['ppl']:.3f} ({r['seconds']:.0f}s)")
PY
