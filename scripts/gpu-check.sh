#!/usr/bin/env bash
# The GPU readiness check (README "GPU check"): `bash scripts/gpu-check.sh [--smoke] [--out DIR] [--budget S]`.
# Picks a Python that has torch (with CUDA unless --smoke) and pcbench's runtime needs, preferring
# one already there (works offline): $PCBENCH_PYTHON, .venv/bin/python, python3. Only if none has
# them does it create/complete .venv with `pip install -e '.[test]'` (package registries only).
# The tree's pcbench is used through PYTHONPATH, so no install of pcbench itself is needed.
# The budget (default 520 s, so 9 minutes with the last guards; smoke 110 s) counts from the moment a
# Python is chosen: choosing one that is already there takes seconds, while an install (a fresh clone
# without a venv) takes minutes that are the install's, not the check's; it is reported, not counted
# (a lent GPU machine has no network: bring the venv, or point $PCBENCH_PYTHON at one).
# What is left then goes to `python -m pcbench.bench.gpu_check` (= `pcbench bench gpu-check`),
# under `timeout` as a last guard. Other arguments pass through (e.g. --out DIR; or set
# $PCBENCH_GPU_CHECK_OUT). Exit: 0 done, 2 no usable Python/GPU, else the check's own code.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
smoke=0
budget=${PCBENCH_GPU_CHECK_BUDGET:-}
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1; pass+=("$1") ;;
    --budget) budget="$2"; shift ;;
    --budget=*) budget="${1#--budget=}" ;;
    *) pass+=("$1") ;;
  esac
  shift
done
[ -n "$budget" ] || { [ "$smoke" = 1 ] && budget=110 || budget=520; }

# Cheap check (find_spec, no imports) of the runtime needs; the real run also imports torch for CUDA.
needs="import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
  ('torch', 'transformers', 'safetensors', 'tokenizers', 'matplotlib', 'pytest', 'yaml', 'psutil', 'tqdm', 'numpy')))"
[ "$smoke" = 1 ] || needs="$needs
import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
usable() { [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 && timeout 120 "$1" -c "$needs" >/dev/null 2>&1; }

py=""
for cand in "${PCBENCH_PYTHON:-}" .venv/bin/python python3; do
  if usable "$cand"; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  t0=$(date +%s)
  echo "gpu-check: no Python with the needs found; installing into .venv (package registries)"
  [ -x .venv/bin/python ] || python3 -m venv .venv || { echo "gpu-check: error: cannot create .venv" >&2; exit 2; }
  .venv/bin/python -m pip install --quiet -e '.[test]' || echo "gpu-check: pip install -e '.[test]' failed" >&2
  if [ "$smoke" != 1 ] && ! usable .venv/bin/python && command -v nvidia-smi >/dev/null 2>&1; then
    # A CPU build of torch (torch==2.13.0+cpu also satisfies ==2.13.0): replace it with PyPI's CUDA build.
    .venv/bin/python -m pip uninstall --quiet -y torch
    .venv/bin/python -m pip install --quiet "torch==2.13.0" --index-url "${PCBENCH_TORCH_INDEX:-https://pypi.org/simple}" \
      || echo "gpu-check: installing the CUDA build of torch failed" >&2
  fi
  echo "gpu-check: install took $(( $(date +%s) - t0 )) s"
  usable .venv/bin/python && py=.venv/bin/python
fi
if [ -z "$py" ]; then
  if [ "$smoke" = 1 ]; then
    echo "gpu-check: error: no Python with torch, transformers, matplotlib and pytest (tried \$PCBENCH_PYTHON, .venv, python3)" >&2
  else
    echo "gpu-check: error: no Python whose torch sees a CUDA GPU (tried \$PCBENCH_PYTHON, .venv, python3); on a machine without one use --smoke" >&2
  fi
  exit 2
fi
chose=$(( $(date +%s) - start ))
[ -n "${t0:-}" ] && echo "gpu-check: choosing the Python took ${chose} s (install included), not counted in the budget"
start=$(date +%s)  # the budget is the check's own
left=$(( budget - ($(date +%s) - start) ))
if [ "$left" -lt 30 ]; then
  echo "gpu-check: error: only ${left} s of the ${budget} s budget left after choosing the Python" >&2
  exit 2
fi
echo "gpu-check: python $py, ${left} s of ${budget} s left"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Fewer fragmentation OOMs after the micro-batch search's deliberate one.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# The check budgets against this absolute deadline (its own imports count); timeout is the last guard.
timeout -k 5 $(( left + 15 )) "$py" -m pcbench.bench.gpu_check --deadline $(( start + budget )) "${pass[@]}"
