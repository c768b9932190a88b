"""Answering one chunk of questions with every member alone and every strategy; one record per question.

How a strategy answers follows from its registry entry (`fusion.REGISTRY`), not from its name, so a
registered strategy is evaluated like the built-in ones.

Multiple choice (log-likelihood, OLMES cloze format):
  * members alone: the fast echo path, each member in its own tokens;
  * a strategy with a distribution over text (every token-level one: mean, deepen, me, ...): the
    ensemble's log-likelihood of each choice under its `scoring_strategy()` (teacher-forced, main
    member's tokens). Strategies scored by the same distribution share one pass: `me` is scored as
    the mixture it samples from, which is exactly `mean` with the same weights; it is not computed twice;
  * vote (default `--mc-vote loglik`): majority over the members' log-likelihood picks, a tie
    (two members that disagree) going to the choice with the highest mean of the members'
    choice probabilities (softmax of their normalised scores);
  * vote with `--mc-vote letter`, and every other answer-level strategy: generation on
    `letter_prompt` (for vote, Agent Forest: N sampled letters spread over the members, majority),
    the letter extracted from the answer.
Generation: members alone (strategy `me`, one-hot weights: only that member runs), token-level
strategies greedy with the run's weights, answer-level ones (vote = N answers sampled across
members, majority of the extracted number (GSM8K) or short answer span (TriviaQA, NQ-open), the most
similar program for code). Chat questions (GSM8K zero-shot) are rendered by each member's template.
Code answers (HumanEval, MBPP) are run against their tests in the sandbox (`evaluation.sandbox`: one
process each, started here, never in a member), off the event loop, after the chunk is generated.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from collections.abc import Sequence
from typing import Any, Literal

from consort.runtime import fusion
from consort.runtime.answers import extract_choice_letter
from consort.runtime.errors import InvalidRequest
from consort.runtime.evaluation.backend import Backend
from consort.runtime.evaluation.batches import GenerationRequest, member_alone
from consort.runtime.evaluation.logliks import Loglik, LoglikRequest, text_mixture, text_plans
from consort.runtime.evaluation.metrics import (
    code_program,
    extracted_answer,
    normalised_scores,
    pick_choice,
    score_generation,
)
from consort.runtime.evaluation.sandbox import ExecutionResult, run_many
from consort.runtime.evaluation.specs import (
    GenerationQuestion,
    MultipleChoiceQuestion,
    Normalization,
    TaskSpec,
)
from consort.runtime.sampling import SamplingParams
from consort.runtime.textprob import TextPlan
from consort.runtime.types import Completion, RequestOptions, VoteKind

LETTER_VOTE_MAX_TOKENS = 8
MEMBER_VOTE = "vote"  # the strategy that `--mc-vote loglik` answers by the members' majority, generating nothing
# Notes on records of strategies scored by another strategy's distribution (default: "scored as X").
SCORED_AS_NOTES = {"me": "scored as its mixture, i.e. as mean"}

ChoiceMethod = Literal["scored", "member vote", "letters"]


def question_seed(seed: int, task: str, qid: str) -> int:
    """A per-question seed that does not depend on which chunk or replica answers it."""
    return seed * 1_000_003 + zlib.crc32(f"{task}/{qid}".encode()) % 1_000_000


def question_text(prompt: str) -> str:
    """The question itself: few-shot prompts (GSM8K) keep only their last 'Question:' block."""
    at = prompt.rfind("Question:")
    return prompt[at:] if at > 0 else prompt


def is_answer_level(strategy: str) -> bool:
    return fusion.strategy_class(strategy).level == "answer"


def _votes(outcome: Completion) -> Any:
    """The sampled answers an answer-level strategy reports in its diagnostics, if any."""
    return next((d.get("answers") for d in outcome.diagnostics if "answers" in d), None)


# --- multiple choice: which way each strategy answers -----------------------------------------


def choice_method(strategy: str, mc_vote: str) -> ChoiceMethod:
    """How `strategy` answers a multiple-choice question: by the log-likelihood of each choice under its
    scoring distribution, by the majority of the members' picks (vote with --mc-vote loglik), or by a
    generated letter (strategies with no distribution over text)."""
    if fusion.strategy_class(strategy).scoring_strategy() is not None:
        return "scored"
    if strategy == MEMBER_VOTE and mc_vote == "loglik":
        return "member vote"
    return "letters"


def scoring_strategies(strategies: Sequence[str]) -> list[str]:
    """The distributions to score the choices under, once each, for the strategies answered by log-likelihood."""
    scored = (fusion.strategy_class(s).scoring_strategy() for s in strategies)
    return list(dict.fromkeys(s for s in scored if s is not None))


# --- multiple choice: the batched phases, each timed for the whole chunk -----------------------


def choice_requests(
    questions: Sequence[MultipleChoiceQuestion],
) -> tuple[list[LoglikRequest], list[tuple[int, int]]]:
    """One request per (question, choice), and each question's [start, end) among them."""
    requests = [LoglikRequest(context, continuation) for q in questions for context, continuation in q.scored_pairs()]
    spans, start = [], 0
    for q in questions:
        spans.append((start, start + len(q.choices)))
        start += len(q.choices)
    return requests, spans


async def score_members(
    backend: Backend,
    requests: Sequence[LoglikRequest],
    timing: dict[str, float],
    plans: Sequence[TextPlan] | None = None,
) -> dict[str, list[Loglik]]:
    """Every choice's log-likelihood under each member alone (the echo fast path), member by member;
    with `plans`, the same passes also report what text-level scoring needs of each member."""
    out = {}
    for name in (m.name for m in backend.config.members):
        started = time.perf_counter()
        prefixes = [plan.queries(name) for plan in plans] if plans is not None else None
        out[name] = await backend.member_logliks(name, requests, prefixes)
        timing[f"{name} alone"] = time.perf_counter() - started
    return out


def scored_offline(backend: Backend, distributions: Sequence[str]) -> list[str]:
    """The distributions whose log-likelihoods come from the members' own passes (text-level `mean`,
    ungated): no ensemble stepping at all."""
    if len(backend.config.members) < 2 or backend.config.gate is not None:
        return []
    return [d for d in distributions if fusion.strategy_class(d).scores_text]


async def score_ensemble(
    backend: Backend,
    requests: Sequence[LoglikRequest],
    distributions: Sequence[str],
    weights: list[float],
    timing: dict[str, float],
) -> dict[str, list[Loglik]]:
    """Every choice's log-likelihood under the ensemble, once per scoring distribution, in one shared pass."""
    if not distributions:
        return {}
    started = time.perf_counter()
    options = [RequestOptions(strategy=s, weights=weights) for s in distributions]
    scored = await backend.ensemble_logliks(requests, options)
    timing["+".join(distributions)] = time.perf_counter() - started
    return dict(zip(distributions, scored, strict=True))


def letter_request(question: MultipleChoiceQuestion, strategy: str, seed: int) -> GenerationRequest:
    """Generate a letter on the lettered prompt (a vote gets the choices to count; it ignores weights)."""
    params = SamplingParams(
        temperature=0.0,
        max_tokens=LETTER_VOTE_MAX_TOKENS,
        stop=["\n"],
        seed=question_seed(seed, question.task, question.id),
    )
    options = RequestOptions(strategy=strategy, vote_kind="choice", vote_choices=len(question.choices))
    return GenerationRequest(question.letter_prompt, params, options)


async def generate_letters(
    backend: Backend,
    questions: Sequence[MultipleChoiceQuestion],
    strategies: Sequence[str],
    seed: int,
    timing: dict[str, float],
) -> dict[str, list[Completion]]:
    """Each strategy's generated answer on each question's lettered prompt, all in one batched call."""
    if not strategies:
        return {}
    started = time.perf_counter()
    outcomes = await backend.generate([letter_request(q, s, seed) for s in strategies for q in questions])
    timing[f"{'+'.join(strategies)} (letters)"] = time.perf_counter() - started
    n = len(questions)
    return {s: outcomes[k * n : (k + 1) * n] for k, s in enumerate(strategies)}


# --- multiple choice: one question's entries and record --------------------------------------


def scored_as_note(strategy: str, scored_as: str) -> dict[str, str]:
    """A `note` for the record of a strategy scored by another one's distribution; nothing otherwise."""
    if scored_as == strategy:
        return {}
    return {"note": SCORED_AS_NOTES.get(strategy, f"scored as {scored_as}")}


def choice_entry(
    question: MultipleChoiceQuestion, scores: Sequence[float], pick: int, **extra: Any
) -> dict[str, Any]:
    return {
        "answer": question.choices[pick].strip(),
        "pick": pick,
        "correct": pick == question.gold,
        "scores": [round(s, 5) for s in scores],
        **extra,
    }


def scored_entry(
    question: MultipleChoiceQuestion, logliks: Sequence[Loglik], normalization: Normalization, **extra: Any
) -> dict[str, Any]:
    """The choice with the best (normalised) log-likelihood; `logliks` are this question's, one per choice."""
    scores = [x.logprob for x in logliks]
    counts = [x.tokens for x in logliks]
    pick = pick_choice(scores, question.continuations, normalization=normalization, token_counts=counts)
    return choice_entry(question, scores, pick, **extra)


def _softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def vote_on_picks(picks: Sequence[int], member_scores: Sequence[Sequence[float]]) -> tuple[int, str]:
    """Majority of the members' picks; a tie goes to the tied choice the members find most probable on average."""
    counts: dict[int, int] = {}
    for pick in picks:
        counts[pick] = counts.get(pick, 0) + 1
    top = max(counts.values())
    tied = [c for c, n in counts.items() if n == top]
    if len(tied) == 1:
        return tied[0], "majority"
    probs = [_softmax(s) for s in member_scores]
    mean = {c: sum(p[c] for p in probs) / len(probs) for c in tied}
    return max(tied, key=lambda c: (mean[c], -c)), "tie: mean probability"


def member_vote_entry(
    question: MultipleChoiceQuestion,
    member_logliks: Sequence[Sequence[Loglik]],
    members: Sequence[dict[str, Any]],
    normalization: Normalization,
) -> dict[str, Any]:
    """The majority of the members' picks (`members`: their entries), ties by mean choice probability."""
    picks = [entry["pick"] for entry in members]
    normalised = [
        normalised_scores([x.logprob for x in lls], question.continuations, normalization, [x.tokens for x in lls])
        for lls in member_logliks
    ]
    choice, method = vote_on_picks(picks, normalised)
    return {
        "answer": question.choices[choice].strip(),
        "pick": choice,
        "correct": choice == question.gold,
        "votes": picks,
        "method": method,
    }


def letter_entry(question: MultipleChoiceQuestion, outcome: Completion) -> dict[str, Any]:
    """The choice a generated answer names by letter (no pick when it names none)."""
    index = extract_choice_letter(outcome.text, len(question.choices))
    return {
        "answer": question.choices[index].strip() if index is not None else outcome.text,
        "pick": index,
        "correct": index == question.gold,
        "text": outcome.text,
        "votes": _votes(outcome),
    }


def choice_record(
    question: MultipleChoiceQuestion,
    members: dict[str, Any],
    strategies: dict[str, Any],
    weights: list[float],
) -> dict[str, Any]:
    return {
        "task": question.task,
        "id": question.id,
        "kind": "multiple_choice",
        "question": question.prompt,
        "choices": [c.strip() for c in question.choices],
        "gold": question.gold,
        "gold_answer": question.choices[question.gold].strip(),
        "members": members,
        "strategies": strategies,
        "weights": weights,
    }


async def multiple_choice(
    backend: Backend,
    spec: TaskSpec,
    questions: Sequence[MultipleChoiceQuestion],
    strategies: Sequence[str],
    weights: list[float],
    *,
    seed: int,
    mc_vote: str = "loglik",
    timing: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One record per question; `timing` receives the seconds each phase took for the whole chunk."""
    timing = {} if timing is None else timing
    normalization = spec.normalization or "none"
    methods = {s: choice_method(s, mc_vote) for s in strategies}
    scored = [s for s in strategies if methods[s] == "scored"]
    requests, spans = choice_requests(questions)
    distributions = scoring_strategies(scored)
    offline = scored_offline(backend, distributions)
    plans = text_plans(requests, backend.tables) if offline else None
    member_ll = await score_members(backend, requests, timing, plans)
    ensemble_ll = await score_ensemble(
        backend, requests, [d for d in distributions if d not in offline], weights, timing
    )
    if plans is not None:
        names = [m.name for m in backend.config.members]
        mixed = text_mixture(plans, member_ll, dict(zip(names, weights, strict=True)))
        ensemble_ll.update({d: mixed for d in offline})
    letters = await generate_letters(
        backend, questions, [s for s in strategies if methods[s] == "letters"], seed, timing
    )
    records = []
    for k, (q, (a, b)) in enumerate(zip(questions, spans, strict=True)):
        members = {name: scored_entry(q, lls[a:b], normalization) for name, lls in member_ll.items()}
        results: dict[str, Any] = {}
        for strategy in strategies:
            if methods[strategy] == "scored":
                scored_as = fusion.strategy_class(strategy).scoring_strategy()
                assert scored_as is not None
                results[strategy] = scored_entry(
                    q, ensemble_ll[scored_as][a:b], normalization, **scored_as_note(strategy, scored_as)
                )
            elif methods[strategy] == "member vote":
                lls = [member_ll[name][a:b] for name in members]
                results[strategy] = member_vote_entry(q, lls, list(members.values()), normalization)
            else:
                results[strategy] = letter_entry(q, letters[strategy][k])
        records.append(choice_record(q, members, results, weights))
    return records


# --- generation ------------------------------------------------------------------------------


def generation_options(
    question: GenerationQuestion, system: tuple[str, str], names: Sequence[str], weights: list[float]
) -> RequestOptions:
    """The request options of one system: a member alone, an answer-level strategy, or a token-level one."""
    kind, name = system
    if kind == "member":
        return member_alone(names, name)
    if is_answer_level(name):
        # vote samples from the members in turn; it ignores weights (None: the config's, all > 0).
        return RequestOptions(strategy=name, vote_kind=vote_kind(question))
    return RequestOptions(strategy=name, weights=weights)


def vote_kind(question: GenerationQuestion) -> VoteKind:
    """How a vote compares sampled answers: programs have no extractable answer, so by their similarity."""
    return "free" if question.answer_kind == "code" else question.answer_kind


def generation_entry(
    question: GenerationQuestion, outcome: Completion, *, votes: bool, execution: ExecutionResult | None = None
) -> dict[str, Any]:
    """A system's answer; a code answer comes with its sandboxed run (`execution`), which decides `correct`."""
    entry: dict[str, Any] = {
        "answer": outcome.text,
        "extracted": extracted_answer(question, outcome.text),
        "finish_reason": outcome.finish_reason,
    }
    if question.answer_kind == "code":
        if execution is None:
            raise InvalidRequest(f"{question.task}/{question.id}: a code answer is scored by running it")
        entry["correct"] = execution.passed
        entry["execution"] = {"outcome": execution.outcome, "detail": execution.detail, "seconds": execution.seconds}
    else:
        entry["correct"] = score_generation(question, outcome.text)
    if votes:
        entry["votes"] = _votes(outcome)
    return entry


def generation_record(
    question: GenerationQuestion, members: dict[str, Any], strategies: dict[str, Any], weights: list[float]
) -> dict[str, Any]:
    return {
        "task": question.task,
        "id": question.id,
        "kind": "generation",
        "question": question_text(question.prompt),
        "gold_answer": question.answers,
        "members": members,
        "strategies": strategies,
        "weights": weights,
    }


async def generation(
    backend: Backend,
    questions: Sequence[GenerationQuestion],
    strategies: Sequence[str],
    weights: list[float],
    *,
    seed: int,
    timing: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One record per question; `timing` receives the seconds the chunk's generation took (all systems batched)."""
    timing = {} if timing is None else timing
    names = [m.name for m in backend.config.members]
    systems: list[tuple[str, str]] = [("member", n) for n in names] + [("strategy", s) for s in strategies]
    requests = []
    for q in questions:
        params = SamplingParams(
            temperature=0.0, max_tokens=q.max_tokens, stop=q.stop, seed=question_seed(seed, q.task, q.id)
        )
        requests += [
            GenerationRequest(q.prompt, params, generation_options(q, s, names, weights), chat=q.chat)
            for s in systems
        ]
    started = time.perf_counter()
    outcomes = await backend.generate(requests)
    timing["all systems"] = time.perf_counter() - started
    executions = await execute_code(questions, outcomes, len(systems), timing)
    records = []
    for k, q in enumerate(questions):
        members: dict[str, Any] = {}
        results: dict[str, Any] = {}
        for j, (kind, name) in enumerate(systems):
            i = k * len(systems) + j
            answer_level = kind == "strategy" and is_answer_level(name)
            entry = generation_entry(q, outcomes[i], votes=answer_level, execution=executions.get(i))
            (members if kind == "member" else results)[name] = entry
        records.append(generation_record(q, members, results, weights))
    return records


async def execute_code(
    questions: Sequence[GenerationQuestion], outcomes: Sequence[Completion], per_question: int, timing: dict[str, float]
) -> dict[int, ExecutionResult]:
    """Run every code answer of the chunk in the sandbox, off the event loop; keyed by the answer's index.

    Each program is its own process (sandbox.run_python), started here in the job's
    driver, never in a member or the endpoint.
    """
    programs = {
        k * per_question + j: code_program(q, outcomes[k * per_question + j].text)
        for k, q in enumerate(questions)
        if q.answer_kind == "code"
        for j in range(per_question)
    }
    if not programs:
        return {}
    started = time.perf_counter()
    results = await asyncio.to_thread(run_many, list(programs.values()))
    timing["sandbox"] = time.perf_counter() - started
    return dict(zip(programs, results, strict=True))
