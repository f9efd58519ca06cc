#!/usr/bin/env bash
# The one test command (README "Run the tests"; .ci/run calls exactly this).
# Installs what the tests need, then: ruff, ruff format, mypy, and the whole pytest suite
# (including the real-vLLM integration tests, `-m vllm`, which build a cached venv on first use).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not vllm"` for the fast loop.
set -euo pipefail
cd "$(dirname "$0")/.."

# promtool, amtool, a real Prometheus and Alertmanager for the rule tests (Debian packages).
if ! command -v promtool >/dev/null || ! command -v amtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then
    echo "== apt-get install prometheus prometheus-alertmanager"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
fi

# node + npm for the Grafana schema check (tests/grafana_schema.py npm-installs the pinned
# @grafana/schema and typescript into ~/.cache/moe-watch on first use).
if ! command -v npm >/dev/null; then
    echo "== apt-get install nodejs npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"

echo "== ruff" && python3 -m ruff check . && python3 -m ruff format --check .
echo "== mypy" && python3 -m mypy
echo "== pytest" && python3 -m pytest "$@"
