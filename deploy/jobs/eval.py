"""`consort eval` / `python -m consort.deploy.jobs.eval`: benchmarks of each member alone and each strategy.

    consort eval --task arc_easy --limit 200 --strategies mean,deepen,me,vote --out results/arc --local
    ray job submit --working-dir . -- python -m consort.deploy.jobs.eval --tasks arc_easy,piqa --replicas 2 --out /results/x

The evaluation itself (arguments, tasks, question runners, calibration, report) is
Ray-free and lives in `consort.runtime.evaluation`; this module is its entry
point and holds what needs Ray. Without `--local` the job runs as a Ray driver
(inside `ray job submit`, or against `--address`): `--replicas` ensemble replicas
(a coordinator actor and its members, one placement group each, `RayBackend`)
take chunks of questions from a shared queue.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from consort.runtime.config import EnsembleConfig
from consort.runtime.evaluation import job
from consort.runtime.evaluation.backend import Backend
from consort.runtime.evaluation.batches import GenerationRequest, request_slots
from consort.runtime.evaluation.logliks import Loglik, LoglikRequest, continuation_ids, member_logliks
from consort.runtime.prompts import Prompt
from consort.runtime.types import Completion, MemberInfo, RequestOptions
from consort.runtime.vocab import TokenTable


class RayBackend:
    """One ensemble replica on Ray: a coordinator actor and its member actors (one placement group).

    Ensemble scoring and generation go through the coordinator, which batches
    concurrent requests; the members-alone fast path calls the member actors
    directly (the coordinator has no echo call), by plain actor calls.
    """

    chat_prompts = True  # chat tasks are rendered with each member's own template (GenerationRequest.as_prompt)

    def __init__(self, coordinator: Any, config: EnsembleConfig) -> None:
        import ray

        from consort.actors.executors import ActorCallExecutor

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
        from consort.actors.client import start_coordinator

        return cls(start_coordinator(config), config)

    @property
    def tables(self) -> dict[str, TokenTable]:
        return {name: info.table for name, info in self.members.items()}

    async def member_logliks(
        self,
        member: str,
        requests: Sequence[LoglikRequest],
        prefixes: Sequence[list[tuple[int, bytes]]] | None = None,
    ) -> list[Loglik]:
        return await member_logliks(
            self.executor, self.members[member], requests, max_batch=self.config.max_batch, prefixes=prefixes
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

        from consort.actors.client import unwrap

        try:
            pieces = await self.coordinator.score.remote(Prompt(text=request.context), request.continuation, options)
        except RayTaskError as error:
            raise unwrap(error) from error
        values = tuple(p.logprob for p in pieces)
        return Loglik(logprob=sum(values), tokens=len(values), token_logprobs=values)

    async def ensemble_logliks(
        self, requests: Sequence[LoglikRequest], options: Sequence[RequestOptions]
    ) -> list[list[Loglik]]:
        pairs = [(r, o) for o in options for r in requests]
        main = self.members[self.config.main_member].tokenizer
        sizes = [len(continuation_ids(main, r.continuation)) for r, _ in pairs]
        out: list[Loglik | None] = [None] * len(pairs)
        for wave in self._waves(sizes, [1] * len(pairs)):
            results = await asyncio.gather(*(self._score(*pairs[i]) for i in wave))
            for i, result in zip(wave, results, strict=True):
                out[i] = result
        n = len(requests)
        done = [o for o in out if o is not None]
        return [done[k * n : (k + 1) * n] for k in range(len(options))]

    async def _complete(self, request: GenerationRequest) -> Completion:
        from consort.actors.client import complete

        return await complete(self.coordinator, request.as_prompt(), request.params, request.options)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        slots = [request_slots(self.config, r.options) for r in requests]
        out: list[Completion | None] = [None] * len(requests)
        for wave in self._waves([len(r.prompt) for r in requests], slots):
            results = await asyncio.gather(*(self._complete(requests[i]) for i in wave))
            for i, result in zip(wave, results, strict=True):
                out[i] = result
        return [o for o in out if o is not None]

    def close(self) -> None:
        import ray

        ray.get(self.coordinator.shutdown.remote())
        ray.kill(self.coordinator)


def start_replicas(config: EnsembleConfig, args: argparse.Namespace) -> list[Backend]:
    """Connect to Ray and start `--replicas` ensemble replicas (all or none: a failed start stops the others)."""
    from consort.actors.client import connect

    # Inside `ray job submit` the supervisor sets RAY_ADDRESS: join that cluster, never start one.
    connect(args.address or os.environ.get("RAY_ADDRESS"))
    backends: list[Backend] = []
    try:
        for _ in range(args.replicas):
            backends.append(RayBackend.start(config))
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return backends


def main(argv: Sequence[str] | None = None) -> int:
    """`consort eval`: the Ray-free job (`consort.runtime.evaluation.job`) with Ray replicas unless `--local`."""
    return job.main(argv, remote=start_replicas)


if __name__ == "__main__":
    sys.exit(main())
