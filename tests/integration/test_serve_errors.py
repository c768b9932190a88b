"""Bad input never makes a 500: each case gets its status and an OpenAI-shaped error body.

Runs against the shared endpoint (`openai_app`: max_context 512, max_tokens limit 128).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import MAIN_MAX_TOKENS_LIMIT

CHAT = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "word " * 700  # over the 512-token context of every member


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "consort", "messages": CHAT, "max_tokens": 2, **fields}


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": "consort", "prompt": "hi", "max_tokens": 2, **fields}


CASES: list[tuple[str, str, Any, int, str]] = [
    # (case, route, body, status, a fragment of the message)
    ("malformed json", "chat/completions", b'{"model": "consort", "messages": [', 400, "not valid JSON"),
    ("body not an object", "completions", b"[1, 2]", 400, "invalid request"),
    ("max_tokens of the wrong type", "completions", _completion(max_tokens="many"), 400, "max_tokens"),
    ("messages of the wrong type", "chat/completions", _chat(messages="hi"), 400, "messages"),
    ("stream of the wrong type", "chat/completions", _chat(stream={"on": 1}), 400, "stream"),
    ("missing model", "completions", {"prompt": "hi"}, 400, "model"),
    ("max_tokens zero", "completions", _completion(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "chat/completions", _chat(max_tokens=-3), 400, "max_tokens"),
    (
        "max_tokens above the limit",
        "completions",
        _completion(max_tokens=MAIN_MAX_TOKENS_LIMIT + 1),
        400,
        "limit",
    ),
    ("temperature below 0", "chat/completions", _chat(temperature=-0.5), 400, "temperature"),
    ("top_p zero", "completions", _completion(top_p=0.0), 400, "top_p"),
    ("top_p above 1", "chat/completions", _chat(top_p=1.5), 400, "top_p"),
    ("unknown model", "chat/completions", _chat(model="gpt-7"), 404, "gpt-7"),
    ("unknown strategy", "chat/completions", _chat(strategy="median"), 400, "median"),
    ("weights of the wrong length", "completions", _completion(weights=[1.0, 1.0, 1.0]), 400, "weights"),
    ("negative weights", "completions", _completion(weights=[-1.0, 1.0]), 400, "weights"),
    ("prompt over the context", "completions", _completion(prompt=LONG_PROMPT), 400, "context"),
    (
        "chat over the context",
        "chat/completions",
        _chat(messages=[{"role": "user", "content": LONG_PROMPT}]),
        400,
        "context",
    ),
    ("empty messages", "chat/completions", _chat(messages=[]), 400, "messages"),
    ("unknown role", "chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), 400, "role"),
    ("n too large", "completions", _completion(n=1000), 400, "n"),
    ("empty stop string", "completions", _completion(stop=[""]), 400, "stop"),
    ("unsupported penalty", "completions", _completion(presence_penalty=1.0), 400, "presence_penalty"),
    (
        "strategy with a member model",
        "chat/completions",
        _chat(model="smollm2", strategy="mean"),
        400,
        "single member",
    ),
    ("gate out of range", "chat/completions", _chat(gate=2.0), 400, "gate"),
]


@pytest.mark.parametrize(("case", "route", "body", "status", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_error(
    openai_app: str, case: str, route: str, body: Any, status: int, fragment: str
) -> None:
    url = f"{openai_app}/v1/{route}"
    if isinstance(body, bytes):
        answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        answer = httpx.post(url, json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment.lower() in error["message"].lower(), error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize("stream", [False, True])
def test_admission_errors_come_before_a_stream_starts(openai_app: str, stream: bool) -> None:
    answer = httpx.post(
        f"{openai_app}/v1/chat/completions", json=_chat(strategy="median", stream=stream), timeout=60
    )
    assert answer.status_code == 400 and answer.headers["content-type"].startswith("application/json")


def test_the_official_client_raises_typed_errors(openai_app: str) -> None:
    client = openai.OpenAI(base_url=f"{openai_app}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="consort", prompt=LONG_PROMPT, max_tokens=2)
    assert too_long.value.code == "context_length_exceeded"


def test_unknown_route_is_an_openai_404(openai_app: str) -> None:
    answer = httpx.get(f"{openai_app}/v1/engines", timeout=30)
    assert answer.status_code == 404 and "error" in answer.json()
