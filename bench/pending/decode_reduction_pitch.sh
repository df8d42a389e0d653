#!/usr/bin/env bash
# Device call for branch decode-reduction-pitch (not yet run on a GPU): the padded, rows-innermost cross-warp
# reduction of the mma.sp decode kernel, timed against main's kernel (same run, same data, default launches),
# then the mma.sp GPU property tests at 7B shapes. Merge into main only if the tests pass and no case is slower.
# ptxas (sm_90a, local nvcc 13.0): tile-128 variants unchanged, no spills; <MB 1, R 2, tile 64, staged> now spills
# 12 bytes (tile-64 variants already spilled 8 on main).
#   bash bench/pending/decode_reduction_pitch.sh $OUT      (about 5-6 minutes with the mma.sp build)
set -uo pipefail
out=${1:?usage: decode_reduction_pitch.sh OUTDIR}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
# main's kernel as committed beside this script (the device machine's .git copy can be stale)
cp bench/pending/mma_sp_main.cu /tmp/mma_sp_main.cu
cd bench && python3 mma_sp_check.py --ab /tmp/mma_sp_main.cu --ms 1,16,32 --sparsities 0.25,0.45,0.5 \
  --shapes 4096x4096,11008x4096,4096x11008 2>&1 | grep -v -i warn | tee "$out/ab_reduction_pitch.log"; cd ..
HYPOTHESIS_PROFILE=ci PATCHC_TEST_SHAPES=llama2-7b python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "mma_sp or silu or decode" 2>&1 | tail -5 | tee "$out/gpu_tests_mma_sp_7b.log"
# and, in the same call, the cuSPARSELt prefill check prepared on main (bytes vs torch._cslt_compress, timing)
cd bench && python3 cslt_prefill_check.py --ms 2048,512 2>&1 | grep -v -i warn | tee "$out/cslt_prefill_check.log"; cd ..
