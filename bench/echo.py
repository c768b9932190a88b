"""Echo (prompt log-probs) in one forward per member against one prefill, and against piece by piece.

    python -m bench.echo [--repeats 3] [--only deepen]

In process, real packaged models (fp32, 1 thread each, as the member actors run on CPU).
For each case: the seconds to score a prompt of about `--tokens` tokens, and the ratio to
one prefill of the slowest member involved (the issue's target: <= 2x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import torch

from bench.common import machine
from consort.runtime.config import parse_config
from consort.runtime.core import EnsembleCore
from consort.runtime.loop import EnsembleLoop, load_worker
from consort.runtime.prompts import Prompt
from consort.runtime.scoring import add_scoring
from consort.runtime.types import RequestOptions

TEXT = (
    "Question: Which of the following is produced during the process of cellular respiration? "
    "Cellular respiration breaks glucose down in the presence of oxygen, and the cell captures the energy "
    "released as ATP. The other products are carbon dioxide, which the organism breathes out, and water. "
    "Plants do the reverse in photosynthesis, taking in carbon dioxide and light to make sugar and oxygen. "
    "Answer: carbon dioxide and water, along with the energy stored in ATP."
)


def _drain(core: EnsembleCore, seq_id: str) -> int:
    entries = 0
    while core.has_work:
        for delta in asyncio.run(core.step()):
            if delta.seq_id == seq_id:
                entries += len(delta.logprobs)
    return entries


def _split(core: EnsembleCore, text: str) -> tuple[str, str]:
    tokenizer = core.members[core.ctx.main].tokenizer
    head = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:1])
    return head, text[len(head) :]


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def prefill_seconds(loop: EnsembleLoop, member: str, text: str, repeats: int) -> float:
    engine = loop.workers[member].engine
    ids = engine.tokenizer(text, add_special_tokens=True)["input_ids"]

    def once() -> None:
        engine.add("prefill", ids)
        engine.step(["prefill"], top_k=1)
        engine.remove("prefill")

    return _time(once, repeats)


def echo_seconds(loop: EnsembleLoop, text: str, options: RequestOptions, repeats: int, *, one_forward: bool) -> float:
    core = loop.core
    head, rest = _split(core, text)

    def once() -> None:
        if one_forward:
            seq_id = core.add_echo(head, rest, options)
            assert seq_id is not None
        else:
            seq_id = add_scoring(core, Prompt(text=head), rest, options)
        assert _drain(core, seq_id) > 0

    return _time(once, repeats)


def round_breakdown(loop: EnsembleLoop, text: str, options: RequestOptions) -> dict[str, float]:
    """Seconds each member spends in an echo's round, and the main member's inverse searches apart:
    on member actors the members run at once, so the round takes about the slowest member's
    forwards plus the searches (which wait for the others' results)."""
    core = loop.core
    head, rest = _split(core, text)
    seconds: dict[str, float] = {}
    wrapped = {}
    for name, worker in loop.workers.items():
        for method in ("step", "finish_inverts"):
            original = getattr(worker, method)
            wrapped[(name, method)] = original

            def timed(*args: Any, _original: Any = original, _key: str = f"{name} {method}") -> Any:
                started = time.perf_counter()
                try:
                    return _original(*args)
                finally:
                    seconds[_key] = seconds.get(_key, 0.0) + time.perf_counter() - started

            setattr(worker, method, timed)
    try:
        seq_id = core.add_echo(head, rest, options)
        assert seq_id is not None
        _drain(core, seq_id)
    finally:
        for (name, method), original in wrapped.items():
            setattr(loop.workers[name], method, original)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the JSON record here too")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = EnsembleLoop.from_config(
        parse_config(
            {"members": [{"name": "smollm2", "model": "smollm2-135m-instruct"}, {"name": "gemma3", "model": "gemma3-270m"}],
             "strategy": "mean", "main": "smollm2"}
        ),
        device="cpu",
    )
    twins_config = parse_config(
        {"members": [{"name": "a", "model": "smollm2-135m-instruct"}, {"name": "b", "model": "smollm2-135m-instruct"}],
         "strategy": "mean"}
    )
    smol = pair.workers["smollm2"].engine
    twins = EnsembleLoop(twins_config, {n: load_worker(twins_config, n, "cpu", (smol.model, smol.tokenizer)) for n in "ab"})
    tokens = len(pair.workers["smollm2"].tokenizer(TEXT)["input_ids"])
    prefill = {m: prefill_seconds(pair, m, TEXT, args.repeats) for m in ("smollm2", "gemma3")}
    cases = {
        "smollm2 alone, one forward": (pair, RequestOptions(strategy="me", weights=[1, 0], logprobs=1), True, prefill["smollm2"]),
        "smollm2 alone, piece by piece": (pair, RequestOptions(strategy="me", weights=[1, 0], logprobs=1), False, prefill["smollm2"]),
        "gemma3 alone, one forward": (pair, RequestOptions(strategy="me", weights=[0, 1], logprobs=1), True, prefill["gemma3"]),
        "mean of two members sharing a vocabulary, one forward": (twins, RequestOptions(strategy="mean", logprobs=1), True, prefill["smollm2"]),
        "mean of smollm2 + gemma3 (different vocabularies), one forward each (text level)": (
            pair, RequestOptions(strategy="mean", logprobs=1), True, max(prefill.values())),
        "mean of smollm2 + gemma3 (different vocabularies), piece by piece": (
            pair, RequestOptions(strategy="mean", logprobs=1), False, max(prefill.values())),
        "deepen of smollm2 + gemma3, one round (positions + forks)": (
            pair, RequestOptions(strategy="deepen", logprobs=1), True, max(prefill.values())),
        "deepen of smollm2 + gemma3, piece by piece": (
            pair, RequestOptions(strategy="deepen", logprobs=1), False, max(prefill.values())),
    }
    if args.only:
        cases = {name: case for name, case in cases.items() if args.only in name}
    record: dict[str, Any] = {"machine": machine(), "prompt_tokens_smollm2": tokens, "prefill_seconds": prefill, "cases": {}}
    for name, (loop, options, one_forward, floor) in cases.items():
        seconds = echo_seconds(loop, TEXT, options, args.repeats, one_forward=one_forward)
        record["cases"][name] = {"seconds": seconds, "x_slowest_prefill": seconds / floor}
        print(f"{name:70s} {seconds:7.3f} s  {seconds / floor:6.2f}x prefill", flush=True)
    if not args.only or "deepen" in args.only:
        record["deepen_round_seconds"] = round_breakdown(pair, TEXT, RequestOptions(strategy="deepen", logprobs=1))
    print(json.dumps(record, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
