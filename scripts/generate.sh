#!/usr/bin/env bash
# Generate with the embedded default model (sets everything up first).
# With no arguments, completes a code prompt; otherwise the arguments go to `python -m decoding generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
    set -- "def fibonacci(n):" --max-tokens 64
fi
exec .venv/bin/python -m decoding generate "$@"
