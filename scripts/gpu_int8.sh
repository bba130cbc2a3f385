#!/usr/bin/env bash
# INT8 on a GPU node (the image's python3 with CUDA torch): build in place for sm_90, then the steps in
# $STEPS (default all but w8a8): test (GPU tests of the int8 kernels and layers), w8a8 (W8A8 prefill sweep
# and full linear vs bf16, benches/tune_w8a8.py), tune (launch-shape sweeps vs bf16, benches/tune_int8.py), bench (benches/bench_int8.py), model (python -m decoding bench
# --compare-bf16 on the 8B and 1B shapes). Logs go to $OUT (default gpu_logs/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
STEPS=${STEPS:-build,test,tune,bench,model}
export PYTHONUNBUFFERED=1 CC=gcc CXX=g++ LDSHARED="g++ -shared"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
step() { [[ ",$STEPS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/int8_env.txt"
if step build; then
    start=$(date +%s)
    python3 setup.py build_ext --inplace > "$OUT/int8_build.log" 2>&1
    echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/int8_env.txt"
    [ -e decoding/kernels ] || ln -s ../kernels decoding/kernels
fi
python3 -c "from decoding import ops; print(ops.active_backends('cuda'))" 2>&1 | tee -a "$OUT/int8_env.txt"
if step test; then
    timeout 900 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/kernels/test_int8.py tests/test_quant.py \
        > "$OUT/int8_gpu_tests.log" 2>&1
    echo "int8 gpu tests rc=$?: $(tail -1 "$OUT/int8_gpu_tests.log")" | tee -a "$OUT/int8_env.txt"
fi
if step w8a8; then
    timeout 600 python3 benches/tune_w8a8.py --out "$OUT/tune_w8a8.json" 2>&1 | tee "$OUT/tune_w8a8.log"
fi
if step tune; then
    timeout 900 python3 benches/tune_int8.py --part "${TUNE_PARTS:-gemv,w8a8,w8a16}" --out "$OUT/tune_int8.json" 2>&1 \
        | tee "$OUT/tune_int8.log"
fi
if step bench; then
    timeout 900 python3 -m pytest benches/bench_int8.py -q -p no:cacheprovider --benchmark-columns=median \
        --benchmark-json="$OUT/bench_int8.json" > "$OUT/bench_int8.log" 2>&1
    echo "bench_int8 rc=$?" | tee -a "$OUT/int8_env.txt"
    python3 benches/bench_int8.py --summary "$OUT/bench_int8.json" 2>&1 | tee -a "$OUT/int8_env.txt"
fi
if step model; then
    for shape in llama-3-8b llama-3.2-1b; do
        timeout 600 python3 -m decoding bench --shape $shape --random-weights --batch 1 --prompt 128 --new 128 \
            --quantize int8 --compare-bf16 --json "$OUT/model_$shape.json" 2>&1 | grep -v "decode " | tee -a "$OUT/int8_env.txt"
    done
fi
