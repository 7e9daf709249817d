#!/usr/bin/env bash
# Create .venv (once) with superedit and its test dependencies.
# torch is installed as the pinned CPU build *first* unless the venv already has a torch
# (GPU users: install your own torch into .venv before running this, it is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.superedit-installed
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip >&2
  "$VPY" -m pip install -q torch==2.13.0 >&2
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q -e ".[test,pretrained]" >&2
  touch "$stamp"
fi
