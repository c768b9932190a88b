"""Requests that vote: each is a group of child sequences in the core, answered once all are in.

`vote.py` chooses among finished answers; this module holds the bookkeeping
around it: which sequences belong to which vote, their text so far, and the one
delta a caller receives when its group is complete.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from consort.runtime.errors import InvalidRequest
from consort.runtime.fusion import register
from consort.runtime.fusion.base import Strategy
from consort.runtime.types import Delta, RequestOptions, VoteKind

if TYPE_CHECKING:
    from consort.runtime.core import EnsembleCore
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams


@dataclass
class VoteGroup:
    """A `vote` request: several complete answers, sampled across members, then one is chosen."""

    parent_id: str
    children: list[str]
    kind: VoteKind
    n_choices: int | None
    prompt_tokens: int = 0
    texts: dict[str, str] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


class VoteGroups:
    """The open votes of one core."""

    def __init__(self) -> None:
        self._groups: dict[str, VoteGroup] = {}
        self._parent_of: dict[str, str] = {}
        self._embedder: Any = None  # loaded on the first free-text vote

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __contains__(self, parent_id: str) -> bool:
        return parent_id in self._groups

    def open(self, group: VoteGroup) -> None:
        self._groups[group.parent_id] = group
        for child in group.children:
            self._parent_of[child] = group.parent_id

    def caller_of(self, seq_id: str) -> str:
        """The id the caller waits on: the vote's, for one of its answers; the sequence's own otherwise."""
        return self._parent_of.get(seq_id, seq_id)

    def close(self, parent_id: str) -> list[str]:
        """Forget a vote; returns its children (empty if `parent_id` is no vote)."""
        group = self._groups.pop(parent_id, None)
        if group is None:
            return []
        for child in group.children:
            self._parent_of.pop(child, None)
        return group.children

    def prompt_tokens(self, parent_id: str) -> int:
        return self._groups[parent_id].prompt_tokens

    def collect(self, deltas: Iterable[Delta]) -> list[Delta]:
        """Hold the children's deltas back; when a group's answers are all in, emit the chosen one."""
        out = []
        for delta in deltas:
            parent = self._parent_of.get(delta.seq_id)
            if parent is None:
                out.append(delta)
                continue
            group = self._groups[parent]
            group.texts[delta.seq_id] = group.texts.get(delta.seq_id, "") + delta.text
            if delta.finish_reason:
                group.finish[delta.seq_id] = delta.finish_reason
                group.tokens[delta.seq_id] = delta.completion_tokens
            if len(group.finish) == len(group.children):
                out.append(self._choose(group))
                self.close(parent)
        return out

    def _choose(self, group: VoteGroup) -> Delta:
        from consort.runtime.vote import default_embedder, select_answer

        answers = [group.texts.get(c, "") for c in group.children]
        if group.kind == "free" and self._embedder is None and len(answers) > 1:
            self._embedder = default_embedder()
        result = select_answer(answers, kind=group.kind, n_choices=group.n_choices, embedder=self._embedder)
        chosen = group.children[result.index]
        return Delta(
            seq_id=group.parent_id,
            text=answers[result.index],
            finish_reason=group.finish[chosen],
            prompt_tokens=group.prompt_tokens,
            completion_tokens=group.tokens[chosen],
            diagnostics=[{"vote": result.model_dump(), "answers": answers}],
        )


@register
class VoteStrategy(Strategy):
    """Agent Forest: sample N whole answers across the members, return the one the others agree with most."""

    name = "vote"
    level = "answer"

    def admit(
        self, core: EnsembleCore, prompt: Prompt, params: SamplingParams, options: RequestOptions, seq_id: str | None
    ) -> str:
        vote = core.config.vote
        samples = options.vote_samples or vote.samples
        kind = options.vote_kind or vote.kind
        if kind not in get_args(VoteKind):
            raise InvalidRequest(f"vote kind must be one of {', '.join(get_args(VoteKind))}, not {kind!r}")
        if kind == "choice" and not options.vote_choices:
            raise InvalidRequest("vote with kind=choice needs the number of choices")
        if options.gate is not None and vote.base == "member":
            raise InvalidRequest("gate applies to the answers' strategy, and this ensemble votes over members alone")
        temperature = params.temperature if params.temperature > 0 else vote.temperature
        parent = seq_id or core.new_id("vote")
        weights = core.resolve_weights(options.weights)
        voters = [n for n in self.ctx.names if weights[n] > 0]
        children = []
        for i in range(samples):
            if vote.base == "member":
                child_options = RequestOptions(
                    strategy="me", weights=[1.0 if n == voters[i % len(voters)] else 0.0 for n in self.ctx.names]
                )
            else:
                child_options = RequestOptions(strategy=vote.base, weights=options.weights, gate=options.gate)
            child_params = params.model_copy(
                update={"temperature": temperature, "seed": None if params.seed is None else params.seed + i}
            )
            children.append(core.add(prompt, child_params, child_options, seq_id=f"{parent}/{i}"))
        core.votes.open(
            VoteGroup(parent, children, kind, options.vote_choices, prompt_tokens=core.prompt_tokens(children[0]))
        )
        return parent
