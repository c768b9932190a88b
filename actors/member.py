"""The member actor: one model on its own device, wrapping a `MemberWorker`."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayError

from consort.runtime.config import EnsembleConfig
from consort.runtime.loop import load_worker, member_info, resolve_dtype
from consort.runtime.types import InvertWork, MemberInfo, SeqResult, SeqWork

log = logging.getLogger(__name__)


@dataclass
class MemberCall:
    """One member's part of a round: the same message through an actor call or the compiled graph."""

    step: list[SeqWork] | None = None
    invert: list[InvertWork] | None = None
    invert_steps: int = 0
    invert_learning_rate: float = 0.0
    release: list[str] = field(default_factory=list)
    # Plain actor calls under `deepen`: Ray object refs of the other members' answers to this same
    # round, for the main member's inverse search within its step (`SeqWork.invert`). Nested in the
    # call, Ray does not wait for them before the call starts: the main member's forward runs
    # beside the others', and it fetches their answers (member to member, not through the
    # coordinator) only when its forward is done. The compiled graph passes them by `finish`.
    peers: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemberAnswer:
    """What a call gives back, and the seconds this member computed for it (the coordinator
    separates compute from coordination per step with it)."""

    results: list[SeqResult] | None = None
    inverted: list[np.ndarray] | None = None  # numpy crosses the process boundary cheaper than small tensors
    member: str = ""  # who answered (the main member's `finish` reads its peers' answers by name)
    step_seconds: float = 0.0
    invert_seconds: float = 0.0


class PeerFailed(RuntimeError):
    """The main member's call could not read another member's answer to the same round (that
    member failed or died): the other member is to blame, and the executor reports it first."""


class MemberActor:
    """Hosts one member. Restarted by Ray after a crash (max_restarts); the coordinator re-initialises it."""

    def __init__(self, config: EnsembleConfig, name: str, gpus: bool) -> None:
        member = next(m for m in config.members if m.name == name)
        device = "cpu"
        if gpus and torch.cuda.is_available():
            device = "cuda"
        elif gpus:
            log.warning("member %s was given a GPU bundle but torch sees no CUDA device; running on CPU", name)
        if device == "cpu":
            torch.set_num_threads(member.threads)
        self.worker = load_worker(config, name, device)
        self.device = device
        self.step_seconds = 0.0  # time spent inside step calls, to separate compute from coordination
        self.step_calls = 0
        self.invert_seconds = 0.0  # DeePEn's inverse search, which only the main member runs
        self.invert_calls = 0
        self.dtype = resolve_dtype(member.dtype, device)
        # A compiled graph runs `call` on a background thread while plain calls (stats, anchors,
        # the eval job's direct scoring) run on the main one: the worker is touched by one at a time.
        self._lock = threading.Lock()
        self._busy_since: float | None = None

    def describe(self) -> MemberInfo:
        return member_info(self.worker)

    def set_anchors(
        self, anchor_ids: Sequence[int], temperature: float, relative_top_k: int, main: bool = False
    ) -> int:
        with self._lock:
            return self.worker.set_anchors(anchor_ids, temperature, relative_top_k, main)

    def call(self, call: MemberCall | None) -> MemberAnswer:
        """Free, step, invert (in that order), as the call asks; None: nothing this round (a graph
        round reaches every member, `me` needs only some). With `peers` (deepen's main member, plain
        calls) the step ends with the inverse search over the other members' answers of the round."""
        answer = MemberAnswer(member=self.worker.name)
        if call is None:
            return answer
        with self._lock:
            self._busy_since = time.monotonic()
            try:
                if call.release:
                    self.worker.release(call.release)
                if call.step is not None:
                    started = time.perf_counter()
                    try:
                        answer.results = self.worker.step(call.step)
                    finally:
                        answer.step_seconds = time.perf_counter() - started
                        self.step_seconds += answer.step_seconds
                        self.step_calls += 1
                    if call.peers:
                        self._finish_inverts(call.step, answer, self._fetch_peers(call.peers))
                if call.invert is not None:
                    started = time.perf_counter()
                    try:
                        inverted = self.worker.invert(
                            call.invert, steps=call.invert_steps, learning_rate=call.invert_learning_rate
                        )
                        answer.inverted = [out.numpy() for out in inverted]
                    finally:
                        answer.invert_seconds = time.perf_counter() - started
                        self.invert_seconds += answer.invert_seconds
                        self.invert_calls += 1
            finally:
                self._busy_since = None
        return answer

    def finish(self, call: MemberCall | None, answer: MemberAnswer, *peers: MemberAnswer) -> MemberAnswer:
        """The compiled graph's second task on the main member, after its `call` and the other
        members' (their answers arrive through the graph's channels, not through the coordinator):
        DeePEn's inverse search within the step, when the round asks for it; else `answer` as is."""
        if call is None or call.step is None or answer.results is None:
            return answer
        if not any(work.invert is not None for work in call.step):
            return answer
        results = {peer.member: peer.results for peer in peers if peer.results is not None}
        with self._lock:
            self._busy_since = time.monotonic()
            try:
                self._finish_inverts(call.step, answer, results)
            finally:
                self._busy_since = None
        return answer

    def _fetch_peers(self, refs: dict[str, Any]) -> dict[str, list[SeqResult]]:
        """The other members' answers to this round (their calls run beside this one)."""
        names = list(refs)
        try:
            answers: list[MemberAnswer] = ray.get([refs[name] for name in names])
        except RayError as error:
            raise PeerFailed(f"member {self.worker.name!r} could not read the other members' answers: {error}") from error
        return {name: answer.results for name, answer in zip(names, answers, strict=True) if answer.results is not None}

    def _finish_inverts(self, works: list[SeqWork], answer: MemberAnswer, peers: dict[str, list[SeqResult]]) -> None:
        assert answer.results is not None
        started = time.perf_counter()
        try:
            self.worker.finish_inverts(works, answer.results, peers)
        finally:
            answer.invert_seconds = time.perf_counter() - started
            self.invert_seconds += answer.invert_seconds
            self.invert_calls += 1

    def busy_for(self) -> float | None:
        """Seconds the call in progress has run (None: idle); takes no lock, so it answers while busy."""
        since = self._busy_since
        return None if since is None else time.monotonic() - since

    def stats(self) -> dict[str, float]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, float]:
        engine = self.worker.engine
        stats = engine.stats if isinstance(engine.stats, dict) else vars(engine.stats)
        return {
            **stats,
            "held_sequences": self.worker.held_sequences,
            "engine_sequences": len(engine.seq_ids),
            "step_seconds": self.step_seconds,
            "step_calls": self.step_calls,
            "invert_seconds": self.invert_seconds,
            "invert_calls": self.invert_calls,
        }

    def node(self) -> dict[str, str]:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": self.device,
            "pid": str(os.getpid()),
        }

    def pid(self) -> int:
        return os.getpid()
