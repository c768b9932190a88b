#!/bin/bash
# Issue 14, part 3: each packaged member alone on the new tasks. Resumable: rerun this script and
# every eval skips the questions already in its predictions.jsonl.
cd /work/main || exit 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
MEMBERS="${MEMBERS:-smollm2 gemma3 qwen05 qwen15}"
run() {  # run MEMBER GROUP ARGS...
  local member=$1 group=$2; shift 2
  local out=results/part3/$member/$group
  echo "$(date -Is) start $member $group $*" >> results/part3/timing.log
  local started=$SECONDS
  ${CONSORT:-.venv/bin/consort} eval --local --config bench/runs/members_configs/$member.yaml --strategies members \
    --out "$out" --no-progress "$@" >> results/part3/$member.$group.log 2>&1
  echo "$(date -Is) end $member $group rc=$? wall_s=$((SECONDS - started))" >> results/part3/timing.log
}
for m in $MEMBERS; do run "$m" mc --tasks sciq,csqa,hellaswag,openbookqa,winogrande,boolq,socialiqa --limit 300; done
for m in $MEMBERS; do run "$m" code --tasks mbpp,humaneval; done
for m in $MEMBERS; do run "$m" gsm8k_chat --tasks gsm8k_chat --limit 200; done
