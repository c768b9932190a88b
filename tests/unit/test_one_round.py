"""DeePEn in one round: the main member runs the inverse search within its step, from the other
members' results of the same round, and the outputs equal the two-round path's (a round of its
own after the step, `EnsembleCore.invert_in_step = False`) exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from consort.runtime.fusion.deepen import DeepenStrategy
from consort.runtime.loop import EnsembleLoop
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.scoring import add_scoring
from consort.runtime.types import InvertSpec, RequestOptions, SeqResult, SeqWork
from consort.runtime.worker import inverting_member
from tests.unit.conftest import ALIASES, make_loop

PROMPTS = [
    Prompt(text="The capital of France is"),
    Prompt(text="1, 2, 3,"),
    Prompt(messages=[{"role": "user", "content": "Say hi"}]),
]
# Different tokenizers (SmolLM2's byte-level BPE, Gemma-3's SentencePiece), either one as the main
# member, and three members with unequal weights.
ENSEMBLES = {
    "smol_main": ([("smol", ALIASES[0]), ("gemma", ALIASES[1])], None),
    "gemma_main": ([("gemma", ALIASES[1]), ("smol", ALIASES[0])], [0.7, 0.3]),
    "three": ([("smol", ALIASES[0]), ("gemma", ALIASES[1]), ("smol2", ALIASES[0])], [1.0, 2.0, 0.5]),
}


def _outputs(loop: EnsembleLoop, weights: list[float] | None, gate: float | None) -> dict[str, Any]:
    options = RequestOptions(strategy="deepen", weights=weights, gate=gate, logprobs=3)
    greedy = loop.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), options)
    sampled = loop.generate(PROMPTS, SamplingParams(temperature=0.9, max_tokens=6, seed=5, ignore_eos=True), options)
    core = loop.core
    scored = add_scoring(core, PROMPTS[0], " Paris, of course.", RequestOptions(strategy="deepen", weights=weights))
    scores = []
    while core.has_work:
        for delta in asyncio.run(core.step()):
            if delta.seq_id == scored:
                scores += [(t.token, t.logprob) for t in delta.logprobs or []]
    return {
        "greedy": [(c.text, [(t.token, t.logprob, t.top) for t in c.logprobs or []]) for c in greedy],
        "sampled": [c.text for c in sampled],
        "scores": scores,
    }


def _rounds(loop: EnsembleLoop, weights: list[float] | None, gate: float | None) -> list[tuple[int, int]]:
    core = loop.core
    core.add(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), RequestOptions(strategy="deepen", weights=weights, gate=gate))
    rounds = []
    while core.has_work:
        asyncio.run(core.step())
        rounds.append((core.last_stats.rounds, core.last_stats.fused))
    return rounds


@pytest.mark.parametrize("gate", [None, 0.5])
@pytest.mark.parametrize("ensemble", sorted(ENSEMBLES))
def test_one_round_deepen_equals_the_two_round_path(tiny_models, ensemble: str, gate: float | None) -> None:
    members, weights = ENSEMBLES[ensemble]
    loop = make_loop(tiny_models, members, strategy="deepen")
    loop.core.invert_in_step = False
    two_rounds = _outputs(loop, weights, gate)
    two_round_counts = _rounds(loop, weights, gate)
    loop.core.invert_in_step = True
    one_round = _outputs(loop, weights, gate)
    one_round_counts = _rounds(loop, weights, gate)
    assert one_round == two_rounds
    assert all(text for text, _ in one_round["greedy"]) and len(one_round["scores"]) == 5
    # The tiny members are never sure (top probability < 0.5), so the gate always consults them all;
    # a step fuses unless the text ends inside a character (then its owner alone goes on, in one round).
    extra = 0 if gate is None else 1
    assert [fused for _, fused in one_round_counts] == [fused for _, fused in two_round_counts]
    assert one_round_counts[0] == (1 + extra, 1)
    for (one, fused), (two, _) in zip(one_round_counts, two_round_counts, strict=True):
        assert one == (1 + extra if fused else 1)
        assert two == one + fused  # the inverse search's own round


def test_the_fused_steps_really_fused(tiny_models) -> None:
    """Each step's decision came from the search the main member ran, not from one member alone."""
    members, _ = ENSEMBLES["smol_main"]
    loop = make_loop(tiny_models, members, strategy="deepen")
    core = loop.core
    core.add(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), RequestOptions(strategy="deepen"))
    seen = []
    original = DeepenStrategy.decide

    def spy(self: DeepenStrategy, seq: Any, results: dict[str, SeqResult], inverted: torch.Tensor | None) -> Any:
        seen.append((inverted is not None, results["smol"].inverted is not None, results["gemma"].inverted is None))
        return original(self, seq, results, inverted)

    DeepenStrategy.decide = spy  # type: ignore[method-assign]
    try:
        while core.has_work:
            asyncio.run(core.step())
    finally:
        DeepenStrategy.decide = original  # type: ignore[method-assign]
    assert seen == [(True, True, True)] * 3


def test_only_one_member_inverts_per_round() -> None:
    spec = InvertSpec(members=["a", "b"], weights=[0.5, 0.5], top_k=4, steps=1, learning_rate=1.0)
    assert inverting_member({"a": [SeqWork("s", invert=spec)], "b": [SeqWork("s")]}) == "a"
    assert inverting_member({"a": [SeqWork("s")], "b": [SeqWork("s")]}) is None
    with pytest.raises(ValueError, match="only the main member"):
        inverting_member({"a": [SeqWork("s", invert=spec)], "b": [SeqWork("t", invert=spec)]})


def test_the_main_member_fails_loudly_without_the_others_results(tiny_models) -> None:
    members, _ = ENSEMBLES["smol_main"]
    loop = make_loop(tiny_models, members, strategy="deepen")
    worker = loop.workers["smol"]
    spec = InvertSpec(members=["smol", "gemma"], weights=[0.5, 0.5], top_k=16, steps=2, learning_rate=1.0)
    ids = worker.tokenizer("Hello there")["input_ids"]
    works = [SeqWork("s", prompt_ids=ids, relative=True, invert=spec)]
    results = worker.step(works)
    with pytest.raises(RuntimeError, match="this round did not bring them"):
        worker.finish_inverts(works, results, {})
    worker.release(["s"])
