"""The compiled-graph round's watch: a graph Ray has torn down under a round fails it at once.

Ray's monitor thread tears a compiled graph down when a member's graph task dies,
but the awaiting future is not always resolved (tests/integration/test_actors.py
kills a real member; this pins down the case where no answer ever comes).

No cluster starts here, but consort.actors imports Ray, so this lives beside the
integration tests (the unit tests run without Ray).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from consort.actors.executors import WATCH_S, CompiledGraphExecutor, GraphFailed


class _SilentGraph:
    """Accepts an execution and never answers; its monitor thread has ended or runs on."""

    def __init__(self, monitor_alive: bool) -> None:
        stop = threading.Event()
        self._stop = stop
        self._monitor = threading.Thread(target=stop.wait if monitor_alive else (lambda: None), daemon=True)
        self._monitor.start()
        self._monitor.join(timeout=0 if monitor_alive else 5)

    async def execute_async(self, *calls: Any) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        return [loop.create_future() for _ in calls]


class _LiveMember:
    """A member that answers `pid` like a live actor (the same process as when the graph was compiled)."""

    class _Method:
        def remote(self) -> asyncio.Future[int]:
            future = asyncio.get_running_loop().create_future()
            future.set_result(7)
            return future

    pid = _Method()


def _executor(graph: _SilentGraph, timeout_s: float) -> CompiledGraphExecutor:
    executor = CompiledGraphExecutor({"a": _LiveMember(), "b": _LiveMember()}, timeout_s)
    executor._graph = graph
    executor._pids = {"a": 7, "b": 7}
    return executor


def test_a_round_fails_soon_after_the_graph_monitor_ended() -> None:
    executor = _executor(_SilentGraph(monitor_alive=False), timeout_s=60)
    started = time.monotonic()
    with pytest.raises(GraphFailed):
        asyncio.run(executor._execute([None, None]))
    assert time.monotonic() - started < 3 * WATCH_S


def test_a_round_of_a_whole_graph_waits_for_its_timeout() -> None:
    graph = _SilentGraph(monitor_alive=True)
    executor = _executor(graph, timeout_s=1.2)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            asyncio.run(executor._execute([None, None]))
        assert 1.2 <= time.monotonic() - started < 1.2 + 2 * WATCH_S
    finally:
        graph._stop.set()
