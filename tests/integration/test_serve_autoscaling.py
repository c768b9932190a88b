"""Autoscaling adds and removes whole ensembles: a burst of streams takes the app to 2 replicas, then back to 1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import ServeHttp, deploy, tiny_config, undeploy

APP, PREFIX = "scaling", "/scaling"
# Serve's defaults average load over 30 s and push it every 10 s; shrink both so the test takes seconds.
FAST_METRICS = {"look_back_period_s": 2.0, "metrics_interval_s": 0.5}


@pytest.fixture(scope="module")
def base_url(serve_http: ServeHttp) -> Iterator[str]:
    from consort.deploy.app import ensemble_app
    from consort.runtime.config import parse_config

    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 2,
    }
    config = parse_config(tiny_config(serving={"autoscaling": scaling, "max_ongoing_requests": 16}))
    deploy(ensemble_app(config, autoscaling_overrides=FAST_METRICS), APP, PREFIX)
    yield serve_http.url(PREFIX)
    undeploy(APP)


def _running_replicas() -> tuple[int, int]:
    """(RUNNING replicas, all replicas) of the app's deployment."""
    from ray import serve

    from consort.deploy.app import DEPLOYMENT_NAME

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT_NAME]
    states = {str(k): v for k, v in deployment.replica_states.items()}
    running = sum(v for k, v in states.items() if k.endswith("RUNNING"))
    return running, sum(states.values())


def _wait_for(condition: str, predicate: object, within_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{condition} not reached within {within_s:.0f} s: replicas {_running_replicas()}")


def _load(url: str, stop: threading.Event, errors: list[str]) -> None:
    body = {
        "model": "consort",
        "prompt": "Tell me everything",
        "max_tokens": 60,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            with client.stream("POST", f"{url}/v1/completions", json=body) as answer:
                for _ in answer.iter_lines():
                    pass
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code}")


def test_a_burst_scales_to_max_then_back(base_url: str) -> None:
    assert _running_replicas() == (1, 1)
    stop, errors = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(base_url, stop, errors), daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        up = _wait_for("2 running replicas", lambda: _running_replicas()[0] == 2, within_s=180)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    down = _wait_for("back to 1 replica", lambda: _running_replicas() == (1, 1), within_s=120)
    assert not errors, errors
    print(f"scaled up in {up:.1f} s, down in {down:.1f} s")
