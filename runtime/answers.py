"""Answer extraction: the number, choice letter or short span a generated text answers with.

Pure functions with no model, no data files and no benchmark code. `runtime.vote`
votes on these extracted answers; the evaluation (`runtime.evaluation.metrics`)
scores them against gold answers.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (the sampler may have stopped later)."""
    cut = len(text)
    for s in stop:
        if s and (at := text.find(s)) != -1:
            cut = min(cut, at)
    return text[:cut]


# --- numbers (GSM8K) -------------------------------------------------------

# A number: optional sign (not a hyphen inside '16-3' or 'COVID-19'), optional '$',
# digits with optional thousands commas and an optional decimal part. A trailing
# '.' is a full stop, not part of the number.
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-−]?\$?\.\d+")
_HASHES = "####"
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)
_SPACED_SIGN = re.compile(r"\s*[:=]?\s*[-−]\s+\$?\d")


def canonical_number(token: str) -> str | None:
    """A bare number ('1,234.50', '$18.00', '−3') in canonical form ('1234.5', '18', '-3'); None if it is none."""
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
    return canonical_number(match.group()) if match else None


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
    return canonical_number(numbers[-1]) if numbers else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two answers, each either a bare number ('2,125', '$18.00') or text containing one."""
    if a is None or b is None:
        return False
    left = canonical_number(a) or extract_number(a)
    right = canonical_number(b) or extract_number(b)
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
