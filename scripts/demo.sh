#!/usr/bin/env bash
# The main job: `superedit demo` on the built-in testbed (bootstraps .venv on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The testbed models are small: one torch thread is usually fastest (override with SUPEREDIT_THREADS).
export SUPEREDIT_THREADS=${SUPEREDIT_THREADS:-1}
exec .venv/bin/superedit demo "$@"
