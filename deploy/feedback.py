"""POST /v1/feedback: a preference or a score for a routed request, written to the routing store.

The store is the one the replicas' routers read before each decision (runtime/routing/store.py), so
feedback taken by any replica changes the next decision of every replica, without a restart.
A body that is malformed, names an unknown member or an unknown request changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from consort.deploy.openai_api import RoutingInfo
from consort.runtime.config import EnsembleConfig
from consort.runtime.errors import InvalidRequest
from consort.runtime.routing.store import RoutingStore
from consort.runtime.types import Completion


class Preference(BaseModel):
    """Which of two members answered better (Eagle's pairwise feedback)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    winner: str = Field(min_length=1, description="The member whose answer was better.")
    loser: str = Field(min_length=1, description="The member whose answer was worse.")
    tie: bool = Field(default=False, description="Neither was better: the comparison is a draw.")


class FeedbackRequest(BaseModel):
    """Feedback on one routed request: exactly one of `score` and `preference`."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    request_id: str = Field(
        min_length=1, description="The `id` of the routed response this feedback is about."
    )
    score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="How good the answer was, from 0 (wrong) to 1 (right)."
    )
    member: str | None = Field(
        default=None,
        description="With `score`: the member scored (default: the one that answered, when one member did).",
    )
    preference: Preference | None = Field(
        default=None, description="A pairwise preference between two members."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        if (self.score is None) == (self.preference is None):
            raise ValueError("give exactly one of score and preference")
        if self.preference is not None and self.member is not None:
            raise ValueError("member goes with score, not with preference")
        return self


class FeedbackResponse(BaseModel):
    """The feedback as the store took it."""

    id: int = Field(description="The feedback event's id in the store (increasing).")
    object: Literal["feedback"] = Field(default="feedback", description="Always 'feedback'.")
    request_id: str = Field(description="The routed request it is about.")


class FeedbackService:
    """Checks feedback against the ensemble and the stored decision, then appends it to the store."""

    def __init__(self, config: EnsembleConfig) -> None:
        self.members = [m.name for m in config.members]
        self.store = RoutingStore(config.route.store) if config.route.store is not None else None

    def _member(self, name: str, field: str) -> str:
        if name not in self.members:
            raise InvalidRequest(f"{field} {name!r} is not a member; members are {', '.join(self.members)}")
        return name

    def submit(self, body: FeedbackRequest) -> FeedbackResponse:
        if self.store is None:
            raise InvalidRequest(
                "this ensemble keeps no routing store (route.store), so it takes no feedback"
            )
        if body.preference is not None:
            winner = self._member(body.preference.winner, "preference.winner")
            loser = self._member(body.preference.loser, "preference.loser")
            event = self.store.add_preference(body.request_id, winner, loser, tie=body.preference.tie)
        else:
            assert body.score is not None
            decision = self.store.decision(body.request_id)
            if body.member is not None:
                member = self._member(body.member, "member")
            elif len(decision.members) == 1:
                member = decision.members[0]
            else:
                raise InvalidRequest(
                    f"request {body.request_id!r} was answered by {', '.join(decision.members)}: name the member scored"
                )
            event = self.store.add_score(body.request_id, member, body.score)
        return FeedbackResponse(id=event, request_id=body.request_id)


def routed(index: int, diagnostics: list[dict[str, Any]]) -> RoutingInfo | None:
    """The route strategy's note among a choice's diagnostics, as the response reports it."""
    for entry in diagnostics:
        route = entry.get("route")
        if route is not None:
            return RoutingInfo(
                index=index, members=route["members"], router=route["router"], scores=route["scores"]
            )
    return None


def routing_info(finished: Mapping[int, Completion]) -> list[RoutingInfo] | None:
    """Which member(s) answered each routed choice (None when no choice was routed)."""
    found = [
        info for index, item in finished.items() if (info := routed(index, item.diagnostics)) is not None
    ]
    return found or None
