"""The README's first request against running endpoints, side by side: time to first token and tokens/s.

    consort serve --config ensemble.yaml --port 8001 &            # one endpoint per ensemble
    consort serve --config examples/knowledge-pair.yaml --port 8002 &
    python -m bench.readme_curl --url new=http://127.0.0.1:8001 --url old=http://127.0.0.1:8002 --rounds 5

Requests alternate between the endpoints, so drifting load on this shared machine hits them
alike. Each round sends the README's chat request ("Name a French city.", 32 tokens), streamed,
greedy, so every round of one endpoint gives the same answer (printed once), for the time to first
token; then the same request with `ignore_eos`, so that 32 tokens are always generated, for tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from bench.common import machine

BODY = {
    "model": "consort",
    "messages": [{"role": "user", "content": "Name a French city."}],
    "max_tokens": 32,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def one_request(url: str, **extra: object) -> dict[str, float | str]:
    started = time.perf_counter()
    first, text, tokens = None, "", 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**BODY, **extra}, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - started
                text += piece
    total = time.perf_counter() - started
    assert first is not None
    return {"ttft_s": first, "total_s": total, "tokens": tokens, "text": text,
            "tokens_per_s": (tokens - 1) / (total - first) if tokens > 1 and total > first else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", action="append", required=True, help="NAME=BASE_URL, one per endpoint")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the JSON record here too")
    args = parser.parse_args()
    urls = dict(item.split("=", 1) for item in args.url)
    runs: dict[str, list[dict[str, float | str]]] = {name: [] for name in urls}
    long_runs: dict[str, list[dict[str, float | str]]] = {name: [] for name in urls}
    for url in urls.values():
        one_request(url)  # warm-up: the first request pays for lazy set-up
    for _ in range(args.rounds):
        for name, url in urls.items():
            runs[name].append(one_request(url))
            long_runs[name].append(one_request(url, ignore_eos=True))
    record = {"machine": machine(), "rounds": args.rounds, "endpoints": {}}
    for name, results in runs.items():
        summary = {
            "answer": results[0]["text"],
            "ttft_s_median": statistics.median(float(r["ttft_s"]) for r in results),
            "tokens_per_s_median": statistics.median(float(r["tokens_per_s"]) for r in long_runs[name]),
            "completion_tokens": results[0]["tokens"],
        }
        record["endpoints"][name] = summary
        print(f"{name:10s} ttft {summary['ttft_s_median']:.3f} s  {summary['tokens_per_s_median']:.1f} tok/s  "
              f"{summary['completion_tokens']} tokens: {summary['answer']!r}", flush=True)
    print(json.dumps(record, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
