"""The coordinator: the step loop for many requests at once, over member actors.

It owns an `EnsembleCore` whose executor calls the member actors, one concurrent
round per phase; requests join and leave between steps; each caller receives its
text deltas from an async generator. It runs as a Ray actor (`CoordinatorActor`)
for the CLI and jobs, and embedded in each Serve replica, which saves a hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

from consort.actors.executors import make_executor, resolve_transport
from consort.actors.member import MemberActor
from consort.actors.metrics import EnsembleMetrics
from consort.actors.placement import Placement, from_current_group, reserve
from consort.runtime.config import EnsembleConfig
from consort.runtime.core import EnsembleCore, StepStats
from consort.runtime.errors import ConsortError, MemberLost, Overloaded
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.scoring import add_scoring, add_scoring_ids, per_main_token, per_token
from consort.runtime.types import Delta, MemberInfo, RequestOptions, TokenLogprob

log = logging.getLogger(__name__)

MEMBER_RESTARTS = 3
HEALTH_STATS_WAIT_S = 0.3  # how long /health waits for the members' own counters before using the last ones
PROFILE_RECENT_STEPS = 4096  # per-step records kept for `step_profile`; bounded, nobody may ever read them


@dataclass
class StepProfile:
    """The last steps one by one, for benchmarks: the loop's time, the fusion, each member's round
    trip and its own compute as it reports it; one step per record, so the prefill can be left out."""

    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=PROFILE_RECENT_STEPS))

    def add(self, seconds: float, stats: StepStats, compute: tuple[dict[str, float], dict[str, float]]) -> None:
        step_compute, invert_compute = compute
        self.recent.append(
            {
                "loop_seconds": seconds,
                "rounds": stats.rounds,  # round trips to the members this step
                "fusion_seconds": stats.fusion_seconds,
                "member_round_trip_seconds": dict(stats.member_seconds),
                "member_compute_seconds": step_compute,
                "invert_compute_seconds": invert_compute,
                # No step can be shorter than its slowest member's compute, then the inverse search after it.
                "critical_member_seconds": max(step_compute.values(), default=0.0)
                + max(invert_compute.values(), default=0.0),
            }
        )

    def summary(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}


class Coordinator:
    """Continuous batching over one ensemble's member actors."""

    def __init__(self, config: EnsembleConfig, *, in_serve_replica: bool = False, placement_timeout_s: float = 60.0) -> None:
        self.config = config
        self.placement: Placement = from_current_group(config) if in_serve_replica else reserve(config, placement_timeout_s)
        self.actors = {m.name: self._start_member(m.name) for m in config.members}
        infos: list[MemberInfo] = self._get([a.describe.remote() for a in self.actors.values()], 600.0)
        self.transport = resolve_transport(config.transport, self.placement.gpus)
        self.executor = make_executor(self.transport, self.actors, config.step_timeout_s, config.main_member)
        self.core = EnsembleCore(config, infos, self.executor)
        self._init_anchors(list(self.actors))
        if config.strategy != "vote":
            self.core.strategy(config.strategy)
        self.metrics = EnsembleMetrics(config.name)
        self._queues: dict[str, asyncio.Queue[Delta | BaseException]] = {}
        self._cancelled: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._profile = StepProfile()
        self._last_stats: dict[str, dict[str, Any]] = {}
        self._recovery: asyncio.Task[None] | None = None
        self.last_recovery_s: float | None = None  # how long the last restore of lost members took

    # -- members -------------------------------------------------------------------------------
    def _start_member(self, name: str) -> Any:
        member = next(m for m in self.config.members if m.name == name)
        gpus = self.placement.gpus
        options: dict[str, Any] = {
            "num_cpus": member.num_cpus,
            "num_gpus": member.num_gpus if gpus else 0,
            "max_restarts": MEMBER_RESTARTS,
            "max_task_retries": 0,  # a step is not idempotent: never replay it on a restarted member
            "scheduling_strategy": self.placement.strategy_for(name),
        }
        if gpus and "model_slot" in ray.cluster_resources():
            options["resources"] = {"model_slot": member.num_gpus}
        return ray.remote(MemberActor).options(**options).remote(self.config, name, gpus)

    @staticmethod
    def _get(refs: Any, timeout_s: float) -> Any:
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError as error:
            raise ConsortError(f"members did not start within {timeout_s:g} s") from error

    def _init_anchors(self, names: list[str]) -> None:
        deepen, anchors = self.config.deepen, self.core.ctx.anchors
        assert anchors is not None
        self._get(
            [
                self.actors[n].set_anchors.remote(
                    anchors[n], deepen.temperature, deepen.relative_top_k, n == self.core.ctx.main
                )
                for n in names
            ],
            600.0,
        )

    async def _recover(self, deadline_s: float = 300.0) -> None:
        """After a member died: wait until Ray has restarted it, then give it its anchors again."""
        deepen, anchors = self.config.deepen, self.core.ctx.anchors
        assert anchors is not None
        deadline = time.monotonic() + deadline_s
        for name in sorted(self.executor.lost):
            while True:
                ref = self.actors[name].set_anchors.remote(
                    anchors[name], deepen.temperature, deepen.relative_top_k, name == self.core.ctx.main
                )
                try:
                    await asyncio.wait_for(ref, timeout=max(1.0, deadline - time.monotonic()))
                    break
                except ActorUnavailableError:
                    # Restarting (reloading its model): ask again shortly.
                    if time.monotonic() > deadline:
                        raise MemberLost(name, f"not back after {deadline_s:g} s") from None
                    await asyncio.sleep(0.5)
                except (ActorDiedError, TimeoutError) as error:
                    raise MemberLost(name, f"could not be restarted: {type(error).__name__}") from error
            self.executor.lost.discard(name)
            log.warning("member %s is back after a restart", name)
        self.executor.reset()

    # -- requests ------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _admission(self, needed: int = 1) -> None:
        """What every way in (generate, score, echo) checks before it queues work: the loop runs, no
        member is being restored, and the request's sequences fit in the queue."""
        self._ensure_loop()
        self._check_available()
        self._check_capacity(needed)

    def _check_available(self) -> None:
        """While a lost member is being restored, new requests fail at once (503, Retry-After)."""
        if self.executor.lost:
            self._start_recovery()
            name = sorted(self.executor.lost)[0]
            raise MemberLost(name, "it is being restarted")

    def _start_recovery(self) -> None:
        """Restore lost members now, in the background: not when the next request happens to arrive."""
        if self.executor.lost and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.get_running_loop().create_task(self._recover_in_background())

    async def _recover_in_background(self) -> None:
        started = time.monotonic()
        try:
            await self._recover()
        except MemberLost as error:
            log.error("recovery failed (the next request tries again): %s", error)
            return
        self.last_recovery_s = time.monotonic() - started
        log.warning("ensemble recovered in %.1f s", self.last_recovery_s)

    def _check_capacity(self, needed: int = 1) -> None:
        """All of a request's sequences fit in the queue, or none is admitted (a vote needs one per answer)."""
        if len(self.core.waiting) + needed > self.config.max_queue:
            self.metrics.errors.inc(tags=self.metrics.tagged(type="overloaded"))
            raise Overloaded(f"{len(self.core.waiting)} requests are already waiting; retry shortly")

    async def generate(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> AsyncIterator[Delta]:
        """Admit one sequence and stream its deltas; leaving early frees it in every member."""
        self._admission(self.core.sequences_needed(options))
        seq_id = self.core.add(prompt, params, options)
        strategy = (options.strategy if options else None) or self.config.strategy
        self.metrics.requests.inc(tags=self.metrics.tagged(strategy=strategy))
        # aclosing: a caller that leaves frees its sequence now, not when the generator is collected.
        async with contextlib.aclosing(self._follow(seq_id, timed=True)) as deltas:
            async for delta in deltas:
                yield delta

    async def score(self, context: Prompt, continuation: str, options: RequestOptions | None = None) -> list[TokenLogprob]:
        """Log-probability of each piece of `continuation` (main member's tokens) after `context`, under the ensemble."""
        self._admission()
        seq_id = add_scoring(self.core, context, continuation, options)
        pieces = [lp async for delta in self._follow(seq_id, timed=False) for lp in delta.logprobs]
        return per_main_token(self.core, continuation, pieces)

    def room(self, prompt: Prompt) -> int:
        """Tokens every member's context leaves after `prompt` (the default chat max_tokens)."""
        return self.core.room(prompt)

    def tokenizer(self, member: str) -> tuple[Any, int]:
        """A member's tokenizer and its context length (the /tokenize and /detokenize routes)."""
        return self.core.members[member].tokenizer, self.core.ctx.max_context[member]

    async def prompt_logprobs(self, prompt_text: str, options: RequestOptions | None = None) -> list[TokenLogprob | None]:
        """`echo` + `logprobs`: the prompt's tokens with their log-probs under the ensemble (the first has none)."""
        main = self.core.ctx.main
        tokenizer = self.core.members[main].tokenizer
        ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            return [None] * len(ids)
        head = tokenizer.decode(ids[:1])
        self._admission()
        # One forward per member where that is exact; else piece by piece, like any scored text.
        seq_id = self.core.add_echo(head, prompt_text[len(head) :], options)
        if seq_id is None:
            return [None, *await self.score(Prompt(text=head), prompt_text[len(head) :], options)]
        return [None, *[lp async for delta in self._follow(seq_id, timed=False) for lp in delta.logprobs]]

    async def prompt_token_logprobs(
        self, vocab: str, ids: list[int], options: RequestOptions | None = None
    ) -> list[TokenLogprob | None]:
        """`echo` + `logprobs` of a prompt given as token ids of member `vocab`'s vocabulary: one entry per
        id the client sent, the ids scored as they are (the first has none)."""
        if len(ids) < 2:
            return [None] * len(ids)
        self._admission()
        # One forward per member where that is exact; else piece by piece, regrouped into the client's ids.
        seq_id = self.core.add_echo_ids(vocab, ids, options)
        if seq_id is not None:
            return [None, *[lp async for delta in self._follow(seq_id, timed=False) for lp in delta.logprobs]]
        seq_id = add_scoring_ids(self.core, vocab, ids, options)
        pieces = [lp async for delta in self._follow(seq_id, timed=False) for lp in delta.logprobs]
        table = self.core.ctx.table(vocab)
        return [None, *per_token(pieces, [table.token_bytes(i) for i in ids[1:]])]

    async def _follow(self, seq_id: str, *, timed: bool) -> AsyncIterator[Delta]:
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._queues[seq_id] = queue
        assert self._wake is not None
        self._wake.set()
        started, last, finished = time.perf_counter(), None, False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if timed:
                    now = time.perf_counter()
                    if last is None:
                        self.metrics.ttft.observe(now - started, tags=self.metrics.tags)
                    else:
                        self.metrics.itl.observe(now - last, tags=self.metrics.tags)
                    last = now
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(seq_id, None)
            if not finished:
                self._cancelled.add(seq_id)
                if self._wake is not None:
                    self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.core.has_work or self._cancelled:
                if self._cancelled:
                    cancelled, self._cancelled = self._cancelled, set()
                    await self._abort(cancelled)
                if not self.core.has_work:
                    break
                try:
                    await self._step_once()
                except Exception as error:  # this loop serves every request: it must not die
                    log.exception("ensemble loop iteration failed")
                    self._fail_running(error, waiting_too=True)
            await self._release_if_idle()

    async def _release_if_idle(self) -> None:
        try:
            await self.core.release_if_idle()
        except MemberLost as error:
            log.warning("while freeing finished sequences: %s", error)

    async def _abort(self, seq_ids: set[str]) -> None:
        try:
            await self.core.abort(list(seq_ids))
        except MemberLost as error:
            log.warning("while cancelling: %s", error)

    async def _step_once(self) -> None:
        if self.executor.lost:
            self._start_recovery()
            assert self._recovery is not None
            await asyncio.shield(self._recovery)
            if self.executor.lost:
                self._fail_running(MemberLost(sorted(self.executor.lost)[0], "it could not be restarted"), waiting_too=True)
                return
        self.metrics.queue_depth.set(len(self.core.waiting), tags=self.metrics.tags)
        self.executor.take_compute()  # a failed step's leftovers must not count towards this one
        started = time.perf_counter()
        try:
            deltas = await self.core.step()
        except MemberLost as error:
            self._fail_running(error)
            self._start_recovery()
            return
        except Exception as error:
            log.exception("ensemble step failed")
            self._fail_running(error)
            return
        self._profile.add(time.perf_counter() - started, self.core.last_stats, self.executor.take_compute())
        self._record(deltas)
        for delta in deltas:
            queue = self._queues.get(delta.seq_id)
            if queue is not None:
                queue.put_nowait(delta.error if delta.error is not None else delta)

    def _fail_running(self, error: BaseException, *, waiting_too: bool = False) -> None:
        """Fail the requests a broken step held (and the waiting ones): each caller gets `error`."""
        kind = "member_lost" if isinstance(error, MemberLost) else "internal"
        for caller in self.core.fail(waiting_too=waiting_too):
            self.metrics.errors.inc(tags=self.metrics.tagged(type=kind))
            queue = self._queues.get(caller)
            if queue is not None:
                queue.put_nowait(error)

    def _record(self, deltas: list[Delta]) -> None:
        stats = self.core.last_stats
        tags = self.metrics.tags
        if stats.sequences:  # Ray counters refuse increments of zero (a step that only ran echoes)
            self.metrics.steps.inc(stats.sequences, tags=tags)
        if stats.fused:
            self.metrics.fused_steps.inc(stats.fused, tags=tags)
        for member, count in stats.draws.items():
            self.metrics.draws.inc(count, tags=self.metrics.tagged(member=member))
        for member, seconds in stats.member_seconds.items():
            self.metrics.member_step.observe(seconds, tags=self.metrics.tagged(member=member))
        self.metrics.fusion.observe(stats.fusion_seconds, tags=tags)
        if deltas:  # Ray counters refuse increments of zero (a vote holds its answers back until all are in)
            self.metrics.tokens.inc(len(deltas), tags=tags)
        for delta in deltas:
            for note in delta.diagnostics:
                for member in note.get("route", {}).get("members", []):
                    self.metrics.routed.inc(tags=self.metrics.tagged(member=member))
        self.metrics.running.set(len(self.core.running), tags=tags)

    # -- introspection (tests, benchmarks, health) --------------------------------------------
    async def member_stats(self) -> dict[str, dict[str, float]]:
        names = list(self.actors)
        stats = await asyncio.gather(*(self.actors[n].stats.remote() for n in names))
        return dict(zip(names, stats, strict=True))

    async def member_nodes(self) -> dict[str, dict[str, str]]:
        names = list(self.actors)
        nodes = await asyncio.gather(*(self.actors[n].node.remote() for n in names))
        return dict(zip(names, nodes, strict=True))

    async def health(self) -> dict[str, Any]:
        """Whether every member is alive, without waiting behind the work (a probe must answer in < 1 s).

        Liveness comes from Ray's actor table (GCS), not from the members, whose calls queue
        behind their steps; their own counters are included when they answer within
        HEALTH_STATS_WAIT_S, else the last ones they gave (`fresh: false`).
        """
        states = await asyncio.to_thread(self._member_states)
        stats = await self._member_stats_within(HEALTH_STATS_WAIT_S)
        members = {name: {**stats.get(name, {}), "state": states[name]} for name in self.actors}
        return {
            "ready": all(state == "ALIVE" for state in states.values()) and not self.executor.lost,
            "members": members,
            "recovering": sorted(self.executor.lost),
            "waiting": len(self.core.waiting),
            "running": len(self.core.running),
            "transport": self.transport,
        }

    def _member_states(self) -> dict[str, str]:
        """Each member actor's state in Ray's actor table: ALIVE, RESTARTING, DEAD, ... (one GCS query)."""
        from ray._private import state as ray_state  # the GCS actor table; ray.util.state needs the dashboard

        states = {}
        for name, actor in self.actors.items():
            entry = ray_state.actors(actor_id=actor._actor_id.hex())
            states[name] = str(entry.get("State", "UNKNOWN")) if entry else "UNKNOWN"
        return states

    async def _member_stats_within(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        names = list(self.actors)
        calls = {name: asyncio.ensure_future(self._stats_of(name)) for name in names}
        await asyncio.wait(calls.values(), timeout=timeout_s)
        for name, call in calls.items():
            if call.done() and call.exception() is None:
                self._last_stats[name] = {**call.result(), "fresh": True}
            else:
                call.cancel()
                self._last_stats[name] = {**self._last_stats.get(name, {}), "fresh": False}
        return dict(self._last_stats)

    async def _stats_of(self, name: str) -> dict[str, Any]:
        return await self.actors[name].stats.remote()

    def step_profile(self) -> dict[str, Any]:
        """Where each step since the last call spent its time, one record a step (benchmarks); starts afresh."""
        profile, self._profile = self._profile, StepProfile()
        return profile.summary()

    def member_actor(self, name: str) -> Any:
        return self.actors[name]

    def shutdown(self) -> None:
        self.executor.close()
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.placement.remove()


@ray.remote(num_cpus=0, max_concurrency=1000)
class CoordinatorActor(Coordinator):
    """The coordinator as a Ray actor: `generate` streams deltas as an ObjectRefGenerator."""
