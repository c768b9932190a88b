"""The command line: bad input is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from consort.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-alias"], "neither a known alias"),
        (["--model", "/nonexistent/model.gguf"], "does not exist"),
        (["--model", "tiny:smollm2-135m-instruct", "--members", "a,b"], "one of --model"),
        (["--model", "tiny:smollm2-135m-instruct", "--temperature", "-1"], "temperature"),
        (["--model", "tiny:smollm2-135m-instruct", "--max-tokens", "0"], "max_tokens"),
    ],
)
def test_bad_generate_input_is_one_line(capsys, args: list[str], message: str) -> None:
    code = main(["generate", "--local", "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_corrupt_gguf(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CONSORT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 50)
    assert main(["generate", "--local", "--prompt", "hi", "--model", str(bad)]) != 0
    assert "corrupt" in capsys.readouterr().err


def test_prompt_longer_than_the_context(capsys) -> None:
    code = main(["generate", "--local", "--model", "tiny:smollm2-135m-instruct", "--prompt", "word " * 9000])
    err = capsys.readouterr().err
    assert code != 0 and "context" in err and "Traceback" not in err


def test_generate_json_reports_steps(capsys) -> None:
    code = main(
        ["generate", "--local", "--members", "tiny:smollm2-135m-instruct,tiny:gemma3-270m", "--strategy", "me",
         "--prompt", "Hello", "--max-tokens", "5", "--seed", "3", "--json"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    # Greedy, and the seed fixes which member each `me` step draws: one run, always the same. The random
    # tiny members put no end-of-sequence in 5 steps, so the token budget ends it.
    assert report["finish_reason"] == "length"
    # max_tokens counts ensemble pieces, one per step; usage counts the main member's tokens of the same text.
    assert len(report["steps"]) == 5
    assert "".join(step["piece"] for step in report["steps"]) == report["text"]
    assert sum(report["draws"].values()) == len(report["steps"])


def test_models_lists_the_aliases(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out and "Apache-2.0" in out


def test_console_script_exit_code_without_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "consort", "generate", "--local", "--model", "nope", "--prompt", "x"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("consort: error:") and "Traceback" not in done.stderr
