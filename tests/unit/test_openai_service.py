"""The OpenAI endpoint's pure parts, without Ray or HTTP: API-key checks, request conversion
and stream merging. (The metrics mirror and the Serve deployment options need Ray's
API: tests/integration/test_serve_units.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from consort.deploy import convert
from consort.deploy.auth import configured_keys, key_accepted
from consort.deploy.errors import Unsupported
from consort.deploy.openai_api import ChatCompletionRequest, CompletionRequest
from consort.deploy.streams import Job, collect, prime_all
from consort.runtime.config import parse_config
from consort.runtime.errors import InvalidRequest, ModelNotFound, Overloaded
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Delta, RequestOptions, TokenLogprob

# The integration tests' ensemble (tests/integration/conftest.py imports Ray, so it is spelt out here);
# parsing it loads no model.
CONFIG = parse_config(
    {
        "name": "consort",
        "members": [
            {"name": "smollm2", "model": "tiny:smollm2-135m-instruct", "num_cpus": 0.5},
            {"name": "gemma3", "model": "tiny:gemma3-270m", "num_cpus": 0.5},
        ],
        "strategy": "mean",
        "main": "smollm2",
    }
)


def test_keys_come_from_the_environment() -> None:
    assert configured_keys({}) == ()
    assert configured_keys({"CONSORT_API_KEYS": " a, ,b "}) == (b"a", b"b")


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (b"Bearer a", True),
        (b"bearer b", True),
        (b"Bearer  a ", True),
        (b"Bearer c", False),
        (b"Bearer", False),
        (b"Basic a", False),
        (b"a", False),
        (None, False),
    ],
)
def test_bearer_header(header: bytes | None, ok: bool) -> None:
    assert key_accepted(header, (b"a", b"b")) is ok


def test_model_ids() -> None:
    assert convert.model_options("consort", CONFIG) == RequestOptions()
    alone = convert.model_options("gemma3", CONFIG)
    assert alone.strategy == "me" and alone.weights == [0.0, 1.0]
    with pytest.raises(ModelNotFound, match="known models: consort, smollm2, gemma3"):
        convert.model_options("gpt-4", CONFIG)


def test_request_options_carry_the_extra_fields() -> None:
    request = CompletionRequest(model="consort", prompt="x", strategy="deepen", weights=[2, 1], gate=0.8)
    options = convert.request_options(request, "consort", CONFIG, logprobs=3)
    assert (options.strategy, options.weights, options.gate, options.logprobs) == ("deepen", [2, 1], 0.8, 3)
    with pytest.raises(InvalidRequest, match="single member"):
        convert.request_options(
            CompletionRequest(model="gemma3", prompt="x", weights=[1, 1]), "gemma3", CONFIG, None
        )


def test_sampling_params_per_choice() -> None:
    request = ChatCompletionRequest(
        model="consort", messages=[{"role": "user", "content": "x"}], seed=7, stop="##"
    )
    params = [convert.sampling_params(request, 5, i) for i in range(2)]
    assert [p.seed for p in params] == [7, 8] and params[0].stop == ["##"] and params[0].max_tokens == 5
    with pytest.raises(InvalidRequest, match="max_tokens"):
        convert.sampling_params(request, 0, 0)


def test_unsupported_fields_are_refused_not_ignored() -> None:
    with pytest.raises(Unsupported, match="tools"):
        convert.check_supported(
            ChatCompletionRequest(
                model="m", messages=[{"role": "user", "content": "x"}], tools=[{"type": "f"}]
            )
        )
    with pytest.raises(Unsupported, match="image"):
        convert.chat_prompt(
            ChatCompletionRequest(
                model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}]
            ).messages
        )


def test_chat_content_parts_and_developer_role() -> None:
    request = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    )
    prompt = convert.chat_prompt(request.messages)
    assert prompt.messages is not None
    assert [(m.role, m.content) for m in prompt.messages] == [("system", "Be brief."), ("user", "ab")]


def test_logprobs_shapes_skip_the_end_of_sequence() -> None:
    entries = [
        TokenLogprob("He", b"He", -0.1, [("He", -0.1), ("A", -2.0)]),
        TokenLogprob("llo", b"llo", -0.2, [("llo", -0.2)]),
        TokenLogprob("", b"\x00<eos>", -0.3, []),
    ]
    legacy = convert.completion_logprobs(entries, 4)
    assert legacy.tokens == ["He", "llo"] and legacy.text_offset == [4, 6]
    assert legacy.top_logprobs[0] == {"He": -0.1, "A": -2.0}
    chat = convert.chat_logprobs(entries)
    assert chat.content is not None and [e.token for e in chat.content] == ["He", "llo"]
    assert chat.content[0].bytes == list(b"He") and chat.content[0].top_logprobs[1].token == "A"


def test_echo_gives_the_unscored_first_token_its_text() -> None:
    scored = [TokenLogprob(" me", b" me", -1.5, [(" me", -1.5)])]
    entries = convert.echo_entries("Echo me", [None, *scored])
    assert [(e.token, e.logprob) for e in entries] == [("Echo", None), (" me", -1.5)]
    assert [(e.token, e.logprob) for e in convert.echo_entries("A", [None])] == [("A", None)]
    legacy = convert.completion_logprobs(entries, 0)
    assert legacy.token_logprobs == [None, -1.5] and legacy.top_logprobs[0] is None


class FakeEngine:
    """Streams `tokens` one-character deltas; refuses a second admission when `capacity` is 1."""

    def __init__(self, tokens: int, capacity: int = 10) -> None:
        self.tokens, self.capacity, self.live = tokens, capacity, 0
        self.closed = 0

    async def generate(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> AsyncIterator[Delta]:
        if self.live >= self.capacity:
            raise Overloaded("full")
        self.live += 1
        try:
            for i in range(self.tokens):
                await asyncio.sleep(0)
                yield Delta("s", str(params.seed), "length" if i == self.tokens - 1 else None, [], 3, i + 1)
        finally:
            self.live -= 1
            self.closed += 1


def _jobs(n: int) -> list[Job]:
    return [Job(i, Prompt(text="x"), SamplingParams(seed=i), RequestOptions()) for i in range(n)]


async def test_streams_of_one_request_are_collected_in_choice_order() -> None:
    engine = FakeEngine(tokens=3)
    finished = await collect(await prime_all(engine, _jobs(3)))
    assert [(index, c.text, c.finish_reason) for index, c in finished.items()] == [
        (0, "000", "length"),
        (1, "111", "length"),
        (2, "222", "length"),
    ]
    assert engine.live == 0


async def test_a_failed_admission_closes_the_started_streams() -> None:
    engine = FakeEngine(tokens=50, capacity=1)
    with pytest.raises(Overloaded):
        await prime_all(engine, _jobs(2))
    assert engine.live == 0
