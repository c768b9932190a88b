"""Tool calling: prompts per member (native template or the fallback), forced calls constrained to the
parameters' schema on every strategy, reading calls back whole and streamed, and the OpenAI shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from consort.deploy import convert
from consort.deploy.openai_api import ChatCompletionRequest, CompletionRequest
from consort.deploy.service import OpenAIService
from consort.runtime import models
from consort.runtime.config import parse_config
from consort.runtime.constraints.engine import ByteGrammar
from consort.runtime.constraints.tools import CallStream, call_constraint, call_text, parse_calls
from consort.runtime.errors import InvalidRequest
from consort.runtime.prompts import ChatMessage, Prompt, prompt_ids
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Delta, RequestOptions
from tests.unit.conftest import ALIASES, make_loop

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CONVERSATION = [ChatMessage(role="user", content="What is the weather in Paris?")]


# -- reading calls ---------------------------------------------------------------------------------


def test_parse_calls() -> None:
    one = call_text("get_weather", {"city": "Paris", "unit": "c"})
    content, calls = parse_calls(one)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"})
    ]
    content, calls = parse_calls(f"Let me check.\n{one}\n{call_text('get_time', {'zone': 'utc'})}")
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    # Not a call: the text stays text.
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_calls(broken) == (broken, [])
    assert parse_calls("plain answer") == ("plain answer", [])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_calls_are_the_whole_calls(size: int) -> None:
    """Fed in pieces of any size, the stream gives each call's name once, then argument pieces that add
    up to exactly the arguments a whole reading finds; text outside calls comes through as content."""
    text = (
        "Sure.\n"
        + call_text("get_weather", {"city": "Pa}ris", "unit": "c", "nested": {"a": [1, {"b": "}"}]}})
        + "\n"
        + call_text("get_time", {"zone": "utc"})
    )
    reader = CallStream()
    events = []
    for start in range(0, len(text), size):
        events += reader.feed(text[start : start + size], final=start + size >= len(text))
    names = [(e.index, e.name) for e in events if e.name is not None]
    assert names == [(0, "get_weather"), (1, "get_time")]
    arguments = ["".join(e.arguments for e in events if e.index == i and e.name is None) for i in range(2)]
    assert [json.loads(a) for a in arguments] == [json.loads(c.arguments) for c in parse_calls(text)[1]]
    assert "".join(e.content for e in events).strip() == "Sure."
    assert reader.calls == 2


def test_text_that_only_looks_like_a_call_start_is_content() -> None:
    reader = CallStream()
    events = reader.feed("a <tool", final=False)
    assert "".join(e.content for e in events) == "a "
    events = reader.feed("box> b", final=True)
    assert "".join(e.content for e in events) == "<toolbox> b"


# -- the grammar of a forced call ------------------------------------------------------------------


def test_forced_call_grammar() -> None:
    grammar = ByteGrammar.of(call_constraint(TOOLS, "get_weather", parallel=False))
    good = call_text("get_weather", {"city": "Paris", "unit": "c"}).encode()
    assert grammar.allows(good)
    assert not grammar.allows(call_text("get_time", {"zone": "utc"}).encode())
    assert not grammar.allows(call_text("get_weather", {"city": "Paris", "unit": "kelvin"}).encode())
    assert not grammar.allows(
        call_text("get_weather", {"city": "Paris"}).encode()[:-13] + b"}}\n</tool_call>"
    )
    grammar.advance(good)
    assert grammar.complete
    with pytest.raises(InvalidRequest, match="not among the tools"):
        call_constraint(TOOLS, "nope", parallel=False)


@pytest.fixture(scope="module")
def pair(tiny_models):
    return make_loop(tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="mean")


@pytest.mark.parametrize("strategy", ["mean", "deepen", "me", "vote"])
def test_forced_calls_validate_on_every_strategy(pair, strategy: str) -> None:
    prompt = Prompt(messages=CONVERSATION, tools=TOOLS)
    cases = [("get_weather", False), (None, False), (None, True)]
    params = [
        SamplingParams(
            temperature=1.0, max_tokens=160, seed=i, constraint=call_constraint(TOOLS, name, parallel)
        )
        for i, (name, parallel) in enumerate(cases)
    ]
    options = {"vote_samples": 2, "vote_kind": "span"} if strategy == "vote" else {}
    completions = pair.generate([prompt] * len(cases), params, RequestOptions(strategy=strategy, **options))
    for (name, parallel), constraint, completion in zip(
        cases, [p.constraint for p in params], completions, strict=True
    ):
        assert constraint is not None
        if parallel and completion.finish_reason == "length":
            # Several calls allowed: a random model may go on calling until max_tokens. What it wrote
            # is still the grammar's, and every call it finished is valid.
            ByteGrammar.of(constraint).advance(completion.text.encode())
        else:
            assert completion.finish_reason == "stop", completion.text
        content, calls = parse_calls(completion.text)
        assert calls and (content is None or completion.finish_reason == "length")
        assert parallel or len(calls) == 1
        for call in calls:
            assert name is None or call.name == name
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


# -- prompts ---------------------------------------------------------------------------------------


def test_members_without_a_tool_format_get_the_fallback(tokenizers) -> None:
    result = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant", content="", tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]
        ),
        ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    ]
    for alias in ALIASES:
        tokenizer = tokenizers[alias]
        text = tokenizer.decode(prompt_ids(tokenizer, Prompt(messages=result, tools=TOOLS)))
        assert "<tools>" in text and '"name": "get_weather"' in text
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
        assert "<tool_response>\nsunny\n</tool_response>" in text
    # Without tools, a conversation renders as before.
    plain = Prompt(messages=CONVERSATION)
    assert tokenizers[ALIASES[0]].decode(prompt_ids(tokenizers[ALIASES[0]], plain)).count("<tools>") == 0


def test_qwen_template_renders_tools_natively() -> None:
    if not (models.resolve("qwen2.5-coder-0.5b-instruct") / "tokenizer_config.json").exists():
        pytest.skip("the converted Qwen2.5-Coder-0.5B is not in this machine's cache")
    tokenizer = models.load_tokenizer("qwen2.5-coder-0.5b-instruct")
    text = tokenizer.decode(prompt_ids(tokenizer, Prompt(messages=CONVERSATION, tools=TOOLS)))
    assert "You are Qwen" in text and "<tools>" in text and "get_time" in text


# -- the OpenAI surface ----------------------------------------------------------------------------

CONFIG = parse_config(
    {
        "name": "consort",
        "members": [
            {"name": "smollm2", "model": "tiny:smollm2-135m-instruct"},
            {"name": "gemma3", "model": "tiny:gemma3-270m"},
        ],
        "strategy": "mean",
        "main": "smollm2",
    }
)


class ScriptedEngine:
    """Answers every request with the same text, in small deltas; records what it was asked."""

    def __init__(self, text: str, piece: int = 5) -> None:
        self.text, self.piece = text, piece
        self.params: list[SamplingParams] = []
        self.prompts: list[Prompt] = []

    async def generate(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> AsyncIterator[Delta]:
        self.params.append(params)
        self.prompts.append(prompt)
        chunks = [self.text[i : i + self.piece] for i in range(0, len(self.text), self.piece)]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            yield Delta(
                seq_id="s", text=chunk, finish_reason="stop" if last else None, completion_tokens=i + 1
            )

    def room(self, prompt: Prompt) -> int:
        return 64

    async def prompt_logprobs(self, prompt_text: str, options: RequestOptions | None = None) -> list:
        return []


def chat(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="consort", messages=[{"role": "user", "content": "hi"}], **body)


def stream_events(service: OpenAIService, request: ChatCompletionRequest) -> list[dict]:
    """The JSON events of a streamed answer (one event loop for the request and its stream)."""

    async def run() -> list[dict]:
        stream = await service.chat(request)
        assert not isinstance(stream, BaseModel)
        return [json.loads(line[6:]) async for line in stream if line.startswith("data: {")]

    return asyncio.run(run())


def test_tool_calls_answer_and_stream_in_openai_shapes() -> None:
    text = call_text("get_weather", {"city": "Paris", "unit": "c"})
    engine = ScriptedEngine(text)
    service = OpenAIService(engine, CONFIG)
    request = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    response = asyncio.run(service.chat(request))
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris", "unit": "c"},
    )
    # The engine got the tools in its prompt and the forced call's grammar.
    assert engine.prompts[0].tools[0]["function"]["name"] == "get_weather"
    assert engine.params[0].constraint is not None and engine.params[0].constraint.kind == "grammar"

    events = stream_events(service, chat(tools=TOOLS, stream=True))
    pieces = [
        c["delta"]["tool_calls"][0] for e in events for c in e["choices"] if c["delta"].get("tool_calls")
    ]
    assert pieces[0]["index"] == 0 and pieces[0]["id"].startswith("call_") and pieces[0]["type"] == "function"
    assert pieces[0]["function"]["name"] == "get_weather"
    assert all(p["index"] == 0 and p["id"] is None and p["function"]["name"] is None for p in pieces[1:])
    assert json.loads("".join(p["function"]["arguments"] for p in pieces)) == {"city": "Paris", "unit": "c"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(c["delta"].get("content") for e in events for c in e["choices"])


def test_tool_choice_auto_is_not_constrained_and_plain_text_stays_content() -> None:
    engine = ScriptedEngine("No tool needed.")
    response = asyncio.run(OpenAIService(engine, CONFIG).chat(chat(tools=TOOLS)))
    assert engine.params[0].constraint is None
    assert (
        response.choices[0].message.content == "No tool needed."
        and response.choices[0].message.tool_calls is None
    )
    assert response.choices[0].finish_reason == "stop"
    engine = ScriptedEngine("x")
    asyncio.run(OpenAIService(engine, CONFIG).chat(chat(tools=TOOLS, tool_choice="none")))
    assert engine.prompts[0].tools is None  # none: the tools are not shown


def test_tool_turns_continue_the_conversation() -> None:
    engine = ScriptedEngine("It is sunny.")
    request = ChatCompletionRequest(
        model="consort",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        tools=TOOLS,
    )
    asyncio.run(OpenAIService(engine, CONFIG).chat(request))
    messages = engine.prompts[0].messages
    assert messages[1].tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert messages[2].role == "tool" and messages[2].content == "sunny, 21 C"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"tool_choice": "required"}, "requires a tool call, but the request has no tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "takes no response_format",
        ),
    ],
)
def test_tool_request_errors(body: dict, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        asyncio.run(OpenAIService(ScriptedEngine("x"), CONFIG).chat(chat(**body)))


def test_past_tool_call_arguments_that_are_not_json_are_rendered_as_written() -> None:
    """A conversation's history is the client's: JSON arguments become an object for the template,
    anything else is kept as the string it was (no 400 for history the schema allows)."""
    request = ChatCompletionRequest(
        model="consort",
        messages=[
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                ],
            }
        ],
    )
    prompt = convert.chat_prompt(request.messages)
    assert prompt.messages is not None
    (call,) = prompt.messages[0].tool_calls or []
    assert call == {"name": "f", "arguments": "{oops"}


# -- structured outputs over the OpenAI fields ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array"}},
                }
            },
            "json_schema",
        ),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "regex"),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "choice"),
        ({"structured_outputs": {"json": {"type": "object"}}}, "json_schema"),
        ({"guided_regex": "[0-9]+"}, "regex"),
        ({"guided_choice": ["yes", "no"]}, "choice"),
        ({"guided_json": {"type": "integer"}}, "json_schema"),
        ({"response_format": {"type": "text"}}, None),
    ],
)
def test_structured_output_fields(body: dict, kind: str | None) -> None:
    for request in (chat(**body), CompletionRequest(model="consort", prompt="x", **body)):
        constraint = convert.output_constraint(request)
        assert (constraint.kind if constraint else None) == kind
        engine = ScriptedEngine("1")
        service = OpenAIService(engine, CONFIG)
        call = service.chat if isinstance(request, ChatCompletionRequest) else service.completions
        asyncio.run(call(request))
        assert engine.params[0].constraint == constraint


def test_an_invalid_schema_is_a_400_naming_the_field() -> None:
    request = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    )
    with pytest.raises(InvalidRequest, match="invalid structured output constraint") as raised:
        asyncio.run(OpenAIService(ScriptedEngine("x"), CONFIG).chat(request))
    assert raised.value.http_status == 400 and raised.value.param == "response_format"  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest, match="one structured output at a time"):
        convert.output_constraint(chat(guided_regex="a", structured_outputs={"choice": ["a"]}))
