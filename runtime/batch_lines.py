"""The OpenAI Batch API's line formats, and what a batch run has already done; no Ray here.

Input, one request a line (the OpenAI batch input file):

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output, one line a request, in the order they finish (the OpenAI batch output file):

    {"id": "batch_req_…", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "chatcmpl-…", "body": {...}}, "error": null}

A request the endpoint refuses keeps the endpoint's answer (`status_code` 4xx and its
error body); a line that never reached the endpoint (wrong method or url, a body that is
not an object) has `response: null` and `error: {code, message}`, as OpenAI's files do.

The output file is the run's only record: a custom_id in it is done. A restart reads it,
cuts a line a kill left half-written, and runs only the rest.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consort.runtime.errors import ConsortError, InvalidRequest

BATCH_URLS = ("/v1/chat/completions", "/v1/completions")
OUTPUT_FILE = "output.jsonl"
SUMMARY_FILE = "summary.json"
# Answers that say "not now" or "not your fault" rather than "never": --retry-failed runs them again.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
RETRYABLE_CODES = frozenset({"internal_error", "replica_failed"})


class BatchInputError(ConsortError):
    """The input file as a whole cannot run (a line that is not a request object, a repeated custom_id)."""

    http_status = 400
    error_type = "invalid_request_error"


class BatchOutputError(ConsortError):
    """The output folder holds something a resumed run cannot trust (another tool's file, a repeated id)."""


class BatchLineError(InvalidRequest):
    """One line cannot be sent to the endpoint (method, url or body); it becomes an error line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BatchRequest:
    """One input line: its custom_id, where it is (1-based line number) and its text, parsed where it runs."""

    custom_id: str
    line: int
    text: str


def read_requests(path: Path) -> list[BatchRequest]:
    """Every request of an input file; blank lines are skipped.

    A line that is not a JSON object with a non-empty string custom_id, or a custom_id seen
    before, stops the run before anything is sent: the output could not name its answer.
    """
    if not path.is_file():
        raise BatchInputError(f"input file {path} does not exist")
    requests: list[BatchRequest] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if not text:
                continue
            custom_id = _custom_id(text, path, number)
            if custom_id in seen:
                raise BatchInputError(
                    f"{path}:{number}: custom_id {custom_id!r} repeats line {seen[custom_id]}; "
                    "every line needs its own custom_id (the output names each answer by it)"
                )
            seen[custom_id] = number
            requests.append(BatchRequest(custom_id, number, text))
    return requests


def _custom_id(text: str, path: Path, number: int) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BatchInputError(
            f"{path}:{number}: not JSON ({error.msg}); each line must be one request object"
        ) from error
    if not isinstance(data, dict):
        raise BatchInputError(f"{path}:{number}: a {type(data).__name__}, not a request object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchInputError(f"{path}:{number}: custom_id must be a non-empty string, got {custom_id!r}")
    return custom_id


def parse_request(text: str) -> tuple[str, dict[str, Any]]:
    """(url, body) of an input line read by `read_requests`; BatchLineError for what no endpoint accepts."""
    data = json.loads(text)
    method = data.get("method")
    if method != "POST":
        raise BatchLineError("invalid_method", f"method must be POST, got {method!r}")
    url = data.get("url")
    if url not in BATCH_URLS:
        raise BatchLineError("invalid_url", f"url must be one of {', '.join(BATCH_URLS)}; got {url!r}")
    body = data.get("body")
    if not isinstance(body, dict):
        raise BatchLineError("invalid_body", f"body must be a JSON object, got {type(body).__name__}")
    return url, body


def new_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_line(custom_id: str, status_code: int, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """An answer of the endpoint, success or refusal."""
    return {
        "id": new_line_id(),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A request that never got an answer from the endpoint."""
    return {
        "id": new_line_id(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def usage_of(line: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of a successful line; (0, 0) otherwise."""
    response = line.get("response") or {}
    if response.get("status_code") != 200:
        return 0, 0
    usage = response.get("body", {}).get("usage") or {}
    return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))


def is_retryable(line: dict[str, Any]) -> bool:
    """A failure that running the request again may cure (overload, a lost member, an internal error)."""
    response = line.get("response")
    if response is not None:
        return int(response.get("status_code", 200)) in RETRYABLE_STATUS
    return (line.get("error") or {}).get("code") in RETRYABLE_CODES


class OutputLog:
    """The output file, append-only: which custom_ids are done, and the lines of those that finish now.

    `retry_failed` drops retryable failures (429, 5xx, a replica that died) from the file before
    the run, so they run again and each custom_id still appears once.
    """

    def __init__(self, folder: Path, *, retry_failed: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / OUTPUT_FILE
        self.done: set[str] = set()
        self.previous_lines = 0
        self.retried = 0
        if self.path.exists():
            self._load(retry_failed)
        self._file = self.path.open("a", encoding="utf-8")

    def _load(self, retry_failed: bool) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A kill cut the last write short: its request runs again.
            with self.path.open("r+b") as handle:
                handle.truncate(end)
        kept: list[str] = []
        for number, text in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            line = _output_record(text, self.path, number)
            if retry_failed and is_retryable(line):
                self.retried += 1
                continue
            if line["custom_id"] in self.done:
                raise BatchOutputError(
                    f"{self.path}:{number}: custom_id {line['custom_id']!r} is there twice; the file was "
                    "edited or written by two runs at once: move it away to start afresh"
                )
            self.done.add(line["custom_id"])
            kept.append(text)
        if self.retried:
            # Rewrite, then rename: a kill meanwhile leaves the old file whole.
            temporary = self.path.with_suffix(".jsonl.tmp")
            temporary.write_text("".join(t + "\n" for t in kept), encoding="utf-8")
            os.replace(temporary, self.path)
        self.previous_lines = len(kept)

    def append(self, lines: Iterable[str]) -> None:
        """Write finished lines and force them to disk: what is in the file is never run again."""
        self._file.write("".join(f"{line}\n" for line in lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _output_record(text: str, path: Path, number: int) -> dict[str, Any]:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise BatchOutputError(
            f"{path}:{number}: not JSON ({error.msg}); it is not an output of `consort batch`: "
            "choose another --output folder"
        ) from error
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        raise BatchOutputError(
            f"{path}:{number}: no custom_id; it is not an output of `consort batch`: choose another --output folder"
        )
    return line


@dataclass
class Tally:
    """Lines, failures and tokens of this run, and its throughput."""

    total: int
    skipped: int
    started: float = field(default_factory=time.monotonic)
    lines: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_started: float = field(default_factory=time.time)
    # (wall-clock time a line was answered in its replica, its completion tokens): the pool's
    # start-up ends at the first answer; the steady rate is measured from there to the last.
    finishes: list[tuple[float, int]] = field(default_factory=list)

    def add(self, line: dict[str, Any], finished_at: float | None = None) -> None:
        self.lines += 1
        prompt, completion = usage_of(line)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        response = line.get("response")
        if response is None or response.get("status_code") != 200:
            self.failed += 1
        if finished_at is not None:
            self.finishes.append((finished_at, completion))

    def _steady(self) -> tuple[float | None, float | None]:
        """(start-up seconds, completion tokens/s from the first answer to the last) when answers are timed."""
        if not self.finishes:
            return None, None
        first, last = min(t for t, _ in self.finishes), max(t for t, _ in self.finishes)
        later = sum(tokens for t, tokens in self.finishes if t > first)
        return round(first - self.wall_started, 3), (
            round(later / (last - first), 2) if last > first else None
        )

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def progress(self) -> str:
        seconds = max(self.elapsed_s, 1e-9)
        done = self.skipped + self.lines
        return (
            f"{done}/{self.total} lines ({self.skipped} from before, {self.failed} failed), "
            f"{self.completion_tokens / seconds:.1f} completion tokens/s"
        )

    def summary(self, **extra: Any) -> dict[str, Any]:
        seconds = max(self.elapsed_s, 1e-9)
        startup, steady = self._steady()
        return {
            "total_lines": self.total,
            "done_before": self.skipped,
            "lines_this_run": self.lines,
            "failed_this_run": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "wall_s": round(seconds, 3),
            "completion_tokens_per_s": round(self.completion_tokens / seconds, 2),
            "total_tokens_per_s": round((self.prompt_tokens + self.completion_tokens) / seconds, 2),
            # Start-up (replicas loading their models) apart: the rate a longer batch tends to.
            "startup_s": startup,
            "completion_tokens_per_s_after_startup": steady,
            **extra,
        }


__all__ = [
    "BATCH_URLS",
    "OUTPUT_FILE",
    "SUMMARY_FILE",
    "BatchInputError",
    "BatchLineError",
    "BatchOutputError",
    "BatchRequest",
    "OutputLog",
    "Tally",
    "error_line",
    "is_retryable",
    "parse_request",
    "read_requests",
    "response_line",
    "usage_of",
]
