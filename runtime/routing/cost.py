"""A cost per member: relative cost per generated token (parameter count, or measured seconds per token)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class CostModel:
    """Cost of a request = cost per token × tokens; a member not named costs 1 per token."""

    def __init__(self, per_token: Mapping[str, float]) -> None:
        for member, cost in per_token.items():
            if cost < 0:
                raise ValueError(f"cost of member {member!r} must be non-negative, got {cost}")
        self._per_token = dict(per_token)

    def per_token(self, member: str) -> float:
        return self._per_token.get(member, 1.0)

    def request(self, member: str, tokens: int) -> float:
        return self.per_token(member) * tokens

    def normalised(self, members: Sequence[str]) -> dict[str, float]:
        """Each member's cost over the dearest one's (0..1), for trading against scores."""
        top = max((self.per_token(m) for m in members), default=1.0) or 1.0
        return {m: self.per_token(m) / top for m in members}
