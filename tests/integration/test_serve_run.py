"""`serve run deploy/serve_config_tiny.yaml` comes up, answers over HTTP, and stops cleanly on Ctrl-C.

It runs in its own process with its own Ray instance (RAY_ADDRESS=local), as a user's terminal would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml

from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SERVE = Path(sys.executable).parent / "serve"
# Ctrl-C in a terminal reaches a program whose SIGINT is at its default, and only then does Python turn it
# into KeyboardInterrupt. A test run started in the background by a non-interactive shell (CI scripts,
# `make test &`) inherits SIGINT *ignored*, Popen passes that on, and `serve run` would ignore our SIGINT
# and never stop. So serve run starts through this exec shim, which puts SIGINT back to its default first;
# it runs without Python's preexec_fn, which is unsafe with the Ray threads of this test session.
DEFAULT_SIGINT_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _log_tail(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text()[-3000:]


def _wait_ready(url: str, process: subprocess.Popen[bytes], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve run exited early with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"serve run did not answer at {url} within {within_s:.0f} s")


def test_serve_run_with_the_config_file(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "deploy" / "serve_config_tiny.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the only change: a port nobody else uses
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_ADDRESS": "local",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",  # so that a failure's log shows how far the shutdown got
    }
    env.pop("CONSORT_API_KEYS", None)
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT_EXEC, str(SERVE), "run", str(path)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, within_s=240)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="consort", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            # Shutdown deletes the app, then the controller (serve.shutdown waits 30 s at most for it), then
            # the private Ray instance: about 5 s here, so 90 s leaves room for 2 busy cores.
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            log.close()
            raise AssertionError(
                f"serve run did not stop within 90 s of Ctrl-C; its log ends:\n{_log_tail(tmp_path)}"
            ) from None
        finally:
            log.close()
    assert code == 0, _log_tail(tmp_path)
    try:
        httpx.get(f"{url}/health", timeout=3)
        raise AssertionError("the endpoint still answers after serve run stopped")
    except httpx.ConnectError:
        pass
