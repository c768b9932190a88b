"""Scoring: choosing among log-likelihoods, normalising short answers, extracting numbers and letters.

Pure functions with no model and no data files, shared by the evaluation loop
and by `runtime.vote` (which votes on the same extracted answers it scores).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from runtime.errors import InvalidRequest
from runtime.tasks.types import GenerationMetric, GenerationQuestion, MultipleChoiceQuestion, Normalization

# --- multiple choice -------------------------------------------------------


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
    if normalization == "none":
        scores = list(logprobs)
    elif normalization == "per_char":
        scores = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    elif normalization == "per_token":
        if token_counts is None or len(token_counts) != len(choices):
            raise InvalidRequest("per_token normalisation needs one token count per choice")
        scores = [lp / max(n, 1) for lp, n in zip(logprobs, token_counts, strict=True)]
    else:
        raise InvalidRequest(f"unknown normalisation {normalization!r}; use none, per_char or per_token")
    best = max(scores)
    return scores.index(best)


def score_multiple_choice(
    question: MultipleChoiceQuestion,
    logprobs: Sequence[float],
    *,
    normalization: Normalization = "none",
    token_counts: Sequence[int] | None = None,
) -> bool:
    """Whether the chosen continuation is the gold one."""
    chosen = pick_choice(logprobs, question.choices, normalization=normalization, token_counts=token_counts)
    return chosen == question.gold


# --- short answers (SQuAD) -------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(ch: str) -> bool:
    # SQuAD strips string.punctuation; Unicode punctuation (curly quotes, dashes)
    # is stripped too, since models emit it where gold answers use ASCII.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The first non-blank line of a generated answer (a short answer ends at the line break)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(pred: str, golds: Sequence[str]) -> bool:
    """Normalised `pred` equals a normalised gold alias. An empty prediction never matches."""
    normalized = normalize_answer(pred)
    return bool(normalized) and any(normalized == normalize_answer(g) for g in golds)


def contains_match(pred: str, golds: Sequence[str]) -> bool:
    """A normalised gold alias occurs in normalised `pred` as whole words (lenient; for chatty models)."""
    padded = f" {normalize_answer(pred)} "
    return any(g and f" {g} " in padded for g in (normalize_answer(x) for x in golds))


# --- numbers (GSM8K) -------------------------------------------------------

# A number: optional sign (not a hyphen inside '16-3' or 'COVID-19'), optional '$',
# digits with optional thousands commas and an optional decimal part. A trailing
# '.' is a full stop, not part of the number.
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-−]?\$?\.\d+")
_HASHES = "####"
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)
_SPACED_SIGN = re.compile(r"\s*[:=]?\s*[-−]\s+\$?\d")


def _canonical(token: str) -> str | None:
    cleaned = token.replace(",", "").replace("$", "").replace("−", "-").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    # normalize() drops trailing zeros ('18.00' -> '18'); format 'f' undoes the
    # exponent it may introduce ('1E+2' -> '100').
    return format(value.normalize(), "f")


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return _canonical(match.group()) if match else None


def extract_number(text: str) -> str | None:
    """The answer number of a worked solution, in canonical form ('1,234.50' -> '1234.5', '$-3' -> '-3').

    In order: the first number after the last '####' (GSM8K's gold format), the
    first number after the last 'answer is', else the last number in the text.
    None when the text has no number.
    """
    if _HASHES in text:
        found = _first_number(text.rsplit(_HASHES, 1)[1])
        if found is not None:
            return found
    stated = list(_ANSWER_IS.finditer(text))
    if stated:
        tail = text[stated[-1].end() :]
        found = _first_number(tail)
        if found is not None:
            # 'the answer is - 10': a spaced sign right after the statement is a
            # negative answer (elsewhere '5 - 10' is a subtraction, so only here).
            if _SPACED_SIGN.match(tail) and not found.startswith("-") and found != "0":
                return f"-{found}"
            return found
    numbers = _NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two answers, each either a bare number ('2,125', '$18.00') or text containing one."""
    if a is None or b is None:
        return False
    left = _canonical(a) or extract_number(a)
    right = _canonical(b) or extract_number(b)
    return left is not None and right is not None and Decimal(left) == Decimal(right)


# --- choice letters --------------------------------------------------------

# A letter that stands alone: '(B)', 'B' as a word, or a lower-case 'b' only when
# followed by '.', ')', ':', ',' or the end (so 'the answer is a dog' is no 'a').
_LETTER = r"(?:\(\s*([A-Za-z])\s*\)|\b([A-Z])\b|\b([a-z])(?=[.):,]|\s*$))"
_STATED_LETTER = re.compile(
    r"(?i:answer|option|choice)\s*(?:(?i:is)|:|=)?\s*(?:(?i:option|choice))?[\s:*_\"']*" + _LETTER
)
_LEADING_LETTER = re.compile(r"^[\s*_\[(]*([A-Za-z])(?:\s*[.):\]*]|\s*$)")
_LINE_LETTER = re.compile(r"^\s*([A-Z])[.)]\s", re.MULTILINE)
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")


def _index(letter: str, n_choices: int) -> int | None:
    index = ord(letter.upper()) - ord("A")
    return index if 0 <= index < n_choices else None


def extract_choice_letter(text: str, n_choices: int) -> int | None:
    """The 0-based choice a generated answer names by letter ('The answer is (B)', 'B.', 'answer: c'), or None.

    In order: the last explicit statement ('answer is X', 'Answer: X', 'option X');
    a letter opening the text ('B', 'B.', '(B)', 'c)'); the first line that opens
    with 'X.' or 'X)'; a single distinct '(X)' in the text (several mean the model
    is restating the options). Letters beyond `n_choices` are ignored.
    """
    for match in reversed(list(_STATED_LETTER.finditer(text))):
        letter = next(g for g in match.groups() if g)
        if (index := _index(letter, n_choices)) is not None:
            return index
    if (match := _LEADING_LETTER.match(text)) and (index := _index(match.group(1), n_choices)) is not None:
        return index
    for match in _LINE_LETTER.finditer(text):
        if (index := _index(match.group(1), n_choices)) is not None:
            return index
    in_parens = {i for m in _PAREN_LETTER.finditer(text) if (i := _index(m.group(1), n_choices)) is not None}
    return in_parens.pop() if len(in_parens) == 1 else None


# --- generation ------------------------------------------------------------


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (the sampler may have stopped later)."""
    cut = len(text)
    for s in stop:
        if s and (at := text.find(s)) != -1:
            cut = min(cut, at)
    return text[:cut]


def score_generation(
    question: GenerationQuestion, output: str, *, metric: GenerationMetric | None = None
) -> bool:
    """Whether a generated `output` answers `question`.

    Number questions compare `extract_number(output)` with the gold number. Span
    questions compare the output's first line by `exact_match` (the default) or
    `contains_match`.
    """
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
