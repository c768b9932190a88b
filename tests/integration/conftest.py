"""Shared integration fixtures: one local Ray instance per test session, and Ray Serve on a free port.

Starting Ray costs ~8 s, so every integration test module shares `ray_cluster`
(8 logical CPUs on a 2-core machine: CPU counts here are scheduling slots).
Only a cluster this fixture started is stopped by it.

Every `tiny:` member the tests load (in member actors, `serve run`, `ray job submit`)
reads a saved folder in the model cache; `tiny_folders` writes those folders first.
"""

from __future__ import annotations

import os

for _name, _value in (
    ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_AUTH_MODE", "disabled"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_name, _value)

import socket  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402

RAY_CPUS = 8
TINY_MEMBERS = [
    {"name": "smollm2", "model": "tiny:smollm2-135m-instruct", "num_cpus": 0.5},
    {"name": "gemma3", "model": "tiny:gemma3-270m", "num_cpus": 0.5},
]


# Every tiny reference the integration tests load, placement_check.py's third member included.
TINY_REFERENCES = ("tiny:smollm2-135m-instruct", "tiny:gemma3-270m", "tiny:smollm2-135m-instruct@1")


@pytest.fixture(scope="session", autouse=True)
def tiny_folders() -> None:
    """Save the tiny models where `tiny:` references load from (kept when already current)."""
    from consort.runtime.testing.tiny import save_tiny

    for reference in TINY_REFERENCES:
        save_tiny(reference)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """An ensemble of the two tiny models (half a CPU slot each, so several apps fit at once)."""
    return {"name": "consort", "members": TINY_MEMBERS, "strategy": "mean", "main": "smollm2", **overrides}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A local Ray instance for the whole session (or the one already initialised in this process)."""
    started = False
    if not ray.is_initialized():
        # address="local": never attach to another cluster on this machine by accident.
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
        started = True
    yield {"address": ray.get_runtime_context().gcs_address}
    if started:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@dataclass
class ServeHttp:
    """Ray Serve's HTTP proxy of this session."""

    host: str
    port: int

    def url(self, route_prefix: str = "/") -> str:
        return f"http://{self.host}:{self.port}{route_prefix.rstrip('/')}"


@pytest.fixture(scope="session")
def serve_http(ray_cluster: dict[str, Any]) -> ServeHttp:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return ServeHttp("127.0.0.1", port)


def deploy(app: Any, name: str, route_prefix: str) -> None:
    """serve.run without blocking on the app's loop: returns once the application is RUNNING."""
    from ray import serve

    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)


def undeploy(name: str) -> None:
    from ray import serve

    serve.delete(name, _blocking=True)


MAIN_APP, MAIN_PREFIX = "openai", "/openai"
MAIN_MAX_CONTEXT, MAIN_MAX_TOKENS_LIMIT = 512, 128


@pytest.fixture(scope="session")
def openai_app(serve_http: ServeHttp) -> Iterator[str]:
    """The shared endpoint (two tiny members, mean, no API keys); yields its base URL (append /v1)."""
    from consort.deploy.app import ensemble_app
    from consort.runtime.config import parse_config

    config = parse_config(tiny_config(max_context=MAIN_MAX_CONTEXT, max_tokens_limit=MAIN_MAX_TOKENS_LIMIT))
    deploy(ensemble_app(config), MAIN_APP, MAIN_PREFIX)
    yield serve_http.url(MAIN_PREFIX)
    undeploy(MAIN_APP)
