"""Member engine decode throughput next to `model.generate`, on the real models.

    python -m bench.member_step [--tokens N] [--threads T] [--repeats R] [--models a,b]

For each model: greedy decoding of N new tokens per sequence (no early stop:
`min_new_tokens` for generate, end-of-sequence ids skipped for the engine), at batch 1
and batch 8, the same prompts for both. A rate counts new tokens over the whole run,
prefill included; batch-8 rates are aggregate.

The four runs (generate/engine × batch 1/8) are interleaved, R rounds, in a rotating
order, so slow drifts in machine load hit all of them alike. Reported: the best rate
of each, and the two target ratios as the median over rounds of the ratio *within* a
round (engine/generate at batch 1, target >= 0.95; engine batch 8 / engine batch 1,
target >= 3). Every rate is measured on two clocks: wall time, and this process's CPU
time; on a shared machine the wall clock also counts other processes' load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from consort.runtime import models
from consort.runtime.member import MemberEngine

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "List three uses of copper:",
    "def fibonacci(n):",
    "The most important idea in economics is",
    "Translate to French: The cat sleeps on the warm windowsill while the rain falls.",
]
CLOCKS = ("wall", "cpu")
RUNS = (("generate", 1), ("engine", 1), ("generate", 8), ("engine", 8))


@dataclass
class Rates:
    """Per-round rates (new tokens per second) of one run, on both clocks."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def of(self, clock: str) -> list[float]:
        return self.wall if clock == "wall" else self.cpu


def _greedy_engine(engine: MemberEngine, prompts: list[list[int]], new_tokens: int) -> None:
    ids = [str(i) for i in range(len(prompts))]
    for seq_id, prompt in zip(ids, prompts, strict=True):
        engine.add(seq_id, prompt)
    try:
        for _ in range(new_tokens):
            out = engine.step(ids)
            for seq_id in ids:
                # Skip end-of-sequence ids, as min_new_tokens does for generate.
                token = next(int(t) for t in out[seq_id].top_ids if int(t) not in engine.eos_token_ids)
                engine.extend(seq_id, [token])
    finally:
        for seq_id in ids:
            engine.remove(seq_id)


def _greedy_generate(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> None:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
        )
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"generate stopped early: {out.shape[1] - width} of {new_tokens} tokens")


def _timed(run: Callable[[], None], tokens: int) -> tuple[float, float]:
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    run()
    return tokens / (time.perf_counter() - wall_start), tokens / (time.process_time() - cpu_start)


def bench_model(alias: str, new_tokens: int, repeats: int) -> dict[tuple[str, int], Rates]:
    model, tokenizer = models.load(alias)
    engine = MemberEngine(model, tokenizer, name=alias)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]

    def runner(name: str, batch: int, tokens: int) -> Callable[[], None]:
        chosen = prompts[:batch]
        if name == "engine":
            return lambda: _greedy_engine(engine, chosen, tokens)
        return lambda: _greedy_generate(model, tokenizer, chosen, tokens)

    for name, batch in RUNS:
        runner(name, batch, 2)()  # warm-up: first-call allocations are not what we measure
    rates = {run: Rates() for run in RUNS}
    for round_index in range(repeats):
        shift = round_index % len(RUNS)
        for name, batch in RUNS[shift:] + RUNS[:shift]:
            wall, cpu = _timed(runner(name, batch, new_tokens), new_tokens * batch)
            rates[name, batch].wall.append(wall)
            rates[name, batch].cpu.append(cpu)
            print(
                f"  {alias:24s} round {round_index + 1}: {name:8s} batch {batch}: "
                f"{wall:6.2f} tok/s wall, {cpu:6.2f} tok/s CPU",
                flush=True,
            )
    return rates


def _paired_median(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def report(results: dict[str, dict[tuple[str, int], Rates]], args: argparse.Namespace) -> str:
    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s), fp32, CPU "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"{args.tokens} new tokens per sequence, {args.repeats} interleaved rounds",
        "",
        "| model | clock | generate b1 | engine b1 | generate b8 | engine b8 "
        "| engine/generate b1 | engine b8 / engine b1 | (generate b8 / generate b1) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for alias, rates in results.items():
        for clock in CLOCKS:
            best = {run: max(rates[run].of(clock)) for run in RUNS}
            vs_generate = _paired_median(rates["engine", 1].of(clock), rates["generate", 1].of(clock))
            scaling = _paired_median(rates["engine", 8].of(clock), rates["engine", 1].of(clock))
            generate_scaling = _paired_median(rates["generate", 8].of(clock), rates["generate", 1].of(clock))
            lines.append(
                f"| {alias} | {clock} | {best['generate', 1]:.2f} | {best['engine', 1]:.2f} "
                f"| {best['generate', 8]:.2f} | {best['engine', 8]:.2f} "
                f"| **{vs_generate:.2f}** | **{scaling:.2f}** | {generate_scaling:.2f} |"
            )
    lines += [
        "",
        "Rates: best round, new tokens/s (prefill included), aggregate at b8. Ratios: median over rounds "
        "of the ratio within a round. Targets: engine/generate b1 >= 0.95, engine b8 / engine b1 >= 3.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (DESIGN quotes 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--models", default=",".join(models.PAIR_MEMBERS), help="comma-separated aliases")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {alias: bench_model(alias, args.tokens, args.repeats) for alias in args.models.split(",")}
    print()
    print(report(results, args))


if __name__ == "__main__":
    main()
