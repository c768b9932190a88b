"""Tool calls in OpenAI's response shapes: a finished answer's `tool_calls`, and a stream's pieces
(`delta.tool_calls` with `index`, `id`, `function.name`, then `function.arguments` pieces).

Reading calls out of the ensemble's text is runtime/constraints/tools.py; this module only
gives them ids and OpenAI's shapes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from consort.deploy.openai_api import (
    ChatDelta,
    ChatMessageOut,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
)
from consort.runtime.constraints.tools import CallStream, parse_calls


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def answer_message(text: str, finish_reason: str | None) -> tuple[ChatMessageOut, str | None]:
    """A finished answer of a request with tools: its calls, the text around them, and its finish reason
    (`tool_calls` when it made any)."""
    content, calls = parse_calls(text)
    if not calls:
        return ChatMessageOut(role="assistant", content=text), finish_reason
    tool_calls = [
        ToolCallOut(id=call_id(), function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls
    ]
    return ChatMessageOut(role="assistant", content=content, tool_calls=tool_calls), "tool_calls"


@dataclass
class ToolDeltas:
    """One streamed choice of a request with tools: its text deltas as OpenAI chat deltas."""

    reader: CallStream = field(default_factory=CallStream)

    def feed(self, text: str, final: bool) -> list[ChatDelta]:
        out = []
        for event in self.reader.feed(text, final=final):
            if event.name is not None:
                assert event.index is not None
                piece = ToolCallDelta(
                    index=event.index,
                    id=call_id(),
                    type="function",
                    function=FunctionCallDelta(name=event.name, arguments=""),
                )
                out.append(ChatDelta(tool_calls=[piece]))
            elif event.index is not None:
                piece = ToolCallDelta(
                    index=event.index, function=FunctionCallDelta(arguments=event.arguments)
                )
                out.append(ChatDelta(tool_calls=[piece]))
            else:
                out.append(ChatDelta(content=event.content))
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason is not None and self.reader.calls else reason
