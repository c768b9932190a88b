#!/bin/bash
# Issue 14, part 3: each packaged member alone on the new tasks. Resumable: rerun this script and
# every eval skips the questions already in its predictions.jsonl.
#
#   MEMBERS="qwen05 qwen15" CONFIGS=members_configs_bf16 OUT=results/part3-bf16 GROUPS_TO_RUN="code gsm8k_chat mc" \
#     CONSORT=bench/runs/frozen_consort.sh nohup nice -n 10 bash bench/runs/members_alone.sh &
#
# CONFIGS: bench/runs/members_configs (fp32, the CPU default) or members_configs_bf16 (bf16 compute:
# 2-3x faster at batch 16 on a CPU with AVX512-BF16, same HumanEval pass@1 for Qwen-0.5B).
# SPLIT=dev answers the tasks' dev splits instead (e.g. each member's dev accuracy, mux's tie-breaker),
# GSM8K_LIMIT the number of GSM8K questions (default 200).
# CONSORT: the consort command; a frozen install of a commit keeps hours-long runs off the files
# being edited in the working tree.
cd "$(dirname "$0")/../.." || exit 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
MEMBERS="${MEMBERS:-smollm2 gemma3 qwen05 qwen15}"
CONFIGS="${CONFIGS:-members_configs}"
OUT="${OUT:-results/part3}"
GROUPS_TO_RUN="${GROUPS_TO_RUN:-mc code gsm8k_chat}"
SPLIT="${SPLIT:-eval}"
GSM8K_LIMIT="${GSM8K_LIMIT:-200}"
mkdir -p "$OUT"
run() {  # run MEMBER GROUP ARGS...
  local member=$1 group=$2; shift 2
  local out=$OUT/$member/$group
  echo "$(date -Is) start $member $group $CONFIGS $*" >> "$OUT/timing.log"
  local started=$SECONDS
  ${CONSORT:-.venv/bin/consort} eval --local --config "bench/runs/$CONFIGS/$member.yaml" --strategies members \
    --split "$SPLIT" --out "$out" --no-progress --chunk-size 48 "$@" >> "$OUT/$member.$group.log" 2>&1
  echo "$(date -Is) end $member $group rc=$? wall_s=$((SECONDS - started))" >> "$OUT/timing.log"
}
for group in $GROUPS_TO_RUN; do
  for m in $MEMBERS; do
    case $group in
      mc) run "$m" mc --tasks sciq,csqa,hellaswag,openbookqa,winogrande,boolq,socialiqa --limit 300 ;;
      code) run "$m" code --tasks humaneval,mbpp --limit 200 ;;  # all 164 HumanEval, the first 200 MBPP
      gsm8k_chat) run "$m" gsm8k_chat --tasks gsm8k_chat --limit "$GSM8K_LIMIT" ;;
    esac
  done
done
