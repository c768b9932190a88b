#!/bin/bash
# Issues 14 and 16: one records folder, results/members/<member>/<group>, linking each member's
# answers from the runs that made them, for `python -m bench.member_pairs results/members` (the
# members table, oracle and error overlap) and `python -m bench.routing --records results/members`.
# A link may point at a pair's run: the routers and the table read only the member the folder names.
#
#   multiple choice: SmolLM2 and Gemma-3 alone in fp32 (bench/runs/members_alone.sh, results/part3);
#                    the Qwen members from the bf16 pair runs with Gemma-3 (bench/runs/pairs.sh)
#   code, GSM8K:     every member alone in bf16 (members_alone.sh with CONFIGS=members_configs_bf16
#                    OUT=results/part3-bf16)
cd "$(dirname "$0")/../.." || exit 1
link() {  # link MEMBER GROUP SOURCE (relative to the repository root)
  mkdir -p "results/members/$1"
  ln -sfn "../../../$3" "results/members/$1/$2"
}
link smollm2 mc results/part3/smollm2/mc
link gemma3 mc results/part3/gemma3/mc
link qwen05 mc results/pairs/gemma-qwen05-bf16/mc
link qwen15 mc results/pairs/gemma-qwen15-bf16/mc
for member in smollm2 gemma3 qwen05 qwen15; do
  for group in code gsm8k_chat; do
    link "$member" "$group" "results/part3-bf16/$member/$group"
  done
done
# Links to runs not made yet dangle until they exist; the readers skip them.
