#!/usr/bin/env bash
# Run the CPU test suite (sets everything up first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treated as a failure" >&2
    exit 1
fi
exit "$status"
