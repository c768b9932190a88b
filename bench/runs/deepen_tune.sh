#!/bin/bash
# Issue 15, item 1: DeePEn's inverse search (steps x learning rate, then anchors) tuned on the dev
# splits of ARC-Easy and PIQA, the chosen point run once on the same test slices as
# results/deepen/gemma-main (the default search, Gemma-3 main). Resumable: rerun to go on.
#
#   CONSORT=bench/runs/frozen_consort.sh nohup nice -n 10 bash bench/runs/deepen_tune.sh &
cd "$(dirname "$0")/../.." || exit 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
OUT="${OUT:-results/deepen-tune}"
DEV_LIMIT="${DEV_LIMIT:-50}"
mkdir -p "$OUT"
if [ -n "${CONSORT:-}" ]; then run=("$CONSORT" -m bench.deepen_tune); consort="$CONSORT"; else
  run=(.venv/bin/python -m bench.deepen_tune); consort=".venv/bin/consort"; fi
echo "$(date -Is) start dev_limit $DEV_LIMIT" >> "$OUT/timing.log"
started=$SECONDS
"${run[@]}" --config bench/runs/pair_configs/knowledge-gemma-main.yaml --tasks arc_easy,piqa \
  --dev-limit "$DEV_LIMIT" --test-limit 100 --out "$OUT" --consort "$consort" >> "$OUT/tune.log" 2>&1
echo "$(date -Is) end rc=$? wall_s=$((SECONDS - started))" >> "$OUT/timing.log"
