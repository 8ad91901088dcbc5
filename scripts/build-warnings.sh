#!/usr/bin/env bash
# Print the deprecation warnings that pcbench's own build printed in a `pip install -v -e .` log
# (its editable build: the backend's output between pip's "Running command <step>" and that step's
# "finished" line, and pip's own DEPRECATION notices naming pcbench); exit 1 when there is any.
# Other packages' builds are not looked at. Usage: scripts/build-warnings.sh PIP_LOG
set -euo pipefail
log=${1:?usage: scripts/build-warnings.sh PIP_LOG}
found=$(awk '
  /Running command (Getting requirements to build editable|Preparing editable metadata|Building editable for pcbench)/ { ours = 1; next }
  /finished with status/ { ours = 0 }
  ours && /[Dd]eprecat/ { print; next }
  /DEPRECATION:/ && /pcbench/ { print }
' "$log")
if [ -n "$found" ]; then
  printf '%s\n' "$found"
  exit 1
fi
