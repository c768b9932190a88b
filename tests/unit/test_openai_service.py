"""The OpenAI endpoint's pure parts, without Ray or HTTP: API-key checks, request conversion
and stream merging. (The metrics mirror and the Serve deployment options need Ray's
API: tests/integration/test_serve_units.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from consort.deploy import convert, errors
from consort.deploy.auth import configured_keys, key_accepted
from consort.deploy.errors import QueueCapacityExceeded
from consort.deploy.openai_api import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, served_document
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


UNSUPPORTED_VALUES: list[tuple[type[BaseModel], str, object, object]] = [
    # (request, field, its one accepted value, a value it refuses)
    (CompletionRequest, "presence_penalty", 0, 0.5),
    (CompletionRequest, "frequency_penalty", 0.0, -1.0),
    (CompletionRequest, "logit_bias", {}, {"50256": -100.0}),
    (CompletionRequest, "suffix", "", "tail"),
    (CompletionRequest, "best_of", 1, 3),
]


@pytest.mark.parametrize(("request_type", "name", "neutral", "refused"), UNSUPPORTED_VALUES)
def test_unsupported_fields_are_refused_not_ignored(
    request_type: type[BaseModel], name: str, neutral: object, refused: object
) -> None:
    base: dict[str, object] = {"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    request_type.model_validate({**base, name: neutral})
    with pytest.raises(ValidationError) as refusal:
        request_type.model_validate({**base, name: refused})
    assert refusal.value.errors()[0]["loc"][0] == name
    assert name in UNSUPPORTED, "the HTTP layer names it unsupported_parameter"


def test_content_parts_are_text_parts_with_text() -> None:
    for part in ({"type": "image_url"}, {"type": "text"}, {"type": "text", "text": None}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [part]}])


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


def test_logprobs_shapes_report_the_end_of_sequence_without_text() -> None:
    # vLLM reports the end-of-sequence token (lm-eval counts on the entry); it adds no text.
    entries = [
        TokenLogprob("He", b"He", -0.1, [("He", -0.1), ("A", -2.0)]),
        TokenLogprob("llo", b"llo", -0.2, [("llo", -0.2)]),
        TokenLogprob("<|im_end|>", b"", -0.3, []),
    ]
    legacy = convert.completion_logprobs(entries, 4)
    assert legacy.tokens == ["He", "llo", "<|im_end|>"] and legacy.text_offset == [4, 6, 9]
    assert legacy.top_logprobs[0] == {"He": -0.1, "A": -2.0}
    chat = convert.chat_logprobs(entries)
    assert chat.content is not None and [e.token for e in chat.content] == ["He", "llo", "<|im_end|>"]
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


class SlowFirstEngine(FakeEngine):
    """Job seed 0 is a vote: its first delta comes only when all its answers are done (here: never)."""

    def __init__(self) -> None:
        super().__init__(tokens=3, capacity=1)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> AsyncIterator[Delta]:
        if params.seed != 0:
            await asyncio.sleep(0.05)  # admitted after the vote, into a full queue
            raise Overloaded("full")
        self.live += 1
        try:
            await asyncio.Event().wait()
            yield Delta("s", "never", "stop", [], 3, 1)
        finally:
            self.live -= 1
            self.closed += 1


async def test_a_failed_admission_does_not_wait_for_the_others_first_delta() -> None:
    engine = SlowFirstEngine()
    with pytest.raises(Overloaded):
        # Before: prime_all awaited every job, so the 429 waited for the whole vote (here: forever).
        await asyncio.wait_for(prime_all(engine, _jobs(2)), timeout=5)
    assert engine.live == 0 and engine.closed == 1, "the admitted vote is freed, not run to its end"


def test_a_request_larger_than_the_queue_is_a_400_not_a_429() -> None:
    small = CONFIG.model_copy(update={"max_queue": 8})
    convert.check_capacity(8, RequestOptions(), small)
    with pytest.raises(QueueCapacityExceeded, match="needs 9 sequences"):
        convert.check_capacity(9, RequestOptions(), small)
    vote = RequestOptions(strategy="vote", vote_samples=3)
    convert.check_capacity(2, vote, small)
    with pytest.raises(QueueCapacityExceeded, match="prompts × n × vote_samples"):
        convert.check_capacity(3, vote, small)
    assert QueueCapacityExceeded.http_status == 400


# -- the HTTP contract, on a bare FastAPI app with the project's error handlers ----------------------
def _client() -> TestClient:
    app = FastAPI()
    errors.install(app)

    @app.get("/v1/models")
    async def models() -> dict[str, str]:
        return {}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, str]:
        return {}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict[str, str]:
        return {}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail of the server")

    return TestClient(app, raise_server_exceptions=False)


def test_a_405_carries_allow() -> None:
    answer = _client().delete("/v1/models")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET", "RFC 9110: a 405 lists the methods the resource supports"
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("route", "body", "param", "code", "fragment"),
    [
        (
            "completions",
            {"frequency_penalty": 0.5},
            "frequency_penalty",
            "unsupported_parameter",
            "not supported",
        ),
        ("completions", {"best_of": 2}, "best_of", "unsupported_parameter", "only equal to n"),
        ("completions", {"prompt": ""}, "prompt", None, "at least 1 character"),
        ("completions", {"seed": True}, "seed", None, "valid integer"),
        ("completions", {"n": "2"}, "n", None, "valid integer"),
        ("completions", {"gate": 0}, "gate", None, "greater than 0"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs", None, "needs logprobs=true"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
            None,
            "field required",
        ),
    ],
)
def test_validation_errors_are_openai_400s(
    route: str, body: dict[str, object], param: str, code: str | None, fragment: str
) -> None:
    base = {**COMPLETION, "model": "m"} if route == "completions" else {**CHAT, "model": "m"}
    answer = _client().post(f"/v1/{route}", json={**base, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert fragment in error["message"].lower()
    assert "is not supported (text only)" not in error["message"]


def test_integral_numbers_are_integers() -> None:
    # JSON Schema's integer includes 2.0; a strict model must take it.
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 2.0, "max_tokens": 8.0})
    assert (request.n, request.max_tokens) == (2, 8) and isinstance(request.n, int)
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "n": 2.5})


def test_an_internal_error_shows_no_internal_text() -> None:
    answer = _client().get("/boom")
    assert answer.status_code == 500
    assert "secret" not in answer.text and "RuntimeError" not in answer.text
    assert answer.json()["error"]["type"] == "internal_error"


# -- the schema is the contract -----------------------------------------------------------------------
def _document() -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    return {"components": {"schemas": definitions["$defs"]}}


def _admits(document: dict[str, Any], name: str, body: dict[str, Any]) -> bool:
    schema = {"$ref": f"#/components/schemas/{name}", **document}
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def _accepts(request_type: type[BaseModel], body: dict[str, Any]) -> bool:
    try:
        request_type.model_validate(body)
    except ValidationError:
        return False
    return True


COMPLETION = {"model": "consort", "prompt": "x"}
CHAT = {"model": "consort", "messages": [{"role": "user", "content": "x"}]}
AGREEMENT: list[tuple[str, dict[str, Any], bool]] = [
    ("CompletionRequest", COMPLETION, True),
    ("CompletionRequest", {**COMPLETION, "prompt": ["a", "b"], "n": 3, "stop": ["##"]}, True),
    ("CompletionRequest", {**COMPLETION, "prompt": []}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [""]}, False),
    ("CompletionRequest", {**COMPLETION, "stop": ""}, False),
    ("CompletionRequest", {**COMPLETION, "max_tokens": 0}, False),
    ("CompletionRequest", {**COMPLETION, "temperature": -0.1}, False),
    ("CompletionRequest", {**COMPLETION, "top_p": 0}, False),
    ("CompletionRequest", {**COMPLETION, "top_p": 1e-300}, True),
    ("CompletionRequest", {**COMPLETION, "gate": 0}, False),
    ("CompletionRequest", {**COMPLETION, "gate": 1}, True),
    ("CompletionRequest", {**COMPLETION, "weights": [0, 0]}, False),
    ("CompletionRequest", {**COMPLETION, "weights": [-1, 2]}, False),
    ("CompletionRequest", {**COMPLETION, "weights": [0, 2]}, True),
    ("CompletionRequest", {**COMPLETION, "frequency_penalty": 0.5}, False),
    ("CompletionRequest", {**COMPLETION, "presence_penalty": 0}, True),
    ("CompletionRequest", {**COMPLETION, "best_of": 1}, True),
    ("CompletionRequest", {**COMPLETION, "best_of": 1, "n": 2}, False),
    ("CompletionRequest", {**COMPLETION, "seed": 2**63}, False),
    ("CompletionRequest", {**COMPLETION, "seed": -(2**63)}, True),
    ("CompletionRequest", {**COMPLETION, "vote_kind": "letters"}, False),
    ("CompletionRequest", {**COMPLETION, "vote_choices": 27}, False),
    ("CompletionRequest", {**COMPLETION, "logprobs": 21}, False),
    ("CompletionRequest", {**COMPLETION, "echo": 1}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [1, 2, 3]}, True),
    ("CompletionRequest", {**COMPLETION, "prompt": [[1, 2], [3]]}, True),
    ("CompletionRequest", {**COMPLETION, "prompt": [1.0, 2]}, True),  # JSON Schema's integers
    ("CompletionRequest", {**COMPLETION, "prompt": [[]]}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [-1]}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [1.5]}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [True]}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": ["a", 1]}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [[1], "a"]}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [[1], 2]}, False),
    ("ChatCompletionRequest", CHAT, True),
    ("ChatCompletionRequest", {**CHAT, "messages": []}, False),
    ("ChatCompletionRequest", {**CHAT, "top_logprobs": 2}, False),
    ("ChatCompletionRequest", {**CHAT, "top_logprobs": 2, "logprobs": True}, True),
    ("ChatCompletionRequest", {**CHAT, "top_logprobs": None}, True),
    ("ChatCompletionRequest", {**CHAT, "tools": []}, True),
    ("ChatCompletionRequest", {**CHAT, "tools": [{"type": "function"}]}, False),
    ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "json_object"}}, True),
    ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "json_schema"}}, False),
    (
        "ChatCompletionRequest",
        {**CHAT, "response_format": {"type": "text", "json_schema": {"name": "x"}}},
        False,
    ),
    ("CompletionRequest", {**COMPLETION, "structured_outputs": {"regex": "a", "choice": ["a"]}}, False),
    ("CompletionRequest", {**COMPLETION, "structured_outputs": {"json_object": True}}, True),
    ("CompletionRequest", {**COMPLETION, "structured_outputs": {"json_object": False}}, False),
    (
        "ChatCompletionRequest",
        {**CHAT, "messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}]},
        True,
    ),
    ("ChatCompletionRequest", {**CHAT, "messages": [{"role": "assistant"}]}, False),
    ("ChatCompletionRequest", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, False),
    ("ChatCompletionRequest", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, False),
]


@pytest.mark.parametrize(("name", "body", "valid"), AGREEMENT)
def test_the_schema_admits_what_the_model_accepts(name: str, body: dict[str, Any], valid: bool) -> None:
    request_type = CompletionRequest if name == "CompletionRequest" else ChatCompletionRequest
    assert _admits(_document(), name, body) is valid, "the JSON Schema"
    assert _accepts(request_type, body) is valid, "the server's validation"


def _served(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "ensemble": "consort",
        "members": ["smollm2", "gemma3"],
        "strategies": ["mean", "deepen", "me", "vote"],
        "gated": ["mean", "deepen"],
        "default_strategy": "mean",
        "vote_kind": "free",
        "max_tokens_limit": 128,
        "max_queue": 8,
        "vocab_sizes": {"consort": 49152, "smollm2": 49152, "gemma3": 262144},
        **overrides,
    }
    return served_document(_document(), **settings)


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({**COMPLETION, "model": "smollm2"}, True),
        ({**COMPLETION, "model": "gpt-4"}, False),
        ({**COMPLETION, "model": "smollm2", "strategy": "mean"}, False),
        ({**COMPLETION, "model": "smollm2", "weights": [1, 0]}, False),
        ({**COMPLETION, "model": "smollm2", "gate": 0.5}, False),
        ({**COMPLETION, "model": "smollm2", "strategy": None}, True),
        ({**COMPLETION, "strategy": "median"}, False),
        ({**COMPLETION, "weights": [1, 1, 1]}, False),
        ({**COMPLETION, "gate": 0.5}, True),
        ({**COMPLETION, "gate": 0.5, "strategy": "deepen"}, True),
        ({**COMPLETION, "gate": 0.5, "strategy": "me"}, False),
        ({**COMPLETION, "max_tokens": 128}, True),
        ({**COMPLETION, "max_tokens": 129}, False),
        ({**COMPLETION, "n": 8}, True),
        ({**COMPLETION, "n": 9}, False),
        ({**COMPLETION, "prompt": ["x"] * 9}, False),
        ({**COMPLETION, "strategy": "vote", "vote_kind": "choice"}, False),
        ({**COMPLETION, "strategy": "vote", "vote_kind": "choice", "vote_choices": 4}, True),
        ({**COMPLETION, "strategy": "mean", "vote_kind": "choice"}, True),
        ({**CHAT, "max_completion_tokens": 129}, False),
        ({**CHAT, "model": "gemma3", "weights": None}, True),
        ({**COMPLETION, "prompt": [49151]}, True),
        ({**COMPLETION, "prompt": [49152]}, False),  # the ensemble's ids are its main member's
        ({**COMPLETION, "model": "smollm2", "prompt": [[1], [49152]]}, False),
        # One bound for all, the smallest vocabulary's (no per-model if/then: see _prompt_limits).
        ({**COMPLETION, "model": "gemma3", "prompt": [[1], [49151]]}, True),
        ({**COMPLETION, "model": "gemma3", "prompt": [262143]}, False),
        ({**COMPLETION, "prompt": [[1]] * 9}, False),
    ],
)
def test_the_served_document_says_what_this_ensemble_accepts(body: dict[str, Any], valid: bool) -> None:
    name = "CompletionRequest" if "prompt" in body else "ChatCompletionRequest"
    assert _admits(_served(), name, body) is valid


def test_the_served_document_follows_the_default_strategy() -> None:
    gated = _served(default_strategy="me")
    assert not _admits(gated, "CompletionRequest", {**COMPLETION, "gate": 0.5})
    assert _admits(gated, "CompletionRequest", {**COMPLETION, "gate": 0.5, "strategy": "mean"})
    voting = _served(default_strategy="vote", vote_kind="choice")
    assert not _admits(voting, "CompletionRequest", COMPLETION)
    assert _admits(voting, "CompletionRequest", {**COMPLETION, "vote_choices": 4})
    assert _admits(voting, "CompletionRequest", {**COMPLETION, "vote_kind": "number"})


# -- prompts given as token ids ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "texts", "ids"),
    [
        ("a", ["a"], []),
        (["a", "b"], ["a", "b"], []),
        ([5, 6], [], [[5, 6]]),
        ([[5], [6, 7]], [], [[5], [6, 7]]),
    ],
)
def test_prompt_shapes(prompt: Any, texts: list[str], ids: list[list[int]]) -> None:
    assert convert.prompt_shapes(prompt) == (texts, ids)
    assert CompletionRequest(model="consort", prompt=prompt).prompt == prompt


def test_prompt_shapes_refuse_what_validation_would() -> None:
    for bad in ([], ["a", 1], [[1], []]):
        with pytest.raises(InvalidRequest):
            convert.prompt_shapes(bad)  # type: ignore[arg-type]


def test_token_prompts_are_checked_against_the_named_vocabulary(tokenizers) -> None:
    smol = tokenizers["smollm2-135m-instruct"]
    ids = smol("The capital of France is", add_special_tokens=False)["input_ids"]
    (prompt,) = convert.token_prompts([ids], "smollm2", smol)
    assert (prompt.text, prompt.token_ids, prompt.token_vocab) == ("The capital of France is", ids, "smollm2")
    assert (
        convert.vocabulary_of("consort", CONFIG) == "smollm2"
        and convert.vocabulary_of("gemma3", CONFIG) == "gemma3"
    )
    with pytest.raises(InvalidRequest, match="outside the vocabulary of 49152") as caught:
        convert.token_prompts([[1], [2, 49152]], "smollm2", smol)
    assert errors.error_body(caught.value).error.param == "prompt"
    entries = convert.token_echo_entries(
        smol, ids, [None, *[TokenLogprob("x", b"x", -1.0, [])] * (len(ids) - 1)]
    )
    assert entries[0].token == "The" and entries[0].logprob is None and len(entries) == len(ids)


class LoopEngine:
    """The Engine protocol over an in-process core (EnsembleLoop): one driver steps it for every caller."""

    def __init__(self, loop: Any) -> None:
        self.core = loop.core
        self.queues: dict[str, asyncio.Queue[Delta]] = {}
        self.lock = asyncio.Lock()

    async def _follow(self, seq_id: str) -> AsyncIterator[Delta]:
        queue = self.queues.setdefault(seq_id, asyncio.Queue())
        while True:
            if queue.empty():
                async with self.lock:
                    if queue.empty():
                        for delta in await self.core.step():
                            self.queues.setdefault(delta.seq_id, asyncio.Queue()).put_nowait(delta)
                continue
            delta = queue.get_nowait()
            if delta.error is not None:
                raise delta.error
            yield delta
            if delta.finish_reason is not None:
                return

    async def generate(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> AsyncIterator[Delta]:
        async for delta in self._follow(self.core.add(prompt, params, options)):
            yield delta

    def room(self, prompt: Prompt) -> int:
        return int(self.core.room(prompt))

    async def prompt_logprobs(self, prompt_text: str, options: RequestOptions | None = None) -> list:
        ids = self.core.members[self.core.ctx.main].tokenizer(prompt_text, add_special_tokens=False)[
            "input_ids"
        ]
        head = self.core.members[self.core.ctx.main].tokenizer.decode(ids[:1])
        seq_id = self.core.add_echo(head, prompt_text[len(head) :], options)
        return [None, *[lp async for delta in self._follow(seq_id) for lp in delta.logprobs]]

    async def prompt_token_logprobs(
        self, vocab: str, ids: list[int], options: RequestOptions | None = None
    ) -> list:
        from consort.runtime.scoring import add_scoring_ids, per_token

        seq_id = self.core.add_echo_ids(vocab, ids, options)
        if seq_id is not None:
            return [None, *[lp async for delta in self._follow(seq_id) for lp in delta.logprobs]]
        pieces = [
            lp
            async for delta in self._follow(add_scoring_ids(self.core, vocab, ids, options))
            for lp in delta.logprobs
        ]
        table = self.core.ctx.table(vocab)
        return [None, *per_token(pieces, [table.token_bytes(i) for i in ids[1:]])]

    def tokenizer(self, member: str) -> tuple[Any, int]:
        return self.core.members[member].tokenizer, self.core.ctx.max_context[member]


SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


@pytest.fixture(scope="module")
def token_service(tiny_models) -> Any:
    from consort.deploy.service import OpenAIService
    from tests.unit.conftest import make_loop

    loop = make_loop(
        tiny_models, [("smollm2", SMOL), ("gemma3", GEMMA)], name="consort", strategy="mean", main="smollm2"
    )
    return OpenAIService(LoopEngine(loop), loop.config)  # type: ignore[arg-type]


def _direct_logprobs(tiny_models: dict[str, Any], alias: str, ids: list[int]) -> list[float]:
    """Each id's log-prob after the ones before it, straight from the member's model (no Consort code)."""
    import torch

    model, _ = tiny_models[alias]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return [float(logits[i - 1, ids[i]]) for i in range(1, len(ids))]


def _echo_body(model: str, prompt: Any, **extra: Any) -> CompletionRequest:
    return CompletionRequest(
        model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0, **extra
    )


@pytest.mark.parametrize(("model", "alias"), [("smollm2", SMOL), ("gemma3", GEMMA), ("consort", SMOL)])
async def test_a_member_alone_scores_the_exact_ids_even_when_not_canonical(
    token_service: Any, tiny_models: dict[str, Any], model: str, alias: str
) -> None:
    """A member alone is fed the ids as sent (no BOS added, a word split its own way), as vLLM does; the
    echo has one entry per id, each the member's own log-prob of it. (The ensemble's own ids are its main
    member's: scored alone by weight, they are the same.)"""
    tokenizer = tiny_models[alias][1]
    canonical = tokenizer("Unbelievable results", add_special_tokens=False)["input_ids"]
    split = [tokenizer.convert_tokens_to_ids(t) for t in ("U", "n")] + canonical[1:]
    assert tokenizer.decode(split) == tokenizer.decode(canonical) and split != canonical
    for ids in (canonical, split):
        extra = {"weights": [1.0, 0.0]} if model == "consort" else {}
        reply = await token_service.completions(_echo_body(model, ids, **extra))
        (choice,) = reply.choices
        assert choice.text.startswith("Unbelievable results")
        logprobs = choice.logprobs.token_logprobs
        assert len(logprobs) == len(ids) + 1 and logprobs[0] is None
        assert logprobs[1 : len(ids)] == pytest.approx(_direct_logprobs(tiny_models, alias, ids), abs=1e-4)


async def test_the_ensemble_reports_one_entry_per_client_id(
    token_service: Any, tiny_models: dict[str, Any]
) -> None:
    """mean over two vocabularies: the ids are the main member's; a non-canonical split still gets one
    entry per id, and canonical ids give what the same prompt as text gives."""
    smol = tiny_models[SMOL][1]
    text = "The capital of France is Paris"
    ids = smol(text, add_special_tokens=False)["input_ids"]
    by_ids = (await token_service.completions(_echo_body("consort", ids))).choices[0].logprobs
    by_text = (await token_service.completions(_echo_body("consort", text))).choices[0].logprobs
    assert by_ids.tokens[: len(ids)] == by_text.tokens[: len(ids)]
    assert by_ids.token_logprobs[1 : len(ids)] == pytest.approx(
        by_text.token_logprobs[1 : len(ids)], abs=1e-4
    )
    split = ids[:-1] + [smol.convert_tokens_to_ids(t) for t in ("ĠPar", "is")]
    assert smol.decode(split) == text
    entries = (await token_service.completions(_echo_body("consort", split))).choices[0].logprobs
    assert len(entries.token_logprobs) == len(split) + 1
    assert all(lp is not None and lp <= 0 for lp in entries.token_logprobs[1:])


async def test_several_token_prompts_are_choices_in_order(
    token_service: Any, tiny_models: dict[str, Any]
) -> None:
    gemma = tiny_models[GEMMA][1]
    prompts = [gemma(t, add_special_tokens=False)["input_ids"] for t in ("Hello", "Good morning")]
    reply = await token_service.completions(
        CompletionRequest(model="gemma3", prompt=prompts, n=2, max_tokens=2, temperature=0, echo=True)
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [
        c.text[: len(t)]
        for c, t in zip(reply.choices, ["Hello", "Hello", "Good morning", "Good morning"], strict=True)
    ] == [
        "Hello",
        "Hello",
        "Good morning",
        "Good morning",
    ]
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        await token_service.completions(CompletionRequest(model="consort", prompt=[49152]))


async def test_deepen_scores_one_entry_per_client_id(token_service: Any, tiny_models: dict[str, Any]) -> None:
    """deepen takes the client's ids as its pieces: one entry per id (equal to stepping through them:
    tests/unit/test_echo_positions.py)."""
    ids = tiny_models[SMOL][1]("Unbelievable results", add_special_tokens=False)["input_ids"]
    reply = await token_service.completions(_echo_body("consort", ids, strategy="deepen"))
    logprobs = reply.choices[0].logprobs.token_logprobs
    assert len(logprobs) == len(ids) + 1 and all(lp is not None and lp <= 0 for lp in logprobs[1:])
