"""The `route` strategy end to end: real Ray, real Serve, HTTP, the official `openai` client, tiny members.

Two applications serve the same ensemble config over one routing store (SQLite): each is one replica,
so a request sent to one and feedback sent to the other show that replicas share what they learn, and
redeploying one restarts its replica in a fresh process that must find the same state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from consort.runtime.routing.store import RoutingStore
from tests.integration.conftest import ServeHttp, deploy, tiny_config, undeploy

CHAT = [{"role": "user", "content": "Which colour is the sky?"}]
APPS = {"route_a": "/route_a", "route_b": "/route_b"}


def _config(store: Path) -> dict[str, Any]:
    return tiny_config(
        strategy="route",
        max_context=256,
        max_tokens_limit=32,
        # P = 1: the global ELO alone decides, so one preference settles the next choice.
        route={"router": "elo", "store": str(store), "embedder": "hashing", "elo": {"global_share": 1.0}},
    )


def _deploy(name: str, store: Path) -> None:
    from consort.deploy.app import ensemble_app
    from consort.runtime.config import parse_config

    deploy(ensemble_app(parse_config(_config(store))), name, APPS[name])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("routing") / "route.sqlite"


@pytest.fixture(scope="module")
def urls(serve_http: ServeHttp, store: Path) -> Iterator[dict[str, str]]:
    for name in APPS:
        _deploy(name, store)
    yield {name: serve_http.url(prefix) for name, prefix in APPS.items()}
    for name in APPS:
        undeploy(name)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(url: str) -> tuple[str, list[str]]:
    """One routed chat request: its id and the member(s) that answered."""
    reply = _client(url).chat.completions.create(model="consort", messages=CHAT, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None
    routing = (reply.model_extra or {})["routing"]
    assert [r["index"] for r in routing] == [0]
    return reply.id, routing[0]["members"]


def _feedback(url: str, body: Any) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(
            f"{url}/v1/feedback", content=body, headers={"content-type": "application/json"}, timeout=30
        )
    return httpx.post(f"{url}/v1/feedback", json=body, timeout=30)


def test_route_over_http_says_which_member_answered(urls: dict[str, str], store: Path) -> None:
    reply = _client(urls["route_a"]).chat.completions.create(
        model="consort", messages=CHAT, max_tokens=4, temperature=0, extra_body={"strategy": "route"}
    )
    routing = (reply.model_extra or {})["routing"][0]
    assert routing["router"] == "elo" and routing["members"] == [
        "smollm2"
    ]  # no feedback yet: the first member
    assert set(routing["scores"]) == {"smollm2", "gemma3"}
    assert RoutingStore(store).decision(reply.id).members == ["smollm2"]
    # A completion is routed too, and streaming says who answers in a chunk.
    completion = _client(urls["route_a"]).completions.create(
        model="consort", prompt="The sky is", max_tokens=3
    )
    assert (completion.model_extra or {})["routing"][0]["members"] == ["smollm2"]
    stream = _client(urls["route_a"]).chat.completions.create(
        model="consort", messages=CHAT, max_tokens=3, temperature=0, stream=True
    )
    notes = [n for c in stream if (n := (c.model_extra or {}).get("routing"))]
    assert len(notes) == 1 and notes[0][0]["members"] == ["smollm2"] and notes[0][0]["index"] == 0
    text_stream = _client(urls["route_a"]).completions.create(
        model="consort", prompt="The sky is", max_tokens=3, stream=True
    )
    notes = [n for c in text_stream if (n := (c.model_extra or {}).get("routing"))]
    assert len(notes) == 1 and notes[0][0]["members"] == ["smollm2"]


def test_malformed_feedback_is_a_400_and_changes_nothing(urls: dict[str, str], store: Path) -> None:
    request_id, _ = _ask(urls["route_a"])
    before = RoutingStore(store).feedback_count()
    bad_bodies: list[Any] = [
        "{not json",
        {},
        {"request_id": request_id},  # neither score nor preference
        {"request_id": request_id, "score": 1.5},
        {"request_id": request_id, "score": "1"},
        {"request_id": request_id, "score": 1.0, "preference": {"winner": "gemma3", "loser": "smollm2"}},
        {"request_id": request_id, "preference": {"winner": "gpt-5", "loser": "smollm2"}},
        {"request_id": request_id, "preference": {"winner": "gemma3", "loser": "gemma3"}},
        {"request_id": request_id, "score": 1.0, "surprise": True},
    ]
    for body in bad_bodies:
        response = _feedback(urls["route_a"], body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert "Traceback" not in error["message"]
    unknown = _feedback(urls["route_a"], {"request_id": "chatcmpl-unknown", "score": 1.0})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    assert RoutingStore(store).feedback_count() == before
    assert _ask(urls["route_a"])[1] == ["smollm2"]


def test_feedback_on_one_replica_changes_the_next_decision_of_the_other(
    urls: dict[str, str], store: Path
) -> None:
    request_id, members = _ask(urls["route_a"])
    assert members == ["smollm2"]
    taken = _feedback(
        urls["route_b"], {"request_id": request_id, "preference": {"winner": "gemma3", "loser": "smollm2"}}
    )
    assert taken.status_code == 200, taken.text
    assert taken.json()["request_id"] == request_id and taken.json()["object"] == "feedback"
    # Both replicas now route to gemma3: the one that took the feedback and the one that did not.
    assert _ask(urls["route_a"])[1] == ["gemma3"]
    assert _ask(urls["route_b"])[1] == ["gemma3"]
    # A score on the next answer moves it further (gemma3 answered: it is the member scored).
    next_id, _ = _ask(urls["route_b"])
    assert _feedback(urls["route_a"], {"request_id": next_id, "score": 1.0}).status_code == 200
    metrics = httpx.get(f"{urls['route_a']}/metrics", timeout=30).text
    routed = [line for line in metrics.splitlines() if line.startswith("consort_routed_requests")]
    assert any('member="gemma3"' in line for line in routed), routed
    assert any('member="smollm2"' in line for line in routed), routed


def test_state_survives_a_replica_restart(urls: dict[str, str], store: Path) -> None:
    before = RoutingStore(store).feedback_count()
    assert before >= 2
    undeploy("route_b")
    _deploy("route_b", store)  # a new replica process: it has only the store to learn from
    assert _ask(urls["route_b"])[1] == ["gemma3"]
    assert RoutingStore(store).feedback_count() == before
    # And it keeps learning: enough preferences for smollm2 turn the choice back.
    for _ in range(3):
        request_id, _ = _ask(urls["route_b"])
        assert (
            _feedback(
                urls["route_b"],
                {"request_id": request_id, "preference": {"winner": "smollm2", "loser": "gemma3"}},
            ).status_code
            == 200
        )
    assert _ask(urls["route_a"])[1] == ["smollm2"]
