"""The ensemble in one process: workers called directly, no Ray (the CLI's --local, the unit tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from consort.runtime import models
from consort.runtime.config import EnsembleConfig
from consort.runtime.core import EnsembleCore
from consort.runtime.member import MemberEngine
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.static_cache import StaticCacheOptions
from consort.runtime.types import (
    Completion,
    Delta,
    InvertWork,
    MemberInfo,
    MemberReply,
    RequestOptions,
    SeqWork,
)
from consort.runtime.worker import MemberWorker, inverting_member


class LocalExecutor:
    """Runs member work by calling the workers in this process, one after the other."""

    def __init__(self, workers: dict[str, MemberWorker]) -> None:
        self.workers = workers

    async def step(
        self, works: Mapping[str, list[SeqWork]], release: Mapping[str, list[str]] | None = None
    ) -> dict[str, MemberReply]:
        replies = {}
        # The main member, when it runs DeePEn's inverse search, steps last: it reads the others' results.
        inverting = inverting_member(works)
        for member in sorted(works, key=lambda m: m == inverting):
            member_works = works[member]
            started = time.perf_counter()
            if release and release.get(member):
                self.workers[member].release(release[member])
            results = self.workers[member].step(member_works)
            if member == inverting:
                peers = {m: reply.results for m, reply in replies.items()}
                self.workers[member].finish_inverts(member_works, results, peers)
            replies[member] = MemberReply(results, time.perf_counter() - started)
        return {member: replies[member] for member in works}

    async def invert(self, member: str, works: list[InvertWork], steps: int, learning_rate: float) -> list[torch.Tensor]:
        return self.workers[member].invert(works, steps=steps, learning_rate=learning_rate)

    async def release(self, seq_ids: Mapping[str, list[str]]) -> None:
        for member, ids in seq_ids.items():
            self.workers[member].release(ids)


def member_info(worker: MemberWorker) -> MemberInfo:
    return MemberInfo(worker.name, worker.tokenizer, worker.table, worker.engine.max_context)


def resolve_device(config: EnsembleConfig) -> str:
    if config.device != "auto":
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def static_cache_options(kv_cache: str, device: str, max_batch: int) -> StaticCacheOptions | None:
    """The member engine's static-cache options for a member's `kv_cache` setting; None: dynamic caches.

    auto is the dynamic path everywhere for now: the static path equals it on the CPU (tests), but
    its CUDA-graph replay has not yet run on a GPU, and a default must be what has been checked.
    Twice max_batch slots leave room for riders and forks beyond the sequences stepped together.
    """
    if kv_cache not in ("auto", "dynamic", "static"):
        raise ValueError(f"kv_cache must be 'auto', 'dynamic' or 'static', got {kv_cache!r}")
    if kv_cache in ("auto", "dynamic"):
        return None
    return StaticCacheOptions(max_slots=2 * max_batch)


def load_worker(config: EnsembleConfig, name: str, device: str = "cpu", model_and_tokenizer: Any = None) -> MemberWorker:
    member = next(m for m in config.members if m.name == name)
    if model_and_tokenizer is None:
        model_and_tokenizer = models.load(member.model, device=device, dtype=resolve_dtype(member.dtype, device))
    model, tokenizer = model_and_tokenizer
    engine = MemberEngine(
        model,
        tokenizer,
        name=name,
        device=device,
        max_context=config.max_context,
        static_cache=static_cache_options(member.kv_cache, device, config.max_batch),
    )
    return MemberWorker(name, engine, top_k=config.top_k)


def attach_anchors(core: EnsembleCore, workers: dict[str, MemberWorker]) -> None:
    deepen = core.config.deepen
    assert core.ctx.anchors is not None
    for name, worker in workers.items():
        worker.set_anchors(core.ctx.anchors[name], deepen.temperature, deepen.relative_top_k, name == core.ctx.main)


class EnsembleLoop:
    """Holds the members and the step loop; yields text deltas per sequence."""

    def __init__(self, config: EnsembleConfig, workers: dict[str, MemberWorker]) -> None:
        self.config = config
        self.workers = workers
        self.core = EnsembleCore(config, [member_info(workers[m.name]) for m in config.members], LocalExecutor(workers))
        attach_anchors(self.core, workers)
        if config.strategy != "vote":
            self.core.strategy(config.strategy)  # a strategy that cannot serve this ensemble fails now

    @classmethod
    def from_config(cls, config: EnsembleConfig, device: str | None = None) -> EnsembleLoop:
        device = device or resolve_device(config)
        return cls(config, {m.name: load_worker(config, m.name, device) for m in config.members})

    def stream(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> Iterator[Delta]:
        seq_id = self.core.add(prompt, params, options)
        while True:
            for delta in asyncio.run(self.core.step()):
                if delta.seq_id == seq_id:
                    if delta.error is not None:
                        raise delta.error
                    yield delta
                    if delta.finish_reason:
                        return

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams],
        options: RequestOptions | None = None,
    ) -> list[Completion]:
        """Run many sequences together (continuous batching in one process) to completion."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [self.core.add(p, sp, options) for p, sp in zip(prompts, per_prompt, strict=True)]
        completions = {i: Completion() for i in ids}
        while not all(c.finished for c in completions.values()):
            for delta in asyncio.run(self.core.step()):
                completions[delta.seq_id].add(delta)
        return [completions[i] for i in ids]
