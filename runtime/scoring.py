"""Teacher-forced scoring: the ensemble's log-probability of given text, piece by piece.

`add_scoring` queues `continuation` after `context` in an `EnsembleCore` as a
forced sequence: each step emits the continuation's next piece (the main member's
tokens) instead of sampling, and the delta carries that piece's log-probability
under the request's strategy. Serving uses it for echo log-probs; the evaluation
(`runtime.evaluation.logliks`) batches many of them into log-likelihoods.
"""

from __future__ import annotations

import itertools

from consort.runtime import fusion
from consort.runtime.core import EnsembleCore
from consort.runtime.errors import InvalidRequest
from consort.runtime.fusion.base import Candidate
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.textprob import TextScorer
from consort.runtime.types import RequestOptions, TokenLogprob


def add_scoring(core: EnsembleCore, context: Prompt, continuation: str, options: RequestOptions | None = None) -> str:
    """Queue a teacher-forced sequence in `core`: the continuation, in the main member's tokens,
    taken piece by piece; its deltas carry each piece's log-probability under the request's
    strategy (its `scored_as` strategy: `me` is scored as the weighted mixture it samples from)."""
    if not continuation:
        raise InvalidRequest("the continuation to score is empty")
    options = options or RequestOptions()
    name = options.strategy or core.default_strategy
    scored_as = fusion.strategy_class(name).scoring_strategy()
    if scored_as is None:
        raise InvalidRequest(f"strategy {name!r} chooses among whole answers: it gives no log-probabilities of text")
    scoring_options = RequestOptions(
        strategy=scored_as, weights=options.weights, gate=options.gate, logprobs=max(options.logprobs or 0, 1)
    )
    main = core.ctx.main
    if fusion.strategy_class(scored_as).scores_text:
        # Pieces between every member's token boundaries, each scored from every member's
        # tokens consistent with the text (runtime/textprob.py).
        weights = core.resolve_weights(options.weights)
        voices = {name: core.ctx.table(name) for name in core.ctx.names if weights[name] > 0}
        scorer = TextScorer(continuation.encode("utf-8"), voices, main)
        params = SamplingParams(temperature=0.0, max_tokens=len(scorer.pieces), ignore_eos=True)
        return core.add(context, params, scoring_options, forced=scorer.pieces, text_scorer=scorer)
    ids = core.members[main].tokenizer(continuation, add_special_tokens=False)["input_ids"]
    table = core.ctx.table(main)
    pieces = [Candidate(table.token_bytes(i), main, i) for i in ids]
    params = SamplingParams(temperature=0.0, max_tokens=len(ids), ignore_eos=True)
    return core.add(context, params, scoring_options, forced=pieces)


def per_main_token(core: EnsembleCore, continuation: str, pieces: list[TokenLogprob]) -> list[TokenLogprob]:
    """Scored pieces regrouped into the main member's tokens of `continuation` (what echo reports).

    Text-level scoring cuts the text wherever any member's tokens end, so its pieces refine the
    main member's tokens; a token's log-probability is the sum over its pieces (the probability
    of its text given the text before it), and its alternatives are its first piece's.
    """
    _, ends = core.ctx.table(core.ctx.main).encode_spans(continuation.encode("utf-8"))
    merged: list[TokenLogprob] = []
    group: list[TokenLogprob] = []
    position, want = 0, iter(ends)
    end = next(want, None)
    for entry in pieces:
        group.append(entry)
        position += len(entry.data)
        if end is not None and position >= end:
            data = b"".join(e.data for e in group)
            merged.append(
                TokenLogprob(
                    token=data.decode("utf-8", errors="backslashreplace"),
                    data=data,
                    logprob=sum(e.logprob for e in group),
                    top=group[0].top,
                )
            )
            group = []
            while end is not None and end <= position:
                end = next(want, None)
    if group:
        raise ValueError("scored pieces run past the main member's tokens of the text")
    return merged


def add_scoring_ids(
    core: EnsembleCore, vocab: str, ids: list[int], options: RequestOptions | None = None
) -> str:
    """`add_scoring` of a prompt given as token ids of the main member's vocabulary (`vocab`): ids[1:] after
    ids[0], for the strategies that score piece by piece (`EnsembleCore.add_echo_ids` returned None).

    Token-level strategies take the client's ids themselves as the forced pieces, one entry each;
    text-level ones cut the text wherever any member's tokens end, and `per_token` regroups the pieces
    into the client's ids.
    """
    main = core.ctx.main
    if core.ctx.table(vocab).fingerprint != core.ctx.table(main).fingerprint:
        raise InvalidRequest(
            f"token ids for this strategy's echo must be in the main member {main!r}'s vocabulary"
        )
    context, given = core.token_id_pieces(vocab, ids)
    options = options or RequestOptions()
    name = options.strategy or core.default_strategy
    scored_as = fusion.strategy_class(name).scoring_strategy()
    if scored_as is None or fusion.strategy_class(scored_as).scores_text:
        return add_scoring(core, context, b"".join(p.data for p in given).decode("utf-8", errors="replace"), options)
    scoring_options = RequestOptions(
        strategy=scored_as, weights=options.weights, gate=options.gate, logprobs=max(options.logprobs or 0, 1)
    )
    pieces = [Candidate(p.data, main, i) for p, i in zip(given, ids[1:], strict=True)]
    params = SamplingParams(temperature=0.0, max_tokens=len(pieces), ignore_eos=True)
    return core.add(context, params, scoring_options, forced=pieces)


def per_token(pieces: list[TokenLogprob], token_bytes: list[bytes]) -> list[TokenLogprob]:
    """Scored pieces regrouped into the given tokens (a client's ids): each token's log-prob is the sum over
    its pieces. A token that ends inside a piece cannot be scored apart: a 400 that says what to do."""
    ends = list(itertools.accumulate(len(b) for b in token_bytes))
    merged: list[TokenLogprob] = []
    group: list[TokenLogprob] = []
    position = 0
    for entry in pieces:
        group.append(entry)
        position += len(entry.data)
        if len(merged) < len(ends) and position == ends[len(merged)]:
            data = b"".join(e.data for e in group)
            merged.append(
                TokenLogprob(
                    token=data.decode("utf-8", errors="backslashreplace"),
                    data=data,
                    logprob=sum(e.logprob for e in group),
                    top=group[0].top,
                )
            )
            group = []
    if group or len(merged) != len(ends):
        raise InvalidRequest(
            "the prompt's token ids end inside a piece this strategy scores: send the main member's own "
            "tokens of the text (POST /tokenize), or the prompt as text"
        )
    return merged
