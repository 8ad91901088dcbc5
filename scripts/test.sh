#!/usr/bin/env bash
# Install pcbench with its test dependencies into .venv (created if missing) and run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,tracking]'
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected (e.g. a filter that matches nothing): not a failure.
if [ "$rc" -eq 5 ]; then
  echo "pytest: no tests collected (exit 5), treated as success"
  rc=0
fi
exit "$rc"
