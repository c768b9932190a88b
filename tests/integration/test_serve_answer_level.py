"""The answer-level strategies over HTTP (issue 15): mux, vote across members, CoT-decoding and debate,
on the shared endpoint (two tiny members), with the official `openai` client.

Usage reports every sampled token (as OpenAI's `n` would): the cost of all answers, not of the one returned.
"""

from __future__ import annotations

import openai
import pytest

CHAT = [{"role": "user", "content": "What is 6 times 7?"}]
MAX_TOKENS = 4
SAMPLED = {"temperature": 0.8, "seed": 7, "max_tokens": MAX_TOKENS}


@pytest.fixture(scope="module")
def client(openai_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_app}/v1", api_key="unused", max_retries=0, timeout=180)


def test_mux_answers_with_every_sample_counted(client: openai.OpenAI) -> None:
    extra = {
        "strategy": "mux",
        "vote_samples": 2,
        "vote_kind": "span",
        "member_accuracy": [0.3, 0.6],
        "ignore_eos": True,
    }
    reply = client.chat.completions.create(model="consort", messages=CHAT, extra_body=extra, **SAMPLED)  # type: ignore[arg-type]
    again = client.chat.completions.create(model="consort", messages=CHAT, extra_body=extra, **SAMPLED)  # type: ignore[arg-type]
    assert (
        reply.choices[0].message.content
        and reply.choices[0].message.content == again.choices[0].message.content
    )
    assert reply.choices[0].finish_reason == "length"
    assert (
        reply.usage is not None and reply.usage.completion_tokens == 2 * 2 * MAX_TOKENS
    )  # k per member × members


def test_vote_samples_across_members_and_reports_them_all(client: openai.OpenAI) -> None:
    extra = {"strategy": "vote", "vote_samples": 3, "vote_kind": "span", "ignore_eos": True}
    reply = client.completions.create(model="consort", prompt="The answer is", extra_body=extra, **SAMPLED)  # type: ignore[arg-type]
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 3 * MAX_TOKENS


def test_cot_decoding_composes_with_vote_and_mux(client: openai.OpenAI) -> None:
    for strategy in ("vote", "mux"):
        extra = {"strategy": strategy, "cot_branches": 2, "vote_kind": "span", "ignore_eos": True}
        reply = client.completions.create(
            model="consort", prompt="The answer is", max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
        )
        assert reply.choices[0].text
        assert reply.usage is not None
        # One probe token per member, then up to two greedy branches per member of MAX_TOKENS each.
        branches, rest = divmod(reply.usage.completion_tokens - 2, MAX_TOKENS)
        assert rest == 0 and 1 <= branches <= 4, reply.usage


def test_debate_runs_its_rounds(client: openai.OpenAI) -> None:
    extra = {"strategy": "debate", "debate_rounds": 1, "vote_kind": "span", "ignore_eos": True}
    stream = client.chat.completions.create(
        model="consort",
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
        **SAMPLED,  # type: ignore[arg-type]
    )
    text, usage = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        usage = chunk.usage or usage
    assert text
    assert usage is not None and usage.completion_tokens == 2 * 2 * MAX_TOKENS  # two agents, two rounds


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            {"strategy": "vote", "cot_branches": 2, "vote_samples": 3, "vote_kind": "span"},
            "exclude each other",
        ),
        ({"strategy": "vote", "member_accuracy": [0.5, 0.5], "vote_kind": "span"}, "member_accuracy applies"),
        ({"strategy": "mux", "member_accuracy": [0.5], "vote_kind": "span"}, "member_accuracy"),
        ({"strategy": "debate", "vote_samples": 2, "vote_kind": "span"}, "vote_samples"),
        ({"strategy": "mean", "debate_rounds": 1}, "debate_rounds applies"),
        ({"strategy": "mux", "vote_kind": "choice"}, "choice"),
    ],
)
def test_options_a_strategy_cannot_honour_are_refused(client: openai.OpenAI, extra: dict, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="consort", prompt="Hi", max_tokens=2, extra_body=extra)
    assert says in str(refused.value)
