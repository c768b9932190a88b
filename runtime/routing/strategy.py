"""The request-level `route` strategy: a router picks the member(s) that answer, before generating.

The chosen member answers alone (the `me` strategy with only it weighted), or the chosen few run
`route.base` among themselves. Every decision is stored (request id, members, query embedding) so
that feedback naming the request reaches the routers of every replica; before each decision the
router folds in the feedback the store took since its last look, so feedback changes the next
decision without a restart.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from consort.runtime.errors import ConfigError, InvalidRequest
from consort.runtime.fusion import names as strategy_names
from consort.runtime.fusion import register
from consort.runtime.fusion.base import Strategy
from consort.runtime.routing.bandit import BanditRouter
from consort.runtime.routing.base import Router
from consort.runtime.routing.baseline import RandomRouter
from consort.runtime.routing.config import RouteConfig
from consort.runtime.routing.cost import CostModel
from consort.runtime.routing.elo import EloRouter
from consort.runtime.routing.embed import QueryEmbedder, make_embedder, query_text
from consort.runtime.routing.learned import LearnedModel, LearnedRouter
from consort.runtime.routing.store import RoutingStore
from consort.runtime.types import RequestOptions

if TYPE_CHECKING:
    from consort.runtime.core import EnsembleCore
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)


def make_router(config: RouteConfig, members: list[str]) -> Router:
    if config.router == "elo":
        return EloRouter(members, config.elo)
    if config.router == "bandit":
        return BanditRouter(members, config.bandit)
    if config.router == "random":
        return RandomRouter(members, config.seed)
    if config.learned.path is None:
        raise ConfigError("route.router is learned but route.learned.path names no trained router file")
    model = LearnedModel.load(config.learned.path)
    if model.embedder != config.embedder:
        raise ConfigError(
            f"the trained router embeds queries with {model.embedder!r} and route.embedder is {config.embedder!r}"
        )
    return LearnedRouter(members, model, config.learned.alpha)


class Routing:
    """One process's router, its embedder and the shared store: a decision per request."""

    def __init__(self, config: RouteConfig, members: list[str]) -> None:
        self.config = config
        self.members = members
        unknown = sorted(set(config.costs) - set(members))
        if unknown:
            raise ConfigError(f"route.costs names members that are not in the ensemble: {', '.join(unknown)}")
        if config.top > len(members):
            raise ConfigError(f"route.top is {config.top} and the ensemble has {len(members)} members")
        if config.base not in strategy_names("token"):
            raise ConfigError(
                f"route.base must be a token-level strategy ({', '.join(strategy_names('token'))})"
            )
        self.router = make_router(config, members)
        if self.router.learns_online and config.store is None:
            raise ConfigError(
                f"the {config.router} router learns from feedback: set route.store to a SQLite file"
            )
        self.store = RoutingStore(config.store) if config.store is not None else None
        self.costs = CostModel(config.costs)
        self._embedder: QueryEmbedder | None = None
        self._seen = 0  # the last feedback event folded into the router

    @property
    def embedder(self) -> QueryEmbedder:
        if self._embedder is None:
            self._embedder = make_embedder(self.config.embedder)
        return self._embedder

    def refresh(self) -> int:
        """Fold in the feedback stored since the last look (any replica's); returns how many events."""
        if self.store is None or not self.router.learns_online:
            return 0
        events = self.store.feedback_since(self._seen)
        if events:
            self.router.observe(events)
            self._seen = events[-1].id
        return len(events)

    def decide(self, query: str, allowed: list[str] | None = None) -> dict[str, Any]:
        """Scores and the chosen members for one query."""
        embedding = self.embedder.embed([query])[0] if self.router.needs_embedding or self.store else None
        self.refresh()
        scores = self.router.scores(embedding if self.router.needs_embedding else None)
        chosen = self.router.choose(
            scores, self.config.top, self.costs, self.config.cost_weight, self.config.min_score, allowed
        )
        return {"members": chosen, "scores": scores, "embedding": embedding}

    def record(self, request_id: str, members: list[str], embedding: Any) -> None:
        if self.store is not None:
            self.store.record_decision(request_id, self.router.name, members, embedding)


@register
class RouteStrategy(Strategy):
    """Route before generating: the router's choice answers the request (Eagle, RouteLLM, a bandit, random)."""

    name = "route"
    level = "answer"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._routing: Routing | None = None

    @property
    def routing(self) -> Routing:
        if self._routing is None:
            self._routing = Routing(self.ctx.config.route, list(self.ctx.names))
        return self._routing

    def validate(self) -> None:
        _ = self.routing  # a bad route section fails when the strategy is first used, not mid-request

    def admit(
        self,
        core: EnsembleCore,
        prompt: Prompt,
        params: SamplingParams,
        options: RequestOptions,
        seq_id: str | None,
    ) -> str:
        allowed = None
        if options.weights is not None:
            weights = core.resolve_weights(options.weights)
            allowed = [n for n in self.ctx.names if weights[n] > 0]
            if len(allowed) < self.routing.config.top:
                raise InvalidRequest(
                    f"route answers with {self.routing.config.top} members; weights leave {len(allowed)}"
                )
        decision = self.routing.decide(query_text(prompt), allowed)
        chosen: list[str] = decision["members"]
        child_options = RequestOptions(
            strategy="me" if len(chosen) == 1 else self.routing.config.base,
            weights=[1.0 if n in chosen else 0.0 for n in self.ctx.names],
            logprobs=options.logprobs,
            diagnostics=options.diagnostics,
            request_id=options.request_id,
        )
        seq = core.add(prompt, params, child_options, seq_id=seq_id or core.new_id("route"))
        decision_id = options.request_id or seq
        self.routing.record(decision_id, chosen, decision["embedding"])
        core.note(
            seq,
            {
                "route": {
                    "id": decision_id,
                    "router": self.routing.router.name,
                    "members": chosen,
                    "scores": {m: round(s, 6) for m, s in decision["scores"].items()},
                }
            },
        )
        return seq
