"""Echo under DeePEn in one round: every member's result before every piece, from one forward
over the whole text and one batched forward of forks, equals stepping through the pieces."""

from __future__ import annotations

import asyncio

import pytest

from consort.runtime.prompts import Prompt
from consort.runtime.scoring import add_scoring
from consort.runtime.types import RequestOptions
from tests.unit.conftest import ALIASES, make_loop


def _run(core, seq_id: str) -> list:
    entries = []
    while core.has_work:
        for delta in asyncio.run(core.step()):
            if delta.seq_id == seq_id:
                assert delta.error is None
                entries.extend(delta.logprobs)
    return entries


@pytest.fixture(scope="module")
def deepen_pair(tiny_models):
    return make_loop(tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="deepen")


TEXTS = [
    "Question: Which appliance keeps food cold?\nAnswer: a refrigerator, mostly.",
    "Il fait très beau à Zürich — ça va? 東京タワーは高い。",  # characters split by byte-level tokens
    "def f(x):\n    return x**2  # squares",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 3.0]])
def test_deepen_echo_in_one_round_equals_scoring_piece_by_piece(deepen_pair, text: str, weights: list[float]) -> None:
    core = deepen_pair.core
    options = RequestOptions(strategy="deepen", weights=weights, logprobs=3)
    tokenizer = core.members[core.ctx.main].tokenizer
    head = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:1])
    rounds = []
    original = core.executor.step

    async def counting(works, release=None):
        rounds.append(sorted(works))
        return await original(works, release)

    core.executor.step = counting  # type: ignore[method-assign]
    try:
        fast_id = core.add_echo(head, text[len(head) :], options)
        assert fast_id is not None
        fast = _run(core, fast_id)
    finally:
        core.executor.step = original  # type: ignore[method-assign]
    assert rounds[0] == ["gemma", "smol"] and len([r for r in rounds if r]) <= 2  # the echo, then a release
    slow_id = add_scoring(core, Prompt(text=head), text[len(head) :], options)
    slow = _run(core, slow_id)
    assert [e.token for e in fast] == [e.token for e in slow]
    assert [e.logprob for e in fast] == pytest.approx([e.logprob for e in slow], abs=1e-4)
    assert [e.top[0][0] for e in fast] == [e.top[0][0] for e in slow]


def test_the_gate_still_scores_piece_by_piece(deepen_pair) -> None:
    assert deepen_pair.core.add_echo("Question", ": why", RequestOptions(strategy="deepen", gate=0.5)) is None


def test_some_prefixes_need_a_fork_and_the_main_members_never_do(deepen_pair) -> None:
    """The case the forks exist for: a piece that cuts one of the other member's tokens."""
    from consort.runtime.echo_positions import prefix_states
    from consort.runtime.types import Piece

    core = deepen_pair.core
    table = core.ctx.table("smol")
    text = TEXTS[1]
    pieces = [Piece(table.token_bytes(i), "smol", i) for i in core.members["smol"].tokenizer(text)["input_ids"]]

    def forks(member: str) -> int:
        worker = deepen_pair.workers[member]
        states = prefix_states(worker.tokenizer, worker.table, member, pieces, 8)
        return sum(states[-1][: len(s)] != s for s in states[:-1])

    assert forks("smol") == 0
    assert forks("gemma") > 0


def test_token_id_echo_under_deepen_takes_one_round_and_equals_stepping_through_the_ids(deepen_pair) -> None:
    """A prompt as the main member's token ids (lm-eval's tokenized requests), canonical or not: the
    client's ids are the pieces either way, in one round or piece by piece."""
    from consort.runtime.scoring import add_scoring_ids

    core = deepen_pair.core
    tokenizer = core.members["smol"].tokenizer
    canonical = tokenizer("Unbelievable results, très bien", add_special_tokens=False)["input_ids"]
    split = [tokenizer.convert_tokens_to_ids(t) for t in ("U", "n")] + canonical[1:]
    options = RequestOptions(strategy="deepen", logprobs=2)
    for ids in (canonical, split):
        fast_id = core.add_echo_ids("smol", ids, options)
        assert fast_id is not None
        fast = _run(core, fast_id)
        slow = _run(core, add_scoring_ids(core, "smol", ids, options))
        assert len(fast) == len(ids) - 1
        assert [e.logprob for e in fast] == pytest.approx([e.logprob for e in slow], abs=1e-4)
