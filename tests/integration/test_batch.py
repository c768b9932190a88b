"""`consort batch` on the session's Ray cluster: a few hundred lines through Ray Data on tiny members,
killed part-way and resumed, against the endpoint's answers for the same bodies.

The driver runs as a subprocess joined to the session cluster (`--address`), so killing
it (SIGKILL, as when a node dies) ends its Ray job, and Ray removes that job's replicas
and their placement groups; nothing else on the cluster is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import MAIN_MAX_CONTEXT, MAIN_MAX_TOKENS_LIMIT, tiny_config

REPO = Path(__file__).resolve().parents[2]
LINES = 240
BAD = {"bad-body": 400, "bad-model": 404, "bad-url": None}


def body_of(i: int) -> tuple[str, dict[str, Any]]:
    """Greedy requests of both kinds, short answers: the test measures plumbing, not the models."""
    if i % 3 == 0:
        messages = [{"role": "user", "content": f"Name a colour, number {i}."}]
        return "/v1/chat/completions", {
            "model": "consort",
            "messages": messages,
            "max_tokens": 3,
            "temperature": 0,
        }
    return "/v1/completions", {
        "model": "consort",
        "prompt": f"Item {i}: the",
        "max_tokens": 3,
        "temperature": 0,
    }


def write_input(path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    requests = {f"q{i:03d}": body_of(i) for i in range(LINES)}
    lines = [
        json.dumps({"custom_id": c, "method": "POST", "url": u, "body": b}) for c, (u, b) in requests.items()
    ]
    lines.insert(
        7,
        json.dumps(
            {
                "custom_id": "bad-body",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "consort", "messages": "not a list"},
            }
        ),
    )
    lines.insert(
        50,
        json.dumps(
            {
                "custom_id": "bad-model",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "gpt-4", "prompt": "x"},
            }
        ),
    )
    lines.insert(
        90, json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}})
    )
    path.write_text("\n".join(lines) + "\n")
    return requests


def write_config(path: Path) -> Path:
    # The endpoint fixture's ensemble, so that the same body must get the same answer.
    config = tiny_config(max_context=MAIN_MAX_CONTEXT, max_tokens_limit=MAIN_MAX_TOKENS_LIMIT)
    config["batch"] = {"replicas": 2, "batch_size": 8}
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def env() -> dict[str, str]:
    return {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }


def output_lines(path: Path) -> list[str]:
    # Only whole lines: the writer may be between a line and its newline.
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].splitlines()


def test_a_killed_batch_resumes_and_answers_as_the_endpoint_does(
    tmp_path: Path, ray_cluster: dict[str, Any], openai_app: str
) -> None:
    requests = write_input(tmp_path / "in.jsonl")
    command = [
        sys.executable, "-m", "consort.deploy.jobs.batch",
        "--input", str(tmp_path / "in.jsonl"),
        "--output", str(tmp_path / "out"),
        "--config", str(write_config(tmp_path / "tiny.json")),
        "--address", ray_cluster["address"],
        "--no-progress",
    ]  # fmt: skip
    output = tmp_path / "out" / "output.jsonl"
    first = subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(output_lines(output)) < 40 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        first.kill()  # SIGKILL: no clean-up of any kind
        _, stderr = first.communicate()
    before = output_lines(output)
    assert 40 <= len(before) < LINES, f"not stopped part-way ({len(before)} lines): {stderr.decode()[-2000:]}"

    again = subprocess.run(
        command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert again.returncode == 0, again.stderr[-3000:]
    after = output_lines(output)
    records = [json.loads(line) for line in after]
    ids = [r["custom_id"] for r in records]
    assert sorted(ids) == sorted([*requests, *BAD]), "each custom_id exactly once"
    assert after[: len(before)] == before, "lines written before the kill were rewritten"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["done_before"] == len(before) and summary["lines_this_run"] == LINES + len(BAD) - len(
        before
    )
    assert summary["completion_tokens"] > 0 and summary["completion_tokens_per_s"] > 0
    assert "completion tokens/s" in again.stdout

    by_id = {r["custom_id"]: r for r in records}
    for custom_id, status in BAD.items():
        line = by_id[custom_id]
        if status is None:
            assert line["response"] is None and line["error"]["code"] == "invalid_url"
        else:
            assert line["error"] is None and line["response"]["status_code"] == status
            assert line["response"]["body"]["error"]["message"]
    assert all(by_id[c]["response"]["status_code"] == 200 for c in requests)

    # Greedy answers equal the endpoint's for the same body, text and usage, both kinds of request.
    for custom_id in ["q000", "q001", "q002", "q003", "q121", "q239"]:
        url, body = requests[custom_id]
        expected = httpx.post(f"{openai_app}{url}", json=body, timeout=120)
        assert expected.status_code == 200, expected.text
        want, got = expected.json(), by_id[custom_id]["response"]["body"]
        assert got["object"] == want["object"] and got["usage"] == want["usage"], custom_id
        texts = [c.get("text", c.get("message", {}).get("content")) for c in got["choices"]]
        assert texts == [c.get("text", c.get("message", {}).get("content")) for c in want["choices"]], (
            custom_id
        )
        assert got["choices"] == want["choices"], custom_id
