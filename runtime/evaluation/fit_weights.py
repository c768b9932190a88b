"""`--calibrate`: fit member weights on a task's dev split through a backend, by a grid over the weight simplex.

Two ways to score a grid point (`--calibrate-mode`):

* `mixture` (default, one pass): each member's own echo pass over every dev continuation
  reports what text-level scoring needs (`runtime/textprob.py`: its tokens' log-probs and
  the prefix masses where other members cut the text), then every grid point is `mean`'s
  exact text-level log-likelihood, mixed offline (`logliks.text_mixture`). Cost: one pass
  of each member alone over the dev questions, whatever the grid's size.
* `exact`: `mean` itself is run with every grid point's weights. Cost: one `mean`
  pass per grid point.

Multiple choice is scored by accuracy (ties: mean gold log-softmax) or by gold
log-prob; generation tasks by the per-token log-prob of their first gold answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from consort.runtime.errors import ConfigError
from consort.runtime.evaluation.backend import Backend
from consort.runtime.evaluation.calibration import (
    CalibrationMetric,
    CalibrationResult,
    GridScore,
    choose,
    multiple_choice_score,
    simplex_grid,
)
from consort.runtime.evaluation.logliks import LoglikRequest, text_mixture, text_plans
from consort.runtime.evaluation.specs import GenerationQuestion, MultipleChoiceQuestion, Question, TaskSpec
from consort.runtime.types import RequestOptions

CalibrationMode = Literal["mixture", "exact"]


def dev_requests(questions: Sequence[Question]) -> tuple[list[LoglikRequest], list[tuple[int, int]]]:
    requests: list[LoglikRequest] = []
    spans = []
    for q in questions:
        start = len(requests)
        if isinstance(q, MultipleChoiceQuestion):
            requests += [LoglikRequest(context, continuation) for context, continuation in q.scored_pairs()]
        elif q.chat:
            # Teacher-forced scoring here is of raw text; a chat prompt is rendered per member.
            raise ConfigError(
                f"{q.task} prompts are chat messages, which calibration cannot score; calibrate on the "
                "same questions in their cloze form (gsm8k) and pass the weights with --config"
            )
        elif q.answer_kind == "code":
            # The prompt ends in an open code block: the reference program follows it as is.
            requests.append(LoglikRequest(q.prompt, q.answers[0]))
        else:
            requests.append(LoglikRequest(q.prompt, f" {q.answers[0]}"))
        spans.append((start, len(requests)))
    return requests, spans


def _score_point(
    weights: Sequence[float],
    item_logliks: Sequence[float],
    item_tokens: Sequence[int],
    questions: Sequence[Question],
    spans: Sequence[tuple[int, int]],
    spec: TaskSpec,
) -> GridScore:
    if spec.kind == "multiple_choice":
        mc = [q for q in questions if isinstance(q, MultipleChoiceQuestion)]
        return multiple_choice_score(
            list(weights),
            [list(item_logliks[a:b]) for a, b in spans],
            [q.continuations for q in mc],
            [q.gold for q in mc],
            normalization=spec.normalization or "none",
            token_counts=[list(item_tokens[a:b]) for a, b in spans],
        )
    per_token = [item_logliks[a] / max(item_tokens[a], 1) for a, _ in spans]
    return GridScore(
        weights=list(weights),
        accuracy=0.0,
        gold_logprob=sum(per_token) / max(len(per_token), 1),
        questions=len(questions),
    )


async def _mixture_points(
    backend: Backend, requests: list[LoglikRequest], grid: Sequence[tuple[float, ...]]
) -> list[tuple[list[float], list[int]]]:
    names = [m.name for m in backend.config.members]
    plans = text_plans(requests, backend.tables)
    per_member = {n: await backend.member_logliks(n, requests, [p.queries(n) for p in plans]) for n in names}
    points = []
    for weights in grid:
        mixed = text_mixture(plans, per_member, dict(zip(names, weights, strict=True)))
        points.append(([x.logprob for x in mixed], [x.tokens for x in mixed]))
    return points


async def _exact_points(
    backends: Sequence[Backend], requests: list[LoglikRequest], grid: Sequence[tuple[float, ...]]
) -> list[tuple[list[float], list[int]]]:
    # Grid points are spread over the replicas; each replica batches its points together.
    shares = [list(range(r, len(grid), len(backends))) for r in range(len(backends))]
    results = await asyncio.gather(
        *(
            backend.ensemble_logliks(
                requests, [RequestOptions(strategy="mean", weights=list(grid[i])) for i in share]
            )
            for backend, share in zip(backends, shares, strict=True)
            if share
        )
    )
    points: list[tuple[list[float], list[int]] | None] = [None] * len(grid)
    for share, result in zip([s for s in shares if s], results, strict=True):
        for i, logliks in zip(share, result, strict=True):
            points[i] = ([x.logprob for x in logliks], [x.tokens for x in logliks])
    return [p for p in points if p is not None]


async def calibrate(
    backends: Sequence[Backend],
    spec: TaskSpec,
    questions: Sequence[Question],
    *,
    step: float = 0.1,
    metric: CalibrationMetric = "accuracy",
    mode: CalibrationMode = "mixture",
) -> CalibrationResult:
    """Best member weights for `spec`'s task on the given dev questions."""
    config = backends[0].config
    names = [m.name for m in config.members]
    grid = simplex_grid(len(names), step)
    requests, spans = dev_requests(questions)
    if mode == "mixture":
        points = await _mixture_points(backends[0], requests, grid)
    else:
        points = await _exact_points(backends, requests, grid)
    scores = [
        _score_point(weights, logliks, tokens, questions, spans, spec)
        for weights, (logliks, tokens) in zip(grid, points, strict=True)
    ]
    if any(isinstance(q, GenerationQuestion) for q in questions):
        metric = "loglik"  # generation has no accuracy without generating
    return choose(scores, metric=metric, task=spec.name, members=names)
