"""Voting on code by behaviour: the prompt's example calls, the harness's keys, and the vote on them."""

from __future__ import annotations

import pytest

from consort.runtime.code_behaviour import REPORT_MARKER, behaviour_harness, behaviour_key, example_calls
from consort.runtime.errors import InvalidRequest
from consort.runtime.evaluation.metrics import behaviour_keys
from consort.runtime.evaluation.sandbox import run_python
from consort.runtime.evaluation.specs import CodeCheck, GenerationQuestion
from consort.runtime.vote import select_answer, select_member

PREFIX = '''def common_letters(words: list, n: int) -> set:
    """The letters shared by the first n words.
    >>> common_letters(["abc", "cab", "xbc"], 2)
    {'a', 'b', 'c'}
    >>> common_letters(["a)b", "(b"], 2) == {'b'}
    True
    For example: common_letters([], 0) ==> set()
    """
'''
# The task's own tests print a report of their own: had they run, every completion would get this key.
HIDDEN_TESTS = f"print({REPORT_MARKER!r} + '[\"=hidden\"]')"


def _question(prefix: str = PREFIX, entry_point: str = "common_letters") -> GenerationQuestion:
    return GenerationQuestion(
        task="humaneval",
        id="t/0",
        prompt=f"Complete the function.\n```python\n{prefix}```",
        chat=True,
        answers=["pass"],
        stop=["\nif", "\n```"],
        max_tokens=64,
        answer_kind="code",
        code=CodeCheck(prefix=prefix, tests=HIDDEN_TESTS, entry_point=entry_point),
    )


def test_example_calls_are_the_prompts_literal_calls_in_order_once_each() -> None:
    prompt = PREFIX + '    >>> common_letters(["abc", "cab", "xbc"], 2)\n    >>> common_letters(words, 1)\n'
    assert example_calls(prompt, "common_letters") == [
        'common_letters(["abc", "cab", "xbc"], 2)',
        'common_letters(["a)b", "(b"], 2)',  # a ")" inside a string does not end the call
        "common_letters([], 0)",
    ]  # not the def line, not the repeat, not the call on a name (running it would run the prompt's code)
    assert example_calls("x = other_common_letters([1], 2)", "common_letters") == []
    assert example_calls("no calls here", "common_letters") == []


def test_the_key_reads_the_harness_report_and_gives_none_to_failures() -> None:
    assert behaviour_key(f"chatter\n{REPORT_MARKER}[\"=ab\", \"!ValueError\"]\n") == "=ab|!ValueError"
    assert behaviour_key(f"{REPORT_MARKER}[\"!ValueError\", \"!KeyError\"]") is None  # raised on every call
    assert behaviour_key("Traceback ... SyntaxError") is None  # the harness never ran
    assert behaviour_key(f"{REPORT_MARKER}[\"=ab\"") is None  # torn report


def test_the_harness_runs_in_the_sandbox_and_reports_one_entry_per_call() -> None:
    program = "def f(x):\n    if x < 0:\n        raise ValueError(x)\n    return x * 2\n" + behaviour_harness(
        ["f(2)", "f(-1)", "f(2.0)"]
    )
    result = run_python(program)
    assert result.passed, result.detail
    key = behaviour_key(result.stdout)
    assert key is not None
    doubled, raised, doubled_float = key.split("|")
    assert raised == "!ValueError"
    assert doubled == doubled_float  # 4 == 4.0, as the task's == tests would judge


def test_completions_that_do_the_same_share_a_key_and_the_tasks_tests_never_run() -> None:
    question = _question()
    by_loop = (
        "    shared = set(words[0]) if n else set()\n"
        "    for word in words[1:n]:\n        shared &= set(word)\n    return shared\n"
    )
    by_reduce = (
        "    import functools\n"
        "    return functools.reduce(lambda a, b: a & b, (set(w) for w in words[:n])) if n else set()\n"
    )
    wrong = "    return set(''.join(words[:n]))\n"  # the union: another behaviour
    broken = "    return set(undefined_name)\n"  # raises on every call: no vote
    not_python = "    return {{\n"
    keys = behaviour_keys(question, [by_loop, by_reduce, wrong, broken, not_python])
    assert keys[0] is not None and keys[0] == keys[1]
    assert keys[2] is not None and keys[2] != keys[0]
    assert keys[3] is None and keys[4] is None
    # Sets of strings print in a per-run hash order; the key does not depend on it.
    assert behaviour_keys(question, [by_loop] * 3) == [keys[0]] * 3


def test_a_prompt_without_example_calls_gives_no_keys_and_a_task_without_a_function_is_refused() -> None:
    bare = "def f(x: int) -> int:\n    \"\"\"Double x.\"\"\"\n"
    assert behaviour_keys(_question(bare, "f"), ["    return 2 * x\n"]) == [None]
    with pytest.raises(InvalidRequest, match="names no function"):
        behaviour_keys(_question().model_copy(update={"code": CodeCheck(prefix="", tests="")}), ["x"])


def test_vote_on_keys_counts_behaviours_not_texts() -> None:
    texts = ["slow but right", "fast and right", "wrong", "crashes"]
    result = select_answer(texts, kind="free", keys=["=1", "=1", "=2", None])
    assert (result.index, result.answer, result.method, result.voters) == (0, "slow but right", "majority", 3)
    assert result.counts == {"=1": 2, "=2": 1}
    # A tie goes to the earliest behaviour; no key at all falls back to the kind's own rule.
    assert select_answer(["a", "b"], kind="free", keys=["=2", "=1"]).index == 0
    fallback = select_answer(["= 3", "= 5", "= 5"], kind="number", keys=[None, None, None])
    assert (fallback.index, fallback.answer) == (1, "5")
    with pytest.raises(InvalidRequest, match="2 vote keys for 3 answers"):
        select_answer(["a", "b", "c"], kind="free", keys=["=1", "=1"])


def test_mux_on_keys_takes_the_member_whose_samples_behave_alike() -> None:
    samples = {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}
    keys: dict[str, list[str | None]] = {"a": ["=1", "=2", None], "b": [None, "=3", "=3"]}
    chosen = select_member(samples, kind="free", keys=keys)
    assert (chosen.member, chosen.index, chosen.answer, chosen.method) == ("b", 1, "b1", "majority")
    assert [m.agreement for m in chosen.members] == pytest.approx([1 / 3, 2 / 3])
    # Tied on agreement: the dev accuracy decides.
    tied = select_member(samples, kind="free", keys={"a": ["=1", "=1", None], "b": ["=3", "=3", None]},
                         accuracy={"a": 0.2, "b": 0.4})
    assert (tied.member, tied.tie_break) == ("b", "accuracy")
    with pytest.raises(InvalidRequest, match="one vote key per sample"):
        select_member(samples, kind="free", keys={"a": ["=1"], "b": ["=1", "=1", "=1"]})
