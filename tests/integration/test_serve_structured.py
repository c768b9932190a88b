"""Structured outputs and tool calls over HTTP: real Ray, real Serve, the official `openai` client, the
shared endpoint of two tiny members with different tokenizers (SmolLM2 main, Gemma-3)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "rank": {"type": "integer", "minimum": 1, "maximum": 10},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(openai_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{openai_app}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("strategy", ["mean", "me"])
def test_json_schema_chat(client: openai.OpenAI, strategy: str) -> None:
    reply = client.chat.completions.create(
        model="consort",
        messages=[{"role": "user", "content": "A city as JSON."}],
        response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
        max_tokens=120,
        seed=1,
        n=2,
        extra_body={"strategy": strategy},
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_json_schema_streamed_completion(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="consort",
        prompt="JSON:",
        max_tokens=120,
        seed=2,
        stream=True,
        extra_body={"response_format": RESPONSE_FORMAT},
    )
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_choice_and_regex(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="consort",
        messages=ASK,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert reply.choices[0].message.content in ("yes", "no")
    reply = client.completions.create(
        model="consort", prompt="Code:", max_tokens=20, extra_body={"guided_regex": "[A-Z]{3}"}
    )
    assert len(reply.choices[0].text) == 3 and reply.choices[0].text.isupper()


def test_an_invalid_schema_is_an_openai_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="consort",
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },  # type: ignore[arg-type]
        )
    body: Any = raised.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "response_format"
    assert "invalid structured output constraint" in body["message"]


def _call(reply: Any) -> tuple[str, dict[str, Any], str]:
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    return call.function.name, json.loads(call.function.arguments), call.id


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    """A forced call, its result sent back as a tool turn, and the conversation goes on."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="consort",
                messages=ASK,
                tools=[WEATHER],
                tool_choice=choice,
                max_tokens=120,
                seed=3,
                stream=True,  # type: ignore[arg-type,list-item]
            )
        )
        pieces = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
        assert pieces and pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
        assert all(p.index == 0 for p in pieces)
        name, arguments, call_id = (
            "get_weather",
            json.loads("".join(p.function.arguments or "" for p in pieces)),
            pieces[0].id,
        )
        assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]
    else:
        reply = client.chat.completions.create(
            model="consort",
            messages=ASK,
            tools=[WEATHER],
            tool_choice=choice,
            max_tokens=120,
            seed=3,  # type: ignore[arg-type,list-item]
        )
        name, arguments, call_id = _call(reply)
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]
    follow_up = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
    ]
    reply = client.chat.completions.create(
        model="consort",
        messages=follow_up,
        tools=[WEATHER],
        max_tokens=8,
        seed=4,  # type: ignore[arg-type,list-item]
    )
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
