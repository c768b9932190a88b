"""Batch inference on Ray Data against the same requests sent to the endpoint one by one, in one run.

    python -m bench.batch --requests 96 --max-tokens 16 --replicas 2            # tiny members
    python -m bench.batch --members smollm2-135m-instruct,gemma3-270m --requests 48

1. The endpoint (the Serve app `consort serve` runs) answers the requests one at a time over
   HTTP, each sent when the previous one is answered: what a client without a batch API does.
2. `consort batch` runs the same requests as an OpenAI batch file through its Ray Data pool.

Both use one ensemble config; the endpoint's start-up is not timed, the batch's is reported
apart (its replicas load their models inside the job). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import PROMPTS


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    members = [m.strip() for m in args.members.split(",")]
    return {
        "name": "consort",
        "members": [
            {"name": f"m{i}", "model": m, "num_cpus": args.member_cpus} for i, m in enumerate(members)
        ],
        "strategy": args.strategy,
        "max_batch": args.max_batch,
        "batch": {"replicas": args.replicas, "batch_size": args.batch_size},
    }


def bodies(n: int, max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i in range(n):
        prompt = f"{PROMPTS[i % len(PROMPTS)]} ({i})"
        if i % 2:
            messages = [{"role": "user", "content": prompt}]
            out.append(
                (
                    "/v1/chat/completions",
                    {"model": "consort", "messages": messages, "max_tokens": max_tokens, "temperature": 0},
                )
            )
        else:
            out.append(
                (
                    "/v1/completions",
                    {"model": "consort", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                )
            )
    return out


def one_by_one(config: dict[str, Any], requests: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    from ray import serve

    from consort.deploy.app import ensemble_app
    from consort.runtime.config import parse_config
    from tests.integration.conftest import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ensemble_app(parse_config(config)), name="bench", route_prefix="/bench", blocking=False)
    base = f"http://127.0.0.1:{port}/bench"
    try:
        with httpx.Client(timeout=600) as client:
            client.post(
                f"{base}/v1/completions", json={"model": "consort", "prompt": "warm", "max_tokens": 2}
            ).raise_for_status()
            tokens, started = 0, time.perf_counter()
            for url, body in requests:
                answer = client.post(f"{base}{url}", json=body)
                answer.raise_for_status()
                tokens += int(answer.json()["usage"]["completion_tokens"])
            seconds = time.perf_counter() - started
    finally:
        serve.delete("bench", _blocking=True)
        serve.shutdown()
    return {
        "completion_tokens": tokens,
        "wall_s": round(seconds, 2),
        "completion_tokens_per_s": round(tokens / seconds, 2),
    }


def batch(config: dict[str, Any], requests: list[tuple[str, dict[str, Any]]], folder: Path) -> dict[str, Any]:
    from consort.deploy.jobs.batch import build_parser, run

    source = folder / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}) + "\n"
            for i, (url, body) in enumerate(requests)
        )
    )
    (folder / "config.json").write_text(json.dumps(config))
    args = build_parser().parse_args(
        [
            "--input",
            str(source),
            "--output",
            str(folder / "out"),
            "--config",
            str(folder / "config.json"),
            "--no-progress",
        ]
    )
    summary = run(args)
    failed = summary["failed_this_run"]
    if failed:
        raise RuntimeError(f"{failed} batch lines failed; see {folder / 'out' / 'output.jsonl'}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", default="tiny:smollm2-135m-instruct,tiny:gemma3-270m")
    parser.add_argument("--strategy", default="mean")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--member-cpus", type=float, default=0.5)
    parser.add_argument("--cpus", type=int, default=8, help="logical CPU slots of the local Ray instance")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    config, requests = config_of(args), bodies(args.requests, args.max_tokens)
    try:
        serial = one_by_one(config, requests)
        with tempfile.TemporaryDirectory() as folder:
            pooled = batch(config, requests, Path(folder))
    finally:
        ray.shutdown()
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "one_by_one": serial,
        "batch": {k: pooled[k] for k in (
            "completion_tokens", "wall_s", "startup_s", "completion_tokens_per_s",
            "completion_tokens_per_s_after_startup", "total_tokens_per_s",
        )},
        "ratio_whole_job": round(pooled["completion_tokens_per_s"] / serial["completion_tokens_per_s"], 2),
        "ratio_after_startup": round(
            pooled["completion_tokens_per_s_after_startup"] / serial["completion_tokens_per_s"], 2
        ),
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
