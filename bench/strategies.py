"""Tokens/s of each strategy and of each member alone, on the two real models, in one process, one run.

    python -m bench.strategies [--tokens 32] [--batch 1] [--threads 1] [--gate 0.9]

Targets (issue 3): deepen step ≤ 1.15 × mean step; me tokens/s ≥ 1.6 × mean tokens/s.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import PROMPTS, best_of, machine, timed
from consort.runtime.config import pair_config, parse_config
from consort.runtime.loop import EnsembleLoop
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gate", type=float, default=0.9)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = parse_config({**pair_config().model_dump(), "max_batch": max(16, args.batch)})
    loop = EnsembleLoop.from_config(config, device="cpu")
    names = [m.name for m in config.members]
    prompts = [Prompt(text=PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    runs: dict[str, RequestOptions] = {
        **{f"{n} alone": RequestOptions(strategy="me", weights=[float(n == m) for m in names]) for n in names},
        "mean": RequestOptions(strategy="mean"),
        "deepen": RequestOptions(strategy="deepen"),
        "me": RequestOptions(strategy="me"),
        f"deepen+gate({args.gate})": RequestOptions(strategy="deepen", gate=args.gate, diagnostics=True),
    }
    loop.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), RequestOptions(strategy="deepen"))

    results: dict[str, dict[str, float]] = {}
    for label, options in runs.items():
        seconds = best_of(args.repeats, lambda o=options: timed(lambda: loop.generate(prompts, params, o)))
        tokens = args.tokens * args.batch
        row = {"tokens_per_s": tokens / seconds, "step_ms": 1000 * seconds / args.tokens}
        if options.diagnostics:
            completions = loop.generate(prompts, params, options)
            steps = [d for c in completions for d in c.diagnostics]
            row["fused_fraction"] = sum(d["fused"] for d in steps) / len(steps)
        results[label] = row

    print(f"\n{machine()}; batch {args.batch}, {args.tokens} tokens, greedy, best of {args.repeats}")
    print(f"{'run':<24}{'tokens/s':>10}{'step ms':>10}{'fused':>8}")
    for label, row in results.items():
        fused = f"{row['fused_fraction']:.2f}" if "fused_fraction" in row else ""
        print(f"{label:<24}{row['tokens_per_s']:>10.2f}{row['step_ms']:>10.1f}{fused:>8}")
    deepen_ratio = results["deepen"]["step_ms"] / results["mean"]["step_ms"]
    me_ratio = results["me"]["tokens_per_s"] / results["mean"]["tokens_per_s"]
    print(f"deepen step / mean step = {deepen_ratio:.3f} (target ≤ 1.15)")
    print(f"me tokens/s / mean tokens/s = {me_ratio:.2f} (target ≥ 1.6)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"results": results, "deepen_over_mean": deepen_ratio, "me_over_mean": me_ratio}, handle, indent=2)


if __name__ == "__main__":
    main()
