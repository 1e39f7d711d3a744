#!/usr/bin/env bash
# Set up a virtual environment from scratch (if needed) and run the whole test suite.
#   bash scripts/test.sh            # all tests, slow multi-process ones included
#   bash scripts/test.sh -m "not slow"   # extra arguments go to pytest
# The CPU build of torch is pinned here (torch==2.13.0), so pip does not fetch the CUDA build on
# machines without a GPU. Users with a GPU install the package normally: pip install -e ".[dev]".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import cooldown_callbacks, lightning, transformers, accelerate, deepspeed, torchdata, hypothesis, matplotlib, trl" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.installed" ] || [ .ci/constraints.txt -nt "$VENV/.installed" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  # the framework versions the suite is verified against (see .ci/constraints.txt)
  "$VENV/bin/python" -m pip install -q -e ".[dev]" -c .ci/constraints.txt
  touch "$VENV/.installed"
fi
exec "$VENV/bin/python" -m pytest "$@"
