"""Talking to a coordinator actor from a driver: the CLI's cluster mode and the jobs."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayTaskError

from runtime.config import EnsembleConfig
from runtime.core import Delta, RequestOptions
from runtime.errors import ConsortError
from runtime.prompts import Prompt
from runtime.sampling import SamplingParams


def connect(address: str | None, min_cpus: float = 0.0) -> None:
    """Join a running cluster (`auto`, `ray://…`), or start a local Ray instance if none is named."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None  # inside `ray job submit`: join, never size
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # Logical CPU slots: members reserve slots, the thread count bounds the real use.
        ray.init(
            include_dashboard=False,
            log_to_driver=False,
            num_cpus=max(os.cpu_count() or 1, int(min_cpus + 0.999)),
        )


def unwrap(error: RayTaskError) -> BaseException:
    """The Consort error a remote call raised, so callers handle one set of types."""
    cause = error.cause
    return cause if isinstance(cause, ConsortError) else error


def start_coordinator(config: EnsembleConfig, **options: Any) -> Any:
    from actors.coordinator import CoordinatorActor

    actor = CoordinatorActor.options(**options).remote(config)
    ray.get(actor.__ray_ready__.remote())
    return actor


async def stream(
    coordinator: Any, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
) -> AsyncIterator[Delta]:
    generator = coordinator.generate.remote(prompt, params, options)
    try:
        async for ref in generator:
            yield await ref
    except RayTaskError as error:
        raise unwrap(error) from error


async def complete(
    coordinator: Any, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
) -> tuple[str, str | None, list[Delta]]:
    text, finish, deltas = "", None, []
    async for delta in stream(coordinator, prompt, params, options):
        text += delta.text
        finish = delta.finish_reason
        deltas.append(delta)
    return text, finish, deltas


def generate_on_cluster(
    config: EnsembleConfig,
    prompt: Prompt,
    params: SamplingParams,
    options: RequestOptions,
    *,
    address: str | None,
    as_json: bool,
) -> int:
    connect(address, min_cpus=sum(m.num_cpus for m in config.members))
    coordinator = start_coordinator(config)

    async def run() -> tuple[str, str | None, list[Delta]]:
        if as_json:
            return await complete(coordinator, prompt, params, options)
        text, finish = "", None
        async for delta in stream(coordinator, prompt, params, options):
            print(delta.text, end="", flush=True)
            text += delta.text
            finish = delta.finish_reason
        print()
        return text, finish, []

    try:
        text, finish, deltas = asyncio.run(run())
    finally:
        ray.get(coordinator.shutdown.remote())
        ray.kill(coordinator)
    if as_json:
        from runtime.cli import _print_json

        steps = [d for delta in deltas for d in delta.diagnostics]
        last = deltas[-1] if deltas else None
        _print_json(
            config,
            text,
            finish or "",
            last.prompt_tokens if last else 0,
            last.completion_tokens if last else 0,
            steps,
        )
    sys.stdout.flush()
    return 0


__all__ = ["complete", "connect", "generate_on_cluster", "start_coordinator", "stream", "unwrap"]
