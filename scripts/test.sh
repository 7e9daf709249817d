#!/usr/bin/env bash
# The whole test suite (bootstraps .venv on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
