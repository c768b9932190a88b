"""One bad request never harms another, over HTTP: the requests that broke the endpoint, replayed.

Each test replays a reproduction from the robustness review: a tiny top_p among healthy
streams, usage of whitespace tokens, /health under load, and new requests while a lost
member is being restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ServeHttp, deploy, tiny_config, undeploy

APP, PREFIX = "isolation", "/isolation"


def test_a_tiny_top_p_or_temperature_among_healthy_streams_fails_nobody(openai_app: str) -> None:
    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, str]:
        async with client.stream("POST", f"{openai_app}/v1/completions", json=body) as answer:
            return answer.status_code, (await answer.aread()).decode()

    healthy = {"model": "consort", "prompt": "Tell a story", "max_tokens": 24, "stream": True, "ignore_eos": True}
    poisoned = [
        {"model": "consort", "prompt": "Hi", "max_tokens": 3, "top_p": 1e-300},
        {"model": "consort", "prompt": "Hi", "max_tokens": 3, "temperature": 1e-40},
    ]

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, b) for b in [healthy, *poisoned, healthy, healthy]))

    results = asyncio.run(burst())
    for status, text in results:
        assert status == 200, text
        assert "error" not in text and "internal" not in text, text
    # The sharpened requests are greedy: the same text as temperature 0.
    greedy = httpx.post(f"{openai_app}/v1/completions", json={**poisoned[0], "top_p": 1.0, "temperature": 0}, timeout=60)
    sharpened = httpx.post(f"{openai_app}/v1/completions", json=poisoned[0], timeout=60)
    assert sharpened.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_usage_counts_the_tokens_generated(openai_app: str) -> None:
    body = {"model": "consort", "prompt": "Request 30: list some animals.", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(f"{openai_app}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 16


def test_health_answers_within_a_second_under_load(openai_app: str) -> None:
    async def load_and_probe() -> list[float]:
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": "consort", "prompt": "Go on", "max_tokens": 40, "ignore_eos": True}
            load = [asyncio.create_task(client.post(f"{openai_app}/v1/completions", json=body)) for _ in range(48)]
            await asyncio.sleep(2.0)  # the batch is full and the members busy
            took = []
            for _ in range(8):
                started = time.perf_counter()
                probe = await client.get(f"{openai_app}/health", timeout=5)
                took.append(time.perf_counter() - started)
                assert probe.status_code == 200 and probe.json()["ready"] is True
                await asyncio.sleep(0.2)
            answers = await asyncio.gather(*load)
            assert all(a.status_code == 200 for a in answers)
            return took

    took = asyncio.run(load_and_probe())
    assert max(took) < 1.0, took


@pytest.fixture(scope="module")
def base_url(serve_http: ServeHttp) -> Iterator[str]:
    from consort.deploy.app import ensemble_app
    from consort.runtime.config import parse_config

    deploy(ensemble_app(parse_config(tiny_config())), APP, PREFIX)
    yield serve_http.url(PREFIX)
    undeploy(APP)


def test_while_a_lost_member_restarts_new_requests_fail_fast_then_it_recovers(base_url: str) -> None:
    import ray
    from ray import serve

    members = serve.get_app_handle(APP).member_actors.remote().result(timeout_s=60)
    body = {"model": "consort", "prompt": "x", "max_tokens": 3}
    assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).status_code == 200
    ray.kill(members["gemma3"], no_restart=False)  # a crash: Ray restarts it
    killed = time.monotonic()
    statuses, slowest = [], 0.0
    recovered_after = None
    while time.monotonic() - killed < 120:
        started = time.perf_counter()
        answer = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
        slowest = max(slowest, time.perf_counter() - started) if answer.status_code == 503 else slowest
        statuses.append(answer.status_code)
        if answer.status_code == 503:
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.json()["error"]["code"] == "member_lost"
        elif answer.status_code == 200 and 503 in statuses:
            recovered_after = time.monotonic() - killed
            break
        time.sleep(0.3)
    assert 503 in statuses, statuses
    assert slowest < 5.0, f"a request during recovery waited {slowest:.1f} s instead of failing fast"
    assert recovered_after is not None, statuses
    assert httpx.get(f"{base_url}/health", timeout=5).json()["ready"] is True
