"""Shared fixtures: tiny random models with the real tokenizers, built once per session.

The unit tests run without Ray: a unit run fails when `ray` is imported, whether by a
test module (found after collection) or by a test (found at the end of the session).
Tests that need Ray, even only its Python API, belong in tests/integration.
"""

from __future__ import annotations

import importlib.abc
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from consort.runtime import models
from consort.runtime.config import EnsembleConfig, parse_config
from consort.runtime.evaluation.backend import LocalBackend
from consort.runtime.loop import EnsembleLoop, load_worker
from consort.runtime.testing.tiny import build_tiny, save_tiny
from consort.runtime.vocab import TokenTable

ALIASES = ("smollm2-135m-instruct", "gemma3-270m")
UNIT_DIR = Path(__file__).resolve().parent
REPO = str(UNIT_DIR.parents[1]) + "/"


class _RayImportWatch(importlib.abc.MetaPathFinder):
    """Remembers where `ray` was first imported from; finds nothing itself."""

    def __init__(self) -> None:
        self.first: str | None = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "ray" and self.first is None:
            stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")]
            # The chain through this repository's files, and the frame that imported ray if it is not one.
            chain = [f for f in stack if f.filename.startswith(REPO) and "/.venv/" not in f.filename]
            if stack and (not chain or chain[-1] is not stack[-1]):
                chain.append(stack[-1])
            self.first = "".join(traceback.format_list(chain))
        return None


_RAY_WATCH = _RayImportWatch()
sys.meta_path.insert(0, _RAY_WATCH)


def _unit_only(items: Sequence[pytest.Item]) -> bool:
    """Whether this session runs only unit tests (a run with integration tests imports Ray on purpose)."""
    return all(UNIT_DIR in Path(str(item.path)).resolve().parents for item in items)


def _ray_imported(when: str) -> str | None:
    if "ray" not in sys.modules:
        return None
    where = (
        f"; first imported here:\n{_RAY_WATCH.first}"
        if _RAY_WATCH.first
        else " before tests/unit/conftest.py was loaded"
    )
    return (
        f"the unit tests must run without Ray, but `ray` was imported {when}{where}\n"
        "Import what needs Ray lazily, or move the test to tests/integration."
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.items and _unit_only(session.items):
        problem = _ray_imported("while collecting them")
        if problem:
            raise pytest.UsageError(problem)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.USAGE_ERROR:
        return  # collection already failed (for this reason or another)
    if session.items and _unit_only(session.items):
        problem = _ray_imported("while they ran")
        if problem:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.ensure_newline()
                reporter.write_line(f"ERROR: {problem}", red=True, bold=True)
            else:
                sys.stderr.write(f"ERROR: {problem}\n")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def tiny_folders() -> None:
    """The saved tiny models that `tiny:<alias>` references load (the CLI tests run them through
    models.load); rebuilt when they are missing or were built differently from build_tiny now."""
    for alias in ALIASES:
        save_tiny(f"{models.TINY_PREFIX}{alias}")


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


# An ensemble YAML over the two tiny members, for `consort eval --local` run in process.
TINY_PAIR_CONFIG = f"""\
members:
  - {{name: smollm2, model: "tiny:{ALIASES[0]}"}}
  - {{name: gemma3, model: "tiny:{ALIASES[1]}"}}
strategy: mean
main: smollm2
deepen: {{min_anchors: 10, max_anchors: 1024}}
"""


@pytest.fixture
def tiny_local_backend(tiny_models: dict[str, tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval job's in-process backend builds its members from the session's tiny models."""

    def start(config: EnsembleConfig) -> LocalBackend:
        workers = {
            m.name: load_worker(config, m.name, "cpu", tiny_models[m.model.removeprefix("tiny:")])
            for m in config.members
        }
        return LocalBackend(EnsembleLoop(config, workers))

    monkeypatch.setattr(LocalBackend, "start", staticmethod(start))


def make_loop(
    tiny_models: dict[str, tuple[Any, Any]], members: list[tuple[str, str]], **config: Any
) -> EnsembleLoop:
    """An in-process ensemble over already built tiny models; `members` is [(name, alias)]."""
    ensemble: EnsembleConfig = parse_config(
        {
            "members": [{"name": name, "model": f"tiny:{alias}"} for name, alias in members],
            "deepen": {"min_anchors": 10, "max_anchors": 1024},
            **config,
        }
    )
    workers = {name: load_worker(ensemble, name, "cpu", tiny_models[alias]) for name, alias in members}
    return EnsembleLoop(ensemble, workers)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a busy machine a second OpenMP thread makes
    every op wait for a core: the engine tests run several times faster on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
