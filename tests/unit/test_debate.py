"""Multi-agent debate: each round's prompts carry the other agents' answers of the round before."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from consort.runtime.debate import debate_prompt
from consort.runtime.errors import InvalidRequest, PromptTooLong
from consort.runtime.prompts import ChatMessage, Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions
from tests.unit.conftest import make_loop


def test_a_chat_prompt_goes_on_with_the_agents_answer_and_the_others() -> None:
    prompt = Prompt(messages=[ChatMessage(role="user", content="What is 6 x 7?")])
    revised = debate_prompt(prompt, "It is 41.", [("b", "It is 42."), ("c", "42")])
    assert revised.messages is not None
    roles = [m.role for m in revised.messages]
    assert roles == ["user", "assistant", "user"]
    assert revised.messages[1].content == "It is 41."
    assert "It is 42." in revised.messages[2].content and "Agent c: ```42```" in revised.messages[2].content


def test_a_text_prompt_keeps_its_ending_and_puts_the_answers_before_it() -> None:
    prompt = Prompt(text="Question: 6 x 7?\nAnswer:")
    revised = debate_prompt(prompt, " 41", [("b", " 42")])
    assert revised.text is not None and revised.text.endswith(prompt.text or "")
    assert "Your answer: ```41```" in revised.text and "Agent b: ```42```" in revised.text


@pytest.fixture(scope="module")
def trio(tiny_models: dict[str, tuple[Any, Any]]) -> Any:
    members = [("a", "smollm2-135m-instruct"), ("b", "gemma3-270m"), ("c", "smollm2-135m-instruct")]
    return make_loop(tiny_models, members, strategy="mean", max_context=512)


def _prompt_text(prompt: dict[str, Any]) -> str:
    if "text" in prompt:
        return str(prompt["text"])
    return "\n".join(m["content"] for m in prompt["messages"])


@pytest.mark.parametrize("chat", [False, True])
def test_round_r_prompts_hold_the_other_agents_round_r_minus_1_answers(trio: Any, chat: bool) -> None:
    prompt = (
        Prompt(messages=[ChatMessage(role="user", content="Name a colour.")])
        if chat
        else Prompt(text="A colour:")
    )
    params = SamplingParams(temperature=0.9, max_tokens=3, seed=11, ignore_eos=True)
    (answer,) = trio.generate(
        [prompt], params, RequestOptions(strategy="debate", debate_rounds=2, vote_kind="span")
    )
    (diagnostic,) = answer.diagnostics
    rounds = diagnostic["debate"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and diagnostic["rounds"] == 3
    agents = ["a", "b", "c"]
    for r in rounds:
        assert sorted(r["answers"]) == agents and sorted(r["prompts"]) == agents
    assert all(p == prompt.model_dump(exclude_none=True) for p in rounds[0]["prompts"].values())
    for before, now in itertools.pairwise(rounds):
        for agent in agents:
            text = _prompt_text(now["prompts"][agent])
            for other in agents:
                if other != agent:
                    assert f"Agent {other}: ```{before['answers'][other].strip()}```" in text
            assert f"Agent {agent}:" not in text  # an agent is not quoted to itself as another
            assert before["answers"][agent].strip() in text  # its own last answer is in its prompt too
    # The final answer is the majority of the last round, and usage counts every round's tokens.
    assert answer.text in rounds[-1]["answers"].values()
    assert diagnostic["answers"] == [rounds[-1]["answers"][a] for a in agents]
    assert answer.completion_tokens == 3 * 3 * params.max_tokens
    assert not trio.core.has_work and not trio.core.votes


def test_zero_rounds_is_a_vote_of_first_answers(trio: Any) -> None:
    params = SamplingParams(temperature=0.9, max_tokens=2, seed=3, ignore_eos=True)
    options = RequestOptions(strategy="debate", debate_rounds=0, vote_kind="span", weights=[1.0, 1.0, 0.0])
    (answer,) = trio.generate([Prompt(text="Hi")], params, options)
    (diagnostic,) = answer.diagnostics
    assert len(diagnostic["debate"]) == 1 and sorted(diagnostic["debate"][0]["answers"]) == ["a", "b"]
    assert answer.completion_tokens == 2 * params.max_tokens


def test_debate_refuses_what_it_cannot_honour(trio: Any) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2)
    with pytest.raises(InvalidRequest, match="debate_rounds must be"):
        trio.core.add(
            Prompt(text="x"), params, RequestOptions(strategy="debate", debate_rounds=99, vote_kind="span")
        )
    with pytest.raises(InvalidRequest, match="vote_samples"):
        trio.core.add(
            Prompt(text="x"), params, RequestOptions(strategy="debate", vote_samples=3, vote_kind="span")
        )
    with pytest.raises(InvalidRequest, match="debate_rounds applies to the strategies debate"):
        trio.core.add(
            Prompt(text="x"), params, RequestOptions(strategy="vote", debate_rounds=1, vote_kind="span")
        )
    assert trio.core.sequences_needed(RequestOptions(strategy="debate")) == 3
    assert not trio.core.has_work


def test_a_round_too_long_for_a_member_fails_the_request_alone(trio: Any) -> None:
    long = "word " * 200  # fits the first round; with three quoted answers it does not
    params = SamplingParams(temperature=0.9, max_tokens=100, seed=1, ignore_eos=True)
    debate = trio.core.add(
        Prompt(text=long), params, RequestOptions(strategy="debate", debate_rounds=1, vote_kind="span")
    )
    with pytest.raises(PromptTooLong):
        for _ in _drain(trio, debate):
            pass
    assert not trio.core.has_work and not trio.core.votes


def _drain(loop: Any, seq_id: str) -> Any:
    while loop.core.has_work:
        for delta in asyncio.run(loop.core.step()):
            if delta.seq_id == seq_id:
                if delta.error is not None:
                    raise delta.error
                yield delta
