"""The Serve application: one deployment whose replica embeds a coordinator and owns its members.

`build_app(args)` is a Serve application builder, so the same import path
(`consort.deploy.app:build_app`) works for `serve run deploy/serve_config.yaml`,
`serve deploy`, a KubeRay RayService's serveConfigV2 and `consort serve`.

One replica = one ensemble: the deployment declares a placement group of
`[{"CPU": 1}]` (the replica) + one bundle per member, and the replica's
coordinator starts the members in bundles 1..N. Autoscaling therefore adds and
removes whole ensembles. The FastAPI ingress sits on the same deployment, so a
request takes one hop (proxy → replica) before reaching the coordinator.
"""

# No `from __future__ import annotations` here: Serve's class-based view rebuilds the route signatures
# outside this module, where string annotations would not resolve (bodies would become query params).
import asyncio
import logging
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, RayActorError

from consort.deploy import errors
from consort.deploy.auth import ApiKeyMiddleware
from consort.deploy.errors import Unavailable
from consort.deploy.metrics import CONTENT_TYPE, MetricsMirror
from consort.deploy.openai_api import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelList
from consort.deploy.service import OpenAIService
from consort.runtime.config import EnsembleConfig, default_config, load_config, parse_config
from consort.runtime.errors import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "ensemble.yaml"
DEPLOYMENT_NAME = "ConsortEnsemble"
REPLICA_BUNDLE = {"CPU": 1.0}
HEALTH_TIMEOUT_S = 10.0
HEALTH_RETRY_S = 2.0
PLACEMENT_STRATEGY = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(
        default=None,
        description="Ensemble YAML; relative paths are tried from the working directory, then the repo.",
    )
    config: dict[str, Any] | None = Field(
        default=None, description="The ensemble config inline (as in the YAML)."
    )
    autoscaling_overrides: dict[str, Any] | None = Field(
        default=None,
        description="Extra Ray Serve autoscaling_config fields merged over the ensemble's "
        "(e.g. look_back_period_s, metrics_interval_s for fast-reacting tests).",
    )


def _resolve(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    # A Serve controller builds the app in a worker whose working directory need not be the repo's.
    return REPO_ROOT / candidate


def resolve_config(args: AppArgs) -> EnsembleConfig:
    if args.config_path and args.config:
        raise ConfigError("give config_path or config, not both")
    if args.config is not None:
        return parse_config(args.config)
    if args.config_path:
        return load_config(_resolve(args.config_path))
    return load_config(DEFAULT_CONFIG_FILE) if DEFAULT_CONFIG_FILE.is_file() else default_config()


# -- the ingress ----------------------------------------------------------------------------------
api = FastAPI(
    title="Consort",
    description="Several language models answering as one, over the OpenAI API.",
    responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
)
errors.install(api)
api.add_middleware(ApiKeyMiddleware)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _answer(result: BaseModel | Any) -> Response:
    if isinstance(result, BaseModel):
        return _json(result)
    # No proxy buffering of the event stream (nginx and friends honour this header).
    return StreamingResponse(result, media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class EnsembleServer:
    """A replica: the coordinator, its members (in this replica's placement group) and the OpenAI routes."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from consort.actors.coordinator import Coordinator

        self.config = parse_config(config)
        context = serve.get_replica_context()
        self.mirror = MetricsMirror(replica=context.replica_id.unique_id)
        # Loading members blocks on ray.get; a thread keeps this replica's event loop free meanwhile.
        self.coordinator = await asyncio.to_thread(Coordinator, self.config, in_serve_replica=True)
        self.mirror.mirror(self.coordinator.metrics)
        self.service = OpenAIService(self.coordinator, self.config)
        log.info("ensemble %s ready: %s", self.config.name, ", ".join(m.name for m in self.config.members))

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> Response:
        return _json(self.service.models())

    @api.post("/v1/completions", response_model=None)
    async def completions(self, body: CompletionRequest) -> Response:
        return _answer(await self.service.completions(body))

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        return _answer(await self.service.chat(body))

    @api.get("/health", response_model=None)
    async def health(self) -> Response:
        try:
            status = await asyncio.wait_for(self.coordinator.health(), HEALTH_TIMEOUT_S)
        except (RayActorError, TimeoutError) as error:
            raise Unavailable(
                f"the ensemble's members do not answer ({type(error).__name__}); retry shortly"
            ) from error
        return JSONResponse(
            {"status": "ok", "ensemble": self.config.name, "strategy": self.config.strategy, **status}
        )

    @api.get("/metrics", response_model=None)
    async def metrics(self) -> Response:
        return Response(self.mirror.render(), media_type=CONTENT_TYPE)

    async def member_actors(self) -> dict[str, Any]:
        """The member actor handles, for operators and tests on the cluster (a Serve handle call, no HTTP route)."""
        return {m.name: self.coordinator.member_actor(m.name) for m in self.config.members}

    async def check_health(self) -> None:
        """Serve's periodic probe: replace this replica only when a member is gone for good.

        A member that Ray is restarting (ActorUnavailableError) is left to the
        coordinator's recovery; one that exhausted its restarts (ActorDiedError)
        cannot come back, so a fresh replica with fresh members must.
        """
        for attempt in range(2):
            try:
                await asyncio.wait_for(self.coordinator.member_stats(), HEALTH_TIMEOUT_S)
                return
            except ActorDiedError as error:
                # A call in flight when a member crashes fails this way even if Ray restarts it: ask again.
                if attempt == 1:
                    raise RuntimeError(
                        f"a member of ensemble {self.config.name!r} died for good: {error}"
                    ) from error
                await asyncio.sleep(HEALTH_RETRY_S)
            except (RayActorError, TimeoutError) as error:
                log.warning("health probe: members busy or restarting (%s)", type(error).__name__)
                return

    def __del__(self) -> None:
        coordinator = getattr(self, "coordinator", None)
        if coordinator is not None and ray.is_initialized():
            coordinator.shutdown()


def deployment_options(
    config: EnsembleConfig, autoscaling_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The Serve options that make one replica one whole ensemble."""
    from consort.actors.placement import member_bundles

    scaling = config.serving.autoscaling
    autoscaling = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": max(scaling.min_replicas, 1),
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        **(autoscaling_overrides or {}),
    }
    return {
        "placement_group_bundles": [dict(REPLICA_BUNDLE), *member_bundles(config)],
        "placement_group_strategy": PLACEMENT_STRATEGY[config.placement],
        "ray_actor_options": {"num_cpus": REPLICA_BUNDLE["CPU"]},
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": config.serving.max_ongoing_requests,
    }


def ensemble_app(
    config: EnsembleConfig,
    autoscaling_overrides: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
) -> serve.Application:
    """The application for `config` (extra ray_actor_options, e.g. a runtime_env, are merged in)."""
    if not ray.is_initialized():
        # Placement needs the cluster (GPUs or not); `serve run <import path>` builds before it connects.
        from consort.actors.client import connect

        connect(None)
    options = deployment_options(config, autoscaling_overrides)
    options["ray_actor_options"] = {**options["ray_actor_options"], **(ray_actor_options or {})}
    return EnsembleServer.options(**options).bind(config.model_dump(mode="json"))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: {"config_path": ...} or {"config": {...}}, default the packaged ensemble."""
    try:
        parsed = AppArgs.model_validate(args or {})
    except ValidationError as error:
        raise ConfigError(f"invalid build_app args: {error}") from error
    return ensemble_app(resolve_config(parsed), parsed.autoscaling_overrides)
