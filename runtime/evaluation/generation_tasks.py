"""Row builders for the generation benchmarks: TriviaQA, NQ-open (short answers) and GSM8K (a number)."""

from __future__ import annotations

from pathlib import Path

from consort.runtime.evaluation.files import read_arrow, read_request_docs
from consort.runtime.evaluation.specs import DEV_SLICE, GenerationQuestion, Split

# Short answers fit on one line; stopping at the newline keeps a small model from
# rambling through max_tokens on every question (lm-eval does the same).
SHORT_ANSWER_STOP = ["\n", "Question:"]
SHORT_ANSWER_MAX_TOKENS = 32

# The OLMES GSM8K generation settings, with max_tokens cut from 512: the 8-shot
# chains of thought are under 100 tokens and CPU decoding is slow.
GSM8K_STOP = ["Question:", "</s>", "<|im_end|>", "\n\n"]
GSM8K_MAX_TOKENS = 256


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(s.strip() for s in items if s and s.strip()))


def _tail_split(items: list, split: Split) -> list:
    """eval = all but the last DEV_SLICE items, dev = those last items (the tasks have no dev split)."""
    return items[:-DEV_SLICE] if split == "eval" else items[-DEV_SLICE:]


def _short_answer(task: str, qid: str, question: str, answers: list[str]) -> GenerationQuestion:
    return GenerationQuestion(
        task=task,
        id=qid,
        prompt=f"Question: {question.strip()}\nAnswer:",
        answers=_dedupe(answers),
        stop=SHORT_ANSWER_STOP,
        max_tokens=SHORT_ANSWER_MAX_TOKENS,
        answer_kind="span",
    )


def load_triviaqa(root: Path, split: Split) -> list[GenerationQuestion]:
    """TriviaQA (rc.wikipedia.nocontext, closed book): only validation is packaged."""
    rows = read_arrow(
        root, "trivia_qa/rc.wikipedia.nocontext/validation", ["question", "question_id", "answer"]
    )
    return [
        _short_answer(
            "triviaqa",
            row["question_id"],
            row["question"],
            [row["answer"]["value"], *row["answer"]["aliases"]],
        )
        for row in _tail_split(rows, split)
    ]


def load_nq_open(root: Path, split: Split) -> list[GenerationQuestion]:
    """NQ-open: only validation is packaged (its test set is hidden)."""
    rows = read_arrow(root, "nq_open/none/validation", ["question", "answer"])
    return [
        _short_answer("nq_open", f"validation/{i}", row["question"], list(row["answer"]))
        for i, row in _tail_split(list(enumerate(rows)), split)
    ]


def load_gsm8k(root: Path, split: Split) -> list[GenerationQuestion]:
    """GSM8K test, with the standard 8-shot chain-of-thought prompt the OLMES request file carries.

    The exemplars end in 'So the answer is N.', which teaches small base models
    a format whose last number is the answer.
    """
    docs = list(read_request_docs(root, "gsm8k/gold_bpb_5shot"))
    return [
        GenerationQuestion(
            task="gsm8k",
            id=f"test/{doc['id']}",
            prompt=doc["_context"],
            answers=[str(doc["short_answer"])],
            stop=GSM8K_STOP,
            max_tokens=GSM8K_MAX_TOKENS,
            answer_kind="number",
        )
        for doc in _tail_split(docs, split)
    ]
