#!/bin/bash
# Issue 15, items 0-1: each pair with `mean` at the text level, weights fitted per task on its dev
# split (the calibration's grid costs one pass of each member: every point is mixed offline), then
# the test slices of issue 14 (N=300 per multiple-choice task). Resumable: rerun this script and
# every eval skips the questions already in its predictions.jsonl. Outputs under results/pairs/.
cd "$(dirname "$0")/../.." || exit 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
PAIRS="${PAIRS:-gemma-qwen15 qwen-coders}"
TASKS="${TASKS:-sciq,csqa,hellaswag,openbookqa,winogrande,boolq,socialiqa}"
mkdir -p results/pairs
for pair in $PAIRS; do
  out=results/pairs/$pair/mc
  echo "$(date -Is) start $pair mc" >> results/pairs/timing.log
  started=$SECONDS
  ${CONSORT:-.venv/bin/consort} eval --local --config "bench/runs/pair_configs/$pair.yaml" --strategies mean \
    --tasks "$TASKS" --limit 300 --calibrate --calibrate-limit 200 --calibrate-step 0.1 \
    --out "$out" --no-progress >> "results/pairs/$pair.mc.log" 2>&1
  echo "$(date -Is) end $pair mc rc=$? wall_s=$((SECONDS - started))" >> results/pairs/timing.log
done
