"""Voting on code by what it does: each completion's behaviour on the inputs its prompt shows.

Two completions that compute the same outputs on the same inputs give the same answer, however
differently they are written; sentence embeddings of the text cannot see that. So a code vote
can count behaviours the way a number vote counts numbers (MBR-exec, Shi et al. 2022; the
clustering step of AlphaCode). The inputs are the calls of the function that the prompt itself
shows (HumanEval's `>>> f(...)` and `f(...) ==> ...` examples): only their *inputs* are used,
never the outputs the prompt states nor the benchmark's hidden tests, so selection learns
nothing a user did not write in the request.

Pure text here: finding the calls, writing the harness that runs them, reading its report.
Running the harness is the sandbox's job (`consort.runtime.evaluation.metrics.behaviour_keys`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence

# The harness's report line; everything the completion itself prints comes before it.
REPORT_MARKER = "consort-behaviour:"
_MAX_CALL_CHARS = 2000

_HARNESS = '''

def _consort_canon(value, depth=0):
    # Values that compare equal under == must give one key (tests compare with ==), and a key
    # must not depend on the run: set order follows the per-run string hash seed.
    if depth > 50:
        return "deep"
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return repr(int(value))
        return format(value, ".9g")
    if isinstance(value, (int, str, bytes)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "[" + ",".join(_consort_canon(v, depth + 1) for v in value) + "]"
    if isinstance(value, (set, frozenset)):
        return "set[" + ",".join(sorted(_consort_canon(v, depth + 1) for v in value)) + "]"
    if isinstance(value, dict):
        items = (_consort_canon(k, depth + 1) + ":" + _consort_canon(v, depth + 1) for k, v in value.items())
        return "dict[" + ",".join(sorted(items)) + "]"
    return type(value).__name__ + ":" + repr(value)


def _consort_behaviour(calls):
    import hashlib
    import json
    report = []
    for call in calls:
        try:
            value = _consort_canon(eval(call))
        except Exception as error:
            report.append("!" + type(error).__name__)
        else:
            report.append("=" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16])
    print()
    print(MARKER + json.dumps(report), flush=True)


_consort_behaviour(CALLS)
'''


def _call_at(source: str, start: int, entry_point: str) -> str | None:
    """The call of `entry_point` that starts at `start`, if one with literal arguments does."""
    end = start
    limit = min(len(source), start + _MAX_CALL_CHARS)
    while True:
        end = source.find(")", end + 1, limit)
        if end < 0:
            return None
        text = source[start : end + 1]
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError:
            continue
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == entry_point):
            return None
        try:
            for argument in [*node.args, *(k.value for k in node.keywords)]:
                ast.literal_eval(argument)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None  # an argument that is not a plain value: running it would run the prompt's code
        return text


def example_calls(prompt: str, entry_point: str) -> list[str]:
    """The calls of `entry_point` with literal arguments that `prompt` shows, each once, in order.

    The function's own `def` line is not a call; a call whose arguments are not plain Python
    literals (a name, an expression with calls) is skipped rather than run.
    """
    if not entry_point.isidentifier():
        return []
    calls: list[str] = []
    for match in re.finditer(rf"(?<![\w.]){re.escape(entry_point)}\s*\(", prompt):
        if prompt[: match.start()].rstrip().endswith("def"):
            continue
        call = _call_at(prompt, match.start(), entry_point)
        if call is not None and call not in calls:
            calls.append(call)
    return calls


def behaviour_harness(calls: Sequence[str]) -> str:
    """Python to append to a completion's program: it runs each call and prints one report line."""
    return _HARNESS.replace("MARKER", repr(REPORT_MARKER)).replace("CALLS", repr(list(calls)))


def behaviour_key(stdout: str) -> str | None:
    """A completion's vote key from its harness report: its results on the prompt's calls, one string.

    None (no vote) when the report is missing (the program failed before the calls ran, timed
    out, or exited early) or when every call raised: a program that fails on every example
    has no behaviour to agree on, and many broken completions failing alike must not outvote
    one that runs.
    """
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(REPORT_MARKER)), None)
    if line is None:
        return None
    try:
        report = json.loads(line[len(REPORT_MARKER) :])
    except json.JSONDecodeError:
        return None
    if not isinstance(report, list) or not report or not all(isinstance(r, str) for r in report):
        return None
    if not any(r.startswith("=") for r in report):
        return None
    return "|".join(report)
