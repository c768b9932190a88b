"""Running several sequences of one request: start them together, then merge or collect their deltas.

Admission errors (overload, a prompt too long, an unknown strategy) surface at
a coordinator stream's first step, so every stream is *primed* (its first delta
awaited) before the HTTP response starts: such errors then get their own status
code (429, 400) instead of appearing inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Completion, Delta, RequestOptions, TokenLogprob


class Engine(Protocol):
    """What the HTTP layer needs of a coordinator (actors.coordinator.Coordinator satisfies it)."""

    def generate(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> AsyncIterator[Delta]:
        """Admit one sequence and stream its deltas (admission errors surface at the first one)."""
        ...

    def room(self, prompt: Prompt) -> int:
        """Tokens every member's context leaves after `prompt`, capped: the default chat max_tokens."""
        ...

    async def prompt_logprobs(self, prompt_text: str, options: RequestOptions | None = None) -> list[TokenLogprob | None]:
        """`echo` with `logprobs`: each prompt token with its log-probability (the first has none)."""
        ...

    async def prompt_token_logprobs(
        self, vocab: str, ids: list[int], options: RequestOptions | None = None
    ) -> list[TokenLogprob | None]:
        """`echo` with `logprobs` of a prompt given as token ids of member `vocab`'s vocabulary: one entry
        per id, the ids scored as they are (the first has none)."""
        ...

    def tokenizer(self, member: str) -> tuple[Any, int]:
        """A member's tokenizer and its context length (the tokenizer routes)."""
        ...


@dataclass
class Job:
    """One sequence of a request: its choice index and what to run."""

    index: int
    prompt: Prompt
    params: SamplingParams
    options: RequestOptions


@dataclass
class Primed:
    """A started stream and the first delta it produced."""

    index: int
    first: Delta
    rest: AsyncIterator[Delta]

    async def aclose(self) -> None:
        aclose: Callable[[], object] | None = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()  # type: ignore[misc]


async def _prime(engine: Engine, job: Job) -> Primed:
    stream = engine.generate(job.prompt, job.params, job.options)
    try:
        first = await anext(stream)
    except BaseException:
        # Free the sequence if it was admitted; aclose refuses only a generator that is still running.
        with contextlib.suppress(RuntimeError):
            await stream.aclose()  # type: ignore[attr-defined]
        raise
    return Primed(job.index, first, stream)


async def prime_all(engine: Engine, jobs: list[Job]) -> list[Primed]:
    """Start every job at once (they batch together); if one fails, stop the others and raise its error.

    The first failure ends the wait: a job still waiting for its first delta (a vote's comes only when
    all its answers are done) is cancelled rather than awaited, so an overloaded request gets its 429
    at once and the sequences already admitted for it are freed instead of run to their end.
    """
    if len(jobs) == 1:
        return [await _prime(engine, jobs[0])]
    tasks = [asyncio.create_task(_prime(engine, j)) for j in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # Reached with tasks pending only on a failure (or when this request itself is cancelled).
        for task in tasks:
            task.cancel()  # a pending prime closes its stream as it unwinds, which frees its sequence
        await asyncio.gather(*tasks, return_exceptions=True)
    failure = next((t.exception() for t in tasks if not t.cancelled() and t.exception() is not None), None)
    started = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
    if failure is not None:
        await asyncio.gather(*(p.aclose() for p in started))
        raise failure
    return started


async def _one(primed: Primed) -> AsyncIterator[tuple[int, Delta]]:
    yield primed.index, primed.first
    if primed.first.finish_reason is not None:
        return
    async for delta in primed.rest:
        yield primed.index, delta


async def merge(streams: list[Primed]) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) as they come from all streams; closing this closes them all."""
    if len(streams) == 1:
        # The common case takes no task or queue hop per token.
        try:
            async for item in _one(streams[0]):
                yield item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()

    async def pump(primed: Primed) -> None:
        try:
            async for item in _one(primed):
                queue.put_nowait(item)
        except Exception as error:  # handed to the consumer, which re-raises it
            queue.put_nowait(error)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(p)) for p in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # cancelling a pump leaves its coordinator stream, which frees the sequence
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.aclose() for p in streams))


async def collect(streams: list[Primed]) -> dict[int, Completion]:
    """Run every stream to its end: each choice index's completion, in choice order."""
    done = {p.index: Completion() for p in sorted(streams, key=lambda p: p.index)}
    async for index, delta in merge(streams):
        done[index].add(delta)
    return done
