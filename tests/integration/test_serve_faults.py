"""API keys, overload and a lost member, on an endpoint built to show them.

The application here has API keys (given to the replica through its runtime_env,
as a Kubernetes Secret would through the pod's env), a one-sequence batch and a
one-request queue, so a handful of concurrent requests overload it, and reaches
its members through the compiled graph.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import ServeHttp, deploy, tiny_config, undeploy

APP, PREFIX = "faults", "/faults"
KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def base_url(serve_http: ServeHttp) -> Iterator[str]:
    from consort.deploy.app import ensemble_app
    from consort.runtime.config import parse_config

    # The compiled graph, which `auto` picks only on GPUs: its member loss must reach HTTP clients too.
    config = parse_config(tiny_config(max_queue=1, max_batch=1, transport="compiled_graph"))
    env = {"env_vars": {"CONSORT_API_KEYS": ",".join(KEYS)}}
    deploy(ensemble_app(config, ray_actor_options={"runtime_env": env}), APP, PREFIX)
    yield serve_http.url(PREFIX)
    undeploy(APP)


def _headers(key: str | None = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


# -- API keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Bearer", "Basic a2V5LW9uZQ==", "key-one"])
def test_v1_needs_a_valid_key(base_url: str, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for method, route, body in (
        ("GET", "models", None),
        ("POST", "completions", {"model": "consort", "prompt": "x"}),
    ):
        answer = httpx.request(method, f"{base_url}/v1/{route}", json=body, headers=headers, timeout=30)
        assert answer.status_code == 401, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
        assert "key-two" not in answer.text and (header == "key-one" or "key-one" not in answer.text)


def test_auth_comes_before_body_validation(base_url: str) -> None:
    answer = httpx.post(f"{base_url}/v1/completions", content=b"{broken", timeout=30)
    assert answer.status_code == 401


def test_every_configured_key_works_with_the_official_client(base_url: str) -> None:
    for key in KEYS:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        assert next(m.id for m in client.models.list().data) == "consort"
        reply = client.completions.create(model="consort", prompt="hi", max_tokens=2, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0).models.list()


def test_health_and_metrics_stay_open_for_probes(base_url: str) -> None:
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
    metrics = httpx.get(f"{base_url}/metrics", timeout=30)
    assert metrics.status_code == 200
    assert "key-one" not in metrics.text and "key-two" not in metrics.text


# -- overload ------------------------------------------------------------------------------------
async def _stream_status(client: httpx.AsyncClient, url: str) -> tuple[int, dict[str, str], str]:
    body = {
        "model": "consort",
        "prompt": "Tell a long story",
        "max_tokens": 100,
        "stream": True,
        "ignore_eos": True,
    }
    async with client.stream("POST", url, json=body, headers=_headers()) as answer:
        text = (await answer.aread()).decode()
        return answer.status_code, dict(answer.headers), text


def test_overload_is_429_with_retry_after(base_url: str) -> None:
    async def burst() -> list[tuple[int, dict[str, str], str]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(_stream_status(client, f"{base_url}/v1/completions") for _ in range(6))
            )

    results = asyncio.run(burst())
    statuses = sorted(status for status, _, _ in results)
    assert 200 in statuses and 429 in statuses, statuses
    for status, headers, text in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert '"code":"rate_limit_exceeded"' in text.replace(" ", "")
        else:
            assert status == 200 and text.rstrip().endswith("data: [DONE]")


# -- a lost member -------------------------------------------------------------------------------
def _member_actors() -> dict[str, Any]:
    """Handles of this app's member actors, from its replica (a Serve handle call, not an HTTP route)."""
    from ray import serve

    return serve.get_app_handle(APP).member_actors.remote().result(timeout_s=60)


def test_a_member_lost_mid_stream_is_503_or_an_error_event_then_recovers(base_url: str) -> None:
    import ray

    members = _member_actors()
    assert sorted(members) == ["gemma3", "smollm2"]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    stream = client.completions.create(
        model="consort", prompt="Keep going", max_tokens=120, stream=True, extra_body={"ignore_eos": True}
    )
    failure: openai.APIError | None = None
    chunks = 0
    try:
        for _ in stream:
            chunks += 1
            if chunks == 3:
                ray.kill(members["gemma3"], no_restart=False)  # a crash: Ray restarts it (max_restarts)
    except openai.APIError as error:  # an SSE error event (or a 503 before the first chunk)
        failure = error
    assert failure is not None, f"the stream ended normally after {chunks} chunks"
    assert "was lost" in failure.message and "gemma3" in failure.message
    _recovers(client)


def test_a_member_lost_between_requests_is_503_then_recovers(base_url: str) -> None:
    import ray

    ray.kill(_member_actors()["smollm2"], no_restart=False)
    answer = httpx.post(
        f"{base_url}/v1/completions",
        headers=_headers(),
        timeout=120,
        json={"model": "consort", "prompt": "x", "max_tokens": 3},
    )
    # The next step meets the dead member: 503 before any token, with Retry-After.
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "member_lost" and error["type"] == "service_unavailable"
    assert "retry-after" in answer.headers
    _recovers(openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEYS[0], max_retries=0, timeout=120))


def _recovers(client: openai.OpenAI, within_s: float = 120.0) -> None:
    """The restarted member rejoins: a later request succeeds."""
    deadline, last = time.monotonic() + within_s, None
    while time.monotonic() < deadline:
        try:
            reply: Any = client.completions.create(model="consort", prompt="again", max_tokens=2)
            assert reply.choices[0].finish_reason in ("stop", "length")
            return
        except (openai.APIStatusError, openai.APIConnectionError) as error:
            last = error
            time.sleep(1.0)
    raise AssertionError(f"the ensemble did not recover within {within_s:.0f} s: {last}")
