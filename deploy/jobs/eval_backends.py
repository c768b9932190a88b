"""Where an evaluation runs: one ensemble in this process (`--local`), or ensemble replicas on Ray.

Both expose the same three calls, so the question logic (`eval_questions`) does
not know which one it talks to:

* `member_logliks`: a member alone, by the fast echo path (two member steps per batch);
* `ensemble_logliks`: teacher-forced scoring under the ensemble, several option sets at once;
* `generate`: complete prompts (members alone, token-level strategies, votes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from runtime import scoring
from runtime.config import EnsembleConfig
from runtime.core import MemberInfo, RequestOptions
from runtime.loop import EnsembleLoop
from runtime.prompts import Prompt
from runtime.scoring import CoreOutcome, GenerationRequest, Loglik, LoglikRequest


class Backend(Protocol):
    """One ensemble replica, as the evaluation sees it."""

    config: EnsembleConfig

    async def member_logliks(self, member: str, requests: Sequence[LoglikRequest]) -> list[Loglik]: ...

    async def ensemble_logliks(
        self, requests: Sequence[LoglikRequest], options: Sequence[RequestOptions]
    ) -> list[list[Loglik]]: ...

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[CoreOutcome]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The ensemble in this process: the core is stepped directly, so its batches are this job's batches."""

    def __init__(self, loop: EnsembleLoop) -> None:
        self.loop = loop
        self.core = loop.core
        self.config = loop.config

    @classmethod
    def start(cls, config: EnsembleConfig) -> LocalBackend:
        return cls(EnsembleLoop.from_config(config))

    async def member_logliks(self, member: str, requests: Sequence[LoglikRequest]) -> list[Loglik]:
        return await scoring.member_logliks(
            self.core.executor, self.core.members[member], requests, max_batch=self.config.max_batch
        )

    async def ensemble_logliks(
        self, requests: Sequence[LoglikRequest], options: Sequence[RequestOptions]
    ) -> list[list[Loglik]]:
        return await scoring.ensemble_logliks(self.core, requests, options)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[CoreOutcome]:
        return await scoring.generate(self.core, requests)

    def close(self) -> None:
        """Nothing to release: the models go with the process."""


class RayBackend:
    """One ensemble replica on Ray: a coordinator actor and its member actors (one placement group).

    Ensemble scoring and generation go through the coordinator, which batches
    concurrent requests; the members-alone fast path calls the member actors
    directly (the coordinator has no echo call), by plain actor calls.
    """

    def __init__(self, coordinator: Any, config: EnsembleConfig) -> None:
        import ray

        from actors.executors import ActorCallExecutor

        self.coordinator = coordinator
        self.config = config
        names = [m.name for m in config.members]
        actors = {n: ray.get(coordinator.member_actor.remote(n)) for n in names}
        infos: list[MemberInfo] = ray.get([actors[n].describe.remote() for n in names])
        self.members = {info.name: info for info in infos}
        # Plain calls: the coordinator's compiled graph belongs to its process; these calls run beside it.
        self.executor = ActorCallExecutor(actors, config.step_timeout_s)

    @classmethod
    def start(cls, config: EnsembleConfig) -> RayBackend:
        from actors.client import start_coordinator

        return cls(start_coordinator(config), config)

    async def member_logliks(self, member: str, requests: Sequence[LoglikRequest]) -> list[Loglik]:
        return await scoring.member_logliks(
            self.executor, self.members[member], requests, max_batch=self.config.max_batch
        )

    def _waves(self, sizes: Sequence[int], slots: Sequence[int]) -> list[list[int]]:
        """Indices in waves of at most one batch, similar sizes together (the coordinator batches each wave)."""
        order = sorted(range(len(sizes)), key=lambda i: sizes[i])
        waves: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i in order:
            if current and used + slots[i] > self.config.max_batch:
                waves.append(current)
                current, used = [], 0
            current.append(i)
            used += slots[i]
        if current:
            waves.append(current)
        return waves

    async def _score(self, request: LoglikRequest, options: RequestOptions) -> Loglik:
        from ray.exceptions import RayTaskError

        from actors.client import unwrap

        try:
            pieces = await self.coordinator.score.remote(
                Prompt(text=request.context), request.continuation, options
            )
        except RayTaskError as error:
            raise unwrap(error) from error
        values = tuple(p.logprob for p in pieces)
        return Loglik(logprob=sum(values), tokens=len(values), token_logprobs=values)

    async def ensemble_logliks(
        self, requests: Sequence[LoglikRequest], options: Sequence[RequestOptions]
    ) -> list[list[Loglik]]:
        pairs = [(r, o) for o in options for r in requests]
        main = self.members[self.config.main_member].tokenizer
        sizes = [len(scoring.continuation_ids(main, r.continuation)) for r, _ in pairs]
        out: list[Loglik | None] = [None] * len(pairs)
        for wave in self._waves(sizes, [1] * len(pairs)):
            results = await asyncio.gather(*(self._score(*pairs[i]) for i in wave))
            for i, result in zip(wave, results, strict=True):
                out[i] = result
        n = len(requests)
        done = [o for o in out if o is not None]
        return [done[k * n : (k + 1) * n] for k in range(len(options))]

    async def _complete(self, request: GenerationRequest) -> CoreOutcome:
        from actors.client import complete

        text, finish, deltas = await complete(
            self.coordinator, Prompt(text=request.prompt), request.params, request.options
        )
        last = deltas[-1] if deltas else None
        return CoreOutcome(
            text=text,
            finish_reason=finish,
            completion_tokens=last.completion_tokens if last else 0,
            diagnostics=[d for delta in deltas for d in delta.diagnostics],
        )

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[CoreOutcome]:
        samples = self.config.vote.samples
        slots = [
            (r.options.vote_samples or samples)
            if (r.options.strategy or self.config.strategy) == "vote"
            else 1
            for r in requests
        ]
        out: list[CoreOutcome | None] = [None] * len(requests)
        for wave in self._waves([len(r.prompt) for r in requests], slots):
            results = await asyncio.gather(*(self._complete(requests[i]) for i in wave))
            for i, result in zip(wave, results, strict=True):
                out[i] = result
        return [o for o in out if o is not None]

    def close(self) -> None:
        import ray

        ray.get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator)
