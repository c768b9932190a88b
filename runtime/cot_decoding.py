"""CoT-decoding (Wang & Zhou, "Chain-of-Thought Reasoning Without Prompting", arXiv 2402.10200), per member.

Instead of sampling, a member explores its k most likely first tokens: each
branch starts with one of them and continues greedily. The branch kept is the
one whose *answer tokens* the member is most sure of: the confidence margin of
a path is the mean, over the tokens that spell its answer, of p(top1) - p(top2)
at that position. It is a response-level option of `vote` and `mux`
(`cot_branches`): under `vote` each member answers with its most confident
path and the members' answers are voted on; under `mux` a member's k paths are
its samples.

A request runs in two rounds: a probe per member (one greedy token, reporting
its k best alternatives), then the branches, each forced to start with one of
them. Alternatives that are not a whole piece of text of the member's own
vocabulary (an end-of-sequence or other special token, a partial UTF-8
character) start no branch: a member may answer with fewer than k paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from consort.runtime.answers import canonical_number, extract_choice_letter, extract_number, first_line
from consort.runtime.errors import InvalidRequest
from consort.runtime.fusion.base import Candidate
from consort.runtime.types import TokenLogprob, VoteKind
from consort.runtime.vote_groups import ChildRequest, Sample, alone

if TYPE_CHECKING:
    from consort.runtime.core import EnsembleCore
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams
    from consort.runtime.vote_groups import AnswerGroup

# What `extract_number` reads as a number (answers.py's pattern): the answer's span is its last occurrence.
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-−]?\$?\.\d+")


def token_margin(entry: TokenLogprob) -> float:
    """p(top1) - p(top2) at one position (the top alternatives as reported, most likely first)."""
    if not entry.top:
        raise InvalidRequest("CoT-decoding needs each token's top alternatives (logprobs >= 2)")
    first = math.exp(entry.top[0][1])
    second = math.exp(entry.top[1][1]) if len(entry.top) > 1 else 0.0
    return first - second


def answer_span(text: str, kind: VoteKind, n_choices: int | None = None) -> tuple[int, int] | None:
    """The characters of `text` that spell its answer, or None when it has none of this kind.

    number: the last occurrence of the extracted number; choice: the last standalone occurrence of
    the extracted letter; span: the first non-blank line; free: the whole text.
    """
    if kind == "free":
        return (0, len(text)) if text else None
    if kind == "span":
        line = first_line(text)
        if not line:
            return None
        start = text.find(line)
        return start, start + len(line)
    if kind == "number":
        answer = extract_number(text)
        if answer is None:
            return None
        spans = [m.span() for m in _NUMBER.finditer(text) if canonical_number(m.group()) == answer]
        return spans[-1] if spans else None
    if kind == "choice":
        if n_choices is None:
            raise InvalidRequest("CoT-decoding on choice letters needs the number of choices")
        index = extract_choice_letter(text, n_choices)
        if index is None:
            return None
        letter = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[index]
        found = list(re.finditer(rf"\b[{letter}{letter.lower()}]\b", text))
        return found[-1].span() if found else None
    raise InvalidRequest(f"unknown answer kind {kind!r}; use number, choice, span or free")


def answer_tokens(text: str, logprobs: Sequence[TokenLogprob], span: tuple[int, int]) -> list[int]:
    """Indices of the entries of `logprobs` whose bytes overlap the characters `span` of `text`."""
    start = len(text[: span[0]].encode("utf-8"))
    end = len(text[: span[1]].encode("utf-8"))
    indices, at = [], 0
    for i, entry in enumerate(logprobs):
        size = len(entry.data)
        if size and at < end and at + size > start:
            indices.append(i)
        at += size
    return indices


@dataclass
class PathScore:
    """One CoT-decoding path: its text, and how sure its member was of the tokens of its answer."""

    sample: Sample
    member: str
    rank: int  # the first token's rank among the member's alternatives (0 = the greedy path)
    margin: float  # mean p(top1) - p(top2) over the answer tokens; -1 when the path has no answer
    answer_tokens: int

    def summary(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "rank": self.rank,
            "margin": self.margin,
            "answer_tokens": self.answer_tokens,
            "text": self.sample.text,
        }


PROBE_SPARE = 4  # alternatives asked of the probe beyond k
NO_ANSWER = -1.0  # the margin of a path with no answer of the kind asked for: below every real margin


def path_margin(
    text: str, logprobs: Sequence[TokenLogprob], kind: VoteKind, n_choices: int | None
) -> tuple[float, int]:
    """(margin, number of answer tokens) of one path; (NO_ANSWER, 0) when it has no answer."""
    span = answer_span(text, kind, n_choices)
    if span is None:
        return NO_ANSWER, 0
    tokens = answer_tokens(text, logprobs, span)
    if not tokens:
        return NO_ANSWER, 0
    return sum(token_margin(logprobs[i]) for i in tokens) / len(tokens), len(tokens)


def first_alternatives(core: EnsembleCore, member: str, entry: TokenLogprob, k: int) -> list[Candidate]:
    """The member's k most likely first pieces that can start a branch, most likely first."""
    table = core.ctx.table(member)
    found: list[Candidate] = []
    for text, _ in entry.top:
        token_id = table.id_of(text.encode("utf-8"))
        if token_id is None or token_id in table.eos_ids or table.is_special(token_id):
            continue
        found.append(Candidate(table.token_bytes(token_id), member, token_id))
        if len(found) == k:
            break
    return found


class CotPlan:
    """The two rounds of CoT-decoding for one request, over `members`."""

    def __init__(
        self,
        core: EnsembleCore,
        prompt: Prompt,
        params: SamplingParams,
        members: Sequence[str],
        branches: int,
    ) -> None:
        if branches < 1:
            raise InvalidRequest(f"cot_branches must be at least 1, got {branches}")
        self.core = core
        self.prompt = prompt
        self.params = params
        self.members = list(members)
        self.k = branches
        self.ranks: dict[str, tuple[str, int]] = {}  # branch id -> (member, first-token rank)

    def probes(self, parent: str) -> list[ChildRequest]:
        """Round 0: one greedy token per member, with its best alternatives (a few more than k, so that
        special tokens among them, which start no branch, still leave k)."""
        params = self.params.model_copy(update={"temperature": 0.0, "max_tokens": 1, "ignore_eos": False})
        names = self.core.ctx.names
        return [
            ChildRequest(
                self.prompt, params, alone(names, m, logprobs=self.k + PROBE_SPARE), m, f"{parent}/probe/{m}"
            )
            for m in self.members
        ]

    def branches(self, group: AnswerGroup, probes: Sequence[Sample]) -> list[ChildRequest]:
        """Round 1: per member, one greedy path from each of its k best first pieces."""
        params = self.params.model_copy(update={"temperature": 0.0})
        names = self.core.ctx.names
        requests = []
        for probe in probes:
            assert probe.member is not None
            if not probe.logprobs:
                raise InvalidRequest(f"member {probe.member!r} gave no first token to branch from")
            for rank, first in enumerate(
                first_alternatives(self.core, probe.member, probe.logprobs[0], self.k)
            ):
                seq_id = f"{group.parent_id}/cot/{probe.member}/{rank}"
                self.ranks[seq_id] = (probe.member, rank)
                requests.append(
                    ChildRequest(
                        self.prompt,
                        params,
                        alone(names, probe.member, logprobs=2),
                        probe.member,
                        seq_id,
                        (first,),
                    )
                )
        if not requests:
            raise InvalidRequest("no member had a first token that can start a CoT-decoding branch")
        return requests

    def score(self, samples: Sequence[Sample], kind: VoteKind, n_choices: int | None) -> list[PathScore]:
        """Every branch with its margin, in start order (member by member, first-token rank within each)."""
        paths = []
        for sample in samples:
            member, rank = self.ranks[sample.seq_id]
            margin, count = path_margin(sample.text, sample.logprobs, kind, n_choices)
            paths.append(PathScore(sample, member, rank, margin, count))
        return paths


def best_paths(paths: Sequence[PathScore]) -> dict[str, PathScore]:
    """Each member's CoT-decoding answer: its path of largest margin (ties to the lower first-token rank)."""
    best: dict[str, PathScore] = {}
    for path in paths:
        if path.member not in best or path.margin > best[path.member].margin:
            best[path.member] = path
    return best
