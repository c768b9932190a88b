"""Tool calling: how tools reach each member's prompt, the grammar of a forced call, and reading calls
back out of the ensemble's text (whole, or as it streams).

The ensemble writes calls in the Hermes / Qwen2.5 format, whatever its main member:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A member whose chat template renders tools (Qwen2.5's does) gets them natively. A member without
one (SmolLM2's template, Gemma-3 base's plain transcript) gets the documented fallback: the same
text Qwen2.5's template writes, as a system message ahead of the conversation; its earlier calls
become `<tool_call>` text in its assistant turns and tool results `<tool_response>` text in a user
turn, as Qwen2.5's template shows them. With `tool_choice` `required` or a named function the
calls are constrained (runtime/constraints) to this format with arguments that validate against
the function's parameter schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from consort.runtime.constraints.spec import JSON_OPTIONS, Constraint
from consort.runtime.errors import ConflictingOptions

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The function definition of an OpenAI tool ({"type": "function", "function": {...}})."""
    return tool["function"]  # type: ignore[no-any-return]


def system_text(tools: list[dict[str, Any]]) -> str:
    """The fallback's description of the tools (what Qwen2.5's template writes into its system turn)."""
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def call_text(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools: calls with their arguments as objects (as HF templates expect)."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in message["tool_calls"]
            ]
            message["content"] = message.get("content") or ""
        out.append(message)
    return out


def fallback_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Messages for a member whose template knows no tools: everything as plain text turns."""
    out: list[dict[str, Any]] = []
    if tools:
        first = messages[0] if messages else None
        if first is not None and first["role"] == "system":
            out.append({"role": "system", "content": f"{first['content']}\n\n{system_text(tools)}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": system_text(tools)})
    for message in messages:
        if message["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
            )
        elif message.get("tool_calls"):
            calls = "\n".join(call_text(c["name"], c["arguments"]) for c in message["tool_calls"])
            content = message.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out


def renders_tools(template: str | None) -> bool:
    """Whether a chat template renders a `tools` list (else the member gets the fallback)."""
    return bool(template) and "tools" in str(template)


def call_constraint(tools: list[dict[str, Any]], name: str | None, parallel: bool) -> Constraint:
    """`tool_choice` required (name None: any of the tools) or a named function: the text is one call
    (several with `parallel`), each with arguments valid for that function's parameters."""
    functions = [function_of(t) for t in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ConflictingOptions(f"tool_choice names the function {name!r}, which is not among the tools")
    bodies = []
    for function in functions:
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        schema = {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": JSON_OPTIONS,
        }
        bodies.append(f"%json {json.dumps(schema)}")
    rules = [
        "start: call" + (' ("\\n" call)*' if parallel else ""),
        'call: "<tool_call>\\n" body "\\n</tool_call>"',
    ]
    rules.append("body: " + "\n    | ".join(bodies))
    return Constraint(kind="grammar", grammar_text="\n".join(rules) + "\n")


@dataclass
class ToolCall:
    """One call read from the text: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def parse_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls or None, the calls) of a finished answer. A block that is not a call
    (bad JSON, no name) stays in the text: the client sees what the ensemble wrote."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1))
        if call is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
        return None
    arguments = value["arguments"]
    return ToolCall(
        value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    )


@dataclass
class CallEvent:
    """News for a streaming client: content text, the start of call `index` (its name), or argument text."""

    content: str = ""
    index: int | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class CallStream:
    """Reads calls out of text as it streams (OpenAI's delta shape: a call's name first, then its
    arguments in pieces). Text that may still turn into `<tool_call>` is held back until it is known."""

    buffer: str = ""
    in_call: bool = False
    started: bool = False  # the current call's name was sent
    sent: int = 0  # characters of the current call's arguments sent
    calls: int = 0

    def feed(self, text: str, final: bool = False) -> list[CallEvent]:
        self.buffer += text
        out: list[CallEvent] = []
        while True:
            if not self.in_call:
                at = self.buffer.find(OPEN)
                if at == -1:
                    keep = 0 if final else _partial_suffix(self.buffer, OPEN)
                    content, self.buffer = (
                        self.buffer[: len(self.buffer) - keep],
                        self.buffer[len(self.buffer) - keep :],
                    )
                    if content.strip() or (content and not self.calls):  # no blank lines between calls
                        out.append(CallEvent(content=content))
                    return out
                if self.buffer[:at].strip():
                    out.append(CallEvent(content=self.buffer[:at]))
                self.buffer = self.buffer[at + len(OPEN) :]
                self.in_call, self.started, self.sent = True, False, 0
            if not self.started:
                head = _HEAD.match(self.buffer)
                if head is None:
                    return out
                out.append(CallEvent(index=self.calls, name=json.loads(f'"{head.group(1)}"')))
                self.buffer = self.buffer[head.end() :]
                self.started = True
            end = self.buffer.find(CLOSE)
            if end == -1:
                # Hold back what may be the call's closing brace and the start of </tool_call>.
                visible = self.buffer[: len(self.buffer) - _partial_suffix(self.buffer, CLOSE)]
                ready = re.sub(r"\s*\}?\s*$", "", visible, count=1)
            else:
                ready = re.sub(r"\s*\}\s*$", "", self.buffer[:end].rstrip(), count=1)
            if len(ready) > self.sent:
                out.append(CallEvent(index=self.calls, arguments=ready[self.sent :]))
                self.sent = len(ready)
            if end == -1:
                return out
            self.buffer = self.buffer[end + len(CLOSE) :]
            self.in_call = False
            self.calls += 1


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
