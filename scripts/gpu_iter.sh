#!/usr/bin/env bash
# Quick GPU iteration (device machine): build for sm_90 with the system toolchain, run the given pytest
# targets (GPU marks included), then each `bench` argument line. Logs in $OUT.
# usage: bash scripts/gpu_iter.sh "tests/kernels -m gpu" -- "--shape llama-3.2-1b --batch 1" ...
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s" | tee "$OUT/summary.txt"
grep -E "error|warning: .*gemv|ptxas" "$OUT/build.log" | head -20 | tee -a "$OUT/summary.txt"
tests=$1; shift
if [ -n "$tests" ]; then
    timeout ${TEST_TIMEOUT:-400} python3 -m pytest $tests -q -rs --maxfail=5 -s -p no:cacheprovider > "$OUT/tests.log" 2>&1
    echo "tests rc=$?: $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
fi
[ "${1:-}" = "--" ] && shift
for args in "$@"; do
    echo "== bench $args" | tee -a "$OUT/summary.txt"
    timeout 300 python3 -m decoding bench --random-weights $args 2>&1 | grep -v "it/s\]$" | tail -4 | tee -a "$OUT/summary.txt"
done
