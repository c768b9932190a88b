"""`consort serve`: deploy the ensemble on a local Ray (or a named cluster) and serve until interrupted."""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType

from consort.runtime.config import EnsembleConfig
from consort.runtime.errors import ConsortError

APP_NAME = "consort"


def _example(url: str, model: str) -> str:
    auth = ' -H "Authorization: Bearer $KEY"' if os.environ.get("CONSORT_API_KEYS") else ""
    return (
        f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f'  -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        '"max_tokens": 32}\''
    )


def serve(
    config: EnsembleConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None
) -> int:
    """Start (or join) Ray, deploy the ensemble on host:port, block; Ctrl-C or SIGTERM stops it cleanly."""
    for name, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(name, value)
    import ray
    from ray import serve as ray_serve

    from consort.deploy.app import ensemble_app

    started_ray = not ray.is_initialized() and not address
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # address="local": a new instance of our own, never someone's `ray start` cluster found by accident
            # (this command shuts down what it started, so it must know that it started it).
            # CPU slots are logical: one ensemble replica reserves one per member plus its own, which a
            # 2-core laptop would otherwise never fit (threads, not slots, bound the real CPU use).
            needed = 1 + sum(m.num_cpus for m in config.members)
            ray.init(
                address="local",
                include_dashboard=False,
                num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
            )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # SIGTERM (kubectl, systemd) takes the same clean path as Ctrl-C.
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        try:
            ray_serve.run(
                ensemble_app(config), name=APP_NAME, route_prefix=config.serving.route_prefix, blocking=False
            )
        except RuntimeError as error:  # Serve's DEPLOY_FAILED: a member that cannot load, a bad placement
            raise ConsortError(f"the ensemble {config.name!r} failed to deploy: {error}") from error
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown_host}:{port}{config.serving.route_prefix.rstrip('/')}"
        members = ", ".join(f"{m.name} ({m.model})" for m in config.members)
        print(
            f"consort: serving ensemble {config.name!r} [{config.strategy}: {members}] at {url}", flush=True
        )
        print(f"consort: OpenAI base URL {url}/v1; health {url}/health; metrics {url}/metrics", flush=True)
        print(_example(url, config.name), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nconsort: shutting down", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray.is_initialized():
            if started_ray:
                ray_serve.shutdown()
            else:
                # On a shared cluster, remove only what this command deployed.
                ray_serve.delete(APP_NAME)
            ray.shutdown()
    return 0
