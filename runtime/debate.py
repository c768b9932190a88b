"""`debate`: multi-agent debate (Du et al., "Improving Factuality and Reasoning in Language Models through
Multiagent Debate", arXiv 2305.14325), with the members as the agents.

Round 0: each agent (a member with a positive weight, alone) answers the prompt. Each
of the `debate_rounds` rounds that follow: every agent sees the other agents' answers
of the round before (and its own, for a chat prompt) and answers again. The final
answer is the majority of the last round's answers (`vote.select_answer`; free text:
the most central). Every round's answers, and the prompts each agent was given, are
kept in the answer's diagnostics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from consort.runtime.errors import InvalidRequest
from consort.runtime.fusion import register
from consort.runtime.prompts import ChatMessage, Prompt
from consort.runtime.types import Delta, RequestOptions, VoteKind
from consort.runtime.vote_groups import (
    AnswerGroup,
    AnswerStrategy,
    ChildRequest,
    alone,
    answering,
    vote_kind,
    voters,
)

if TYPE_CHECKING:
    from consort.runtime.config import EnsembleConfig
    from consort.runtime.core import EnsembleCore
    from consort.runtime.sampling import SamplingParams

MAX_ROUNDS = 8

CHAT_REVISION = (
    "These are the answers of the other agents to the same question:\n\n{others}\n\n"
    "Using their reasoning as additional advice, give your updated answer to the original question, "
    "in the same format as before."
)
TEXT_PREAMBLE = (
    "In a previous round, agents answered the question below as follows.\n\n{answers}\n\n"
    "Taking their reasoning into account, answer it again.\n\n"
)


def debate_prompt(prompt: Prompt, own: str, others: Sequence[tuple[str, str]]) -> Prompt:
    """An agent's prompt for the next round: the original prompt, its own last answer and the others' (name, answer).

    Chat: the conversation goes on with the agent's answer as the assistant's turn and a user turn
    that quotes the others. Text (completions): the others' answers, and the agent's own, come
    before the original text, which still ends the prompt so the continuation keeps its format.
    """
    quoted = "\n\n".join(f"Agent {name}: ```{answer.strip()}```" for name, answer in others)
    if prompt.messages is not None:
        return Prompt(
            messages=[
                *prompt.messages,
                ChatMessage(role="assistant", content=own),
                ChatMessage(role="user", content=CHAT_REVISION.format(others=quoted)),
            ]
        )
    assert prompt.text is not None
    answers = (
        "\n\n".join([f"Your answer: ```{own.strip()}```", quoted])
        if quoted
        else f"Your answer: ```{own.strip()}```"
    )
    return Prompt(text=TEXT_PREAMBLE.format(answers=answers) + prompt.text)


class DebateGroup(AnswerGroup):
    """A `debate` request: rounds of every agent's answer; `history[r][agent]` is round r's answer."""

    def __init__(
        self,
        core: EnsembleCore,
        parent_id: str,
        prompt: Prompt,
        params: SamplingParams,
        agents: Sequence[str],
        rounds: int,
        kind: VoteKind,
        n_choices: int | None,
    ) -> None:
        super().__init__(core, parent_id)
        self.prompt = prompt
        self.params = params
        self.agents = list(agents)
        self.rounds = rounds
        self.kind = kind
        self.n_choices = n_choices
        self.history: list[dict[str, str]] = []
        self.prompts: list[dict[str, Prompt]] = []

    def requests(self) -> list[ChildRequest]:
        """The next round's children: round 0 answers the prompt; round r reads round r-1's answers."""
        r = len(self.history)
        names = self.core.ctx.names
        prompts: dict[str, Prompt] = {}
        for agent in self.agents:
            if r == 0:
                prompts[agent] = self.prompt
            else:
                last = self.history[-1]
                others = [(a, last[a]) for a in self.agents if a != agent]
                prompts[agent] = debate_prompt(self.prompt, last[agent], others)
        self.prompts.append(prompts)
        requests = []
        for i, agent in enumerate(self.agents):
            seed = None if self.params.seed is None else self.params.seed + r * len(self.agents) + i
            params = self.params.model_copy(update={"seed": seed})
            requests.append(
                ChildRequest(
                    prompts[agent], params, alone(names, agent), agent, f"{self.parent_id}/{r}/{agent}"
                )
            )
        return requests

    def round_done(self) -> Delta | None:
        from consort.runtime.vote import select_answer

        samples = self.samples()
        self.history.append({s.member: s.text for s in samples if s.member is not None})
        if len(self.history) <= self.rounds:
            self.start_round(self.requests())
            return None
        answers = [s.text for s in samples]
        embedder = self.embedder() if self.kind == "free" and len(answers) > 1 else None
        result = select_answer(answers, kind=self.kind, n_choices=self.n_choices, embedder=embedder)
        diagnostics: dict[str, Any] = {
            "vote": result.model_dump(),
            "answers": answers,
            "members": [s.member for s in samples],
            "debate": [
                {
                    "round": r,
                    "answers": answers_r,
                    "prompts": {a: p.model_dump(exclude_none=True) for a, p in prompts_r.items()},
                }
                for r, (answers_r, prompts_r) in enumerate(zip(self.history, self.prompts, strict=True))
            ],
        }
        return self.answer(samples[result.index], diagnostics)


@register
class DebateStrategy(AnswerStrategy):
    """Multi-agent debate: the members answer, read each other's answers and revise for a fixed number of rounds."""

    name = "debate"
    reads = frozenset({"debate_rounds"})

    @classmethod
    def sequences(cls, config: EnsembleConfig, options: RequestOptions) -> int:
        return len(voters(config, options.weights))

    def admit(
        self,
        core: EnsembleCore,
        prompt: Prompt,
        params: SamplingParams,
        options: RequestOptions,
        seq_id: str | None,
    ) -> str:
        if options.vote_samples is not None:
            raise InvalidRequest("vote_samples does not apply to debate: each member answers once a round")
        kind, n_choices = vote_kind(core, options)
        rounds = options.debate_rounds if options.debate_rounds is not None else core.config.debate.rounds
        if not 0 <= rounds <= MAX_ROUNDS:
            raise InvalidRequest(f"debate_rounds must be between 0 and {MAX_ROUNDS}, got {rounds}")
        agents = answering(core, options)
        parent = seq_id or core.new_id("debate")
        group = DebateGroup(core, parent, prompt, params, agents, rounds, kind, n_choices)
        group.start_round(group.requests())
        core.votes.open(group)
        return parent
