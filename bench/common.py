"""Helpers the benchmarks share: timing, prompts, and writing results next to the command that made them."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "The three most important inventions of the 20th century were",
    "In 1969, the first humans",
    "A good way to learn a new language is",
    "The main ingredients of a traditional pizza are",
    "Water boils at a temperature of",
]


def best_of(repeats: int, run: Callable[[], float]) -> float:
    """The fastest of several timings: the least disturbed by other work on a shared machine."""
    return min(run() for _ in range(repeats))


def median_of(repeats: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeats))


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
