"""`mux`: SLM-MUX ("SLM-MUX: Orchestrating Small Language Models for Reasoning").

Each member answers k times on its own (k samples at temperature, or k CoT-decoding
paths with `cot_branches`); the member whose own answers agree most is trusted, and
its majority answer is returned. Members tied on agreement are told apart by their
dev accuracy (the request's `member_accuracy`, else the config's `mux.accuracy`),
then by their order. Selection is `vote.select_member`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consort.runtime.errors import InvalidRequest
from consort.runtime.fusion import register
from consort.runtime.types import Delta, RequestOptions, VoteKind
from consort.runtime.vote_groups import (
    AnswerGroup,
    AnswerStrategy,
    Sample,
    answering,
    cot_branches,
    sample_requests,
    vote_kind,
    voters,
)

if TYPE_CHECKING:
    from consort.runtime.config import EnsembleConfig
    from consort.runtime.core import EnsembleCore
    from consort.runtime.cot_decoding import CotPlan
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams


class MuxGroup(AnswerGroup):
    """A `mux` request: k answers per member, then the most self-consistent member's majority answer."""

    def __init__(
        self,
        core: EnsembleCore,
        parent_id: str,
        kind: VoteKind,
        n_choices: int | None,
        accuracy: dict[str, float],
        cot: CotPlan | None = None,
    ) -> None:
        super().__init__(core, parent_id)
        self.kind = kind
        self.n_choices = n_choices
        self.accuracy = accuracy
        self.cot = cot

    def round_done(self) -> Delta | None:
        from consort.runtime.vote import select_member

        extra: dict[str, Any] = {}
        if self.cot is not None:
            if self.round == 0:
                self.start_round(self.cot.branches(self, self.samples()))
                return None
            paths = self.cot.score(self.samples(), self.kind, self.n_choices)
            # A member's paths most confident first: a tie inside the member goes to the surer one.
            ordered = sorted(paths, key=lambda p: -p.margin)
            by_member: dict[str, list[Sample]] = {}
            for path in ordered:
                by_member.setdefault(path.member, []).append(path.sample)
            by_member = {m: by_member[m] for m in dict.fromkeys(p.member for p in paths)}  # member order
            extra["cot"] = [p.summary() for p in paths]
        else:
            by_member = {}
            for sample in self.samples():
                assert sample.member is not None
                by_member.setdefault(sample.member, []).append(sample)
        texts = {m: [s.text for s in samples] for m, samples in by_member.items()}
        embedder = (
            self.embedder() if self.kind == "free" and any(len(t) > 1 for t in texts.values()) else None
        )
        result = select_member(
            texts,
            kind=self.kind,
            n_choices=self.n_choices,
            accuracy={m: a for m, a in self.accuracy.items() if m in texts},
            embedder=embedder,
        )
        return self.answer(
            by_member[result.member][result.index],
            {"mux": result.model_dump(), "answers": [t for ts in texts.values() for t in ts], **extra},
        )


def member_accuracy(core: EnsembleCore, options: RequestOptions) -> dict[str, float]:
    """The members' dev accuracy, the tie-breaker: the request's (one per member, config order), else the config's."""
    names = core.ctx.names
    if options.member_accuracy is None:
        return dict(core.config.mux.accuracy)
    if len(options.member_accuracy) != len(names):
        raise InvalidRequest(
            f"{len(options.member_accuracy)} member_accuracy values given for {len(names)} members ({', '.join(names)})"
        )
    if any(not 0.0 <= a <= 1.0 for a in options.member_accuracy):
        raise InvalidRequest("member_accuracy values are accuracies, each in [0, 1]")
    return dict(zip(names, options.member_accuracy, strict=True))


@register
class MuxStrategy(AnswerStrategy):
    """SLM-MUX: k answers per member; the answer of the member whose own answers agree most."""

    name = "mux"
    reads = frozenset({"member_accuracy", "cot_branches"})

    @classmethod
    def per_member(cls, config: EnsembleConfig, options: RequestOptions) -> int:
        branches = options.cot_branches if options.cot_branches is not None else config.cot.branches
        return branches or options.vote_samples or config.mux.samples

    @classmethod
    def sequences(cls, config: EnsembleConfig, options: RequestOptions) -> int:
        return cls.per_member(config, options) * len(voters(config, options.weights))

    def admit(
        self,
        core: EnsembleCore,
        prompt: Prompt,
        params: SamplingParams,
        options: RequestOptions,
        seq_id: str | None,
    ) -> str:
        kind, n_choices = vote_kind(core, options)
        accuracy = member_accuracy(core, options)
        branches = cot_branches(core, options)
        members = answering(core, options)
        parent = seq_id or core.new_id("mux")
        if branches is not None:
            from consort.runtime.cot_decoding import CotPlan

            plan = CotPlan(core, prompt, params, members, branches)
            group = MuxGroup(core, parent, kind, n_choices, accuracy, cot=plan)
            group.start_round(plan.probes(parent))
        else:
            k = options.vote_samples or core.config.mux.samples
            spread: list[str | None] = [m for m in members for _ in range(k)]
            group = MuxGroup(core, parent, kind, n_choices, accuracy)
            group.start_round(sample_requests(core, parent, prompt, params, spread, options))
        core.votes.open(group)
        return parent
