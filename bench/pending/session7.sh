#!/usr/bin/env bash
# Prepared in the sixth session, after the machine stopped being lent: what main's last changes need from a GPU.
#   bash bench/pending/session7.sh $OUT a     (~4 min)   bash bench/pending/session7.sh $OUT b     (~6 min)
# a: GPU tests of the cslt engine incl. the eager fallback (eager calls -> decompress + cuBLAS, captured calls ->
#    cuSPARSELt), the 7B-shape kernel tests, the 22016x4096 byte difference located, and generate()'s eager
#    prefill at 50% (expect ~92 ms as with PATCHC_CSLT=0, not 287 ms: results/e2e_cslt).
# b: prefill as a captured forward (bench/prefill_e2e.py): dense vs patch-0.5 (cuSPARSELt) vs patch-0.5 without
#    it vs patch-0.45 (mixed layers), 8 layers of the 7B shape.
set -uo pipefail
out=${1:?usage: session7.sh OUTDIR a|b}; what=${2:?a or b}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONUNBUFFERED=1
if [[ $what == a ]]; then
  (HYPOTHESIS_PROFILE=ci python3 -m pytest -q -p no:cacheprovider tests/test_cusparselt.py 2>&1 | tail -2
   HYPOTHESIS_PROFILE=ci PATCHC_TEST_SHAPES=llama2-7b python3 -m pytest -q -p no:cacheprovider \
     tests/test_cusparselt.py tests/test_kernels.py 2>&1 | tail -3) | tee "$out/gpu_tests.log"
  cd bench && python3 cslt_prefill_check.py --ms 2048 --shapes 4096x4096 --out "$out/cslt_prefill" 2>&1 \
    | grep -v -i warn | tee "$out/cslt_prefill.log"
  python3 e2e.py --out "$out/e2e50" --sparsities 0.5 2>&1 | grep -v -i warn | tail -6
else
  cd bench && python3 prefill_e2e.py --out "$out/prefill_e2e" --layers 8 2>&1 | grep -v -i warn | tail -12
fi
