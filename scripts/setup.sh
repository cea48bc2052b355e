#!/usr/bin/env bash
# Sets up a fresh machine: the pinned torch first (CPU build on CPU machines, never newer CUDA
# packages pulled by a loose requirement), then the Python requirements, then the package with its
# C++ extension built in place. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  $PY -m pip install --quiet torch==2.13.0
fi
$PY -m pip install --quiet -r requirements.txt
# The C++ extension is built in place too, so tests and tools run from the checkout.
$PY -m pip install --quiet -e .
$PY setup.py --quiet build_ext --inplace
