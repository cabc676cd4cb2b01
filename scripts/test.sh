#!/usr/bin/env bash
# Install what the tests need, lint, and run the whole test suite.
#
#   bash scripts/test.sh [PYTEST ARGS...]
#
# The same command runs in CI (.ci/run).  Fails if ruff or pytest fails;
# pytest runs even when ruff complains, and its summary line is the last
# thing printed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

VENV=${VENV:-$PWD/.venv}
echo "== ruff check"
lint=0
"$VENV/bin/ruff" check . || lint=$?

echo "== pytest"
tests=0
"$VENV/bin/python" -m pytest -ra "$@" || tests=$?

if ((tests != 0)); then exit "$tests"; fi
exit "$lint"
