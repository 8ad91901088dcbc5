#!/usr/bin/env bash
# Print the deprecation warnings that pcbench's own build printed in the log of a
# `pip install [-v] -e .` (pcbench is the one editable requirement), and exit 1 when there is any.
# pcbench's build is pip's editable steps ("Getting requirements to build editable", "Preparing
# editable metadata", "Building editable for pcbench"): from such a step's line up to the next line
# of another step or a top-level line of pip, whichever pip prints the backend's output in (older
# pip: after "Running command <step>", pip >= 25: after "<step>: finished"); plus pip's own
# DEPRECATION notices that name pcbench. Other packages' builds are not looked at.
# Usage: scripts/build-warnings.sh PIP_LOG
set -euo pipefail
log=${1:?usage: scripts/build-warnings.sh PIP_LOG}
found=$(awk '
  /(Getting requirements to build editable|Preparing editable metadata|Building editable for pcbench)/ { ours = 1; next }
  /^[^ \t]/ || /: (started|finished with status)/ || /Running command/ { ours = 0 }
  /DEPRECATION:/ && /pcbench/ { print; next }
  ours && /[Dd]eprecat/ { print }
' "$log")
if [ -n "$found" ]; then
  printf '%s\n' "$found"
  exit 1
fi
