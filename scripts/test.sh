#!/usr/bin/env bash
# Install pcbench with its test dependencies into .venv (created if missing) and run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Verbose, so that the output of pcbench's own build (the build backend's) is in the log; any
# deprecation warning in it fails the run (a deprecated pyproject setting stops building one day).
log=$(mktemp "${TMPDIR:-/tmp}/pcbench-install.XXXXXX")
if ! .venv/bin/python -m pip install -v -e '.[test,tracking]' >"$log" 2>&1; then
  tail -n 60 "$log"
  echo "scripts/test.sh: pip install -e '.[test,tracking]' failed (log above; whole: $log)" >&2
  exit 1
fi
if ! bash scripts/build-warnings.sh "$log"; then
  echo "scripts/test.sh: pcbench's build printed deprecation warnings (above; whole log: $log)" >&2
  exit 1
fi
rm -f "$log"
echo "scripts/test.sh: installed; pcbench's build printed no deprecation warning"
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
