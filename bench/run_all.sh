#!/usr/bin/env bash
# The maintained GPU benchmarks, each writing its results folder (bench/README.md lists them):
#   bash bench/run_all.sh OUTDIR [kernels|decode|prefill|e2e|compile|train|accuracy|serving|all]
# OUTDIR=bench/results refreshes the committed results. Needs a CUDA machine with patchc installed (`pip install -e
# ".[gpu]"`) and, for accuracy, the SmolLM2 GGUF (PATCHC_SMOLLM2 or ../shared/assets).
set -uo pipefail
out=$(realpath -m "${1:?usage: bench/run_all.sh OUTDIR [kernels|decode|prefill|e2e|compile|train|accuracy|serving|all]}")
what=${2:-all}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
want() { [[ $what == all || $what == "$1" ]]; }
want kernels && python3 kernel_sweep.py --out "$out/kernels" --shapes llama2-7b,llama3-8b --ms 1,16,128,2048 \
  --ms-for "llama3-8b=16" --compiled-ms 16,2048
want decode && python3 decode.py --out "$out/decode"
want prefill && python3 prefill.py --out "$out/prefill" --ms 2048
want e2e && python3 e2e.py --out "$out/e2e" --sparsities 0,0.25,0.35,0.45 --repeats 3
want compile && { rm -rf "$out/compile_time"; python3 e2e.py --out "$out/compile_time/cold" --sparsities 0.35 --repeats 1 \
  && python3 e2e.py --out "$out/compile_time/warm" --sparsities 0.35 --repeats 1; }
want train && python3 train_speed.py --out "$out/train_speed" --models smollm2-shape,llama3.2-1b
want accuracy && python3 accuracy.py --out "$out/accuracy" --device cuda
want serving && python3 serving.py --out "$out/serving"   # resumable; long (see bench/README.md)
exit 0
