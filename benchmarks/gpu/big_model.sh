#!/usr/bin/env bash
# Issue #15 item 5 on one GPU (written for an H200; < 8 min; no hub access needed): a random Llama at
# Llama-3-8B's widths (4 layers) through `superedit edit --device-map auto --dtype bfloat16`, the
# placement checks of benchmarks/gpu/big_model_check.py (single device and blocks split between the GPU
# and the CPU, bf16 and fp32), and bench_big_width.py at d_mlp 14,336 on the GPU. Results under $OUT.
#
#   OUT=/tmp/bm bash benchmarks/gpu/big_model.sh              # on the GPU machine, from the repo root
#   OUT=/tmp/bm bash benchmarks/gpu/big_model.sh --cpu-small  # the same paths on a CPU, tiny widths
#
# Needs torch (with CUDA), transformers and accelerate importable; superedit from this checkout (src/).
set -uo pipefail
OUT="${OUT:-runs/gpu-big-model}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SUPEREDIT_HOME="${SUPEREDIT_HOME:-$OUT/home}"
DEVICE=cuda SMALL="" BENCH=(--d-mlp 14336 --d-model 4096)
if [[ "${1:-}" == "--cpu-small" ]]; then
  DEVICE=cpu SMALL=--small BENCH=(--d-mlp 1024 --d-model 256)
fi
PY="${PYTHON:-python}"
status=0
run() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [[ $rc -eq 0 ]] || { status=1; tail -n 20 "$OUT/$name.log"; }
}
"$PY" -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "accelerate", accelerate.__version__)' | tee "$OUT/summary.txt"
[[ "$DEVICE" == cpu ]] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"

run build 150 "$PY" benchmarks/gpu/big_model_check.py build --out "$OUT" --device "$DEVICE" $SMALL
# the CLI path: --device-map auto --dtype bfloat16, ROME then MEMIT (stats from the small corpus file)
for method in rome memit; do
  layers=1; [[ $method == memit ]] && layers=1,2
  run "cli-$method" 150 "$PY" -m superedit.cli edit --model "$OUT/llama-8b-widths" --requests "$OUT/requests.jsonl" \
    --limit 2 --method "$method" --layers "$layers" --corpus "$OUT/corpus.txt" --mom2-tokens 1000 \
    --device-map auto --dtype bfloat16 --gen-tokens 0 --greedy-tokens 0 --out "$OUT/cli-$method" --json
done
run place 240 "$PY" benchmarks/gpu/big_model_check.py place --out "$OUT" --device "$DEVICE" $SMALL
run bench-alphaedit 90 "$PY" benchmarks/bench_big_width.py --part alphaedit --device "$DEVICE" "${BENCH[@]}" --dense --json "$OUT/bench-alphaedit.json"
run bench-d4s 90 "$PY" benchmarks/bench_big_width.py --part d4s --device "$DEVICE" "${BENCH[@]}" --check --json "$OUT/bench-d4s.json"
run bench-projector 90 "$PY" benchmarks/bench_big_width.py --part projector --device "$DEVICE" "${BENCH[@]}" --json "$OUT/bench-projector.json"
rm -rf "$OUT/llama-8b-widths" "$OUT/home"  # the 2 GB model: rebuilt in a minute
echo "status=$status" | tee -a "$OUT/summary.txt"
exit $status
