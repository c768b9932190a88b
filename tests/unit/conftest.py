"""Shared fixtures: tiny random models with the real tokenizers, built once per session."""

from __future__ import annotations

from typing import Any

import pytest

from runtime.config import EnsembleConfig, parse_config
from runtime.loop import EnsembleLoop, load_worker
from runtime.tiny import build_tiny

ALIASES = ("smollm2-135m-instruct", "gemma3-270m")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, tuple[Any, Any]]:
    return {alias: build_tiny(alias) for alias in ALIASES}


def make_loop(tiny_models: dict[str, tuple[Any, Any]], members: list[tuple[str, str]], **config: Any) -> EnsembleLoop:
    """An in-process ensemble over already built tiny models; `members` is [(name, alias)]."""
    ensemble: EnsembleConfig = parse_config(
        {
            "members": [{"name": name, "model": f"tiny:{alias}"} for name, alias in members],
            "deepen": {"min_anchors": 10, "max_anchors": 1024},
            **config,
        }
    )
    workers = {
        name: load_worker(ensemble, name, "cpu", tiny_models[alias]) for name, alias in members
    }
    return EnsembleLoop(ensemble, workers)
