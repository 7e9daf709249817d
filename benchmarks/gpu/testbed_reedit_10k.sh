#!/usr/bin/env bash
# Issue #14's testbed bar on one GPU (written for an H200; no hub access needed): gated with the question
# gate (benchmarks/hparams/testbed-gated-question) over 10,000 edits of the default testbed: ten rounds of
# new targets for the same 1,000 facts, batches of 100, a checkpoint every 1,000 edits (the horizon is as
# fine as that). Resumable: run it again with the same OUT and it continues from its ledger.
# Since the gate holds re-edits of a fact as one entry (commit 1e7dff3), this also runs on 2 CPU cores in about
# an hour (runs/tb10k/queue41.sh, docs/results/lifelong.md); the script stays for a lent GPU and for the
# longer streams (EDITS=50000 and more).
#
#   OUT=/tmp/tb10k bash benchmarks/gpu/testbed_reedit_10k.sh             # on the GPU machine, from the repo root
#   OUT=/tmp/tb10k EDITS=300 EVERY=100 bash benchmarks/gpu/testbed_reedit_10k.sh   # a short check, any machine
#
# Needs torch, transformers and superedit's dependencies importable; superedit from this checkout (src/).
# The testbed model ships with superedit, so nothing is downloaded.
set -uo pipefail
OUT="${OUT:-runs/gpu-tb10k}"
EDITS="${EDITS:-10000}"
EVERY="${EVERY:-1000}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SUPEREDIT_HOME="${SUPEREDIT_HOME:-$OUT/home}"
PY="${PYTHON:-python}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee "$OUT/summary.txt"
t0=$SECONDS
"$PY" -m superedit.cli lifelong --methods gated --reedit-facts 1000 --edits "$EDITS" --batch-size 100 \
  --eval-every "$EVERY" --hparams-dir benchmarks/hparams/testbed-gated-question --out "$OUT/question" --resume \
  > "$OUT/question.log" 2>&1
rc=$?
echo "rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
grep -a "INFO superedit.lifelong.runner" "$OUT/question.log" | sed 's/.*INFO //' | tee -a "$OUT/summary.txt"
exit $rc
