"""Per-member prompt formatting: each member renders the conversation with its own chat template."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from consort.runtime.errors import InvalidRequest


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: str = Field(description="system, user or assistant.")
    content: str = Field(description="The turn's text.")


class Prompt(BaseModel):
    """What to continue: raw text (completions) or a conversation (chat)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = Field(default=None, description="Raw prompt text, tokenized as is.")
    messages: list[ChatMessage] | None = Field(default=None, description="Conversation, rendered per member.")

    def model_post_init(self, _context: Any) -> None:
        if (self.text is None) == (self.messages is None):
            raise InvalidRequest("a prompt is either text or messages, exactly one of them")
        if self.messages is not None and not self.messages:
            raise InvalidRequest("messages must not be empty")


def _fallback_chat(messages: list[ChatMessage]) -> str:
    # A base model with no template (Gemma-3-270M) still continues a plain transcript sensibly.
    lines = []
    for message in messages:
        role = {"system": "System", "user": "User", "assistant": "Assistant"}.get(message.role, message.role.title())
        lines.append(f"{role}: {message.content}")
    return "\n".join(lines) + "\nAssistant:"


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """This member's token ids for the prompt, including its own special tokens (BOS, chat markers)."""
    if prompt.text is not None:
        ids = tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
    elif tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            [m.model_dump() for m in prompt.messages or []], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(_fallback_chat(prompt.messages or []), add_special_tokens=True)["input_ids"]
    if not ids:
        raise InvalidRequest("the prompt is empty")
    return list(ids)
