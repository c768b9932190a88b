"""Log-likelihood of continuations, for multiple-choice questions and weight calibration.

Two ways to score `continuation` after `context` (lm-eval's convention: the
context and the continuation are tokenized separately, `context_enc +
continuation_enc`, and the sum of the continuation tokens' log-probs is the
log-likelihood):

* each member alone, fast: `member_logliks` sends a member two steps per batch,
  a prefill of the contexts, then the continuations with `echo`, so one forward
  returns the log-prob of every continuation token (no token-by-token stepping).
  It talks to an `Executor`, so it runs the same in process and on member actors.
* the ensemble: `ensemble_logliks` queues teacher-forced sequences in an
  `EnsembleCore` (`runtime.scoring.add_scoring`), whose deltas carry each piece's
  log-prob under the strategy, in the main member's tokens; a strategy is scored as
  its `scoring_strategy()` (`me` as the mixture it samples from, i.e. as `mean`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consort.runtime.core import EnsembleCore, Executor
from consort.runtime.errors import InvalidRequest
from consort.runtime.evaluation.batches import CoreJob, drive_core
from consort.runtime.prompts import Prompt, prompt_ids
from consort.runtime.scoring import add_scoring
from consort.runtime.textprob import TextPlan, mix
from consort.runtime.types import MemberInfo, Piece, RequestOptions, SeqWork
from consort.runtime.vocab import TokenTable

# The echo step keeps [batch, continuation + 1, vocabulary] float32 logits; Gemma-3's
# 262,144-token vocabulary makes that the memory that bounds a batch, so batches are cut
# to hold at most this many logits (2**28 floats = 1 GiB).
DEFAULT_LOGIT_BUDGET = 1 << 28


@dataclass(frozen=True)
class LoglikRequest:
    """Score `continuation` as the text that follows `context` (raw text, no chat template)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Loglik:
    """Summed log-probability of a continuation and how many tokens (or main-member pieces) it spans."""

    logprob: float
    tokens: int
    token_logprobs: tuple[float, ...] = ()  # one per token (member path) or per main-member piece (ensemble)
    masses: tuple[float, ...] = ()  # member path: the log prefix masses asked for (text-level scoring)


def context_ids(tokenizer: Any, context: str) -> list[int]:
    """A member's tokens for a context: the same as the core's prompt of raw text (BOS included)."""
    return prompt_ids(tokenizer, Prompt(text=context))


def continuation_ids(tokenizer: Any, continuation: str) -> list[int]:
    ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidRequest(f"the continuation {continuation!r} is empty for this tokenizer")
    return ids


def _batches(
    order: list[int], lengths: list[tuple[int, int]], *, max_batch: int, budget: int, vocab_size: int
) -> list[list[int]]:
    """Consecutive groups of `order` (sorted by length) whose echo logits fit `budget`."""
    groups: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for index in order:
        width = lengths[index][1] + 1
        grown = max(widest, width)
        if current and (len(current) >= max_batch or (len(current) + 1) * grown * vocab_size > budget):
            groups.append(current)
            current, grown = [], width
        current.append(index)
        widest = grown
    if current:
        groups.append(current)
    return groups


def scoring_order(contexts: Sequence[list[int]], lengths: Sequence[tuple[int, int]]) -> list[int]:
    """The requests' order for batching: the choices of one question side by side, so that one
    step holds them all and the member prefills their shared context once (`MemberEngine`'s shared
    prompts); questions by their widest continuation, then context length: less padding."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, context in enumerate(contexts):
        groups.setdefault(tuple(context), []).append(i)
    ordered = sorted(
        groups.values(), key=lambda g: (max(lengths[i][1] for i in g), lengths[g[0]][0], g[0])
    )
    return [i for group in ordered for i in group]


async def member_logliks(
    executor: Executor,
    member: MemberInfo,
    requests: Sequence[LoglikRequest],
    *,
    max_batch: int = 32,
    logit_budget: int = DEFAULT_LOGIT_BUDGET,
    prefixes: Sequence[list[tuple[int, bytes]]] | None = None,
) -> list[Loglik]:
    """Each request's log-likelihood under `member` alone, in its own tokens (the fast echo path).

    `prefixes`, per request: (continuation token index, text) pairs whose prefix masses the same
    pass reports in `Loglik.masses` (`runtime.textprob.TextPlan.queries`).
    """
    tokenizer, table = member.tokenizer, member.table
    encoded = [
        (context_ids(tokenizer, r.context), continuation_ids(tokenizer, r.continuation)) for r in requests
    ]
    lengths = [(len(c), len(x)) for c, x in encoded]
    order = scoring_order([c for c, _ in encoded], lengths)
    out: list[Loglik | None] = [None] * len(requests)
    tag = uuid.uuid4().hex[:8]
    for group in _batches(
        order, lengths, max_batch=max_batch, budget=logit_budget, vocab_size=table.vocab_size
    ):
        ids = {i: f"loglik-{tag}-{i}" for i in group}
        try:
            # Step 1: prefill the contexts (only the last position's logits are kept).
            await executor.step({member.name: [SeqWork(seq_id=ids[i], prompt_ids=encoded[i][0]) for i in group]})
            # Step 2: the continuations, fed as the member's own tokens, with echo: one forward
            # gives log p(token | everything before it) for each of them.
            works = [
                SeqWork(
                    seq_id=ids[i],
                    pieces=[Piece(table.token_bytes(t), member.name, t) for t in encoded[i][1]],
                    echo=True,
                    echo_prefixes=list(prefixes[i]) if prefixes is not None else [],
                )
                for i in group
            ]
            results = (await executor.step({member.name: works}))[member.name].results
        finally:
            await executor.release({member.name: list(ids.values())})
        for i, result in zip(group, results, strict=True):
            assert result.echo_logprobs is not None
            # echo starts at the first token after the context, so it covers the continuation exactly.
            values = tuple(float(v) for v in result.echo_logprobs)
            masses = tuple(result.echo_masses or ())
            out[i] = Loglik(logprob=sum(values), tokens=len(values), token_logprobs=values, masses=masses)
    return [o for o in out if o is not None]


def scoring_job(request: LoglikRequest, options: RequestOptions, size: int = 0) -> CoreJob:
    return CoreJob(
        add=lambda core: add_scoring(core, Prompt(text=request.context), request.continuation, options),
        size=size or len(request.continuation),
    )


async def ensemble_logliks(
    core: EnsembleCore,
    requests: Sequence[LoglikRequest],
    options: Sequence[RequestOptions],
    *,
    refill_at: int | None = None,
) -> list[list[Loglik]]:
    """Each request's log-likelihood under the ensemble, once per entry of `options` (strategy, weights).

    All (request, options) pairs share the core's batches, so several strategies
    cost one pass of stepping, not one each.
    """
    main = core.members[core.ctx.main].tokenizer
    sizes = [len(continuation_ids(main, r.continuation)) for r in requests]
    # Waves of equal continuation length (in the main member's tokens) finish on the same step.
    jobs = [scoring_job(r, o, size) for o in options for r, size in zip(requests, sizes, strict=True)]
    outcomes = await drive_core(core, jobs, refill_at=refill_at)
    n = len(requests)
    return [
        [Loglik(o.logprob, len(o.logprobs), tuple(o.piece_logprobs)) for o in outcomes[k * n : (k + 1) * n]]
        for k in range(len(options))
    ]


def text_plans(requests: Sequence[LoglikRequest], tables: Mapping[str, TokenTable]) -> list[TextPlan]:
    """Where each continuation is cut for text-level scoring, and what each member must report."""
    return [TextPlan.build(r.continuation.encode("utf-8"), tables) for r in requests]


def text_mixture(
    plans: Sequence[TextPlan], member_lls: Mapping[str, Sequence[Loglik]], weights: Mapping[str, float]
) -> list[Loglik]:
    """`mean`'s text-level log-likelihoods from the members' own passes (`member_logliks` with the
    plans' queries): exact for any weights, with no stepping; a weight grid costs nothing more."""
    active = {name: w for name, w in weights.items() if w > 0}
    out = []
    for k, plan in enumerate(plans):
        conditionals = {}
        for name in active:
            ll = member_lls[name][k]
            if len(ll.token_logprobs) != len(plan.ends[name]):
                raise InvalidRequest(
                    f"member {name!r} tokenized continuation {k} into {len(ll.token_logprobs)} tokens for scoring "
                    f"but {len(plan.ends[name])} for cutting it; it cannot be scored at the text level"
                )
            conditionals[name] = plan.conditionals(name, ll.token_logprobs, ll.masses)
        pieces = tuple(mix(conditionals, active))
        out.append(Loglik(logprob=sum(pieces), tokens=len(pieces), token_logprobs=pieces))
    return out
