"""The probability of text, not of token strings (issue 15, item 0): text-level scoring across
tokenizers, and `mean`'s mixture over pieces, on the real SmolLM2 and Gemma-3 vocabularies."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from consort.runtime.evaluation.logliks import (
    LoglikRequest,
    ensemble_logliks,
    member_logliks,
    text_mixture,
    text_plans,
)
from consort.runtime.fusion.mean import MeanStrategy
from consort.runtime.prompts import Prompt
from consort.runtime.scoring import add_scoring, per_main_token
from consort.runtime.textprob import TextScorer, char_starts, text_greedy
from consort.runtime.types import RequestOptions, SeqResult
from tests.unit.conftest import make_loop

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
# Texts the two vocabularies cut in different places (checked below), and one with a character
# of several bytes, which a cut may never split.
TEXTS = [" antidisestablishmentarianism:", " unbelievably:[1]", " naïve café — 東京"]


def brute_cover(table, logprobs: torch.Tensor, prefix: bytes) -> float:
    """Mass of the tokens whose bytes start with `prefix`, by walking the whole vocabulary."""
    ids = [i for i in range(table.vocab_size) if not table.is_special(i) and table.token_bytes(i).startswith(prefix)]
    return float(logprobs[ids].exp().sum())


def random_logprobs(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.log_softmax(torch.randn(size, generator=generator) * 3, dim=-1)


@pytest.mark.parametrize("prefix", [b":", b" the", b" refriger", b"\xc3", b"zzzzqqq"])
def test_prefix_ids_are_exactly_the_tokens_starting_with_the_prefix(tables, prefix: bytes) -> None:
    for table in tables.values():
        expected = {
            i for i in range(table.vocab_size) if not table.is_special(i) and table.token_bytes(i).startswith(prefix)
        }
        assert set(table.prefix_ids(prefix).tolist()) == expected


def test_the_two_vocabularies_cut_these_texts_differently(tables) -> None:
    cut = [{name: table.encode_spans(text.encode())[1] for name, table in tables.items()} for text in TEXTS]
    assert all(ends[SMOL] != ends[GEMMA] for ends in cut)


def run_scorer(tables, text: str, weights: dict[str, float], seed: int = 0):
    """Score `text` with a fresh random distribution per member per step; returns the piece
    log-probs and, per member, the distributions it was given at each step."""
    scorer = TextScorer(text.encode(), {SMOL: tables[SMOL], GEMMA: tables[GEMMA]}, SMOL)
    generator = torch.Generator().manual_seed(seed)
    given: dict[str, list[torch.Tensor]] = {SMOL: [], GEMMA: []}
    out = []
    for _ in scorer.pieces:
        results = {}
        for name in (SMOL, GEMMA):
            logprobs = random_logprobs(tables[name].vocab_size, generator)
            given[name].append(logprobs)
            results[name] = SeqResult(seq_id="s", logprobs=logprobs)
        out.append(scorer.advance(results, weights))
    return scorer, out, given


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("member", [SMOL, GEMMA])
def test_a_member_alone_scores_its_own_tokenization_exactly(tables, text: str, member: str) -> None:
    """Weight on one member: the pieces' log-probs sum to the member's own tokens' log-probs, each
    taken from the distribution it gave at the step where that token began."""
    other = GEMMA if member == SMOL else SMOL
    scorer, out, given = run_scorer(tables, text, {member: 1.0, other: 0.0})
    ids, ends = tables[member].encode_spans(text.encode())
    starts = [0, *ends[:-1]]
    step_at = {}
    position = 0
    for index, piece in enumerate(scorer.pieces):
        step_at[position] = index
        position += len(piece.key)
    assert not scorer.tracks[member].dropped  # every token end of the member is a cut here
    expected = sum(float(given[member][step_at[s]][t]) for s, t in zip(starts, ids, strict=True))
    assert sum(out) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_cut_where_any_member_cuts_and_never_inside_a_character(tables, text: str) -> None:
    data = text.encode()
    scorer = TextScorer(data, {SMOL: tables[SMOL], GEMMA: tables[GEMMA]}, SMOL)
    assert b"".join(p.key for p in scorer.pieces) == data
    lead = set(tables[SMOL].encode_spans(data)[1])
    other = set(tables[GEMMA].encode_spans(data)[1])
    ends, position = [], 0
    for piece in scorer.pieces:
        position += len(piece.key)
        ends.append(position)
    # The lead (main) member's cuts all, even inside a character; the other's between characters.
    assert lead <= set(ends) <= lead | {c for c in other if c in char_starts(data)}
    for piece, end in zip(scorer.pieces, ends, strict=True):
        if end not in char_starts(data):  # only the lead may go on inside a character: it owns the piece
            assert piece.owner == SMOL
    for piece in scorer.pieces:  # an owner's token is exactly the piece
        if piece.owner:
            assert tables[piece.owner].token_bytes(piece.token_id) == piece.key


def test_mid_token_pieces_count_every_token_that_goes_on_with_the_text(tables) -> None:
    """Inside a member's token, a piece's probability is a ratio of prefix masses over its whole
    vocabulary (computed here by brute force), and the ensemble's is the weighted mixture."""
    text = TEXTS[0]
    scorer, out, given = run_scorer(tables, text, {SMOL: 0.3, GEMMA: 0.7}, seed=3)
    position, since = 0, {SMOL: (0, b""), GEMMA: (0, b"")}
    bounds = {name: set(tables[name].encode_spans(text.encode())[1]) for name in (SMOL, GEMMA)}
    for step, piece in enumerate(scorer.pieces):
        end = position + len(piece.key)
        mixture = 0.0
        for name, weight in ((SMOL, 0.3), (GEMMA, 0.7)):
            if position == 0 or position in bounds[name]:
                since[name] = (step, b"")
            base_step, prefix = since[name]
            base = given[name][base_step]
            before = 1.0 if not prefix else brute_cover(tables[name], base, prefix)
            text_so_far = prefix + piece.key
            if end in bounds[name]:
                now = math.exp(float(base[tables[name].id_of(text_so_far)]))
            else:
                now = brute_cover(tables[name], base, text_so_far)
            mixture += weight * now / before
            since[name] = (base_step, text_so_far)
        assert out[step] == pytest.approx(math.log(mixture), abs=1e-4)
        position = end


@pytest.fixture(scope="module")
def pair(tiny_models):
    return make_loop(tiny_models, [("smollm2", SMOL), ("gemma3", GEMMA)], strategy="mean", main="smollm2")


def top(table, entries: dict[bytes, float]) -> SeqResult:
    ids = [table.id_of(key) for key in entries]
    assert None not in ids, entries
    return SeqResult(
        seq_id="s", top_ids=torch.tensor(ids), top_logprobs=torch.tensor([math.log(p) for p in entries.values()])
    )


def test_mean_gives_a_piece_both_members_agree_on_its_own_probability(pair) -> None:
    """Both members put 0.95 on ":"; one spreads the rest over tokens that go on with ":" (":[",
    ":\\n"). Those are further ways of writing ":" text, not rivals: ":" stays at 0.95 (the old
    union average gave each of them the other member's ":" mass and ":" fell below 0.5)."""
    strategy = pair.core.strategy("mean")
    assert isinstance(strategy, MeanStrategy)
    smol, gemma = pair.core.ctx.table("smollm2"), pair.core.ctx.table("gemma3")
    colon_pieces = [k for k in (b":[", b":\n", b":\"", b"::") if smol.id_of(k) is not None]
    assert len(colon_pieces) >= 2
    results = {
        "smollm2": top(smol, {b":": 0.95, **{k: 0.05 / len(colon_pieces) for k in colon_pieces}}),
        "gemma3": top(gemma, {b":": 0.95, b" the": 0.05}),
    }
    decision = strategy._union_average(results, {"smollm2": 0.5, "gemma3": 0.5}, None)
    probs = decision.logprobs.exp()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    keys = [c.key for c in decision.candidates]
    assert float(probs[keys.index(b":")]) == pytest.approx(0.95, abs=0.01)
    for candidate in decision.candidates:  # every piece is fed exactly by a member that has it as one token
        table = pair.core.ctx.table(candidate.owner)
        assert table.token_bytes(candidate.token_id) == candidate.key


def test_mean_of_a_member_with_weight_zero_is_that_member_alone(pair) -> None:
    strategy = pair.core.strategy("mean")
    smol, gemma = pair.core.ctx.table("smollm2"), pair.core.ctx.table("gemma3")
    results = {
        "smollm2": top(smol, {b" Paris": 0.6, b" Lyon": 0.3, b" the": 0.1}),
        "gemma3": top(gemma, {b" London": 0.9, b" Paris": 0.1}),
    }
    decision = strategy._union_average(results, {"smollm2": 1.0, "gemma3": 0.0}, None)
    got = {c.key: float(p) for c, p in zip(decision.candidates, decision.logprobs.exp(), strict=True)}
    assert got[b" Paris"] == pytest.approx(0.6, abs=1e-5)
    assert got[b" Lyon"] == pytest.approx(0.3, abs=1e-5)
    assert got.get(b" London", 0.0) == pytest.approx(0.0, abs=1e-6)


def test_echo_regroups_the_pieces_into_the_main_members_tokens(pair) -> None:
    """Echo log-probs come one per main-member token (what lm-eval counts), each the sum of its pieces."""
    core = pair.core
    text = TEXTS[0]
    seq_id = add_scoring(core, Prompt(text="Hello"), text, RequestOptions(strategy="mean"))
    pieces = []
    finished = False
    while not finished:
        for delta in asyncio.run(core.step()):
            if delta.seq_id == seq_id:
                pieces.extend(delta.logprobs)
                finished = delta.finish_reason is not None
    table = core.ctx.table("smollm2")
    ids, _ = table.encode_spans(text.encode())
    assert len(pieces) > len(ids)  # the other member cuts this text elsewhere: more pieces than tokens
    merged = per_main_token(core, text, pieces)
    assert [m.data for m in merged] == [table.token_bytes(i) for i in ids]
    assert sum(m.logprob for m in merged) == pytest.approx(sum(p.logprob for p in pieces), abs=1e-5)
    assert all(m.logprob <= 1e-6 for m in merged)


@pytest.mark.parametrize("text", TEXTS)
def test_one_pass_per_member_equals_the_step_by_step_scorer_where_both_are_exact(pair, text: str) -> None:
    """The text-level log-likelihood from each member's own echo pass (no stepping) equals the
    core's piece-by-piece text scoring wherever the latter needs no sitting out, and is exact for
    a member alone (its own tokens' log-probs)."""
    core = pair.core
    request = LoglikRequest("Question: what word is this?\nAnswer:", text)
    plans = text_plans([request], core.ctx.tables)
    member_lls = {
        name: asyncio.run(member_logliks(core.executor, core.members[name], [request], prefixes=[plans[0].queries(name)]))
        for name in core.ctx.names
    }
    for name in core.ctx.names:  # alone: the member's own log-likelihood
        (alone,) = text_mixture(plans, member_lls, {n: float(n == name) for n in core.ctx.names})
        assert alone.logprob == pytest.approx(member_lls[name][0].logprob, abs=1e-4)
    (offline,) = text_mixture(plans, member_lls, {"smollm2": 0.4, "gemma3": 0.6})
    (stepwise,) = asyncio.run(ensemble_logliks(core, [request], [RequestOptions(strategy="mean", weights=[0.4, 0.6])]))[0]
    scorer = TextScorer(text.encode(), core.ctx.tables, "smollm2")
    if not any(track.dropped for track in scorer.tracks.values()):
        assert offline.logprob == pytest.approx(stepwise.logprob, abs=1e-3)
        assert offline.tokens == stepwise.tokens
    else:  # the one-pass plan also cuts inside characters, where the stepwise scorer cannot
        assert offline.tokens > stepwise.tokens
    assert offline.logprob <= 1e-6


def test_echo_of_different_vocabularies_takes_one_forward_per_member(pair) -> None:
    """Echo under mean over SmolLM2 and Gemma-3 tokens: one round, one forward per member, and the
    same log-probs per main-member token as scoring piece by piece (where that is exact)."""
    core = pair.core
    context, text = "Question", ": the antidisestablishmentarianism of unbelievably old ideas."
    options = RequestOptions(strategy="mean", weights=[0.3, 0.7], logprobs=2)
    rounds = []
    original = core.executor.step

    async def counting(works, release=None):
        rounds.append(sorted(works))
        return await original(works, release)

    core.executor.step = counting  # type: ignore[method-assign]
    try:
        echo_id = core.add_echo(context, text, options)
        assert echo_id is not None
        fast = []
        while echo_id not in {d.seq_id for d in fast}:
            fast.extend(asyncio.run(core.step()))
    finally:
        core.executor.step = original  # type: ignore[method-assign]
    assert rounds == [["gemma3", "smollm2"]]
    (delta,) = [d for d in fast if d.seq_id == echo_id]
    slow_id = add_scoring(core, Prompt(text=context), text, options)
    pieces, finished = [], False
    while not finished:
        for d in asyncio.run(core.step()):
            if d.seq_id == slow_id:
                pieces.extend(d.logprobs)
                finished = d.finish_reason is not None
    slow = per_main_token(core, text, pieces)
    assert [e.data for e in delta.logprobs] == [e.data for e in slow]
    assert [e.logprob for e in delta.logprobs] == pytest.approx([e.logprob for e in slow], abs=1e-3)
    assert all(len(e.top) == 2 for e in delta.logprobs)


def test_greedy_across_vocabularies_follows_the_most_probable_text() -> None:
    """The single most probable piece is " the" (0.4), but the most probable text is " tele…" (0.5)."""
    keys = [b" the", b" television", b" televisions", b" Television", b" tele", b"\x00<eos>"]
    probs = torch.tensor([0.4, 0.2, 0.2, 0.05, 0.1, 0.05])
    index = text_greedy(keys, probs.log())
    assert keys[index] == b" television"  # " tele" 0.1 < its children 0.4; " television" 0.2 ties " televisions" 0.2
    # Within it, a piece that ends holds its own mass against the children below it.
    assert text_greedy([b"a", b"ab", b"ac"], torch.tensor([0.5, 0.3, 0.2]).log()) == 0
    assert text_greedy([b"a", b"ab", b"abc"], torch.tensor([0.2, 0.3, 0.5]).log()) == 2
    # Impossible pieces (-inf) are never chosen.
    assert text_greedy([b"x", b"y"], torch.tensor([float("-inf"), 0.0])) == 1


def test_mean_greedy_over_different_vocabularies_is_the_text_greedy(pair) -> None:
    strategy = pair.core.strategy("mean")
    smol, gemma = pair.core.ctx.table("smollm2"), pair.core.ctx.table("gemma3")
    results = {
        "smollm2": top(smol, {b" the": 0.9, b" a": 0.1}),
        "gemma3": top(gemma, {b" television": 0.5, b" televisions": 0.5}),
    }
    decision = strategy._union_average(results, {"smollm2": 0.5, "gemma3": 0.5}, None)
    assert decision.text_level
    keys = [c.key for c in decision.candidates]
    assert keys[int(decision.logprobs.argmax())] == b" the"  # 0.45: the largest single piece
    assert keys[text_greedy(keys, decision.logprobs)] == b" television"  # " tele…" holds 0.25 + 0.25
