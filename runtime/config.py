"""The ensemble's configuration: pydantic models, validated before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from consort.runtime.errors import ConfigError
from consort.runtime.routing.config import RouteConfig


def _registry() -> Any:
    # Imported when validating, not at import: the strategies' modules import this one.
    from consort.runtime import fusion

    return fusion


class MemberConfig(BaseModel):
    """One model of the ensemble."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Short unique name used in logs, metrics, weights and `main`.", min_length=1)
    model: str = Field(description="Model reference: a known alias, a local HF folder, a .gguf file or a hub id.")
    weight: float = Field(default=1.0, ge=0.0, description="Relative weight in fusion and in `me` draws.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    num_gpus: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="GPU share of this member on GPU clusters; below 1 lets small members share a GPU explicitly.",
    )
    num_cpus: float = Field(default=1.0, gt=0.0, description="CPUs reserved for this member's actor.")
    threads: int = Field(default=1, ge=1, description="torch intra-op threads on CPU.")
    kv_cache: Literal["auto", "dynamic", "static"] = Field(
        default="auto",
        description=(
            "Where the member keeps its sequences' keys and values. dynamic: a growing cache per "
            "sequence, packed into one batch per step (the CPU path); static: one preallocated slot per "
            "sequence (up to 2 × max_batch sequences hold one; the least recently stepped gives it up and "
            "is recomputed later), the one-token decode step replayed as a CUDA graph on a GPU; auto: "
            "dynamic, until the static path's graph replay has been checked on a GPU. Both give the same "
            "outputs."
        ),
    )


class GateConfig(BaseModel):
    """Ensemble only where the main member is unsure (GaC thresholded mode)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(
        gt=0.0, le=1.0, description="Fuse only when the main member's top probability is below this."
    )


class DeepenConfig(BaseModel):
    """DeePEn's relative-space fusion parameters (arXiv 2404.12715)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.1, gt=0.0, description="Softmax temperature over anchor similarities.")
    steps: int = Field(default=5, ge=0, description="Gradient steps of the inverse (relative → main) search.")
    learning_rate: float = Field(default=0.15, gt=0.0, description="Step size of the inverse search.")
    relative_top_k: int = Field(
        default=16, ge=1, description="How many of a member's most likely tokens are projected into relative space."
    )
    max_anchors: int | None = Field(
        default=4096,
        ge=1,
        description="Anchor tokens used, most frequent first (None = every shared token, ≈46k for the default pair).",
    )
    min_anchors: int = Field(default=1000, ge=1, description="Refuse members that share fewer anchor tokens than this.")


class VoteConfig(BaseModel):
    """Agent Forest: sample several answers, return the most agreed one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(default=5, ge=1, le=64, description="Answers sampled per request, spread over members.")
    base: str = Field(
        default="member",
        description="How each answer is generated: `member` (each member alone in turn) or a token-level strategy's name.",
    )
    kind: Literal["number", "choice", "span", "free"] = Field(
        default="free", description="How answers are compared: extracted number/letter/span, or embedding similarity."
    )
    temperature: float = Field(default=0.7, ge=0.0, description="Sampling temperature of each answer.")

    @field_validator("base")
    @classmethod
    def _known_base(cls, base: str) -> str:
        allowed = ["member", *_registry().names("token")]
        if base not in allowed:
            raise ValueError(f"vote.base must be one of {', '.join(allowed)}, not {base!r}")
        return base


class MuxConfig(BaseModel):
    """SLM-MUX: k answers per member, the answer of the member whose own answers agree most."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(
        default=3, ge=1, le=64, description="Answers sampled per member (a request's vote_samples overrides)."
    )
    accuracy: dict[str, float] = Field(
        default_factory=dict,
        description="Each member's dev accuracy (by member name, in [0, 1]): breaks ties in agreement, higher wins.",
    )

    @field_validator("accuracy")
    @classmethod
    def _accuracies(cls, accuracy: dict[str, float]) -> dict[str, float]:
        if any(not 0.0 <= a <= 1.0 for a in accuracy.values()):
            raise ValueError("mux.accuracy values are accuracies, each in [0, 1]")
        return accuracy


class CotConfig(BaseModel):
    """CoT-decoding as the way `vote` and `mux` get each member's answers (arXiv 2402.10200)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    branches: int | None = Field(
        default=None,
        ge=1,
        le=20,
        description="Alternative first tokens each member explores, each continued greedily; None: answers are "
        "sampled instead (a request's cot_branches overrides).",
    )


class DebateConfig(BaseModel):
    """Multi-agent debate among the members."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(
        default=2,
        ge=0,
        le=8,
        description="Rounds in which every agent reads the others' answers and revises.",
    )


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling of whole ensembles (one replica = one coordinator + its members)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0, description="Fewest ensemble replicas.")
    max_replicas: int = Field(default=1, ge=1, description="Most ensemble replicas.")
    target_ongoing_requests: float = Field(default=8.0, gt=0, description="Requests per replica Serve aims for.")
    upscale_delay_s: float = Field(default=10.0, ge=0, description="How long load must stay high before adding a replica.")
    downscale_delay_s: float = Field(default=60.0, ge=0, description="How long load must stay low before removing one.")


class ServingConfig(BaseModel):
    """How the ensemble is exposed by Ray Serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(
        default=64,
        ge=1,
        description=(
            "Requests Serve hands one replica at once; raised to at least max_batch + max_queue + 32, so "
            "that requests beyond the bounded queue reach the coordinator and get a 429 instead of waiting "
            "in Serve's unbounded queue."
        ),
    )
    route_prefix: str = Field(default="/", description="HTTP route prefix of the OpenAI app.")


class BatchConfig(BaseModel):
    """`consort batch`: the pool of ensemble replicas that Ray Data runs a batch file through."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(
        default=1,
        ge=1,
        description=(
            "Ensemble replicas in the pool, each a coordinator and its members in one placement group "
            "(`placement` places one replica's members); Ray spreads the replicas over the cluster's nodes."
        ),
    )
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Requests Ray Data hands one replica at a time (rows of one map_batches call).",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests one replica runs at once (default: max_batch); its coordinator steps them together, "
            "more would only wait in its queue."
        ),
    )
    replica_cpus: float = Field(
        default=1.0,
        ge=0.0,
        description="CPUs reserved for each replica's own process (the coordinator); members reserve theirs.",
    )
    replica_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica's process needs, e.g. to keep replicas on a node pool.",
    )
    retry_s: float = Field(
        default=300.0,
        ge=0.0,
        description=(
            "How long a request refused for now (429: the queue is full; 503: a member is restarting) is "
            "tried again before it is written as that error."
        ),
    )


class EnsembleConfig(BaseModel):
    """An ensemble: its members, how their distributions are combined, and how it is placed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="consort", description="Model id served at /v1/models.")
    members: list[MemberConfig] = Field(min_length=1, description="The models; names must be unique.")
    strategy: str = Field(default="deepen", description="Default strategy: a registered strategy's name (`consort strategies`).")
    main: str | None = Field(
        default=None, description="Member whose tokenizer and chat template define the output (default: the first)."
    )
    gate: GateConfig | None = Field(default=None, description="Fuse only where the main member is unsure.")
    top_k: int = Field(default=64, ge=1, le=4096, description="Top-k candidates each member returns per step.")
    deepen: DeepenConfig = Field(default_factory=DeepenConfig, description="DeePEn parameters.")
    vote: VoteConfig = Field(default_factory=VoteConfig, description="Voting parameters.")
    mux: MuxConfig = Field(default_factory=MuxConfig, description="SLM-MUX parameters (the `mux` strategy).")
    cot: CotConfig = Field(default_factory=CotConfig, description="CoT-decoding for `vote` and `mux`.")
    debate: DebateConfig = Field(
        default_factory=DebateConfig, description="Debate parameters (the `debate` strategy)."
    )
    route: RouteConfig = Field(default_factory=RouteConfig, description="Routing parameters (the `route` strategy).")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        default="pack", description="Ray placement strategy of one ensemble's members."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto = cuda where the cluster has GPUs, else cpu."
    )
    max_context: int | None = Field(default=None, ge=16, description="Cap on prompt + completion tokens.")
    max_tokens_limit: int = Field(default=2048, ge=1, description="Largest max_tokens a request may ask for.")
    max_queue: int = Field(default=64, ge=1, description="Admission queue bound; beyond it requests fail with 429.")
    max_batch: int = Field(default=16, ge=1, description="Most sequences stepped together.")
    step_timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one remote member step.")
    transport: Literal["auto", "compiled_graph", "actor_calls"] = Field(
        default="auto",
        description=(
            "How the coordinator reaches its members each step. compiled_graph: a Ray compiled graph "
            "(shared-memory channels, ~0.4 ms a round, but each member and the coordinator keep one "
            "thread spinning on its channel, ~0.7 of a core each even when idle); actor_calls: plain "
            "actor calls (~2 ms a round, nothing spins); auto: compiled_graph when members run on GPUs "
            "(their host cores are spare), actor_calls on CPUs (the spin would take the members' cores)."
        ),
    )
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Ray Serve settings.")
    batch: BatchConfig = Field(
        default_factory=BatchConfig, description="Batch inference on Ray Data (`consort batch`)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleConfig:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        if self.main is not None and self.main not in names:
            raise ValueError(f"main {self.main!r} is not a member; members are {names}")
        if sum(m.weight for m in self.members) <= 0:
            raise ValueError("all member weights are zero; at least one must be positive")
        fusion = _registry()
        if self.strategy not in fusion.REGISTRY:
            raise ValueError(f"unknown strategy {self.strategy!r}; known: {', '.join(fusion.names())}")
        unknown = set(self.mux.accuracy) - set(names)
        if unknown:
            raise ValueError(
                f"mux.accuracy names {sorted(unknown)}, which are not members; members are {names}"
            )
        if self.gate is not None and not fusion.REGISTRY[self.strategy].supports_gate:
            raise ValueError(f"gate applies to {', '.join(fusion.gated_names())}, not {self.strategy!r}")
        return self

    @property
    def main_member(self) -> str:
        return self.main or self.members[0].name

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]


def parse_config(data: dict) -> EnsembleConfig:
    """Validate a config dict, turning pydantic's error into a ConfigError a user can act on."""
    try:
        return EnsembleConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"invalid ensemble config: {problems}") from error


def load_config(path: str | Path) -> EnsembleConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return parse_config(data)


def default_config(strategy: str = "deepen") -> EnsembleConfig:
    """The default ensemble (ensemble.yaml): Qwen2.5-Coder-0.5B-Instruct (main) + SmolLM2-135M-Instruct,
    two chat members with different vocabularies (docs/results.md, "Chat answers")."""
    return parse_config(
        {
            "members": [
                {"name": "qwen", "model": "qwen2.5-coder-0.5b-instruct"},
                {"name": "smollm2", "model": "smollm2-135m-instruct"},
            ],
            "strategy": strategy,
            "main": "qwen",
        }
    )


def pair_config(strategy: str = "deepen") -> EnsembleConfig:
    """The two smallest packaged members, SmolLM2-135M-Instruct (main) + Gemma-3-270M: different
    tokenizers (49k byte-level BPE, 262k SentencePiece) at the least CPU cost, for benchmarks and tests."""
    return parse_config(
        {
            "members": [
                {"name": "smollm2", "model": "smollm2-135m-instruct"},
                {"name": "gemma3", "model": "gemma3-270m"},
            ],
            "strategy": strategy,
            "main": "smollm2",
        }
    )


def members_config(models: list[str], strategy: str, weights: list[float] | None = None) -> EnsembleConfig:
    """Build a config from a list of model references (the CLI's --members)."""
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"{len(weights)} weights given for {len(models)} members")
    names: list[str] = []
    for model in models:
        base = Path(model).name.split(".")[0] or "member"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    members = [
        {"name": n, "model": m, "weight": (weights[i] if weights else 1.0)}
        for i, (n, m) in enumerate(zip(names, models, strict=True))
    ]
    return parse_config({"members": members, "strategy": strategy})
