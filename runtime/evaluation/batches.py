"""Running many sequences through one ensemble core with asyncio, and the batched generation of evaluations.

`drive_core` admits sequences (scoring or generation) in waves, so that each step
is one batched forward per member. `generate` completes many prompts that way;
`member_alone` are the request options that make the ensemble one of its members.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from consort.runtime.config import EnsembleConfig
from consort.runtime.core import EnsembleCore
from consort.runtime.errors import InvalidRequest
from consort.runtime.prompts import ChatMessage, Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Completion, RequestOptions
from consort.runtime.vote_groups import sequences_needed


@dataclass
class CoreJob:
    """One sequence (or vote group) to run: `add` queues it in the core and returns its id."""

    add: Callable[[EnsembleCore], str]
    slots: int = 1  # sequences it occupies in a batch (a vote of N samples occupies N)
    size: int = 0  # sort key: jobs of similar size run in the same wave


async def drive_core(
    core: EnsembleCore,
    jobs: Sequence[CoreJob],
    *,
    refill_at: int | None = None,
    on_finished: Callable[[int, Completion], None] | None = None,
) -> list[Completion]:
    """Run every job to completion through `core`, stepping it with asyncio.

    Jobs are admitted in waves, sorted by size: a new wave is added only once at
    most `refill_at` sequences still run (default: half a batch). Admitting one
    sequence while others decode would make every row of that step's packed
    forward as wide as its prompt, so admissions are grouped rather than trickled.
    """
    batch = core.config.max_batch
    refill_at = batch // 2 if refill_at is None else refill_at
    pending = deque(sorted(range(len(jobs)), key=lambda i: jobs[i].size))
    index_of: dict[str, int] = {}
    outcomes: list[Completion | None] = [None] * len(jobs)
    partial: dict[str, Completion] = {}
    while pending or index_of:
        load = len(core.running) + len(core.waiting)
        if load <= refill_at:
            while pending and (load == 0 or load + jobs[pending[0]].slots <= batch):
                i = pending.popleft()
                seq_id = jobs[i].add(core)
                index_of[seq_id] = i
                partial[seq_id] = Completion()
                load += jobs[i].slots
        for delta in await core.step():
            outcome = partial.get(delta.seq_id)
            if outcome is None:
                continue
            outcome.add(delta)
            if outcome.finished:
                i = index_of.pop(delta.seq_id)
                outcomes[i] = partial.pop(delta.seq_id)
                if on_finished is not None:
                    on_finished(i, outcome)
    return [o for o in outcomes if o is not None]


@dataclass(frozen=True)
class GenerationRequest:
    """Generate from `prompt` with `params`, under the ensemble `options`.

    `prompt` is raw text, or with `chat` one user message that each member renders with
    its own chat template (GSM8K's zero-shot chain of thought for chat members).
    """

    prompt: str
    params: SamplingParams
    options: RequestOptions
    chat: bool = False

    def as_prompt(self) -> Prompt:
        if self.chat:
            return Prompt(messages=[ChatMessage(role="user", content=self.prompt)])
        return Prompt(text=self.prompt)


def request_slots(config: EnsembleConfig, options: RequestOptions) -> int:
    """Sequences a request occupies in a batch: an answer-level strategy (vote) runs one per sampled answer."""
    return sequences_needed(config, options)


def vote_slots(core: EnsembleCore, options: RequestOptions) -> int:
    return request_slots(core.config, options)


def generation_job(core: EnsembleCore, request: GenerationRequest) -> CoreJob:
    return CoreJob(
        add=lambda c: c.add(request.as_prompt(), request.params, request.options),
        slots=vote_slots(core, request.options),
        size=len(request.prompt),
    )


async def generate(
    core: EnsembleCore, requests: Sequence[GenerationRequest], *, refill_at: int | None = None
) -> list[Completion]:
    """Complete every request through `core`, batched."""
    return await drive_core(core, [generation_job(core, r) for r in requests], refill_at=refill_at)


def one_hot(names: Sequence[str], member: str) -> list[float]:
    """Weights that make the ensemble `member` alone (with strategy `me`, only it ever runs)."""
    if member not in names:
        raise InvalidRequest(f"unknown member {member!r}; members are {', '.join(names)}")
    return [1.0 if n == member else 0.0 for n in names]


def member_alone(names: Sequence[str], member: str) -> RequestOptions:
    return RequestOptions(strategy="me", weights=one_hot(names, member))
