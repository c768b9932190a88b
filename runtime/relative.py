"""DeePEn's relative representation space (arXiv 2404.12715), computed only over the rows that matter.

A token's relative representation is the softmax, over the anchor tokens shared
by every member, of the cosine similarity between its input embedding and each
anchor's. A distribution maps into that space as the probability-weighted sum of
its tokens' rows. DeePEn's code materialises the whole vocabulary × anchors
matrix (and runs out of memory at 128k+ vocabularies); here only the rows of the
few tokens that carry the probability mass are ever built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Rows of recently used tokens (16 KB each with 4,096 anchors): the same few hundred tokens carry
# the mass step after step, and a row costs a [d] x [d, A] product and a softmax to build.
ROW_CACHE_SIZE = 4096
# DeePEn's optimiser: torch's AdamW defaults and a CosineAnnealingLR(T_max=10, eta_min=lr / 4).
_BETA1, _BETA2, _EPSILON, _WEIGHT_DECAY = 0.9, 0.999, 1e-8, 0.01
_COSINE_PERIOD = 10
# KL(target ‖ projection) below which the search has nothing to do (float32 rounding is ~1e-7).
_MATCHED = 1e-6


class RelativeSpace:
    """One member's view of the shared anchor space, next to its own embedding matrix.

    Every operation takes a whole step's sequences at once (a batch of top-k distributions to
    project, a batch of candidate sets to search over): at 32 sequences, one [B, C, A] product
    instead of 32 small ones, which on a GPU is one kernel launch instead of 32 and on a CPU
    saves the per-call overhead that made the search most of a tiny model's step.
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        anchor_ids: Sequence[int],
        temperature: float,
        cache_rows: int = ROW_CACHE_SIZE,
    ) -> None:
        self._embeddings = embeddings  # [V, d], the model's own input embedding weight (not copied)
        device = embeddings.device
        ids = torch.as_tensor(list(anchor_ids), dtype=torch.long, device=device)
        self._anchors = torch.nn.functional.normalize(embeddings[ids].float(), dim=-1)  # [A, d]
        self.temperature = temperature
        # The row cache as tensors, so a batch of ids is looked up in one gather: slot of each
        # token (-1: not cached), token in each slot, and when each slot was last used.
        self._capacity = cache_rows
        self._slot_of = torch.full((embeddings.shape[0],), -1, dtype=torch.long, device=device)
        self._token_in = torch.full((cache_rows,), -1, dtype=torch.long, device=device)
        self._last_used = torch.zeros(cache_rows, dtype=torch.long, device=device)
        self._cache: torch.Tensor | None = None  # [cache_rows, A], allocated at first use
        self._clock = 0

    @property
    def num_anchors(self) -> int:
        return self._anchors.shape[0]

    @property
    def cached_rows(self) -> int:
        return int((self._token_in >= 0).sum())

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Relative representations of the given tokens: shape token_ids.shape + [A]."""
        flat = token_ids.reshape(-1).to(self._anchors.device)
        self._clock += 1
        slots = self._slot_of[flat]
        if self._cache is not None and bool((slots >= 0).all()):  # the usual case: all cached
            self._last_used[slots] = self._clock
            return self._cache[slots].reshape(*token_ids.shape, -1)
        distinct = flat.unique()
        if distinct.numel() > self._capacity:  # more than the cache holds: build, do not cache
            return self._build_rows(flat).reshape(*token_ids.shape, -1)
        if self._cache is None:
            self._cache = self._anchors.new_empty((self._capacity, self.num_anchors))
        present = self._slot_of[distinct]
        self._last_used[present[present >= 0]] = self._clock  # in use now: not evicted below
        missing = distinct[present < 0]
        if missing.numel():
            # Empty slots first (never used: 0), then the least recently used.
            slots = self._last_used.argsort()[: missing.numel()]
            evicted = self._token_in[slots]
            self._slot_of[evicted[evicted >= 0]] = -1
            self._cache[slots] = self._build_rows(missing)
            self._slot_of[missing] = slots
            self._token_in[slots] = missing
            self._last_used[slots] = self._clock
        return self._cache[self._slot_of[flat]].reshape(*token_ids.shape, -1)

    def _build_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        tokens = torch.nn.functional.normalize(self._embeddings[token_ids].float(), dim=-1)
        return torch.softmax(tokens @ self._anchors.T / self.temperature, dim=-1)

    def project(self, token_ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Map a (top-k, renormalised) distribution into relative space: a [A] probability vector."""
        return self.project_many([token_ids], [logprobs])[0]

    def project_many(
        self, token_ids: Sequence[torch.Tensor], logprobs: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """`project` for a batch of distributions (their top-k may differ in length): [B, A]."""
        ids, values = _padded(token_ids, logprobs, self._anchors.device)
        probs = torch.softmax(values, dim=-1)  # padding: -inf, so probability 0
        return torch.bmm(probs[:, None, :], self.rows(ids))[:, 0].cpu()

    def invert(
        self,
        target: torch.Tensor,
        candidate_ids: torch.Tensor,
        initial_logprobs: torch.Tensor,
        *,
        steps: int,
        learning_rate: float,
    ) -> torch.Tensor:
        """Find log-probs over `candidate_ids` whose projection matches `target` (DeePEn's inverse step)."""
        (out,) = self.invert_many(
            [target], [candidate_ids], [initial_logprobs], steps=steps, learning_rate=learning_rate
        )
        return out

    def invert_many(
        self,
        targets: Sequence[torch.Tensor],
        candidate_ids: Sequence[torch.Tensor],
        initial_logprobs: Sequence[torch.Tensor],
        *,
        steps: int,
        learning_rate: float,
    ) -> list[torch.Tensor]:
        """The inverse search for a batch of sequences, each exactly as alone.

        Each starts from this member's own distribution over its candidates and takes `steps`
        steps on KL(target ‖ projection) as DeePEn's code does: AdamW on the logits (betas
        0.9/0.999, weight decay 0.01) with a cosine-annealed rate (T_max 10, floor a quarter of the
        rate). Adam moves every logit by about the rate whatever its gradient's size; plain
        gradient descent through the softmax scales each logit's step by its probability, so a
        candidate the main member finds unlikely (the case fusion exists for) would barely move.
        A sequence whose projection already matches stops there (as its own loop would) while the
        others go on.
        """
        if not targets:
            return []
        device = self._anchors.device
        ids, logits = _padded(candidate_ids, initial_logprobs, device)  # padding: logit -inf
        rows = self.rows(ids)  # [B, C, A]
        target = torch.stack([t.float() for t in targets]).to(device).clamp_min(1e-12)  # [B, A]
        first_moment = torch.zeros_like(logits)
        second_moment = torch.zeros_like(logits)
        searching = torch.ones(len(targets), dtype=torch.bool, device=device)
        floor = learning_rate / 4
        for step in range(steps):
            probs = torch.softmax(logits, dim=-1)
            projection = torch.bmm(probs[:, None, :], rows)[:, 0].clamp_min(1e-12)
            ratio = target / projection
            # Already there (members that agree: a model with itself): Adam would blow the rounding
            # noise of a zero gradient up into steps of the full rate.
            searching &= (target * ratio.log()).sum(-1) >= _MATCHED
            if not bool(searching.any()):
                break
            # d KL / d logits written out (autograd costs more than the step itself); the mean over
            # anchors is torch's KLDivLoss reduction, which DeePEn uses.
            grad_probs = -torch.bmm(rows, ratio[:, :, None])[:, :, 0] / rows.shape[-1]
            grad = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
            rate = floor + (learning_rate - floor) * (1 + math.cos(math.pi * step / _COSINE_PERIOD)) / 2
            # A stopped sequence never resumes: its moments may go on changing, its logits may not.
            first_moment.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
            second_moment.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
            corrected = first_moment / (1 - _BETA1 ** (step + 1))
            scale = (second_moment / (1 - _BETA2 ** (step + 1))).sqrt().add_(_EPSILON)
            update = corrected.div_(scale).mul_(rate)
            if bool(searching.all()):
                logits.mul_(1 - rate * _WEIGHT_DECAY).sub_(update)
            else:
                logits = torch.where(searching[:, None], logits * (1 - rate * _WEIGHT_DECAY) - update, logits)
        out = torch.log_softmax(logits, dim=-1).cpu()
        # Each its own memory: a view would carry the whole batch into Ray's serialisation.
        return [out[i, : len(c)].clone() for i, c in enumerate(candidate_ids)]


def _padded(
    ids: Sequence[torch.Tensor], values: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged (ids, log-probs) rows as [B, C] tensors; padding is token 0 at log-prob -inf."""
    widths = {len(i) for i in ids}
    if len(widths) == 1:  # the usual case (one top-k for all): no padding
        return torch.stack(list(ids)).to(device), torch.stack([v.float() for v in values]).to(device)
    width = max(widths)
    padded_ids = torch.zeros((len(ids), width), dtype=torch.long)
    padded_values = torch.full((len(ids), width), -math.inf)
    for row, (i, v) in enumerate(zip(ids, values, strict=True)):
        padded_ids[row, : len(i)] = i
        padded_values[row, : len(v)] = v.float()
    return padded_ids.to(device), padded_values.to(device)
