"""The OpenAI endpoint end to end: real Ray, real Serve, real HTTP, the official `openai` client, tiny models.

One application (two tiny members, mean) serves the whole module; authentication is off here.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def base_url(openai_app: str) -> str:
    return openai_app


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _stream_text(stream: Any, kind: str) -> tuple[str, str | None, list[Any]]:
    text, finish, chunks = "", None, []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            piece = choice.delta.content if kind == "chat" else choice.text
            text += piece or ""
            finish = choice.finish_reason or finish
    return text, finish, chunks


def test_models_lists_the_ensemble_then_each_member(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["consort", "smollm2", "gemma3"]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="consort", messages=CHAT, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "consort"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="consort", prompt="The sky is", max_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


def test_completion_max_tokens_defaults_to_16(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="consort", prompt="Once upon a time", temperature=0, logprobs=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].logprobs is not None and len(reply.choices[0].logprobs.tokens) == 16


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_streamed_text_equals_non_streamed_text_at_temperature_0(client: openai.OpenAI, kind: str) -> None:
    if kind == "chat":
        full = client.chat.completions.create(model="consort", messages=CHAT, max_tokens=12, temperature=0)
        expected, expected_finish = full.choices[0].message.content, full.choices[0].finish_reason
        stream = client.chat.completions.create(
            model="consort", messages=CHAT, max_tokens=12, temperature=0, stream=True
        )
    else:
        full = client.completions.create(
            model="consort", prompt="Roses are red,", max_tokens=12, temperature=0
        )
        expected, expected_finish = full.choices[0].text, full.choices[0].finish_reason
        stream = client.completions.create(
            model="consort", prompt="Roses are red,", max_tokens=12, temperature=0, stream=True
        )
    text, finish, chunks = _stream_text(stream, kind)
    assert text == expected
    assert finish == expected_finish
    assert len(chunks) > 2, "a stream sends its text in several chunks"
    assert len({c.id for c in chunks}) == 1


def test_stream_with_usage_ends_with_a_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="consort",
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_n_2_returns_two_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="consort", messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    again = client.chat.completions.create(
        model="consort", messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=3
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices], "seeded"
    stream = client.completions.create(
        model="consort", prompt="Hello", max_tokens=4, n=2, temperature=0, stream=True
    )
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts[0] == texts[1], "greedy choices agree"


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    prompt = "Count: one two three four"
    free = client.completions.create(
        model="consort", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    assert len(text) >= 4, f"need some text to cut: {text!r}"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.find(stop)]
    for stops in (stop, [stop, "\u2603never"]):
        cut = client.completions.create(
            model="consort",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stop=stops,
            extra_body={"ignore_eos": True},
        )
        assert cut.choices[0].text == expected
        assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="consort",
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    # One entry per generated piece; an end-of-sequence piece (kept going by ignore_eos) is not text, so not listed.
    assert content is not None and 1 <= len(content) <= 5
    for entry in content:
        assert entry.logprob <= 0 and 1 <= len(entry.top_logprobs) <= 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        # Greedy takes the most probable text: across these two vocabularies that is the piece on
        # the most probable path (runtime/textprob.text_greedy), which need not lead the list of
        # single pieces; never one more likely than the list's first.
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6


def test_completion_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="consort",
        prompt="Hello there",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and "".join(logprobs.tokens) == reply.choices[0].text


def test_echo(client: openai.OpenAI, base_url: str) -> None:
    from consort.actors.coordinator import Coordinator

    reply = client.completions.create(
        model="consort", prompt="Echo me", max_tokens=3, temperature=0, echo=True
    )
    assert reply.choices[0].text.startswith("Echo me")
    body = {
        "model": "consort",
        "prompt": "Echo me",
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    answer = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    if hasattr(Coordinator, "prompt_logprobs"):
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][0] is None and all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
        assert logprobs["tokens"][0] != "" and logprobs["top_logprobs"][0] is None
        assert "".join(logprobs["tokens"]) == choice["text"] and choice["text"].startswith("Echo me")
    else:
        assert answer.status_code == 400 and "echo is not supported" in answer.json()["error"]["message"]


def test_deepen_echo_on_actors_equals_scoring_piece_by_piece_in_process(base_url: str) -> None:
    """Echo under deepen runs in one round on the member actors (every member's result before every
    piece, runtime/echo_positions.py); in process, the same text stepped piece by piece scores the same."""
    import asyncio

    from consort.runtime.config import parse_config
    from consort.runtime.loop import EnsembleLoop
    from consort.runtime.prompts import Prompt
    from consort.runtime.scoring import add_scoring
    from consort.runtime.types import RequestOptions
    from tests.integration.conftest import MAIN_MAX_CONTEXT, MAIN_MAX_TOKENS_LIMIT, tiny_config

    text = "Il fait très beau à Zürich: the refrigerator hums."
    body = {"model": "consort", "prompt": text, "max_tokens": 1, "temperature": 0, "echo": True,
            "logprobs": 1, "strategy": "deepen"}
    answer = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    served = answer.json()["choices"][0]["logprobs"]["token_logprobs"]

    config = parse_config(tiny_config(max_context=MAIN_MAX_CONTEXT, max_tokens_limit=MAIN_MAX_TOKENS_LIMIT))
    core = EnsembleLoop.from_config(config, device="cpu").core
    tokenizer = core.members[core.ctx.main].tokenizer
    head = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:1])
    seq_id = add_scoring(core, Prompt(text=head), text[len(head) :], RequestOptions(strategy="deepen", logprobs=1))
    stepped = []
    while core.has_work:
        stepped += [lp.logprob for d in asyncio.run(core.step()) if d.seq_id == seq_id for lp in d.logprobs]
    assert served[0] is None
    assert served[1 : 1 + len(stepped)] == pytest.approx(stepped, abs=1e-4)


# A prompt on which, greedily, each tiny member alone and their mean continue three different ways.
FUSED_PROMPT = "A"


def _greedy(client: openai.OpenAI, model: str = "consort", **extra: Any) -> str:
    body = {"ignore_eos": True, **extra}
    reply = client.completions.create(
        model=model, prompt=FUSED_PROMPT, max_tokens=8, temperature=0, extra_body=body
    )
    assert reply.model == model and reply.choices[0].finish_reason == "length"
    return reply.choices[0].text


@pytest.fixture(scope="module")
def alone_in_process() -> dict[str, str]:
    """Each member's greedy text run alone in this process, from the same saved tiny weights the actors load."""
    from consort.runtime.config import parse_config
    from consort.runtime.loop import EnsembleLoop
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams
    from tests.integration.conftest import MAIN_MAX_CONTEXT, TINY_MEMBERS

    texts = {}
    for member in TINY_MEMBERS:
        config = parse_config({"members": [member], "strategy": "mean", "max_context": MAIN_MAX_CONTEXT})
        loop = EnsembleLoop.from_config(config, device="cpu")
        params = SamplingParams.create(temperature=0, max_tokens=8, ignore_eos=True)
        (completion,) = loop.generate([Prompt(text=FUSED_PROMPT)], params)
        assert completion.finish_reason == "length"
        texts[member["name"]] = completion.text
    return texts


@pytest.mark.parametrize(("member", "other"), [("smollm2", "gemma3"), ("gemma3", "smollm2")])
def test_a_member_name_is_that_member_alone(
    client: openai.OpenAI, alone_in_process: dict[str, str], member: str, other: str
) -> None:
    text = _greedy(client, member)
    assert text == alone_in_process[member]
    assert text != alone_in_process[other], "the members must disagree for this to show anything"
    assert text != _greedy(client), "the ensemble's own text is not either member's"


def test_ensemble_options_in_the_body(client: openai.OpenAI) -> None:
    """Each option changes the greedy text the way it should (see FUSED_PROMPT)."""
    default, smollm2, gemma3 = _greedy(client), _greedy(client, "smollm2"), _greedy(client, "gemma3")
    assert len({default, smollm2, gemma3}) == 3, "the members and their mean must disagree here"
    # strategy: deepen fuses otherwise than the configured mean.
    assert _greedy(client, strategy="deepen") != default
    assert _greedy(client, strategy="mean") == default
    # weights: all of it on one member is that member alone, under every strategy; a skew is a third text.
    for strategy in ({}, {"strategy": "mean"}, {"strategy": "deepen"}, {"strategy": "me"}):
        assert _greedy(client, **strategy, weights=[0.0, 1.0]) == gemma3, strategy
    assert _greedy(client, weights=[1.0, 0.0]) == smollm2
    assert _greedy(client, weights=[1.0, 9.0]) not in (default, smollm2, gemma3)
    # gate: a threshold the main member always reaches leaves it alone; one it never reaches fuses every step.
    assert _greedy(client, gate=1e-9) == smollm2
    assert _greedy(client, gate=1.0) == default


def test_health_reports_members(base_url: str) -> None:
    answer = httpx.get(f"{base_url}/health", timeout=30)
    assert answer.status_code == 200
    assert set(answer.json()["members"]) == {"smollm2", "gemma3"}


def test_metrics_expose_the_consort_series(client: openai.OpenAI, base_url: str) -> None:
    client.completions.create(model="consort", prompt="count me", max_tokens=2)
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert "# TYPE consort_requests_total counter" in text
    requests = [line for line in text.splitlines() if line.startswith("consort_requests_total{")]
    assert requests and sum(float(line.rsplit(" ", 1)[1]) for line in requests) >= 1
    assert "consort_time_to_first_token_seconds_bucket" in text
    assert "consort_tokens_generated_total" in text


def test_chat_max_tokens_defaults_to_what_the_context_allows(client: openai.OpenAI) -> None:
    from tests.integration.conftest import MAIN_MAX_TOKENS_LIMIT

    reply = client.chat.completions.create(
        model="consort", messages=CHAT, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    # Capped by the ensemble's max_tokens limit (the 512-token context leaves more room than that).
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    assert 16 < len(reply.choices[0].logprobs.content) <= MAIN_MAX_TOKENS_LIMIT


def test_a_client_that_leaves_mid_stream_frees_its_sequence(base_url: str) -> None:
    import time

    def steps() -> int:
        return int(httpx.get(f"{base_url}/health", timeout=30).json()["members"]["smollm2"]["steps"])

    before = steps()
    body = {
        "model": "consort",
        "prompt": "Go on and on",
        "max_tokens": 120,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{base_url}/v1/completions", json=body) as answer,
    ):
        lines = answer.iter_lines()
        for _ in range(3):
            next(lines)
    # The connection is closed: Serve cancels the request, the coordinator drops the sequence.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(f"{base_url}/health", timeout=30).json()
        held = [m["held_sequences"] for m in health["members"].values()]
        if health["running"] == 0 and health["waiting"] == 0 and held == [0, 0]:
            assert steps() - before < 100, "the sequence ran on to its end instead of stopping"
            return
        time.sleep(0.5)
    raise AssertionError(f"the sequence still runs after its client left: {health}")


def test_ray_exports_the_same_metrics_as_ray_consort(client: openai.OpenAI) -> None:
    import time

    import ray

    client.completions.create(model="consort", prompt="export me", max_tokens=2)
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if "ray_consort_requests_total{" in text:
            return
        time.sleep(2)
    raise AssertionError(f"ray_consort_requests_total not on Ray's export port {port}")


def test_vote_over_http_returns_one_of_its_sampled_answers(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="consort", prompt="The answer is", max_tokens=4, temperature=0.8, seed=9,
        extra_body={"strategy": "vote", "vote_samples": 3, "vote_kind": "span", "ignore_eos": True},
    )
    again = client.completions.create(
        model="consort", prompt="The answer is", max_tokens=4, temperature=0.8, seed=9,
        extra_body={"strategy": "vote", "vote_samples": 3, "vote_kind": "span", "ignore_eos": True},
    )
    assert response.choices[0].text and response.choices[0].text == again.choices[0].text
    assert response.choices[0].finish_reason == "length"


# -- the OpenAPI document describes the server (issue 17, item 8) ------------------------------------
@pytest.fixture(scope="module")
def document(base_url: str) -> dict[str, Any]:
    answer = httpx.get(f"{base_url}/openapi.json", timeout=30)
    assert answer.status_code == 200
    return answer.json()  # type: ignore[no-any-return]


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def _ok(document: dict[str, Any], path: str, method: str = "post") -> dict[str, Any]:
    return document["paths"][path][method]["responses"]["200"]["content"]  # type: ignore[no-any-return]


def test_the_document_describes_the_routes(document: dict[str, Any]) -> None:
    from tests.integration.conftest import MAIN_MAX_TOKENS_LIMIT

    assert document["servers"] == [{"url": "/openai"}], "clients find the routes under the app's prefix"
    assert set(_ok(document, "/metrics", "get")) == {"text/plain"}
    for path, body in (
        ("/v1/completions", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionResponse"),
    ):
        content = _ok(document, path)
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}
        assert "text/event-stream" in content
        responses = document["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"400", "404", "429", "503"} <= set(responses)
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
    assert "HTTPValidationError" not in document["components"]["schemas"]
    request = document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == ["consort", "smollm2", "gemma3"]
    weights = next(b for b in request["weights"]["anyOf"] if b["type"] == "array")
    assert (weights["minItems"], weights["maxItems"]) == (2, 2), "one weight per member"
    max_tokens = next(b for b in request["max_tokens"]["anyOf"] if b["type"] == "integer")
    assert max_tokens["maximum"] == MAIN_MAX_TOKENS_LIMIT


def test_responses_match_the_document(document: dict[str, Any], base_url: str) -> None:
    for path, body in (
        ("/v1/completions", {"model": "consort", "prompt": "Hi", "max_tokens": 3, "logprobs": 2, "echo": True}),
        (
            "/v1/chat/completions",
            {"model": "consort", "messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2},
        ),
    ):
        answer = httpx.post(f"{base_url}{path}", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        _validator(document, _ok(document, path)["application/json"]["schema"]).validate(answer.json())
        with httpx.stream("POST", f"{base_url}{path}", json={**body, "stream": True}, timeout=60) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in stream.iter_lines() if line]
        assert events[-1] == "[DONE]" and len(events) > 2
        chunk = _ok(document, path)["text/event-stream"]["schema"]["properties"]["data"]["else"]["contentSchema"]
        for event in events[:-1]:
            _validator(document, chunk).validate(json.loads(event))
    health = httpx.get(f"{base_url}/health", timeout=30)
    _validator(document, _ok(document, "/health", "get")["application/json"]["schema"]).validate(health.json())
    assert httpx.get(f"{base_url}/metrics", timeout=30).headers["content-type"].startswith("text/plain")


# Requests the document admits exactly when the server accepts them (what used to differ, issue 17).
AGREEMENT: list[dict[str, Any]] = [
    {"frequency_penalty": 0.5},
    {"presence_penalty": 0},
    {"gate": 0},
    {"gate": 0.5},
    {"gate": 0.5, "strategy": "me"},
    {"model": "smollm2", "strategy": "mean"},
    {"model": "smollm2", "weights": [1, 0]},
    {"model": "smollm2"},
    {"weights": [0, 0]},
    {"weights": [0, 1]},
    {"best_of": 1},
    {"best_of": 1, "n": 2},
    {"strategy": "vote", "vote_kind": "choice", "vote_samples": 2},
    {"strategy": "vote", "vote_kind": "choice", "vote_choices": 4, "vote_samples": 2},
    {"prompt": ""},
    {"stop": ""},
    {"max_tokens": 2.0},
    {"seed": True},
]


@pytest.mark.parametrize("extra", AGREEMENT, ids=[json.dumps(e) for e in AGREEMENT])
def test_the_document_admits_what_the_server_accepts(
    document: dict[str, Any], base_url: str, extra: dict[str, Any]
) -> None:
    body = {"model": "consort", "prompt": "Hi", "max_tokens": 2, **extra}
    admitted = _validator(document, {"$ref": "#/components/schemas/CompletionRequest"}).is_valid(body)
    answer = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code in (200, 400), answer.text
    assert (answer.status_code == 200) is admitted, f"document admits: {admitted}; server: {answer.text}"


def test_the_docs_page_reads_the_served_document(base_url: str) -> None:
    page = httpx.get(f"{base_url}/docs", timeout=30)
    assert page.status_code == 200 and "/openai/openapi.json" in page.text
