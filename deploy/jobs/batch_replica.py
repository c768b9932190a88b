"""One replica of the batch pool: an ensemble built once per Ray Data actor, answering batch lines.

Ray Data constructs `BatchReplica` once in each actor of the pool (as `ray.data.llm`'s
processors build their engine) and calls it with batches of rows. The replica owns a
`Coordinator` (its members in their own placement group) and answers each line with the
endpoint's own code, `OpenAIService`: a line's response body is what `POST url` with that
body would have answered, field for field.

Ray is imported only where a replica is built, so that `answer` runs under the unit tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from consort.deploy.errors import describe_validation, error_body
from consort.deploy.openai_api import ChatCompletionRequest, CompletionRequest, ErrorDetail, ErrorResponse
from consort.deploy.service import OpenAIService
from consort.runtime.batch_lines import BatchLineError, error_line, parse_request, response_line, usage_of
from consort.runtime.config import parse_config
from consort.runtime.errors import ConsortError, InvalidRequest

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 503)  # the queue is full, a member is restarting: both pass, so wait and try again
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


class StreamInBatch(InvalidRequest):
    """`stream: true` in a batch line: a batch output holds whole answers."""

    param = "stream"


async def _call(service: OpenAIService, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's answer to `POST url` with `body`, as the JSON object it would send."""
    request: ChatCompletionRequest | CompletionRequest
    if url == "/v1/chat/completions":
        request = ChatCompletionRequest.model_validate(body)
    else:
        request = CompletionRequest.model_validate(body)
    if request.stream:
        raise StreamInBatch("stream is not supported in a batch line: leave it out or set it to false")
    if isinstance(request, ChatCompletionRequest):
        result: BaseModel | AsyncIterator[str] = await service.chat(request)
    else:
        result = await service.completions(request)
    if not isinstance(result, BaseModel):
        raise TypeError(f"the service streamed although stream is false: {type(result).__name__}")
    # The endpoint's bytes, read back: the same serialisation, so the same fields and nulls.
    return dict(json.loads(result.model_dump_json()))


def _refusal(custom_id: str, status: int, body: ErrorResponse) -> dict[str, Any]:
    return response_line(custom_id, status, body.model_dump(), f"req_{uuid.uuid4().hex}")


async def answer(service: OpenAIService, custom_id: str, text: str, retry_s: float) -> dict[str, Any]:
    """The output line of one input line; never raises for a bad request, only records it."""
    try:
        url, body = parse_request(text)
    except BatchLineError as error:
        return error_line(custom_id, error.code, str(error))
    deadline = time.monotonic() + retry_s
    backoff = FIRST_BACKOFF_S
    while True:
        try:
            answered = await _call(service, url, body)
        except ValidationError as error:
            # The message the endpoint gives for the same body (deploy/errors.py's handler).
            message, param, code = describe_validation(RequestValidationError(error.errors()))
            detail = ErrorDetail(message=message, type="invalid_request_error", param=param, code=code)
            return _refusal(custom_id, 400, ErrorResponse(error=detail))
        except ConsortError as error:
            if error.http_status in RETRY_STATUS and time.monotonic() + backoff < deadline:
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            return _refusal(custom_id, error.http_status, error_body(error))
        except Exception:  # as the endpoint's 500 handler: logged here, one error line, the batch goes on
            log.exception("batch line %r failed unexpectedly", custom_id)
            detail = ErrorDetail(
                message="internal error; the request was not completed", type="internal_error"
            )
            return _refusal(custom_id, 500, ErrorResponse(error=detail))
        return response_line(custom_id, 200, answered, str(answered.get("id", "")))


def rows(lines: list[tuple[dict[str, Any], float]]) -> dict[str, np.ndarray]:
    """(output line, when it was answered) as a Ray Data batch: the serialised line, and what the driver counts."""
    usage = [usage_of(line) for line, _ in lines]
    return {
        "custom_id": np.array([line["custom_id"] for line, _ in lines], dtype=object),
        "output": np.array([json.dumps(line, ensure_ascii=False) for line, _ in lines], dtype=object),
        "prompt_tokens": np.array([u[0] for u in usage], dtype=np.int64),
        "completion_tokens": np.array([u[1] for u in usage], dtype=np.int64),
        "finished_at": np.array([at for _, at in lines], dtype=np.float64),
    }


class BatchReplica:
    """A Ray Data callable class: one ensemble per actor, batches of (custom_id, line) in, output lines out.

    The call is a coroutine, so Ray Data runs several batches of one actor at once on the
    actor's event loop; the coordinator's continuous batching steps their requests together,
    and `max_in_flight` keeps them within its queue.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from consort.actors.coordinator import Coordinator

        self.config = parse_config(config)
        self.coordinator = Coordinator(self.config)
        self.service = OpenAIService(self.coordinator, self.config)
        self.in_flight = self.config.batch.max_in_flight or self.config.max_batch
        self._slots: asyncio.Semaphore | None = None

    async def _answer(self, custom_id: str, text: str) -> tuple[dict[str, Any], float]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.in_flight)  # made on the actor's loop, where it is used
        async with self._slots:
            line = await answer(self.service, custom_id, text, self.config.batch.retry_s)
        return line, time.time()  # wall clock: the driver compares answers of replicas on other nodes

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = await asyncio.gather(
            *(self._answer(str(c), str(t)) for c, t in zip(batch["custom_id"], batch["line"], strict=True))
        )
        return rows(list(lines))

    def __del__(self) -> None:
        # Members and their placement group go with the replica, not with the job's end.
        coordinator = getattr(self, "coordinator", None)
        if coordinator is not None:
            coordinator.shutdown()
