"""Fusion strategies, one file each; the registry below is what configs and requests name."""

from __future__ import annotations

from runtime.errors import ConfigError
from runtime.fusion.base import EnsembleContext, Strategy
from runtime.fusion.deepen import DeepenStrategy
from runtime.fusion.me import MixtureStrategy
from runtime.fusion.mean import MeanStrategy

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (MeanStrategy, DeepenStrategy, MixtureStrategy)
}


def create(name: str, ctx: EnsembleContext) -> Strategy:
    if name not in REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(sorted(REGISTRY))}, vote")
    strategy = REGISTRY[name](ctx)
    strategy.validate()
    return strategy
