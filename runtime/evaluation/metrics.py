"""Scoring benchmark answers: choosing among log-likelihoods, and matching generated answers to gold ones.

Pure functions with no model and no data files. Extracting the answer from a
generated text is `runtime.answers` (shared with the `vote` strategy); this module
compares what it extracts with the questions' gold answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from consort.runtime.answers import (
    cut_at_stop,
    extract_number,
    first_line,
    normalize_answer,
    numbers_equal,
)
from consort.runtime.code_behaviour import behaviour_harness, behaviour_key, example_calls
from consort.runtime.errors import ConfigError, InvalidRequest
from consort.runtime.evaluation.sandbox import ExecutionResult, SandboxLimits, run_many, run_python
from consort.runtime.evaluation.specs import (
    GenerationMetric,
    GenerationQuestion,
    MultipleChoiceQuestion,
    Normalization,
)

# --- multiple choice -------------------------------------------------------


def normalised_scores(
    logprobs: Sequence[float],
    choices: Sequence[str],
    normalization: Normalization,
    token_counts: Sequence[int] | None = None,
) -> list[float]:
    """The per-choice scores `pick_choice` compares (log-likelihood, per character or per token)."""
    if normalization == "per_char":
        return [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    if normalization == "per_token":
        if token_counts is None:
            raise ConfigError("per_token normalisation needs token counts")
        return [lp / max(n, 1) for lp, n in zip(logprobs, token_counts, strict=True)]
    return list(logprobs)


def pick_choice(
    logprobs: Sequence[float],
    choices: Sequence[str],
    *,
    normalization: Normalization = "none",
    token_counts: Sequence[int] | None = None,
) -> int:
    """Index of the best choice: argmax of the summed log-likelihood, optionally length-normalised.

    `per_char` divides by the length of the continuation string as scored
    (leading space included, as OLMES does); `per_token` divides by the number of
    tokens the scoring model used, which only the caller knows. Ties go to the
    earliest choice.
    """
    if len(logprobs) != len(choices) or not choices:
        raise InvalidRequest(f"got {len(logprobs)} log-likelihoods for {len(choices)} choices")
    if normalization not in ("none", "per_char", "per_token"):
        raise InvalidRequest(f"unknown normalisation {normalization!r}; use none, per_char or per_token")
    if normalization == "per_token" and (token_counts is None or len(token_counts) != len(choices)):
        raise InvalidRequest("per_token normalisation needs one token count per choice")
    scores = normalised_scores(logprobs, choices, normalization, token_counts)
    return scores.index(max(scores))


def score_multiple_choice(
    question: MultipleChoiceQuestion,
    logprobs: Sequence[float],
    *,
    normalization: Normalization = "none",
    token_counts: Sequence[int] | None = None,
) -> bool:
    """Whether the chosen continuation is the gold one."""
    chosen = pick_choice(logprobs, question.continuations, normalization=normalization, token_counts=token_counts)
    return chosen == question.gold


# --- short answers (SQuAD) -------------------------------------------------


def exact_match(pred: str, golds: Sequence[str]) -> bool:
    """Normalised `pred` equals a normalised gold alias. An empty prediction never matches."""
    normalized = normalize_answer(pred)
    return bool(normalized) and any(normalized == normalize_answer(g) for g in golds)


def contains_match(pred: str, golds: Sequence[str]) -> bool:
    """A normalised gold alias occurs in normalised `pred` as whole words (lenient; for chatty models)."""
    padded = f" {normalize_answer(pred)} "
    return any(g and f" {g} " in padded for g in (normalize_answer(x) for x in golds))


# --- generation ------------------------------------------------------------


def extracted_answer(question: GenerationQuestion, text: str) -> str | None:
    """What a generated `text` answers `question` with: its number, its first line, or (code) the completion,
    each before any stop string."""
    text = cut_at_stop(text, question.stop)
    if question.answer_kind == "code":
        return text
    return extract_number(text) if question.answer_kind == "number" else first_line(text)


# --- code ------------------------------------------------------------------


def code_program(question: GenerationQuestion, output: str) -> str:
    """The program a completion makes for `question`: the task's prefix, the completion (cut at a stop), the tests."""
    if question.code is None:
        raise InvalidRequest(f"{question.task}/{question.id} is not a code question")
    return question.code.program(cut_at_stop(output, question.stop))


def run_code(
    question: GenerationQuestion, outputs: Sequence[str], limits: SandboxLimits | None = None, *, workers: int = 2
) -> list[ExecutionResult]:
    """Each output's program run against the question's tests in the sandbox (a separate process each)."""
    return run_many([code_program(question, o) for o in outputs], limits, workers=workers)


def behaviour_keys(
    question: GenerationQuestion,
    outputs: Sequence[str],
    limits: SandboxLimits | None = None,
    *,
    workers: int = 2,
) -> list[str | None]:
    """Each output's vote key by behaviour (`code_behaviour`): its results on the calls the question's prompt
    shows, never on the task's tests. All None when the prompt shows no call of the entry point.
    """
    if question.code is None or question.code.entry_point is None:
        raise InvalidRequest(f"{question.task}/{question.id} names no function to run on its examples")
    calls = example_calls(question.prompt, question.code.entry_point)
    if not calls:
        return [None] * len(outputs)
    harness = behaviour_harness(calls)
    programs = [question.code.program(cut_at_stop(o, question.stop), tests=harness) for o in outputs]
    return [behaviour_key(r.stdout) for r in run_many(programs, limits, workers=workers)]


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k estimate from `n` samples of which `correct` passed (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement include a pass."""
    if not 0 <= correct <= n or k < 1:
        raise InvalidRequest(f"pass@k needs 0 <= correct <= n and k >= 1, got n={n}, correct={correct}, k={k}")
    if k > n:
        raise InvalidRequest(f"pass@{k} needs at least {k} samples, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def score_generation(
    question: GenerationQuestion, output: str, *, metric: GenerationMetric | None = None
) -> bool:
    """Whether a generated `output` answers `question`.

    Number questions compare `extract_number(output)` with the gold number. Span
    questions compare the output's first line by `exact_match` (the default) or
    `contains_match`. Code questions run the program in the sandbox (pass@1 of this
    one output); many outputs are better run together with `run_code`.
    """
    if question.answer_kind == "code":
        if metric not in (None, "pass_at_1"):
            raise InvalidRequest(f"a code question is scored by pass_at_1, not {metric!r}")
        return run_python(code_program(question, output)).passed
    output = cut_at_stop(output, question.stop)
    if question.answer_kind == "number":
        if metric not in (None, "number_match"):
            raise InvalidRequest(f"a number question is scored by number_match, not {metric!r}")
        return any(numbers_equal(extract_number(output), gold) for gold in question.answers)
    if metric == "contains":
        return contains_match(output, question.answers)
    if metric in (None, "exact_match"):
        return exact_match(first_line(output), question.answers)
    raise InvalidRequest(f"a span question is scored by exact_match or contains, not {metric!r}")
