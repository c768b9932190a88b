"""Answering one chunk of questions with every member alone and every strategy; one record per question.

Multiple choice (log-likelihood, OLMES cloze format):
  * members alone: the fast echo path, each member in its own tokens;
  * mean, deepen: the ensemble's log-likelihood of each choice (teacher-forced, main member's tokens);
  * me: scored as the mixture it samples from, which is exactly `mean` with the same weights
    (the core maps it so); it is not computed twice;
  * vote (default `--mc-vote loglik`): majority over the members' log-likelihood picks, a tie
    (two members that disagree) going to the choice with the highest mean of the members'
    choice probabilities (softmax of their normalised scores); with `--mc-vote letter`,
    Agent Forest on `letter_prompt`: N sampled letters spread over the members, majority.
Generation: members alone (strategy `me`, one-hot weights: only that member runs), mean,
deepen and me greedy, vote = N answers sampled across members, majority of the extracted
number (GSM8K) or short answer span (TriviaQA, NQ-open).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from typing import Any

from deploy.jobs.eval_backends import Backend
from runtime.calibration import normalised_scores
from runtime.core import RequestOptions
from runtime.sampling import SamplingParams
from runtime.scoring import GenerationRequest, LoglikRequest, member_alone
from runtime.tasks import (
    GenerationQuestion,
    MultipleChoiceQuestion,
    TaskSpec,
    cut_at_stop,
    extract_choice_letter,
    extract_number,
    first_line,
    pick_choice,
    score_generation,
)

TOKEN_LEVEL = ("mean", "deepen", "me")
STRATEGIES = ("mean", "deepen", "me", "vote")
LETTER_VOTE_MAX_TOKENS = 8


def question_seed(seed: int, task: str, qid: str) -> int:
    """A per-question seed that does not depend on which chunk or replica answers it."""
    return seed * 1_000_003 + zlib.crc32(f"{task}/{qid}".encode()) % 1_000_000


def question_text(prompt: str) -> str:
    """The question itself: few-shot prompts (GSM8K) keep only their last 'Question:' block."""
    at = prompt.rfind("Question:")
    return prompt[at:] if at > 0 else prompt


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


def _mc_entry(
    question: MultipleChoiceQuestion, scores: Sequence[float], pick: int, **extra: Any
) -> dict[str, Any]:
    return {
        "answer": question.choices[pick].strip(),
        "pick": pick,
        "correct": pick == question.gold,
        "scores": [round(s, 5) for s in scores],
        **extra,
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
    names = [m.name for m in backend.config.members]
    normalization = spec.normalization or "none"
    requests = [LoglikRequest(q.prompt, c) for q in questions for c in q.choices]
    spans, start = [], 0
    for q in questions:
        spans.append((start, start + len(q.choices)))
        start += len(q.choices)
    member_ll = {}
    for name in names:
        started = time.perf_counter()
        member_ll[name] = await backend.member_logliks(name, requests)
        timing[f"{name} alone"] = time.perf_counter() - started
    fused = [s for s in ("mean", "deepen") if s in strategies]
    if "me" in strategies and "mean" not in fused:
        fused.append("mean")
    started = time.perf_counter()
    ensemble_ll = dict(
        zip(
            fused,
            await backend.ensemble_logliks(
                requests, [RequestOptions(strategy=s, weights=weights) for s in fused]
            ),
            strict=True,
        )
    )
    if fused:
        timing["+".join(fused)] = time.perf_counter() - started
    letters: list[Any] = []
    if "vote" in strategies and mc_vote == "letter":
        started = time.perf_counter()
        letters = await backend.generate(
            [
                GenerationRequest(
                    q.letter_prompt,
                    SamplingParams(
                        temperature=0.0,
                        max_tokens=LETTER_VOTE_MAX_TOKENS,
                        stop=["\n"],
                        seed=question_seed(seed, q.task, q.id),
                    ),
                    RequestOptions(strategy="vote", vote_kind="choice", vote_choices=len(q.choices)),
                )
                for q in questions
            ]
        )
        timing["vote (letters)"] = time.perf_counter() - started
    records = []
    for k, (q, (a, b)) in enumerate(zip(questions, spans, strict=True)):

        def pick(
            lls: Sequence[Any], q: MultipleChoiceQuestion = q, a: int = a, b: int = b
        ) -> tuple[list[float], int]:
            chosen = lls[a:b]
            scores = [x.logprob for x in chosen]
            counts = [x.tokens for x in chosen]
            return scores, pick_choice(scores, q.choices, normalization=normalization, token_counts=counts)

        members: dict[str, Any] = {}
        member_norm = []
        for name in names:
            scores, choice = pick(member_ll[name])
            members[name] = _mc_entry(q, scores, choice)
            counts = [x.tokens for x in member_ll[name][a:b]]
            member_norm.append(normalised_scores(scores, q.choices, normalization, counts))
        results: dict[str, Any] = {}
        for strategy in strategies:
            if strategy in ("mean", "deepen"):
                scores, choice = pick(ensemble_ll[strategy])
                results[strategy] = _mc_entry(q, scores, choice)
            elif strategy == "me":
                scores, choice = pick(ensemble_ll["mean"])
                results["me"] = _mc_entry(q, scores, choice, note="scored as its mixture, i.e. as mean")
            elif strategy == "vote" and mc_vote == "letter":
                outcome = letters[k]
                index = extract_choice_letter(outcome.text, len(q.choices))
                entry = {
                    "answer": q.choices[index].strip() if index is not None else outcome.text,
                    "pick": index,
                    "correct": index == q.gold,
                    "text": outcome.text,
                    "votes": next((d.get("answers") for d in outcome.diagnostics if "answers" in d), None),
                }
                results["vote"] = entry
            elif strategy == "vote":
                picks = [members[n]["pick"] for n in names]
                choice, method = vote_on_picks(picks, member_norm)
                results["vote"] = {
                    "answer": q.choices[choice].strip(),
                    "pick": choice,
                    "correct": choice == q.gold,
                    "votes": picks,
                    "method": method,
                }
        records.append(
            {
                "task": q.task,
                "id": q.id,
                "kind": "multiple_choice",
                "question": q.prompt,
                "choices": [c.strip() for c in q.choices],
                "gold": q.gold,
                "gold_answer": q.choices[q.gold].strip(),
                "members": members,
                "strategies": results,
                "weights": weights,
            }
        )
    return records


def extracted(question: GenerationQuestion, text: str) -> str | None:
    text = cut_at_stop(text, question.stop)
    return extract_number(text) if question.answer_kind == "number" else first_line(text)


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
        for kind, name in systems:
            if kind == "member":
                options = member_alone(names, name)
            elif name == "vote":
                # vote samples from the members in turn; it ignores weights (None: the config's, all > 0).
                options = RequestOptions(strategy="vote", vote_kind=q.answer_kind)
            else:
                options = RequestOptions(strategy=name, weights=weights)
            requests.append(GenerationRequest(q.prompt, params, options))
    started = time.perf_counter()
    outcomes = await backend.generate(requests)
    timing["all systems"] = time.perf_counter() - started
    records = []
    for k, q in enumerate(questions):
        members: dict[str, Any] = {}
        results: dict[str, Any] = {}
        for j, (kind, name) in enumerate(systems):
            outcome = outcomes[k * len(systems) + j]
            entry: dict[str, Any] = {
                "answer": outcome.text,
                "extracted": extracted(q, outcome.text),
                "correct": score_generation(q, outcome.text),
                "finish_reason": outcome.finish_reason,
            }
            if name == "vote":
                entry["votes"] = next((d.get("answers") for d in outcome.diagnostics if "answers" in d), None)
            (members if kind == "member" else results)[name] = entry
        records.append(
            {
                "task": q.task,
                "id": q.id,
                "kind": "generation",
                "question": question_text(q.prompt),
                "gold_answer": q.answers,
                "members": members,
                "strategies": results,
                "weights": weights,
            }
        )
    return records
