"""The in-process ensemble loop on one GPU: tokens/s per strategy, its step against the slowest
member's, and where `me` spends its step at concurrency 1 (issue 19, items 3-4 and its targets).

    python -m bench.gpu_ensemble --save-tokenizers .gpu_tok           # here, once: the real tokenizers
    python -m bench.gpu_ensemble --tiny --out /tmp/ge                  # CPU check: tiny shapes
    # on the lent GPU machine (no Ray, no pydantic, no package index there: .whl carries pydantic and
    # llguidance for Python 3.12, see docs/benchmarks.md):
    python -m bench.gpu_ensemble --out $OUT

The members are the default pair (Qwen2.5-Coder-0.5B, main, and SmolLM2-135M) at full size from
their architecture configs (bench/configs/), randomly initialised — a step's speed does not depend
on the weights' values — with their real tokenizers, so the alignment of the two vocabularies does
the work it does in serving. Everything runs through `EnsembleLoop`'s core with the members in this
process (the one-GPU case of issue 19 item 3): no Ray, whose transport is measured on the CPU by
bench/coordinator.py.

Per configuration (each member alone, then `mean`, `me` and `deepen` over the pair) and
concurrency (1 and 32 sequences): `--tokens` tokens per sequence with end-of-sequence ignored,
after a warm-up; wall time, tokens/s, the mean step, and the step's parts as the core reports them
(each member's compute, fusion, and the rest: the loop, alignment and detokenisation). `me` at
concurrency 1 is also run under `torch.profiler` and its top operators kept, to say where its step
goes. Targets of issue 19 computed on the figures: tokens/s ≥ 150 at 1 and ≥ 2,000 at 32 for the
pair, ensemble step ÷ slowest member step ≤ 1.10, `me` ÷ `mean` at 1 ≥ 1.5.

Writes `<out>/gpu_ensemble.json` (`--out`, else $OUT, else ./bench_out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_step import build
from consort.runtime.config import EnsembleConfig, parse_config
from consort.runtime.loop import EnsembleLoop, load_worker
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams

# (member name, architecture config in bench/configs/, packaged alias whose tokenizer it uses)
PAIR = (
    ("qwen05", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"),
    ("smollm2", "smollm2-135m", "smollm2-135m-instruct"),
)
STRATEGIES = ("mean", "me", "deepen")
CONCURRENCY = (1, 32)
TARGETS = {
    "pair_tokens_per_s_c1": 150.0,
    "pair_tokens_per_s_c32": 2000.0,
    "step_over_slowest": 1.10,
    "me_over_mean_c1": 1.5,
}
TOPICS = ["the sea", "a city at night", "bread", "rivers", "an old clock", "winter", "trains", "a garden"]


def save_tokenizers(folder: Path) -> None:
    """The packaged members' tokenizers as plain folders (they travel to the GPU machine; ~9 MB)."""
    from consort.runtime import models

    for name, _, alias in PAIR:
        models.load_tokenizer(alias).save_pretrained(folder / name)
        print(f"saved {alias}'s tokenizer to {folder / name}", file=sys.stderr)


def member_models(
    tiny: bool, device: str, dtype: torch.dtype, tokenizers: Path
) -> dict[str, tuple[Any, Any]]:
    from transformers import AutoTokenizer

    built = {}
    for name, arch, _ in PAIR:
        folder = tokenizers / name
        if not folder.is_dir():
            raise SystemExit(
                f"no tokenizer at {folder}: run `python -m bench.gpu_ensemble --save-tokenizers {tokenizers}`"
            )
        built[name] = (build(arch, tiny, device, dtype), AutoTokenizer.from_pretrained(folder))
    return built


def ensemble_config(
    names: list[str], strategy: str, tokenizers: Path, device: str, kv_cache: str
) -> EnsembleConfig:
    return parse_config(
        {
            "members": [{"name": n, "model": str(tokenizers / n), "kv_cache": kv_cache} for n in names],
            "strategy": strategy,
            "main": names[0],
            "device": device,
            "max_batch": max(CONCURRENCY),
        }
    )


def make_loop(
    models: dict[str, tuple[Any, Any]],
    names: list[str],
    strategy: str,
    kv_cache: str,
    args: argparse.Namespace,
) -> EnsembleLoop:
    config = ensemble_config(names, strategy, args.tokenizers, args.device, kv_cache)
    return EnsembleLoop(config, {n: load_worker(config, n, args.device, models[n]) for n in names})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_batch(loop: EnsembleLoop, concurrency: int, tokens: int, device: str) -> dict[str, Any]:
    """`concurrency` sequences of `tokens` tokens each, stepped together to the end."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    core = loop.core
    for i in range(concurrency):
        core.add(Prompt(text=f"Write a short poem about {TOPICS[i % len(TOPICS)]}, number {i}."), params)
    steps, emitted = 0, 0
    parts: dict[str, float] = {"fusion": 0.0}
    sync(device)
    started = time.perf_counter()
    while core.running or core.waiting:
        deltas = asyncio.run(core.step())
        steps += 1
        for delta in deltas:
            if delta.error is not None:
                raise delta.error
            if delta.finish_reason is not None:
                emitted += delta.completion_tokens
        stats = core.last_stats
        if stats is not None:
            parts["fusion"] += stats.fusion_seconds
            for member, seconds in stats.member_seconds.items():
                parts[member] = parts.get(member, 0.0) + seconds
    sync(device)
    wall = time.perf_counter() - started
    parts_ms = {k: 1000 * v / steps for k, v in parts.items()}
    parts_ms["rest"] = 1000 * wall / steps - sum(parts_ms.values())
    return {
        "concurrency": concurrency,
        "tokens": emitted,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(emitted / wall, 2),
        "steps": steps,
        "step_ms": round(1000 * wall / steps, 3),
        "parts_ms_per_step": {k: round(v, 3) for k, v in parts_ms.items()},
    }


def profile_me(loop: EnsembleLoop, tokens: int, device: str) -> list[dict[str, Any]]:
    """`me` at concurrency 1 under torch.profiler: the operators that take its step's time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run_batch(loop, 1, tokens, device)
    rows = []
    for event in sorted(prof.key_averages(), key=lambda e: e.cpu_time_total, reverse=True)[:30]:
        rows.append(
            {
                "name": event.key,
                "calls": event.count,
                "cpu_ms": round(event.cpu_time_total / 1000, 3),
                "device_ms": round(getattr(event, "device_time_total", 0.0) / 1000, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (2 layers, width 64) for a CPU check")
    p.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    p.add_argument("--tokenizers", type=Path, default=Path(".gpu_tok"))
    p.add_argument("--save-tokenizers", type=Path, help="write the members' tokenizers here and exit")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new configuration after this")
    p.add_argument(
        "--kv-cache",
        default="dynamic,static",
        help="the members' kv_cache settings to measure, in turn (static: slots, graphs on CUDA)",
    )
    args = p.parse_args(argv)
    if args.save_tokenizers:
        save_tokenizers(args.save_tokenizers)
        return 0
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "tiny": args.tiny,
        "tokens_per_sequence": args.tokens,
        "runs": {},
        "skipped": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        (out / "gpu_ensemble.json").write_text(json.dumps(report, indent=2) + "\n")

    models = member_models(args.tiny, args.device, dtype, args.tokenizers)
    names = [n for n, _, _ in PAIR]
    configurations = [(f"{n} alone", [n], "mean") for n in names] + [(s, names, s) for s in STRATEGIES]
    for kv_cache in args.kv_cache.split(","):
        runs = report["runs"].setdefault(kv_cache, {})
        for label, members, strategy in configurations:
            if time.perf_counter() - started > args.budget_s:
                report["skipped"].append(f"{label} [{kv_cache}]: over the {args.budget_s:.0f} s budget")
                continue
            loop = make_loop(models, members, strategy, kv_cache, args)
            # Warm-up with the timed shapes: kernels, the allocator, the anchors' first use, and in
            # static mode the capture of each batch and length bucket's graph.
            for concurrency in CONCURRENCY:
                run_batch(loop, concurrency, args.tokens, args.device)
            runs[label] = {str(c): run_batch(loop, c, args.tokens, args.device) for c in CONCURRENCY}
            runs[label]["engines"] = {
                n: {
                    "kv_cache": w.engine.kv_cache,
                    "cuda_graphs": w.engine.cuda_graphs,
                    "graph_error": w.engine.graph_error,
                }
                for n, w in loop.workers.items()
            }
            print(
                f"{label} [{kv_cache}]",
                {c: r["tokens_per_s"] for c, r in runs[label].items() if c != "engines"},
                file=sys.stderr,
                flush=True,
            )
            if strategy == "me":
                report.setdefault("me_profile_c1", {})[kv_cache] = profile_me(
                    loop, min(args.tokens, 16), args.device
                )
            write()
    report["figures"] = {kv_cache: figures(runs, names) for kv_cache, runs in report["runs"].items()}
    write()
    print(json.dumps(report["figures"], indent=2))
    return 0


def figures(runs: dict[str, dict[str, dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    """The issue's ratios from the runs that finished."""
    result: dict[str, Any] = {"targets": TARGETS}
    alone = [runs.get(f"{n} alone") for n in names]
    for strategy in STRATEGIES:
        run = runs.get(strategy)
        if run is None:
            continue
        entry: dict[str, Any] = {f"tokens_per_s_c{c}": run[str(c)]["tokens_per_s"] for c in CONCURRENCY}
        if all(alone):
            for c in CONCURRENCY:
                slowest = max(a[str(c)]["step_ms"] for a in alone if a is not None)
                entry[f"step_over_slowest_c{c}"] = round(run[str(c)]["step_ms"] / slowest, 3)
                entry[f"step_over_sum_c{c}"] = round(
                    run[str(c)]["step_ms"] / sum(a[str(c)]["step_ms"] for a in alone if a is not None), 3
                )
        result[strategy] = entry
    if "me" in runs and "mean" in runs:
        for c in CONCURRENCY:
            result[f"me_over_mean_c{c}"] = round(
                runs["me"][str(c)]["tokens_per_s"] / runs["mean"][str(c)]["tokens_per_s"], 3
            )
    return result


if __name__ == "__main__":
    sys.exit(main())
