"""Query embeddings for the routers: unit-length float32 rows (numpy), from MiniLM or a hashed bag of words."""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from consort.runtime.prompts import Prompt
from consort.runtime.routing.config import EmbedderKind

HASHING_DIM = 256
_WORD = re.compile(r"\w+", re.UNICODE)


class QueryEmbedder(Protocol):
    """Texts to unit-length rows."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class HashingEmbedder:
    """A hashed bag of words and word pairs (crc32, the same in every process), L2-normalised.

    No model: for tests and for machines without the packaged MiniLM. Similar wording gives
    similar rows, which is all the routers' neighbourhoods need.
    """

    def __init__(self, dim: int = HASHING_DIM) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            for gram in [*words, *(f"{a} {b}" for a, b in itertools.pairwise(words))]:
                code = zlib.crc32(gram.encode("utf-8"))
                out[row, code % self.dim] += 1.0 if (code >> 16) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


class MiniLMQueryEmbedder:
    """all-MiniLM-L6-v2 (the vote's embedder, shared in this process) as numpy rows."""

    def __init__(self) -> None:
        from consort.runtime.vote import default_embedder

        self._embedder = default_embedder()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._embedder.embed(list(texts)).numpy().astype(np.float32)


def make_embedder(kind: EmbedderKind) -> QueryEmbedder:
    if kind == "hashing":
        return HashingEmbedder()
    return MiniLMQueryEmbedder()


def query_text(prompt: Prompt) -> str:
    """What a router reads of a request: the raw text, or the conversation's last user turn."""
    if prompt.text is not None:
        return prompt.text
    messages = prompt.messages or []
    users = [m.content for m in messages if m.role == "user"]
    return users[-1] if users else messages[-1].content
