"""Shared fixtures: tiny random models with the real tokenizers, built once per session."""

from __future__ import annotations

from typing import Any

import pytest

from runtime import models
from runtime.config import EnsembleConfig, parse_config
from runtime.loop import EnsembleLoop, load_worker
from runtime.tiny import build_tiny
from runtime.vocab import TokenTable

ALIASES = ("smollm2-135m-instruct", "gemma3-270m")


class ByAlias(dict):
    """A dict with a short repr: hypothesis prints fixtures with a failing example."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


@pytest.fixture(scope="session")
def tokenizers() -> dict[str, Any]:
    """The real tokenizers of both packaged models (loading Gemma's takes seconds: once per run)."""
    return ByAlias({alias: models.load_tokenizer(alias) for alias in ALIASES})


@pytest.fixture(scope="session")
def tables(tokenizers: dict[str, Any]) -> dict[str, TokenTable]:
    return ByAlias({alias: TokenTable.from_tokenizer(tok) for alias, tok in tokenizers.items()})


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
