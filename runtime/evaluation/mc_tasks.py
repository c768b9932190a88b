"""Row builders for the log-likelihood benchmarks: ARC-Easy, ARC-Challenge, MMLU, PIQA.

Prompts follow the OLMES cloze ("RC") format, zero-shot: the question, then
'Answer:', and each choice scored as a continuation with a leading space.
"""

from __future__ import annotations

import string
from itertools import zip_longest
from pathlib import Path

from consort.runtime.evaluation.files import arrow_dirs, read_arrow, read_request_docs
from consort.runtime.evaluation.specs import DEV_SLICE, MultipleChoiceQuestion, Split


def letter_prompt(stem: str, choices: list[str]) -> str:
    """`stem` ('Question: ...') followed by lettered choices and 'Answer:'."""
    options = "\n".join(f"{string.ascii_uppercase[i]}. {text}" for i, text in enumerate(choices))
    return f"{stem}\n{options}\nAnswer:"


def _question(
    task: str, qid: str, stem: str, choices: list[str], gold: int, preamble: str = ""
) -> MultipleChoiceQuestion:
    choices = [c.strip() for c in choices]
    return MultipleChoiceQuestion(
        task=task,
        id=qid,
        prompt=f"{preamble}{stem}\nAnswer:",
        choices=[f" {c}" for c in choices],
        gold=gold,
        letter_prompt=preamble + letter_prompt(stem, choices),
    )


def _arc_stem(question: str) -> str:
    return f"Question: {question.strip()}"


def load_arc(root: Path, task: str, subset: str, split: Split) -> list[MultipleChoiceQuestion]:
    """ARC: eval = the test set (from the OLMES request file, which carries it), dev = validation."""
    if split == "eval":
        questions = []
        for doc in read_request_docs(root, f"{task}/test_rc_5shot"):
            # The request file stores the formatted query; recover the bare question.
            query: str = doc["query"]
            question = query.removeprefix("Question:").removesuffix("Answer:").strip()
            questions.append(
                _question(task, doc["id"], _arc_stem(question), doc["choices"], int(doc["gold"]))
            )
        return questions
    rows = read_arrow(root, f"ai2_arc/{subset}/validation", ["id", "question", "choices", "answerKey"])
    # Some ARC rows label their choices 1-4 instead of A-D; the gold is found by label.
    return [
        _question(
            task,
            row["id"],
            _arc_stem(row["question"]),
            row["choices"]["text"],
            row["choices"]["label"].index(row["answerKey"]),
        )
        for row in rows
    ]


def load_mmlu(root: Path, split: Split) -> list[MultipleChoiceQuestion]:
    """MMLU (57 subjects): eval = test, dev = validation.

    Subjects are interleaved round-robin (in alphabetical order), so that any
    prefix taken with `limit` spans the subjects instead of being all algebra.
    """
    source_split = "test" if split == "eval" else "validation"
    per_subject: list[list[MultipleChoiceQuestion]] = []
    for subject in arrow_dirs(root, "hails/mmlu_no_train"):
        rows = read_arrow(
            root, f"hails/mmlu_no_train/{subject}/{source_split}", ["question", "choices", "answer"]
        )
        preamble = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        per_subject.append(
            [
                _question(
                    "mmlu",
                    f"{subject}/{source_split}/{i}",
                    f"Question: {row['question'].strip()}",
                    row["choices"],
                    int(row["answer"]),
                    preamble,
                )
                for i, row in enumerate(rows)
            ]
        )
    return [q for group in zip_longest(*per_subject) for q in group if q is not None]


def load_piqa(root: Path, split: Split) -> list[MultipleChoiceQuestion]:
    """PIQA: only validation has public labels; eval = validation[:-200], dev = validation[-200:]."""
    rows = read_arrow(root, "piqa/plain_text/validation", ["goal", "sol1", "sol2", "label"])
    indexed = list(enumerate(rows))
    chosen = indexed[:-DEV_SLICE] if split == "eval" else indexed[-DEV_SLICE:]
    return [
        _question(
            "piqa",
            f"validation/{i}",
            f"Goal: {row['goal'].strip()}",
            [row["sol1"], row["sol2"]],
            int(row["label"]),
        )
        for i, row in chosen
    ]
