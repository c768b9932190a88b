"""Talking to a coordinator actor from a driver: the command line's cluster mode, jobs, benchmarks."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayTaskError

from consort.runtime.config import EnsembleConfig
from consort.runtime.errors import ConsortError
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Completion, Delta, RequestOptions


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
    from consort.actors.coordinator import CoordinatorActor

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
) -> Completion:
    completion = Completion()
    async for delta in stream(coordinator, prompt, params, options):
        completion.add(delta)
    return completion


__all__ = ["complete", "connect", "start_coordinator", "stream", "unwrap"]
