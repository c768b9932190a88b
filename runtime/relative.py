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
from collections import OrderedDict
from collections.abc import Sequence

import torch

# Rows of recently used tokens (16 KB each with 4,096 anchors): the same few hundred tokens carry
# the mass step after step, and a row costs a [d] x [d, A] product and a softmax to build.
_ROW_CACHE_SIZE = 4096
# DeePEn's optimiser: torch's AdamW defaults and a CosineAnnealingLR(T_max=10, eta_min=lr / 4).
_BETA1, _BETA2, _EPSILON, _WEIGHT_DECAY = 0.9, 0.999, 1e-8, 0.01
_COSINE_PERIOD = 10
# KL(target ‖ projection) below which the search has nothing to do (float32 rounding is ~1e-7).
_MATCHED = 1e-6


class RelativeSpace:
    """One member's view of the shared anchor space, next to its own embedding matrix."""

    def __init__(self, embeddings: torch.Tensor, anchor_ids: Sequence[int], temperature: float) -> None:
        self._embeddings = embeddings  # [V, d], the model's own input embedding weight (not copied)
        ids = torch.as_tensor(list(anchor_ids), dtype=torch.long, device=embeddings.device)
        self._anchors = torch.nn.functional.normalize(embeddings[ids].float(), dim=-1)  # [A, d]
        self.temperature = temperature
        self._rows: OrderedDict[int, torch.Tensor] = OrderedDict()

    @property
    def num_anchors(self) -> int:
        return self._anchors.shape[0]

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Relative representations [k, A] of the given tokens."""
        ids = token_ids.tolist()
        found = {i: self._rows[i] for i in ids if i in self._rows}
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        if missing:
            found.update(zip(missing, self._build_rows(missing), strict=True))
        for token_id in ids:  # most recently used last, then drop the oldest
            self._rows[token_id] = found[token_id]
            self._rows.move_to_end(token_id)
        while len(self._rows) > _ROW_CACHE_SIZE:
            self._rows.popitem(last=False)
        return torch.stack([found[i] for i in ids])

    def _build_rows(self, token_ids: list[int]) -> torch.Tensor:
        index = torch.tensor(token_ids, dtype=torch.long, device=self._embeddings.device)
        tokens = torch.nn.functional.normalize(self._embeddings[index].float(), dim=-1)
        return torch.softmax(tokens @ self._anchors.T / self.temperature, dim=-1)

    def project(self, token_ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Map a (top-k, renormalised) distribution into relative space: a [A] probability vector."""
        probs = torch.softmax(logprobs.float().to(self._anchors.device), dim=-1)
        return (probs @ self.rows(token_ids)).cpu()

    def invert(
        self,
        target: torch.Tensor,
        candidate_ids: torch.Tensor,
        initial_logprobs: torch.Tensor,
        *,
        steps: int,
        learning_rate: float,
    ) -> torch.Tensor:
        """Find log-probs over `candidate_ids` whose projection matches `target` (DeePEn's inverse step).

        Starts from this member's own distribution over the candidates and takes `steps` steps on
        KL(target ‖ projection) as DeePEn's code does: AdamW on the logits (betas 0.9/0.999, weight
        decay 0.01) with a cosine-annealed rate (T_max 10, floor a quarter of the rate). Adam moves
        every logit by about the rate whatever its gradient's size; plain gradient descent through
        the softmax scales each logit's step by its probability, so a candidate the main member
        finds unlikely (the case fusion exists for) would barely move.
        """
        device = self._anchors.device
        rows = self.rows(candidate_ids)  # [C, A]
        target = target.float().to(device).clamp_min(1e-12)
        logits = initial_logprobs.float().to(device).clone()
        first_moment = torch.zeros_like(logits)
        second_moment = torch.zeros_like(logits)
        floor = learning_rate / 4
        for step in range(steps):
            probs = torch.softmax(logits, dim=-1)
            projection = (probs @ rows).clamp_min(1e-12)
            if float((target * (target / projection).log()).sum()) < _MATCHED:
                # Already there (members that agree: a model with itself). Adam would blow the
                # rounding noise of a zero gradient up into steps of the full rate.
                break
            # d KL / d logits written out (autograd costs more than the step itself); the mean over
            # anchors is torch's KLDivLoss reduction, which DeePEn uses.
            grad_probs = -(rows @ (target / projection)) / rows.shape[1]
            grad = probs * (grad_probs - torch.dot(probs, grad_probs))
            rate = floor + (learning_rate - floor) * (1 + math.cos(math.pi * step / _COSINE_PERIOD)) / 2
            logits *= 1 - rate * _WEIGHT_DECAY
            first_moment.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
            second_moment.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
            corrected = first_moment / (1 - _BETA1 ** (step + 1))
            scale = (second_moment / (1 - _BETA2 ** (step + 1))).sqrt().add_(_EPSILON)
            logits -= rate * corrected / scale
        return torch.log_softmax(logits, dim=-1).cpu()
