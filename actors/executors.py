"""How the coordinator reaches its member actors each round: plain actor calls, or a compiled graph.

Both send each member one `MemberCall` per round and get one `MemberAnswer` back;
both bound every wait by the configured timeout and turn a dead or silent member
into `MemberLost` naming it. Under `deepen` the main member also gets the other
members' answers of the same round, member to member (plain calls: their object
refs in its call; the graph: its `finish` task reads their channels), and runs the
inverse search within the round: one round trip per step for every strategy. The compiled graph (as vLLM's Ray executor uses)
replaces a Ray task submission per member (~1 ms each, and CPU time in the
coordinator) with writes to shared-memory channels the members' graph threads
read: ~0.4 ms a round on a 2-core machine, against ~2 ms; its readers spin, so
`auto` uses it only for members on GPUs (`resolve_transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from ray.exceptions import RayActorError, RayTaskError

from consort.actors.member import MemberAnswer, MemberCall
from consort.runtime.errors import ConsortError, MemberLost
from consort.runtime.types import InvertWork, MemberReply, SeqWork
from consort.runtime.worker import inverting_member

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # how long a member may take to say whether it is alive after a failed round
WATCH_S = 0.5  # how often a compiled-graph round in progress checks that the graph is still whole


class GraphFailed(RuntimeError):
    """The compiled graph broke down under a round (a member's graph task ended)."""


class MemberExecutor:
    """What both transports share: member compute accounting and the set of lost members."""

    def __init__(self, actors: dict[str, Any], timeout_s: float) -> None:
        self.actors = actors
        self.timeout_s = timeout_s
        self.lost: set[str] = set()
        # Seconds each member computed in the current step (as it reports), kept apart from the round trip.
        self.step_compute: dict[str, float] = {}
        self.invert_compute: dict[str, float] = {}

    def take_compute(self) -> tuple[dict[str, float], dict[str, float]]:
        """This step's member compute (step calls, inverse searches), and start the next step's."""
        taken = self.step_compute, self.invert_compute
        self.step_compute, self.invert_compute = {}, {}
        return taken

    def _account(self, member: str, answer: MemberAnswer) -> None:
        if answer.step_seconds:
            self.step_compute[member] = self.step_compute.get(member, 0.0) + answer.step_seconds
        if answer.invert_seconds:
            self.invert_compute[member] = self.invert_compute.get(member, 0.0) + answer.invert_seconds

    async def _round(
        self, calls: Mapping[str, MemberCall], inverting: str | None = None
    ) -> dict[str, tuple[MemberAnswer, float]]:
        """One round; `inverting`: the member (the main one, under `deepen`) that must get the
        others' answers of this round for its inverse search."""
        raise NotImplementedError

    async def step(
        self, works: Mapping[str, list[SeqWork]], release: Mapping[str, list[str]] | None = None
    ) -> dict[str, MemberReply]:
        release = release or {}
        answers = await self._round(
            {member: MemberCall(step=w, release=list(release.get(member, ()))) for member, w in works.items()},
            inverting_member(works),
        )
        replies = {}
        for member, (answer, seconds) in answers.items():
            assert answer.results is not None
            replies[member] = MemberReply(answer.results, seconds)
        return replies

    async def invert(self, member: str, works: list[InvertWork], steps: int, learning_rate: float) -> list[torch.Tensor]:
        call = MemberCall(invert=works, invert_steps=steps, invert_learning_rate=learning_rate)
        answer, _ = (await self._round({member: call}))[member]
        assert answer.inverted is not None
        return [torch.tensor(out) for out in answer.inverted]

    async def release(self, seq_ids: Mapping[str, list[str]]) -> None:
        calls = {m: MemberCall(release=list(ids)) for m, ids in seq_ids.items() if m not in self.lost and ids}
        if calls:
            await self._round(calls)

    def reset(self) -> None:
        """After lost members came back: the next round may use them again."""

    def close(self) -> None:
        """Release what the transport holds (the compiled graph's channels)."""


class ActorCallExecutor(MemberExecutor):
    """One Ray actor call per member per round. Under `deepen` the main member's call carries the
    object refs of the others' calls of the same round: it fetches their answers itself, after its
    own forward, and runs the inverse search; the round stays one round."""

    async def _call(self, member: str, call: MemberCall) -> tuple[MemberAnswer, float]:
        started = time.perf_counter()
        try:
            ref = self.actors[member].call.remote(call)
        except RayActorError as error:
            self.lost.add(member)
            raise MemberLost(member, type(error).__name__) from error
        return await self._wait(member, ref, started)

    async def _wait(self, member: str, ref: Any, started: float) -> tuple[MemberAnswer, float]:
        try:
            answer: MemberAnswer = await asyncio.wait_for(ref, timeout=self.timeout_s)
        except TimeoutError as error:
            self.lost.add(member)
            raise MemberLost(member, f"no answer within {self.timeout_s:g} s") from error
        except RayActorError as error:
            self.lost.add(member)
            raise MemberLost(member, type(error).__name__) from error
        self._account(member, answer)
        return answer, time.perf_counter() - started

    async def _round(
        self, calls: Mapping[str, MemberCall], inverting: str | None = None
    ) -> dict[str, tuple[MemberAnswer, float]]:
        names = list(calls)
        if inverting is None:
            answers = await asyncio.gather(*(self._call(name, calls[name]) for name in names))
            return dict(zip(names, answers, strict=True))
        peers = [name for name in names if name != inverting]
        started = time.perf_counter()
        refs = {}
        for name in peers:
            try:
                refs[name] = self.actors[name].call.remote(calls[name])
            except RayActorError as error:
                self.lost.add(name)
                raise MemberLost(name, type(error).__name__) from error
        main_started = time.perf_counter()
        main_ref = self.actors[inverting].call.remote(dataclasses.replace(calls[inverting], peers=dict(refs)))
        # The peers first: the main member's call waits on them, so a failed or silent peer would
        # look like a failed main member; it is the peer that is lost. The main member's wait starts
        # once they answered (its call has run beside theirs meanwhile).
        got = await asyncio.gather(*(self._wait(name, refs[name], started) for name in peers))
        out = dict(zip(peers, got, strict=True))
        out[inverting] = await self._wait(inverting, main_ref, main_started)
        return {name: out[name] for name in names}


class CompiledGraphExecutor(MemberExecutor):
    """One compiled-graph execution per round: every member's `call` reads its argument from a channel.

    The graph is compiled on the first round, inside the event loop that awaits it (its
    reader is an asyncio task). A round that fails or times out leaves the graph unusable
    (a late answer would be read as the next round's): it is dropped at once, so the
    failure reaches the callers in seconds, and torn down in `reset`, once the lost
    members are back (Ray's own failure monitor may be tearing it down meanwhile; tearing
    down waits on a call into every member, which a restarting member answers only late).
    """

    def __init__(self, actors: dict[str, Any], timeout_s: float, main: str | None = None) -> None:
        super().__init__(actors, timeout_s)
        self.names = list(actors)
        # The member whose `finish` task reads the others' answers of the round (DeePEn's inverse
        # search within the step); None: no such task, and no round may ask for one.
        self.main = main if len(self.names) > 1 else None
        self._graph: Any = None
        self._failed: Any = None
        self._pids: dict[str, int] = {}

    def _compile(self) -> Any:
        import ray
        from ray.dag import InputNode, MultiOutputNode

        self._pids = dict(zip(self.names, ray.get([self.actors[n].pid.remote() for n in self.names]), strict=True))
        with InputNode() as inputs:
            nodes = {name: self.actors[name].call.bind(inputs[i]) for i, name in enumerate(self.names)}
            if self.main is not None:
                # The main member's second task reads its own answer and the others' from their
                # channels (member to member): DeePEn's inverse search in the same execution.
                main, peers = self.main, [nodes[name] for name in self.names if name != self.main]
                nodes[main] = self.actors[main].finish.bind(inputs[self.names.index(main)], nodes[main], *peers)
            outputs = MultiOutputNode([nodes[name] for name in self.names])
        return outputs.experimental_compile(enable_asyncio=True)

    async def _round(
        self, calls: Mapping[str, MemberCall], inverting: str | None = None
    ) -> dict[str, tuple[MemberAnswer, float]]:
        if self.lost:
            raise MemberLost(sorted(self.lost)[0], "not back yet")
        if inverting is not None and inverting != self.main:
            raise ConsortError(
                f"member {inverting!r} is asked for the inverse search, but the compiled graph passes the "
                f"other members' answers to {self.main!r} only"
            )
        if self._graph is None:
            self._teardown_failed()
            self._graph = self._compile()
        started = time.perf_counter()
        try:
            answers = await self._execute([calls.get(name) for name in self.names])
        except RayTaskError:
            raise  # the member's own error (the graph goes on): the step fails, not the member
        except TimeoutError as error:
            self._drop()
            slow = await self._find_slow()
            if slow is None:
                raise ConsortError(
                    f"the members' compiled graph gave no answer within {self.timeout_s:g} s, though no member "
                    "is busy or lost; it is compiled afresh for the next step"
                ) from error
            raise MemberLost(slow, f"no answer within {self.timeout_s:g} s") from error
        except Exception as error:  # a channel closed, an actor died: which one, only asking tells
            self._drop()
            lost = await self._find_lost()
            if not lost:
                raise ConsortError(f"the members' compiled graph failed ({type(error).__name__}: {error})") from error
            raise MemberLost(lost[0], f"its compiled-graph channel failed ({type(error).__name__})") from error
        seconds = time.perf_counter() - started
        out = {}
        for name, answer in zip(self.names, answers, strict=True):
            if name in calls:
                self._account(name, answer)
                out[name] = (answer, seconds)
        return out

    async def _execute(self, calls: list[MemberCall | None]) -> list[MemberAnswer]:
        """One execution, watched: a member's death ends Ray's monitor thread of the graph, but does
        not always reach the awaiting future (Ray's teardown cancels the reader task from another
        thread), so every WATCH_S the wait checks the monitor and asks Ray whether a member died,
        instead of waiting out the timeout."""
        graph = self._graph
        deadline = time.monotonic() + self.timeout_s
        futures = await asyncio.wait_for(graph.execute_async(*calls), timeout=self.timeout_s)
        answers = asyncio.ensure_future(asyncio.gather(*futures))
        try:
            while True:
                done, _ = await asyncio.wait({answers}, timeout=min(WATCH_S, max(0.0, deadline - time.monotonic())))
                if done:
                    return list(answers.result())
                monitor = getattr(graph, "_monitor", None)  # Ray's thread that tears the graph down on a failure
                if monitor is not None and not monitor.is_alive():
                    raise GraphFailed("a member's compiled-graph task ended")
                if await self._any_dead():
                    raise GraphFailed("a member died under the round")
                if time.monotonic() >= deadline:
                    raise TimeoutError
        finally:
            if not answers.done():
                answers.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answers  # collected, so asyncio does not report it as never retrieved

    async def _any_dead(self) -> bool:
        """Whether Ray says a member died or restarted. A member too busy to answer in time is not
        dead: only the step timeout may call it lost (its `pid` runs beside the graph's thread)."""
        probes = {name: self.actors[name].pid.remote() for name in self.names}
        for name, probe in probes.items():
            try:
                pid = await asyncio.wait_for(probe, timeout=WATCH_S)
            except RayActorError:
                return True
            except TimeoutError:
                continue
            if pid != self._pids.get(name):
                return True
        return False

    def _drop(self) -> None:
        self._failed, self._graph = self._graph, None

    def _teardown_failed(self) -> None:
        failed, self._failed = self._failed, None
        if failed is not None:
            try:
                failed.teardown()
            except Exception:  # a graph whose member died may fail to tear down; it is gone either way
                log.warning("teardown of a failed compiled graph raised", exc_info=True)

    async def _find_lost(self) -> list[str]:
        """Members that died (restarting, gone, or with a new process since the graph was compiled)."""
        lost = []
        for name in self.names:
            try:
                pid = await asyncio.wait_for(self.actors[name].pid.remote(), timeout=PROBE_TIMEOUT_S)
            except (RayActorError, TimeoutError):
                lost.append(name)
                continue
            if pid != self._pids.get(name):
                lost.append(name)
        self.lost.update(lost)
        return lost

    async def _find_slow(self) -> str | None:
        """The member still inside its call (the one to blame for a timeout), else the first lost one."""
        for name in self.names:
            try:
                busy = await asyncio.wait_for(self.actors[name].busy_for.remote(), timeout=PROBE_TIMEOUT_S)
            except (RayActorError, TimeoutError):
                self.lost.add(name)
                return name
            if busy is not None:
                self.lost.add(name)
                return name
        lost = await self._find_lost()
        return lost[0] if lost else None

    async def release(self, seq_ids: Mapping[str, list[str]]) -> None:
        if not self.lost:
            await super().release(seq_ids)
            return
        # While a member is lost the graph is down: the live members free their state by plain calls.
        calls = [
            self.actors[m].call.remote(MemberCall(release=list(ids)))
            for m, ids in seq_ids.items()
            if m not in self.lost and ids
        ]
        await asyncio.wait_for(asyncio.gather(*calls), timeout=self.timeout_s)

    def reset(self) -> None:
        self._teardown_failed()

    def close(self) -> None:
        self._drop()
        self._teardown_failed()


def resolve_transport(transport: str, gpus: bool) -> str:
    """`auto`: the compiled graph for members on GPUs, plain calls for members on CPUs.

    A compiled graph's readers spin on their channels (sched_yield in Ray's ReadAcquire):
    measured here, each member and the coordinator burn ~0.65 of a core while idle. A GPU
    node has those cores to spare; on CPUs they are the cores the members compute on.
    """
    if transport != "auto":
        return transport
    return "compiled_graph" if gpus else "actor_calls"


def make_executor(transport: str, actors: dict[str, Any], timeout_s: float, main: str | None = None) -> MemberExecutor:
    """`main`: the member that runs DeePEn's inverse search (the compiled graph wires the other
    members' answers to it; plain calls find it from each round's work)."""
    if transport == "compiled_graph":
        return CompiledGraphExecutor(actors, timeout_s, main)
    if transport == "actor_calls":
        return ActorCallExecutor(actors, timeout_s)
    raise ValueError(f"unknown member transport {transport!r} (resolve `auto` first)")
