"""What the HTTP endpoint costs on top of the coordinator, measured in one run on the same ensemble.

    python -m bench.serve [--real] [--strategy mean] [--tokens 64] [--requests 12] [--concurrency 1]

Two paths to the same ensemble config, alternated request by request so drifting
machine load hits both alike:
- direct: a `CoordinatorActor` streamed from this driver (actors/client.py);
- HTTP: the Serve app (deploy/app.py) streamed over SSE from this driver with httpx.
Figures (issue 5): per-token latency over HTTP ÷ direct (target ≤ 1.05), and time to
first token over HTTP − direct (target ≤ 50 ms). Greedy, ignore_eos, so both paths
produce the same tokens. Tiny random-weight members by default (seconds to load);
`--real` uses the packaged SmolLM2-135M + Gemma-3-270M.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

for _name, _value in (
    ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_AUTH_MODE", "disabled"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_name, _value)

import httpx  # noqa: E402
import ray  # noqa: E402

from bench.common import PROMPTS, machine  # noqa: E402
from consort.runtime import models  # noqa: E402
from consort.runtime.config import EnsembleConfig, pair_config, parse_config  # noqa: E402
from consort.runtime.prompts import Prompt  # noqa: E402
from consort.runtime.sampling import SamplingParams  # noqa: E402
from consort.runtime.types import RequestOptions  # noqa: E402

TINY_MEMBERS = [
    {"name": "smollm2", "model": "tiny:smollm2-135m-instruct"},
    {"name": "gemma3", "model": "tiny:gemma3-270m"},
]


@dataclass
class Sample:
    """One stream: time to its first text, and the mean time per token after it."""

    ttft_s: float
    per_token_s: float


def ensemble(real: bool, strategy: str) -> EnsembleConfig:
    if real:
        return parse_config({**pair_config(strategy).model_dump(), "max_batch": 16})
    return parse_config({"members": TINY_MEMBERS, "strategy": strategy, "main": "smollm2", "max_batch": 16})


def _sample(started: float, times: list[float], first_text: int) -> Sample:
    # The first text may come a step late (a piece that ends mid-character); count steps from it on both paths.
    steps = len(times) - 1 - first_text
    return Sample(times[first_text] - started, (times[-1] - times[first_text]) / max(steps, 1))


async def direct_stream(coordinator: Any, prompt: str, tokens: int) -> tuple[Sample, int]:
    from consort.actors.client import stream

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    started, times, first_text = time.perf_counter(), [], None
    async for delta in stream(coordinator, Prompt(text=prompt), params, RequestOptions()):
        times.append(time.perf_counter())
        if first_text is None and (delta.text or delta.finish_reason):
            first_text = len(times) - 1
    assert len(times) == tokens, f"direct stream gave {len(times)} deltas for {tokens} tokens"
    return _sample(started, times, first_text or 0), first_text or 0


async def http_stream(
    client: httpx.AsyncClient, url: str, prompt: str, tokens: int, first_text: int
) -> Sample:
    body = {
        "model": "consort",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    started, times = time.perf_counter(), []
    async with client.stream("POST", url, json=body) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
    # Empty deltas send no chunk: pad the front so index `first_text` is the first text on both paths.
    times = [times[0]] * first_text + times
    return _sample(started, times, first_text)


async def measure(
    coordinator: Any, url: str, requests: int, concurrency: int, tokens: int
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {"direct": [], "http": []}
    async with httpx.AsyncClient(timeout=600) as client:
        # Warm both paths up, and learn at which delta each prompt's text starts (greedy: the same every time).
        rounds = [[PROMPTS[(i + j) % len(PROMPTS)] for j in range(concurrency)] for i in range(requests)]
        firsts: dict[str, int] = {}
        for prompt in dict.fromkeys(p for prompts in rounds for p in prompts):
            _, firsts[prompt] = await direct_stream(coordinator, prompt, tokens)
            await http_stream(client, url, prompt, tokens, firsts[prompt])

        async def direct(prompts: list[str]) -> None:
            results = await asyncio.gather(*(direct_stream(coordinator, p, tokens) for p in prompts))
            samples["direct"].extend(sample for sample, _ in results)

        async def http(prompts: list[str]) -> None:
            samples["http"].extend(
                await asyncio.gather(*(http_stream(client, url, p, tokens, firsts[p]) for p in prompts))
            )

        for i, prompts in enumerate(rounds):
            # Alternate which path goes first, so neither always runs on a machine the other just warmed.
            for path in (direct, http) if i % 2 == 0 else (http, direct):
                await path(prompts)
    return samples


def summarise(samples: dict[str, list[Sample]]) -> dict[str, float]:
    def median(path: str, field: str) -> float:
        return statistics.median(getattr(s, field) for s in samples[path])

    out = {f"{p}_{f}_ms": 1000 * median(p, f) for p in samples for f in ("ttft_s", "per_token_s")}
    out["per_token_ratio"] = out["http_per_token_s_ms"] / out["direct_per_token_s_ms"]
    out["ttft_delta_ms"] = out["http_ttft_s_ms"] - out["direct_ttft_s_ms"]
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="store_true", help="the packaged models instead of tiny random ones")
    parser.add_argument("--strategy", default="mean", choices=["mean", "deepen", "me"])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--requests", type=int, default=12, help="measured rounds per path")
    parser.add_argument("--concurrency", type=int, default=1, help="streams at once per round")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from ray import serve

    from consort.actors.client import start_coordinator
    from consort.deploy.app import ensemble_app

    config = ensemble(args.real, args.strategy)
    for member in config.members:
        if member.model.startswith(models.TINY_PREFIX):
            models.prepare(member.model)  # the member actors load tiny models from the cache, saved here
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    coordinator = start_coordinator(config)
    serve.run(ensemble_app(config), name="bench", route_prefix="/bench", blocking=False)
    url = f"http://127.0.0.1:{port}/bench/v1/completions"
    try:
        samples = asyncio.run(measure(coordinator, url, args.requests, args.concurrency, args.tokens))
    finally:
        ray.get(coordinator.shutdown.remote())
        serve.shutdown()
        ray.shutdown()
    figures: dict[str, Any] = {
        "models": "real" if args.real else "tiny",
        "strategy": args.strategy,
        "tokens": args.tokens,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "machine": machine(),
        **summarise(samples),
        "samples": {k: [asdict(s) for s in v] for k, v in samples.items()},
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}, indent=2))
    print(
        f"per-token latency: HTTP {figures['http_per_token_s_ms']:.2f} ms / direct "
        f"{figures['direct_per_token_s_ms']:.2f} ms = {figures['per_token_ratio']:.3f} (target ≤ 1.05)"
    )
    print(
        f"time to first token: HTTP {figures['http_ttft_s_ms']:.1f} ms − direct {figures['direct_ttft_s_ms']:.1f} ms "
        f"= {figures['ttft_delta_ms']:.1f} ms (target ≤ 50 ms)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
