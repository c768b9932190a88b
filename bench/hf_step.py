"""Decode-step latency of each real model alone, plain Hugging Face forward with a KV cache.

    python -m bench.hf_step [--device cuda] [--tokens 64] [--batches 1,16]

The floor under every Consort figure: what one member's model costs per step in one process, with
no engine, alignment or Ray around it. Each (model, batch) runs twice; the first pass is warm-up
(on a GPU the first tens of steps run 2-3x slower) and both are printed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from consort.runtime import models
from consort.runtime.loop import resolve_dtype


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def step_ms(model: Any, input_ids: torch.Tensor, tokens: int, device: str) -> float:
    out = model(input_ids=input_ids, use_cache=True)
    past, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
    _sync(device)
    started = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=next_ids, cache=past, use_cache=True)
        past, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return 1000 * (time.perf_counter() - started) / tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per pass")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--models", default=",".join(models.PAIR_MEMBERS), help="comma-separated aliases")
    args = parser.parse_args()
    for alias in args.models.split(","):
        model, tokenizer = models.load(alias, device=args.device, dtype=resolve_dtype("auto", args.device))
        prompt = tokenizer("The capital of France is a city that")["input_ids"]
        for batch in (int(b) for b in args.batches.split(",")):
            input_ids = torch.tensor([prompt] * batch, device=args.device)
            passes = [step_ms(model, input_ids, args.tokens, args.device) for _ in range(2)]
            print(f"{alias} batch {batch}: {passes[1]:.1f} ms/step (warm-up pass {passes[0]:.1f})")


if __name__ == "__main__":
    main()
