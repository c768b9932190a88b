"""Row builders for the log-likelihood benchmarks: ARC-Easy, ARC-Challenge, MMLU, PIQA, and the OLMES
zero-shot cloze tasks (SciQ, CommonsenseQA, HellaSwag, OpenBookQA, Winogrande, BoolQ, Social IQa).

Prompts follow the OLMES cloze ("RC") format, zero-shot: the question, then
'Answer:', and each choice scored as a continuation with a leading space. The
`rc_0shot` tasks take their prompts verbatim from the package's request files.
"""

from __future__ import annotations

import string
from itertools import zip_longest
from pathlib import Path
from typing import Any

from consort.runtime.evaluation.files import arrow_dirs, read_arrow, read_request_docs, read_request_groups
from consort.runtime.evaluation.specs import DEV_SLICE, MultipleChoiceQuestion, PartialScoring, Split


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


# --- OLMES zero-shot cloze (oe_eval_tasks/<task>/rc_0shot) -----------------------------------


def _qid(index: int) -> str:
    # Every rc_0shot file is validation. The document's position is its id: the datasets' own ids
    # are missing (Winogrande) or repeat (HellaSwag's `ind`).
    return f"validation/{index}"


def _letter_stem(context: str) -> str:
    # The lettered variant lists the options after the question, so the cloze's own 'Answer:' goes.
    return context.removesuffix("Answer:").rstrip()


def _rc_question(task: str, qid: str, doc: dict[str, Any], requests: list[dict[str, Any]]) -> MultipleChoiceQuestion:
    """A question whose choices are continuations of one shared context (every rc task but Winogrande)."""
    contexts = {r["context"] for r in requests}
    if len(contexts) != 1:
        raise ValueError(f"{task}/{qid}: expected one context for all choices, found {len(contexts)}")
    context = requests[0]["context"]
    choices = [r["continuation"] for r in requests]
    return MultipleChoiceQuestion(
        task=task,
        id=qid,
        prompt=context,
        choices=choices,
        gold=int(doc["gold"]),
        letter_prompt=letter_prompt(_letter_stem(context), [c.strip() for c in choices]),
    )


def _winogrande_question(qid: str, doc: dict[str, Any], requests: list[dict[str, Any]]) -> MultipleChoiceQuestion:
    """Winogrande's partial scoring: each option fills the blank in the context, the rest of the sentence is scored."""
    continuations = {r["continuation"] for r in requests}
    if len(continuations) != 1:
        raise ValueError(f"winogrande/{qid}: expected one shared continuation, found {len(continuations)}")
    options = [doc["option1"], doc["option2"]]
    sentence = doc["sentence"]
    return MultipleChoiceQuestion(
        task="winogrande",
        id=qid,
        prompt=sentence,
        choices=[f" {o}" for o in options],
        gold=int(doc["answer"]) - 1,
        letter_prompt=letter_prompt(f"Question: Which option fills the blank (_)? {sentence}", options),
        partial=PartialScoring(contexts=[r["context"] for r in requests], continuation=requests[0]["continuation"]),
    )


def _rc_questions(root: Path, task: str, task_dir: str) -> list[MultipleChoiceQuestion]:
    questions = []
    for index, (doc, requests) in enumerate(read_request_groups(root, task_dir)):
        qid = _qid(index)
        if task == "winogrande":
            questions.append(_winogrande_question(qid, doc, requests))
        else:
            questions.append(_rc_question(task, qid, doc, requests))
    return questions


def load_rc0(root: Path, task: str, split: Split) -> list[MultipleChoiceQuestion]:
    """An OLMES rc_0shot task over validation (test labels are not public): eval = all but the last 200, dev = those.

    Every `rc_0shot` request file is built from the validation split; its last DEV_SLICE
    documents are kept back for fitting weights and routers, so they never meet eval.
    """
    questions = _rc_questions(root, task, f"{task}/rc_0shot")
    return questions[:-DEV_SLICE] if split == "eval" else questions[-DEV_SLICE:]


def load_openbookqa(root: Path, split: Split) -> list[MultipleChoiceQuestion]:
    """OpenBookQA: eval = the public test set (zero-shot prompts from the documents of `test_rc_5shot`),
    dev = validation (`rc_0shot`)."""
    if split == "dev":
        return _rc_questions(root, "openbookqa", "openbookqa/rc_0shot")
    questions = []
    for doc in read_request_docs(root, "openbookqa/test_rc_5shot"):
        # The request's context is five-shot; the document's query is the zero-shot cloze prompt.
        query: str = doc["query"]
        choices = [f" {c}" for c in doc["choices"]]
        questions.append(
            MultipleChoiceQuestion(
                task="openbookqa",
                id=f"test/{doc['id']}",
                prompt=query,
                choices=choices,
                gold=int(doc["gold"]),
                letter_prompt=letter_prompt(_letter_stem(query), list(doc["choices"])),
            )
        )
    return questions
