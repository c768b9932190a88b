"""Per-member prompt formatting: each member renders the conversation with its own chat template."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from consort.runtime.constraints import tools
from consort.runtime.errors import InvalidRequest


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: str = Field(description="system, user, assistant or tool.")
    content: str = Field(description="The turn's text.")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None,
        description="assistant: the calls it made, each {'name': str, 'arguments': object} (runtime/constraints/tools.py).",
    )
    tool_call_id: str | None = Field(
        default=None, description="tool: the id of the call this result answers."
    )


class Prompt(BaseModel):
    """What to continue: raw text (completions) or a conversation (chat)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = Field(default=None, description="Raw prompt text, tokenized as is.")
    messages: list[ChatMessage] | None = Field(default=None, description="Conversation, rendered per member.")
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        description="OpenAI tool definitions the conversation may call; rendered by each member's template, "
        "or by the fallback of runtime/constraints/tools.py where its template has no tool format.",
    )
    token_ids: list[int] | None = Field(
        default=None,
        description="A prompt given as token ids (of `token_vocab`'s vocabulary): fed as they are, no special "
        "token added, to that member and to every member with the same vocabulary; `text` is their decoding, "
        "which the members with another vocabulary tokenize as a text prompt.",
    )
    token_vocab: str | None = Field(
        default=None, description="With token_ids: the member whose vocabulary the ids are in."
    )

    def model_post_init(self, _context: Any) -> None:
        if (self.text is None) == (self.messages is None):
            raise InvalidRequest("a prompt is either text or messages, exactly one of them")
        if self.messages is not None and not self.messages:
            raise InvalidRequest("messages must not be empty")
        if (self.token_ids is None) != (self.token_vocab is None) or (
            self.token_ids is not None and (self.text is None or not self.token_ids)
        ):
            raise InvalidRequest("token_ids (not empty) come with their text and token_vocab")


def _fallback_chat(messages: list[ChatMessage]) -> str:
    # A base model with no template (Gemma-3-270M) still continues a plain transcript sensibly.
    lines = []
    for message in messages:
        role = {"system": "System", "user": "User", "assistant": "Assistant"}.get(message.role, message.role.title())
        lines.append(f"{role}: {message.content}")
    return "\n".join(lines) + "\nAssistant:"


def _uses_tools(prompt: Prompt) -> bool:
    return bool(prompt.tools) or any(m.tool_calls or m.role == "tool" for m in prompt.messages or [])


def _native_tools(tokenizer: Any, prompt: Prompt) -> bool:
    """Tools, calls or results in the conversation, and a template that renders them."""
    return _uses_tools(prompt) and tools.renders_tools(tokenizer.chat_template)


def _plain_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The conversation as plain turns: with tools, the documented fallback (runtime/constraints/tools.py)."""
    messages = [m.model_dump(exclude_none=True) for m in prompt.messages or []]
    if not _uses_tools(prompt):
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return tools.fallback_messages(messages, prompt.tools)


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """This member's token ids for the prompt, including its own special tokens (BOS, chat markers)."""
    if prompt.text is not None:
        ids = tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
    elif tokenizer.chat_template and _native_tools(tokenizer, prompt):
        rendered = tokenizer.apply_chat_template(
            tools.native_messages([m.model_dump(exclude_none=True) for m in prompt.messages or []]),
            tools=prompt.tools,
            add_generation_prompt=True,
            tokenize=False,
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    elif tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            _plain_messages(prompt), add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        messages = [ChatMessage(**m) for m in _plain_messages(prompt)]
        ids = tokenizer(_fallback_chat(messages), add_special_tokens=True)["input_ids"]
    if not ids:
        raise InvalidRequest("the prompt is empty")
    return list(ids)
