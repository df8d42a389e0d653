#!/usr/bin/env bash
# A/B the e2e patch-0.45 row: this tree (new) against a06d9ae's launch.py / mma_sp.py / runtime.py (old)
set -u
root=$(pwd)
rm -rf /tmp/old && cp -r "$root" /tmp/old && cp .scratch/old/launch.py /tmp/old/codegen/launch.py \
  && cp .scratch/old/mma_sp.py /tmp/old/codegen/mma_sp.py && cp .scratch/old/runtime.py /tmp/old/patchc/runtime.py
run() {  # $1 = tree, $2 = label
  python3 -m pip install -q --no-deps --no-build-isolation -e "$1" >/dev/null 2>&1
  (cd "$1/bench" && python3 e2e.py --out "$OUT/$2" --row patch-0.45 2>&1 | grep '^{' | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('$2', r['new_tokens_per_s'], 'tok/s decode', r['decode_ms_per_token'], 'prefill', r['prefill_ms'])")
}
run "$root" new1; run /tmp/old old1; run "$root" new2; run /tmp/old old2
