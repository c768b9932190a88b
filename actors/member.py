"""The member actor: one model on its own device, wrapping a `MemberWorker`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import ray
import torch

from runtime.config import EnsembleConfig
from runtime.core import MemberInfo
from runtime.loop import load_worker, member_info, resolve_dtype
from runtime.worker import InvertWork, SeqResult, SeqWork

log = logging.getLogger(__name__)


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

    def describe(self) -> MemberInfo:
        return member_info(self.worker)

    def set_anchors(self, anchor_ids: Sequence[int], temperature: float, relative_top_k: int) -> int:
        return self.worker.set_anchors(anchor_ids, temperature, relative_top_k)

    def step(self, works: list[SeqWork]) -> tuple[list[SeqResult], float]:
        """The results, and the seconds this member computed: the coordinator separates compute
        from coordination per step with it."""
        started = time.perf_counter()
        try:
            results = self.worker.step(works)
        finally:
            seconds = time.perf_counter() - started
            self.step_seconds += seconds
            self.step_calls += 1
        return results, seconds

    def invert(self, works: list[InvertWork], steps: int, learning_rate: float) -> tuple[list[np.ndarray], float]:
        started = time.perf_counter()
        try:
            # numpy crosses the process boundary several times cheaper than a small tensor.
            outs = [out.numpy() for out in self.worker.invert(works, steps=steps, learning_rate=learning_rate)]
        finally:
            seconds = time.perf_counter() - started
            self.invert_seconds += seconds
            self.invert_calls += 1
        return outs, seconds

    def release(self, seq_ids: list[str]) -> None:
        self.worker.release(seq_ids)

    def stats(self) -> dict[str, float]:
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
