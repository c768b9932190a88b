"""DeePEn's relative representation space (arXiv 2404.12715), computed only over the rows that matter.

A token's relative representation is the softmax, over the anchor tokens shared
by every member, of the cosine similarity between its input embedding and each
anchor's. A distribution maps into that space as the probability-weighted sum of
its tokens' rows. DeePEn's code materialises the whole vocabulary × anchors
matrix (and runs out of memory at 128k+ vocabularies); here only the rows of the
few tokens that carry the probability mass are ever built.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

# Rows of recently used tokens (16 KB each with 4,096 anchors): the same few hundred tokens carry
# the mass step after step, and a row costs a [d] x [d, A] product and a softmax to build.
_ROW_CACHE_SIZE = 4096


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

        Starts from this member's own distribution over the candidates and takes a few
        gradient steps on KL(target ‖ projection), as the paper does.
        """
        device = self._anchors.device
        rows = self.rows(candidate_ids)  # [C, A]
        target = target.float().to(device).clamp_min(1e-12)
        logits = initial_logprobs.float().to(device).clone()
        for _ in range(steps):
            probs = torch.softmax(logits, dim=-1)
            projection = (probs @ rows).clamp_min(1e-12)
            # d KL(target ‖ probs·rows) / d logits, written out: autograd costs more than the step itself.
            grad_probs = -(rows @ (target / projection))
            logits -= learning_rate * probs * (grad_probs - torch.dot(probs, grad_probs))
        return torch.log_softmax(logits, dim=-1).cpu()
