# Sourced by the GPU-node scripts (gpu_check.sh, gpu_iter.sh): repository root as cwd, $OUT for logs,
# no NVLink multicast, wheels from .whl/ for packages the node lacks (e.g. gguf), and the system
# toolchain for the build: on the lent H100/H200 image, Python's sysconfig compiler resolves to a
# /opt/gcc/bin/g++ wrapper that links part of libstdc++ statically into the extension, whose iostream
# facets are then never initialised: formatting an integer in a TORCH_CHECK message segfaulted.
# Set unconditionally: a CC preset in that image's environment kept the wrapper when these were defaults.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export CC=gcc CXX=g++ LDSHARED="g++ -shared"
