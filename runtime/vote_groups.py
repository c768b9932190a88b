"""Answer-level requests: each is a group of child sequences in the core, answered once all are in.

`vote.py` chooses among finished answers; this module holds the bookkeeping
around it: which sequences belong to which request, their text so far, the
rounds a request runs (CoT-decoding probes then branches; debate rounds), the
tokens all of them cost, and the one delta a caller receives at the end.

The `vote` strategy lives here; `mux.py` and `debate.py` are the other
answer-level strategies, built on the same groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, get_args

from consort.runtime.errors import ConsortError, InvalidRequest, SequenceFailed
from consort.runtime.fusion import REGISTRY, gated_names, register, strategy_class
from consort.runtime.fusion.base import Candidate, Strategy
from consort.runtime.types import Delta, RequestOptions, TokenLogprob, VoteKind

if TYPE_CHECKING:
    from consort.runtime.config import EnsembleConfig
    from consort.runtime.core import EnsembleCore
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams
    from consort.runtime.vote import Embedder

log = logging.getLogger(__name__)

# Request options that only some answer-level strategies read: a request that sets one for a
# strategy that does not read it is refused, never silently ignored.
CHECKED_OPTIONS = ("member_accuracy", "cot_branches", "debate_rounds")


@dataclass
class Sample:
    """One finished child sequence of an answer-level request."""

    seq_id: str
    member: str | None  # the member that wrote it alone, or None (a token-level strategy over several)
    text: str
    finish_reason: str
    tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ChildRequest:
    """One child sequence to start: its prompt, sampling, options and (CoT) forced first piece."""

    prompt: Prompt
    params: SamplingParams
    options: RequestOptions
    member: str | None
    seq_id: str
    forced: tuple[Candidate, ...] = ()


class AnswerGroup:
    """A request answered by rounds of child sequences; `round_done` either answers or starts the next round.

    Every child's completion tokens, in every round, count in the answer's usage (the cost of
    `n` sampled answers, as OpenAI's `n` reports it); the prompt counts once, in the main member's tokens.
    """

    def __init__(self, core: EnsembleCore, parent_id: str) -> None:
        self.core = core
        self.parent_id = parent_id
        self.prompt_tokens = 0
        self.children: list[str] = []
        self.member_of: dict[str, str | None] = {}
        self.round = -1
        self.spent = 0
        self._text: dict[str, str] = {}
        self._logprobs: dict[str, list[TokenLogprob]] = {}
        self._finished: dict[str, Sample] = {}

    def start_round(self, requests: Sequence[ChildRequest]) -> None:
        """Queue the next round's children, all or none: one the core refuses drops those already queued."""
        if not requests:
            raise InvalidRequest("an answer-level round needs at least one sequence")
        self.round += 1
        self.children, self.member_of = [], {}
        self._text, self._logprobs, self._finished = {}, {}, {}
        try:
            for request in requests:
                child = self.core.add(
                    request.prompt,
                    request.params,
                    request.options,
                    seq_id=request.seq_id,
                    forced=request.forced,
                )
                self.children.append(child)
                self.member_of[child] = request.member
                if not self.prompt_tokens:
                    self.prompt_tokens = self.core.prompt_tokens(child)
        except ConsortError:
            self.core._drop(set(self.children))
            raise

    def receive(self, delta: Delta) -> bool:
        """Take one child's delta; True when every child of this round has finished."""
        seq_id = delta.seq_id
        self._text[seq_id] = self._text.get(seq_id, "") + delta.text
        self._logprobs.setdefault(seq_id, []).extend(delta.logprobs)
        if delta.finish_reason is not None:
            self._finished[seq_id] = Sample(
                seq_id=seq_id,
                member=self.member_of[seq_id],
                text=self._text[seq_id],
                finish_reason=delta.finish_reason,
                tokens=delta.completion_tokens,
                logprobs=self._logprobs[seq_id],
            )
            self.spent += delta.completion_tokens
        return len(self._finished) == len(self.children)

    def samples(self) -> list[Sample]:
        """This round's finished children, in the order they were started."""
        return [self._finished[c] for c in self.children]

    def embedder(self) -> Embedder:
        return self.core.votes.embedder()

    def round_done(self) -> Delta | None:
        """Every child of the round has finished: the answer, or None once the next round is queued."""
        raise NotImplementedError

    def answer(self, sample: Sample, diagnostics: dict[str, Any]) -> Delta:
        return Delta(
            seq_id=self.parent_id,
            text=sample.text,
            finish_reason=sample.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.spent,
            diagnostics=[{**diagnostics, "rounds": self.round + 1, "completion_tokens": self.spent}],
        )


class VoteGroups:
    """The open answer-level requests of one core."""

    def __init__(self) -> None:
        self._groups: dict[str, AnswerGroup] = {}
        self._parent_of: dict[str, str] = {}
        self._embedder: Embedder | None = None  # loaded on the first free-text selection

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __contains__(self, parent_id: str) -> bool:
        return parent_id in self._groups

    def open(self, group: AnswerGroup) -> None:
        self._groups[group.parent_id] = group
        for child in group.children:
            self._parent_of[child] = group.parent_id

    def caller_of(self, seq_id: str) -> str:
        """The id the caller waits on: the request's, for one of its children; the sequence's own otherwise."""
        return self._parent_of.get(seq_id, seq_id)

    def close(self, parent_id: str) -> list[str]:
        """Forget a request; returns its current children (empty if `parent_id` is none)."""
        group = self._groups.pop(parent_id, None)
        if group is None:
            return []
        for child in group.children:
            self._parent_of.pop(child, None)
        return group.children

    def prompt_tokens(self, parent_id: str) -> int:
        return self._groups[parent_id].prompt_tokens

    def embedder(self) -> Embedder:
        from consort.runtime.vote import default_embedder

        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    def collect(self, deltas: Iterable[Delta]) -> list[Delta]:
        """Hold the children's deltas back; when a request's last round is in, emit its one answer."""
        out = []
        for delta in deltas:
            parent = self._parent_of.get(delta.seq_id)
            if parent is None:
                out.append(delta)
                continue
            group = self._groups[parent]
            if not group.receive(delta):
                continue
            for child in group.children:
                self._parent_of.pop(child, None)
            try:
                answer = group.round_done()
            except ConsortError as error:  # the request's own error (a prompt too long for the next round)
                answer = Delta(seq_id=parent, text="", finish_reason="error", error=error)
            except Exception:  # this request's failure is its own: the others go on
                log.exception("answer-level request %s failed", parent)
                answer = Delta(seq_id=parent, text="", finish_reason="error", error=SequenceFailed(parent))
            if answer is None:
                for child in group.children:
                    self._parent_of[child] = parent
            else:
                self._groups.pop(parent, None)
                out.append(answer)
        return out


# --- what every answer-level strategy shares --------------------------------------------------


class AnswerStrategy(Strategy):
    """An answer-level strategy: `admit` opens an `AnswerGroup`; `sequences` is the most it runs at once."""

    level = "answer"
    # The options in CHECKED_OPTIONS this strategy reads, and "gate" if it passes a gate on to its answers.
    reads: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def sequences(cls, config: EnsembleConfig, options: RequestOptions) -> int:
        """The most child sequences one request runs at once (admission reserves that many)."""
        raise NotImplementedError


def voters(config: EnsembleConfig, weights: list[float] | None) -> list[str]:
    """The members that answer: those with a positive weight (the request's, else the config's)."""
    names = [m.name for m in config.members]
    given = weights if weights is not None else config.weights
    if len(given) != len(names):
        raise InvalidRequest(f"{len(given)} weights given for {len(names)} members ({', '.join(names)})")
    return [n for n, w in zip(names, given, strict=True) if w > 0]


def answering(core: EnsembleCore, options: RequestOptions) -> list[str]:
    """The members that answer this request (weights checked as for any request)."""
    return [n for n, w in core.resolve_weights(options.weights).items() if w > 0]


def sequences_needed(config: EnsembleConfig, options: RequestOptions) -> int:
    """How many sequences a request occupies at once: one, or its answer-level strategy's count."""
    cls = strategy_class(options.strategy or config.strategy)
    if cls.level != "answer":
        return 1
    if issubclass(cls, AnswerStrategy):
        return cls.sequences(config, options)
    return options.vote_samples or config.vote.samples  # an answer-level strategy of another shape samples N


def answer_strategies() -> list[str]:
    """The registered strategies built on answer groups (they compare answers by `vote_kind`)."""
    return [n for n, cls in REGISTRY.items() if issubclass(cls, AnswerStrategy)]


def strategies_reading(option: str) -> list[str]:
    return [n for n, cls in REGISTRY.items() if issubclass(cls, AnswerStrategy) and option in cls.reads]


def check_options(strategy: Strategy, options: RequestOptions) -> None:
    """Refuse an option the request's strategy does not read (it would otherwise do nothing)."""
    reads = strategy.reads if isinstance(strategy, AnswerStrategy) else frozenset()
    for option in CHECKED_OPTIONS:
        if getattr(options, option) is not None and option not in reads:
            raise InvalidRequest(
                f"{option} applies to the strategies {', '.join(strategies_reading(option))}, not {strategy.name!r}"
            )
    # A token-level strategy checks its gate itself (EnsembleCore.resolve_gate); an answer-level one
    # takes it only to pass it on to the strategy its answers are written with.
    if options.gate is not None and strategy.level == "answer" and "gate" not in reads:
        takers = [*gated_names(), *strategies_reading("gate")]
        raise InvalidRequest(f"gate applies to {', '.join(takers)}, not {strategy.name!r}: its answers are not gated")


def vote_kind(core: EnsembleCore, options: RequestOptions) -> tuple[VoteKind, int | None]:
    """How answers are compared (the request's kind, else the config's) and, for letters, how many choices."""
    kind = options.vote_kind or core.config.vote.kind
    if kind not in get_args(VoteKind):
        raise InvalidRequest(f"vote kind must be one of {', '.join(get_args(VoteKind))}, not {kind!r}")
    if kind == "choice" and not options.vote_choices:
        raise InvalidRequest(
            f"{options.strategy or core.config.strategy} with kind=choice needs the number of choices"
        )
    return kind, options.vote_choices


def alone(names: Sequence[str], member: str, **extra: Any) -> RequestOptions:
    """Options for a child that `member` writes alone (its own distribution, `me` with one weight)."""
    return RequestOptions(strategy="me", weights=[1.0 if n == member else 0.0 for n in names], **extra)


def cot_branches(core: EnsembleCore, options: RequestOptions) -> int | None:
    """CoT-decoding's branches per member for this request, or None when its answers are sampled."""
    branches = options.cot_branches if options.cot_branches is not None else core.config.cot.branches
    if branches is not None and options.vote_samples is not None:
        raise InvalidRequest(
            "cot_branches and vote_samples exclude each other: with CoT-decoding each member answers with "
            "its cot_branches paths, one per alternative first token"
        )
    return branches


def sample_requests(
    core: EnsembleCore,
    parent: str,
    prompt: Prompt,
    params: SamplingParams,
    members: Sequence[str | None],
    options: RequestOptions,
) -> list[ChildRequest]:
    """One sampled answer per entry of `members` (a member alone, or None: the vote's token-level base)."""
    temperature = params.temperature if params.temperature > 0 else core.config.vote.temperature
    requests = []
    for i, member in enumerate(members):
        if member is None:
            child_options = RequestOptions(
                strategy=core.config.vote.base, weights=options.weights, gate=options.gate
            )
        else:
            child_options = alone(core.ctx.names, member)
        child_params = params.model_copy(
            update={"temperature": temperature, "seed": None if params.seed is None else params.seed + i}
        )
        requests.append(ChildRequest(prompt, child_params, child_options, member, f"{parent}/{i}"))
    return requests


# --- vote -------------------------------------------------------------------------------------


class VoteGroup(AnswerGroup):
    """`vote`: N answers sampled across the members (or CoT-decoded per member), then the most agreed one."""

    def __init__(
        self,
        core: EnsembleCore,
        parent_id: str,
        kind: VoteKind,
        n_choices: int | None,
        cot: Any = None,
    ) -> None:
        super().__init__(core, parent_id)
        self.kind = kind
        self.n_choices = n_choices
        self.cot = cot  # cot_decoding.CotPlan, when each member answers by CoT-decoding

    def round_done(self) -> Delta | None:
        from consort.runtime.vote import select_answer

        if self.cot is not None:
            if self.round == 0:
                self.start_round(self.cot.branches(self, self.samples()))
                return None
            return self._cot_vote()
        samples = self.samples()
        answers = [s.text for s in samples]
        embedder = self.embedder() if self.kind == "free" and len(answers) > 1 else None
        result = select_answer(answers, kind=self.kind, n_choices=self.n_choices, embedder=embedder)
        return self.answer(
            samples[result.index],
            {"vote": result.model_dump(), "answers": answers, "members": [s.member for s in samples]},
        )

    def _cot_vote(self) -> Delta:
        """Each member's CoT-decoding answer (its most confident path); the majority of those, ties to the
        most confident."""
        from consort.runtime.cot_decoding import best_paths
        from consort.runtime.vote import select_answer

        paths = self.cot.score(self.samples(), self.kind, self.n_choices)
        ballots = sorted(
            best_paths(paths).values(), key=lambda p: -p.margin
        )  # stable: ties keep member order
        answers = [p.sample.text for p in ballots]
        embedder = self.embedder() if self.kind == "free" and len(answers) > 1 else None
        result = select_answer(answers, kind=self.kind, n_choices=self.n_choices, embedder=embedder)
        return self.answer(
            ballots[result.index].sample,
            {
                "vote": result.model_dump(),
                "answers": answers,
                "members": [p.member for p in ballots],
                "cot": [p.summary() for p in paths],
            },
        )


@register
class VoteStrategy(AnswerStrategy):
    """Agent Forest: sample N whole answers across the members, return the one the others agree with most."""

    name = "vote"
    reads = frozenset({"cot_branches", "gate"})

    @classmethod
    def sequences(cls, config: EnsembleConfig, options: RequestOptions) -> int:
        branches = options.cot_branches if options.cot_branches is not None else config.cot.branches
        if branches is not None:
            return branches * len(voters(config, options.weights))
        return options.vote_samples or config.vote.samples

    def admit(
        self,
        core: EnsembleCore,
        prompt: Prompt,
        params: SamplingParams,
        options: RequestOptions,
        seq_id: str | None,
    ) -> str:
        vote = core.config.vote
        kind, n_choices = vote_kind(core, options)
        if options.gate is not None and vote.base == "member":
            raise InvalidRequest(
                "gate applies to the answers' strategy, and this ensemble votes over members alone"
            )
        branches = cot_branches(core, options)
        parent = seq_id or core.new_id("vote")
        members = answering(core, options)
        if branches is not None:
            from consort.runtime.cot_decoding import CotPlan

            plan = CotPlan(core, prompt, params, members, branches)
            group: AnswerGroup = VoteGroup(core, parent, kind, n_choices, cot=plan)
            group.start_round(plan.probes(parent))
        else:
            samples = options.vote_samples or vote.samples
            spread: list[str | None] = [
                members[i % len(members)] if vote.base == "member" else None for i in range(samples)
            ]
            group = VoteGroup(core, parent, kind, n_choices)
            group.start_round(sample_requests(core, parent, prompt, params, spread, options))
        core.votes.open(group)
        return parent


# The other answer-level strategies, built on these groups, register after `vote` (imported here, once
# this module is complete, so that importing this module or the registry first both work).
from consort.runtime import mux  # noqa: E402, F401, I001
from consort.runtime import debate  # noqa: E402, F401
