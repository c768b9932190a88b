"""Row builders for the generation benchmarks: TriviaQA, NQ-open (short answers), GSM8K (a number: 8-shot
cloze for base models, zero-shot chain of thought in each member's chat template), HumanEval and MBPP
(programs, run against their tests in the sandbox)."""

from __future__ import annotations

from pathlib import Path

from consort.runtime.evaluation.files import read_arrow, read_request_docs
from consort.runtime.evaluation.specs import DEV_SLICE, CodeCheck, GenerationQuestion, Split

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


# Zero-shot chain of thought for chat members: the user message asks for the working and a
# last line whose number `extract_number` finds ('answer is' first, else the last number).
GSM8K_CHAT_INSTRUCTION = (
    "Solve the following math word problem. Think step by step, then give the final answer "
    "on the last line in the form 'The answer is N.'"
)
# A chat member ends its turn with its end-of-turn token (the engine stops there); a member
# with no template continues the plain 'User:/Assistant:' transcript, whose next turn stops it.
GSM8K_CHAT_STOP = ["\nUser:", "<|im_end|>", "<end_of_turn>"]
GSM8K_CHAT_MAX_TOKENS = 512


def gsm8k_chat_message(question: str) -> str:
    return f"{GSM8K_CHAT_INSTRUCTION}\n\n{question.strip()}"


def load_gsm8k_chat(root: Path, split: Split) -> list[GenerationQuestion]:
    """GSM8K test, zero-shot chain of thought as one user message; the same rows (and dev slice) as `gsm8k`."""
    docs = list(read_request_docs(root, "gsm8k/gold_bpb_5shot"))
    return [
        GenerationQuestion(
            task="gsm8k_chat",
            id=f"test/{doc['id']}",
            prompt=gsm8k_chat_message(doc["question"]),
            chat=True,
            answers=[str(doc["short_answer"])],
            stop=GSM8K_CHAT_STOP,
            max_tokens=GSM8K_CHAT_MAX_TOKENS,
            answer_kind="number",
        )
        for doc in _tail_split(docs, split)
    ]


# OLMES's generation settings for the two code tasks (`codex_humaneval`, `codex_mbpp`):
# greedy, at most 512 tokens, stopping where a completed function is followed by other code.
CODE_MAX_TOKENS = 512
HUMANEVAL_STOP = ["\nclass", "\nif", "\nprint", "\n#", "\n```"]
MBPP_STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```", "\n#", "\n<|/"]


def load_humaneval(root: Path, split: Split) -> list[GenerationQuestion]:
    """HumanEval's 164 problems, all eval (there is no dev split: calibrate on MBPP's).

    The prompt is OLMES's zero-shot one, the problem's signature and docstring then
    'Here is the completed function:' and an open python code block; the program run is
    the signature and docstring, the completion, then the problem's `check` on its entry point.
    """
    if split == "dev":
        return []
    questions = []
    for doc in read_request_docs(root, "codex_humaneval/gold_bpb_0shot"):
        entry = doc["entry_point"]
        questions.append(
            GenerationQuestion(
                task="humaneval",
                id=doc["task_id"],
                prompt=doc["_context"],
                answers=[doc["canonical_solution"]],
                stop=HUMANEVAL_STOP,
                max_tokens=CODE_MAX_TOKENS,
                answer_kind="code",
                code=CodeCheck(prefix=doc["prompt"], tests=f"{doc['test']}\n\ncheck({entry})", entry_point=entry),
            )
        )
    return questions


def load_mbpp(root: Path, split: Split) -> list[GenerationQuestion]:
    """MBPP's 500 test problems (task ids 11-510): eval = the first 300, dev = the last 200.

    The prompt is OLMES's zero-shot 'evalplus' one (the problem and its first test in a
    code block, then an open python block); the program is the completion, then the
    problem's setup code and all of its tests.
    """
    docs = list(read_request_docs(root, "codex_mbpp/gold_bpb_0shot"))
    return [
        GenerationQuestion(
            task="mbpp",
            id=f"test/{doc['task_id']}",
            prompt=doc["_context"],
            answers=[doc["code"]],
            stop=MBPP_STOP,
            max_tokens=CODE_MAX_TOKENS,
            answer_kind="code",
            code=CodeCheck(prefix="", tests="\n".join([doc["test_setup_code"], *doc["test_list"]]).strip()),
        )
        for doc in _tail_split(docs, split)
    ]
