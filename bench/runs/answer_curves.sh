#!/bin/bash
# Issue 15, item 2: accuracy against answers per question for vote / mux / each member voting alone,
# the two Qwen2.5-Coder members (CONFIG, default bench/runs/pair_configs/qwen-coders.yaml: fp32 on the
# CPU; qwen-coders-bf16.yaml is 3.7x faster where `lscpu` lists avx512_bf16 and 3.6x slower on an
# AVX2-only CPU, so a session extends the log of the dtype its CPU runs fast). Resumable:
# every finished question is a line of $OUT/<task>.jsonl; rerun to go on.
#
# OUT defaults to bench/records/answer-curves/<config name>, which git tracks (one folder per
# config, so a log never mixes two configs' answers): each session starts on a fresh
# machine (session 28 found results/ gone, with 100 GSM8K questions and 16 HumanEval problems of
# ~2 min each), so a run of many hours spans sessions only if its log is committed as it grows.
# Commit the JSONL at checkpoints; the command reads only whole lines, so a commit taken while a
# line is being written resumes from the line before it.
# Before a session ends: `pkill -USR1 -f 'bench\.answer_curves'` starts no more questions and lets
# the 8 in flight finish (~20 min of work that a kill throws away), then commit the JSONL.
#
#   TASKS="gsm8k_chat humaneval" LIMIT=100 CONSORT=bench/runs/frozen_consort.sh nohup nice -n 10 bash bench/runs/answer_curves.sh &
#
# 5 samples per member (x = 1, 3, 5, 10 answers) and each member's greedy answer: about 12 answers
# per question: ~1.6 min a GSM8K question in bf16 on a 2-core machine with AVX512-BF16 (sessions 24
# and 34); ~6 min in fp32 (session 33, ~3,900 tokens a question), ~4 min a HumanEval problem in fp32.
cd "$(dirname "$0")/../.." || exit 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
TASKS="${TASKS:-gsm8k_chat humaneval}"
LIMIT="${LIMIT:-100}"
PARTS="${PARTS:-samples}"
SAMPLES="${SAMPLES:-1,3,5,10}"  # 1,3,5,10,20 extends each recorded question to 10 samples per member
CONFIG="${CONFIG:-bench/runs/pair_configs/qwen-coders.yaml}"
OUT="${OUT:-bench/records/answer-curves/$(basename "$CONFIG" .yaml)}"
mkdir -p "$OUT"
for task in $TASKS; do
  echo "$(date -Is) start $task limit $LIMIT parts $PARTS" >> "$OUT/timing.log"
  started=$SECONDS
  if [ -n "${CONSORT:-}" ]; then run=("$CONSORT" -m bench.answer_curves); else run=(.venv/bin/python -m bench.answer_curves); fi
  "${run[@]}" --config "$CONFIG" --task "$task" --limit "$LIMIT" \
    --samples "$SAMPLES" --parts "$PARTS" --chunk 8 --out "$OUT" >> "$OUT/$task.log" 2>&1
  echo "$(date -Is) end $task rc=$? wall_s=$((SECONDS - started))" >> "$OUT/timing.log"
done
