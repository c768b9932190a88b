"""Chat answers of candidate default ensembles on everyday prompts, greedy, in process (CPU, 1 thread).

    python -m bench.chat_answers [--out answers.json]

Each prompt is one user message in each member's own chat template; prints one line per
answer with its time to first token and total time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from consort.runtime.config import parse_config
from consort.runtime.loop import EnsembleLoop
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions

PROMPTS = ["Name a French city.", "What is 12 times 7?", "Give me a synonym for happy.", "Write one sentence about the sea."]
CASES = {
    "qwen alone": RequestOptions(strategy="me", weights=[1, 0]),
    "smollm2 alone": RequestOptions(strategy="me", weights=[0, 1]),
    "mean qwen+smollm2": RequestOptions(strategy="mean"),
    "mean qwen+smollm2, weights 2:1": RequestOptions(strategy="mean", weights=[2, 1]),
    "mean qwen+smollm2, weights 3:1": RequestOptions(strategy="mean", weights=[3, 1]),
    "deepen qwen+smollm2": RequestOptions(strategy="deepen"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write every answer as JSON here too")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--only", help="run only the cases whose label contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = parse_config(
        {
            "members": [
                {"name": "qwen", "model": "qwen2.5-coder-0.5b-instruct"},
                {"name": "smollm2", "model": "smollm2-135m-instruct"},
            ],
            "strategy": "mean",
            "main": "qwen",
        }
    )
    loop = EnsembleLoop.from_config(config, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    answers: dict[str, list[dict[str, object]]] = {}
    for label, options in CASES.items():
        if args.only and args.only not in label:
            continue
        rows = []
        for prompt in PROMPTS:
            started = time.perf_counter()
            first: float | None = None
            text = ""
            for delta in loop.stream(Prompt(messages=[{"role": "user", "content": prompt}]), params, options):
                first = first if first is not None else time.perf_counter() - started
                text += delta.text
            total = time.perf_counter() - started
            rows.append({"prompt": prompt, "text": text, "ttft_s": first, "total_s": total})
            print(f"{label} | {prompt} | {text!r} ttft {first or 0:.2f}s total {total:.2f}s", flush=True)
        answers[label] = rows
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(answers, handle, indent=2)


if __name__ == "__main__":
    main()
