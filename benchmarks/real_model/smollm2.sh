#!/usr/bin/env bash
# Real-model measurements on SmolLM2-135M (pretrained:smollm2-135m), in stages; each stage skips what
# is already done, so the script resumes after an interruption. CPU: run with the machine otherwise idle.
#
#   bash benchmarks/real_model/smollm2.sh known        # known-facts filter + tuning/evaluation split
#   bash benchmarks/real_model/smollm2.sh locate       # averaged causal trace (100 facts, none from eval)
#   bash benchmarks/real_model/smollm2.sh rome-sweep   # ROME layer sweep on the TUNING split
#   bash benchmarks/real_model/smollm2.sh rome-eval    # ROME, chosen profile, EVALUATION split
#   bash benchmarks/real_model/smollm2.sh memit-eval   # MEMIT, one batch of 100, EVALUATION split
#
# Outputs go to runs/real/ (git-ignored); docs/results/real-model.md reports them with these commands.
set -euo pipefail
cd "$(dirname "$0")/../.."
SE=".venv/bin/superedit --threads ${THREADS:-2}"
M=pretrained:smollm2-135m
K=runs/known-smollm2
R=runs/real
mkdir -p "$R"
stage=${1:?stage: known | locate | rome-sweep | rome-eval | memit-eval}
case "$stage" in
  known)
    [ -f $K/report.json ] || $SE data known --model $M --requests ../shared/data/counterfact_known.json --out $K --rule top1 --tune-fraction 0.3 --seed 0
    [ -f $K-margin1/report.json ] || $SE data known --model $M --requests ../shared/data/counterfact_known.json --out $K-margin1 --rule margin --margin 1 --tune-fraction 0.3 --seed 0
    ;;
  locate)
    [ -f $R/trace_facts.json ] || .venv/bin/python benchmarks/real_model/trace_facts.py $K-margin1/known.json $K/eval.json $R/trace_facts.json
    $SE locate --model $M --requests $R/trace_facts.json --n 100 --kinds mlp,attn --samples 2 --layer-stride 2 --out $R/locate
    ;;
  rome-sweep)
    for L in ${LAYERS:-2 4 6 8 11}; do
      [ -f $R/rome-sweep/L$L/summary.json ] || $SE edit --model $M --method rome --requests $K/tune.json --limit ${SWEEP_N:-16} \
        --layers $L --gen-tokens 0 --out $R/rome-sweep/L$L --json | tail -1 > /dev/null
    done
    ;;
  rome-eval)
    [ -f $R/rome-eval/summary.json ] || $SE edit --model $M --method rome --requests $K/eval.json --gen-tokens 0 --out $R/rome-eval --json | tail -1 > /dev/null
    ;;
  memit-eval)
    [ -f $R/memit-eval/summary.json ] || $SE edit --model $M --method memit --requests $K/eval.json --limit 100 --batch-size 100 --gen-tokens 0 --out $R/memit-eval --json | tail -1 > /dev/null
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
