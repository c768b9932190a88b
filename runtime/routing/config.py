"""The `route` strategy's configuration (the ensemble config's `route:` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RouterKind = Literal["elo", "learned", "bandit", "random"]
EmbedderKind = Literal["minilm", "hashing"]


class EloConfig(BaseModel):
    """Eagle: a global ELO per member from all feedback, and a local one from the feedback on similar queries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: float = Field(default=1000.0, description="Every member's rating before any feedback.")
    k_factor: float = Field(default=32.0, gt=0.0, description="ELO K: how far one comparison moves a rating.")
    neighbours: int = Field(
        default=20,
        ge=1,
        description="Local ELO: how many of the most similar past queries with feedback count.",
    )
    global_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="P in P·global + (1−P)·local (Eagle's mixing weight)."
    )
    fit: Literal["bradley_terry", "online"] = Field(
        default="bradley_terry",
        description="How ratings come from the comparisons: 'bradley_terry', the maximum-likelihood ratings of "
        "all of them at once (order-free, as Chatbot Arena computes its leaderboard); 'online', Eagle's "
        "sequential ELO updates with k_factor, which weigh recent feedback most.",
    )
    prior_ties: float = Field(
        default=1.0,
        ge=0.0,
        description="bradley_terry: virtual ties between every pair of members, so a member with no losses "
        "(or no feedback) keeps a finite rating.",
    )


class LearnedConfig(BaseModel):
    """RouteLLM: a similarity-weighted ranking between a cheap and a strong member, trained offline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(
        default=None, description="The trained router file written by `consort route train` (.npz)."
    )
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Cost–quality threshold: 0 sends every request to the cheap member, 1 every one to the "
        "strong member; between, the strong member answers when its win probability is at least 1 − alpha.",
    )


class BanditConfig(BaseModel):
    """A contextual bandit (LinUCB, linear in the query embedding) updated from feedback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exploration: float = Field(
        default=0.5,
        ge=0.0,
        description="Width of the upper confidence bound added to each member's estimate.",
    )
    ridge: float = Field(default=1.0, gt=0.0, description="Ridge prior of each member's linear reward model.")


class RouteConfig(BaseModel):
    """Route before generating: a router picks the member(s) that answer each request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    router: RouterKind = Field(
        default="random",
        description="elo (Eagle), learned (RouteLLM), bandit (LinUCB) or random (the baseline, the default: "
        "it needs no store, model or training, so `route` works in any ensemble).",
    )
    store: str | None = Field(
        default=None,
        description="SQLite file holding decisions and feedback, shared by every replica on the node and kept "
        "across restarts (a path on a volume). Required by the elo and bandit routers and by /v1/feedback.",
    )
    embedder: EmbedderKind = Field(
        default="minilm",
        description="Query embeddings: minilm (all-MiniLM-L6-v2, the packaged model) or hashing (a hashed bag "
        "of words; tests and machines without the model).",
    )
    top: int = Field(default=1, ge=1, description="How many members answer: the best `top` by score.")
    base: str = Field(
        default="mean",
        description="The token-level strategy the chosen members run among themselves when top > 1.",
    )
    costs: dict[str, float] = Field(
        default_factory=dict,
        description="Relative cost per generated token of each member (e.g. parameter count in billions); a "
        "member not named costs 1.",
    )
    cost_weight: float = Field(
        default=0.0, ge=0.0, description="Subtracted from a member's score per unit of its normalised cost."
    )
    min_score: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="When set: the cheapest member whose score reaches it answers (the best one when none does).",
    )
    seed: int | None = Field(
        default=None, description="Seed of the random router's draws (None: fresh entropy)."
    )
    elo: EloConfig = Field(default_factory=EloConfig, description="The elo router's parameters.")
    learned: LearnedConfig = Field(
        default_factory=LearnedConfig, description="The learned router's parameters."
    )
    bandit: BanditConfig = Field(default_factory=BanditConfig, description="The bandit router's parameters.")
