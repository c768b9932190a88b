"""The distributed runtime on the two real models, members as separate actors, in one run.

    python -m bench.coordinator [--tokens 32] [--threads 1] [--address ADDR]
    python -m bench.coordinator --gpu-share 0.5     # both members on one GPU (one GPU machine)
    python -m bench.coordinator --transports auto   # one transport only (default: both, side by side)

Figures (issue 4):
- coordination overhead at batch 1: ensemble step latency seen by the caller ÷ the slowest
  member's own step latency measured inside the member over the same steps (target ≤ 1.05);
- aggregate tokens/s at concurrency 1, 4, 16 (target: 16 ≥ 3 × 1);
- me ÷ mean aggregate tokens/s at concurrency 16 (target ≥ 1.8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import ray

from bench.common import PROMPTS
from consort.actors.client import complete, connect, start_coordinator
from consort.runtime.config import pair_config, parse_config
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions


async def one_stream(
    coordinator: Any, prompt: Prompt, params: SamplingParams, options: RequestOptions
) -> list[float]:
    """Arrival times of each delta of one request."""
    from consort.actors.client import stream

    times = []
    async for _ in stream(coordinator, prompt, params, options):
        times.append(time.perf_counter())
    return times


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def overhead(coordinator: Any, strategy: str, tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    options = RequestOptions(strategy=strategy)
    # Warm up with a whole request of the measured length: on a GPU the first tens of steps run
    # several times slower (clocks ramping, kernels loading lazily), which a few tokens do not cover.
    asyncio.run(complete(coordinator, Prompt(text=PROMPTS[0]), params, options))
    ray.get(coordinator.step_profile.remote())
    times = asyncio.run(one_stream(coordinator, Prompt(text=PROMPTS[1]), params, options))
    # Steady-state decode on both sides of the ratio: the prefill step is left out of each.
    records = ray.get(coordinator.step_profile.remote())["recent"]
    decode = records[1:]
    step = (times[-1] - times[0]) / (len(times) - 1)
    names = sorted({name for record in decode for name in record["member_round_trip_seconds"]})

    def per_step(key: str, name: str, over: list[dict[str, Any]] = decode) -> float:
        return _mean([record[key].get(name, 0.0) for record in over])

    inside = {name: per_step("member_compute_seconds", name) for name in names}
    invert = {name: per_step("invert_compute_seconds", name) for name in names}
    # The larger of the members' mean steps understates the floor when members are close and jittery
    # (a GPU shared by two processes); the mean over steps of each step's slowest member is the floor.
    critical = _mean([record["critical_member_seconds"] for record in decode])
    slowest = max(inside.values())
    # How runs before the per-step records measured it (the prefill call in the member's mean), for continuity.
    slowest_with_prefill = max(per_step("member_compute_seconds", name, records) for name in names)
    figures = {
        "ensemble_step_ms": 1000 * step,
        "slowest_member_step_ms": 1000 * slowest,
        "ratio": step / slowest,
        "ratio_counting_invert": step / (slowest + max(invert.values())),
        "ratio_prefill_in_member_mean": step / slowest_with_prefill,
        "critical_member_step_ms": 1000 * critical,
        "ratio_per_step_critical": step / critical,
        "loop_step_ms": 1000 * _mean([record["loop_seconds"] for record in decode]),
        "fusion_ms": 1000 * _mean([record["fusion_seconds"] for record in decode]),
        "decode_steps": len(decode),
    }
    for name in names:
        figures[f"{name}_step_ms"] = 1000 * inside[name]
        figures[f"{name}_invert_ms"] = 1000 * invert[name]
        figures[f"{name}_round_trip_ms"] = 1000 * per_step("member_round_trip_seconds", name)
    return figures


def throughput(coordinator: Any, strategy: str, concurrency: int, tokens: int) -> float:
    params = [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, seed=i) for i in range(concurrency)]
    prompts = [Prompt(text=PROMPTS[i % len(PROMPTS)]) for i in range(concurrency)]
    options = RequestOptions(strategy=strategy)

    async def burst() -> None:
        await asyncio.gather(*(complete(coordinator, p, sp, options) for p, sp in zip(prompts, params, strict=True)))

    started = time.perf_counter()
    asyncio.run(burst())
    return concurrency * tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--address")
    parser.add_argument("--json")
    parser.add_argument(
        "--gpu-share",
        type=float,
        help="run the members on GPUs, each taking this share of one (0.5: both members share one GPU)",
    )
    parser.add_argument(
        "--transports",
        default="compiled_graph,actor_calls",
        help="comma-separated member transports to measure the overhead of, one after the other (the first also "
        "gives the throughput figures)",
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    connect(args.address)
    base = pair_config().model_dump()
    for member in base["members"]:
        member["threads"] = args.threads
        if args.gpu_share is not None:
            member["num_gpus"] = args.gpu_share
    if args.gpu_share is not None:
        base["device"] = "cuda"
    transports = args.transports.split(",")
    figures: dict[str, Any] = {"transports": transports}
    # The first transport also gives the throughput figures; each further one only its overhead.
    for index, transport in enumerate(transports):
        coordinator = start_coordinator(parse_config({**base, "max_batch": 16, "transport": transport}))
        suffix = "" if index == 0 else f"_{transport}"
        try:
            for strategy in ("mean", "deepen"):
                figures[f"overhead_{strategy}{suffix}"] = overhead(coordinator, strategy, args.tokens)
            if index == 0:
                for strategy in ("mean", "me"):
                    for concurrency in (1, 4, 16):
                        figures[f"{strategy}_c{concurrency}_tokens_per_s"] = throughput(
                            coordinator, strategy, concurrency, args.tokens
                        )
        finally:
            ray.get(coordinator.shutdown.remote())
            ray.kill(coordinator)
    print(json.dumps(figures, indent=2))
    for index, transport in enumerate(transports):
        suffix = "" if index == 0 else f"_{transport}"
        for strategy in ("mean", "deepen"):
            o = figures[f"overhead_{strategy}{suffix}"]
            print(f"{transport} {strategy}: ensemble step {o['ensemble_step_ms']:.1f} ms / slowest member step "
                  f"{o['slowest_member_step_ms']:.1f} ms = {o['ratio']:.3f} (target ≤ 1.05); "
                  f"counting the inverse search {o['ratio_counting_invert']:.3f}; ÷ each step's slowest member "
                  f"(+ inverse search) {o['ratio_per_step_critical']:.3f}; loop step {o['loop_step_ms']:.1f} ms, "
                  f"fusion {o['fusion_ms']:.2f} ms")
    for strategy in ("mean", "deepen"):
        for transport in transports[1:]:
            other = figures[f"overhead_{strategy}_{transport}"]["ensemble_step_ms"]
            print(f"{strategy}: {transports[0]} step ÷ {transport} step = "
                  f"{figures[f'overhead_{strategy}']['ensemble_step_ms'] / other:.3f}")
    scale = figures["mean_c16_tokens_per_s"] / figures["mean_c1_tokens_per_s"]
    me_over_mean = figures["me_c16_tokens_per_s"] / figures["mean_c16_tokens_per_s"]
    print(f"mean tokens/s at 16 ÷ at 1 = {scale:.2f} (target ≥ 3)")
    print(f"me ÷ mean tokens/s at 16 = {me_over_mean:.2f} (target ≥ 1.8)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
