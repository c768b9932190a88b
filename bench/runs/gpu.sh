#!/bin/bash
# Issue 19's GPU figures in one call of the device tool (about 8 minutes on an H200):
#
#   run(command="bash bench/runs/gpu.sh", carry=[".whl", ".gpu_tok"], timeout_s=590)
#
# Prepared here first (add both folders to .git/info/exclude; ~20 MB together):
#   .whl:     what the ensemble core needs that the GPU machine (Python 3.12, torch, transformers)
#             lacks: `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
#             --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64
#             -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
#             typing-inspection==0.4.5 typing_extensions==4.16.0 llguidance==1.9.1`
#   .gpu_tok: the default pair's real tokenizers (`python -m bench.gpu_ensemble --save-tokenizers .gpu_tok`).
# Both benchmarks write JSON under $OUT, even when the time budget stops them early.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "could not install the carried wheels (.whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
timeout 330 python3 -m bench.gpu_step --out "$OUT" --budget-s 270 2>&1 | tail -n 60 > "$OUT/gpu_step.log"
timeout 220 python3 -m bench.gpu_ensemble --out "$OUT" --budget-s 170 2>&1 | tail -n 60 > "$OUT/gpu_ensemble.log"
tail -n 30 "$OUT/gpu_step.log" "$OUT/gpu_ensemble.log"
