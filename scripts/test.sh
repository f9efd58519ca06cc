#!/usr/bin/env bash
# The one test command (README "Run the tests"; .ci/run calls exactly this).
# Installs what the tests need, then: ruff, ruff format, mypy, and the whole pytest suite
# (including the real-vLLM integration tests, `-m vllm`, which build a cached venv on first use).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not vllm"` for the fast loop.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"

echo "== ruff" && python3 -m ruff check . && python3 -m ruff format --check .
echo "== mypy" && python3 -m mypy
echo "== pytest" && python3 -m pytest "$@"
