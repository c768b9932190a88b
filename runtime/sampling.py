"""Per-request sampling parameters and the sampler that turns a distribution into a choice.

As in vLLM, the request's `SamplingParams` are separate from the tensors the
sampler consumes; the fusion strategies hand the sampler log-probabilities over
a candidate set (a member's vocabulary or a union of candidates) and it returns
an index into that set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from consort.runtime.constraints.spec import Constraint
from consort.runtime.errors import InvalidRequest


class SamplingParams(BaseModel):
    """How one sequence is sampled and when it stops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=1.0, ge=0.0, description="0 = greedy; higher = flatter.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus mass kept before sampling.")
    top_k: int = Field(default=0, ge=0, description="Keep only the k most likely candidates (0 = all).")
    seed: int | None = Field(default=None, description="Seed of this sequence's random generator.")
    max_tokens: int = Field(default=16, ge=1, description="Most tokens to generate.")
    stop: list[str] = Field(default_factory=list, description="Stop strings; the text ends before the first match.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra stop tokens of the main member.")
    ignore_eos: bool = Field(default=False, description="Keep generating past end-of-sequence tokens.")
    constraint: Constraint | None = Field(
        default=None, description="Structured output: the shape the text must have (runtime/constraints)."
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @classmethod
    def create(cls, **kwargs: object) -> SamplingParams:
        """Validate, raising InvalidRequest with a readable message (the HTTP layer's 400)."""
        try:
            return cls.model_validate({k: v for k, v in kwargs.items() if v is not None})
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            raise InvalidRequest(f"invalid sampling parameters: {problems}") from error

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return generator


class SamplingFailed(ValueError):
    """The distribution handed to the sampler has no possible candidate (a strategy's fault, not the request's)."""


def sample(
    logprobs: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    mode: Callable[[], int] | None = None,
) -> int:
    """Pick an index from 1-D log-probabilities (need not be normalised; -inf = impossible).

    `mode`: computes what greedy decoding picks, when that is not the argmax (pieces of text from several
    vocabularies: `textprob.text_greedy`); a temperature or top_p so small that one candidate is
    left is greedy decoding too, and picks it as well.

    Safe for every temperature and top_p the API admits: the arithmetic is float64 and
    relative to the best candidate, so a temperature of 1e-300 sharpens to the argmax
    instead of overflowing, and a top_p below the first candidate's mass keeps that one.
    """
    logprobs = logprobs.double()
    logprobs = logprobs.masked_fill(torch.isnan(logprobs), float("-inf"))
    best = logprobs.max()
    if not torch.isfinite(best):
        raise SamplingFailed(f"no candidate of {logprobs.numel()} is possible")
    if params.greedy:
        return mode() if mode is not None else int(torch.argmax(logprobs).item())
    # Shift first: the best candidate is 0 and the rest only grow more negative with 1/temperature.
    logits = (logprobs - best) / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the most likely candidate.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if mode is not None and int((probs > 0).sum()) == 1:
        return mode()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def find_stop(text: str, stops: list[str], search_from: int) -> int | None:
    """Index where the earliest stop string begins, looking only at text that could hold a new match."""
    best: int | None = None
    for stop in stops:
        index = text.find(stop, max(0, search_from - len(stop) + 1))
        if index != -1 and (best is None or index < best):
            best = index
    return best


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters could still begin a stop string, so must not be streamed yet."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold
