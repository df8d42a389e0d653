#!/usr/bin/env bash
# Every GPU benchmark of issue 5 in one device call (after `source .gpuassets/b/setup.sh` for SmolLM2):
#   bash bench/run_all.sh OUTDIR [kernels|e2e|train|all]
# Each script writes JSON + markdown (+ PNG) under OUTDIR/<name>/ and prints its table last.
set -uo pipefail
out=${1:?usage: bench/run_all.sh OUTDIR [kernels|e2e|train|all]}; what=${2:-all}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1 PATCHC_SMOLLM2=${PATCHC_SMOLLM2:-/root/assets/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}
cd "$(dirname "$0")"
if [[ $what == all || $what == kernels ]]; then
  python3 kernel_bench.py --out "$out/kernels" --shapes llama2-7b,llama3-8b --ms 1,16,128,2048 --ms-for "llama3-8b=16" \
    --compiled-ms 16,2048 ${KERNEL_BUDGET:+--budget-s $KERNEL_BUDGET} 2>&1 | grep -v -i warn | tail -n 110
fi
if [[ $what == all || $what == e2e ]]; then
  python3 e2e.py --out "$out/e2e" ${E2E_BUDGET:+--budget-s $E2E_BUDGET} 2>&1 | grep -v -i warn | tail -n 20
fi
if [[ $what == all || $what == train ]]; then
  python3 train_speed.py --out "$out/train_speed" --models ${TRAIN_MODELS:-smollm2-shape,llama3.2-1b} ${FIT:+--fit $FIT} 2>&1 | grep -v -i warn | tail -n 25
fi
