#!/usr/bin/env bash
# The main job: `superedit demo` on the built-in testbed (bootstraps .venv on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/superedit demo "$@"
