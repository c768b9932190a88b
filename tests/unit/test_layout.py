"""The layout's promises: one import name, layers that import downwards only, a strategy
that is one file, and one round trip per step where the design says so."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from consort.cli import build_parser
from consort.deploy.openai_api import CompletionRequest
from consort.deploy.service import OpenAIService
from consort.runtime import fusion
from consort.runtime.config import parse_config
from consort.runtime.errors import ConfigError
from consort.runtime.fusion.base import Decision, Strategy, WorkFlags, single_member
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Delta, RequestOptions, SeqResult, SeqWork
from tests.unit.conftest import ALIASES, make_loop

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"runtime": "consort.runtime", "actors": "consort.actors", "deploy": "consort.deploy", "consort": "consort"}
# Which layer may import which: the math knows nothing of Ray or HTTP; the command line sits above all.
MAY_IMPORT = {
    "runtime": {"runtime"},
    "actors": {"runtime", "actors"},
    "deploy": {"runtime", "actors", "deploy"},
    "consort": {"runtime", "actors", "deploy", "consort"},
}
FORBIDDEN_IN_RUNTIME = ("ray", "fastapi", "starlette", "uvicorn")


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "consort":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ("runtime", "actors", "deploy") else "consort"


def _layer_files(layer: str) -> list[Path]:
    folder = ROOT / layer
    return [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]


def test_runtime_imports_no_ray_no_http_no_upper_layer() -> None:
    offences = []
    for path in _layer_files("runtime"):
        for module in _imports(path):
            top = module.split(".")[0]
            if top in FORBIDDEN_IN_RUNTIME or _layer_of(module) in ("actors", "deploy", "consort"):
                offences.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offences, "\n".join(offences)


def test_layers_import_downwards_only_so_there_is_no_cycle_among_them() -> None:
    edges: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    offences = []
    for layer in LAYERS:
        for path in _layer_files(layer):
            for module in _imports(path):
                # The old top-level names must be gone everywhere: only `consort.*` is installed.
                if module.split(".")[0] in ("runtime", "actors", "deploy"):
                    offences.append(f"{path.relative_to(ROOT)} imports the bare name {module}")
                target = _layer_of(module)
                if target is None or target == layer:
                    continue
                edges[layer].add(target)
                if target not in MAY_IMPORT[layer]:
                    offences.append(f"{path.relative_to(ROOT)} ({layer}) imports {module} ({target})")
    assert not offences, "\n".join(offences)

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    assert not [layer for layer in LAYERS if reaches(layer, layer)]


def test_the_installed_distribution_adds_exactly_one_top_level_name(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("consort_llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"consort"}
    # Every source package is in it (the package list in pyproject.toml is explicit).
    packaged = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    for layer, name in LAYERS.items():
        for init in (ROOT / layer).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / layer)
            expected = "/".join([*name.split("."), *relative.parts])
            assert expected in packaged, f"{init.relative_to(ROOT)} is not in the wheel"
    assert "consort/deploy/serve_config.yaml" in names


# -- a strategy is one file --------------------------------------------------------------------


class LastMemberStrategy(Strategy):
    """The last member alone: a throwaway strategy, defined here and nowhere else."""

    name = "last-member-test"

    def first(self, seq) -> dict[str, WorkFlags]:
        return {self.ctx.names[-1]: WorkFlags()}

    def decide(self, seq, results: dict[str, SeqResult], inverted) -> Decision:
        last = self.ctx.names[-1]
        return single_member(self.ctx, last, results[last], seq.forced[0] if seq.forced else None)


@pytest.fixture
def registered():
    with fusion.registered(LastMemberStrategy) as name:
        yield name


class InProcessEngine:
    """The HTTP layer's `Engine` over an in-process core: what a coordinator does, without Ray."""

    def __init__(self, core) -> None:
        self.core = core

    async def generate(self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None) -> AsyncIterator[Delta]:
        seq_id = self.core.add(prompt, params, options)
        while True:
            for delta in await self.core.step():
                if delta.seq_id == seq_id:
                    yield delta
                    if delta.finish_reason:
                        return

    def room(self, prompt: Prompt) -> int:
        return self.core.room(prompt)

    async def prompt_logprobs(self, prompt_text: str, options: RequestOptions | None = None) -> list:
        raise NotImplementedError


def test_a_strategy_registered_from_a_test_module_is_accepted_everywhere(tiny_models, registered: str) -> None:
    members = [{"name": "smol", "model": f"tiny:{ALIASES[0]}"}, {"name": "gemma", "model": f"tiny:{ALIASES[1]}"}]
    # Config validation, and the command line's choices.
    assert parse_config({"members": members, "strategy": registered}).strategy == registered
    args = build_parser().parse_args(["generate", "--strategy", registered, "--prompt", "x"])
    assert args.strategy == registered
    # The endpoint: a request naming it is served by it (the last member alone, here).
    pair = make_loop(tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="mean")
    service = OpenAIService(InProcessEngine(pair.core), pair.config)
    request = CompletionRequest(model="consort", prompt="The capital of France is", max_tokens=8, temperature=0.0, strategy=registered)
    answer = asyncio.run(service.completions(request))
    alone = make_loop(tiny_models, [("solo", ALIASES[1])], strategy="mean")
    expected = alone.generate([Prompt(text="The capital of France is")], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert answer.choices[0].text == expected.text
    mean = asyncio.run(service.completions(request.model_copy(update={"strategy": "mean"})))
    assert mean.choices[0].text != expected.text  # the name really chose the strategy


def test_an_unknown_strategy_is_refused_by_the_config_with_the_known_names() -> None:
    members = [{"name": "smol", "model": f"tiny:{ALIASES[0]}"}]
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; known: mean, deepen, me, vote"):
        parse_config({"members": members, "strategy": "nope"})


# -- round trips -------------------------------------------------------------------------------


class CountingExecutor:
    """Wraps an executor and counts its rounds by kind."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.steps = 0
        self.inverts = 0
        self.releases = 0
        self.released_in_step: list[str] = []

    async def step(self, works: Mapping[str, list[SeqWork]], release: Mapping[str, list[str]] | None = None):
        self.steps += 1
        self.released_in_step += [i for ids in (release or {}).values() for i in ids]
        return await self.inner.step(works, release)

    async def invert(self, member, works, steps, learning_rate):
        self.inverts += 1
        return await self.inner.invert(member, works, steps, learning_rate)

    async def release(self, seq_ids):
        self.releases += 1
        return await self.inner.release(seq_ids)


@pytest.mark.parametrize(
    ("strategy", "gate", "most_rounds"),
    [("mean", None, 1), ("me", None, 1), ("deepen", None, 1), ("mean", 1.0, 2), ("deepen", 1.0, 2)],
)
def test_round_trips_per_step(tiny_models, strategy: str, gate: float | None, most_rounds: int) -> None:
    """One round a step for every strategy (deepen's inverse search runs within the main member's
    step); the gate adds at most one (the others, when the main member is unsure)."""
    loop = make_loop(tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="mean")
    counting = CountingExecutor(loop.core.executor)
    loop.core.executor = counting
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    options = RequestOptions(strategy=strategy, gate=gate)
    core = loop.core
    ids = [core.add(Prompt(text="The capital of France is"), short, options),
           core.add(Prompt(text="1, 2, 3,"), long, options)]
    rounds = []
    while core.has_work:
        asyncio.run(core.step())
        rounds.append(core.last_stats.rounds)
    assert len(rounds) == long.max_tokens
    assert max(rounds) <= most_rounds
    if gate is None:
        assert min(rounds) == most_rounds
    assert counting.steps + counting.inverts == sum(rounds)
    assert counting.inverts == 0  # never a round of its own
    # The first sequence finished at step 3: the next step's call freed it, no round of its own.
    assert ids[0] in counting.released_in_step
    # The last one had no next step to ride: one release round, once the core went idle.
    assert counting.releases == 1
    assert all(worker.held_sequences == 0 for worker in loop.workers.values())
