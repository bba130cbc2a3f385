#!/usr/bin/env bash
# On a GPU node (the image's python3 with CUDA torch): build for sm_90, run the whole test suite
# (GPU tests included) and the kernel benchmarks; logs go to $OUT (or ./gpu_logs).
# Wheels for packages the node lacks (e.g. gguf) may be put in .whl/ beforehand.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# (gpu_env.sh set CC/CXX/LDSHARED to the system toolchain: see there why.)
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s, linked by: $(grep -oE '^ +[^ ]*g\+\+ ' "$OUT/build.log" | sort -u | tr -s ' ')" | tee -a "$OUT/env.txt"
python3 -c "from decoding import ops; import json; print(json.dumps(ops.describe(), indent=1))" 2>&1 | tee -a "$OUT/env.txt"
python3 benches/copy_bandwidth.py 2>&1 | tee -a "$OUT/env.txt"
python3 -m pytest tests -q -m gpu -rs -s -p no:cacheprovider "$@" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/env.txt"
grep -E "teacher-forced" "$OUT/gpu_tests.log" | tee -a "$OUT/env.txt"
python3 -m pytest tests -q -m "not gpu" -x -p no:cacheprovider > "$OUT/cpu_tests.log" 2>&1
echo "non-gpu tests on the GPU node rc=$?: $(tail -1 "$OUT/cpu_tests.log")" | tee -a "$OUT/env.txt"
python3 -m pytest benches/bench_norm.py -q -p no:cacheprovider --benchmark-columns=median \
    --benchmark-json="$OUT/bench_norm.json" > "$OUT/bench_norm.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/env.txt"
python3 - "$OUT/bench_norm.json" <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    print(f"{b['name']:<55} {b['extra_info']['us_per_call']:8.2f} us  {b['extra_info']['GB/s']:8.1f} GB/s")
PY
python3 benches/bench_sampler.py 2>&1 | tee -a "$OUT/env.txt"
python3 benches/bench_activation.py 2>&1 | tee -a "$OUT/env.txt"
# Continuous batching under load vs static batches of 32, same requests, same run (1B shape: a few minutes).
timeout 900 python3 -m decoding bench --serve --shape llama-3.2-1b --random-weights --requests 300 \
    --prompt-len 128:2048 --output-len 32:512 --static-baseline --no-progress --json "$OUT/serve_1b.json" 2>&1 \
    | tee -a "$OUT/env.txt"
# A wheel for the arches in TORCH_CUDA_ARCH_LIST: it must hold decoding/_C*.so with sm_90 code and decoding/kernels/.
rm -rf /tmp/decoding_wheel
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip wheel --no-build-isolation --no-deps . -w /tmp/decoding_wheel > "$OUT/wheel.log" 2>&1
echo "wheel rc=$?: $(ls /tmp/decoding_wheel)" | tee -a "$OUT/env.txt"
( cd /tmp/decoding_wheel && python3 -m zipfile -e ./*.whl x && ls x/decoding | grep -E "_C|kernels" \
  && cuobjdump --list-elf x/decoding/_C*.so | grep -o "sm_[0-9a-z]*" | sort -u ) 2>&1 | tee -a "$OUT/env.txt"
