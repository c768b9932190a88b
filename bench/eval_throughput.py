"""Questions per minute of each member alone and each strategy, one at a time, in one process.

    python -m bench.eval_throughput --tasks arc_easy,triviaqa --n 16 --json docs/eval_throughput.json

Multiple choice: members alone by the echo fast path, each distinct scoring
distribution of the registered strategies (mean, deepen) by the core's
teacher-forced scoring (me is scored as mean; vote on log-likelihoods costs
nothing beyond the members). Generation: each system generates alone.
Timings include batching (max_batch sequences per step), not model loading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from consort.runtime import fusion
from consort.runtime.config import default_config, load_config, parse_config
from consort.runtime.evaluation import GenerationQuestion, MultipleChoiceQuestion, get_task, load_task
from consort.runtime.evaluation.backend import LocalBackend
from consort.runtime.evaluation.batches import GenerationRequest, member_alone
from consort.runtime.evaluation.logliks import LoglikRequest
from consort.runtime.evaluation.questions import scoring_strategies
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions


async def measure(backend: LocalBackend, task: str, n: int) -> dict[str, float]:
    questions = load_task(task, limit=n)
    names = [m.name for m in backend.config.members]
    rates: dict[str, float] = {}
    if get_task(task).kind == "multiple_choice":
        requests = [
            LoglikRequest(q.prompt, c)
            for q in questions
            if isinstance(q, MultipleChoiceQuestion)
            for c in q.choices
        ]
        for name in names:
            started = time.perf_counter()
            await backend.member_logliks(name, requests)
            rates[f"{name} alone"] = len(questions) / (time.perf_counter() - started) * 60
        # One pass per distinct scoring distribution (me is scored as mean: no pass of its own).
        for strategy in scoring_strategies(fusion.names()):
            started = time.perf_counter()
            await backend.ensemble_logliks(requests, [RequestOptions(strategy=strategy)])
            rates[strategy] = len(questions) / (time.perf_counter() - started) * 60
        return rates
    systems: list[tuple[str, RequestOptions]] = [(f"{n} alone", member_alone(names, n)) for n in names]
    gen = [q for q in questions if isinstance(q, GenerationQuestion)]
    systems += [(s, RequestOptions(strategy=s)) for s in fusion.names("token")]
    # Answer-level strategies (vote) vote on the task's kind of answer.
    systems += [(s, RequestOptions(strategy=s, vote_kind=gen[0].answer_kind)) for s in fusion.names("answer")]
    for label, options in systems:
        requests = [
            GenerationRequest(
                q.prompt,
                SamplingParams(temperature=0.0, max_tokens=q.max_tokens, stop=q.stop, seed=i),
                options,
            )
            for i, q in enumerate(gen)
        ]
        started = time.perf_counter()
        await backend.generate(requests)
        rates[label] = len(gen) / (time.perf_counter() - started) * 60
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="arc_easy,triviaqa")
    parser.add_argument("--n", type=int, default=16, help="questions per task")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--config", help="ensemble YAML (default: SmolLM2-135M-Instruct + Gemma-3-270M)")
    parser.add_argument("--json", help="also write the rates here")
    args = parser.parse_args()
    config = load_config(args.config) if args.config else default_config()
    config = parse_config({**config.model_dump(), "max_batch": args.max_batch})
    backend = LocalBackend.start(config)
    results: dict[str, Any] = {}
    for task in args.tasks.split(","):
        results[task] = asyncio.run(measure(backend, task, args.n))
        print(task, {k: round(v, 2) for k, v in results[task].items()}, flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"n": args.n, "max_batch": args.max_batch, "questions_per_minute": results}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
