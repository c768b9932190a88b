"""Every failure a user can meet, as an explicit type with a message that says what to do.

The HTTP layer maps these to OpenAI-shaped error bodies by `http_status`; the CLI
prints `str(error)` on one line and exits non-zero.
"""

from __future__ import annotations


class ConsortError(Exception):
    """Base of all Consort errors. `http_status` and `error_type` drive the HTTP mapping."""

    http_status: int = 500
    error_type: str = "internal_error"


class ConfigError(ConsortError, ValueError):
    """The configuration is inconsistent (unknown strategy, bad weights, unknown main member, ...)."""

    http_status = 400
    error_type = "invalid_request_error"


class InvalidRequest(ConsortError, ValueError):
    """A request field is out of range or malformed."""

    http_status = 400
    error_type = "invalid_request_error"


class UnparsableContent(InvalidRequest):
    """A field is a well-formed string whose content is not what it must be (a JSON schema, regex or
    grammar that does not compile; tool-call arguments that are not JSON): no schema of the API can say so."""


class ConflictingOptions(InvalidRequest):
    """Two request fields that each are valid ask for things that exclude each other (two structured
    outputs at once)."""


class PromptTooLong(InvalidRequest):
    """The prompt (plus max_tokens) does not fit a member's context window."""


class ModelNotFound(ConsortError):
    """A model reference names nothing that exists here (unknown alias, missing file, unreachable hub)."""

    http_status = 404
    error_type = "not_found_error"


class ModelLoadError(ConsortError):
    """A model file exists but cannot be loaded (corrupt GGUF, unsupported architecture)."""


class Overloaded(ConsortError):
    """The admission queue is full; retry later."""

    http_status = 429
    error_type = "rate_limit_error"


class MemberLost(ConsortError):
    """A member actor died while serving a request; the request cannot complete."""

    http_status = 503
    error_type = "service_unavailable"

    def __init__(self, member: str, detail: str = "") -> None:
        self.member = member
        self.detail = detail
        super().__init__(
            f"ensemble member {member!r} was lost{': ' + detail if detail else ''}; "
            "it is being restarted, retry the request"
        )

    def __reduce__(self) -> tuple[type[MemberLost], tuple[str, str]]:
        # Crosses process boundaries (Ray) with its fields, not its formatted message.
        return (MemberLost, (self.member, self.detail))


class SequenceFailed(ConsortError):
    """Generating one sequence failed inside the ensemble; that request fails, the others go on.

    The message is the same whatever went wrong: the cause is logged on the server,
    never sent to the client.
    """

    error_type = "internal_error"

    def __init__(self, seq_id: str = "") -> None:
        self.seq_id = seq_id
        super().__init__(
            "this request failed inside the ensemble (the cause is in the server log); other requests are unaffected"
        )

    def __reduce__(self) -> tuple[type[SequenceFailed], tuple[str]]:
        return (SequenceFailed, (self.seq_id,))


class RoutingDecisionNotFound(ConsortError):
    """Feedback names a request id the routing store has no decision for."""

    http_status = 404
    error_type = "not_found_error"
