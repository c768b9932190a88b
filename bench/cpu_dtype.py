"""Members computing in bf16 against fp32 on this CPU: decode speed and what it changes.

    python -m bench.cpu_dtype [--models a,b] [--threads 2] [--rounds 3] [--json PATH]

For each packaged member, both dtypes loaded side by side (the same cached weights, computed in
fp32 or bf16), through `MemberEngine` as Consort runs them:

- speed: ms per decode step at batch 1 and 16 (16 steps after an 8-step warm-up), the four runs
  interleaved over `--rounds` rounds so that drifting load hits both dtypes alike; reported as the
  median over rounds of bf16's step ÷ fp32's within the round;
- answers: 32 greedy tokens from three prompts in each dtype (how many continuations are equal),
  and the largest difference of the log-prob bf16 gives each of fp32's chosen tokens.

Whether bf16 is fast depends on the CPU: it needs AVX512-BF16 or AMX for its matrix products
(the flags are printed), and small members spend much of a step outside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from consort.runtime import models
from consort.runtime.member import MemberEngine

DEFAULT_MODELS = "smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"
PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    ",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
]
DTYPES = ("float32", "bfloat16")


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx")))


def step_ms(engine: MemberEngine, batch: int, prompt_ids: list[int], steps: int, warmup: int) -> float:
    ids = [f"s{i}" for i in range(batch)]
    for seq_id in ids:
        engine.add(seq_id, prompt_ids)
    engine.step(ids, top_k=8)  # prefill
    for _ in range(warmup):
        for seq_id, out in engine.step(ids, top_k=8).items():
            engine.extend(seq_id, [int(out.top_ids[0])])
    started = time.perf_counter()
    for _ in range(steps):
        for seq_id, out in engine.step(ids, top_k=8).items():
            engine.extend(seq_id, [int(out.top_ids[0])])
    elapsed = time.perf_counter() - started
    for seq_id in ids:
        engine.remove(seq_id)
    return 1000 * elapsed / steps


def greedy(engine: MemberEngine, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
    engine.add("g", prompt_ids)
    chosen, logprobs = [], []
    for _ in range(tokens):
        out = engine.step(["g"], top_k=1)["g"]
        chosen.append(int(out.top_ids[0]))
        logprobs.append(float(out.top_logprobs[0]))
        engine.extend("g", chosen[-1:])
    engine.remove("g")
    return chosen, logprobs


def forced_logprobs(engine: MemberEngine, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """The engine's log-prob of each of `tokens` in turn, fed as they are."""
    engine.add("f", prompt_ids)
    out = []
    for token in tokens:
        step = engine.step(["f"], top_k=1, full={"f"})["f"]
        assert step.logprobs is not None
        out.append(float(step.logprobs[token]))
        engine.extend("f", [token])
    engine.remove("f")
    return out


def measure(alias: str, rounds: int) -> dict[str, Any]:
    engines = {}
    for dtype in DTYPES:
        model, tokenizer = models.load(alias, device="cpu", dtype=dtype)
        engines[dtype] = MemberEngine(model, tokenizer, name=f"{alias}:{dtype}")
    tokenizer = engines["float32"].tokenizer
    prompt_ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    times: dict[str, list[float]] = {f"{d} b{b}": [] for d in DTYPES for b in (1, 16)}
    for round_index in range(rounds):
        order = [(d, b) for b in (1, 16) for d in DTYPES]
        if round_index % 2:
            order.reverse()
        for dtype, batch in order:
            times[f"{dtype} b{batch}"].append(step_ms(engines[dtype], batch, prompt_ids, steps=16, warmup=8))
    equal, gaps = 0, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        fp32_tokens, fp32_logprobs = greedy(engines["float32"], ids, 32)
        bf16_tokens, _ = greedy(engines["bfloat16"], ids, 32)
        equal += fp32_tokens == bf16_tokens
        bf16_on_fp32 = forced_logprobs(engines["bfloat16"], ids, fp32_tokens)
        gaps.append(max(abs(a - b) for a, b in zip(fp32_logprobs, bf16_on_fp32, strict=True)))
    result: dict[str, Any] = {"step_ms": {k: round(statistics.median(v), 2) for k, v in times.items()}}
    for batch in (1, 16):
        ratios = [b / f for f, b in zip(times[f"float32 b{batch}"], times[f"bfloat16 b{batch}"], strict=True)]
        result[f"bf16_over_fp32_b{batch}"] = round(statistics.median(ratios), 3)
    result["greedy_equal"] = f"{equal} of {len(PROMPTS)}"
    result["max_abs_logprob_gap_on_fp32_tokens"] = round(max(gaps), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "threads": args.threads,
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "models": {},
    }
    for alias in args.models.split(","):
        report["models"][alias] = measure(alias, args.rounds)
        print(alias, json.dumps(report["models"][alias]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
