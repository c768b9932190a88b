"""`consort batch` without Ray: the OpenAI batch line formats, resume from the output file, and the
answer of one line by the endpoint's own service (over an in-process ensemble)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consort.deploy.jobs.batch import build_parser, main
from consort.deploy.jobs.batch_replica import answer, rows
from consort.deploy.openai_api import ChatCompletionRequest, CompletionRequest
from consort.deploy.service import OpenAIService
from consort.runtime.batch_lines import (
    OUTPUT_FILE,
    BatchInputError,
    BatchOutputError,
    OutputLog,
    Tally,
    error_line,
    is_retryable,
    parse_request,
    read_requests,
    response_line,
)
from consort.runtime.config import parse_config
from consort.runtime.errors import ConfigError, Overloaded
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Delta, RequestOptions
from tests.unit.conftest import ALIASES, make_loop
from tests.unit.test_layout import InProcessEngine


def request_line(custom_id: str, url: str = "/v1/completions", **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# -- input ---------------------------------------------------------------------------------------


def test_input_lines_are_read_with_their_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [request_line("a", prompt="x"), "", request_line("b", prompt="y")])
    requests = read_requests(path)
    assert [(r.custom_id, r.line) for r in requests] == [("a", 1), ("b", 3)]
    assert parse_request(requests[1].text) == ("/v1/completions", {"prompt": "y"})


def test_a_repeated_custom_id_stops_the_run_naming_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", [request_line("a"), request_line("b"), request_line("a")])
    with pytest.raises(BatchInputError, match=r"in.jsonl:3: custom_id 'a' repeats line 1"):
        read_requests(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"in.jsonl:1: not JSON"),
        ("[1, 2]", r"in.jsonl:1: a list, not a request object"),
        ('{"method": "POST"}', r"in.jsonl:1: custom_id must be a non-empty string, got None"),
        ('{"custom_id": 7}', r"custom_id must be a non-empty string, got 7"),
        ('{"custom_id": ""}', r"custom_id must be a non-empty string, got ''"),
    ],
)
def test_a_line_without_a_usable_custom_id_stops_the_run(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(BatchInputError, match=message):
        read_requests(write(tmp_path / "in.jsonl", [line]))


def test_a_missing_input_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BatchInputError, match="does not exist"):
        read_requests(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}, "invalid_method"),
        ({"custom_id": "a", "url": "/v1/completions", "body": {}}, "invalid_method"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}, "invalid_url"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"}, "invalid_body"),
        ({"custom_id": "a", "method": "POST", "url": "/v1/completions"}, "invalid_body"),
    ],
)
def test_a_line_no_endpoint_accepts_becomes_an_error_line(data: dict[str, Any], code: str) -> None:
    line = asyncio.run(answer(_unused_service(), "a", json.dumps(data), retry_s=0))
    assert line["custom_id"] == "a" and line["response"] is None
    assert line["error"]["code"] == code and line["error"]["message"]
    assert line["id"].startswith("batch_req_")


# -- output and resume ---------------------------------------------------------------------------


def test_output_lines_have_the_openai_shape() -> None:
    ok = response_line(
        "a", 200, {"id": "cmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 5}}, "cmpl-1"
    )
    assert set(ok) == {"id", "custom_id", "response", "error"} and ok["error"] is None
    assert ok["response"] == {
        "status_code": 200,
        "request_id": "cmpl-1",
        "body": {"id": "cmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
    }
    failed = error_line("b", "invalid_url", "no")
    assert failed["response"] is None and failed["error"] == {"code": "invalid_url", "message": "no"}
    batch = rows([(ok, 1.5), (failed, 2.5)])
    assert list(batch["custom_id"]) == ["a", "b"]
    assert [json.loads(t)["custom_id"] for t in batch["output"]] == ["a", "b"]
    assert list(batch["completion_tokens"]) == [5, 0] and list(batch["prompt_tokens"]) == [3, 0]
    assert list(batch["finished_at"]) == [1.5, 2.5]


def test_retryable_failures_are_overload_server_errors_and_lost_replicas() -> None:
    assert is_retryable(response_line("a", 429, {}, "r")) and is_retryable(response_line("a", 503, {}, "r"))
    assert not is_retryable(response_line("a", 400, {}, "r")) and not is_retryable(
        response_line("a", 200, {}, "r")
    )
    assert is_retryable(error_line("a", "internal_error", "x")) and not is_retryable(
        error_line("a", "invalid_url", "x")
    )


def test_the_output_file_says_what_is_done_and_a_torn_last_line_is_cut(tmp_path: Path) -> None:
    first = json.dumps(response_line("a", 200, {}, "r"))
    second = json.dumps(error_line("b", "invalid_url", "x"))
    (tmp_path / OUTPUT_FILE).write_text(f"{first}\n{second}\n{second[:20]}")
    log = OutputLog(tmp_path)
    assert log.done == {"a", "b"} and log.previous_lines == 2
    log.append([json.dumps(response_line("c", 200, {}, "r"))])
    log.close()
    lines = (tmp_path / OUTPUT_FILE).read_text().splitlines()
    assert [json.loads(t)["custom_id"] for t in lines] == ["a", "b", "c"]
    assert lines[:2] == [first, second]


def test_retry_failed_drops_retryable_failures_so_each_id_stays_once(tmp_path: Path) -> None:
    kept = [json.dumps(response_line("a", 200, {}, "r")), json.dumps(response_line("b", 400, {}, "r"))]
    dropped = [
        json.dumps(response_line("c", 503, {}, "r")),
        json.dumps(error_line("d", "internal_error", "x")),
    ]
    write(tmp_path / OUTPUT_FILE, [kept[0], dropped[0], kept[1], dropped[1]])
    assert OutputLog(tmp_path).done == {"a", "b", "c", "d"}  # without the flag, failures are done too
    log = OutputLog(tmp_path, retry_failed=True)
    log.close()
    assert log.done == {"a", "b"} and log.retried == 2
    assert (tmp_path / OUTPUT_FILE).read_text().splitlines() == kept


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["not json"], "not an output of `consort batch`"),
        (['{"x": 1}'], "no custom_id"),
        ([json.dumps(error_line("a", "x", "y"))] * 2, "custom_id 'a' is there twice"),
    ],
)
def test_an_output_file_that_cannot_be_trusted_is_refused(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    write(tmp_path / OUTPUT_FILE, lines)
    with pytest.raises(BatchOutputError, match=message):
        OutputLog(tmp_path)


def test_an_output_of_another_input_is_refused_before_ray_starts(tmp_path: Path, capsys) -> None:
    write(tmp_path / "in.jsonl", [request_line("a", prompt="x")])
    (tmp_path / "out").mkdir()
    write(tmp_path / "out" / OUTPUT_FILE, [json.dumps(error_line("zz", "invalid_url", "x"))])
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "answers 1 custom_id(s) the input does not have (e.g. 'zz')" in capsys.readouterr().err


def test_a_finished_run_does_nothing_and_writes_its_summary(tmp_path: Path) -> None:
    write(tmp_path / "in.jsonl", [request_line("a", prompt="x")])
    (tmp_path / "out").mkdir()
    done = response_line("a", 200, {"usage": {"prompt_tokens": 2, "completion_tokens": 4}}, "r")
    write(tmp_path / "out" / OUTPUT_FILE, [json.dumps(done)])
    assert main(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["total_lines"] == 1 and summary["done_before"] == 1 and summary["lines_this_run"] == 0


def test_the_tally_counts_tokens_and_failures() -> None:
    tally = Tally(total=4, skipped=1, wall_started=100.0)
    tally.add(response_line("a", 200, {"usage": {"prompt_tokens": 2, "completion_tokens": 5}}, "r"), 110.0)
    tally.add(response_line("b", 400, {"error": {}}, "r"), 111.0)
    tally.add(response_line("c", 200, {"usage": {"prompt_tokens": 1, "completion_tokens": 7}}, "r"), 112.0)
    summary = tally.summary()
    assert (summary["lines_this_run"], summary["failed_this_run"]) == (3, 1)
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (3, 12)
    # Start-up ends at the first answer; the steady rate counts what came after it, over the time after it.
    assert summary["startup_s"] == 10.0 and summary["completion_tokens_per_s_after_startup"] == 3.5
    assert (
        summary["completion_tokens_per_s"] > 0 and "4/4 lines (1 from before, 1 failed)" in tally.progress()
    )


def test_flags_and_the_pool_config() -> None:
    args = build_parser().parse_args(["--input", "i", "--output", "o", "--replicas", "3", "--retry-failed"])
    assert (args.replicas, args.retry_failed) == (3, True)
    config = parse_config(
        {"members": [{"name": "a", "model": "tiny:x"}], "batch": {"replicas": 4, "batch_size": 8}}
    )
    assert (config.batch.replicas, config.batch.batch_size, config.batch.max_in_flight) == (4, 8, None)
    with pytest.raises(ConfigError, match=r"batch\.replicas"):
        parse_config({"members": [{"name": "a", "model": "tiny:x"}], "batch": {"replicas": 0}})
    with pytest.raises(ConfigError, match=r"batch\.nodes"):
        parse_config({"members": [{"name": "a", "model": "tiny:x"}], "batch": {"nodes": 2}})


# -- one line answered by the endpoint's service ----------------------------------------------------


def _unused_service() -> OpenAIService:
    config = parse_config({"members": [{"name": "a", "model": "tiny:x"}], "strategy": "mean"})
    return OpenAIService(None, config)  # type: ignore[arg-type]  # lines refused before any engine call


@pytest.fixture(scope="module")
def service(tiny_models) -> OpenAIService:
    pair = make_loop(
        tiny_models, [("smollm2", ALIASES[0]), ("gemma3", ALIASES[1])], strategy="mean", main="smollm2"
    )
    return OpenAIService(InProcessEngine(pair.core), pair.config)


def _without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_a_line_is_answered_with_the_endpoints_body(service: OpenAIService) -> None:
    chat = {
        "model": "consort",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    line = asyncio.run(answer(service, "c", request_line("c", "/v1/chat/completions", **chat), retry_s=0))
    direct = json.loads(
        asyncio.run(service.chat(ChatCompletionRequest.model_validate(chat))).model_dump_json()
    )
    assert line["response"]["status_code"] == 200 and line["error"] is None
    assert line["response"]["request_id"] == line["response"]["body"]["id"]
    assert _without_ids(line["response"]["body"]) == _without_ids(direct)
    assert direct["choices"][0]["message"]["content"]  # a real answer, not two empty ones

    text = {
        "model": "consort",
        "prompt": "The capital of France is",
        "max_tokens": 5,
        "temperature": 0,
        "n": 2,
    }
    line = asyncio.run(answer(service, "t", request_line("t", **text), retry_s=0))
    direct = json.loads(
        asyncio.run(service.completions(CompletionRequest.model_validate(text))).model_dump_json()
    )
    assert _without_ids(line["response"]["body"]) == _without_ids(direct)
    assert len(direct["choices"]) == 2 and direct["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"model": "consort", "messages": "hi"},
            400,
            "invalid request: messages: Input should be a valid list",
        ),
        ({"model": "consort", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "consort", "prompt": "x", "stream": True}, 400, "stream is not supported in a batch line"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "known models"),
    ],
)
def test_a_request_the_endpoint_refuses_keeps_its_refusal(
    service: OpenAIService, body: dict[str, Any], status: int, message: str
) -> None:
    url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    line = asyncio.run(answer(service, "x", request_line("x", url, **body), retry_s=0))
    assert line["error"] is None and line["response"]["status_code"] == status
    assert message in line["response"]["body"]["error"]["message"]
    assert line["response"]["request_id"].startswith("req_")


class BusyEngine(InProcessEngine):
    """Refuses the first `busy` admissions as a full queue does, then answers."""

    def __init__(self, core: Any, busy: int) -> None:
        super().__init__(core)
        self.busy = busy

    async def generate(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions | None = None
    ) -> AsyncIterator[Delta]:
        if self.busy > 0:
            self.busy -= 1
            raise Overloaded("3 requests are already waiting; retry shortly")
        async for delta in super().generate(prompt, params, options):
            yield delta


def test_a_full_queue_is_waited_out_within_retry_s_then_written_as_429(tiny_models) -> None:
    pair = make_loop(tiny_models, [("smollm2", ALIASES[0])], strategy="mean")
    text = request_line("q", model="consort", prompt="Hello", max_tokens=3, temperature=0)
    patient = OpenAIService(BusyEngine(pair.core, busy=3), pair.config)
    line = asyncio.run(answer(patient, "q", text, retry_s=30))
    assert line["response"]["status_code"] == 200
    hasty = OpenAIService(BusyEngine(pair.core, busy=3), pair.config)
    line = asyncio.run(answer(hasty, "q", text, retry_s=0))
    assert line["response"]["status_code"] == 429
    assert line["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
