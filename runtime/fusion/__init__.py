"""The strategies, one file each, and the registry that is the one list of their names.

A strategy module defines a `Strategy` subclass decorated with `@register`; config
validation, the command line's choices, the endpoint and the eval job all read the
names from here, so a new strategy is its own file and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from consort.runtime.errors import InvalidRequest
from consort.runtime.fusion.base import EnsembleContext, Strategy, StrategyLevel

REGISTRY: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])


def register(cls: S) -> S:
    """Class decorator: make a strategy known by its `name`."""
    known = REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"strategy name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


@contextmanager
def registered(cls: type[Strategy]) -> Iterator[str]:
    """A strategy known only inside the block (a plugin's tests, a throwaway experiment)."""
    register(cls)
    try:
        yield cls.name
    finally:
        unregister(cls.name)


def names(level: StrategyLevel | None = None) -> list[str]:
    """Registered strategy names (of one level: token or answer), in registration order."""
    return [n for n, cls in REGISTRY.items() if level is None or cls.level == level]


def gated_names() -> list[str]:
    """Strategies that honour the gate option."""
    return [n for n, cls in REGISTRY.items() if cls.supports_gate]


def strategy_class(name: str) -> type[Strategy]:
    cls = REGISTRY.get(name)
    if cls is None:
        raise InvalidRequest(f"unknown strategy {name!r}; known: {', '.join(REGISTRY)}")
    return cls


def create(name: str, ctx: EnsembleContext) -> Strategy:
    strategy = strategy_class(name)(ctx)
    strategy.validate()
    return strategy


# The built-in strategies register themselves on import, in the order `names()` lists them.
from consort.runtime.fusion import mean  # noqa: E402, F401, I001
from consort.runtime.fusion import deepen  # noqa: E402, F401
from consort.runtime.fusion import me  # noqa: E402, F401
from consort.runtime import vote_groups  # noqa: E402, F401
from consort.runtime.routing import strategy as routing_strategy  # noqa: E402, F401
