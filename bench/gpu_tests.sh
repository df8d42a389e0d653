#!/usr/bin/env bash
# The GPU property tests, with a log that records what ran: command, git commit (+ dirty flag), GPU, versions.
#   bash bench/gpu_tests.sh OUTDIR [small|llama2-7b] [pytest args...]
# Writes OUTDIR/gpu_tests_<shapes>.log (bench/results/gpu_tests/ holds the latest).
set -uo pipefail
out=${1:?usage: bench/gpu_tests.sh OUTDIR [small|llama2-7b] [pytest args...]}; shapes=${2:-small}; shift $(( $# > 1 ? 2 : 1 ))
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/gpu_tests_${shapes}.log"
export HYPOTHESIS_PROFILE=gpu PATCHC_TEST_DEVICE=cuda
[[ $shapes == llama2-7b ]] && export PATCHC_TEST_SHAPES=llama2-7b
cmd=(python3 -m pytest -q tests/test_kernels.py tests/test_cusparselt.py tests/test_format.py tests/test_cuda_build.py "$@")
{
  echo "# command: HYPOTHESIS_PROFILE=$HYPOTHESIS_PROFILE PATCHC_TEST_DEVICE=cuda ${PATCHC_TEST_SHAPES:+PATCHC_TEST_SHAPES=$PATCHC_TEST_SHAPES }${cmd[*]}"
  echo "# commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (dirty)')"
  echo "# date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "# gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "# versions: $(python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' 2>&1)"
} > "$log"
"${cmd[@]}" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
